"""Fused TAR forward kernels (Triton).

Two layouts, one semantics (see ../shared/semantics.md):

* packed: Nq, Nk <= SHORT_MAX. Several (batch, head) sequences share one
  program as a block-diagonal tile, so N = 16..64 does not leave a 128-row tile
  mostly padding. The whole row is in registers: exact max, bias, softmax, PV
  in one pass.
* tiled: longer sequences. One program per (sequence, BLOCK_M query rows).
  Pass 1 walks the key tiles for the exact row max m_i, pass 2 runs an online
  softmax of S + strength * m_i * dA. For max_mode="global" a pre-pass writes
  the row maxima, torch reduces them per sequence, and the main pass reads it.

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

LOG2E = 1.4426950408889634
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
def _bias(s, row_max, i, j, valid, d_ptrs, strength, gauss_coef, HAS_DELTA: tl.constexpr):
    """S' = S + strength * m_i * dA_ij; masked entries stay -inf."""
    if HAS_DELTA:
        dA = tl.load(d_ptrs, mask=valid, other=0.0).to(tl.float32)
    else:
        dist = (j[None, :] - i[:, None]).to(tl.float32)
        dA = tl.exp2(gauss_coef * dist * dist)
    return s + (strength * row_max)[:, None] * dA


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
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q = tl.load(Q + (bq * sqb + hq * sqh + i * sqn)[:, None] + dq[None, :] * sqd,
                mask=row_ok[:, None] & (dq[None, :] < D), other=0.0)
    k = tl.load(K + (bk * skb + hk * skh + j * skn)[:, None] + dq[None, :] * skd,
                mask=col_ok[:, None] & (dq[None, :] < D), other=0.0)
    s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * scale

    valid = (seq_q[:, None] == seq_k[None, :]) & row_ok[:, None] & col_ok[None, :]
    if CAUSAL:
        valid = valid & (j[None, :] <= i[:, None])
    s = tl.where(valid, s, float("-inf"))

    if REGULARIZE:
        m = tl.max(s, 1)
        if GLOBAL_MAX:
            seq_max = tl.max(tl.reshape(m, (SEQS, SEG_Q)), 1)
            m = tl.reshape(tl.broadcast_to(seq_max[:, None], (SEQS, SEG_Q)), (SEQS * SEG_Q,))
        m = tl.where(row_ok, m, 0.0)
        d_ptrs = DELTA + (bq * sdb + hq * sdh + i * sdn)[:, None] + j[None, :] * sdm
        s = _bias(s, m, i, j, valid, d_ptrs, strength, gauss_coef, HAS_DELTA)

    mx = tl.where(row_ok, tl.max(s, 1), 0.0)
    p = tl.exp2((s - mx[:, None]) * 1.4426950408889634)
    denom = tl.where(row_ok, tl.sum(p, 1), 1.0)

    v = tl.load(V + (bk * svb + hk * svh + j * svn)[:, None] + dv[None, :] * svd,
                mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
    acc = _mma(_cast(p, v.dtype, INTERP_BF16), v, PRECISION, INTERP_BF16)
    out = acc / denom[:, None]
    tl.store(O + (bq * sob + hq * soh + i * son)[:, None] + dv[None, :] * sod,
             _cast(out, O.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _row_max(q, K, k_base, skn, skd, offs_m, dq, NK, D, hi, scale,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
             INTERP_BF16: tl.constexpr):
    """Exact max_j S_ij over the (masked) key range [0, hi) for BLOCK_M query rows."""
    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        k = tl.load(K + k_base + j[:, None] * skn + dq[None, :] * skd,
                    mask=(j[:, None] < NK) & (dq[None, :] < D), other=0.0)
        s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * scale
        valid = j[None, :] < NK
        if CAUSAL:
            valid = valid & (j[None, :] <= offs_m[:, None])
        m = tl.maximum(m, tl.max(tl.where(valid, s, float("-inf")), 1))
    return m


@triton.jit
def _tar_fwd_tiled_kernel(
    Q, K, V, O, DELTA, MAXBUF,
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
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(NQ, BLOCK_M)
    seq = pid // num_m
    mb = pid % num_m
    b = seq // H
    h = seq % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = offs_m < NQ
    dq = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + dq[None, :] * sqd,
                mask=row_ok[:, None] & (dq[None, :] < D), other=0.0)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)

    if MAX_SOURCE == 1:
        m = _row_max(q, K, k_base, skn, skd, offs_m, dq, NK, D, hi, scale, BLOCK_M, BLOCK_N, CAUSAL, PRECISION, INTERP_BF16)
        tl.store(MAXBUF + seq * NQ + offs_m, m, mask=row_ok)
    else:
        m_safe = tl.zeros((BLOCK_M,), tl.float32)
        if REGULARIZE:
            if MAX_SOURCE == 0:
                m = _row_max(q, K, k_base, skn, skd, offs_m, dq, NK, D, hi, scale,
                             BLOCK_M, BLOCK_N, CAUSAL, PRECISION, INTERP_BF16)
            else:
                m = tl.load(MAXBUF + seq + offs_m * 0)
            m_safe = tl.where(row_ok, m, 0.0)
        run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        denom = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
        d_base = DELTA + b * sdb + h * sdh + offs_m[:, None] * sdn
        for start in range(0, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N).to(tl.int64)
            col_ok = j < NK
            k = tl.load(K + k_base + j[:, None] * skn + dq[None, :] * skd,
                        mask=col_ok[:, None] & (dq[None, :] < D), other=0.0)
            s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * scale
            valid = col_ok[None, :] & row_ok[:, None]
            if CAUSAL:
                valid = valid & (j[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))
            if REGULARIZE:
                s = _bias(s, m_safe, offs_m, j, valid, d_base + j[None, :] * sdm, strength, gauss_coef, HAS_DELTA)
            new_max = tl.maximum(run_max, tl.max(s, 1))
            new_max = tl.where(row_ok, new_max, 0.0)
            alpha = tl.exp2((run_max - new_max) * 1.4426950408889634)
            p = tl.exp2((s - new_max[:, None]) * 1.4426950408889634)
            denom = denom * alpha + tl.sum(p, 1)
            v = tl.load(V + v_base + j[:, None] * svn + dv[None, :] * svd,
                        mask=col_ok[:, None] & (dv[None, :] < DV), other=0.0)
            acc = acc * alpha[:, None] + _mma(_cast(p, v.dtype, INTERP_BF16), v, PRECISION, INTERP_BF16)
            run_max = new_max
        denom = tl.where(row_ok, denom, 1.0)
        out = acc / denom[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + dv[None, :] * sod,
                 _cast(out, O.dtype.element_ty, INTERP_BF16), mask=row_ok[:, None] & (dv[None, :] < DV))


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

SHORT_MAX = 128       # packed path for max(Nq, Nk) <= SHORT_MAX (64 when a head dim is > 128)
DOT_MIN = 16          # smallest tl.dot extent


def packed_limit(block_d: int) -> int:
    return SHORT_MAX if block_d <= 128 else SHORT_MAX // 2


def _pow2(n: int, lo: int = 1) -> int:
    return max(lo, triton.next_power_of_2(n))


if INTERPRETING:
    # The interpreter runs one config: no benchmarking of configs on CPU.
    _packed = _tar_fwd_packed_kernel
    _tiled = _tar_fwd_tiled_kernel
else:
    _packed = triton.autotune(
        _packed_configs(), key=["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA"],
        prune_configs_by={"early_config_prune": _prune_packed})(_tar_fwd_packed_kernel)
    _tiled = triton.autotune(
        _tiled_configs(), key=["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_DELTA", "MAX_SOURCE"],
        prune_configs_by={"early_config_prune": _prune_tiled})(_tar_fwd_tiled_kernel)


def _precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32"  # ignored for 16-bit inputs


def tar_forward(problem: TarProblem, out: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused forward for a validated problem; returns (B, H, Nq, Dv) in q's dtype."""
    q, k, v = problem.q, problem.k, problem.v
    B, H, nq, nk, d, dv = problem.batch, problem.heads, problem.nq, problem.nk, problem.head_dim, problem.head_dim_v
    if out is None:
        out = torch.empty(problem.output_shape(), device=q.device, dtype=q.dtype)
    bh = B * H
    if bh == 0 or nq == 0:
        return out
    has_delta = problem.delta is not None
    delta = problem.delta if has_delta else q  # dummy pointer, never read
    d_strides = problem.delta.stride() if has_delta else (0, 0, 0, 0)
    regularize = problem.regularized
    gauss_coef = 0.0 if (has_delta or math.isinf(problem.sigma)) else -0.5 * LOG2E / problem.sigma ** 2
    block_d, block_dv = _pow2(d, DOT_MIN), _pow2(dv, DOT_MIN)
    common = dict(BLOCK_D=block_d, BLOCK_DV=block_dv, CAUSAL=problem.causal, HAS_DELTA=has_delta,
                  REGULARIZE=regularize, PRECISION=_precision(q.dtype),
                  INTERP_BF16=INTERPRETING and q.dtype == torch.bfloat16)
    args = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *d_strides,
            bh, H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)
    seg_max = _pow2(max(nq, nk))
    if seg_max <= packed_limit(max(block_d, block_dv)):
        seg_q, seg_k = _pow2(nq, seg_max // 4), _pow2(nk, seg_max // 4)
        meta = dict(SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max, GLOBAL_MAX=problem.max_mode == "global", **common)
        grid = lambda m: (triton.cdiv(bh, m["ROWS"] // seg_max),)  # noqa: E731
        if INTERPRETING:
            meta["ROWS"] = max(packed_limit(max(block_d, block_dv)), seg_max)
        _packed[grid](q, k, v, out, delta, *args, **meta)
        return out

    grid = lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),)  # noqa: E731
    tiled_meta = dict(common)
    if INTERPRETING:
        tiled_meta.update(BLOCK_M=64, BLOCK_N=64)
    n_bucket = _pow2(max(nq, nk))
    if problem.max_mode == "global" and regularize:
        row_max = torch.empty(bh, nq, device=q.device, dtype=torch.float32)
        _tiled[grid](q, k, v, out, delta, row_max, *args, n_bucket, MAX_SOURCE=1, **tiled_meta)
        seq_max = row_max.amax(dim=1)
        _tiled[grid](q, k, v, out, delta, seq_max, *args, n_bucket, MAX_SOURCE=2, **tiled_meta)
    else:
        _tiled[grid](q, k, v, out, delta, out, *args, n_bucket, MAX_SOURCE=0, **tiled_meta)
    return out
