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

# Elements of one fp32 score chunk (B*H slices x Nq x Nk): 2**26 = 256 MiB. The most any path holds.
CHUNK_ELEMENTS = 1 << 26
# Chunk of the in-place path (no autograd): 2**22 fp32 scores = 16 MiB, so that the scores stay
# in the last-level cache from the QK^T product to the PV product instead of streaming through
# DRAM once per elementwise pass, while each op still has enough work to amortize its thread-pool
# dispatch (smaller chunks were slower on a 2-core machine: see benchmarks/NOTES.md). Never more
# than CHUNK_ELEMENTS.
INPLACE_CHUNK_ELEMENTS = 1 << 22


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


def _needs_autograd(problem: TarProblem) -> bool:
    """True when the forward must stay differentiable (autograd, torch.func transforms) or traceable."""
    tensors = [t for t in (problem.q, problem.k, problem.v, problem.delta) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return True
    if any(torch._C._functorch.is_functorch_wrapped_tensor(t) for t in tensors):
        return True
    return torch.compiler.is_compiling()


def reference_forward(problem: TarProblem, inplace: bool = True) -> torch.Tensor:
    """Evaluate a validated problem; returns (B, H, Nq, Dv) in the input dtype.

    Works on 4-D blocks of the (B, H) grid, so that a broadcast delta ((Nq, Nk), (1, H, Nq, Nk),
    (B, 1, Nq, Nk) expanded by stride 0) is only ever read through views: memory stays within
    one chunk of scores whatever delta's shape.

    Without autograd the same operations run in place on cache-sized chunks (`_forward_inplace`);
    under autograd, torch.func or torch.compile (or with inplace=False) the out-of-place definition
    below runs.
    """
    compute = torch.float64 if problem.dtype == torch.float64 else torch.float32
    B, H, nq, nk = problem.batch, problem.heads, problem.nq, problem.nk
    if B * H == 0 or nq == 0:
        return problem.q.new_empty(problem.output_shape())
    dA = None
    if problem.delta is None and problem.regularized:
        dA = gaussian_bias(nq, nk, problem.sigma, device=problem.device, dtype=compute)
    if inplace and nk > 0 and not _needs_autograd(problem):
        return _forward_inplace(problem, compute, dA)
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


def _forward_inplace(problem: TarProblem, compute: torch.dtype, dA) -> torch.Tensor:
    """`tar_scores`, softmax and PV with the same operations in the same order, in place.

    One set of buffers (a chunk of scores, of q, k, v in the compute dtype, of row maxima) is
    reused by every chunk, small enough to stay in cache; q, k, v blocks that are not contiguous
    in the compute dtype are copied to contiguous buffers first so that both products are plain
    batched GEMMs, and the PV product is written
    straight into the output when it is in the compute dtype.
    """
    B, H, nq, nk = problem.batch, problem.heads, problem.nq, problem.nk
    d, dv = problem.head_dim, problem.head_dim_v
    per_chunk = max(1, min(CHUNK_ELEMENTS, INPLACE_CHUNK_ELEMENTS) // (nq * nk))
    chunks = _chunks(B, H, per_chunk)
    slices = max(_block_slices(b, h, B, H) for b, h in chunks)
    dev = problem.device
    s_buf = torch.empty(slices * nq * nk, device=dev, dtype=compute)
    q_buf = torch.empty(slices * nq * d, device=dev, dtype=compute)
    k_buf = torch.empty(slices * nk * d, device=dev, dtype=compute)
    v_buf = torch.empty(slices * nk * dv, device=dev, dtype=compute)
    m_buf = torch.empty(slices * nq, device=dev, dtype=compute)
    out = torch.empty(problem.output_shape(), device=dev, dtype=problem.dtype)
    o_buf = None if problem.dtype == compute else torch.empty(slices * nq * dv, device=dev, dtype=compute)
    mask = None
    if problem.causal:
        mask = torch.ones(nq, nk, dtype=torch.bool, device=dev).triu_(1)
    for b, h in chunks:
        qc = problem.q[b, h]
        bb, hh = qc.shape[:2]
        c = bb * hh
        q3 = _as_batch(qc, q_buf, compute)
        k3 = _as_batch(problem.k[b, h], k_buf, compute)
        v3 = _as_batch(problem.v[b, h], v_buf, compute)
        s = torch.bmm(q3, k3.transpose(1, 2), out=s_buf[: c * nq * nk].view(c, nq, nk))
        s.mul_(problem.scale)
        if mask is not None:
            s.masked_fill_(mask, -math.inf)
        if problem.regularized:
            if problem.max_mode == "row":
                m = torch.amax(s, dim=-1, keepdim=True, out=m_buf[: c * nq].view(c, nq, 1))
                m4 = m.view(bb, hh, nq, 1)
            else:
                m = torch.amax(s, dim=(-2, -1), keepdim=True, out=m_buf[:c].view(c, 1, 1))
                m4 = m.view(bb, hh, 1, 1)
            m.mul_(problem.strength)
            bias = dA if problem.delta is None else problem.delta[b, h].to(compute)
            s.view(bb, hh, nq, nk).addcmul_(m4, bias)
            if mask is not None:
                s.masked_fill_(mask, -math.inf)
        torch.softmax(s, dim=-1, out=s)
        o = out[b, h].view(c, nq, dv) if o_buf is None else o_buf[: c * nq * dv].view(c, nq, dv)
        torch.bmm(s, v3, out=o)
        if o_buf is not None:
            out[b, h].copy_(o.view(bb, hh, nq, dv))
    return out


def _as_batch(x: torch.Tensor, buf: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (b, h, n, d) block as a (b * h, n, d) batch in `dtype`: a view when it is one, else a copy into `buf`."""
    bb, hh, n, d = x.shape
    if x.dtype == dtype and x.is_contiguous():
        return x.view(bb * hh, n, d)
    return buf[: x.numel()].view(x.shape).copy_(x).view(bb * hh, n, d)


def _block_slices(b: slice, h: slice, batch: int, heads: int) -> int:
    return len(range(*b.indices(batch))) * len(range(*h.indices(heads)))


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
