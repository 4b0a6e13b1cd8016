"""The roofline model's inputs: GPU peaks, the compiled statistics of each modeled launch (the kernel
compiled for sm_90 as that very call specializes it), the roofline of one launch for our tiled and
packed kernels, the FlashAttention-2-class loop it is calibrated on, FlashAttention-3 (its own
published bars) and Triton's fused-attention tutorial (the second anchor).

See model.py for the model as a whole and tools/perf/model.md ("Roofline model") for the sources.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from vstar_kernels.bench.measure import ideal_cost
from vstar_kernels.ops.launch import GAUSS_COEF_MIN, LOG2E, band_width
from vstar_kernels.ops.layout import DOT_MIN, block_dims, pow2

from . import RESULTS
from .traffic import band_tiles, tiled_bytes


@dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU (sources: tools/perf/model.md, "Roofline model")."""

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

# Published forward throughput on H100 SXM5, fp16, no causal mask, (D, N, TFLOP/s), from the
# FlashAttention-3 paper (Shah et al., arXiv:2407.08608), forward-speed panels "Attention forward
# speed, head dim 64 / 128 (H100 80GB SXM5)" without the causal mask; batch x sequence = 16k
# tokens, hidden 2048 (heads = 2048 / D). Values as labelled on the bars (tools/perf/model.md says
# how the non-causal panels were told apart). The FlashAttention-2 bars at N = 4k-16k fit ETA, the
# FlashAttention-3 bars at the same points FA3's exposed exponential share; its bars at N = 512-2k
# check the fitted model (the two transcriptions of the head dim 128 panel disagree at 512: 467 or 497).
PANEL_SOURCE = ("FlashAttention-3 paper, arXiv:2407.08608, panel 'Attention forward speed, head dim {} (H100 80GB "
                "SXM5)', no causal mask, {} bar; labels as transcribed at https://subtext.edge.nugit.net/image/{}")
PANEL_IMAGES = {64: "55f47a106c25f22983b2741a7e8bcdbaec8521b6a583d130c6f92b94e0f65924",
                128: "e27582d2db385c9bac87ebc92343d2452b7c01d5d934e596c90172b346d00d42"}
PUBLISHED_FA2 = ((64, 4096, 321.0), (64, 8192, 322.0), (64, 16384, 324.0),
                 (128, 4096, 368.0), (128, 8192, 370.0), (128, 16384, 370.0))
PUBLISHED_FA3 = ((64, 4096, 476.0), (64, 8192, 496.0), (64, 16384, 497.0),
                 (128, 4096, 638.0), (128, 8192, 646.0), (128, 16384, 648.0))
CHECK_FA3 = ((64, 512, 333.0), (64, 1024, 392.0), (64, 2048, 460.0),
             (128, 512, 467.0), (128, 1024, 565.0), (128, 2048, 625.0))
CALIBRATION_TOKENS, CALIBRATION_HIDDEN = 16384, 2048
# The second anchor: pytorch/benchmark's FlashAttention-3 pull request tabulates Triton's fused-attention
# tutorial and FlashAttention-3, forward, (batch, 16 heads, N, 128) with batch x N = 16k, fp16, no
# causal mask, on an H100: (N, tutorial TFLOP/s, FlashAttention-3 TFLOP/s).
TUTORIAL_SOURCE = ("pytorch/benchmark pull request #2391 (commit ff65cb6, 'Fix dimension order for "
                   "FlashAttention-3'), test plan: triton_tutorial_flash_v2 and flash_v3 tflops at (batch, 16, N, "
                   "128), H100; read at https://app.semanticdiff.com/gh/pytorch/benchmark/commit/"
                   "ff65cb675209d2308f7d27c6920af8a32de9aa90")
PUBLISHED_TUTORIAL = ((512, 328.882, 430.32), (1024, 389.723, 517.099), (2048, 433.721, 565.544),
                      (4096, 458.359, 590.233), (8192, 470.732, 614.234), (16384, 476.753, 620.73))
TUTORIAL_HEADS, TUTORIAL_D = 16, 128

