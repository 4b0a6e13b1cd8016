"""Memory traffic and MMA work of the Triton forward, counted in the Triton interpreter.

`count_traffic()` patches the interpreter's builder while it is active: every masked load and
store adds the bytes of its active lanes (element size x lanes whose mask is true) and the
byte addresses it touches; every `tl.dot` (and the interpreter's stand-in for one, `_jit._mma_rows`) adds
2 M N K FLOPs whatever its masks. Counts are
per call of whatever runs inside the block, all kernel launches together, plus one entry per
launch.

What is ideal (the package's `vstar_kernels.bench.measure.ideal_cost`, which the harness's GB/s and
TFLOP/s use too): reading Q, K, V once and writing O once, plus the delta entries the attention uses
(Nq x Nk, the causal lower triangle when causal) when a custom delta is given; the FLOPs of Q K^T and
P V over the real rows and columns of each sequence, 2 Nq Nk (D + Dv), causal or not. What the tiled
algorithm requests (`tiled_bytes`, `band_tiles`): the formula the interpreter counts must equal
(tests/perf/test_traffic.py), which tools/perf/model.py uses. Numbers are counts, not timings.

`python -m tools.perf traffic` runs `sweep()` over TRAFFIC_CASES and writes
traffic.csv and traffic.md (see tools/perf/model.md).
"""

from __future__ import annotations

import contextlib
import csv
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from vstar_kernels.bench import measure
from vstar_kernels.ops.layout import is_packed

from . import RESULTS

# Compact the byte-address list into its unique set once it holds this many entries.
_COMPACT_AT = 1 << 24


@dataclass
class Launch:
    """One kernel launch inside a counted block: its name, the constexprs and ints it got, its counts."""

    kernel: str
    meta: dict
    requested_bytes: int = 0
    mma_flops: int = 0


@dataclass
class Traffic:
    """What a counted block did: requested bytes (active lanes x element size), MMA FLOPs, launches."""

    requested_bytes: int = 0
    load_bytes: int = 0
    store_bytes: int = 0
    mma_flops: int = 0
    launches: list = field(default_factory=list)
    _addresses: list = field(default_factory=list, repr=False)
    _pending: int = field(default=0, repr=False)

    def _touch(self, byte_addresses: np.ndarray) -> None:
        self._addresses.append(byte_addresses)
        self._pending += byte_addresses.size
        if self._pending >= _COMPACT_AT:
            self._addresses = [np.unique(np.concatenate(self._addresses))]
            self._pending = self._addresses[0].size

    @property
    def distinct_bytes(self) -> int:
        """Bytes at distinct addresses that any load or store touched."""
        if not self._addresses:
            return 0
        return int(np.unique(np.concatenate(self._addresses)).size)

    def _access(self, ptrs, mask, store: bool) -> None:
        size = ptrs.get_element_ty().primitive_bitwidth // 8
        addresses = ptrs.data.astype(np.int64, copy=False)
        active = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
        lanes = addresses[active]
        nbytes = int(lanes.size) * size
        self.requested_bytes += nbytes
        if store:
            self.store_bytes += nbytes
        else:
            self.load_bytes += nbytes
        if self.launches:
            self.launches[-1].requested_bytes += nbytes
        self._touch((lanes[:, None] + np.arange(size, dtype=np.int64)[None, :]).ravel())

    def _mma(self, m: int, n: int, k: int, batch: int = 1) -> None:
        flops = 2 * m * n * k * batch
        self.mma_flops += flops
        if self.launches:
            self.launches[-1].mma_flops += flops


def _scalar_meta(kwargs) -> dict:
    return {k: v for k, v in kwargs.items() if isinstance(v, (bool, int, float, str))}


