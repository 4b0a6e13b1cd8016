"""The tolerances, in one place (tests/helpers.py takes them from here), and the check every output passes
before it is timed (benchmarks/NOTES.md, "Correctness before timing")."""

from __future__ import annotations

import torch

import vstar_kernels as vk

from .peers import TarSpec, gaussian, tar_formula

# A kernel's output against the float64 reference: |out - ref| <= atol + rtol * |ref|. fp16/bf16 cover
# rounding P to the input dtype before P @ V and the output cast (the same error a float32 computation
# cast back to the input dtype makes).
TOLERANCES = {torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# A gradient against the float64 reference's, per tensor: |g - ref| <= atol * max|ref| + rtol * |ref|
# (gradient magnitudes vary with N, scale and strength). fp16/bf16 cover rounding P and dS to the input
# dtype before their matmuls, which the reference (float32 math) does not do. Worst error / max|ref| seen
# over tests/kernels/test_triton_backward.py: 2.3e-6 (fp32), 1.1e-3 (fp16), 6.0e-3 (bf16).
GRAD_TOLERANCES = {torch.float32: (1e-5, 1e-5), torch.float16: (3e-3, 3e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
# A UNet forward with TAR's Triton backend against the same with its reference backend: the largest
# ||triton - reference|| / ||reference|| (bench.e2e).
UNET_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


def check_indices(batch: int) -> list:
    """The first, middle and last batch entries: the last shows a grid-indexing bug past 65,535 programs."""
    return sorted({0, batch // 2, batch - 1})


def check_output(out, q, k, v, spec: TarSpec, plain: bool) -> str:
    """"" when `out` (the peer's output for q, k, v) is right on check_indices: within twice the error of the
    definition computed naively in q's dtype (tar_formula) plus the kernel's atol of the float64 reference;
    else why not."""
    expected = tuple(q.shape[:3]) + (v.shape[3],)
    if not isinstance(out, torch.Tensor) or tuple(out.shape) != expected:
        return f"output has shape {tuple(getattr(out, 'shape', ()))}, expected {expected}"
    if out.dtype != q.dtype:
        return f"output dtype {out.dtype}, expected {q.dtype}"
    idx = torch.tensor(check_indices(q.shape[0]), device=q.device)
    qs, ks, vs = q[idx], k[idx], v[idx]
    strength = 0.0 if plain else spec.strength
    gold = vk.tar_attention_reference(qs.double(), ks.double(), vs.double(), sigma=spec.sigma, strength=strength,
                                      scale=spec.scale)
    got = out[idx].double()
    if not torch.isfinite(got).all():
        return "output has NaN or inf"
    err = (got - gold).abs().max().item()
    naive = tar_formula(qs, ks, vs, gaussian(q.shape[2], spec.sigma, str(q.device), q.dtype), spec.scale, strength)
    bound = 2 * (naive.double() - gold).abs().max().item() + TOLERANCES[q.dtype][0]
    if err > bound:
        return f"output differs from the float64 reference: max error {err:.3g} > bound {bound:.3g}"
    return ""
