"""Tables and plots come from the CSV alone: a hand-written CSV renders as expected."""

import csv
import importlib.util
import sys
from pathlib import Path

from vstar_kernels.bench.harness import COLUMNS
from vstar_kernels.bench.report import draw_plots, markdown, our_failures, read_csv, render

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def row(impl, batch, heads, n, d, ms, gbps="", pct="", tflops="", peak="", status="ok", dtype="fp16"):
    return dict(zip(COLUMNS, ("2099-01-01T00:00:00Z", "abc123", "synthetic test device", "2.x", "3.x", impl,
                              batch, heads, n, d, dtype, ms, ms, ms, gbps, pct, tflops, peak, status)))


ROWS = [
    row("device_copy", "", "", "", "", "1", gbps="2000", pct="100", dtype="uint8"),
    row("vstar_triton", 320, 20, 16, 64, "2", gbps="1000", pct="50", tflops="1.5"),
    row("sdpa_plain", 320, 20, 16, 64, "1", gbps="2000", pct="100", tflops="3"),
    row("sdpa_bias", 320, 20, 16, 64, "", status="oom"),
    row("flex_two_pass", 320, 20, 16, 64, "", status="unsupported: no max_scores here"),
    row("vstar_triton", 320, 20, 32, 64, "3", gbps="1300", pct="65", tflops="2"),
    row("sdpa_plain", 320, 20, 32, 64, "6", gbps="650", pct="32.5", tflops="1"),
    row("sdpa_bias", 320, 20, 32, 64, "", status="error: RuntimeError: boom"),
    row("flex_two_pass", 320, 20, 32, 64, "", status="unsupported: no max_scores here"),
    row("unet_stock", 5120, 5, 16, 64, "100", peak="900"),
    row("unet_tar_triton", 5120, 5, 16, 64, "102", peak="910"),
    row("unet_tar_reference", 5120, 5, 16, 64, "150", peak="2000"),
]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def test_markdown_cells():
    md = markdown(ROWS, "t")
    assert "Measured copy bandwidth (read + write): 2,000 GB/s." in md
    assert "### vc2-320x512-l2: B x H = 6,400, D = 64" in md
    assert "| 16 | 2 | 1,000 | 50% | 1.5 | oom | unsupported [1] | 1 (0.5x) |" in md
    assert "| 32 | 3 | 1,300 | 65% | 2 | error [2] | unsupported [1] | 6 (2x) |" in md
    assert "- [1] flex_two_pass: unsupported: no max_scores here" in md
    assert "- [2] sdpa_bias: error: RuntimeError: boom" in md
    assert "| unet-modelscope-320x512 | fp16 | 16 | 100 | 102 (+2.0%) | 150 (+50.0%) | 900 | 910 | 2,000 |" in md
    assert "CPU run" not in md


def test_a_rerun_replaces_the_earlier_row():
    rerun = row("sdpa_plain", 320, 20, 16, 64, "4", gbps="500", pct="25", tflops="0.75")
    assert "| 16 | 2 | 1,000 | 50% | 1.5 | oom | unsupported [1] | 4 (2x) |" in markdown(ROWS + [rerun], "t")


