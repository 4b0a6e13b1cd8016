"""Fused TAR forward kernels (Triton); what they compute is docs/semantics.md.

* packed (`layout.is_packed`: Nq, Nk <= layout.SHORT_MAX, half that above head dim 128): several
  (batch, head) sequences per program, as the slices of 3-D tiles; each row whole in registers:
  exact max, bias, softmax and P V in one pass.
  Nothing is saved: the packed backward recomputes whole rows.
* tiled (longer sequences, and frame ids or a key mask at any length): one program per
  (sequence, BLOCK_M query rows), an online softmax over key tiles; `_tar_fwd_tiled_kernel` says
  how it finds the row max. max_mode="global" (with TAR on) runs `_tar_fwd_row_max_kernel` first. With `stats`
  the tiled kernels also write O(B H N) row statistics for ops/tar_bwd.py (layout.STATS_FIELDS).

The Gaussian dA is computed in registers from positions or frame ids; only a custom delta (or
frame matrix) is read. Nothing N x N is written; offsets are int64, (batch x heads) on grid axis 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._problem import TarProblem
from ._jit import _PER_SCORE, _STAT_LSE, _STAT_MAX, _STATS_N, INTERPRETING, add_bias, band_width, bias, \
    block_coords, cast, common_meta, delta_a, delta_args, fewest_words, frame_args, frame_band_width, frame_span, \
    frame_tile_id, frame_vector, key_ok, load_tile, masked_scores, max_nan, mma, nanmax, packed_coords, packed_exp, \
    packed_launch, packed_max, store_tile, target_sm, tiled_only, tuned, vector_width
from .layout import STATS_FIELDS, is_packed, pow2


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tar_fwd_packed_kernel(
    Q, K, V, O, DELTA,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_deltab, stride_deltah, stride_deltam, stride_deltan,
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    ROWS: tl.constexpr,  # ROWS // SEG_MAX sequences per program
    SEG_Q: tl.constexpr, SEG_K: tl.constexpr, SEG_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr,
    REGULARIZE: tl.constexpr, PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load and store (_jit.vector_width)
):
    """O = softmax(S + strength * m_i * dA) V for ROWS // SEG_MAX whole (batch, head) sequences.

    Each sequence is one slice of 3-D tiles, SEG_Q query rows x SEG_K key columns, with one batched
    Q K^T and P V per sequence: no FLOP between sequences (tools/perf/kernel-log.md, v3), so a NaN
    or inf in one sequence's V cannot reach another's rows. Q (B, H, Nq, D), K (B, H, Nk, D),
    V (B, H, Nk, Dv), O (B, H, Nq, Dv) and the custom DELTA (read only with HAS_DELTA, broadcast
    through its strides) have any strides. The grid is (cdiv(B*H, ROWS // SEG_MAX),).
    """
    SEQS: tl.constexpr = ROWS // SEG_MAX
    b, h, i, j, row_ok, col_ok = packed_coords(BH, H, NQ, NK, SEQS, SEG_Q, SEG_K)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)

    q = load_tile(Q, (b * stride_qb + h * stride_qh)[:, None] + i * stride_qn, 1, offs_d, stride_qd, row_ok,
                  HEAD_DIM, VEC)
    k = load_tile(K, (b * stride_kb + h * stride_kh)[:, None] + j * stride_kn, 1, offs_d, stride_kd, col_ok,
                  HEAD_DIM, VEC)
    # issued before the softmax, so that its latency hides behind the scores and the exp
    v = load_tile(V, (b * stride_vb + h * stride_vh)[:, None] + j * stride_vn, 1, offs_dv, stride_vd, col_ok,
                  HEAD_DIM_V, VEC)
    s, valid = masked_scores(q, k, row_ok[:, :, None] & col_ok[:, None, :], i, j, scale, CAUSAL, PRECISION)

    if REGULARIZE:
        m = packed_max(s, row_ok, GLOBAL_MAX)
        d_ptrs = DELTA + (b * stride_deltab + h * stride_deltah)[:, None, None] \
            + (i * stride_deltam)[:, None] + j[None, :] * stride_deltan
        s = bias(s, m, delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA), strength)

    p, denom = packed_exp(s, row_ok)
    out = mma(cast(p, v.dtype), v, PRECISION) / denom[:, :, None]
    store_tile(O, (b * stride_ob + h * stride_oh)[:, None] + i * stride_on, 1, offs_dv, stride_od, out, row_ok,
               HEAD_DIM_V, VEC)


@triton.jit
def _row_max(q, K, k_base, stride_kn, stride_kd, offs_m, offs_d, NK, HEAD_DIM, lo, hi, m, scale,
             KMASK, km_base, stride_kmn,
             BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, PRECISION: tl.constexpr, VEC: tl.constexpr,
             HAS_KEY_MASK: tl.constexpr):
    """max(m, max_j S_ij) over the (masked) key tiles [lo, hi) for the query rows offs_m.

    The max is NaN where a score is: the global max reduces these, and must see the NaN. With
    HAS_KEY_MASK the keys the mask (KMASK + km_base, uint8) drops take no part (-inf if all do).
    """
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        col_ok = key_ok(j < NK, KMASK, km_base, j, stride_kmn, HAS_KEY_MASK)
        k = load_tile(K + k_base, j, stride_kn, offs_d, stride_kd, col_ok, HEAD_DIM, VEC)
        s, valid = masked_scores(q, k, col_ok[None, :], offs_m, j, scale, CAUSAL, PRECISION)
        m = max_nan(m, nanmax(s, 1))
    return m


@triton.jit
def _tar_fwd_row_max_kernel(
    Q, K, ROWMAX, STATS, KMASK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_kmb, stride_kmn,
    NQ, NK, H, HEAD_DIM, scale,
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, SAVE_STATS: tl.constexpr, PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load (_jit.vector_width)
    HAS_KEY_MASK: tl.constexpr,  # KMASK (uint8 (B, Nk)) drops keys: a row without keys has max -inf
):
    """Pre-pass of max_mode="global" in the tiled layout: the exact row max m_i of S for BLOCK_M query rows.

    Writes m_i to ROWMAX (float32, (B*H, Nq), contiguous), which the launcher reduces to one max
    per (batch, head) for `_tar_fwd_tiled_kernel`; with SAVE_STATS also to the layout.STAT_MAX
    field of STATS (float32, (B*H, Nq, layout.STATS_FIELDS), contiguous) for the backward.
    Q (B, H, Nq, D) and K (B, H, Nk, D) any strides; the grid is (B*H * cdiv(Nq, BLOCK_M),).
    """
    seq, mb, b, h, offs_m, row_ok = block_coords(NQ, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, stride_qd, row_ok, HEAD_DIM, VEC)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)
    m = _row_max(q, K, b * stride_kb + h * stride_kh, stride_kn, stride_kd, offs_m, offs_d, NK, HEAD_DIM, 0, hi,
                 tl.full((BLOCK_M,), float("-inf"), tl.float32), scale, KMASK, b * stride_kmb, stride_kmn,
                 BLOCK_N, CAUSAL, PRECISION, VEC, HAS_KEY_MASK)
    row = seq * NQ + offs_m
    tl.store(ROWMAX + row, m, mask=row_ok)
    if SAVE_STATS:
        tl.store(STATS + row * _STATS_N + _STAT_MAX, m, mask=row_ok)


@triton.jit
def _softmax_tiles(q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv,
                   row_ok, NK, HEAD_DIM, HEAD_DIM_V, lo, hi, scale, run_max, denom, acc,
                   cm, d_base, stride_deltan, gauss_coef, fq, FK, KMASK, km_base, stride_kmn, q_lo, q_hi, FRAME_BAND,
                   BLOCK_N: tl.constexpr, MASK: tl.constexpr, BIAS: tl.constexpr, CAUSAL: tl.constexpr,
                   HAS_DELTA: tl.constexpr, PRECISION: tl.constexpr, VEC: tl.constexpr,
                   HAS_FRAMES: tl.constexpr, HAS_KEY_MASK: tl.constexpr, FRAME_TILES: tl.constexpr):
    """The online softmax of the key tiles [lo, hi): (run_max, denom, acc) updated.

    MASK: the tiles may hold keys past NK or above the causal diagonal (the scores are masked);
    without it no mask is computed (padding query rows, whose q is 0, see finite scores and are
    never stored). BIAS: the scores get cm_i * dA_ij, cm = strength * m. exp is exp2 of the score
    times log2(e) minus the row's max times log2(e): one FMA per score.

    HAS_FRAMES: dA from the rows' frame ids fq and the keys' FK (d_base then points at the frame
    matrix's rows fq); with FRAME_TILES a key tile whose dA is one column (`_jit.frame_tile_id`,
    q_lo and q_hi the `frame_span` of fq) takes it as one value per row, bit for bit the same.
    HAS_KEY_MASK (with MASK): the keys KMASK (uint8, + km_base) drops are masked; a row with no
    key so far keeps run_max = -inf and denom = 0. With HAS_FRAMES or HAS_KEY_MASK masked entries
    stay -inf after the bias whatever cm is (a row without keys has m = -inf).
    """
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        if MASK:
            col_in = j < NK
            col_ok = key_ok(col_in, KMASK, km_base, j, stride_kmn, HAS_KEY_MASK)
            k = load_tile(K + k_base, j, stride_kn, offs_d, stride_kd, col_ok, HEAD_DIM, VEC)
            s, valid = masked_scores(q, k, col_ok[None, :] & row_ok[:, None], offs_m, j, scale, CAUSAL, PRECISION)
        else:
            col_ok = tl.full((BLOCK_N,), 1, tl.int1)
            col_in = col_ok
            k = load_tile(K + k_base, j, stride_kn, offs_d, stride_kd, col_ok, HEAD_DIM, VEC)
            s = mma(q, tl.trans(k), PRECISION) * scale
            valid = col_ok[None, :]
        if BIAS:
            if HAS_FRAMES:
                fk = tl.load(FK + j, mask=j < NK, other=-1)
                one = _PER_SCORE
                if FRAME_TILES:
                    one = frame_tile_id(q_lo, q_hi, fk, FRAME_BAND, HAS_DELTA)
                if one != _PER_SCORE:  # dA as one column (frame_tile_id)
                    s = add_bias(s, cm, frame_vector(fq[:, None], one, d_base, stride_deltan, gauss_coef, HAS_DELTA))
                else:
                    dA = delta_a(fq, fk, valid, d_base + fk[None, :] * stride_deltan, gauss_coef, HAS_DELTA, True)
                    s = add_bias(s, cm, dA)
            else:
                dA = delta_a(offs_m, j, valid, d_base + j[None, :] * stride_deltan, gauss_coef, HAS_DELTA)
                s = add_bias(s, cm, dA)
            if HAS_FRAMES or HAS_KEY_MASK:
                s = tl.where(valid, s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        if MASK:
            new_max = tl.where(row_ok, new_max, 0.0)  # padding rows are all -inf here
        m2 = new_max * 1.4426950408889634
        if HAS_KEY_MASK:  # a row without keys so far: every p is 0
            m2 = tl.where(new_max == float("-inf"), 0.0, m2)
        alpha = tl.exp2(run_max * 1.4426950408889634 - m2)
        p = tl.exp2(s * 1.4426950408889634 - m2[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        # every key's v, masked or not, as the definition's P @ V (weight 0 for a masked key)
        v = load_tile(V + v_base, j, stride_vn, offs_dv, stride_vd, col_in, HEAD_DIM_V, VEC)
        acc = acc * alpha[:, None] + mma(cast(p, v.dtype), v, PRECISION)
        run_max = new_max
    return run_max, denom, acc


@triton.jit
def _tar_fwd_tiled_kernel(
    Q, K, V, O, DELTA, SEQMAX, STATS, FQ, FK, KMASK,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    stride_deltab, stride_deltah, stride_deltam, stride_deltan,
    stride_kmb, stride_kmn,
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    BAND,  # keys with |j - i| >= BAND are outside the band (see `band_width`); unused with a whole band
    FRAME_BAND,  # with HAS_FRAMES: frame ids FRAME_BAND or more apart have a Gaussian dA of exactly 0
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    GLOBAL_MAX: tl.constexpr,  # read m_i from SEQMAX (one per sequence) instead of computing the row max
    ONE_PASS: tl.constexpr,  # row max of the Gaussian: m_i from the off-band softmax's running max + the band
    SAVE_STATS: tl.constexpr,  # write the row statistics of layout.STATS_FIELDS to STATS
    PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load and store (_jit.vector_width)
    HAS_FRAMES: tl.constexpr,  # dA from the frame ids FQ (Nq,) and FK (Nk,), int32, -1 outside the video
    HAS_KEY_MASK: tl.constexpr,  # KMASK (uint8 (B, Nk), nonzero = attend) drops keys
    FRAME_TILES: tl.constexpr,  # with HAS_FRAMES: dA per key tile where it is one column (_jit.frame_tile_id)
):
    """O = softmax(S + strength * m_i * dA) V for BLOCK_M query rows of one (batch, head) sequence.

    The key tiles split into the band (a key within BAND of one of the block's rows) and the rest,
    where the Gaussian's dA is exactly 0 in float32 (`band_width`). The off-band tiles run first,
    a plain online softmax without masks (the partial last tile peeled off), then the band tiles
    with the bias. ONE_PASS (max_mode="row", Gaussian): m_i is the off-band running max completed
    by a QK^T walk of the band tiles; without it a QK^T walk of every tile comes first and the
    off-band tiles get the bias too, in the same tile order (bit for bit the same, tested). A
    custom delta, the global max (m_i read from SEQMAX, float32 (B*H,), which the launcher reduces
    from `_tar_fwd_row_max_kernel`) or a key mask make the whole row the band; without REGULARIZE
    the band is the tiles the causal diagonal crosses, or none. A row whose strength * m_i is not
    finite is NaN (the definition's c * m_i * 0 off the band). Causal programs stop at their last
    visible key tile.

    Frame ids run two passes in the row-max Gaussian's tile order, so that frames = arange(N) is
    the call without ids bit for bit; DELTA, if any, is then the (F, F) frame matrix (strides
    (0, 0, row, column)), dA as `_jit.delta_a` with FRAMES. Masked keys take no part; a row with no
    key gives 0 and saves a log-sum-exp of +inf (the backward's probabilities are then 0).
    Q (B, H, Nq, D), K (B, H, Nk, D), V (B, H, Nk, Dv), O (B, H, Nq, Dv) and DELTA (read only with
    HAS_DELTA) have any strides. With SAVE_STATS the log-sum-exp of the biased scores goes to STATS
    (float32, contiguous (B*H, Nq, layout.STATS_FIELDS)), and so does the raw row max: this kernel
    writes it for the row max with TAR on and 0 without TAR; `_tar_fwd_row_max_kernel` writes it for
    the global max. The grid is (B*H * cdiv(Nq, BLOCK_M),).
    """
    WHOLE: tl.constexpr = (REGULARIZE and (GLOBAL_MAX or HAS_DELTA)) or HAS_KEY_MASK
    seq, mb, b, h, offs_m, row_ok = block_coords(NQ, H, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = load_tile(Q + b * stride_qb + h * stride_qh, offs_m, stride_qn, offs_d, stride_qd, row_ok, HEAD_DIM, VEC)
    k_base = b * stride_kb + h * stride_kh
    v_base = b * stride_vb + h * stride_vh
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)
    stat_row = seq * NQ + offs_m
    fq = offs_m
    q_lo = 0
    q_hi = 0
    if HAS_FRAMES:
        fq = tl.load(FQ + offs_m, mask=row_ok, other=-1)
        q_lo, q_hi = frame_span(fq)
    d_base = DELTA + b * stride_deltab + h * stride_deltah + fq[:, None] * stride_deltam
    km_base = b * stride_kmb

    # the band [band_lo, band_hi): tiles with a key j, r0 - BAND < j < r1 + BAND, for a row r0 <= i <= r1
    band_lo = 0
    band_hi = hi
    if not WHOLE:
        if REGULARIZE or CAUSAL:
            band_lo = tl.minimum(tl.maximum(mb * BLOCK_M - BAND + 1, 0) // BLOCK_N * BLOCK_N, hi)
            band_hi = tl.maximum(tl.minimum(tl.cdiv((mb + 1) * BLOCK_M - 1 + BAND, BLOCK_N) * BLOCK_N, hi), band_lo)
        else:
            band_lo = hi
    full_hi = tl.minimum(hi, NK // BLOCK_N * BLOCK_N)  # tiles below hold no key past NK

    m = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    if REGULARIZE and not ONE_PASS:
        if GLOBAL_MAX:  # the sequence's max; the row-max pre-pass saved the rows' statistic
            m = tl.load(SEQMAX + seq + offs_m * 0)
        else:
            m = _row_max(q, K, k_base, stride_kn, stride_kd, offs_m, offs_d, NK, HEAD_DIM, 0, hi, m, scale,
                         KMASK, km_base, stride_kmn, BLOCK_N, CAUSAL, PRECISION, VEC, HAS_KEY_MASK)
    cm = strength * tl.where(row_ok, m, 0.0)
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    OFF_BIAS: tl.constexpr = REGULARIZE and not ONE_PASS
    if not WHOLE:  # the off-band tiles: left of the band, then right of it, the partial last tile masked
        left = tl.minimum(band_lo, full_hi)
        run_max, denom, acc = _softmax_tiles(
            q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, row_ok,
            NK, HEAD_DIM, HEAD_DIM_V, 0, left, scale, run_max, denom, acc, cm, d_base, stride_deltan, gauss_coef,
            fq, FK, KMASK, km_base, stride_kmn, q_lo, q_hi, FRAME_BAND, BLOCK_N, False, OFF_BIAS, CAUSAL, HAS_DELTA,
            PRECISION, VEC, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES)
        run_max, denom, acc = _softmax_tiles(
            q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, row_ok,
            NK, HEAD_DIM, HEAD_DIM_V, left, band_lo, scale, run_max, denom, acc, cm, d_base, stride_deltan,
            gauss_coef, fq, FK, KMASK, km_base, stride_kmn, q_lo, q_hi, FRAME_BAND, BLOCK_N, True, OFF_BIAS, CAUSAL,
            HAS_DELTA, PRECISION, VEC, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES)
        right = tl.maximum(band_hi, full_hi)
        run_max, denom, acc = _softmax_tiles(
            q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, row_ok,
            NK, HEAD_DIM, HEAD_DIM_V, band_hi, right, scale, run_max, denom, acc, cm, d_base, stride_deltan,
            gauss_coef, fq, FK, KMASK, km_base, stride_kmn, q_lo, q_hi, FRAME_BAND, BLOCK_N, False, OFF_BIAS, CAUSAL,
            HAS_DELTA, PRECISION, VEC, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES)
        run_max, denom, acc = _softmax_tiles(
            q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, row_ok,
            NK, HEAD_DIM, HEAD_DIM_V, right, hi, scale, run_max, denom, acc, cm, d_base, stride_deltan,
            gauss_coef, fq, FK, KMASK, km_base, stride_kmn, q_lo, q_hi, FRAME_BAND, BLOCK_N, True, OFF_BIAS, CAUSAL,
            HAS_DELTA, PRECISION, VEC, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES)
    if REGULARIZE and ONE_PASS:  # the row max: the off-band scores' (their running max), then the band's
        m = _row_max(q, K, k_base, stride_kn, stride_kd, offs_m, offs_d, NK, HEAD_DIM, band_lo, band_hi,
                     run_max, scale, KMASK, km_base, stride_kmn, BLOCK_N, CAUSAL, PRECISION, VEC, HAS_KEY_MASK)
        cm = strength * tl.where(row_ok, m, 0.0)
    if SAVE_STATS:
        if REGULARIZE and not GLOBAL_MAX:
            tl.store(STATS + stat_row * _STATS_N + _STAT_MAX, m, mask=row_ok)
        elif not REGULARIZE:
            tl.store(STATS + stat_row * _STATS_N + _STAT_MAX, tl.zeros((BLOCK_M,), tl.float32), mask=row_ok)
    run_max, denom, acc = _softmax_tiles(
        q, K, V, k_base, v_base, stride_kn, stride_kd, stride_vn, stride_vd, offs_m, offs_d, offs_dv, row_ok,
        NK, HEAD_DIM, HEAD_DIM_V, band_lo, band_hi, scale, run_max, denom, acc, cm, d_base, stride_deltan,
        gauss_coef, fq, FK, KMASK, km_base, stride_kmn, q_lo, q_hi, FRAME_BAND, BLOCK_N, True, REGULARIZE, CAUSAL,
        HAS_DELTA, PRECISION, VEC, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES)
    denom = tl.where(row_ok, denom, 1.0)
    out = acc / denom[:, None]
    lse = run_max + tl.log(denom)
    if HAS_KEY_MASK:  # a row with no key: sum_j 0 * v_j (0 for finite v), as the definition says
        empty = denom == 0.0
        out = tl.where(empty[:, None], acc, out)
        lse = tl.where(empty, float("inf"), lse)
    if REGULARIZE and ONE_PASS:  # off the band the definition adds c * m_i * 0: NaN for an inf or NaN c * m_i
        finite = (cm - cm) == 0.0
        out = tl.where(finite[:, None], out, float("nan"))
        lse = tl.where(finite, lse, float("nan"))
    store_tile(O + b * stride_ob + h * stride_oh, offs_m, stride_on, offs_dv, stride_od, out, row_ok, HEAD_DIM_V,
               VEC)
    if SAVE_STATS:
        tl.store(STATS + stat_row * _STATS_N + _STAT_LSE, lse, mask=row_ok)


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
    block = max(args["BLOCK_D"], args["BLOCK_DV"])
    # Score elements per warp beyond which ptxas spills (tools.perf static, sm_90: 8192 at D = 64
    # and 4096 at D = 128 spill, 4096 and 2048 do not): 4096 at BLOCK_D <= 64, halved per doubling.
    per_warp = 4096 * 64 // max(block, 64)
    keep = []
    for c in configs:
        rows = c.kwargs["ROWS"]
        seqs = rows // seg
        if seqs < 1 or (block > 128 and rows > 64) or (rows <= 32 and c.num_warps > 4):
            continue
        if seqs * args["SEG_Q"] * args["SEG_K"] > per_warp * c.num_warps:
            continue
        # one sequence per program runs 2-D products (_jit.mma): wgmma on sm_90 from 4 warps; with
        # 2 warps the 2-D form took more registers than the batched one and spilled at D = 80
        if seqs == 1 and c.num_warps < 4:
            continue
        keep.append(c)
    if "Q" in args and args["Q"].element_size() == 4:
        # float32 Q, K and V tiles, each split in two for the tf32x3 dot: at most 96 words a thread
        # (ROWS = 128 on 4 warps spilled 8 bytes on sm_90, on 2 warps 1.5-1.9 KB, D 40)
        keep = fewest_words(keep, 2 * args["BLOCK_D"] + args["BLOCK_DV"], 96)
    return keep


def _tiled_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
    ] + [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=w, num_stages=st)  # float32 only (_prune_tiled)
         for w, st in ((4, 2), (4, 3), (8, 2))]


def _prune_tiled(configs, named_args, **kwargs):
    """The tiled configs that compile without spills for the launch's GPU (`_jit.target_sm`); the
    compiles that set these rules (sm_80 and sm_90; fp16/bf16 at head dims 64 and 128, float32 at
    64) are in tools/perf/kernel-log.md ("Pruning" in v3c, "Arch-aware pruning", "float32 on tensor
    cores").

    "The bias" here: TAR with the row max, a custom delta or frame ids (the global max's Gaussian
    without frame ids, and the row-max pre-pass, count as unbiased). Tiles of at most 128 x 64
    scores (64 x 128 too), 64 x 64 (128 x 32 too) with the bias or head dims above 64; on 4 warps
    at most 64 x 32; above head dim 128 at most 64 in each dimension. The bias above head dim 64:
    at most 64 rows, on 8 warps (a custom delta: at most 32 keys), but frame ids with the 16-bit
    Gaussian also keep 128 x 32 on 8 warps up to head dim 128, except on sm_8x. sm_90 adds 128 x 64
    on 8 warps for the 16-bit Gaussian up to head dim 64 (no spill; up to 255 registers when saving
    the statistics); sm_8x keeps at most 32 keys for the bias of a custom delta or frame ids, and
    2 stages only for the 16-bit bias in 64 x 32 tiles up to head dim 64. 4-byte inputs (float32:
    the tf32x3 or tf32 dot) take only the 32 x 32 tiles, which only they use, but on sm_90 its
    64- and 128-row tiles with at most 32 keys and 2 stages. Any other GPU keeps the list without
    the per-arch changes. (Triton's autotune cache is per process, not per arch: a process driving
    GPUs of two archs keeps the configs of the one it tuned on first.)"""
    args = {**named_args, **kwargs}
    sm = target_sm(args["Q"])
    hopper, ampere = sm == 90, sm is not None and 80 <= sm < 90
    wide = max(args["BLOCK_D"], args.get("BLOCK_DV", 0)) > 128  # the row-max pre-pass has no BLOCK_DV
    deep = max(args["BLOCK_D"], args.get("BLOCK_DV", 0)) > 64
    delta = args.get("HAS_DELTA", False)
    biased = args.get("REGULARIZE", False) and (delta or args.get("HAS_FRAMES", False)
                                                or not args.get("GLOBAL_MAX", False))
    half = args["Q"].element_size() == 2
    gaussian = biased and not delta and half
    frames_128 = gaussian and args.get("HAS_FRAMES", False) and not wide and not (ampere and deep)
    wide_keys = gaussian and hopper and not deep
    single = args["Q"].element_size() == 4
    keep = []
    for c in configs:
        bm, bn, warps = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps
        if (bm == 32) != (single and not hopper) or (single and hopper and (bn > 32 or c.num_stages > 2)):
            continue
        if wide_keys and (bm, bn, warps) == (128, 64, 8):
            keep.append(c)
            continue
        if (wide and (bm > 64 or bn > 64)) or (warps == 4 and (bm > 64 or bn > 32)):
            continue
        if ampere and biased and bn > 32 and (delta or args.get("HAS_FRAMES", False)):
            continue
        if bm * bn > (64 * 64 if biased or deep else 128 * 64):
            continue
        if biased and deep and (bm > 64 or warps == 4 or (delta and bn > 32)) \
                and not (frames_128 and (bm, bn, warps) == (128, 32, 8)):
            continue
        if ampere and biased and half and not deep and (bm, bn) == (64, 32) and c.num_stages > 2:
            continue
        keep.append(c)
    return keep


# --------------------------------------------------------------------------- launcher

# The tiled kernels' tiles in the interpreter (tests may set smaller ones).
INTERPRETER_TILES = dict(BLOCK_M=64, BLOCK_N=64)
_packed = tuned(_tar_fwd_packed_kernel, _packed_configs(), _prune_packed,
                ["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA"])
_tiled_row_max = tuned(_tar_fwd_row_max_kernel, _tiled_configs(), _prune_tiled,
                       ["N_BUCKET", "BLOCK_D", "CAUSAL", "SAVE_STATS", "HAS_KEY_MASK"])
_tiled = tuned(_tar_fwd_tiled_kernel, _tiled_configs(), _prune_tiled,
               ["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_DELTA", "REGULARIZE", "GLOBAL_MAX", "ONE_PASS",
                "SAVE_STATS", "HAS_FRAMES", "HAS_KEY_MASK"])


def tar_forward(problem: TarProblem, out: torch.Tensor | None = None,
                stats: torch.Tensor | None = None, one_pass_order: bool = True,
                frame_tiles: bool = True) -> torch.Tensor:
    """Launch the fused forward for a validated problem; returns (B, H, Nq, Dv) in q's dtype.

    one_pass_order=False runs the tiled layout's row-max Gaussian case in two passes (a QK^T walk
    of every key tile for m_i, then the softmax with the bias on every tile) in the one-pass
    kernel's tile order: the same result bit for bit, which the tests check. frame_tiles=False
    computes the frame ids' dA per score on every key tile (no per-tile column): the same result
    bit for bit, which the tests check too.

    stats: optional float32 (B*H, Nq, layout.STATS_FIELDS) buffer, contiguous, for a call that
    will be differentiated in the tiled layout (layout.stats_shape; frame ids or a key mask run the
    tiled layout at any length, `_jit.tiled_only`): the kernel fills it with the row statistics
    ops/tar_bwd.py reads. Without it the inference path writes nothing extra.
    """
    q, k, v = problem.q, problem.k, problem.v
    B, H, nq, nk, d, dv = problem.batch, problem.heads, problem.nq, problem.nk, problem.head_dim, problem.head_dim_v
    if out is None:
        out = torch.empty(problem.output_shape(), device=q.device, dtype=q.dtype)
    bh = B * H
    if bh == 0 or nq == 0:
        return out
    delta, d_strides, gauss_coef = delta_args(problem)
    common = dict(common_meta(problem), VEC=vector_width(q, k, v, out))
    args = (*q.stride(), *k.stride(), *v.stride(), *out.stride(), *d_strides,
            bh, H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)
    if is_packed(nq, nk, d, dv) and not tiled_only(problem):
        if stats is not None and stats.numel():
            raise ValueError("the packed layout saves no statistics: pass stats=None (see layout.stats_shape)")
        meta, grid = packed_launch(problem)
        _packed[grid](q, k, v, out, delta, *args, GLOBAL_MAX=problem.max_mode == "global", **common, **meta)
        return out

    save_stats = stats is not None
    if save_stats and (tuple(stats.shape) != (bh, nq, STATS_FIELDS) or stats.dtype != torch.float32
                       or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 ({bh}, {nq}, {STATS_FIELDS}) tensor, "
                         f"got {stats.dtype} {tuple(stats.shape)}")
    grid = lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),)  # noqa: E731
    tiles = dict(INTERPRETER_TILES) if INTERPRETING else {}
    n_bucket = pow2(max(nq, nk))
    global_max = problem.max_mode == "global" and problem.regularized
    seq_max = None  # read in global mode only
    fq, fk, km, *km_strides, has_frames, has_key_mask = frame_args(problem)
    if global_max:
        row_max = torch.empty(bh, nq, device=q.device, dtype=torch.float32)
        _tiled_row_max[grid](q, k, row_max, stats, km, *q.stride(), *k.stride(), *km_strides, nq, nk, H, d,
                             problem.scale, n_bucket, BLOCK_D=common["BLOCK_D"], CAUSAL=common["CAUSAL"],
                             SAVE_STATS=save_stats, PRECISION=common["PRECISION"], VEC=common["VEC"],
                             HAS_KEY_MASK=has_key_mask, **tiles)
        seq_max = row_max.amax(dim=1)
    gaussian_row_max = problem.regularized and problem.delta is None and not global_max
    one_pass = gaussian_row_max and not tiled_only(problem)
    # the band (with frame ids: the same tile order in two passes); without TAR the tiles the causal diagonal crosses
    band = band_width(gauss_coef, nq + nk) if gaussian_row_max else 1
    frame_band = frame_band_width(gauss_coef)
    _tiled[grid](q, k, v, out, delta, seq_max, stats, fq, fk, km, *args[:20], *km_strides, *args[20:], band,
                 frame_band, n_bucket, GLOBAL_MAX=global_max, ONE_PASS=one_pass and one_pass_order,
                 SAVE_STATS=save_stats, HAS_FRAMES=has_frames, HAS_KEY_MASK=has_key_mask,
                 FRAME_TILES=has_frames and frame_tiles, **common, **tiles)
    return out
