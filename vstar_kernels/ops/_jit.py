"""Building blocks shared by the Triton forward (tar_fwd.py) and backward (tar_bwd.py) kernels and
their launchers (listed in ops/__init__.py). One definition each, so that the backward recomputes
exactly the forward's arithmetic.
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import torch
import triton
import triton.language as tl

from .._problem import FRAME_ID_LIMIT, TarProblem
from .layout import DOT_MIN, STAT_LSE, STAT_MAX, STATS_FIELDS, block_dims, packed_limit, pow2

LOG2E = 1.4426950408889634
# Floor of the Gaussian's exponent coefficient -0.5 * log2(e) / sigma**2. Below about -150 every
# off-diagonal exp2(coef * (j - i)**2) is 0 in float32, as the definition is for such a narrow
# Gaussian; the floor keeps the coefficient finite (for sigma < ~1e-19 it would overflow float32,
# and the diagonal's 0 * -inf would be NaN), so that any tiny sigma gives exactly the identity.
GAUSS_COEF_MIN = -2.0 ** 32
INTERPRETING = triton.knobs.runtime.interpret
# Compile-time in the kernels: mma and cast stand in for the interpreter's inexact bfloat16 arithmetic, nanmax
# for its element-by-element custom reductions.
_INTERPRETING = tl.constexpr(INTERPRETING)
# Field offsets of the row statistics the tiled forward saves (layout.STATS_FIELDS), as
# compile-time constants of the kernels that write and read them.
_STATS_N = tl.constexpr(STATS_FIELDS)
_STAT_MAX = tl.constexpr(STAT_MAX)
_STAT_LSE = tl.constexpr(STAT_LSE)


# The SM version whose spill-free tiles the autotuners keep (`target_sm`): None but while
# `targeting` names one (ahead-of-time compiles for a GPU this machine may not have).
_TARGET_SM = contextvars.ContextVar("vstar_kernels_target_sm", default=None)


@contextlib.contextmanager
def targeting(sm: int):
    """Prune the autotune configs for sm_`sm` inside the block, whatever device the tensors are on."""
    token = _TARGET_SM.set(sm)
    try:
        yield
    finally:
        _TARGET_SM.reset(token)


def target_sm(x: torch.Tensor) -> int | None:
    """The SM version (80, 86, 90, ...) a launch on x's device compiles for: the one `targeting`
    names, else the CUDA device's compute capability; None for any other device."""
    forced = _TARGET_SM.get()
    if forced is not None:
        return forced
    if x.device.type != "cuda" or torch.version.hip:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


# --------------------------------------------------------------------------- jit helpers


@triton.jit
def mma(a, b, PRECISION: tl.constexpr):
    """a @ b with fp32 accumulation. A batch of one (a packed tile of one sequence) of 64 rows or
    more runs as a 2-D product, which sm_90 runs as wgmma (it takes no batched operands); below 64
    rows wgmma does not apply and the batched form takes fewer registers (tools.perf static)."""
    if len(a.shape) == 3:
        if a.shape[0] == 1 and a.shape[1] >= 64:
            c = tl.reshape(_mma2(tl.reshape(a, (a.shape[1], a.shape[2])), tl.reshape(b, (b.shape[1], b.shape[2])),
                                 PRECISION), (1, a.shape[1], b.shape[2]))
        else:
            c = _mma2(a, b, PRECISION)
    else:
        c = _mma2(a, b, PRECISION)
    return c


