"""The PyTorch definition of TAR, readable as the spec: `tar_attention_reference`, the "reference" backend and
the tests' float64 oracle run it (cpu.py runs its operations in place). Math in float32 (float64 for float64
input), cast back; (batch x heads) slices and a long sequence's query rows go in chunks of bounded memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import torch

from ._problem import TarProblem, check_frame_values, make_problem
from .frames import frame_bias
from .regularization import gaussian_bias

# Elements of one fp32 score chunk (B*H slices x Nq rows x Nk): 2**26 = 256 MiB, the most any tensor of the
# definition holds (but for a row block's 8-byte frame distances).
CHUNK_ELEMENTS = 1 << 26


def tar_scores(problem: TarProblem, q, k, delta, dA, *, mask=None, m=None):
    """S' = S + strength * max(S) * dA for one chunk, in the compute dtype (masked entries -inf).

    q: a block of query rows, k the keys; `delta` a block of the per-entry delta (or None), else `dA`.
    `mask`: True where an entry takes no part (default: the causal mask when causal); a masked entry is
    -inf in S (not in the max) and in S', whatever its bias. `m`: the max to use (the slice's, when its
    rows come in several blocks); by default this chunk's.
    """
    if mask is None and problem.causal:
        mask = _causal_mask(0, q.shape[-2], k.shape[-2], q.device)
    s = _masked_scores(problem, q, k, mask)
    if not problem.regularized:
        return s
    if m is None:
        m = s.amax(dim=-1 if problem.max_mode == "row" else (-2, -1), keepdim=True)
    if mask is not None and problem.key_mask is not None:
        # A row (global: a slice) with no key to attend to has the max -inf; it gives 0 and takes
        # no bias, so that no -inf * 0 reaches the delta's gradient.
        empty = mask.all(dim=-1, keepdim=True) if problem.max_mode == "row" else mask.all(dim=(-2, -1), keepdim=True)
        m = m.masked_fill(empty & torch.isneginf(m), 0.0)
    bias = dA if delta is None else delta.to(s.dtype)
    c = problem.strength * m
    if problem.delta is None:
        s = s + c * bias
    else:  # an entry of weight 0 (c * delta = -inf) or a masked one takes no part in m's gradient (0 * inf is NaN)
        off = torch.isneginf((c * bias).detach())
        off = off if mask is None else off | mask
        s = torch.where(off, -math.inf, s + c * bias.masked_fill(off, 0.0))
    return s if mask is None else s.masked_fill(mask, -math.inf)


def _masked_scores(problem: TarProblem, q, k, mask) -> torch.Tensor:
    """The scaled scores q @ k^T of a chunk, -inf where `mask` (None: no mask) is True."""
    if mask is not None:  # a key no row of the chunk attends to is 0 here, so that its NaN reaches no dq (0 * NaN)
        k = k.masked_fill(mask.all(dim=-2).unsqueeze(-1), 0.0)
    s = torch.matmul(q, k.transpose(-1, -2)) * problem.scale
    return s if mask is None else s.masked_fill(mask, -math.inf)


def _causal_mask(first: int, rows: int, nk: int, device) -> torch.Tensor:
    """(rows, nk) True where key j comes after query first + i (the causal mask of one row block)."""
    return torch.ones(rows, nk, dtype=torch.bool, device=device).triu_(first + 1)


def _chunks(batch: int, heads: int, per_chunk: int):
    """(batch slice, head slice) blocks of at most `per_chunk` (batch, head) slices, in (b, h) order:
    whole batches when `per_chunk` >= heads, else head ranges of one batch."""
    if per_chunk >= heads:
        step = per_chunk // heads
        return [(slice(b, b + step), slice(None)) for b in range(0, batch, step)]
    return [(slice(b, b + 1), slice(h, h + per_chunk)) for b in range(batch) for h in range(0, heads, per_chunk)]


def _plan(B: int, H: int, nq: int, nk: int, budget: int):
    """(row blocks, (batch, head) blocks) of at most `budget` scores: whole slices while one fits, else row blocks."""
    if nq * nk <= budget:
        return [slice(0, nq)], _chunks(B, H, budget // (nq * nk))
    rows = max(1, budget // nk)
    return [slice(r, r + rows) for r in range(0, nq, rows)], _chunks(B, H, 1)


def _row_bias(problem: TarProblem, compute: torch.dtype):
    """A function of a block of query rows giving the (rows, Nk) bias every slice shares (None without bias or
    with a per-entry `delta`): rows of the Gaussian Toeplitz matrix, or with frame ids `frame_bias`'s."""
    if not problem.regularized or (problem.delta is not None and problem.frames_q is None):
        return lambda rows: None
    if problem.frames_q is None:
        dA = gaussian_bias(problem.nq, problem.nk, problem.sigma, device=problem.device, dtype=compute)
        return lambda rows: dA[rows]
    return lambda rows: frame_bias(problem.frames_q[rows], problem.frames_k, sigma=problem.sigma,
                                   delta=problem.delta, dtype=compute)


