"""`tools.perf model`: a roofline model of one forward call on an H100 or H200, without a GPU.

Every number it writes is a model, not a measurement. Per kernel launch the modeled time is

    max(bytes / HBM bandwidth, MMA FLOPs / (ETA * peak tensor FLOP/s),
        warp-instructions / issue rate, MUFU warp-instructions * 32 / MUFU rate) + LAUNCH_S

with the compute terms (MMA, issue, MUFU) stretched by wave quantization: a launch of P programs
with c CTAs resident per SM runs ceil(P / (SMs * c)) rounds, so the busiest SM does
ceil(P / (SMs c)) * SMs c / P times the average share. What goes in:

* ours (`vstar_triton` at the Gaussian's sigma of OURS_SIGMA, `vstar_triton_delta`): the one launch
  the call makes, recorded on meta tensors of the call's own shape and compiled for sm_90 as the JIT
  specializes it (`roofline.ours_launch`, `roofline.compiled`: the JIT specializes integers on
  divisibility by 16, so the modeled N, heads and head dim are compiled, not a stand-in length);
  bytes as `tools.perf traffic` counts them (packed: Q, K, V read and O written once,
  vstar_kernels.bench.measure.ideal_cost; tiled: traffic.tiled_bytes, the one-pass band of the row-max Gaussian or the
  two-pass form of a custom delta), MMA FLOPs as issued (whole tiles at the head dim's chunks, the packed
  SEG x SEG products of every sequence slot), warp-instructions and MUFU: tiled, each loop's per
  score element (`roofline.tiled_loops`) times the score elements it computes (`tile_counts`: the
  kernel's tile ranges around the band), plus each program's instructions outside the loops
  (prologue, the code between the loops, epilogue: static.outside_loops); packed, the whole
  kernel per program. The autotuner's choice is modeled as the fastest config: tiled, of every
  config the sm_90 pruning keeps; packed, of the first and the last pruned.
* FlashAttention-3 (`fa3`): no compiled code of it here; whole tiles of its own geometry
  (roofline.FA3_TILES), their MMA at the dense peak plus the exposed share of their exponentials'
  MUFU time, fitted on its published H100 bars (`calibrate_fa3`), waves of one CTA per SM.
* FlashAttention-2 class (`flash`): the plain-attention baseline (tools/perf/baseline.py, the
  structure of Triton's fused-attention tutorial) compiled for sm_90 at the call's shape in
  FlashAttention-2-like tiles (CALIBRATION_TILES), its loop plus each program's instructions
  outside it, the faster tile; `sdpa_plain` is modeled by it.
* eager peers: their aten ops on meta tensors under a TorchDispatchMode; each op's bytes are its
  input plus output tensor bytes (views and allocations are free), matmul FLOPs 2 M N K; each op
  is memory- or FLOP-bound on its own, plus LAUNCH_S. SDPA with a mask (`sdpa_bias`) is one fused
  kernel on a GPU: the flash model plus reading the mask.
* calibration: the flash model at the published FlashAttention-2 H100 points (PUBLISHED_FA2);
  ETA, the MMA efficiency of the Triton kernels and eager ops, minimizes the worst |log ratio|
  over those points; fa3's exposed share the same over PUBLISHED_FA3; the unfitted model (ETA = 1)
  is reported beside it, and the second anchor, the baseline in the configs of Triton's tutorial
  against the tutorial's measured throughput (`tutorial_anchor`).

With --dit (`dit_main`): the video DiT self-attention shapes of DIT_SHAPES instead, ours with frame
ids (the HAS_FRAMES kernel compiled at each shape's own N, `frames_loop_costs`), fa3, flash,
flex_two_pass and the eager peers that materialize the bias, whose rows say "does not fit" where the
peak counted in their meta trace exceeds the GPU's memory (tools/perf/model.md, "DiT shapes (model)").

See tools/perf/model.md ("Roofline model") for the sources of every constant.
"""

from __future__ import annotations

import csv
import itertools
import os
import sys
import textwrap
import time
from pathlib import Path

import torch
from vstar_kernels.bench import shapes

from .eager import eager
from .roofline import (
    GPUS,
    LAUNCH_S,
    PANEL_IMAGES,
    TUTORIAL_SOURCE,
    Estimate,
    calibrate,
    calibrate_fa3,
    configs_compiled,
    fa3,
    flash,
    ours,
    quick_title,
    results_dir,
    tutorial_anchor,
)

