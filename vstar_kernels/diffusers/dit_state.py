"""TAR's state on one video DiT: where and when it regularizes, the processors it installed (kept in place of
processors set since), and the token grid of the call in progress (`watch_layout`)."""

from __future__ import annotations

import functools
import inspect
import warnings
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch

from ..frames import TokenLayout, as_layout
from ..functional import Speculation
from ..tar_config import LevelSpec, TARConfig
from .dit import DiTTARProcessor, layer_skip_reads_the_wrapped
from .dit_families import DiTFamily, set_processor
from .steps import TAR_OWNER, Hook, StepTracker, loop_step, warn_step_cache


@dataclass
class DiTState:
    config: TARConfig
    family: DiTFamily
    steps: StepTracker
    spec: LevelSpec
    blocks: frozenset
    pipeline: Any = None  # weakref to the pipeline, or None on a bare model
    installed: List[Tuple[torch.nn.Module, DiTTARProcessor]] = field(default_factory=list)
    grid: Optional[TokenLayout] = None   # the token layout of the call in progress
    # what every regularized module of the call in progress reads (`begin_call`): its grid, and the spec or None
    call: Optional[Tuple[Optional[TokenLayout], Optional[LevelSpec]]] = None
    perturbed: bool = False  # that call perturbs the model for guidance (watch_layout; TAR runs it as any other)
    hooks: Tuple = ()
    # the speculative one pass or two passes: the rows the last forward call recomputed decide the next's
    speculation: Speculation = field(default_factory=Speculation)
    removed: bool = False  # remove_tar ran: a processor of this state set back later (unfuse) runs stock
    said_one_frame: bool = False  # the warning that a call of one frame runs stock was given
    said_rise: bool = False  # the warning that a bare model's call at a larger timestep is counted on was given
    said_cache: bool = False  # the warning that a cache of diffusers' reuses outputs past until_step was given
    watched: List[torch.nn.Module] = field(default_factory=list)  # `steps.modules_to` the regularized modules

    @property
    def step(self) -> int:
        return loop_step(self.steps, TAR_OWNER, self.grid)

    def begin_call(self) -> None:
        """Before each forward call, once its grid is known: fix the call's (grid, spec or None), which every
        regularized module reads (`current`), so that a module reads no step (under torch.compile, a value read is a
        guard: a step would compile again at every step, a block index at every block). A call of one frame runs
        stock (with a warning, once); the first step after `until_step` with a step cache on warns, once."""
        self.call = None
        step = self.step
        spec = self.spec_at(None, step)
        if not self.said_cache:  # a step cache of diffusers' (`steps.warn_step_cache`), once
            self.said_cache = warn_step_cache(self.watched, self.config.until_step, step)
        if spec is not None and self.grid is not None and as_layout(self.grid).one_frame():
            if not self.said_one_frame:  # once per apply_tar
                self.said_one_frame = True
                warnings.warn("TAR: a regularized attention call has one latent frame of video; TAR needs two frames "
                              "or more, so such calls run without TAR (the stock model's output)", stacklevel=2)
            spec = None
        self.call = (self.grid, spec)

    def end_call(self) -> None:
        self.call = None

    def restart(self) -> None:
        """The count restarts: nothing to do (outside a call, `snapshot` reads the live step)."""

    def snapshot(self) -> Tuple[Optional[TokenLayout], Optional[LevelSpec]]:
        return self.call if self.call is not None else (self.grid, self.spec_at(None))

    def current(self) -> Tuple[Optional[TokenLayout], Optional[LevelSpec]]:
        """(token grid, spec or None) of the call in progress; in a checkpointed block, of the forward call that ran
        it; outside a forward call, the live step's spec (and no grid)."""
        return self.steps.current(TAR_OWNER)

    def wrap(self, module: torch.nn.Module, stock, name: str, block: int) -> Tuple[torch.nn.Module, DiTTARProcessor]:
        """Give `module` a `DiTTARProcessor` around its `stock` processor."""
        processor = DiTTARProcessor(stock, name, block, self)
        layer_skip_reads_the_wrapped(type(processor))
        set_processor(module, processor)
        return module, processor

    def sync(self) -> None:
        """Before each forward call: wrap the processors set on the regularized modules since the last one
        (``set_attn_processor``, ``fuse_qkv_projections``): one attribute comparison per module; and choose the
        call's speculative or two-pass forward (`Speculation.next_step`)."""
        self.speculation.next_step()
        if self.steps.rose is not None and self.config.until_step is not None and not self.said_rise:
            self.said_rise = True
            last, now = self.steps.rose
            warnings.warn(f"TAR: a forward call of a bare video DiT at a larger timestep than the last "
                          f"({now:g} after {last:g}) is counted on as step {self.steps.step}, not as a new run's "
                          f"step 0 (until_step={self.config.until_step}): on a bare DiT, TAR counts forward calls "
                          "across runs. Apply TAR to the pipeline, or call reset_steps(model) before each run")
        for index, (module, installed) in enumerate(self.installed):
            current = module.processor
            if current is installed:
                continue
            if isinstance(current, DiTTARProcessor) and current.state is self and current.block == installed.block:
                self.installed[index] = (module, current)  # TAR's own, set back (unfuse_qkv_projections)
                continue
            stock = current.processor if isinstance(current, DiTTARProcessor) else current
            self.installed[index] = self.wrap(module, stock, installed.name, installed.block)

    def uninstall(self) -> None:
        """Give every module its stock processor back (one set since the last forward call: that one), and
        remove the hooks."""
        self.sync()
        for module, processor in self.installed:
            set_processor(module, processor.processor)
        for hook in self.hooks:
            hook.remove()
        self.removed = True

    def stood_in_for(self, key: str, processor):
        """The stock processor in `processor`, saved under `key` (fuse_qkv_projections's dict), where it is this
        state's TAR processor; any other as it is."""
        return processor.processor if getattr(processor, "state", None) is self else processor

    def spec_at(self, block: Optional[int], step: Optional[int] = None) -> Optional[LevelSpec]:
        """The spec of `block` (None: of the regularized blocks) at `step` (default: the live step), or None where
        it runs stock."""
        step = self.step if step is None else step
        if block is not None and block not in self.blocks:
            return None
        return self.spec if self.spec.active and self.config.regularizes(step) else None


def watch_layout(model: torch.nn.Module, family: DiTFamily, target) -> Tuple:
    """Hooks that keep ``target.grid`` the `TokenLayout` of the model's call in progress, ``target.perturbed``
    whether that call perturbs the model for guidance (`DiTFamily.perturbs`), and ``target.call_batch`` the batch
    of its hidden_states as the model was called (a hook inside the forward may pass its blocks fewer).

    Returns the two hook handles; the grid is None outside a forward call (also after one raised).
    """
    # the class's forward, not the instance's: diffusers before 0.40 put a hook's wrapper there (enable_parallelism
    # does, for a plan entry on the model itself), whose signature is (module, *args, **kwargs)
    signature = inspect.signature(functools.partial(type(model).forward, model))

    def read_layout(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        target.grid = family.layout(module, bound.arguments)
        target.perturbed = family.perturbs is not None and family.perturbs(bound.arguments)
        hidden = bound.arguments.get("hidden_states")
        target.call_batch = hidden.shape[0] if isinstance(hidden, torch.Tensor) else None

    def forget_layout(module, args, output):
        target.grid = None
        target.perturbed = False
        target.call_batch = None

    return (model.register_forward_pre_hook(Hook(read_layout), with_kwargs=True),
            model.register_forward_hook(Hook(forget_layout), always_call=True))
