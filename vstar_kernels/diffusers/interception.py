"""How a DiT's attention call becomes TAR: `TARAttention`, a torch function mode that answers the stock processor's
`torch.nn.functional.scaled_dot_product_attention` call with `tar_attention` on the same q, k, v (and key mask).

Why a mode: it needs no copy of diffusers' code and patches nothing. A custom attention backend would reach only the
processors that use the dispatcher (and diffusers' backend registry is a closed enum); replacing module globals
(``F``, ``dispatch_attention_fn``) is process-wide and not thread-safe, where a torch function mode is per thread
and lives for one call. So TAR serves the diffusers attention backends that call that function, `SDPA_BACKENDS`;
a regularized call on any other raises (`call_through_sdpa`; docs/dits.md, Attention backends).
"""

from __future__ import annotations

import functools
import types
from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from ..frames import FrameLayout, TokenLayout
from ..tar_config import LevelSpec
from .steps import values_answer
from .token_grid import token_frames

# diffusers' attention backends whose function runs scaled_dot_product_attention on the call's q, k, v (in
# diffusers 0.42.1: the native one and the four that pin one of torch's SDPA kernels); the others run kernels of
# their own (flash-attn, sage, xformers, flex, NPU, XLA, ...)
SDPA_BACKENDS = ("native", "_native_cudnn", "_native_efficient", "_native_flash", "_native_math")

# The most runs of equal rows a (B, 1, Nq, Nk) mask may have: TAR runs one attention call per run
MAX_MASK_RUNS = 64
# bool elements compared at once while finding the runs of a mask
_RUN_CHUNK = 1 << 26


def forwarded(name: str) -> property:
    """An attribute of the wrapped processor, read and set through the wrapper."""
    return property(lambda self: getattr(self.processor, name, None),
                    lambda self, value: setattr(self.processor, name, value))


# what diffusers' set_attention_backend / reset_attention_backend and context parallelism set on a DiT's processor
# (where it has them): a wrapper's reach the processor it wraps
BACKEND_ATTRIBUTES = (forwarded("_attention_backend"), forwarded("_parallel_config"))


class Wrapping:
    """A processor that wraps another and passes its calls on. diffusers' attention modules keep only the keyword
    arguments that ``inspect.signature(processor.__call__)`` names (a DiT's ``image_rotary_emb``), and under
    torch.compile read it from the class: `show` makes the instance one of a subclass made per wrapped class,
    whose ``__call__`` shows that class's signature (kept by copy and pickle)."""

    def show(self, inner) -> None:
        """Show `inner`'s signature (call once the wrapped processor is known, in ``__init__``)."""
        self.__class__ = _showing(vars(type(self)).get("_base", type(self)), type(inner))

    def __reduce_ex__(self, protocol):
        base = vars(type(self)).get("_base")
        if base is None:
            return super().__reduce_ex__(protocol)
        return _remade, (base, type(self)._shows), vars(self)


def innermost(processor):
    """The processor at the bottom of a chain of `Wrapping` ones (a DiT's: TAR's, a capture's): the one that holds
    the attributes the wrappers forward."""
    while isinstance(processor, Wrapping) and hasattr(processor, "processor"):
        processor = processor.processor
    return processor


def _remade(base: type, shown: type):
    """An empty instance of `base` showing `shown`'s signature, for copy and pickle to fill."""
    return object.__new__(_showing(base, shown))


@functools.lru_cache(maxsize=None)  # one class per pair, so that torch.compile sees one
def _showing(base: type, shown: type) -> type:
    def __call__(self, *args, **kwargs):
        return base.__call__(self, *args, **kwargs)

    functools.update_wrapper(__call__, shown.__call__)
    return type(base.__name__, (base,), {"__call__": __call__, "_base": base, "_shows": shown,
                                         "__module__": base.__module__, "__qualname__": base.__qualname__})


def sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