def _mask(problem: TarProblem, rows: slice, b: slice):
    """True where an entry of a (batch block, rows) chunk takes no part: (rows, Nk) causal, (bb, 1, rows, Nk)
    with a key mask; None when every entry takes part."""
    first, stop, _ = rows.indices(problem.nq)
    mask = _causal_mask(first, stop - first, problem.nk, problem.device) if problem.causal else None
    if problem.key_mask is None:
        return mask
    dropped = ~problem.key_mask[b][:, None, None, :]
    return dropped if mask is None else dropped | mask


def _entry_delta(problem: TarProblem, b, h, rows):
    """The per-entry delta of a chunk (a view), or None when the bias is a row-block bias."""
    return None if problem.delta is None or problem.frames_q is not None else problem.delta[b, h, rows]


def reference_forward(problem: TarProblem) -> torch.Tensor:
    """Evaluate a validated problem; returns (B, H, Nq, Dv) in the input dtype. Chunks of at most CHUNK_ELEMENTS
    scores, the bias one block of rows at a time (docs/semantics.md, "Memory"); differentiable and traceable.
    """
    compute = torch.float64 if problem.dtype == torch.float64 else torch.float32
    B, H, nq = problem.batch, problem.heads, problem.nq
    if B * H == 0 or nq == 0:
        return problem.q.new_empty(problem.output_shape())
    row_blocks, chunks = _plan(B, H, nq, problem.nk, CHUNK_ELEMENTS)
    m = _global_max(problem, row_blocks, chunks, compute) if _max_first(problem, row_blocks) else None
    bias_of = _row_bias(problem, compute)
    out_rows = []
    for rows in row_blocks:
        dA = bias_of(rows)
        outs = [_chunk_out(problem, compute, rows, b, problem.q[b, h, rows], problem.k[b, h], problem.v[b, h],
                           _entry_delta(problem, b, h, rows), dA, None if m is None else m[b, h]).flatten(0, 1)
                for b, h in chunks]
        out_rows.append(torch.cat(outs).unflatten(0, (B, H)))
    return out_rows[0] if len(out_rows) == 1 else torch.cat(out_rows, dim=2)


def _chunk_out(problem: TarProblem, compute, rows: slice, b: slice, q, k, v, entry_delta, dA, m) -> torch.Tensor:
    """softmax(S') @ v for the query rows `rows` of the slices (b, h) that q, k, v hold, in the input dtype."""
    mask = _mask(problem, rows, b)
    s = tar_scores(problem, q.to(compute), k.to(compute), entry_delta, dA, mask=mask, m=m)
    p = torch.softmax(s, dim=-1)
    if problem.key_mask is not None:  # a row with no key to attend to gives 0
        p = p.masked_fill(mask.all(dim=-1, keepdim=True), 0.0)
    return torch.matmul(p, v.to(compute)).to(problem.dtype)


