"""Plain attention, the yardstick of `tools.perf static`: softmax(scale * Q K^T) V with an online
softmax over key tiles (no TAR: no row-max pass, no bias), in the tile shapes of the tiled forward.

It is compiled, never timed or tested for numerics: `tools/perf/static.py` builds its launches from the
tiled forward's (the same tensors, tiles, warps and stages), so the two kernels' hot loops differ
only by what TAR adds to each score element.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def plain_attention_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qn, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_on, stride_od,
    H, NQ, NK, HEAD_DIM, HEAD_DIM_V, scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
):
    """O = softmax(scale * Q K^T) V for BLOCK_M query rows; (B, H, N, D) tensors of any strides,
    the grid is (B*H * cdiv(NQ, BLOCK_M),)."""
    pid = tl.program_id(0).to(tl.int64)
    blocks = tl.cdiv(NQ, BLOCK_M)
    b = (pid // blocks) // H
    h = (pid // blocks) % H
    offs_m = (pid % blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < NQ
    q = tl.load(Q + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_qn + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    qk_scale = scale * 1.4426950408889634  # exp via exp2
    run_max = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    denom = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), tl.float32)
    for start in range(0, NK, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        col_ok = offs_n < NK
        k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                    mask=col_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        s = tl.dot(q, tl.trans(k)) * qk_scale
        s = tl.where(col_ok[None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        alpha = tl.exp2(run_max - new_max)
        p = tl.exp2(s - new_max[:, None])
        denom = denom * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=col_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V), other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        run_max = new_max
    out = acc / tl.where(row_ok, denom, 1.0)[:, None]
    tl.store(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_on + offs_dv[None, :] * stride_od,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
