"""The sweep writes one row per (peer, shape, N, dtype) with the right status, and the CLI runs end to end."""

import argparse
import csv
import dataclasses
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from vstar_kernels import cli
from vstar_kernels.bench import harness, measure, peers, shapes
from vstar_kernels.bench.harness import CHECKED_ONLY, Sweep
from vstar_kernels.bench.measure import COLUMNS, ideal_cost
from vstar_kernels.bench.peers import PEERS, Peer, Unsupported, default_impls

ROOT = Path(__file__).resolve().parents[2]
TINY = shapes.SHAPES["tiny"]


def read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def make_sweep(tmp_path, **kw):
    info = measure.RunInfo("cpu (test)", torch.__version__, "3.x", "abc123", "20990101")
    kw.setdefault("progress", False)
    return Sweep(torch.device("cpu"), tmp_path / "cpu-test-20990101.csv", info, **kw)


def _raise(exc):
    def run(q, k, v, spec):
        raise exc
    return run


SYNTHETIC = [
    PEERS["reference_eager"],
    Peer("plain_as_tar", lambda q, k, v, spec: F.scaled_dot_product_attention(q, k, v, scale=spec.scale)),
    Peer("refuses", _raise(Unsupported("needs N >= 4096"))),
    Peer("runs_out", _raise(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB"))),
    Peer("crashes", _raise(RuntimeError("kaboom\nsecond line"))),
    Peer("absent", PEERS["reference_eager"].run, lambda device, dtype: "not installed here"),
]


def test_every_peer_gets_a_row_with_its_status(tmp_path):
    sweep = make_sweep(tmp_path)
    sweep.measure_copy()
    sweep.run([(TINY, 16, torch.float32), (TINY, 24, torch.float32)], [], SYNTHETIC)
    rows = read(sweep.csv_path)
    assert list(rows[0]) == list(COLUMNS)
    copy = rows[0]
    assert copy["impl"] == "device_copy" and copy["status"] == "ok" and float(copy["pct_peak_bw"]) == 100
    peak = float(copy["gbps"])
    by = {(r["impl"], r["n"]): r for r in rows[1:]}
    assert len(rows) == 1 + 2 * len(SYNTHETIC)
    for n in ("16", "24"):
        ok = by["reference_eager", n]
        assert ok["status"] == "ok"
        assert (ok["batch"], ok["heads"], ok["d"], ok["dtype"], ok["setup"]) == ("4", "2", "40", "fp32", "threads=1")
        ms = float(ok["median_ms"])
        assert float(ok["p20_ms"]) <= ms <= float(ok["p80_ms"])
        cost = ideal_cost(8, int(n), int(n), 40, 40, 4)
        assert float(ok["gbps"]) == pytest.approx(cost.bytes / (ms * 1e-3) / 1e9, rel=1e-4)
        assert float(ok["pct_peak_bw"]) == pytest.approx(100 * float(ok["gbps"]) / peak, rel=1e-4)
        assert float(ok["tflops"]) == pytest.approx(cost.flops / (ms * 1e-3) / 1e12, rel=1e-4)
        before, after = map(float, ok["loadavg"].split("-"))  # the machine's load around the timing
        assert before >= 0 and after >= 0
        assert by["plain_as_tar", n]["status"].startswith("error: output differs from the float64 reference")
        assert by["plain_as_tar", n]["median_ms"] == ""  # a wrong peer is not timed
        assert by["refuses", n]["status"] == "unsupported: needs N >= 4096"
        assert by["runs_out", n]["status"] == "oom"
        assert by["crashes", n]["status"] == "error: RuntimeError: kaboom second line"
        assert by["absent", n]["status"] == "unsupported: not installed here"
        for impl in ("refuses", "runs_out", "crashes", "absent"):
            assert by[impl, n]["median_ms"] == by[impl, n]["gbps"] == ""


def test_cpu_sweep_times_the_default_path_and_only_checks_the_interpreter(tmp_path):
    """On CPU, ours is what tar_attention runs by default; the Triton kernels (in the interpreter) are
    checked and not timed; each row of ours names the backend that ran."""
    sweep = make_sweep(tmp_path)
    sweep.run([(TINY, 16, torch.float32)], [], [PEERS["vstar_triton"], PEERS["vstar_auto"], PEERS["sdpa_plain"]])
    by = {r["impl"]: r for r in read(sweep.csv_path)}
    assert list(by) == ["vstar_triton_interpreter", "vstar_auto", "sdpa_plain"]
    checked = by["vstar_triton_interpreter"]
    assert checked["status"] == CHECKED_ONLY and checked["backend"] == "triton"
    assert checked["median_ms"] == checked["p20_ms"] == checked["gbps"] == checked["flag"] == ""
    ours = by["vstar_auto"]
    assert ours["status"] == "ok" and ours["backend"] == "cpu" and float(ours["median_ms"]) > 0
    assert by["sdpa_plain"]["backend"] == ""


def test_a_cpu_sweep_does_not_time_the_interpreter(tmp_path, monkeypatch):
    calls = []
    triton = PEERS["vstar_triton"]
    counting = dataclasses.replace(triton, run=lambda *a: calls.append(1) or triton.run(*a))
    make_sweep(tmp_path).run([(TINY, 16, torch.float32)], [], [counting])
    assert len(calls) == 1  # the checked call only


def test_by_default_cpu_runs_vstar_auto_and_cuda_does_not():
    assert default_impls(torch.device("cpu")) == list(PEERS)
    assert default_impls(torch.device("cuda")) == [p for p in PEERS if p != "vstar_auto"]
    assert PEERS["vstar_triton"].label(torch.device("cuda")) == "vstar_triton"
    assert not PEERS["vstar_triton"].correctness_only(torch.device("cuda"))


@pytest.mark.parametrize("p80, waited, flag", [(1.2, None, ""), (1.25, 0.1, ""), (1.26, None, "busy"),
                                                (3.0, 0.0, "busy"), (1.0, 0.11, "busy"), (1.0, 0.9, "busy")])
def test_a_busy_spread_or_waits_for_a_cpu_are_flagged(tmp_path, p80, waited, flag):
    timing = measure.Timing(1.1, 1.0, p80, waited=waited)
    assert measure.busy_flag(timing) == flag
    sweep = make_sweep(tmp_path)
    row = sweep.write("sdpa_plain", 4, 2, 16, 40, "fp32", timing=timing)
    assert row["flag"] == flag and read(sweep.csv_path)[-1]["flag"] == flag
    assert sweep.write("sdpa_plain", 4, 2, 16, 40, "fp32", status="oom")["flag"] == ""


def test_waits_for_a_cpu_over_run_time():
    before = measure.Sched({"1": (10, 5), "2": (4, 4)}, 100)
    assert measure.waited_share(before, measure.Sched({"1": (30, 15), "2": (4, 4)}, 120)) == 0.5  # ran 20, waited 10
    assert measure.waited_share(before, measure.Sched({"1": (10, 5), "3": (20, 10)}, 120)) == 0.5  # 3 started since
    assert measure.waited_share(before, before) is None  # did not run
    assert measure.waited_share(None, before) is None  # not known
    # a thread that ended in between ran 80 of the 100 ns: its waits went with it
    assert measure.waited_share(before, measure.Sched({"1": (30, 15)}, 200)) is None


def _spin_cpu(seconds):
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


@pytest.mark.skipif(measure.sched_ns() is None, reason="no /proc/self/task/*/schedstat here")
def test_threads_that_end_in_a_timing_leave_its_waits_unknown():
    """The CPU backend runs each call's chunks on threads of its own, which start and end within the call: the
    share read the calling thread's waits alone (it starts and joins them), 0.26-0.33 on an idle machine
    for a call of 256 x 4 sequences of 64 frames, a busy flag on the cell of ours."""
    before = measure.sched_ns()
    worker = threading.Thread(target=_spin_cpu, args=(0.1,))
    worker.start()
    worker.join()
    while str(worker.native_id) in os.listdir("/proc/self/task"):  # join() returns before Linux has ended it
        time.sleep(0.001)
    assert measure.waited_share(before, measure.sched_ns()) is None


@pytest.mark.skipif(measure.sched_ns() is None, reason="no /proc/self/task/*/schedstat here")
def test_a_thread_that_ends_after_running_before_the_timing_does_not_skew_it():
    """OpenMP ends threads at a smaller thread count: the sums lost the ended thread's counts from before the
    timing (-1.06 read after 4 threads went to 2), or its run time made the timing's None."""
    spun, go = threading.Event(), threading.Event()
    worker = threading.Thread(target=lambda: (_spin_cpu(0.3), spun.set(), go.wait()))
    worker.start()
    spun.wait()
    before = measure.sched_ns()
    _spin_cpu(0.05)
    go.set()
    worker.join()
    share = measure.waited_share(before, measure.sched_ns())
    assert share is not None and share >= 0


def test_no_schedstat_is_not_known(monkeypatch):
    """Linux without schedstat files (a kernel built without them) read as (0, 0), not None: the evenly-loaded test
    below then ran and failed comparing a None share."""
    read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *a, **k: (_ for _ in ()).throw(FileNotFoundError(self))
                        if self.name == "schedstat" else read_text(self, *a, **k))
    assert measure.sched_ns() is None


@pytest.mark.skipif(measure.sched_ns() is None, reason="no /proc/self/task/*/schedstat here")
def test_an_evenly_loaded_cpu_is_flagged_busy():
    """Processes spinning on every CPU this one may use slow each call alike (a small p80/p20): the time the calls
    waited for a CPU flags the timing all the same."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in os.sched_getaffinity(0)]
    try:
        time.sleep(0.5)  # started
        timing, _ = measure.time_call(lambda: sum(range(20000)), torch.device("cpu"))
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()
    assert timing.waited > 2 * measure.BUSY_WAITED and measure.busy_flag(timing) == measure.BUSY


def test_rows_are_not_appended_under_an_older_header(tmp_path, capsys):
    old = tmp_path / "old.csv"
    old.write_text(",".join(COLUMNS[:-2]) + "\n")
    with pytest.raises(ValueError, match="has the columns"):
        measure.append_row(old, dict.fromkeys(COLUMNS, ""))
    info = measure.RunInfo.collect(torch.device("cpu"))
    (tmp_path / f"{measure.slug(info.device)}-{info.date}.csv").write_text(",".join(COLUMNS[:-2]) + "\n")
    assert cli.main(["bench", "--device", "cpu", "--shapes", "tiny", "--n", "16", "--impls", "sdpa_plain",
                     "--out", str(tmp_path), "--no-plots", "--no-progress"]) == 2
    assert "move it aside or write elsewhere (--out)" in capsys.readouterr().err


def test_time_budget_and_resume(tmp_path):
    done = make_sweep(tmp_path, budget_s=0.0)
    done.run([(TINY, 16, torch.float32)], [], [PEERS["reference_eager"]])
    assert read(done.csv_path)[-1]["status"] == "unsupported: not run: the sweep's time budget of 0 s was used up"

    first = make_sweep(tmp_path)
    first.run([(TINY, 16, torch.float32)], [], [PEERS["reference_eager"]])
    assert read(first.csv_path)[-1]["status"] == "ok"
    again = make_sweep(tmp_path, resume=True)
    again.run([(TINY, 16, torch.float32), (TINY, 8, torch.float32)], [], [PEERS["reference_eager"]])
    rows = read(again.csv_path)
    assert again.rows_written == 1 and rows[-1]["n"] == "8"  # N=16 was measured (ok) by this commit

    # rows of this commit measured with another torch (or Triton, or on another device) are not this setup's: a
    # resume took them as done and mixed the two setups in one table without a word
    for field, other in (("torch", "2.1.0+cpu"), ("triton", "2.0.0"), ("device", "cpu (another)")):
        with open(again.csv_path, newline="", encoding="utf-8") as f:
            lines = list(csv.DictReader(f))
        other_setup = tmp_path / "other" / again.csv_path.name
        other_setup.parent.mkdir(exist_ok=True)
        other_setup.unlink(missing_ok=True)
        for r in lines:
            measure.append_row(other_setup, {**r, field: other})
        resumed = harness.Sweep(torch.device("cpu"), other_setup, again.info, resume=True, progress=False)
        resumed.run([(TINY, 16, torch.float32)], [], [PEERS["reference_eager"]])
        assert resumed.rows_written == 1, field


def test_a_failure_of_another_setup_does_not_fail_this_run(tmp_path, capsys):
    """The exit status read this commit's failed cells of ours whatever torch, Triton or device measured them."""
    info = measure.RunInfo.collect(torch.device("cpu"))
    path = tmp_path / f"{measure.slug(info.device)}-{info.date}.csv"
    failed = measure.row(info, "vstar_auto", 1, 8, 16, 40, "fp32", status="error: RuntimeError: boom")
    argv = ["bench", "--device", "cpu", "--shapes", "tiny", "--n", "16", "--impls", "sdpa_plain", "--out",
            str(tmp_path), "--no-plots", "--no-progress"]
    measure.append_row(path, {**failed, "torch": "2.1.0+cpu"})
    assert cli.main(argv) == 0
    measure.append_row(path, failed)
    assert cli.main(argv) == 1 and "FAILED: vstar_auto errored in 1 cell(s)" in capsys.readouterr().err


def test_a_damaged_results_file_is_named_not_a_traceback(tmp_path, capsys):
    """A row cut short (or one with fields past the header's) was read as None values and failed deep in the
    report (AttributeError); a byte that is no UTF-8 past the header failed at --resume (UnicodeDecodeError); a
    folder where the CSV goes raised IsADirectoryError. Each is now the command's error, naming the file."""
    info = measure.RunInfo.collect(torch.device("cpu"))
    path = tmp_path / f"{measure.slug(info.device)}-{info.date}.csv"
    argv = ["bench", "--device", "cpu", "--shapes", "tiny", "--n", "16", "--impls", "sdpa_plain", "--out",
            str(tmp_path), "--no-plots", "--no-progress"]
    header = ",".join(COLUMNS) + "\n"
    whole = ",".join(["x"] * len(COLUMNS)) + "\n"
    for body, message in ((header + whole + ",".join(["x"] * 12) + "\n", "line 3 has 12 fields, not the header's"),
                          (header + whole + ",".join(["x"] * (len(COLUMNS) + 2)) + "\n",
                           f"line 3 has {len(COLUMNS) + 2} fields, not the header's")):
        path.write_text(body, encoding="utf-8")
        with pytest.raises(ValueError, match=f"^{re.escape(str(path))}: {message} {len(COLUMNS)} .a damaged row."):
            measure.read_csv(path)
        for resume in ([], ["--resume"]):
            assert cli.main(argv + resume) == 2
            assert f"{path}: {message}" in capsys.readouterr().err
        assert path.read_text(encoding="utf-8") == body  # nothing appended
    for rows in (1, 300):  # in the header check's first read, and past it
        path.write_bytes((header + whole * rows).encode() + b"\xff\n")
        for resume in ([], ["--resume"]):
            assert cli.main(argv + resume) == 2
            assert f"{path} is not UTF-8 text" in capsys.readouterr().err
    path.unlink()
    path.mkdir()
    assert cli.main(argv) == 2
    assert "Is a directory" in capsys.readouterr().err


def test_progress_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # import tqdm now fails
    progress = harness.Progress(2)
    assert progress.bar is None
    with progress.step("tiny N=16 fp32 sdpa_plain"):
        pass
    progress.skip(1)
    assert "[1/2] tiny N=16 fp32 sdpa_plain" in capsys.readouterr().err


@pytest.mark.parametrize("exc, status", [
    (torch.OutOfMemoryError("CUDA out of memory."), "oom"),
    (RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 1 bytes"), "oom"),
    (Unsupported("why"), "unsupported: why"),
    (ValueError("x" * 400), "error: ValueError: " + "x" * 285 + "..."),  # 300 characters after "error: "
], ids=["cuda-oom", "cpu-oom", "unsupported", "long-error"])
def test_classify(exc, status):
    assert harness.classify(exc) == status


def test_ideal_cost():
    # fp16, B = H = 1, N = 16, D = 64: 4 tensors of 16 x 64 halves; 2 matmuls of 16 x 16 x 64 multiply-adds.
    assert ideal_cost(1, 16, 16, 64, 64, 2) == (4 * 16 * 64 * 2, 4 * 16 * 16 * 64)
    assert ideal_cost(1, 16, 16, 64, 0, 2).flops == 2 * 16 * 16 * 64  # Q K^T alone: a separate row-max pass
    nbytes, flops = ideal_cost(21, 256, 256, 64, 64, 2)
    assert flops / nbytes == 256 / 2  # intensity is N/2 FLOP per byte in fp16
    # a custom fp32 delta: Nq x Nk entries, or the causal lower triangle (key j <= query i)
    plain = ideal_cost(3, 5, 7, 8, 4, 2).bytes
    assert plain == 3 * (5 * 8 + 7 * 8 + 7 * 4 + 5 * 4) * 2
    assert ideal_cost(3, 5, 7, 8, 4, 2, delta_itemsize=4).bytes == plain + 3 * 5 * 7 * 4
    assert ideal_cost(3, 5, 7, 8, 4, 2, causal=True, delta_itemsize=4).bytes == plain + 3 * (1 + 2 + 3 + 4 + 5) * 4


def test_named_shapes():
    bxh = {name: s.batch * s.heads for name, s in shapes.SHAPES.items() if not shapes.is_unet(name)}
    assert bxh["vc2-320x512-l0"] == 2 * 40 * 64 * 5
    assert bxh["svd-576x1024-l0"] > 65_535  # a grid axis's limit
    assert {s.head_dim for name, s in shapes.SHAPES.items() if name.startswith("animatediff")} == {40, 80}
    assert shapes.shape_label(5120, 5, 64) == "vc2-320x512-l0"
    assert shapes.shape_label(5120, 5, 64, unet=True) == "unet-modelscope-320x512"
    assert shapes.shape_label(1, 2, 3) == "B1 H2 D3"


def test_notes_hold_the_model_table():
    table = harness.model_table([n for n in shapes.GPU_FULL if not shapes.is_unet(n)], shapes.KERNEL_N)
    assert table in (ROOT / "benchmarks" / "NOTES.md").read_text(encoding="utf-8")


def bench_cli(*args):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny CPU shapes (see conftest.py)
    return subprocess.run([sys.executable, "-m", "vstar_kernels", "bench", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600)


def test_cli_writes_csv_markdown_and_plots(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the GPU sweep is run by benchmarks/run_gpu_sweep.sh")
    res = bench_cli("--quick", "--n", "16", "--impls", "vstar_triton", "vstar_auto", "reference_eager", "sdpa_bias",
                    "xformers_bias", "sdpa_plain", "--out", str(tmp_path), "--no-progress")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Triton interpreter" in res.stderr and "ours is vstar_auto" in res.stderr
    [path] = tmp_path.glob("*.csv")
    assert path.name.startswith("cpu-") and path.name.endswith(f"-{path.stem[-8:]}.csv")
    rows = read(path)
    assert list(rows[0]) == list(COLUMNS)
    status = {r["impl"]: r["status"] for r in rows}
    assert status == {"device_copy": "ok", "vstar_triton_interpreter": CHECKED_ONLY, "vstar_auto": "ok",
                      "reference_eager": "ok", "sdpa_bias": "ok", "sdpa_plain": "ok",
                      "xformers_bias": status["xformers_bias"]}
    assert status["xformers_bias"] == "ok" or status["xformers_bias"].startswith("unsupported: xformers")
    assert {r["commit"] for r in rows} == {measure.commit()}
    assert {r["impl"]: r["backend"] for r in rows if r["backend"]} == {"vstar_triton_interpreter": "triton",
                                                                      "vstar_auto": "cpu"}
    md = path.with_suffix(".md").read_text()
    assert "| 16 |" in md and "vstar_auto ms" in md and "CPU run" in md and "`vstar_auto` ran `cpu`" in md
    for metric in ("time", "speedup", "bandwidth"):
        assert (tmp_path / f"{path.stem}-{metric}-fp32.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_rejects_bad_options(tmp_path, capsys):
    for args, message in ((["--shapes", "nope"], "unknown shape 'nope'"), (["--dtype", "int8"], "--dtype"),
                          (["--impls", "magic"], "--impls"), (["--n", "0"], "--n"),
                          # UNet shapes run the UNet's own variants: the implementations named were not run
                          (["--shapes", "unet-tiny", "--impls", "sdpa_plain"],
                           "--impls chooses the kernel shapes' implementations, and --shapes names UNets only "
                           "(unet-tiny)")):
        assert cli.main(["bench", *args, "--out", str(tmp_path)]) == 2
        assert message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
    (tmp_path / "a-file").write_text("")  # a folder under a file cannot be made: refused before any work
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--out", str(tmp_path / "a-file" / "sub")])
    assert exit_.value.code == 2
    assert f"{tmp_path}/a-file/sub cannot be made: {tmp_path}/a-file is a file" in capsys.readouterr().err


def test_impls_that_cannot_run_here_are_refused_and_named(tmp_path, capsys):
    """--impls naming only implementations that cannot run on this device wrote their 'unsupported' rows and exited
    0, having measured nothing asked for: refused before any work now, each named with its reason."""
    out = tmp_path / "results"
    argv = ["bench", "--device", "cpu", "--shapes", "tiny", "--n", "16", "--out", str(out), "--no-plots",
            "--no-progress"]
    cpu, fp32 = torch.device("cpu"), torch.float32
    assert cli.main([*argv, "--impls", "sdpa_floor", "vstar_cuda"]) == 2
    captured = capsys.readouterr()
    first, *lines = captured.err.splitlines()
    can = [name for name in PEERS if not PEERS[name].why_not(cpu, fp32)]
    assert "reference_eager" in can and "sdpa_floor" not in can and "vstar_cuda" not in can
    assert first == f"--impls: none of the implementations named can run on cpu in fp32 (these can: {', '.join(can)}):"
    assert lines == [f"  {name}: {PEERS[name].why_not(cpu, fp32)}" for name in ("sdpa_floor", "vstar_cuda")]
    assert "GPU peer" in lines[0] and not captured.out and not out.exists()
    # one among them can run: it is measured, and the other's rows say why it was not
    assert cli.main([*argv, "--impls", "sdpa_floor", "reference_eager"]) == 0
    status = {r["impl"]: r["status"] for r in read(next(out.glob("*.csv")))}
    assert status == {"device_copy": "ok", "reference_eager": "ok",
                      "sdpa_floor": f"unsupported: {PEERS['sdpa_floor'].why_not(cpu, fp32)}"}


def test_impls_that_cannot_run_beside_a_unet_shape_leave_the_unet_run(tmp_path, monkeypatch):
    """A UNet shape runs its own variants whatever --impls names: the run goes on (the first form of the refusal
    stopped it, the default CPU shapes among such runs)."""
    ran = []

    class UNetBench:  # the UNet's run, stood in for (minutes on CPU): what it was asked for
        def __init__(self, device):
            pass

        def run(self, shape, frames, dtype, classify):
            ran.append(shape.name)
            return []

    monkeypatch.setattr(harness, "UNetBench", UNetBench)
    assert cli.main(["bench", "--device", "cpu", "--shapes", "tiny", "unet-tiny", "--n", "16", "--impls", "sdpa_floor",
                     "--out", str(tmp_path), "--no-plots", "--no-progress"]) == 0
    assert ran == ["unet-tiny"]


def test_reasons_that_differ_by_dtype_are_named_with_their_dtypes(monkeypatch):
    picky = Peer("picky", PEERS["reference_eager"].run,
                 lambda device, dtype: "no fp16 kernel" if dtype == torch.float16 else "needs a GPU")
    monkeypatch.setitem(PEERS, "picky", picky)
    cpu = torch.device("cpu")
    assert harness.none_can_run(["picky"], cpu, ("fp16", "bf16", "fp32")).splitlines()[1:] == [
        "  picky in fp16: no fp16 kernel", "  picky in bf16 and fp32: needs a GPU"]
    assert harness.none_can_run(["picky"], cpu, ("bf16",)).splitlines()[1:] == ["  picky: needs a GPU"]
    assert harness.none_can_run(["picky", "reference_eager"], cpu, ("fp16",)) == ""


def test_values_given_twice_are_measured_once():
    """--n 16 16 measured each cell twice (21 rows for 11); --dtype was taken once already."""
    parser = argparse.ArgumentParser()
    cli.bench.configure(parser)
    args = parser.parse_args(["--n", "64", "16", "64", "--shapes", "tiny", "tiny", "--dtype", "fp32", "fp32"])
    assert harness.resolve(args, cuda=False) == (("tiny",), (64, 16), ("fp32",))


def test_cli_lists_shapes_and_prints_the_model_table(capsys):
    assert cli.main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    for name in [*shapes.SHAPES, *PEERS]:
        assert name in out
    assert cli.main(["bench", "--model-table", "--shapes", "vc2-320x512-l0", "--n", "16"]) == 0
    assert capsys.readouterr().out.strip() == harness.model_table(["vc2-320x512-l0"], [16])



def test_cli_refuses_options_list_and_model_table_ignore(capsys):
    """--list and --model-table measure nothing: a dtype, implementations or a device given were taken and ignored
    (exit 0); each is refused, named."""
    for args, message in ((["--list", "--impls", "magic", "--device", "cpu"],
                           "--list lists the named shapes and implementations, and takes no other option: "
                           "drop --impls, --device cpu"),
                          (["--list", "--model-table"], "drop --model-table"),
                          (["--model-table", "--dtype", "fp32", "--n", "16", "--device", "cuda", "--quick"],
                           "and takes --shapes, --n only: drop --quick, --dtype, --device cuda"),
                          (["--model-table", "--shapes", "unet-tiny"], "--model-table counts kernel shapes")):
        assert cli.main(["bench", *args]) == 2
        captured = capsys.readouterr()
        assert message in captured.err and not captured.out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_gpu_sweep_refuses_at_once_without_a_gpu():
    before = sorted((ROOT / "benchmarks" / "results").iterdir())
    # the script's python3: this interpreter, however pytest was started (a virtualenv's python, not activated)
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    res = subprocess.run(["bash", str(ROOT / "benchmarks" / "run_gpu_sweep.sh"), "quick"], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "PATH": path})
    assert res.returncode == 1
    assert res.stderr.startswith("run_gpu_sweep.sh needs a CUDA device"), res.stdout + res.stderr
    assert res.stdout == ""
    assert sorted((ROOT / "benchmarks" / "results").iterdir()) == before


@pytest.mark.parametrize("failing, code", [("vstar_triton", 1), ("sdpa_plain", 0)], ids=["ours", "a-peer"])
def test_cli_exits_non_zero_when_ours_errored(tmp_path, monkeypatch, capsys, failing, code):
    # A stand-in for our kernel (the reference, which passes the check) keeps the test fast.
    monkeypatch.setitem(PEERS, "vstar_triton", dataclasses.replace(PEERS["vstar_triton"],
                                                                   run=PEERS["reference_eager"].run))
    monkeypatch.setitem(PEERS, failing, dataclasses.replace(PEERS[failing], run=_raise(RuntimeError("launch failed"))))
    assert cli.main(["bench", "--device", "cpu", "--shapes", "tiny", "--n", "16", "--impls", "vstar_triton",
                     "sdpa_plain", "--out", str(tmp_path), "--no-plots", "--no-progress"]) == code
    err = capsys.readouterr().err
    [md] = tmp_path.glob("*.md")
    label = "vstar_triton_interpreter" if failing == "vstar_triton" else failing
    assert f"] {label}: error: RuntimeError: launch failed" in md.read_text()
    assert ("FAILED: vstar_triton_interpreter errored in 1 cell(s)" in err) == bool(code)


@pytest.mark.parametrize("capability, backend", [((9, 0), "cudnn"), ((8, 0), "flash"), ((8, 9), "flash"),
                                                 ((10, 0), "flash")], ids=["hopper", "ampere", "ada", "blackwell"])
def test_the_floor_is_cudnn_sdpa_on_hopper_and_flash_sdpa_elsewhere(monkeypatch, capability, backend):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert peers.floor_backend(cuda) == backend
    floor = PEERS["sdpa_floor"]
    assert floor.plain and floor.why_not(cuda, torch.float16) == floor.why_not(cuda, torch.bfloat16) == ""
    assert "fp16 and bf16, not float32" in floor.why_not(cuda, torch.float32)
    q = torch.empty(1, 1, 16, 8, device="meta")
    assert floor.ran(q, q, q, peers.default_spec(8)) == backend  # the CSV's backend column
    assert peers.FLOOR_LABELS[backend] == {"cudnn": "FA3-class floor (cuDNN SDPA)",
                                           "flash": "FA2-class (flash SDPA)"}[backend]


def test_the_floor_is_unavailable_on_cpu_and_says_why(tmp_path):
    assert "GPU peer" in PEERS["sdpa_floor"].why_not(torch.device("cpu"), torch.float32)
    sweep = make_sweep(tmp_path)
    sweep.run([(TINY, 16, torch.float32)], [], [PEERS["sdpa_floor"]])
    [row] = read(sweep.csv_path)
    assert row["status"].startswith("unsupported: the FA3-class floor is a GPU peer") and row["median_ms"] == ""
    # A call no kernel of the chosen SDPA backend takes is unsupported, not run by another backend.
    q = torch.randn(1, 1, 16, 8)
    with pytest.raises(Unsupported, match="SDPA's cudnn backend cannot run this call"):
        peers.sdpa_only("cudnn", q, q, q, peers.default_spec(8))


def test_the_commit_is_read_once_per_process(monkeypatch):
    """A run that writes tables into the checkout names the tree it ran in each (its own earlier tables made git
    report '-dirty' for the later ones); VSTAR_BENCH_COMMIT still names a tree without .git."""
    monkeypatch.delenv("VSTAR_BENCH_COMMIT", raising=False)
    measure._git_head.cache_clear()
    calls, run = [], subprocess.run
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or run(*a, **k))
    first = measure.commit()
    assert measure.commit() == first and len(calls) == 1
    monkeypatch.setenv("VSTAR_BENCH_COMMIT", "abc123")
    assert measure.commit() == "abc123"
