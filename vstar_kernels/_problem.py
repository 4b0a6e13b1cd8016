"""A TAR call as every backend takes it (`TarProblem`), and `make_problem`, which checks the public
arguments (every error names the argument) and builds one: 4-D strided views of q/k/v (no copies),
the resolved scale, the custom bias as a stride-0 (B, H, Nq, Nk) view (or the (F, F) frame matrix
with frame ids), the frame ids and the key mask.

`make_problem` checks only what a tensor's metadata says (comparisons torch.compile turns into
guards); `check_frame_values` checks what needs the ids' values, inside the vstar::tar_attention
op, where torch.compile does not trace.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import operator
import threading
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
MAX_MODES = ("row", "global")
# Frame ids: signed integers (-1 marks a token outside the video).
FRAME_DTYPES = (torch.int8, torch.int16, torch.int32, torch.int64)


@dataclass(frozen=True)
class TarProblem:
    """A validated TAR call. q: (B, H, Nq, D), k: (B, H, Nk, D), v: (B, H, Nk, Dv)."""

    # The options in the order of tar_attention's keywords, as in the vstar:: op schemas.
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    sigma: float
    strength: float
    delta: Optional[torch.Tensor]  # (B, H, Nq, Nk) view, the (F, F) frame matrix when frames_q is set, or None
    causal: bool
    max_mode: str
    scale: float
    frames_q: Optional[torch.Tensor]  # (Nq,) integer frame id of each query, -1 outside the video; or None
    frames_k: Optional[torch.Tensor]  # (Nk,) the same for the keys; set exactly when frames_q is
    key_mask: Optional[torch.Tensor]  # (B, Nk) bool, True where a key is attended to; or None
    was_3d: bool
    # (before, per_frame, frames) when the call gave its ids as a frames.FrameLayout: frames_q is frames_k, those
    # ids, whose values are then known without reading them (`id_extrema`, the lean forward's `common_layout`)
    layout: Optional[tuple] = None

    batch = property(lambda self: self.q.shape[0])
    heads = property(lambda self: self.q.shape[1])
    nq = property(lambda self: self.q.shape[2])
    nk = property(lambda self: self.k.shape[2])
    head_dim = property(lambda self: self.q.shape[3])
    head_dim_v = property(lambda self: self.v.shape[3])
    device = property(lambda self: self.q.device)
    dtype = property(lambda self: self.q.dtype)

    @property
    def regularized(self) -> bool:
        """False when the bias cannot change the result (plain attention). With frame ids the bias is
        applied whenever strength != 0: at sigma = inf it is still 0 for the tokens outside the video."""
        return self.strength != 0.0 and (self.delta is not None or self.sigma != math.inf
                                         or self.frames_q is not None)

    def needs_grad(self) -> bool:
        """Whether autograd will differentiate this call: grad mode is on and an input requires grad."""
        return torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (self.q, self.k, self.v, self.delta))

    def output_shape(self) -> tuple:
        return (self.batch, self.heads, self.nq, self.head_dim_v)

    def restore(self, out: torch.Tensor) -> torch.Tensor:
        """Return `out` (B, H, Nq, Dv) in the caller's layout (3-D input -> 3-D output)."""
        return out.squeeze(1) if self.was_3d else out

    def op_args(self) -> tuple:
        """The problem as the vstar:: ops take it: the fields in OP_FIELDS order (q, k, v, sigma, ..., key_mask)."""
        return tuple(getattr(self, name) for name in OP_FIELDS)

    @classmethod
    def from_op_args(cls, args, layout=None) -> "TarProblem":
        """The problem back from the ops' leading arguments (4-D views, as `make_problem` made them) and the
        layout the forward op takes apart (a list; empty or None: none)."""
        return cls(*args, False, tuple(layout) if layout else None)


# The ops' problem arguments: every field but was_3d (the caller's layout, restored outside the op) and layout
# (an option of the forward op).
OP_FIELDS = tuple(f.name for f in fields(TarProblem) if f.name not in ("was_3d", "layout"))


def _check_tensor(name: str, t) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(name, t)
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(
            f"{name} must be a floating-point tensor (float16, bfloat16, float32 or float64), got {t.dtype}"
        )


def check_dense(name: str, t: torch.Tensor) -> None:
    if t.is_nested or t.layout != torch.strided:
        raise TypeError(f"{name} must be a dense (strided) tensor, got "
                        f"{'a nested tensor' if t.is_nested else f'layout {t.layout}'}")


