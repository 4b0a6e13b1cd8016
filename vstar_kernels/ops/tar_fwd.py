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

from .._problem import SPECULATE_TOKENS, TarProblem, speculates
from ._jit import INTERPRETING  # noqa: F401 (_load.triton_state reads it here)
from ._jit import _NO_VIDEO, _STAT_LSE, _STAT_MAX, _STATS_N, Keys, Options, View, add_bias, bias_source, \
    block_coords, div_each, fma_each, frame_bias, frame_ids, head_cols, key_scores, load_tile, masked_scores, \
    max_nan, mma_each, mma_nt, nanmax, packed_coords, packed_delta, packed_exp, packed_max, packed_qkv, packed_rows, \
    seq_view, store_tile, zeros_each
from .launch import FWD_PACKED, FWD_TILED, FWD_TILED_SPECULATIVE, band_width, common_meta, delta_args, frame_args, \
    frame_band_width, interpreter_tiles, launch_tuned, packed, packed_launch, tiled_only, tuned, vector_width
from .layout import STATS_FIELDS, pow2


# --------------------------------------------------------------------------- kernels


@triton.jit
def _tar_fwd_packed_kernel(
    Q, K, V, O, DELTA,
    q_strides, k_strides, v_strides, o_strides, d_strides,  # each tensor's 4 strides
    BH, H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    ROWS: tl.constexpr,  # ROWS // SEG_MAX sequences per program
    SEG_Q: tl.constexpr, SEG_K: tl.constexpr, SEG_MAX: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # the head dims' column chunks (layout.head_chunks)
    BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    CAUSAL: tl.constexpr, GLOBAL_MAX: tl.constexpr, HAS_DELTA: tl.constexpr,
    REGULARIZE: tl.constexpr, PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load and store (launch.vector_width)
):
    """O = softmax(S + strength * m_i * dA) V for ROWS // SEG_MAX whole (batch, head) sequences.

    Each sequence is one slice of 3-D tiles, SEG_Q query rows x SEG_K key columns, with one batched
    Q K^T and P V per sequence: no FLOP between sequences (tools/perf/kernel-log.md, v3), so a NaN
    or inf in one sequence's V cannot reach another's rows. Q (B, H, Nq, D), K (B, H, Nk, D),
    V (B, H, Nk, Dv), O (B, H, Nq, Dv) and the custom DELTA (read only with HAS_DELTA, broadcast
    through its strides) have any strides. The grid is (cdiv(B*H, ROWS // SEG_MAX),).
    """
    SEQS: tl.constexpr = ROWS // SEG_MAX
    coords = packed_coords(BH, H, NQ, NK, SEQS, SEG_Q, SEG_K)
    b, h, i, j, row_ok, col_ok = coords
    # V issued with Q and K, before the softmax, so that its latency hides behind the scores and the exp
    cols_dv = head_cols(BLOCK_DV, BLOCK_DV2)
    q, k, v = packed_qkv(Q, K, V, q_strides, k_strides, v_strides, coords, HEAD_DIM, HEAD_DIM_V,
                         head_cols(BLOCK_D, BLOCK_D2), cols_dv, VEC)
    s, valid = masked_scores(q, k, row_ok[:, :, None] & col_ok[:, None, :], i, j, scale, CAUSAL, PRECISION)
    if REGULARIZE:
        m = packed_max(s, row_ok, GLOBAL_MAX)
        dA = packed_delta(DELTA, d_strides, coords, valid, gauss_coef, HAS_DELTA)
        s = add_bias(s, strength * m, dA)

    p, denom = packed_exp(s, row_ok)
    out = div_each(mma_each(p, v, PRECISION), denom[:, :, None])
    store_tile(View(O, 0, 1, cols_dv, o_strides[3], HEAD_DIM_V), packed_rows(o_strides, b, h, i), out, row_ok, VEC)


@triton.jit
def _row_max(q, rows, keys, lo, hi, m, scale, BLOCK_N: tl.constexpr, opt):
    """max(m, max_j S_ij) over the (masked) key tiles [lo, hi) for the query rows `rows`.

    The max is NaN where a score is: the global max reduces these, and must see the NaN. With
    opt.HAS_KEY_MASK the keys the mask drops take no part (-inf if all do).
    """
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        s = key_scores(q, rows, True, keys, j, scale, opt, False)[0]
        m = max_nan(m, nanmax(s, 1))
    return m


@triton.jit
def _guess_max(q, rows, keys, src, hi, scale, BLOCK_N: tl.constexpr, opt):
    """The speculative row max (frame ids): max_j S_ij over the key tiles [0, hi) that hold a text key
    or a key whose frame lies in the block's span [src.lo, src.hi], with _row_max's tiles and arithmetic,
    so at most the row max and equal to it unless a larger score lies in a tile not walked. 0 for a
    block with no video row: a text row's dA is 0, so its m_i matters only where it is not finite,
    which `_tar_fwd_tiled_kernel` flags."""
    m = tl.zeros(rows.shape, tl.float32)
    if src.lo <= src.hi:
        m = tl.full(rows.shape, float("-inf"), tl.float32)
        for start in range(0, hi, BLOCK_N):
            j = start + tl.arange(0, BLOCK_N).to(tl.int64)
            ids = tl.load(keys.ids + j, mask=j < keys.n, other=-2)
            t_lo = tl.min(tl.where(ids >= 0, ids, _NO_VIDEO), 0)
            text = tl.max((ids == -1).to(tl.int32), 0) > 0
            if text | ((t_lo <= src.hi) & (tl.max(ids, 0) >= src.lo)):
                m = max_nan(m, nanmax(key_scores(q, rows, True, keys, j, scale, opt, False)[0], 1))
    return m


