"""The roofline model's inputs: GPU peaks, per-loop costs read from the static statistics, the roofline
of one launch for our tiled and packed kernels, and the FlashAttention loop it is calibrated on.

See model.py for the model as a whole and benchmarks/NOTES.md ("Roofline model") for the sources.
"""

from __future__ import annotations

import csv
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from vstar_kernels.ops._jit import GAUSS_COEF_MIN, LOG2E, band_width
from vstar_kernels.ops.layout import DOT_MIN, block_dims, is_packed, pow2

from . import RESULTS
from .traffic import band_tiles, ideal_bytes, tiled_bytes


@dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU (sources: benchmarks/NOTES.md, "Roofline model")."""

    name: str
    hbm_bytes_s: float        # HBM bandwidth
    tensor_flop_s: float      # dense fp16/bf16 tensor-core FLOP/s
    fp32_flop_s: float        # fp32 FMA pipe (a float32 matmul without TF32)
    sms: int
    memory_bytes: float = 0.0  # HBM capacity (nominal, decimal GB)
    schedulers: int = 4       # warp schedulers per SM, one warp-instruction per clock each
    mufu_per_clk: int = 16    # MUFU (ex2) results per clock per SM
    arch: int = 90

    @property
    def clock_hz(self) -> float:
        """The clock behind the tensor peak: 4096 dense fp16 FLOP per clock per SM."""
        return self.tensor_flop_s / (self.sms * 4096)

    @property
    def issue_s(self) -> float:
        """Warp-instructions per second, all SMs."""
        return self.sms * self.schedulers * self.clock_hz

    @property
    def mufu_s(self) -> float:
        """MUFU lane results per second, all SMs."""
        return self.sms * self.mufu_per_clk * self.clock_hz


GPUS = {
    "h100": Gpu("H100 SXM5", 3.35e12, 989.4e12, 66.9e12, 132, 80e9),
    "h200": Gpu("H200 SXM", 4.8e12, 989.4e12, 66.9e12, 132, 141e9),
}
LAUNCH_S = 2e-6  # assumed gap per kernel launch in a timed loop; not measured
ITEMSIZE = 2     # fp16 and bf16
CALIBRATION_TILES = ((128, 64, 8, 3), (128, 128, 8, 2))  # (BLOCK_M, BLOCK_N, warps, stages)
# Published FlashAttention-2 forward throughput on H100 SXM5, fp16, no causal mask: (D, N, TFLOP/s).
# FlashAttention-3 paper (Shah et al., arXiv:2407.08608), forward-speed panels "Attention forward
# speed, head dim 64 / 128 (H100 80GB SXM5)" without the causal mask; batch x sequence = 16k
# tokens, hidden 2048 (heads = 2048 / D). Values as labelled on the bars (benchmarks/NOTES.md says
# how the non-causal panels were told apart).
FA2_SOURCE = ("FlashAttention-3 paper, arXiv:2407.08608, panel 'Attention forward speed, head dim {} (H100 80GB "
              "SXM5)', no causal mask, FlashAttention-2 bar; labels as transcribed at "
              "https://subtext.edge.nugit.net/image/{}")
PUBLISHED_FA2 = (
    (64, 4096, 321.0, "55f47a106c25f22983b2741a7e8bcdbaec8521b6a583d130c6f92b94e0f65924"),
    (64, 8192, 322.0, "55f47a106c25f22983b2741a7e8bcdbaec8521b6a583d130c6f92b94e0f65924"),
    (64, 16384, 324.0, "55f47a106c25f22983b2741a7e8bcdbaec8521b6a583d130c6f92b94e0f65924"),
    (128, 4096, 368.0, "e27582d2db385c9bac87ebc92343d2452b7c01d5d934e596c90172b346d00d42"),
    (128, 8192, 370.0, "e27582d2db385c9bac87ebc92343d2452b7c01d5d934e596c90172b346d00d42"),
    (128, 16384, 370.0, "e27582d2db385c9bac87ebc92343d2452b7c01d5d934e596c90172b346d00d42"),
)
CALIBRATION_TOKENS, CALIBRATION_HIDDEN = 16384, 2048


@dataclass(frozen=True)
class LoopCost:
    """Per score element of one loop kind: warp-instructions and MUFU warp-instructions; the
    CTAs per SM of the kernel it was read from."""

    instr: float
    mufu: float
    ctas_per_sm: int
    source: str


@dataclass
class Estimate:
    """One modeled launch sequence: the terms of its roofline and the modeled seconds."""

    bytes: float = 0.0
    mma_flops: float = 0.0
    instr: float = 0.0
    mufu: float = 0.0
    launches: int = 0
    seconds: float = 0.0
    bound: str = ""
    config: str = ""
    peak_bytes: float = 0.0  # eager peers: the most tensor bytes live at once (OpCounter)
    terms: dict | None = None  # finish: each roofline term's seconds (compute terms with the wave stretch)


# --------------------------------------------------------------------------- the static statistics

def results_dir() -> Path:
    """The committed results of this checkout (benchmarks/results): the model reads its static rows there."""
    return RESULTS


@functools.lru_cache(maxsize=4)
def static_rows(arch: int = 90) -> tuple:
    """The committed static-sm<arch>.csv rows, fp16, forward."""
    with open(results_dir() / f"static-sm{arch}.csv") as f:
        return tuple(r for r in csv.DictReader(f) if r["case"].startswith("fp16 ") and "+bwd" not in r["case"])


def _cost(r: dict) -> LoopCost:
    return LoopCost(float(r["instr_per_score"]), float(r["mufu_per_score"]), int(r["ctas_per_sm"]),
                    f"{r['kernel']} {r['tile']} {r['config']}")


def _case_rows(kernel: str, case_has: str = "") -> list:
    """The static rows of `kernel` in the plain case (or the one whose case names `case_has`)."""
    return [r for r in static_rows() if r["kernel"] == kernel
            and (case_has in r["case"] if case_has else r["case"].endswith(" "))]


def tiled_configs(delta: bool = False) -> tuple:
    """(BLOCK_M, BLOCK_N, config) of every tiled config static-sm90.csv compiles for the row-max
    Gaussian, or with a custom delta (whose pruning keeps smaller tiles): in fp16 at D 64, every
    config the sm_90 pruning keeps there."""
    return tuple(dict.fromkeys((*map(int, r["tile"].split("x")), r["config"])
                               for r in _case_rows("_tar_fwd_tiled_kernel", " delta" if delta else "")
                               if r["loop"] == "hot"))


@functools.lru_cache(maxsize=32)
def kept_configs(d: int, delta: bool = False, arch: int = 90) -> frozenset:
    """The tiled forward's configs (static.py's config text) the sm_`arch` pruning keeps for the row
    max in fp16 at head dim d, of the Gaussian or a custom delta: the autotuner's choices there."""
    from vstar_kernels.ops import tar_fwd
    from vstar_kernels.ops._jit import targeting

    from .compile_check import config_text

    block_d, block_dv = block_dims(d, d)
    with targeting(arch):
        kept = tar_fwd._prune_tiled(tar_fwd._tiled_configs(), {"Q": torch.empty(0, dtype=torch.float16)},
                                    BLOCK_D=block_d, BLOCK_DV=block_dv, REGULARIZE=True, HAS_DELTA=delta,
                                    GLOBAL_MAX=False, HAS_FRAMES=False)
    return frozenset(map(config_text, kept))


