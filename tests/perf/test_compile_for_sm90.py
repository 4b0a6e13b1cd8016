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

pytestmark = pytest.mark.long(one_subprocess=True)  # scheduled first of all (tests/conftest.py)

PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

# compile_check's --quick run (each kernel's first and last configs once per dtype and shape, at its first case
# there; its other launches at the first config) over fewer cases: in fp16, forward and backward, every kernel in
# each constexpr variant (causal, global max, delta, frames, saved statistics) and in both head-dim regimes (<= 128,
# > 128), each once; the bf16 and fp32 forwards as --quick has them. What --quick adds to this: frames at D 40 (the
# tiled kernels at D <= 128, as frames at D 64 compiles them), the packed options at D 160 (as at D 40) and causal +
# global max apart from delta in the packed kernels (one case turns all three on).
_QUICK = r"""
import sys

import torch

from tools.perf import compile_check as cc

packed, wide, tiled = cc.SHAPES[0], cc.SHAPES[3], cc.SHAPES[4]
plain, causal_global, delta, frames = cc.OPTIONS
cc.QUICK = [(torch.float16, shape, opts) for shape, opts in (
    (packed, plain), (packed, dict(causal=True, max_mode="global", delta=True)),
    (wide, plain), (wide, frames),
    (tiled, plain), (tiled, causal_global), (tiled, delta), (tiled, frames))]
raise SystemExit(cc.main(sys.argv[1:]))
"""


@pytest.mark.skipif(not PTXAS.exists(), reason=f"triton ships no ptxas here ({PTXAS})")
def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1")
    res = subprocess.run([sys.executable, "-c", _QUICK, "--quick", "--arch", "90"],
                         capture_output=True, text=True, env=env, timeout=900,
                         cwd=pathlib.Path(__file__).resolve().parents[2])  # the checkout: tools/ lives there
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    rows = [line for line in res.stdout.splitlines() if line.startswith("_tar_")]
    kernels = {line.split()[0] for line in rows}
    assert kernels == {"_tar_fwd_packed_kernel", "_tar_fwd_row_max_kernel", "_tar_fwd_tiled_kernel",
                       "_tar_fwd_list_kernel", "_tar_fwd_redo_kernel", "_tar_bwd_packed_kernel", "_tar_bwd_dq_kernel",
                       "_tar_bwd_dkdv_kernel"}
    assert res.stdout.rstrip().endswith(f"{len(rows)} kernels compiled for sm_90")
    # compiled with sm_90's pruning: the row-max Gaussian at D 64 in fp16 keeps 128 x 64 tiles there
    gaussian = [line for line in rows if line.startswith("_tar_fwd_tiled_kernel")
                and line.split(" | ")[1] == "fp16 B2H2Nq300Nk300D64Dv64 "]
    assert any("BLOCK_M=128 BLOCK_N=64 warps=8" in line for line in gaussian), gaussian
    # the tiled forward's first and last configs at its first fp16 D 64 case (plain), the first alone at the others
    tiled = [line.split(" | ")[1].split(maxsplit=2)[2:] for line in rows if line.startswith("_tar_fwd_tiled_kernel")
             and line.split(" | ")[1].startswith("fp16 B2H2Nq300Nk300D64Dv64")]
    assert [tiled.count(case) for case in ([], ["delta"], ["frames"], ["frames +bwd"])] == [2, 1, 1, 1], tiled