@triton.jit
def _tar_fwd_row_max_kernel(
    Q, K, ROWMAX, STATS, KMASK,
    q_strides, k_strides, km_strides,
    NQ, NK, H, HEAD_DIM, scale,
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # the head dim's column chunks (layout.head_chunks)
    CAUSAL: tl.constexpr, SAVE_STATS: tl.constexpr, PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load (launch.vector_width)
    HAS_KEY_MASK: tl.constexpr,  # KMASK (uint8 (B, Nk)) drops keys: a row without keys has max -inf
):
    """Pre-pass of max_mode="global" in the tiled layout: the exact row max m_i of S for BLOCK_M query rows.

    Writes m_i to ROWMAX (float32, (B*H, Nq), contiguous), which the launcher reduces to one max
    per (batch, head) for `_tar_fwd_tiled_kernel`; with SAVE_STATS also to the layout.STAT_MAX
    field of STATS (float32, (B*H, Nq, layout.STATS_FIELDS), contiguous) for the backward.
    Q (B, H, Nq, D) and K (B, H, Nk, D) any strides; the grid is (B*H * cdiv(Nq, BLOCK_M),).
    """
    opt: tl.constexpr = Options(CAUSAL, False, False, HAS_KEY_MASK, False, PRECISION, VEC)
    seq, mb, b, h, offs_m, row_ok = block_coords(NQ, H, BLOCK_M)
    cols_d = head_cols(BLOCK_D, BLOCK_D2)
    q = load_tile(seq_view(Q, q_strides, b, h, cols_d, HEAD_DIM), offs_m, row_ok, VEC)
    keys = Keys(seq_view(K, k_strides, b, h, cols_d, HEAD_DIM), None, NK, (KMASK, b * km_strides[0], km_strides[1]),
                None)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)
    m = _row_max(q, offs_m, keys, 0, hi, tl.full((BLOCK_M,), float("-inf"), tl.float32), scale, BLOCK_N, opt)
    row = seq * NQ + offs_m
    tl.store(ROWMAX + row, m, mask=row_ok)
    if SAVE_STATS:
        tl.store(STATS + row * _STATS_N + _STAT_MAX, m, mask=row_ok)


@triton.jit
def _softmax_tiles(state, q, rows, row_ok, keys, src, c, lo, hi, scale, BLOCK_N: tl.constexpr, MASK: tl.constexpr,
                   BIAS: tl.constexpr, opt, SPECULATE: tl.constexpr = False, TAKE: tl.constexpr = 0, band=None):
    """The online softmax of the key tiles [lo, hi): state = (run_max, denom, acc) updated.

    MASK: the tiles may hold keys past keys.n or above the causal diagonal (the scores are masked);
    without it no mask is computed (padding query rows, whose q is 0, see finite scores and are
    never stored). BIAS: the scores get c_i * dA_ij (`frame_bias`, src the block's BiasSource), c =
    strength * m. exp is exp2 of the score times log2(e) minus the row's max times log2(e): one FMA
    per score. With opt.HAS_KEY_MASK (and MASK) the keys the mask drops are masked; a row with no
    key so far keeps run_max = -inf and denom = 0. SPECULATE: state[3] keeps the running max of the
    unbiased scores. TAKE (the redo kernel, rows of several query blocks): each row takes only the
    tiles outside (1) or inside (2) its block's band, band = (lo, hi, end) per row; the tiles it does
    not take are all -inf for it (p = 0) and its alpha is set to 1, which leaves its state unchanged
    bit for bit (on a GPU alpha of an unchanged max, exp2 of a contracted run_max * log2(e) - m2, need
    not be 1; a select of the whole state instead costs the redo's loop at 128 x 64 on sm_90 0.21
    warp-instructions a score and 260 B of spills); an inf or NaN in v there still reaches it through
    0 * inf, as docs/semantics.md allows for rows sharing a tile with that key.
    """
    run_max, denom, acc, raw = state
    for start in range(lo, hi, BLOCK_N):
        j = start + tl.arange(0, BLOCK_N).to(tl.int64)
        take = row_ok
        if TAKE == 1:
            take = row_ok & ((start < band[0]) | (start >= band[1])) & (start < band[2])
        elif TAKE == 2:
            take = row_ok & (start >= band[0]) & (start < band[1])
        if MASK:
            s, valid, k, v, col_in = key_scores(q, rows, take[:, None], keys, j, scale, opt, False)
        else:
            col_in = tl.full((BLOCK_N,), 1, tl.int1)
            s = mma_nt(q, load_tile(keys.k, j, col_in, opt.VEC), opt.PRECISION) * scale
            valid = col_in[None, :]
        if SPECULATE:
            raw = tl.maximum(raw, tl.max(s, 1))
        if BIAS:
            s = frame_bias(s, c, valid, src, frame_ids(keys.ids, j, j < keys.n, opt.HAS_FRAMES), opt, True, False)[0]
        new_max = tl.maximum(run_max, tl.max(s, 1))
        if MASK:
            new_max = tl.where(row_ok, new_max, 0.0)  # padding rows are all -inf here
        # a row whose scores so far are all -inf (keys masked, or -inf in the inputs): every p and alpha is 0,
        # not exp2(-inf - -inf) = NaN
        m2 = tl.where(new_max == float("-inf"), 0.0, new_max * 1.4426950408889634)
        alpha = tl.exp2(run_max * 1.4426950408889634 - m2)
        p = tl.exp2(s * 1.4426950408889634 - m2[:, None])
        if TAKE != 0:  # p is 0 for a row that does not take the tile; its alpha is made 1 (see above)
            alpha = tl.where(take, alpha, 1.0)
        denom = denom * alpha + tl.sum(p, 1)
        # every key's v, masked or not, as the definition's P @ V (weight 0 for a masked key)
        v = load_tile(keys.v, j, col_in, opt.VEC)
        acc = fma_each(acc, alpha[:, None], mma_each(p, v, opt.PRECISION))
        run_max = new_max
    return run_max, denom, acc, raw