def _max_first(problem: TarProblem, row_blocks) -> bool:
    """Whether the global max needs a pass of its own (its slice's rows come in several blocks)."""
    return problem.regularized and problem.max_mode == "global" and len(row_blocks) > 1


def _global_max(problem: TarProblem, row_blocks, chunks, compute, shares: bool = False):
    """The max of each slice's masked scores, (B, H, 1, 1), one block of rows at a time (`chunks` of one slice).
    Its gradient is torch.amax's over the slice, shared evenly by every tie in any block; with shares=True,
    also each block's share of it, (R, B, H, 1, 1): its ties over the slice's (0 for an infinite max).
    """
    maxima, ties = [], []
    for rows in row_blocks:
        for b, h in chunks:
            mask = _mask(problem, rows, b)
            s = _masked_scores(problem, problem.q[b, h, rows].to(compute), problem.k[b, h].to(compute), mask)
            maxima.append(s.amax(dim=(-2, -1), keepdim=True))
            with torch.no_grad():
                ties.append((s == maxima[-1]).sum(dim=(-2, -1), keepdim=True))
    shape = (len(row_blocks), problem.batch, problem.heads, 1, 1)
    maxima, ties = torch.cat(maxima).reshape(shape), torch.cat(ties).reshape(shape)
    m = maxima.detach().amax(dim=0)
    weights = (ties * (maxima.detach() == m)).to(m.dtype)
    weights = weights / weights.sum(dim=0) * torch.isfinite(maxima.detach())
    # maxima - maxima.detach() is 0 with the blocks' gradients; an infinite maximum adds nothing (inf - inf).
    shift = torch.where(torch.isfinite(maxima), maxima - maxima.detach(), 0.0)
    m = m + (weights * shift).sum(dim=0)
    return (m, weights) if shares else m


def reference_backward(problem: TarProblem, grad_out: torch.Tensor, delta_grad: bool = False):
    """Gradients of `reference_forward` by autograd on the definition (the max's: split evenly over ties):
    contiguous (dq, dk, dv, ddelta), ddelta that of `problem.delta` (the (B, H, Nq, Nk) view or the (F, F)
    frame matrix) when delta_grad, else None; zeros when there is no score. torch.func.vjp, which also runs
    below the autograd key (in the op); one chunk (a block of rows when a slice takes several) at a time.
    """
    if problem.batch * problem.heads == 0 or problem.nq == 0:
        return (*(t.new_zeros(t.shape) for t in (problem.q, problem.k, problem.v)),
                problem.delta.new_zeros(problem.delta.shape) if delta_grad else None)
    row_blocks, chunks = _plan(problem.batch, problem.heads, problem.nq, problem.nk, CHUNK_ELEMENTS)
    if len(row_blocks) > 1 or len(chunks) > 1:  # one vjp of the whole forward would keep every chunk's scores
        return _backward_by_blocks(problem, grad_out, delta_grad, row_blocks, chunks)

    def forward(q, k, v, *delta):
        return reference_forward(dataclasses.replace(problem, q=q, k=k, v=v,
                                                     delta=delta[0] if delta else problem.delta))

    primals = (problem.q, problem.k, problem.v, *((problem.delta,) if delta_grad else ()))
    _, vjp = torch.func.vjp(forward, *primals)
    grads = [g.contiguous() for g in vjp(grad_out)]
    return (*grads[:3], grads[3] if delta_grad else None)


