"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU.

The interpreter checks numerics but not what the GPU compiler accepts; Triton's
ahead-of-time path (with the ptxas it ships) compiles every launch a call makes,
for the autotune configs that survive pruning, without a GPU or a driver.
"""

import os
import pathlib
import subprocess
import sys

import pytest
import triton

PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"


@pytest.mark.skipif(not PTXAS.exists(), reason=f"triton ships no ptxas here ({PTXAS})")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-m", "tools.perf.compile_check", "--quick", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=900,
                         cwd=pathlib.Path(__file__).resolve().parents[2])  # the checkout: tools/ lives there
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("_tar_")]
    kernels = {line.split()[0] for line in rows}
    assert kernels == {"_tar_fwd_packed_kernel", "_tar_fwd_row_max_kernel", "_tar_fwd_tiled_kernel",
                       "_tar_bwd_packed_kernel", "_tar_bwd_dq_kernel", "_tar_bwd_dkdv_kernel"}
    assert res.stdout.rstrip().endswith(f"{len(rows)} kernels compiled for sm_90")
    # compiled with sm_90's pruning: the row-max Gaussian at D 64 in fp16 keeps 128 x 64 tiles there
    gaussian = [line for line in rows if line.startswith("_tar_fwd_tiled_kernel")
                and line.split(" | ")[1] == "fp16 B2H2Nq300Nk300D64Dv64 "]
    assert any("BLOCK_M=128 BLOCK_N=64 warps=8" in line for line in gaussian), gaussian