# --------------------------------------------------------------------------- the sweep

EAGER = ("reference_eager", "sdpa_bias")
NOT_MODELED = ("reference_compiled", "vstar_cuda", "xformers_bias")
# The Gaussian's sigma of each row of ours (paper presets, tar_config.PRESETS: 64D1 at level 0, the
# default; 64D8, the widest band of the presets at sigma <= 8); the delta row has no sigma.
OURS_SIGMA = {"vstar_triton": 1.0, "vstar_triton_sigma8": 8.0}
IMPLS = ("vstar_triton", "vstar_triton_sigma8", "vstar_triton_delta", "fa3", "flash", "sdpa_plain",
         "flex_two_pass") + EAGER + NOT_MODELED
OURS = ("vstar_triton", "vstar_triton_sigma8", "vstar_triton_delta")
# The kernel shapes' lengths: the harness's (vstar_kernels.bench.shapes.KERNEL_N) and 4096, the longest
# length of the targets against FlashAttention-3.
MODEL_N = tuple(shapes.KERNEL_N) + (4096,)
COLUMNS = ("estimate", "gpu", "shape", "batch_heads", "d", "n", "dtype", "impl", "sigma", "status", "config", "bound",
           "model_time_ms", "model_bytes", "model_mma_flops", "model_launches", "model_ours_over_fa3",
           "model_ours_over_fa3_eta1", "model_ours_over_flash", "model_reference_eager_over_ours")


def not_modeled(name: str) -> str:
    """The status of a peer the model has no row for, and why."""
    from vstar_kernels.bench.peers import PEERS

    if name == "reference_compiled":
        return "not modeled: a torch.compile graph; Inductor's fusion is not what the eager op count sees"
    if name == "vstar_cuda":
        return ("not modeled: the optional CUDA C++ extension has no compiled-code statistics "
                "(tools.perf static compiles the Triton kernels)")
    why = PEERS[name].why_not(torch.device("cpu"), torch.float16)
    return f"not modeled: {why}" if why else "not modeled: its fused kernel has no model here"


def sweep(gpu_key: str, names, ns, eta: float, exposed: float, progress=print) -> list:
    """Rows of the model for every impl on each named kernel shape x N (fp16; bf16 is the same). Our rows
    carry ours / FlashAttention-3 (`model_ours_over_fa3`), the same with ours at ETA = 1 (the unfitted MMA
    rate: `model_ours_over_fa3_eta1`, the other bound; tools/perf/model.md, the tutorial anchor) and ours /
    flash (the FA2-class loop at the same ETA)."""
    from vstar_kernels.bench.peers import PEERS

    gpu = GPUS[gpu_key]
    reasons = {name: not_modeled(name) for name in NOT_MODELED}
    rows = []
    for name in names:
        s = shapes.SHAPES[name]
        bh = s.batch * s.heads
        for n in ns:
            call = (s.batch, s.heads, n, s.head_dim, gpu)
            est = {impl: ours(*call, eta, sigma) for impl, sigma in OURS_SIGMA.items()}
            est.update(vstar_triton_delta=ours(*call, eta, delta=True), fa3=fa3(*call, exposed),
                       flash=flash(*call, eta))
            eta1 = {impl: ours(*call, 1.0, sigma) for impl, sigma in OURS_SIGMA.items()}
            eta1["vstar_triton_delta"] = ours(*call, 1.0, delta=True)
            est["sdpa_plain"] = est["flash"]
            two = est["flash"]
            est["flex_two_pass"] = Estimate(2 * two.bytes, 2 * two.mma_flops, 2 * two.instr, 2 * two.mufu, 2,
                                            2 * two.seconds, two.bound, "2 x " + two.config + " (lower bound)")
            for peer in EAGER:
                est[peer] = eager(PEERS[peer], s.batch, s.heads, n, s.head_dim, gpu, eta)
            base = dict(estimate="model", gpu=gpu_key, shape=name, batch_heads=bh, d=s.head_dim, n=n, dtype="fp16")
            over = {impl: est[impl].seconds / est["fa3"].seconds for impl in OURS_SIGMA}
            eager_s = est["reference_eager"].seconds
            for impl in IMPLS:
                if impl in est:
                    e = est[impl]
                    ours_row = impl in OURS
                    rows.append({**base, "impl": impl, "sigma": OURS_SIGMA.get(impl, ""), "status": "ok",
                                 "config": e.config, "bound": e.bound,
                                 "model_time_ms": round(e.seconds * 1e3, 6), "model_bytes": int(e.bytes),
                                 "model_mma_flops": int(e.mma_flops), "model_launches": e.launches,
                                 "model_ours_over_fa3": round(e.seconds / est["fa3"].seconds, 3) if ours_row else "",
                                 "model_ours_over_fa3_eta1": round(eta1[impl].seconds / est["fa3"].seconds, 3)
                                 if ours_row else "",
                                 "model_ours_over_flash": round(e.seconds / est["flash"].seconds, 3)
                                 if ours_row else "",
                                 "model_reference_eager_over_ours": round(eager_s / e.seconds, 2)
                                 if impl in OURS_SIGMA else ""})
                else:
                    rows.append({**base, "impl": impl, "status": reasons[impl]})
            progress(f"  {gpu_key} {name} N={n}: ours {est['vstar_triton'].seconds * 1e3:.4f} ms "
                     f"({est['vstar_triton'].bound}), ours/fa3 {over['vstar_triton']:.2f} (sigma 8: "
                     f"{over['vstar_triton_sigma8']:.2f}), ours/flash "
                     f"{est['vstar_triton'].seconds / est['flash'].seconds:.2f}, reference_eager/ours "
                     f"{eager_s / est['vstar_triton'].seconds:.1f}x (model)")
    return rows


