"""The PyTorch definition of TAR. Tests, the CPU fallback and the benchmarks use it.

Math runs in float32 (float64 for float64 input); the result is cast back to
the input dtype. The (batch x heads) axis, and the query rows of a long
sequence, are processed in chunks so that the score matrices stay within a
bounded amount of memory.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import torch

from ._problem import TarProblem, check_frame_values, frame_value, id_extrema, make_problem
from .frames import frame_bias
from .regularization import gaussian_bias

# Elements of one fp32 score chunk (B*H slices x Nq rows x Nk): 2**26 = 256 MiB. The most any path
# holds per tensor, but for the int64 / float64 frame distances of a block of rows (8 bytes each)
# that the out-of-place path evaluates the Gaussian of frame ids from.
CHUNK_ELEMENTS = 1 << 26
# Chunk of the in-place path (no autograd): 2**21 fp32 scores = 8 MiB, which stay in the last-level cache
# from the QK^T product to the PV product (sizes measured in benchmarks/NOTES.md). Never more than CHUNK_ELEMENTS.
INPLACE_CHUNK_ELEMENTS = 1 << 21


def tar_scores(problem: TarProblem, q, k, delta, dA, *, mask=None, m=None):
    """S' = S + strength * max(S) * dA for one chunk, in the compute dtype (masked entries -inf).

    q: a block of query rows, k the keys; `delta` a block of the per-entry delta (or None), `dA`
    the bias otherwise. `mask`: True where an entry takes no part, broadcast to the scores (by
    default the causal mask of whole rows when the problem is causal). A masked entry is -inf in S
    (so not in the max) and again in S', whatever its bias (a NaN or inf delta entry there, or
    strength * max * dA = inf * 0). `m`: the max to use (the slice's, computed beforehand when a
    slice's rows come in several blocks); by default taken over this chunk.
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
    s = s + problem.strength * m * bias
    return s if mask is None else s.masked_fill(mask, -math.inf)


def _masked_scores(problem: TarProblem, q, k, mask) -> torch.Tensor:
    """The scaled scores q @ k^T of a chunk, -inf where `mask` (None: no mask) is True."""
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
    """(row blocks, (batch, head) blocks) with at most `budget` scores per chunk: every row and as
    many whole slices as fit while one slice fits, else blocks of rows of one slice at a time."""
    if nq * nk <= budget:
        return [slice(0, nq)], _chunks(B, H, budget // (nq * nk))
    rows = max(1, budget // nk)
    return [slice(r, r + rows) for r in range(0, nq, rows)], _chunks(B, H, 1)


def _row_bias(problem: TarProblem, compute: torch.dtype):
    """A function of a block of query rows giving the bias it shares with every (batch, head) slice,
    (rows, Nk), or None when the bias is not applied or is the per-entry `delta`.

    Without frame ids: rows of the Gaussian Toeplitz view (`gaussian_bias`, no N x N storage).
    With them: the Gaussian of frame distance (or the frame matrix) evaluated for the block.
    """
    if not problem.regularized or (problem.delta is not None and problem.frames_q is None):
        return lambda rows: None
    if problem.frames_q is None:
        dA = gaussian_bias(problem.nq, problem.nk, problem.sigma, device=problem.device, dtype=compute)
        return lambda rows: dA[rows]
    return lambda rows: frame_bias(problem.frames_q[rows], problem.frames_k, sigma=problem.sigma,
                                   delta=problem.delta, dtype=compute)


# A call of at most this many elements (every slice's scores and q, k, v and output rows) runs as one chunk
# whatever its strides, on the caller's thread: up to there the operations of more chunks, and starting
# worker threads for them (about a millisecond), cost more than copying q, k and v (docs/performance.md,
# "Host overhead").
SMALL_CALL_ELEMENTS = 1 << 20
# A bias of at most this many entries made of sigma alone is made once and kept (`_inplace_bias`).
KEPT_BIAS_ELEMENTS = 1 << 16
_small_gaussian = functools.lru_cache(maxsize=32)(gaussian_bias)


def _inplace_bias(problem: TarProblem, compute: torch.dtype, budget: int):
    """`_row_bias` of the in-place path. A small call's bias made of sigma alone is kept: the Gaussian by its
    sizes, sigma and dtype, the Gaussian of the frame ids of self-attention with the ids (`frame_value`).
    With frame ids and a (F + 1, Nk) table within `budget` (one row per query frame and one for -1), a block's
    rows are looked up in it (F from the ids' checks): the values of `frame_bias`, which computes each entry
    from its two ids alone."""
    if problem.regularized and problem.delta is None and problem.nq * problem.nk <= KEPT_BIAS_ELEMENTS:
        if problem.frames_q is None:
            dA = _small_gaussian(problem.nq, problem.nk, problem.sigma, device=problem.device, dtype=compute)
            return lambda rows: dA[rows]
        if problem.frames_q is problem.frames_k:
            dA = frame_value(problem.frames_k, ("bias", problem.sigma, compute),
                             lambda ids: frame_bias(ids, ids, sigma=problem.sigma, dtype=compute))
            return lambda rows: dA[rows]
    if problem.regularized and problem.frames_q is not None:
        frames = id_extrema(problem.frames_q)[1] + 1
        if (frames + 1) * problem.nk <= budget:
            table = frame_bias(torch.arange(-1, frames, device=problem.device), problem.frames_k,
                               sigma=problem.sigma, delta=problem.delta, dtype=compute)
            return lambda rows: table.index_select(0, problem.frames_q[rows].to(torch.int64) + 1)
    return _row_bias(problem, compute)


# The in-place path adds a frame bias segment by segment when the key ids run in at most RUN_SEGMENTS
# segments of runs of one length, runs of MIN_RUN_KEYS keys or more (a video DiT's ids: one run of
# hundreds of keys per frame, one segment for the video and one per block of text).
RUN_SEGMENTS = 8
MIN_RUN_KEYS = 16


def _key_segments(problem: TarProblem):
    """((start, first run, runs, run length) of each segment, the first key of each run) when the in-place
    path adds the frame bias segment by segment, else None: with ids and no per-entry delta, when the key
    ids run as RUN_SEGMENTS and MIN_RUN_KEYS allow. A run's bias is one value per query row, so a block
    of rows needs a (rows, runs) table of them instead of a (rows, Nk) block of bias to read."""
    if not problem.regularized or problem.frames_q is None:
        return None
    return frame_value(problem.frames_k, ("segments", MIN_RUN_KEYS, RUN_SEGMENTS), _segments)


def _segments(fk: torch.Tensor):
    """`_key_segments` of the key ids `fk`."""
    starts = [0, *(torch.nonzero(fk[1:] != fk[:-1]).flatten() + 1).tolist()]
    lengths = [stop - start for start, stop in zip(starts, starts[1:] + [fk.shape[0]])]
    if min(lengths) < MIN_RUN_KEYS:
        return None
    segments = []
    for run, (start, length) in enumerate(zip(starts, lengths)):
        if segments and segments[-1][3] == length:
            segments[-1][2] += 1
        else:
            segments.append([start, run, 1, length])
    return (segments, starts) if len(segments) <= RUN_SEGMENTS else None


def _run_bias(problem: TarProblem, compute: torch.dtype, run_starts: list):
    """A function of a block of query rows giving the bias of each key run, (rows, runs): `frame_bias` at
    the run's key id, the value every entry of the run has in `_row_bias`'s (rows, Nk) block."""
    ids_k = problem.frames_k[run_starts]
    return lambda rows: frame_bias(problem.frames_q[rows], ids_k, sigma=problem.sigma, delta=problem.delta,
                                   dtype=compute)


def _mask(problem: TarProblem, rows: slice, b: slice):
    """True where an entry of a (batch block, rows) chunk takes no part: (rows, Nk) for the causal
    mask alone, (bb, 1, rows, Nk) with a key mask; None when every entry takes part."""
    first, stop, _ = rows.indices(problem.nq)
    mask = _causal_mask(first, stop - first, problem.nk, problem.device) if problem.causal else None
    if problem.key_mask is None:
        return mask
    dropped = ~problem.key_mask[b][:, None, None, :]
    return dropped if mask is None else dropped | mask


def _entry_delta(problem: TarProblem, b, h, rows):
    """The per-entry delta of a chunk (a view), or None when the bias is a row-block bias."""
    return None if problem.delta is None or problem.frames_q is not None else problem.delta[b, h, rows]


def _needs_autograd(problem: TarProblem) -> bool:
    """True when the forward must stay differentiable (autograd, torch.func transforms) or traceable."""
    return (problem.needs_grad() or torch.compiler.is_compiling() or any(
        t is not None and torch._C._functorch.is_functorch_wrapped_tensor(t)
        for t in (problem.q, problem.k, problem.v, problem.delta)))


def reference_forward(problem: TarProblem, inplace: bool = True) -> torch.Tensor:
    """Evaluate a validated problem; returns (B, H, Nq, Dv) in the input dtype.

    On chunks of (batch, head) slices and query rows of at most CHUNK_ELEMENTS scores, the delta read
    through views and the bias built one block of rows at a time (docs/semantics.md, "Memory"). Without
    autograd the same operations run in place (`_forward_inplace`); under autograd, torch.func or
    torch.compile (or with inplace=False) the out-of-place definition below runs.
    """
    compute = torch.float64 if problem.dtype == torch.float64 else torch.float32
    B, H, nq, nk = problem.batch, problem.heads, problem.nq, problem.nk
    if B * H == 0 or nq == 0:
        return problem.q.new_empty(problem.output_shape())
    if inplace and nk > 0 and not _needs_autograd(problem):
        return _forward_inplace(problem, compute)
    row_blocks, chunks = _plan(problem.batch, problem.heads, problem.nq, problem.nk, CHUNK_ELEMENTS)
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
    """The max of each (batch, head) slice's masked scores, (B, H, 1, 1), one block of rows at a time
    (`chunks` hold one slice each). With shares=True, also the share of its gradient each block's max
    passes on to its own ties, (R, B, H, 1, 1): their number over the slice's, 0 for an infinite max
    (which has no gradient to pass).

    Its gradient is torch.amax's over the whole slice: shared evenly by every tied entry, whichever
    blocks they are in (each block's maximum passes it to its own ties, weighted by their number).
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


def _forward_inplace(problem: TarProblem, compute: torch.dtype) -> torch.Tensor:
    """`reference_forward`'s operations in the same order, in place, on cache-sized buffers (`_ChunkBuffers`)
    that every chunk reuses. The batched GEMMs read q, k and v in place where a block is a batch of matrices
    as a view (`_as_batch`); for strides whose (batch, head) blocks are not (diffusers' (B, N, H, D) storage)
    a chunk is one head's batches, which are. With several intra-op threads and several chunks, the chunks go to
    that many worker threads of one intra-op thread each (`_chunk_workers`; why: benchmarks/NOTES.md); each chunk's
    result is the one-thread result, whatever the thread count.
    """
    B, H, nq, nk = problem.batch, problem.heads, problem.nq, problem.nk
    budget = min(CHUNK_ELEMENTS, INPLACE_CHUNK_ELEMENTS)
    row_blocks, chunks = _plan(B, H, nq, nk, budget)
    elements = nq * nk + (nq + nk) * (problem.head_dim + problem.head_dim_v)  # a slice's scores, q, k, v, out rows
    if len(row_blocks) == 1 and B * H * elements > SMALL_CALL_ELEMENTS and not all(
            _merges(x) or x.dtype != compute for x in (problem.q, problem.k, problem.v)):
        # (batch, head) blocks of these strides (e.g. a (B, N, H, D) storage) are no batch of
        # matrices: one head's block of batches is, so the products read them in place instead of
        # copying each block first (but for a small call, which copies them in one chunk).
        chunks = _head_chunks(B, H, budget // elements)
    out = torch.empty(problem.output_shape(), device=problem.device, dtype=problem.dtype)
    slice_max = None
    if _max_first(problem, row_blocks):
        with torch.no_grad():
            slice_max = _global_max(problem, row_blocks, chunks, compute)
    segments, run_starts = _key_segments(problem) or (None, None)
    bias_of = _inplace_bias(problem, compute, budget) if segments is None else _run_bias(problem, compute, run_starts)
    tasks = [(rows, b, h) for rows in row_blocks for b, h in chunks]
    slices = max(len(range(*b.indices(B))) * len(range(*h.indices(H))) for b, h in chunks)

    def run(part):
        buffers = _ChunkBuffers(problem, compute, slices, len(range(*row_blocks[0].indices(nq))), len(part) > 1)
        dA_rows = dA = None
        for rows, b, h in part:
            if rows != dA_rows:
                dA_rows, dA = rows, bias_of(rows)
            _chunk_inplace(problem, compute, rows, b, h, dA, segments, buffers, slice_max, out)

    workers = min(torch.get_num_threads(), len(tasks))
    if workers == 1 or any(t is not None and t.requires_grad for t in (problem.q, problem.k, problem.v, problem.delta)):
        # (inputs that require grad reach here from below autograd, e.g. inside the custom op, a state
        # of the calling thread that a worker thread would not share)
        run(tasks)
    else:
        _chunk_workers(run, [tasks[i * len(tasks) // workers:(i + 1) * len(tasks) // workers] for i in range(workers)])
    return out


def _chunk_workers(run, parts: list) -> None:
    """run(part) for each part on a thread of its own with one intra-op thread, without autograd (inputs
    that need none) and in inference mode if the caller is; the first error raised there is raised here.
    The caller's intra-op thread count is set again afterwards (torch keeps the last count set, from
    any thread, for threads started later)."""
    import threading

    threads = torch.get_num_threads()
    inference = torch.is_inference_mode_enabled()  # thread-local, as grad mode is
    errors = []

    def work(part):
        try:
            torch.set_num_threads(1)
            with torch.inference_mode() if inference else torch.no_grad():
                run(part)
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(part,)) for part in parts]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
        torch.set_num_threads(threads)
    if errors:
        raise errors[0]


class _ChunkBuffers:
    """The buffers of the in-place path for chunks of at most `slices` (batch, head) slices x `rows` query
    rows, in the compute dtype: scores (s), q, k, v, row maxima (m) and output (o), each made on first use and
    reused by the later chunks; a call of one chunk takes new tensors of its sizes instead."""

    def __init__(self, problem: TarProblem, compute: torch.dtype, slices: int, rows: int, reuse: bool):
        nk, d, dv = problem.nk, problem.head_dim, problem.head_dim_v
        self.sizes = dict(s=slices * rows * nk, q=slices * rows * d, k=slices * nk * d, v=slices * nk * dv,
                          m=slices * rows, o=slices * rows * dv) if reuse else None
        self.options = dict(device=problem.device, dtype=compute)
        self.buffers = {}

    def take(self, name: str, *shape: int) -> torch.Tensor:
        """An uninitialized (shape) tensor: a view of the buffer `name`, or a new tensor without reuse."""
        if self.sizes is None:
            return torch.empty(shape, **self.options)
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.sizes[name], **self.options)
        return self.buffers[name][: math.prod(shape)].view(shape)


def _chunk_inplace(problem: TarProblem, compute: torch.dtype, rows: slice, b: slice, h: slice, dA, segments,
                   buf: _ChunkBuffers, slice_max, out: torch.Tensor) -> None:
    """out[b, h, rows] of the in-place path: one chunk's scores, bias, softmax and PV product in `buf`.

    `dA` is the rows' (rows, Nk) bias block, or with key `segments` (`_key_segments`) their (rows, runs)
    table.
    In float64 the operations are the definition's, in its order. In float32 the GEMM applies the
    scale (its alpha) instead of a pass over the scores of its own; the rounding of S differs from
    the definition's product-then-scale in the last bit at most."""
    nk, dv = problem.nk, problem.head_dim_v
    qc = problem.q[b, h, rows]
    bb, hh, rr = qc.shape[:3]
    c = bb * hh
    q3 = _as_batch(qc, buf, "q", compute)
    k3 = _as_batch(problem.k[b, h], buf, "k", compute)
    v3 = _as_batch(problem.v[b, h], buf, "v", compute)
    s = buf.take("s", c, rr, nk)
    if compute == torch.float64:
        torch.bmm(q3, k3.transpose(1, 2), out=s).mul_(problem.scale)
    else:
        s.baddbmm_(q3, k3.transpose(1, 2), beta=0.0, alpha=problem.scale)  # beta=0: the buffer is not read
    s4 = s.view(bb, hh, rr, nk)
    mask = _mask(problem, rows, b)
    if mask is not None:
        s4.masked_fill_(mask, -math.inf)
    if problem.regularized:
        if slice_max is not None:
            m4 = buf.take("m", bb, hh, 1, 1).copy_(slice_max[b, h])
        elif problem.max_mode == "row":
            m4 = torch.amax(s, dim=-1, keepdim=True, out=buf.take("m", c, rr, 1)).view(bb, hh, rr, 1)
        else:
            m4 = torch.amax(s, dim=(-2, -1), keepdim=True, out=buf.take("m", c, 1, 1)).view(bb, hh, 1, 1)
        m4.mul_(problem.strength)
        entry_delta = _entry_delta(problem, b, h, rows)
        if segments is None:
            s4.addcmul_(m4, dA if entry_delta is None else entry_delta.to(compute))
        else:
            # The same operation (the same values, bit for bit) segment by segment, as (runs, run length)
            # blocks with the runs' bias broadcast along each run: no (rows, Nk) bias block to read. The max
            # is spread along a run so that only the bias is broadcast (addcmul's vectorized loop takes one
            # broadcast operand, not two).
            m_along = m4.expand(*m4.shape[:-1], max(seg[3] for seg in segments)).contiguous()
            for start, first, runs, length in segments:
                block = s4[..., start:start + runs * length].unflatten(-1, (runs, length))
                block.addcmul_(m_along[..., None, :length], dA[:, first:first + runs, None])
        if mask is not None:
            s4.masked_fill_(mask, -math.inf)
    torch.softmax(s, dim=-1, out=s)
    if problem.key_mask is not None:  # a row with no key to attend to gives 0
        s4.masked_fill_(mask.all(dim=-1, keepdim=True), 0.0)
    o_block = out[b, h, rows]
    direct = problem.dtype == compute and o_block.is_contiguous()
    o = o_block.view(c, rr, dv) if direct else buf.take("o", c, rr, dv)
    torch.bmm(s, v3, out=o)
    if not direct:
        o_block.copy_(o.view(bb, hh, rr, dv))


def _as_batch(x: torch.Tensor, buf: _ChunkBuffers, name: str, dtype: torch.dtype) -> torch.Tensor:
    """A (b, h, n, d) block as a (b * h, n, d) batch in `dtype`: a view when it is one (rows of
    unit-stride elements at any row and batch stride, as torch.bmm reads them), else a copy into `buf` (a new
    copy in a call of one chunk)."""
    bb, hh, n, d = x.shape
    if x.dtype == dtype and (buf.sizes is None or _merges(x) and (x.stride(-1) == 1 or d == 1)):
        return x.reshape(bb * hh, n, d)
    return buf.take(name, bb, hh, n, d).copy_(x).view(bb * hh, n, d)


def _merges(x: torch.Tensor) -> bool:
    """Whether the batch and head dims of a (b, h, n, d) tensor are one dim of a view."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


# The in-place path's head chunks come in a multiple of this many when there is more than one, so that
# 1, 2 or 4 worker threads get equal shares (with 5 chunks, 2 threads would wait on the third).
CHUNKS_MULTIPLE = 4


def _head_chunks(batch: int, heads: int, per_chunk: int):
    """(batch slice, head slice) blocks of one head and at most `per_chunk` batches (at least 1), head by
    head: each head's batches in pieces of equal size (within one), as many as make the number of
    blocks a multiple of CHUNKS_MULTIPLE where the batches allow."""
    pieces = -(-batch // max(1, per_chunk))
    if heads * pieces > 1:
        while (heads * pieces) % CHUNKS_MULTIPLE and pieces < batch:
            pieces += 1
    bounds = [i * batch // pieces for i in range(pieces + 1)]
    return [(slice(b0, b1), slice(h, h + 1)) for h in range(heads) for b0, b1 in zip(bounds[:-1], bounds[1:])]


def reference_backward(problem: TarProblem, grad_out: torch.Tensor, delta_grad: bool = False):
    """Gradients of `reference_forward` by autograd on the definition (the max's gradient is
    torch.amax's: split evenly over ties). Returns contiguous (dq, dk, dv, ddelta), ddelta the
    gradient of `problem.delta` (the (B, H, Nq, Nk) view, or the (F, F) frame matrix) when
    delta_grad, else None; all zero when there is no score (no slice or no query).

    torch.func.vjp rather than torch.autograd: it also runs inside a custom op's implementation,
    below the autograd key. When a slice's rows take several blocks, one block at a time
    (`_backward_by_blocks`), so that memory stays within a few chunks there too.
    """
    if problem.batch * problem.heads == 0 or problem.nq == 0:
        return (*(torch.zeros(t.shape, device=t.device, dtype=t.dtype) for t in (problem.q, problem.k, problem.v)),
                torch.zeros(problem.delta.shape, device=problem.device, dtype=problem.delta.dtype)
                if delta_grad else None)
    row_blocks, chunks = _plan(problem.batch, problem.heads, problem.nq, problem.nk, CHUNK_ELEMENTS)
    if len(row_blocks) > 1:
        return _backward_by_blocks(problem, grad_out, delta_grad, row_blocks, chunks)

    def forward(q, k, v, *delta):
        return reference_forward(dataclasses.replace(problem, q=q, k=k, v=v,
                                                     delta=delta[0] if delta else problem.delta))

    primals = (problem.q, problem.k, problem.v, *((problem.delta,) if delta_grad else ()))
    _, vjp = torch.func.vjp(forward, *primals)
    grads = [g.contiguous() for g in vjp(grad_out)]
    return (*grads[:3], grads[3] if delta_grad else None)


def _backward_by_blocks(problem: TarProblem, grad_out, delta_grad: bool, row_blocks, chunks) -> tuple:
    """`reference_backward` one (slice, block of rows) at a time: the vjp of each chunk's output
    (recomputed), then, for max_mode="global", of each block's max with its share of the slice
    max's gradient (`_global_max`), as the forward's autograd would give. Every chunk holds one slice."""
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

    def whole(g):  # the slices' gradients as one (B, H, ...) tensor
        return torch.cat(g).reshape(problem.batch, problem.heads, *g[0].shape[2:]).contiguous()

    return whole(dq), whole(dk), whole(dv), (d_frames if frame_delta else whole(ddelta)) if delta_grad else None


def tar_attention_reference(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False,
                            max_mode="row", scale=None, frames=None, key_mask=None) -> torch.Tensor:
    """TAR attention in plain PyTorch: the definition every other backend is tested against.

    Same arguments and shapes as :func:`vstar_kernels.tar_attention` (without
    ``backend``). Differentiable in q, k, v and delta through autograd, which saves every chunk's
    scores (O(B * H * Nq * Nk)); ``tar_attention(..., backend="reference")`` differentiates the same
    definition one block of rows at a time.
    """
    problem = make_problem(q, k, v, sigma=sigma, strength=strength, delta=delta, causal=causal,
                           max_mode=max_mode, scale=scale, frames=frames, key_mask=key_mask)
    check_frame_values(problem)
    return problem.restore(reference_forward(problem))