def backend_of(processor) -> Optional[str]:
    """The diffusers attention backend a processor's dispatcher calls run on, for a processor whose class has an
    ``_attention_backend`` (as diffusers' dispatching processors have) or whose ``__call__`` calls
    ``dispatch_attention_fn`` without one (Cosmos's): its own (``set_attention_backend``), else the active one (the
    ``attention_backend`` context, ``DIFFUSERS_ATTN_BACKEND``); None for any other processor (one that calls
    scaled_dot_product_attention itself, or a processor of its own). A wrapper's is that of what it wraps."""
    processor = innermost(processor)
    code = getattr(getattr(type(processor), "__call__", None), "__code__", None)
    if not hasattr(type(processor), "_attention_backend") and "dispatch_attention_fn" not in getattr(
            code, "co_names", ()):
        return None
    backend = getattr(processor, "_attention_backend", None)
    if backend is None:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry  # a diffusers with backends

        backend = _AttentionBackendRegistry.get_active_backend()[0]
    return getattr(backend, "value", backend)


def call_through_sdpa(mode: TorchFunctionMode, processor, name: str, consequence: str, /, *args, **kwargs):
    """``processor(*args, **kwargs)`` under `mode` (which counts its scaled_dot_product_attention calls in
    ``calls``); raises before the call on an attention backend not in `SDPA_BACKENDS`, after one that made none."""
    backend = backend_of(processor)
    if backend is not None and backend not in SDPA_BACKENDS:
        raise _no_sdpa_call(name, consequence, backend)
    with mode:
        out = processor(*args, **kwargs)
    if mode.calls == 0:
        raise _no_sdpa_call(name, consequence, backend)
    return out


def _no_sdpa_call(name: str, consequence: str, backend: Optional[str]) -> RuntimeError:
    if backend is None:
        why = "a processor of its own, or a non-native attention backend set for every model"
    elif backend in SDPA_BACKENDS:
        why = f"its backend, {backend!r}, calls it, but the processor does not call its backend"
    else:
        why = f"its attention backend, {backend!r}, does not call it"
    return RuntimeError(
        f"{name}: the processor computes its attention without torch.nn.functional.scaled_dot_product_attention "
        f"({why}), so {consequence}; the diffusers attention backends that call it: {', '.join(SDPA_BACKENDS)} "
        "(model.set_attention_backend('native'))")


# torch.Tensor's methods written in Python (``unflatten``, ``split``, ...): handed to a mode, torch.compile cannot
# trace their ``super()`` call to the C method; the mode calls them on the tensor instead (the same code)
_PYTHON_METHODS = {name: value for name, value in vars(torch.Tensor).items() if isinstance(value, types.FunctionType)}