# FlashAttention-3's forward tiles on sm_90, 16-bit inputs, not causal, not local (Dao-AILab/flash-attention,
# hopper/tile_size.h, tile_size_fwd_sm90, at 07602ad): (head dims up to, BLOCK_M, BLOCK_N); a head dim runs
# the kernel of the next compiled one (its MMA at that width). From head dim 128, not causal, pairs of
# query blocks run as a cluster of 2 CTAs when the query blocks are even (hopper/flash_fwd_launch_template.h),
# whose K and V tiles are loaded once (TMA multicast) for both.
FA3_TILES = ((64, 192, 192), (96, 192, 144), (128, 128, 176), (192, 128, 112), (256, 128, 80))
FA3_CLUSTER_FROM_D = 128
FA3_SOURCE = "Dao-AILab/flash-attention hopper/tile_size.h (07602ad): tile_size_fwd_sm90, 16-bit, not causal"


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


def results_dir() -> Path:
    """The committed results of this checkout (benchmarks/results), where the model writes by default."""
    return RESULTS


# --------------------------------------------------------------------------- compiled statistics of a modeled call

_COMPILED: dict = {}

# `model --quick`: each autotuned launch the model reads compiled in the first and last configs its pruning keeps
_QUICK = contextvars.ContextVar("tools_perf_model_quick", default=False)


@contextlib.contextmanager
def quick_configs(on: bool = True):
    """Inside the block, `compiled_launch` compiles an autotuned launch in the first and last configs the
    pruning keeps, not every one (`model --quick`)."""
    token = _QUICK.set(on)
    try:
        yield
    finally:
        _QUICK.reset(token)


def configs_compiled() -> str:
    """What the model's assumptions say of the configs it compiles, as `quick_configs` has it."""
    if _QUICK.get():
        return ("the first and last configs the sm_90 pruning keeps (--quick: a config of the full run's, left out "
                "here, may be faster)")
    return "every config the sm_90 pruning keeps"


def quick_title() -> str:
    """What a picture's title adds inside `quick_configs`: its rows may model a slower config than the full run's."""
    return " (--quick: two configs a launch)" if _QUICK.get() else ""


def compiled(launch, arch: int = 90, all_configs: bool = True) -> tuple:
    """((config text, static rows), ...) of each config a recorded launch compiles to for sm_`arch`
    (compile_check: the JIT's specialization of these very arguments; every config the pruning keeps,
    or the first and last), compiled once per specialization in a process (compile_check.launch_key)."""
    import triton

    from .compile_check import compile_launch, launch_key
    from .static import rows

    if triton.knobs.runtime.interpret:
        raise RuntimeError("tools.perf model compiles the kernels for sm_90: run it without TRITON_INTERPRET=1")
    key = (launch_key(launch, arch), arch, all_configs)
    if key not in _COMPILED:
        _COMPILED[key] = tuple((c.config, tuple(rows(arch, c)))
                               for c in compile_launch(launch, arch, all_configs, "model"))
    return _COMPILED[key]


def meta_qkv(batch: int, heads: int, n: int, d: int, dtype=torch.float16) -> tuple:
    """q, k, v of a (batch, heads, n, d) call in diffusers' (B, N, H, D) storage, on the meta device:
    the shapes, strides and (16-byte aligned) addresses the JIT specializes on, nothing allocated."""
    return tuple(torch.empty(batch, n, heads, d, dtype=dtype, device="meta").transpose(1, 2) for _ in range(3))


def ours_launch(batch: int, heads: int, n: int, d: int, sigma=1.0, delta: bool = False, frames=None,
                dtype=torch.float16, arch: int = 90, speculate: bool = False):
    """The one kernel launch `tar_attention(..., speculate=False)` makes for this call (row max, not
    causal; the Gaussian of `sigma`, or a custom (N, N) delta in q's dtype; frame ids `frames` (N,)
    int32), recorded with the launcher's sm_`arch` pruning; with `speculate` (frame ids) the three
    launches of the speculative forward, (one pass, listing, redo)."""
    from vstar_kernels._problem import make_problem
    from vstar_kernels.ops.launch import targeting

    from .compile_check import _modules, record

    fwd = _modules()[0]
    q, k, v = meta_qkv(batch, heads, n, d, dtype)
    problem = make_problem(q, k, v, sigma=1.0 if sigma is None else sigma, strength=1.0,
                           delta=torch.empty(n, n, dtype=dtype, device="meta") if delta else None, causal=False,
                           max_mode="row", scale=None, frames=None if frames is None else frames.to("meta"))
    flags = torch.zeros(batch * heads, dtype=torch.int32, device="meta") if speculate else None
    with targeting(arch):
        launches = record(lambda: fwd.tar_forward(problem, flags=flags))
    return tuple(launches) if speculate else launches[0]


