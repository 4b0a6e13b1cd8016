"""The @triton.jit building blocks of the forward (tar_fwd.py) and backward (tar_bwd.py) kernels: one
definition each, so that the backward recomputes exactly the forward's arithmetic. Device code only;
the host's launch policy is launch.py.

The helpers take their arguments in a few named groups (below): a `View` of a tensor's tiles, the
kernel's compile-time `Options`, the `Keys` a query block walks and the `BiasSource` of a block's dA.
"""

from __future__ import annotations

from collections import namedtuple

import triton
import triton.language as tl

from .layout import STAT_LSE, STAT_MAX, STATS_FIELDS

INTERPRETING = triton.knobs.runtime.interpret
# The interpreter's stand-ins, compile-time in the kernels: `_mma2` and `cast` for its inexact
# bfloat16 arithmetic, `nanmax` for its element-by-element custom reductions (speed only).
_INTERPRETING = tl.constexpr(INTERPRETING)
# Field offsets of the row statistics the tiled forward saves (layout.STATS_FIELDS), as
# compile-time constants of the kernels that write and read them.
_STATS_N = tl.constexpr(STATS_FIELDS)
_STAT_MAX = tl.constexpr(STAT_MAX)
_STAT_LSE = tl.constexpr(STAT_LSE)
# The least video id of a block or tile without one: above every id (_problem.FRAME_ID_LIMIT),
# and far enough from the int32 limit that differences with ids cannot overflow.
_NO_VIDEO = tl.constexpr(1 << 30)
_PER_SCORE = tl.constexpr(-2)


# The helpers' argument groups, read by field name:
# View: the tiles of a 2-D view of a tensor, tile[r, c] = ptr[base + rows[r] * row_stride + cols[c] *
# col_stride] where cols[c] < n_cols (0 elsewhere); cols is a tuple of column chunks (`head_cols`), and
# a tile a tuple of one tile per chunk. The base is added where a tile is loaded, as the
# kernels always did: a pointer moved out of the key loops changed the registers ptxas allocates
# (tools.perf static: 115 -> 132 in one tiled config, fewer in others).
View = namedtuple("View", "ptr base row_stride cols col_stride n_cols")
# Options: the constexprs of a tiled kernel that its helpers read (VEC: see `_tile_ptrs`). A kernel binds it
# as `opt: tl.constexpr = Options(...)`: a group bound to a plain name in a compiled kernel has its
# constexprs turned into tensors (and so does a tuple unpacked into names).
Options = namedtuple("Options", "CAUSAL HAS_DELTA HAS_FRAMES HAS_KEY_MASK FRAME_TILES PRECISION VEC")
# Keys: what a block of query rows walks: the K and V Views of its sequence, their count n, the key mask
# (its pointer, the sequence's offset and its stride; the pointer None without one) and the keys' frame
# ids (None without them).
Keys = namedtuple("Keys", "k v n mask ids")
# BiasSource (`bias_source`): what a block of rows (query rows, or the dK/dV pass's keys) needs for the
# dA of the tiles it walks: its frame ids (its positions without frame ids) and their span (lo, hi)
# (`frame_span`), pointers `base` into the delta or frame matrix at the block's entries ((M, 1) or
# (1, N)) and the stride along the tiles, the Gaussian's coefficient and FRAME_BAND.
BiasSource = namedtuple("BiasSource", "ids lo hi base stride gauss_coef band")


@triton.jit
def head_cols(BLOCK: tl.constexpr, BLOCK2: tl.constexpr):
    """The head-dim columns of a View as its chunks (layout.head_chunks): [0, BLOCK), and [BLOCK,
    BLOCK + BLOCK2) where BLOCK2 > 0. Every tile of a head dim is a tuple of one tile per chunk, and
    the products below take such tuples: a head dim of 80 runs as 64 + 16 columns, not 128."""
    if BLOCK2 > 0:
        cols = (tl.arange(0, BLOCK), BLOCK + tl.arange(0, BLOCK2))
    else:
        cols = (tl.arange(0, BLOCK),)
    return cols


@triton.jit
def _t(x):
    """x transposed: its last two axes swapped (a batch of packed tiles keeps its first)."""
    if len(x.shape) == 3:
        y = tl.trans(x, 0, 2, 1)
    else:
        y = tl.trans(x)
    return y


