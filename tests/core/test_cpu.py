"""The CPU backend (cpu.py): the definition's operations in place, against the definition and an independent
float64 evaluation; its chunks, threads, copies and kept values."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import vstar_kernels as vk
from vstar_kernels import cpu
from vstar_kernels._problem import make_problem

from ..helpers import assert_close_to_reference, naive_tar, opts_id

BNHD_OPTIONS = [dict(), dict(causal=True, sigma=2.0), dict(max_mode="global", strength=-0.7), dict(delta=True),
                dict(key_mask=True), dict(frames=True)]


def bnhd_inputs(B, H, N, D, opts, *, seed, frame_tokens):
    """q, k, v stored (B, N, H, D) and viewed (B, H, N, D), and `opts` with its delta, key_mask and frames
    flags made tensors (frames of `frame_tokens` tokens; every batch item keeps key 0)."""
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, H, D, generator=g).transpose(1, 2) for _ in range(3))
    opts = dict(opts)
    if opts.pop("delta", False):
        opts["delta"] = torch.rand(B, H, N, N, generator=g)
    if opts.pop("key_mask", False):
        opts["key_mask"] = torch.rand(B, N, generator=g) > 0.3
        opts["key_mask"][:, 0] = True
    if opts.pop("frames", False):
        opts["frames"] = torch.arange(N) // frame_tokens
    return q, k, v, opts


@pytest.mark.usefixtures("default_torch_threads")
@pytest.mark.parametrize("opts", BNHD_OPTIONS, ids=opts_id)
@pytest.mark.parametrize("per_chunk", [None, 2, "rows"], ids=["whole", "2-batches", "row-blocks"])
def test_cpu_backend_reads_bnhd_storage_head_by_head(opts, per_chunk, monkeypatch):
    """q, k, v stored (B, N, H, D) (diffusers' layout) are no batch of matrices over (batch, head): the
    CPU backend takes one head's batches per chunk and reads them in place (no copy). Same values
    as the float64 definition and as contiguous inputs, in whole-batch chunks, in chunks of 2 batches
    and in blocks of 3 rows (one slice at a time: no head chunks needed). (A small call takes one chunk,
    copied: test_a_small_call_runs_in_one_chunk_on_the_callers_thread.)"""
    B, H, N, D = 3, 4, 9, 8
    q, k, v, opts = bnhd_inputs(B, H, N, D, opts, seed=11, frame_tokens=3)
    monkeypatch.setattr(cpu, "SMALL_CALL_ELEMENTS", 0)
    if per_chunk is not None:
        # a slice's scores and its q, k, v and output rows
        monkeypatch.setattr(cpu, "CHUNK_ELEMENTS",
                            3 * N if per_chunk == "rows" else per_chunk * (N * N + 4 * N * D))
    chunks, head_chunks, as_batch, copied = [], cpu._head_chunks, cpu._as_batch, []
    monkeypatch.setattr(cpu, "_head_chunks", lambda *a: chunks.append(head_chunks(*a)) or chunks[-1])

    def spy(x, dtype):
        batch = as_batch(x, dtype)
        copied.append(batch.untyped_storage().data_ptr() != x.untyped_storage().data_ptr())
        return batch

    monkeypatch.setattr(cpu, "_as_batch", spy)
    out = vk.tar_attention(q, k, v, backend="cpu", **opts)
    assert copied and not any(copied)
    if per_chunk == "rows":
        assert not chunks
    else:
        assert chunks and all(h.stop - h.start == 1 for _, h in chunks[0])
        assert len(chunks[0]) == H * (1 if per_chunk is None else 2)
    contiguous = vk.tar_attention(q.contiguous(), k.contiguous(), v.contiguous(), backend="cpu", **opts)
    torch.testing.assert_close(out, contiguous, atol=2e-6, rtol=2e-6)
    if "key_mask" not in opts and "frames" not in opts:
        expected = naive_tar(q, k, v, **{key: value for key, value in opts.items()})
        torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=2e-6)


@pytest.mark.parametrize("opts", BNHD_OPTIONS, ids=opts_id)
def test_cpu_backend_runs_its_chunks_on_one_thread_each(opts, monkeypatch):
    """With two intra-op threads the chunks go to two worker threads, each running its chunks with one
    intra-op thread (no op of a chunk waits on another thread); the result is the one-thread result
    bit for bit, and the caller's thread count is set again, for threads started later too. Inputs that
    require grad (the CPU backend called below autograd) keep the caller's thread."""
    import threading

    B, H, N, D = 2, 3, 24, 8
    q, k, v, opts = bnhd_inputs(B, H, N, D, opts, seed=13, frame_tokens=5)
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 8 * N)  # blocks of 8 rows: 3 per slice
    seen, chunk = [], cpu._chunk_inplace

    def spy(*args):
        seen.append((threading.current_thread(), torch.get_num_threads()))
        return chunk(*args)

    monkeypatch.setattr(cpu, "_chunk_inplace", spy)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = vk.tar_attention(q, k, v, backend="cpu", **opts)
        assert {n for _, n in seen} == {1} and {t for t, _ in seen} == {threading.current_thread()}
        seen.clear()
        torch.set_num_threads(2)
        two = vk.tar_attention(q, k, v, backend="cpu", **opts)
        assert len(seen) == B * H * 3 and {n for _, n in seen} == {1}
        assert len({t for t, _ in seen}) == 2 and threading.current_thread() not in {t for t, _ in seen}
        later = []
        started = threading.Thread(target=lambda: later.append(torch.get_num_threads()))
        started.start()
        started.join()
        assert torch.get_num_threads() == 2 and later == [2]
        with torch.inference_mode():  # the workers run in the caller's inference mode
            three = vk.tar_attention(q, k, v, backend="cpu", **opts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two) and torch.equal(one, three)
    if "key_mask" not in opts and "frames" not in opts:
        torch.testing.assert_close(two.double(), naive_tar(q, k, v, **opts), atol=2e-6, rtol=2e-6)


