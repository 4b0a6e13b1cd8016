"""Tables and plots from a results CSV: `render(csv_path)` writes ``<stem>.md`` and
``<stem>-{time,speedup,bandwidth}-<dtype>.png``, no bandwidth for rows of no bytes (benchmarks/plot_results.py,
benchmarks/NOTES.md). Rows group by shape and `setup`; peers are compared with the first timed implementation of
ours (peers.TIMED_OURS) that ran in the group, at every N of it.
"""

from __future__ import annotations

import math
import sys
import textwrap
import zlib
from pathlib import Path

from .. import _env
from . import shapes
from .e2e import VARIANTS as UNET_IMPLS
from .measure import BUSY, BUSY_SPREAD, BUSY_WAITED, NOT_RUN, read_csv
from .peers import BACKWARD_IMPLS, CHECKED, FLOOR_LABELS, INTERPRETER, OURS, PEERS, TIMED_OURS

COPY_IMPL = "device_copy"
# Each plot's metric: (the figure's title, the y axis's label).
METRICS = {
    "time": ("median time per call (bars: p20 to p80)", "median ms per call (log scale)"),
    "speedup": ("peer time / time of ours (> 1: ours faster)", "peer time / ours (log; > 1: ours faster)"),
    "bandwidth": ("achieved bandwidth, Q, K, V read and O written once", "GB/s (Q, K, V read + O written)"),
}
BUSY_LABEL = f"{BUSY} (p80/p20 > {BUSY_SPREAD:g} or CPU waits > {BUSY_WAITED:.0%} of run time): not to be trusted"


def _impls(by_n) -> list:
    """The implementations with a row in a {n: {impl: row}} group, in table order."""
    order = [INTERPRETER, *PEERS]
    return sorted({i for cell in by_n.values() for i in cell}, key=lambda i: (order.index(i) if i in order else 99, i))


def _ok(row) -> bool:
    return row is not None and row["status"] == "ok"


def _ran(impl, by_n) -> bool:
    """Whether `impl` has a successful row in the group."""
    return any(_ok(cell.get(impl)) for cell in by_n.values())


def correctness_only(row) -> bool:
    """A correctness run: checked, not timed."""
    return row["status"].startswith(CHECKED)


def busy(row) -> bool:
    return _ok(row) and row["flag"] == BUSY


def latest(rows) -> dict:
    """The last row of each (impl, batch, heads, n, d, dtype, setup): a re-run replaces an earlier one."""
    return {tuple(r[c] for c in ("impl", "batch", "heads", "n", "d", "dtype", "setup")): r for r in rows}


def copy_gbps(rows):
    vals = [float(r["gbps"]) for r in rows if r["impl"] == COPY_IMPL and _ok(r) and r["gbps"]]
    return vals[-1] if vals else None


def _groups(rows, unet: bool):
    """{dtype: {(batch, heads, d, setup): {n: {impl: row}}}} for kernel rows (unet=False) or UNet rows."""
    out = {}
    for r in latest(rows).values():
        if r["impl"] != COPY_IMPL and (r["impl"] in UNET_IMPLS) == unet:
            key = (int(r["batch"]), int(r["heads"]), int(r["d"]), r["setup"])
            out.setdefault(r["dtype"], {}).setdefault(key, {}).setdefault(int(r["n"]), {})[r["impl"]] = r
    return out


def _label(key, unet: bool = False) -> str:
    """A group's name: the registered shape (or B, H, D) and its setup."""
    batch, heads, d, setup = key
    return shapes.shape_label(batch, heads, d, unet) + (f" [{setup}]" if setup else "")


def _reference(by_n):
    """The implementation of ours a group's peers are compared with: the first of TIMED_OURS that ran in it. One per
    group: at an N where it failed the peers get no ratio, not one against another of ours."""
    return next((name for name in TIMED_OURS if _ran(name, by_n)), None)


def _ours(cell: dict, reference):
    """The row of the group's `reference` (_reference) in a cell, where it ran."""
    row = cell.get(reference)
    return row if _ok(row) else None


