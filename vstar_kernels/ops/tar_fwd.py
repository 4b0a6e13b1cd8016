"""Fused TAR forward kernels (Triton).

Two layouts, one semantics (see docs/semantics.md):

* packed: Nq, Nk <= SHORT_MAX. Several (batch, head) sequences share one
  program as a block-diagonal tile, so N = 16..64 does not leave a 128-row tile
  mostly padding. The whole row is in registers: exact max, bias, softmax, PV
  in one pass.
* tiled: longer sequences. One program per (sequence, BLOCK_M query rows).
  Pass 1 walks the key tiles for the exact row max m_i, pass 2 runs an online
  softmax of S + strength * m_i * dA. For max_mode="global" a pre-pass writes
  the row maxima, torch reduces them per sequence, and the main pass reads it.
  When the call will be differentiated (`stats` given) the tiled kernel also
  writes O(B H N) row statistics for ops/tar_bwd.py (layout.STATS_FIELDS); the
  packed layout saves nothing, its backward recomputes whole rows.

The Gaussian dA is computed from (i, j) in registers; only a user-supplied
delta is read from memory. Nothing N x N is written. Offsets are int64 and the
whole (batch x heads) axis is on grid axis 0.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .._validation import TarProblem
from .layout import STAT_LSE, STAT_MAX, STATS_FIELDS, block_dims, is_packed, packed_limit, pow2

LOG2E = 1.4426950408889634
# Floor of the Gaussian's exponent coefficient -0.5 * log2(e) / sigma**2. Below about -150 every
# off-diagonal exp2(coef * (j - i)**2) is 0 in float32, as the definition is for such a narrow
# Gaussian; the floor keeps the coefficient finite (for sigma < ~1e-19 it would overflow float32,
# and the diagonal's 0 * -inf would be NaN), so that any tiny sigma gives exactly the identity.
GAUSS_COEF_MIN = -2.0 ** 32
INTERPRETING = triton.knobs.runtime.interpret


# --------------------------------------------------------------------------- kernels


@triton.jit
def _mma(a, b, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr):
    """a @ b with fp32 accumulation."""
    if INTERP_BF16:
        # The Triton interpreter multiplies bfloat16 operands as raw integers. Widening
        # bf16 to fp32 is exact, so this computes what the GPU's bf16 MMA computes.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _cast(x, dtype: tl.constexpr, INTERP_BF16: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does."""
    if INTERP_BF16:
        # The interpreter truncates fp32 -> bf16; round the fp32 bits first so that
        # truncation is exact (round half to even on the 16 dropped bits).
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)


@triton.jit
def _exp(x):
    """e^x as exp2(x * log2(e))."""
    return tl.exp2(x * 1.4426950408889634)


@triton.jit
def _max_nan(a, b):
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _nanmax(x, axis):
    """tl.max(x, axis) that returns NaN where a NaN takes part (tl.max skips NaN)."""
    return tl.reduce(x, axis, _max_nan)


