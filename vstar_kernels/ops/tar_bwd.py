"""Fused TAR backward kernels (Triton), FlashAttention style: scores are recomputed in tiles.

With P = softmax(S'), S' = S + c * m * dA and dO the output gradient:

    dV = P^T dO,   dP = dO V^T,   dS'_ij = P_ij (dP_ij - D_i),   D_i = sum_j P_ij dP_ij = <dO_i, O_i>
    dS = dS' + (gradient through the max),   dQ = scale * dS K,   dK = scale * dS^T Q
    d delta_ij = c * m_i * dS'_ij   (when a custom delta requires grad)

The max gets dm_i = c * sum_j dS'_ij dA_ij (row mode; global mode: the sum over the whole
(batch, head) slice). As torch.amax does, that gradient is split evenly over the entries that
reach the max: in row mode each key k with S_ik = m_i gets dm_i / n_i; in global mode every
entry equal to the slice's max gets (sum_i dm_i) / (number of such entries).

Two layouts, matching ops/tar_fwd.py:

* packed (whole sequences in one tile): one kernel recomputes S, the max and its ties, the
  softmax and every gradient in registers; the forward saved nothing.
* tiled: the forward saved per query row the raw row max, its arg-max, the tie count and the
  log-sum-exp of S' (layout.STATS_FIELDS). `_tar_bwd_dq_kernel` walks the keys of a block of
  query rows (dQ, D_i, dm_i), then `_tar_bwd_dkdv_kernel` walks the queries of a block of keys
  (dK, dV, d delta). A row's ties are its arg-max key plus, when the forward counted more than
  one, the keys whose recomputed score equals the saved max.

Nothing N x N is allocated except the delta gradient itself when it is asked for.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._validation import TarProblem
from .layout import STAT_COUNT, STAT_MAX, STATS_FIELDS, is_packed, pow2
from .tar_fwd import INTERPRETING, _cast, _delta_a, _mma, common_meta, delta_args, interpreter_rows, \
    packed_segments


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tar_bwd_packed_kernel(
    Q, K, V, DO, DQ, DK, DV, DELTA, DDELTA,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sgb, sgh, sgn, sgd,
    sdb, sdh, sdn, sdm,
    BH, H, NQ, NK, D, DV_,
    scale, strength, gauss_coef,
    ROWS: tl.constexpr, SEG_Q: tl.constexpr, SEG_K: tl.constexpr, SEG_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr,
    REGULARIZE: tl.constexpr, DELTA_GRAD: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
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
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_mask = row_ok[:, None] & (dd[None, :] < D)
    k_mask = col_ok[:, None] & (dd[None, :] < D)
    o_mask = row_ok[:, None] & (dv[None, :] < DV_)
    v_mask = col_ok[:, None] & (dv[None, :] < DV_)

    q = tl.load(Q + (bq * sqb + hq * sqh + i * sqn)[:, None] + dd[None, :] * sqd, mask=q_mask, other=0.0)
    k = tl.load(K + (bk * skb + hk * skh + j * skn)[:, None] + dd[None, :] * skd, mask=k_mask, other=0.0)
    v = tl.load(V + (bk * svb + hk * svh + j * svn)[:, None] + dv[None, :] * svd, mask=v_mask, other=0.0)
    do = tl.load(DO + (bq * sgb + hq * sgh + i * sgn)[:, None] + dv[None, :] * sgd, mask=o_mask, other=0.0)

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
        tie = valid & (s == m[:, None])  # the entries torch.amax splits the max's gradient over
        d_ptrs = DELTA + (bq * sdb + hq * sdh + i * sdn)[:, None] + j[None, :] * sdm
        dA = _delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA)
        s = s + (strength * m)[:, None] * dA

    mx = tl.where(row_ok, tl.max(s, 1), 0.0)
    p = tl.exp2((s - mx[:, None]) * 1.4426950408889634)
    p = p / tl.where(row_ok, tl.sum(p, 1), 1.0)[:, None]
    dp = _mma(do, tl.trans(v), PRECISION, INTERP_BF16)
    ds = p * (dp - tl.sum(p * dp, 1)[:, None])
    dv_acc = _mma(tl.trans(_cast(p, do.dtype, INTERP_BF16)), do, PRECISION, INTERP_BF16)

    if REGULARIZE:
        if DELTA_GRAD:
            tl.store(DDELTA + (seq_q * NQ + i)[:, None] * NK + j[None, :], (strength * m)[:, None] * ds,
                     mask=valid)
        dmax = strength * tl.sum(ds * dA, 1)
        count = tl.sum(tie.to(tl.float32), 1)
        if GLOBAL_MAX:
            seq_dmax = tl.sum(tl.reshape(dmax, (SEQS, SEG_Q)), 1)
            seq_count = tl.sum(tl.reshape(count, (SEQS, SEG_Q)), 1)
            share = seq_dmax / tl.maximum(seq_count, 1.0)
            share = tl.reshape(tl.broadcast_to(share[:, None], (SEQS, SEG_Q)), (SEQS * SEG_Q,))
        else:
            share = dmax / tl.maximum(count, 1.0)
        ds = ds + tl.where(tie, share[:, None], 0.0)

    dq = _mma(_cast(ds, k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16) * scale
    dk = _mma(tl.trans(_cast(ds, q.dtype, INTERP_BF16)), q, PRECISION, INTERP_BF16) * scale
    tl.store(DQ + (seq_q * NQ + i)[:, None] * D + dd[None, :], _cast(dq, DQ.dtype.element_ty, INTERP_BF16),
             mask=q_mask)
    tl.store(DK + (seq_k * NK + j)[:, None] * D + dd[None, :], _cast(dk, DK.dtype.element_ty, INTERP_BF16),
             mask=k_mask)
    tl.store(DV + (seq_k * NK + j)[:, None] * DV_ + dv[None, :], _cast(dv_acc, DV.dtype.element_ty, INTERP_BF16),
             mask=v_mask)


@triton.jit
def _load_row_stats(STATS, row, ok):
    """Raw row max, arg-max (int32) and tie count (int32) saved by the tiled forward."""
    m = tl.load(STATS + row * 4 + 0, mask=ok, other=0.0)
    arg = tl.load(STATS + row * 4 + 2, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    count = tl.load(STATS + row * 4 + 3, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    return m, arg, count


@triton.jit
def _tar_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, DELTA, STATS, SEQMAX, AUX, TIEK,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    sgb, sgh, sgn, sgd,
    sdb, sdh, sdn, sdm,
    BH, H, NQ, NK, D, DV_,
    scale, strength, gauss_coef,
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """dQ of BLOCK_M query rows; writes D_i and the per-tie share of dm_i to AUX (bh, nq, 2).

    Global mode: the share needs the whole slice, so DQ (float32) gets the part without the max
    and TIEK (float32) the sum of the tie keys; the launcher finishes dQ and the shares.
    """
    pid = tl.program_id(0).to(tl.int64)
    num_m = tl.cdiv(NQ, BLOCK_M)
    seq = pid // num_m
    mb = pid % num_m
    b = seq // H
    h = seq % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    row_ok = offs_m < NQ
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q_mask = row_ok[:, None] & (dd[None, :] < D)
    o_mask = row_ok[:, None] & (dv[None, :] < DV_)
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + dd[None, :] * sqd, mask=q_mask, other=0.0)
    do = tl.load(DO + b * sgb + h * sgh + offs_m[:, None] * sgn + dv[None, :] * sgd, mask=o_mask, other=0.0)
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + dv[None, :] * sod, mask=o_mask, other=0.0)
    d_row = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = seq * NQ + offs_m
    lse = tl.load(STATS + row * 4 + 1, mask=row_ok, other=0.0)
    k_base = b * skb + h * skh
    v_base = b * svb + h * svh
    d_base = DELTA + b * sdb + h * sdh + offs_m[:, None] * sdn
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if REGULARIZE:
        m, arg, count = _load_row_stats(STATS, row, row_ok)
        bias_max = m
        if GLOBAL_MAX:
            bias_max = tl.load(SEQMAX + seq + offs_m * 0)
        multi = count > 1
        any_ties = tl.max(tl.where(row_ok & multi, 1, 0), 0) > 0
        dmax = tl.zeros((BLOCK_M,), tl.float32)
        tie_acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = j < NK
        k = tl.load(K + k_base + j[:, None] * skn + dd[None, :] * skd,
                    mask=col_ok[:, None] & (dd[None, :] < D), other=0.0)
        v = tl.load(V + v_base + j[:, None] * svn + dv[None, :] * svd,
                    mask=col_ok[:, None] & (dv[None, :] < DV_), other=0.0)
        s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * scale
        valid = col_ok[None, :] & row_ok[:, None]
        if CAUSAL:
            valid = valid & (j[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        s_reg = s
        if REGULARIZE:
            dA = _delta_a(offs_m, j, valid, d_base + j[None, :] * sdm, gauss_coef, HAS_DELTA)
            s_reg = s + (strength * bias_max)[:, None] * dA
        p = tl.exp2((s_reg - lse[:, None]) * 1.4426950408889634)
        dp = _mma(do, tl.trans(v), PRECISION, INTERP_BF16)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            dmax += tl.sum(ds * dA, 1)
            if any_ties:
                tie = valid & ((j[None, :] == arg[:, None]) | (multi[:, None] & (s == m[:, None])))
                tie_acc += _mma(_cast(tie.to(tl.float32), k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16)
        acc += _mma(_cast(ds, k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16)

    dq_ptrs = DQ + row[:, None] * D + dd[None, :]
    if REGULARIZE:
        dmax = dmax * strength
        if any_ties:
            tie_k = tie_acc
        else:  # one key per row reaches the max: its arg-max
            tie_k = tl.load(K + k_base + arg[:, None].to(tl.int64) * skn + dd[None, :] * skd,
                            mask=q_mask, other=0.0).to(tl.float32)
        if GLOBAL_MAX:
            tl.store(TIEK + row[:, None] * D + dd[None, :], tie_k * scale, mask=q_mask)
            tl.store(AUX + row * 2 + 1, dmax, mask=row_ok)
        else:
            share = dmax / tl.maximum(count, 1).to(tl.float32)
            acc += share[:, None] * tie_k
            tl.store(AUX + row * 2 + 1, share, mask=row_ok)
    tl.store(dq_ptrs, _cast(acc * scale, DQ.dtype.element_ty, INTERP_BF16), mask=q_mask)
    tl.store(AUX + row * 2, d_row, mask=row_ok)


@triton.jit
def _tar_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DELTA, DDELTA, STATS, SEQMAX, AUX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sgb, sgh, sgn, sgd,
    sdb, sdh, sdn, sdm,
    BH, H, NQ, NK, D, DV_,
    scale, strength, gauss_coef,
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    DELTA_GRAD: tl.constexpr, PRECISION: tl.constexpr, INTERP_BF16: tl.constexpr,
):
    """dK, dV of BLOCK_N keys (and their columns of d delta), walking the query blocks."""
    pid = tl.program_id(0).to(tl.int64)
    num_n = tl.cdiv(NK, BLOCK_N)
    seq = pid // num_n
    nb = pid % num_n
    b = seq // H
    h = seq % H
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    col_ok = offs_n < NK
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k_mask = col_ok[:, None] & (dd[None, :] < D)
    v_mask = col_ok[:, None] & (dv[None, :] < DV_)
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + dd[None, :] * skd, mask=k_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + dv[None, :] * svd, mask=v_mask, other=0.0)
    q_base = b * sqb + h * sqh
    g_base = b * sgb + h * sgh
    d_base = DELTA + b * sdb + h * sdh + offs_n[None, :] * sdm
    dk = tl.zeros((BLOCK_N, BLOCK_D), tl.float32)
    dv_acc = tl.zeros((BLOCK_N, BLOCK_DV), tl.float32)
    lo = 0
    if CAUSAL:  # rows above this block's first key see none of its keys
        lo = (nb * BLOCK_N // BLOCK_M) * BLOCK_M
    if REGULARIZE and GLOBAL_MAX:
        seq_max = tl.load(SEQMAX + seq + tl.arange(0, BLOCK_M) * 0)
    for start in range(lo, NQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = offs_m < NQ
        row = seq * NQ + offs_m
        q = tl.load(Q + q_base + offs_m[:, None] * sqn + dd[None, :] * sqd,
                    mask=row_ok[:, None] & (dd[None, :] < D), other=0.0)
        do = tl.load(DO + g_base + offs_m[:, None] * sgn + dv[None, :] * sgd,
                     mask=row_ok[:, None] & (dv[None, :] < DV_), other=0.0)
        lse = tl.load(STATS + row * 4 + 1, mask=row_ok, other=0.0)
        d_row = tl.load(AUX + row * 2, mask=row_ok, other=0.0)
        s = _mma(q, tl.trans(k), PRECISION, INTERP_BF16) * scale
        valid = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None])
        s = tl.where(valid, s, float("-inf"))
        s_reg = s
        if REGULARIZE:
            m, arg, count = _load_row_stats(STATS, row, row_ok)
            bias_max = m
            if GLOBAL_MAX:
                bias_max = seq_max
            dA = _delta_a(offs_m, offs_n, valid, d_base + offs_m[:, None] * sdn, gauss_coef, HAS_DELTA)
            s_reg = s + (strength * bias_max)[:, None] * dA
        p = tl.exp2((s_reg - lse[:, None]) * 1.4426950408889634)
        dv_acc += _mma(tl.trans(_cast(p, do.dtype, INTERP_BF16)), do, PRECISION, INTERP_BF16)
        dp = _mma(do, tl.trans(v), PRECISION, INTERP_BF16)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            if DELTA_GRAD:
                tl.store(DDELTA + row[:, None] * NK + offs_n[None, :], (strength * bias_max)[:, None] * ds,
                         mask=valid)
            share = tl.load(AUX + row * 2 + 1, mask=row_ok, other=0.0)
            tie = valid & ((offs_n[None, :] == arg[:, None]) | ((count > 1)[:, None] & (s == m[:, None])))
            ds = ds + tl.where(tie, share[:, None], 0.0)
        dk += _mma(tl.trans(_cast(ds, q.dtype, INTERP_BF16)), q, PRECISION, INTERP_BF16)
    tl.store(DK + (seq * NK + offs_n)[:, None] * D + dd[None, :], _cast(dk * scale, DK.dtype.element_ty, INTERP_BF16),
             mask=k_mask)
    tl.store(DV + (seq * NK + offs_n)[:, None] * DV_ + dv[None, :], _cast(dv_acc, DV.dtype.element_ty, INTERP_BF16),
             mask=v_mask)


# --------------------------------------------------------------------------- configs

def _packed_configs():
    return [triton.Config({"ROWS": rows}, num_warps=w, num_stages=1) for rows in (16, 32, 64, 128) for w in (4, 8)]


def _prune_packed(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}  # the autotuner passes constexprs in kwargs
    seg = named_args["SEG_MAX"]
    # Five (rows x rows) float32 tiles live at once: keep tiles small for wide heads, but never
    # below one sequence per program.
    wide = max(named_args["BLOCK_D"], named_args["BLOCK_DV"]) > 64
    keep = []
    for c in configs:
        rows = c.kwargs["ROWS"]
        if rows < seg or (wide and rows > max(64, seg)) or (rows <= 32 and c.num_warps > 4):
            continue
        if (rows // seg) * min(named_args["SEG_Q"], named_args["SEG_K"]) < 16:  # tl.dot needs 16 rows/cols
            continue
        keep.append(c)
    return keep


def _tiled_configs():
    blocks = ((32, 64), (64, 32), (64, 64), (32, 128), (128, 32), (64, 128), (128, 64))
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2)
            for bm, bn in blocks for w in (4, 8)]


def _prune_tiled(configs, named_args, **kwargs):
    named_args = {**named_args, **kwargs}  # the autotuner passes constexprs in kwargs
    wide = max(named_args["BLOCK_D"], named_args["BLOCK_DV"]) > 128
    return [c for c in configs
            if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= (2048 if wide else 8192)
            and not (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] >= 8192 and c.num_warps == 4)]


_TILED_KEY = ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA", "REGULARIZE"]

if INTERPRETING:
    # The interpreter runs one config; the launcher picks unequal query/key blocks so the tests
    # cover the causal start of the dK/dV walk.
    _packed = _tar_bwd_packed_kernel
    _dq = _tar_bwd_dq_kernel
    _dkdv = _tar_bwd_dkdv_kernel
else:
    _packed = triton.autotune(
        _packed_configs(), key=["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA",
                                "REGULARIZE", "DELTA_GRAD"],
        prune_configs_by={"early_config_prune": _prune_packed})(_tar_bwd_packed_kernel)
    _dq = triton.autotune(_tiled_configs(), key=_TILED_KEY,
                          prune_configs_by={"early_config_prune": _prune_tiled})(_tar_bwd_dq_kernel)
    _dkdv = triton.autotune(_tiled_configs(), key=_TILED_KEY + ["DELTA_GRAD"],
                            prune_configs_by={"early_config_prune": _prune_tiled})(_tar_bwd_dkdv_kernel)


# --------------------------------------------------------------------------- launcher


def tar_backward(problem: TarProblem, out: torch.Tensor, stats: torch.Tensor, grad_out: torch.Tensor,
                 delta_grad: bool = False, grads: tuple | None = None):
    """Gradients of a Triton forward. Returns (dq, dk, dv, ddelta).

    problem: the forward's validated problem; out (B, H, Nq, Dv) its output; stats what
    `tar_forward(problem, stats=...)` filled (shape `layout.stats_shape(..., needs_grad=True)`:
    empty for the packed layout); grad_out (B, H, Nq, Dv), any strides, q's dtype.
    dq, dk, dv are contiguous in q's dtype with q/k/v's shapes (written into `grads` when given:
    three such tensors). ddelta is the float32 gradient of the (B, H, Nq, Nk) bias
    `problem.delta` when delta_grad, else None.
    """
    q, k, v = problem.q, problem.k, problem.v
    B, H, nq, nk, d, dv = problem.batch, problem.heads, problem.nq, problem.nk, problem.head_dim, problem.head_dim_v
    bh = B * H
    if grad_out.shape != out.shape or grad_out.dtype != out.dtype or grad_out.device != out.device:
        raise ValueError(f"grad_out must match the output: {out.dtype} {tuple(out.shape)}, got "
                         f"{grad_out.dtype} {tuple(grad_out.shape)}")
    if grads is None:
        grads = tuple(torch.empty(t.shape, device=q.device, dtype=q.dtype) for t in (q, k, v))
    elif any(g.shape != t.shape or g.dtype != q.dtype or not g.is_contiguous() for g, t in zip(grads, (q, k, v))):
        raise ValueError("grads must be three contiguous tensors shaped like q, k and v in q's dtype")
    dq, dk, dv_out = grads
    ddelta = torch.zeros(bh, nq, nk, device=q.device, dtype=torch.float32) if delta_grad else None
    if bh == 0 or nq == 0:  # no scores: nothing depends on the inputs
        for g in grads:
            g.zero_()
        return dq, dk, dv_out, None if ddelta is None else ddelta.view(B, H, nq, nk)
    delta, d_strides, gauss_coef = delta_args(problem)
    ddelta_ptr = ddelta if ddelta is not None else dq  # dummy pointer when not written
    meta = dict(common_meta(problem), GLOBAL_MAX=problem.max_mode == "global")
    sizes = (bh, H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)

    if is_packed(nq, nk, d, dv):
        seg_q, seg_k, seg_max = packed_segments(problem)
        packed_meta = dict(meta, SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max, DELTA_GRAD=delta_grad)
        if INTERPRETING:
            packed_meta["ROWS"] = interpreter_rows(problem)
        grid = lambda m: (triton.cdiv(bh, m["ROWS"] // seg_max),)  # noqa: E731
        _packed[grid](q, k, v, grad_out, dq, dk, dv_out, delta, ddelta_ptr,
                      *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *d_strides, *sizes, **packed_meta)
        return dq, dk, dv_out, None if ddelta is None else ddelta.view(B, H, nq, nk)

    if tuple(stats.shape) != (bh, nq, STATS_FIELDS):
        raise ValueError(f"stats must be the ({bh}, {nq}, {STATS_FIELDS}) statistics of the tiled forward, "
                         f"got shape {tuple(stats.shape)}")
    regularized_global = problem.regularized and problem.max_mode == "global"
    seq_max = stats[..., STAT_MAX].amax(dim=1) if regularized_global else stats
    aux = torch.empty(bh, nq, 2, device=q.device, dtype=torch.float32)
    dq_buf, tie_k = dq, dq  # global mode: float32 partial dQ and tie keys, finished below
    if regularized_global:
        dq_buf = torch.empty(bh, nq, d, device=q.device, dtype=torch.float32)
        tie_k = torch.empty(bh, nq, d, device=q.device, dtype=torch.float32)
    n_bucket = pow2(max(nq, nk))
    block = dict(BLOCK_M=64, BLOCK_N=32) if INTERPRETING else {}
    _dq[lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),)](
        q, k, v, out, grad_out, dq_buf, delta, stats, seq_max, aux, tie_k,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *d_strides, *sizes, n_bucket,
        **meta, **block)
    if regularized_global:
        # Every entry equal to the slice's max gets the same share of the summed dm_i.
        row_max = stats[..., STAT_MAX]
        at_max = row_max == seq_max[:, None]
        count = stats.view(torch.int32)[..., STAT_COUNT].to(torch.float32)
        ties = (count * at_max).sum(dim=1, keepdim=True)
        share = torch.where(at_max, aux[..., 1].sum(dim=1, keepdim=True) / ties, 0.0)
        aux[..., 1] = share
        dq.copy_((dq_buf + share[..., None] * tie_k).view(q.shape))
    _dkdv[lambda m: (bh * triton.cdiv(nk, m["BLOCK_N"]),)](
        q, k, v, grad_out, dk, dv_out, delta, ddelta_ptr, stats, seq_max, aux,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *d_strides, *sizes, n_bucket,
        DELTA_GRAD=delta_grad, **meta, **block)
    return dq, dk, dv_out, None if ddelta is None else ddelta.view(B, H, nq, nk)
