"""Fused TAR forward kernels (Triton).

Two layouts, one semantics (see docs/semantics.md):

* packed: Nq, Nk <= SHORT_MAX. Several (batch, head) sequences share one
  program as the slices of 3-D tiles, with one batched Q K^T and P V product per
  sequence, so N = 16..64 neither leaves a tile mostly padding nor multiplies
  across sequences. The whole row is in registers: exact max, bias, softmax, PV
  in one pass.
* tiled: longer sequences. One program per (sequence, BLOCK_M query rows).
  For the row max with the Gaussian, one pass: the key tiles where dA is exactly
  0 in float32 (outside the band, `band_width`) run first as a plain online
  softmax, whose running max is part of m_i; a QK^T walk of the band tiles
  completes m_i, and the band tiles join the softmax with the bias. A custom
  delta walks every key tile for m_i first (two passes). For max_mode="global" a
  pre-pass kernel writes the row maxima, torch reduces them per sequence, and the
  main pass reads it. When the call will be differentiated (`stats` given) the tiled kernels also
  write O(B H N) row statistics for ops/tar_bwd.py (layout.STATS_FIELDS); the
  packed layout saves nothing, its backward recomputes whole rows.

The Gaussian dA is computed from (i, j) in registers (with frame ids, from the
int32 ids of the block's rows and of each key tile); only a user-supplied
delta (or frame matrix) is read from memory. Frame ids and key masks run the
tiled layout at every length, in two passes (`_tar_fwd_tiled_kernel`). Nothing
N x N is written. Offsets are int64 and the whole (batch x heads) axis is on grid
axis 0.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._problem import TarProblem
from ._jit import _PER_SCORE, _STAT_LSE, _STAT_MAX, _STATS_N, INTERPRETING, add_bias, band_width, bias, \
    block_coords, cast, common_meta, delta_a, delta_args, frame_args, frame_band_width, frame_span, frame_tile_id, \
    frame_vector, interpreter_rows, key_ok, load_tile, masked_scores, max_nan, mma, nanmax, packed_coords, \
    packed_exp, packed_max, packed_segments, store_tile, target_sm, tiled_only, vector_width
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

    Each sequence is one slice of 3-D tiles: SEG_Q query rows x SEG_K key columns
    (packed_segments), and Q K^T and P V are batched products, one per sequence, so no FLOP is
    spent between sequences and a NaN/inf in one sequence's v cannot reach another's rows. Each
    row is whole in registers, so the max (m_i per row, with GLOBAL_MAX one per sequence), the
    bias, the softmax and P @ V are exact in one pass, and nothing is saved for the backward.
    Q (B, H, Nq, D), K (B, H, Nk, D), V (B, H, Nk, Dv), O (B, H, Nq, Dv) and the custom DELTA
    (read only with HAS_DELTA, broadcast through its strides) have any strides; O is written in
    its own dtype. The grid is (cdiv(B*H, ROWS // SEG_MAX),).
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
    without it every key of every tile is valid and no mask is computed (padding query rows,
    whose q is 0, then see finite scores and are never stored). BIAS: the scores get
    cm_i * dA_ij, cm = strength * m. exp is exp2 of the score times log2(e) minus the row's
    max times log2(e): one FMA per score.

    HAS_FRAMES: dA from the rows' frame ids fq and the keys' FK (int32, -1 outside the video;
    d_base then points at the frame matrix's rows fq). With FRAME_TILES a key tile whose ids are
    all one frame (or all -1), or whose every video key is FRAME_BAND frames or more from every
    video row of the block (q_lo, q_hi: frame_span of fq), takes dA as one column
    (_jit.frame_tile_id, frame_vector): one value per row instead of one Gaussian (or
    frame-matrix load) per score, the same dA bit for bit. HAS_KEY_MASK (with MASK): the
    keys KMASK (uint8, + km_base) drops are masked, and a row with no key so far keeps
    run_max = -inf with denom = 0 (its exponent is taken from 0). With either, masked entries
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

    The key tiles split into the band, the tiles holding a key within BAND of one of the block's
    rows, and the rest, where the Gaussian's dA is exactly 0 in float32 (`band_width`) and the
    biased scores are the plain ones. The off-band tiles run first, an online softmax of plain
    scores without masks (the last partial tile peeled off with them); then the band tiles with
    the bias. m_i needs the whole row: with ONE_PASS (max_mode="row", Gaussian) it is the
    off-band tiles' running max and a QK^T walk of the band tiles only, so K's off-band tiles
    are read once; without it (the same order, checked bit for bit against ONE_PASS) a QK^T walk
    of every tile comes first and the off-band tiles get the bias too. A custom delta or the
    global max (m_i is the sequence's max, read from SEQMAX (float32, (B*H,)), which the launcher
    reduced from `_tar_fwd_row_max_kernel`) make the whole row the band: exact row max first,
    then the biased online softmax. Without TAR (REGULARIZE off) there is no bias: the band is
    the tiles the causal diagonal crosses, or nothing.

    A row whose strength * m_i is not finite is NaN (the definition's c * m_i * 0 off the band).
    Causal programs stop at their last visible key tile.

    Frame ids (HAS_FRAMES) run two passes in the tile order of the row-max Gaussian (BAND from the
    same sigma), so that frames = arange(N) is the call without ids bit for bit: dA_ij is the
    Gaussian of f(k_j) - f(q_i), or the frame matrix DELTA (strides (0, 0, row, column)) at
    [f(q_i), f(k_j)], 0 where an id is -1; the ids are read per block (O(N) per program). With
    FRAME_TILES, a key tile of one frame, or whose video keys are all FRAME_BAND frames or more
    from the block's video rows, gets its dA as one column (_jit.frame_tile_id). A key mask
    (HAS_KEY_MASK) makes the whole row the band. Masked keys take no part in the max or the
    softmax; a row with no key gives 0, and its saved log-sum-exp is +inf (so the backward's
    probabilities are 0).
    Q (B, H, Nq, D), K (B, H, Nk, D), V (B, H, Nk, Dv), O (B, H, Nq, Dv) and the custom DELTA
    (read only with HAS_DELTA) have any strides. With SAVE_STATS the raw row max and the
    log-sum-exp of the biased scores go to STATS (float32, (B*H, Nq, layout.STATS_FIELDS),
    contiguous) for ops/tar_bwd.py. The grid is (B*H * cdiv(Nq, BLOCK_M),).
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
        # float32 Q, K and V tiles (ROWS x (2 BLOCK_D + BLOCK_DV)), each split in two for the tf32x3
        # dot: at most 96 words a thread (ROWS = 128 on 4 warps spilled 8 bytes on sm_90, on 2 warps
        # 1.5-1.9 KB, D 40); else the configs that hold the fewest.
        words = {c: c.kwargs["ROWS"] * (2 * args["BLOCK_D"] + args["BLOCK_DV"]) / (32 * c.num_warps) for c in keep}
        least = min(words.values(), default=0)
        keep = [c for c in keep if words[c] <= max(96, least)]
    return keep


def _tiled_configs():
    return [
        triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=st)
        for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8) for st in (2, 3)
    ] + [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=w, num_stages=st)  # float32 only (_prune_tiled)
         for w, st in ((4, 2), (4, 3), (8, 2))]


def _prune_tiled(configs, named_args, **kwargs):
    """The tiled configs that compile without spills for the launch's GPU (`_jit.target_sm`;
    tools/perf/kernel-log.md: every config compiled for sm_80 and sm_90, fp16/bf16, head
    dims 64 and 128). 4 warps spill with key tiles wider than 32 on sm_80 (mma.sync), and 128 x 128
    tiles do; the bias (the row-max Gaussian's band softmax, a custom delta) and head dims above 64
    spill in tiles larger than 64 x 64, and both together with 128 rows or 4 warps on sm_80 (a
    custom delta: with key tiles wider than 32). Head dims above 128 keep 64 x 64 at most.

    Per arch: on sm_90 (wgmma) the Gaussian's bias at head dims up to 64 with 16-bit inputs also
    keeps 128 x 64 with 8 warps (no spill, up to 255 registers when saving the statistics; one exp2
    per score and one per row per 64 keys); frame ids with the Gaussian and 16-bit inputs keep
    128 x 32 with 8 warps (query blocks that read K and V half as often as 64-row ones) at head dims
    up to 128, but up to 64 on sm_8x (mma.sync; at 128 it spills 8 bytes on sm_80). On sm_8x a
    custom delta or frame ids keep key tiles of 32 (64 x 64 spills 24 bytes with a delta at D 64,
    8 bytes in a loop with frame ids saving the statistics), and the bias in 16-bit at head dims up to
    64 keeps 64 x 32 tiles with 2 stages only (3 stages spilled 16 bytes saving the statistics, 4
    warps, and 8 with a custom delta, 8 warps, at N = 256). Any other GPU keeps the list without
    these changes.

    float32 inputs (the tf32x3 dot: each Q and K operand held as two TF32 halves) take 32 x 32
    tiles (4 warps with 2 or 3 stages, 8 warps with 2), which only they use; sm_90 instead keeps
    its wgmma tiles with 32 keys and 2 stages (64 x 32, 128 x 32). At N = 256, D 64, every 64-row
    float32 tile spilled 48-104 bytes on sm_80 and 64 x 64 on sm_90 192 bytes. (Triton's autotune
    cache is per process, not per arch: a process driving GPUs of two archs keeps the configs of the
    one it tuned on first.)"""
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

if INTERPRETING:
    # The interpreter runs one config: no benchmarking of configs on CPU.
    _packed = _tar_fwd_packed_kernel
    _tiled_row_max = _tar_fwd_row_max_kernel
    _tiled = _tar_fwd_tiled_kernel
else:
    _packed = triton.autotune(
        _packed_configs(), key=["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_DV", "CAUSAL", "GLOBAL_MAX", "HAS_DELTA"],
        prune_configs_by={"early_config_prune": _prune_packed})(_tar_fwd_packed_kernel)
    _tiled_row_max = triton.autotune(
        _tiled_configs(), key=["N_BUCKET", "BLOCK_D", "CAUSAL", "SAVE_STATS", "HAS_KEY_MASK"],
        prune_configs_by={"early_config_prune": _prune_tiled})(_tar_fwd_row_max_kernel)
    _tiled = triton.autotune(
        _tiled_configs(),
        key=["N_BUCKET", "BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_DELTA", "REGULARIZE", "GLOBAL_MAX", "ONE_PASS",
             "SAVE_STATS", "HAS_FRAMES", "HAS_KEY_MASK"],
        prune_configs_by={"early_config_prune": _prune_tiled})(_tar_fwd_tiled_kernel)



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
    will be differentiated in the tiled layout (layout.stats_shape): the kernel fills it with the
    row statistics ops/tar_bwd.py reads. Without it the inference path writes nothing extra.

    Frame ids or a key mask run the tiled layout whatever the length (the packed kernel takes
    neither: `_jit.tiled_only`), in two passes, so such a call saves statistics at any length.
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
    if gaussian_row_max:  # the band; with frame ids, the same tile order in two passes
        band = band_width(gauss_coef, nq + nk)
    else:
        band = 1  # without TAR: the tiles the causal diagonal crosses
    frame_band = frame_band_width(gauss_coef)
    _tiled[grid](q, k, v, out, delta, seq_max, stats, fq, fk, km, *args[:20], *km_strides, *args[20:], band,
                 frame_band, n_bucket, GLOBAL_MAX=global_max, ONE_PASS=one_pass and one_pass_order,
                 SAVE_STATS=save_stats, HAS_FRAMES=has_frames, HAS_KEY_MASK=has_key_mask,
                 FRAME_TILES=has_frames and frame_tiles, **common, **tiles)
    return out