@triton.jit
def _load_tile(ptr, rows, row_stride, cols, col_stride, row_ok, n_cols):
    """tile[r, c] = ptr[rows[r] * row_stride + cols[c] * col_stride], 0 outside row_ok x (cols < n_cols)."""
    return tl.load(ptr + (rows * row_stride)[:, None] + cols[None, :] * col_stride,
                   mask=row_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _store_tile(ptr, rows, row_stride, cols, col_stride, x, row_ok, n_cols, INTERP_BF16: tl.constexpr):
    """x, cast to ptr's dtype, into the places _load_tile reads."""
    tl.store(ptr + (rows * row_stride)[:, None] + cols[None, :] * col_stride,
             _cast(x, ptr.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & (cols[None, :] < n_cols))


@triton.jit
def _masked_scores(q, k, valid, rows, cols, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
                   INTERP_BF16: tl.constexpr):
    """S = scale * q k^T where valid (and key col <= query row when CAUSAL), -inf elsewhere.

    Returns (S, valid with the causal mask). The one score expression of the forward and the
    backward kernels.
    """
    s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * scale
    if CAUSAL:
        # int32 positions: the 2-D comparison costs half the registers of an int64 one
        valid = valid & (cols.to(tl.int32)[None, :] <= rows.to(tl.int32)[:, None])
    return tl.where(valid, s, float("-inf")), valid


@triton.jit
def _delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA: tl.constexpr):
    """dA_ij: the user's delta (read where valid) or the Gaussian exp2(gauss_coef * (j - i)^2)."""
    if HAS_DELTA:
        dA = tl.load(d_ptrs, mask=valid, other=0.0).to(tl.float32)
    else:
        # positions to fp32 per row/column (exact below 2**24), so the tile-sized math is fp32 only
        dist = j.to(tl.float32)[None, :] - i.to(tl.float32)[:, None]
        dA = tl.exp2(gauss_coef * dist * dist)
    return dA


@triton.jit
def _bias(s, row_max, dA, strength):
    """S' = S + strength * m_i * dA_ij; masked entries stay -inf."""
    return s + (strength * row_max)[:, None] * dA


@triton.jit
def _packed_coords(BH, H, NQ, NK, SEQS: tl.constexpr, SEG_Q: tl.constexpr, SEG_K: tl.constexpr):
    """Coordinates of this program's packed tile: SEQS sequences of SEG_Q query rows and SEG_K key columns.

    Returns (i, j, seq_q, seq_k, bq, hq, bk, hk, row_ok, col_ok): per row the query index in its
    sequence, the (batch x head) sequence, its batch and head (per column the same for keys), and
    which rows and columns are real (not padding, not past the last sequence).
    """
    pid = tl.program_id(0).to(tl.int64)
    rq = tl.arange(0, SEQS * SEG_Q)
    rk = tl.arange(0, SEQS * SEG_K)
    i = (rq % SEG_Q).to(tl.int64)
    j = (rk % SEG_K).to(tl.int64)
    seq_q = pid * SEQS + rq // SEG_Q
    seq_k = pid * SEQS + rk // SEG_K
    bq = seq_q // H
    hq = seq_q % H
    bk = seq_k // H
    hk = seq_k % H
    row_ok = (seq_q < BH) & (i < NQ)
    col_ok = (seq_k < BH) & (j < NK)
    return i, j, seq_q, seq_k, bq, hq, bk, hk, row_ok, col_ok


@triton.jit
def _same_sequence(seq_q, seq_k):
    """[r, c]: packed row r and column c belong to one sequence. Compared in int32: ids within a
    program differ by less than SEQS, so equality survives the truncation, at half the registers."""
    return seq_q.to(tl.int32)[:, None] == seq_k.to(tl.int32)[None, :]


@triton.jit
def _per_row(x, SEQS: tl.constexpr, SEG_Q: tl.constexpr):
    """One value per sequence of a packed tile, repeated for the sequence's SEG_Q rows."""
    return tl.reshape(tl.broadcast_to(x[:, None], (SEQS, SEG_Q)), (SEQS * SEG_Q,))


@triton.jit
def _packed_max(s, row_ok, SEQS: tl.constexpr, SEG_Q: tl.constexpr, GLOBAL_MAX: tl.constexpr):
    """m_i of a packed tile: the row max of S, with GLOBAL_MAX its sequence's max; 0 on padding rows.
    A NaN score makes the max NaN, as the definition's max is."""
    m = _nanmax(s, 1)
    if GLOBAL_MAX:
        seq_max = _nanmax(tl.reshape(m, (SEQS, SEG_Q)), 1)
        m = _per_row(seq_max, SEQS, SEG_Q)
    return tl.where(row_ok, m, 0.0)


@triton.jit
def _packed_exp(s, row_ok):
    """exp(S' - row max) of a packed tile and its row sums (1 on padding rows, which are all -inf)."""
    mx = tl.where(row_ok, tl.max(s, 1), 0.0)
    p = _exp(s - mx[:, None])
    return p, tl.where(row_ok, tl.sum(p, 1), 1.0)


@triton.jit
def _packed_finite_v(v, SEQS: tl.constexpr, SEG_Q: tl.constexpr, SEG_K: tl.constexpr):
    """(v with its NaN/inf entries zeroed, [r, c]: row r's sequence has a NaN/inf in column c of v).

    The packed P @ V also multiplies a row's zero weights on the other sequences' keys by their v,
    and 0 * NaN is NaN: the product runs on the finite values, and the rows of the sequence that
    holds a NaN/inf are set to NaN in its column afterwards, so that it never reaches another one.
    """
    x = v.to(tl.float32)
    bad = (x != x) | (tl.abs(x) == float("inf"))
    cols: tl.constexpr = v.shape[1]
    seq_bad = tl.max(tl.reshape(bad.to(tl.int32), (SEQS, SEG_K, cols)), 1)
    rows_bad = tl.reshape(tl.broadcast_to(seq_bad[:, None, :], (SEQS, SEG_Q, cols)), (SEQS * SEG_Q, cols))
    return tl.where(bad, tl.zeros_like(v), v), rows_bad != 0


@triton.jit
def _block_coords(N, H, BLOCK: tl.constexpr):
    """This program's block of a (B*H) x cdiv(N, BLOCK) grid: (seq, block, b, h, offs, offs < N), offs int64."""
    pid = tl.program_id(0).to(tl.int64)
    num = tl.cdiv(N, BLOCK)
    seq = pid // num
    blk = pid % num
    b = seq // H
    h = seq % H
    offs = blk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    return seq, blk, b, h, offs, offs < N


@triton.jit
def _tar_fwd_packed_kernel(
    Q, K, V, O, DELTA,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdm,
    BH, H, NQ, NK, D, DV,
    scale, strength, gauss_coef,
    ROWS: tl.constexpr,  # rows of the tile for the longer of Nq, Nk: ROWS // SEG_MAX sequences per program
    SEG_Q: tl.constexpr, SEG_K: tl.constexpr, SEG_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr,
    REGULARIZE: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    SEQS: tl.constexpr = ROWS // SEG_MAX
    i, j, seq_q, seq_k, bq, hq, bk, hk, row_ok, col_ok = _packed_coords(BH, H, NQ, NK, SEQS, SEG_Q, SEG_K)
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q = _load_tile(Q, bq * sqb + hq * sqh + i * sqn, 1, dq, sqd, row_ok, D)
    k = _load_tile(K, bk * skb + hk * skh + j * skn, 1, dq, skd, col_ok, D)
    valid = _same_sequence(seq_q, seq_k) & row_ok[:, None] & col_ok[None, :]
    s, valid = _masked_scores(q, k, valid, i, j, scale, CAUSAL, PRECISION, INTERP_BF16)

    if REGULARIZE:
        m = _packed_max(s, row_ok, SEQS, SEG_Q, GLOBAL_MAX)
        d_ptrs = DELTA + (bq * sdb + hq * sdh + i * sdn)[:, None] + j[None, :] * sdm
        s = _bias(s, m, _delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA), strength)

    p, denom = _packed_exp(s, row_ok)
    v = _load_tile(V, bk * svb + hk * svh + j * svn, 1, dv, svd, col_ok, DV)
    v, v_bad = _packed_finite_v(v, SEQS, SEG_Q, SEG_K)
    acc = _mma(_cast(p, v.dtype, INTERP_BF16), v, PRECISION, INTERP_BF16)
    out = tl.where(v_bad, float("nan"), acc / denom[:, None])
    _store_tile(O, bq * sob + hq * soh + i * son, 1, dv, sod, out, row_ok, DV, INTERP_BF16)


@triton.jit
def _row_max(q, K, k_base, skn, skd, offs_m, dq, NK, D, hi, scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
             INTERP_BF16: tl.constexpr):
    """Exact max_j S_ij over the (masked) key range [0, hi) for BLOCK_M query rows.

    The max is NaN where a score is: the global max reduces these, and must see the NaN.
    """
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        k = _load_tile(K + k_base, j, skn, dq, skd, j < NK, D)
        s, valid = _masked_scores(q, k, j[None, :] < NK, offs_m, j, scale, CAUSAL, PRECISION, INTERP_BF16)
        m = _max_nan(m, _nanmax(s, 1))
    return m


@triton.jit
def _tar_fwd_tiled_kernel(
    Q, K, V, O, DELTA, MAXBUF, STATS,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdm,
    BH, H, NQ, NK, D, DV,
    scale, strength, gauss_coef,
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    MAX_SOURCE: tl.constexpr,  # 0: compute row max here, 1: write row max to MAXBUF only, 2: read per-sequence max
    SAVE_STATS: tl.constexpr,  # write the row statistics of layout.STATS_FIELDS to STATS (bh, nq, 4)
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    seq, mb, b, h, offs_m, row_ok = _block_coords(NQ, H, BLOCK_M)
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, sqn, dq, sqd, row_ok, D)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)
    stat_row = seq * NQ + offs_m

    if MAX_SOURCE == 1:
        m = _row_max(q, K, k_base, skn, skd, offs_m, dq, NK, D, hi, scale,
                     BLOCK_M, BLOCK_N, CAUSAL, PRECISION, INTERP_BF16)
        tl.store(MAXBUF + seq * NQ + offs_m, m, mask=row_ok)
        if SAVE_STATS:
            tl.store(STATS + stat_row * 2 + 0, m, mask=row_ok)
    else:
        m_safe = tl.zeros((BLOCK_M,), tl.float32)
        if REGULARIZE:
            if MAX_SOURCE == 0:
                m = _row_max(q, K, k_base, skn, skd, offs_m, dq, NK, D, hi, scale,
                             BLOCK_M, BLOCK_N, CAUSAL, PRECISION, INTERP_BF16)
                if SAVE_STATS:
                    tl.store(STATS + stat_row * 2 + 0, m, mask=row_ok)
            else:
                m = tl.load(MAXBUF + seq + offs_m * 0)
            m_safe = tl.where(row_ok, m, 0.0)
        elif SAVE_STATS:
            tl.store(STATS + stat_row * 2 + 0, m_safe, mask=row_ok)
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        denom = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        d_base = DELTA + b * sdb + h * sdh + offs_m[:, None] * sdn
        for start in range(0, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = j < NK
            k = _load_tile(K + k_base, j, skn, dq, skd, col_ok, D)
            s, valid = _masked_scores(q, k, col_ok[None, :] & row_ok[:, None], offs_m, j, scale, CAUSAL, PRECISION,
                                      INTERP_BF16)
            if REGULARIZE:
                dA = _delta_a(offs_m, j, valid, d_base + j[None, :] * sdm, gauss_coef, HAS_DELTA)
                s = _bias(s, m_safe, dA, strength)
            new_max = tl.maximum(run_max, tl.max(s, 1))
            new_max = tl.where(row_ok, new_max, 0.0)
            alpha = _exp(run_max - new_max)
            p = _exp(s - new_max[:, None])
            denom = denom * alpha + tl.sum(p, 1)
            v = _load_tile(V + v_base, j, svn, dv, svd, col_ok, DV)
            acc = acc * alpha[:, None] + _mma(_cast(p, v.dtype, INTERP_BF16), v, PRECISION, INTERP_BF16)
            run_max = new_max
        denom = tl.where(row_ok, denom, 1.0)
        out = acc / denom[:, None]
        _store_tile(O + b * sob + h * soh, offs_m, son, dv, sod, out, row_ok, DV, INTERP_BF16)
        if SAVE_STATS:
            tl.store(STATS + stat_row * 2 + 1, run_max + tl.log(denom), mask=row_ok)


# --------------------------------------------------------------------------- configs

def _packed_configs():
    return [
        triton.Config({"ROWS": rows}, num_warps=w, num_stages=1)
        for rows in (32, 64, 128) for w in (2, 4, 8)
    ]


def _prune_packed(configs, named_args, **kwargs):
    # The autotuner passes positional arguments in named_args and the constexprs in kwargs.
    args = {**named_args, **kwargs}
    seg = args["SEG_MAX"]
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
    keep = []
    for c in configs:
        rows = c.kwargs["ROWS"]
        seqs = rows // seg
        if seqs < 1 or (wide and rows > 64) or (rows <= 32 and c.num_warps > 4):
            continue
        if seqs * min(args["SEG_Q"], args["SEG_K"]) < 16:  # tl.dot needs 16 rows/cols
            continue
        keep.append(c)
    return keep


def _tiled_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
    ]


