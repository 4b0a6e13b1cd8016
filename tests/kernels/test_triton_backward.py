"""The Triton backward (interpreter on CPU, compiled on CUDA) against float64 reference gradients.

The same shapes and options as test_triton_forward.py, fewer combinations, both layouts
(packed: max(Nq, Nk) <= 128, tiled beyond).
"""

import math

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels._problem import make_problem
from vstar_kernels.ops import layout
from vstar_kernels.ops._load import triton_backward_ops, triton_ops
from vstar_kernels.ops.launch import INTERPRETER_TILES

from .._device import DEVICE
from ..helpers import DELTA_KINDS, DTYPES, OPTION_GRID, assert_grads_close, dtype_id, make_delta, make_qkv, opts_id, \
    reference_grads, shape_id

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py): 112 interpreted backward calls


def random_grad_out(q, v, *, layout_="bhnd", seed=10):
    """An output gradient (B, H, Nq, Dv), contiguous or as a strided (B, N, H, D) view."""
    B, H, nq, dv = *q.shape[:3], v.shape[-1]
    g = torch.Generator().manual_seed(seed)
    if layout_ == "bnhd":
        return torch.randn(B, nq, H, dv, generator=g).to(device=q.device, dtype=q.dtype).transpose(1, 2)
    return torch.randn(B, H, nq, dv, generator=g).to(device=q.device, dtype=q.dtype)


def run_and_check(q, k, v, *, delta=None, grad_layout="bhnd", **opts):
    """Kernel forward (saving statistics) and backward into NaN-poisoned buffers vs float64 autograd."""
    problem = make_problem(q, k, v, sigma=opts.get("sigma", 1.0), strength=opts.get("strength", 1.0),
                           delta=delta, causal=opts.get("causal", False), max_mode=opts.get("max_mode", "row"),
                           scale=opts.get("scale"))
    shape = layout.stats_shape(problem.batch * problem.heads, problem.nq, problem.nk, problem.head_dim,
                               problem.head_dim_v, needs_grad=True)
    stats = torch.full(shape, math.nan, device=q.device)
    out = triton_ops().module.tar_forward(problem, stats=stats if stats.numel() else None)
    assert not torch.isnan(stats).any(), "a row statistic was not written"
    grad_out = random_grad_out(q, v, layout_=grad_layout)
    poisoned = tuple(torch.full(t.shape, math.nan, device=q.device, dtype=q.dtype) for t in (q, k, v))
    grads = triton_backward_ops().module.tar_backward(problem, out, stats, grad_out, delta_grad=delta is not None,
                                                      grads=poisoned)
    refs = reference_grads(q, k, v, grad_out, delta=delta, **opts)
    if delta is not None:  # the kernel's gradient is for the broadcast (B, H, Nq, Nk) view
        grads = (*grads[:3], grads[3].sum_to_size(delta.shape))
    assert_grads_close([g.cpu() for g in grads if g is not None], refs, q.dtype)


