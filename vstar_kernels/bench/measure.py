"""Measuring: the ideal cost of a call, timers, the device's copy bandwidth, run metadata, and the CSV row
every measurement becomes (one schema for every file the harness writes: COLUMNS)."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import datetime
import functools
import os
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import torch

from .. import _env

SLOW_CALL_MS = 100.0          # CUDA calls slower than this are timed with a few events, not do_bench
# A p80/p20 spread above this: a busy machine, or calls too short to time (benchmarks/NOTES.md, "Busy cells").
BUSY_SPREAD = 1.25
# On a CPU, a timing whose threads waited for a CPU (other processes on it) for more than this share of the time
# they ran is busy too: an evenly loaded machine slows every call alike, so the spread stays small
# (benchmarks/NOTES.md, "Busy cells").
BUSY_WAITED = 0.1
# the status prefix of a cell the sweep did not run (its time budget used up)
NOT_RUN = "unsupported: not run: "
BUSY = "busy"
COLUMNS = ("timestamp", "commit", "device", "torch", "triton", "impl", "batch", "heads", "n", "d", "dtype", "setup",
           "median_ms", "p20_ms", "p80_ms", "gbps", "pct_peak_bw", "tflops", "peak_mem_mb", "status", "backend",
           "flag", "loadavg")


class Cost(NamedTuple):
    bytes: int
    flops: int


def delta_entries(nq: int, nk: int, causal: bool) -> int:
    """Delta entries one sequence's attention uses: all Nq x Nk, or those with key j <= query i."""
    return sum(min(i + 1, nk) for i in range(nq)) if causal else nq * nk


def ideal_cost(bh, nq, nk, d, dv, itemsize, *, causal=False, delta_itemsize=0) -> Cost:
    """The least any attention call (TAR or plain) over `bh` = batch x heads sequences does. Bytes: Q, K,
    V read and O written once, plus the delta entries it uses (`delta_itemsize` bytes each). FLOPs: the
    matmuls Q K^T and P V, 2 Nq Nk (D + Dv) per sequence, causal or not; dv=0 gives Q K^T alone."""
    qkvo = (nq * d + nk * d + nk * dv + nq * dv) * itemsize
    return Cost(bh * (qkvo + delta_entries(nq, nk, causal) * delta_itemsize), bh * 2 * nq * nk * (d + dv))


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    load: str = ""  # the 1-minute load average before and after, "before-after"
    waited: float | None = None  # on a CPU, waited_share() over the timed calls; None: not known


def busy_flag(timing: Timing) -> str:
    """BUSY when the timing's p80/p20 spread, or on a CPU how long its threads waited for one, says the machine
    was busy, else ""."""
    spread = timing.p20_ms > 0 and timing.p80_ms / timing.p20_ms > BUSY_SPREAD
    return BUSY if spread or (timing.waited or 0.0) > BUSY_WAITED else ""


class Sched(NamedTuple):
    """A sched_ns() reading."""

    threads: dict  # thread id -> (ns on a CPU, ns runnable but waiting for one), the threads alive when read
    cpu_ns: int    # the process's CPU time, that of its threads gone since included


# The share of the process's CPU time between two readings that threads seen in both (or started since) must have
# run for their waits to stand for the timing's: threads that ended in between (the "cpu" backend's chunk
# threads, one set per call; OpenMP's when the thread count drops) take their counts with them.
SEEN_CPU = 0.9


def sched_ns():
    """A Sched: per thread of this process, (ns on a CPU, ns runnable but waiting for one), as Linux's scheduler
    counts them (/proc/self/task/*/schedstat), and the process's CPU time; None where Linux does not say (not
    Linux, a kernel without schedstat)."""
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    cpu_ns, threads = time.process_time_ns(), {}  # first: it brings this thread's count up to date for the reads
    for tid in tids:
        try:
            on_cpu, on_queue = Path(f"/proc/self/task/{tid}/schedstat").read_text().split()[:2]
        except (OSError, ValueError):  # a thread gone since the listing; no schedstat
            continue
        threads[tid] = (int(on_cpu), int(on_queue))
    return Sched(threads, cpu_ns) if threads else None


def waited_share(before, after) -> float | None:
    """How long this process's threads waited for a CPU between two sched_ns() readings, over how long they
    ran: 0 when no other process took a CPU they could use, about 1 when they waited as long as they ran. None
    when not known: no reading, nothing ran, or threads that ended in between ran much of it (SEEN_CPU)."""
    if before is None or after is None:
        return None
    ran = waited = 0
    for tid, (on_cpu, on_queue) in after.threads.items():
        was_on_cpu, was_on_queue = before.threads.get(tid, (0, 0))  # (0, 0): started since
        ran, waited = ran + on_cpu - was_on_cpu, waited + on_queue - was_on_queue
    if ran <= 0 or ran < SEEN_CPU * (after.cpu_ns - before.cpu_ns):
        return None
    return waited / ran


def quantiles(samples) -> Timing:
    """Median, p20 and p80 of timing samples (ms)."""
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
    return quantiles(samples)


def time_cuda(fn, first_call_ms: float) -> Timing:
    """triton.testing.do_bench (L2 flushed between calls); a call slower than SLOW_CALL_MS (`first_call_ms`,
    the warm call's) gets 3 event pairs: do_bench would spend seconds estimating it."""
    if first_call_ms > SLOW_CALL_MS:
        samples = []
        for _ in range(3):
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(begin.elapsed_time(end))
        return quantiles(samples)
    import triton.testing

    med, p20, p80 = triton.testing.do_bench(fn, warmup=25, rep=100, quantiles=[0.5, 0.2, 0.8])
    return Timing(float(med), float(p20), float(p80))