@triton.jit
def mma_nt(a, b, PRECISION: tl.constexpr):
    """a b^T of two chunked tiles (tuples, `head_cols`): the sum over the chunks of a[c] @ b[c]^T."""
    c = mma(a[0], _t(b[0]), PRECISION)
    for i in tl.static_range(1, len(a)):
        c += mma(a[i], _t(b[i]), PRECISION)
    return c


@triton.jit
def mma_each(a, b, PRECISION: tl.constexpr, TRANS_A: tl.constexpr = False):
    """a @ b[c] for each chunk of b (a chunked result; a cast to b's dtype, transposed first with TRANS_A)."""
    a = cast(a, b[0].dtype)
    if TRANS_A:
        a = _t(a)
    out = ()
    for i in tl.static_range(len(b)):
        out = out + (mma(a, b[i], PRECISION),)
    return out


@triton.jit
def fma_each(a, f, b):
    """a[c] * f + b[c] for each chunk (f None: a[c] + b[c]; b None: a[c] * f); f broadcasts against a chunk."""
    out = ()
    for i in tl.static_range(len(a)):
        if f is None:
            out = out + (a[i] + b[i],)
        elif b is None:
            out = out + (a[i] * f,)
        else:
            out = out + (a[i] * f + b[i],)
    return out


@triton.jit
def f32_each(a):
    """Each chunk of a as float32."""
    out = ()
    for i in tl.static_range(len(a)):
        out = out + (a[i].to(tl.float32),)
    return out


@triton.jit
def row_dot(a, b):
    """sum_c <a[c]_r, b[c]_r> per row r of two chunked tiles, in float32."""
    d = tl.sum(a[0].to(tl.float32) * b[0].to(tl.float32), 1)
    for i in tl.static_range(1, len(a)):
        d += tl.sum(a[i].to(tl.float32) * b[i].to(tl.float32), 1)
    return d


@triton.jit
def div_each(a, d):
    """a[c] / d for each chunk (d broadcasts against a chunk)."""
    out = ()
    for i in tl.static_range(len(a)):
        out = out + (a[i] / d,)
    return out


@triton.jit
def zeros_each(rows: tl.constexpr, cols):
    """A float32 zero tile of `rows` rows for each column chunk of cols (`head_cols`)."""
    out = ()
    for i in tl.static_range(len(cols)):
        out = out + (tl.zeros((rows, cols[i].shape[0]), tl.float32),)
    return out


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
    products: tl.constexpr = a.numel * b.shape[len(b.shape) - 1]
    if _INTERPRETING and products <= 1 << 20:
        c = _mma_rows(a, b)
    elif _INTERPRETING and a.dtype == tl.bfloat16:
        # Stands in for the GPU's bf16 MMA, which the interpreter computes on the raw 16-bit
        # integers: widening bf16 to fp32 is exact, so this is the product the GPU computes.
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=PRECISION)
    return c


@triton.jit
def _mma_rows(a, b):
    """The interpreter's stand-in for the GPU's MMA (2-D, or batched over a packed tile's sequences), whose
    row i of a @ b is the same whatever rows share the tile (the speculative forward's redo gathers rows of
    several blocks) and whose equal columns of b give equal columns of a @ b (copies of a key tie for the
    max, as the backward needs): numpy's matmul rounds an entry by its place in the tile, a sum over the
    inner axis does not (used for tiles of at most 2^20 products, the interpreter's tensor limit;
    tools.perf.traffic counts it as the dot it replaces). Widening 16-bit inputs is exact (and the
    interpreter would compute bf16 on the raw integers)."""
    if len(a.shape) == 3:
        return tl.sum(a.to(tl.float32)[:, :, :, None] * b.to(tl.float32)[:, None, :, :], 2)
    return tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], 1)