# (B, H, Nq, Nk, D, Dv): packed layout, then tiled
PACKED_SHAPES = [
    (3, 2, 1, 1, 8, 8),
    (2, 3, 7, 7, 40, 40),
    (5, 3, 16, 16, 64, 64),     # 15 sequences: the last program is partly empty
    (2, 2, 20, 50, 32, 24),     # Nq != Nk, Dv != D
    (2, 1, 24, 24, 256, 72),    # widest head dim: 64-row tiles
]
TILED_SHAPES = [
    (1, 1, 150, 170, 40, 80),
    (1, 1, 70, 66, 256, 200),   # head dims > 128: tiled above 64 frames
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", PACKED_SHAPES + TILED_SHAPES, ids=shape_id)
def test_default_options(shape, dtype):
    run_and_check(*make_qkv(*shape, dtype))


@pytest.mark.parametrize("opts", OPTION_GRID + [dict(strength=0.0, max_mode="global")], ids=opts_id)
@pytest.mark.parametrize("shape,dtype", [((2, 2, 9, 20, 16, 16), torch.float32), ((2, 2, 9, 20, 16, 16), torch.float16),
                                         ((1, 1, 140, 130, 16, 16), torch.float32)],
                         ids=["packed-fp32", "packed-fp16", "tiled-fp32"])
def test_options(shape, opts, dtype):
    run_and_check(*make_qkv(*shape, dtype, seed=1), **opts)


@pytest.mark.parametrize("delta_shape", DELTA_KINDS)
@pytest.mark.parametrize("shape", [(2, 3, 12, 18, 16, 16), (1, 2, 140, 132, 16, 16)], ids=shape_id)
@pytest.mark.parametrize("opts", [dict(), dict(causal=True, max_mode="global")], ids=["row", "causal-global"])
def test_custom_delta_requires_grad(shape, delta_shape, opts):
    delta = make_delta(delta_shape, *shape[:4])
    run_and_check(*make_qkv(*shape, torch.float32, seed=3), delta=delta, **opts)


@pytest.mark.parametrize("layout_", ["bnhd", "sliced"])
@pytest.mark.parametrize("shape", [(2, 3, 16, 16, 40, 40), (1, 2, 136, 136, 32, 32)], ids=shape_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_strided_views(shape, layout_, dtype):
    q, k, v = make_qkv(*shape, dtype, layout=layout_, seed=4)
    assert not q.is_contiguous()
    run_and_check(q, k, v, causal=True, max_mode="global", grad_layout="bnhd")


def tied_qkv(n, seed):
    """Integer-valued q and keys drawn from three vectors: scores tie exactly in any arithmetic
    (integer sums), in many rows and across rows."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (1, 2, n, 16), generator=g).float()
    keys = torch.randint(-2, 3, (1, 2, 3, 16), generator=g).float()
    k = keys[:, :, torch.randint(0, 3, (n,), generator=g)]
    q[:, :, 1::4] = 0.0  # rows whose every score ties
    v = torch.randn(1, 2, n, 16, generator=g)
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_mode", ["row", "global"])
@pytest.mark.parametrize("n", [12, 140])
def test_ties_split_the_max_gradient_like_amax(n, max_mode, causal):
    q, k, v = tied_qkv(n, seed=n)
    problem = make_problem(q, k, v, sigma=1.0, strength=1.0, delta=None, causal=causal, max_mode=max_mode,
                           scale=None)
    s = q @ k.transpose(-1, -2) * problem.scale
    if causal:
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool, device=DEVICE).triu(1), -math.inf)
    ties = (s == s.amax(-1, keepdim=True)).sum(-1)
    assert (ties > 1).float().mean() > 0.3, "the inputs must tie in many rows"
    run_and_check(q, k, v, causal=causal, max_mode=max_mode)


@pytest.mark.parametrize("nq,nk,max_mode,causal", [(150, 140, "row", False), (150, 140, "global", True),
                                                   (130, 200, "row", True), (130, 200, "global", False)])
def test_saved_row_statistics(nq, nk, max_mode, causal):
    """The tiled forward's statistics: raw row max and log-sum-exp of S'."""
    q, k, v = make_qkv(1, 2, nq, nk, 16, 16, torch.float32, seed=5)
    problem = make_problem(q, k, v, sigma=2.0, strength=1.5, delta=None, causal=causal, max_mode=max_mode,
                           scale=None)
    stats = torch.full(layout.stats_shape(2, nq, nk, 16, 16, True), math.nan, device=DEVICE)
    triton_ops().module.tar_forward(problem, stats=stats)
    s = q.double() @ k.double().transpose(-1, -2) * problem.scale
    if causal:
        s = s.masked_fill(torch.ones(nq, nk, dtype=torch.bool, device=DEVICE).triu(1), -math.inf)
    m = s.amax(-1)
    stats = stats.view(2, nq, layout.STATS_FIELDS)
    torch.testing.assert_close(stats[..., layout.STAT_MAX].double(), m[0], atol=1e-5, rtol=1e-5)
    bias_max = m if max_mode == "row" else m.amax(-1, keepdim=True).expand_as(m)
    i = torch.arange(nq, dtype=torch.float64, device=DEVICE)[:, None]
    j = torch.arange(nk, dtype=torch.float64, device=DEVICE)[None, :]
    s_reg = s + 1.5 * bias_max[..., None] * torch.exp(-0.5 * ((j - i) / 2.0) ** 2)
    torch.testing.assert_close(stats[..., layout.STAT_LSE].double(), torch.logsumexp(s_reg, -1)[0],
                               atol=1e-5, rtol=1e-5)


def duplicated_keys(n, d, seed, static=False):
    """Random q, k, v with every odd key a copy of an even one (repeated frames), or with every key
    the same (a static video: every score of a row ties).

    The static video's q and k are multiples of 1/8: torch's own float64 matmul (the oracle's)
    can round equal columns differently, and with these values every sum is exact."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, 2, n, d, generator=g) for _ in range(3))
    if static:
        q, k = (torch.round(t * 8) / 8 for t in (q, k))
        k[:] = k[:, :, :1]
    else:
        k[..., 1::2, :] = k[..., 0::2, :][..., :n // 2, :]
    return q.to(DEVICE), k.to(DEVICE), v.to(DEVICE)


@pytest.mark.parametrize("tiles", [None, (32, 64), (16, 128)],
                         ids=lambda t: "bwd-default-tiles" if t is None else f"bwd{t[0]}x{t[1]}")
@pytest.mark.parametrize("static", [False, True], ids=["repeated-frames", "static-video"])
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_tied_keys_whatever_the_tiles(max_mode, static, tiles, monkeypatch):
    """Exactly tied keys in random data: the gradient must not depend on how the forward's or the
    backward's tiles round the scores. In the interpreter the forward runs 64 x 64 tiles, the
    backward 64 x 32 by default; on a GPU each pass runs the tiles its autotuner picks."""
    if tiles is not None:
        if DEVICE != "cpu":
            pytest.skip("the interpreter's tiles are set by the launcher; on a GPU the autotuner picks them")
        monkeypatch.setitem(INTERPRETER_TILES, "backward", dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1]))
    q, k, v = duplicated_keys(150, 40, seed=0, static=static)
    run_and_check(q, k, v, max_mode=max_mode, causal=static)


def grad_errors(grads, refs):
    return [((g.double() - r).norm() / r.norm()).item() for g, r in zip(grads, refs)]


@pytest.mark.parametrize("strength", [0.0, 2.0, 8.0])
@pytest.mark.parametrize("max_mode", ["row", "global"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_16bit_gradients_as_accurate_as_the_reference_in_that_dtype(dtype, max_mode, strength):
    """Tiled layout, a strong narrow band: each gradient's relative error (against float64 on the same
    16-bit inputs) is at most twice that of the reference run in the 16-bit dtype, plus one rounding
    to that dtype (the kernel rounds P and dS to it for the tensor cores; the reference keeps them
    in float32). 140 tokens: the tiled layout, past the packed one's 128."""
    assert not layout.is_packed(140, 140, 64, 64)
    q, k, v = make_qkv(1, 2, 140, 140, 64, 64, dtype, seed=1)
    grad_out = random_grad_out(q, v)
    opts = dict(sigma=1.0, strength=strength, max_mode=max_mode)
    refs = reference_grads(q, k, v, grad_out, **opts)
    errors = {}
    for backend in ("triton", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
        out = vk.tar_attention(*leaves, backend=backend, **opts)
        errors[backend] = grad_errors(torch.autograd.grad(out, leaves, grad_out), refs)
    rounding = torch.finfo(dtype).eps / 2
    for name, ours, theirs in zip(("dq", "dk", "dv"), errors["triton"], errors["reference"]):
        assert ours <= 2 * theirs + rounding, f"{name}: relative error {ours:.3g} vs {theirs:.3g} for the reference"


def test_inference_saves_no_statistics():
    q, k, v = make_qkv(1, 1, 140, 140, 16, 16, torch.float32)
    assert layout.stats_shape(1, 140, 140, 16, 16, needs_grad=False) == (0, layout.STATS_FIELDS)
    assert layout.stats_shape(4, 64, 64, 16, 16, needs_grad=True) == (0, layout.STATS_FIELDS)  # packed
    problem = make_problem(q, k, v, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    with pytest.raises(ValueError, match="stats must be a contiguous float32"):
        triton_ops().module.tar_forward(problem, stats=torch.empty(1, 140, 3, device=DEVICE))


@pytest.mark.parametrize("n", [16, 140])
def test_public_api_gradients(n):
    """tar_attention(backend="triton") through the custom op and autograd, 3-D input, delta grad."""
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(3, n, 24, generator=g).to(DEVICE).requires_grad_() for _ in range(3))
    delta = torch.rand(n, n, generator=g).to(DEVICE).requires_grad_()
    out = vk.tar_attention(q, k, v, delta=delta, max_mode="global", backend="triton")
    assert out.shape == (3, n, 24)
    grad_out = torch.randn(3, n, 24, generator=g).to(DEVICE)
    out.backward(grad_out)
    refs = reference_grads(q, k, v, grad_out, delta=delta, max_mode="global")
    assert_grads_close([t.grad.cpu() for t in (q, k, v, delta)], refs, torch.float32)


def test_grad_only_for_some_inputs():
    q, k, v = make_qkv(2, 2, 12, 12, 16, 16, torch.float16, seed=7)
    v.requires_grad_()
    delta = torch.rand(12, 12, device=DEVICE)  # does not require grad
    out = vk.tar_attention(q, k, v, delta=delta, backend="triton")
    grad_out = random_grad_out(q, v)
    (dv,) = torch.autograd.grad(out, v, grad_out)
    refs = reference_grads(q, k, v, grad_out, delta=delta)
    assert_grads_close([dv.cpu()], refs[2:3], torch.float16, names=("dv",))
