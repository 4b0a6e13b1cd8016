"""`bench --model`: a roofline model of one forward call on an H100 or H200, without a GPU.

Every number it writes is a model, not a measurement. Per kernel launch the modeled time is

    max(bytes / HBM bandwidth, MMA FLOPs / (ETA * peak tensor FLOP/s),
        warp-instructions / issue rate, MUFU warp-instructions * 32 / MUFU rate) + LAUNCH_S

with the compute terms (MMA, issue, MUFU) stretched by wave quantization: a launch of P programs
with c CTAs resident per SM runs ceil(P / (SMs * c)) rounds, so the busiest SM does
ceil(P / (SMs c)) * SMs c / P times the average share. What goes in:

* ours (`vstar_triton`): bytes from the algorithm's traffic (packed: Q, K, V read and O written once,
  traffic.ideal_bytes, which the interpreter counts match; tiled: per query block Q and O once,
  K per key tile of every loop kind, V per key tile of the softmax loops: what
  `bench --traffic` counts), MMA FLOPs as issued (whole tiles: BLOCK_D padding and the packed
  block-diagonal tile included), warp-instructions and MUFU per score element of each loop kind
  from the committed static-sm90.csv (`loop_costs`), times the score elements each kind
  computes (`tile_counts`). The autotuner's choice is modeled as the faster of the configs the
  static CSV holds (the first and the last pruned).
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

See benchmarks/NOTES.md ("Roofline model") for the sources of every constant.
"""

from __future__ import annotations

import csv
import functools
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..ops.layout import block_dims, is_packed, pow2
from . import shapes
from .traffic import ideal_bytes


@dataclass(frozen=True)
class Gpu:
    """Peak rates of one GPU (sources: benchmarks/NOTES.md, "Roofline model")."""

    name: str
    hbm_bytes_s: float        # HBM bandwidth
    tensor_flop_s: float      # dense fp16/bf16 tensor-core FLOP/s
    fp32_flop_s: float        # fp32 FMA pipe (a float32 matmul without TF32)
    sms: int
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
    "h100": Gpu("H100 SXM5", 3.35e12, 989.4e12, 66.9e12, 132),
    "h200": Gpu("H200 SXM", 4.8e12, 989.4e12, 66.9e12, 132),
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


# --------------------------------------------------------------------------- the static statistics

def _results_dir() -> Path:
    from .harness import default_results_dir

    return default_results_dir()


@functools.lru_cache(maxsize=4)
def static_rows(arch: int = 90) -> tuple:
    """The committed static-sm<arch>.csv rows, fp16, forward."""
    with open(_results_dir() / f"static-sm{arch}.csv") as f:
        return tuple(r for r in csv.DictReader(f) if r["case"].startswith("fp16 ") and "+bwd" not in r["case"])


def _row(kernel: str, tile: str, case_has: str = "") -> dict:
    for r in static_rows():
        if r["kernel"] == kernel and r["tile"] == tile and (case_has in r["case"] if case_has
                                                             else r["case"].endswith(" ")):
            return r
    raise LookupError(f"static-sm90.csv has no {kernel} row with tile {tile}: run `bench --static`")


def _cost(r: dict) -> LoopCost:
    return LoopCost(float(r["instr_per_score"]), float(r["mufu_per_score"]), int(r["ctas_per_sm"]),
                    f"{r['kernel']} {r['tile']} {r['config']}")


# The tiled configs (BLOCK_M, BLOCK_N) and the packed ROWS the static CSV compiles (first, last pruned).
TILED_TILES = ((64, 32), (128, 128))
PACKED_ROWS = (32, 128)