def compiled_launch(launch, arch: int = 90, all_configs: bool | None = None) -> tuple:
    """`compiled` under the sm_`arch` pruning (the configs a launch there keeps): every one, or the first and
    last where all_configs is False (by default: inside `quick_configs`)."""
    from vstar_kernels.ops.launch import targeting

    with targeting(arch):
        return compiled(launch, arch, not _QUICK.get() if all_configs is None else all_configs)


def _cost(r, source: str = "") -> LoopCost:
    return LoopCost(r.instr_per_score, r.mufu_per_score, r.ctas_per_sm,
                    source or f"{r.kernel} {r.tile} {r.config} loop {r.loop}")


def _config_fields(config: str) -> dict:
    """'BLOCK_M=128 BLOCK_N=64 warps=8 stages=3' -> {'BLOCK_M': 128, ...}."""
    return {k: int(v) for k, v in (f.split("=") for f in config.split())}


def short_config(config: str) -> str:
    """'BLOCK_M=128 BLOCK_N=64 warps=8 stages=3' -> '8w 3st' (and ' r168' after a register cap, maxnreg=168)."""
    fields = _config_fields(config)
    return f"{fields['warps']}w {fields['stages']}st" + (f" r{fields['maxnreg']}" if "maxnreg" in fields else "")


# The tiled forward's MMA loops in source order (ops/tar_fwd.py), which static.py's `loop` = 1, 2, ...
# (SASS order) follows: the one-pass row max of the Gaussian runs the off-band tiles left of the
# band (full tiles, then the masked partial one), right of it (the same), the band's QK^T walk for
# the row max and the band's biased softmax; a custom delta (the whole row is the band) runs the
# walk over every tile, then the biased softmax.
ONE_PASS_LOOPS = ("plain_left", "masked_left", "plain_right", "masked_right", "row_max", "biased")
TWO_PASS_LOOPS = ("row_max", "biased")


def tiled_loops(config: str, rows: tuple, delta: bool = False) -> dict:
    """{kind: LoopCost} of the tiled forward compiled in `config` (its static `rows`): the per-loop rows
    in ONE_PASS_LOOPS order (row max of the Gaussian) or TWO_PASS_LOOPS (a custom delta).

    Checked against what the loops must be: the row-max walk issues only Q K^T (fewer MMA
    instructions than the others) and no MUFU; the biased loop has the most MUFU per score (the
    Gaussian's exp2 beside the softmax's).
    """
    loops = sorted((r for r in rows if r.loop != "hot"), key=lambda r: int(r.loop))
    kinds = TWO_PASS_LOOPS if delta else ONE_PASS_LOOPS
    if len(loops) != len(kinds):
        raise LookupError(f"the tiled kernel {config}{' delta' if delta else ''} compiled to {len(loops)} MMA loops, "
                          f"expected {len(kinds)} ({', '.join(kinds)}): update ONE_PASS_LOOPS / TWO_PASS_LOOPS")
    costs = dict(zip(kinds, map(_cost, loops)))
    mma = {kind: r.loop_mma for kind, r in zip(kinds, loops)}
    walk, biased = costs["row_max"], costs["biased"]
    if walk.mufu or mma["row_max"] >= max(mma.values()) or biased.mufu < max(c.mufu for c in costs.values()):
        raise LookupError(f"the tiled kernel's loops ({config}) are not in the order {', '.join(kinds)}: update "
                          "ONE_PASS_LOOPS / TWO_PASS_LOOPS")
    return costs


def band(n: int, sigma) -> int | None:
    """The band width the launcher gives the tiled kernel for the row max of a Gaussian of `sigma`
    (ops/launch.band_width, limit max(Nq, Nk)); None for the two-pass form (a custom delta)."""
    if sigma is None:
        return None
    return band_width(max(GAUSS_COEF_MIN, -0.5 * LOG2E / sigma / sigma), n)


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
    (`tile_counts`), Q K^T only in the row-max walk, at the head dim's chunks (layout.head_chunks)."""
    bd, bdv = block_dims(d, d)
    e = Estimate(bytes=bh * tiled_bytes(n, n, d, d, ITEMSIZE, block_m, block_n,
                                        band=None if delta else band(n, sigma),
                                        delta_itemsize=ITEMSIZE if delta else 0, frame_ids=frame_ids),
                 launches=1)
    for kind, (tiles, _) in kinds.items():
        e.mma_flops += bh * tiles * 2 * block_m * block_n * (bd if kind == "row_max" else bd + bdv)
    return e


