"""benchmarks/speculation.py (the GPU sweep's `speculation` stage) on its CPU smoke layout, in the interpreter:
the planted rows are flagged, the one pass equals the two passes, rows in the harness's schema."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from vstar_kernels.bench import measure

ROOT = Path(__file__).resolve().parents[2]


def test_smoke_run_writes_checked_rows(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "benchmarks/speculation.py", "--smoke", "--rates", "0", "1", "--out",
                           str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (csv_path,) = tmp_path.glob("speculation-*.csv")
    rows = measure.read_csv(csv_path)
    assert [r["impl"] for r in rows] == ["vstar_triton_one_pass", "vstar_triton_two_pass"] * 2
    assert {r["status"] for r in rows} == {"ok"} and all(float(r["median_ms"]) > 0 for r in rows)
    rates = [dict(part.split("=") for part in r["setup"].split())["flag_rate"] for r in rows]
    assert float(rates[0]) == 0 and 0.3 < float(rates[-1]) <= 1


def test_bad_rates_and_no_gpu_are_refused(tmp_path):
    for args, message in ((["--smoke", "--rates", "1.5"], "--rates: shares in [0, 1]"),
                          ([], "torch sees no CUDA device")):
        done = subprocess.run([sys.executable, "benchmarks/speculation.py", *args, "--out", str(tmp_path)], cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        if not args and done.returncode == 0:
            pytest.skip("a CUDA device is present")
        assert done.returncode != 0 and message in done.stderr