@triton.jit
def _mma2(a, b, PRECISION: tl.constexpr):
    if _INTERPRETING and a.dtype == tl.bfloat16:
        # The Triton interpreter multiplies bfloat16 operands as raw integers. Widening
        # bf16 to fp32 is exact, so this computes what the GPU's bf16 MMA computes.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does."""
    if _INTERPRETING and dtype == tl.bfloat16:
        # The interpreter truncates fp32 -> bf16; round the fp32 bits first so that
        # truncation is exact (round half to even on the 16 dropped bits).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def exp(x):
    """e^x as exp2(x * log2(e))."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def nanmax(x, axis):
    """tl.max(x, axis) that returns NaN where a NaN takes part (tl.max skips NaN)."""
    if _INTERPRETING:  # the same maximum from the interpreter's vectorized tl.max: it runs a custom combine
        nan = x != x   # function element by element in Python (most of a tiled forward's time there)
        m = tl.max(tl.where(nan, float("-inf"), x), axis)
        return tl.where(tl.max(nan.to(tl.int8), axis) > 0, float("nan"), m)
    return tl.reduce(x, axis, max_nan)


@triton.jit
def _tile_ptrs(ptr, rows, row_stride, cols, col_stride, row_ok, n_cols, VEC: tl.constexpr):
    """(pointers, mask) of load_tile: rows (any rank) index the leading dims, cols the last.

    VEC > 1 (vector_width) promises that each run of VEC columns starts VEC-aligned in memory
    (VEC * itemsize bytes), is contiguous, and is in or out of n_cols as a whole: the
    compiler then loads and stores VEC elements per instruction.
    """
    ptrs = ptr + tl.expand_dims(rows * row_stride, -1) + cols * col_stride
    col_in = cols < n_cols
    if VEC > 1:
        # The column mask's hint goes on the column comparison itself: a hint on the combined mask
        # is lost when the compiler folds an all-true row_ok away (the unmasked loops).
        col_in = tl.max_constancy(col_in, VEC)
        vec_bytes: tl.constexpr = VEC * ptr.dtype.element_ty.primitive_bitwidth // 8
        if len(ptrs.shape) == 3:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, (1, 1, vec_bytes)), (1, 1, VEC))
        else:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, (1, vec_bytes)), (1, VEC))
    return ptrs, tl.expand_dims(row_ok, -1) & col_in


@triton.jit
def load_tile(ptr, rows, row_stride, cols, col_stride, row_ok, n_cols, VEC: tl.constexpr = 1):
    """tile[..., c] = ptr[rows[...] * row_stride + cols[c] * col_stride], 0 outside row_ok x (cols < n_cols).

    rows and row_ok have the tile's leading shape (1-D for a 2-D tile, 2-D for a packed 3-D
    one); VEC: see _tile_ptrs.
    """
    ptrs, mask = _tile_ptrs(ptr, rows, row_stride, cols, col_stride, row_ok, n_cols, VEC)
    return tl.load(ptrs, mask=mask, other=0.0)


@triton.jit
def store_tile(ptr, rows, row_stride, cols, col_stride, x, row_ok, n_cols, VEC: tl.constexpr = 1):
    """x, cast to ptr's dtype, into the places load_tile reads."""
    ptrs, mask = _tile_ptrs(ptr, rows, row_stride, cols, col_stride, row_ok, n_cols, VEC)
    tl.store(ptrs, cast(x, ptr.dtype.element_ty), mask=mask)


@triton.jit
def masked_scores(q, k, valid, rows, cols, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """S = scale * q k^T where valid (and key col <= query row when CAUSAL), -inf elsewhere.

    q (rows, D) and k (cols, D), or packed (SEQS, rows, D) and (SEQS, cols, D), one product per
    sequence. Returns (S, valid with the causal mask). The one score expression of the forward
    and the backward kernels.
    """
    if len(k.shape) == 3:
        kt = tl.trans(k, 0, 2, 1)
    else:
        kt = tl.trans(k)
    s = mma(q, kt, PRECISION) * scale
    if CAUSAL:
        # int32 positions: the 2-D comparison costs half the registers of an int64 one
        valid = valid & (cols.to(tl.int32)[None, :] <= rows.to(tl.int32)[:, None])
    return tl.where(valid, s, float("-inf")), valid


@triton.jit
def delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA: tl.constexpr, FRAMES: tl.constexpr = False):
    """dA_ij: the user's delta (read where valid) or the Gaussian exp2(gauss_coef * (j - i)^2).

    With FRAMES, i and j are the frame ids of the rows and columns (int32, -1 outside the video):
    dA is 0 where either id is -1, and d_ptrs point into the (F, F) frame matrix at [i, j].
    """
    if FRAMES:
        valid = valid & (i[:, None] >= 0) & (j[None, :] >= 0)
    if HAS_DELTA:
        dA = tl.load(d_ptrs, mask=valid, other=0.0).to(tl.float32)
    else:
        # positions to fp32 per row/column (exact below 2**24), so the tile-sized math is fp32 only
        dist = j.to(tl.float32)[None, :] - i.to(tl.float32)[:, None]
        dA = tl.exp2(gauss_coef * dist * dist)
        if FRAMES:
            dA = tl.where(valid, dA, 0.0)
    return dA


# The least video id of a block or tile without one: above every id (_problem.FRAME_ID_LIMIT),
# and far enough from the int32 limit that differences with ids cannot overflow.
_NO_VIDEO = tl.constexpr(1 << 30)
_PER_SCORE = tl.constexpr(-2)


