"""The CUDA C++ kernel's block code, run on CPU by the host emulation, against the float64 reference.

bindings/emulate.cpp runs tar_block() -- what each GPU thread block runs -- over
every block and thread index with the launcher's plan (see that file for what
this covers and what only a GPU can check: tests/cuda/test_cuda_backend.py).
"""

import math

import pytest
import torch

from vstar_kernels import dispatch

from .cuda_toolchain import cuda_home, cxx_path, emulate, emulation_library, plan
from ..helpers import CUDA, CUDA_DTYPES, DELTA_KINDS, OPTION_GRID, TOLERANCES, assert_close_to_reference, dtype_id, \
    make_delta, make_qkv, opts_id, reference64, shape_id

pytestmark = pytest.mark.skipif(cuda_home() is None or cxx_path() is None,
                                reason="the emulation needs a host C++ compiler and the CUDA headers (cuda_fp16.h)")



def cpu_qkv(*shape, **kwargs):
    """make_qkv on CPU, where the emulation runs (also on a machine with a GPU)."""
    return make_qkv(*shape, device="cpu", **kwargs)


def check(q, k, v, **opts):
    out = emulate(q, k, v, **opts)
    assert_close_to_reference(out, reference64(q, k, v, **opts), q.dtype)
    return out


@pytest.mark.parametrize("d", [40, 64, 80, 128, CUDA.SUPPORTED_MAX_HEAD_DIM])
@pytest.mark.parametrize("n", [1, 7, 16, 33, 128, 256])
@pytest.mark.parametrize("dtype", CUDA_DTYPES, ids=dtype_id)
def test_forward_grid(n, d, dtype):
    B, H = (2, 3) if n <= 33 else (1, 2)
    check(*cpu_qkv(B, H, n, n, d, d, dtype, seed=n + d))


OPTIONS = OPTION_GRID + [dict(strength=0.0, max_mode="global")]
# (B, H, Nq, Nk, D, Dv): several sequences per block; row tiles (two-pass global max); Nq != Nk, Dv != D
OPTION_SHAPES = [(3, 2, 16, 16, 40, 40), (1, 2, 100, 100, 32, 32), (2, 2, 9, 20, 16, 24), (1, 1, 140, 130, 16, 8)]


@pytest.mark.parametrize("opts", OPTIONS, ids=opts_id)
@pytest.mark.parametrize("shape", OPTION_SHAPES, ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=dtype_id)
def test_options(shape, opts, dtype):
    check(*cpu_qkv(*shape, dtype, seed=1), **opts)


@pytest.mark.parametrize("delta_shape", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 12, 18, 16, 16), (1, 2, 160, 144, 32, 32)], ids=shape_id)
@pytest.mark.parametrize("case", ["fp32-row", "fp16-own-dtype-causal-global", "bf16-fp32-delta"])
def test_custom_delta(shape, delta_shape, case):
    dtype, delta_dtype, opts = {
        "fp32-row": (torch.float32, torch.float32, dict()),
        "fp16-own-dtype-causal-global": (torch.float16, torch.float16, dict(causal=True, max_mode="global")),
        "bf16-fp32-delta": (torch.bfloat16, torch.float32, dict(causal=True)),
    }[case]
    B, H, nq, nk = shape[:4]
    delta = make_delta(delta_shape, B, H, nq, nk, dtype=delta_dtype, device="cpu")
    q, k, v = cpu_qkv(*shape, dtype, seed=3)
    out = emulate(q, k, v, delta=delta.expand(B, H, nq, nk), sigma=math.inf, **opts)
    assert_close_to_reference(out, reference64(q, k, v, delta=delta, **opts), dtype)


