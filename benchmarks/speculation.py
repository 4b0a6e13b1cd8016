"""The speculative one pass against two passes and the plain-attention floor, at the video DiT shapes and at
forced flag rates (a GPU run; `run_gpu_sweep.sh speculation`).

Real weights decide how many rows the speculative forward flags; none can be loaded where this project is
built, so the data here is planted: every video query row scores one key highest, a key of its own frame or,
for a chosen share of the rows (0, 5, 20, 100%), a key in the middle of a far frame (a key tile no guess
walks). Correctness first: per call, the one pass must equal the two passes bit for bit where the autotuner
picked the same tiles for both (else, their sums in another order, agree within the tolerance table; the
setup's `check=`), or the row says "mismatch" and is not timed. Rows: the harness's CSV schema
(vstar_kernels.bench.measure.COLUMNS), impl vstar_triton_two_pass, vstar_triton_one_pass or sdpa_floor (cuDNN
SDPA on Hopper, FA3-class; flash SDPA elsewhere), setup naming the DiT shape, the planted and the measured flag
rate and the tiles each form ran with (`chosen`: the autotuner's pick on a GPU). On a GPU the launches are also
timed apart (the profiler's kernel records, `kernel_times`): at each rate the one pass's main launch (the guess
walk, the biased loop, the flags), the listing of the flagged rows in row order and the redo launch; at the first
rate the halves of the two-pass form, which max_mode="global" runs as two launches: the walk of every key tile
for the row max (impl vstar_triton_walk) and the biased online softmax with that max known
(vstar_triton_biased_loop; its output is the global-max variant's, so these two rows time the work, not the
row-max call).

--lean (`run_gpu_sweep.sh lean`) times the lean forward (backend="triton-lean", frames from the token index, tensor
descriptors) at each DiT shape beside the two passes and the floor: its two loops over the keys once (their time
does not depend on the flag rate), autotuned (vstar_triton_lean), and restricted to its warp-specialized configs
(vstar_triton_lean_ws) and to the others (vstar_triton_lean_no_ws); its speculative form (one loop, the flagged
rows redone: vstar_triton_lean_one_pass) at each of --rates, on a GPU also its launches timed apart (the lean
kernel, the two listing launches, the redo: LEAN_ONE_PASS_KERNELS). Correctness first: each output must agree
with the two-pass output within the tolerance table (vstar_kernels.bench.check.TOLERANCES), or the row says
"mismatch" and is not timed; a GPU it cannot run on gives the reason as the row's status.

    python3 benchmarks/speculation.py [--out DIR] [--shapes NAME ...] [--rates 0 0.05 0.2 1] [--time-budget-s S]
                                      [--lean]

--smoke runs one tiny layout through the Triton interpreter (TRITON_INTERPRET=1) on the CPU: the same checks,
timed on the CPU, for the tests. Without TRITON_INTERPRET=1 in the environment it runs itself again with it (triton
keeps the mode of its first import, which torch made above), and its rows go where `python -m vstar_kernels bench`
writes its own by default, ./vstar-bench-results in the current folder, unless --out names a folder: never into
benchmarks/results of the checkout, which holds the GPU runs' files.

--plot CSV draws a results file of this script as one picture, `<stem>-flag-rates.png` beside it: per DiT shape,
the one pass and the lean forward's one pass (each with its redo launch hatched) and the two passes at each flag
rate, then the lean forward's two loops, each bar labelled with its time over that of the floor timed in its own
run, that floor a dashed line across the bar (benchmarks/plot_results.py draws it for speculation-*.csv files).
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity

import vstar_kernels as vk
from vstar_kernels import _env, dispatch
from vstar_kernels._problem import make_problem
from vstar_kernels.bench import measure, results_folder, seconds
from vstar_kernels.bench.check import TOLERANCES
from vstar_kernels.bench.harness import dtype_name
from vstar_kernels.bench.peers import default_spec, floor_backend, sdpa_only

RATES = (0.0, 0.05, 0.2, 1.0)
# {kernel: impl} of the launches timed apart (vstar_kernels/ops/tar_fwd.py's kernel names)
ONE_PASS_KERNELS = {"_tar_fwd_tiled_kernel": "vstar_triton_one_pass_main",
                    "_tar_fwd_list_kernel": "vstar_triton_one_pass_listing",
                    "_tar_fwd_redo_kernel": "vstar_triton_one_pass_redo"}
GLOBAL_MAX_KERNELS = {"_tar_fwd_row_max_kernel": "vstar_triton_walk",
                      "_tar_fwd_tiled_kernel": "vstar_triton_biased_loop"}
# and the lean forward's speculative form's (ops/tar_fwd_lean.py, ops/tar_fwd.py)
LEAN_ONE_PASS_KERNELS = {"_tar_fwd_lean_kernel": "vstar_triton_lean_one_pass_main",
                         "_tar_fwd_block_list_kernel": "vstar_triton_lean_one_pass_listing_blocks",
                         "_tar_fwd_list_kernel": "vstar_triton_lean_one_pass_listing",
                         "_tar_fwd_redo_kernel": "vstar_triton_lean_one_pass_redo"}


def kernel_times(fn, kernels, activity=ProfilerActivity.CUDA, reps: int = 20) -> dict:
    """{name: Timing} of each named kernel's own time per call of `fn` (after a warm call), from the profiler's
    records of `activity` (CUDA: the device's kernel records; CPU: operator records, for the tests). A name not
    recorded exactly once per call raises ValueError: a launch that did not run, or ran twice, has no time."""
    cuda = activity == ProfilerActivity.CUDA
    device_type = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    fn()
    if cuda:
        torch.cuda.synchronize()
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(reps):
            fn()
        if cuda:
            torch.cuda.synchronize()
    samples = {name: [] for name in kernels}
    for event in prof.events():
        if event.device_type == device_type and event.name in samples:
            samples[event.name].append(event.time_range.elapsed_us() / 1e3)
    odd = {name: len(times) for name, times in samples.items() if len(times) != reps}
    if odd:
        raise ValueError(f"kernels: recorded {odd} times in {reps} calls, expected once per call")
    return {name: measure.quantiles(times) for name, times in samples.items()}


def planted(frames: torch.Tensor, heads: int, d: int, rate: float, device, dtype, seed: int = 0) -> tuple:
    """q, k, v (1, heads, N, d): small random scores, then each video row aimed at one key: its own frame's
    middle key (dim 2 + f of q and k for frame f, so that no other frame's key ties with it: the lean forward
    flags a row whose far key tile holds a score equal to its max, and one dim for every frame gave each row
    such a tie in every frame, every row flagged), or, for ceil(rate x the video rows) rows of a fixed shuffle,
    a key in the middle of the first or the last frame, whichever is farther from its own. Such a row is flagged
    unless a tile its query block walks holds that key (the text's, or one shared with the block's frames): the
    measured rate is at most the planted one. Needs d >= frames + 2."""
    g = torch.Generator().manual_seed(seed)
    n, top = frames.numel(), int(frames.max())
    if d < top + 3:
        raise ValueError(f"planted: a dim for each of {top + 1} frames and two far targets, got d={d}")
    if int(torch.bincount(frames[frames >= 0]).min()) < 3:
        raise ValueError("planted: frames of at least 3 tokens (a far target is the one after a frame's middle)")
    q, k, v = (0.1 * torch.randn(1, heads, n, d, generator=g) for _ in range(3))
    middle = {f: int((frames == f).nonzero()[int((frames == f).sum()) // 2]) for f in range(top + 1)}
    video = (frames >= 0).nonzero().flatten()
    far = torch.zeros(n, dtype=torch.bool)
    far[video[torch.randperm(video.numel(), generator=g)[:math.ceil(rate * video.numel())]]] = True
    for f in range(top + 1):
        own = (frames == f).nonzero().flatten()
        # (the key after the far frame's middle one, which is that frame's own target; dim 0 towards the last
        # frame, dim 1 towards the first, so that no row finds its score again in a nearer frame)
        late = f > top / 2
        for dim, rows, key in ((2 + f, own[~far[own]], middle[f]),
                               (int(late), own[far[own]], middle[0 if late else top] + 1)):
            q[..., rows, dim] = 2.0
            k[..., key, :] = 0
            k[..., key, dim] = 8.0
    return tuple(t.to(device, dtype) for t in (q, k, v))


def chosen(tuner, direction: str = "forward") -> str:
    """The config the autotuner `tuner` (one of ops.tar_fwd's, or with direction "lean" of ops.tar_fwd_lean's) ran
    its latest launch with, as BLOCK_MxBLOCK_N, warps, stages and a register cap (`r168`,
    launch.SPECULATIVE_MAXNREG) if any (the interpreter's fixed tiles there)."""
    from vstar_kernels.ops import launch  # triton: not needed to draw a CSV (--plot, plot_results.py)

    if not launch.INTERPRETING and getattr(tuner, "best_config", None) is None:
        return "none"  # never launched in this process
    config = launch.tuned_config(tuner, direction)
    cap = config.get("maxnreg")
    return f"{config['BLOCK_M']}x{config['BLOCK_N']}" + (
        f"w{config['num_warps']}s{config['num_stages']}" if "num_warps" in config else "") + (f"r{cap}" if cap else "")


def floor_call(floor: str, q, k, v):
    """The FA3-class floor's call on q, k, v: plain attention (TAR's default scale) on SDPA backend `floor`, the
    key its rows record in their backend column."""
    return lambda: sdpa_only(floor, q, k, v, default_spec(q.shape[-1]))


def run_shape(name: str, frames: torch.Tensor, heads: int, d: int, rate: float, device, dtype, info, out: Path,
              sigma: float) -> None:
    q, k, v = planted(frames, heads, d, rate, device, dtype)
    frames = frames.to(device)
    counts = torch.zeros(2, dtype=torch.int64, device=device)
    one = vk.tar_attention(q, k, v, sigma=sigma, frames=frames, backend="triton", flags=counts)
    two = vk.tar_attention(q, k, v, sigma=sigma, frames=frames, backend="triton", speculate=False)
    flagged, rows = counts.tolist()
    measured = flagged / rows
    from vstar_kernels.ops import launch, tar_fwd

    tiles = chosen(tar_fwd._tiled_speculative), chosen(tar_fwd._tiled)
    # bit for bit at the same tiles; where the autotuner picked other tiles for each form, their sums run in
    # another order: within the tolerance table
    uncapped = tiles[0].removesuffix(f"r{launch.SPECULATIVE_MAXNREG}")  # a register cap moves no bit
    check = "bitwise" if uncapped == tiles[1] else "tolerance"
    setup = (f"dit={name} planted_flag_rate={rate:g} flag_rate={measured:.4f} sigma={sigma:g} "
             f"tiles_one_pass={tiles[0]} tiles_two_pass={tiles[1]} check={check}")
    if check == "bitwise":
        ok = torch.equal(one, two)
        status = "ok" if ok else "mismatch: the one pass is not the two passes bit for bit at the same tiles"
    else:
        atol, rtol = TOLERANCES[dtype]
        ok = torch.allclose(one.float(), two.float(), atol=atol, rtol=rtol)
        status = "ok" if ok else "mismatch: the one pass is outside the tolerance table against the two passes"
    cost = measure.ideal_cost(heads, frames.numel(), frames.numel(), d, d, q.element_size())
    calls = {"vstar_triton_one_pass": lambda: vk.tar_attention(q, k, v, sigma=sigma, frames=frames,
                                                               backend="triton"),
             "vstar_triton_two_pass": lambda: vk.tar_attention(q, k, v, sigma=sigma, frames=frames,
                                                               backend="triton", speculate=False)}
    if device.type == "cuda" and rate == RATES[0]:
        calls["sdpa_floor"] = floor_call(floor_backend(device), q, k, v)
    dt = dtype_name(dtype)
    for impl, fn in calls.items():
        timing = measure.time_call(fn, device)[0] if ok else None
        backend = floor_backend(device) if impl == "sdpa_floor" else "triton"
        measure.append_row(out, measure.row(info, impl, 1, heads, frames.numel(), d, dt, setup=setup,
                                            status=status, timing=timing, cost=cost, backend=backend))
        print(f"{name} f={rate:g} (measured {measured:.3f}) {impl}: "
              + (f"{timing.median_ms:.3f} ms" if timing else status), flush=True)
    if device.type != "cuda" or not ok:
        return
    parts = [(ONE_PASS_KERNELS, calls["vstar_triton_one_pass"], setup)]
    if rate == RATES[0]:
        parts.append((GLOBAL_MAX_KERNELS, lambda: vk.tar_attention(q, k, v, sigma=sigma, frames=frames,
                                                                  backend="triton", max_mode="global"),
                      f"dit={name} max_mode=global sigma={sigma:g}"))
    for kernels, fn, part_setup in parts:
        for kernel, timing in kernel_times(fn, kernels).items():
            measure.append_row(out, measure.row(info, kernels[kernel], 1, heads, frames.numel(), d, dt,
                                                setup=f"{part_setup} kernel={kernel}", status="ok", timing=timing,
                                                cost=cost, backend="triton"))
            print(f"{name} f={rate:g} {kernels[kernel]} ({kernel}): {timing.median_ms:.3f} ms", flush=True)


# the lean forward's two loops autotuned, restricted to warp-specialized configs and to the others; its speculative
# form (one loop, flags=), which runs without warp specialization (launch.FWD_LEAN)
LEAN_IMPLS = {"vstar_triton_lean": (None, False), "vstar_triton_lean_ws": (True, False),
              "vstar_triton_lean_no_ws": (False, False), "vstar_triton_lean_one_pass": (None, True)}


def run_lean(name: str, frames: torch.Tensor, heads: int, d: int, device, dtype, info, out: Path,
             sigma: float, rate: float = 0.0) -> None:
    """The lean forward's rows at one DiT shape (module doc, --lean), planted data at flag rate `rate`: at rate 0
    every form of LEAN_IMPLS and the peers, at any other its speculative form alone."""
    q, k, v = planted(frames, heads, d, rate, device, dtype)
    frames = frames.to(device)
    setup = f"dit={name} sigma={sigma:g}"
    cost = measure.ideal_cost(heads, frames.numel(), frames.numel(), d, d, q.element_size())
    dt = dtype_name(dtype)
    two = vk.tar_attention(q, k, v, sigma=sigma, frames=frames, backend="triton", speculate=False)
    problem = make_problem(q, k, v, sigma=sigma, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                           frames=frames)
    lean = dispatch.BACKENDS["triton-lean"]
    why = "; ".join(lean.not_supported_reasons(problem))  # each cell checks its output before it is timed
    for impl, (ws, speculative) in LEAN_IMPLS.items():
        if rate and not speculative:
            continue
        timing, status, row_setup = None, f"unsupported: {why}", setup
        if not why:
            from vstar_kernels.ops.tar_fwd_lean import _lean, lean_forward

            flags = torch.zeros(heads, dtype=torch.int32, device=device) if speculative else None
            fn = lambda ws=ws, flags=flags: lean_forward(problem, warp_specialize=ws, flags=flags)  # noqa: E731
            atol, rtol = TOLERANCES[dtype]
            close = torch.allclose(fn().float(), two.float(), atol=atol, rtol=rtol)
            if speculative:
                row_setup += (f" planted_flag_rate={rate:g} "
                              f"flag_rate={int(flags.sum()) / (heads * frames.numel()):.4f}")
            status = "ok" if close else "mismatch: outside the tolerance table against the two passes"
            timing = measure.time_call(fn, device)[0] if close else None
            row_setup += f" tiles={chosen(_lean[ws], 'lean')}"  # the autotuner's pick (the interpreter's fixed tiles)
        measure.append_row(out, measure.row(info, impl, 1, heads, frames.numel(), d, dt, setup=row_setup,
                                            status=status, timing=timing, cost=cost, backend="triton-lean"))
        print(f"{name} {impl} {row_setup}: " + (f"{timing.median_ms:.3f} ms" if timing else status), flush=True)
        if speculative and timing and device.type == "cuda":  # its launches timed apart
            for kernel, part in kernel_times(fn, LEAN_ONE_PASS_KERNELS).items():
                measure.append_row(out, measure.row(info, LEAN_ONE_PASS_KERNELS[kernel], 1, heads, frames.numel(), d,
                                                    dt, setup=f"{row_setup} kernel={kernel}", status="ok",
                                                    timing=part, cost=cost, backend="triton-lean"))
                print(f"{name} f={rate:g} {LEAN_ONE_PASS_KERNELS[kernel]}: {part.median_ms:.3f} ms", flush=True)
    if rate:
        return
    peers = {"vstar_triton_two_pass": ("triton", lambda: vk.tar_attention(q, k, v, sigma=sigma, frames=frames,
                                                                          backend="triton", speculate=False))}
    if device.type == "cuda":
        floor = floor_backend(device)
        peers["sdpa_floor"] = (floor, floor_call(floor, q, k, v))
    for impl, (backend, fn) in peers.items():
        timing = measure.time_call(fn, device)[0]
        measure.append_row(out, measure.row(info, impl, 1, heads, frames.numel(), d, dt, setup=setup, status="ok",
                                            timing=timing, cost=cost, backend=backend))
        print(f"{name} {impl}: {timing.median_ms:.3f} ms", flush=True)


def _seconds(timestamp: str) -> float:
    return datetime.fromisoformat(timestamp).timestamp()


def plot(csv_path, out_dir=None):
    """The picture --plot describes, from the CSV alone, into `out_dir` (default: beside it); returns its path, or
    None for a file with no timed row (a run whose every cell failed: its markdown says why)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    csv_path = Path(csv_path)
    rows = [r for r in measure.read_csv(csv_path) if r["median_ms"] and r["status"] == "ok"]
    if not all(r["setup"].startswith("dit=") for r in rows):
        raise ValueError(f"{csv_path}: not a results file of this script (a timed row's setup names no dit=)")
    setups = [dict(part.split("=", 1) for part in r["setup"].split()) for r in rows]
    # a row that flagged more rows than were planted timed data whose plant did not hold (`planted`: the tied
    # targets before 078d4c7 flagged every row), not the rate it names: not drawn
    held = [not ("planted_flag_rate" in s and float(s["flag_rate"]) > float(s["planted_flag_rate"]) + 0.005)
            for s in setups]
    rows, setups = [r for r, h in zip(rows, held) if h], [s for s, h in zip(setups, held) if h]
    shapes = list(dict.fromkeys(s["dit"] for s in setups))
    if not shapes:
        return None
    cols = min(len(shapes), 3)  # rows of at most three panels: six side by side are too narrow to read
    rows_of = math.ceil(len(shapes) / cols)
    fig, axes = plt.subplots(rows_of, cols, figsize=(max(8.5 * cols, 8), 6.5 * rows_of), squeeze=False)
    for ax in axes.flat[len(shapes):]:
        ax.set_visible(False)
    bars = {"rates": (("vstar_triton_one_pass", "tab:blue"), ("vstar_triton_lean_one_pass", "tab:purple"),
                      ("vstar_triton_two_pass", "tab:orange")),
            "lean": (("vstar_triton_lean", "tab:green"), ("vstar_triton_two_pass", "tab:orange"))}
    for ax, shape in zip(axes.flat, shapes):
        # the latest row per (impl, group, kernel): a re-run replaces the earlier one. A group is a planted rate
        # (the speculation rows) or "lean" (the --lean rows, no rate), each with the floor timed beside it.
        latest = {(r["impl"], s.get("planted_flag_rate", "lean"), s.get("kernel")): r
                  for r, s in zip(rows, setups) if s["dit"] == shape}
        cell = {key: float(r["median_ms"]) for key, r in latest.items()}
        commits = ", ".join(dict.fromkeys(r["commit"] for r in latest.values()))
        mixed = "," in commits  # the panel's bars come from several commits: each bar names its own
        rates = sorted({g for (impl, g, kernel) in cell if g != "lean" and impl.endswith("pass") and not kernel},
                       key=float)
        groups = rates + (["lean"] if ("vstar_triton_lean", "lean", None) in cell else [])
        # each bar against the floor timed in its own run: the floor row of its commit nearest to it in time (the
        # floor differs between runs by up to 12%); none where its commit timed no floor at this shape
        floors = [(r["commit"], _seconds(r["timestamp"]), float(r["median_ms"])) for r, s in zip(rows, setups)
                  if s["dit"] == shape and r["impl"] == "sdpa_floor"]
        for i, group in enumerate(groups):
            kind = "lean" if group == "lean" else "rates"
            present = [(impl, color) for impl, color in bars[kind] if (impl, group, None) in cell]
            width = 0.84 / max(len(present), 2)
            for j, (impl, color) in enumerate(present):
                ms = cell[(impl, group, None)]
                run = latest[(impl, group, None)]
                floor = min(((abs(t - _seconds(run["timestamp"])), ms) for c, t, ms in floors if c == run["commit"]),
                            default=(None, None))[1]
                x = i + (j - (len(present) - 1) / 2) * width
                ax.bar(x, ms, width * 0.95, color=color,
                       label=impl if impl not in ax.get_legend_handles_labels()[1] else None)
                redo = cell.get((impl + "_redo", group, "_tar_fwd_redo_kernel"))
                if redo:
                    ax.bar(x, redo, width * 0.95, bottom=ms - redo, color="none", edgecolor="navy", hatch="//",
                           label="its redo launch" if "its redo launch" not in ax.get_legend_handles_labels()[1]
                           else None)
                ax.text(x, ms, f"{ms:.1f} ms" + (f"\n{ms / floor:.2f}x" if floor else "") +
                        (f"\n@{run['commit'][:7]}" if mixed else ""), ha="center", va="bottom",
                        fontsize=7 if len(present) < 3 else 6)  # three bars' labels side by side: smaller
                if floor:  # the floor timed in this bar's run, across the bar
                    ax.hlines(floor, x - width / 2, x + width / 2, color="black", ls="--", lw=1)
        if floors:
            ms = [f[2] for f in floors]
            ax.plot([], [], color="black", ls="--", lw=1, label="sdpa_floor (plain attention) timed in the bar's "
                    f"run ({min(ms):.1f}-{max(ms):.1f} ms); Nx = bar / it")
        ax.set_xticks(range(len(groups)), [f"{float(g):.0%} flagged" if g != "lean" else "lean forward\n(two loops)"
                                           for g in groups])
        ax.set(xlabel="the one pass at planted flag rates" + ("; the lean forward" if "lean" in groups else ""),
               ylabel="median ms per call", title=f"{shape} (commit {commits})")
        ax.set_xlim(-0.8, max(len(groups), 2) - 0.2)
        ax.set_ylim(0, 1.15 * max(cell.values()))
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2, frameon=False)
    first = rows[0]
    cpu = first["device"].startswith("cpu")  # a --smoke run: the kernels in the Triton interpreter
    dtypes = ", ".join(dict.fromkeys(r["dtype"] for r in rows))
    fig.suptitle(f"TAR forward, one pass vs two passes vs the plain-attention floor\n({dtypes}, "
                 f"{first['device']}" + ": the Triton interpreter, not GPU speed" * cpu + ")", fontsize=10)
    fig.tight_layout()
    path = Path(out_dir or csv_path.parent) / f"{csv_path.stem}-flag-rates.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# where --smoke writes without --out: where `python -m vstar_kernels bench` writes by default (its --out's help,
# vstar_kernels.bench.harness.results_csv), in the folder the command runs in
SMOKE_OUT = "vstar-bench-results"


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=results_folder,
                        help=f"the folder to write to (default: benchmarks/results; with --smoke ./{SMOKE_OUT} in the "
                             "current folder, as `python -m vstar_kernels bench`; with --plot, beside the CSV)")
    parser.add_argument("--shapes", nargs="*", help="DiT shapes of tools/perf/model_dit.py (default: all)")
    parser.add_argument("--rates", nargs="+", type=float, default=list(RATES), metavar="RATE",
                        help="the planted flag rates, shares of the video rows in [0, 1] (default: "
                             f"{' '.join(f'{r:g}' for r in RATES)})")
    parser.add_argument("--time-budget-s", type=seconds, default=420.0, metavar="S",
                        help="after S seconds start no further shape (nor, without --lean, rate); the rows written "
                             "so far stay (default: 420)")
    parser.add_argument("--smoke", action="store_true",
                        help="one tiny layout in the Triton interpreter (CPU), for the tests; sets TRITON_INTERPRET=1 "
                             "itself")
    parser.add_argument("--lean", action="store_true",
                        help="time the lean forward instead (only its rows run): at rate 0 each of its forms beside "
                             "the two passes (and on a GPU the floor), at the other --rates its speculative form alone")
    parser.add_argument("--plot", metavar="CSV", help="draw a results file of this script (no run)")
    args = parser.parse_args(argv)
    args.rates = list(dict.fromkeys(args.rates))  # each once
    args.shapes = args.shapes and list(dict.fromkeys(args.shapes))
    if args.plot:
        if not Path(args.plot).is_file():
            parser.error(f"--plot: {args.plot} is not a file")
        try:
            path = plot(args.plot, args.out)
        except (KeyError, ValueError) as exc:  # a CSV of other columns, or of another harness
            print(f"--plot: {exc}" if str(args.plot) in str(exc) else f"--plot: {args.plot}: {type(exc).__name__}: "
                  f"{exc}", file=sys.stderr)
            return 2
        print(f"wrote {path}" if path else f"{args.plot}: no timed row to draw")
        return 0
    if any(not 0 <= r <= 1 for r in args.rates):
        parser.error(f"--rates: shares in [0, 1], got {args.rates}")
    if args.smoke and not _env.interpreter_requested():
        # the kernels load in the mode of triton's first import, which this module's imports made (bench.peers):
        # too late to set it here; a child run with TRITON_INTERPRET=1 from its start (as the CLI's `demo` does)
        sys.stdout.flush()
        return subprocess.run([sys.executable, str(Path(__file__).resolve()), *argv],
                              env={**os.environ, "TRITON_INTERPRET": "1"}).returncode
    if args.smoke:
        device, dtype = torch.device("cpu"), torch.float32
        cases = [("smoke", vk.frame_ids(8, 20), 1, 16, 0.5)]
    else:
        if not torch.cuda.is_available():
            print("benchmarks/speculation.py times GPU kernels: torch sees no CUDA device (--smoke runs the CPU check)",
                  file=sys.stderr)
            return 1
        from tools.perf.model_dit import DIT_SHAPES

        known = {s.name: s for s in DIT_SHAPES}
        unknown = sorted(set(args.shapes or ()) - set(known))
        if unknown:
            parser.error(f"--shapes: unknown {unknown}; known: {sorted(known)}")
        device, dtype = torch.device("cuda"), torch.bfloat16
        cases = [(s.name, s.frames(), s.heads, s.head_dim, s.sigma) for s in DIT_SHAPES
                 if not args.shapes or s.name in args.shapes]
    info = measure.RunInfo.collect(device)
    folder = Path(args.out) if args.out else Path.cwd() / SMOKE_OUT if args.smoke else Path(__file__).parent / "results"
    out = folder / f"speculation-{measure.slug(info.device)}-{info.date}.csv"
    start = time.monotonic()
    if args.lean:
        for name, frames, heads, d, sigma in cases:
            if time.monotonic() - start > args.time_budget_s:
                print(f"time budget of {args.time_budget_s:g} s spent: stopped before {name}")
                return 0
            # the lean forward takes 16-bit inputs only (the smoke run's float32 is refused)
            for rate in args.rates:
                run_lean(name, frames, heads, d, device, torch.float16 if args.smoke else dtype, info, out, sigma,
                         rate)
        print(f"rows in {out}")
        return 0
    for name, frames, heads, d, sigma in cases:
        for rate in args.rates:
            if time.monotonic() - start > args.time_budget_s:
                print(f"time budget of {args.time_budget_s:g} s spent: stopped before {name} f={rate:g}")
                return 0
            run_shape(name, frames, heads, d, rate, device, dtype, info, out, sigma)
    print(f"rows in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