@triton.jit
def frame_span(ids):
    """(least id >= 0, greatest id) of a vector of frame ids: least > greatest when none is >= 0."""
    return tl.min(tl.where(ids >= 0, ids, _NO_VIDEO), 0), tl.max(ids, 0)


@triton.jit
def frame_tile_id(lo, hi, ids, FRAME_BAND, HAS_DELTA: tl.constexpr):
    """What dA depends on across a tile of frame ids `ids`, beside a block of ids spanning [lo, hi]
    (frame_span): the tile's one id when all are equal (-1 included: dA = 0); for the Gaussian, -1
    when every video id of the tile is FRAME_BAND or more from every video id of the block, or one
    side has none (dA = 0 exactly); _PER_SCORE (-2) otherwise. With a frame id b (>= -1), dA is
    one vector along the block (`frame_vector`), the same values delta_a computes per score."""
    t_hi = tl.max(ids, 0)
    one = tl.min(ids, 0) == t_hi
    b = tl.where(one, t_hi, _PER_SCORE)
    if not HAS_DELTA:
        t_lo = tl.min(tl.where(ids >= 0, ids, _NO_VIDEO), 0)
        far = (t_hi < 0) | (lo > hi) | (t_lo - hi >= FRAME_BAND) | (lo - t_hi >= FRAME_BAND)
        b = tl.where(one, t_hi, tl.where(far, -1, _PER_SCORE))
    return b


@triton.jit
def frame_vector(ids2, b, d_ptrs, b_stride, gauss_coef, HAS_DELTA: tl.constexpr):
    """dA between the block's frame ids ids2 ((M, 1) or (1, N)) and the one frame id b of the tile
    (frame_tile_id; -1: 0): the Gaussian of their distance, or the frame matrix at d_ptrs (the
    block's ids' entries, ids2's shape) + b * b_stride; 0 where an id is -1. As delta_a per score,
    bit for bit (the distance's sign does not change its square)."""
    b2 = ids2 * 0 + b
    on = (ids2 >= 0) & (b2 >= 0)
    if HAS_DELTA:
        vec = tl.load(d_ptrs + b2 * b_stride, mask=on, other=0.0).to(tl.float32)
    else:
        dist = b2.to(tl.float32) - ids2.to(tl.float32)
        vec = tl.where(on, tl.exp2(gauss_coef * dist * dist), 0.0)
    return vec


@triton.jit
def key_ok(col_ok, KMASK, km_base, j, stride_kmn, HAS_KEY_MASK: tl.constexpr):
    """col_ok, and with HAS_KEY_MASK the key mask's entries (uint8, nonzero = attend) of keys j."""
    if HAS_KEY_MASK:
        col_ok = col_ok & (tl.load(KMASK + km_base + j * stride_kmn, mask=col_ok, other=0) != 0)
    return col_ok


@triton.jit
def add_bias(s, c, dA):
    """S' = S + c_i * dA_ij as one fused multiply-add (c has S's shape less its last axis; dA S's
    shape, or one column): rounded once, on a GPU and in the interpreter alike, so that two code
    paths holding the same dA give the same S' bit for bit whatever the compiler contracts
    around them. Masked entries (-inf) stay -inf for a finite c_i * dA_ij."""
    if len(dA.shape) < len(s.shape):  # a packed tile's Gaussian (SEG_Q, SEG_K), shared by its sequences
        dA = tl.expand_dims(dA, 0)
    return tl.fma(tl.broadcast_to(tl.expand_dims(c, -1), s.shape), tl.broadcast_to(dA, s.shape), s)


@triton.jit
def bias(s, row_max, dA, strength):
    """S' = S + strength * m_i * dA_ij (row_max has S's shape less its last axis): add_bias."""
    return add_bias(s, strength * row_max, dA)


@triton.jit
def packed_coords(BH, H, NQ, NK, SEQS: tl.constexpr, SEG_Q: tl.constexpr, SEG_K: tl.constexpr):
    """Coordinates of this program's packed tiles: SEQS sequences of SEG_Q query rows and SEG_K key columns.

    Returns (b, h, i, j, row_ok, col_ok): per sequence slot its batch and head (SEQS,), the query
    and key positions (SEG_Q,) and (SEG_K,) (all int64), and which rows (SEQS, SEG_Q) and columns
    (SEQS, SEG_K) are real (not padding, not past the last sequence).
    """
    seq = tl.program_id(0).to(tl.int64) * SEQS + tl.arange(0, SEQS).to(tl.int64)
    i = tl.arange(0, SEG_Q).to(tl.int64)
    j = tl.arange(0, SEG_K).to(tl.int64)
    seq_ok = (seq < BH)[:, None]
    return seq // H, seq % H, i, j, seq_ok & (i < NQ)[None, :], seq_ok & (j < NK)[None, :]