def _prune_tiled(configs, named_args, **kwargs):
    args = {**named_args, **kwargs}
    wide = max(args["BLOCK_D"], args["BLOCK_DV"]) > 128
    keep = [c for c in configs
            if not (wide and (c.kwargs["BLOCK_M"] > 64 or c.kwargs["BLOCK_N"] > 64))
            and not (c.kwargs["BLOCK_M"] == 128 and c.num_warps == 4)]
    return keep


# --------------------------------------------------------------------------- launcher

# The kernels write the statistics at fixed offsets (STATS + row * 2 + field).
assert (STAT_MAX, STAT_LSE, STATS_FIELDS) == (0, 1, 2)


if INTERPRETING:
    # The interpreter runs one config: no benchmarking of configs on CPU.
    _packed = _tar_fwd_packed_kernel
    _tiled = _tar_fwd_tiled_kernel
else:
    _packed = triton.autotune(
        _packed_configs(), key=["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA"],
        prune_configs_by={"early_config_prune": _prune_packed})(_tar_fwd_packed_kernel)
    _tiled = triton.autotune(
        _tiled_configs(), key=["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_DELTA", "MAX_SOURCE", "SAVE_STATS"],
        prune_configs_by={"early_config_prune": _prune_tiled})(_tar_fwd_tiled_kernel)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def delta_args(problem: TarProblem):
    """(delta pointer, its 4 strides, gauss_coef) for a kernel launch."""
    if problem.delta is not None:
        return problem.delta, problem.delta.stride(), 0.0
    sigma = problem.sigma
    # / sigma / sigma, not / sigma ** 2: the square of a tiny sigma is 0, the quotient overflows to -inf
    gauss_coef = 0.0 if math.isinf(sigma) else max(GAUSS_COEF_MIN, -0.5 * LOG2E / sigma / sigma)
    return problem.q, (0, 0, 0, 0), gauss_coef  # q: a dummy pointer, never read


