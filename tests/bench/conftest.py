"""The benchmark harness's tests: tiny shapes, one CPU thread (tests/_device.py decides the device)."""

import pytest
import torch


@pytest.fixture(scope="module", autouse=True)
def one_cpu_thread():
    """Tiny CPU shapes: spreading each op over threads costs more than it saves (a lot, on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