class SDPACalls(TorchFunctionMode):
    """Answers torch's scaled_dot_product_attention calls with `answer` (their arguments in SDPA's order), counted
    in ``calls``; passes all else through."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            name = getattr(func, "__name__", None)
            # the mode is off in here: the method's own code (a subclass's override ran already: its super() call)
            if args and _PYTHON_METHODS.get(name) is func and type(args[0]) in (torch.Tensor, torch.nn.Parameter):
                return getattr(args[0], name)(*args[1:], **kwargs)
            return func(*args, **kwargs)
        self.calls += 1
        return self.answer(*sdpa_arguments(*args, **kwargs))

    def answer(self, query, key, value, mask, dropout_p, is_causal, scale, enable_gqa):
        raise NotImplementedError


class TARAttention(SDPACalls):
    """Answers scaled_dot_product_attention calls with `processor.attention`; passes all else through.

    `processor` is a `DiTTARProcessor`; under context parallelism `parallel` (a `ContextParallelTAR`) answers
    the call of this rank's shard with its collectives around one TAR call (docs/multi-gpu.md).
    """

    def __init__(self, processor, attn: torch.nn.Module, spec: LevelSpec, grid: Optional[TokenLayout], parallel=None):
        super().__init__()
        self.processor, self.attn, self.spec, self.grid, self.parallel = processor, attn, spec, grid, parallel

    def answer(self, query, key, value, mask, dropout_p, is_causal, scale, enable_gqa):
        where = self.processor.name
        if values_answer(self.attn, query, value):  # diffusers' layer skip of the scores: its mode, outside this one
            return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout_p,
                                                  is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
        if dropout_p != 0.0:
            raise ValueError(f"{where}: TAR takes no attention dropout, but the processor asked for {dropout_p}")
        if enable_gqa and query.shape[1] != key.shape[1]:
            raise ValueError(f"{where}: TAR needs as many key heads as query heads (no grouped-query attention)")
        if self.parallel is not None:  # this rank's shard: the layout's communication around one TAR call
            return self.parallel.attention(query, key, value, mask, is_causal, self.grid,
                                           functools.partial(self._attend, scale=scale))
        runs = mask_runs(mask, query.shape[0], query.shape[2], key.shape[2], where)
        frames = token_frames(self.grid, self.processor.state.family.text, query.shape[2], key.shape[2], where,
                              query.device, self.processor.block)
        if len(runs) == 1:
            return self._attend(query, key, value, frames=frames, key_mask=runs[0][1], causal=is_causal, scale=scale)
        frames = frames.shared_ids(query.device) if isinstance(frames, FrameLayout) else frames
        return torch.cat([self._attend(query[:, :, rows], key, value, frames=(frames[rows], frames),
                                       key_mask=key_mask, causal=is_causal, scale=scale)
                          for rows, key_mask in runs], dim=2)

    def _attend(self, query, key, value, **kwargs):
        """`processor.attention` at the call's level (a delta is a (frames, frames) matrix) and with its backend."""
        count, where, state = self.grid[0], self.processor.name, self.processor.state
        return self.processor.attention(
            self.attn, query, key, value, backend=state.config.backend, **state.speculation.kwargs(query.device),
            **self.spec.tar_kwargs(count, count, device=query.device, dtype=query.dtype, where=where), **kwargs)


def mask_runs(mask, batch: int, queries: int, keys: int, where: str) -> List[Tuple[slice, Optional[torch.Tensor]]]:
    """The query rows of an SDPA call in runs that share one key mask: ``[(rows, (B, Nk) bool key mask or None)]``.

    A (B, 1, 1, Nk) key mask (or none) is one run; a (B, 1, Nq, Nk) boolean mask is cut where a row differs
    from the one before it (docs/dits.md, Masks). Any other mask raises a ValueError.
    """
    if mask is None:
        return [(slice(0, queries), None)]
    shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
    if shape is None or mask.dtype != torch.bool or mask.dim() != 4 or shape[1] != 1 or shape[2] not in (1, queries) \
            or shape[3] != keys or shape[0] not in (1, batch):
        what = f"{mask.dtype} mask of shape {shape}" if shape is not None else f"{type(mask).__name__} mask"
        raise ValueError(f"{where}: TAR honours boolean key masks of shape (B, 1, 1, Nk) and boolean masks "
                         f"(B, 1, Nq, Nk) whose rows come in at most {MAX_MASK_RUNS} runs of equal rows; this "
                         f"processor passed a {what}")
    rows = mask[:, 0]  # (B or 1, Nq or 1, Nk)
    starts = [0]
    if shape[2] > 1:
        step = max(1, _RUN_CHUNK // (shape[0] * keys))
        changed = [(rows[:, s:min(s + step, queries)] != rows[:, s - 1:min(s + step, queries) - 1]).any(-1).any(0)
                   for s in range(1, queries, step)]
        starts += (torch.nonzero(torch.cat(changed)).flatten() + 1).tolist()
        if len(starts) > MAX_MASK_RUNS:
            raise ValueError(f"{where}: the processor's (B, 1, Nq, Nk) mask has {len(starts)} runs of equal rows; "
                             f"TAR runs one attention call per run and takes at most {MAX_MASK_RUNS}")
    stops = starts[1:] + [queries]
    return [(slice(start, stop), rows[:, start if shape[2] > 1 else 0].expand(batch, keys))
            for start, stop in zip(starts, stops)]
