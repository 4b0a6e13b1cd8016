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

import warnings

import torch
import triton
import triton.language as tl

from .._problem import TarProblem
from . import layout
from ._jit import _STAT_LSE, _STAT_MAX, _STATS_N, Keys, Options, View, add_bias, bias_source, block_coords, exp, \
    f32_each, fma_each, frame_bias, frame_ids, head_cols, key_ok, key_scores, load_tile, masked_scores, mma_each, \
    mma_nt, packed_coords, packed_delta, packed_exp, packed_max, packed_qkv, packed_rows, row_dot, seq_view, \
    store_tile, zeros_each
from .launch import BWD_PACKED, BWD_TILED, common_meta, delta_args, frame_args, frame_band_width, interpreter_tiles, \
    launch_tuned, packed, packed_launch, tuned, vector_width
from .layout import STAT_MAX, STATS_FIELDS, pow2

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
    q_strides, k_strides, v_strides, do_strides, d_strides,  # each tensor's 4 strides
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    ROWS: tl.constexpr, SEG_Q: tl.constexpr, SEG_K: tl.constexpr, SEG_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # the head dims in one block each (launch.common_meta)
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr,
    REGULARIZE: tl.constexpr, DELTA_GRAD: tl.constexpr, PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load and store (launch.vector_width)
):
    """Gradients of the packed forward (ops/tar_fwd.py) for ROWS // SEG_MAX whole sequences, with
    the forward's 3-D tiles (one batched product per sequence). DQ, DK, DV are contiguous
    (B*H*Nq, D), (B*H*Nk, D), (B*H*Nk, Dv); DDELTA (B*H, Nq, Nk) float32, written with DELTA_GRAD.
    """
    SEQS: tl.constexpr = ROWS // SEG_MAX
    coords = packed_coords(BH, H, NQ, NK, SEQS, SEG_Q, SEG_K)
    b, h, i, j, row_ok, col_ok = coords
    seq = (b * H + h)[:, None]
    cols_d = head_cols(BLOCK_D, 0)
    cols_dv = head_cols(BLOCK_DV, 0)
    # V issued with Q and K, before the softmax, so that its latency hides behind the scores and the exp
    q, k, v = packed_qkv(Q, K, V, q_strides, k_strides, v_strides, coords, HEAD_DIM, HEAD_DIM_V, cols_d, cols_dv, VEC)
    do = load_tile(View(DO, 0, 1, cols_dv, do_strides[3], HEAD_DIM_V), packed_rows(do_strides, b, h, i), row_ok, VEC)
    s, valid = masked_scores(q, k, row_ok[:, :, None] & col_ok[:, None, :], i, j, scale, CAUSAL, PRECISION)

    if REGULARIZE:
        m = packed_max(s, row_ok, GLOBAL_MAX)
        tie = valid & (s == m[:, :, None])  # the entries torch.amax splits the max's gradient over
        dA = packed_delta(DELTA, d_strides, coords, valid, gauss_coef, HAS_DELTA)
        s = add_bias(s, strength * m, dA)

    p, denom = packed_exp(s, row_ok)
    p = p / denom[:, :, None]
    dp = mma_nt(do, v, PRECISION)
    ds = p * (dp - tl.sum(p * dp, 2)[:, :, None])
    dv_acc = mma_each(p, do, PRECISION, True)

    if REGULARIZE:
        if DELTA_GRAD:
            tl.store(DDELTA + ((seq * NQ + i) * NK)[:, :, None] + j, (strength * m)[:, :, None] * ds, mask=valid)
        if HAS_DELTA:  # a -inf delta entry has P = 0: no part in the max's gradient (0 * -inf is NaN)
            dA = tl.where(p == 0.0, 0.0, dA)
        dmax = strength * tl.sum(ds * dA, 2)
        count = tl.sum(tie.to(tl.float32), 2)
        if GLOBAL_MAX:
            share = (tl.sum(dmax, 1) / tl.maximum(tl.sum(count, 1), 1.0))[:, None]
        else:
            share = dmax / tl.maximum(count, 1.0)
        ds = ds + tl.where(tie, share[:, :, None], 0.0)

    dq = fma_each(mma_each(ds, k, PRECISION), scale, None)
    dk = fma_each(mma_each(ds, q, PRECISION, True), scale, None)
    store_tile(View(DQ, 0, HEAD_DIM, cols_d, 1, HEAD_DIM), seq * NQ + i, dq, row_ok, VEC)
    store_tile(View(DK, 0, HEAD_DIM, cols_d, 1, HEAD_DIM), seq * NK + j, dk, col_ok, VEC)
    store_tile(View(DV, 0, HEAD_DIM_V, cols_dv, 1, HEAD_DIM_V), seq * NK + j, dv_acc, col_ok, VEC)


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
    q_strides, k_strides, v_strides, o_strides, do_strides, d_strides, km_strides,  # each tensor's strides
    H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    FRAME_BAND,  # with HAS_FRAMES: frame ids FRAME_BAND or more apart have a Gaussian dA of exactly 0
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # the head dims in one block each (launch.common_meta)
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
    opt: tl.constexpr = Options(CAUSAL, HAS_DELTA, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES, PRECISION, 1)
    seq, mb, b, h, offs_m, row_ok = block_coords(NQ, H, BLOCK_M)
    cols_d = head_cols(BLOCK_D, 0)
    cols_dv = head_cols(BLOCK_DV, 0)
    q = load_tile(seq_view(Q, q_strides, b, h, cols_d, HEAD_DIM), offs_m, row_ok)
    do = load_tile(seq_view(DO, do_strides, b, h, cols_dv, HEAD_DIM_V), offs_m, row_ok)
    d_row = row_dot(do, load_tile(seq_view(O, o_strides, b, h, cols_dv, HEAD_DIM_V), offs_m, row_ok))
    row = seq * NQ + offs_m
    lse = tl.load(STATS + row * _STATS_N + _STAT_LSE, mask=row_ok, other=0.0)
    keys = Keys(seq_view(K, k_strides, b, h, cols_d, HEAD_DIM), seq_view(V, v_strides, b, h, cols_dv, HEAD_DIM_V),
                NK, (KMASK, b * km_strides[0], km_strides[1]), FK)
    src = bias_source(FQ, DELTA, d_strides, b, h, offs_m, row_ok, gauss_coef, FRAME_BAND, HAS_FRAMES, True)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)

    acc = zeros_each(BLOCK_M, cols_d)
    if REGULARIZE:
        bias_max = tl.load(STATS + row * _STATS_N + _STAT_MAX, mask=row_ok, other=0.0)
        if GLOBAL_MAX:
            bias_max = tl.load(SEQMAX + seq + offs_m * 0)
        dmax = tl.zeros((BLOCK_M,), tl.float32)
        p_sum = tl.zeros((BLOCK_M,), tl.float32)
        p_dp = tl.zeros((BLOCK_M,), tl.float32)
        p_da = tl.zeros((BLOCK_M,), tl.float32)
        p_k = zeros_each(BLOCK_M, cols_d)
        m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
        arg = tl.zeros((BLOCK_M,), tl.int32)
        count = tl.zeros((BLOCK_M,), tl.int32)
    for start in range(0, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        s, valid, k, v, col_in = key_scores(q, offs_m, row_ok[:, None], keys, j, scale, opt, True)
        s_reg = s
        if REGULARIZE:
            m, arg, count = _track_max(s, valid, start, m, arg, count)
            s_reg, dA = frame_bias(s, strength * bias_max, valid, src, frame_ids(FK, j, col_in, HAS_FRAMES), opt, True,
                                   True)
        p = exp(s_reg - lse[:, None])
        dp = mma_nt(do, v, PRECISION)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            if HAS_DELTA:  # as in the packed kernel: a -inf delta entry's P = 0 keeps it out of dmax and p_da
                dA = tl.where(p == 0.0, 0.0, dA)
            dmax += tl.sum(ds * dA, 1)
            p_sum += tl.sum(p, 1)
            p_dp += tl.sum(p * dp, 1)
            p_da += tl.sum(p * dA, 1)
            p_k = fma_each(mma_each(p, k, PRECISION), None, p_k)
        acc = fma_each(mma_each(ds, k, PRECISION), None, acc)

    if REGULARIZE:
        if HAS_KEY_MASK:  # a row with no key: every probability is 0
            norm = tl.where(p_sum > 0.0, 1.0 / tl.where(p_sum > 0.0, p_sum, 1.0), 0.0)
        else:
            norm = 1.0 / tl.where(row_ok, p_sum, 1.0)
        d_exact = p_dp * norm
        acc = fma_each(fma_each(p_k, (d_row - d_exact)[:, None], acc), norm[:, None], None)
        dmax = strength * norm * (dmax + (d_row - d_exact) * p_da)
        d_row = d_exact
        tl.store(AUX + row * _AUX_N + _AUX_NORM, norm, mask=row_ok)
        if tl.max(tl.where(row_ok & (count > 1), 1, 0), 0) > 0:
            tie_k = zeros_each(BLOCK_M, cols_d)
            for start in range(0, hi, BLOCK_N):
                j = start + tl.arange(0, BLOCK_N).to(tl.int64)
                s, valid, k, v, col_in = key_scores(q, offs_m, row_ok[:, None], keys, j, scale, opt, False)
                tie = valid & (s == m[:, None])
                tie_k = fma_each(mma_each(tie.to(tl.float32), k, PRECISION), None, tie_k)
        else:  # one key per row reaches the max: its arg-max
            tie_k = f32_each(load_tile(keys.k, arg.to(tl.int64), row_ok & (count > 0)))  # a row with no key: none
        if GLOBAL_MAX:
            store_tile(View(TIEK, 0, HEAD_DIM, cols_d, 1, HEAD_DIM), row, fma_each(tie_k, scale, None), row_ok)
            share = dmax  # turned into the share by the launcher
        else:
            share = dmax / tl.maximum(count, 1).to(tl.float32)
            acc = fma_each(tie_k, share[:, None], acc)
        tl.store(AUX + row * _AUX_N + _AUX_SHARE, share, mask=row_ok)
        tl.store(AUX + row * _AUX_N + _AUX_MAX, m, mask=row_ok)
        tl.store(AUX + row * _AUX_N + _AUX_COUNT, count.to(tl.float32), mask=row_ok)
    store_tile(View(DQ, 0, HEAD_DIM, cols_d, 1, HEAD_DIM), row, fma_each(acc, scale, None), row_ok)
    tl.store(AUX + row * _AUX_N + _AUX_D, d_row, mask=row_ok)


@triton.jit
def _tar_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, DELTA, DDELTA, STATS, SEQMAX, AUX, FQ, FK, KMASK,
    q_strides, k_strides, v_strides, do_strides, d_strides, km_strides,  # each tensor's strides
    H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    FRAME_BAND,  # as in the dQ pass
    NUM_FRAMES,  # the frame matrix's size F (DDELTA (F, F) with HAS_FRAMES)
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,  # the head dims in one block each (launch.common_meta)
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
    opt: tl.constexpr = Options(CAUSAL, HAS_DELTA, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES, PRECISION, 1)
    seq, nb, b, h, offs_n, col_in = block_coords(NK, H, BLOCK_N)
    col_ok = key_ok(col_in, (KMASK, b * km_strides[0], km_strides[1]), offs_n, HAS_KEY_MASK)
    cols_d = head_cols(BLOCK_D, 0)
    cols_dv = head_cols(BLOCK_DV, 0)
    k = load_tile(seq_view(K, k_strides, b, h, cols_d, HEAD_DIM), offs_n, col_ok)
    v = load_tile(seq_view(V, v_strides, b, h, cols_dv, HEAD_DIM_V), offs_n, col_in)
    q_view = seq_view(Q, q_strides, b, h, cols_d, HEAD_DIM)
    do_view = seq_view(DO, do_strides, b, h, cols_dv, HEAD_DIM_V)
    src = bias_source(FK, DELTA, d_strides, b, h, offs_n, col_in, gauss_coef, FRAME_BAND, HAS_FRAMES, False)
    dk = zeros_each(BLOCK_N, cols_d)
    dv_acc = zeros_each(BLOCK_N, cols_dv)
    lo = 0
    if CAUSAL:  # rows above this block's first key see none of its keys
        lo = (nb * BLOCK_N // BLOCK_M) * BLOCK_M
    if REGULARIZE and GLOBAL_MAX:
        seq_max = tl.load(SEQMAX + seq + tl.arange(0, BLOCK_M) * 0)
    for start in range(lo, NQ, BLOCK_M):
        offs_m = start + tl.arange(0, BLOCK_M).to(tl.int64)
        row_ok = offs_m < NQ
        row = seq * NQ + offs_m
        q = load_tile(q_view, offs_m, row_ok)
        do = load_tile(do_view, offs_m, row_ok)
        lse = tl.load(STATS + row * _STATS_N + _STAT_LSE, mask=row_ok, other=0.0)
        d_row = tl.load(AUX + row * _AUX_N + _AUX_D, mask=row_ok, other=0.0)
        s, valid = masked_scores(q, k, row_ok[:, None] & col_ok[None, :], offs_m, offs_n, scale, CAUSAL, PRECISION)
        s_reg = s
        if REGULARIZE:
            bias_max = tl.load(STATS + row * _STATS_N + _STAT_MAX, mask=row_ok, other=0.0)
            if GLOBAL_MAX:
                bias_max = seq_max
            fq = frame_ids(FQ, offs_m, row_ok, HAS_FRAMES)
            s_reg, dA = frame_bias(s, strength * bias_max, valid, src, fq, opt, False, True)
        p = exp(s_reg - lse[:, None])
        if REGULARIZE:
            p = p * tl.load(AUX + row * _AUX_N + _AUX_NORM, mask=row_ok, other=1.0)[:, None]
        dv_acc = fma_each(mma_each(p, do, PRECISION, True), None, dv_acc)
        dp = mma_nt(do, v, PRECISION)
        ds = p * (dp - d_row[:, None])
        if REGULARIZE:
            if DELTA_GRAD:
                if HAS_FRAMES:
                    tl.atomic_add(DDELTA + fq[:, None].to(tl.int64) * NUM_FRAMES + src.ids[None, :],
                                  (strength * bias_max)[:, None] * ds, mask=valid & (fq[:, None] >= 0)
                                  & (src.ids[None, :] >= 0))
                else:
                    tl.store(DDELTA + row[:, None] * NK + offs_n[None, :], (strength * bias_max)[:, None] * ds,
                             mask=valid)
            share = tl.load(AUX + row * _AUX_N + _AUX_SHARE, mask=row_ok, other=0.0)
            row_max = tl.load(AUX + row * _AUX_N + _AUX_MAX, mask=row_ok, other=0.0)
            ds = ds + tl.where(valid & (s == row_max[:, None]), share[:, None], 0.0)
        dk = fma_each(mma_each(ds, q, PRECISION, True), None, dk)
    store_tile(View(DK, 0, HEAD_DIM, cols_d, 1, HEAD_DIM), seq * NK + offs_n, fma_each(dk, scale, None), col_in)
    store_tile(View(DV, 0, HEAD_DIM_V, cols_dv, 1, HEAD_DIM_V), seq * NK + offs_n, dv_acc, col_in)


# --------------------------------------------------------------------------- launcher

_packed = tuned(_tar_bwd_packed_kernel, BWD_PACKED, ["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL",
                                                     "GLOBAL_MAX", "HAS_DELTA", "REGULARIZE", "DELTA_GRAD"])
_dq = tuned(_tar_bwd_dq_kernel, BWD_TILED, ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL",
                                           "GLOBAL_MAX", "HAS_DELTA", "REGULARIZE", "HAS_FRAMES", "HAS_KEY_MASK",
                                           "FRAME_TILES"])
# The tiled dK/dV pass is not tuned on its own: it runs the config the dQ pass was tuned to
# (`launch.launch_tuned`), so both recompute the same score tiles bit for bit and agree on the ties.
_dkdv = _tar_bwd_dkdv_kernel


def tar_backward(problem: TarProblem, out: torch.Tensor, stats: torch.Tensor, grad_out: torch.Tensor,
                 delta_grad: bool = False, grads: tuple | None = None):
    """Gradients of a Triton forward. Returns (dq, dk, dv, ddelta).

    problem: the forward's validated problem; out (B, H, Nq, Dv) its output; stats what
    `tar_forward(problem, stats=...)` filled (shape `layout.stats_shape(..., needs_grad=True)`:
    empty for the packed layout); grad_out (B, H, Nq, Dv), any strides, q's dtype.
    dq, dk, dv are contiguous in q's dtype with q/k/v's shapes (written into `grads` when given:
    three such tensors). ddelta is the float32 gradient of the (B, H, Nq, Nk) bias
    `problem.delta` (with frame ids: of the (F, F) frame matrix) when delta_grad, else None.
    Frame ids or a key mask run the tiled kernels at any length, as the forward does.
    """
    return _tar_backward(problem, out, stats, grad_out, delta_grad, grads, {})


def _alert_atomic_sum() -> None:
    """As torch's nondeterministic CUDA ops under torch.use_deterministic_algorithms: an error (a warning with
    warn_only=True), for the frame matrix's gradient, summed with atomic adds in an order that may vary."""
    if torch.are_deterministic_algorithms_enabled():
        message = ("tar_attention's backward sums the frame matrix's gradient (frames= with delta=) with atomic adds "
                   "on CUDA, in an order that may vary between runs: no deterministic implementation, but "
                   "torch.use_deterministic_algorithms(True) is set")
        if not torch.is_deterministic_algorithms_warn_only_enabled():
            raise RuntimeError(message)
        warnings.warn(message, UserWarning, stacklevel=2)


def _tar_backward(problem: TarProblem, out: torch.Tensor, stats: torch.Tensor, grad_out: torch.Tensor,
                  delta_grad: bool, grads: tuple | None, variant: dict):
    """tar_backward, the tiled kernels' constexprs overridden by `variant`: the tests' FRAME_TILES=False
    computes the frame ids' dA per score on every tile (the same gradients bit for bit)."""
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
        if frame_delta and q.is_cuda:
            _alert_atomic_sum()
        ddelta = torch.zeros(problem.delta.shape if frame_delta else (bh, nq, nk), device=q.device,
                             dtype=torch.float32)
    if bh == 0 or nq == 0:  # no scores: nothing depends on the inputs
        for g in grads:
            g.zero_()
        return dq, dk, dv_out, _ddelta(ddelta, frame_delta, (B, H, nq, nk))
    delta, d_strides, gauss_coef = delta_args(problem)
    meta = dict(common_meta(problem, chunked=False), GLOBAL_MAX=problem.max_mode == "global")
    sizes = (H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)

    if packed(problem):
        packed_meta, grid = packed_launch(problem)
        _packed[grid](q, k, v, grad_out, dq, dk, dv_out, delta, ddelta, q.stride(), k.stride(), v.stride(),
                      grad_out.stride(), d_strides, bh, *sizes, **meta, **packed_meta, DELTA_GRAD=delta_grad,
                      VEC=vector_width(q, k, v, grad_out, *grads))
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
    fq, fk, km, km_strides, frame_meta = frame_args(problem)
    meta.update(frame_meta, **variant)
    frame_band = frame_band_width(gauss_coef)
    tiles = launch_tuned(_dq, lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),), "backward",
                         q, k, v, out, grad_out, dq_buf, delta, stats, seq_max, aux, tie_k, fq, fk, km, q.stride(),
                         k.stride(), v.stride(), out.stride(), grad_out.stride(), d_strides, km_strides, *sizes,
                         frame_band, pow2(max(nq, nk)), **meta, **interpreter_tiles("backward"))
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
        q, k, v, grad_out, dk, dv_out, delta, ddelta, stats, seq_max, aux, fq, fk, km, q.stride(), k.stride(),
        v.stride(), grad_out.stride(), d_strides, km_strides, *sizes, frame_band,
        problem.delta.shape[0] if frame_delta else 0, DELTA_GRAD=delta_grad, **meta, **tiles)
    return dq, dk, dv_out, _ddelta(ddelta, frame_delta, (B, H, nq, nk))


def _ddelta(ddelta, frame_delta: bool, shape: tuple):
    """The delta gradient as returned: the (F, F) frame matrix's as is, the per-entry one as (B, H, Nq, Nk)."""
    return ddelta if ddelta is None or frame_delta else ddelta.view(shape)