def loops_and_programs(e: Estimate, programs: int, kinds: dict, costs: dict, block_m, block_n,
                       program_instr: float, ctas: int, gpu, eta) -> Estimate:
    """e plus each loop kind's instructions and MUFU per score element over its tiles (`kinds`:
    {kind: (tiles, ...)} over all programs) and the `program_instr` warp-instructions each program
    issues outside its loops, finished with the wave stretch of `programs` at `ctas` CTAs per SM."""
    for kind, (tiles, _) in kinds.items():
        e.instr += tiles * block_m * block_n * costs[kind].instr
        e.mufu += tiles * block_m * block_n * costs[kind].mufu
    e.instr += programs * program_instr
    return finish(e, gpu, eta, waves_stretch(programs, ctas, gpu))


def ours(batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float, sigma: float = 1.0,
         delta: bool = False) -> Estimate:
    """Modeled `vstar_triton` forward (row max, not causal; the Gaussian of `sigma` in one pass, or a
    custom (B, H, N, N) delta in q's dtype, read once, in two): the launch this call makes, compiled for
    sm_90 as the call specializes it; the fastest config (tiled: every config the sm_90 pruning keeps, or its
    first and last inside `quick_configs`; packed: the first and last)."""
    bh = batch * heads
    launch = ours_launch(batch, heads, n, d, None if delta else sigma, delta)
    if launch.kernel.fn.__name__ == "_tar_fwd_packed_kernel":
        return min((_packed(bh, n, d, _config_fields(config)["ROWS"], rows[0], gpu, eta, delta)
                    for config, rows in compiled_launch(launch, all_configs=False)), key=lambda e: e.seconds)
    out = []
    for config, rows in compiled_launch(launch):
        fields = _config_fields(config)
        bm, bn = fields["BLOCK_M"], fields["BLOCK_N"]
        costs = tiled_loops(config, rows, delta)
        counts = tile_counts(n, bm, bn, None if delta else sigma)
        e = tiled_work(bh, n, d, counts, bm, bn, sigma, delta)
        e.config = f"tiled {bm}x{bn} {short_config(config)}"
        kinds = {kind: (bh * tiles, keys) for kind, (tiles, keys) in counts.items()}
        ctas = min(costs[k].ctas_per_sm for k, (t, _) in kinds.items() if t)
        out.append(loops_and_programs(e, bh * math.ceil(n / bm), kinds, costs, bm, bn, rows[0].outside_warp_instr,
                                      ctas, gpu, eta))
    return min(out, key=lambda e: e.seconds)


def packed_work(bh, n, d, rows) -> Estimate:
    """Bytes and MMA FLOPs of the packed launch: SEQS = ROWS // SEG sequences per program (SEG: N
    padded to a power of two >= DOT_MIN), one Q K^T and one P V product of SEG x SEG per sequence,
    empty slots of the last program included; Q, K, V read and O written once (measure.ideal_cost)."""
    seg = pow2(n, DOT_MIN)
    seqs = rows // seg
    bd, bdv = block_dims(d, d)
    programs = math.ceil(bh / seqs)
    return Estimate(bytes=ideal_cost(bh, n, n, d, d, ITEMSIZE).bytes,
                    mma_flops=programs * seqs * 2 * seg * seg * (bd + bdv), launches=1, config=f"packed ROWS={rows}")


