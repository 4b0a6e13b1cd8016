"""The public entry point: validation, backend choice, and the call (through the vstar::tar_attention op)."""

from __future__ import annotations

import torch

from ._op import tar_attention_op
from ._validation import make_problem
from .dispatch import select


def tar_attention(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row",
                  scale=None, backend="auto") -> torch.Tensor:
    """Attention with VSTAR's temporal attention regularization (TAR).

    For each (batch, head) slice::

        S   = scale * q @ k^T                 (j > i masked to -inf if causal)
        m_i = max_j S_ij                      (max_mode="row")  or  max_ij S_ij  ("global")
        S'  = S + strength * m * dA,  dA_ij = exp(-0.5 * ((j - i) / sigma) ** 2)  or `delta`
        out = softmax(S', dim=-1) @ v

    Args:
        q: (B, H, Nq, D) or (B, Nq, D); float16, bfloat16, float32 (float64: reference only).
            Any strides: a (B, N, H, D) projection viewed as (B, H, N, D) is read in place.
        k: (B, H, Nk, D) or (B, Nk, D), same dtype and device as q.
        v: (B, H, Nk, Dv) or (B, Nk, Dv).
        sigma: width of the Gaussian, > 0; ``math.inf`` gives plain attention. Ignored with `delta`.
        strength: the factor c of the bias (any finite real; 0 gives plain attention).
        delta: optional matrix replacing the Gaussian: (Nq, Nk) or broadcastable to (B, H, Nq, Nk)
            ((B, Nq, Nk) for 3-D input).
        causal: mask keys j > i (top-left aligned) before the max.
        max_mode: "row" (one max per query row, the reference's reading) or "global"
            (one max per (batch, head) over the masked score matrix).
        scale: softmax scale, default ``D ** -0.5``.
        backend: "auto" (for CUDA tensors Triton, then "cuda", when one can run; else the
            reference), "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda"
            (the optional CUDA C++ operator, built with VSTAR_BUILD_CUDA=1) or "reference".
            An explicit backend that cannot run the call raises BackendUnavailableError.

    Returns:
        (B, H, Nq, Dv) (or (B, Nq, Dv) for 3-D input), q's dtype and device. Math is float32
        inside whatever the input dtype (float64 for float64 input on the reference).

    Differentiable in q, k, v and a `delta` that requires grad on the triton and reference
    backends ("cuda" is forward only); the row max's gradient is torch.amax's (split evenly
    over ties). The call is the custom op
    ``torch.ops.vstar.tar_attention``, so ``torch.compile(fullgraph=True)`` and CUDA graphs
    capture it whole.
    """
    problem = make_problem(q, k, v, sigma=sigma, strength=strength, delta=delta, causal=causal,
                           max_mode=max_mode, scale=scale)
    impl = select(problem, backend)
    return problem.restore(tar_attention_op(problem, impl.name))