def our_failures(rows) -> list:
    """The latest rows of ours (OURS) whose status is an error (`unsupported` and `oom` are the machine's)."""
    return [r for r in latest(rows).values() if r["impl"] in OURS and r["status"].startswith("error")]


def _legend(impl, by_n) -> str:
    """An implementation's name in a plot; the floor peer says which class it is."""
    ran = {cell[impl]["backend"] for cell in by_n.values() if impl in cell} & set(FLOOR_LABELS)
    return f"{impl}: {', '.join(FLOOR_LABELS[b] for b in sorted(ran))}" if impl == "sdpa_floor" and ran else impl


class _Notes(dict):
    """Numbered reasons for non-ok cells ({"impl: status": number}), listed under each table."""

    def mark(self, impl, status) -> str:
        if status == "oom":
            return "oom"
        word, _, why = status.partition(": ")
        number = self.setdefault(f"{impl}: {status}", len(self) + 1)
        return f"{word} [{number}]" if why else word

    def lines(self):
        return [f"- [{i}] {text}" for text, i in self.items()]


def _ms(row) -> float:
    return float(row["median_ms"])


def _g(x) -> str:
    """Three significant digits, without exponents for values >= 100 ("" for an empty CSV field)."""
    if x == "":
        return ""
    x = float(x)
    return f"{x:,.0f}" if abs(x) >= 100 else f"{x:.3g}"


def _time_cell(notes: _Notes, impl: str, row, relative=None) -> str:
    """A time column's cell: empty, a not-timed run's note mark, or the median ms [(relative(ms))] [**busy**]."""
    if row is None:
        return ""
    if not _ok(row):
        return notes.mark(impl, row["status"])
    ms = _ms(row)
    return (f"{_g(ms)} ({relative(ms)})" if relative else _g(ms)) + (f" **{BUSY}**" if busy(row) else "")


def _table(head, body) -> list:
    """The lines of a markdown table with right-aligned columns."""
    return ["| " + " | ".join(cells) + " |" for cells in (head, ["---:"] * len(head), *body)]


def _kernel_table(by_n, notes: _Notes) -> list:
    """One group's table: ours that ran get metric columns, every other implementation a time (ratio) column."""
    impls = _impls(by_n)
    ours_names = [i for i in impls if i in TIMED_OURS and _ran(i, by_n)]
    others = [i for i in impls if i not in ours_names]
    head = ["N", *(c for name in ours_names for c in (f"{name} ms", "GB/s", "% copy BW", "TFLOP/s")), *others]
    body = []
    reference = _reference(by_n)
    for n, cell in sorted(by_n.items()):
        line = [str(n)]
        for name in ours_names:
            r = cell.get(name)
            line.append(_time_cell(notes, name, r))
            line += [_g(r["gbps"]), _g(r["pct_peak_bw"]) + "%" * bool(r["pct_peak_bw"]), _g(r["tflops"])] \
                if _ok(r) else ["", "", ""]
        ours = _ours(cell, reference)
        ratio = ours and (lambda ms: f"{_g(ms / _ms(ours))}x")
        body.append(line + [_time_cell(notes, name, cell.get(name), None if name in OURS else ratio)
                            for name in others])
    return _table(head, body)