def assumptions(gpu_key: str, eta: float, exposed: float) -> list:
    """The lines printed and written beside every table."""
    g = GPUS[gpu_key]
    return [
        f"MODEL, not a measurement. {g.name}: HBM {g.hbm_bytes_s / 1e12:.2f} TB/s, dense fp16/bf16 tensor "
        f"{g.tensor_flop_s / 1e12:.1f} TFLOP/s, fp32 {g.fp32_flop_s / 1e12:.1f} TFLOP/s, {g.sms} SMs at "
        f"{g.clock_hz / 1e9:.2f} GHz (the clock behind the tensor peak: 4096 FLOP/clk/SM), {g.schedulers} warp "
        f"schedulers x 1 warp-instruction/clk per SM, MUFU {g.mufu_per_clk} results/clk/SM.",
        "Per kernel launch (our Triton kernels, flash): max(bytes / HBM, MMA FLOPs / (ETA x tensor peak), "
        "warp-instructions / issue rate, MUFU x 32 / MUFU rate) + launch gap; compute terms stretched by wave "
        "quantization over the SMs (CTAs/SM from the compiled kernel's occupancy). Warp-instructions: each loop's "
        "per-score count times the scores it computes, plus each program's instructions outside the loops "
        "(prologue, code between the loops, epilogue).",
        f"ETA = {eta:.3f}: the MMA efficiency fitted on published FlashAttention-2 H100 forward throughput "
        "(calibration rows); applied to every Triton kernel's and eager op's tensor-core MMA, ours and peers alike. "
        "model_ours_over_fa3_eta1: ours at ETA = 1 (unfitted) over fa3: the model lands within 11% of Triton's "
        "fused-attention tutorial unfitted and up to 28% below it at ETA (the tutorial anchor), so the two columns "
        "bound ours / FlashAttention-3.",
        f"fa3 = FlashAttention-3 (no compiled code here): whole tiles of its geometry (hopper/tile_size.h: 192x192 "
        f"up to head dim 64, 192x144 to 96, 128x176 to 128), MMA at the dense peak plus {exposed:.3f} of the "
        "exponentials' MUFU time (the share not hidden behind the MMA, fitted on its published bars), waves of one "
        "CTA per SM; Q, O once, K, V once per query block (per pair of blocks in a 2-CTA cluster from head dim 128).",
        f"Launch gap {LAUNCH_S * 1e6:.0f} us per kernel (assumed, not measured); ours: 1 launch (row max).",
        "Every Triton kernel (ours, flash) is compiled for sm_90 as this very call specializes it (its N, head dim, "
        "heads and strides: the JIT specializes integers on divisibility by 16), "
        f"{configs_compiled()} (packed: the first and last), the fastest.",
        "Ours, packed (N <= 128; 64 above head dim 128): Q, K, V, O once; MMA as issued: one SEG x SEG Q K^T and "
        "P V per sequence slot (SEG = N padded to a power of two >= 16), empty slots of the last program included; "
        "the whole kernel's instructions/MUFU per program.",
        "Ours, tiled, row max of the Gaussian (one pass; sigma column: 1 = preset 64D1, 8 = 64D8): bytes "
        "traffic.tiled_bytes over the band of ops/launch.band_width (Q, O once; K, V once per query block; K "
        "once more over the band tiles); per query block, off-band full tiles run the plain loops, the off-band "
        "partial last tile the masked plain loops, band tiles the Q K^T row-max walk and the biased softmax; "
        "each loop's instructions/MUFU per score element from the compiled kernel's own loop (loop 1..6 = left "
        "full, left masked, right full, right masked, walk, biased: ops/tar_fwd.py source order).",
        "Ours, custom delta (two passes in one kernel): every tile walked (loop 1) and biased (loop 2), + the "
        "delta's N^2 entries once.",
        "flash = the plain-attention baseline (tools/perf/baseline.py, the tutorial's structure) compiled for sm_90 "
        "in 128x64 and 128x128 tiles, the faster; sdpa_plain is modeled by it; flex_two_pass as two such loops "
        "(a lower bound).",
        "vstar_triton_delta: ours with a custom (B, H, N, N) delta in q's dtype (no eager peer takes a delta); the "
        "global row max is not modeled.",
        "Eager peers: aten ops on meta tensors, each op max(in+out bytes / HBM, matmul FLOPs / peak) + launch gap; "
        "fp32 matmuls on the fp32 pipe (no TF32); SDPA with a mask = flash + the mask read.",
        "fp16 rows; bf16 is the same model (same bytes, same peak, same compiled loops).",
    ]