@triton.jit
def _tar_fwd_tiled_kernel(
    Q, K, V, O, DELTA, SEQMAX, STATS, FQ, FK, KMASK,
    COUNT, LIST, MAXES,  # with SPECULATE: the rows to redo, per query block (`_tar_fwd_redo_kernel`)
    q_strides, k_strides, v_strides, o_strides, d_strides, km_strides,  # each tensor's strides
    H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef,
    BAND,  # keys with |j - i| >= BAND are outside the band (see `band_width`); unused with a whole band
    FRAME_BAND,  # with HAS_FRAMES: frame ids FRAME_BAND or more apart have a Gaussian dA of exactly 0
    N_BUCKET,  # autotune key only
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr,  # the head dims' column chunks (layout.head_chunks)
    BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_DELTA: tl.constexpr, REGULARIZE: tl.constexpr,
    GLOBAL_MAX: tl.constexpr,  # read m_i from SEQMAX (one per sequence) instead of computing the row max
    ONE_PASS: tl.constexpr,  # row max of the Gaussian: m_i from the off-band softmax's running max + the band
    SAVE_STATS: tl.constexpr,  # write the row statistics of layout.STATS_FIELDS to STATS
    PRECISION: tl.constexpr,
    VEC: tl.constexpr,  # head-dim entries per vector load and store (launch.vector_width)
    HAS_FRAMES: tl.constexpr,  # dA from the frame ids FQ (Nq,) and FK (Nk,), int32, -1 outside the video
    HAS_KEY_MASK: tl.constexpr,  # KMASK (uint8 (B, Nk), nonzero = attend) drops keys
    FRAME_TILES: tl.constexpr,  # with HAS_FRAMES: dA per key tile where it is one column (_jit.frame_bias)
    SPECULATE: tl.constexpr = False,  # with HAS_FRAMES, the row max: one pass with a guessed m_i (below)
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

    SPECULATE replaces the first pass by `_guess_max` (the tiles of the block's own frames and of the
    text) and keeps the raw running max in the softmax pass. A row whose guess was its max, and a text
    row (dA = 0) with a finite max and output, is then exactly the two-pass row; the others are
    flagged: the block writes their number to COUNT[seq, block] and their positions, in order, to
    LIST[seq, block * BLOCK_M:] (COUNT and LIST int32 (B*H, Nq)), their max to MAXES (float32
    (B*H, Nq)), for `_tar_fwd_redo_kernel`; no atomics, nothing to zero. The saved max is the exact
    one either way.
    """
    WHOLE: tl.constexpr = (REGULARIZE and (GLOBAL_MAX or HAS_DELTA)) or HAS_KEY_MASK
    opt: tl.constexpr = Options(CAUSAL, HAS_DELTA, HAS_FRAMES, HAS_KEY_MASK, FRAME_TILES, PRECISION, VEC)
    seq, mb, b, h, offs_m, row_ok = block_coords(NQ, H, BLOCK_M)
    cols_d = head_cols(BLOCK_D, BLOCK_D2)
    cols_dv = head_cols(BLOCK_DV, BLOCK_DV2)
    q = load_tile(seq_view(Q, q_strides, b, h, cols_d, HEAD_DIM), offs_m, row_ok, VEC)
    keys = Keys(seq_view(K, k_strides, b, h, cols_d, HEAD_DIM), seq_view(V, v_strides, b, h, cols_dv, HEAD_DIM_V),
                NK, (KMASK, b * km_strides[0], km_strides[1]), FK)
    hi = NK
    if CAUSAL:
        hi = tl.minimum(NK, (mb + 1) * BLOCK_M)
    stat_row = seq * NQ + offs_m
    src = bias_source(FQ, DELTA, d_strides, b, h, offs_m, row_ok, gauss_coef, FRAME_BAND, HAS_FRAMES, True)

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
        elif SPECULATE:
            m = _guess_max(q, offs_m, keys, src, hi, scale, BLOCK_N, opt)
        else:
            m = _row_max(q, offs_m, keys, 0, hi, m, scale, BLOCK_N, opt)
    cm = strength * tl.where(row_ok, m, 0.0)
    state = (tl.full((BLOCK_M,), float("-inf"), tl.float32), tl.zeros((BLOCK_M,), tl.float32),
             zeros_each(BLOCK_M, cols_dv), tl.full((BLOCK_M,), float("-inf"), tl.float32))
    # (run_max, denom, acc, the raw running max with SPECULATE)
    OFF_BIAS: tl.constexpr = REGULARIZE and not ONE_PASS
    if not WHOLE:  # the off-band tiles: left of the band, then right of it, the partial last tile masked
        left = tl.minimum(band_lo, full_hi)
        state = _softmax_tiles(state, q, offs_m, row_ok, keys, src, cm, 0, left, scale, BLOCK_N, False, OFF_BIAS, opt,
                               SPECULATE)
        state = _softmax_tiles(state, q, offs_m, row_ok, keys, src, cm, left, band_lo, scale, BLOCK_N, True, OFF_BIAS,
                               opt, SPECULATE)
        right = tl.maximum(band_hi, full_hi)
        state = _softmax_tiles(state, q, offs_m, row_ok, keys, src, cm, band_hi, right, scale, BLOCK_N, False,
                               OFF_BIAS, opt, SPECULATE)
        state = _softmax_tiles(state, q, offs_m, row_ok, keys, src, cm, right, hi, scale, BLOCK_N, True, OFF_BIAS, opt,
                               SPECULATE)
    if REGULARIZE and ONE_PASS:  # the row max: the off-band scores' (their running max), then the band's
        m = _row_max(q, offs_m, keys, band_lo, band_hi, state[0], scale, BLOCK_N, opt)
        cm = strength * tl.where(row_ok, m, 0.0)
    if SAVE_STATS:
        if REGULARIZE and not GLOBAL_MAX and not SPECULATE:
            tl.store(STATS + stat_row * _STATS_N + _STAT_MAX, m, mask=row_ok)
        elif not REGULARIZE:
            tl.store(STATS + stat_row * _STATS_N + _STAT_MAX, tl.zeros((BLOCK_M,), tl.float32), mask=row_ok)
    run_max, denom, acc, raw = _softmax_tiles(state, q, offs_m, row_ok, keys, src, cm, band_lo, band_hi, scale,
                                              BLOCK_N, True, REGULARIZE, opt, SPECULATE)
    if SPECULATE:
        _flag_rows(COUNT, LIST, MAXES, STATS, seq, mb, NQ, offs_m, row_ok, src.ids >= 0, m, raw, denom, strength,
                   SAVE_STATS)
    if REGULARIZE and ONE_PASS:  # off the band the definition adds c * m_i * 0: NaN for an inf or NaN c * m_i,
        denom = tl.where((cm - cm) == 0.0, denom, float("nan"))  # which a NaN denominator gives output and lse
    out, lse = _finish(run_max, denom, acc, row_ok, HAS_KEY_MASK)
    store_tile(seq_view(O, o_strides, b, h, cols_dv, HEAD_DIM_V), offs_m, out, row_ok, VEC)
    if SAVE_STATS:
        tl.store(STATS + stat_row * _STATS_N + _STAT_LSE, lse, mask=row_ok)


@triton.jit
def _finish(run_max, denom, acc, row_ok, HAS_KEY_MASK: tl.constexpr):
    """(output rows, log-sum-exp) of a finished online softmax. With HAS_KEY_MASK a row with no key
    gives sum_j 0 * v_j (0 for finite v), as the definition says, and a log-sum-exp of +inf."""
    denom = tl.where(row_ok, denom, 1.0)
    lse = run_max + tl.log(denom)
    if HAS_KEY_MASK:
        empty = denom == 0.0
        lse = tl.where(empty, float("inf"), lse)
        denom = tl.where(empty, 1.0, denom)  # acc / 1: acc, sum_j 0 * v_j
    out = div_each(acc, denom[:, None])
    return out, lse


@triton.jit
def _flag_rows(COUNT, LIST, MAXES, STATS, seq, mb, NQ, rows, row_ok, video, guess, raw, denom, strength,
               SAVE_STATS: tl.constexpr):
    """The end of a speculative block (`_tar_fwd_tiled_kernel`): its exact row max, saved, and its
    flagged rows listed for the redo (their number in COUNT, their positions at the block's own
    slots of LIST, their max in MAXES).

    raw is the unbiased scores' running max: the row max where no score is NaN (tl.max skips NaN).
    Flagged: a video row whose raw max exceeds its guess, and any row whose denominator is NaN or whose
    strength * raw max is not finite (a text row's guess, finite or 0, hides the NaN of an infinite
    c_i * 0: a raw max of +inf, or a finite one whose product with strength overflows). A NaN
    denominator does not say whether a score was NaN (the two-pass max NaN) or the bias or the exp2 of
    huge finite scores made it (on a GPU, docs/semantics.md; the max finite), and a raw max of +inf may
    hide a NaN: such rows go to the redo with a max of +inf, which walks their keys again (`_row_max`,
    as two passes do).
    """
    nan_rows = denom != denom
    exact = tl.where(nan_rows, float("inf"), raw)
    redo = row_ok & ((video & (raw > guess)) | ~(tl.abs(strength * raw) < float("inf")) | nan_rows)
    stat_row = seq * NQ + rows
    if SAVE_STATS:
        tl.store(STATS + stat_row * _STATS_N + _STAT_MAX, exact, mask=row_ok)
    tl.store(COUNT + seq * NQ + mb, tl.sum(redo.to(tl.int32), 0))
    slot = mb * rows.shape[0] + tl.cumsum(redo.to(tl.int32), 0) - 1
    tl.store(LIST + seq * NQ + slot, rows.to(tl.int32), mask=redo)
    tl.store(MAXES + stat_row, exact, mask=redo)


@triton.jit
def _tar_fwd_block_list_kernel(ROW_FLAGS, COUNT, LIST, NQ, BLOCK_M: tl.constexpr):
    """The lean forward's flags (int32 (B*H, Nq), 1 for a flagged row) as the lists `_flag_rows` writes:
    program (seq, block) writes the number of flagged rows among rows [block * BLOCK_M, + BLOCK_M) to
    COUNT[seq, block] and their positions, in order, to LIST[seq, block * BLOCK_M:] (COUNT and LIST int32
    (B*H, Nq)), for `_tar_fwd_list_kernel`. The grid is (B*H * cdiv(Nq, BLOCK_M),)."""
    seq, block, _b, _h, _rows, _in = block_coords(NQ, 1, BLOCK_M)
    rows = block.to(tl.int32) * BLOCK_M + tl.arange(0, BLOCK_M)  # int32: at most 2**30 - 2**10 (`speculates`)
    flagged = tl.load(ROW_FLAGS + seq * NQ + rows, mask=rows < NQ, other=0) != 0
    tl.store(COUNT + seq * NQ + block, tl.sum(flagged.to(tl.int32), 0))
    slot = block * BLOCK_M + tl.cumsum(flagged.to(tl.int32), 0) - 1
    tl.store(LIST + seq * NQ + slot, rows, mask=flagged)


@triton.jit
def _tar_fwd_list_kernel(COUNT, LIST, ORDERED, FLAGS, NQ, BLOCK_M, SLOTS: tl.constexpr, BLOCKS: tl.constexpr):
    """Between the speculative launch and its redo: program (seq, p) copies the sequence's flagged rows
    at slots p * SLOTS on, in row order (the lists `_flag_rows` or `_tar_fwd_block_list_kernel` wrote
    for the blocks of BLOCK_M rows, one after the other; their counts read BLOCKS at a time), from LIST
    to ORDERED (int32 (B*H, Nq)); program 0 writes the sequence's count to FLAGS (int32 (B*H,)). So a
    redo program's rows come from consecutive query blocks, whose bands overlap. The grid is
    (B*H * cdiv(Nq, SLOTS),): one axis, as CUDA's second holds at most 65,535 programs (Nq of 8.4M)."""
    seq, p, _b, _h, _slots, _in = block_coords(NQ, 1, SLOTS)
    slots = p.to(tl.int32) * SLOTS + tl.arange(0, SLOTS)  # int32: at most 2**30 - 2**10 (`speculates`)
    nblk = tl.cdiv(NQ, BLOCK_M)
    base = COUNT + seq * NQ
    total = 0
    for c in range(0, nblk, BLOCKS):
        idx = c + tl.arange(0, BLOCKS)
        total += tl.sum(tl.load(base + idx, mask=idx < nblk, other=0), 0)
    if p == 0:
        tl.store(FLAGS + seq, total)
    if p * SLOTS < total:
        block = tl.zeros((SLOTS,), tl.int32)  # of each slot's row: the blocks whose lists end at or before it
        before = tl.zeros((SLOTS,), tl.int32)  # and the rows listed in them
        done = 0
        for c in range(0, nblk, BLOCKS):
            idx = c + tl.arange(0, BLOCKS)
            ends = done + tl.cumsum(tl.load(base + idx, mask=idx < nblk, other=0), 0)
            past = ends[None, :] <= slots[:, None]
            block += tl.sum(past.to(tl.int32), 1)
            before = tl.maximum(before, tl.max(tl.where(past, ends[None, :], 0), 1))
            done = tl.max(ends, 0)
        ok = slots < total
        rows = tl.load(LIST + seq * NQ + block.to(tl.int64) * BLOCK_M + slots - before, mask=ok)
        tl.store(ORDERED + seq * NQ + slots, rows, mask=ok)


@triton.jit
def _tar_fwd_redo_kernel(
    Q, K, V, O, STATS, FQ, FK, KMASK, COUNT, LIST, MAXES,
    q_strides, k_strides, v_strides, o_strides, km_strides,
    H, NQ, NK, HEAD_DIM, HEAD_DIM_V,
    scale, strength, gauss_coef, BAND, FRAME_BAND,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,  # the speculative launch's tiles (LEAN: tar_fwd_lean.LEAN_REDO)
    BLOCK_D: tl.constexpr, BLOCK_D2: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_DV2: tl.constexpr,
    CAUSAL: tl.constexpr, SAVE_STATS: tl.constexpr, PRECISION: tl.constexpr, VEC: tl.constexpr,
    HAS_KEY_MASK: tl.constexpr,
    LEAN: tl.constexpr = False,  # the rows of a speculative lean launch (ops/tar_fwd_lean.py; below)
):
    """The flagged rows of a speculative `_tar_fwd_tiled_kernel` launch, recomputed with their exact max.

    Program (seq, p) takes the sequence's flagged rows COUNT[seq] at slots p * BLOCK_M on, in row
    order, from LIST (`_tar_fwd_list_kernel`), with their max from MAXES, and exits at once when
    there are none (no host synchronisation). Rows of several query blocks share its tiles: without
    LEAN each row takes its block's key tiles in its block's order (the off-band ones, then the band)
    and skips the others (all -inf for it, its alpha 1: no change to its state; `_softmax_tiles`), so
    its output and statistics are the two-pass ones bit for bit at the same tiles. Arguments as the
    tiled kernel's, the Gaussian with frame ids (no delta, the row max).

    LEAN: the rows of the lean forward's speculative form, whose output agrees with the two passes to
    rounding, not bit for bit: the softmax takes every key tile in order in one loop, where the band
    order takes two (the lean forward has no causal mask and no key mask).
    """
    tl.static_assert(not (LEAN and (CAUSAL or HAS_KEY_MASK)), "LEAN: the lean forward's rows, without masks")
    opt: tl.constexpr = Options(CAUSAL, False, True, HAS_KEY_MASK, True, PRECISION, VEC)
    seq, blk, b, h, slots, _slot_in = block_coords(NQ, H, BLOCK_M)
    if blk * BLOCK_M < tl.load(COUNT + seq):
        ok = slots < tl.load(COUNT + seq)
        rows = tl.load(LIST + seq * NQ + slots, mask=ok, other=0).to(tl.int64)
        cols_d = head_cols(BLOCK_D, BLOCK_D2)
        cols_dv = head_cols(BLOCK_DV, BLOCK_DV2)
        q = load_tile(seq_view(Q, q_strides, b, h, cols_d, HEAD_DIM), rows, ok, VEC)
        keys = Keys(seq_view(K, k_strides, b, h, cols_d, HEAD_DIM), seq_view(V, v_strides, b, h, cols_dv, HEAD_DIM_V),
                    NK, (KMASK, b * km_strides[0], km_strides[1]), FK)
        stat_row = seq * NQ + rows
        m = tl.load(MAXES + stat_row, mask=ok, other=0.0)
        walk = m == float("inf")  # a raw max of +inf or a NaN denominator (_flag_rows): the keys walked again
        if tl.max(walk.to(tl.int32), 0) > 0:
            m = tl.where(walk, _row_max(q, rows, keys, 0, NK, tl.full((BLOCK_M,), float("-inf"), tl.float32), scale,
                                        BLOCK_N, opt), m)
        src = bias_source(FQ, Q, (0, 0, 0, 0), b, h, rows, ok, gauss_coef, FRAME_BAND, True, True)
        state = (tl.full((BLOCK_M,), float("-inf"), tl.float32), tl.zeros((BLOCK_M,), tl.float32),
                 zeros_each(BLOCK_M, cols_dv), tl.full((BLOCK_M,), float("-inf"), tl.float32))
        cm = strength * m
        if LEAN:
            run_max, denom, acc, _raw = _softmax_tiles(state, q, rows, ok, keys, src, cm, 0, NK, scale, BLOCK_N, True,
                                                    True, opt)
        else:
            # each row's key tiles and band, as its query block's in _tar_fwd_tiled_kernel, in int32 (`speculates`:
            # at most 2**30 - 2**10 rows and keys; BAND at most max(NQ, NK), which gives the tiled kernel's bounds at
            # NQ + NK)
            mb = (rows // BLOCK_M).to(tl.int32)
            end = tl.zeros_like(mb) + NK
            if CAUSAL:
                end = tl.minimum(end, (mb + 1) * BLOCK_M)
            lo = tl.zeros_like(mb)
            hi = end
            if not HAS_KEY_MASK:  # with a key mask the band is the whole row
                lo = tl.minimum(tl.maximum(mb * BLOCK_M - BAND + 1, 0) // BLOCK_N * BLOCK_N, end)
                hi = tl.maximum(tl.minimum(tl.cdiv((mb + 1) * BLOCK_M - 1 + BAND, BLOCK_N) * BLOCK_N, end), lo)
                state = _softmax_tiles(state, q, rows, ok, keys, src, cm, 0, tl.max(tl.where(ok, end, 0), 0), scale,
                                       BLOCK_N, True, True, opt, False, 1, (lo, hi, end))
            run_max, denom, acc, _raw = _softmax_tiles(state, q, rows, ok, keys, src, cm,
                                                    tl.min(tl.where(ok, lo, NK), 0), tl.max(tl.where(ok, hi, 0), 0),
                                                    scale, BLOCK_N, True, True, opt, False, 2, (lo, hi, end))
        out, lse = _finish(run_max, denom, acc, ok, HAS_KEY_MASK)
        store_tile(seq_view(O, o_strides, b, h, cols_dv, HEAD_DIM_V), rows, out, ok, VEC)
        if SAVE_STATS:
            tl.store(STATS + stat_row * _STATS_N + _STAT_LSE, lse, mask=ok)
            tl.store(STATS + stat_row * _STATS_N + _STAT_MAX, m, mask=ok)


# --------------------------------------------------------------------------- launcher

_packed = tuned(_tar_fwd_packed_kernel, FWD_PACKED, ["SEG_Q", "SEG_K", "BLOCK_D", "BLOCK_D2", "BLOCK_DV", "BLOCK_DV2",
                                                    "CAUSAL", "GLOBAL_MAX", "HAS_DELTA"])
_tiled_row_max = tuned(_tar_fwd_row_max_kernel, FWD_TILED, ["N_BUCKET", "BLOCK_D", "BLOCK_D2", "CAUSAL", "SAVE_STATS",
                                                            "HAS_KEY_MASK"])
_TILED_KEY = ["N_BUCKET", "BLOCK_D", "BLOCK_D2", "BLOCK_DV", "BLOCK_DV2", "CAUSAL", "HAS_DELTA", "REGULARIZE",
              "GLOBAL_MAX", "ONE_PASS", "SAVE_STATS", "HAS_FRAMES", "HAS_KEY_MASK"]
_tiled = tuned(_tar_fwd_tiled_kernel, FWD_TILED, _TILED_KEY)
_tiled_speculative = tuned(_tar_fwd_tiled_kernel, FWD_TILED_SPECULATIVE, _TILED_KEY)  # tuned apart from two passes
_redo = _tar_fwd_redo_kernel  # run with the speculative launch's config (launch.launch_tuned)
_list = _tar_fwd_list_kernel
_LIST = dict(SLOTS=128, BLOCKS=32)  # _tar_fwd_list_kernel's rows per program, and query blocks per pass
_block_list = _tar_fwd_block_list_kernel
# the lean forward's rows per list of `_tar_fwd_block_list_kernel` (a pass of `_tar_fwd_list_kernel` reads 32 lists)
LIST_BLOCK = 1024


def tar_forward(problem: TarProblem, out: torch.Tensor | None = None, stats: torch.Tensor | None = None,
                flags: torch.Tensor | None = None) -> torch.Tensor:
    """Launch the fused forward for a validated problem; returns (B, H, Nq, Dv) in q's dtype.

    stats: optional float32 (B*H, Nq, layout.STATS_FIELDS) buffer, contiguous, for a call that
    will be differentiated in the tiled layout (layout.stats_shape; frame ids or a key mask run the
    tiled layout at any length, `launch.tiled_only`): the kernel fills it with the row statistics
    ops/tar_bwd.py reads. Without it the inference path writes nothing extra.
    flags: for a call that `speculates`, an int32 (B*H,) tensor: the speculative one pass runs and
    writes each sequence's number of flagged (recomputed) rows there (every entry: no need to zero
    it); None runs two passes.
    """
    return _tar_forward(problem, out, stats, {}, flags)


def _tar_forward(problem: TarProblem, out: torch.Tensor | None, stats: torch.Tensor | None,
                 variant: dict, flags: torch.Tensor | None = None) -> torch.Tensor:
    """tar_forward, the tiled kernel's constexprs overridden by `variant`: the tests' ONE_PASS=False
    runs the row-max Gaussian in two passes (a QK^T walk of every key tile for m_i, then the softmax
    with the bias on every tile) in the one-pass tile order, FRAME_TILES=False computes the frame
    ids' dA per score on every key tile; both give the same result bit for bit."""
    q, k, v = problem.q, problem.k, problem.v
    B, H, nq, nk, d, dv = problem.batch, problem.heads, problem.nq, problem.nk, problem.head_dim, problem.head_dim_v
    if out is None:
        out = torch.empty(problem.output_shape(), device=q.device, dtype=q.dtype)
    bh = B * H
    if bh == 0 or nq == 0:
        if flags is not None:
            flags.zero_()
        return out
    delta, d_strides, gauss_coef = delta_args(problem)
    meta = dict(common_meta(problem), VEC=vector_width(q, k, v, out))
    strides = (q.stride(), k.stride(), v.stride(), out.stride(), d_strides)
    sizes = (H, nq, nk, d, dv, problem.scale, problem.strength, gauss_coef)
    if packed(problem):
        if stats is not None and stats.numel():
            raise ValueError("the packed layout saves no statistics: pass stats=None (see layout.stats_shape)")
        packed_meta, grid = packed_launch(problem)
        _packed[grid](q, k, v, out, delta, *strides, bh, *sizes, GLOBAL_MAX=problem.max_mode == "global", **meta,
                      **packed_meta)
        return out

    save_stats = stats is not None
    if save_stats and (tuple(stats.shape) != (bh, nq, STATS_FIELDS) or stats.dtype != torch.float32
                       or not stats.is_contiguous()):
        raise ValueError(f"stats must be a contiguous float32 ({bh}, {nq}, {STATS_FIELDS}) tensor, "
                         f"got {stats.dtype} {tuple(stats.shape)}")
    grid = lambda m: (bh * triton.cdiv(nq, m["BLOCK_M"]),)  # noqa: E731
    tiles = interpreter_tiles("forward")
    n_bucket = pow2(max(nq, nk))
    global_max = problem.max_mode == "global" and problem.regularized
    seq_max = None  # read in global mode only
    fq, fk, km, km_strides, frame_meta = frame_args(problem)
    if global_max:
        row_max = torch.empty(bh, nq, device=q.device, dtype=torch.float32)
        _tiled_row_max[grid](q, k, row_max, stats, km, q.stride(), k.stride(), km_strides, nq, nk, H, d,
                             problem.scale, n_bucket, BLOCK_D=meta["BLOCK_D"], BLOCK_D2=meta["BLOCK_D2"],
                             CAUSAL=meta["CAUSAL"],
                             SAVE_STATS=save_stats, PRECISION=meta["PRECISION"], VEC=meta["VEC"],
                             HAS_KEY_MASK=frame_meta["HAS_KEY_MASK"], **tiles)
        seq_max = row_max.amax(dim=1)
    gaussian_row_max = problem.regularized and problem.delta is None and not global_max
    # the band (with frame ids: the same tile order in two passes); without TAR the tiles the causal diagonal crosses
    band = band_width(gauss_coef, max(nq, nk)) if gaussian_row_max else 1
    meta.update(frame_meta, GLOBAL_MAX=global_max, ONE_PASS=gaussian_row_max and not tiled_only(problem),
                SAVE_STATS=save_stats, **tiles)
    if flags is None:
        _tiled[grid](q, k, v, out, delta, seq_max, stats, fq, fk, km, None, None, None, *strides, km_strides, *sizes,
                     band, frame_band_width(gauss_coef), n_bucket, **{**meta, **variant})
        return out
    if not speculates(problem) or flags.shape != (bh,) or flags.dtype != torch.int32:
        raise ValueError(f"flags: an int32 ({bh},) tensor, for a call that speculates (frame ids, the "
                         f"Gaussian, the row max, at most {SPECULATE_TOKENS} queries and keys), got {flags.dtype} "
                         f"{tuple(flags.shape)}")
    counts, listed, rows = torch.empty(3, bh, nq, device=q.device, dtype=torch.int32)
    maxes = torch.empty(bh, nq, device=q.device, dtype=torch.float32)
    used = launch_tuned(_tiled_speculative, grid, "forward", q, k, v, out, delta, seq_max, stats, fq, fk, km, counts,
                        listed, maxes, *strides, km_strides, *sizes, band, frame_band_width(gauss_coef), n_bucket,
                        SPECULATE=True, **{**meta, **variant})
    _list[(bh * triton.cdiv(nq, _LIST["SLOTS"]),)](counts, listed, rows, flags, nq, used["BLOCK_M"], **_LIST)
    redo_rows(problem, out, stats, flags, rows, maxes, used)
    return out


def compact_rows(row_flags: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The flagged rows of each sequence, in order, at the start of its row of an int32 (B*H, N) tensor (the rest
    unspecified), from row_flags (int32 (B*H, N), 1 for a flagged row, else 0; the lean forward's); each
    sequence's count written to `counts` (int32 (B*H,)). Two launches on the device (the rows listed per block
    of LIST_BLOCK, then the lists joined, as the speculative tiled forward's): no host synchronisation, so a CUDA
    graph may capture it."""
    bh, n = row_flags.shape
    block_counts, listed, rows = torch.empty(3, bh, n, dtype=torch.int32, device=row_flags.device)
    _block_list[(bh * triton.cdiv(n, LIST_BLOCK),)](row_flags, block_counts, listed, n, BLOCK_M=LIST_BLOCK)
    _list[(bh * triton.cdiv(n, _LIST["SLOTS"]),)](block_counts, listed, rows, counts, n, LIST_BLOCK, **_LIST)
    return rows


def redo_rows(problem: TarProblem, out: torch.Tensor, stats: torch.Tensor | None, counts: torch.Tensor,
              rows: torch.Tensor, maxes: torch.Tensor, config: dict, lean: bool = False) -> None:
    """Recompute the flagged rows of a speculative launch into `out` (and `stats`) with `_tar_fwd_redo_kernel` at
    `config`'s tiles, warps and stages (the interpreter's in the interpreter): each sequence's counts[seq] rows
    from the start of its row of `rows` (int32 (B*H, Nq)), their max from `maxes` (float32 (B*H, Nq)). Its
    programs exit at once where a sequence flagged none. lean: the rows are a lean launch's (the redo kernel's
    LEAN)."""
    q, k, v = problem.q, problem.k, problem.v
    bh, nq = problem.batch * problem.heads, problem.nq
    _, _, gauss_coef = delta_args(problem)
    meta = dict(common_meta(problem), VEC=vector_width(q, k, v, out))
    fq, fk, km, km_strides, frame_meta = frame_args(problem)
    heads = {k: meta[k] for k in ("BLOCK_D", "BLOCK_D2", "BLOCK_DV", "BLOCK_DV2")}
    config = dict(config, **interpreter_tiles("forward"))
    grid = (bh * triton.cdiv(nq, config["BLOCK_M"]),)
    _redo[grid](q, k, v, out, stats, fq, fk, km, counts, rows, maxes, q.stride(), k.stride(), v.stride(),
                out.stride(), km_strides, problem.heads, nq, problem.nk, problem.head_dim, problem.head_dim_v,
                problem.scale, problem.strength, gauss_coef, band_width(gauss_coef, max(nq, problem.nk)),
                frame_band_width(gauss_coef), **heads, CAUSAL=meta["CAUSAL"], SAVE_STATS=stats is not None,
                PRECISION=meta["PRECISION"], VEC=meta["VEC"], HAS_KEY_MASK=frame_meta["HAS_KEY_MASK"],
                LEAN=lean, **config)
