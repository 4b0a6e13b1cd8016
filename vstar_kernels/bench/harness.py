"""The sweep: every peer on every (shape, N, dtype), checked, timed, one row each appended to
``<out>/<device>-<yyyymmdd>.csv``; then the file's tables and plots (benchmarks/NOTES.md)."""

from __future__ import annotations

import contextlib
import itertools
import sys
import time
from pathlib import Path

import torch

from ..dispatch import BackendUnavailableError
from . import measure, report, shapes
from .check import check_output
from .e2e import BACKENDS as UNET_BACKENDS
from .e2e import VARIANTS, UNetBench
from .peers import PEERS, Unsupported, checked_only, default_impls, default_spec

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
DTYPE_ALIASES = {"float16": "fp16", "half": "fp16", "bfloat16": "bf16", "float32": "fp32", "float": "fp32"}
CHECKED_ONLY = checked_only("the float64 reference")
# Inputs rotate through enough copies to fill this many bytes (at most MAX_SETS): no timing from a warm cache.
ROTATE_BYTES = 256 << 20
MAX_SETS = 8


def dtype_name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def parse_dtype(name: str) -> str:
    key = DTYPE_ALIASES.get(name.lower(), name.lower())
    if key not in DTYPES:
        raise ValueError(f"--dtype: unknown dtype {name!r}; use one of {sorted(DTYPES)}")
    return key


def classify(exc: BaseException) -> str:
    """Status for a failed call: 'oom', 'unsupported: why' or 'error: why' (one line)."""
    msg = " ".join(str(exc).split())
    if isinstance(exc, (Unsupported, BackendUnavailableError)):
        return f"unsupported: {msg}"
    if isinstance(exc, torch.OutOfMemoryError) or "out of memory" in msg.lower() or "can't allocate memory" in msg:
        return "oom"
    text = f"{type(exc).__name__}: {msg}" if msg else type(exc).__name__
    return "error: " + (text if len(text) <= 300 else text[:297] + "...")


class Progress:
    """tqdm when it is installed, else one line per step on stderr."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.count, self.enabled, self.bar = total, 0, enabled, None
        if enabled:
            with contextlib.suppress(ImportError):
                from tqdm import tqdm

                self.bar = tqdm(total=total, unit="run", dynamic_ncols=True, file=sys.stderr)

    @contextlib.contextmanager
    def step(self, text: str, count: int = 1):
        """Show `text` while the step runs; count `count` runs when it ends."""
        if self.bar is not None:
            self.bar.set_description_str(text)
        elif self.enabled:
            print(f"[{self.count + count}/{self.total}] {text}", file=sys.stderr, flush=True)
        try:
            yield
        finally:
            self.skip(count)

    def skip(self, count: int):
        """Count `count` runs done (by a step, or by an earlier invocation: --resume)."""
        self.count += count
        if self.bar is not None and count:
            self.bar.update(count)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def same_setup(row: dict, info: measure.RunInfo) -> bool:
    """Whether a results row was measured in `info`'s setup: its commit, device, torch and Triton."""
    return all(row[field] == getattr(info, field) for field in ("commit", "device", "torch", "triton"))


def _key(*fields) -> tuple:
    """A cell of a results file, as report.latest keys it and --resume compares them."""
    return tuple(map(str, fields))


