"""`apply_tar`, `remove_tar` and `reset_steps` for video UNets and DiTs alike: a model under TAR keeps its state
(`processors.UNetState`, `dit_state.DiTState`) in one attribute and one owner key of its step tracker; the state's
``sync`` runs before each forward call, ``snapshot`` is what a checkpointed block sees again, ``uninstall`` undoes it.
"""

from __future__ import annotations

from typing import Callable, List, Tuple

import torch

from ..tar_config import TARConfig, uncompiled
from .dit_families import dit_attention_modules, dit_family, unsupported_dit
from .dit_state import DiTState, watch_layout
from .processors import UNetState, temporal_at
from .steps import TAR_OWNER, Hook, StepTracker, in_run, modules_to, pipeline_weakref, run_begin

STATE_ATTR = "_vstar_tar"
DENOISERS = ("unet", "transformer", "transformer_2")


def denoiser(target):
    """(model, pipeline or None) for a pipeline (its first denoiser of `DENOISERS` present) or a model, `unwrapped`."""
    if isinstance(target, torch.nn.Module):
        return unwrapped(target), None
    for attr in DENOISERS:
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return unwrapped(model), target
    raise TypeError(f"target must be a diffusers pipeline with a denoiser ({', '.join('.' + a for a in DENOISERS)}) "
                    f"or a model (torch.nn.Module), got {type(target).__name__}")


def unwrapped(model: torch.nn.Module) -> torch.nn.Module:
    """The model a torch.compile, DistributedDataParallel or one-device DataParallel wrapper holds (TAR goes on it,
    and its levels are read from its own module names, not the wrapper's ``module.``-prefixed ones)."""
    while True:
        model = uncompiled(model)
        if isinstance(model, torch.nn.DataParallel) and len(model.device_ids) > 1:
            raise ValueError(f"DataParallel over {len(model.device_ids)} devices calls a copy of the model on each, "
                             "which TAR would count as that many steps: use DistributedDataParallel")
        if not isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
            return model
        model = model.module


def tar_models(model: torch.nn.Module, pipeline) -> List[Tuple[str, torch.nn.Module]]:
    """(name prefix, model) of every model TAR goes on: the model; for a DiT's pipeline, its ``transformer`` and
    Wan 2.2's second expert ``transformer_2``, whichever are present (prefixed by the attribute, unless
    ``transformer`` is the only one)."""
    if pipeline is None or dit_family(model) is None:
        return [("", model)]
    experts = []
    for attr in ("transformer", "transformer_2"):
        expert = unwrapped(getattr(pipeline, attr, None))
        if isinstance(expert, torch.nn.Module) and dit_family(expert) is not None \
                and all(expert is not other for _, other in experts):
            experts.append((attr, expert))
    return [("", model)] if [attr for attr, _ in experts] == ["transformer"] else experts


def tar_state(model: torch.nn.Module):
    """TAR's state on `model` (`UNetState` or `DiTState`), or None."""
    return vars(model).get(STATE_ATTR)


def _attach(model: torch.nn.Module, pipeline, make_state: Callable[[StepTracker], object]):
    """TAR's state `make_state(step tracker)` on `model`, in place of any; its next forward call is step 0, or
    where TAR, applied again, replaces its config in the middle of `pipeline`'s run (as the pipeline says, or as
    TAR's count of that run's schedule says: `StepTracker.within`), the run's next step; applied first in the
    middle of a run whose scheduler keeps a step index, that index less the run's first (`run_begin`; 0 where
    unknown): the loop's next iteration; where the scheduler keeps none, the count of the run another feature (a
    capture) kept, if one did."""
    tracker = StepTracker.of(model)
    index = getattr(getattr(pipeline, "scheduler", None), "step_index", None)
    counted = tracker is not None and tracker.within(pipeline)
    going_on = (tar_state(model) is not None and (counted or tracker is not None and in_run(pipeline))
                or index is None and counted)
    if going_on:
        start = tracker.next_step
    else:
        start = index - (run_begin(pipeline, index) or 0) if index is not None and in_run(pipeline) else 0
    _detach(model)
    # the tracker's hooks run in forward calls, once `state` below exists
    steps = StepTracker.attach(model, TAR_OWNER, pipeline=pipeline, on_run_start=lambda: state.restart(),
                               before_forward=lambda: state.sync(), snapshot=lambda: state.snapshot())
    try:
        state = make_state(steps)  # a UNet's undoes what it did if it raises
    except BaseException:
        StepTracker.detach(model, TAR_OWNER)
        raise
    setattr(model, STATE_ATTR, state)
    steps.reset(start)  # also where another feature was counting already
    return state


