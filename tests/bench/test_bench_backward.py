"""The backward benchmark cases run on CPU too (Triton interpreter, tiny shapes): a harness check."""

import math
import subprocess
import sys

import pytest
import torch

from vstar_kernels.bench import backward, measure, report

from .._device import DEVICE

DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=2e-2, rtol=2e-2) if DEVICE == "cuda" else dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("frames", [16, 130])
def test_callables_compute_the_gradients(frames):
    tar = backward.backward_callables(2, 2, frames, 16, dtype=DTYPE, device=DEVICE,
                                      impls=("vstar_triton", "vstar_reference"))
    for a, b in zip(tar["vstar_triton"](), tar["vstar_reference"]()):
        torch.testing.assert_close(a, b, **TOL)
    plain = backward.backward_callables(2, 2, frames, 16, dtype=DTYPE, device=DEVICE, impls=("vstar_triton", "sdpa"),
                                        sigma=math.inf)  # a flat band: plain attention
    for a, b in zip(plain["vstar_triton"](), plain["sdpa"]()):
        torch.testing.assert_close(a, b, **TOL)


def test_time_backward_rows_are_harness_rows(tmp_path):
    info = measure.RunInfo("cpu (test)", torch.__version__, "3.x", "abc123", "20990101")
    rows = backward.time_backward(info, 2, 2, 16, 16, dtype=DTYPE, device=DEVICE, causal=True)
    assert [r["impl"] for r in rows] == list(backward.IMPLS)
    assert [r["backend"] for r in rows] == ["triton", "reference", ""]  # what ran, as the sweep's rows say
    for r in rows:
        assert tuple(r) == measure.COLUMNS and r["status"] == "ok" and r["setup"] == "backward,causal=True"
        assert (r["batch"], r["heads"], r["n"], r["d"], r["commit"]) == (2, 2, 16, 16, "abc123")
        assert 0 < float(r["p20_ms"]) <= float(r["median_ms"]) <= float(r["p80_ms"])
        assert (r["peak_mem_mb"] != "") == (DEVICE == "cuda") and r["gbps"] == ""
    # drawn as any results file, but for the bandwidth: the rows count no bytes (it said "no implementation ran")
    path = tmp_path / "cpu-test-20990101-backward.csv"
    for r in rows:
        measure.append_row(path, r)
    written = [p.name for p in report.render(path)]
    assert "cpu-test-20990101-backward-time-fp32.png" in written or DEVICE == "cuda"
    assert not [name for name in written if "-bandwidth-" in name]


def test_each_backward_is_called_once_before_it_is_timed(monkeypatch):
    """time_call times after a warm call of its own and picks its timer by that call's time: the Triton backward's
    first call compiles and autotunes (seconds), so each implementation is called once before, untimed."""
    calls, seen = {}, []

    def counted(name):
        def fn():
            calls[name] = calls.get(name, 0) + 1
        return fn

    def time_call(fn, device):
        seen.append(dict(calls))  # each implementation's calls before its timing
        fn()
        return measure.Timing(1.0, 1.0, 1.0), None

    monkeypatch.setattr(backward, "backward_callables", lambda *a, **k: {n: counted(n) for n in backward.IMPLS})
    monkeypatch.setattr(measure, "time_call", time_call)
    info = measure.RunInfo("cpu (test)", torch.__version__, "3.x", "abc123", "20990101")
    backward.time_backward(info, 2, 2, 16, 16, device="cpu")
    assert [state[name] for state, name in zip(seen, backward.IMPLS)] == [1, 1, 1]


def test_cli_backward_refuses_the_sweeps_options(tmp_path, capsys):
    """--backward runs its own fp16 cases on CUDA: the sweep's options (a dtype, N, shapes, implementations, a
    budget, the CPU) were taken and ignored, exit 0; they are refused, each named."""
    from vstar_kernels.cli import main

    assert main(["bench", "--backward", "--dtype", "bf16", "--n", "64", "--device", "cpu", "--time-budget-s", "1",
                 "--no-progress", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "drop --dtype, --n, --time-budget-s, --no-progress, --device cpu" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command runs the full-size cases")
def test_cli_backward_needs_a_gpu(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vstar_kernels", "bench", "--backward", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr  # as --device cuda without CUDA (it was 1)
    assert "backward benchmarks need a CUDA device" in res.stderr and not res.stdout
    assert not any(tmp_path.iterdir())
