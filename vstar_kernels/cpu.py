"""The CPU backend (`backend="cpu"`, what "auto" runs on CPU tensors): the definition's operations (reference.py)
in its order, in place, on cache-sized chunks; no autograd (the op's backward differentiates the definition).
Why each choice: benchmarks/NOTES.md and docs/performance.md."""

from __future__ import annotations

import dataclasses
import functools
import math
import threading

import torch

from ._problem import TarProblem, frame_value, id_extrema
from .frames import frame_bias
from .reference import _entry_delta, _global_max, _mask, _max_first, _plan, _row_bias
from .regularization import gaussian_bias

# Scores of one chunk: 2**21 fp32 = 8 MiB, which stay in the last-level cache from QK^T to PV (benchmarks/NOTES.md).
CHUNK_ELEMENTS = 1 << 21
# A call of at most this many elements (scores, q, k, v and output rows) runs as one chunk on the caller's thread:
# below it, more chunks and worker threads cost more than copying q, k, v (docs/performance.md, "Host overhead").
SMALL_CALL_ELEMENTS = 1 << 20
# A bias of at most this many entries made of sigma alone is made once and kept (`_bias_rows`).
KEPT_BIAS_ELEMENTS = 1 << 16
KEPT_BIASES = 4  # of the frame ids of one tensor (`_kept_frame_bias`)
_small_gaussian = functools.lru_cache(maxsize=32)(gaussian_bias)


def _bias_rows(problem: TarProblem, compute: torch.dtype):
    """`_row_bias` of the CPU backend. A small call's bias of sigma alone is kept (the Gaussian by sizes, sigma
    and dtype; that of self-attention's frame ids with the ids). Else with frame ids, a block's rows come from
    a (F + 1, Nk) table (a row per query frame and one for -1) when it fits a chunk."""
    small = problem.nq * problem.nk <= min(KEPT_BIAS_ELEMENTS, CHUNK_ELEMENTS)
    if small and problem.regularized and problem.delta is None and problem.frames_q is problem.frames_k:
        if problem.frames_q is None:
            dA = _small_gaussian(problem.nq, problem.nk, problem.sigma, device=problem.device, dtype=compute)
        else:
            dA = _kept_frame_bias(problem, compute)
        return lambda rows: dA[rows]
    if problem.regularized and problem.frames_q is not None:
        frames = id_extrema(problem.frames_q, problem)[1] + 1
        if (frames + 1) * problem.nk <= CHUNK_ELEMENTS:
            table = frame_bias(torch.arange(-1, frames, device=problem.device), problem.frames_k,
                               sigma=problem.sigma, delta=problem.delta, dtype=compute)
            return lambda rows: table.index_select(0, problem.frames_q[rows].to(torch.int64) + 1)
    return _row_bias(problem, compute)


def _kept_frame_bias(problem: TarProblem, compute: torch.dtype) -> torch.Tensor:
    """The small bias of self-attention's frame ids, kept with the ids for the KEPT_BIASES (sigma, dtype) pairs
    last used: ids that live long (a FrameLayout's, a DiT's layout) called with ever new sigmas keep a few."""
    key = (problem.sigma, compute)
    # one list per ids, [((key, dA), ...)] (a tuple names a table of the cpu backend's, tests/helpers.py ValueReads)
    slot = frame_value(problem.frames_k, ("biases",), lambda ids: [()])
    kept = slot[0]  # read once: another thread may put a new tuple in the slot meanwhile
    for entry in kept:
        if entry[0] == key:
            if entry is not kept[0]:  # the last used first: the one pushed out is the least recently used
                slot[0] = (entry,) + tuple(e for e in kept if e is not entry)
            return entry[1]
    dA = frame_bias(problem.frames_k, problem.frames_k, sigma=problem.sigma, dtype=compute)
    slot[0] = ((key, dA),) + kept[:KEPT_BIASES - 1]
    return dA


# A frame bias goes segment by segment when the key ids run in at most RUN_SEGMENTS segments of runs of one
# length, of MIN_RUN_KEYS keys or more (a video DiT: a run per frame; a segment for the video, one per text block).
RUN_SEGMENTS = 8
MIN_RUN_KEYS = 16


