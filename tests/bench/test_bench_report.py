"""Tables and plots come from the CSV alone: a hand-written CSV renders as expected."""

import csv
import importlib.util
import sys
from pathlib import Path

import pytest

from vstar_kernels.bench.harness import CHECKED_ONLY
from vstar_kernels.bench.measure import COLUMNS, read_csv
from vstar_kernels.bench.report import BUSY_LABEL, COPY_IMPL, UNET_IMPLS, draw_plots, markdown, our_failures, render

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
PNG = b"\x89PNG\r\n\x1a\n"


def row(impl, batch, heads, n, d, ms, gbps="", pct="", tflops="", peak="", status="ok", dtype="fp16", backend="",
        flag="", p20=None, p80=None, device="synthetic test device", setup=""):
    return {**dict.fromkeys(COLUMNS, ""), **dict(
        timestamp="2099-01-01T00:00:00Z", commit="abc123", device=device, torch="2.x", triton="3.x", impl=impl,
        batch=batch, heads=heads, n=n, d=d, dtype=dtype, setup=setup, median_ms=ms,
        p20_ms=ms if p20 is None else p20, p80_ms=ms if p80 is None else p80, gbps=gbps, pct_peak_bw=pct,
        tflops=tflops, peak_mem_mb=peak, status=status, backend=backend, flag=flag)}


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


def test_peers_are_compared_with_one_implementation_of_ours_per_group():
    """The ratio's reference is the group's first of ours that ran (vstar_triton here), at every N: where it failed
    (N 32) a peer's cell has no ratio, where it once took one against vstar_cuda (10x instead of 1x)."""
    rows = [row("vstar_triton", 320, 20, 16, 64, "2"), row("vstar_cuda", 320, 20, 16, 64, "3"),
            row("sdpa_plain", 320, 20, 16, 64, "4"),
            row("vstar_triton", 320, 20, 32, 64, "", status="error: RuntimeError: boom"),
            row("vstar_cuda", 320, 20, 32, 64, "2"), row("sdpa_plain", 320, 20, 32, 64, "20")]
    md = markdown(rows, "t")
    assert "| 4 (2x) |" in md and "| 20 |" in md and "10x" not in md


def test_every_plotted_implementation_has_a_color_of_its_own():
    """The sweep's peers, the backward's and the UNet's: the backward's vstar_reference and sdpa once shared the
    color of every name outside the sweep's peers (the UNet's three too)."""
    from vstar_kernels.bench import backward, report

    names = {*report.PLOTTED, *backward.IMPLS, *UNET_IMPLS}
    assert len({tuple(report._color(name)) for name in names}) == len(names)
    assert report._color("vstar_auto") == report._color("vstar_triton")
    # an older file's names (reference_materialized) were all drawn in sdpa_plain's gray
    older = {tuple(report._color(name)) for name in ("reference_materialized", "reference_chunked")}
    assert len(older) == 2 and not older & {tuple(report._color(name)) for name in names}


def plot_script():
    spec = importlib.util.spec_from_file_location("plot_results", BENCHMARKS / "plot_results.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_plot_script_regenerates_from_a_csv(tmp_path):
    path = tmp_path / "synthetic-20990101.csv"
    write_csv(path, ROWS)
    script = plot_script()
    assert script.main([str(path)]) == 0
    assert read_csv(path) == [{k: str(v) for k, v in r.items()} for r in ROWS]  # the CSV is only read
    assert (tmp_path / "synthetic-20990101.md").read_text() == markdown(read_csv(path), f"TAR benchmark: {path.name}")
    for metric in ("time", "speedup", "bandwidth"):
        assert (tmp_path / f"synthetic-20990101-{metric}-fp16.png").read_bytes()[:8] == PNG
    assert script.main([str(tmp_path / "missing.csv")]) == 2
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "header.csv").write_text(path.read_text().splitlines()[0] + "\n")
    assert script.main([str(tmp_path / "empty.csv")]) == 2 and script.main([str(tmp_path / "header.csv")]) == 2


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


