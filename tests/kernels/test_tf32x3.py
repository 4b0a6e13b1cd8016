"""float32 inputs on tensor cores: the "tf32x3" dot the kernels compile to, emulated in torch.

The Triton interpreter ignores tl.dot's input_precision (it multiplies float32 with numpy), so the
interpreter tests cannot see what TF32 does to float32 results. Here each product of the TAR
forward and backward (Q K^T, P V, dO V^T, P^T dO, dS K, dS^T Q) is computed as Triton lowers
input_precision="tf32x3" for NVIDIA GPUs: per operand hi = cvt.rna.tf32(x) (10 mantissa bits, to
nearest, ties away) and lo = x - hi; the tensor core reads an operand's top 19 bits (lo truncated
to TF32), multiplies exactly and accumulates in float32; lo @ hi, then hi @ lo onto it, then
hi @ hi onto that. (The hardware's own accumulation rounding is not IEEE's; float32 sums stand in
for it.) The result must stay within the float32 rows of the tolerance tables against the float64
reference, on the kernels' problem shapes; one TF32 product ("tf32", what allow_tf32 selects)
must not, or the check could not tell the two apart.
"""

import math

import pytest
import torch

from vstar_kernels.ops import launch

from ..helpers import GRAD_TOLERANCES, TOLERANCES, assert_grads_close, make_delta, make_qkv, reference_grads, \
    reference64

_TF32_DROPPED = (1 << 13) - 1  # float32 keeps 23 mantissa bits, TF32 10


def tf32_round(x):
    """cvt.rna.tf32.f32: x to TF32's 10 mantissa bits, to nearest with ties away from zero (finite x)."""
    bits = x.contiguous().view(torch.int32)
    return ((bits + (1 << 12)) & ~_TF32_DROPPED).view(torch.float32)


def tf32_truncate(x):
    """The top 19 bits of a float32 register: what a TF32 tensor-core instruction multiplies."""
    return (x.contiguous().view(torch.int32) & ~_TF32_DROPPED).view(torch.float32)


def dot_tf32x3(a, b):
    """a @ b (float32, batched) as input_precision="tf32x3" computes it."""
    a_hi, b_hi = tf32_round(a), tf32_round(b)
    a_lo, b_lo = tf32_truncate(a - a_hi), tf32_truncate(b - b_hi)
    small = torch.matmul(a_lo, b_hi)
    small = small + torch.matmul(a_hi, b_lo)
    small = torch.nan_to_num(small, nan=0.0, posinf=math.inf, neginf=-math.inf)
    return small + torch.matmul(a_hi, b_hi)


def dot_tf32(a, b):
    """a @ b (float32, batched) as input_precision="tf32" computes it: one product of the operands' top 19 bits."""
    return torch.matmul(tf32_truncate(a), tf32_truncate(b))


def with_dot(dot):
    """A differentiable matmul whose forward and backward products are all `dot`."""

    class Dot(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b):
            ctx.save_for_backward(a, b)
            return dot(a, b)

        @staticmethod
        def backward(ctx, grad):
            a, b = ctx.saved_tensors
            return dot(grad, b.transpose(-1, -2)), dot(a.transpose(-1, -2), grad)

    return Dot.apply


def tar_float32(q, k, v, mm, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None):
    """docs/semantics.md in float32 with every product by `mm`, in the kernels' order: S = (Q K^T) * scale,
    S' = S + strength * m * dA, O = exp(S' - max S') V / its row sums."""
    nq, nk = q.shape[-2], k.shape[-2]
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = mm(q, k.transpose(-1, -2)) * scale
    masked = torch.ones(nq, nk, dtype=torch.bool).triu(1) if causal else torch.zeros(nq, nk, dtype=torch.bool)
    s = s.masked_fill(masked, -math.inf)
    m = s.amax(-1, keepdim=True) if max_mode == "row" else s.amax((-2, -1), keepdim=True)
    if delta is None:
        dist = torch.arange(nk, dtype=torch.float32) - torch.arange(nq, dtype=torch.float32)[:, None]
        delta = torch.exp2(-0.5 * launch.LOG2E / sigma / sigma * dist * dist)
    s = (s + strength * m * delta).masked_fill(masked, -math.inf)
    p = torch.exp(s - s.amax(-1, keepdim=True).detach())
    return mm(p, v) / p.sum(-1, keepdim=True)


def worst_ratios(q, k, v, grad_out, mm, delta=None, **opts):
    """(output, gradients) worst |error| / tolerance of tar_float32 with `mm` against the float64 reference:
    the output with TOLERANCES, the gradients with GRAD_TOLERANCES (float32 rows; <= 1 passes)."""
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    d = delta.detach().clone().requires_grad_() if delta is not None else None
    out = tar_float32(*leaves, mm, delta=d, **opts)
    grads = torch.autograd.grad(out, leaves + ([d] if d is not None else []), grad_out)
    atol, rtol = TOLERANCES[torch.float32]
    ref = reference64(q, k, v, delta=delta, **opts)
    out_ratio = ((out.double() - ref).abs() / (atol + rtol * ref.abs())).max().item()
    refs = reference_grads(q, k, v, grad_out, delta=delta, **opts)
    g_atol, g_rtol = GRAD_TOLERANCES[torch.float32]
    grad_ratio = max(((g.double() - r.double()).abs() / (g_atol * r.abs().max() + g_rtol * r.abs())).max().item()
                     for g, r in zip(grads, refs))
    return out, grads, refs, out_ratio, grad_ratio


