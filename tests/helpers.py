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