def _packed(bh, n, d, rows, r, gpu, eta, delta: bool = False) -> Estimate:
    """The packed kernel, modeled: `packed_work` (+ the delta's N^2 entries per sequence) plus the
    compiled kernel's instructions (its static row `r`: the whole kernel, which computes one program's
    SEQS x SEG x SEG scores) per program."""
    e = packed_work(bh, n, d, rows)
    e.bytes += bh * n * n * ITEMSIZE if delta else 0
    seg = pow2(n, DOT_MIN)
    programs, elements = math.ceil(bh / (rows // seg)), rows // seg * seg * seg
    e.instr = programs * elements * r.instr_per_score
    e.mufu = programs * elements * r.mufu_per_score
    return finish(e, gpu, eta, waves_stretch(programs, r.ctas_per_sm, gpu))


# --------------------------------------------------------------------------- the plain-attention loop (FA2 class)

def plain_launch(batch: int, heads: int, n: int, d: int, block_m: int, block_n: int, warps: int, stages: int,
                 dtype=torch.float16):
    """A launch of the plain-attention baseline (tools/perf/baseline.py) on this call, in one config."""
    from .baseline import launch_args, plain_attention_kernel
    from .compile_check import Launch

    args, constexprs = launch_args(*meta_qkv(batch, heads, n, d, dtype), block_n)
    return Launch(plain_attention_kernel, args, {**constexprs, "BLOCK_M": block_m, "BLOCK_N": block_n,
                                                 "num_warps": warps, "num_stages": stages})


@functools.lru_cache(maxsize=None)
def _plain_compiled(batch: int, heads: int, n: int, d: int, tile: tuple, dtype) -> tuple:
    """`compiled` of the baseline's launch on this call in one tile, looked up once: the calibration's fits
    re-evaluate the same calls at every ETA they scan (thousands of launch keys, each a binder built)."""
    return compiled(plain_launch(batch, heads, n, d, *tile, dtype))


def plain(batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float, tiles=CALIBRATION_TILES,
          name: str = "flash", dtype=torch.float16) -> Estimate:
    """The plain-attention baseline on this call, compiled for sm_90 in each of `tiles` ((BLOCK_M,
    BLOCK_N, warps, stages)), the fastest: its loop over the whole key tiles, the rest of the kernel
    (prologue, the masked last tile when N is not a multiple of BLOCK_N, epilogue) once per program.
    A config whose shared memory exceeds the SM's (no CTA fits) cannot launch and is skipped. Its
    products run at the head dim padded to a power of two, as the tutorial's do."""
    bd = bdv = pow2(d, DOT_MIN)
    bh = batch * heads
    estimates = []
    for bm, bn, warps, stages in tiles:
        (config, rows), = _plain_compiled(batch, heads, n, d, (bm, bn, warps, stages), dtype)
        hot = rows[0]
        if not hot.ctas_per_sm:
            continue
        blocks = math.ceil(n / bm)
        # Q, O once; K, V once per query block; MMA over whole tiles (the masked last one too)
        e = Estimate(bytes=bh * (n + blocks * n) * 2 * d * ITEMSIZE, launches=1,
                     config=f"{name} {bm}x{bn} {warps}w {stages}st",
                     mma_flops=bh * blocks * math.ceil(n / bn) * 2 * bm * bn * (bd + bdv))
        kinds = {"plain": (bh * blocks * (n // bn), 0)}
        estimates.append(loops_and_programs(e, bh * blocks, kinds, {"plain": _cost(hot)}, bm, bn,
                                            hot.outside_warp_instr, hot.ctas_per_sm, gpu, eta))
    return min(estimates, key=lambda e: e.seconds)


def flash(batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float) -> Estimate:
    """The FlashAttention-2-class plain loop on the same call: the baseline in CALIBRATION_TILES, the faster."""
    if pow2(d, DOT_MIN) > 128:
        raise ValueError(f"the calibration compiles head dims up to 128, got {d}")
    return plain(batch, heads, n, d, gpu, eta)


def tutorial(batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float) -> Estimate:
    """The baseline in the configs Triton's fused-attention tutorial autotunes over (baseline.TUTORIAL_CONFIGS),
    the fastest that launches: the model of the tutorial's forward."""
    from .baseline import TUTORIAL_CONFIGS

    return plain(batch, heads, n, d, gpu, eta, TUTORIAL_CONFIGS, "tutorial")


def calibration_shape(n: int, d: int) -> tuple:
    """(batch, heads) of a FlashAttention-3 paper benchmark point: batch x N = 16k tokens, heads x D = 2048."""
    return CALIBRATION_TOKENS // n, CALIBRATION_HIDDEN // d


def tflops(batch: int, heads: int, n: int, d: int, seconds: float) -> float:
    """The forward's FLOP rate as the benchmarks count it (measure.ideal_cost: 4 B H N^2 D)."""
    return ideal_cost(batch * heads, n, n, d, d, ITEMSIZE).flops / seconds / 1e12


def _grid(lo: float, hi: float, step: float = 0.005) -> list:
    return [round(lo + step * i, 3) for i in range(round((hi - lo) / step) + 1)]


def _fit(model, points, grid) -> float:
    """The x of `grid` minimizing the worst |log(model(x, d, n) / published)| over `points` (d, n, published)."""
    return min(grid, key=lambda x: max(abs(math.log(model(x, d, n) / p)) for d, n, p in points))


def _row(peer: str, role: str, d: int, n: int, bh: int, published: float, fitted: float, unfitted: float,
         config: str, source: str) -> dict:
    """A row of model-h100-calibration.csv."""
    return dict(peer=peer, role=role, d=d, n=n, bh=bh, published_tflops=published,
                model_tflops=round(fitted, 1), model_over_published=round(fitted / published, 3),
                unfitted_model_tflops=round(unfitted, 1), unfitted_over_published=round(unfitted / published, 3),
                config=config, source=source)


def calibrate(gpu: Gpu) -> tuple:
    """(ETA, rows): the MMA efficiency minimizing the worst |log(model / published)| of the flash model
    over PUBLISHED_FA2, scanned in steps of 0.005; a row per point with the fitted and unfitted (ETA = 1) model."""
    def model(eta, d, n):
        batch, heads = calibration_shape(n, d)
        return tflops(batch, heads, n, d, flash(batch, heads, n, d, gpu, eta).seconds)

    eta = _fit(model, PUBLISHED_FA2, _grid(0.1, 1.0))
    rows = [_row("FlashAttention-2", "fit", d, n, math.prod(calibration_shape(n, d)), p, model(eta, d, n),
                 model(1.0, d, n),
                 flash(*calibration_shape(n, d), n, d, gpu, eta).config,
                 PANEL_SOURCE.format(d, "FlashAttention-2", PANEL_IMAGES[d])) for d, n, p in PUBLISHED_FA2]
    return eta, rows


# --------------------------------------------------------------------------- FlashAttention-3

def fa3_tile(d: int) -> tuple:
    """(head dim of the kernel that runs d, BLOCK_M, BLOCK_N) of FlashAttention-3's forward (FA3_TILES)."""
    for top, bm, bn in FA3_TILES:
        if d <= top:
            return top, bm, bn
    raise ValueError(f"FlashAttention-3 runs head dims up to {FA3_TILES[-1][0]}, got {d}")


def fa3(batch: int, heads: int, n: int, d: int, gpu: Gpu, exposed: float) -> Estimate:
    """Modeled FlashAttention-3 forward (sm_90, 16-bit, not causal): no compiled code of it here, so its
    compute is what every FlashAttention-3 tile must do, at its tile geometry (FA3_TILES): the MMA of whole
    BLOCK_M x BLOCK_N tiles at the kernel's head dim, at the dense tensor peak, plus `exposed` (fitted on
    its published bars, `calibrate_fa3`) of the exponentials' MUFU time (one exp2 per score of every whole
    tile, one per row per key tile), the share its pipelining does not hide behind the MMA; stretched by
    the waves of its persistent scheduler (one CTA per SM). Bytes: Q and O once, K and V once per query
    block (per pair of them in a cluster of 2), the rows' log-sum-exp. No per-program overhead: a model
    of FlashAttention-3 at its best at short N (tools/perf/model.md: the N = 512 bars)."""
    top, bm, bn = fa3_tile(d)
    bh = batch * heads
    blocks, tiles = math.ceil(n / bm), math.ceil(n / bn)
    cluster = 2 if top >= FA3_CLUSTER_FROM_D and blocks % 2 == 0 else 1
    scores = bh * blocks * bm * tiles * bn
    e = Estimate(bytes=bh * (2 * n + 2 * n * blocks // cluster) * d * ITEMSIZE + bh * n * 4,
                 mma_flops=scores * 2 * 2 * top, mufu=scores * (1 + 1 / bn) / 32, launches=1,
                 config=f"fa3 {bm}x{bn}{' cluster 2' if cluster > 1 else ''}")
    waves = waves_stretch(bh * blocks, 1, gpu)
    e.terms = {"memory": e.bytes / gpu.hbm_bytes_s,
               "mma+exp": waves * (e.mma_flops / gpu.tensor_flop_s + exposed * e.mufu * 32 / gpu.mufu_s)}
    e.bound = max(e.terms, key=e.terms.get)
    e.seconds = e.terms[e.bound] + e.launches * LAUNCH_S
    return e


def calibrate_fa3(gpu: Gpu) -> tuple:
    """(EXPOSED, rows): FlashAttention-3's exposed share of exponential time (0 = all hidden behind the MMA,
    1 = none) minimizing the worst |log(model / published)| over PUBLISHED_FA3, in steps of 0.005; rows
    for the fitted points, the N = 512-2k bars (CHECK_FA3, not fitted) and pytorch/benchmark's
    FlashAttention-3 column (check); the unfitted model is EXPOSED = 1 (no exponential hidden)."""
    def model(exposed, d, n, batch=None, heads=None):
        if batch is None:
            batch, heads = calibration_shape(n, d)
        return tflops(batch, heads, n, d, fa3(batch, heads, n, d, gpu, exposed).seconds)

    exposed = _fit(model, PUBLISHED_FA3, _grid(0.0, 1.0))
    config = lambda d, n: fa3(*calibration_shape(n, d), n, d, gpu, exposed).config  # noqa: E731
    rows = [_row("FlashAttention-3", role, d, n, math.prod(calibration_shape(n, d)), p, model(exposed, d, n),
                 model(1.0, d, n), config(d, n), PANEL_SOURCE.format(d, "FlashAttention-3", PANEL_IMAGES[d]))
            for role, points in (("fit", PUBLISHED_FA3), ("check", CHECK_FA3)) for d, n, p in points]
    for n, _, p in PUBLISHED_TUTORIAL:
        batch = CALIBRATION_TOKENS // n
        rows.append(_row("FlashAttention-3", "check", TUTORIAL_D, n, batch * TUTORIAL_HEADS, p,
                         model(exposed, TUTORIAL_D, n, batch, TUTORIAL_HEADS),
                         model(1.0, TUTORIAL_D, n, batch, TUTORIAL_HEADS), config(TUTORIAL_D, n),
                         TUTORIAL_SOURCE + " (flash_v3 column)"))
    return exposed, rows


def calibrate_tutorial(gpu: Gpu) -> float:
    """The MMA efficiency at which `tutorial` (the plain loop in the tutorial's configs, our Triton loop
    structure) best matches the tutorial's published H100 throughput (PUBLISHED_TUTORIAL, head dim 128):
    a second calibration of our Triton loops, beside `calibrate`'s on FlashAttention-2."""
    def model(eta, d, n):
        batch = CALIBRATION_TOKENS // n
        return tflops(batch, TUTORIAL_HEADS, n, d, tutorial(batch, TUTORIAL_HEADS, n, d, gpu, eta).seconds)

    return _fit(model, [(TUTORIAL_D, n, p) for n, p, _ in PUBLISHED_TUTORIAL], _grid(0.1, 1.0))


def tutorial_anchor(gpu: Gpu, eta: float) -> list:
    """Rows of the second anchor: the baseline in the tutorial's structure and configs (`tutorial`), at
    the flash model's ETA, against the tutorial's measured throughput (PUBLISHED_TUTORIAL); unfitted: ETA = 1."""
    rows = []
    for n, published, _ in PUBLISHED_TUTORIAL:
        batch = CALIBRATION_TOKENS // n
        fitted = tutorial(batch, TUTORIAL_HEADS, n, TUTORIAL_D, gpu, eta)
        unfitted = tutorial(batch, TUTORIAL_HEADS, n, TUTORIAL_D, gpu, 1.0)
        rows.append(_row("Triton tutorial", "anchor", TUTORIAL_D, n, batch * TUTORIAL_HEADS, published,
                         tflops(batch, TUTORIAL_HEADS, n, TUTORIAL_D, fitted.seconds),
                         tflops(batch, TUTORIAL_HEADS, n, TUTORIAL_D, unfitted.seconds),
                         f"{fitted.config} ({fitted.bound})", TUTORIAL_SOURCE + " (triton_tutorial_flash_v2 column)"))
    return rows