def _backward_by_blocks(problem: TarProblem, grad_out, delta_grad: bool, row_blocks, chunks) -> tuple:
    """`reference_backward` one chunk (whole slices, a range of heads, or a block of rows of one slice) at a time:
    the vjp of each chunk's output (recomputed), then for max_mode="global" of each block's max with its share of
    the slice max's gradient (`_global_max`)."""
    compute = torch.float64 if problem.dtype == torch.float64 else torch.float32
    frame_delta = problem.frames_q is not None and problem.delta is not None
    bias_of = None if problem.delta is not None else _row_bias(problem, compute)
    m = weights = None
    if _max_first(problem, row_blocks):  # (a graph only for a double backward)
        m, weights = _global_max(problem, row_blocks, chunks, compute, shares=True)
    dq, dk, dv, ddelta = [], [], [], []
    d_frames = torch.zeros_like(problem.delta) if frame_delta and delta_grad else None
    for b, h in chunks:
        k, v = problem.k[b, h], problem.v[b, h]
        dq_rows, dd_rows, dk_s, dv_s, dm = [], [], torch.zeros_like(k), torch.zeros_like(v), 0.0
        for rows in row_blocks:
            def chunk(q_r, k_s, v_s, *extra, rows=rows, b=b, h=h):
                m_s = extra[0] if m is not None else None
                delta = extra[-1] if delta_grad else problem.delta
                if frame_delta:
                    dA, entry = frame_bias(problem.frames_q[rows], problem.frames_k, sigma=problem.sigma,
                                           delta=delta, dtype=compute), None
                else:
                    dA = None if bias_of is None else bias_of(rows)
                    entry = None if delta is None else (delta if delta_grad else delta[b, h, rows])
                return _chunk_out(problem, compute, rows, b, q_r, k_s, v_s, entry, dA, m_s)

            extra = (() if m is None else (m[b, h],)) + (() if not delta_grad else (
                problem.delta if frame_delta else problem.delta[b, h, rows],))
            _, vjp = torch.func.vjp(chunk, problem.q[b, h, rows], k, v, *extra)
            grads = vjp(grad_out[b, h, rows])
            dq_rows.append(grads[0])
            dk_s, dv_s = dk_s + grads[1], dv_s + grads[2]
            if m is not None:
                dm = dm + grads[3]
            if delta_grad and frame_delta:
                d_frames = d_frames + grads[-1]
            elif delta_grad:
                dd_rows.append(grads[-1])
        if m is not None:  # the slice max's gradient, through each block's max
            for i, rows in enumerate(row_blocks):
                def block_max(q_r, k_s, rows=rows, b=b):
                    s = _masked_scores(problem, q_r.to(compute), k_s.to(compute), _mask(problem, rows, b))
                    return s.amax(dim=(-2, -1), keepdim=True)

                _, vjp = torch.func.vjp(block_max, problem.q[b, h, rows], k)
                g_q, g_k = vjp(weights[i, b, h] * dm)
                dq_rows[i] = dq_rows[i] + g_q
                dk_s = dk_s + g_k
        dq.append(torch.cat(dq_rows, dim=2))
        dk.append(dk_s)
        dv.append(dv_s)
        if dd_rows:
            ddelta.append(torch.cat(dd_rows, dim=2))

    def whole(g):  # the chunks' gradients (of whole batches, or of head ranges of one) as one (B, H, ...) tensor
        return torch.cat([t.flatten(0, 1) for t in g]).unflatten(0, (problem.batch, problem.heads)).contiguous()

    return whole(dq), whole(dk), whole(dv), (d_frames if frame_delta else whole(ddelta)) if delta_grad else None


def tar_attention_reference(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False,
                            max_mode="row", scale=None, frames=None, key_mask=None) -> torch.Tensor:
    """TAR attention in plain PyTorch: the definition every other backend is tested against.

    Same arguments and shapes as :func:`vstar_kernels.tar_attention` (without
    ``backend``). Differentiable in q, k, v and delta through autograd, which saves every chunk's
    scores (O(B * H * Nq * Nk)); ``tar_attention(..., backend="reference")`` differentiates the same
    definition one chunk at a time.
    """
    problem = make_problem(q, k, v, sigma=sigma, strength=strength, delta=delta, causal=causal,
                           max_mode=max_mode, scale=scale, frames=frames, key_mask=key_mask)
    check_frame_values(problem)
    with without_autocast(problem.q.device):
        return problem.restore(reference_forward(problem))


def without_autocast(device: torch.device):
    """The caller's autocast off on `device`'s type: TAR's math runs in float32 whatever the input dtype
    (docs/semantics.md), where autocast would run its matmuls in 16 bits. Nothing to enter where it is off."""
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()
