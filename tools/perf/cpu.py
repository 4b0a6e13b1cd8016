"""`tools.perf cpu`: the CPU default path timed as users run it, against plain attention.

`tar_attention` on CPU tensors with backend "auto" (the PyTorch reference's in-place path) over
`sdpa_plain` (F.scaled_dot_product_attention without a bias), fp32, q, k and v in diffusers'
(B, N, H, D) storage, in one process: with the default thread count and with one thread. The two
are timed alternately (one call of each per round, after one warm-up call each), so that a change of
load hits both; the median, p20 and p80 of each are appended to <results>/cpu-default-path-<yyyymmdd>.csv
(a new file gets the header; a same-day rerun adds its rows after the earlier ones, as the harness's CSV
does) in the benchmark harness's row schema (vstar_kernels.bench.measure.row: device, versions, commit, time; the
threads and frame ids in `setup`; the load average before and after each cell, for the machine may be
shared: the spread says how much), which benchmarks/plot_results.py renders.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import RESULTS


@dataclass(frozen=True)
class Case:
    """One call: (batch, heads, N, head dim), and the frame layout of a DiT (frames x tokens per frame)."""

    name: str
    batch: int
    heads: int
    n: int
    d: int
    frames: tuple = ()  # (latent frames, tokens per frame): frame ids of a video DiT
    sigma: float = 1.0


# ModelScope 256x256's temporal attention at level 0 (bench shape modelscope-256x256-l0: 2,048 x 5
# sequences of head dim 64) at 16, 64 and 256 frames; DiT-like self-attention with frame ids.
CASES = (
    Case("modelscope-256x256-l0", 2048, 5, 16, 64),
    Case("modelscope-256x256-l0", 2048, 5, 64, 64),
    Case("modelscope-256x256-l0", 2048, 5, 256, 64),
    Case("dit 16 frames x 256 tokens", 1, 12, 4096, 64, frames=(16, 256)),
    Case("dit 16 frames x 256 tokens", 1, 8, 4096, 128, frames=(16, 256)),
)
QUICK = (CASES[0], CASES[3])


def _quantile(samples, q):
    s = sorted(samples)
    x = q * (len(s) - 1)
    lo = int(x)
    return s[lo] + (s[min(lo + 1, len(s) - 1)] - s[lo]) * (x - lo)


def time_pair(ours, plain, rounds: int) -> tuple:
    """(ours ms samples, plain ms samples): one warm-up call each, then `rounds` rounds of one call each."""
    ours(), plain()
    a, b = [], []
    for _ in range(rounds):
        for fn, out in ((ours, a), (plain, b)):
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return a, b


def measure(case: Case, threads: int, rounds: int, seed: int = 0) -> list:
    """Rows of one case at `threads` threads: ours (the default path) and sdpa_plain."""
    import vstar_kernels as vk
    from vstar_kernels import dispatch
    from vstar_kernels._problem import make_problem
    from vstar_kernels.bench.measure import RunInfo, Timing, ideal_cost, load_average, row, sched_ns, waited_share

    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(case.batch, case.n, case.heads, case.d, generator=g).transpose(1, 2) for _ in range(3))
    frames = vk.frame_ids(*case.frames) if case.frames else None
    with torch.no_grad():
        def ours():
            return vk.tar_attention(q, k, v, sigma=case.sigma, frames=frames)

        def plain():
            return F.scaled_dot_product_attention(q, k, v)

        before, sched = load_average(), sched_ns()
        a, b = time_pair(ours, plain, rounds)
        load, waited = f"{before}-{load_average()}" if before else "", waited_share(sched, sched_ns())
    info = RunInfo.collect(torch.device("cpu"))
    setup = ",".join(([f"frames={case.frames[0]}x{case.frames[1]}"] if case.frames else []) + [f"threads={threads}"])
    cost = ideal_cost(case.batch * case.heads, case.n, case.n, case.d, case.d, 4)
    ran = dispatch.select(make_problem(q, k, v, sigma=case.sigma, strength=1.0, delta=None, causal=False,
                                       max_mode="row", scale=None, frames=frames), "auto").name
    return [row(info, impl, case.batch, case.heads, case.n, case.d, "fp32", setup=setup, cost=cost,
                timing=Timing(*(_quantile(x, q) for q in (0.5, 0.2, 0.8)), load=load, waited=waited), backend=backend)
            for impl, x, backend in (("vstar_auto", a, ran), ("sdpa_plain", b, ""))]


def main(args) -> int:
    from vstar_kernels.bench.measure import append_row, check_columns

    directory = Path(os.path.abspath(args.out)) if args.out else RESULTS
    path = directory / f"cpu-default-path-{time.strftime('%Y%m%d', time.gmtime())}.csv"
    try:  # before the work: rows appended under another header would land under the wrong names
        check_columns(path)
    except ValueError as exc:
        print(f"{exc}: move it aside or write elsewhere (--out)", file=sys.stderr)
        return 2
    default = torch.get_num_threads()
    for threads in dict.fromkeys((default, 1)):
        for case in QUICK if args.quick else CASES:
            out = measure(case, threads, args.rounds)
            for r in out:  # as measured: a killed run keeps what it measured
                append_row(path, r)
            o, p = out
            ratio = float(o["median_ms"]) / float(p["median_ms"])
            print(f"{case.name} (B{case.batch} H{case.heads} N{case.n} D{case.d}) threads {threads}: ours "
                  f"{o['median_ms']} ms [{o['p20_ms']}, {o['p80_ms']}], sdpa_plain {p['median_ms']} ms "
                  f"[{p['p20_ms']}, {p['p80_ms']}], ours/sdpa_plain {ratio:.2f}, load {o['loadavg']}", flush=True)
    print(f"appended to {path}")
    return 0