class Sweep:
    def __init__(self, device: torch.device, csv_path: Path, info: measure.RunInfo, *,
                 budget_s=None, resume=False, progress=True):
        self.device, self.csv_path, self.info = device, csv_path, info
        self.cuda = device.type == "cuda"
        self.deadline = None if budget_s is None else time.monotonic() + budget_s
        self.budget_s = budget_s
        self.peak_gbps = None
        self.setup = "" if self.cuda else f"threads={torch.get_num_threads()}"  # what else defines a CPU timing
        self.done = self._done_keys() if resume and csv_path.exists() else set()
        self.progress_enabled = progress
        self.rows_written = 0

    def _done_keys(self) -> set:
        """The cells measured before in this run's setup (--resume)."""
        return set(report.latest(r for r in measure.read_csv(self.csv_path)
                                 if same_setup(r, self.info) and not r["status"].startswith(measure.NOT_RUN)))

    def write(self, impl, batch, heads, n, d, dtype, **kw) -> dict:
        """Append the row of one cell (measure.row's keywords: status, timing, cost, peak_mb, backend)."""
        row = measure.row(self.info, impl, batch, heads, n, d, dtype, setup=self.setup, peak_gbps=self.peak_gbps,
                          **kw)
        measure.append_row(self.csv_path, row)
        self.rows_written += 1
        return row

    def _out_of_time(self) -> bool:
        return self.deadline is not None and time.monotonic() > self.deadline

    def _not_run(self) -> str:
        return f"{measure.NOT_RUN}the sweep's time budget of {self.budget_s:g} s was used up"

    def measure_copy(self):
        """The device_copy row: the peak that pct_peak_bw is relative to."""
        try:
            self.peak_gbps, timing, nbytes = measure.copy_bandwidth(self.device)
        except Exception as exc:
            self.write(report.COPY_IMPL, "", "", "", "", "uint8", status=classify(exc))
        else:
            self.write(report.COPY_IMPL, "", "", "", "", "uint8", timing=timing, cost=measure.Cost(2 * nbytes, 0))

    def run(self, kernel_cases, unet_cases, peers):
        total = len(kernel_cases) * len(peers) + len(unet_cases) * 3
        progress = Progress(total, self.progress_enabled)
        try:
            for shape, n, dtype in kernel_cases:
                self._kernel_case(shape, n, dtype, peers, progress)
            unet = UNetBench(self.device)
            for shape, frames, dtype in unet_cases:
                self._unet_case(unet, shape, frames, dtype, progress)
        finally:
            progress.close()

    def _kernel_case(self, shape, n, dtype, peers, progress):
        dname = dtype_name(dtype)
        cell = (shape.batch, shape.heads, n, shape.head_dim, dname)
        todo = [(p, p.label(self.device)) for p in peers
                if _key(p.label(self.device), *cell, self.setup) not in self.done]
        progress.skip(len(peers) - len(todo))
        if not todo:
            return
        cost = measure.ideal_cost(shape.batch * shape.heads, n, n, shape.head_dim, shape.head_dim, dtype.itemsize)
        spec = default_spec(shape.head_dim)
        write = lambda label, **kw: self.write(label, *cell, cost=cost, **kw)  # noqa: E731
        sets, why = None, None
        if not self._out_of_time():
            try:
                sets = self._inputs(shape, n, dtype, cost.bytes)
            except Exception as exc:
                why = classify(exc)
        for peer, label in todo:
            with progress.step(f"{shape.name} N={n} {dname} {label}"):
                if self._out_of_time():
                    write(label, status=self._not_run())
                elif why is not None:
                    write(label, status=why)
                elif (reason := peer.why_not(self.device, dtype)):
                    write(label, status=f"unsupported: {reason}")
                else:
                    status, timing, peak, backend = self._measure_peer(peer, sets, spec)
                    write(label, status=status, timing=timing, peak_mb=peak, backend=backend)
        del sets
        self._free()

    def _inputs(self, shape, n, dtype, nbytes):
        """Rotating sets of (q, k, v), (B, H, N, D) views of (B, N, H, D) storage as diffusers hands them."""
        count = max(1, min(MAX_SETS, -(-ROTATE_BYTES // nbytes)))
        if self.cuda:
            free, _ = torch.cuda.mem_get_info(self.device)
            count = max(1, min(count, int(0.25 * free) // max(1, nbytes)))
        gen = torch.Generator(device=self.device).manual_seed(n)
        return [tuple(torch.randn(shape.batch, n, shape.heads, shape.head_dim, generator=gen, device=self.device,
                                  dtype=dtype).transpose(1, 2) for _ in range(3)) for _ in range(count)]

    def _free(self):
        if self.cuda:
            torch.cuda.empty_cache()

    def _measure_peer(self, peer, sets, spec):
        """(status, Timing or None, peak MiB or None, backend run): a call checked (a correctness-only peer
        stops there), then measure.time_call."""
        q, k, v = sets[0]
        backend = ""
        try:
            backend = peer.ran(q, k, v, spec)
            out = peer.run(q, k, v, spec)
            if self.cuda:
                torch.cuda.synchronize(self.device)
            why = check_output(out, q, k, v, spec, peer.plain)
            del out
            if why:
                return f"error: {why}", None, None, backend
            if peer.correctness_only(self.device):
                return CHECKED_ONLY, None, None, backend
            turn = itertools.count()
            timing, peak = measure.time_call(lambda: peer.run(q, k, v, spec), self.device,
                                             lambda: peer.run(*sets[next(turn) % len(sets)], spec))
            return "ok", timing, peak, backend
        except Exception as exc:
            self._free()
            return classify(exc), None, None, backend

    def _unet_case(self, unet, shape, frames, dtype, progress):
        dname = dtype_name(dtype)
        cell = (shape.batch, shape.heads, frames, shape.head_dim, dname)
        with progress.step(f"{shape.name} frames={frames} {dname}", len(VARIANTS)):
            if all(_key(v, *cell, self.setup) in self.done for v in VARIANTS):  # --resume: measured before
                return
            if self._out_of_time():
                for v in VARIANTS:
                    self.write(v, *cell, status=self._not_run())
                return
            for res in unet.run(shape, frames, dtype, classify):
                self.write(res.impl, *cell, status=res.status, timing=res.timing, peak_mb=res.peak_mb,
                           backend=UNET_BACKENDS[res.impl])
            self._free()


def resolve(args, cuda: bool):
    """(shape names, N list, dtype names) from the options and the preset for this device."""
    names, ns, dtypes = shapes.PRESETS[cuda, bool(args.quick)]
    names = tuple(dict.fromkeys(args.shapes)) if args.shapes else names  # each once, in the order given
    for name in names:
        if name not in shapes.SHAPES:
            raise ValueError(f"--shapes: unknown shape {name!r}; known: {', '.join(shapes.SHAPES)}")
    ns = tuple(dict.fromkeys(args.n)) if args.n else ns
    if any(n < 1 for n in ns):
        raise ValueError(f"--n: frame counts must be >= 1, got {ns}")
    dtypes = tuple(dict.fromkeys(parse_dtype(d) for d in args.dtype)) if args.dtype else dtypes
    return names, ns, dtypes


def _reasons(name, device: torch.device, dtypes) -> dict:
    """{reason: dtypes}: why the peer `name` cannot run on `device` in each of `dtypes` (its why_not; '' for those
    it can run in), the dtypes grouped by reason."""
    reasons = {}
    for dt in dtypes:
        reasons.setdefault(PEERS[name].why_not(device, DTYPES[dt]), []).append(dt)
    return reasons


def none_can_run(names, device: torch.device, dtypes) -> str:
    """Why none of the implementations `names` can run on `device` in any of `dtypes` (one line each, its reason
    after the dtypes it is given for where they differ), or '' when one of them can."""
    reasons = {name: _reasons(name, device, dtypes) for name in names}
    if any("" in why for why in reasons.values()):
        return ""
    can = [name for name in PEERS if "" in _reasons(name, device, dtypes)]
    lines = [f"  {name}{' in ' + ' and '.join(dts) if len(why) > 1 else ''}: {reason}"
             for name, why in reasons.items() for reason, dts in why.items()]
    return "\n".join([f"--impls: none of the implementations named can run on {device.type} in {' or '.join(dtypes)}"
                      f" (these can: {', '.join(can)}):", *lines])


def plan(names, ns, dtypes, explicit_n: bool):
    """Kernel cases ordered by N, then shape, then dtype (cheap first, so a time budget cuts the costly end)."""
    kernel = [(shapes.SHAPES[name], n, DTYPES[dt]) for n in sorted(ns) for name in names if not shapes.is_unet(name)
              for dt in dtypes]
    unet = [(shapes.SHAPES[name], frames, DTYPES[dt]) for name in names if shapes.is_unet(name)
            for frames in (sorted(ns) if explicit_n else shapes.SHAPES[name].frames) for dt in dtypes]
    return kernel, unet


def model_table(names, ns) -> str:
    """Markdown for fp16: bytes, FLOPs and the N x N footprint per kernel shape and N."""
    itemsize = torch.float16.itemsize
    lines = ["| shape | B x H | D | N | MB moved | GFLOP (2 matmuls) | GFLOP + row-max pass | FLOP/byte "
             "| one N x N matrix, GB |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name in names:
        s = shapes.SHAPES[name]
        if shapes.is_unet(name):
            continue
        for n in ns:
            nb, fl = measure.ideal_cost(s.batch * s.heads, n, n, s.head_dim, s.head_dim, itemsize)
            fl2 = fl + measure.ideal_cost(s.batch * s.heads, n, n, s.head_dim, 0, itemsize).flops  # + Q K^T
            square = s.batch * s.heads * n * n * itemsize
            lines.append(f"| {name} | {s.batch * s.heads:,} | {s.head_dim} | {n} | {nb / 1e6:,.1f} | "
                         f"{fl / 1e9:,.1f} | {fl2 / 1e9:,.1f} | {fl / nb:,.0f} | {square / 1e9:,.2f} |")
    return "\n".join(lines)


def results_csv(args, info: measure.RunInfo, suffix: str = "") -> Path:
    """``<--out or ./vstar-bench-results>/<device>-<yyyymmdd><suffix>.csv``; the default is in the folder the
    command runs in (never the source checkout's own files)."""
    out_dir = Path(args.out).resolve() if args.out else Path.cwd() / "vstar-bench-results"
    return out_dir / f"{measure.slug(info.device)}-{info.date}{suffix}.csv"


def main(args) -> int:
    if args.list:
        for name, s in shapes.SHAPES.items():
            print(f"{name:<26} batch {s.batch:>6}  heads {s.heads:>2}  D {s.head_dim:>3}  {s.source}")
        print("\nimplementations: " + ", ".join(PEERS))
        return 0
    cuda = torch.cuda.is_available() if args.device == "auto" else args.device == "cuda"
    cuda = cuda or args.model_table  # --model-table: the GPU shapes and N, whatever this machine has
    try:
        if cuda and not args.model_table and not torch.cuda.is_available():
            raise ValueError("--device cuda: CUDA is not available to torch")
        names, ns, dtypes = resolve(args, cuda)
        if args.model_table:
            if all(shapes.is_unet(name) for name in names):
                raise ValueError(f"--model-table counts kernel shapes, and --shapes names UNets only: {names}")
            print(model_table(names, ns))
            return 0
        device = torch.device("cuda" if cuda else "cpu")
        if args.impls and all(shapes.is_unet(name) for name in names):  # (they ran the UNet's own variants)
            raise ValueError(f"--impls chooses the kernel shapes' implementations, and --shapes names UNets only "
                             f"({', '.join(names)}), which run the stock UNet and TAR's variants")
        peer_names = list(dict.fromkeys(args.impls)) if args.impls else default_impls(device)
        unknown = [p for p in peer_names if p not in PEERS]
        if unknown:
            raise ValueError(f"--impls: unknown {unknown}; known: {', '.join(PEERS)}")
        # (each row said "unsupported", and the run that measured nothing asked for exited 0; a UNet shape among
        # --shapes runs its own variants, whatever --impls names)
        unets = any(shapes.is_unet(name) for name in names)
        refused = none_can_run(peer_names, device, dtypes) if args.impls and not unets else ""
        if refused:
            raise ValueError(refused)
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    info = measure.RunInfo.collect(device)
    csv_path = results_csv(args, info)
    if not cuda:
        print("CPU run: times are CPU wall-clock (perf_counter); ours is vstar_auto, what tar_attention runs on "
              "CPU tensors by default (the backend column names it); vstar_triton runs in the Triton interpreter "
              "(reported as vstar_triton_interpreter) as a correctness check only, not timed.", file=sys.stderr)
    try:  # the whole file: its rows are read again for --resume and the report
        if csv_path.exists():
            measure.read_csv(csv_path)
    except (ValueError, OSError) as exc:  # OSError: a folder where the file is to be
        print(f"{exc}: move it aside or write elsewhere (--out)", file=sys.stderr)
        return 2
    kernel_cases, unet_cases = plan(names, ns, dtypes, explicit_n=bool(args.n))
    sweep = Sweep(device, csv_path, info, budget_s=args.time_budget_s, resume=args.resume,
                  progress=not args.no_progress)
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.no_grad())
        # Never let torch.compile fall back to eager silently after many shapes.
        stack.enter_context(torch._dynamo.config.patch(recompile_limit=256, fail_on_recompile_limit_hit=True))
        sweep.measure_copy()
        sweep.run(kernel_cases, unet_cases, [PEERS[p] for p in peer_names])
    outputs = report.render(csv_path, plots=not args.no_plots)
    print(f"{sweep.rows_written} row{'s' * (sweep.rows_written != 1)} appended to {csv_path}")
    for path in outputs:
        print(f"wrote {path}")
    failed = report.our_failures(r for r in measure.read_csv(csv_path) if same_setup(r, info))
    if failed:
        impls = ", ".join(sorted({r["impl"] for r in failed}))
        print(f"FAILED: {impls} errored in {len(failed)} cell(s) at commit {info.commit}; first: "
              f"{failed[0]['status']} (all: the notes under the tables of {csv_path.with_suffix('.md')})",
              file=sys.stderr)
        return 1
    return 0