def markdown(rows, title: str) -> str:
    meta = [r for r in rows if r["impl"] != COPY_IMPL] or rows
    devices = sorted({r["device"] for r in rows})
    peak = copy_gbps(rows)
    seen = lambda column: ", ".join(sorted({r[column] for r in meta}))  # noqa: E731
    out = [f"# {title}", "",
           f"Device: {', '.join(devices)}. torch {seen('torch')}, triton {seen('triton')}, commit {seen('commit')}, "
           f"{min(r['timestamp'] for r in rows)} to {max(r['timestamp'] for r in rows)}.", ""]
    if any(d.startswith("cpu") for d in devices):
        impls = {r["impl"] for r in meta}
        interpreted = sorted({r["impl"] for r in meta if r["backend"].startswith("triton") and r["median_ms"]})
        out += [" ".join(["**CPU run.** Times are CPU wall clock (perf_counter)."]
                         + ["Ours is `vstar_auto`: `tar_attention` as a user calls it (backend=\"auto\"), which on "
                            "CPU tensors runs the PyTorch path."] * ("vstar_auto" in impls)
                         + [f"`{INTERPRETER}` is the Triton kernel run by the Triton interpreter to check it against "
                            "float64: a correctness run, not timed and not compared."] * (INTERPRETER in impls)
                         + [f"{', '.join(f'`{i}`' for i in interpreted)}: Triton kernels timed in the Triton "
                            "interpreter (a check that they run, at the interpreter's speed)."] * bool(interpreted)
                         + ["These numbers say nothing about GPU performance."]), ""]
    else:
        out += ["Times: `triton.testing.do_bench` median (L2 flushed between calls, inputs rotated); "
                "calls over 100 ms: median of 3 CUDA-event timings.", ""]
    ran = sorted({(r["impl"], r["backend"]) for r in meta if r["backend"] and r["impl"] not in UNET_IMPLS
                  and not correctness_only(r)})
    if ran:
        out += ["Backends that ran: " + ", ".join(
            f"`{impl}` ran `{b}`" + (f" ({FLOOR_LABELS[b]})" if impl == "sdpa_floor" else "") for impl, b in ran)
            + ".", ""]
    flagged = [r for r in latest(rows).values() if busy(r)]
    if flagged:
        out += [f"**{BUSY}**: {len(flagged)} cell(s) whose p80/p20 spread exceeds {BUSY_SPREAD:g}, or, on a CPU, whose "
                f"threads waited for a CPU over {BUSY_WAITED:.0%} of the time they ran: the machine was "
                "busy while they were timed, or the calls were too short to time steadily (calls of 30 ms or more "
                "on an idle machine stay below 1.05), so their times and ratios are not to be trusted; measure "
                "them again on an idle machine, at a size that takes milliseconds.", ""]
    out += [f"Measured copy bandwidth (read + write): {peak:,.0f} GB/s." if peak else
            "No copy-bandwidth row in this file.", "",
            "Peer cells: median ms (how many times slower than ours: > 1 means ours is faster). "
            "GB/s counts Q, K, V read once and O written once; TFLOP/s counts the two matmuls. "
            "A group's [setup] is what else defines its calls (threads, TAR options, frame ids).", ""]
    for dtype, groups in sorted(_groups(rows, unet=False).items()):
        out += [f"## {dtype}", ""]
        notes = _Notes()
        for key, by_n in groups.items():
            out += [f"### {_label(key)}: B x H = {key[0] * key[1]:,}, D = {key[2]}", ""]
            out += _kernel_table(by_n, notes) + [""]
        out += notes.lines() + [""]
    unet = _groups(rows, unet=True)
    if unet:
        out += ["## End-to-end: one UNet3DConditionModel forward", "",
                "Random weights; stock processors vs `apply_tar` (preset 64D1) with each backend. "
                "Overhead: time over `unet_stock`. Peak MiB: allocated during one forward beyond what "
                "was allocated before it.", ""]
        notes = _Notes()
        body = []
        for dtype, groups in sorted(unet.items()):
            for key, by_n in groups.items():
                for n, cell in sorted(by_n.items()):
                    stock = cell.get("unet_stock")
                    overhead = _ok(stock) and (lambda ms, s=_ms(stock): f"{100 * (ms / s - 1):+.1f}%")
                    body.append([_label(key, unet=True), dtype, str(n)]
                                + [_time_cell(notes, name, cell.get(name), name != "unet_stock" and overhead)
                                   for name in UNET_IMPLS]
                                + [f"{float(r['peak_mem_mb']):,.0f}" if r and r["peak_mem_mb"] else ""
                                   for r in map(cell.get, UNET_IMPLS)])
        head = ["model", "dtype", "frames", *(f"{i} ms" for i in UNET_IMPLS), *(f"{i} peak MiB" for i in UNET_IMPLS)]
        out += _table(head, body) + [""] + notes.lines() + [""]
    return "\n".join(out).rstrip() + "\n"


# what the plots draw: the sweep's peers (vstar_auto takes vstar_triton's color: a sweep draws one of them), the
# backward's and the UNet's
PLOTTED = (*(name for name in PEERS if name != "vstar_auto"), *BACKWARD_IMPLS, *UNET_IMPLS)


