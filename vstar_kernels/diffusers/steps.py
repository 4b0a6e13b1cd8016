"""The denoising-step index of a model's forward calls, shared by every feature attached to it.

Each new `pipeline.scheduler.timesteps` tensor (`set_timesteps`) restarts the count at 0; on a bare model each
forward call is one step (docs/integrations.md, Steps). A DiT pipeline's step is read from its scheduler (`loop_step`).

Gradient checkpointing recomputes a block in the backward pass, after the forward call returned. Before each forward
call the tracker wraps the ``_gradient_checkpointing_func`` of every module that has one, so that a checkpointed
block, run first or recomputed, sees the step and the owners' `snapshot` values of the forward call that ran it.
"""

from __future__ import annotations

import inspect
import math
import sys
import warnings
import weakref
from typing import Any, Callable, Dict, List, NamedTuple, Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

from .dit_families import dit_family, unsupported_dit

try:  # diffusers' layer skip (apply_layer_skip; its perturbed-attention and skip-layer guiders)
    from diffusers.hooks.layer_skip import AttentionProcessorSkipHook
except ImportError:  # a diffusers without it: nothing is one
    AttentionProcessorSkipHook = ()


# the owner key of apply_tar's state (each capture attaches under a key of its own)
TAR_OWNER = "tar"

# diffusers' hooks that hand a step an output of earlier steps: an attention's (pyramid attention broadcast,
# FasterCache, TaylorSeer), and blocks' (first-block cache, MagCache, SeaCache)
ATTENTION_REUSE = ("pyramid_attention_broadcast", "faster_cache_block", "taylorseer_cache")
STEP_CACHES = ATTENTION_REUSE + ("fbc_leader_block_hook", "fbc_block_hook", "mag_cache_leader_block_hook",
                                 "mag_cache_block_hook", "sea_cache_leader_block", "sea_cache_block")


def modules_to(model: torch.nn.Module, names) -> List[torch.nn.Module]:
    """The model and the modules on the way to each module named in `names`, that one included, each once."""
    found = {id(model): model}
    for name in names:
        module = model
        for part in name.split("."):
            module = module._modules.get(part) if module is not None else None
            if module is not None:
                found[id(module)] = module
    return list(found.values())


def diffusers_hook(module: torch.nn.Module, name: str):
    """diffusers' hook `name` on `module` (in its hook registry), or None."""
    registry = module.__dict__.get("_diffusers_hook")
    return None if registry is None else registry.get_hook(name)


def _layer_skips(module: torch.nn.Module) -> list:
    """diffusers' layer-skip hooks on `module` (``AttentionProcessorSkipHook``s, as ``apply_layer_skip`` sets them)."""
    registry = module.__dict__.get("_diffusers_hook")
    return [] if registry is None else [h for h in registry.hooks.values() if isinstance(h, AttentionProcessorSkipHook)]


def scores_skipped(module: torch.nn.Module) -> bool:
    """Whether diffusers' layer skip with ``skip_attention_scores`` (a ``LayerSkipConfig``'s, as perturbed-attention
    guidance sets it) is on `module`: its torch function mode answers the module's scaled_dot_product_attention call
    with the values (the identity attention), which has no scores for TAR to regularize."""
    return any(hook.skip_attention_scores for hook in _layer_skips(module))


def values_answer(module: torch.nn.Module, query: torch.Tensor, value: torch.Tensor) -> bool:
    """Whether diffusers' layer skip of the scores (`scores_skipped`) answers this scaled_dot_product_attention call
    of `module` ((B, H, N, D) query and value) with its values: its mode does where the query and the value are as
    long; otherwise it lets the call run, and TAR regularizes it as any call."""
    return query.shape[-2] == value.shape[-2] and scores_skipped(module)


def attention_skipped(module: torch.nn.Module) -> bool:
    """Whether diffusers' layer skip computes no attention in `module`'s calls: its scores skipped (`scores_skipped`),
    or the whole attention (``skip_attention`` at dropout 1: the module's input stands in for its output, the
    processor never runs, but hooks on the module still see the call)."""
    return any(hook.skip_attention_scores or math.isclose(hook.dropout, 1.0) for hook in _layer_skips(module))