def test_16_bit_keys_and_values_are_converted_once_a_chunk_of_slices(monkeypatch):
    """bfloat16 keys and values are converted to float32 once for all the row blocks of a chunk of slices (they
    were converted again for every row block: a copy of a whole slice's keys and values each time), on one
    thread and on two (once more at most where the workers' shares split a chunk); the result is the
    reference's."""
    B, H, N, D = 1, 2, 48, 8
    q, k, v = (torch.randn(B, H, N, D, generator=torch.Generator().manual_seed(i)).bfloat16() for i in range(3))
    frames = vk.frame_ids(6, 8)
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 8 * N)  # blocks of 8 rows: 6 per slice
    converted, as_batch, tasks, chunk = [], cpu._as_batch, [], cpu._chunk_inplace
    monkeypatch.setattr(cpu, "_as_batch", lambda x, compute: converted.append(x.shape[-2]) or as_batch(x, compute))
    monkeypatch.setattr(cpu, "_chunk_inplace", lambda *a: tasks.append((a[3], a[4])) or chunk(*a))
    threads = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            converted.clear()
            tasks.clear()
            out = vk.tar_attention(q, k, v, backend="cpu", frames=frames, sigma=1.5)
            slices = {(b.start, b.stop, h.start, h.stop) for b, h in tasks}
            assert len(tasks) >= 6 * len(slices)
            assert converted.count(N) <= 2 * (len(slices) + count - 1), (converted, len(tasks))
            assert_close_to_reference(out, vk.tar_attention_reference(q.double(), k.double(), v.double(),
                                                                      frames=frames, sigma=1.5))
    finally:
        torch.set_num_threads(threads)


@pytest.mark.usefixtures("default_torch_threads")
def test_a_small_call_runs_in_one_chunk_on_the_callers_thread(monkeypatch):
    """The quick shape in (B, N, H, D) storage with two intra-op threads: one chunk (q, k, v copied), on
    the caller's thread, where starting worker threads and the chunks' operations would cost more than
    the compute (docs/performance.md, "Host overhead"); the result of the chunked call."""
    import threading

    q, k, v, _ = bnhd_inputs(4, 2, 16, 40, {}, seed=15, frame_tokens=4)
    seen, chunk = [], cpu._chunk_inplace
    monkeypatch.setattr(cpu, "_chunk_inplace", lambda *a: seen.append(threading.current_thread()) or chunk(*a))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        out = vk.tar_attention(q, k, v, sigma=1.5)
    finally:
        torch.set_num_threads(threads)
    assert seen == [threading.current_thread()]
    monkeypatch.setattr(cpu, "SMALL_CALL_ELEMENTS", 0)  # head by head, read in place
    assert torch.equal(out, vk.tar_attention(q, k, v, sigma=1.5)) and len(seen) > 2
    torch.testing.assert_close(out.double(), naive_tar(q, k, v, sigma=1.5), atol=2e-6, rtol=2e-6)