# --------------------------------------------------------------------------- output

def write_csv(rows: list, path: Path, calibration: list) -> None:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for r in rows:
            w.writerow([r.get(c, "") for c in COLUMNS])
    cal = path.with_name(path.stem + "-calibration.csv")
    if calibration:
        with open(cal, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["estimate", *calibration[0]])
            w.writeheader()
            w.writerows({"estimate": "model vs published", **r} for r in calibration)


def calibration_lines(calibration: list) -> list:
    """The calibration tables: each peer's rows (fit, check, anchor) against its published value."""
    titles = {("FlashAttention-2", "fit"): "the flash model vs published FlashAttention-2 (fits ETA)",
              ("FlashAttention-3", "fit"): "fa3 vs published FlashAttention-3 (fits its exposed exponential share)",
              ("FlashAttention-3", "check"): "fa3 vs FlashAttention-3 where it was not fitted (check)",
              ("Triton tutorial", "anchor"): "the baseline in Triton's fused-attention tutorial's structure and "
                                             "configs vs the tutorial's measured forward (anchor, at ETA)"}
    lines = []
    for (peer, role), title in titles.items():
        rows = [c for c in calibration if (c["peer"], c["role"]) == (peer, role)]
        lines += ["", f"## Calibration: {title}", "", "| D | N | B x H | published TFLOP/s | model TFLOP/s "
                  "| model / published | unfitted model TFLOP/s | unfitted / published | config | source |",
                  "|" + " ---: |" * 8 + " --- | --- |"]
        lines += [f"| {c['d']} | {c['n']} | {c['bh']} | {c['published_tflops']:g} | {c['model_tflops']:.1f} "
                  f"| {c['model_over_published']:.3f} | {c['unfitted_model_tflops']:.1f} "
                  f"| {c['unfitted_over_published']:.3f} | {c['config']} | {_source_label(c['source'])} |"
                  for c in rows]
    lines += ["", "Sources: the FlashAttention-3 paper (arXiv:2407.08608), forward-speed panels, FP16, no causal mask, "
              "batch x N = 16k tokens, hidden 2048 (heads = 2048 / D), bar labels as transcribed at "
              + ", ".join(f"https://subtext.edge.nugit.net/image/{image} (D {d})" for d, image in PANEL_IMAGES.items())
              + f"; {TUTORIAL_SOURCE}. Unfitted: ETA = 1 (FlashAttention-2, the tutorial), nothing of the "
              "exponentials hidden (FlashAttention-3)."]
    return lines


def _source_label(source: str) -> str:
    return "pytorch/benchmark #2391" if source.startswith("pytorch/benchmark") else "FA3 paper, " + (
        "FA2 bar" if "FlashAttention-2 bar" in source else "FA3 bar")