@pytest.mark.parametrize("layout", ["bnhd", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 40, 40), (1, 2, 150, 150, 64, 64)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_strided_views(shape, layout, dtype):
    q, k, v = cpu_qkv(*shape, dtype, layout=layout, seed=4)
    assert not q.is_contiguous()
    B, H, nq, _, _, dv = shape
    out = torch.full((B, nq, H, dv), math.nan, dtype=dtype).transpose(1, 2)  # strided output too
    emulate(q, k, v, causal=True, out=out)
    assert_close_to_reference(out, reference64(q, k, v, causal=True), dtype)


def test_batch_times_heads_above_65535():
    # 16,400 x 4 = 65,600 sequences: the decomposition over blocks past the 65,535 grid-axis limit.
    q, k, v = cpu_qkv(16400, 4, 3, 3, 4, 4, torch.float16, layout="bnhd", seed=5)
    check(q, k, v, causal=True)


def test_plain_attention_equals_sdpa():
    q, k, v = cpu_qkv(2, 2, 33, 33, 32, 32, torch.float32, seed=6)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    atol, rtol = TOLERANCES[torch.float32]
    for opts in (dict(strength=0.0), dict(sigma=math.inf), dict(sigma=math.inf, max_mode="global")):
        torch.testing.assert_close(emulate(q, k, v, causal=True, **opts), sdpa, atol=atol, rtol=rtol)


@pytest.mark.parametrize("opts", [dict(causal=True), dict(max_mode="global")], ids=["causal", "global"])
@pytest.mark.parametrize("shape", [(5, 3, 16, 16, 40, 40), (1, 2, 200, 200, 24, 24)], ids=shape_id)
def test_result_does_not_depend_on_threads_blocks_or_their_order(shape, opts):
    # Every output element is computed by one thread in a fixed order, so any thread count, grid
    # size (grid-stride loop) or execution order must give the same bits. A phase that read what
    # another thread writes in the same phase (a race on the GPU) would break this.
    q, k, v = cpu_qkv(*shape, torch.float16, seed=7)
    base = emulate(q, k, v, **opts)
    blocks = plan(*shape, global_max="global_max" in opts)["num_blocks"]
    assert blocks > 1
    for threads, grid, reverse in ((256, blocks, True), (96, 2, False), (33, 1, True), (1, blocks, False)):
        assert torch.equal(emulate(q, k, v, threads=threads, grid=grid, reverse=reverse, **opts), base)


def test_plans_fit_shared_memory_and_pack_short_sequences():
    budget = emulation_library().vstar_limit(2)
    for n in (1, 7, 16, 33, 64, 128, 256, 512, 1024):
        for d in (8, 40, 64, 80, 128, 256):
            p = plan(2, 4, n, n, d, d)
            assert p is not None and p["smem_bytes"] <= budget, (n, d, p)
            assert p["rows"] * p["row_tiles"] >= n
    assert plan(1024, 8, 16, 16, 64, 64)["seqs"] == 4       # 4 sequences of 16 frames per block
    assert plan(1024, 8, 256, 256, 64, 64)["row_tiles"] > 1  # 256 frames: rows split over blocks
    assert plan(1, 1, 256, 256, 64, 64, global_max=True)["two_pass"] == 1
    assert plan(1, 1, 256, 256, 64, 64, global_max=True, regularize=False)["two_pass"] == 0
    assert plan(1, 1, 4, 1025, 64, 64) is None
    assert plan(1, 1, 4, 4, 257, 64) is None and plan(1, 1, 4, 4, 64, 257) is None


def test_python_limits_match_the_kernel():
    lib = emulation_library()
    assert dispatch.CudaBackend.SUPPORTED_MAX_HEAD_DIM == lib.vstar_limit(0)
    assert dispatch.CudaBackend.SUPPORTED_MAX_KEYS == lib.vstar_limit(1)


@pytest.mark.parametrize("sigma", [1e-20, 1e-170, 5e-324])
def test_tiny_sigma_is_the_identity_band(sigma):
    """A sigma so small that 1 / sigma^2 overflows: dA is exactly the identity, not NaN."""
    check(*cpu_qkv(2, 2, 16, 16, 32, 32, torch.float32, seed=3), sigma=sigma)
