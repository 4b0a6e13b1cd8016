"""Test set-up: importing _device turns the Triton interpreter on without CUDA, at collection time,
before any test imports the kernels; tests marked gpu are skipped without CUDA."""

import os

import pytest
import torch

from . import _device  # noqa: F401 (sets TRITON_INTERPRET)

# `make test` runs one test process per core (pytest-xdist): each takes its share of the intra-op threads, not
# torch's default of one per core each, where 2 processes on 2 cores ran 4 busy threads and OpenMP's waits took
# turns from the other process (about 9% of the time of the CPU-heavy files). Tests that mean the CPU backend's
# worker threads, or the thread counts a perf command measures, set their own counts or take torch's own back
# (`default_torch_threads`).
_DEFAULT_THREADS = torch.get_num_threads()
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, _DEFAULT_THREADS // _WORKERS))


@pytest.fixture
def default_torch_threads():
    """For one test, torch's own intra-op thread count, two at least: the CPU backend's chunks go to worker threads
    and a perf command measures two thread counts, as in a run outside `make test` on a machine of 2 cores or more."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, _DEFAULT_THREADS))
    yield
    torch.set_num_threads(threads)


def pytest_collection_modifyitems(config, items):
    # files marked `long` first (a stable sort keeps each file's order): with `make test`'s one process per
    # core, a long file handed out last would leave the other processes idle while it runs. First of all the
    # files whose time is one subprocess (compiling for sm_90: 4 to 6 minutes each), which no other process
    # can share: one starts on each of CI's two processes, and the rest fill in around them
    def order(item):
        long = item.get_closest_marker("long")
        return long is None, not (long and long.kwargs.get("one_subprocess"))

    items.sort(key=order)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
