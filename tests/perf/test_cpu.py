"""`tools.perf cpu`: the CPU default path timed against plain SDPA, its rows and its file."""

import pytest
import torch

from tools.perf import cpu
from vstar_kernels.bench.measure import COLUMNS, ideal_cost, read_csv
from tools.perf.__main__ import main as perf_main


def test_time_pair_alternates_the_two_calls():
    calls = []
    ours, plain = (lambda: calls.append("ours")), (lambda: calls.append("plain"))
    a, b = cpu.time_pair(ours, plain, 3)
    assert calls == ["ours", "plain"] * 4  # one warm-up call each, then 3 rounds of one call each
    assert len(a) == len(b) == 3 and all(x >= 0 for x in a + b)


def test_quantiles_interpolate():
    assert cpu._quantile([4.0, 1.0, 3.0, 2.0, 5.0], 0.5) == 3.0
    assert cpu._quantile([1.0, 2.0, 3.0, 4.0, 5.0], 0.2) == pytest.approx(1.8)
    assert cpu._quantile([7.0], 0.8) == 7.0


@pytest.mark.parametrize("frames", [(), (2, 8)])
def test_measure_rows_say_what_ran(frames):
    case = cpu.Case("tiny", 2, 3, 16, 8, frames=frames)
    threads = torch.get_num_threads()
    rows = cpu.measure(case, 1, 2)
    assert torch.get_num_threads() == 1
    torch.set_num_threads(threads)
    assert [r["impl"] for r in rows] == ["vstar_auto", "sdpa_plain"]
    ours, plain = rows
    assert tuple(ours) == COLUMNS and ours["status"] == "ok" and ours["torch"] == torch.__version__
    assert ours["setup"] == ("frames=2x8,threads=1" if frames else "threads=1") == plain["setup"]
    assert (ours["batch"], ours["heads"], ours["n"], ours["d"], ours["dtype"]) == (2, 3, 16, 8, "fp32")
    assert float(ours["p20_ms"]) <= float(ours["median_ms"]) <= float(ours["p80_ms"])
    cost = ideal_cost(6, 16, 16, 8, 8, 4)
    assert float(ours["gbps"]) == pytest.approx(cost.bytes / float(ours["median_ms"]) / 1e6, rel=1e-4)


@pytest.mark.usefixtures("default_torch_threads")
def test_cli_writes_the_csv(tmp_path, monkeypatch):
    tiny = (cpu.Case("tiny", 2, 3, 16, 8), cpu.Case("tiny dit", 1, 2, 32, 8, frames=(2, 16)))
    monkeypatch.setattr(cpu, "QUICK", tiny)
    threads = torch.get_num_threads()
    try:
        assert perf_main(["cpu", "--quick", "--rounds", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    (path,) = tmp_path.glob("cpu-default-path-*.csv")
    rows = read_csv(path)  # the harness's schema
    assert {r["setup"] for r in rows} == {f"{f}threads={t}" for f in ("", "frames=2x16,") for t in {threads, 1}}


def test_a_same_day_rerun_appends_to_the_csv(tmp_path, monkeypatch, capsys):
    """The second run overwrote the first's rows (benchmarks/NOTES.md: the CSV keeps both, as the harness's
    does); a file of other columns is refused before the work."""
    monkeypatch.setattr(cpu, "QUICK", (cpu.Case("tiny", 1, 1, 16, 8),))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # one thread count: two rows a run
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    argv = ["cpu", "--quick", "--rounds", "1", "--out", str(tmp_path)]
    assert perf_main(argv) == 0 and perf_main(argv) == 0
    (path,) = tmp_path.glob("cpu-default-path-*.csv")
    assert capsys.readouterr().out.splitlines()[-1] == f"appended to {path}"
    assert [r["impl"] for r in read_csv(path)] == ["vstar_auto", "sdpa_plain"] * 2  # the header once
    path.write_text("a,b\n1,2\n")
    monkeypatch.setattr(cpu, "measure", lambda *a: pytest.fail("measured"))
    assert perf_main(argv) == 2
    assert capsys.readouterr().err.strip() == (f"{path} has the columns ['a', 'b'], not this harness's "
                                               f"{list(COLUMNS)}: move it aside or write elsewhere (--out)")