def warn_step_cache(modules, until_step: Optional[int], step: int) -> bool:
    """Warn where one of diffusers' `STEP_CACHES` is on `modules` (`modules_to` the regularized ones) at the first
    `step` after a window of steps (`until_step`): it can be handed a regularized output. True once said."""
    if until_step is None or step <= until_step:
        return False
    for module in modules:
        found = next((h for h in STEP_CACHES if diffusers_hook(module, h) is not None), None)
        if found:
            warnings.warn(f"TAR: diffusers' {found} hook on this model hands a step outputs of earlier steps, so a "
                          f"step after until_step={until_step} can reuse a regularized output (for as many steps as "
                          "the cache skips). Keep the cache off around that step (its timestep range) where the "
                          "boundary matters", stacklevel=2)
            return True
    return False


def pipeline_weakref(pipeline):
    """A weak reference to `pipeline`, the object given as holding the model (None for None); a TypeError naming it
    where it takes none."""
    try:
        return None if pipeline is None else weakref.ref(pipeline)
    except TypeError:
        raise TypeError(f"{type(pipeline).__name__} holds the model, and the count of its steps keeps the object "
                        "that holds it by a weak reference, which it does not take (a class with __slots__ and no "
                        "'__weakref__' slot): give the model itself") from None


class _Owner(NamedTuple):
    on_run_start: Optional[Callable[[], None]]
    before_forward: Optional[Callable[[], None]]
    snapshot: Optional[Callable[[], Any]]
    pipeline: Any = None  # weakref to the pipeline given with the owner, or None
    applied: Any = None   # its scheduler's timesteps then (`loop_step`)
    in_run: bool = False  # and whether that pipeline was in a run then (`in_run`)
    kind: str = ""  # that pipeline's class name


class _Snapshot(NamedTuple):
    step: int
    owners: Dict[str, Any]  # owner -> its snapshot value


class _BoundBlock:
    """A checkpointed block that runs with the snapshot of the forward call that checkpointed it.

    Passed to the gradient-checkpointing function instead of the block: torch keeps it and calls
    it again to recompute the block in the backward pass. Other attributes are the block's. The snapshot is
    the tracker's while the block runs (an attribute, not a context variable, which torch.compile cannot
    trace): one model's forward calls and recomputations run one at a time, as its step count is shared too.
    """

    def __init__(self, block: torch.nn.Module, tracker: "StepTracker", snapshot: _Snapshot):
        self._block, self._tracker, self._snapshot = block, tracker, snapshot

    def __call__(self, *args, **kwargs):
        tracker = self._tracker
        outer, tracker._bound = tracker._bound, self._snapshot
        try:
            return self._block(*args, **kwargs)
        finally:
            tracker._bound = outer

    def __getattr__(self, name: str):
        if name in ("_block", "_tracker", "_snapshot"):  # not set yet (copies, pickling)
            raise AttributeError(name)
        return getattr(self._block, name)


class _BindingCheckpoint:
    """A module's gradient-checkpointing function, binding the tracker's snapshot to each block it runs."""

    def __init__(self, function: Callable, tracker: "StepTracker"):
        self.function, self.tracker = function, tracker

    def __call__(self, block: torch.nn.Module, *args, **kwargs):
        return self.function(_BoundBlock(block, self.tracker, self.tracker._snapshot()), *args, **kwargs)


# The model hooks below are kept out of torch.compile's graph (`torch.compiler.disable`; without `reason=`, which
# torch 2.7 and older do not take): compiled whole, fullgraph too, a model runs them eagerly around its compiled
# forward, as TAR and the attention capture count its steps on the host (traced, a bare model's later calls failed
# on a data-dependent guard)

NOT_COPIED = ("a model with TAR or an open attention capture on it cannot be deep-copied or pickled (the copy would "
              "count its steps with the original's state): copy or save it before apply_tar, or after remove_tar "
              "(and the capture's end), and apply TAR to the copy")