# The tiled forward's MMA loops in source order (ops/tar_fwd.py), which static.py's `loop` = 1, 2, ...
# (SASS order) follows: the one-pass row max of the Gaussian runs the off-band tiles left of the
# band (full tiles, then the masked partial one), right of it (the same), the band's QK^T walk for
# the row max and the band's biased softmax; a custom delta (the whole row is the band) runs the
# walk over every tile, then the biased softmax.
ONE_PASS_LOOPS = ("plain_left", "masked_left", "plain_right", "masked_right", "row_max", "biased")
TWO_PASS_LOOPS = ("row_max", "biased")


def loop_costs(config: str, delta: bool = False) -> dict:
    """Cost per score element of each loop kind of the tiled forward in `config` (static.py's config text):
    the per-loop rows of static-sm90.csv in ONE_PASS_LOOPS order (row max of the Gaussian), or
    TWO_PASS_LOOPS (with a custom delta: the delta case's kernel).

    Checked against what the loops must be: the row-max walk issues only Q K^T (fewer MMA
    instructions than the others) and no MUFU; the biased loop has the most MUFU per score (the
    Gaussian's exp2 beside the softmax's).
    """
    loops = [r for r in _case_rows("_tar_fwd_tiled_kernel", " delta" if delta else "")
             if r["config"] == config and r["loop"] != "hot"]
    kinds = TWO_PASS_LOOPS if delta else ONE_PASS_LOOPS
    if len(loops) != len(kinds):
        raise LookupError(f"static-sm90.csv has {len(loops)} loop rows for the tiled kernel {config}"
                          f"{' delta' if delta else ''}, expected {len(kinds)} ({', '.join(kinds)}): run `bench "
                          "--static`, or update ONE_PASS_LOOPS / TWO_PASS_LOOPS to the kernel")
    costs = dict(zip(kinds, (_cost(r) for r in sorted(loops, key=lambda r: int(r["loop"])))))
    walk, biased = costs["row_max"], costs["biased"]
    mma = {kind: int(r["loop_mma"]) for kind, r in zip(kinds, sorted(loops, key=lambda r: int(r["loop"])))}
    if walk.mufu or mma["row_max"] >= max(mma.values()) or biased.mufu < max(c.mufu for c in costs.values()):
        raise LookupError(f"the tiled kernel's loops in static-sm90.csv ({config}) are not in the order "
                          f"{', '.join(kinds)}: update ONE_PASS_LOOPS / TWO_PASS_LOOPS")
    return costs