def check_values(name: str, t: torch.Tensor, reader: str) -> None:
    """A tensor whose values `reader` reads (to check them or to compute a number from them): not a meta tensor."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor, which has no values: {reader} reads them")


def type_name(value) -> str:
    """The name of `value`'s type, with its module where it is not a builtin (numpy's bool is also "bool")."""
    kind = type(value)
    return kind.__name__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    try:
        return float(value)
    except OverflowError:  # an int beyond the float range
        raise ValueError(f"{name} must be within the float range, got an int of {value.bit_length()} bits") from None


# The value checks below use comparisons only (no math.isfinite/isnan, which a NaN fails as a
# comparison does): under torch.compile(dynamic=True) a Python float argument is a symbolic float,
# and comparisons are what torch.compile traces (as guards).


def check_int(name: str, value, least: int = 1, kinds=numbers.Integral):
    """`value` if it is an int (of `kinds`, never a bool) >= `least` (0 or 1), else a ValueError naming `name`."""
    if isinstance(value, bool) or not isinstance(value, kinds) or value < least:
        raise ValueError(f"{name} must be a {'positive' if least else 'non-negative'} int, got {value!r}")
    return value


def check_device(name: str, device, none: bool = True):
    """`device` as torch's factory functions take it (a torch.device, a device name or an index; None where `none`
    says), else an error naming `name` (torch's own named no argument: "Expected one of cpu, cuda, ... device
    string")."""
    if device is None and none or isinstance(device, torch.device):
        return device
    if isinstance(device, bool) or not isinstance(device, (str, numbers.Integral)):
        raise TypeError(f"{name} must be a torch.device, a device name or index{', or None' if none else ''}, got "
                        f"{type_name(device)}")
    try:
        return torch.device(device if isinstance(device, str) else int(device))  # a numpy index too
    except (RuntimeError, ValueError, OverflowError) as exc:  # (an index past 64 bits: a ValueError of torch's)
        what = "a device torch knows" if isinstance(device, str) else "a device index torch takes here"
        raise ValueError(f"{name} {device!r} is not {what} ({exc})") from None


def int_set(name: str, values) -> Optional[set]:
    """`values` as a set of ints >= 0, at least one (None: None, every one); raises naming `name` otherwise."""
    if values is None:
        return None
    if isinstance(values, (str, bytes, torch.Tensor)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name} must be a collection of ints >= 0 or None, got {values!r}")
    values = list(values)
    bad = [v for v in values if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 0]
    if bad or not values:
        raise ValueError(f"{name} must hold ints >= 0, at least one (None: every one), got {values!r}")
    return {int(v) for v in values}


def check_sigma(sigma) -> float:
    """sigma > 0; math.inf is allowed (the Gaussian is then all ones)."""
    sigma = _real("sigma", sigma)
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0 (math.inf allowed), got {sigma}")
    return sigma


def check_factor(name: str, value, dtype: torch.dtype) -> float:
    """A finite `value` (|strength| or |scale|) that the compute dtype of `dtype` inputs can hold: a larger
    factor would be inf there."""
    value = _real(name, value)
    compute = "float64" if dtype == torch.float64 else "float32"
    bound = torch.finfo(getattr(torch, compute)).max
    if not abs(value) <= bound:
        raise ValueError(f"{name} must be finite with |{name}| <= {bound!r} (the largest {compute}: the math "
                         f"for {dtype} inputs is {compute}), got {value}")
    return value


def _check_ids(name: str, ids, n: int, side: str, device) -> torch.Tensor:
    """One frame id vector: a 1-D signed integer tensor of length `n` on `device`."""
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of frame ids, got {type(ids).__name__}")
    check_dense(name, ids)
    if ids.dtype not in FRAME_DTYPES:
        raise TypeError(f"{name} must hold signed integers (int8, int16, int32 or int64; -1 marks a token "
                        f"outside the video), got {ids.dtype}")
    if ids.dim() != 1 or ids.shape[0] != n:
        raise ValueError(f"{name} must have shape ({n},), one id per {side}token, got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"{name} is on {ids.device} but q is on {device}")
    return ids


def _check_frames(frames, nq: int, nk: int, device) -> tuple:
    """(query ids, key ids) from `frames`: one (N,) tensor for self-attention, or a pair."""
    if isinstance(frames, (tuple, list)):
        if len(frames) != 2:
            raise ValueError(f"frames must be one (N,) tensor or a pair (q_frames, k_frames), got {len(frames)} items")
        return (_check_ids("frames[0] (the query ids)", frames[0], nq, "query ", device),
                _check_ids("frames[1] (the key ids)", frames[1], nk, "key ", device))
    if isinstance(frames, torch.Tensor) and nq != nk:
        raise ValueError(f"frames of one tensor gives the same ids to queries and keys, but q has {nq} tokens and "
                         f"k has {nk}: pass a pair (q_frames, k_frames)")
    ids = _check_ids("frames", frames, nq, "", device)
    return ids, ids


def _check_layout(layout, nq: int, nk: int) -> tuple:
    """A frames.FrameLayout of self-attention over nq = nk tokens, checked: (the layout in Python ints, its
    `TarProblem.layout`), the latter (before, per_frame, frames), or (N, 1, 0) for a layout of no video token
    (every id -1), as the lean forward reads its ids."""
    for name, value in zip(layout._fields, layout):
        check_int(f"frames.{name}", value, 0, (numbers.Integral, torch.SymInt))
    # Python ints for the ids and the kernels (numpy's fixed-width ones would wrap; a traced size stays symbolic)
    layout = type(layout)(*(v if isinstance(v, torch.SymInt) else operator.index(v) for v in layout))
    if nq != nk or layout.tokens() != nq:
        pair = ": a FrameLayout is a self-attention's; pass a pair (q_frames, k_frames) of ids" if nq != nk else ""
        raise ValueError(f"frames: {layout} lays out {layout.tokens()} tokens of a self-attention, but q has {nq} "
                         f"tokens and k has {nk}{pair}")
    if layout.num_frames == 0 or layout.tokens_per_frame == 0:
        return layout, (nq, 1, 0)
    return layout, (layout.text_before, layout.tokens_per_frame, layout.num_frames)


def _check_key_mask(key_mask, batch: int, nk: int, device) -> torch.Tensor:
    if not isinstance(key_mask, torch.Tensor):
        raise TypeError(f"key_mask must be a torch.Tensor, got {type(key_mask).__name__}")
    check_dense("key_mask", key_mask)
    if key_mask.dtype != torch.bool:
        raise TypeError(f"key_mask must be a bool tensor (True = attend to the key), got {key_mask.dtype}")
    if key_mask.dim() != 2 or tuple(key_mask.shape) != (batch, nk):
        raise ValueError(f"key_mask must have shape (B, Nk) = {(batch, nk)}, got {tuple(key_mask.shape)}")
    if key_mask.device != device:
        raise ValueError(f"key_mask is on {key_mask.device} but q is on {device}")
    return key_mask


FRAME_ID_LIMIT = 2 ** 24  # frame distances are float32 in the kernels: exact below 2**24


# What calls read from frame-id tensors' values (a device synchronisation each): an entry lives with its tensor.
_FRAME_VALUES = WeakIdKeyDictionary()
_UNKEPT = threading.local()  # .memo: a dict inside a call from compiled code (`values_unkept`), else None


@contextlib.contextmanager
def values_unkept():
    """Within it, `frame_value` reads once, for the op call it spans, what it would keep for the tensor: a call
    from compiled code, whose ids may be a buffer the compiler reuses (inductor: the same tensor object,
    rewritten with no in-place version), but not while the call holds them."""
    outer = getattr(_UNKEPT, "memo", None)
    if outer is None:
        _UNKEPT.memo = {}
    try:
        yield
    finally:
        if outer is None:
            _UNKEPT.memo = None


def frame_value(ids: torch.Tensor, what, read):
    """read(ids), kept as `what` of `ids` for its in-place version: the same tensor passed again unchanged is not
    read again (docs/semantics.md, "Memory"); an inference tensor (no version counter) is read on every call, and
    in a call from compiled code once for the call (`values_unkept`)."""
    memo = getattr(_UNKEPT, "memo", None)
    if memo is not None:
        key = (id(ids), what)  # the call holds `ids`: no other tensor has its id while the memo lives
        if key not in memo:
            memo[key] = read(ids)
        return memo[key]
    if ids.is_inference():
        return read(ids)
    entry = _FRAME_VALUES.get(ids)
    if entry is None or entry[0] != ids._version:
        entry = _FRAME_VALUES[ids] = (ids._version, {})
    if what not in entry[1]:
        entry[1][what] = read(ids)
    return entry[1][what]


def id_extrema(ids: torch.Tensor, problem: Optional[TarProblem] = None) -> tuple:
    """(least, greatest) id of a non-empty id vector: from `problem`'s layout where it has one, else read once
    per tensor (`frame_value`)."""
    if problem is not None and problem.layout is not None:
        before, per_frame, frames = problem.layout
        if frames == 0:
            return -1, -1
        return (-1 if before or before + frames * per_frame < ids.shape[0] else 0), frames - 1
    return frame_value(ids, "extrema", lambda x: tuple(int(v) for v in torch.stack([x.min(), x.max()]).tolist()))


def check_frame_values(problem: TarProblem) -> None:
    """The checks that read the frame ids: each is -1 or more and below 2**24, and a frame matrix is
    (F, F) with F the largest id + 1 (docs/semantics.md). Nothing to check without ids, nor on meta tensors."""
    if problem.frames_q is None or problem.device.type == "meta":
        return
    same = problem.frames_q is problem.frames_k
    named = [("frames", problem.frames_q)] if same else [("frames[0] (the query ids)", problem.frames_q),
                                                          ("frames[1] (the key ids)", problem.frames_k)]
    largest = ("frames", -1)  # (name, id) of the largest id
    for name, ids in named:
        if ids.numel() == 0:
            continue
        low, high = id_extrema(ids, problem)
        if low < -1:
            raise ValueError(f"{name} must be frame ids >= 0, or -1 for a token outside the video; got {low}")
        if high >= FRAME_ID_LIMIT:
            raise ValueError(f"{name} has frame id {high}: ids must be below 2**24 = {FRAME_ID_LIMIT} (the kernels "
                             "compute frame distances in float32, exact up to there)")
        if high > largest[1]:
            largest = (name, high)
    if problem.delta is not None:
        _check_frame_matrix(problem, *largest)


def _check_frame_matrix(problem: TarProblem, name: str, high: int) -> None:
    """With frame ids, `delta` must be the (F, F) frame matrix, F = high + 1: any other size is an
    error, never a matrix read in part (docs/semantics.md, "A custom delta with ids")."""
    size, frames = problem.delta.shape[0], high + 1
    if size == frames:
        return
    spanned = f"the ids span F = {frames} frames (largest id {high}, in {name})" if high >= 0 else \
        "the ids name no frame (every id is -1), so F = 0"
    if size == problem.nq == problem.nk:
        raise ValueError(f"delta is ({size}, {size}), the size of the token matrix (Nq, Nk), but with frames delta "
                         f"is read as a frame matrix (entry [f, g] for query frame f and key frame g), and {spanned}: "
                         f"pass the ({frames}, {frames}) frame matrix, or leave out frames for a per-token delta")
    if size < frames:
        raise ValueError(f"{name} has frame id {high} but delta is a ({size}, {size}) frame matrix: with frames, "
                         f"delta must be ({frames}, {frames}), one row and column per frame up to the largest id")
    raise ValueError(f"delta is a ({size}, {size}) frame matrix but {spanned}: with frames, delta must be "
                     f"({frames}, {frames}); a matrix for more frames (built for another frame count?) is not read "
                     f"in part: pass delta[:{frames}, :{frames}] if its first {frames} frames are these")


# The speculative form lists its flagged rows in int32 and its redo takes each row's key-tile bounds in int32, which
# stay below 2**31 for sequences of up to this many tokens (tiles of up to 1,024 rows or keys).
SPECULATE_TOKENS = 2 ** 30 - 2 ** 10


def speculates(problem: TarProblem) -> bool:
    """Whether a call runs the speculative one pass where the Triton kernels run it with speculate=True:
    TAR's Gaussian with frame ids and the row max (what the video DiTs call; docs/api.md), at most
    SPECULATE_TOKENS queries and keys (longer sequences run two passes)."""
    return (problem.regularized and problem.frames_q is not None and problem.delta is None
            and problem.max_mode == "row" and problem.batch * problem.heads * problem.nq > 0
            and max(problem.nq, problem.nk) <= SPECULATE_TOKENS)


def check_speculation(speculate, flags, device) -> None:
    """speculate a bool; flags None or an int64 (2,) tensor on the inputs' device (flagged, counted rows)."""
    if not isinstance(speculate, bool):
        raise TypeError(f"speculate must be a bool, got {type_name(speculate)}")
    if flags is None:
        return
    want = f"flags must be None or an int64 tensor of shape (2,) on {device} (flagged rows, rows counted)"
    if not torch.is_tensor(flags) or flags.dtype != torch.int64:
        raise TypeError(f"{want}, got {type_name(flags) if not torch.is_tensor(flags) else flags.dtype}")
    if not (flags.shape == (2,) and flags.device == device and flags.stride(0) != 0):
        got = f"shape {tuple(flags.shape)} on {flags.device}"
        if flags.dim() == 1 and flags.stride(0) == 0:
            got += " whose two entries are one element (stride 0)"
        raise ValueError(f"{want}, got {got}")


def make_problem(q, k, v, *, sigma, strength, delta, causal, max_mode, scale, frames=None,
                 key_mask=None) -> TarProblem:
    for name, t in (("q", q), ("k", k), ("v", v)):
        _check_tensor(name, t)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but q has {q.dtype}: q, k and v must share one dtype")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}: all tensors must be on one device")
    if q.dim() not in (3, 4):
        raise ValueError(f"q must be 3-D (B, N, D) or 4-D (B, H, N, D), got {q.dim()}-D shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dim() != q.dim():
            raise ValueError(f"{name} is {t.dim()}-D but q is {q.dim()}-D: q, k and v must have the same rank")
    was_3d = q.dim() == 3
    if was_3d:
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
    B, H, Nq, D = q.shape
    for name, t in (("k", k), ("v", v)):
        if tuple(t.shape[:2]) != (B, H):
            raise ValueError(f"{name} has batch/heads {tuple(t.shape[:2])} but q has {(B, H)}")
    if k.shape[3] != D:
        raise ValueError(f"k has head dim {k.shape[3]} but q has {D}: q and k must share the head dim")
    if v.shape[2] != k.shape[2]:
        raise ValueError(f"v has {v.shape[2]} keys but k has {k.shape[2]}: k and v must share the sequence length")
    if k.shape[2] < 1:
        raise ValueError("k must hold at least one key (Nk >= 1)")
    if D < 1 or v.shape[3] < 1:
        raise ValueError(f"head dims must be >= 1, got q/k {D} and v {v.shape[3]}")
    Nk = k.shape[2]

    strength = check_factor("strength", strength, q.dtype)
    if scale is None:
        scale = D ** -0.5
    elif not check_factor("scale", scale, q.dtype) > 0:
        raise ValueError(f"scale must be > 0 (the softmax scale, by default D ** -0.5), got {float(scale)}")
    sigma = check_sigma(sigma)  # checked with a delta too, where it is then ignored
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type_name(causal)}")
    if max_mode not in MAX_MODES:
        raise ValueError(f"max_mode must be one of {MAX_MODES}, got {max_mode!r}")

    frames_q = frames_k = layout = None
    if frames is not None:
        from .frames import FrameLayout  # (frames imports this module)
        if isinstance(frames, FrameLayout):
            frames, layout = _check_layout(frames, Nq, Nk)
            frames = frames.shared_ids(q.device)
        frames_q, frames_k = _check_frames(frames, Nq, Nk, q.device)
    if key_mask is not None:
        key_mask = _check_key_mask(key_mask, B, Nk, q.device)

    bias = delta
    if delta is not None:
        sigma = math.inf  # ignored when a custom delta is given
        _check_tensor("delta", delta)
        if delta.device != q.device:
            raise ValueError(f"delta is on {delta.device} but q is on {q.device}")
    if delta is not None and frames is not None:
        if delta.dim() != 2 or delta.shape[0] != delta.shape[1]:
            hint = ", the shape of a per-token delta: leave out frames for one" \
                if delta.dim() >= 2 and tuple(delta.shape[-2:]) == (Nq, Nk) else ""
            raise ValueError(f"with frames, delta must be a square (F, F) frame matrix (entry [f, g] for query frame "
                             f"f and key frame g, F = the largest id + 1), got shape {tuple(delta.shape)}{hint}")
    elif delta is not None:
        target = (B, Nq, Nk) if was_3d else (B, H, Nq, Nk)
        if delta.dim() > len(target):
            raise ValueError(f"delta has {delta.dim()} dims, more than the {len(target)} of {target}")
        # a 16-bit delta whose gradient autograd sums over its broadcast dims: summed in float32, rounded once
        # (each entry's share rounded to 16 bits first overflows or cancels); the values the kernels read are the same
        wide = torch.is_grad_enabled() and delta.requires_grad and delta.dtype in (torch.float16, torch.bfloat16) \
            and delta.numel() < math.prod(target)
        # compared, not caught from expand: torch.compile traces a comparison, not an expand's error
        if any(n != 1 and n != t for n, t in zip(reversed(delta.shape), reversed(target))):
            raise ValueError(
                f"delta has shape {tuple(delta.shape)}, which does not broadcast to {target} "
                f"(expected (Nq, Nk) = {(Nq, Nk)} or a broadcastable shape)"
            )
        bias = (delta.float() if wide else delta).expand(target)
        if was_3d:
            bias = bias.unsqueeze(1)
    return TarProblem(q=q, k=k, v=v, sigma=sigma, strength=strength, delta=bias, causal=causal, max_mode=max_mode,
                      scale=float(scale), frames_q=frames_q, frames_k=frames_k, key_mask=key_mask, was_3d=was_3d,
                      layout=layout)
