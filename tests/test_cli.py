"""`python -m vstar_kernels info` and `demo` run and say what they found."""

import subprocess
import sys

import torch


def run(*args):
    return subprocess.run([sys.executable, "-m", "vstar_kernels", *args], capture_output=True, text=True,
                          timeout=600)


def test_info_lists_versions_and_backends():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert f"torch         {torch.__version__}" in res.stdout
    assert "backend reference  on cpu    : available" in res.stdout
    assert "backend triton" in res.stdout


def test_demo_checks_the_kernel_against_the_reference():
    res = run("demo")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all outputs match the reference" in res.stdout
    if not torch.cuda.is_available():
        assert "Triton interpreter" in res.stdout
