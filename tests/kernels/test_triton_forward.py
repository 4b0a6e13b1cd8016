"""The Triton kernels (interpreter on CPU, compiled on CUDA) against the float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

import vstar_kernels as vk
from vstar_kernels._problem import make_problem
from vstar_kernels.ops._load import triton_ops

from .._device import DEVICE
from ..helpers import DELTA_KINDS, DTYPES, OPTION_GRID, TOLERANCES, TRITON, assert_close_to_reference, dtype_id, \
    make_delta, make_qkv, opts_id, reference64, shape_id


def run_and_check(q, k, v, **opts):
    """Run the kernel into a NaN-poisoned output and compare with the float64 reference."""
    problem = make_problem(q, k, v, sigma=opts.get("sigma", 1.0), strength=opts.get("strength", 1.0),
                           delta=opts.get("delta"), causal=opts.get("causal", False),
                           max_mode=opts.get("max_mode", "row"), scale=opts.get("scale"))
    out = torch.full(problem.output_shape(), math.nan, dtype=q.dtype, device=q.device)
    triton_ops().module.tar_forward(problem, out)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, **opts), q.dtype)
    return out


# (B, H, Nq, Nk, D, Dv): packed path (N <= 128), then tiled (N > 128)
PACKED_SHAPES = [
    (3, 2, 1, 1, 8, 8),
    (2, 3, 7, 7, 40, 40),
    (5, 3, 16, 16, 64, 64),     # 15 sequences: the last program is partly empty
    (2, 2, 33, 33, 80, 80),
    (1, 2, 128, 128, 128, 128),
    (2, 2, 20, 50, 32, 24),     # Nq != Nk, Dv != D
    (2, 1, 24, 24, TRITON.SUPPORTED_MAX_HEAD_DIM, 72),    # widest head dim: 64-row tiles
]
TILED_SHAPES = [
    (1, 1, 300, 300, 64, 64),
    (1, 1, 150, 170, 40, 80),
    (1, 1, 129, 129, TRITON.SUPPORTED_MAX_HEAD_DIM, TRITON.SUPPORTED_MAX_HEAD_DIM),
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", PACKED_SHAPES + TILED_SHAPES, ids=shape_id)
def test_default_options(shape, dtype):
    run_and_check(*make_qkv(*shape, dtype))


@pytest.mark.parametrize("opts", OPTION_GRID, ids=opts_id)
@pytest.mark.parametrize("shape", [(3, 2, 33, 33, 40, 40), (1, 1, 200, 200, 32, 32), (2, 2, 9, 20, 16, 16),
                                   (1, 1, 140, 130, 16, 16)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_options(shape, opts, dtype):
    run_and_check(*make_qkv(*shape, dtype, seed=1), **opts)


@pytest.mark.parametrize("delta_shape", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 12, 18, 16, 16), (1, 2, 160, 144, 32, 32)], ids=shape_id)
@pytest.mark.parametrize("opts", [dict(), dict(causal=True, max_mode="global")], ids=["row", "causal-global"])
def test_custom_delta(shape, delta_shape, opts):
    delta = make_delta(delta_shape, *shape[:4])
    run_and_check(*make_qkv(*shape, torch.float32, seed=3), delta=delta, sigma=0.5, **opts)


@pytest.mark.parametrize("layout", ["bnhd", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 40, 40), (1, 2, 150, 150, 64, 64)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_strided_views(shape, layout, dtype):
    q, k, v = make_qkv(*shape, dtype, layout=layout, seed=4)
    assert not q.is_contiguous()
    run_and_check(q, k, v, causal=True)


def test_three_d_input():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(4, 17, 24, generator=g).to(DEVICE) for _ in range(3))
    out = vk.tar_attention(q, k, v, sigma=2.0, backend="triton")
    assert out.shape == (4, 17, 24)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, sigma=2.0))
    delta = torch.rand(4, 17, 17, generator=g).to(DEVICE)  # (B, Nq, Nk) for 3-D input
    out = vk.tar_attention(q, k, v, delta=delta, backend="triton")
    assert_close_to_reference(out.cpu(), reference64(q, k, v, delta=delta))


@pytest.mark.parametrize("n", [16, 200])
@pytest.mark.parametrize("causal", [False, True])
def test_plain_attention_invariants_match_sdpa(n, causal):
    q, k, v = make_qkv(2, 2, n, n, 32, 32, torch.float32, seed=6)
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    atol, rtol = TOLERANCES[torch.float32]
    for kwargs in (dict(strength=0.0), dict(sigma=math.inf), dict(sigma=math.inf, max_mode="global")):
        out = vk.tar_attention(q, k, v, causal=causal, backend="triton", **kwargs)
        torch.testing.assert_close(out, sdpa, atol=atol, rtol=rtol)


def test_output_keeps_input_dtype_and_device():
    for dtype in DTYPES:
        q, k, v = make_qkv(1, 1, 8, 8, 16, 16, dtype)
        out = vk.tar_attention(q, k, v, backend="triton")
        assert out.dtype == dtype and out.device == q.device
