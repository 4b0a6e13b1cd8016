"""`bench --model`: a roofline model of one forward call on an H100 or H200, without a GPU.

Every number it writes is a model, not a measurement. Per kernel launch the modeled time is

    max(bytes / HBM bandwidth, MMA FLOPs / (ETA * peak tensor FLOP/s),
        warp-instructions / issue rate, MUFU warp-instructions * 32 / MUFU rate) + LAUNCH_S

with the compute terms (MMA, issue, MUFU) stretched by wave quantization: a launch of P programs
with c CTAs resident per SM runs ceil(P / (SMs * c)) rounds, so the busiest SM does
ceil(P / (SMs c)) * SMs c / P times the average share. What goes in:

* ours (`vstar_triton` at the Gaussian's sigma of OURS_SIGMA, `vstar_triton_delta`): bytes as
  `bench --traffic` counts them (packed: Q, K, V read and O written once, traffic.ideal_bytes;
  tiled: traffic.tiled_bytes, the one-pass band of the row-max Gaussian or the two-pass form of a
  custom delta), MMA FLOPs as issued (whole tiles: BLOCK_D padding, the packed SEG x SEG products
  of every sequence slot), warp-instructions and MUFU per score element: tiled, of each loop of
  the kernel from its own row of the committed static-sm90.csv (`loop_costs`), times the score
  elements each loop computes (`tile_counts`: the kernel's tile ranges around the band); packed,
  of the kernel compiled for sm_90 at the call's N and head dim (`packed_costs`). The
  autotuner's choice is modeled as the fastest config: tiled, of every config the sm_90 pruning
  keeps at the call's head dim (`kept_configs`); packed, of the first and the last pruned.
* FlashAttention (`flash`): the plain-attention baseline (bench/baseline.py) compiled for sm_90 in
  FlashAttention-2-like tiles (CALIBRATION_TILES) at BLOCK_D 64 and 128, one "plain" loop, the
  faster tile; `sdpa_plain` is modeled by it.
* eager peers: their aten ops on meta tensors under a TorchDispatchMode; each op's bytes are its
  input plus output tensor bytes (views and allocations are free), matmul FLOPs 2 M N K; each op
  is memory- or FLOP-bound on its own, plus LAUNCH_S. SDPA with a mask (`sdpa_bias`) is one fused
  kernel on a GPU: the flash model plus reading the mask.
* calibration: the flash model at the published FlashAttention-2 H100 points (PUBLISHED_FA2);
  ETA, the one fitted parameter, is the MMA efficiency that minimizes the worst |log ratio|
  over those points. The unfitted model (ETA = 1) is reported beside it.

With --dit (`dit_main`): the video DiT self-attention shapes of DIT_SHAPES instead, ours with frame
ids (the HAS_FRAMES kernel's own loops, `frames_loop_costs`), flash, flex_two_pass and the eager peers
that materialize the bias, whose rows say "does not fit" where the peak counted in their meta trace
exceeds the GPU's memory (benchmarks/NOTES.md, "DiT shapes (model)").

See benchmarks/NOTES.md ("Roofline model") for the sources of every constant.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops._jit import GAUSS_COEF_MIN, LOG2E, band_width, frame_band_width
from ..ops.layout import DOT_MIN, block_dims, is_packed, pow2
from . import shapes
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

def _results_dir() -> Path:
    from .harness import default_results_dir

    return default_results_dir()


@functools.lru_cache(maxsize=4)
def static_rows(arch: int = 90) -> tuple:
    """The committed static-sm<arch>.csv rows, fp16, forward."""
    with open(_results_dir() / f"static-sm{arch}.csv") as f:
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
    from ..ops import tar_fwd
    from ..ops._jit import targeting
    from ..ops.compile_check import config_text

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

def _waves(programs: int, ctas_per_sm: int, gpu: Gpu) -> float:
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
    return finish(e, gpu, eta, _waves(bh * math.ceil(n / block_m), ctas, gpu))


def _short(config: str) -> str:
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
        e.config = f"tiled {bm}x{bn} {_short(config)}"
        out.append(_loops(e, bh, n, kinds, loop_costs(config, delta), bm, bn, gpu, eta))
    if not out:
        raise LookupError(f"static-sm90.csv has none of the tiled configs the pruning keeps at D {d}: run "
                          "`bench --static`")
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

    from ..ops import compile_check
    from .static import row

    if triton.knobs.runtime.interpret:
        raise RuntimeError("bench --model compiles the packed kernel for sm_90: run it without TRITON_INTERPRET=1")
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
    return finish(e, gpu, eta, _waves(programs, cost.ctas_per_sm, gpu))


# --------------------------------------------------------------------------- FlashAttention (the calibrated plain loop)

@functools.lru_cache(maxsize=8)
def calibration_costs(block_d: int, arch: int = 90) -> tuple:
    """((BLOCK_M, BLOCK_N, LoopCost), ...) of the plain-attention baseline compiled for sm_`arch`
    in CALIBRATION_TILES at head dim `block_d`, as `bench --static` compiles (bench/static.py)."""
    import triton

    from ..ops.compile_check import Launch, compile_launch
    from .baseline import plain_attention_kernel
    from .static import row

    if triton.knobs.runtime.interpret:
        raise RuntimeError("bench --model compiles the plain-attention baseline for sm_90: run it without "
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


# --------------------------------------------------------------------------- eager peers

_FREE = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh"}
_MATMUL = {"bmm", "mm", "matmul", "addmm", "baddbmm"}


def _tensor_bytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class OpCounter(TorchDispatchMode):
    """Sums each aten op's roofline on the tensors it sees: bytes of its tensor inputs (an `out=`
    and the destination of copy_ are written, not read) and outputs, matmul FLOPs; views and
    allocations cost nothing. Also tracks the bytes of the storages live at once (`peak`): the
    `inputs` held throughout, and every storage an op returns, until its last tensor is freed."""

    def __init__(self, gpu: Gpu, eta: float, inputs=()):
        super().__init__()
        self.gpu, self.eta = gpu, eta
        self.total = Estimate()
        self.held, self.live, self.peak = {}, 0, 0
        self._keep = list(inputs)
        for t in inputs:
            self._hold(t)

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.held:
            self.held[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.held[key][0] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key) -> None:
        entry = self.held[key]
        entry[0] -= 1
        if not entry[0]:
            self.live -= entry[1]
            del self.held[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._hold(t)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE or name.startswith("_unsafe_view"):
            return out
        reads = list(args[1:] if name == "copy_" else args) + [v for k, v in kwargs.items() if k != "out"]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        op = Estimate(launches=1)
        op.bytes = (sum(_tensor_bytes(t) for t in reads if isinstance(t, torch.Tensor))
                    + sum(_tensor_bytes(t) for t in outs if isinstance(t, torch.Tensor)))
        if name in _MATMUL:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            op.mma_flops = 2 * a.numel() * b.shape[-1]
        self.add(op, args[0].dtype if args and isinstance(args[0], torch.Tensor) else torch.float32)
        return out

    def add(self, op: Estimate, dtype: torch.dtype) -> None:
        peak = self.gpu.tensor_flop_s * self.eta if dtype in (torch.float16, torch.bfloat16) else self.gpu.fp32_flop_s
        seconds = max(op.bytes / self.gpu.hbm_bytes_s, op.mma_flops / peak) + op.launches * LAUNCH_S
        t = self.total
        t.bytes += op.bytes
        t.mma_flops += op.mma_flops
        t.launches += op.launches
        t.seconds += seconds


def _fused_sdpa(counter: OpCounter):
    """SDPA as the GPU runs it with a mask: one fused kernel, modeled as the flash loop plus the mask read."""
    def sdpa(q, k, v, attn_mask=None, **_):
        bh, n, d = q.shape[0] * q.shape[1], q.shape[2], q.shape[3]
        e = flash(bh, n, d, counter.gpu, counter.eta)
        mask = _tensor_bytes(attn_mask) if attn_mask is not None else 0
        counter.total.bytes += e.bytes + mask
        counter.total.mma_flops += e.mma_flops
        counter.total.launches += e.launches
        counter.total.seconds += e.seconds + mask / counter.gpu.hbm_bytes_s
        return torch.empty(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    return sdpa


def _count_once(peer, batch, heads, n, d, gpu, eta) -> Estimate:
    import torch.nn.functional as F

    from .peers import default_spec

    q, k, v = (torch.empty(batch, n, heads, d, device="meta", dtype=torch.float16).transpose(1, 2) for _ in range(3))
    spec = default_spec(d)
    with torch.no_grad():
        peer.run(q, k, v, spec)  # warm the peers' caches, as the harness's warm-up call does
        counter = OpCounter(gpu, eta, (q, k, v))
        saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fused_sdpa(counter)
        try:
            with counter:
                peer.run(q, k, v, spec)
        finally:
            F.scaled_dot_product_attention = saved
    counter.total.bound = "per-op"
    counter.total.peak_bytes = counter.peak
    return counter.total


def eager(peer, batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float) -> Estimate:
    """An eager peer's summed per-op roofline. Large calls are counted at batch b and 2b (b: about
    64 reference chunks of score elements) and extrapolated linearly to `batch`: the chunked
    references repeat the same ops per chunk, the others scale with the batch."""
    b = min(batch, max(1, math.ceil(64 * (1 << 22) / (heads * n * n))))
    one = _count_once(peer, b, heads, n, d, gpu, eta)
    if b == batch:
        return one
    two = _count_once(peer, 2 * b, heads, n, d, gpu, eta)
    f = (batch - b) / b
    lin = lambda x, y: x + (y - x) * f  # noqa: E731
    return Estimate(bytes=lin(one.bytes, two.bytes), mma_flops=lin(one.mma_flops, two.mma_flops),
                    launches=round(lin(one.launches, two.launches)), seconds=lin(one.seconds, two.seconds),
                    bound="per-op", peak_bytes=lin(one.peak_bytes, two.peak_bytes))


# --------------------------------------------------------------------------- the sweep

EAGER = ("reference_eager", "reference_materialized", "sdpa_bias")
NOT_MODELED = ("reference_compiled", "vstar_cuda", "xformers_bias")
# The Gaussian's sigma of each row of ours (paper presets, tar_config.PRESETS: 64D1 at level 0, the
# default; 64D8, the widest band of the presets at sigma <= 8); the delta row has no sigma.
OURS_SIGMA = {"vstar_triton": 1.0, "vstar_triton_sigma8": 8.0}
IMPLS = ("vstar_triton", "vstar_triton_sigma8", "vstar_triton_delta", "flash", "sdpa_plain", "flex_two_pass") + EAGER + NOT_MODELED
COLUMNS = ("estimate", "gpu", "shape", "batch_heads", "d", "n", "dtype", "impl", "sigma", "status", "config", "bound",
           "model_time_ms", "model_bytes", "model_mma_flops", "model_launches", "model_ours_over_flash",
           "model_reference_eager_over_ours")


def not_modeled(name: str) -> str:
    """The status of a peer the model has no row for, and why."""
    from .peers import PEERS

    if name == "reference_compiled":
        return "not modeled: a torch.compile graph; Inductor's fusion is not what the eager op count sees"
    if name == "vstar_cuda":
        return ("not modeled: the optional CUDA C++ extension has no compiled-code statistics "
                "(bench --static compiles the Triton kernels)")
    why = PEERS[name].why_not(torch.device("cpu"), torch.float16)
    return f"not modeled: {why}" if why else "not modeled: its fused kernel has no model here"


def sweep(gpu_key: str, names, ns, eta: float, progress=print) -> list:
    """Rows of the model for every impl on each named kernel shape x N (fp16; bf16 is the same)."""
    from .peers import PEERS

    gpu = GPUS[gpu_key]
    reasons = {name: not_modeled(name) for name in NOT_MODELED}
    rows = []
    for name in names:
        s = shapes.SHAPES[name]
        bh = s.batch * s.heads
        for n in ns:
            est = {impl: ours(bh, n, s.head_dim, gpu, eta, sigma) for impl, sigma in OURS_SIGMA.items()}
            est.update(flash=flash(bh, n, s.head_dim, gpu, eta),
                       vstar_triton_delta=ours(bh, n, s.head_dim, gpu, eta, delta=True))
            est["sdpa_plain"] = est["flash"]
            two = flash(bh, n, s.head_dim, gpu, eta)
            est["flex_two_pass"] = Estimate(2 * two.bytes, 2 * two.mma_flops, 2 * two.instr, 2 * two.mufu, 2,
                                            2 * two.seconds, two.bound, "2 x " + two.config + " (lower bound)")
            for peer in EAGER:
                est[peer] = eager(PEERS[peer], s.batch, s.heads, n, s.head_dim, gpu, eta)
            base = dict(estimate="model", gpu=gpu_key, shape=name, batch_heads=bh, d=s.head_dim, n=n, dtype="fp16")
            ratio = {impl: est[impl].seconds / est["flash"].seconds for impl in OURS_SIGMA}
            eager_s = est["reference_eager"].seconds
            for impl in IMPLS:
                if impl in est:
                    e = est[impl]
                    rows.append({**base, "impl": impl, "sigma": OURS_SIGMA.get(impl, ""), "status": "ok",
                                 "config": e.config, "bound": e.bound,
                                 "model_time_ms": round(e.seconds * 1e3, 6), "model_bytes": int(e.bytes),
                                 "model_mma_flops": int(e.mma_flops), "model_launches": e.launches,
                                 "model_ours_over_flash": round(e.seconds / est["flash"].seconds, 3)
                                 if impl.startswith("vstar_triton") else "",
                                 "model_reference_eager_over_ours": round(eager_s / e.seconds, 2)
                                 if impl in OURS_SIGMA else ""})
                else:
                    rows.append({**base, "impl": impl, "status": reasons[impl]})
            progress(f"  {gpu_key} {name} N={n}: ours {est['vstar_triton'].seconds * 1e3:.4f} ms "
                     f"({est['vstar_triton'].bound}), ours/flash {ratio['vstar_triton']:.2f} (sigma 8: "
                     f"{ratio['vstar_triton_sigma8']:.2f}), reference_eager/ours "
                     f"{eager_s / est['vstar_triton'].seconds:.1f}x (model)")
    return rows


def assumptions(gpu_key: str, eta: float) -> list:
    """The lines printed and written beside every table."""
    g = GPUS[gpu_key]
    return [
        f"MODEL, not a measurement. {g.name}: HBM {g.hbm_bytes_s / 1e12:.2f} TB/s, dense fp16/bf16 tensor "
        f"{g.tensor_flop_s / 1e12:.1f} TFLOP/s, fp32 {g.fp32_flop_s / 1e12:.1f} TFLOP/s, {g.sms} SMs at "
        f"{g.clock_hz / 1e9:.2f} GHz (the clock behind the tensor peak: 4096 FLOP/clk/SM), {g.schedulers} warp "
        f"schedulers x 1 warp-instruction/clk per SM, MUFU {g.mufu_per_clk} results/clk/SM.",
        "Per kernel launch: max(bytes / HBM, MMA FLOPs / (ETA x tensor peak), warp-instructions / issue rate, "
        "MUFU x 32 / MUFU rate) + launch gap; compute terms stretched by wave quantization over the SMs "
        "(CTAs/SM from the static occupancy).",
        f"ETA = {eta:.3f}: the one fitted parameter (MMA efficiency), fitted on published FlashAttention-2 H100 "
        "forward throughput (calibration rows); applied to every tensor-core MMA, ours and peers alike.",
        f"Launch gap {LAUNCH_S * 1e6:.0f} us per kernel (assumed, not measured); ours: 1 launch (row max).",
        "Ours, packed (N <= 128; 64 above head dim 128): Q, K, V, O once; MMA as issued: one SEG x SEG Q K^T and "
        "P V per sequence slot (SEG = N padded to a power of two >= 16), empty slots of the last program included; "
        "instructions/MUFU per score element (SEQS x SEG x SEG per program) of the packed kernel compiled for sm_90 "
        "at the row's N and head dim (first and last pruned config, as bench --static compiles).",
        "Ours, tiled, row max of the Gaussian (one pass; sigma column: 1 = preset 64D1, 8 = 64D8): bytes "
        "traffic.tiled_bytes over the band of ops/_jit.band_width (Q, O once; K, V once per query block; K "
        "once more over the band tiles); per query block, off-band full tiles run the plain loops, the off-band "
        "partial last tile the masked plain loops, band tiles the Q K^T row-max walk and the biased softmax; "
        "each loop's instructions/MUFU per score element from its own static-sm90.csv row (loop 1..6 = left "
        "full, left masked, right full, right masked, walk, biased: ops/tar_fwd.py source order).",
        "Ours, custom delta (two passes in one kernel): every tile walked (loop 1) and biased (loop 2) of the "
        "delta case's static rows, + the delta's N^2 entries once. Tiled: the fastest of the configs the sm_90 "
        "pruning keeps at the row's head dim, with loop statistics compiled at D = 64 (every kept config is in "
        "the CSV in fp16).",
        "flash = the plain-attention baseline compiled for sm_90 in 128x64 and 128x128 tiles (BLOCK_D 64/128), "
        "the faster; sdpa_plain is modeled by it; flex_two_pass as two such loops (a lower bound).",
        "vstar_triton_delta: ours with a custom (B, H, N, N) delta in q's dtype (no eager peer takes a delta); the "
        "global row max is not modeled (its static case is compiled causal only).",
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


def markdown(rows: list, gpu_key: str, eta: float, calibration: list) -> str:
    from .measure import commit

    lines = [f"# Roofline model of the forward, {GPUS[gpu_key].name} (model, not measured)", "",
             f"`python -m vstar_kernels bench --model --device {gpu_key}`, commit {commit()}. "
             "Modeled milliseconds per forward call, fp16 (bf16 identical). Assumptions:", ""]
    lines += [f"- {a}" for a in assumptions(gpu_key, eta)]
    lines += ["", "## Calibration: the flash model vs published FlashAttention-2 (H100 SXM5, forward, no causal mask)",
              "", "| D | N | B x H | published TFLOP/s | model TFLOP/s (ETA fitted) | model / published "
              "| unfitted model TFLOP/s | unfitted / published |", "|" + " ---: |" * 8]
    for c in calibration:
        lines.append(f"| {c['d']} | {c['n']} | {c['bh']} | {c['published_tflops']:.0f} | {c['model_tflops']:.1f} "
                     f"| {c['model_over_published']:.3f} | {c['unfitted_model_tflops']:.1f} "
                     f"| {c['unfitted_over_published']:.3f} |")
    lines += ["", "Published values: FlashAttention-2 bars of the FlashAttention-3 paper (arXiv:2407.08608), "
              "forward-speed panels, FP16, no causal mask; batch x N = 16k tokens, hidden 2048 (heads = 2048 / D). "
              "Bar labels as transcribed at:"] + [f"- D {d}: https://subtext.edge.nugit.net/image/{image}"
                                    for d, image in dict((p[0], p[3]) for p in PUBLISHED_FA2).items()]
    by = {}
    for r in rows:
        by.setdefault((r["shape"], r["n"]), {})[r["impl"]] = r
    impls = [i for i in IMPLS if any(r["impl"] == i and r["status"] == "ok" for r in rows)]
    lines += ["", "## Modeled time per call (ms, model)", "",
              "| shape | B x H | D | N | " + " | ".join(impls) + " | ours / flash (model, sigma 1) | ours / flash "
              "(model, sigma 8) | ours (delta) / flash (model) | reference_eager / ours (model, sigma 1 / 8) "
              "| ours bound (sigma 1) |",
              "| --- | ---: | ---: | ---: |" + " ---: |" * (len(impls) + 4) + " --- |"]
    for (shape, n), cells in by.items():
        o = cells["vstar_triton"]
        lines.append(f"| {shape} | {o['batch_heads']:,} | {o['d']} | {n} | "
                     + " | ".join(f"{cells[i]['model_time_ms']:.4g}" for i in impls)
                     + f" | {o['model_ours_over_flash']:.2f} "
                       f"| {cells['vstar_triton_sigma8']['model_ours_over_flash']:.2f} "
                       f"| {cells['vstar_triton_delta']['model_ours_over_flash']:.2f} "
                       f"| {o['model_reference_eager_over_ours']:.1f}x / "
                       f"{cells['vstar_triton_sigma8']['model_reference_eager_over_ours']:.1f}x "
                       f"| {o['bound']} ({o['config']}) |")
    missing = sorted({(r["impl"], r["status"]) for r in rows if r["status"] != "ok"})
    if missing:
        lines += ["", "Not modeled:", ""] + [f"- {impl}: {status}" for impl, status in missing]
    return "\n".join(lines) + "\n"


def plot(rows: list, gpu_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, *ratios) = plt.subplots(1, 3, figsize=(19, 5.5))
    first = rows[0]["shape"]
    for impl in IMPLS:
        pts = [(r["n"], r["model_time_ms"]) for r in rows if r["shape"] == first and r["impl"] == impl
               and r["status"] == "ok"]
        if pts and impl != "sdpa_plain":
            left.plot(*zip(*pts), marker="o", label=impl if impl != "flash" else "flash (= sdpa_plain)")
    left.set(xscale="log", yscale="log", xlabel="N (frames)", ylabel="modeled time per call (ms)",
             title=f"{first}: time per call (model)")
    left.set_xticks(shapes.KERNEL_N, [str(n) for n in shapes.KERNEL_N])
    left.legend(fontsize=8)
    for ax, impl, label in zip(ratios, OURS_SIGMA, ("sigma 1 (64D1)", "sigma 8 (64D8)")):
        for shape in dict.fromkeys(r["shape"] for r in rows):
            pts = [(r["n"], r["model_ours_over_flash"]) for r in rows if r["shape"] == shape and r["impl"] == impl]
            ax.plot(*zip(*pts), marker="o", label=shape)
        ax.axhline(1.0, color="grey", lw=0.8, ls="--", label="target N <= 256: 1.0")
        ax.axhline(1.15, color="grey", lw=0.8, ls=":", label="target N = 512..4096: 1.15")
        ax.set(xscale="log", xlabel="N (frames)", ylabel="ours / flash (modeled time ratio)",
               title=f"vstar_triton / FlashAttention loop, {label} (model)")
        ax.set_xticks(shapes.KERNEL_N, [str(n) for n in shapes.KERNEL_N])
        ax.legend(fontsize=7)
    fig.suptitle(f"Roofline model, {GPUS[gpu_key].name}, fp16 forward - model, not measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _write_table_and_plot(base: Path, table: str, draw, extra=()) -> None:
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
    """`bench --model [--device h100 h200] [--shapes ...] [--n ...] [--out DIR] [--no-plots]`; with
    --dit, the DiT rows instead (`dit_main`)."""
    if getattr(args, "dit", False):
        return dit_main(args)
    directory = Path(os.path.abspath(args.out)) if args.out else _results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    devices = args.device if isinstance(args.device, list) else list(GPUS)
    names = [n for n in (args.shapes or shapes.GPU_FULL) if not shapes.is_unet(n)]
    ns = args.n or list(shapes.KERNEL_N)
    eta, calibration = calibrate(GPUS["h100"])
    for c in calibration:
        print(f"calibration (model vs published FA2, H100): D={c['d']} N={c['n']}: model {c['model_tflops']} vs "
              f"{c['published_tflops']} TFLOP/s = {c['model_over_published']} "
              f"(unfitted {c['unfitted_over_published']})")
    for key in devices:
        rows = sweep(key, names, ns, eta)
        base = directory / f"model-{key}"
        write_csv(rows, base.with_suffix(".csv"), calibration if key == "h100" else [])
        table = markdown(rows, key, eta, calibration)
        print(table)
        extra = [base.with_name(base.name + "-calibration.csv")] if key == "h100" else []
        _write_table_and_plot(base, table, None if args.no_plots else lambda path: plot(rows, key, path), extra)
    return 0


# --------------------------------------------------------------------------- DiT shapes (`bench --model --dit`)

@dataclass(frozen=True)
class Dit:
    """One video DiT's self-attention call at its published resolution, batch 1 (classifier-free
    guidance runs it twice, or once at batch 2): heads and head dim from the model's config, the
    video's tokens (latent frames x tokens per latent frame) and the text tokens joined to it
    before or after the video (frame id -1)."""

    name: str
    heads: int
    head_dim: int
    latent_frames: int
    tokens_per_frame: int
    text_before: int = 0
    text_after: int = 0
    source: str = ""

    @property
    def n(self) -> int:
        return self.text_before + self.latent_frames * self.tokens_per_frame + self.text_after

    @property
    def sigma(self) -> float:
        """The README's starting point for a DiT: training latent frames / 16 (the paper's sigma 1 at
        16 frames), with these latent frames as the training length."""
        return self.latent_frames / 16

    def frames(self) -> torch.Tensor:
        """The frame id of every token: -1 for text, the latent frame for video."""
        video = torch.arange(self.latent_frames, dtype=torch.int32).repeat_interleave(self.tokens_per_frame)
        return torch.cat([torch.full((self.text_before,), -1, dtype=torch.int32), video,
                          torch.full((self.text_after,), -1, dtype=torch.int32)])


# Config values (transformer/config.json of each diffusers checkpoint, or the diffusers class's
# documented defaults where those are the checkpoint's; see benchmarks/NOTES.md, "DiT shapes (model)"):
# Wan 2.1 1.3B: dim 1536, num_heads 12 (head dim 128), patch (1, 2, 2), VAE stride (4, 8, 8);
# Wan 2.1 14B: num_attention_heads 40, attention_head_dim 128, patch (1, 2, 2); 81 frames -> 21
# latent frames, (H / 16) x (W / 16) tokens each. CogVideoX-5B: 48 heads x 64, patch 2, temporal
# compression 4 (49 frames -> 13), max_text_seq_length 226 text tokens first. HunyuanVideo: 24
# heads x 128, patch 2, patch_t 1, temporal compression 4 (129 frames -> 33), 256 text tokens
# (the pipeline's max_sequence_length) after the video. LTX-Video: 32 heads x 64, patch 1, VAE
# 32 x 32 spatial and 8x temporal (121 frames -> 16). Wan and LTX-Video take the text by cross-attention.
DIT_SHAPES = (
    Dit("wan2.1-1.3b-480p", 12, 128, 21, (480 // 16) * (832 // 16),
        source="Wan-AI/Wan2.1-T2V-1.3B config.json: dim 1536, num_heads 12; patch (1,2,2), vae_stride (4,8,8)"),
    Dit("wan2.1-1.3b-720p", 12, 128, 21, (720 // 16) * (1280 // 16),
        source="Wan-AI/Wan2.1-T2V-1.3B config.json: dim 1536, num_heads 12; patch (1,2,2), vae_stride (4,8,8)"),
    Dit("wan2.1-14b-480p", 40, 128, 21, (480 // 16) * (832 // 16),
        source="diffusers WanTransformer3DModel (14B): num_attention_heads 40, attention_head_dim 128, patch (1,2,2)"),
    Dit("wan2.1-14b-720p", 40, 128, 21, (720 // 16) * (1280 // 16),
        source="diffusers WanTransformer3DModel (14B): num_attention_heads 40, attention_head_dim 128, patch (1,2,2)"),
    Dit("cogvideox-5b-720x480", 48, 64, 13, (480 // 16) * (720 // 16), text_before=226,
        source="THUDM/CogVideoX-5b transformer/config.json: num_attention_heads 48, attention_head_dim 64, "
               "patch_size 2, temporal_compression_ratio 4, max_text_seq_length 226"),
    Dit("hunyuanvideo-720p", 24, 128, 33, (720 // 16) * (1280 // 16), text_after=256,
        source="diffusers HunyuanVideoTransformer3DModel: num_attention_heads 24, attention_head_dim 128, "
               "patch_size 2, patch_size_t 1; HunyuanVideoPipeline max_sequence_length 256"),
    Dit("ltx-video-768x512", 32, 64, (121 - 1) // 8 + 1, (512 // 32) * (768 // 32),
        source="Lightricks/LTX-Video transformer/config.json: num_attention_heads 32, attention_head_dim 64, "
               "patch_size 1, patch_size_t 1; VAE 32x32 spatial, 8x temporal"),
)
DIT_EAGER = ("reference_materialized", "sdpa_bias")
DIT_IMPLS = ("vstar_triton_frames", "flash", "flex_two_pass") + DIT_EAGER
DIT_COLUMNS = ("estimate", "gpu", "model", "batch", "heads", "d", "n", "latent_frames", "tokens_per_frame",
               "text_tokens", "dtype", "impl", "status", "config", "bound", "model_time_ms", "model_bytes",
               "model_mma_flops", "model_peak_gb", "model_fits_up_to_n", "model_ours_over_flash",
               "model_ours_over_flex_two_pass", "model_time_l2_ms", "model_ours_over_flash_l2")


# The tiled forward's MMA loops with frame ids, in SASS order: the row-max walk over every key tile
# (two passes), then the softmax in the one-pass kernel's tile order (ops/tar_fwd.py): full and
# masked tiles left of the token band, the same right of it, the band. All of them biased: each key
# tile takes one dA column (the loop's shortest path) or dA per score (its longest).
FRAME_LOOPS = ("row_max",) + ONE_PASS_LOOPS[:4] + ("biased",)


@functools.lru_cache(maxsize=4)
def frames_loop_costs(block_d: int, arch: int = 90) -> tuple:
    """((BLOCK_M, BLOCK_N, config, {kind: (column LoopCost, per-score LoopCost)}), ...) of the tiled
    forward with frame ids (HAS_FRAMES, FRAME_TILES; kinds FRAME_LOOPS), compiled for sm_`arch` as a
    launch there compiles (every config its pruning keeps) on one representative bf16 call per head
    dim: B 1, H 1, N 1024 in 4 frames. A key tile of one dA column runs the loop's shortest path
    (static.loop_paths), a tile with dA per score its longest; the row-max walk has one path. The
    launcher's pruning depends on the head dim and the options, not on N."""
    import triton

    from .._validation import make_problem
    from ..ops._jit import targeting
    from ..ops.compile_check import _modules, compile_launch, record
    from .static import rows

    if triton.knobs.runtime.interpret:
        raise RuntimeError("bench --model compiles the frame-id kernel for sm_90: run it without TRITON_INTERPRET=1")
    fwd, _ = _modules()
    n = 1024
    q = torch.empty(1, n, 1, block_d, dtype=torch.bfloat16).transpose(1, 2)
    problem = make_problem(q, q, q, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                           frames=torch.arange(n, dtype=torch.int32) // 256)
    out = []
    with targeting(arch):  # the configs an sm_`arch` launch keeps
        launches = record(lambda: fwd.tar_forward(problem))
        compiled_launches = [c for launch in launches
                             for c in compile_launch(launch, arch, True, f"bf16 B1H1N{n}D{block_d} frames")]
    for compiled in compiled_launches:
        if compiled.name != "_tar_fwd_tiled_kernel" or not compiled.constants.get("FRAME_TILES"):
            continue
        loops = sorted((r for r in rows(arch, compiled) if r.loop != "hot"), key=lambda r: int(r.loop))
        walk, biased = loops[0], loops[1:]
        if (len(loops) != len(FRAME_LOOPS) or walk.loop_mufu or walk.loop_mma >= min(r.loop_mma for r in biased)
                or any(r.short_instr_per_score >= r.long_instr_per_score for r in biased)):
            raise LookupError(f"the frame-id tiled kernel ({compiled.config}) has loops {[r.loop for r in loops]} "
                              f"not in the order {', '.join(FRAME_LOOPS)} (the walk without MUFU and with fewer "
                              "MMA, then loops with a dA column branch): update FRAME_LOOPS to the kernel")

        def cost(r, path):
            return LoopCost(getattr(r, f"{path}_instr_per_score"), getattr(r, f"{path}_mufu_per_score"),
                            r.ctas_per_sm, f"{r.kernel} {r.tile} {r.config} frames loop {r.loop} {path} path")

        costs = {kind: (cost(r, "short"), cost(r, "long")) for kind, r in zip(FRAME_LOOPS, loops)}
        bm, bn = map(int, loops[0].tile.split("x"))
        out.append((bm, bn, compiled.config, costs))
    if not out:
        raise LookupError("the launcher started no tiled kernel with frame ids for the representative call")
    return tuple(out)


def frame_tile_counts(ids: torch.Tensor, block_m: int, block_n: int, sigma: float) -> dict:
    """{kind: (column tiles, per-score tiles)} of the frame-id kernel over one sequence of frame ids
    `ids` (N,) (self-attention, not causal), summed over its query blocks: which loop runs each
    key tile (FRAME_LOOPS: the row-max walk every tile, then the tile ranges around the token band
    of `sigma`) and whether it takes one dA column (ops/_jit.frame_tile_id: one id in the
    tile, or every video key FRAME_BAND frames or more from the block's video rows, or no video on
    one side) or dA per score. The walk's tiles count as column tiles (it has one path)."""
    n = ids.numel()
    coef = 0.0 if math.isinf(sigma) else max(GAUSS_COEF_MIN, -0.5 * LOG2E / sigma / sigma)
    order, frame_band = band_width(coef, 2 * n), frame_band_width(coef)
    none = 1 << 30

    def blocks(size):
        t = torch.full((math.ceil(n / size) * size,), -1, dtype=torch.int64)
        t[:n] = ids
        t = t.view(-1, size)
        return t.min(1).values, torch.where(t >= 0, t, none).min(1).values, t.max(1).values

    k_min, k_lo, k_hi = blocks(block_n)
    _, q_lo, q_hi = blocks(block_m)
    column = ((k_min == k_hi)[None, :] | (k_hi < 0)[None, :] | (q_lo > q_hi)[:, None]
              | (k_lo[None, :] - q_hi[:, None] >= frame_band) | (q_lo[:, None] - k_hi[None, :] >= frame_band))
    prefix = torch.nn.functional.pad(column.to(torch.int64).cumsum(1), (1, 0)).tolist()
    tiles = len(k_hi)
    counts = {kind: [0, 0] for kind in FRAME_LOOPS}
    counts["row_max"][0] = len(q_hi) * tiles
    full_hi = n // block_n * block_n
    for mb, row in enumerate(prefix):
        lo, hi = band_tiles(mb, n, block_m, block_n, order)
        left, right = min(lo, full_hi), max(hi, full_hi)
        for kind, (a, b) in zip(FRAME_LOOPS[1:], ((0, left), (left, lo), (hi, right), (right, n), (lo, hi))):
            t0, t1 = a // block_n, math.ceil(b / block_n)
            if b > a:
                cols = row[t1] - row[t0]
                counts[kind][0] += cols
                counts[kind][1] += t1 - t0 - cols
    return {kind: tuple(c) for kind, c in counts.items()}


def ours_frames(bh: int, n: int, d: int, gpu: Gpu, eta: float, ids: torch.Tensor, sigma: float) -> Estimate:
    """Modeled `vstar_triton` forward with frame ids `ids` (N,) and the Gaussian of `sigma` (no key
    mask, not causal): bytes and MMA of the two-pass form (traffic.tiled_bytes with every tile
    walked and biased, plus the int32 ids: each query block's once, the keys' once per query block
    in the biased pass); instructions/MUFU per loop and path from `frames_loop_costs`, each key tile
    on the path `frame_tile_counts` gives it; the fastest config."""
    out = []
    for bm, bn, config, costs in frames_loop_costs(max(block_dims(d, d)[0], 64)):
        e = tiled_work(bh, n, d, tile_counts(n, bm, bn, None), bm, bn, sigma=None, frame_ids=True)
        for kind, (column, per_score) in frame_tile_counts(ids, bm, bn, sigma).items():
            short, long = costs[kind]
            e.instr += bh * bm * bn * (column * short.instr + per_score * long.instr)
            e.mufu += bh * bm * bn * (column * short.mufu + per_score * long.mufu)
        e.config = f"tiled {bm}x{bn} {_short(config)} frames"
        ctas = min(c.ctas_per_sm for pair in costs.values() for c in pair)
        out.append(finish(e, gpu, eta, _waves(bh * math.ceil(n / bm), ctas, gpu)))
    return min(out, key=lambda e: e.seconds)


def l2_resident(e: Estimate, compulsory_bytes: float, gpu: Gpu) -> float:
    """Seconds of a finished kernel estimate if its repeated K and V loads (once per query block)
    hit L2: the memory term from the compulsory bytes (each tensor once per pass), the compute
    terms unchanged. The other bound of the model, whose `bytes` go to HBM as requested."""
    return max({**e.terms, "memory": compulsory_bytes / gpu.hbm_bytes_s}.values()) + e.launches * LAUNCH_S


def fits_up_to(peak_bytes: float, n: int, capacity: float) -> int:
    """The largest N whose peak fits in `capacity` when the whole peak scales as N^2 from `peak_bytes`
    at `n`: exact for a peak of N x N tensors only (sdpa_bias), a lower bound where part of it grows
    slower (reference_materialized: chunks of at most 2^26 scores beside its (N, N) Gaussian)."""
    return int(n * math.sqrt(capacity / peak_bytes))


def fit_status(peak_bytes: float, capacity: float) -> str:
    """"ok" when the peak fits in the GPU's memory, else why the row has no time."""
    if peak_bytes <= capacity:
        return "ok"
    return f"does not fit (peak {peak_bytes / 1e9:.1f} GB > {capacity / 1e9:.0f} GB)"


def dit_sweep(gpu_key: str, eta: float, dits=DIT_SHAPES, batch: int = 1, progress=print) -> list:
    """Rows of the model for every DiT shape (bf16): ours with frame ids, flash, flex_two_pass and
    the eager peers that materialize the bias, whose rows say "does not fit" where their traced
    peak exceeds the GPU's memory."""
    from .peers import PEERS

    gpu = GPUS[gpu_key]
    rows = []
    for s in dits:
        bh, n = batch * s.heads, s.n
        est = {"vstar_triton_frames": ours_frames(bh, n, s.head_dim, gpu, eta, s.frames(), s.sigma),
               "flash": flash(bh, n, s.head_dim, gpu, eta)}
        two = est["flash"]
        est["flex_two_pass"] = Estimate(2 * two.bytes, 2 * two.mma_flops, 2 * two.instr, 2 * two.mufu, 2,
                                        2 * two.seconds, two.bound, "2 x " + two.config + " (lower bound)")
        for impl in ("vstar_triton_frames", "flash", "flex_two_pass"):  # Q, K, V, O
            est[impl].peak_bytes = 4 * bh * n * s.head_dim * ITEMSIZE
        qkvo = 4 * bh * n * s.head_dim * ITEMSIZE  # + K once more (the walk) and the frame ids of both passes
        l2 = {"vstar_triton_frames": l2_resident(est["vstar_triton_frames"], qkvo * 5 / 4 + 2 * n * 4, gpu),
              "flash": l2_resident(two, qkvo, gpu)}
        l2["flex_two_pass"] = 2 * l2["flash"]
        for peer in DIT_EAGER:
            est[peer] = eager(PEERS[peer], batch, s.heads, n, s.head_dim, gpu, eta)
        ours_s = est["vstar_triton_frames"].seconds
        base = dict(estimate="model", gpu=gpu_key, model=s.name, batch=batch, heads=s.heads, d=s.head_dim, n=n,
                    latent_frames=s.latent_frames, tokens_per_frame=s.tokens_per_frame,
                    text_tokens=s.text_before + s.text_after, dtype="bf16")
        for impl in DIT_IMPLS:
            e = est[impl]
            status = fit_status(e.peak_bytes, gpu.memory_bytes)
            row = {**base, "impl": impl, "status": status, "config": e.config, "bound": e.bound,
                   "model_bytes": int(e.bytes), "model_mma_flops": int(e.mma_flops),
                   "model_peak_gb": round(e.peak_bytes / 1e9, 3),
                   "model_fits_up_to_n": fits_up_to(e.peak_bytes, n, gpu.memory_bytes) if impl in DIT_EAGER else ""}
            if status == "ok":
                row["model_time_ms"] = round(e.seconds * 1e3, 4)
            if impl in l2:
                row["model_time_l2_ms"] = round(l2[impl] * 1e3, 4)
            if impl == "vstar_triton_frames":
                row.update(model_ours_over_flash=round(ours_s / est["flash"].seconds, 3),
                           model_ours_over_flex_two_pass=round(ours_s / est["flex_two_pass"].seconds, 3),
                           model_ours_over_flash_l2=round(l2[impl] / l2["flash"], 3))
            rows.append(row)
        progress(f"  {gpu_key} {s.name} N={n}: ours (frames) {ours_s * 1e3:.2f} ms, ours/flash "
                 f"{ours_s / est['flash'].seconds:.2f} (K, V from L2: {l2['vstar_triton_frames'] / l2['flash']:.2f}), "
                 f"ours/flex_two_pass {ours_s / est['flex_two_pass'].seconds:.2f} (model)")
    return rows


def dit_markdown(rows: list, gpu_key: str, eta: float, dits=DIT_SHAPES) -> str:
    """The DiT table: modeled ms per self-attention call, the ratios and where the eager peers stop fitting."""
    from .measure import commit

    g = GPUS[gpu_key]
    lines = [f"# DiT self-attention, {g.name} (model, not measured)", "",
             f"`python -m vstar_kernels bench --model --dit --device {gpu_key}`, commit {commit()}. Modeled ms per "
             f"self-attention call (one layer, one denoising step), batch 1, bf16; classifier-free guidance runs it "
             f"at batch 2 (about twice the time; sdpa_bias's peak doubles). Memory: {g.memory_bytes / 1e9:.0f} GB "
             "(nominal). Assumptions as in the model table, and:", "",
             "- ours (vstar_triton_frames): frame ids, no key mask, sigma = latent frames / 16 (the README's starting "
             "point): the two-pass form (a Q K^T row-max walk over every key tile, then the biased online softmax over "
             "every tile); per-loop instructions/MUFU of the frame-id kernel compiled for sm_90 (bf16, every "
             "config the sm_90 pruning keeps per head dim), each key tile on its loop's shortest path (one dA "
             "column: a tile of one frame, or off the Gaussian's band) or longest (dA per score), counted from the "
             "layout (`model.frame_tile_counts`); the fastest config.",
             "- flash: the calibrated plain loop (no TAR); flex_two_pass: two such loops (a lower bound).",
             "- eager peers as bench/peers.py runs them (the token-index Gaussian): time = summed per-op roofline of "
             "their aten ops on meta tensors; peak = the most storage bytes live at once in that trace (Q, K, V "
             "included). A peak above the memory gives \"does not fit\"; fits up to N: the peak scaled as N^2 "
             "(exact for sdpa_bias, whose peak is two (B, H, N, N) tensors; a lower bound for "
             "reference_materialized, whose score chunks stop growing at 2^26 scores beside its full (N, N) float32 "
             "Gaussian).",
             "- K, V from L2: the same kernels with their repeated K and V loads (once per query block) served by L2: "
             "the memory term from each tensor once per pass, compute terms unchanged. The model's own column sends "
             "every requested byte to HBM; a GPU lies between the two.",
             "", "| model | heads x D | N (frames x tokens + text) | ours (frames) | flash | flex_two_pass "
             "| reference_materialized | sdpa_bias | ours / flash | ours / flex_two_pass | ours bound (config) "
             "| ours, K V from L2 | flash, K V from L2 | ours / flash, K V from L2 "
             "| reference_materialized fits up to N | sdpa_bias fits up to N |",
             "| --- | --- | --- |" + " ---: |" * 7 + " --- |" + " ---: |" * 5]
    by = {}
    for r in rows:
        by.setdefault(r["model"], {})[r["impl"]] = r

    def cell(r):
        return f"{r['model_time_ms']:.3f}" if r["status"] == "ok" else \
            f"does not fit (peak {r['model_peak_gb']:.0f} GB)"

    for s in dits:
        c = by[s.name]
        o = c["vstar_triton_frames"]
        text = s.text_before + s.text_after
        lines.append(f"| {s.name} | {s.heads} x {s.head_dim} | {s.n:,} ({s.latent_frames} x {s.tokens_per_frame}"
                     f"{f' + {text}' if text else ''}) | " + " | ".join(cell(c[i]) for i in DIT_IMPLS)
                     + f" | {o['model_ours_over_flash']:.2f} | {o['model_ours_over_flex_two_pass']:.2f} "
                       f"| {o['bound']} ({o['config']}) | {o['model_time_l2_ms']:.3f} "
                       f"| {c['flash']['model_time_l2_ms']:.3f} "
                       f"| {o['model_ours_over_flash_l2']:.2f} | {c['reference_materialized']['model_fits_up_to_n']:,} "
                       f"| {c['sdpa_bias']['model_fits_up_to_n']:,} |")
    lines += ["", "Config values:", ""] + [f"- {s.name}: {s.source}" for s in dits]
    return "\n".join(lines) + "\n"


def dit_plot(rows: list, gpu_key: str, path: Path) -> None:
    """Modeled ms per call of each impl on each DiT shape (log scale); rows that do not fit are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["impl"]): r for r in rows}
    fig, ax = plt.subplots(figsize=(12, 6.5))
    width = 0.8 / len(DIT_IMPLS)
    for k, impl in enumerate(DIT_IMPLS):
        for i, name in enumerate(names):
            r = by[name, impl]
            y = i + (k - (len(DIT_IMPLS) - 1) / 2) * width
            if r["status"] == "ok":
                ax.barh(y, r["model_time_ms"], height=width, color=f"C{k}", label=impl if i == 0 else None)
            else:
                ax.text(0.012, y, f"{impl}: does not fit ({r['model_peak_gb']:.0f} GB)", va="center", fontsize=7,
                        transform=ax.get_yaxis_transform())
    ax.set_yticks(range(len(names)), [f"{n}\nN={by[n, 'flash']['n']:,}" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="modeled time per self-attention call, batch 1, bf16 (ms, model)",
           title=f"DiT self-attention, {GPUS[gpu_key].name} - model, not measured")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dit_main(args) -> int:
    """`bench --model --dit [--device h100 h200] [--shapes DIT ...] [--out DIR] [--no-plots]`: the DiT
    rows (every DIT_SHAPES entry, or those --shapes names), model-dit-<gpu>.csv/.md/.png."""
    directory = Path(os.path.abspath(args.out)) if args.out else _results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    devices = args.device if isinstance(args.device, list) else list(GPUS)
    by_name = {s.name: s for s in DIT_SHAPES}
    unknown = [name for name in args.shapes or () if name not in by_name]
    if unknown:
        raise SystemExit(f"--shapes with --dit: unknown DiT shape {', '.join(unknown)}; one of {', '.join(by_name)}")
    dits = tuple(by_name[name] for name in args.shapes) if args.shapes else DIT_SHAPES
    eta, _ = calibrate(GPUS["h100"])
    for key in devices:
        rows = dit_sweep(key, eta, dits)
        base = directory / f"model-dit-{key}"
        with open(base.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(DIT_COLUMNS)
            for r in rows:
                w.writerow([r.get(c, "") for c in DIT_COLUMNS])
        table = dit_markdown(rows, key, eta, dits)
        print(table)
        _write_table_and_plot(base, table, None if args.no_plots else lambda path: dit_plot(rows, key, path))
    return 0
