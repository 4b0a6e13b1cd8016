"""benchmarks/speculation.py (the GPU sweep's `speculation` stage) on its CPU smoke layout, in the interpreter:
the planted rows are flagged, the one pass equals the two passes, rows in the harness's schema."""

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity

from vstar_kernels.bench import measure
from vstar_kernels.bench.report import render

from .._device import DEVICE
from ..helpers import interpreter_env

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_checked_rows(tmp_path):
    # without TRITON_INTERPRET (what --smoke's help and the no-CUDA refusal point to): the script runs itself again
    # with it; it raised "cpu tensors need TRITON_INTERPRET=1"
    env = interpreter_env({name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"})
    done = subprocess.run([sys.executable, "benchmarks/speculation.py", "--smoke", "--rates", "0", "1", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (csv_path,) = tmp_path.glob("speculation-*.csv")
    rows = measure.read_csv(csv_path)
    assert [r["impl"] for r in rows] == ["vstar_triton_one_pass", "vstar_triton_two_pass"] * 2
    assert {r["status"] for r in rows} == {"ok"} and all(float(r["median_ms"]) > 0 for r in rows)
    setups = [dict(part.split("=") for part in r["setup"].split()) for r in rows]
    assert float(setups[0]["flag_rate"]) == 0 and 0.3 < float(setups[-1]["flag_rate"]) <= 1
    # the tiles each form ran with (on a GPU the autotuner's pick; the interpreter's fixed tiles here)
    assert {(s["tiles_one_pass"], s["tiles_two_pass"]) for s in setups} == {("64x64", "64x64")}
    # --plot: one picture from the CSV alone (in this process: the script's start is the run's above)
    script = _script()
    assert script.main(["--plot", str(csv_path)]) == 0
    assert (tmp_path / f"{csv_path.stem}-flag-rates.png").stat().st_size > 10_000
    # --plot with --out: the picture goes there (it went beside the CSV, over a committed picture)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    assert script.main(["--plot", str(csv_path), "--out", str(elsewhere)]) == 0
    assert [p.name for p in elsewhere.iterdir()] == [f"{csv_path.stem}-flag-rates.png"]
    # its table says the times are the Triton interpreter's (it said ours was the CPU PyTorch path)
    (md,) = render(csv_path, plots=False, out_dir=elsewhere)
    cpu_note = md.read_text().split("**CPU run.**")[1].split("\n")[0]
    timed = "`vstar_triton_one_pass`, `vstar_triton_two_pass`: Triton kernels timed in the Triton interpreter"
    assert timed in cpu_note
    assert "vstar_auto" not in cpu_note and "PyTorch path" not in cpu_note


def test_lean_smoke_run_checks_before_timing(tmp_path):
    """--lean (the sweep's `lean` stage): each lean variant checked against the two passes, then timed, and the two
    passes beside them at rate 0; at another planted rate the speculative form alone, with the rate it measured.
    Without --out its rows go where `python -m vstar_kernels bench` writes by default, ./vstar-bench-results (they
    went into the checkout's benchmarks/results, an untracked file plot_results.py then rendered)."""
    env = interpreter_env({**os.environ, "TRITON_INTERPRET": "1"})
    committed = set((ROOT / "benchmarks" / "results").iterdir())
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "speculation.py"), "--smoke", "--lean", "--rates",
                           "0", "0.5"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert set((ROOT / "benchmarks" / "results").iterdir()) == committed
    (csv_path,) = (tmp_path / "vstar-bench-results").glob("speculation-*.csv")
    assert f"rows in {csv_path}" in done.stdout
    rows = measure.read_csv(csv_path)
    assert [r["impl"] for r in rows] == ["vstar_triton_lean", "vstar_triton_lean_ws", "vstar_triton_lean_no_ws",
                                         "vstar_triton_lean_one_pass", "vstar_triton_two_pass",
                                         "vstar_triton_lean_one_pass"]
    assert {r["status"] for r in rows} == {"ok"} and all(float(r["median_ms"]) > 0 for r in rows)
    assert [r["backend"] for r in rows] == ["triton-lean"] * 4 + ["triton", "triton-lean"]
    setups = [dict(part.split("=", 1) for part in r["setup"].split()) for r in rows]
    assert setups[3]["flag_rate"] == "0.0000" and 0 < float(setups[5]["flag_rate"]) <= 0.5
    # the tiles each lean row ran with (the autotuner's pick on a GPU; the lean interpreter tiles here)
    assert [s.get("tiles") for s in setups] == ["64x32"] * 4 + [None, "64x32"]
    # its table says every row is the interpreter's time (the lean backend's rows included)
    (md,) = render(csv_path, plots=False, out_dir=tmp_path)
    cpu_note = md.read_text().split("**CPU run.**")[1].split("\n")[0]
    assert ", ".join(f"`{impl}`" for impl in sorted({r["impl"] for r in rows})) + ": Triton kernels timed" in cpu_note


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9,
                    reason="the lean forward is built for sm_90, and this GPU is not")
@pytest.mark.parametrize("rate", [0, 0.25])
def test_planted_rows_are_the_rows_the_lean_forward_flags(rate):
    """The planted data in frames longer than a key tile of any config (so every target lies in a tile of one
    frame, where the lean forward checks its guess by the biased tile max and a tie flags): the planted rows are
    the rows flagged, no more (no block of at most 256 rows walks the frame of its rows' far target). Aiming every
    frame's rows at one dim gave each row its max again in every frame, and every row was flagged (the GPU run of
    2026-11-26, 12th session)."""
    import vstar_kernels as vk

    frames = vk.frame_ids(4, 256, text_before=5)
    q, k, v = _script().planted(frames, 1, 16, rate, DEVICE, torch.float16)  # (every head is planted alike)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    vk.tar_attention(q, k, v, sigma=1.0, frames=frames.to(DEVICE), backend="triton-lean", flags=counts)
    assert counts.tolist() == [math.ceil(rate * 4 * 256), frames.numel()]


def test_bad_rates_and_no_gpu_are_refused(tmp_path, capsys):
    script = _script()
    cases = [(["--smoke", "--rates", "1.5"], "--rates: shares in [0, 1]"),
             (["--smoke", "--rates"], "argument --rates: expected at least one argument"),
             (["--smoke", "--time-budget-s", "-5"], "--time-budget-s: must be a number of seconds > 0"),
             (["--plot", str(tmp_path / "none.csv")], f"--plot: {tmp_path / 'none.csv'} is not a file")]
    if not torch.cuda.is_available():  # on a GPU the sweep would run
        cases.append(([], "torch sees no CUDA device"))
    for args, message in cases:
        try:
            code = script.main([*args, "--out", str(tmp_path)])
        except SystemExit as exc:  # argparse's error: usage and the message on stderr, exit status 2
            code = exc.code
        assert code != 0 and message in capsys.readouterr().err, args


def test_help_says_what_each_option_does_and_its_default(capsys):
    """--lean said "the lean forward's rows (once per shape) first", but only those rows run; --rates and
    --time-budget-s had no help and stated no default."""
    with pytest.raises(SystemExit):
        _script().main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    helps = {chunk.split()[0]: " ".join(chunk.split()) for chunk in ("\n" + options).split("\n  --")[1:]}
    assert "(default: 0 0.05 0.2 1)" in helps["rates"]
    assert "(default: 420)" in helps["time-budget-s"]
    assert "instead (only its rows run)" in helps["lean"] and "first" not in helps["lean"]
    assert "with --smoke ./vstar-bench-results in the current folder" in helps["out"]


def _script():
    spec = importlib.util.spec_from_file_location("speculation_script", ROOT / "benchmarks" / "speculation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_kernel_times_reads_one_record_per_call_and_refuses_others():
    script = _script()
    a = torch.randn(64, 64)
    times = script.kernel_times(lambda: (a @ a, a + a), ["aten::mm", "aten::add"], ProfilerActivity.CPU, reps=4)
    assert set(times) == {"aten::mm", "aten::add"}
    assert all(0 < t.p20_ms <= t.median_ms <= t.p80_ms for t in times.values())
    for fn, count in ((lambda: a + a, 0), (lambda: (a @ a, a @ a), 8)):
        with pytest.raises(ValueError, match=rf"kernels: recorded \{{'aten::mm': {count}\}} times in 4 calls"):
            script.kernel_times(fn, ["aten::mm"], ProfilerActivity.CPU, reps=4)


def test_the_kernels_timed_apart_are_the_forward_kernels():
    from vstar_kernels.ops import tar_fwd, tar_fwd_lean

    script = _script()
    for name in {**script.ONE_PASS_KERNELS, **script.GLOBAL_MAX_KERNELS, **script.LEAN_ONE_PASS_KERNELS}:
        kernel = getattr(tar_fwd, name, None) or getattr(tar_fwd_lean, name)
        assert kernel.__name__ == name, name


@pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9,
                    reason="the lean forward is built for sm_90, and this GPU is not")
def test_the_lean_one_pass_launches_each_kernel_timed_apart_once(monkeypatch):
    """kernel_times refuses a kernel not launched exactly once a call: the lean forward's speculative form, with a
    row flagged, launches each of LEAN_ONE_PASS_KERNELS once (in the interpreter)."""
    import vstar_kernels as vk
    from vstar_kernels._problem import make_problem
    from vstar_kernels.ops import tar_fwd, tar_fwd_lean

    launched = []

    class Counted:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launched.append(getattr(self.kernel, "fn", self.kernel).__name__)
                return self.kernel[grid](*args, **kwargs)
            return launch

    for module, name in ((tar_fwd, "_block_list"), (tar_fwd, "_list"), (tar_fwd, "_redo")):
        monkeypatch.setattr(module, name, Counted(getattr(module, name)))
    monkeypatch.setitem(tar_fwd_lean._lean, None, Counted(tar_fwd_lean._lean[None]))
    frames = vk.frame_ids(8, 20)
    q, k, v = _script().planted(frames, 1, 16, 0.5, torch.device(DEVICE), torch.float16)
    problem = make_problem(q, k, v, sigma=0.5, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                           frames=frames.to(DEVICE))
    flags = torch.zeros(1, dtype=torch.int32, device=DEVICE)
    tar_fwd_lean.lean_forward(problem, flags=flags)
    assert int(flags[0]) > 0 and sorted(launched) == sorted(_script().LEAN_ONE_PASS_KERNELS)


def test_floor_call_is_plain_attention_at_tars_scale():
    """The floor the GPU stage times beside ours: SDPA on the named backend with TAR's default scale, D^-1/2 (the
    CPU runs flash SDPA; cuDNN's refusal there is the harness's Unsupported, not a crash)."""
    from vstar_kernels.bench.peers import Unsupported

    script = _script()
    q, k, v = (torch.randn(1, 2, 24, 40, dtype=torch.float64) for _ in range(3))
    expected = torch.softmax(q @ k.transpose(-1, -2) / 40 ** 0.5, dim=-1) @ v
    torch.testing.assert_close(script.floor_call("flash", q, k, v)(), expected)
    with pytest.raises(Unsupported, match="cudnn backend cannot run this call"):
        script.floor_call("cudnn", q, k, v)()


def test_a_file_with_no_timed_row_draws_nothing(tmp_path):
    """A run whose every cell failed: --plot says so and writes no picture (plot_results goes on to the next file)."""
    import csv

    path = tmp_path / "speculation-gpu-20260101.csv"
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=measure.COLUMNS)
        out.writeheader()
        out.writerow({**dict.fromkeys(measure.COLUMNS, ""), "impl": "vstar_triton_one_pass", "setup": "dit=x",
                      "status": "mismatch: the one pass is not the two passes bit for bit"})
    assert _script().plot(path) is None and not list(tmp_path.glob("*.png"))


def test_plot_refuses_a_file_of_another_harness_by_name(tmp_path, capsys):
    """A `bench --backward` file (setup "backward", no "="): it failed on the setup's parsing with Python's words."""
    path = tmp_path / "cpu-20260101-backward.csv"
    measure.append_row(path, {**dict.fromkeys(measure.COLUMNS, ""), "impl": "sdpa", "setup": "backward",
                              "median_ms": "1", "status": "ok"})
    assert _script().main(["--plot", str(path)]) == 2
    assert capsys.readouterr().err.strip() == (f"--plot: {path}: not a results file of this script (a timed row's "
                                               "setup names no dit=)")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit):
        _script().main(["--smoke", "--out", str(tmp_path / "a-file" / "sub")])
    assert "cannot be made" in capsys.readouterr().err


