"""The forward's memory traffic and MMA work, counted in the Triton interpreter (tools/perf/traffic.py).

Regression gate: the packed layout reads and writes exactly the ideal bytes; the tiled layout
moves exactly what its algorithm implies for the block sizes the launcher gives the interpreter
(read from the launch itself): a FlashAttention loop plus K's band tiles once more for the
row-max Gaussian (one pass), K twice for the global max and a custom delta (two passes).
"""

import math

import pytest
import torch
import triton
import triton.language as tl

from tools.perf.traffic import TrafficCase, band_tiles, count_traffic, measure_case, tiled_bytes
from vstar_kernels import frame_ids as vk_frame_ids
from vstar_kernels.bench.measure import delta_entries, ideal_cost
from vstar_kernels.ops.layout import block_dims
from vstar_kernels.ops import tar_fwd
from vstar_kernels.ops.launch import band_width

pytestmark = pytest.mark.skipif(not triton.knobs.runtime.interpret,
                                reason="counts the Triton interpreter's work (TRITON_INTERPRET=1)")


@triton.jit
def _gather(X, Y, IDX, n, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    ok = offs < n
    idx = tl.load(IDX + offs, mask=ok, other=0)
    tl.store(Y + offs, tl.load(X + idx, mask=ok, other=0.0), mask=ok)


@triton.jit
def _matmul(A, B, C, M: tl.constexpr, N: tl.constexpr, K: tl.constexpr):
    rm, rn, rk = tl.arange(0, M), tl.arange(0, N), tl.arange(0, K)
    a = tl.load(A + rm[:, None] * K + rk[None, :])
    b = tl.load(B + rk[:, None] * N + rn[None, :])
    tl.store(C + rm[:, None] * N + rn[None, :], tl.dot(a, b))


def test_counts_active_lanes_distinct_addresses_and_restores():
    x = torch.arange(8, dtype=torch.float16)
    y = torch.zeros(16, dtype=torch.float16)
    idx = torch.tensor([3, 3, 3, 5, 0, 0, 0, 0, 0, 0], dtype=torch.int32)
    original = triton.runtime.interpreter.InterpreterBuilder.create_masked_load
    with count_traffic() as t:
        _gather[(1,)](x, y, idx, 5, BLOCK=16)
    assert triton.runtime.interpreter.InterpreterBuilder.create_masked_load is original
    # 5 active lanes of 16: idx int32 (20 B), x fp16 (10 B), y fp16 stores (10 B)
    assert (t.load_bytes, t.store_bytes, t.requested_bytes) == (30, 10, 40)
    # idx[0:5] 20 B; x at 3, 5, 0: 6 B; y[0:5] 10 B
    assert t.distinct_bytes == 36
    assert [launch.kernel for launch in t.launches] == ["_gather"]
    assert t.mma_flops == 0


def test_counts_dot_flops_and_restores_after_an_error():
    a, b = torch.randn(16, 32), torch.randn(32, 64)
    c = torch.empty(16, 64)
    with count_traffic() as t:
        _matmul[(1,)](a, b, c, M=16, N=64, K=32)
    assert t.mma_flops == 2 * 16 * 64 * 32
    original = triton.runtime.interpreter.InterpreterBuilder.create_dot
    with pytest.raises(ZeroDivisionError), count_traffic():
        1 / 0
    assert triton.runtime.interpreter.InterpreterBuilder.create_dot is original


# ----------------------------------------------------------------- packed: the ideal, exactly


@pytest.mark.parametrize("option", ["plain", "causal", "global", "delta"])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_packed_moves_exactly_the_ideal_bytes(option, dtype):
    row = measure_case(TrafficCase("t", 16, 40, dtype, option))
    assert row["layout"] == "packed"
    assert row["requested_bytes"] == row["distinct_bytes"] == row["ideal_bytes"]


@pytest.mark.parametrize("n, d", [(16, 64), (80, 160)])
def test_causal_delta_reads_only_the_entries_used(n, d):
    """Packed and tiled: the delta entries with key j <= query i, each once, and no more."""
    plain = _run(n, d, "fp16", causal=True)
    with_delta = _run(n, d, "fp16", causal=True, delta=True)
    assert delta_entries(n, n, True) == n * (n + 1) // 2
    assert with_delta.requested_bytes - plain.requested_bytes == n * (n + 1) // 2 * 2
    assert with_delta.distinct_bytes - plain.distinct_bytes == n * (n + 1) // 2 * 2


@pytest.mark.parametrize("n, d, share", [(16, 64, 1.0), (16, 40, 40 / 48), (16, 80, 1.0), (13, 64, (13 / 16) ** 2),
                                         (64, 64, 1.0)])
def test_packed_useful_mma_share(n, d, share):
    """One batched product per sequence of SEG = pow2(N) (at least 16) rows and columns: every
    issued FLOP is useful at N = 16 and 64, times D / (the head dim's chunks, layout.head_chunks)
    (40 / 48 at D = 40, held as 32 + 16; 80 = 64 + 16 whole) and (N / SEG)^2 for a padded sequence."""
    row = measure_case(TrafficCase("t", n, d, "fp16", "plain"))
    assert row["layout"] == "packed"
    assert row["useful_share"] == share


def test_ratios_do_not_depend_on_the_batch():
    a = measure_case(TrafficCase("t", 16, 64, "fp16", "delta"), batch=2, heads=4)
    b = measure_case(TrafficCase("t", 16, 64, "fp16", "delta"), batch=4, heads=4)
    c = measure_case(TrafficCase("t", 80, 160, "fp16", "global"), batch=1, heads=1)
    d = measure_case(TrafficCase("t", 80, 160, "fp16", "global"), batch=2, heads=1)
    for x, y in ((a, b), (c, d)):
        assert 2 * x["requested_bytes"] == y["requested_bytes"]
        assert 2 * x["distinct_bytes"] == y["distinct_bytes"]
        for key in ("requested_per_ideal", "distinct_per_ideal", "useful_share"):
            assert x[key] == y[key]


# ----------------------------------------------------------------- tiled: the algorithm, exactly


def flash_bytes(nq, nk, d, dv, itemsize, block_m, block_n):
    """A FlashAttention loop over the same tiles: Q, O once, K and V once per query block."""
    total = 0
    for mb in range(math.ceil(nq / block_m)):
        rows = min(block_m, nq - mb * block_m)
        total += (rows * d + min(nk, math.ceil(nk / block_n) * block_n) * (d + dv) + rows * dv) * itemsize
    return total


def _tiled_blocks(launches):
    """(BLOCK_M, BLOCK_N) the launcher gave the interpreter's tiled kernel: one pair for every launch."""
    blocks = {(launch.meta["BLOCK_M"], launch.meta["BLOCK_N"]) for launch in launches}
    assert len(blocks) == 1, blocks
    return blocks.pop()


def _run(n, d, dtype, *, causal=False, delta=False, global_max=False, frames=None, speculate=False, zeros=False):
    """One sequence stored (B, N, H, D) through tar_attention(backend="triton"), counted (frame ids: two passes
    unless `speculate`; `zeros`: q = k = 0, every score 0, so that the speculative guess is every row's max)."""
    import vstar_kernels as vk

    dt = {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    q, k, v = ((torch.zeros if zeros and i < 2 else torch.randn)(1, n, 1, d).to(dt).transpose(1, 2) for i in range(3))
    with torch.no_grad(), count_traffic() as t:
        vk.tar_attention(q, k, v, delta=torch.rand(1, 1, n, n).to(dt) if delta else None, causal=causal,
                         max_mode="global" if global_max else "row", frames=frames, backend="triton",
                         speculate=speculate)
    return t


def test_speculative_requests_the_guess_tiles_instead_of_the_walk():
    """Frame ids, nothing flagged: the two passes' bytes less the walk's K, plus the K of the tiles the guess
    walks (model_dit.guess_tiles; the keys past N masked) and its scan of every key tile's ids, each block's
    count of flagged rows (written, then read by each program of the listing launch), the sequence's count
    (written by the listing, read by each redo program); the QK^T product issued over the guess tiles instead
    of every tile."""
    from tools.perf.model_dit import guess_tiles

    n, d = 200, 160
    frames = vk_frame_ids(10, 18, text_before=20)
    two = _run(n, d, "fp16", frames=frames, zeros=True)
    one = _run(n, d, "fp16", frames=frames, speculate=True, zeros=True)
    block_m, block_n = _tiled_blocks(two.launches)
    blocks, tiles = math.ceil(n / block_m), math.ceil(n / block_n)
    guess = guess_tiles(frames, block_m, block_n)
    ids = frames.tolist()
    guess_keys = 0  # the keys of the walked tiles, per (query block, key tile) by `_guess_max`'s rule
    for r in range(0, n, block_m):
        rows = [f for f in ids[r:r + block_m] if f >= 0]
        for c in range(0, n, block_n):
            keys = ids[c:c + block_n]
            if rows and (-1 in keys or any(min(rows) <= f <= max(rows) for f in keys)):
                guess_keys += len(keys)
    assert 0 < guess < blocks * tiles and guess * block_n > guess_keys
    listing = math.ceil(n / tar_fwd._LIST["SLOTS"])  # programs of the listing launch
    assert one.requested_bytes == (two.requested_bytes - blocks * n * d * 2 + guess_keys * d * 2
                                   + 4 * blocks * n + 4 * blocks * (1 + listing) + 4 + 4 * blocks)
    padded = block_dims(d, d)[0]  # the columns the products run at (the head dim's chunks)
    assert two.mma_flops - one.mma_flops == 2 * block_m * block_n * padded * (blocks * tiles - guess)


@pytest.mark.parametrize("option", ["plain", "causal", "global", "delta", "frames", "frames_causal"])
def test_tiled_requests_exactly_the_algorithms_bytes(option):
    n, d = 80, 160  # tiled (a head dim > 128 halves the packed limit to 64), 2 query blocks, cheap
    causal = option in ("causal", "frames_causal")
    frames = vk_frame_ids(4, 20) if option.startswith("frames") else None
    t = _run(n, d, "fp16", causal=causal, delta=option == "delta", global_max=option == "global", frames=frames)
    block_m, block_n = _tiled_blocks(t.launches)
    band = band_width(-0.5 * math.log2(math.e), 2 * n) if option in ("plain", "causal") else None
    expected = tiled_bytes(n, n, d, d, 2, block_m, block_n, band=band, causal=causal, global_max=option == "global",
                           delta_itemsize=2 if option == "delta" else 0, frame_ids=frames is not None)
    assert t.requested_bytes == expected
    if frames is not None:  # the ids: each block's rows once, the keys once per block's biased pass
        assert expected - tiled_bytes(n, n, d, d, 2, block_m, block_n, causal=causal) == 4 * sum(
            min(block_m, n - r) + min(n, math.ceil((min(n, r + block_m) if causal else n) / block_n) * block_n)
            for r in range(0, n, block_m))
    extra = 4 * (n + 1) if option == "global" else 0  # the row maxima and the sequence max
    extra += 4 * n if frames is not None else 0  # the ids: one int32 tensor for the queries and the keys
    assert t.distinct_bytes == ideal_cost(1, n, n, d, d, 2, causal=causal,
                                          delta_itemsize=2 if option == "delta" else 0).bytes + extra


def test_tiled_n256_one_pass_is_flash_plus_the_band():
    """Row max, sigma = 1 (band 15): K and V once per query block, K's band tiles once more; the
    QK^T product issued once per tile and once more per band tile, P V once per tile."""
    n, d = 256, 64
    t = _run(n, d, "fp16")
    block_m, block_n = _tiled_blocks(t.launches)
    band = band_width(-0.5 * math.log2(math.e), 2 * n)
    assert band == 15
    walked = sum(hi - lo for lo, hi in (band_tiles(mb, n, block_m, block_n, band) for mb in range(n // block_m)))
    assert t.requested_bytes == tiled_bytes(n, n, d, d, 2, block_m, block_n, band=band)
    assert t.requested_bytes == flash_bytes(n, n, d, d, 2, block_m, block_n) + walked * d * 2
    assert t.requested_bytes < tiled_bytes(n, n, d, d, 2, block_m, block_n)  # the two-pass form's 3.5x ideal
    bd, bdv = block_dims(d, d)
    assert t.mma_flops == 2 * block_m * (n * n // block_m + walked) * bd + 2 * n * n * bdv


def test_bench_traffic_cli_writes_the_csv_and_table(tmp_path, monkeypatch):
    import csv

    from tools.perf import traffic
    from tools.perf.__main__ import main as perf_main

    monkeypatch.setattr(traffic, "QUICK_CASES", [TrafficCase("vc2-320x512-l0", 16, 64, "fp16", "plain")])
    assert perf_main(["traffic", "--quick", "--out", str(tmp_path)]) == 0
    rows = list(csv.DictReader(open(tmp_path / "traffic.csv")))
    assert [(r["layout"], r["requested_per_ideal"], r["useful_share"]) for r in rows] == [("packed", "1", "1")]
    assert "Counted in the Triton interpreter" in (tmp_path / "traffic.md").read_text()


def test_a_case_that_raises_gets_a_row_and_fails_the_command(tmp_path, monkeypatch):
    import csv

    from tools.perf import traffic
    from tools.perf.__main__ import main as perf_main

    def raising(case):
        raise ValueError("no such kernel")

    monkeypatch.setattr(traffic, "measure_case", raising)
    monkeypatch.setattr(traffic, "QUICK_CASES", [TrafficCase("vc2-320x512-l0", 16, 64, "fp16", "plain")])
    assert perf_main(["traffic", "--quick", "--out", str(tmp_path)]) == 1
    rows = list(csv.DictReader(open(tmp_path / "traffic.csv")))
    assert [(r["n"], r["requested_bytes"], r["status"]) for r in rows] == [
        ("16", "", "error: ValueError: no such kernel")]
    assert "error: ValueError: no such kernel" in (tmp_path / "traffic.md").read_text()
