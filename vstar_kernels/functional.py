"""The public entry point: validation, backend choice, and the call (through the vstar::tar_attention op)."""

from __future__ import annotations

import torch

from ._op import tar_attention_op
from ._problem import make_problem
from .dispatch import select


def tar_attention(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row",
                  scale=None, frames=None, key_mask=None, backend="auto") -> torch.Tensor:
    """Attention with VSTAR's temporal attention regularization (TAR).

    For each (batch, head) slice::

        S   = scale * q @ k^T                 (-inf where j > i if causal, and where key_mask is False)
        m_i = max_j S_ij                      (max_mode="row")  or  max_ij S_ij  ("global")
        S'  = S + strength * m * dA,  dA_ij = exp(-0.5 * ((j - i) / sigma) ** 2)  or `delta`
        out = softmax(S', dim=-1) @ v

    With frame ids, i and j in dA are the frames f(q_i) and f(k_j) of the tokens:
    ``dA_ij = exp(-0.5 * ((f(k_j) - f(q_i)) / sigma) ** 2)`` or ``delta[f(q_i), f(k_j)]``, and 0
    when either id is -1 (a token outside the video).

    Args:
        q: (B, H, Nq, D) or (B, Nq, D); float16, bfloat16, float32 (float64: reference only).
            Any strides: a (B, N, H, D) projection viewed as (B, H, N, D) is read in place.
        k: (B, H, Nk, D) or (B, Nk, D), same dtype and device as q.
        v: (B, H, Nk, Dv) or (B, Nk, Dv).
        sigma: width of the Gaussian, > 0; ``math.inf`` gives plain attention, and a sigma so small
            that dA's off-diagonal entries underflow gives dA = identity (down to the smallest float).
            Checked with `delta` too, where it is ignored.
        strength: the factor c of the bias (0 gives plain attention): a finite real with
            |strength| <= 3.4028235e+38, the largest float32 (any finite value for float64 input).
        delta: optional matrix replacing the Gaussian: (Nq, Nk) or broadcastable to (B, H, Nq, Nk)
            ((B, Nq, Nk) for 3-D input); with `frames`, the (F, F) frame matrix instead.
        causal: mask keys j > i (top-left aligned) before the max.
        max_mode: "row" (one max per query row, the reference's reading) or "global"
            (one max per (batch, head) over the masked score matrix).
        scale: softmax scale, default ``D ** -0.5``; bounded as strength is.
        frames: None (token i is frame i), or the frame of each token for a video DiT's
            attention over all tokens of all frames: an integer tensor (N,) for self-attention
            (query and key token i share id i), or a pair (q_frames (Nq,), k_frames (Nk,)); int8 to
            int64 on q's device, each id >= 0 (a latent frame, counted after the patch embedding)
            or -1 (a token outside the video: text, registers). `vstar_kernels.frame_ids` builds
            the usual layouts. With frames, `delta` is read as a frame matrix and must be
            (F, F) with F = the largest id + 1 (query and key ids together): any other shape
            raises, a token-sized (N, N) one included when the ids span fewer than N frames, and
            one for more frames is not read in part (pass ``delta[:F, :F]``); see
            docs/semantics.md. With frames the bias is applied whenever strength != 0 (at
            sigma = inf the video keys of a video row still get strength * m_i, and the others 0).
        key_mask: None, or a bool tensor (B, Nk) on q's device, True for a key to attend to. A
            masked key takes no part in the max or the softmax; a row left with no key gives 0
            (zeros in the output, zero gradients), not the NaN of a softmax over nothing.
        backend: "auto" (for CUDA tensors Triton, then "cuda", when one can run; else the
            reference), "triton" (CUDA tensors, or CPU tensors under TRITON_INTERPRET=1), "cuda"
            (the optional CUDA C++ operator, built with VSTAR_BUILD_CUDA=1) or "reference".
            An explicit backend that cannot run the call raises BackendUnavailableError. The
            Triton kernels take frames and key_mask (forward and backward, in their tiled
            layout at any length); the CUDA C++ operator takes neither ("auto" then skips it).

    Returns:
        (B, H, Nq, Dv) (or (B, Nq, Dv) for 3-D input), q's dtype and device. Math is float32
        inside whatever the input dtype (float64 for float64 input on the reference).

    Differentiable in q, k, v and a `delta` that requires grad on the triton and reference
    backends ("cuda" is forward only); the row max's gradient is torch.amax's (split evenly
    over ties). The call is the custom op
    ``torch.ops.vstar.tar_attention``, so ``torch.compile(fullgraph=True)`` and CUDA graphs
    capture it whole, with ``dynamic=True`` too (sizes and Python-float arguments traced
    symbolically). A call with `frames` reads the ids' extrema (a device synchronisation) to check
    them, so CUDA graphs cannot capture it; torch.compile can.

    NaN and infinity propagate the way the formula says, over the entries that take part. An entry
    masked by `causal` or by `key_mask` takes no part in anything: its score and its delta value are
    ignored, as if absent. Everything else that enters a row's max, bias or softmax does, with IEEE
    arithmetic. So a NaN in q row i makes row i NaN; with max_mode="global" it makes the max of its
    (batch, head) slice NaN, and so every row of that slice, whenever the bias is applied
    (strength != 0, and a delta, frame ids or a finite sigma is given: strength = 0 or sigma = inf
    without frame ids adds a per-row constant, which softmax ignores, so no bias is applied). A row
    with no key to attend to gives 0. A NaN in k makes NaN every row that attends to that key
    (with the global max and the bias applied, its whole slice). A NaN delta entry makes its row NaN
    unless the entry is masked; a masked delta entry changes nothing, whatever its value. v enters
    through the product P @ V, where a zero weight times inf or NaN is NaN: a NaN or inf in v at
    (key j, column d) makes column d non-finite in every row that attends to key j, and may make it
    non-finite in the other rows of the same (batch, head) slice (the reference's matrix product
    does so for all of them, the Triton kernels for those that share a tile with key j); it never
    reaches another slice. The math is float32 (float64 for float64 input on the reference): a
    strength or scale beyond that range is an error, and a product that overflows it inside the
    formula gives inf or NaN as IEEE arithmetic does; in particular a row whose strength * m_i
    overflows (or is NaN) is NaN whenever the bias is applied.
    """
    problem = make_problem(q, k, v, sigma=sigma, strength=strength, delta=delta, causal=causal,
                           max_mode=max_mode, scale=scale, frames=frames, key_mask=key_mask)
    impl = select(problem, backend)
    return problem.restore(tar_attention_op(problem, impl.name))