@triton.jit
def cast(x, dtype: tl.constexpr):
    """x.to(dtype), rounding to nearest even as the GPU does."""
    if _INTERPRETING and dtype == tl.bfloat16:
        # Stands in for the GPU's rounding fp32 -> bf16, which the interpreter truncates: round the
        # fp32 bits first so that truncation is exact (round half to even on the 16 dropped bits).
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
def seq_view(T, strides, b, h, cols, n_cols):
    """The View of sequence (b, h) of a (B, H, N, D) tensor T with `strides`: rows are positions.
    (A packed tile's View has base 0, row stride 1 and packed_rows.)"""
    return View(T, b * strides[0] + h * strides[1], strides[2], cols, strides[3], n_cols)


@triton.jit
def packed_rows(strides, b, h, i):
    """Rows (SEQS, SEG) of a packed tile of a (B, H, N, D) tensor with `strides`, for a View of row
    stride 1: positions i (SEG,) of the sequences (b, h) (SEQS,)."""
    return (b * strides[0] + h * strides[1])[:, None] + i * strides[2]


@triton.jit
def _tile_ptrs(view, cols, rows, row_ok, VEC: tl.constexpr):
    """(pointers, mask) of load_tile: rows (any rank) index the leading dims, cols (one of the view's chunks) the last.

    VEC > 1 (vector_width) promises that each run of VEC columns starts VEC-aligned in memory
    (VEC * itemsize bytes), is contiguous, and is in or out of n_cols as a whole: the
    compiler then loads and stores VEC elements per instruction.
    """
    ptrs = view.ptr + view.base + tl.expand_dims(rows * view.row_stride, -1) + cols * view.col_stride
    col_in = cols < view.n_cols
    if VEC > 1:
        # The column mask's hint goes on the column comparison itself: a hint on the combined mask
        # is lost when the compiler folds an all-true row_ok away (the unmasked loops).
        col_in = tl.max_constancy(col_in, VEC)
        vec_bytes: tl.constexpr = VEC * view.ptr.dtype.element_ty.primitive_bitwidth // 8
        if len(ptrs.shape) == 3:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, (1, 1, vec_bytes)), (1, 1, VEC))
        else:
            ptrs = tl.max_contiguous(tl.multiple_of(ptrs, (1, vec_bytes)), (1, VEC))
    return ptrs, tl.expand_dims(row_ok, -1) & col_in


@triton.jit
def load_tile(view, rows, row_ok, VEC: tl.constexpr = 1):
    """The view's tile at rows (any rank; row_ok its shape), 0 outside row_ok x (columns < n_cols):
    a tuple, one tile per column chunk."""
    tiles = ()
    for i in tl.static_range(len(view.cols)):
        ptrs, mask = _tile_ptrs(view, view.cols[i], rows, row_ok, VEC)
        tiles = tiles + (tl.load(ptrs, mask=mask, other=0.0),)
    return tiles


@triton.jit
def store_tile(view, rows, x, row_ok, VEC: tl.constexpr = 1):
    """x (a tile per column chunk), cast to the view's dtype, into the places load_tile reads."""
    for i in tl.static_range(len(view.cols)):
        ptrs, mask = _tile_ptrs(view, view.cols[i], rows, row_ok, VEC)
        tl.store(ptrs, cast(x[i], view.ptr.dtype.element_ty), mask=mask)


@triton.jit
def masked_scores(q, k, valid, rows, cols, scale, CAUSAL: tl.constexpr, PRECISION: tl.constexpr):
    """S = scale * q k^T where valid (and key col <= query row when CAUSAL), -inf elsewhere.

    q (rows, D) and k (cols, D), or packed (SEQS, rows, D) and (SEQS, cols, D), one product per
    sequence, each a tuple of head-dim chunks. Returns (S, valid with the causal mask). The one
    score expression of the forward and the backward kernels.
    """
    s = mma_nt(q, k, PRECISION) * scale
    if CAUSAL:
        # int32 positions: the 2-D comparison costs half the registers of an int64 one
        valid = valid & (cols.to(tl.int32)[None, :] <= rows.to(tl.int32)[:, None])
    return tl.where(valid, s, float("-inf")), valid


@triton.jit
def key_ok(col_ok, mask, j, HAS_KEY_MASK: tl.constexpr):
    """col_ok, and with HAS_KEY_MASK the key mask's entries (uint8, nonzero = attend) of keys j;
    mask: (pointer, the sequence's offset, stride), as Keys holds it."""
    if HAS_KEY_MASK:
        KMASK, base, stride = mask
        col_ok = col_ok & (tl.load(KMASK + base + j * stride, mask=col_ok, other=0) != 0)
    return col_ok