def test_rows_whose_plant_did_not_hold_are_not_drawn(tmp_path):
    """A one-pass row that flagged more rows than were planted timed other data than its rate names: --plot leaves
    it out (a file of such rows alone draws nothing)."""
    import csv

    path = tmp_path / "speculation-gpu-20260101.csv"
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=measure.COLUMNS)
        out.writeheader()
        out.writerow({**dict.fromkeys(measure.COLUMNS, ""), "impl": "vstar_triton_lean_one_pass", "status": "ok",
                      "median_ms": "57.5", "setup": "dit=x planted_flag_rate=0 flag_rate=1.0000"})
    assert _script().plot(path) is None and not list(tmp_path.glob("*.png"))


def test_many_shapes_wrap_into_rows_of_three(tmp_path):
    """Six DiT shapes side by side made a picture too wide to read: --plot draws at most three panels a row."""
    import csv

    from matplotlib.image import imread

    path = tmp_path / "speculation-gpu-20260101.csv"
    with path.open("w", newline="") as f:
        out = csv.DictWriter(f, fieldnames=measure.COLUMNS)
        out.writeheader()
        for i in range(4):
            for impl, ms in (("vstar_triton_lean_one_pass", "1.5"), ("vstar_triton_two_pass", "3.0")):
                out.writerow({**dict.fromkeys(measure.COLUMNS, ""), "impl": impl, "status": "ok", "median_ms": ms,
                              "setup": f"dit=shape{i} planted_flag_rate=0 flag_rate=0.0000", "commit": "abc",
                              "timestamp": "2026-01-01T00:00:00Z",
                              "dtype": "bf16", "device": "gpu"})
    height, width, _ = imread(_script().plot(path)).shape
    assert width < 2 * height  # 2 rows of 3 panels (one left blank), not 4 panels in a row of 4:1
