"""Measuring: the traffic and FLOP model, timers, the device's copy bandwidth, and run metadata."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import re
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import _env

QUANTILES = (0.5, 0.2, 0.8)   # median, p20, p80
SLOW_CALL_MS = 100.0          # CUDA calls slower than this are timed with a few events, not do_bench
# A timing whose p80 exceeds its p20 by more than this factor was taken on a busy machine, or is of
# calls too short to time steadily (why 1.25: benchmarks/NOTES.md, "Busy cells").
BUSY_SPREAD = 1.25
BUSY = "busy"


def attention_bytes(batch, heads, nq, nk, d, dv, itemsize) -> int:
    """The least traffic of one attention call: read Q, K and V once, write O once."""
    return batch * heads * (nq * d + nk * d + nk * dv + nq * dv) * itemsize


def attention_flops(batch, heads, nq, nk, d, dv) -> int:
    """The two matmuls, S = Q K^T and O = P V: 2 FLOPs per multiply-add. D = Dv gives 4 B H Nq Nk D."""
    return 2 * batch * heads * nq * nk * (d + dv)


def row_max_flops(batch, heads, nq, nk, d) -> int:
    """The extra Q K^T of a separate exact row-max pass (the tiled kernel, the two-pass peers)."""
    return 2 * batch * heads * nq * nk * d


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float

    @property
    def flag(self) -> str:
        return spread_flag(self.p20_ms, self.p80_ms)


def spread_flag(p20_ms, p80_ms) -> str:
    """BUSY when the p80/p20 spread of a timing says the machine was busy while it ran, else ""."""
    return BUSY if p20_ms > 0 and p80_ms / p20_ms > BUSY_SPREAD else ""


def _quantiles(samples) -> Timing:
    if len(samples) == 1:
        return Timing(samples[0], samples[0], samples[0])
    cuts = statistics.quantiles(samples, n=10, method="inclusive")  # deciles: cuts[1] = p20, cuts[7] = p80
    return Timing(statistics.median(samples), cuts[1], cuts[7])


def time_cpu(fn, *, min_reps=3, max_reps=25, min_total_s=0.25) -> Timing:
    """CPU wall clock (perf_counter) per call; the caller has already warmed `fn` up."""
    samples = []
    start = time.perf_counter()
    while len(samples) < max_reps and (len(samples) < min_reps or time.perf_counter() - start < min_total_s):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return _quantiles(samples)


def time_cuda(fn, first_call_ms: float) -> Timing:
    """triton.testing.do_bench (L2 flushed between calls); calls slower than SLOW_CALL_MS (the warm call's
    `first_call_ms`) get 3 event pairs: do_bench would spend seconds estimating them."""
    if first_call_ms > SLOW_CALL_MS:
        samples = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end))
        return _quantiles(samples)
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=list(QUANTILES))
    return Timing(float(med), float(p20), float(p80))


def warm_call_ms(fn, cuda: bool) -> float:
    """Run `fn` once (compiles, autotunes, warms caches) and return how long it took."""
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3


def peak_call(fn, device: torch.device) -> tuple:
    """Run `fn` once: (ms, the CUDA memory allocated during the call beyond what was allocated before, MiB;
    None on CPU)."""
    if device.type != "cuda":
        return warm_call_ms(fn, False), None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    ms = warm_call_ms(fn, True)
    return ms, (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20


def time_fn(fn, cuda: bool, first_call_ms: float) -> Timing:
    return time_cuda(fn, first_call_ms) if cuda else time_cpu(fn)


def copy_bandwidth(device: torch.device) -> tuple:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted), and the Timing."""
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    fn = lambda: dst.copy_(src)  # noqa: E731
    timing = time_fn(fn, cuda, warm_call_ms(fn, cuda))
    return 2 * nbytes / (timing.median_ms * 1e-3) / 1e9, timing, nbytes


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        found = re.search(r"^model name[^:]*:(.*)$", Path("/proc/cpuinfo").read_text(), re.MULTILINE)
        model = found.group(1).strip() if found else model
    return f"cpu ({model})"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def commit() -> str:
    """VSTAR_BENCH_COMMIT if set (a copy of the tree without .git), else git's HEAD (+ '-dirty')."""
    if os.environ.get("VSTAR_BENCH_COMMIT"):
        return os.environ["VSTAR_BENCH_COMMIT"]
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
                              capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return "unknown"
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


@dataclass(frozen=True)
class RunInfo:
    """What every CSV row of one run carries."""

    device: str
    torch: str
    triton: str
    commit: str
    date: str        # yyyymmdd (UTC), the results file's name
    cuda: bool

    @classmethod
    def collect(cls, device: torch.device) -> "RunInfo":
        return cls(device_name(device), torch.__version__, _env.triton_version(), commit(),
                   datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"), device.type == "cuda")


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
