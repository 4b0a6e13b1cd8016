"""A fast wrong peer is not a peer: every output is checked against float64 before it is timed
(the rule: benchmarks/NOTES.md, "Correctness before timing")."""

from __future__ import annotations

import torch

import vstar_kernels as vk

from .peers import TarSpec

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def check_indices(batch: int) -> list:
    """The first, middle and last batch entries: the last shows a grid-indexing bug past 65,535 programs."""
    return sorted({0, batch // 2, batch - 1})


def naive_low_precision(q, k, v, spec: TarSpec, plain: bool):
    """S, row max, bias, softmax and P V all in q's dtype: the error budget of a low-precision peer."""
    strength = 0.0 if plain else spec.strength
    s = torch.matmul(q, k.transpose(-1, -2)) * spec.scale
    if strength:
        dA = vk.gaussian_toeplitz(q.shape[2], spec.sigma, device=q.device, dtype=q.dtype)
        s = s + (strength * s.amax(dim=-1, keepdim=True)) * dA
    return torch.matmul(torch.softmax(s, dim=-1), v)


def check_output(out, q, k, v, spec: TarSpec, plain: bool) -> str:
    """"" when `out` (the peer's output for q, k, v) is right on check_indices: within twice the error of
    naive_low_precision plus ATOL of the float64 reference; else why not."""
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != tuple(q.shape[:3]) + (v.shape[3],):
        return f"output has shape {tuple(getattr(out, 'shape', ()))}, expected {tuple(q.shape[:3]) + (v.shape[3],)}"
    if out.dtype != q.dtype:
        return f"output dtype {out.dtype}, expected {q.dtype}"
    idx = torch.tensor(check_indices(q.shape[0]), device=q.device)
    qs, ks, vs = q[idx], k[idx], v[idx]
    gold = vk.tar_attention_reference(qs.double(), ks.double(), vs.double(), sigma=spec.sigma,
                                      strength=0.0 if plain else spec.strength, scale=spec.scale)
    got = out[idx].double()
    if not torch.isfinite(got).all():
        return "output has NaN or inf"
    err = (got - gold).abs().max().item()
    budget = (naive_low_precision(qs, ks, vs, spec, plain).double() - gold).abs().max().item()
    bound = 2 * budget + ATOL[q.dtype]
    if err > bound:
        return f"output differs from the float64 reference: max error {err:.3g} > bound {bound:.3g}"
    return ""
