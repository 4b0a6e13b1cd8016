"""Test set-up: importing _device turns the Triton interpreter on without CUDA, at collection time,
before any test imports the kernels; tests marked gpu are skipped without CUDA."""

import os

import pytest
import torch

from . import _device  # noqa: F401 (sets TRITON_INTERPRET)

# `make test` runs one test process per core (pytest-xdist): each takes its share of the intra-op threads, not
# torch's default of one per core each, where 2 processes on 2 cores ran 4 busy threads and OpenMP's waits took
# turns from the other process (about 9% of the time of the CPU-heavy files). Tests of the CPU backend's worker
# threads set their own counts.
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    torch.set_num_threads(max(1, torch.get_num_threads() // _WORKERS))


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