@contextlib.contextmanager
def count_traffic():
    """Count the Triton interpreter's loads, stores and dots inside the block; yields a Traffic.

    Needs TRITON_INTERPRET=1 from the start of the process. The builder's methods are patched
    on the class while the block runs and restored after it, even when it raises.
    """
    import triton
    from triton.runtime import interpreter

    if not triton.knobs.runtime.interpret:
        raise RuntimeError("count_traffic counts the Triton interpreter's work: start Python with TRITON_INTERPRET=1")
    builder = interpreter.InterpreterBuilder
    fn_class = interpreter.InterpretedFunction
    load, store, dot, run, call = (builder.create_masked_load, builder.create_masked_store, builder.create_dot,
                                   fn_class.run, fn_class.__call__)
    traffic = Traffic()

    # Each counter reads the leading arguments only and passes every argument on: the cache hints
    # after them differ between Triton releases (3.7: cache_modifier, eviction_policy; 3.9: cache_policy).
    def counted_load(self, ptrs, mask, *rest):
        traffic._access(ptrs, mask, store=False)
        return load(self, ptrs, mask, *rest)

    def counted_store(self, ptrs, value, mask, *rest):
        traffic._access(ptrs, mask, store=True)
        return store(self, ptrs, value, mask, *rest)

    def counted_dot(self, a, b, *rest):
        *batch, m, k = a.data.shape
        traffic._mma(m, b.data.shape[-1], k, int(np.prod(batch, dtype=np.int64)))
        return dot(self, a, b, *rest)

    def counted_call(self, *args, **kwargs):
        if self.fn.__name__ == "_mma_rows":  # ops/_jit.py: the interpreter's stand-in for a tile product
            *batch, m, k = args[0].handle.data.shape
            traffic._mma(m, args[1].handle.data.shape[-1], k, int(np.prod(batch, dtype=np.int64)))
        return call(self, *args, **kwargs)

    def counted_run(self, *args, grid, warmup, **kwargs):
        traffic.launches.append(Launch(getattr(self.fn, "__name__", str(self.fn)), _scalar_meta(kwargs)))
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    builder.create_masked_load = counted_load
    builder.create_masked_store = counted_store
    builder.create_dot = counted_dot
    fn_class.run = counted_run
    fn_class.__call__ = counted_call
    try:
        yield traffic
    finally:
        builder.create_masked_load = load
        builder.create_masked_store = store
        builder.create_dot = dot
        fn_class.run = run
        fn_class.__call__ = call


# --------------------------------------------------------------------------- the tiled algorithm's requests

