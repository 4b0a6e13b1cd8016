"""The tiled forward's one-pass path (max_mode="row", Gaussian): the band it skips the bias outside
is where the bias is exactly 0, and the result is the two-pass result bit for bit.

The two-pass run (`tar_fwd._tar_forward` with ONE_PASS=False) takes m_i from a QK^T walk of every
key tile and adds the bias on every tile, in the one-pass kernel's tile order; the one-pass run
takes m_i from the off-band softmax's running max and a walk of the band tiles, and adds no bias
off the band. Same tile order, so the two are equal bit for bit exactly when the skipped bias is
exactly 0 and the assembled m_i is exactly the row max: that is what these tests check, in the
interpreter with small tiles (many off-band tiles), besides the float64 reference.
"""

import math

import numpy as np
import pytest
import torch

import vstar_kernels as vk
from vstar_kernels._problem import make_problem
from vstar_kernels.ops import layout
from vstar_kernels.ops.launch import BAND_EXPONENT, INTERPRETER_TILES, band_width, delta_args
from vstar_kernels.ops._load import triton_ops
from vstar_kernels.regularization import gaussian_bias

from .._device import DEVICE
from ..helpers import assert_close_to_reference, dtype_id, make_qkv, opts_id, reference64, shape_id

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

SIGMAS = [1e-20, 0.3, 0.5, 1.0, 2.0, 4.7, 8.0, 12.0, 40.0, 1e3]