def _color(impl: str):
    """A color of its own for each of PLOTTED (tab10's, then Dark2's); for any other (an older file's names) one of
    tab20b's, by its name's hash: none of those, nor gray."""
    import matplotlib

    names = list(dict.fromkeys(PLOTTED))
    colors = [*matplotlib.colormaps["tab10"].colors, *matplotlib.colormaps["Dark2"].colors]
    impl = "vstar_triton" if impl == "vstar_auto" else impl
    if impl in names:
        return colors[names.index(impl)]
    others = matplotlib.colormaps["tab20b"].colors
    return others[zlib.crc32(impl.encode()) % len(others)]


def draw_plots(rows, stem: Path) -> list:
    """Per dtype: time vs N, speed-up of ours vs N, achieved bandwidth vs N against the copy bandwidth (where a row
    has bytes: a backward row has none)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    peak = copy_gbps(rows)
    device = rows[0]["device"]
    written = []
    for dtype, groups in sorted(_groups(rows, unet=False).items()):
        cols = min(3, len(groups))
        nrows = math.ceil(len(groups) / cols)
        ours = [i for i in TIMED_OURS if any(_ran(i, by_n) for by_n in groups.values())]
        note = f"ours: {', '.join(ours) or 'none timed'}"
        if device.startswith("cpu"):
            note = f"CPU wall clock; {note}" + " (tar_attention's default CPU path)" * bool(ours) + ". Not GPU speed"
        for metric, (title, ylabel) in METRICS.items():
            if metric == "bandwidth" and not any(r["gbps"] for r in rows):  # backward rows count no bytes
                continue
            height = 3.6 * nrows + 1.8
            fig, axes = plt.subplots(nrows, cols, figsize=(max(9, 5 * cols), height), squeeze=False)
            for ax in axes.flat[len(groups):]:
                ax.set_visible(False)
            for ax, (key, by_n) in zip(axes.flat, groups.items()):
                if not _plot_metric(ax, metric, by_n, peak):
                    ax.text(0.5, 0.5, _no_data(metric, by_n), transform=ax.transAxes, ha="center", va="center",
                            color="firebrick", fontsize=10, wrap=True)
                text = f"{_label(key)} (B x H {key[0] * key[1]:,}, D {key[2]})"
                checked = [i for i in _impls(by_n) if any(correctness_only(c[i]) for c in by_n.values() if i in c)]
                never = [i for i in _impls(by_n) if i not in checked and not _ran(i, by_n)]
                unrun = [n for n, cell in sorted(by_n.items()) if all(r["status"].startswith(NOT_RUN)
                                                                       for r in cell.values())]
                for why, impls in (("correctness run only, not timed", checked),
                                   ("not plotted, no successful run", never),
                                   ("N not run (the sweep's time budget used up)", [str(n) for n in unrun])):
                    if impls:
                        text += "\n" + textwrap.fill(f"{why}: {', '.join(impls)}", 70)
                ax.set_title(text, fontsize=9)
                ax.set_xscale("log", base=2)
                shown = [n for n in sorted(by_n) if n not in unrun] or sorted(by_n)
                ax.set_xlim(min(shown) / 1.25, max(shown) * 1.25)
                ax.set_xticks(shown, [str(n) for n in shown])
                ax.minorticks_off()
                ax.set(xlabel="N (frames)", ylabel=ylabel)
                ax.grid(True, alpha=0.3)
            handles = {}
            for ax in axes.flat:
                for h, lab in zip(*ax.get_legend_handles_labels()):
                    handles.setdefault(lab, h)
            fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(3, max(1, len(handles))),
                       fontsize=8, frameon=False)
            fig.suptitle(f"{stem.name}, {dtype}: {title}\n{device}\n{note}", fontsize=10)
            legend_in = 0.15 + 0.22 * math.ceil(len(handles) / 3)
            fig.tight_layout(rect=(0, legend_in / height, 1, 1))
            path = stem.parent / f"{stem.name}-{metric}-{dtype}.png"
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def _no_data(metric, by_n) -> str:
    """Why a panel has no line: which runs failed (the table's notes say how)."""
    see = "see the notes under the markdown table"
    checked = [i for i in _impls(by_n) if any(i in cell and correctness_only(cell[i]) for cell in by_n.values())]
    if metric != "speedup":
        if checked:  # (the title names them)
            return f"no data: no implementation was timed successfully\n({', '.join(checked)} only checked; {see})"
        return f"no data: no implementation ran successfully\n({see})"
    if any(_ran(i, by_n) for i in TIMED_OURS):
        return f"no data: no peer succeeded at an N where ours did\n({see})"
    if any(i in OURS for i in checked) and not any(i in TIMED_OURS for i in _impls(by_n)):  # none of ours failed
        return f"no data: ours was checked, not timed\n({see})"
    who = ", ".join(i for i in _impls(by_n) if i in OURS) or "no implementation of ours was run"
    return f"no data: no successful run of ours\n({who}; {see})"


def _plot_metric(ax, metric, by_n, peak) -> int:
    """Draw one panel (busy points ringed); returns how many lines it drew."""
    drawn = 0
    busy_xy = []
    reference = _reference(by_n)
    for impl in _impls(by_n):
        xs, ys, lo, hi = [], [], [], []
        for n, cell in sorted(by_n.items()):
            r, ours = cell.get(impl), _ours(cell, reference)
            if not _ok(r):
                continue
            if metric == "time":
                y = _ms(r)
                lo.append(y - float(r["p20_ms"]))
                hi.append(float(r["p80_ms"]) - y)
            elif metric == "speedup":
                if impl in OURS or ours is None:
                    continue
                y = _ms(r) / _ms(ours)
            elif r["gbps"]:
                y = float(r["gbps"])
            else:
                continue
            xs.append(n)
            ys.append(y)
            if busy(r) or (metric == "speedup" and busy(ours)):
                busy_xy.append((n, y))
        if xs:
            ax.plot(xs, ys, marker="o", markersize=3, label=_legend(impl, by_n), color=_color(impl))
            if metric == "time":
                ax.errorbar(xs, ys, yerr=(lo, hi), fmt="none", capsize=2, ecolor=_color(impl))
            drawn += 1
    if busy_xy:
        ax.plot(*zip(*busy_xy), linestyle="none", marker="o", markersize=10, markerfacecolor="none",
                markeredgecolor="black", markeredgewidth=1.5, label=BUSY_LABEL)
    if metric == "bandwidth":
        if peak:
            ax.axhline(peak, color="black", ls="--", lw=1, label="measured copy bandwidth")
        return drawn
    ax.set_yscale("log")
    if metric == "speedup":
        ax.axhline(1.0, color="black", lw=0.8)
    _log_ticks(ax)
    return drawn


def _log_ticks(ax) -> None:
    """Plain-number labels on a log axis: at 1, 2, 3, 5 per decade over at most two decades (so that no
    labelled value lies more than a factor 2 below the top), every digit in one."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    low, high = ax.get_ylim()
    if high <= 100 * low:
        ax.yaxis.set_major_locator(LogLocator(base=10, subs=range(1, 10) if high <= 10 * low else (1, 2, 3, 5)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda y, _: f"{y:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def render(csv_path, plots: bool = True, out_dir=None) -> list:
    """Write one results CSV's markdown (and plots) into `out_dir` (default: beside it); returns the paths.
    ValueError when its columns are not the harness's."""
    csv_path = Path(csv_path)
    rows = read_csv(csv_path)
    if not rows:
        return []
    stem = Path(out_dir or csv_path.parent) / csv_path.stem
    md = stem.with_suffix(".md")
    md.write_text(markdown(rows, f"TAR benchmark: {csv_path.name}"), encoding="utf-8")
    written = [md]
    if plots:
        try:
            import matplotlib  # noqa: F401
        except ImportError as exc:
            print(f"plots skipped: matplotlib is not importable ({exc}); install it with "
                  f"{_env.install_hint('bench')}", file=sys.stderr)
            return written
        written += draw_plots(rows, stem)
    return written