def band_tiles(mb, hi, block_m, block_n, band):
    """[lo, hi) of the key tiles in query block mb's band (ops/tar_fwd.py), keys within `band` of a row."""
    lo = min(max(mb * block_m - band + 1, 0) // block_n * block_n, hi)
    return lo, max(min(math.ceil(((mb + 1) * block_m - 1 + band) / block_n) * block_n, hi), lo)


def tiled_bytes(nq, nk, d, dv, itemsize, block_m, block_n, *, band=None, causal=False, global_max=False,
                delta_itemsize=0, frame_ids=False):
    """Bytes one sequence's tiled forward requests.

    Per query block of BLOCK_M rows: Q read and O written once; the key tiles up to the causal
    limit (whole BLOCK_N tiles, masked at Nk) read for K and V once by the online softmax, and
    for K once more by the row-max walk: over the band tiles (`band`: the one-pass path's band
    width) or over every tile (band None: the two-pass form); the delta entries used, once. A
    global max adds a pre-pass that reads Q once more and K in place of the walk, stores the
    float32 row maxima, and the main pass loads the sequence's max on all BLOCK_M lanes. Frame
    ids (int32, two passes: band None) add each block's query ids once and the key ids of every
    tile of the biased softmax.
    """
    total = measure.delta_entries(nq, nk, causal) * delta_itemsize
    for mb in range(math.ceil(nq / block_m)):
        rows = min(block_m, nq - mb * block_m)
        hi = min(nk, (mb + 1) * block_m) if causal else nk
        keys = min(nk, math.ceil(hi / block_n) * block_n)
        lo, band_hi = (0, hi) if band is None else band_tiles(mb, hi, block_m, block_n, band)
        walk = min(nk, math.ceil(band_hi / block_n) * block_n) - lo if band_hi > lo else 0
        total += (rows * d + keys * d + walk * d + keys * dv + rows * dv) * itemsize
        if frame_ids:
            total += (rows + keys) * 4
        if global_max:
            total += rows * d * itemsize + rows * 4 + block_m * 4
    return total


# --------------------------------------------------------------------------- the sweep

OPTIONS = ("plain", "causal", "global", "delta", "frames")
# The "frames" option: the sequence in FRAMES equal latent frames (ids 0 .. FRAMES - 1), sigma 1.
FRAMES = 4


@dataclass(frozen=True)
class TrafficCase:
    shape: str      # a name of bench.shapes.SHAPES, or "d<D>" for a head dim no named shape has
    n: int
    head_dim: int
    dtype: str      # "fp16" or "bf16"
    option: str     # one of OPTIONS


def _cases(ns, head_dims, dtypes, options) -> list:
    named = {40: "animatediff-512x512-l0", 64: "vc2-320x512-l0", 80: "animatediff-512x512-l1"}
    return [TrafficCase(named.get(d, f"d{d}"), n, d, dt, opt)
            for d in head_dims for dt in dtypes for opt in options for n in ns]


SHORT_N = (16, 64, 128)
LONG_N = (256, 1024)
# Every option at D 64 fp16; bf16 and the other head dims with the defaults. The interpreter needs
# minutes per N = 1024 call, so N = 1024 runs the defaults at D 64 fp16 only.
TRAFFIC_CASES = (_cases(SHORT_N + LONG_N[:1], (64,), ("fp16",), OPTIONS)
                 + _cases(SHORT_N[-1:] + LONG_N[:1], (128,), ("bf16",), ("frames",))
                 + _cases(SHORT_N + LONG_N[:1], (64,), ("bf16",), ("plain",))
                 + _cases(SHORT_N + LONG_N[:1], (40, 80, 128, 160), ("fp16",), ("plain",))
                 + _cases(LONG_N[1:], (64,), ("fp16",), ("plain",)))
QUICK_CASES = (_cases((16, 256), (64,), ("fp16",), OPTIONS)
               + _cases((16,), (40,), ("bf16",), ("plain",)))
# (batch, heads) per layout. Bytes and FLOPs scale with batch x heads; the ratios do not as long as
# packed tiles are full (8 sequences fill the interpreter's 128-row tile at N = 16) and the tiled
# kernel gives each program one sequence's query block, so one sequence says it all there.
SEQUENCES = {"packed": (2, 4), "tiled": (1, 1)}
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def layout(case: TrafficCase) -> str:
    """The layout the launcher runs: frame ids run the tiled one at every length."""
    packed = is_packed(case.n, case.n, case.head_dim, case.head_dim) and case.option != "frames"
    return "packed" if packed else "tiled"


def measure_case(case: TrafficCase, batch: int | None = None, heads: int | None = None, seed: int = 0) -> dict:
    """Run one case through tar_attention(backend="triton") under count_traffic(); one CSV row.

    batch and heads default to SEQUENCES of the case's layout.
    """
    from vstar_kernels import tar_attention

    default_batch, default_heads = SEQUENCES[layout(case)]
    batch = default_batch if batch is None else batch
    heads = default_heads if heads is None else heads
    gen = torch.Generator().manual_seed(seed)
    dtype = DTYPES[case.dtype]
    n, d = case.n, case.head_dim
    # diffusers' (B, N, H, D) projections viewed as (B, H, N, D)
    q, k, v = (torch.randn(batch, n, heads, d, generator=gen).to(dtype).transpose(1, 2) for _ in range(3))
    delta = torch.rand(batch, heads, n, n, generator=gen).to(dtype) if case.option == "delta" else None
    frames = torch.arange(n) * FRAMES // n if case.option == "frames" else None
    with torch.no_grad(), count_traffic() as t:
        tar_attention(q, k, v, delta=delta, causal=case.option == "causal",
                      max_mode="global" if case.option == "global" else "row", frames=frames, backend="triton",
                      speculate=False)
    bh = batch * heads
    ideal, useful = measure.ideal_cost(bh, n, n, d, d, q.element_size(), causal=case.option == "causal",
                                       delta_itemsize=delta.element_size() if delta is not None else 0)
    return {
        "shape": case.shape, "layout": layout(case), "dtype": case.dtype,
        "n": n, "d": d, "options": case.option, "sequences": bh,
        "requested_bytes": t.requested_bytes, "distinct_bytes": t.distinct_bytes, "ideal_bytes": ideal,
        "requested_per_ideal": t.requested_bytes / ideal, "distinct_per_ideal": t.distinct_bytes / ideal,
        "mma_flops_issued": t.mma_flops, "useful_flops": useful, "useful_share": useful / t.mma_flops,
        "status": "ok",
    }


def failed_row(case: TrafficCase, status: str) -> dict:
    """The row of a case whose call raised: no counts, the reason in `status`."""
    row = dict.fromkeys(COLUMNS)
    row.update(shape=case.shape, layout=layout(case), dtype=case.dtype, n=case.n, d=case.head_dim,
               options=case.option, status=status)
    return row


COLUMNS = ("shape", "layout", "dtype", "n", "d", "options", "sequences", "requested_bytes", "distinct_bytes",
           "ideal_bytes", "requested_per_ideal", "distinct_per_ideal", "mma_flops_issued", "useful_flops",
           "useful_share", "status")


def markdown(rows, info: "measure.RunInfo") -> str:
    lines = [
        "# Forward traffic and MMA work per call",
        "",
        f"Counted in the Triton interpreter (`python -m tools.perf traffic`), not timed: commit "
        f"{info.commit}, {info.date}, triton {info.triton}, torch {info.torch}. Each case runs "
        f"`tar_attention(backend=\"triton\")` on q, k, v stored (B, N, H, D) and viewed as (B, H, N, D), "
        f"batch x heads = {SEQUENCES['packed'][0]} x {SEQUENCES['packed'][1]} (packed) and "
        f"{SEQUENCES['tiled'][0]} x {SEQUENCES['tiled'][1]} (tiled); bytes and FLOPs are for all "
        "sequences of a case; the ratios do not depend on that count.",
        "",
        "requested: bytes of the active lanes of every masked load and store; distinct: bytes at distinct "
        "addresses; ideal: Q, K, V read once, O written once, plus the delta entries used (custom delta); "
        f"frames: the sequence in {FRAMES} equal latent frames (frame ids, two passes; the int32 ids are not in "
        "the ideal); "
        "MMA issued: 2 M N K per tile product (the interpreter's explicit-sum stand-in counted as the dot it "
        "replaces); useful: 2 N^2 (D + Dv) per sequence, causal or not, so a causal call that skips the "
        "tiles above the diagonal can show a share over 100%.",
        "",
        "| shape | layout | dtype | N | D | options | sequences | requested B | distinct B | ideal B | requested/ideal "
        "| distinct/ideal | MMA FLOPs issued | useful | useful share |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        if r["status"] != "ok":
            lines.append(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['n']} | {r['d']} | {r['options']} "
                         f"| {r['status']} |" + " |" * 8)
            continue
        lines.append(f"| {r['shape']} | {r['layout']} | {r['dtype']} | {r['n']} | {r['d']} | {r['options']} "
                     f"| {r['sequences']} | {r['requested_bytes']:,} | {r['distinct_bytes']:,} | {r['ideal_bytes']:,} "
                     f"| {r['requested_per_ideal']:.2f} | {r['distinct_per_ideal']:.2f} "
                     f"| {r['mma_flops_issued']:,} | {r['useful_flops']:,} | {100 * r['useful_share']:.1f}% |")
    return "\n".join(lines) + "\n"


def sweep(cases, out_dir: Path, progress=print) -> list:
    """Measure every case (a call that raises gets a row saying why); write out_dir/traffic.csv and
    traffic.md; returns the rows."""
    from vstar_kernels.bench.harness import classify

    info = measure.RunInfo.collect(torch.device("cpu"))
    rows = []
    for i, case in enumerate(cases, 1):
        progress(f"[{i}/{len(cases)}] {case.shape} N={case.n} D={case.head_dim} {case.dtype} {case.option}")
        try:
            rows.append(measure_case(case))
        except Exception as exc:  # noqa: BLE001 - the row says why; main's exit code reports it
            rows.append(failed_row(case, classify(exc)))
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "traffic.csv", out_dir / "traffic.md"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in COLUMNS})
    md_path.write_text(markdown(rows, info))
    progress(f"wrote {csv_path}")
    progress(f"wrote {md_path}")
    return rows


def main(args) -> int:
    """`python -m tools.perf traffic [--quick] [--out DIR]`: the sweep, or the CI subset, to traffic.csv/.md."""
    out_dir = Path(args.out).resolve() if args.out else RESULTS
    failed = [r for r in sweep(QUICK_CASES if args.quick else TRAFFIC_CASES, out_dir) if r["status"] != "ok"]
    for r in failed:
        print(f"FAILED: N={r['n']} D={r['d']} {r['dtype']} {r['options']}: {r['status']}", file=sys.stderr)
    return 1 if failed else 0