def loop_costs(block_m: int, block_n: int, delta: bool = False) -> dict:
    """Cost per score element of each loop kind of the tiled forward, in the (BLOCK_M, BLOCK_N) config
    (with a custom delta: the biased loop of the delta case).

    The one place that maps loop kinds to compiled kernels; update it when a kernel gains a loop:
    * "row_max": Q K^T and a running max (pass 1): the row-max pre-pass kernel's loop;
    * "biased": the online softmax of S + strength m_i dA (pass 2): the tiled kernel's hot loop;
    * "plain": an online softmax of S alone: the plain-attention baseline's loop, until the tiled
      kernel has its own plain loop (the one-pass band split).
    """
    tile = f"{block_m}x{block_n}"
    return {"row_max": _cost(_row("_tar_fwd_row_max_kernel", tile, "global")),
            "biased": _cost(_row("_tar_fwd_tiled_kernel", tile, " delta" if delta else "")),
            "plain": _cost(_row("plain_attention_kernel", tile))}


def tile_counts(n: int, block_m: int, block_n: int, sigma: float) -> dict:
    """Key tiles per (batch, head) sequence of each loop kind, summed over its query blocks:
    {kind: (tiles, key rows loaded)}; a partial last tile loads only the keys < N.

    Today every query block walks all key tiles twice: pass 1 for the row max, pass 2 biased;
    sigma does not change that yet (the one-pass band split will move off-band tiles to "plain").
    """
    blocks = math.ceil(n / block_m)
    tiles = math.ceil(n / block_n)
    return {"row_max": (blocks * tiles, blocks * n), "biased": (blocks * tiles, blocks * n), "plain": (0, 0)}


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
    return e


def tiled_work(bh, n, d, kinds: dict, block_m, block_n) -> Estimate:
    """Bytes and MMA FLOPs of one tiled launch over `bh` sequences: Q read and O written once per row;
    per loop kind (`tile_counts`) K for every key row it loads, V too in the softmax loops; MMA
    over whole (BLOCK_M, BLOCK_N) tiles at the padded BLOCK_D."""
    bd, bdv = block_dims(d, d)
    e = Estimate(bytes=bh * n * 2 * d * ITEMSIZE, launches=1)
    for kind, (tiles, keys) in kinds.items():
        e.bytes += bh * keys * (d if kind == "row_max" else 2 * d) * ITEMSIZE
        e.mma_flops += bh * tiles * 2 * block_m * block_n * (bd if kind == "row_max" else bd + bdv)
    return e


def _tiled_kernel(bh, n, d, kinds: dict, costs: dict, block_m, block_n, gpu, eta, config,
                  extra_bytes: int = 0) -> Estimate:
    """One tiled launch, modeled: `tiled_work` (+ extra_bytes, a delta's) plus each loop kind's
    instructions per score element."""
    e = tiled_work(bh, n, d, kinds, block_m, block_n)
    e.bytes += extra_bytes
    e.config = config
    for kind, (tiles, _) in kinds.items():
        e.instr += bh * tiles * block_m * block_n * costs[kind].instr
        e.mufu += bh * tiles * block_m * block_n * costs[kind].mufu
    ctas = min(costs[k].ctas_per_sm for k, (t, _) in kinds.items() if t)
    return finish(e, gpu, eta, _waves(bh * math.ceil(n / block_m), ctas, gpu))


def ours(bh: int, n: int, d: int, gpu: Gpu, eta: float, sigma: float = 1.0, delta: bool = False) -> Estimate:
    """Modeled `vstar_triton` forward (row max, not causal; the Gaussian, or a custom (B, H, N, N)
    delta in q's dtype, read once: traffic.delta_entries): the faster static config."""
    extra = bh * n * n * ITEMSIZE if delta else 0
    if is_packed(n, n, d, d):
        return min((_packed(bh, n, d, rows, gpu, eta, delta, extra) for rows in PACKED_ROWS if rows >= pow2(n)),
                   key=lambda e: e.seconds)
    return min((_tiled_kernel(bh, n, d, tile_counts(n, bm, bn, sigma), loop_costs(bm, bn, delta), bm, bn, gpu, eta,
                              f"tiled {bm}x{bn}", extra) for bm, bn in TILED_TILES), key=lambda e: e.seconds)