def band(n: int, sigma) -> int | None:
    """The band width the launcher gives the tiled kernel for the row max of a Gaussian of `sigma`
    (ops/_jit.band_width, limit Nq + Nk); None for the two-pass form (a custom delta)."""
    if sigma is None:
        return None
    return band_width(max(GAUSS_COEF_MIN, -0.5 * LOG2E / sigma / sigma), 2 * n)


def tile_counts(n: int, block_m: int, block_n: int, sigma) -> dict:
    """Key tiles per (batch, head) sequence of each loop kind, summed over its query blocks:
    {kind: (tiles, key rows loaded)}; a partial last tile loads only the keys < N.

    Row max of the Gaussian (sigma a number): the kernel's tile ranges (ops/tar_fwd.py) around the
    band of `band(n, sigma)`: off-band full tiles run a plain loop, the partial last tile off the
    band a masked plain loop, band tiles one QK^T walk and one biased loop. sigma None (a custom
    delta): every tile is in the band, walked and then biased.
    """
    w = band(n, sigma)
    counts = dict.fromkeys(TWO_PASS_LOOPS if w is None else ONE_PASS_LOOPS, (0, 0))

    def add(kind, lo, hi):
        if hi > lo:
            tiles, keys = counts[kind]
            counts[kind] = (tiles + math.ceil((hi - lo) / block_n), keys + min(hi, n) - lo)

    full_hi = n // block_n * block_n
    for mb in range(math.ceil(n / block_m)):
        lo, hi = (0, n) if w is None else band_tiles(mb, n, block_m, block_n, w)
        if w is not None:
            left, right = min(lo, full_hi), max(hi, full_hi)
            add("plain_left", 0, left)
            add("masked_left", left, lo)
            add("plain_right", hi, right)
            add("masked_right", right, n)
        add("row_max", lo, hi)
        add("biased", lo, hi)
    return counts


# --------------------------------------------------------------------------- roofline of a launch

def waves_stretch(programs: int, ctas_per_sm: int, gpu: Gpu) -> float:
    slots = gpu.sms * max(ctas_per_sm, 1)
    return math.ceil(programs / slots) * slots / programs


def finish(e: Estimate, gpu: Gpu, eta: float, waves: float = 1.0) -> Estimate:
    """Fill e.seconds and e.bound: the largest of its terms (compute terms times `waves`) + launches."""
    terms = {"memory": e.bytes / gpu.hbm_bytes_s,
             "mma": waves * e.mma_flops / (eta * gpu.tensor_flop_s),
             "issue": waves * e.instr / gpu.issue_s,
             "mufu": waves * e.mufu * 32 / gpu.mufu_s}
    e.bound = max(terms, key=terms.get)
    e.seconds = terms[e.bound] + e.launches * LAUNCH_S
    e.terms = terms
    return e


def tiled_work(bh, n, d, kinds: dict, block_m, block_n, sigma=1.0, delta: bool = False,
               frame_ids: bool = False) -> Estimate:
    """Bytes and MMA FLOPs of one tiled launch over `bh` sequences: bytes as the algorithm requests
    them (traffic.tiled_bytes: the one-pass band of `sigma`, or with a custom delta the two-pass
    form and the delta entries once); MMA over whole (BLOCK_M, BLOCK_N) tiles of each loop kind
    (`tile_counts`), Q K^T only in the row-max walk, at the padded BLOCK_D."""
    bd, bdv = block_dims(d, d)
    e = Estimate(bytes=bh * tiled_bytes(n, n, d, d, ITEMSIZE, block_m, block_n,
                                        band=None if delta else band(n, sigma),
                                        delta_itemsize=ITEMSIZE if delta else 0, frame_ids=frame_ids),
                 launches=1)
    for kind, (tiles, _) in kinds.items():
        e.mma_flops += bh * tiles * 2 * block_m * block_n * (bd if kind == "row_max" else bd + bdv)
    return e


