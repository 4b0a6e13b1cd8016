"""`tools.perf host`: the per-call host time of tar_attention on the quick shape (docs/performance.md)."""

import pytest
import torch

from tools.perf import host
from vstar_kernels import dispatch
from tools.perf.__main__ import main as perf_main


def test_time_calls_interleaves_the_implementations():
    calls = []
    medians = host.time_calls({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, batch=2)
    assert calls == ["a", "a", "b", "b"] * 4  # one warm-up round, then 3 rounds of a batch of each
    assert set(medians) == {"a", "b"} and all(t >= 0 for t in medians.values())


def test_the_formula_is_the_call_it_times():
    """The formula (the compute without the call around it) gives tar_attention's result, with and
    without frame ids; every backend that runs CPU tensors without the interpreter is timed, and the call
    with a backend that computes nothing, registered only while it is timed."""
    for n, with_frames in ((16, False), (64, True)):
        with host.no_compute_backend():
            calls = host.implementations(n, with_frames)
            assert set(calls) == {"sdpa", "formula", "tar auto", "tar cpu", "tar reference", host.NO_COMPUTE}
            torch.testing.assert_close(calls["formula"](), calls["tar auto"](), atol=2e-6, rtol=2e-6)
            torch.testing.assert_close(calls["tar reference"](), calls["tar auto"](), atol=2e-6, rtol=2e-6)
            assert calls[host.NO_COMPUTE]().shape == calls["sdpa"]().shape
    assert host.NO_COMPUTE not in dispatch.BACKENDS and host.NO_COMPUTE not in dispatch.BACKEND_NAMES


@pytest.mark.usefixtures("default_torch_threads")
def test_cli_prints_one_row_per_case(capsys):
    threads = torch.get_num_threads()
    assert perf_main(["host", "--rounds", "1", "--batch", "1"]) == 0
    assert torch.get_num_threads() == threads
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == 1 + len(host.LENGTHS) * 2 * len({1, threads})
    assert all(row.count("|") == 11 for row in rows)