@triton.jit
def packed_max(s, row_ok, GLOBAL_MAX: tl.constexpr):
    """m_i of packed scores (SEQS, SEG_Q, SEG_K): the row max, with GLOBAL_MAX its sequence's max;
    0 on padding rows. A NaN score makes the max NaN, as the definition's max is."""
    m = nanmax(s, 2)
    if GLOBAL_MAX:
        m = nanmax(m, 1)[:, None]
    return tl.where(row_ok, m, 0.0)


@triton.jit
def packed_exp(s, row_ok):
    """exp(S' - row max) of packed scores and its row sums (1 on padding rows, which are all -inf)."""
    mx = tl.where(row_ok, tl.max(s, 2), 0.0)
    p = exp(s - mx[:, :, None])
    return p, tl.where(row_ok, tl.sum(p, 2), 1.0)


@triton.jit
def block_coords(N, H, BLOCK: tl.constexpr):
    """This program's block of a (B*H) x cdiv(N, BLOCK) grid: (seq, block, b, h, offs, offs < N), offs int64."""
    pid = tl.program_id(0).to(tl.int64)
    num = tl.cdiv(N, BLOCK)
    seq = pid // num
    blk = pid % num
    b = seq // H
    h = seq % H
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return seq, blk, b, h, offs, offs < N


# --------------------------------------------------------------------------- launcher helpers

# A Gaussian exponent (log2 units) at or below -150 is exactly 0 in float32: exp2 rounds to
# nearest, 2**-150 is half the smallest subnormal and ties to 0, and a flush-to-zero exp2 (the
# GPU's ex2.approx.ftz) gives 0 sooner. The band stops at -160, so that the float32 rounding of
# gauss_coef and of gauss_coef * d * d (relative 2**-22 at most) cannot bring an off-band exponent
# above -150, and the reference's float64 Gaussian rounded to float32 is 0 there too
# (exp(-0.5 (d / sigma)**2) <= 2**-160 < 2**-150). tests/kernels/test_one_pass.py checks all three.
BAND_EXPONENT = -160.0


def band_width(gauss_coef: float, limit: int) -> int:
    """Least W >= 1 with gauss_coef * d * d <= BAND_EXPONENT for every integer |d| >= W, at most
    `limit` (a W as long as the sequence: every key is in the band).

    Off the band (|j - i| >= W) the Gaussian's dA is exactly 0 in float32, so the biased score is
    the plain score there, bit for bit (for a finite strength * m_i).
    """
    if gauss_coef >= 0.0:
        return limit
    square = BAND_EXPONENT / gauss_coef  # inf for a subnormal coefficient (sigma ~1e153 and more)
    if not square < float(limit) ** 2:
        return limit
    w = max(1, math.ceil(math.sqrt(square)))
    while gauss_coef * w * w > BAND_EXPONENT:
        w += 1
    return min(w, limit)


def frame_band_width(gauss_coef: float) -> int:
    """FRAME_BAND of the kernels with frame ids: ids this far apart or more have a Gaussian dA of
    exactly 0 (band_width; ids are below FRAME_ID_LIMIT, so a band that wide is never left)."""
    return band_width(gauss_coef, 2 * FRAME_ID_LIMIT)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for float32 inputs (16-bit inputs ignore it): "tf32x3" (three TF32
    tensor-core products, float32 accuracy), or one TF32 product ("tf32") where torch allows TF32
    for its own float32 matmuls (docs/semantics.md, "Dtypes and precision")."""
    return "tf32x3" if dtype == torch.float32 and not _tf32_allowed() else "tf32"


def _tf32_allowed() -> bool:
    """Whether torch's CUDA float32 matmuls may use TF32: torch.backends.cuda.matmul.fp32_precision
    "tf32" (which allow_tf32 = True and set_float32_matmul_precision("high") also set); torch before
    2.9 has only the allow_tf32 flag. Reading allow_tf32 after the new API set the precision raises."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:
        return matmul.allow_tf32


def delta_args(problem: TarProblem):
    """(delta pointer, its 4 strides, gauss_coef) for a kernel launch. A frame matrix (F, F) (with
    frame ids) has strides (0, 0, row, column): the kernels index it by the ids."""
    if problem.delta is not None:
        strides = problem.delta.stride()
        return problem.delta, (0, 0, *strides) if problem.frames_q is not None else strides, 0.0
    sigma = problem.sigma
    # / sigma / sigma, not / sigma ** 2: the square of a tiny sigma is 0, the quotient overflows to -inf
    gauss_coef = 0.0 if math.isinf(sigma) else max(GAUSS_COEF_MIN, -0.5 * LOG2E / sigma / sigma)
    return problem.q, (0, 0, 0, 0), gauss_coef  # q: a dummy pointer, never read