def _detach(model: torch.nn.Module) -> None:
    state = tar_state(model)
    if state is not None:
        saved = getattr(model, "original_attn_processors", None)  # fuse_qkv_projections's, which unfuse puts back
        if isinstance(saved, dict):
            for key, processor in saved.items():
                saved[key] = state.stood_in_for(key, processor)
        state.uninstall()
        delattr(model, STATE_ATTR)
        StepTracker.detach(model, TAR_OWNER)


def _check_dit_config(model: torch.nn.Module, config: TARConfig) -> None:
    name = type(model).__name__
    if config.preset is not None:
        raise ValueError(f"{config.preset!r} is a VSTAR preset for video UNets and {name} is a video DiT, for "
                         "which the paper has none: give its level, levels={0: (sigma, strength)} with sigma in "
                         "latent frames")
    other = sorted(set(config.levels) - {0})
    if other:
        raise ValueError(f"{name} is a video DiT with one resolution level, 0 (levels={{0: (sigma, strength)}}, "
                         f"sigma in latent frames); the config has levels {other}")
    if config.include_input_block:
        raise ValueError(f"include_input_block applies to video UNets; {name} has no input-block temporal attention")
    dit_attention_modules(model, config.blocks)


def _dit_state(model: torch.nn.Module, pipeline, config: TARConfig, steps: StepTracker) -> DiTState:
    family = dit_family(model)
    modules = dit_attention_modules(model)
    blocks = frozenset(range(len(modules)) if config.blocks is None else config.blocks)
    state = DiTState(config, family, steps, config.levels[0], blocks, pipeline_weakref(pipeline))
    # after the layout's pre-hook: the call's grid and spec, fixed before its blocks run
    state.hooks = watch_layout(model, family, state) + (
        model.register_forward_pre_hook(Hook(lambda *_: state.begin_call())),
        model.register_forward_hook(Hook(lambda *_: state.end_call()), always_call=True))
    state.installed = [state.wrap(module, module.processor, name, index)
                       for index, (name, module) in enumerate(modules) if index in blocks]
    state.watched = modules_to(model, [processor.name for _, processor in state.installed])
    return state


def apply_tar(target, config: TARConfig) -> List[str]:
    """Regularize the temporal attention of a pipeline's denoiser (or of a model) with TAR.

    `target`: a pipeline (its ``.unet`` or ``.transformer``, and Wan 2.2's ``.transformer_2``) or the model
    (each forward call one step, from 0 now and, on a UNet, at a larger timestep; `reset_steps`). Returns the
    names of the attention modules TAR now runs on; applying again replaces the config. docs/integrations.md
    has the modules, levels, steps, processors set afterwards and gradient checkpointing, docs/dits.md the
    video DiTs. A ValueError names a level or block the model lacks. One that raises leaves the model without TAR
    (a config applied before is removed too).
    """
    if not isinstance(config, TARConfig):
        raise TypeError(f"config must be a TARConfig, got {type(config).__name__}")
    model, pipeline = denoiser(target)
    if dit_family(model) is not None:
        experts = tar_models(model, pipeline)
        for _, expert in experts:
            _check_dit_config(expert, config)
        names = []
        for prefix, expert in experts:
            state = _attach(expert, pipeline, lambda steps: _dit_state(expert, pipeline, config, steps))
            names += [f"{prefix}.{processor.name}" if prefix else processor.name for _, processor in state.installed]
        return names
    reason = unsupported_dit(model)
    if reason is not None:
        raise ValueError(f"{reason} (docs/dits.md lists the video models of diffusers and why)")
    temporal = temporal_at(model, config.levels, input_block=config.include_input_block)
    if config.blocks is not None:
        raise ValueError(f"blocks= selects transformer blocks of a video DiT; {type(model).__name__} is regularized "
                         f"by resolution level: use levels (its temporal attention runs at levels "
                         f"{sorted({t.level for t in temporal})})")
    state = _attach(model, pipeline, lambda steps: UNetState(model, config, steps, temporal))
    return [site.name for site in state.sites]


def remove_tar(target) -> None:
    """Restore the processors from before `apply_tar` (or those set since) and remove its hooks (no-op without TAR).

    Needed before diffusers' ``set_default_attn_processor()``, which raises while TAR's processors are installed.
    """
    for _, model in tar_models(*denoiser(target)):
        _detach(model)


def reset_steps(target) -> None:
    """Make the next forward call of the model step 0 (a bare DiT's between runs; a bare UNet's next run starts at
    a larger timestep, which restarts the count too)."""
    for _, model in tar_models(*denoiser(target)):
        tracker = StepTracker.of(model)
        if tracker is None:
            raise ValueError(f"{type(model).__name__} has no step counter: call apply_tar first")
        tracker.reset()
