"""Fused TAR backward kernels (Triton), FlashAttention style: scores are recomputed in tiles.

With P = softmax(S'), S' = S + c * m * dA and dO the output gradient:

    dV = P^T dO,   dP = dO V^T,   dS'_ij = P_ij (dP_ij - D_i),   D_i = sum_j P_ij dP_ij = <dO_i, O_i>
    dS = dS' + (gradient through the max),   dQ = scale * dS K,   dK = scale * dS^T Q
    d delta_ij = c * m_i * dS'_ij   (when a custom delta requires grad)

The max gets dm_i = c * sum_j dS'_ij dA_ij (global mode: summed over the (batch, head) slice),
split evenly over the entries that reach the max, as torch.amax does (docs/compile-and-autograd.md).
The layouts are ops/tar_fwd.py's: the packed kernel recomputes everything in registers; the tiled
`_tar_bwd_dq_kernel` (walking the keys of a query block) then `_tar_bwd_dkdv_kernel` (walking the
queries of a key block) read the forward's row statistics (layout.STATS_FIELDS). Nothing N x N is
allocated but the delta gradient when it is asked for (with frame ids: the (F, F) frame matrix's).
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from .._problem import TarProblem
from . import layout
from ._jit import _PER_SCORE, _STAT_LSE, _STAT_MAX, _STATS_N, INTERPRETING, bias, block_coords, cast, common_meta, \
    delta_a, delta_args, exp, fewest_words, frame_args, frame_band_width, frame_span, frame_tile_id, frame_vector, \
    key_ok, load_tile, masked_scores, mma, packed_coords, packed_exp, packed_launch, packed_max, store_tile, \
    target_sm, tiled_only, tuned, vector_width
from .layout import STAT_MAX, STATS_FIELDS, is_packed, pow2

# Field offsets of the dQ pass's per-row values (layout.AUX_FIELDS), as compile-time constants of
# the kernels.
_AUX_N = tl.constexpr(layout.AUX_FIELDS)
_AUX_D = tl.constexpr(layout.AUX_D)
_AUX_SHARE = tl.constexpr(layout.AUX_SHARE)
_AUX_MAX = tl.constexpr(layout.AUX_MAX)
_AUX_COUNT = tl.constexpr(layout.AUX_COUNT)
_AUX_NORM = tl.constexpr(layout.AUX_NORM)


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tar_bwd_packed_kernel(
    Q, K, V, DO, DQ, DK, DV, DELTA, DDELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_deltab, stride_deltah, stride_deltam, stride_deltan,
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    ROWS: tl.constexpr, SEG_Q: tl.constexpr, SEG_K: tl.constexpr, SEG_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr,
    REGULARIZE: tl.constexpr, DELTA_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load and store (_jit.vector_width)
):
    """Gradients of the packed forward (ops/tar_fwd.py) for ROWS // SEG_MAX whole sequences, with
    the forward's 3-D tiles (one batched product per sequence). DQ, DK, DV are contiguous
    (B*H*Nq, D), (B*H*Nk, D), (B*H*Nk, Dv); DDELTA (B*H, Nq, Nk) float32, written with DELTA_GRAD.
    """
    SEQS: tl.constexpr = ROWS // SEG_MAX
    b, h, i, j, row_ok, col_ok = packed_coords(BH, H, NQ, NK, SEQS, SEG_Q, SEG_K)
    seq = (b * H + h)[:, None]
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = load_tile(Q, (b * stride_qb + h * stride_qh)[:, None] + i * stride_qn, 1, offs_d, stride_qd, row_ok,
                  HEAD_DIM, VEC)
    k = load_tile(K, (b * stride_kb + h * stride_kh)[:, None] + j * stride_kn, 1, offs_d, stride_kd, col_ok,
                  HEAD_DIM, VEC)
    v = load_tile(V, (b * stride_vb + h * stride_vh)[:, None] + j * stride_vn, 1, offs_dv, stride_vd, col_ok,
                  HEAD_DIM_V, VEC)
    do = load_tile(DO, (b * stride_dob + h * stride_doh)[:, None] + i * stride_don, 1, offs_dv, stride_dod, row_ok,
                   HEAD_DIM_V, VEC)

    s, valid = masked_scores(q, k, row_ok[:, :, None] & col_ok[:, None, :], i, j, scale, CAUSAL, PRECISION)

    if REGULARIZE:
        m = packed_max(s, row_ok, GLOBAL_MAX)
        tie = valid & (s == m[:, :, None])  # the entries torch.amax splits the max's gradient over
        d_ptrs = DELTA + (b * stride_deltab + h * stride_deltah)[:, None, None] \
            + (i * stride_deltam)[:, None] + j[None, :] * stride_deltan
        dA = delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA)
        s = bias(s, m, dA, strength)

    p, denom = packed_exp(s, row_ok)
    p = p / denom[:, :, None]
    dp = mma(do, tl.trans(v, 0, 2, 1), PRECISION)
    ds = p * (dp - tl.sum(p * dp, 2)[:, :, None])
    dv_acc = mma(tl.trans(cast(p, do.dtype), 0, 2, 1), do, PRECISION)

    if REGULARIZE:
        if DELTA_GRAD:
            tl.store(DDELTA + ((seq * NQ + i) * NK)[:, :, None] + j, (strength * m)[:, :, None] * ds, mask=valid)
        dmax = strength * tl.sum(ds * dA, 2)
        count = tl.sum(tie.to(tl.float32), 2)
        if GLOBAL_MAX:
            share = (tl.sum(dmax, 1) / tl.maximum(tl.sum(count, 1), 1.0))[:, None]
        else:
            share = dmax / tl.maximum(count, 1.0)
        ds = ds + tl.where(tie, share[:, :, None], 0.0)

    dq = mma(cast(ds, k.dtype), k, PRECISION) * scale
    dk = mma(tl.trans(cast(ds, q.dtype), 0, 2, 1), q, PRECISION) * scale
    store_tile(DQ, seq * NQ + i, HEAD_DIM, offs_d, 1, dq, row_ok, HEAD_DIM, VEC)
    store_tile(DK, seq * NK + j, HEAD_DIM, offs_d, 1, dk, col_ok, HEAD_DIM, VEC)
    store_tile(DV, seq * NK + j, HEAD_DIM_V, offs_dv, 1, dv_acc, col_ok, HEAD_DIM_V, VEC)


@triton.jit
def _track_max(s, valid, start, m, arg, count):
    """Fold a tile of raw scores into a running row max, its first arg-max key and how many keys reach it."""
    tile_max = tl.max(s, 1)
    tile_arg = (start + tl.argmax(s, 1, tie_break_left=True)).to(tl.int32)
    tile_count = tl.sum((valid & (s == tile_max[:, None])).to(tl.int32), 1)
    arg = tl.where(tile_max > m, tile_arg, arg)
    count = tl.where(tile_max > m, tile_count, tl.where(tile_max == m, count + tile_count, count))
    return tl.maximum(m, tile_max), arg, count


@triton.jit
def _tar_bwd_dq_kernel(
    Q, K, V, O, DO, DQ, DELTA, STATS, SEQMAX, AUX, TIEK, FQ, FK, KMASK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_deltab, stride_deltah, stride_deltam, stride_deltan,
    stride_kmb, stride_kmn,
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    N_BUCKET,  # autotune key only
    FRAME_BAND,  # with HAS_FRAMES: frame ids FRAME_BAND or more apart have a Gaussian dA of exactly 0
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    PRECISION: tl.constexpr,
    HAS_FRAMES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,  # as in ops/tar_fwd.py's tiled kernel
    FRAME_TILES: tl.constexpr,  # as there: dA as one column for a key tile of one frame or off the band
):
    """dQ of BLOCK_M query rows, and their layout.AUX_FIELDS values for the dK/dV pass.

    Precision with TAR (tools/perf/kernel-log.md, v2): a strong band makes P nearly one-hot, so
    dS' = P (dP - D) is a small difference that the max's gradient multiplies by strength, and
    two FlashAttention shortcuts are too coarse: D_i = <dO_i, O_i> (O rounded to 16 bits) and
    P = exp(S' - lse) (lse ~ strength * m_i is large, its rounding scales the row). So when
    regularizing the walk also sums Z_i = sum_j P_ij, sum_j P_ij dP_ij, sum_j P_ij K_j and
    sum_j P_ij dA_ij, and at the end corrects D_i, dQ and dm_i from the <dO_i, O_i> baseline it
    walked with (which keeps the 16-bit rounding of dS' small) to the normalized P / Z. D_i and
    1 / Z_i go to the dK/dV pass.

    Ties: the walk tracks the row max of its own recomputed raw scores, the first key reaching it
    and how many do; the dK/dV pass, on the same tiles, recomputes the same scores bit for bit.
    Rows where several keys tie get the sum of the tied keys from a second walk (rare: duplicated
    or static frames); otherwise the arg-max key is read. Global mode: the share needs the whole
    slice, so DQ (float32) gets the part without the max and TIEK (float32) the sum of the tie
    keys; the launcher finishes dQ and the shares. Frame ids and a key mask as in the forward's
    tiled kernel; a row with no key (log-sum-exp +inf) gets zero gradients (1 / Z_i is 0).
    """
    seq, mb, b, h, offs_m, row_ok = block_coords(NQ, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, stride_qd, row_ok, HEAD_DIM)
    do = load_tile(DO + b * stride_dob + h * stride_doh, offs_m, stride_don, offs_dv, stride_dod, row_ok, HEAD_DIM_V)
    o = load_tile(O + b * stride_ob + h * stride_oh, offs_m, stride_on, offs_dv, stride_od, row_ok, HEAD_DIM_V)
    d_row = tl.sum(do.to(tl.float32) * o.to(tl.float32), 1)
    row = seq * NQ + offs_m
    lse = tl.load(STATS + row * _STATS_N + _STAT_LSE, mask=row_ok, other=0.0)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    fq = offs_m
    q_lo = 0
    q_hi = 0
    if HAS_FRAMES:
        fq = tl.load(FQ + offs_m, mask=row_ok, other=-1)
        q_lo, q_hi = frame_span(fq)
    d_base = DELTA + b * stride_deltab + h * stride_deltah + fq[:, None] * stride_deltam
    km_base = b * stride_kmb
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)

    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    if REGULARIZE:
        bias_max = tl.load(STATS + row * _STATS_N + _STAT_MAX, mask=row_ok, other=0.0)
        if GLOBAL_MAX:
            bias_max = tl.load(SEQMAX + seq + offs_m * 0)
        dmax = tl.zeros((BLOCK_M,), tl.float32)
        p_sum = tl.zeros((BLOCK_M,), tl.float32)
        p_dp = tl.zeros((BLOCK_M,), tl.float32)
        p_da = tl.zeros((BLOCK_M,), tl.float32)
        p_k = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M,), tl.int32)
        count = tl.zeros((BLOCK_M,), tl.int32)
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = key_ok(j < NK, KMASK, km_base, j, stride_kmn, HAS_KEY_MASK)
        k = load_tile(K + k_base, j, stride_kn, offs_d, stride_kd, col_ok, HEAD_DIM)
        v = load_tile(V + v_base, j, stride_vn, offs_dv, stride_vd, j < NK, HEAD_DIM_V)  # masked keys' too
        s, valid = masked_scores(q, k, col_ok[None, :] & row_ok[:, None], offs_m, j, scale, CAUSAL, PRECISION)
        s_reg = s
        if REGULARIZE:
            m, arg, count = _track_max(s, valid, start, m, arg, count)
            if HAS_FRAMES:
                fk = tl.load(FK + j, mask=j < NK, other=-1)
                one = _PER_SCORE
                if FRAME_TILES:
                    one = frame_tile_id(q_lo, q_hi, fk, FRAME_BAND, HAS_DELTA)
                if one != _PER_SCORE:  # one column, masked as delta_a masks
                    dA = tl.where(valid, frame_vector(fq[:, None], one, d_base, stride_deltan, gauss_coef,
                                                      HAS_DELTA), 0.0)
                else:
                    dA = delta_a(fq, fk, valid, d_base + fk[None, :] * stride_deltan, gauss_coef, HAS_DELTA, True)
            else:
                dA = delta_a(offs_m, j, valid, d_base + j[None, :] * stride_deltan, gauss_coef, HAS_DELTA)
            s_reg = bias(s, bias_max, dA, strength)
            if HAS_FRAMES or HAS_KEY_MASK:
                s_reg = tl.where(valid, s_reg, float("-inf"))
        p = exp(s_reg - lse[:, None])
        dp = mma(do, tl.trans(v), PRECISION)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            dmax += tl.sum(ds * dA, 1)
            p_sum += tl.sum(p, 1)
            p_dp += tl.sum(p * dp, 1)
            p_da += tl.sum(p * dA, 1)
            p_k += mma(cast(p, k.dtype), k, PRECISION)
        acc += mma(cast(ds, k.dtype), k, PRECISION)

    if REGULARIZE:
        if HAS_KEY_MASK:  # a row with no key: every probability is 0
            norm = tl.where(p_sum > 0.0, 1.0 / tl.where(p_sum > 0.0, p_sum, 1.0), 0.0)
        else:
            norm = 1.0 / tl.where(row_ok, p_sum, 1.0)
        d_exact = p_dp * norm
        acc = (acc + (d_row - d_exact)[:, None] * p_k) * norm[:, None]
        dmax = strength * norm * (dmax + (d_row - d_exact) * p_da)
        d_row = d_exact
        tl.store(AUX + row * _AUX_N + _AUX_NORM, norm, mask=row_ok)
        if tl.max(tl.where(row_ok & (count > 1), 1, 0), 0) > 0:
            tie_k = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
            for start in range(0, hi, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N).to(tl.int64)
                col_ok = key_ok(j < NK, KMASK, km_base, j, stride_kmn, HAS_KEY_MASK)
                k = load_tile(K + k_base, j, stride_kn, offs_d, stride_kd, col_ok, HEAD_DIM)
                s, valid = masked_scores(q, k, col_ok[None, :] & row_ok[:, None], offs_m, j, scale, CAUSAL,
                                          PRECISION)
                tie = valid & (s == m[:, None])
                tie_k += mma(cast(tie.to(tl.float32), k.dtype), k, PRECISION)
        else:  # one key per row reaches the max: its arg-max
            tie_k = load_tile(K + k_base, arg.to(tl.int64), stride_kn, offs_d, stride_kd, row_ok,
                              HEAD_DIM).to(tl.float32)
        if GLOBAL_MAX:
            tl.store(TIEK + row[:, None] * HEAD_DIM + offs_d[None, :], tie_k * scale,
                     mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
            share = dmax  # turned into the share by the launcher
        else:
            share = dmax / tl.maximum(count, 1).to(tl.float32)
            acc += share[:, None] * tie_k
        tl.store(AUX + row * _AUX_N + _AUX_SHARE, share, mask=row_ok)
        tl.store(AUX + row * _AUX_N + _AUX_MAX, m, mask=row_ok)
        tl.store(AUX + row * _AUX_N + _AUX_COUNT, count.to(tl.float32), mask=row_ok)
    store_tile(DQ, row, HEAD_DIM, offs_d, 1, acc * scale, row_ok, HEAD_DIM)
    tl.store(AUX + row * _AUX_N + _AUX_D, d_row, mask=row_ok)


@triton.jit
def _tar_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DELTA, DDELTA, STATS, SEQMAX, AUX, FQ, FK, KMASK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_dob, stride_doh, stride_don, stride_dod,
    stride_deltab, stride_deltah, stride_deltam, stride_deltan,
    stride_kmb, stride_kmn,
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    N_BUCKET,  # autotune key only
    FRAME_BAND,  # as in the dQ pass
    NUM_FRAMES,  # the frame matrix's size F (DDELTA (F, F) with HAS_FRAMES)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    DELTA_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    HAS_FRAMES: tl.constexpr, HAS_KEY_MASK: tl.constexpr,  # as in ops/tar_fwd.py's tiled kernel
    FRAME_TILES: tl.constexpr,  # as in the dQ pass, with the roles swapped: a query tile of one frame
):
    """dK, dV of BLOCK_N keys (and their columns of d delta), walking the query blocks.

    Runs the dQ pass's tiles, so its recomputed raw scores equal that pass's bit for bit: a key
    ties in row i exactly when its score equals the row max the dQ pass saved.

    Frame ids and a key mask as in the forward's tiled kernel (a masked key gets dK = dV = 0).
    With HAS_FRAMES the gradient of the frame matrix is accumulated atomically into DDELTA
    (float32 (F, F), zeroed): entry [f(q_i), f(k_j)] sums the entries' c * m_i * dS'_ij, in an
    order that may vary between runs.
    """
    seq, nb, b, h, offs_n, col_in = block_coords(NK, H, BLOCK_N)
    col_ok = key_ok(col_in, KMASK, b * stride_kmb, offs_n, stride_kmn, HAS_KEY_MASK)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    k = load_tile(K + b * stride_kb + h * stride_kh, offs_n, stride_kn, offs_d, stride_kd, col_ok, HEAD_DIM)
    v = load_tile(V + b * stride_vb + h * stride_vh, offs_n, stride_vn, offs_dv, stride_vd, col_in, HEAD_DIM_V)
    q_base = b * stride_qb + h * stride_qh
    g_base = b * stride_dob + h * stride_doh
    fk = offs_n
    k_lo = 0
    k_hi = 0
    if HAS_FRAMES:
        fk = tl.load(FK + offs_n, mask=col_in, other=-1)
        k_lo, k_hi = frame_span(fk)
    d_base = DELTA + b * stride_deltab + h * stride_deltah + fk[None, :] * stride_deltan
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
        q = load_tile(Q + q_base, offs_m, stride_qn, offs_d, stride_qd, row_ok, HEAD_DIM)
        do = load_tile(DO + g_base, offs_m, stride_don, offs_dv, stride_dod, row_ok, HEAD_DIM_V)
        lse = tl.load(STATS + row * _STATS_N + _STAT_LSE, mask=row_ok, other=0.0)
        d_row = tl.load(AUX + row * _AUX_N + _AUX_D, mask=row_ok, other=0.0)
        s, valid = masked_scores(q, k, row_ok[:, None] & col_ok[None, :], offs_m, offs_n, scale, CAUSAL, PRECISION)
        s_reg = s
        if REGULARIZE:
            bias_max = tl.load(STATS + row * _STATS_N + _STAT_MAX, mask=row_ok, other=0.0)
            if GLOBAL_MAX:
                bias_max = seq_max
            if HAS_FRAMES:
                fq = tl.load(FQ + offs_m, mask=row_ok, other=-1)
                one = _PER_SCORE
                if FRAME_TILES:
                    one = frame_tile_id(k_lo, k_hi, fq, FRAME_BAND, HAS_DELTA)
                if one != _PER_SCORE:  # one row along the keys, masked as delta_a masks
                    dA = tl.where(valid, frame_vector(fk[None, :], one, d_base, stride_deltam, gauss_coef,
                                                      HAS_DELTA), 0.0)
                else:
                    dA = delta_a(fq, fk, valid, d_base + fq[:, None] * stride_deltam, gauss_coef, HAS_DELTA, True)
            else:
                dA = delta_a(offs_m, offs_n, valid, d_base + offs_m[:, None] * stride_deltam, gauss_coef,
                             HAS_DELTA)
            s_reg = bias(s, bias_max, dA, strength)
            if HAS_FRAMES or HAS_KEY_MASK:
                s_reg = tl.where(valid, s_reg, float("-inf"))
        p = exp(s_reg - lse[:, None])
        if REGULARIZE:
            p = p * tl.load(AUX + row * _AUX_N + _AUX_NORM, mask=row_ok, other=1.0)[:, None]
        dv_acc += mma(tl.trans(cast(p, do.dtype)), do, PRECISION)
        dp = mma(do, tl.trans(v), PRECISION)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            if DELTA_GRAD:
                if HAS_FRAMES:
                    tl.atomic_add(DDELTA + fq[:, None] * NUM_FRAMES + fk[None, :], (strength * bias_max)[:, None] * ds,
                                  mask=valid & (fq[:, None] >= 0) & (fk[None, :] >= 0))
                else:
                    tl.store(DDELTA + row[:, None] * NK + offs_n[None, :], (strength * bias_max)[:, None] * ds,
                             mask=valid)
            share = tl.load(AUX + row * _AUX_N + _AUX_SHARE, mask=row_ok, other=0.0)
            row_max = tl.load(AUX + row * _AUX_N + _AUX_MAX, mask=row_ok, other=0.0)
            ds = ds + tl.where(valid & (s == row_max[:, None]), share[:, None], 0.0)
        dk += mma(tl.trans(cast(ds, q.dtype)), q, PRECISION)
    store_tile(DK, seq * NK + offs_n, HEAD_DIM, offs_d, 1, dk * scale, col_in, HEAD_DIM)
    store_tile(DV, seq * NK + offs_n, HEAD_DIM_V, offs_dv, 1, dv_acc, col_in, HEAD_DIM_V)


# --------------------------------------------------------------------------- configs

def _packed_configs():
    return [triton.Config({"ROWS": rows}, num_warps=w, num_stages=1) for rows in (16, 32, 64, 128) for w in (4, 8)]


def _prune_packed(configs, named_args, **kwargs):
    """The configs that can run (a whole sequence per program) and keep their tiles small.

    Five (SEQS x SEG_Q x SEG_K) float32 tiles live at once (S', P, dP, dS, dA): for wide heads
    a program holds at most 64 rows (or one sequence, whichever is more), and a 32-row program
    runs on at most 4 warps (tools/perf/kernel-log.md, v3).
    """
    named_args = {**named_args, **kwargs}  # the autotuner passes constexprs in kwargs
    seg = named_args["SEG_MAX"]
    wide = max(named_args["BLOCK_D"], named_args["BLOCK_DV"]) > 64
    keep = [c for c in configs if not (c.kwargs["ROWS"] < seg or (wide and c.kwargs["ROWS"] > max(64, seg))
                                       or (c.kwargs["ROWS"] <= 32 and c.num_warps > 4))]
    if "Q" in named_args and named_args["Q"].element_size() == 4:
        # float32 Q, K, V and dO tiles, each split in two for the tf32x3 dot: at most 128 words a
        # thread (ROWS = 128 on 4 warps spilled 1.2 KB, D 40, sm_80 and sm_90)
        keep = fewest_words(keep, 2 * (named_args["BLOCK_D"] + named_args["BLOCK_DV"]), 128)
    return keep


def _tiled_configs():
    """Each tile on 4 and 8 warps, then the 16-key tiles, for float32 inputs only (`_prune_tiled`)."""
    blocks = ((32, 32), (32, 64), (64, 32), (64, 64), (32, 128), (128, 32), (64, 128), (128, 64))
    tiles = [(bm, bn, w) for bm, bn in blocks for w in (4, 8)] + [(32, 16, 4), (32, 16, 8), (16, 16, 2), (16, 16, 4)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=2) for bm, bn, w in tiles]


def _row_words(c, block_d):
    """32-bit words a thread holds for the rows either pass keeps across its walk: per query row
    Q, dO and the float32 dQ and sum P K (dQ pass), per key K, V, dK, dV (dK/dV pass)."""
    return (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * block_d / (32 * c.num_warps)


def _prune_tiled(configs, named_args, **kwargs):
    """The configs whose dQ pass and dK/dV pass (run with the same config) ptxas keeps out of local
    memory on sm_80 and sm_90 (tools/perf/kernel-log.md: v3b, "Arch-aware pruning", "float32 on tensor
    cores").

    A (BLOCK_M x BLOCK_N) score tile may take at most 8 float32 words a thread (several live at
    once), at most 32 x 32 with a custom delta (its tile is one more); the rows either pass keeps
    across its walk at most 32 words a thread (`_row_words`); and BLOCK_N <= BLOCK_M (at 32 x 64
    the dK/dV pass spills on sm_80 where 64 x 32 does not). Head dims over 128 meet none of this:
    there the configs with the fewest row words are kept, on any GPU (16-bit: 32 x 32 on 8 warps;
    float32: 32 x 16 on 8 warps; they spill, least). Per arch (`_jit.target_sm`), 16-bit inputs at
    head dims up to 64: sm_90 keeps 64 x 32 on 8 warps only, a custom delta included; sm_8x drops
    64 x 32 for frame ids; any other GPU keeps the list as it is. float32 inputs take 16-key tiles,
    which only they use: 16 x 16 on 2 or 4 warps, and on any GPU but sm_90 also 32 x 16.
    """
    named_args = {**named_args, **kwargs}  # the autotuner passes constexprs in kwargs
    block_d = max(named_args["BLOCK_D"], named_args["BLOCK_DV"])
    sm = target_sm(named_args["Q"])
    narrow_16 = named_args["Q"].element_size() == 2 and block_d <= 64
    hopper = sm == 90 and narrow_16
    max_tile = (2048 if hopper else 1024) if named_args["HAS_DELTA"] else 8192
    single = named_args["Q"].element_size() == 4
    configs = [c for c in configs if (c.kwargs["BLOCK_N"] == 16) == single]
    keep = [c for c in configs
            if c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"] and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= max_tile
            and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 256 * c.num_warps and _row_words(c, block_d) <= 32]
    if single and sm == 90:
        keep = [c for c in keep if c.kwargs["BLOCK_M"] == 16]
    elif hopper:
        keep = [c for c in keep if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) == (64, 32, 8)] or keep
    elif narrow_16 and named_args.get("HAS_FRAMES", False) and sm is not None and 80 <= sm < 90:
        keep = [c for c in keep if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]) != (64, 32)] or keep
    if keep:
        return keep
    least = min(_row_words(c, block_d) for c in configs)
    return [c for c in configs if _row_words(c, block_d) == least]


# The tiled dK/dV pass is not tuned on its own: it runs the config the dQ pass was tuned to
# (`_dkdv_options`), so both recompute the same score tiles bit for bit and agree on the ties.
_dkdv = _tar_bwd_dkdv_kernel
# The interpreter runs one config; unequal query/key blocks make the tests cover the causal
# start of the dK/dV walk. Tests may change them to check that no result depends on the tiles.
INTERPRETER_TILES = dict(BLOCK_M=64, BLOCK_N=32)
_packed = tuned(_tar_bwd_packed_kernel, _packed_configs(), _prune_packed,
                ["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA", "REGULARIZE",
                 "DELTA_GRAD"])
_dq = tuned(_tar_bwd_dq_kernel, _tiled_configs(), _prune_tiled,
            ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA", "REGULARIZE", "HAS_FRAMES",
             "HAS_KEY_MASK", "FRAME_TILES"])


# The dQ launch and the read of the config it was tuned to, as one step: the autotuner keeps only
# its latest choice, and another thread's backward (autograd runs one per device) may launch the
# dQ pass with another key in between.
_TUNED_LAUNCH = threading.Lock()


def _dkdv_options() -> dict:
    """Tiles, warps and stages of the dQ launch just made, for the dK/dV launch."""
    if INTERPRETING:
        return dict(INTERPRETER_TILES)
    config = _dq.best_config
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


# --------------------------------------------------------------------------- launcher


def tar_backward(problem: TarProblem, out: torch.Tensor, stats: torch.Tensor, grad_out: torch.Tensor,
                 delta_grad: bool = False, grads: tuple | None = None, frame_tiles: bool = True):
    """Gradients of a Triton forward. Returns (dq, dk, dv, ddelta).

    problem: the forward's validated problem; out (B, H, Nq, Dv) its output; stats what
    `tar_forward(problem, stats=...)` filled (shape `layout.stats_shape(..., needs_grad=True)`:
    empty for the packed layout); grad_out (B, H, Nq, Dv), any strides, q's dtype.
    dq, dk, dv are contiguous in q's dtype with q/k/v's shapes (written into `grads` when given:
    three such tensors). ddelta is the float32 gradient of the (B, H, Nq, Nk) bias
    `problem.delta` (with frame ids: of the (F, F) frame matrix) when delta_grad, else None.
    Frame ids or a key mask run the tiled kernels at any length, as the forward does;
    frame_tiles=False computes their dA per score on every tile (the same gradients bit for bit,
    which the tests check), as tar_forward's frame_tiles.
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
    frame_delta = problem.frames_q is not None and problem.delta is not None
    ddelta = None
    if delta_grad:
        ddelta = torch.zeros(problem.delta.shape if frame_delta else (bh, nq, nk), device=q.device,
                             dtype=torch.float32)
    if bh == 0 or nq == 0:  # no scores: nothing depends on the inputs
        for g in grads:
            g.zero_()
        return dq, dk, dv_out, _ddelta(ddelta, frame_delta, (B, H, nq, nk))
    delta, d_strides, gauss_coef = delta_args(problem)
    meta = dict(common_meta(problem), GLOBAL_MAX=problem.max_mode == "global")
    sizes = (bh, H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)

    if is_packed(nq, nk, d, dv) and not tiled_only(problem):
        packed_meta, grid = packed_launch(problem)
        _packed[grid](q, k, v, grad_out, dq, dk, dv_out, delta, ddelta,
                      *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *d_strides, *sizes, **meta,
                      **packed_meta, DELTA_GRAD=delta_grad, VEC=vector_width(q, k, v, grad_out, *grads))
        return dq, dk, dv_out, _ddelta(ddelta, frame_delta, (B, H, nq, nk))

    if tuple(stats.shape) != (bh, nq, STATS_FIELDS):
        raise ValueError(f"stats must be the ({bh}, {nq}, {STATS_FIELDS}) statistics of the tiled forward, "
                         f"got shape {tuple(stats.shape)}")
    regularized_global = problem.regularized and problem.max_mode == "global"
    seq_max = stats[..., STAT_MAX].amax(dim=1) if regularized_global else None
    aux = torch.empty(bh, nq, layout.AUX_FIELDS, device=q.device, dtype=torch.float32)
    dq_buf, tie_k = dq, None  # global mode: float32 partial dQ and tie keys, finished below
    if regularized_global:
        dq_buf = torch.empty(bh, nq, d, device=q.device, dtype=torch.float32)
        tie_k = torch.empty(bh, nq, d, device=q.device, dtype=torch.float32)
    n_bucket = pow2(max(nq, nk))
    fq, fk, km, *km_strides, has_frames, has_key_mask = frame_args(problem)
    meta.update(HAS_FRAMES=has_frames, HAS_KEY_MASK=has_key_mask, FRAME_TILES=has_frames and frame_tiles)
    frame_band = frame_band_width(gauss_coef)
    with _TUNED_LAUNCH:
        _dq[lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),)](
            q, k, v, out, grad_out, dq_buf, delta, stats, seq_max, aux, tie_k, fq, fk, km,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(), *grad_out.stride(), *d_strides, *km_strides,
            *sizes, n_bucket, frame_band, **meta, **(INTERPRETER_TILES if INTERPRETING else {}))
        tiles = _dkdv_options()
    if regularized_global:
        # Every entry equal to the slice's max (as the dQ pass recomputed the scores) gets the same
        # share of the summed dm_i.
        row_max = aux[..., layout.AUX_MAX]
        at_max = row_max == row_max.amax(dim=1, keepdim=True)
        # (at least 1: a slice without keys has no tie, and shares 0)
        ties = (aux[..., layout.AUX_COUNT] * at_max).sum(dim=1, keepdim=True).clamp_min(1.0)
        share = torch.where(at_max, aux[..., layout.AUX_SHARE].sum(dim=1, keepdim=True) / ties, 0.0)
        aux[..., layout.AUX_SHARE] = share
        dq.copy_((dq_buf + share[..., None] * tie_k).view(q.shape))
    _dkdv[(bh * triton.cdiv(nk, tiles["BLOCK_N"]),)](
        q, k, v, grad_out, dk, dv_out, delta, ddelta, stats, seq_max, aux, fq, fk, km,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *d_strides, *km_strides, *sizes, n_bucket,
        frame_band, problem.delta.shape[0] if frame_delta else 0, DELTA_GRAD=delta_grad, **meta, **tiles)
    return dq, dk, dv_out, _ddelta(ddelta, frame_delta, (B, H, nq, nk))


def _ddelta(ddelta, frame_delta: bool, shape: tuple):
    """The delta gradient as returned: the (F, F) frame matrix's as is, the per-entry one as (B, H, Nq, Nk)."""
    return ddelta if ddelta is None or frame_delta else ddelta.view(shape)