class StepTracker:
    """Counts the forward calls of one model; ``step`` is the index of the call in progress.

    Features share one tracker per model, each under its own owner key (``attach(model, "tar")``,
    ``detach`` with the same key; the last owner out removes the hook). An owner may give
    ``on_run_start`` (called whenever the count restarts at 0), ``before_forward`` (before every
    forward call, once ``step`` is set), ``snapshot`` (see `current`) and ``pipeline``: the scheduler of
    the last owner attached with one marks new runs.
    """

    _ATTR = "_vstar_step_tracker"
    _CHECKPOINT_ATTR = "_gradient_checkpointing_func"

    def __init__(self, model: torch.nn.Module):
        self._step = 0
        self._next = 0
        self._owners: Dict[str, _Owner] = {}
        self._timesteps = None  # the scheduler tensor of the current run
        self._checkpointing: List[torch.nn.Module] = []
        self._bound: Optional[_Snapshot] = None  # the snapshot of the call whose checkpointed block runs now
        # a video UNet's denoising loop passes its ``timestep`` on every call, falling or repeated (Heun's, unbatched
        # guidance): a call at a larger timestep than the last call's restarts the count, so that a run the
        # pipeline's scheduler does not mark (another pipeline's, from_pipe with a scheduler of its own; a bare
        # model's next run) is counted from its own first step, for every feature attached (TAR, captures)
        self._timestep_runs = dit_family(model) is None and unsupported_dit(model) is None
        self._last_timestep = None
        self.rose = None  # a bare DiT's call at a larger timestep than the last: (last, this call's)
        self.find_checkpointing(model)
        self._handle = model.register_forward_pre_hook(self._before_forward, with_kwargs=True)

    def __reduce_ex__(self, protocol):
        # copy.deepcopy, pickle, torch.save: the copy's hooks and processors would call back into the original's
        # state (its step, its config)
        raise TypeError(NOT_COPIED)

    @property
    def step(self) -> int:
        """The step of the forward call in progress (inside a checkpointed block: of the call that ran it)."""
        bound = self._bound
        return self._step if bound is None else bound.step

    @property
    def next_step(self) -> int:
        """The step the next forward call will be (unless a new run starts at it)."""
        return self._next

    def current(self, owner: str) -> Any:
        """`owner`'s snapshot value for the call in progress: inside a checkpointed block, the value when the
        forward call ran the block (also when recomputed in the backward pass); else the live one."""
        bound = self._bound
        if bound is None or owner not in bound.owners:  # owner attached after that forward call: live
            return self._owners[owner].snapshot()
        return bound.owners[owner]

    def find_checkpointing(self, model: torch.nn.Module) -> None:
        """Note the modules of `model` that can checkpoint their blocks (diffusers' ``gradient_checkpointing``
        attribute); a model walk, for `attach` and for callers that swapped modules in."""
        self._checkpointing = [m for m in model.modules() if hasattr(m, "gradient_checkpointing")]

    def _snapshot(self) -> _Snapshot:
        bound = self._bound
        if bound is not None:  # a checkpointed block inside a checkpointed block
            return bound
        return _Snapshot(self._step, {name: owner.snapshot() for name, owner in self._owners.items()
                                      if owner.snapshot is not None})

    def _bind_checkpointing(self) -> None:
        for module in self._checkpointing:
            function = vars(module).get(self._CHECKPOINT_ATTR)
            if function is not None and not (isinstance(function, _BindingCheckpoint) and function.tracker is self):
                setattr(module, self._CHECKPOINT_ATTR, _BindingCheckpoint(function, self))

    def _unbind_checkpointing(self) -> None:
        for module in self._checkpointing:
            function = vars(module).get(self._CHECKPOINT_ATTR)
            if isinstance(function, _BindingCheckpoint) and function.tracker is self:
                setattr(module, self._CHECKPOINT_ATTR, function.function)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["StepTracker"]:
        """The tracker attached to `model`, or None."""
        return vars(model).get(cls._ATTR)

    @classmethod
    def attach(cls, model: torch.nn.Module, owner: str, *, pipeline=None,
               on_run_start: Optional[Callable[[], None]] = None,
               before_forward: Optional[Callable[[], None]] = None,
               snapshot: Optional[Callable[[], Any]] = None) -> "StepTracker":
        """The model's tracker (created on first use), now also serving `owner`; `pipeline`: module docstring."""
        pipeline_ref = pipeline_weakref(pipeline)  # before any change to the model
        tracker = cls.of(model)
        if tracker is None:
            tracker = cls(model)
            setattr(model, cls._ATTR, tracker)
        tracker._owners.pop(owner, None)  # the last attached last
        scheduler = getattr(pipeline, "scheduler", None)
        tracker._owners[owner] = _Owner(on_run_start, before_forward, snapshot,
                                        pipeline_ref,
                                        getattr(scheduler, "timesteps", None), in_run(pipeline),
                                        type(pipeline).__name__)
        if pipeline is not None:
            tracker._timesteps = tracker._scheduler_timesteps()
        return tracker

    @classmethod
    def detach(cls, model: torch.nn.Module, owner: str) -> None:
        """`owner` no longer needs the tracker; the last owner out removes the hook."""
        tracker = cls.of(model)
        if tracker is None:
            return
        marking = tracker._marking()
        tracker._owners.pop(owner, None)
        if not tracker._owners:
            tracker._handle.remove()
            tracker._unbind_checkpointing()
            delattr(model, cls._ATTR)
        elif tracker._marking() is not marking:  # another owner's scheduler (or none) marks runs from now on
            tracker._timesteps = tracker._scheduler_timesteps()

    def within(self, pipeline) -> bool:
        """Whether this tracker has counted part of `pipeline`'s run that is not over: calls counted since the
        scheduler's schedule was set, fewer than its timesteps (for a scheduler that keeps no step index, such as
        DDIM's, whose pipeline marks no loop: in_run cannot tell)."""
        if getattr(pipeline, "_interrupt", False):
            return False
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        return timesteps is not None and timesteps is self._timesteps and 0 < self._next < len(timesteps)

    def reset(self, start: int = 0) -> None:
        """The next forward call is step `start` (0: a new run)."""
        self._step = start
        self._next = start
        self._last_timestep = None  # no call of this run yet to compare the next one's timestep with
        for owner in list(self._owners.values()):
            if owner.on_run_start is not None:
                owner.on_run_start()

    def _marking(self):
        """The weakref to the pipeline whose scheduler marks new runs: the last owner's given with one."""
        return next((owner.pipeline for owner in reversed(self._owners.values()) if owner.pipeline is not None), None)

    def _scheduler_timesteps(self):
        marking = self._marking()
        pipeline = marking() if marking is not None else None
        return getattr(getattr(pipeline, "scheduler", None), "timesteps", None)

    @torch.compiler.disable  # out of a compiled model's graph (above NOT_COPIED)
    def _before_forward(self, module, args, kwargs) -> None:
        self.rose = None
        timesteps = self._scheduler_timesteps()
        timestep = self._timestep_of(module, args, kwargs)
        if timesteps is not None and timesteps is not self._timesteps:
            self._timesteps = timesteps
            self.reset()
        elif timestep is not None and self._last_timestep is not None and timestep > self._last_timestep:
            if self._timestep_runs:
                self.reset()
            else:  # a bare DiT's: counted on (diffusion forcing's timesteps may rise within a run)
                self.rose = (self._last_timestep, timestep)
        self._last_timestep = timestep
        self._step = self._next
        self._next += 1
        self._bind_checkpointing()
        for owner in list(self._owners.values()):
            if owner.before_forward is not None:
                owner.before_forward()


    def _timestep_of(self, module, args, kwargs) -> Optional[float]:
        """The largest timestep of a call (a UNet's second argument, or ``timestep=``); a DiT's only outside a
        pipeline that marks its runs."""
        if self._timestep_runs:  # a video UNet's: its second argument
            timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        elif self._marking() is None:  # a bare DiT's, for a warning only (its steps are counted calls)
            timestep = kwargs.get("timestep")
            # given by position: where depends on the family (Wan's 2nd, CogVideoX's 3rd). The class's forward:
            # diffusers before 0.40 put a hook's (module, *args, **kwargs) wrapper on the instance
            if timestep is None and args:
                try:
                    forward = type(module).forward
                    timestep = inspect.signature(forward).bind_partial(module, *args).arguments.get("timestep")
                except (TypeError, ValueError):  # a forward that takes no such call fails on it itself
                    timestep = None
        else:  # a DiT's in a pipeline, which marks its runs
            return None
        if isinstance(timestep, torch.Tensor) and timestep.numel():
            return float(timestep.max())
        return float(timestep) if isinstance(timestep, (int, float)) else None