@triton.jit
def key_scores(q, rows, rows_ok, keys, j, scale, opt, LOAD_V: tl.constexpr):
    """(S, valid, k, v, col_in) of the key tile j (int64 positions) for the query rows `rows` (their
    mask rows_ok (M, 1), or True): S = masked_scores, valid without the keys past keys.n and those
    the key mask drops (col_in: j < keys.n); with LOAD_V the tile's v (every key's, masked or not),
    issued before the scores (the dQ pass: fewer registers than after them), else None."""
    col_in = j < keys.n
    col_ok = key_ok(col_in, keys.mask, j, opt.HAS_KEY_MASK)
    k = load_tile(keys.k, j, col_ok, opt.VEC)
    if LOAD_V:
        v = load_tile(keys.v, j, col_in, opt.VEC)
    s, valid = masked_scores(q, k, col_ok[None, :] & rows_ok, rows, j, scale, opt.CAUSAL, opt.PRECISION)
    return s, valid, k, v if LOAD_V else None, col_in


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
        vec = tl.load(d_ptrs + b2.to(tl.int64) * b_stride, mask=on, other=0.0).to(tl.float32)
    else:
        dist = b2.to(tl.float32) - ids2.to(tl.float32)
        vec = tl.where(on, tl.exp2(gauss_coef * dist * dist), 0.0)
    return vec


@triton.jit
def frame_ids(F, offs, ok, HAS_FRAMES: tl.constexpr):
    """With HAS_FRAMES the frame ids F[offs] (int32, -1 outside the video; -1 where not ok); else the
    positions offs, which take their place in dA."""
    ids = offs
    if HAS_FRAMES:
        ids = tl.load(F + offs, mask=ok, other=-1)
    return ids


@triton.jit
def bias_source(F, DELTA, d_strides, b, h, offs, ok, gauss_coef, FRAME_BAND, HAS_FRAMES: tl.constexpr,
                QUERY_BLOCK: tl.constexpr):
    """The BiasSource of a block of positions offs (ok: in range) of sequence (b, h): QUERY_BLOCK, a
    block of query rows, whose tiles are keys (the forward, the dQ pass); else of keys (the dK/dV
    pass). Its ids: frame_ids(F, ...); DELTA (B, H, Nq, Nk) has strides d_strides (a frame matrix:
    (0, 0, row, column))."""
    ids = frame_ids(F, offs, ok, HAS_FRAMES)
    lo = 0
    hi = 0
    if HAS_FRAMES:
        lo, hi = frame_span(ids)
    if QUERY_BLOCK:
        base = DELTA + b * d_strides[0] + h * d_strides[1] + ids[:, None].to(tl.int64) * d_strides[2]
        stride = d_strides[3]
    else:
        base = DELTA + b * d_strides[0] + h * d_strides[1] + ids[None, :].to(tl.int64) * d_strides[3]
        stride = d_strides[2]
    return BiasSource(ids, lo, hi, base, stride, gauss_coef, FRAME_BAND)


