"""`tools.perf model`: the roofline model's files, its calibration gate, its inputs and its CLI.

The CLI runs once per mode (one UNet shape, the smallest DiT shape), with the compiled-loops check, in one
subprocess without TRITON_INTERPRET (the model compiles the kernels and the plain-attention baseline for sm_90,
which needs JIT functions).
"""

import csv
import json
import math
import os
import pathlib
import re
import subprocess
import sys

import pytest
import triton

from tools.perf.__main__ import main as perf_main
from vstar_kernels import cli
from tools.perf import eager, model_dit, roofline
from vstar_kernels.bench import shapes
from vstar_kernels.bench.measure import ideal_cost
from vstar_kernels.bench.peers import PEERS
from tools.perf.traffic import tiled_bytes
from vstar_kernels.ops.launch import band_width

pytestmark = pytest.mark.long(one_subprocess=True)  # scheduled first of all (tests/conftest.py)

PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ROOT = pathlib.Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
UNET = "vc2-320x512-l2"
ARGS = ["model", "--gpu", "h100", "h200", "--shapes", UNET, "--n", "16", "256"]
DIT = "ltx-video-768x512"  # the smallest DiT shape


# The three sm_90 runs share one subprocess (without TRITON_INTERPRET: the model compiles for sm_90), so the
# calibration's and the modeled calls' compiles (roofline.compiled, once per specialization in a process) run once.
# The DiT run is --quick (each autotuned launch in its first and last configs: 2 of 10 to 12 there); the UNet run and
# the compiled-loops check compile every config.
_RUNS = r'''
import contextlib
import io
import json
import sys

from tools.perf import roofline
from tools.perf.__main__ import main
from vstar_kernels.bench import shapes

unet, dit = sys.argv[1:3]
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    assert main([*json.loads(sys.argv[3]), "--out", unet]) == 0
    unet_keys = set(roofline._COMPILED)
    assert main(["model", "--dit", "--shapes", sys.argv[4], "--quick", "--out", dit]) == 0
out = {"stdout": stdout.getvalue()}
# (kernel, every config?, configs compiled) of each launch the DiT run compiled (and the UNet run had not)
out["compiled"] = sorted({(key[0][0], key[2], len(configs)) for key, configs in roofline._COMPILED.items()
                          if key not in unet_keys})
out["unet_tiled"] = max(len(configs) for key, configs in roofline._COMPILED.items()
                        if key in unet_keys and key[0][0] == "_tar_fwd_tiled_kernel")
unet_shape = shapes.SHAPES[sys.argv[5]]
for name, delta in (("gaussian", False), ("delta", True)):  # the UNet run's N = 256 calls: compiled there already
    launch = roofline.ours_launch(unet_shape.batch, unet_shape.heads, 256, unet_shape.head_dim, 1.0, delta)
    configs = roofline.compiled_launch(launch)
    loops = {config: {kind: [c.instr, c.mufu] for kind, c in roofline.tiled_loops(config, rows, delta).items()}
             for config, rows in configs}
    outside = [rows[0].outside_warp_instr for _, rows in configs]
    out[name] = dict(loops=loops, outside=outside, again=roofline.compiled_launch(launch) is configs)
plain = {}
for n in (256, 250):  # 256 = 4 whole 64-key tiles; 250 peels a masked last tile, outside the loop
    (config, rows), = roofline.compiled(roofline.plain_launch(2, 5, n, 64, 128, 64, 8, 3))
    plain[n] = [rows[0].loop, rows[0].outside_warp_instr, rows[0].kernel_mma, len(rows)]
out["plain"] = plain
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """`python -m tools.perf model ARGS`, then `model --dit` on the DiT shape DIT, then the tiled forward's and the
    baseline's compiled loops (test_the_model_compiles_each_modeled_call_and_maps_its_loops), in one subprocess:
    the two output directories and the script's JSON (the CLI runs' stdout under "stdout")."""
    if not PTXAS.exists():
        pytest.skip(f"triton ships no ptxas here ({PTXAS})")
    unet, dit = tmp_path_factory.mktemp("model"), tmp_path_factory.mktemp("dit")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_DEFAULT_FP_FUSION="1")
    done = subprocess.run([sys.executable, "-c", _RUNS, str(unet), str(dit), json.dumps(ARGS), DIT, UNET], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return unet, dit, json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def run(runs):
    """The model CLI's output directory and stdout, for ARGS."""
    unet, _, out = runs
    return unet, out["stdout"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_cli_writes_model_files_labelled_model(run):
    out, stdout = run
    for gpu in ("h100", "h200"):
        rows = _rows(out / f"model-{gpu}.csv")
        assert {r["estimate"] for r in rows} == {"model"}
        assert {(r["n"], r["impl"]) for r in rows} >= {("16", "vstar_triton"), ("256", "flash"),
                                                       ("256", "reference_eager"), ("16", "sdpa_bias")}
        ok = [r for r in rows if r["status"] == "ok"]
        assert all(float(r["model_time_ms"]) > 0 for r in ok)
        assert {r["impl"] for r in rows if r["status"] != "ok"} >= {"reference_compiled"}
        by = {(r["n"], r["impl"]): r for r in ok}
        for n in (16, 256):  # a custom delta: its N^2 entries per sequence on top of the config's own bytes
            delta = by[str(n), "vstar_triton_delta"]
            kind, tile = delta["config"].split()[:2]  # "packed ROWS=128" or "tiled 64x64 8w 2st"
            if kind == "packed":
                own = roofline.packed_work(6400, n, 64, int(tile.split("=")[1])).bytes
            else:  # the two-pass form: K walked over every tile
                bm, bn = map(int, tile.split("x"))
                own = 6400 * tiled_bytes(n, n, 64, 64, 2, bm, bn)
            assert int(delta["model_bytes"]) == own + 6400 * n * n * 2
            assert float(delta["model_time_ms"]) >= float(by[str(n), "vstar_triton"]["model_time_ms"])
            # a wider Gaussian band walks and biases more tiles: never faster
            wide = by[str(n), "vstar_triton_sigma8"]
            assert (by[str(n), "vstar_triton"]["sigma"], wide["sigma"]) == ("1.0", "8.0")
            assert float(wide["model_time_ms"]) >= float(by[str(n), "vstar_triton"]["model_time_ms"])
        md = (out / f"model-{gpu}.md").read_text()
        assert "(model, not measured)" in md and "ETA =" in md and "arXiv:2407.08608" in md
        # the command that wrote it, with the options the run was given
        assert f"`python -m tools.perf model --gpu {gpu} --shapes {UNET} --n 16 256`" in md
        assert (out / f"model-{gpu}.png").stat().st_size > 10_000
    assert "MODEL, not a measurement" in stdout
    # H200 has more bandwidth and the same SMs: no modeled call is slower there
    h100 = {(r["n"], r["impl"]): r for r in _rows(out / "model-h100.csv") if r["status"] == "ok"}
    for r in _rows(out / "model-h200.csv"):
        if r["status"] == "ok":
            assert float(r["model_time_ms"]) <= float(h100[r["n"], r["impl"]]["model_time_ms"])


def test_calibration_lands_within_25_percent_of_published_fa2(run):
    out, _ = run
    rows = [r for r in _rows(out / "model-h100-calibration.csv") if r["peer"] == "FlashAttention-2"]
    assert [(int(r["d"]), int(r["n"])) for r in rows] == [(d, n) for d, n, _ in roofline.PUBLISHED_FA2]
    for r in rows:
        assert r["estimate"] == "model vs published" and r["role"] == "fit"
        assert "arXiv:2407.08608" in r["source"] and "FlashAttention-2 bar" in r["source"]
        assert 0.75 <= float(r["model_over_published"]) <= 1.25, r


def test_fa3_calibration_lands_within_15_percent_of_its_published_bars(run):
    """fa3 against the FlashAttention-3 bars of the same panels, at every fitted point; the bars it was not
    fitted on and pytorch/benchmark's FlashAttention-3 column are checks, written beside them."""
    out, _ = run
    rows = [r for r in _rows(out / "model-h100-calibration.csv") if r["peer"] == "FlashAttention-3"]
    fit = [r for r in rows if r["role"] == "fit"]
    assert [(int(r["d"]), int(r["n"]), float(r["published_tflops"])) for r in fit] == list(roofline.PUBLISHED_FA3)
    for r in fit:
        assert "arXiv:2407.08608" in r["source"] and "FlashAttention-3 bar" in r["source"]
        assert 0.85 <= float(r["model_over_published"]) <= 1.15, r
    checks = [r for r in rows if r["role"] == "check"]
    assert len(checks) == len(roofline.CHECK_FA3) + len(roofline.PUBLISHED_TUTORIAL)
    assert {r["source"].split(",")[0] for r in checks} == {"FlashAttention-3 paper", "pytorch/benchmark pull request "
                                                                                     "#2391 (commit ff65cb6"}


def test_tutorial_anchor_rows(run):
    """The baseline in the tutorial's configs, modeled at ETA and unfitted, beside the tutorial's measured
    throughput at every length pytorch/benchmark tabulates."""
    out, _ = run
    rows = [r for r in _rows(out / "model-h100-calibration.csv") if r["role"] == "anchor"]
    assert [int(r["n"]) for r in rows] == [n for n, _, _ in roofline.PUBLISHED_TUTORIAL]
    for r in rows:
        assert r["peer"] == "Triton tutorial" and r["config"].startswith("tutorial ") and int(r["bh"]) * int(
            r["n"]) == 16384 * roofline.TUTORIAL_HEADS
        # ETA < 1 can only slow a kernel down
        assert float(r["model_tflops"]) <= float(r["unfitted_model_tflops"])


def test_rows_are_deterministic(run):
    """Ours, fa3 and the eager reference again, in this process, from the same inputs: the same numbers."""
    out, _ = run
    eta = float((out / "model-h100.md").read_text().split("ETA = ")[1].split(":")[0])
    gpu, s = roofline.GPUS["h100"], shapes.SHAPES[UNET]
    exposed = float((out / "model-h100.md").read_text().split("MMA at the dense peak plus ")[1].split(" ")[0])
    rows = {(int(r["n"]), r["impl"]): r for r in _rows(out / "model-h100.csv") if r["status"] == "ok"}
    # ours and flash compile for sm_90, which needs JIT functions: not under TRITON_INTERPRET=1
    compiles = not triton.knobs.runtime.interpret
    for n in (16, 256):
        call = (s.batch, s.heads, n, s.head_dim, gpu)
        models = [("fa3", lambda: roofline.fa3(*call, exposed)),
                  ("reference_eager", lambda: eager.eager(PEERS["reference_eager"], *call[:4], gpu, eta))]
        if compiles:
            models.append(("vstar_triton", lambda: roofline.ours(*call, eta)))
        for impl, model in models:
            e = model()
            r = rows[n, impl]
            assert (round(e.seconds * 1e3, 6), int(e.bytes)) == (float(r["model_time_ms"]), int(r["model_bytes"]))


def test_ours_bytes_and_flops_are_what_the_interpreter_counts():
    """The model's bytes and MMA FLOPs for ours equal the committed traffic.csv counts (fp16, default options)."""
    rows = [r for r in _rows(RESULTS / "traffic.csv") if r["options"] == "plain" and r["dtype"] == "fp16"
            and r["status"] == "ok"]
    assert {r["layout"] for r in rows} == {"packed", "tiled"}
    for r in rows:
        n, d, seqs = int(r["n"]), int(r["d"]), int(r["sequences"])
        if r["layout"] == "tiled":  # the interpreter's tiles are 64 x 64
            e = roofline.tiled_work(seqs, n, d, roofline.tile_counts(n, 64, 64, 1.0), 64, 64)
        else:  # the interpreter's packed tile: 128 rows (64 above head dim 128), or the sequence
            e = roofline.packed_work(seqs, n, d, max(128 if d <= 128 else 64, 1 << (n - 1).bit_length()))
            assert e.bytes == ideal_cost(seqs, n, n, d, d, 2).bytes
        assert (e.bytes, e.mma_flops) == (int(r["requested_bytes"]), int(r["mma_flops_issued"])), r


@pytest.mark.parametrize("n, block_m, block_n", [(256, 64, 64), (300, 64, 32), (300, 128, 32), (2048, 128, 32)])
@pytest.mark.parametrize("sigma", [1.0, 8.0, 12.0, 1e6, None])
def test_tile_counts_cover_every_tile_and_load_what_tiled_bytes_counts(n, block_m, block_n, sigma):
    """Every query block's key tiles are off the band (a plain loop) or in it (walked and biased) once;
    the key rows each loop loads give traffic.tiled_bytes."""
    counts = roofline.tile_counts(n, block_m, block_n, sigma)
    blocks, tiles = math.ceil(n / block_m), math.ceil(n / block_n)
    softmax = [kind for kind in counts if kind != "row_max"]
    assert sum(counts[k][0] for k in softmax) == blocks * tiles
    assert sum(counts[k][1] for k in softmax) == blocks * n
    assert counts["row_max"] == counts["biased"]
    if sigma is None or sigma == 1e6:  # a custom delta, or a band as wide as the sequence: every tile
        assert counts["biased"] == (blocks * tiles, blocks * n)
    d = 64
    loaded = n * 2 * d + sum(keys * (d if kind == "row_max" else 2 * d) for kind, (_, keys) in counts.items())
    assert roofline.tiled_work(1, n, d, counts, block_m, block_n, sigma, delta=sigma is None).bytes == 2 * loaded + (
        2 * n * n if sigma is None else 0)


def test_fa3_pays_its_whole_tiles():
    """FlashAttention-3's tiles (192 x 192 up to head dim 64, 128 x 176 at 128): at N = 16..64 a sequence
    still costs a whole tile's MMA and exponentials; a head dim runs the next compiled one; from head dim 128
    an even number of query blocks pairs into clusters that load K and V once."""
    gpu = roofline.GPUS["h100"]
    for n in (16, 32, 64):
        e = roofline.fa3(100, 8, n, 40, gpu, 1.0)
        assert e.mma_flops == 800 * 192 * 192 * 2 * 2 * 64  # D 40 runs the head dim 64 kernel
        assert e.mufu * 32 == pytest.approx(800 * 192 * 192 * (1 + 1 / 192))
        assert e.bytes == 800 * 4 * n * 40 * 2 + 800 * n * 4  # Q, K, V, O once; the log-sum-exp
    short, long = roofline.fa3(4, 16, 64, 64, gpu, 1.0), roofline.fa3(4, 16, 192, 64, gpu, 1.0)
    assert short.mma_flops == long.mma_flops and short.seconds == long.seconds  # 64 rows cost the tile of 192
    one, pair = roofline.fa3(1, 16, 128, 128, gpu, 1.0), roofline.fa3(1, 16, 256, 128, gpu, 1.0)
    assert "cluster" not in one.config and pair.config == "fa3 128x176 cluster 2"
    assert pair.bytes == 16 * (2 * 256 + 2 * 256 * 2 // 2) * 128 * 2 + 16 * 256 * 4
    hidden = roofline.fa3(64, 16, 4096, 128, gpu, 0.0)
    assert hidden.terms["mma+exp"] == pytest.approx(hidden.mma_flops / gpu.tensor_flop_s * roofline.waves_stretch(
        64 * 16 * 32, 1, gpu))  # nothing exposed: the MMA at the dense peak
    assert roofline.fa3(64, 16, 4096, 128, gpu, 1.0).seconds > hidden.seconds
    with pytest.raises(ValueError, match="head dims up to 256"):
        roofline.fa3(1, 1, 64, 320, gpu, 1.0)


def test_band_is_the_launchers():
    assert roofline.band(256, 1.0) == 15  # tests/perf/test_traffic.py: the kernel's band at sigma 1
    assert roofline.band(256, 8.0) > roofline.band(256, 4.0) > roofline.band(256, 1.0)
    assert roofline.band(64, 1e6) == 64 and roofline.band(64, None) is None  # at most max(Nq, Nk)


def test_the_model_compiles_each_modeled_call_and_maps_its_loops(runs):
    """The tiled forward compiled for a modeled call (the UNet shape at N = 256, D 64, on meta tensors): every config
    the sm_90 pruning keeps, each with its six loops of the one-pass Gaussian (two with a custom delta) in the
    kernel's order, and instructions outside the loops once per program; compiled once per specialization (the
    CLI run compiled these very launches: the check reads them from the process's memo).
    The baseline: one MMA loop over the whole key tiles, the masked last tile outside it."""
    out = runs[2]
    one, two = out["gaussian"], out["delta"]
    assert len(one["loops"]) >= 4 and len(two["loops"]) >= 2  # every kept config, not one stand-in
    for loops in one["loops"].values():
        assert list(loops) == list(roofline.ONE_PASS_LOOPS)
        assert loops["row_max"][1] == 0 and loops["biased"][1] > loops["plain_left"][1] > 0
    for loops in two["loops"].values():
        assert list(loops) == list(roofline.TWO_PASS_LOOPS) and loops["row_max"][1] == 0
    assert all(x > 0 for x in one["outside"] + two["outside"]) and one["again"] and two["again"]
    assert {(int(c.split()[0][8:]), int(c.split()[1][8:])) for c in one["loops"]} >= {(64, 32), (128, 32), (128, 64)}
    whole, peeled = out["plain"]["256"], out["plain"]["250"]
    assert whole[0] == peeled[0] == "hot" and whole[2] == peeled[2] == "HGMMA" and whole[3] == peeled[3] == 1
    assert peeled[1] > whole[1] > 0  # the peeled tile's instructions count once per program


@pytest.mark.parametrize("argv", [["model", "--gpu", "a100"], ["model", "--gpu", "cuda"],
                                  ["model", "--gpu", "h100", "cpu"]])
def test_bad_gpu_names_are_argparse_errors(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        perf_main(argv)
    assert exc.value.code == 2
    assert "--gpu" in capsys.readouterr().err


@pytest.mark.parametrize("argv, message", [
    (["model", "--n", "0"], "--n: must be a positive int, got '0'"),
    (["cpu", "--rounds", "0"], "--rounds: must be a positive int, got '0'"),
    (["host", "--batch", "-1"], "--batch: must be a positive int, got '-1'"),
    (["static", "--arch", "86"], "--arch: invalid choice: 86 (choose from 80, 90)"),
    (["compile-check", "--arch", "0"], "--arch: an SM version Triton compiles for (75, 80, 86, "),
    (["compile-check", "--arch", "76"], "121), got '76'"),
    # --shapes or --n without --out replaced the committed full model tables with those rows only
    (["model", "--shapes", "vc2-320x512-l0"], "model --shapes/--n writes those rows only, which would replace"),
    (["model", "--n", "16"], "model --shapes/--n writes those rows only"),
    (["model", "--dit", "--shapes", "wan2.1-1.3b-480p"], "model --shapes/--n writes those rows only"),
    (["model", "--dit", "--quick"], "model --quick compiles fewer configs, whose rows would replace"),
])
def test_bad_numbers_are_argparse_errors_before_any_work(argv, message, capsys):
    """They were tracebacks (an IndexError, a ZeroDivisionError, a KeyError after compiling) or an LLVM abort."""
    with pytest.raises(SystemExit) as exc:
        perf_main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("argv, valid", [(["model", "--shapes", "vc2-320x512-l0", "nonesuch"], "vc2-320x512-l0"),
                                         (["model", "--shapes", "unet-tiny"], "vc2-320x512-l0"),
                                         (["model", "--dit", "--shapes", "nonesuch"], "wan2.1-1.3b-480p")])
def test_unknown_shape_names_are_argparse_errors(argv, valid, capsys):
    """An unknown --shapes name (a UNet shape has no model row) is refused before any work, naming the valid ones."""
    with pytest.raises(SystemExit) as exc:
        perf_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --shapes" in err and argv[-1] in err and valid in err


def test_n_with_the_dit_shapes_is_an_argparse_error(capsys):
    """The DiT shapes have their own lengths: --n, which would be ignored, is refused."""
    with pytest.raises(SystemExit) as exc:
        perf_main(["model", "--dit", "--n", "1024"])
    assert exc.value.code == 2
    assert "argument --n: the DiT shapes have their own sequence lengths" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["--static"], ["--traffic"], ["--dit"], ["--device", "h100"]])
def test_the_package_cli_has_no_maintainer_modes(argv, capsys):
    """The yardstick runs from the checkout (python -m tools.perf), not from the installed package."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["bench", *argv])
    assert exc.value.code == 2


@pytest.mark.skipif(not triton.knobs.runtime.interpret, reason="checks the error under TRITON_INTERPRET=1")
def test_calibration_under_the_interpreter_says_why_it_cannot_compile():
    with pytest.raises(RuntimeError, match="without TRITON_INTERPRET=1"):
        roofline.flash(1, 2, 256, 64, roofline.GPUS["h100"], 0.36)


# --------------------------------------------------------------------------- DiT rows (`tools.perf model --dit`)


@pytest.fixture(scope="module")
def dit_run(runs):
    """`tools.perf model --dit` on one DiT shape (the smallest), both GPUs: its output directory."""
    return runs[1]


def test_dit_token_counts_follow_the_configs():
    n = {s.name: s.n for s in model_dit.DIT_SHAPES}
    assert n == {"wan2.1-1.3b-480p": 21 * 30 * 52, "wan2.1-1.3b-720p": 21 * 45 * 80, "wan2.1-14b-480p": 21 * 30 * 52,
                 "wan2.1-14b-720p": 21 * 45 * 80, "cogvideox-5b-720x480": 226 + 13 * 30 * 45,
                 "hunyuanvideo-720p": 33 * 45 * 80 + 256, "ltx-video-768x512": 16 * 16 * 24}
    cog = next(s for s in model_dit.DIT_SHAPES if s.name == "cogvideox-5b-720x480")
    ids = cog.frames()
    assert ids.shape == (cog.n,) and (ids[:226] == -1).all() and ids[226:].min() == 0 and ids.max() == 12


def test_dit_rows_are_produced_labelled_model(dit_run):
    """Every DiT impl on both GPUs, labelled model, in the relations the model must keep."""
    for gpu in ("h100", "h200"):
        rows = _rows(dit_run / f"model-dit-{gpu}.csv")
        assert {r["estimate"] for r in rows} == {"model"}
        assert [r["impl"] for r in rows] == (list(model_dit.DIT_IMPLS) + [model_dit.SPECULATIVE] * 4 + [model_dit.LEAN]
                                             + [model_dit.LEAN_SPECULATIVE] * 4)
        # the lean forward: its one pass cheaper than its two loops at f <= 0.05, dearer the more rows it redoes,
        # within 10% of them at f = 1 with the fallback; its two loops, a walk and a biased pass, dearer than flash
        lean = {float(r["flag_rate"]): r for r in rows if r["impl"] == model_dit.LEAN_SPECULATIVE}
        lean_two = next(r for r in rows if r["impl"] == model_dit.LEAN)
        lean_times = [float(lean[f]["model_time_ms"]) for f in model_dit.FLAG_RATES]
        assert lean_times == sorted(lean_times) and lean_times[1] < float(lean_two["model_time_ms"])
        assert lean_times[-1] <= 1.1 * float(lean_two["model_time_ms"]) and lean_two["flag_rate"] == ""
        assert float(lean_two["model_ours_over_flash"]) > 1 and lean_two["config"].startswith("lean ")
        assert "redo 64x64" in lean[0.05]["config"] and "redo" not in lean[0.0]["config"]
        for r in (*lean.values(), lean_two):
            assert float(r["model_ours_over_fa3_tutorial"]) <= float(r["model_ours_over_fa3"])
        one_pass = {float(r["flag_rate"]): r for r in rows if r["impl"] == model_dit.SPECULATIVE}
        by = {r["impl"]: r for r in rows if r["impl"] != model_dit.SPECULATIVE}
        # the speculative one pass: cheaper than two passes at f <= 0.05, dearer the more rows it redoes, and with
        # the fallback at f = 1 within 10% of two passes; the tutorial calibration (a higher MMA efficiency) no
        # slower than the FA2 one (equal where a row is bound by issue, not MMA)
        two = float(by["vstar_triton_frames"]["model_time_ms"])
        times = [float(one_pass[f]["model_time_ms"]) for f in model_dit.FLAG_RATES]
        assert times == sorted(times) and times[1] < two and times[-1] <= 1.1 * two
        assert 0 < float(one_pass[0.0]["guess_tile_share"]) < 0.5 and one_pass[0.0]["flag_rate"] == "0.0"
        assert by["vstar_triton_frames"]["flag_rate"] == ""
        for r in (*one_pass.values(), by["vstar_triton_frames"]):
            assert float(r["model_ours_over_fa3_tutorial"]) <= float(r["model_ours_over_fa3"])
        ours = by["vstar_triton_frames"]
        assert "frames" in ours["config"] and float(ours["model_ours_over_flash"]) > 1  # the walk costs a pass
        assert float(ours["model_time_ms"]) == pytest.approx(
            float(ours["model_ours_over_flash"]) * float(by["flash"]["model_time_ms"]), rel=2e-3)
        assert float(ours["model_time_ms"]) == pytest.approx(
            float(ours["model_ours_over_fa3"]) * float(by["fa3"]["model_time_ms"]), rel=2e-3)
        assert float(ours["model_ours_over_fa3_eta1"]) <= float(ours["model_ours_over_fa3"])
        assert float(by["flex_two_pass"]["model_time_ms"]) == pytest.approx(2 * float(by["flash"]["model_time_ms"]),
                                                                            rel=1e-3)
        md = (dit_run / f"model-dit-{gpu}.md").read_text()
        assert "(model, not measured)" in md and f"`python -m tools.perf model --dit --gpu {gpu} --shapes {DIT} " \
                                                 "--quick`" in md
        assert "compiled for sm_90 (bf16, the first and last configs the sm_90 pruning keeps (--quick" in md
        assert (dit_run / f"model-dit-{gpu}.png").stat().st_size > 10_000


def test_a_quick_pictures_title_says_so(dit_run, tmp_path, monkeypatch):
    """The DiT picture of a --quick run says so, as its table's command and assumptions do: a config it left out
    may be faster."""
    import matplotlib.pyplot as plt

    def typed(r):
        return {**r, "n": int(r["n"]), "model_time_ms": float(r["model_time_ms"] or "nan"),
                "model_peak_gb": float(r["model_peak_gb"]), "flag_rate": float(r["flag_rate"] or "nan")}

    rows = [typed(r) for r in _rows(dit_run / "model-dit-h100.csv")]
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    model_dit.dit_plot(rows, "h100", tmp_path / "full.png")
    with roofline.quick_configs():
        model_dit.dit_plot(rows, "h100", tmp_path / "quick.png")
    titles = [fig.axes[0].get_title() for fig in figures]
    assert titles == ["DiT self-attention, H100 SXM5 - model, not measured",
                      "DiT self-attention, H100 SXM5 - model, not measured (--quick: two configs a launch)"]
    monkeypatch.undo()
    for fig in figures:
        plt.close(fig)


def test_quick_compiles_the_first_and_last_configs(runs):
    """`model --quick` (the DiT run): each launch of ours it compiled (the frame-id forward's two passes and its one
    pass, the speculative redo, the lean forward), in the first and last configs alone (the lean redo has one); the
    UNet run compiled the tiled forward in every config the pruning keeps."""
    compiled = runs[2]["compiled"]
    ours = [c for c in compiled if c[0].startswith("_tar_")]
    assert {name for name, _, _ in ours} == {"_tar_fwd_tiled_kernel", "_tar_fwd_redo_kernel", "_tar_fwd_lean_kernel"}
    assert all(not every and n <= 2 for _, every, n in ours), ours
    assert [n for name, _, n in ours if name == "_tar_fwd_tiled_kernel"] == [2], ours
    assert runs[2]["unet_tiled"] >= 8


def test_fallback_averages_the_policy_over_a_run():
    """with_fallback runs vk.Speculation step by step: the one pass up to BREAK_EVEN; at f = 1, in a 50-step run,
    the first step and the probes after 8 and 16 two-pass steps (steps 1, 10 and 27) speculate."""
    assert model_dit.with_fallback(2.0, 3.0, model_dit.Speculation.BREAK_EVEN) == 2.0
    assert model_dit.with_fallback(5.0, 1.0, 1.0) == pytest.approx((3 * 5.0 + 47 * 1.0) / 50)
    assert model_dit.with_fallback(5.0, 1.0, 1.0, steps=9) == pytest.approx((5.0 + 8 * 1.0) / 9)


# The Triton the committed results were compiled with: its passes and ptxas decide the loop costs the model reads.
COMMITTED_TRITON = re.search(r"what Triton (\S+) and its bundled ptxas", (RESULTS / "static-sm90.md").read_text())[1]


# Each DiT row of ours models the fastest config of those compiled; the columns at ETA = 1 and at the tutorial's
# calibration take theirs apart. A one pass's time and ratios average it with its two-pass row's (the fallback).
_APART = ("model_ours_over_fa3_eta1", "model_ours_over_fa3_tutorial")
_TIMED = ("model_time_ms", "model_ours_over_fa3", "model_ours_over_flash")
_TWO_PASS = {model_dit.SPECULATIVE: "vstar_triton_frames", model_dit.LEAN_SPECULATIVE: model_dit.LEAN}


@pytest.mark.skipif(triton.__version__ != COMMITTED_TRITON,
                    reason=f"the committed model rows were compiled with Triton {COMMITTED_TRITON}, this is "
                           f"{triton.__version__}: other compiled loops, other numbers")
def test_dit_rows_match_the_committed_rows(dit_run):
    """The model is deterministic: with the committed results' Triton, a --quick row that models the committed row's
    config is the committed row, but for the columns whose fastest config is taken apart (and a one pass's time and
    ratios where its two-pass row's time differs); every time no shorter than the committed one, which the full run
    took over more configs."""
    for gpu in ("h100", "h200"):
        committed = [r for r in _rows(RESULTS / f"model-dit-{gpu}.csv") if r["model"] == DIT]
        quick = _rows(dit_run / f"model-dit-{gpu}.csv")
        assert [(r["impl"], r["flag_rate"]) for r in quick] == [(r["impl"], r["flag_rate"]) for r in committed]
        two_pass = {(r["impl"], which): r["model_time_ms"] for which, rows in (("quick", quick), ("full", committed))
                    for r in rows if r["impl"] in _TWO_PASS.values()}
        exact = set()
        for q, c in zip(quick, committed):
            for column in ("model_time_ms",) + _APART:
                if c[column]:
                    assert float(q[column]) >= float(c[column]), (column, q, c)
            if q["config"] != c["config"]:
                continue
            base = _TWO_PASS.get(q["impl"])
            apart = _APART + (_TIMED if base and two_pass[base, "quick"] != two_pass[base, "full"] else ())
            assert {k: v for k, v in q.items() if k not in apart} == {k: v for k, v in c.items() if k not in apart}
            exact.add(q["impl"])
        # the lean rows too: the model reads the lean kernel's configs without warp specialization, and --quick
        # compiles the first and last of those (the first it kept had been a warp-specialized one the model skips)
        assert {"fa3", "flash", model_dit.SPECULATIVE, model_dit.LEAN, model_dit.LEAN_SPECULATIVE} <= exact, exact


@pytest.mark.parametrize("block_m, block_n", [(128, 64), (128, 128), (64, 64)])
@pytest.mark.parametrize("layout", [dict(latent_frames=8, tokens_per_frame=32),
                                    dict(latent_frames=7, tokens_per_frame=48, text_before=20),
                                    dict(latent_frames=5, tokens_per_frame=70, text_after=33),
                                    dict(latent_frames=3, tokens_per_frame=200, text_before=100, text_after=7)])
def test_lean_blocks_count_what_the_lean_kernel_walks(layout, block_m, block_n):
    """model_dit.lean_blocks against a per (query block, key tile) reading of the lean kernel's speculative walk:
    a block with a video row walks each key tile that holds a text key or a key of one of the block's frames; a key
    tile is one frame id where its keys (up to N) are."""
    s = model_dit.Dit("t", 1, 64, **layout)
    ids = s.frames().tolist()
    n, blocks, walked = len(ids), 0, 0
    for r in range(0, n, block_m):
        frames = {f for f in ids[r:r + block_m] if f >= 0}
        if frames:
            blocks += 1
            walked += sum(any(f == -1 or f in frames for f in ids[c:c + block_n]) for c in range(0, n, block_n))
    single = sum(len(set(ids[c:c + block_n])) == 1 for c in range(0, n, block_n))
    assert model_dit.lean_blocks(s, block_m, block_n) == (blocks, walked, single)


@pytest.mark.parametrize("layout", [dict(latent_frames=8, tokens_per_frame=32),
                                    dict(latent_frames=7, tokens_per_frame=48, text_before=20),
                                    dict(latent_frames=5, tokens_per_frame=70, text_after=33)])
def test_guess_tiles_count_what_the_kernel_walks(layout):
    """model_dit.guess_tiles against a per (query block, key tile) reading of `_guess_max`'s rule: a block
    with a video row walks a tile with a text key or a key of a frame within the block's span."""
    ids = model_dit.Dit("t", 1, 64, **layout).frames().tolist()
    n, want = len(ids), 0
    for r in range(0, n, 64):
        rows = [f for f in ids[r:r + 64] if f >= 0]
        for c in range(0, n, 32):
            keys = ids[c:c + 32]
            want += bool(rows) and (-1 in keys or any(min(rows) <= f <= max(rows) for f in keys))
    assert model_dit.guess_tiles(model_dit.Dit("t", 1, 64, **layout).frames(), 64, 32) == want


@pytest.mark.parametrize("layout", [dict(latent_frames=8, tokens_per_frame=32),
                                    dict(latent_frames=7, tokens_per_frame=48, text_before=20),
                                    dict(latent_frames=5, tokens_per_frame=70, text_after=33)])
def test_one_id_tiles_count_the_key_tiles_of_one_frame_id(layout):
    """model_dit.one_id_tiles (the redo's tiles on its loop's short path) against a tile-by-tile reading: the
    keys of a tile, those past N read as -1, are one value."""
    ids = model_dit.Dit("t", 1, 64, **layout).frames()
    keys = ids.tolist()
    want = sum(len(set((keys + [-1] * 32)[c:c + 32])) == 1 for c in range(0, len(keys), 32))
    assert model_dit.one_id_tiles(ids, 32) == want > 0


def _column_by_loops(ids, block_m, block_n, frame_band):
    """Per (query block, key tile): whether the frame-id kernel takes one dA column, by loops."""
    n = len(ids)
    out = []
    for r in range(0, n, block_m):
        rows = [f for f in ids[r:r + block_m] if f >= 0]
        line = []
        for c in range(0, n, block_n):
            keys = ids[c:c + block_n] + [-1] * max(0, c + block_n - n)
            video = [f for f in keys if f >= 0]
            line.append(min(keys) == max(keys) or not video or not rows or min(video) - max(rows) >= frame_band
                        or min(rows) - max(video) >= frame_band)
        out.append(line)
    return out


@pytest.mark.parametrize("layout", [dict(latent_frames=8, tokens_per_frame=32),
                                    dict(latent_frames=7, tokens_per_frame=48, text_before=20),
                                    dict(latent_frames=9, tokens_per_frame=20, text_after=13)])
@pytest.mark.parametrize("sigma", [0.3, 1.3, math.inf])
def test_frame_tile_counts_split_every_tile_once(layout, sigma):
    """Every (query block, key tile) pair runs the row-max walk once and one softmax loop once, as
    a column tile or a per-score one, as _jit.frame_tile_id decides (an independent loop here)."""
    dit = model_dit.Dit("t", 1, 64, **layout)
    ids = dit.frames()
    n, block_m, block_n = dit.n, 64, 32
    counts = model_dit.frame_tile_counts(ids, block_m, block_n, sigma)
    blocks, tiles = math.ceil(n / block_m), math.ceil(n / block_n)
    assert counts["row_max"] == (blocks * tiles, 0)
    softmax = [counts[k] for k in model_dit.FRAME_LOOPS[1:]]
    coef = 0.0 if math.isinf(sigma) else -0.5 * roofline.LOG2E / sigma / sigma
    column = _column_by_loops(ids.tolist(), block_m, block_n, band_width(coef, 2 ** 25))
    assert sum(c + p for c, p in softmax) == blocks * tiles
    assert sum(c for c, _ in softmax) == sum(map(sum, column))
    if layout["tokens_per_frame"] % block_n == 0 and not layout.get("text_before"):
        assert all(p == 0 for _, p in softmax)  # every key tile holds one frame
    else:
        assert sum(p for _, p in softmax) > 0


def test_fit_status_and_cut_off():
    assert model_dit.fit_status(80e9, 80e9) == "ok"
    assert model_dit.fit_status(80.5e9, 80e9) == "does not fit (peak 80.5 GB > 80 GB)"
    assert model_dit.fits_up_to(4 * 1000 ** 2, 1000, 4 * 3000 ** 2) == 3000


def test_dit_sweep_says_does_not_fit_where_the_traced_peak_exceeds_the_memory(monkeypatch):
    """A small synthetic DiT on a GPU whose memory lies between the two eager peers' peaks: the peer
    above it gets "does not fit" and no time, the other a time; sdpa_bias holds two (B, H, N, N)
    tensors in q's dtype at once (the scores and the scaled scores)."""
    dit = model_dit.Dit("synthetic", heads=2, head_dim=64, latent_frames=4, tokens_per_frame=128)
    small = roofline.Gpu("synthetic", 3.35e12, 989.4e12, 66.9e12, 132, memory_bytes=0.0)
    def kernel(*_):  # ours and flash need the sm_90 compiler; their memory is Q, K, V, O either way (fa3's too)
        e = roofline.Estimate(bytes=1e6, mma_flops=1e9, launches=1, config="stub")
        return roofline.finish(e, small, 1.0)

    monkeypatch.setattr(model_dit, "ours_frames", kernel)
    monkeypatch.setattr(model_dit, "ours_frames_speculative", lambda *args: (kernel(), 0.1))
    monkeypatch.setattr(model_dit, "ours_lean", kernel)
    monkeypatch.setattr(model_dit, "flash", kernel)
    monkeypatch.setattr(model_dit, "fa3", kernel)
    monkeypatch.setattr(eager, "flash", kernel)  # sdpa_bias's fused kernel
    sdpa = eager.eager(PEERS["sdpa_bias"], 1, dit.heads, dit.n, 64, small, 1.0).peak_bytes
    reference = eager.eager(PEERS["reference_eager"], 1, dit.heads, dit.n, 64, small, 1.0).peak_bytes
    nn = dit.heads * dit.n ** 2
    assert 2 * nn * 2 <= sdpa < 3 * nn * 2
    assert reference != sdpa
    memory = (sdpa + reference) / 2
    monkeypatch.setitem(roofline.GPUS, "synthetic", roofline.Gpu("synthetic", 3.35e12, 989.4e12, 66.9e12, 132, memory))

    rows = {r["impl"]: r for r in model_dit.dit_sweep("synthetic", 1.0, 1.0, (dit,), progress=lambda _: None)}
    over, under = ("sdpa_bias", "reference_eager") if sdpa > reference else ("reference_eager",
                                                                                    "sdpa_bias")
    assert rows[over]["status"].startswith("does not fit (peak ") and "model_time_ms" not in rows[over]
    assert rows[under]["status"] == "ok" and rows[under]["model_time_ms"] > 0
    assert int(rows[over]["model_fits_up_to_n"]) < dit.n <= int(rows[under]["model_fits_up_to_n"])
    assert all(rows[i]["status"] == "ok" for i in ("vstar_triton_frames", "fa3", "flash", "flex_two_pass"))


def test_the_model_cli_numbers_each_row_on_stderr_as_it_goes(monkeypatch, tmp_path, capsys):
    """The full model runs for minutes: it first says what is to come, then a numbered line per row on stderr
    (unbuffered, so shown at once even when stdout goes to a file). The sm_90 compiles are stubbed: what is
    checked is the progress."""
    from tools.perf import model

    def kernel(batch, heads, n, *_, **__):
        return roofline.finish(roofline.Estimate(bytes=1e6 * n, mma_flops=1e9, launches=1, config="stub"),
                               roofline.GPUS["h100"], 1.0)

    for name in ("ours", "fa3", "flash"):
        monkeypatch.setattr(model, name, kernel)
    monkeypatch.setattr(model, "eager", lambda peer, *call: kernel(*call))
    monkeypatch.setattr(model, "calibrate", lambda gpu: (1.0, []))
    monkeypatch.setattr(model, "calibrate_fa3", lambda gpu: (0.0, []))
    monkeypatch.setattr(model, "tutorial_anchor", lambda gpu, eta: [])
    assert perf_main(["model", "--shapes", UNET, "--n", "16", "64", "--no-plots", "--out", str(tmp_path)]) == 0
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == ("calibrating on the published FlashAttention bars, then 4 rows; each compiles its kernels for "
                        "sm_90 (seconds each)")
    assert [line.split(" s] ")[1].split(":")[0] for line in lines[1:]] == [
        f"{gpu} {UNET} N={n}" for gpu in ("h100", "h200") for n in (16, 64)]
    assert [line.split(",")[0] for line in lines[1:]] == ["[1/4", "[2/4", "[3/4", "[4/4"]


def test_the_ratio_panels_draw_shapes_within_5_percent_as_one_line(tmp_path, monkeypatch):
    """Shapes whose modeled ratios lie within 5% at every N hid one another (eight legend entries, three lines
    seen): they share one line, its label naming them; a shape farther off keeps its own."""
    import matplotlib.pyplot as plt

    from tools.perf import model

    def rows_of(shape, ratios):
        return [dict(shape=shape, n=n, impl=impl, status="ok", model_time_ms=1.0, model_ours_over_fa3=r)
                for impl in model.OURS_SIGMA for n, r in zip((16, 32), ratios)]

    rows = rows_of("a", (1.0, 2.0)) + rows_of("b", (1.04, 1.95)) + rows_of("c", (1.2, 2.0))
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    model.plot(rows, "h100", tmp_path / "m.png")
    with roofline.quick_configs():  # a --quick run's picture says so: a left-out config may be faster
        model.plot(rows, "h100", tmp_path / "q.png")
    fig, quick = figures
    for ax in fig.axes[1:]:
        assert [line.get_label() for line in ax.get_lines()][:3] == ["a, b (within 5%)", "c",
                                                                     "target N <= 256: 1.0"]
    assert fig._suptitle.get_text().endswith("model, not measured")
    assert quick._suptitle.get_text().endswith("model, not measured (--quick: two configs a launch)")
    plt.close(fig)
    plt.close(quick)
