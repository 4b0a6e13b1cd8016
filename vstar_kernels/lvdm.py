"""TAR for VideoCrafter-style (lvdm) attention modules (docs/integrations.md, "VideoCrafter2 (lvdm) front-ends").
Needs only torch. The patch is an instance attribute ``forward`` (lvdm puts one there for xformers), so removal
puts back exactly what was there; the caller sets the step (``set_step(model, i)``) for both guidance branches.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

import torch

from .functional import tar_attention
from .tar_config import PRESETS, LevelSpec, TARConfig, uncompiled

__all__ = ["PRESETS", "LevelSpec", "TARConfig", "apply_tar_to_modules", "remove_tar_from_modules", "set_step",
           "tar_modules"]

INTERFACE = ("to_q", "to_k", "to_v", "to_out", "heads", "scale")

_STATE_ATTR = "_vstar_tar_modules"


@dataclass
class _State:
    config: TARConfig
    step: Optional[int] = None
    # whether `step` is regularized (None: no step set; False once removed), what the patched forwards read: a step
    # read there would be a guard of torch.compile, which compiled the model again at every step
    regularizing: Optional[bool] = None
    patched: List["_TARForward"] = field(default_factory=list)


def _call_arguments(x, context=None, mask=None, time_index=None):
    """The lvdm attention call signature (VSTAR's lvdm passes ``time_index``, which its attention does not read:
    the step is what `set_step` set)."""
    return x, context, mask


@dataclass
class _Unbound:
    function: Callable


class _TARForward:
    """The forward of one patched module: TAR where regularized, the module's previous forward elsewhere."""

    def __init__(self, name: str, module: torch.nn.Module, level: int, spec: LevelSpec, state: _State):
        self.name = name
        self.module = module
        self.level = level
        self.spec = spec
        self.state = state
        # the module's instance attribute `forward`, or None (not a sentinel object, which a deepcopy or pickle of
        # the model would copy into another)
        self.previous: Optional[Callable] = vars(module).get("forward")

    def original(self, *args, **kwargs):
        """The module's forward before the patch."""
        forward = self.previous if self.previous is not None else type(self.module).forward.__get__(self.module)
        return forward(*args, **kwargs)

    def __getstate__(self):
        # pickle stores a method bound to the module as getattr(module, name), which while the model loads gives
        # this object back (a patched forward calling itself): keep the function, bound again on load
        state = dict(vars(self))
        if getattr(self.previous, "__self__", None) is self.module:
            state["previous"] = _Unbound(self.previous.__func__)
        return state

    def __setstate__(self, state):
        vars(self).update(state)
        if isinstance(self.previous, _Unbound):
            self.previous = self.previous.function.__get__(self.module)

    def __call__(self, *args, **kwargs):
        if not self._regularized():
            return self.original(*args, **kwargs)
        x, context, mask = _call_arguments(*args, **kwargs)
        if context is not None and context is not x:
            raise ValueError(f"{self.name}: TAR regularizes self-attention over frames, but this call passed a "
                             "context (cross-attention); select only temporal self-attention modules")
        if mask is not None:
            raise ValueError(f"{self.name}: TAR takes no mask, but this call passed one")
        module = self.module
        frames = x.shape[1]
        q, k, v = (proj(x).unflatten(-1, (int(module.heads), -1)).transpose(1, 2)
                   for proj in (module.to_q, module.to_k, module.to_v))
        out = tar_attention(q, k, v, scale=float(module.scale), backend=self.state.config.backend,
                            **self.spec.tar_kwargs(frames, frames, device=q.device, dtype=q.dtype,
                                                   where=f"{self.name} (level {self.level})"))
        return module.to_out(out.transpose(1, 2).flatten(2))  # (a reshape to -1 channels failed on an empty batch)

    def _regularized(self) -> bool:
        config, regularizing = self.state.config, self.state.regularizing
        if not self.spec.active:
            return False
        if regularizing is None and config.until_step is not None:
            raise RuntimeError(f"{self.name}: TAR runs on steps 0..{config.until_step} only and no step was set: "
                               "call set_step(model, i) before each denoising step (0 = noisiest)")
        return regularizing is None or regularizing  # no step set gets here only without until_step: every step

    def restore(self) -> None:
        if vars(self.module).get("forward") is not self:  # set since (a wrapper of this patch): it stays
            return
        if self.previous is None:
            del self.module.forward
        else:
            self.module.forward = self.previous


def _check_interface(name: str, module) -> None:
    missing = [attr for attr in INTERFACE if not hasattr(module, attr)]
    if missing:
        raise TypeError(f"{name} ({type(module).__name__}) lacks {', '.join(missing)} of the lvdm attention "
                        f"interface ({', '.join(INTERFACE)}); select returned a level for it")
    if isinstance(module.to_out, torch.nn.ModuleList) or not callable(module.to_out):
        raise TypeError(f"{name}: to_out must be callable on the merged heads (lvdm's Linear + Dropout sequence); "
                        "for diffusers Attention modules use vstar_kernels.diffusers.apply_tar")
    heads = module.heads
    if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
        raise TypeError(f"{name}: heads must be a positive int, got {heads!r}")
    if isinstance(module.scale, bool) or not isinstance(module.scale, numbers.Real):
        raise TypeError(f"{name}: scale must be a real number, got {module.scale!r}")
    if not math.isfinite(module.scale):
        raise ValueError(f"{name}: scale must be finite, got {module.scale!r}")
    if getattr(module, "relative_position", False):
        raise ValueError(f"{name} adds relative position embeddings to its scores, which TAR does not compute")