def test_a_correctness_run_alone_is_said_checked_not_failed(tmp_path, monkeypatch):
    """Only the interpreter's check at a shape: the panels said no implementation ran successfully and ours none
    ran, under a title saying it was checked."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    cpu = "cpu: a test CPU"
    draw_plots([row("device_copy", "", "", "", "", "1", gbps="2000", pct="100", dtype="uint8", device=cpu),
                row("vstar_triton_interpreter", 4, 2, 16, 40, "", status=CHECKED_ONLY, backend="triton",
                    dtype="fp32", device=cpu)], tmp_path / "checked-20990101")
    by_metric = dict(zip(("time", "speedup", "bandwidth"), figures))
    for metric, fig in by_metric.items():
        assert fig._suptitle.get_text().endswith("CPU wall clock; ours: none timed. Not GPU speed")
        [ax] = [a for a in fig.axes if a.get_visible()]
        assert "correctness run only, not timed: vstar_triton_interpreter" in ax.get_title()
        see = "see the notes under the markdown table"
        assert [t.get_text() for t in ax.texts] == [f"no data: ours was checked, not timed\n({see})"
                                                    if metric == "speedup" else
                                                    "no data: no implementation was timed successfully\n"
                                                    f"(vstar_triton_interpreter only checked; {see})"]
        plt.close(fig)
    # ours timed and failed beside the check: the speedup panel says so, not that ours was only checked
    figures.clear()
    draw_plots([row("vstar_triton_interpreter", 4, 2, 16, 40, "", status=CHECKED_ONLY, backend="triton",
                    dtype="fp32", device=cpu),
                row("vstar_auto", 4, 2, 16, 40, "", status="error: RuntimeError: boom", dtype="fp32", device=cpu)],
               tmp_path / "failed-20990101")
    [ax] = [a for a in figures[1].axes if a.get_visible()]
    assert [t.get_text() for t in ax.texts][0].startswith("no data: no successful run of ours\n")


def test_n_a_time_budget_left_unrun_is_said_and_not_drawn(tmp_path, monkeypatch):
    """A sweep cut by its time budget: the panels' N axis holds the N that ran, and the title says which not."""
    import matplotlib.pyplot as plt

    budget = "unsupported: not run: the sweep's time budget of 5 s was used up"
    rows = ROWS[:5] + [row(impl, 320, 20, n, 64, "", status=budget)
                       for n in (32, 64) for impl in ("vstar_triton", "sdpa_plain")]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    draw_plots(rows, tmp_path / "synthetic-20990101")
    assert len(figures) == 3
    for fig in list(figures):  # closing appends to figures
        [ax] = [a for a in fig.axes if a.get_visible()]
        assert "N not run (the sweep's time budget used up): 32, 64" in ax.get_title()
        assert [t.get_text() for t in ax.get_xticklabels()] == ["16"]
        plt.close(fig)


CPU = "cpu (synthetic)"
CPU_ROWS = [
    row("device_copy", "", "", "", "", "1", gbps="30", pct="100", dtype="uint8", device=CPU),
    row("vstar_triton_interpreter", 4, 2, 16, 40, "", status=CHECKED_ONLY, backend="triton", dtype="fp32", device=CPU),
    row("vstar_auto", 4, 2, 16, 40, "0.2", gbps="0.5", pct="1.67", tflops="0.01", backend="reference", dtype="fp32",
        device=CPU),
    row("sdpa_plain", 4, 2, 16, 40, "0.1", gbps="1", pct="3.33", tflops="0.02", dtype="fp32", device=CPU),
    row("vstar_triton_interpreter", 4, 2, 64, 40, "", status=CHECKED_ONLY, backend="triton", dtype="fp32", device=CPU),
    row("vstar_auto", 4, 2, 64, 40, "0.8", gbps="0.5", pct="1.67", tflops="0.04", backend="reference", dtype="fp32",
        device=CPU),
    row("sdpa_plain", 4, 2, 64, 40, "0.4", gbps="1", pct="3.33", tflops="0.08", dtype="fp32", device=CPU),
]


def test_cpu_ours_is_the_default_path_and_the_interpreter_a_correctness_run():
    md = markdown(CPU_ROWS, "t")
    assert "`vstar_auto` ran `reference`" in md
    assert "| N | vstar_auto ms | GB/s | % copy BW | TFLOP/s | vstar_triton_interpreter | sdpa_plain |" in md
    assert "| 16 | 0.2 | 0.5 | 1.67% | 0.01 | checked [1] | 0.1 (0.5x) |" in md
    assert "| 64 | 0.8 | 0.5 | 1.67% | 0.04 | checked [1] | 0.4 (0.5x) |" in md
    assert f"- [1] vstar_triton_interpreter: {CHECKED_ONLY}" in md
    assert "busy" not in md


