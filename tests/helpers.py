"""Shared test helpers: the per-dtype tolerance table and an independent float64 evaluation."""

import math

import torch

# Kernel output vs the float64 reference: |out - ref| <= atol + rtol * |ref|.
# fp16/bf16 cover rounding P to the input dtype before P @ V and the output cast
# (the same error a float32 computation cast back to the input dtype makes).
TOLERANCES = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_close_to_reference(out, ref64, dtype=None):
    dtype = dtype or out.dtype
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "output has NaN (an element was not written?)"
    torch.testing.assert_close(out.double(), ref64.double(), atol=atol, rtol=rtol)


# Gradients vs float64 reference gradients, per tensor: |g - ref| <= atol * max|ref| + rtol * |ref|.
# atol is relative to the tensor's largest entry because gradient magnitudes vary with N, scale
# and strength. fp16/bf16 cover rounding P and dS to the input dtype before their matmuls (as the
# forward rounds P), which the reference (float32 math) does not do. Worst error / max|ref| seen
# over tests/test_triton_backward.py: 2.3e-6 (fp32), 1.1e-3 (fp16), 6.0e-3 (bf16).
GRAD_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}


def assert_grads_close(grads, refs, dtype, names=("dq", "dk", "dv", "ddelta")):
    """Each gradient against its float64 reference with GRAD_TOLERANCES[dtype]."""
    atol, rtol = GRAD_TOLERANCES[dtype]
    for name, g, ref in zip(names, grads, refs):
        assert g.shape == ref.shape, f"{name}: shape {tuple(g.shape)} != {tuple(ref.shape)}"
        assert not torch.isnan(g).any(), f"{name} has NaN (an element was not written?)"
        ref = ref.double()
        bound = atol * ref.abs().max().item() + rtol * ref.abs()
        err = (g.double() - ref).abs()
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (f"{name}: error {err.flatten()[worst].item():.3g} > bound "
                                      f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()}")


def naive_tar(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None):
    """Element-by-element float64 evaluation of ../shared/semantics.md for 4-D inputs.

    Written without the library's code so that the reference itself is checked.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, nq, d = q.shape
    nk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty(B, H, nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = scale * q[b, h] @ k[b, h].T
            if causal:
                for i in range(nq):
                    for j in range(nk):
                        if j > i:
                            s[i, j] = -math.inf
            if max_mode == "row":
                m = s.max(dim=1, keepdim=True).values
            else:
                m = s.max()
            if delta is None:
                da = torch.tensor([[math.exp(-0.5 * ((j - i) / sigma) ** 2) for j in range(nk)]
                                   for i in range(nq)], dtype=torch.float64)
            else:
                da = delta.double().expand(B, H, nq, nk)[b, h]
            s2 = s + strength * m * da
            out[b, h] = torch.softmax(s2, dim=1) @ v[b, h]
    return out