def test_plot_script_regenerates_from_a_csv(tmp_path):
    path = tmp_path / "synthetic-20990101.csv"
    write_csv(path, ROWS)
    spec = importlib.util.spec_from_file_location("plot_results", BENCHMARKS / "plot_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    assert script.main([str(path)]) == 0
    assert read_csv(path) == [{k: str(v) for k, v in r.items()} for r in ROWS]  # the CSV is only read
    assert (tmp_path / "synthetic-20990101.md").read_text() == markdown(read_csv(path), f"TAR benchmark: {path.name}")
    for metric in ("time", "speedup", "bandwidth"):
        assert (tmp_path / f"synthetic-20990101-{metric}-fp16.png").read_bytes()[:8] == PNG
    assert script.main([str(tmp_path / "missing.csv")]) == 2


def test_without_matplotlib_the_table_is_still_written(tmp_path, monkeypatch, capsys):
    path = tmp_path / "synthetic-20990101.csv"
    write_csv(path, ROWS)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert render(path) == [tmp_path / "synthetic-20990101.md"]
    err = capsys.readouterr().err
    assert "plots skipped: matplotlib is not importable" in err
    assert f'pip install -e "{Path(__file__).resolve().parents[2]}[bench]"' in err
    assert not list(tmp_path.glob("*.png"))


OURS_FAIL = [
    row("device_copy", "", "", "", "", "1", gbps="2000", pct="100", dtype="uint8"),
    row("vstar_triton", 320, 20, 16, 64, "", status="error: RuntimeError: launch failed"),
    row("vstar_cuda", 320, 20, 16, 64, "", status="unsupported: no cuda backend"),
    row("sdpa_plain", 320, 20, 16, 64, "1", gbps="2000", pct="100", tflops="3"),
    row("vstar_triton", 320, 20, 32, 64, "", status="error: RuntimeError: launch failed"),
    row("vstar_cuda", 320, 20, 32, 64, "", status="unsupported: no cuda backend"),
    row("sdpa_plain", 320, 20, 32, 64, "6", gbps="650", pct="32.5", tflops="1"),
]


def test_our_failed_cells_keep_their_column_with_a_note():
    md = markdown(OURS_FAIL, "t")
    assert "| N | vstar_triton | vstar_cuda | sdpa_plain |" in md
    assert "| 16 | error [1] | unsupported [2] | 1 |" in md
    assert "| 32 | error [1] | unsupported [2] | 6 |" in md
    assert "- [1] vstar_triton: error: RuntimeError: launch failed" in md
    assert "- [2] vstar_cuda: unsupported: no cuda backend" in md
    # Ours ran at one N: its metric columns, the failed N a note.
    md = markdown(OURS_FAIL + [row("vstar_triton", 320, 20, 32, 64, "3", gbps="1300", pct="65", tflops="2")], "t")
    assert "| N | vstar_triton ms | GB/s | % copy BW | TFLOP/s | vstar_cuda | sdpa_plain |" in md
    assert "| 16 | error [1] |  |  |  | unsupported [2] | 1 |" in md
    assert "| 32 | 3 | 1,300 | 65% | 2 | unsupported [2] | 6 (2x) |" in md


def test_our_failures_are_errors_of_ours_only():
    rows = OURS_FAIL + [row("sdpa_bias", 320, 20, 16, 64, "", status="error: RuntimeError: boom"),
                        row("vstar_triton", 320, 20, 64, 64, "", status="oom")]
    assert [(r["impl"], r["n"]) for r in our_failures(rows)] == [("vstar_triton", 16), ("vstar_triton", 32)]
    rerun = row("vstar_triton", 320, 20, 16, 64, "2", gbps="1000", pct="50", tflops="1.5")
    assert [r["n"] for r in our_failures(rows + [rerun])] == [32]
    assert our_failures(ROWS) == []


def test_a_panel_without_data_says_why(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    draw_plots(OURS_FAIL, tmp_path / "synthetic-20990101")
    by_metric = dict(zip(("time", "speedup", "bandwidth"), figures))
    for metric, fig in by_metric.items():
        [ax] = [a for a in fig.axes if a.get_visible()]
        assert "not plotted, no successful run: vstar_triton, vstar_cuda" in ax.get_title()
        texts = [t.get_text() for t in ax.texts]
        if metric == "speedup":
            assert not ax.get_lines()[1:]  # only the y = 1 line
            assert texts == ["no data: no successful run of ours\n"
                             "(vstar_triton, vstar_cuda; see the notes under the markdown table)"]
        else:
            assert [line.get_label() for line in ax.get_lines()][:1] == ["sdpa_plain"] and texts == []
        plt.close(fig)