def common_meta(problem: TarProblem) -> dict:
    """Compile-time options shared by the forward and backward kernels."""
    block_d, block_dv = block_dims(problem.head_dim, problem.head_dim_v)
    return dict(BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=problem.causal, HAS_DELTA=problem.delta is not None,
                REGULARIZE=problem.regularized, PRECISION=_precision(problem.dtype))


def tiled_only(problem: TarProblem) -> bool:
    """Frame ids or a key mask: the tiled kernels run the call at any length (the packed ones take neither)."""
    return problem.frames_q is not None or problem.key_mask is not None


def frame_args(problem: TarProblem) -> tuple:
    """(query ids, key ids, key mask, its 2 strides, HAS_FRAMES, HAS_KEY_MASK) for a tiled launch.

    The ids as contiguous int32 (read only when the bias is applied), the key mask (B, Nk) as a
    uint8 view of the bool tensor; None for what the call lacks (the kernels then compile without it).
    """
    has_frames = problem.frames_q is not None and problem.regularized
    fq = fk = None
    if has_frames:
        fq = problem.frames_q.to(torch.int32).contiguous()
        fk = fq if problem.frames_k is problem.frames_q else problem.frames_k.to(torch.int32).contiguous()
    km, km_strides = None, (0, 0)
    if problem.key_mask is not None:
        km = problem.key_mask.view(torch.uint8)
        km_strides = km.stride()
    return fq, fk, km, *km_strides, has_frames, km is not None


def vector_width(*tensors: torch.Tensor) -> int:
    """load_tile's VEC for tiles of these tensors, (..., D) with their head dim last: the largest
    power of two, at most 16 bytes of elements, that divides each tensor's address (in elements),
    every stride but the last, and D; 1 unless the last stride is 1 (or D is 1).

    Then every run of VEC head-dim entries a tile reads or writes starts VEC-aligned, and a
    row's columns below D are whole runs: load_tile's hints hold for any index in range.
    """
    vec = 16 // max(t.element_size() for t in tensors)
    for t in tensors:
        size = t.element_size()
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return 1
        for x in (t.data_ptr() // size if t.data_ptr() % size == 0 else 1, t.shape[-1], *t.stride()[:-1]):
            while x % vec:
                vec //= 2
    return vec


def packed_segments(problem: TarProblem) -> tuple:
    """(SEG_Q, SEG_K, SEG_MAX): power-of-two query rows and key columns per sequence in a packed
    tile, at least DOT_MIN (the contraction of P @ V and of the backward's transposed products)."""
    seg_q, seg_k = pow2(problem.nq, DOT_MIN), pow2(problem.nk, DOT_MIN)
    return seg_q, seg_k, max(seg_q, seg_k)


def packed_launch(problem: TarProblem) -> tuple:
    """(constexprs, grid) of a packed launch: SEG_Q, SEG_K and SEG_MAX (`packed_segments`), and
    ROWS in the interpreter, which does not autotune."""
    seg_q, seg_k, seg_max = packed_segments(problem)
    meta = dict(SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max)
    if INTERPRETING:
        meta["ROWS"] = max(packed_limit(max(block_dims(problem.head_dim, problem.head_dim_v))),
                           pow2(max(problem.nq, problem.nk)))
    bh = problem.batch * problem.heads
    return meta, lambda m: (triton.cdiv(bh, m["ROWS"] // seg_max),)


def fewest_words(configs: list, row_words: int, budget: int) -> list:
    """The packed configs whose operand words a thread (float32 inputs), ROWS x row_words / (32 x
    num_warps), are at most `budget`, else those that hold the fewest."""
    words = {c: c.kwargs["ROWS"] * row_words / (32 * c.num_warps) for c in configs}
    least = min(words.values(), default=0)
    return [c for c in configs if words[c] <= max(budget, least)]


def tuned(kernel, configs: list, prune, key: list):
    """`kernel` autotuned per `key` over the `configs` that `prune` keeps; as it is in the
    interpreter, which runs one config (no benchmarking of configs on CPU)."""
    if INTERPRETING:
        return kernel
    return triton.autotune(configs, key=key, prune_configs_by={"early_config_prune": prune})(kernel)