def plotted(rows, tmp_path, monkeypatch):
    """{metric: figure} drawn for `rows` (one panel each)."""
    import matplotlib.pyplot as plt

    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    draw_plots(rows, tmp_path / "synthetic-20990101")
    return dict(zip(("time", "speedup", "bandwidth"), figures))


def test_cpu_plots_compare_with_the_default_path_and_leave_the_interpreter_out(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    for metric, fig in plotted(CPU_ROWS, tmp_path, monkeypatch).items():
        [ax] = [a for a in fig.axes if a.get_visible()]
        assert "correctness run only, not timed: vstar_triton_interpreter" in ax.get_title()
        assert "not plotted" not in ax.get_title()
        assert "ours: vstar_auto (tar_attention's default CPU path)" in fig._suptitle.get_text()
        labels = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
        if metric == "speedup":
            assert labels == ["sdpa_plain"]
            [line] = [line for line in ax.get_lines() if line.get_label() == "sdpa_plain"]
            assert list(line.get_ydata()) == [0.5, 0.5]  # sdpa_plain / vstar_auto
        else:
            assert labels[:2] == ["vstar_auto", "sdpa_plain"] and "vstar_triton_interpreter" not in labels
        assert ax.get_xlabel() == "N (frames)" and ax.get_ylabel()
        plt.close(fig)


BUSY_ROWS = [
    row("vstar_triton", 320, 20, 16, 64, "2", gbps="1000", pct="50", tflops="1.5", p20="1.9", p80="2.1"),
    row("sdpa_plain", 320, 20, 16, 64, "1", gbps="2000", pct="100", tflops="3", p20="0.9", p80="1.8", flag="busy"),
]


def test_busy_cells_are_flagged_in_the_table_and_the_plots(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    md = markdown(BUSY_ROWS, "t")
    assert "| 16 | 2 | 1,000 | 50% | 1.5 | 1 (0.5x) **busy** |" in md
    assert "**busy**: 1 cell(s) whose p80/p20 spread exceeds 1.25" in md
    for fig in plotted(BUSY_ROWS, tmp_path, monkeypatch).values():
        [ax] = [a for a in fig.axes if a.get_visible()]
        [ring] = [line for line in ax.get_lines() if line.get_label() == BUSY_LABEL]
        assert ring.get_markeredgecolor() == "black" and list(ring.get_xdata()) == [16]
        assert BUSY_LABEL in [t.get_text() for t in fig.legends[0].get_texts()]
        plt.close(fig)
    calm = [dict(r, flag="") for r in BUSY_ROWS]
    assert "busy" not in markdown(calm, "t")  # the CSV's flag is the record


def test_the_legend_of_a_one_panel_plot_fits_its_figure(tmp_path, monkeypatch):
    """bench --quick's plots are one panel wide: five implementations and the busy ring's label made a legend wider
    than the figure, its first and last labels cut at the edges."""
    import matplotlib.pyplot as plt

    impls = ["vstar_triton", "reference_eager", "reference_compiled", "sdpa_bias", "sdpa_plain"]
    rows = [row(impl, 2, 8, n, 40, str(i + 1), flag="busy" if i == 0 else "") for i, impl in enumerate(impls)
            for n in (16, 64)]
    for fig in plotted(rows, tmp_path, monkeypatch).values():
        fig.canvas.draw()
        box = fig.legends[0].get_window_extent()
        assert 0 <= box.x0 and box.x1 <= fig.bbox.x1, (box, fig.bbox)
        plt.close(fig)


def test_a_log_axis_within_two_decades_has_numbers_to_read(tmp_path, monkeypatch):
    """Peers at 0.12x and 0.9x of ours: with labels at powers of ten only, the axis would show just "1"."""
    import matplotlib.pyplot as plt

    rows = [row("vstar_triton", 320, 20, 16, 64, "1"), row("sdpa_plain", 320, 20, 16, 64, "0.12"),
            row("vstar_triton", 320, 20, 32, 64, "1"), row("sdpa_plain", 320, 20, 32, 64, "0.9")]
    for metric, fig in plotted(rows, tmp_path, monkeypatch).items():
        fig.canvas.draw()
        [ax] = [a for a in fig.axes if a.get_visible()]
        low, high = ax.get_ylim()
        labels = [t.get_text() for t in ax.get_yticklabels()
                  if t.get_text() and low <= float(t.get_position()[1]) <= high]
        assert len(labels) >= 3, (metric, labels)
        plt.close(fig)


def test_a_log_axis_labels_a_value_near_its_top(tmp_path, monkeypatch):
    """Times from 0.04 to 0.4 ms (a decade, the axis a bit more): with labels at 1, 2 and 5 per decade the
    top one would be 0.2, under every point of ours; a label within a factor 2 of the top is drawn."""
    import matplotlib.pyplot as plt

    rows = [row("vstar_triton", 320, 20, 16, 64, "0.38"), row("sdpa_plain", 320, 20, 16, 64, "0.04"),
            row("vstar_triton", 320, 20, 32, 64, "0.4"), row("sdpa_plain", 320, 20, 32, 64, "0.1")]
    fig = plotted(rows, tmp_path, monkeypatch)["time"]
    fig.canvas.draw()
    [ax] = [a for a in fig.axes if a.get_visible()]
    low, high = ax.get_ylim()
    assert 10 * low < high <= 100 * low
    ticks = [float(t.get_position()[1]) for t in ax.get_yticklabels()
             if t.get_text() and low <= float(t.get_position()[1]) <= high]
    assert max(ticks) >= high / 2, (low, high, ticks)
    plt.close(fig)


def test_plot_script_renders_every_committed_results_csv(tmp_path, capsys):
    """No arguments: every CSV under benchmarks/results/ but tools.perf's own outputs, each table as committed."""
    script = plot_script()
    assert script.main(["--out", str(tmp_path)]) == 0
    results = BENCHMARKS / "results"
    rendered = [p for p in sorted(results.glob("*.csv")) if not any(p.match(g) for g in script.PERF_OUTPUTS)]
    assert {p.stem for p in rendered} >= {"cpu-default-path-20261123", "cpu-amd-epyc-20261122"}
    for path in rendered:
        assert (tmp_path / f"{path.stem}.md").read_text() == (results / f"{path.stem}.md").read_text(), path.name
        if path.name.startswith("speculation-"):  # the speculation script's own picture
            pngs = [f"{path.stem}-flag-rates.png"]
        else:
            dtypes = {r["dtype"] for r in read_csv(path) if r["impl"] not in UNET_IMPLS and r["impl"] != COPY_IMPL}
            pngs = [f"{path.stem}-{metric}-{dtype}.png" for metric in ("time", "speedup", "bandwidth")
                    for dtype in dtypes]
        for png in pngs:
            assert (tmp_path / png).read_bytes()[:8] == PNG, png
    assert not list(tmp_path.glob("model-*")) and not list(tmp_path.glob("static-*"))


def test_a_csv_of_other_columns_is_refused(tmp_path, capsys):
    path = tmp_path / "other.csv"
    path.write_text("estimate,device,impl\nmeasured,cpu,vstar_auto\n")
    with pytest.raises(ValueError, match="has the columns"):
        render(path)
    assert plot_script().main([str(path)]) == 2
    assert "not this harness's" in capsys.readouterr().err and not list(tmp_path.glob("other*.md"))
    cut = tmp_path / "cut.csv"  # a row cut short: the report failed on its None fields (AttributeError)
    cut.write_text(",".join(COLUMNS) + "\n" + ",".join(["x"] * 12) + "\n", encoding="utf-8")
    assert plot_script().main([str(cut)]) == 2
    assert capsys.readouterr().err.strip() == (f"{cut}: line 2 has 12 fields, not the header's {len(COLUMNS)} "
                                               "(a damaged row): mend or remove it")
    image = tmp_path / "image.csv"
    image.write_bytes(b"\x89PNG\r\n")
    assert plot_script().main([str(image)]) == 2
    assert capsys.readouterr().err.startswith(f"{image} is not UTF-8 text ('utf-8' codec can't decode")  # named
    assert plot_script().main([str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == f"not a file: {tmp_path} (a folder)"
    assert plot_script().main(["--out", str(path / "sub"), str(path)]) == 2
    assert capsys.readouterr().err.startswith("--out: ")


def test_plot_script_refuses_two_files_of_one_name_into_one_folder(tmp_path, capsys):
    """With --out, s1/x.csv and s2/x.csv both wrote out/x.md, the second over the first, exit 0; a file given twice
    was rendered twice."""
    for folder in ("s1", "s2"):
        (tmp_path / folder).mkdir()
        write_csv(tmp_path / folder / "x.csv", ROWS)
    one, two, out = tmp_path / "s1" / "x.csv", tmp_path / "s2" / "x.csv", tmp_path / "out"
    assert plot_script().main(["--no-plots", "--out", str(out), str(one), str(two)]) == 2
    assert capsys.readouterr().err.strip() == (f"--out: {one} and {two}: files of one name, whose tables and plots "
                                               f"would overwrite each other in {out}: render them into separate "
                                               "folders")
    assert not out.exists()
    assert plot_script().main(["--no-plots", str(one), str(two)]) == 0  # each beside its own CSV: no clash
    assert capsys.readouterr().out.split() == ["wrote", str(tmp_path / "s1" / "x.md"), "wrote",
                                               str(tmp_path / "s2" / "x.md")]
    again = str(tmp_path / "s2" / ".." / "s1" / "x.csv")
    assert plot_script().main(["--no-plots", "--out", str(out), str(one), str(one), again]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(out / "x.md")]
    write_csv(tmp_path / "s2" / "y.csv", ROWS)  # in the order given, each at its first place
    assert plot_script().main(["--no-plots", "--out", str(out), str(one), str(tmp_path / "s2" / "y.csv"), again]) == 0
    assert capsys.readouterr().out.split() == ["wrote", str(out / "x.md"), "wrote", str(out / "y.md")]


def test_plot_script_names_an_out_that_is_a_file(tmp_path, capsys):
    """--out naming an existing file printed the raw "[Errno 17] File exists"."""
    path, taken = tmp_path / "x.csv", tmp_path / "taken"
    write_csv(path, ROWS)
    taken.write_text("")
    assert plot_script().main(["--no-plots", "--out", str(taken), str(path)]) == 2
    assert capsys.readouterr().err.strip() == f"--out: {taken} is a file; --out names the results folder"


def test_plot_script_help_names_the_files_it_leaves_out_in_words(capsys):
    """Its help named the module's constant PERF_OUTPUTS, which a reader of --help cannot see."""
    script = plot_script()
    with pytest.raises(SystemExit):
        script.main(["--help"])
    out = capsys.readouterr().out
    assert "PERF_OUTPUTS" not in out and all(pattern in out for pattern in script.PERF_OUTPUTS)


FLOOR_ROWS = [
    row("vstar_triton", 320, 20, 16, 64, "2", gbps="1000", pct="50", tflops="1.5"),
    row("sdpa_floor", 320, 20, 16, 64, "1", backend="cudnn"),
]


def test_the_floor_is_labelled_by_the_backend_it_ran(tmp_path, monkeypatch):
    md = markdown(FLOOR_ROWS, "t")
    assert "`sdpa_floor` ran `cudnn` (FA3-class floor (cuDNN SDPA))" in md
    assert "| N | vstar_triton ms | GB/s | % copy BW | TFLOP/s | sdpa_floor |" in md
    assert "| 16 | 2 | 1,000 | 50% | 1.5 | 1 (0.5x) |" in md
    fig = plotted(FLOOR_ROWS, tmp_path, monkeypatch)["time"]
    assert "sdpa_floor: FA3-class floor (cuDNN SDPA)" in [t.get_text() for t in fig.legends[0].get_texts()]
    flash = [FLOOR_ROWS[0], dict(FLOOR_ROWS[1], backend="flash")]
    assert "`sdpa_floor` ran `flash` (FA2-class (flash SDPA))" in markdown(flash, "t")


def test_groups_are_split_by_setup():
    rows = [row("vstar_auto", 2048, 5, 16, 64, "120", dtype="fp32", setup=f"threads={t}", device=CPU)
            for t in (1, 2)]
    md = markdown(rows, "t")
    for threads in (1, 2):
        assert f"### modelscope-256x256-l0 [threads={threads}]: B x H = 10,240, D = 64" in md