class Exps(TorchDispatchMode):
    """Counts the exponentials of the Gaussian (aten.exp), which a small call's bias is made of."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func is torch.ops.aten.exp.default
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("frames", [False, True], ids=["tokens", "frame-ids"])
def test_a_small_calls_bias_is_made_once(frames):
    """A small call's Gaussian (of token distance, or of the frame ids of self-attention) is made on its
    first call and kept: kept by sizes, sigma and dtype, and with the ids tensor, for its in-place version,
    so ids changed in place make it again (and give their own result)."""
    ids = vk.frame_ids(3, 4, text_before=4) if frames else None
    q, k, v, _ = bnhd_inputs(2, 3, 16, 8, {}, seed=16, frame_tokens=4)

    def run(sigma):
        problem = make_problem(q, k, v, sigma=sigma, strength=1.0, delta=None, causal=False, max_mode="row",
                               scale=None, frames=ids)
        with torch.no_grad(), Exps() as mode:
            out = cpu.cpu_forward(problem)
        return out, mode.count

    sigma = 1.0 + frames + 1e-3 * torch.rand(1).item()  # a sigma no other test kept
    first, made = run(sigma)
    again, made_again = run(sigma)
    assert made == 1 and made_again == 0 and torch.equal(first, again)
    assert run(sigma + 1.0)[1] == 1
    if frames:
        ids[-4:] = -1  # the last frame becomes text
        changed, made = run(sigma)
        assert made == 1
        assert torch.equal(changed, vk.tar_attention(q, k, v, frames=ids.clone(), sigma=sigma))
        assert not torch.equal(changed, first)



def test_long_lived_ids_keep_a_few_biases():
    """Ids that live as long as the process (a FrameLayout's shared ids) called with ever new sigmas keep the
    biases of the last cpu.KEPT_BIASES sigmas, not one per sigma (100 MiB after 400 sigmas before): a kept
    sigma is not made again, one pushed out is, and each call's output is the reference's."""
    from vstar_kernels._problem import _FRAME_VALUES

    layout = vk.FrameLayout(3, 4, text_before=4)
    q, k, v, _ = bnhd_inputs(1, 2, 16, 8, {}, seed=17, frame_tokens=4)
    ids = layout.shared_ids("cpu")
    sigmas = [1.0 + i / 7 + 1e-3 * torch.rand(1).item() for i in range(3 * cpu.KEPT_BIASES)]

    def run(sigma):
        problem = make_problem(q, k, v, sigma=sigma, strength=1.0, delta=None, causal=False, max_mode="row",
                               scale=None, frames=layout)
        with torch.no_grad(), Exps() as mode:
            out = cpu.cpu_forward(problem)
        torch.testing.assert_close(out, vk.tar_attention(q, k, v, frames=layout.ids(), sigma=sigma,
                                                         backend="reference"), atol=1e-6, rtol=0)
        return mode.count

    assert all(run(sigma) == 1 for sigma in sigmas)
    values = _FRAME_VALUES[ids][1]
    assert [key for key in values if "bias" in str(key)] == [("biases",)]
    assert len(values[("biases",)][0]) == cpu.KEPT_BIASES
    assert run(sigmas[-1]) == 0 and run(sigmas[-cpu.KEPT_BIASES]) == 0  # (the latter now the last used)
    assert run(sigmas[0]) == 1  # pushes out the least recently used, sigmas[-KEPT_BIASES + 1]
    assert run(sigmas[-cpu.KEPT_BIASES]) == 0 and run(sigmas[-cpu.KEPT_BIASES + 1]) == 1

def test_head_chunks_come_in_equal_shares():
    """Each head's batches in pieces of equal size (within one) and at most the chunk's batches, as many as
    make the number of chunks a multiple of CHUNKS_MULTIPLE (4), so that 2 or 4 worker threads get equal
    shares (ModelScope's 5 heads in one piece each would leave 2 threads 3 chunks against 2)."""
    assert cpu.CHUNKS_MULTIPLE == 4
    for batch, heads, per_chunk, count in [(10, 5, 4, 20), (2048, 5, 963, 20), (2048, 5, 4096, 20), (8, 2, 8, 4),
                                           (3, 4, 8, 4), (1, 5, 8, 5), (2, 3, 1, 6), (1, 1, 8, 1)]:
        chunks = cpu._head_chunks(batch, heads, per_chunk)
        assert len(chunks) == count
        sizes = [b.stop - b.start for b, _ in chunks]
        assert max(sizes) <= max(per_chunk, 1) and max(sizes) - min(sizes) <= 1
        covered = sorted((bi, h.start) for b, h in chunks for bi in range(b.start, b.stop))
        assert covered == sorted((bi, hi) for bi in range(batch) for hi in range(heads))


def test_cpu_backend_copies_blocks_it_must_convert(monkeypatch):
    """16-bit (B, N, H, D) inputs are converted to float32 block by block, in (batch, head) chunks."""
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 7, 3, 8, generator=g).half().transpose(1, 2) for _ in range(3))
    monkeypatch.setattr(cpu, "_head_chunks", lambda *a: pytest.fail("head chunks for a converted input"))
    out = vk.tar_attention(q, k, v, backend="cpu", sigma=1.5)
    expected = naive_tar(q, k, v, sigma=1.5)
    torch.testing.assert_close(out.double(), expected, atol=1e-3, rtol=1e-3)