def _key_segments(fk: torch.Tensor):
    """((start, first run, runs, run length) of each segment, the first key of each run) of the key ids `fk`
    when they run as RUN_SEGMENTS and MIN_RUN_KEYS allow, else None. A run's bias is one value per query row:
    a block of rows needs a (rows, runs) table instead of a (rows, Nk) block."""
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
    """`_row_bias` with each key run's first key for the keys: a block of query rows' bias, (rows, runs)."""
    return _row_bias(dataclasses.replace(problem, frames_k=problem.frames_k[run_starts]), compute)


def cpu_forward(problem: TarProblem) -> torch.Tensor:
    """`reference_forward`'s operations in order, in place on each cache-sized chunk's scores; returns
    (B, H, Nq, Dv) in the input dtype, not differentiable. The GEMMs read q, k, v in place where a block is a
    batch of matrices as a view; for strides where it is not (diffusers' (B, N, H, D) storage) a chunk is one
    head's batches. Several chunks go to as many worker threads of one intra-op thread each (`_chunk_workers`,
    benchmarks/NOTES.md); each chunk's result is the one-thread result.
    """
    compute = torch.float64 if problem.dtype == torch.float64 else torch.float32
    B, H, nq, nk = problem.batch, problem.heads, problem.nq, problem.nk
    if B * H == 0 or nq == 0:
        return problem.q.new_empty(problem.output_shape())
    row_blocks, chunks = _plan(B, H, nq, nk, CHUNK_ELEMENTS)
    elements = nq * nk + (nq + nk) * (problem.head_dim + problem.head_dim_v)  # a slice's scores, q, k, v, out rows
    if len(row_blocks) == 1 and B * H * elements > SMALL_CALL_ELEMENTS and not all(
            _merges(x) or x.dtype != compute for x in (problem.q, problem.k, problem.v)):
        # (batch, head) blocks of these strides are no batch of matrices, one head's batches are: read in place.
        chunks = _head_chunks(B, H, CHUNK_ELEMENTS // elements)
    out = problem.q.new_empty(problem.output_shape())
    slice_max = None
    if _max_first(problem, row_blocks):
        with torch.no_grad():
            slice_max = _global_max(problem, row_blocks, chunks, compute)
    segments, run_starts = (problem.regularized and problem.frames_q is not None and frame_value(
        problem.frames_k, ("segments", MIN_RUN_KEYS, RUN_SEGMENTS), _key_segments)) or (None, None)
    bias_of = _bias_rows(problem, compute) if segments is None else _run_bias(problem, compute, run_starts)
    if problem.k.dtype == compute and problem.v.dtype == compute:
        tasks = [(rows, b, h) for rows in row_blocks for b, h in chunks]
    else:  # k and v converted once a chunk of slices, for all its row blocks
        tasks = [(rows, b, h) for b, h in chunks for rows in row_blocks]

    def run(part):
        dA_rows = dA = kv_of = kv = None
        for rows, b, h in part:
            if rows != dA_rows:
                dA_rows, dA = rows, bias_of(rows)
            if (b, h) != kv_of:
                kv_of, kv = (b, h), tuple(_as_batch(x[b, h], compute) for x in (problem.k, problem.v))
            _chunk_inplace(problem, compute, rows, b, h, dA, segments, slice_max, out, *kv)

    workers = min(torch.get_num_threads(), len(tasks))
    if workers == 1 or any(t is not None and t.requires_grad for t in (problem.q, problem.k, problem.v, problem.delta)):
        # (inputs that require grad come from below autograd, in the custom op: a state workers would not share)
        run(tasks)
    else:
        _chunk_workers(run, [tasks[i * len(tasks) // workers:(i + 1) * len(tasks) // workers] for i in range(workers)])
    return out


def _chunk_workers(run, parts: list) -> None:
    """run(part) for each part on a thread of its own with one intra-op thread, without autograd (in inference
    mode if the caller is); the first error there is raised here. The caller's thread count is set again
    afterwards (torch keeps the last count set, from any thread)."""
    threads, inference, errors = torch.get_num_threads(), torch.is_inference_mode_enabled(), []

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


def _chunk_inplace(problem: TarProblem, compute: torch.dtype, rows: slice, b: slice, h: slice, dA, segments,
                   slice_max, out: torch.Tensor, k3: torch.Tensor, v3: torch.Tensor) -> None:
    """out[b, h, rows]: one chunk's scores, bias, softmax and PV product, in place. `dA` is the rows' (rows, Nk)
    bias, or with key `segments` their (rows, runs) table; `k3`, `v3` the chunk's keys and values as batches in
    the compute dtype (`_as_batch`). In float32 the GEMM applies the scale (alpha): S
    differs from the definition's product-then-scale in the last bit at most; float64 follows the definition."""
    nk, dv = problem.nk, problem.head_dim_v
    qc = problem.q[b, h, rows]
    bb, hh, rr = qc.shape[:3]
    c = bb * hh
    q3 = _as_batch(qc, compute)
    s = q3.new_empty((c, rr, nk))
    if compute == torch.float64:
        torch.bmm(q3, k3.transpose(1, 2), out=s).mul_(problem.scale)
    else:
        s.baddbmm_(q3, k3.transpose(1, 2), beta=0.0, alpha=problem.scale)  # beta=0: s is not read
    s4 = s.view(bb, hh, rr, nk)
    mask = _mask(problem, rows, b)
    if mask is not None:
        s4.masked_fill_(mask, -math.inf)
    if problem.regularized:
        if slice_max is not None:
            m4 = slice_max[b, h].clone()
        elif problem.max_mode == "row":
            m4 = s.amax(dim=-1, keepdim=True).view(bb, hh, rr, 1)
        else:
            m4 = s.amax(dim=(-2, -1), keepdim=True).view(bb, hh, 1, 1)
        m4.mul_(problem.strength)
        entry_delta = _entry_delta(problem, b, h, rows)
        if segments is None:
            s4.addcmul_(m4, dA if entry_delta is None else entry_delta.to(compute))
        else:
            # The same values bit for bit, segment by segment as (runs, run length) blocks, each run's bias
            # broadcast along it; the max is spread along a run (addcmul vectorizes one broadcast operand).
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
    o = o_block.view(c, rr, dv) if direct else s.new_empty((c, rr, dv))
    torch.bmm(s, v3, out=o)
    if not direct:
        o_block.copy_(o.view(bb, hh, rr, dv))


def _as_batch(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (b, h, n, d) block as a (b * h, n, d) batch in `dtype`: a view when the dims merge, else a copy."""
    bb, hh, n, d = x.shape
    if x.dtype == dtype:
        return x.reshape(bb * hh, n, d)
    return torch.empty(x.shape, device=x.device, dtype=dtype).copy_(x).view(bb * hh, n, d)


def _merges(x: torch.Tensor) -> bool:
    """Whether the batch and head dims of a (b, h, n, d) tensor are one dim of a view."""
    return x.shape[0] == 1 or x.shape[1] == 1 or x.stride(0) == x.shape[1] * x.stride(1)


# Head chunks come in a multiple of this many (more than one), so 1, 2 or 4 worker threads get equal shares.
CHUNKS_MULTIPLE = 4


def _head_chunks(batch: int, heads: int, per_chunk: int):
    """(batch slice, head slice) blocks of one head and at most `per_chunk` batches, head by head, in pieces
    of equal size (within one), their number a multiple of CHUNKS_MULTIPLE where the batches allow."""
    pieces = -(-batch // max(1, per_chunk))
    if heads * pieces > 1:
        while (heads * pieces) % CHUNKS_MULTIPLE and pieces < batch:
            pieces += 1
    bounds = [i * batch // pieces for i in range(pieces + 1)]
    return [(slice(b0, b1), slice(h, h + 1)) for h in range(heads) for b0, b1 in zip(bounds[:-1], bounds[1:])]
