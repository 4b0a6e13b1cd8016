"""Edge values on both backends: the NaN/inf rule of `tar_attention`, tiny sigma, empty queries,
and the reference's memory with a broadcast delta."""

import math

import numpy as np
import pytest
import torch
from helpers import make_qkv, reference64

import vstar_kernels as vk

BACKENDS = ["reference", "triton"]
# a packed-layout and a tiled-layout size (the Triton kernels have one code path each)
SIZES = [8, 130]


TINY_SIGMAS = [1e-3, 1e-20, 1e-170, 5e-324]


@pytest.mark.parametrize("sigma", TINY_SIGMAS + [0.3, 1.0, 7.5, 1e30, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gaussian_is_the_float64_definition_rounded_once(sigma, dtype):
    n = 40
    d = torch.arange(n, dtype=torch.float64)
    exact = torch.exp(-0.5 * ((d[None, :] - d[:, None]) / sigma) ** 2)
    assert torch.equal(vk.gaussian_toeplitz(n, sigma, dtype=dtype), exact.to(dtype))
    if sigma < 1e-2:
        assert torch.equal(vk.gaussian_toeplitz(n, sigma, dtype=dtype), torch.eye(n, dtype=dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", TINY_SIGMAS)
def test_tiny_sigma_is_the_identity(backend, n, sigma):
    """exp(-0.5 ((j - i) / sigma)^2) for a tiny sigma: 1 on the diagonal, 0 off it (a delta function)."""
    q, k, v = make_qkv(1, 1, n, n, 16, 16, torch.float32)
    out = vk.tar_attention(q, k, v, sigma=sigma, max_mode="global", backend=backend)
    assert torch.equal(out, vk.tar_attention(q, k, v, delta=torch.eye(n), max_mode="global", backend=backend))
    torch.testing.assert_close(out.double(), reference64(q, k, v, delta=torch.eye(n), max_mode="global"),
                               atol=2e-5, rtol=2e-5)


def test_gaussian_toeplitz_arguments():
    assert torch.equal(vk.gaussian_toeplitz(np.int64(5), np.float32(2.0)), vk.gaussian_toeplitz(5, 2.0))
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n must be a non-negative int"):
            vk.gaussian_toeplitz(bad, 1.0)
    for dtype in (torch.int64, torch.bool, "float32"):
        with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
            vk.gaussian_toeplitz(4, 1.0, dtype=dtype)