SEGMENT_OPTIONS = [dict(), dict(causal=True, sigma=2.0), dict(max_mode="global", strength=-0.7), dict(delta=True),
                   dict(key_mask=True), dict(key_mask=True, max_mode="global", causal=True)]


@pytest.mark.usefixtures("default_torch_threads")
@pytest.mark.parametrize("rows", [None, 5], ids=["whole", "row-blocks"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("opts", SEGMENT_OPTIONS, ids=opts_id)
def test_cpu_backend_adds_the_frame_bias_run_by_run(opts, dtype, rows, monkeypatch):
    """Key ids that run frame by frame (runs of MIN_RUN_KEYS keys or more, here a text run, four frames
    and another text run: three segments) take a (rows, runs) table of the bias instead of (rows, Nk)
    blocks: the same values bit for bit, whole and in blocks of rows, in float32 and float64."""
    ids = vk.frame_ids(4, 20, text_before=16, text_after=18)
    segments, starts = cpu._key_segments(ids)
    assert segments == [[0, 0, 1, 16], [16, 1, 4, 20], [96, 5, 1, 18]] and starts == [0, 16, 36, 56, 76, 96]
    B, H, N, D = 2, 3, ids.numel(), 8
    g = torch.Generator().manual_seed(14)
    q, k, v = (torch.randn(B, N, H, D, generator=g, dtype=dtype).transpose(1, 2) for _ in range(3))
    opts = dict(opts, frames=ids)
    if opts.pop("delta", False):
        opts["delta"] = torch.rand(4, 4, generator=g, dtype=dtype)
    if opts.pop("key_mask", False):
        opts["key_mask"] = torch.rand(B, N, generator=g) > 0.3
        opts["key_mask"][1, :] = False  # a batch with no key: its rows give 0
    if rows is not None:
        monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", rows * N)
    tables, run_bias = [], cpu._run_bias
    monkeypatch.setattr(cpu, "_run_bias", lambda *a: tables.append(a) or run_bias(*a))
    by_runs = vk.tar_attention(q, k, v, backend="cpu", **opts)
    assert len(tables) == 1
    monkeypatch.setattr(cpu, "RUN_SEGMENTS", 2)  # three segments: (rows, Nk) bias blocks
    by_blocks = vk.tar_attention(q, k, v, backend="cpu", **opts)
    assert len(tables) == 1
    assert torch.equal(by_runs, by_blocks)
    if "key_mask" in opts:
        assert not by_runs[1].any()
    if dtype == torch.float32:  # and within float32's tolerance of the float64 definition
        ref64 = vk.tar_attention_reference(q.double(), k.double(), v.double(),
                                           **{key: x.double() if torch.is_tensor(x) and x.is_floating_point() else x
                                              for key, x in opts.items()})
        assert_close_to_reference(by_runs, ref64)