def command(gpu_key: str, args=None, dit: bool = False) -> str:
    """The command that writes this GPU's table, with the --shapes/--n/--quick options the run was given."""
    words = ["python -m tools.perf model"] + ["--dit"] * dit + [f"--gpu {gpu_key}"]
    for option in ("shapes",) + ("n",) * (not dit):  # (--dit takes no --n)
        if getattr(args, option, None):
            words.append(f"--{option} " + " ".join(map(str, getattr(args, option))))
    return " ".join(words + ["--quick"] * bool(getattr(args, "quick", False)))


def markdown(rows: list, gpu_key: str, eta: float, exposed: float, calibration: list, args=None) -> str:
    from vstar_kernels.bench.measure import commit

    lines = [f"# Roofline model of the forward, {GPUS[gpu_key].name} (model, not measured)", "",
             f"`{command(gpu_key, args)}`, commit {commit()}. "
             "Modeled milliseconds per forward call, fp16 (bf16 identical). Assumptions:", ""]
    lines += [f"- {a}" for a in assumptions(gpu_key, eta, exposed)]
    lines += calibration_lines(calibration)
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["n"]), {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
    lines += ["", "## Modeled time per call (ms, model)", "",
              "Ours / FlashAttention-3 (fa3): at ETA, and at ETA = 1 in brackets (the two bounds, see the "
              "assumptions).",
              "", "| shape | B x H | D | N | " + " | ".join(impls) + " | ours / fa3 (sigma 1) | ours / fa3 (sigma 8) "
              "| ours (delta) / fa3 | ours / flash (sigma 1 / 8 / delta) | reference_eager / ours (sigma 1 / 8) "
              "| ours bound (sigma 1) |",
              "| --- | ---: | ---: | ---: |" + " ---: |" * (len(impls) + 5) + " --- |"]
    for (shape, n), cells in by.items():
        o, wide, delta = cells["vstar_triton"], cells["vstar_triton_sigma8"], cells["vstar_triton_delta"]
        fa3_cell = lambda r: f"{r['model_ours_over_fa3']:.2f} ({r['model_ours_over_fa3_eta1']:.2f})"  # noqa: E731
        lines.append(f"| {shape} | {o['batch_heads']:,} | {o['d']} | {n} | "
                     + " | ".join(f"{cells[i]['model_time_ms']:.4g}" for i in impls)
                     + f" | {fa3_cell(o)} | {fa3_cell(wide)} | {fa3_cell(delta)} "
                       f"| {o['model_ours_over_flash']:.2f} / {wide['model_ours_over_flash']:.2f} / "
                       f"{delta['model_ours_over_flash']:.2f} "
                       f"| {o['model_reference_eager_over_ours']:.1f}x / "
                       f"{wide['model_reference_eager_over_ours']:.1f}x "
                       f"| {o['bound']} ({o['config']}) |")
    missing = sorted({(r["impl"], r["status"]) for r in rows if r["status"] != "ok"})
    if missing:
        lines += ["", "Not modeled:", ""] + [f"- {impl}: {status}" for impl, status in missing]
    return "\n".join(lines) + "\n"


def plot(rows: list, gpu_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullLocator

    fig, (left, *ratios) = plt.subplots(1, 3, figsize=(19, 5.5))
    first = rows[0]["shape"]
    ns = sorted({r["n"] for r in rows})
    markers = itertools.cycle("os^Dvx*P")
    for impl in IMPLS:
        pts = [(r["n"], r["model_time_ms"]) for r in rows if r["shape"] == first and r["impl"] == impl
               and r["status"] == "ok"]
        if pts and impl != "sdpa_plain":  # ours' variants dashed: they lie on or near ours
            left.plot(*zip(*pts), marker=next(markers), ls="--" if impl.startswith("vstar_triton_") else "-",
                      label=impl if impl != "flash" else "flash (= sdpa_plain)")
    left.set(xscale="log", yscale="log", xlabel="N (frames)", ylabel="modeled time per call (ms)",
             title=f"{first}: time per call (model)")
    left.set_xticks(ns, [str(n) for n in ns])
    left.xaxis.set_minor_locator(NullLocator())  # the log axis' own labels (2x10^1, ...) would overlap these
    left.legend(fontsize=8)
    for ax, impl, label in zip(ratios, OURS_SIGMA, ("sigma 1 (64D1)", "sigma 8 (64D8)")):
        curves = []  # [(points, shapes)]: shapes within 5% of the first of a line at every N (the ratio follows N
        # and D far more than B x H) drawn as one line, else they hide one another; the table has each
        for shape in dict.fromkeys(r["shape"] for r in rows):
            pts = [(r["n"], r["model_ours_over_fa3"]) for r in rows if r["shape"] == shape and r["impl"] == impl]
            same = [c for c in curves if len(c[0]) == len(pts) and all(
                n == m and abs(a - b) <= 0.05 * abs(b) for (n, a), (m, b) in zip(pts, c[0]))]
            if same:
                same[0][1].append(shape)
            else:
                curves.append((pts, [shape]))
        for index, ((pts, shapes_of), marker) in enumerate(zip(curves, itertools.cycle("os^Dvx*P"))):
            names = ", ".join(shapes_of) + (" (within 5%)" if len(shapes_of) > 1 else "")
            # hollow markers, each line's smaller than the last's: lines that meet still show each
            ax.plot(*zip(*pts), marker=marker, mfc="none", ms=max(4, 11 - 2 * index), lw=max(1, 2.5 - 0.4 * index),
                    label=textwrap.fill(names, 48))
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="target N <= 256: 1.0")
        ax.axhline(1.5, color="grey", lw=0.8, ls=":", label="target N = 512..4096: 1.5")
        ax.set(xscale="log", xlabel="N (frames)", ylabel="ours / FlashAttention-3 (modeled time ratio)",
               title=f"vstar_triton / FlashAttention-3, {label} (model)")
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.xaxis.set_minor_locator(NullLocator())
        ax.legend(fontsize=7)
    fig.suptitle(f"Roofline model, {GPUS[gpu_key].name}, fp16 forward - model, not measured{quick_title()}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def progress_lines(rows: int):
    """The sweeps' `progress`, on stderr (shown at once, even when stdout goes to a file): first what is to come,
    then each row's line numbered i/rows with the seconds since the start."""
    print(f"calibrating on the published FlashAttention bars, then {rows} rows; each compiles its kernels for "
          "sm_90 (seconds each)", file=sys.stderr, flush=True)
    start, done = time.perf_counter(), itertools.count(1)
    return lambda line: print(f"[{next(done)}/{rows}, {time.perf_counter() - start:.0f} s] {line.strip()}",
                              file=sys.stderr, flush=True)


def write_table_and_plot(base: Path, table: str, draw, extra=()) -> None:
    """base.md from `table`, base.png by `draw(path)` (None: no plot); print every file written
    (base.csv, written by the caller, and `extra` among them)."""
    base.with_suffix(".md").write_text(table)
    written = [base.with_suffix(".csv"), base.with_suffix(".md"), *extra]
    if draw is not None:
        draw(base.with_suffix(".png"))
        written.append(base.with_suffix(".png"))
    for p in written:
        print(f"wrote {p}")


def main(args) -> int:
    """`python -m tools.perf model [--gpu h100 h200] [--shapes ...] [--n ...] [--quick] [--out DIR] [--no-plots]`;
    with
    --dit, the DiT rows instead (`dit_main`)."""
    directory = Path(os.path.abspath(args.out)) if args.out else results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    devices = args.gpu or list(GPUS)
    names = [n for n in (args.shapes or shapes.GPU_FULL) if not shapes.is_unet(n)]
    ns = args.n or list(MODEL_N)
    progress = progress_lines(len(devices) * len(names) * len(ns))
    h100 = GPUS["h100"]
    eta, calibration = calibrate(h100)
    exposed, fa3_rows = calibrate_fa3(h100)
    calibration += fa3_rows + tutorial_anchor(h100, eta)
    for c in calibration:
        print(f"calibration ({c['peer']}, {c['role']}, H100): D={c['d']} N={c['n']}: model {c['model_tflops']} vs "
              f"{c['published_tflops']} TFLOP/s = {c['model_over_published']} "
              f"(unfitted {c['unfitted_over_published']})")
    for key in devices:
        rows = sweep(key, names, ns, eta, exposed, progress)
        base = directory / f"model-{key}"
        write_csv(rows, base.with_suffix(".csv"), calibration if key == "h100" else [])
        table = markdown(rows, key, eta, exposed, calibration, args)
        print(table)
        extra = [base.with_name(base.name + "-calibration.csv")] if key == "h100" else []
        write_table_and_plot(base, table, None if args.no_plots else lambda path: plot(rows, key, path), extra)
    return 0
