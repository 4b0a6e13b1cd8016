"""Benchmark tests run on CPU too: without CUDA the Triton kernels run in the interpreter.

Set before any test loads the kernels (as tests/conftest.py does for the test suite).
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny CPU shapes: spreading each op over threads costs more than it saves (a lot, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