class Hook:
    """A model hook of a feature that counts steps (TAR, a capture), which raises `NOT_COPIED` where the model is
    pickled or deep-copied (a closure raised pickle's AttributeError naming it)."""

    def __init__(self, function: Callable):
        self.function = function

    @torch.compiler.disable  # out of a compiled model's graph (above NOT_COPIED)
    def __call__(self, *args, **kwargs):
        return self.function(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        raise TypeError(NOT_COPIED)


def in_run(pipeline) -> bool:
    """Whether `pipeline`'s scheduler is in a run now: inside the pipeline's own loop (its ``current_timestep``
    set, not interrupted), or in a loop of one's own (a step index below the schedule's length, or before the
    first step a begin index, ``set_begin_index``). A scheduler only set (``set_timesteps``, or at construction),
    or left by a finished or interrupted run, is in none."""
    if pipeline is None or getattr(pipeline, "_interrupt", False):
        return False
    if getattr(pipeline, "_current_timestep", None) is not None:
        return True
    scheduler = getattr(pipeline, "scheduler", None)
    index, timesteps = getattr(scheduler, "step_index", None), getattr(scheduler, "timesteps", None)
    if index is not None:
        return timesteps is None or index < len(timesteps)
    return getattr(scheduler, "begin_index", None) is not None


def loop_step(steps: StepTracker, owner: str, grid=None) -> int:
    """The denoising-loop index of a DiT's call in progress, for `owner` of `steps` (its pipeline's; docs/dits.md,
    Steps): the loop iteration the scheduler's ``step_index`` gives where it keeps one (counted from the run's
    first, which need not be the schedule's: strength < 1), else the forward calls counted by `StepTracker`; where
    the grid gives the call's largest timestep (`grid.timestep`: diffusion forcing, Helios), `_timestep_step`."""
    given = steps._owners[owner]
    pipeline = given.pipeline
    if pipeline is not None and pipeline() is None:  # its steps and runs would be counted on, never reset
        raise _outside_run(given.kind, gone=True)
    scheduler = getattr(pipeline(), "scheduler", None) if pipeline is not None else None
    if scheduler is None:
        return steps.step
    timesteps = getattr(scheduler, "timesteps", None)
    # the scheduler has not been set for a run since the pipeline was given, when it was in none; or its run was
    # interrupted (the pipeline's loop calls no model from then on)
    unset = timesteps is not None and (timesteps is given.applied and not given.in_run
                                       or _interrupted(pipeline(), timesteps))
    if not hasattr(scheduler, "step_index"):  # forward calls counted: past the run's steps, another run's
        if unset or (timesteps is not None and steps.step >= len(timesteps)):
            raise _outside_run(given.kind)
        return steps.step
    timestep = getattr(grid, "timestep", None)
    if timestep is not None and timesteps is not None:
        if unset:
            raise _outside_run(given.kind)
        return _timestep_step(scheduler, timesteps, timestep, pipeline)
    index = scheduler.step_index
    if timesteps is None:
        return 0 if index is None else index - (getattr(scheduler, "begin_index", None) or 0)
    if unset or (index is not None and index >= len(timesteps)):
        # not set for a run, or finished its run: the model runs outside that pipeline's loop, and its index is
        # another run's, or none
        raise _outside_run(given.kind)
    run = _RUNS.setdefault(timesteps, [False, None])
    if index is None:  # the loop's first iteration: the scheduler sets its index at its first step
        run[0] = True
        return 0
    if run[1] is None:
        # the loop's first index: the pipeline's begin_index where it sets one, else the first index read less one
        # after calls that read none (a pipeline that starts part-way down the schedule, video-to-video at strength
        # < 1, without set_begin_index starts its index there), else (TAR applied in the loop) as the pipeline's
        # count of its run says, else that index
        begin = getattr(scheduler, "begin_index", None)
        if begin is None:
            begin = index - 1 if run[0] else run_begin(pipeline(), index)
        run[1] = index if begin is None else begin
    return index - run[1]


def _interrupted(pipeline, timesteps: torch.Tensor) -> bool:
    """Whether `pipeline` was interrupted in the run of `timesteps`: its flag set now, and not when TAR first saw that
    run (a later run, of a pipeline sharing the scheduler or a loop of one's own, sets new timesteps)."""
    flag = bool(getattr(pipeline, "_interrupt", False))
    when_seen = _INTERRUPTED.setdefault(timesteps, flag)
    return flag and not when_seen


def _in_own_call(pipeline) -> bool:
    """Whether `pipeline`'s own ``__call__`` is running (on this thread's stack), so that what it counts of its run
    (``_num_timesteps``) is this run's, not a past call's."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "__call__" and frame.f_locals.get("self") is pipeline:
            return True
        frame = frame.f_back
    return False


def run_begin(pipeline, index: int) -> Optional[int]:
    """The scheduler index at which `pipeline`'s run began, where its scheduler is at `index`: its ``begin_index``
    (``set_begin_index``), else, for a pipeline that counts its run (``_num_timesteps``: a run from part-way down the
    schedule without a begin index, video-to-video at strength < 1) inside its own call, the schedule's length less
    the run's; None where neither says, or says an index past `index`."""
    scheduler = getattr(pipeline, "scheduler", None)
    begin = getattr(scheduler, "begin_index", None)
    timesteps, run = getattr(scheduler, "timesteps", None), getattr(pipeline, "_num_timesteps", None)
    if begin is None and timesteps is not None and type(run) is int and 0 < run <= len(timesteps) \
            and _in_own_call(pipeline):
        begin = len(timesteps) - run
    return begin if begin is not None and 0 <= begin <= index else None


def _timestep_step(scheduler, timesteps: torch.Tensor, timestep: float, pipeline) -> int:
    """The step of a call whose largest timestep is `timestep`: the number of the schedule's timesteps 1 or more above
    it (a pipeline may pass them truncated to integers: Helios; SkyReels-V2 passes 999 for a frame not started and
    its own value for a re-noised condition frame), after the steps of the run's earlier stages. A schedule set after
    another whose first timestep lies below that one's last continues its run (Helios' pyramid sets one per stage);
    one that starts higher starts a run. Outside the pipeline's loop (`in_run`: Helios' pyramid marks none), a
    timestep 1 or more from every one of the schedule's is another run's."""
    schedule = _schedule(timesteps)
    if not in_run(pipeline()) and not any(abs(t - timestep) < 1 for t in schedule):
        raise _outside_run(type(pipeline()).__name__)
    position = sum(t >= timestep + 1 for t in schedule)
    stage = _STAGES.get(scheduler)
    if stage is None or stage[0] is not timesteps:
        earlier = _schedule(stage[0]) if stage is not None else []
        offset = stage[1] + len(earlier) if earlier and schedule[0] < earlier[-1] else 0
        stage = _STAGES[scheduler] = (timesteps, offset)
    return stage[1] + position


def _outside_run(kind: str, gone: bool = False) -> RuntimeError:
    """The error of a call outside the run of the pipeline (of class `kind`) TAR was applied to; `gone`: that
    pipeline no longer exists."""
    where = "which no longer exists (a pipeline built anew around the model)" if gone else \
        "which is not running a denoising loop: the model was called by another pipeline with a scheduler of its " \
        "own (from_pipe(..., scheduler=...)) or outside a run"
    return RuntimeError(f"TAR takes its steps from the scheduler of the {kind} it was applied to, {where}. Apply TAR "
                        "to the pipeline that runs, or to the model itself (forward calls counted)")


# a run's scheduler timesteps tensor -> [whether a call read no step index, the index of the loop's first
# iteration]: one entry per run, shared by every model the scheduler steps (Wan 2.2's two experts)
_RUNS = WeakIdKeyDictionary()


# a run's scheduler timesteps tensor -> whether its pipeline was interrupted when TAR first saw that run
_INTERRUPTED = WeakIdKeyDictionary()


# a scheduler -> (the timesteps tensor of its run's latest stage, the steps of the run's stages before it)
_STAGES = WeakIdKeyDictionary()


# a scheduler's timesteps tensor -> its values: read once per run, not per attention call (schedulers set a new
# tensor in set_timesteps)
_SCHEDULES = WeakIdKeyDictionary()


def _schedule(timesteps: torch.Tensor) -> List[float]:
    values = _SCHEDULES.get(timesteps)
    if values is None:
        values = _SCHEDULES[timesteps] = [float(t) for t in timesteps.tolist()]
    return values