def load_average() -> str:
    """This machine's 1-minute load average ("" where the system has none)."""
    with contextlib.suppress(AttributeError, OSError):
        return f"{os.getloadavg()[0]:.2f}"
    return ""


def time_call(fn, device: torch.device, timed=None) -> tuple:
    """(Timing, peak MiB or None): a warm call of `fn` (compiles, autotunes; on CUDA, what it allocates is the
    peak), then `timed` (default `fn`) timed by time_cuda or time_cpu, with the load average around it."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    t0 = time.perf_counter()
    fn()
    if cuda:
        torch.cuda.synchronize(device)
    warm_ms = (time.perf_counter() - t0) * 1e3
    peak = (torch.cuda.max_memory_allocated(device) - base) / 2 ** 20 if cuda else None
    before, sched = load_average(), sched_ns()
    timing = time_cuda(timed or fn, warm_ms) if cuda else time_cpu(timed or fn)
    return dataclasses.replace(timing, load=f"{before}-{load_average()}" if before else "",
                               waited=None if cuda else waited_share(sched, sched_ns())), peak


def copy_bandwidth(device: torch.device) -> tuple:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted), and the Timing."""
    cuda = device.type == "cuda"
    nbytes = (1 << 30) if cuda else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device)[0]
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
    """VSTAR_BENCH_COMMIT if set (a copy of the tree without .git), else git's HEAD (+ '-dirty'), read once per
    process: a run that writes tables into the checkout (tools.perf) reads it first, so that its later tables
    name the tree it ran, not one dirtied by its own earlier tables."""
    return os.environ.get("VSTAR_BENCH_COMMIT") or _git_head()


@functools.lru_cache(maxsize=None)
def _git_head() -> str:
    root = Path(__file__).resolve().parents[2]
    try:  # the abbreviated hash, never a tag name
        head = subprocess.run(["git", "-C", str(root), "describe", "--always", "--dirty", "--abbrev=12", "--exclude=*"],
                              capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head.stdout.strip() if head.returncode == 0 else "unknown"


@dataclasses.dataclass(frozen=True)
class RunInfo:
    """What every CSV row of one run carries."""

    device: str
    torch: str
    triton: str
    commit: str
    date: str        # yyyymmdd (UTC), the results file's name

    @classmethod
    def collect(cls, device: torch.device) -> "RunInfo":
        return cls(device_name(device), torch.__version__, _env.triton_version(), commit(),
                   datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d"))


def now_iso() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _fmt(x) -> str:
    return "" if x is None else f"{x:.6g}"


def row(info: RunInfo, impl, batch, heads, n, d, dtype, *, setup="", status="ok", timing=None, cost=None,
        peak_gbps=None, peak_mb=None, backend="") -> dict:
    """One CSV row. A timed row ("ok" with a Timing) gets GB/s and TFLOP/s from `cost` (the ideal Cost) and
    its share of the copy bandwidth `peak_gbps`; `setup`: what else defines the call; `backend`: what ran."""
    t = timing if status == "ok" else None
    seconds = t.median_ms * 1e-3 if t else None
    gbps = cost.bytes / seconds / 1e9 if t and cost else None
    return dict(zip(COLUMNS, (
        now_iso(), info.commit, info.device, info.torch, info.triton, impl, batch, heads, n, d, dtype, setup,
        *map(_fmt, (t and t.median_ms, t and t.p20_ms, t and t.p80_ms, gbps,
                    100 * gbps / peak_gbps if gbps and peak_gbps else None,
                    cost.flops / seconds / 1e12 if t and cost and cost.flops else None, peak_mb)),
        status, backend, busy_flag(t) if t else "", t.load if t else "")))


def check_columns(csv_path: Path) -> None:
    """ValueError when the CSV exists with other columns than COLUMNS: rows appended would land under the
    wrong names."""
    if csv_path.exists() and csv_path.stat().st_size:
        with open(csv_path, newline="", encoding="utf-8") as f:
            header = next(csv.reader(f))
        if header != list(COLUMNS):
            raise ValueError(f"{csv_path} has the columns {header}, not this harness's {list(COLUMNS)}")


def append_row(csv_path: Path, row: dict) -> None:
    """Append `row` (a dict of COLUMNS) to the CSV; a new file gets the header first."""
    check_columns(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if f.tell() == 0:  # a new or empty file
            writer.writeheader()
        writer.writerow(row)


def read_csv(csv_path) -> list:
    """The rows of a results CSV: a ValueError naming the file when its columns are not COLUMNS, when a row has
    another number of fields (a damaged or cut line, named), or when it is not UTF-8 text."""
    rows = []
    try:
        check_columns(Path(csv_path))
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            for row in reader:
                if None in row or None in row.values():  # fields past the header's, or fewer than its
                    fields = sum(v is not None for k, v in row.items() if k is not None) + len(row.get(None, ()))
                    raise ValueError(f"{csv_path}: line {reader.line_num} has {fields} fields, not the header's "
                                     f"{len(COLUMNS)} (a damaged row): mend or remove it")
                rows.append(row)
    except UnicodeDecodeError as exc:
        raise ValueError(f"{csv_path} is not UTF-8 text ({exc})") from None
    return rows