def _loops(e: Estimate, bh, n, kinds: dict, costs: dict, block_m, block_n, gpu, eta) -> Estimate:
    """e plus each loop kind's instructions and MUFU per score element over its tiles, finished."""
    for kind, (tiles, _) in kinds.items():
        e.instr += bh * tiles * block_m * block_n * costs[kind].instr
        e.mufu += bh * tiles * block_m * block_n * costs[kind].mufu
    ctas = min(costs[k].ctas_per_sm for k, (t, _) in kinds.items() if t)
    return finish(e, gpu, eta, waves_stretch(bh * math.ceil(n / block_m), ctas, gpu))


def short_config(config: str) -> str:
    """'BLOCK_M=128 BLOCK_N=64 warps=8 stages=3' -> '8w 3st'."""
    fields = dict(f.split("=") for f in config.split())
    return f"{fields['warps']}w {fields['stages']}st"


def ours(bh: int, n: int, d: int, gpu: Gpu, eta: float, sigma: float = 1.0, delta: bool = False) -> Estimate:
    """Modeled `vstar_triton` forward (row max, not causal; the Gaussian of `sigma` in one pass, or a
    custom (B, H, N, N) delta in q's dtype, read once, in two): the fastest config. Tiled: the configs
    the sm_90 pruning keeps at head dim d, each with the loop costs compiled at D 64."""
    if is_packed(n, n, d, d):
        return min((_packed(bh, n, d, rows, cost, gpu, eta, delta) for rows, cost in packed_costs(n, d, delta)),
                   key=lambda e: e.seconds)
    out = []
    for bm, bn, config in tiled_configs(delta):
        if config not in kept_configs(d, delta):
            continue
        kinds = tile_counts(n, bm, bn, None if delta else sigma)
        e = tiled_work(bh, n, d, kinds, bm, bn, sigma, delta)
        e.config = f"tiled {bm}x{bn} {short_config(config)}"
        out.append(_loops(e, bh, n, kinds, loop_costs(config, delta), bm, bn, gpu, eta))
    if not out:
        raise LookupError(f"static-sm90.csv has none of the tiled configs the pruning keeps at D {d}: run "
                          "`tools.perf static`")
    return min(out, key=lambda e: e.seconds)


def packed_work(bh, n, d, rows) -> Estimate:
    """Bytes and MMA FLOPs of the packed launch: SEQS = ROWS // SEG sequences per program (SEG: N
    padded to a power of two >= DOT_MIN), one Q K^T and one P V product of SEG x SEG per sequence,
    empty slots of the last program included; Q, K, V read and O written once (traffic.ideal_bytes)."""
    seg = pow2(n, DOT_MIN)
    seqs = rows // seg
    bd, bdv = block_dims(d, d)
    programs = math.ceil(bh / seqs)
    return Estimate(bytes=ideal_bytes(bh, n, n, d, d, ITEMSIZE),
                    mma_flops=programs * seqs * 2 * seg * seg * (bd + bdv), launches=1, config=f"packed ROWS={rows}")


@functools.lru_cache(maxsize=64)
def packed_costs(n: int, d: int, delta: bool = False, arch: int = 90) -> tuple:
    """((ROWS, LoopCost), ...) of the packed forward at N x N and head dim d (fp16, (B, N, H, D)
    storage; with a custom delta: the delta case's kernel), compiled for sm_`arch` as `bench
    --static` compiles (compile_check: the JIT's specialization, the first and last pruned config).

    static-sm90.csv holds the packed kernel at N = 16 only; its instructions per score element fall
    with N (per-program loads and stores spread over more scores), so each packed (N, D) is
    compiled here rather than extrapolated."""
    import triton

    from . import compile_check
    from .static import row

    if triton.knobs.runtime.interpret:
        raise RuntimeError("tools.perf model compiles the packed kernel for sm_90: run it without TRITON_INTERPRET=1")
    out = []

    def add(compiled):
        if compiled.name == "_tar_fwd_packed_kernel":
            r = row(arch, compiled)
            out.append((compiled.constants["ROWS"], LoopCost(r.instr_per_score, r.mufu_per_score, r.ctas_per_sm,
                                                             f"{r.kernel} {r.tile} {r.config}")))

    compile_check.check(arch, False, add, [(torch.float16, (2, 8, n, n, d, d), dict(delta=True) if delta else {})],
                        backward=False)
    return tuple(out)


