"""Plain attention, the yardstick of `tools.perf static` and `tools.perf model`: softmax(scale * Q K^T) V
with an online softmax over key tiles (no TAR: no row-max pass, no bias), in the structure of
Triton's fused-attention tutorial (python/tutorials/06-fused-attention.py, the FlashAttention-2
algorithm), written here for our tensors:

* one program per (BLOCK_M query rows, sequence), the grid (cdiv(NQ, BLOCK_M), B*H); q loaded once;
* no mask inside the key loop: with EVEN_N (NK % BLOCK_N == 0, as the tutorial's lengths are) every
  key tile is whole; otherwise the last partial tile is peeled off and masked, as our tiled forward
  peels it;
* the row max of the raw scores times the scale (BLOCK_M multiplies per tile, not one per score),
  then exp2(qk * qk_scale - m) as one FMA per score;
* P V accumulated into the running output by the MMA itself (tl.dot's accumulator operand);
* the epilogue writes O and the rows' log-sum-exp (base 2) for a backward, as the tutorial does.

Loads and stores go through the tiled forward's own helpers (ops/_jit.load_tile, store_tile: the head
dim masked below BLOCK_D, vector hints), so that its loop differs from the tiled forward's only by
what TAR adds and, at a head dim that is not a power of two, by its width: it holds the head dim in
one power-of-two block (FlashAttention's kernels pad so), where the tiled forward holds two chunks
(layout.head_chunks: 80 = 64 + 16).
It is compiled, never timed or tested for numerics: `tools/perf/static.py` builds its
launches from the tiled forward's (the same tensors, tiles, warps and stages) and `tools/perf/roofline.py`
models it (the FlashAttention-2 calibration and the tutorial anchor).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from vstar_kernels.ops._jit import View, load_tile, store_tile


@triton.jit
def _plain_tile(q, k, v, acc, l_i, m_i, qk_scale, col_ok, MASK: tl.constexpr):
    """One key tile of the online softmax: (acc, l_i, m_i) updated; with MASK the keys outside
    col_ok are -inf."""
    qk = tl.dot(q, tl.trans(k))
    if MASK:
        qk = tl.where(col_ok[None, :], qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
    p = tl.exp2(qk * qk_scale - m_new[:, None])
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


@triton.jit
def plain_attention_kernel(
    Q, K, V, O, LSE,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, NQ, NK, HEAD_DIM, HEAD_DIM_V, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    EVEN_N: tl.constexpr,  # NK % BLOCK_N == 0: no key tile needs a mask
    VEC: tl.constexpr,  # head-dim entries per vector load and store (launch.vector_width)
):
    """O = softmax(scale * Q K^T) V for BLOCK_M query rows of one (batch, head) sequence, and
    LSE = log2 of each row's sum of exp2 (scores in base 2), float32 (B*H, NQ) contiguous;
    (B, H, N, D) tensors of any strides. The grid is (cdiv(NQ, BLOCK_M), B*H)."""
    mb = tl.program_id(0)
    seq = tl.program_id(1).to(tl.int64)
    b = seq // H
    h = seq % H
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = (tl.arange(0, BLOCK_D),)  # one column chunk (ops/_jit.head_cols): the head dim padded
    offs_dv = (tl.arange(0, BLOCK_DV),)
    row_ok = offs_m < NQ
    q = load_tile(View(Q + b * stride_qb + h * stride_qh, 0, stride_qn, offs_d, stride_qd, HEAD_DIM), offs_m, row_ok,
                  VEC)[0]
    k_view = View(K + b * stride_kb + h * stride_kh, 0, stride_kn, offs_d, stride_kd, HEAD_DIM)
    v_view = View(V + b * stride_vb + h * stride_vh, 0, stride_vn, offs_dv, stride_vd, HEAD_DIM_V)
    qk_scale = scale * 1.4426950408889634  # exp via exp2
    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    every = tl.full((BLOCK_N,), 1, tl.int1)
    full = NK if EVEN_N else NK // BLOCK_N * BLOCK_N
    for start in range(0, full, BLOCK_N):
        start = tl.multiple_of(start, BLOCK_N)
        k = load_tile(k_view, start + offs_n, every, VEC)[0]
        v = load_tile(v_view, start + offs_n, every, VEC)[0]
        acc, l_i, m_i = _plain_tile(q, k, v, acc, l_i, m_i, qk_scale, every, False)
    if not EVEN_N:
        col_ok = full + offs_n < NK
        k = load_tile(k_view, full + offs_n, col_ok, VEC)[0]
        v = load_tile(v_view, full + offs_n, col_ok, VEC)[0]
        acc, l_i, m_i = _plain_tile(q, k, v, acc, l_i, m_i, qk_scale, col_ok, True)
    l_i = tl.where(row_ok, l_i, 1.0)
    tl.store(LSE + seq * NQ + offs_m, m_i + tl.log2(l_i), mask=row_ok)
    store_tile(View(O + b * stride_ob + h * stride_oh, 0, stride_on, offs_dv, stride_od, HEAD_DIM_V), offs_m,
               (acc / l_i[:, None],), row_ok, VEC)


# Triton's fused-attention tutorial autotunes its forward over these (BLOCK_M, BLOCK_N, warps, stages)
# and drops 8 warps on tiles smaller than 128 x 128 (its `keep`); the version that pytorch/benchmark
# compared with FlashAttention-3 (pytorch/benchmark #2391, July 2024) had key tiles of 32 and 64 and
# stages 3, 4 and 7.
TUTORIAL_CONFIGS = tuple((bm, bn, w, s) for bm in (64, 128) for bn in (32, 64) for s in (3, 4, 7) for w in (4, 8)
                         if not (bm * bn < 128 * 128 and w == 8))


def launch_args(q, k, v, block_n: int):
    """(args, constexprs) of a plain_attention_kernel launch on (B, H, N, D) q, k, v (any strides;
    meta tensors too) with key tiles of block_n: the output and the log-sum-exp allocated like q."""
    from vstar_kernels.ops.launch import vector_width
    from vstar_kernels.ops.layout import DOT_MIN, pow2

    b, h, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    o = torch.empty(b, nq, h, dv, dtype=q.dtype, device=q.device).transpose(1, 2)
    lse = torch.empty(b * h * nq, dtype=torch.float32, device=q.device)
    block_d, block_dv = pow2(d, DOT_MIN), pow2(dv, DOT_MIN)
    args = (q, k, v, o, lse, *q.stride(), *k.stride(), *v.stride(), *o.stride(), h, nq, nk, d, dv, d ** -0.5)
    return args, dict(BLOCK_D=block_d, BLOCK_DV=block_dv, EVEN_N=nk % block_n == 0, VEC=vector_width(q, k, v, o))
