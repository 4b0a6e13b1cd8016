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
from .tar_fwd import INTERPRETING, _bias, _block_coords, _cast, _delta_a, _exp, _load_tile, _masked_scores, _mma, \
    _packed_coords, _packed_exp, _packed_max, _per_row, _same_sequence, _store_tile, common_meta, delta_args, \
    interpreter_rows, packed_segments


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
    i, j, seq_q, seq_k, bq, hq, bk, hk, row_ok, col_ok = _packed_coords(BH, H, NQ, NK, SEQS, SEG_Q, SEG_K)
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)

    q = _load_tile(Q, bq * sqb + hq * sqh + i * sqn, 1, dd, sqd, row_ok, D)
    k = _load_tile(K, bk * skb + hk * skh + j * skn, 1, dd, skd, col_ok, D)
    v = _load_tile(V, bk * svb + hk * svh + j * svn, 1, dv, svd, col_ok, DV_)
    do = _load_tile(DO, bq * sgb + hq * sgh + i * sgn, 1, dv, sgd, row_ok, DV_)

    valid = _same_sequence(seq_q, seq_k) & row_ok[:, None] & col_ok[None, :]
    s, valid = _masked_scores(q, k, valid, i, j, scale, CAUSAL, PRECISION, INTERP_BF16)

    if REGULARIZE:
        m = _packed_max(s, row_ok, SEQS, SEG_Q, GLOBAL_MAX)
        tie = valid & (s == m[:, None])  # the entries torch.amax splits the max's gradient over
        d_ptrs = DELTA + (bq * sdb + hq * sdh + i * sdn)[:, None] + j[None, :] * sdm
        dA = _delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA)
        s = _bias(s, m, dA, strength)

    p, denom = _packed_exp(s, row_ok)
    p = p / denom[:, None]
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
            share = _per_row(seq_dmax / tl.maximum(seq_count, 1.0), SEQS, SEG_Q)
        else:
            share = dmax / tl.maximum(count, 1.0)
        ds = ds + tl.where(tie, share[:, None], 0.0)

    dq = _mma(_cast(ds, k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16) * scale
    dk = _mma(tl.trans(_cast(ds, q.dtype, INTERP_BF16)), q, PRECISION, INTERP_BF16) * scale
    _store_tile(DQ, seq_q * NQ + i, D, dd, 1, dq, row_ok, D, INTERP_BF16)
    _store_tile(DK, seq_k * NK + j, D, dd, 1, dk, col_ok, D, INTERP_BF16)
    _store_tile(DV, seq_k * NK + j, DV_, dv, 1, dv_acc, col_ok, DV_, INTERP_BF16)


@triton.jit
def _load_row_stats(STATS, row, ok):
    """Raw row max, arg-max (int32) and tie count (int32) saved by the tiled forward."""
    m = tl.load(STATS + row * 4 + 0, mask=ok, other=0.0)
    arg = tl.load(STATS + row * 4 + 2, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    count = tl.load(STATS + row * 4 + 3, mask=ok, other=0.0).to(tl.int32, bitcast=True)
    return m, arg, count


@triton.jit
def _ties(s, valid, cols, m, arg, multi):
    """The entries of a tile of raw scores that reach their row's saved max m: the saved arg-max key,
    and in rows where the forward counted more than one (multi), every key whose score equals m."""
    return valid & ((cols[None, :] == arg[:, None]) | (multi[:, None] & (s == m[:, None])))


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
    seq, mb, b, h, offs_m, row_ok = _block_coords(NQ, H, BLOCK_M)
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(Q + b * sqb + h * sqh, offs_m, sqn, dd, sqd, row_ok, D)
    do = _load_tile(DO + b * sgb + h * sgh, offs_m, sgn, dv, sgd, row_ok, DV_)
    o = _load_tile(O + b * sob + h * soh, offs_m, son, dv, sod, row_ok, DV_)
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
        k = _load_tile(K + k_base, j, skn, dd, skd, col_ok, D)
        v = _load_tile(V + v_base, j, svn, dv, svd, col_ok, DV_)
        s, valid = _masked_scores(q, k, col_ok[None, :] & row_ok[:, None], offs_m, j, scale, CAUSAL, PRECISION,
                                  INTERP_BF16)
        s_reg = s
        if REGULARIZE:
            dA = _delta_a(offs_m, j, valid, d_base + j[None, :] * sdm, gauss_coef, HAS_DELTA)
            s_reg = _bias(s, bias_max, dA, strength)
        p = _exp(s_reg - lse[:, None])
        dp = _mma(do, tl.trans(v), PRECISION, INTERP_BF16)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            dmax += tl.sum(ds * dA, 1)
            if any_ties:
                tie = _ties(s, valid, j, m, arg, multi)
                tie_acc += _mma(_cast(tie.to(tl.float32), k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16)
        acc += _mma(_cast(ds, k.dtype, INTERP_BF16), k, PRECISION, INTERP_BF16)

    if REGULARIZE:
        dmax = dmax * strength
        if any_ties:
            tie_k = tie_acc
        else:  # one key per row reaches the max: its arg-max
            tie_k = _load_tile(K + k_base, arg.to(tl.int64), skn, dd, skd, row_ok, D).to(tl.float32)
        if GLOBAL_MAX:
            tl.store(TIEK + row[:, None] * D + dd[None, :], tie_k * scale, mask=row_ok[:, None] & (dd[None, :] < D))
            tl.store(AUX + row * 2 + 1, dmax, mask=row_ok)
        else:
            share = dmax / tl.maximum(count, 1).to(tl.float32)
            acc += share[:, None] * tie_k
            tl.store(AUX + row * 2 + 1, share, mask=row_ok)
    _store_tile(DQ, row, D, dd, 1, acc * scale, row_ok, D, INTERP_BF16)
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
    seq, nb, b, h, offs_n, col_ok = _block_coords(NK, H, BLOCK_N)
    dd = tl.arange(0, BLOCK_D)
    dv = tl.arange(0, BLOCK_DV)
    k = _load_tile(K + b * skb + h * skh, offs_n, skn, dd, skd, col_ok, D)
    v = _load_tile(V + b * svb + h * svh, offs_n, svn, dv, svd, col_ok, DV_)
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
        q = _load_tile(Q + q_base, offs_m, sqn, dd, sqd, row_ok, D)
        do = _load_tile(DO + g_base, offs_m, sgn, dv, sgd, row_ok, DV_)
        lse = tl.load(STATS + row * 4 + 1, mask=row_ok, other=0.0)
        d_row = tl.load(AUX + row * 2, mask=row_ok, other=0.0)
        s, valid = _masked_scores(q, k, row_ok[:, None] & col_ok[None, :], offs_m, offs_n, scale, CAUSAL, PRECISION,
                                  INTERP_BF16)
        s_reg = s
        if REGULARIZE:
            m, arg, count = _load_row_stats(STATS, row, row_ok)
            bias_max = m
            if GLOBAL_MAX:
                bias_max = seq_max
            dA = _delta_a(offs_m, offs_n, valid, d_base + offs_m[:, None] * sdn, gauss_coef, HAS_DELTA)
            s_reg = _bias(s, bias_max, dA, strength)
        p = _exp(s_reg - lse[:, None])
        dv_acc += _mma(tl.trans(_cast(p, do.dtype, INTERP_BF16)), do, PRECISION, INTERP_BF16)
        dp = _mma(do, tl.trans(v), PRECISION, INTERP_BF16)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            if DELTA_GRAD:
                tl.store(DDELTA + row[:, None] * NK + offs_n[None, :], (strength * bias_max)[:, None] * ds,
                         mask=valid)
            share = tl.load(AUX + row * 2 + 1, mask=row_ok, other=0.0)
            tie = _ties(s, valid, offs_n, m, arg, count > 1)
            ds = ds + tl.where(tie, share[:, None], 0.0)
        dk += _mma(tl.trans(_cast(ds, q.dtype, INTERP_BF16)), q, PRECISION, INTERP_BF16)
    _store_tile(DK, seq * NK + offs_n, D, dd, 1, dk * scale, col_ok, D, INTERP_BF16)
    _store_tile(DV, seq * NK + offs_n, DV_, dv, 1, dv_acc, col_ok, DV_, INTERP_BF16)


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
