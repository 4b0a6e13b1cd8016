"""The backward benchmark cases run on CPU too (Triton interpreter, tiny shapes): a harness check."""

import math
import subprocess
import sys

import pytest
import torch

from vstar_kernels.bench import backward

from .._device import DEVICE

DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32
TOL = dict(atol=2e-2, rtol=2e-2) if DEVICE == "cuda" else dict(atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("frames", [16, 130])
def test_callables_compute_the_gradients(frames):
    tar = backward.backward_callables(2, 2, frames, 16, dtype=DTYPE, device=DEVICE, impls=("triton", "reference"))
    for a, b in zip(tar["triton"](), tar["reference"]()):
        torch.testing.assert_close(a, b, **TOL)
    plain = backward.backward_callables(2, 2, frames, 16, dtype=DTYPE, device=DEVICE, impls=("triton", "sdpa"),
                                        sigma=math.inf)  # a flat band: plain attention
    for a, b in zip(plain["triton"](), plain["sdpa"]()):
        torch.testing.assert_close(a, b, **TOL)


def test_time_backward_row():
    row = backward.time_backward(2, 2, 16, 16, dtype=DTYPE, device=DEVICE, causal=True)
    for name in backward.IMPLS:
        assert 0 < row[f"{name}_p20_ms"] <= row[f"{name}_ms"] <= row[f"{name}_p80_ms"]
    assert row["triton_vs_sdpa"] == pytest.approx(row["triton_ms"] / row["sdpa_ms"])
    assert row["triton_vs_reference"] == pytest.approx(row["triton_ms"] / row["reference_ms"])
    assert row["options"] == "causal=True" and row["frames"] == 16


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU the command runs the full-size cases")
def test_cli_backward_needs_a_gpu(tmp_path):
    res = subprocess.run([sys.executable, "-m", "vstar_kernels", "bench", "--backward", "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 1, res.stdout + res.stderr
    assert "backward benchmarks need a CUDA device" in res.stdout
    assert not any(tmp_path.iterdir())