def packed_work(bh, n, d, rows) -> Estimate:
    """Bytes and MMA FLOPs of the packed launch: rows // pow2(N) sequences per program in one
    block-diagonal tile; Q, K, V read and O written once (traffic.ideal_bytes)."""
    seqs = rows // pow2(n)
    side = seqs * pow2(n)
    bd, bdv = block_dims(d, d)
    programs = math.ceil(bh / seqs)
    return Estimate(bytes=ideal_bytes(bh, n, n, d, d, ITEMSIZE), mma_flops=programs * 2 * side * side * (bd + bdv),
                    launches=1, config=f"packed ROWS={rows}")


def _packed(bh, n, d, rows, gpu, eta, delta: bool = False, extra_bytes: int = 0) -> Estimate:
    """The packed kernel, modeled: `packed_work` (+ extra_bytes, a delta's) plus its instructions per
    element of the whole tile (the delta case's kernel with a delta)."""
    e = packed_work(bh, n, d, rows)
    e.bytes += extra_bytes
    seqs = rows // pow2(n)
    programs, elements = math.ceil(bh / seqs), (seqs * pow2(n)) ** 2
    cost = _cost(_row("_tar_fwd_packed_kernel", f"{rows}x{rows}", " delta" if delta else ""))
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
        kinds = {"plain": (math.ceil(n / bm) * math.ceil(n / bn), math.ceil(n / bm) * n)}
        estimates.append(_tiled_kernel(bh, n, d, kinds, {"plain": cost}, bm, bn, gpu, eta, f"flash {bm}x{bn}"))
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
    allocations cost nothing."""

    def __init__(self, gpu: Gpu, eta: float):
        super().__init__()
        self.gpu, self.eta = gpu, eta
        self.total = Estimate()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
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
        counter = OpCounter(gpu, eta)
        saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fused_sdpa(counter)
        try:
            with counter:
                peer.run(q, k, v, spec)
        finally:
            F.scaled_dot_product_attention = saved
    counter.total.bound = "per-op"
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
                    bound="per-op")


# --------------------------------------------------------------------------- the sweep

EAGER = ("reference_eager", "reference_materialized", "sdpa_bias")
NOT_MODELED = ("reference_compiled", "vstar_cuda", "xformers_bias")
IMPLS = ("vstar_triton", "vstar_triton_delta", "flash", "sdpa_plain", "flex_two_pass") + EAGER + NOT_MODELED
COLUMNS = ("estimate", "gpu", "shape", "batch_heads", "d", "n", "dtype", "impl", "status", "config", "bound",
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
            est = {"vstar_triton": ours(bh, n, s.head_dim, gpu, eta), "flash": flash(bh, n, s.head_dim, gpu, eta),
                   "vstar_triton_delta": ours(bh, n, s.head_dim, gpu, eta, delta=True)}
            est["sdpa_plain"] = est["flash"]
            two = flash(bh, n, s.head_dim, gpu, eta)
            est["flex_two_pass"] = Estimate(2 * two.bytes, 2 * two.mma_flops, 2 * two.instr, 2 * two.mufu, 2,
                                            2 * two.seconds, two.bound, "2 x " + two.config + " (lower bound)")
            for peer in EAGER:
                est[peer] = eager(PEERS[peer], s.batch, s.heads, n, s.head_dim, gpu, eta)
            base = dict(estimate="model", gpu=gpu_key, shape=name, batch_heads=bh, d=s.head_dim, n=n, dtype="fp16")
            ratio = est["vstar_triton"].seconds / est["flash"].seconds
            speedup = est["reference_eager"].seconds / est["vstar_triton"].seconds
            for impl in IMPLS:
                if impl in est:
                    e = est[impl]
                    rows.append({**base, "impl": impl, "status": "ok", "config": e.config, "bound": e.bound,
                                 "model_time_ms": round(e.seconds * 1e3, 6), "model_bytes": int(e.bytes),
                                 "model_mma_flops": int(e.mma_flops), "model_launches": e.launches,
                                 "model_ours_over_flash": round(e.seconds / est["flash"].seconds, 3)
                                 if impl.startswith("vstar_triton") else "",
                                 "model_reference_eager_over_ours": round(speedup, 2) if impl == "vstar_triton"
                                 else ""})
                else:
                    rows.append({**base, "impl": impl, "status": reasons[impl]})
            progress(f"  {gpu_key} {name} N={n}: ours {est['vstar_triton'].seconds * 1e3:.4f} ms "
                     f"({est['vstar_triton'].bound}), ours/flash {ratio:.2f}, reference_eager/ours {speedup:.1f}x")
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
        "Ours: bytes of the algorithm (packed: Q, K, V, O once; tiled: Q, O once per query block, K per key tile of "
        "both passes, V in pass 2), MMA FLOPs as issued (padded tiles), instructions/MUFU per score element of each "
        "loop kind from static-sm90.csv (row max: row-max kernel loop; biased: tiled kernel loop); the faster of the "
        "compiled configs; D 40/80 use the D 64 (tiled) / D 40 (packed) statistics.",
        "flash = the plain-attention baseline compiled for sm_90 in 128x64 and 128x128 tiles (BLOCK_D 64/128), "
        "the faster; sdpa_plain is modeled by it; flex_two_pass as two such loops (a lower bound).",
        "vstar_triton_delta: ours with a custom (B, H, N, N) delta in q's dtype: + its N^2 bytes per sequence, the "
        "delta case's compiled loops (no eager peer takes a delta).",
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
              "| shape | B x H | D | N | " + " | ".join(impls) + " | ours / flash (model) | ours (delta) / flash "
              "(model) | reference_eager / ours (model) | ours bound |",
              "| --- | ---: | ---: | ---: |" + " ---: |" * (len(impls) + 3) + " --- |"]
    for (shape, n), cells in by.items():
        o = cells["vstar_triton"]
        lines.append(f"| {shape} | {o['batch_heads']:,} | {o['d']} | {n} | "
                     + " | ".join(f"{cells[i]['model_time_ms']:.4g}" for i in impls)
                     + f" | {o['model_ours_over_flash']:.2f} "
                       f"| {cells['vstar_triton_delta']['model_ours_over_flash']:.2f} "
                       f"| {o['model_reference_eager_over_ours']:.1f}x "
                       f"| {o['bound']} ({o['config']}) |")
    missing = sorted({(r["impl"], r["status"]) for r in rows if r["status"] != "ok"})
    if missing:
        lines += ["", "Not modeled:", ""] + [f"- {impl}: {status}" for impl, status in missing]
    return "\n".join(lines) + "\n"


def plot(rows: list, gpu_key: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
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
    for shape in dict.fromkeys(r["shape"] for r in rows):
        pts = [(r["n"], r["model_ours_over_flash"]) for r in rows
               if r["shape"] == shape and r["impl"] == "vstar_triton"]
        right.plot(*zip(*pts), marker="o", label=shape)
    right.axhline(1.0, color="grey", lw=0.8, ls="--")
    right.set(xscale="log", xlabel="N (frames)", ylabel="ours / flash (modeled time ratio)",
              title="vstar_triton / FlashAttention loop (model)")
    right.set_xticks(shapes.KERNEL_N, [str(n) for n in shapes.KERNEL_N])
    right.legend(fontsize=7)
    fig.suptitle(f"Roofline model, {GPUS[gpu_key].name}, fp16 forward - model, not measured")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(args) -> int:
    """`bench --model [--device h100 h200] [--shapes ...] [--n ...] [--out DIR] [--no-plots]`."""
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
        base.with_suffix(".md").write_text(table)
        written = [base.with_suffix(".csv"), base.with_suffix(".md")]
        if key == "h100":
            written.append(base.with_name(base.name + "-calibration.csv"))
        if not args.no_plots:
            plot(rows, key, base.with_suffix(".png"))
            written.append(base.with_suffix(".png"))
        for p in written:
            print(f"wrote {p}")
    return 0
