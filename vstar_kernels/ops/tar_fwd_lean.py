"""The lean forward (backend="triton-lean", what "auto" runs on sm_90 where it fits): TAR with frame ids for the
regular layout every supported video DiT passes, `frame_ids(F, T, text_before, text_after)`, built for Hopper
(issue 34 items 3 and 5).

Where the tiled forward (tar_fwd.py) loads each key tile's frame ids and walks the keys in its general tile order,
this kernel computes a token's frame from its index, loads every tile of Q, K and V through a device-side tensor
descriptor (TMA on sm_90) and runs two loops over the keys: the exact row max (a walk of Q K^T, the scale
applied once per row: max_j fl(scale * x_j) = fl(scale * max_j x_j), rounding being monotone; skipped by a block
of text rows alone, which needs no max for its zero bias), then the online softmax of the biased scores. With no
pointer load in the kernel, Triton's automatic warp specialization applies to both loops on sm_90 (WARP_SPECIALIZE,
4 warps; `tools.perf static` shows the partitions). Its speculative form (SPECULATE, what a call with
speculate=True runs) walks only the key tiles of each block's own frames and of the text for a guessed max, runs
the biased loop once with it, and flags the rows whose max may lie elsewhere, which the tiled forward's redo
recomputes (`lean_forward`); Triton 3.9 does not warp-specialize it (launch.FWD_LEAN). It saves the row
statistics the tiled backward reads, so gradients run ops/tar_bwd.py. Its tiles differ from the tiled forward's,
and on a key tile of one frame it takes the scale and the bias in one multiply-add, so its output agrees with it to
rounding, not bit for bit; the float64 reference and the tolerance table are its tests (tests/kernels/test_lean.py).

"auto" chooses it on sm_90 where it fits (dispatch.TritonLeanBackend.fits_auto). start_m goes into the scalars,
never onto a tl.arange range: Triton 3.9's warp specialization shifted both in a block's second 64-row partition
(wrong rows 64-127 on the first H200 run; benchmarks/NOTES.md).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import inspect

import torch
import triton
import triton.language as tl

from .._problem import TarProblem, frame_value
from ._jit import _STAT_LSE, _STAT_MAX, _STATS_N, add_bias, cast, max_nan, mma, nanmax
from .launch import FWD_LEAN, common_meta, delta_args, interpreter_tiles, tuned
from .layout import STATS_FIELDS

# Whether the installed Triton has device-side tensor descriptors and tl.range(..., warp_specialize=...).
SUPPORTED = hasattr(tl, "make_tensor_descriptor") and \
    "warp_specialize" in inspect.signature(tl.range.__init__).parameters
# A tensor descriptor's base address and strides (all but the last, which must be 1) are multiples of this.
DESCRIPTOR_ALIGN = 16


# Sequences shorter than this (2**22 tokens): `frame_of`'s float32 floor is exact below it.
MAX_TOKENS = 1 << 22


@triton.jit
def frame_of(n, BEFORE, INV_PER_FRAME, VIDEO):
    """The frame id of token positions n (int32) in the regular layout, as float32: BEFORE tokens outside the
    video, VIDEO = frames x P tokens of frames in order, then tokens outside it (-1).

    floor((v + 0.5) * INV_PER_FRAME), INV_PER_FRAME = fl(1 / P), for v = n - BEFORE: a multiply a key column where
    v // P would be an integer division's instruction sequence. Exact for v < MAX_TOKENS: (v + 0.5) / P lies at
    least 0.5 / P from an integer, and the two roundings move it by at most (v + 0.5) / P * 2**-23, less than that
    below 2**22."""
    v = n - BEFORE
    return tl.where((v >= 0) & (v < VIDEO), tl.floor((v.to(tl.float32) + 0.5) * INV_PER_FRAME), -1.0)


@triton.jit
def _tar_fwd_lean_kernel(
    Q, K, V, O, STATS, FLAGS, MAXES,
    q_strides, k_strides, v_strides, o_strides,  # (batch, head, token) strides; the head dim's is 1
    H, N, BEFORE, PER_FRAME, INV_PER_FRAME, VIDEO,
    scale, strength, gauss_coef,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_DIM: tl.constexpr,
    SAVE_STATS: tl.constexpr, PRECISION: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
    SPECULATE: tl.constexpr = False,  # one loop over the keys with a guessed max (below)
):
    """O = softmax(S + strength * m_i * dA) V for BLOCK_M query rows of one (batch, head) sequence of N tokens,
    dA the Gaussian exp2(gauss_coef * (f_j - f_i)^2) of the frames `frame_of` gives (0 where either is -1).

    Q, K, V, O (B, H, N, HEAD_DIM) with the head dim contiguous; the launcher checks that every other stride and
    each sequence's address are multiples of 16 bytes (DESCRIPTOR_ALIGN). A tile past N loads as zeros, its
    scores masked to -inf; a store past N is dropped. With SAVE_STATS the raw row max and the log-sum-exp of the
    biased scores go to STATS (float32, contiguous (B*H, N, layout.STATS_FIELDS)), as the tiled forward saves
    them. The grid is (B*H * cdiv(N, BLOCK_M),).

    SPECULATE: the walk takes only the key tiles of the block's own frames and of the text (the guess, a max over
    some of the keys with the biased loop's tiles and arithmetic), and the biased loop checks it: on a tile of
    several frame ids or one the walk took, by the raw scores' running max; on a tile of one frame id the walk did
    not take, by the biased tile max against the guess's biased value (the bias is one number per row there, see
    the loop). Flagged for the redo: a video row whose max lies in a key tile not walked, one whose biased tile
    max there ties its bound (a raw score equal to the guess, or below it by less than the bias's rounding), and,
    as `tar_fwd._flag_rows`, a row whose denominator is NaN or whose strength * max is not finite; every other row
    kept its guess, its exact max. FLAGS (int32 (B*H, N)) gets 1 for the flagged rows and 0 for every other row,
    MAXES (float32 (B*H, N)) their raw max, or +inf where the loop does not know it (a NaN denominator, a row
    flagged on the biased tile max): the redo walks their keys again.
    """
    pid = tl.program_id(0)
    blocks = tl.cdiv(N, BLOCK_M)
    seq = pid // blocks
    start_m = (pid % blocks) * BLOCK_M
    b = (seq // H).to(tl.int64)
    h = (seq % H).to(tl.int64)
    q_desc = tl.make_tensor_descriptor(Q + b * q_strides[0] + h * q_strides[1], [N, HEAD_DIM], [q_strides[2], 1],
                                       [BLOCK_M, HEAD_DIM])
    k_desc = tl.make_tensor_descriptor(K + b * k_strides[0] + h * k_strides[1], [N, HEAD_DIM], [k_strides[2], 1],
                                       [BLOCK_N, HEAD_DIM])
    v_desc = tl.make_tensor_descriptor(V + b * v_strides[0] + h * v_strides[1], [N, HEAD_DIM], [v_strides[2], 1],
                                       [BLOCK_N, HEAD_DIM])
    o_desc = tl.make_tensor_descriptor(O + b * o_strides[0] + h * o_strides[1], [N, HEAD_DIM], [o_strides[2], 1],
                                       [BLOCK_M, HEAD_DIM])
    q = q_desc.load([start_m, 0])
    cols = tl.arange(0, BLOCK_N)

    # A branch in a loop (a peeled last tile, a tile of one frame id) keeps Triton 3.9 from warp-specializing it
    # (tools.perf static: no partitions, and spills on 4 warps): warp-specialized, every tile takes the general
    # path; without, a tile of one frame id adds dA as one vector along the rows, and only the last tile is masked.
    BRANCHES: tl.constexpr = not WARP_SPECIALIZE
    # A block with no video row (text only) has dA = 0 on every score, so its rows need no max for the bias: the
    # walk is skipped (a loop bound, not a branch) and the max read from the biased loop, whose scores are then
    # the raw ones scaled, as the walk would (below).
    video = (start_m < BEFORE + VIDEO) & (start_m + BLOCK_M > BEFORE)
    # the exact row max (with SPECULATE the guess)
    raw = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    walked = N  # the tiles [0, N), or with SPECULATE three runs of tiles one after the other:
    e1 = N  # the text before the video [0, e1),
    e2 = N  # the block's own frames [a0, a1), a1 - a0 = e2 - e1,
    a0 = 0
    a1 = 0
    t1 = 0  # and the text after it [t1, t1 + walked - e2), no tile twice
    if SPECULATE:
        end = tl.cdiv(N, BLOCK_N) * BLOCK_N
        e1 = tl.cdiv(BEFORE, BLOCK_N) * BLOCK_N
        v_lo = tl.maximum(start_m - BEFORE, 0) // PER_FRAME * PER_FRAME  # the first and last frames' keys
        v_hi = (tl.minimum(start_m + BLOCK_M - BEFORE, VIDEO) - 1) // PER_FRAME * PER_FRAME + PER_FRAME
        a0 = tl.maximum((BEFORE + v_lo) // BLOCK_N * BLOCK_N, e1)
        a1 = tl.maximum(tl.minimum(tl.cdiv(BEFORE + v_hi, BLOCK_N) * BLOCK_N, end), a0)
        t1 = tl.maximum(tl.where(BEFORE + VIDEO < N, (BEFORE + VIDEO) // BLOCK_N * BLOCK_N, end), a1)
        e2 = e1 + a1 - a0
        walked = e2 + end - t1
    for i in tl.range(0, tl.where(video, walked, 0), BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        start = i
        if SPECULATE:
            start = tl.where(i < e1, i, tl.where(i < e2, i - e1 + a0, i - e2 + t1))
        k = k_desc.load([start, 0])
        s = mma(q, tl.trans(k), PRECISION)
        if not BRANCHES or start + BLOCK_N > N:  # keys past N (zeros) take no part
            s = tl.where((start + cols < N)[None, :], s, float("-inf"))
        raw = max_nan(raw, nanmax(s, 1))
    m = raw * scale
    c = tl.where(video, strength * m, 0.0)

    # The block's rows as offsets from start_m, start_m folded into the scalars (BEFORE - start_m, N - start_m, the
    # stats' base): warp-specialized, Triton 3.9 splits the block into two 64-row partitions and in the second one
    # shifts both tl.arange's range and a splat of start_m by 64, so that start_m + tl.arange(0, BLOCK_M) read rows
    # start_m + 128..191 there (the sm_90 TTGIR; the wrong outputs of the first GPU run, benchmarks/NOTES.md).
    offs = tl.arange(0, BLOCK_M)
    fq = frame_of(offs, BEFORE - start_m, INV_PER_FRAME, VIDEO)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, HEAD_DIM), tl.float32)
    raw_run = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    hit = tl.zeros((BLOCK_M,), tl.int1)  # with SPECULATE: a biased tile max at or above its bound (below)
    for start in tl.range(0, N, BLOCK_N, warp_specialize=WARP_SPECIALIZE):
        k = k_desc.load([start, 0])
        s = mma(q, tl.trans(k), PRECISION)  # unscaled: the scale comes with the bias (below)
        last = tl.minimum(start + BLOCK_N, N) - 1
        one = frame_of(start, BEFORE, INV_PER_FRAME, VIDEO)
        if SPECULATE:  # keys past N masked first (then -inf + c_i * dA is -inf where c_i is finite; a row whose
            # c_i is not is flagged), for the raw max below (of unscaled scores: fl(scale * max) is max fl(scale *))
            if not BRANCHES or start + BLOCK_N > N:
                s = tl.where((start + cols < N)[None, :], s, float("-inf"))
        cheap = False  # SPECULATE, a tile of one frame id the walk did not take (below)
        bound = tl.full((BLOCK_M,), float("nan"), tl.float32)
        # The biased scores, in each branch (two forms the compiler cannot sink into one after the branch, which
        # would first copy a vector's dA into a whole tile of registers: 30 copies a pass, sm_90; kernel log v15);
        # a non-finite c_i makes the row NaN. One frame id across the tile (frames are runs in order; two -1 ends
        # may hold the video between them): one addend per row, b_i = fl(c_i * vec_i), and the scale with it in one
        # fused multiply-add a score, fl(scale * s_j + b_i); else fl(scale * s_j) and the bias as `add_bias`.
        if BRANCHES and (one == frame_of(last, BEFORE, INV_PER_FRAME, VIDEO)) & ((start >= BEFORE) | (last < BEFORE)):
            gap = one - fq  # dA as one vector along the rows: the per-score values
            vec = tl.where(fq >= 0, tl.exp2(gauss_coef * gap * gap), 0.0)
            vec = tl.where(one >= 0, vec, 0.0)
            bias = c * vec
            if SPECULATE:
                # Rounding being monotone, a row whose scaled raw tile max exceeds its guess m_i = fl(scale * r_i)
                # (r_i the walk's unscaled max) has s_j > r_i for some j, so its biased tile max is at or above
                # fl(scale * r_i + b_i) (`bound`: the scores' own multiply-add, with the same rounded b_i; an add
                # m_i + b_i would be contracted with the multiply c_i * vec_i into one FMA, which is not the
                # scores' rounding). So the raw tile max is not taken: a video row at or above its bound is flagged
                # (`hit`, its max walked again by the redo), and one below it has s_j < r_i for every j, a raw
                # tile max at most its guess. Not on the tiles the walk took: there a raw max equal to the guess
                # is the rule, not a miss.
                cheap = (start >= e1) & ((start < a0) | (start >= a1)) & (start < t1)
                bound = tl.where(cheap, tl.fma(raw, scale, bias), float("nan"))
                if not cheap:
                    raw_run = tl.maximum(raw_run, tl.max(s, 1))
            s = tl.fma(s, scale, tl.broadcast_to(bias[:, None], s.shape))
        else:
            fk = frame_of(start + cols, BEFORE, INV_PER_FRAME, VIDEO)
            dist = fk[None, :] - fq[:, None]
            dA = tl.where((fq[:, None] >= 0) & (fk[None, :] >= 0), tl.exp2(gauss_coef * dist * dist), 0.0)
            if SPECULATE:
                raw_run = tl.maximum(raw_run, tl.max(s, 1))
            s = add_bias(s * scale, c, dA)
        if not SPECULATE and (not BRANCHES or start + BLOCK_N > N):
            s = tl.where((start + cols < N)[None, :], s, float("-inf"))
        tile_max = tl.max(s, 1)
        new_max = tl.maximum(run_max, tile_max)
        if SPECULATE:
            hit = hit | (tile_max >= bound)
        # a row whose scores so far are all -inf (-inf in the inputs): every p and alpha is 0, not NaN
        m2 = tl.where(new_max == float("-inf"), 0.0, new_max * 1.4426950408889634)
        alpha = tl.exp2(run_max * 1.4426950408889634 - m2)
        p = tl.exp2(s * 1.4426950408889634 - m2[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = v_desc.load([start, 0])
        acc = acc * alpha[:, None] + mma(cast(p, v.dtype), v, PRECISION)
        run_max = new_max
    row_ok = offs < N - start_m
    if SPECULATE:  # flag the rows whose guess was not their max (a video block's only: see the docstring)
        nan_rows = denom != denom
        hit = hit & (fq >= 0)
        # the raw max scaled, as the walk's; a text row's scores take no bias (c_i * 0, c_i finite; a row whose c_i
        # is not is NaN): its raw max is its biased one, taken over every tile
        raw_run = tl.where(fq >= 0, raw_run * scale, run_max)
        exact = tl.where(nan_rows | hit, float("inf"), raw_run)
        redo = row_ok & (((fq >= 0) & (raw_run > m)) | hit | ~(tl.abs(strength * raw_run) < float("inf"))
                         | nan_rows)
        redo = tl.where(video, redo, False)
        m = tl.where(video, exact, m)
        row = seq.to(tl.int64) * N + start_m + offs
        tl.store(FLAGS + row, redo.to(tl.int32), mask=row_ok)
        tl.store(MAXES + row, exact, mask=redo)
    # a text-only block: the max the walk would give (NaN for a row with a NaN or +inf score, whose output is NaN),
    # and the definition's NaN row where c_i = strength * m_i is not finite (its c_i * 0; a video block's rows get
    # it from the fused multiply-add), set through the row's denominator: selects, not a branch, which would stop
    # warp specialization, and one a row, not one an output element
    m = tl.where(video, m, tl.where(denom == denom, run_max, float("nan")))
    denom = tl.where(video | (tl.abs(strength * m) < float("inf")), denom, float("nan"))
    out = acc / denom[:, None]
    o_desc.store([start_m, 0], cast(out, O.dtype.element_ty))
    if SAVE_STATS:
        stat = (seq.to(tl.int64) * N + start_m + offs) * _STATS_N
        tl.store(STATS + stat + _STAT_MAX, m, mask=row_ok)
        tl.store(STATS + stat + _STAT_LSE, run_max + tl.log(denom), mask=row_ok)


_KEY = ["N", "HEAD_DIM", "SAVE_STATS", "PRECISION", "SPECULATE"]
# autotuned over every config (None), or over those with (True) or without (False) warp specialization
_lean = {ws: tuned(_tar_fwd_lean_kernel, FWD_LEAN if ws is None else dataclasses.replace(
    FWD_LEAN, configs=[c for c in FWD_LEAN.configs if c.kwargs["WARP_SPECIALIZE"] == ws]), _KEY)
    for ws in (None, True, False)}


# --------------------------------------------------------------------------- host side

def regular_layout(ids: torch.Tensor):
    """(before, per_frame, frames) when `ids` is frame_ids(frames, per_frame, text_before=before, text_after=...),
    else None. Read once per id tensor and version (`_problem.frame_value`: one device synchronisation)."""
    return frame_value(ids, "regular layout", _read_regular_layout)


def _read_regular_layout(ids: torch.Tensor):
    x = ids.to(torch.int64).cpu()
    video = (x >= 0).nonzero().flatten()
    if video.numel() == 0:
        return (x.numel(), 1, 0) if bool((x == -1).all()) else None
    lo, hi = int(video[0]), int(video[-1]) + 1
    frames = int(x[lo:hi].max()) + 1
    per_frame = (hi - lo) // frames
    if per_frame * frames != hi - lo or bool((x[:lo] != -1).any()) or bool((x[hi:] != -1).any()):
        return None
    expected = torch.arange(frames).repeat_interleave(per_frame)
    return (lo, per_frame, frames) if torch.equal(x[lo:hi], expected) else None


def descriptor_strides(t: torch.Tensor) -> tuple:
    """The (batch, head, token) strides the kernel takes for a (B, H, N, D) tensor whose head dim is contiguous:
    a dim of size 1 is only ever indexed at 0, so its stride, whatever it is, is replaced by an aligned one (0, and
    D for the token dim, which the descriptor itself reads)."""
    b, h, n = t.stride()[:3]
    return (b if t.shape[0] > 1 else 0, h if t.shape[1] > 1 else 0, n if t.shape[2] > 1 else t.shape[3])


def layout_reasons(problem: TarProblem) -> list:
    """Why the lean forward cannot run `problem` for what its kernel assumes (dispatch adds the Triton state's)."""
    reasons = []
    if not (problem.regularized and problem.frames_q is not None and problem.delta is None
            and problem.max_mode == "row"):
        reasons.append("the lean forward runs TAR's Gaussian with frame ids and the row max (frames=, no delta, "
                       "max_mode='row', strength != 0)")
    if problem.causal or problem.key_mask is not None:
        reasons.append("the lean forward takes no causal mask and no key mask: use backend='triton'")
    if problem.dtype not in (torch.float16, torch.bfloat16):
        reasons.append(f"the lean forward takes float16 or bfloat16 (its float32 build does not compile for sm_90: "
                       f"tools.perf static), got q.dtype {str(problem.dtype).replace('torch.', '')}: "
                       f"use backend='triton'")
    if problem.nq >= MAX_TOKENS:
        reasons.append(f"the lean forward takes sequences under {MAX_TOKENS:,} tokens (its frame ids are exact "
                       f"in float32 below it), got {problem.nq:,}: use backend='triton'")
    if problem.nq != problem.nk:
        reasons.append(f"the lean forward is self-attention (Nq == Nk), got Nq {problem.nq}, Nk {problem.nk}")
    d = problem.head_dim
    if problem.head_dim_v != d or d not in (16, 32, 64, 128):
        reasons.append(f"the lean forward takes one head dim of 16, 32, 64 or 128 for q, k and v, got "
                       f"{d} and {problem.head_dim_v}")
    for name, t in (("q", problem.q), ("k", problem.k), ("v", problem.v)):
        size = t.element_size()
        # (traced, a tensor has no address: the launch checks it where the op runs)
        misaligned = not torch.compiler.is_compiling() and t.data_ptr() % DESCRIPTOR_ALIGN
        if t.stride(-1) != 1 or misaligned or any(s * size % DESCRIPTOR_ALIGN
                                                                      for s in descriptor_strides(t)):
            reasons.append(f"{name} must have its head dim contiguous and its address and other strides multiples "
                           f"of {DESCRIPTOR_ALIGN} bytes (tensor descriptors), got strides {tuple(t.stride())}")
        elif descriptor_strides(t)[2] == 0:
            reasons.append(f"{name} is expanded along its tokens (stride 0), which the tensor descriptor reading its "
                           "tiles is not known to take on a GPU: use backend='triton'")
    return reasons


def common_layout(problem: TarProblem) -> "tuple | None":
    """(before, per_frame, frames) of the call's frame ids, or None when they are not one regular layout for
    queries and keys (dispatch's reason; `frame_layout`'s error): the problem's `layout` where the call gave it,
    else read from the ids."""
    if problem.layout is not None:
        return problem.layout
    layout = regular_layout(problem.frames_q)
    if problem.frames_k is not problem.frames_q and regular_layout(problem.frames_k) != layout:
        return None
    return layout


def frame_layout(problem: TarProblem) -> tuple:
    """`common_layout`, or a ValueError naming `frames` when there is none."""
    layout = common_layout(problem)
    if layout is None:
        raise ValueError("frames: backend='triton-lean' takes the regular layout frame_ids(num_frames, "
                         "tokens_per_frame, text_before=, text_after=) builds (the same for queries and keys); "
                         "these ids are laid out otherwise: use backend='triton'")
    return layout


def _allocate(size: int, alignment: int, stream):
    return torch.empty(size, dtype=torch.int8, device="cuda")


@contextlib.contextmanager
def scratch_allocator(allocation=None):
    """Device-side tensor descriptors take a scratch buffer per launch from Triton's allocator: while none is set
    (Triton's NullAllocator), set one of torch's memory for the launch, then put the NullAllocator back. Triton
    keeps the allocator in a ContextVar (3.9) or, in earlier releases, in a plain module global; both are handled.
    `allocation` stands for triton.runtime._allocation (tests pass a stand-in)."""
    if allocation is None:
        from triton.runtime import _allocation as allocation
    slot = allocation._allocator
    is_var = isinstance(slot, contextvars.ContextVar)
    current = slot.get() if is_var else slot
    if not isinstance(current, allocation.NullAllocator):  # the caller's allocator
        yield
        return
    token = slot.set(_allocate) if is_var else None
    if not is_var:
        allocation._allocator = _allocate
    try:
        yield
    finally:
        if is_var:
            slot.reset(token)
        else:
            allocation._allocator = current


def lean_forward(problem: TarProblem, stats: torch.Tensor | None = None, warp_specialize: bool | None = None,
                 flags: torch.Tensor | None = None, config: triton.Config | None = None):
    """Launch the lean forward for a validated problem (layout_reasons() empty); returns (B, H, N, D).

    stats: None, or the contiguous float32 (B*H, N, layout.STATS_FIELDS) buffer the tiled backward reads.
    warp_specialize: None lets the autotuner choose among the configs (FWD_LEAN); True or False keeps only the
    configs with or without warp specialization (the benchmark times both).
    flags: None runs two loops over the keys (the walk for the exact row max, then the biased loop); an int32
    (B*H,) tensor runs the speculative form: one biased loop with a guessed max (the kernel's SPECULATE), then the
    flagged rows, compacted on the device, recomputed with their exact max by the tiled forward's redo
    (`tar_fwd.redo_rows`), and each sequence's number of them written to `flags`. No host synchronisation.
    config: one of FWD_LEAN's configs, run as it is instead of the autotuned one (the tests pin one for both forms).
    """
    if flags is not None and (warp_specialize or (config is not None and config.kwargs["WARP_SPECIALIZE"])):
        raise ValueError("warp_specialize: the speculative form (flags=) runs without warp specialization "
                         "(launch.FWD_LEAN's rules)")
    out, launch, spec = _launch(problem, stats, flags)
    tiles = interpreter_tiles("lean")
    if launch is not None and config is not None:
        with scratch_allocator() if problem.q.is_cuda else contextlib.nullcontext():
            launch(_tar_fwd_lean_kernel, **config.all_kwargs())
    elif launch is not None and tiles:  # the interpreter: one config, warp specialization a no-op there
        launch(_lean[None], **tiles, WARP_SPECIALIZE=bool(warp_specialize))
    elif launch is not None:
        with scratch_allocator():
            launch(_lean[warp_specialize])
    if spec is not None:
        from .tar_fwd import compact_rows, redo_rows

        row_flags, maxes = spec
        redo_rows(problem, out, stats, flags, compact_rows(row_flags, flags), maxes, LEAN_REDO, lean=True)
    return out


# The tiles of the redo after a speculative lean launch (the tiled forward's redo kernel with LEAN; any tiles give
# the rows the two-pass result to rounding): 64 x 64 on 4 warps at every head dim, compiled for sm_90 without a
# spill. A few flagged rows make few programs, each as long as a whole row: the redo is bound by its programs'
# length and the waves they fill, so two CTAs an SM of 64 rows beat one of 128. An H100 timed the redo kernel at 5%
# flagged (planted data, torch.profiler; benchmarks/NOTES.md) at 0.228 / 2.95 / 1.75 ms at LTX-Video / Wan 2.1 480p
# / CogVideoX, against 0.338 / 4.12 / 1.83 on 64 x 32 or 128 x 64.
LEAN_REDO = dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)


def _launch(problem: TarProblem, stats: torch.Tensor | None, flags: torch.Tensor | None = None):
    """(out, launch, spec): the output tensor, launch(kernel, **config) running `kernel` (an autotuner of
    _tar_fwd_lean_kernel, or the kernel itself with a config's constexprs and options) on the problem, and with
    `flags` the (row flags, maxes) buffers of the speculative form (else None); launch and spec are None when there
    is nothing to compute. The tests run every config of FWD_LEAN through it."""
    reasons = layout_reasons(problem)
    if reasons:
        raise ValueError("; ".join(reasons))
    before, per_frame, frames = frame_layout(problem)
    q, k, v = problem.q, problem.k, problem.v
    bh, n, d = problem.batch * problem.heads, problem.nq, problem.head_dim
    out = torch.empty(problem.output_shape(), device=q.device, dtype=q.dtype)
    if stats is not None and (tuple(stats.shape) != (bh, n, STATS_FIELDS) or stats.dtype != torch.float32
                              or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 ({bh}, {n}, {STATS_FIELDS}) tensor, "
                         f"got {stats.dtype} {tuple(stats.shape)}")
    if flags is not None and (tuple(flags.shape) != (bh,) or flags.dtype != torch.int32
                              or flags.device != q.device):
        raise ValueError(f"flags: an int32 ({bh},) tensor on {q.device}, got {flags.dtype} {tuple(flags.shape)} on "
                         f"{flags.device}")
    if bh == 0 or n == 0:
        if flags is not None:
            flags.zero_()
        return out, None, None
    # (the kernel writes every row's flag)
    spec = None if flags is None else (torch.empty(bh, n, dtype=torch.int32, device=q.device),
                                       torch.empty(bh, n, dtype=torch.float32, device=q.device))
    _, _, gauss_coef = delta_args(problem)
    strides = [descriptor_strides(t) for t in (q, k, v, out)]
    args = (q, k, v, out, stats, *(spec or (None, None)), *strides, problem.heads, n, before, per_frame,
            1.0 / per_frame, frames * per_frame, problem.scale, problem.strength, gauss_coef)
    meta = dict(HEAD_DIM=d, SAVE_STATS=stats is not None, PRECISION=common_meta(problem)["PRECISION"],
                SPECULATE=flags is not None)
    grid = lambda m: (bh * triton.cdiv(n, m["BLOCK_M"]),)  # noqa: E731
    return out, lambda kernel, **config: kernel[grid](*args, **meta, **config), spec