@triton.jit
def frame_bias(s, c, valid, src, ids, opt, QUERY_BLOCK: tl.constexpr, USE_DA: tl.constexpr):
    """(S', dA) of a score tile: S' = S + c * dA (add_bias; -inf where not valid with frame ids or a
    key mask), dA 0 where not valid. src: the block's BiasSource (bias_source, QUERY_BLOCK as there);
    ids: the tile's `frame_ids`.

    With opt.FRAME_TILES a tile whose dA is one vector along the block (`frame_tile_id`: one frame
    id, or off the Gaussian's band) adds it as that vector; bit for bit dA per score (delta_a).
    USE_DA (the backward, which sums dA): S' is added once, after dA's two forms meet; without it
    in each form, so that the vector's stays a vector (tools.perf static: either the other way
    round compiles to more instructions, registers or spills), the vector's with its factors in
    the other order (add_bias's SWAP).
    """
    if QUERY_BLOCK:
        fq, fk, block_ids, tile_ids = src.ids, ids, src.ids[:, None], ids[None, :]
    else:
        fq, fk, block_ids, tile_ids = ids, src.ids, src.ids[None, :], ids[:, None]
    one = _PER_SCORE
    if opt.HAS_FRAMES and opt.FRAME_TILES:
        one = frame_tile_id(src.lo, src.hi, ids, src.band, opt.HAS_DELTA)
    if one != _PER_SCORE:  # dA as one vector along the block (frame_tile_id)
        vec = frame_vector(block_ids, one, src.base, src.stride, src.gauss_coef, opt.HAS_DELTA)
        dA = tl.where(valid, vec, 0.0)
        if not USE_DA:
            s = add_bias(s, c, vec, True)
    else:
        d_ptrs = src.base + tile_ids.to(tl.int64) * src.stride  # int64: an id times a stride may pass 2**31
        dA = delta_a(fq, fk, valid, d_ptrs, src.gauss_coef, opt.HAS_DELTA, opt.HAS_FRAMES)
        if not USE_DA:
            s = add_bias(s, c, dA)
    if USE_DA:
        s = add_bias(s, c, dA)
    if opt.HAS_FRAMES or opt.HAS_KEY_MASK:
        s = tl.where(valid, s, float("-inf"))
    return s, dA


@triton.jit
def add_bias(s, c, dA, SWAP: tl.constexpr = False):
    """S' = S + c_i * dA_ij as one fused multiply-add (c has S's shape less its last axis; dA S's
    shape, or one column or row): rounded once, on a GPU and in the interpreter alike, so that two
    code paths holding the same dA give the same S' bit for bit whatever the compiler contracts
    around them. Masked entries (-inf) stay -inf for a finite c_i * dA_ij.

    SWAP: computed as fma(dA_ij, c_i, S_ij), the same value bit for bit, for one of two branches
    that each add a bias (`frame_bias`): with the factors in the same order LLVM sinks the two adds
    into one after the branches, which first copies a vector's dA into every score's register
    (tools.perf static, frame ids at 128 x 64 on sm_90: 30 copies of the 573 instructions a pass on
    the shortest path); with two operands differing it keeps them apart."""
    if len(dA.shape) < len(s.shape):  # a packed tile's Gaussian (SEG_Q, SEG_K), shared by its sequences
        dA = tl.expand_dims(dA, 0)
    if SWAP:
        return tl.fma(tl.broadcast_to(dA, s.shape), tl.broadcast_to(tl.expand_dims(c, -1), s.shape), s)
    return tl.fma(tl.broadcast_to(tl.expand_dims(c, -1), s.shape), tl.broadcast_to(dA, s.shape), s)


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
def packed_qkv(Q, K, V, q_strides, k_strides, v_strides, coords, HEAD_DIM, HEAD_DIM_V, cols_d, cols_dv,
               VEC: tl.constexpr):
    """A packed program's tiles of Q, K and V (B, H, N, D) with these strides (chunked: cols_d and
    cols_dv, `head_cols`); coords: packed_coords'."""
    b, h, i, j, row_ok, col_ok = coords
    q = load_tile(View(Q, 0, 1, cols_d, q_strides[3], HEAD_DIM), packed_rows(q_strides, b, h, i), row_ok, VEC)
    k = load_tile(View(K, 0, 1, cols_d, k_strides[3], HEAD_DIM), packed_rows(k_strides, b, h, j), col_ok, VEC)
    v = load_tile(View(V, 0, 1, cols_dv, v_strides[3], HEAD_DIM_V), packed_rows(v_strides, b, h, j), col_ok, VEC)
    return q, k, v


@triton.jit
def packed_delta(DELTA, d_strides, coords, valid, gauss_coef, HAS_DELTA: tl.constexpr):
    """dA of a packed program's scores (delta_a): DELTA (B, H, Nq, Nk) with d_strides, or the Gaussian."""
    b, h, i, j, row_ok, col_ok = coords
    d_ptrs = DELTA + (b * d_strides[0] + h * d_strides[1])[:, None, None] + (i * d_strides[2])[:, None] \
        + j[None, :] * d_strides[3]
    return delta_a(i, j, valid, d_ptrs, gauss_coef, HAS_DELTA)


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