# (B, H, Nq, Nk, D, Dv): the packed kernels' shape, the tiled kernels' (statistics at N = 256), a DiT
# head dim (128) with a long contraction over keys and over queries (P V, dS^T Q), and Nq != Nk.
SHAPES = [(8, 4, 16, 16, 40, 40), (1, 4, 256, 256, 64, 64), (1, 1, 2048, 2048, 128, 128), (1, 2, 300, 1100, 80, 64)]
OPTIONS = [dict(), dict(causal=True, max_mode="global"), dict(sigma=4.0, strength=2.5, scale=0.2), dict(delta=True)]


def _case(shape, opts):
    B, H, nq, nk, d, dv = shape
    q, k, v = make_qkv(B, H, nq, nk, d, dv, torch.float32, device="cpu")
    grad_out = torch.randn(B, H, nq, dv, generator=torch.Generator().manual_seed(10))
    opts = dict(opts)
    delta = make_delta("nq_nk", B, H, nq, nk, device="cpu") if opts.pop("delta", False) else None
    return q, k, v, grad_out, delta, opts


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(o) or "default")
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}H{}Nq{}Nk{}D{}Dv{}".format(*s))
def test_tf32x3_within_float32_tolerances(shape, opts):
    q, k, v, grad_out, delta, opts = _case(shape, opts)
    out, grads, refs, out_ratio, grad_ratio = worst_ratios(q, k, v, grad_out, with_dot(dot_tf32x3), delta, **opts)
    print(f"tf32x3 worst error / float32 tolerance: output {out_ratio:.3g}, gradients {grad_ratio:.3g}")
    torch.testing.assert_close(out.double(), reference64(q, k, v, delta=delta, **opts),
                               atol=TOLERANCES[torch.float32][0], rtol=TOLERANCES[torch.float32][1])
    assert_grads_close(grads, refs, torch.float32)


@pytest.mark.parametrize("shape", SHAPES[1:3], ids=lambda s: "B{}H{}Nq{}Nk{}D{}Dv{}".format(*s))
def test_one_tf32_product_is_outside_float32_tolerances(shape):
    q, k, v, grad_out, delta, opts = _case(shape, {})
    _, _, _, out_ratio, grad_ratio = worst_ratios(q, k, v, grad_out, with_dot(dot_tf32), delta, **opts)
    assert out_ratio > 1 and grad_ratio > 1, (out_ratio, grad_ratio)


def test_tf32_emulation_rounds_as_the_gpu():
    # halfway cases go away from zero; the truncation drops the 13 low mantissa bits
    x = torch.tensor([1 + 2 ** -11, 1 + 3 * 2 ** -11, -(1 + 2 ** -11), 1 + 2 ** -12, 1 + 2 ** -10 + 2 ** -23])
    assert tf32_round(x).tolist() == [1 + 2 ** -10, 1 + 2 ** -9, -(1 + 2 ** -10), 1.0, 1 + 2 ** -10]
    assert tf32_truncate(x).tolist() == [1.0, 1 + 2 ** -10, -1.0, 1.0, 1 + 2 ** -10]
    # three TF32 products are about as accurate as one float32 product (an absolute bound would sit inside
    # float32's own rounding error: 1e-5 failed on 1 input in 6); one TF32 product loses three decimal digits
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 64, dtype=torch.float64, generator=gen) for _ in range(2))
    exact = a @ b
    err32, err3, err1 = ((dot(a.float(), b.float()).double() - exact).abs().max().item()
                         for dot in (torch.matmul, dot_tf32x3, dot_tf32))
    assert err3 <= 3 * err32 and err1 >= 1000 * err32, (err32, err3, err1)


@pytest.mark.parametrize("setting, expected", [
    (None, "tf32x3"),  # torch's default: no TF32 for float32 matmuls
    (("allow_tf32", False), "tf32x3"), (("allow_tf32", True), "tf32"),
    (("fp32_precision", "ieee"), "tf32x3"), (("fp32_precision", "tf32"), "tf32"),
])
def test_float32_dot_follows_torch_tf32_setting(setting, expected):
    # set and restored through torch's own setters: these are properties of torch's cuBLAS module, which
    # pytest's monkeypatch would try to delete on undo
    matmul = torch.backends.cuda.matmul
    name, value = setting or ("fp32_precision", matmul.fp32_precision)
    before = getattr(matmul, name)
    setattr(matmul, name, value)
    try:
        assert launch._precision(torch.float32) == expected
        assert launch._precision(torch.float16) == launch._precision(torch.bfloat16) == "tf32"  # ignored for 16-bit
    finally:
        setattr(matmul, name, before)