def apply_tar_to_modules(model: torch.nn.Module, config: TARConfig, *,
                         select: Callable[[str, torch.nn.Module], Optional[int]]) -> List[str]:
    """Regularize lvdm-style temporal attention modules of `model` with TAR (docs/integrations.md).

    ``select(name, module)`` returns the resolution level (int, 0 = full latent resolution) of a temporal
    self-attention module of ``model.named_modules()``, or None; modules at levels the config does not list
    are left alone (``config.include_input_block`` is not used). Returns the patched modules' names; applying
    again replaces the config. TypeError: a selected module lacks the interface; ValueError: no module, a bad
    level, or a config level without a module.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(config, TARConfig):
        raise TypeError(f"config must be a TARConfig, got {type(config).__name__}")
    if not callable(select):
        raise TypeError(f"select must be a function (name, module) -> level or None, got {type(select).__name__}")
    model = uncompiled(model)  # the patches go on the modules, named as the model names them
    if config.blocks is not None:
        raise ValueError("blocks= selects transformer blocks of a video DiT (vstar_kernels.diffusers.apply_tar); "
                         "the LVDM front-end regularizes by resolution level: use levels")
    chosen = []
    for name, module in model.named_modules():
        level = select(name, module)
        if level is None:
            continue
        if isinstance(level, bool) or not isinstance(level, numbers.Integral) or level < 0:
            raise ValueError(f"select({name!r}, ...) returned {level!r}: a level is an int >= 0, or None")
        chosen.append((name, module, int(level)))
    if not chosen:
        raise ValueError("select returned a level for no module of the model")
    found = sorted({level for _, _, level in chosen})
    missing = sorted(set(config.levels) - set(found))
    if missing:
        raise ValueError(f"config levels {missing} have no module: select put modules at levels {found}")
    chosen = [(name, module, level) for name, module, level in chosen if level in config.levels]
    applied = vars(model).get(_STATE_ATTR)  # this model's own patches, which applying again replaces
    ours = set() if applied is None else {id(patch.module) for patch in applied.patched}
    for name, module, _ in chosen:
        _check_interface(name, module)
        forward = vars(module).get("forward")
        if isinstance(forward, _TARForward) and forward.state.patched and id(module) not in ours:
            raise ValueError(f"{name}: TAR is applied to it already, through another model that holds it (or one "
                             "it holds); call remove_tar_from_modules on that model first")

    if applied is not None:
        remove_tar_from_modules(model)
    state = _State(config)
    for name, module, level in chosen:
        patch = _TARForward(name, module, level, config.levels[level], state)
        module.forward = patch
        state.patched.append(patch)
    setattr(model, _STATE_ATTR, state)
    return [patch.name for patch in state.patched]


def set_step(model: torch.nn.Module, step: int) -> None:
    """The denoising step the next calls belong to (0 = noisiest), for every module TAR patched in `model`."""
    state = _state(model, "set_step")
    if state is None:
        raise ValueError(f"{type(model).__name__} has no TAR modules: call apply_tar_to_modules first")
    state.regularizing = state.config.regularizes(step)  # (which checks `step`)
    state.step = int(step)


def remove_tar_from_modules(model: torch.nn.Module) -> None:
    """Give every patched module back the forward it had before (no-op without TAR); a forward set on one since
    TAR (a wrapper of TAR's patch) stays, and TAR's patch under it runs the forward from before."""
    state = _state(model, "remove_tar_from_modules")
    if state is None:
        return
    state.regularizing = False  # for a patch a later forward still calls
    for patch in state.patched:
        patch.restore()
    state.patched.clear()  # (such a patch, put back later, is TAR removed: _state's scan passes it)
    delattr(model, _STATE_ATTR)


def tar_modules(model: torch.nn.Module) -> List[Tuple[str, int, LevelSpec]]:
    """(name, level, LevelSpec) of each module TAR patched in `model`, in module order."""
    state = _state(model)
    return [] if state is None else [(p.name, p.level, p.spec) for p in state.patched]


def _state(model, caller=None):
    """TAR's state on `model`, or None; for `caller`, a ValueError where `model` has none but holds TAR's patch (a
    part of the model TAR was applied to, or a copy of one: the state is that model's)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    state = vars(uncompiled(model)).get(_STATE_ATTR)
    for name, module in model.named_modules() if state is None and caller else ():
        forward = vars(module).get("forward")
        if isinstance(forward, _TARForward) and forward.state.patched:
            raise ValueError(f"{caller}: {type(model).__name__} holds TAR's patch (at {name or 'itself'}) but not its "
                             f"state, which is on the model apply_tar_to_modules was given (one holding this or held "
                             f"by it, or the one a copy of this part came from): call {caller} on that model")
    return state
