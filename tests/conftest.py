"""Test set-up: importing _device turns the Triton interpreter on without CUDA, at collection time,
before any test imports the kernels; tests marked gpu are skipped without CUDA."""

import pytest
import torch

from . import _device  # noqa: F401 (sets TRITON_INTERPRET)


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