def common_meta(problem: TarProblem) -> dict:
    """Compile-time options shared by the forward and backward kernels."""
    block_d, block_dv = block_dims(problem.head_dim, problem.head_dim_v)
    return dict(BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=problem.causal, HAS_DELTA=problem.delta is not None,
                REGULARIZE=problem.regularized, PRECISION=_precision(problem.dtype),
                INTERP_BF16=INTERPRETING and problem.dtype == torch.bfloat16)


def packed_segments(problem: TarProblem) -> tuple:
    """(SEG_Q, SEG_K, SEG_MAX): power-of-two rows per sequence in a packed tile."""
    seg_max = pow2(max(problem.nq, problem.nk))
    return pow2(problem.nq, seg_max // 4), pow2(problem.nk, seg_max // 4), seg_max


def interpreter_rows(problem: TarProblem) -> int:
    """Packed tile rows the interpreter runs (it does not autotune)."""
    return max(packed_limit(max(block_dims(problem.head_dim, problem.head_dim_v))),
               pow2(max(problem.nq, problem.nk)))


def tar_forward(problem: TarProblem, out: torch.Tensor | None = None,
                stats: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused forward for a validated problem; returns (B, H, Nq, Dv) in q's dtype.

    stats: optional float32 (B*H, Nq, layout.STATS_FIELDS) buffer, contiguous, for a call that
    will be differentiated in the tiled layout (layout.stats_shape): the kernel fills it with the
    row statistics ops/tar_bwd.py reads. Without it the inference path writes nothing extra.
    """
    q, k, v = problem.q, problem.k, problem.v
    B, H, nq, nk, d, dv = problem.batch, problem.heads, problem.nq, problem.nk, problem.head_dim, problem.head_dim_v
    if out is None:
        out = torch.empty(problem.output_shape(), device=q.device, dtype=q.dtype)
    bh = B * H
    if bh == 0 or nq == 0:
        return out
    delta, d_strides, gauss_coef = delta_args(problem)
    common = common_meta(problem)
    args = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *d_strides,
            bh, H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)
    if is_packed(nq, nk, d, dv):
        if stats is not None and stats.numel():
            raise ValueError("the packed layout saves no statistics: pass stats=None (see layout.stats_shape)")
        seg_q, seg_k, seg_max = packed_segments(problem)
        meta = dict(SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max, GLOBAL_MAX=problem.max_mode == "global", **common)
        grid = lambda m: (triton.cdiv(bh, m["ROWS"] // seg_max),)  # noqa: E731
        if INTERPRETING:
            meta["ROWS"] = interpreter_rows(problem)
        _packed[grid](q, k, v, out, delta, *args, **meta)
        return out

    save_stats = stats is not None
    if save_stats and (tuple(stats.shape) != (bh, nq, STATS_FIELDS) or stats.dtype != torch.float32
                       or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 ({bh}, {nq}, {STATS_FIELDS}) tensor, "
                         f"got {stats.dtype} {tuple(stats.shape)}")
    grid = lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),)  # noqa: E731
    tiled_meta = dict(common, SAVE_STATS=save_stats)
    if INTERPRETING:
        tiled_meta.update(BLOCK_M=64, BLOCK_N=64)
    n_bucket = pow2(max(nq, nk))
    stats_ptr = stats if save_stats else out  # dummy pointer when not saving
    if problem.max_mode == "global" and problem.regularized:
        row_max = torch.empty(bh, nq, device=q.device, dtype=torch.float32)
        _tiled[grid](q, k, v, out, delta, row_max, stats_ptr, *args, n_bucket, MAX_SOURCE=1, **tiled_meta)
        seq_max = row_max.amax(dim=1)
        _tiled[grid](q, k, v, out, delta, seq_max, stats_ptr, *args, n_bucket, MAX_SOURCE=2, **tiled_meta)
    else:
        _tiled[grid](q, k, v, out, delta, out, stats_ptr, *args, n_bucket, MAX_SOURCE=0, **tiled_meta)
    return out