def coef_of(sigma):
    q = torch.zeros(1, 1, 1, 8)
    problem = make_problem(q, q, q, sigma=sigma, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    return delta_args(problem)[2]


@pytest.mark.parametrize("sigma", SIGMAS)
def test_gaussian_is_exactly_zero_off_the_band(sigma):
    """Every |j - i| >= band_width: the kernel's float32 exp2(coef * d * d) is 0 (the interpreter's
    numpy, rounding to nearest; a flush-to-zero exp2 only adds zeros) and so is the reference's
    float32 Gaussian; one step inside the band the exponent is above the margin."""
    coef = coef_of(sigma)
    n = 40_000
    w = band_width(coef, 2 * n)
    assert 1 <= w <= 2 * n
    d = np.arange(w, 2 * n, dtype=np.float32)
    exponent = np.float32(coef) * d * d  # the kernel's (coef * dist) * dist in float32
    assert (exponent <= -150).all()
    assert (np.exp2(exponent) == 0).all()
    if w > 1:
        assert np.float64(coef) * (w - 1) ** 2 > BAND_EXPONENT
        assert w <= n  # these sigmas leave off-band keys in a sequence of n
    dA = gaussian_bias(1, 2 * n, sigma, dtype=torch.float32)[0]
    assert (dA[w:] == 0).all()
    assert float(np.exp2(np.float32(BAND_EXPONENT) + 10)) == 0.0  # -150: 0 with round to nearest


def test_band_width_limits():
    assert band_width(0.0, 300) == 300  # sigma = inf: every key
    assert band_width(-1e-9, 300) == 300  # wider than the sequence
    assert band_width(coef_of(1.0), 10_000) == 15  # sqrt(160 / (0.5 log2 e)) = 14.9
    assert band_width(-2.0 ** 32, 5) == 1  # the floored coefficient of a tiny sigma: the diagonal
    assert band_width(-5e-324, 300) == 300  # sigma ~1e161: the quotient overflows, every key
    assert band_width(coef_of(1e160), 2 ** 25) == 2 ** 25


def run_both(q, k, v, **opts):
    """(one-pass out, stats), (two-pass out, stats) of the tiled forward."""
    problem = make_problem(q, k, v, sigma=opts.get("sigma", 1.0), strength=opts.get("strength", 1.0), delta=None,
                           causal=opts.get("causal", False), max_mode="row", scale=opts.get("scale"))
    assert not layout.is_packed(problem.nq, problem.nk, problem.head_dim, problem.head_dim_v)
    runs = []
    for order in (True, False):
        stats = torch.full(layout.stats_shape(problem.batch * problem.heads, problem.nq, problem.nk,
                                              problem.head_dim, problem.head_dim_v, True), math.nan, device=DEVICE)
        out = torch.full(problem.output_shape(), math.nan, dtype=q.dtype, device=DEVICE)
        triton_ops().module._tar_forward(problem, out, stats, {} if order else dict(ONE_PASS=False))
        runs.append((out.cpu(), stats.cpu()))
    return problem, runs


@pytest.fixture
def small_tiles(monkeypatch):
    """32 x 16 tiles in the interpreter: most key tiles of a 150-frame sequence are off the band."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter's tiles are set by the launcher; on a GPU the autotuner picks them")
    monkeypatch.setitem(INTERPRETER_TILES, "forward", dict(BLOCK_M=32, BLOCK_N=16))


CASES = [
    ((1, 2, 150, 150, 16, 16), torch.float32, dict()),
    ((1, 1, 150, 150, 16, 16), torch.float16, dict(sigma=0.5, strength=2.0)),
    ((1, 1, 150, 150, 16, 16), torch.bfloat16, dict(sigma=2.0, strength=-1.5)),
    ((1, 1, 141, 150, 16, 16), torch.float32, dict(causal=True, sigma=1.0)),
    ((1, 1, 170, 131, 16, 8), torch.float16, dict(causal=True, sigma=0.3)),
    ((1, 1, 131, 170, 8, 16), torch.float32, dict(sigma=4.7, scale=0.3)),
    ((1, 1, 200, 135, 16, 16), torch.float32, dict(sigma=1.0)),  # rows past Nk: blocks with no band
    ((1, 1, 140, 140, 16, 16), torch.float32, dict(sigma=40.0)),  # the band is the whole sequence
    # a band of 224 and 179 keys, longer than Nq and Nk but shorter than their sum: taken as max(Nq, Nk)
    ((1, 1, 140, 140, 16, 16), torch.float32, dict(sigma=15.0)),
    ((1, 1, 131, 170, 16, 16), torch.float16, dict(sigma=12.0, causal=True)),
    ((1, 1, 131, 250, 16, 16), torch.float32, dict(sigma=40.0)),  # not causal, Nq != Nk: the band is max(Nq, Nk)
    ((1, 1, 250, 131, 16, 16), torch.float32, dict(sigma=40.0)),
    ((1, 1, 140, 140, 16, 16), torch.float32, dict(sigma=1e-20)),  # the band is the diagonal
]


@pytest.mark.parametrize("shape,dtype,opts", CASES, ids=lambda x: shape_id(x) if isinstance(x, tuple) else
                         dtype_id(x) if isinstance(x, torch.dtype) else opts_id(x))
def test_one_pass_is_the_two_pass_result_bit_for_bit(shape, dtype, opts, small_tiles):
    q, k, v = make_qkv(*shape, dtype, seed=7)
    problem, ((out, stats), (out2, stats2)) = run_both(q, k, v, **opts)
    torch.testing.assert_close(out, out2, rtol=0, atol=0)
    torch.testing.assert_close(stats, stats2, rtol=0, atol=0)
    assert_close_to_reference(out, reference64(q, k, v, **opts), dtype)
    # the statistics the backward reads: the raw row max and the log-sum-exp of S'
    s = q.double().cpu() @ k.double().cpu().transpose(-1, -2) * problem.scale
    nq, nk = problem.nq, problem.nk
    if problem.causal:
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), -math.inf)
    m = s.amax(-1)
    stats = stats.view(*shape[:2], nq, layout.STATS_FIELDS).double()
    torch.testing.assert_close(stats[..., layout.STAT_MAX], m, atol=1e-5, rtol=1e-5)
    s_reg = s + problem.strength * m[..., None] * gaussian_bias(nq, nk, problem.sigma, dtype=torch.float64)
    torch.testing.assert_close(stats[..., layout.STAT_LSE], torch.logsumexp(s_reg, -1), atol=1e-4, rtol=1e-5)


def test_sigma_inf_is_plain_attention(small_tiles):
    q, k, v = make_qkv(1, 1, 150, 150, 16, 16, torch.float32, seed=8)
    out = vk.tar_attention(q, k, v, sigma=math.inf, causal=True, backend="triton")
    assert_close_to_reference(out.cpu(), reference64(q, k, v, sigma=math.inf, causal=True), torch.float32)


def test_a_row_whose_bias_factor_overflows_is_nan(small_tiles):
    """strength * m_i = +-inf: off the band the definition's c * m_i * 0 is NaN in float32, and so is
    the row, as in the float32 reference; the other rows are untouched."""
    q, k, v = make_qkv(1, 1, 150, 150, 16, 16, torch.float32, seed=9)
    q[..., 5, :] *= 100.0  # row 5's max is far above every other row's
    m = (q @ k.transpose(-1, -2) * 0.25).amax(-1)
    strength = 1e38 / m[0, 0, :5].abs().max().item()  # c * m_i overflows for row 5 only
    opts = dict(sigma=1.0, strength=strength)
    _, ((out, _), (out2, _)) = run_both(q, k, v, **opts)
    ref32 = vk.tar_attention_reference(q.cpu(), k.cpu(), v.cpu(), **opts)
    bad = ~torch.isfinite(strength * m[0, 0].cpu())
    assert bad[5] and not bad.all()
    assert torch.isnan(out[0, 0, bad]).all() and torch.isnan(ref32[0, 0, bad]).all()
    assert not torch.isnan(out[0, 0, ~bad]).any()
    torch.testing.assert_close(out, out2, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(out[0, 0, ~bad].double(), reference64(q, k, v, **opts)[0, 0, ~bad],
                               atol=2e-5, rtol=2e-5)
