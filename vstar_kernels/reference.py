"""The PyTorch definition of TAR. Tests, the CPU fallback and the benchmarks use it.

Math runs in float32 (float64 for float64 input); the result is cast back to
the input dtype. The (batch x heads) axis is processed in chunks so that the
score matrices stay within a bounded amount of memory.
"""

from __future__ import annotations

import dataclasses
import math

import torch

from ._validation import TarProblem, make_problem
from .regularization import gaussian_bias

# Elements of one fp32 score chunk (B*H slices x Nq x Nk): 2**26 = 256 MiB.
CHUNK_ELEMENTS = 1 << 26


def tar_scores(problem: TarProblem, q, k, delta, dA):
    """S' = S + strength * max(S) * dA for one chunk, in the compute dtype (masked entries -inf).

    A causally masked entry takes no part: it is -inf in S (so not in the max) and again in S',
    whatever its bias (a NaN or inf delta entry there, or strength * max * dA = inf * 0).
    """
    s = torch.matmul(q, k.transpose(-1, -2)) * problem.scale
    mask = None
    if problem.causal:
        nq, nk = s.shape[-2:]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=s.device).triu_(1)
        s = s.masked_fill(mask, -math.inf)
    if not problem.regularized:
        return s
    if problem.max_mode == "row":
        m = s.amax(dim=-1, keepdim=True)
    else:
        m = s.amax(dim=(-2, -1), keepdim=True)
    bias = dA if delta is None else delta.to(s.dtype)
    s = s + problem.strength * m * bias
    return s if mask is None else s.masked_fill(mask, -math.inf)


def _chunks(batch: int, heads: int, per_chunk: int):
    """(batch slice, head slice) blocks of at most `per_chunk` (batch, head) slices, in (b, h) order:
    whole batches when `per_chunk` >= heads, else head ranges of one batch."""
    if per_chunk >= heads:
        step = per_chunk // heads
        return [(slice(b, b + step), slice(None)) for b in range(0, batch, step)]
    return [(slice(b, b + 1), slice(h, h + per_chunk)) for b in range(batch) for h in range(0, heads, per_chunk)]


def reference_forward(problem: TarProblem) -> torch.Tensor:
    """Evaluate a validated problem; returns (B, H, Nq, Dv) in the input dtype.

    Works on 4-D blocks of the (B, H) grid, so that a broadcast delta ((Nq, Nk), (1, H, Nq, Nk),
    (B, 1, Nq, Nk) expanded by stride 0) is only ever read through views: memory stays within
    one chunk of scores whatever delta's shape.
    """
    compute = torch.float64 if problem.dtype == torch.float64 else torch.float32
    B, H, nq, nk = problem.batch, problem.heads, problem.nq, problem.nk
    if B * H == 0 or nq == 0:
        return problem.q.new_empty(problem.output_shape())
    dA = None
    if problem.delta is None and problem.regularized:
        dA = gaussian_bias(nq, nk, problem.sigma, device=problem.device, dtype=compute)
    outs = []
    chunks = _chunks(B, H, max(1, CHUNK_ELEMENTS // (nq * nk)))
    for b, h in chunks:
        s = tar_scores(problem, problem.q[b, h].to(compute), problem.k[b, h].to(compute),
                       None if problem.delta is None else problem.delta[b, h], dA)
        p = torch.softmax(s, dim=-1)
        outs.append(torch.matmul(p, problem.v[b, h].to(compute)).to(problem.dtype))
    if chunks[0][1] == slice(None):
        return torch.cat(outs)
    return torch.cat(outs, dim=1).reshape(problem.output_shape())


def reference_backward(problem: TarProblem, grad_out: torch.Tensor, delta_grad: bool = False):
    """Gradients of `reference_forward` by autograd on the definition (the max's gradient is
    torch.amax's: split evenly over ties). Returns contiguous (dq, dk, dv, ddelta), ddelta the
    gradient of the (B, H, Nq, Nk) view `problem.delta` when delta_grad, else None.

    torch.func.vjp rather than torch.autograd: it also runs inside a custom op's implementation,
    which the dispatcher calls below the autograd key.
    """
    def forward(q, k, v, *delta):
        return reference_forward(dataclasses.replace(problem, q=q, k=k, v=v,
                                                     delta=delta[0] if delta else problem.delta))

    primals = (problem.q, problem.k, problem.v, *((problem.delta,) if delta_grad else ()))
    _, vjp = torch.func.vjp(forward, *primals)
    grads = [g.contiguous() for g in vjp(grad_out)]
    return (*grads[:3], grads[3] if delta_grad else None)


def tar_attention_reference(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False,
                            max_mode="row", scale=None) -> torch.Tensor:
    """TAR attention in plain PyTorch: the definition every other backend is tested against.

    Same arguments and shapes as :func:`vstar_kernels.tar_attention` (without
    ``backend``). Differentiable in q, k, v and delta through autograd.
    """
    problem = make_problem(q, k, v, sigma=sigma, strength=strength, delta=delta, causal=causal,
                           max_mode=max_mode, scale=scale)
    return problem.restore(reference_forward(problem))