def _packed(bh, n, d, rows, cost: LoopCost, gpu, eta, delta: bool = False) -> Estimate:
    """The packed kernel, modeled: `packed_work` (+ the delta's N^2 entries per sequence) plus the
    compiled kernel's instructions per score element (`packed_costs`) over SEQS x SEG x SEG scores
    per program."""
    e = packed_work(bh, n, d, rows)
    e.bytes += bh * n * n * ITEMSIZE if delta else 0
    seg = pow2(n, DOT_MIN)
    programs, elements = math.ceil(bh / (rows // seg)), rows // seg * seg * seg
    e.instr = programs * elements * cost.instr
    e.mufu = programs * elements * cost.mufu
    return finish(e, gpu, eta, waves_stretch(programs, cost.ctas_per_sm, gpu))


# --------------------------------------------------------------------------- FlashAttention (the calibrated plain loop)

@functools.lru_cache(maxsize=8)
def calibration_costs(block_d: int, arch: int = 90) -> tuple:
    """((BLOCK_M, BLOCK_N, LoopCost), ...) of the plain-attention baseline compiled for sm_`arch`
    in CALIBRATION_TILES at head dim `block_d`, as `tools.perf static` compiles (tools/perf/static.py)."""
    import triton

    from .baseline import plain_attention_kernel
    from .compile_check import Launch, compile_launch
    from .static import row

    if triton.knobs.runtime.interpret:
        raise RuntimeError("tools.perf model compiles the plain-attention baseline for sm_90: run it without "
                           "TRITON_INTERPRET=1")
    out = []
    for bm, bn, warps, stages in CALIBRATION_TILES:
        q = torch.empty(2, 2, 512, block_d, dtype=torch.float16)
        args = (q, q, q, q, *q.stride(), *q.stride(), *q.stride(), *q.stride(), 2, 512, 512, block_d, block_d,
                block_d ** -0.5)
        kwargs = dict(BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=block_d, BLOCK_DV=block_d, num_warps=warps, num_stages=stages)
        compiled = compile_launch(Launch(plain_attention_kernel, args, kwargs), arch, False, "calibration")[0]
        r = row(arch, compiled)
        out.append((bm, bn, LoopCost(r.instr_per_score, r.mufu_per_score, r.ctas_per_sm,
                                     f"plain_attention_kernel {r.tile} D{block_d} {r.config}")))
    return tuple(out)


def flash(bh: int, n: int, d: int, gpu: Gpu, eta: float) -> Estimate:
    """The FlashAttention-style plain loop on the same call: the faster calibration tile."""
    bd = block_dims(d, d)[0]
    if bd > 128:
        raise ValueError(f"the calibration compiles head dims 64 and 128, got BLOCK_D {bd}")
    estimates = []
    for bm, bn, cost in calibration_costs(max(bd, 64)):
        blocks = math.ceil(n / bm)
        kinds = {"plain": (blocks * math.ceil(n / bn), blocks * n)}
        # Q, O once; K, V once per query block; MMA over whole tiles
        e = Estimate(bytes=bh * (n + blocks * n) * 2 * d * ITEMSIZE, launches=1, config=f"flash {bm}x{bn}",
                     mma_flops=bh * kinds["plain"][0] * 2 * bm * bn * (bd + block_dims(d, d)[1]))
        estimates.append(_loops(e, bh, n, kinds, {"plain": cost}, bm, bn, gpu, eta))
    return min(estimates, key=lambda e: e.seconds)


def calibrate(gpu: Gpu) -> tuple:
    """(ETA, rows): the MMA efficiency minimizing the worst |log(model / published)| over
    PUBLISHED_FA2, scanned in steps of 0.005; a row per point with the fitted and unfitted ratio."""
    def ratios(eta):
        out = []
        for d, n, _, _ in PUBLISHED_FA2:
            bh = CALIBRATION_TOKENS // n * (CALIBRATION_HIDDEN // d)
            out.append(4 * bh * n * n * d / flash(bh, n, d, gpu, eta).seconds / 1e12)
        return out

    grid = [round(0.005 * i, 3) for i in range(20, 201)]
    eta = min(grid, key=lambda x: max(abs(math.log(m / p[2])) for m, p in zip(ratios(x), PUBLISHED_FA2)))
    fitted, unfitted = ratios(eta), ratios(1.0)
    rows = []
    for (d, n, published, image), mf, mu in zip(PUBLISHED_FA2, fitted, unfitted):
        bh = CALIBRATION_TOKENS // n * (CALIBRATION_HIDDEN // d)
        rows.append(dict(d=d, n=n, bh=bh, published_tflops=published, model_tflops=round(mf, 1),
                         model_over_published=round(mf / published, 3), unfitted_model_tflops=round(mu, 1),
                         unfitted_over_published=round(mu / published, 3), source=FA2_SOURCE.format(d, image)))
    return eta, rows


