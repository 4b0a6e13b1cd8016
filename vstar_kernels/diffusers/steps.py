"""The denoising-step index of a model's forward calls, shared by every feature attached to it.

A diffusers pipeline calls its denoiser once per iteration of its denoising
loop (the classifier-free-guidance branches are batched into that one call),
so the loop index is the number of forward calls since the loop began. A
loop begins with `scheduler.set_timesteps`, which gives the scheduler a new
`timesteps` tensor: the tracker notices the new tensor at the next forward
call and starts counting from 0 again. This holds for every scheduler (Heun
repeats timesteps, DDIM keeps no step index), for FreeInit's repeated loops,
and after `pipe.scheduler` is replaced, and nothing in the pipeline or the
scheduler is patched.

On a bare model (no pipeline) each forward call is one step, counted from 0
at the first `attach` or the last `reset`.
"""

from __future__ import annotations

import weakref
from typing import Callable, Dict, NamedTuple, Optional

import torch


class _Owner(NamedTuple):
    on_run_start: Optional[Callable[[], None]]
    before_forward: Optional[Callable[[], None]]


class StepTracker:
    """Counts the forward calls of one model; ``step`` is the index of the call in progress.

    Features share one tracker per model: each attaches under its own owner key
    (``StepTracker.attach(model, "tar")``) and detaches with the same key; the
    forward pre-hook is removed when the last owner detaches. An owner may give
    ``on_run_start``, called (before the model runs) whenever the count restarts
    at 0: a new pipeline run, or `reset`; and ``before_forward``, called before
    every forward call of the model, once ``step`` is set.
    """

    _ATTR = "_vstar_step_tracker"

    def __init__(self, model: torch.nn.Module):
        self.step = 0
        self._next = 0
        self._owners: Dict[str, _Owner] = {}
        self._pipeline = None  # weakref to the pipeline whose scheduler marks a new run
        self._timesteps = None  # the scheduler tensor of the current run
        self._handle = model.register_forward_pre_hook(self._before_forward)

    @classmethod
    def of(cls, model: torch.nn.Module) -> Optional["StepTracker"]:
        """The tracker attached to `model`, or None."""
        return vars(model).get(cls._ATTR)

    @classmethod
    def attach(cls, model: torch.nn.Module, owner: str, *, pipeline=None,
               on_run_start: Optional[Callable[[], None]] = None,
               before_forward: Optional[Callable[[], None]] = None) -> "StepTracker":
        """The model's tracker (created on first use), now also serving `owner`.

        With `pipeline`, a new `pipeline.scheduler.timesteps` tensor restarts the count.
        """
        tracker = cls.of(model)
        if tracker is None:
            tracker = cls(model)
            setattr(model, cls._ATTR, tracker)
        if pipeline is not None:
            tracker._pipeline = weakref.ref(pipeline)
            tracker._timesteps = tracker._scheduler_timesteps()
        tracker._owners[owner] = _Owner(on_run_start, before_forward)
        return tracker

    @classmethod
    def detach(cls, model: torch.nn.Module, owner: str) -> None:
        """`owner` no longer needs the tracker; the last owner out removes the hook."""
        tracker = cls.of(model)
        if tracker is None:
            return
        tracker._owners.pop(owner, None)
        if not tracker._owners:
            tracker._handle.remove()
            delattr(model, cls._ATTR)

    def reset(self) -> None:
        """The next forward call is step 0."""
        self.step = 0
        self._next = 0
        for owner in list(self._owners.values()):
            if owner.on_run_start is not None:
                owner.on_run_start()

    def _scheduler_timesteps(self):
        pipeline = self._pipeline() if self._pipeline is not None else None
        return getattr(getattr(pipeline, "scheduler", None), "timesteps", None)

    def _before_forward(self, module, args) -> None:
        timesteps = self._scheduler_timesteps()
        if timesteps is not None and timesteps is not self._timesteps:
            self._timesteps = timesteps
            self.reset()
        self.step = self._next
        self._next += 1
        for owner in list(self._owners.values()):
            if owner.before_forward is not None:
                owner.before_forward()
