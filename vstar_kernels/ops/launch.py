"""Launch policy of the Triton kernels, host side: which layout a call runs, the arguments both
launchers derive from a problem, and the autotune configs with their prune rules, as tables.

Prune rules: each kernel family lists rows (keep or drop, a condition on the launch facts `f` and
the config `c`, why); the first row that holds decides a config, and a config no row names is kept.
The rules are what ptxas compiles without spills for sm_80 and sm_90 (`tools.perf static`; the
measurements are in tools/perf/kernel-log.md: v3, v3b, v3c "Pruning", "Arch-aware pruning",
"float32 on tensor cores"). A GPU of another arch, or none named, keeps the lists without the
per-arch rows. (Triton's autotune cache is per process, not per arch: a process driving GPUs of two
archs keeps the configs of the one it tuned on first.) The interpreter does not autotune: it runs
INTERPRETER_TILES and, packed, the largest ROWS.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import threading
from dataclasses import dataclass, replace
from types import SimpleNamespace

import torch
import triton

from .._problem import FRAME_ID_LIMIT, TarProblem
from ._jit import INTERPRETING
from .layout import DOT_MIN, block_dims, head_chunks, is_packed, packed_limit, pow2

LOG2E = 1.4426950408889634
# Floor of the Gaussian's exponent coefficient -0.5 * log2(e) / sigma**2. Below about -150 every
# off-diagonal exp2(coef * (j - i)**2) is 0 in float32, as the definition is for such a narrow
# Gaussian; the floor keeps the coefficient finite (for sigma < ~1e-19 it would overflow float32,
# and the diagonal's 0 * -inf would be NaN), so that any tiny sigma gives exactly the identity.
GAUSS_COEF_MIN = -2.0 ** 32
# A Gaussian exponent (log2 units) at or below -150 is exactly 0 in float32: exp2 rounds to
# nearest, 2**-150 is half the smallest subnormal and ties to 0, and a flush-to-zero exp2 (the
# GPU's ex2.approx.ftz) gives 0 sooner. The band stops at -160, so that the float32 rounding of
# gauss_coef and of gauss_coef * d * d (relative 2**-22 at most) cannot bring an off-band exponent
# above -150, and the reference's float64 Gaussian rounded to float32 is 0 there too
# (exp(-0.5 (d / sigma)**2) <= 2**-160 < 2**-150). tests/kernels/test_one_pass.py checks all three.
BAND_EXPONENT = -160.0

# The tiled kernels' tiles in the interpreter (tests may set smaller ones). The backward's unequal
# query and key blocks make the tests cover the causal start of the dK/dV walk.
INTERPRETER_TILES = dict(forward=dict(BLOCK_M=64, BLOCK_N=64), backward=dict(BLOCK_M=64, BLOCK_N=32),
                         lean=dict(BLOCK_M=64, BLOCK_N=32))

# --------------------------------------------------------------------------- target arch

# The SM version whose spill-free tiles the autotuners keep (`target_sm`): None but while
# `targeting` names one (ahead-of-time compiles for a GPU this machine may not have).
_TARGET_SM = contextvars.ContextVar("vstar_kernels_target_sm", default=None)


@contextlib.contextmanager
def targeting(sm: int):
    """Prune the autotune configs for sm_`sm` inside the block, whatever device the tensors are on."""
    token = _TARGET_SM.set(sm)
    try:
        yield
    finally:
        _TARGET_SM.reset(token)


def target_sm(x: torch.Tensor) -> int | None:
    """The SM version (80, 86, 90, ...) a launch on x's device compiles for: the one `targeting`
    names, else the CUDA device's compute capability; None for any other device."""
    forced = _TARGET_SM.get()
    if forced is not None:
        return forced
    if x.device.type != "cuda" or torch.version.hip:
        return None
    major, minor = torch.cuda.get_device_capability(x.device)
    return 10 * major + minor


# --------------------------------------------------------------------------- layout and arguments


def tiled_only(problem: TarProblem) -> bool:
    """Frame ids or a key mask: the tiled kernels run the call at any length (the packed ones take neither)."""
    return problem.frames_q is not None or problem.key_mask is not None


def packed(problem: TarProblem) -> bool:
    """Whether the call runs the packed kernels (whole sequences in one tile, layout.is_packed)."""
    return is_packed(problem.nq, problem.nk, problem.head_dim, problem.head_dim_v) and not tiled_only(problem)


def band_width(gauss_coef: float, limit: int) -> int:
    """Least W >= 1 with gauss_coef * d * d <= BAND_EXPONENT for every integer |d| >= W, at most
    `limit` (a W as long as the sequence: every key is in the band).

    Off the band (|j - i| >= W) the Gaussian's dA is exactly 0 in float32, so the biased score is
    the plain score there, bit for bit (for a finite strength * m_i).
    """
    if gauss_coef >= 0.0:
        return limit
    square = BAND_EXPONENT / gauss_coef  # inf for a subnormal coefficient (sigma ~1e153 and more)
    if not square < float(limit) ** 2:
        return limit
    w = max(1, math.ceil(math.sqrt(square)))
    while gauss_coef * w * w > BAND_EXPONENT:
        w += 1
    return min(w, limit)


def frame_band_width(gauss_coef: float) -> int:
    """FRAME_BAND of the kernels with frame ids: ids this far apart or more have a Gaussian dA of
    exactly 0 (band_width; ids are below FRAME_ID_LIMIT, so a band that wide is never left)."""
    return band_width(gauss_coef, 2 * FRAME_ID_LIMIT)


def _precision(dtype: torch.dtype) -> str:
    """tl.dot's input_precision for float32 inputs (16-bit inputs ignore it): "tf32x3" (three TF32
    tensor-core products, float32 accuracy), or one TF32 product ("tf32") where torch allows TF32
    for its own float32 matmuls (docs/semantics.md, "Dtypes and precision")."""
    return "tf32x3" if dtype == torch.float32 and not _tf32_allowed() else "tf32"


def _tf32_allowed() -> bool:
    """Whether torch's CUDA float32 matmuls may use TF32: torch.backends.cuda.matmul.fp32_precision
    "tf32" (which allow_tf32 = True and set_float32_matmul_precision("high") also set); torch before
    2.9 has only the allow_tf32 flag. Reading allow_tf32 after the new API set the precision raises."""
    matmul = torch.backends.cuda.matmul
    try:
        return matmul.fp32_precision == "tf32"
    except AttributeError:
        return matmul.allow_tf32


def delta_args(problem: TarProblem):
    """(delta pointer, its 4 strides, gauss_coef) for a kernel launch. A frame matrix (F, F) (with
    frame ids) has strides (0, 0, row, column): the kernels index it by the ids."""
    if problem.delta is not None:
        strides = problem.delta.stride()
        return problem.delta, (0, 0, *strides) if problem.frames_q is not None else strides, 0.0
    sigma = problem.sigma
    # / sigma / sigma, not / sigma ** 2: the square of a tiny sigma is 0, the quotient overflows to -inf
    gauss_coef = 0.0 if math.isinf(sigma) else max(GAUSS_COEF_MIN, -0.5 * LOG2E / sigma / sigma)
    return problem.q, (0, 0, 0, 0), gauss_coef  # q: a dummy pointer, never read


def common_meta(problem: TarProblem, chunked: bool = True) -> dict:
    """Compile-time options shared by the forward and backward kernels. The head dims: the forward's
    in their column chunks (BLOCK_D, BLOCK_D2, BLOCK_DV, BLOCK_DV2: layout.head_chunks); with
    chunked=False, the backward's, each in one power-of-two block (BLOCK_D, BLOCK_DV): compiled for
    sm_80 and sm_90, the backward in two chunks spilled in nearly every config at head dims 80 and
    96 (up to 700 B a thread in the packed kernel at D 80 on sm_80), in one block at most 8 B in
    the configs its rules keep (kernel log v6b)."""
    meta = dict(CAUSAL=problem.causal, HAS_DELTA=problem.delta is not None, REGULARIZE=problem.regularized,
                PRECISION=_precision(problem.dtype))
    if not chunked:
        return dict(meta, BLOCK_D=pow2(problem.head_dim, DOT_MIN), BLOCK_DV=pow2(problem.head_dim_v, DOT_MIN))
    (block_d, block_d2), (block_dv, block_dv2) = head_chunks(problem.head_dim), head_chunks(problem.head_dim_v)
    return dict(meta, BLOCK_D=block_d, BLOCK_D2=block_d2, BLOCK_DV=block_dv, BLOCK_DV2=block_dv2)


def frame_args(problem: TarProblem) -> tuple:
    """(query ids, key ids, key mask, its strides, constexprs) for a tiled launch.

    The ids as contiguous int32 (read only when the bias is applied), the key mask (B, Nk) as a
    uint8 view of the bool tensor; None for what the call lacks (the kernels then compile without
    it). The constexprs: HAS_FRAMES, HAS_KEY_MASK and FRAME_TILES (dA as one vector for a tile of
    one frame id or off the band, `_jit.frame_bias`).
    """
    has_frames = problem.frames_q is not None and problem.regularized
    fq = fk = None
    if has_frames:
        fq = problem.frames_q.to(torch.int32).contiguous()
        fk = fq if problem.frames_k is problem.frames_q else problem.frames_k.to(torch.int32).contiguous()
    km, km_strides = None, (0, 0)
    if problem.key_mask is not None:
        km = problem.key_mask.view(torch.uint8)
        km_strides = km.stride()
    return fq, fk, km, km_strides, dict(HAS_FRAMES=has_frames, HAS_KEY_MASK=km is not None, FRAME_TILES=has_frames)


def vector_width(*tensors: torch.Tensor) -> int:
    """load_tile's VEC for tiles of these tensors, (..., D) with their head dim last: the largest
    power of two, at most 16 bytes of elements, that divides each tensor's address (in elements),
    every stride but the last, and D; 1 unless the last stride is 1 (or D is 1).

    Then every run of VEC head-dim entries a tile reads or writes starts VEC-aligned, and a
    row's columns below D are whole runs: load_tile's hints hold for any index in range.
    """
    vec = 16 // max(t.element_size() for t in tensors)
    for t in tensors:
        size = t.element_size()
        if t.shape[-1] > 1 and t.stride(-1) != 1:
            return 1
        for x in (t.data_ptr() // size if t.data_ptr() % size == 0 else 1, t.shape[-1], *t.stride()[:-1]):
            while x % vec:
                vec //= 2
    return vec


def packed_segments(problem: TarProblem) -> tuple:
    """(SEG_Q, SEG_K, SEG_MAX): power-of-two query rows and key columns per sequence in a packed
    tile, at least DOT_MIN (the contraction of P @ V and of the backward's transposed products)."""
    seg_q, seg_k = pow2(problem.nq, DOT_MIN), pow2(problem.nk, DOT_MIN)
    return seg_q, seg_k, max(seg_q, seg_k)


def packed_launch(problem: TarProblem) -> tuple:
    """(constexprs, grid) of a packed launch: SEG_Q, SEG_K and SEG_MAX (`packed_segments`), and
    ROWS in the interpreter, which does not autotune."""
    seg_q, seg_k, seg_max = packed_segments(problem)
    meta = dict(SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max)
    if INTERPRETING:
        meta["ROWS"] = max(packed_limit(max(block_dims(problem.head_dim, problem.head_dim_v))),
                           pow2(max(problem.nq, problem.nk)))
    bh = problem.batch * problem.heads
    return meta, lambda m: (triton.cdiv(bh, m["ROWS"] // seg_max),)


def interpreter_tiles(direction: str) -> dict:
    """The tiles of a tiled launch in the interpreter (INTERPRETER_TILES[direction]); none on a GPU."""
    return dict(INTERPRETER_TILES[direction]) if INTERPRETING else {}


# --------------------------------------------------------------------------- autotuning

KEEP, DROP = True, False


class _Tile:
    """A config as the rules read it: bm, bn (BLOCK_M, BLOCK_N), rows (ROWS), warps, stages, tile, cap (maxnreg)."""

    def __init__(self, c):
        self.config, k = c, c.kwargs
        self.bm, self.bn, self.rows, self.warps, self.stages = k.get("BLOCK_M"), k.get("BLOCK_N"), k.get("ROWS"), \
            c.num_warps, c.num_stages
        self.tile = (self.bm, self.bn, self.warps)
        self.cap = c.maxnreg


def facts(a: dict) -> SimpleNamespace:
    """What the prune rules read of a launch's arguments and constexprs `a`: the target arch, the
    input size, the widest head dim block and the options."""
    q = a.get("Q")
    sm = target_sm(q) if q is not None else None
    # the widest head dim's columns (its chunks' sum); the row-max pre-pass has no BLOCK_DV
    block = max(a.get("BLOCK_D", a.get("HEAD_DIM")) + a.get("BLOCK_D2", 0),
                a.get("BLOCK_DV", 0) + a.get("BLOCK_DV2", 0))
    delta, frames = a.get("HAS_DELTA", False), a.get("HAS_FRAMES", False)
    biased = a.get("REGULARIZE", False) and (delta or frames or not a.get("GLOBAL_MAX", False))
    size = q.element_size() if q is not None else None
    return SimpleNamespace(a=a, sm90=sm == 90, sm8x=sm is not None and 80 <= sm < 90, half=size == 2,
                           single=size == 4, block=block, wide=block > 128, deep=block > 64, delta=delta,
                           frames=frames, biased=biased, gaussian=biased and not delta and size == 2)


@dataclass(frozen=True)
class Tuning:
    """A kernel family's autotune configs and prune rules: (KEEP or DROP, condition on the launch
    facts f and the config c, why) rows, the first row whose condition holds deciding (no row: kept).
    fewest = (words(f, c), n): when the rows keep no config, the configs with the fewest words among
    those the first n rows keep."""

    configs: list
    rules: tuple
    fewest: tuple | None = None

    def prune(self, configs: list, named_args: dict, **kwargs) -> list:
        """The autotuner's early_config_prune: it passes positional arguments in named_args and the
        constexprs in kwargs."""
        f, tiles = facts({**named_args, **kwargs}), [_Tile(c) for c in configs]
        keep = [t.config for t in tiles if next((k for k, holds, _ in self.rules if holds(f, t)), KEEP)]
        if keep or self.fewest is None:
            return keep
        words, n = self.fewest
        reach = [t for t in tiles if next((k for k, holds, _ in self.rules[:n] if holds(f, t)), KEEP)]
        least = min((words(f, t) for t in reach), default=None)
        return [t.config for t in reach if words(f, t) == least]


def tuned(kernel, tuning: Tuning, key: list):
    """`kernel` autotuned per `key` over the configs `tuning` keeps; as it is in the interpreter,
    which runs one config (no benchmarking of configs on CPU)."""
    if INTERPRETING:
        return kernel
    return triton.autotune(tuning.configs, key=key, prune_configs_by={"early_config_prune": tuning.prune})(kernel)


# A tuned launch and the read of the config it ran, as one step (`launch_tuned`): the autotuner keeps only its
# latest choice, and another thread (autograd runs a backward per device; forwards may run in several threads)
# may launch the same kernel with another key in between.
_TUNED_LAUNCH = threading.Lock()


def launch_tuned(tuner, grid, direction: str, *args, **kwargs) -> dict:
    """Launch `tuner` on `grid` and return the config it ran (`tuned_config`), for the launches that must run it
    (the dK/dV pass the dQ pass's, the redo the speculative forward's)."""
    with _TUNED_LAUNCH:
        tuner[grid](*args, **kwargs)
        return tuned_config(tuner, direction)


def tuned_config(tuner, direction: str) -> dict:
    """The tiles, warps, stages and register cap (if any) of `tuner`'s latest launch (INTERPRETER_TILES[direction]
    in the interpreter), for a launch that must run the same config (the dK/dV pass runs the dQ pass's, the redo
    the speculative form's)."""
    if INTERPRETING:
        return dict(INTERPRETER_TILES[direction])
    config = tuner.best_config
    cap = dict(maxnreg=config.maxnreg) if config.maxnreg else {}
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages, **cap)


def _configs(tiles, stages) -> list:
    """triton.Configs of (BLOCK_M, BLOCK_N, warps) or (ROWS, warps) tiles, each with each of `stages`."""
    names = ("BLOCK_M", "BLOCK_N") if len(tiles[0]) == 3 else ("ROWS",)
    return [triton.Config(dict(zip(names, t[:-1])), num_warps=t[-1], num_stages=st) for t in tiles for st in stages]


# float32 packed programs hold their Q, K, V (and dO) tiles split in two for the tf32x3 dot: ROWS x
# these head dims / (32 x warps) words a thread, at most 96 (forward: ROWS = 128 on 4 warps spilled 8 B
# on sm_90, on 2 warps 1.5-1.9 KB, D 40) and 128 (backward: ROWS = 128 on 4 warps spilled 1.2 KB).
_D = lambda f: f.a["BLOCK_D"] + f.a.get("BLOCK_D2", 0)  # noqa: E731 (a head dim's columns: its chunks' sum)
_DV = lambda f: f.a["BLOCK_DV"] + f.a.get("BLOCK_DV2", 0)  # noqa: E731
_FWD_WORDS = lambda f, c: c.rows * (2 * _D(f) + _DV(f)) / (32 * c.warps)  # noqa: E731
_BWD_WORDS = lambda f, c: c.rows * 2 * (_D(f) + _DV(f)) / (32 * c.warps)  # noqa: E731
_SEQS = lambda f, c: c.rows // f.a["SEG_MAX"]  # noqa: E731
FWD_PACKED = Tuning(
    _configs([(rows, w) for rows in (32, 64, 128) for w in (2, 4, 8)], (1,)),
    ((DROP, lambda f, c: _SEQS(f, c) < 1, "a program holds whole sequences"),
     (DROP, lambda f, c: f.wide and c.rows > 64, "above head dim 128 at most 64 rows"),
     (DROP, lambda f, c: c.rows <= 32 and c.warps > 4, "32 rows on at most 4 warps"),
     (DROP, lambda f, c: _SEQS(f, c) * f.a["SEG_Q"] * f.a["SEG_K"] > 4096 * 64 // max(f.block, 64) * c.warps,
      "score elements per warp (sm_90: 8192 at D 64 and 4096 at D 128 spill, 4096 and 2048 do not)"),
     # one sequence per program runs 2-D products (_jit.mma): wgmma on sm_90 from 4 warps; with 2
     # warps the 2-D form took more registers than the batched one and spilled at D = 80
     (DROP, lambda f, c: _SEQS(f, c) == 1 and c.warps < 4, "one sequence per program: 4 warps or more"),
     (DROP, lambda f, c: f.single and _FWD_WORDS(f, c) > 96, "float32: 96 words a thread")),
    fewest=(_FWD_WORDS, 5))

# "The bias": TAR with the row max, a custom delta or frame ids (the global max's Gaussian without
# frame ids, and the row-max pre-pass, count as unbiased).
FWD_TILED = Tuning(
    _configs([(bm, bn, w) for bm in (64, 128) for bn in (32, 64, 128) for w in (4, 8)], (2, 3))
    + _configs([(32, 32, 4)], (2, 3)) + _configs([(32, 32, 8)], (2,))  # 32 x 32: float32 only
    + _configs([(64, 16, 8)], (2,)),  # float32 in 65-80 columns only
    ((KEEP, lambda f, c: f.single and f.deep and f.block <= 80 and c.tile == (64, 16, 8),
      "float32 in 65-80 columns (72 and 80 held as 64 + 16): 64 x 16 on 8 warps, without spills on sm_80 and sm_90 "
      "(at D 80 64 x 32 on 8 warps spilled 120-232 B, on 4 216 B on sm_80, 32 x 32 80-200 B; kernel log v6e)"),
     (DROP, lambda f, c: c.bn == 16 or (f.single and f.deep and f.block <= 80), "and no other tile there"),
     (DROP, lambda f, c: (c.bm == 32) != (f.single and not f.sm90),
      "4-byte inputs (the tf32x3 or tf32 dot) take the 32 x 32 tiles, which only they use, but on sm_90 ..."),
     (DROP, lambda f, c: f.single and f.sm90 and (c.bn > 32 or c.stages > 2),
      "... the 64- and 128-row tiles with at most 32 keys and 2 stages"),
     (KEEP, lambda f, c: f.gaussian and f.sm90 and not f.deep and c.tile == (128, 64, 8),
      "sm_90, the 16-bit Gaussian up to head dim 64: 128 x 64 on 8 warps (up to 255 registers saving statistics)"),
     (KEEP, lambda f, c: f.gaussian and f.sm90 and not f.frames and f.deep and f.block <= 96
      and c.tile in ((128, 32, 8), (128, 64, 8)),
      "sm_90, the 16-bit Gaussian without frame ids at head dims held in 80 or 96 columns (layout.head_chunks): "
      "128 x 32 and 128 x 64 on 8 warps"),
     (KEEP, lambda f, c: f.gaussian and f.frames and f.sm90 and _D(f) == _DV(f) == 128 and c.tile == (128, 64, 8)
      and c.stages == 2 and not (f.a.get("GLOBAL_MAX") or f.a.get("CAUSAL") or f.a.get("HAS_KEY_MASK")),
      "sm_90, frame ids with the row max, the 16-bit Gaussian in 128 columns (q, k and v), no causal mask or key "
      "mask: 128 x 64 on 8 warps with 2 stages (compiled at Wan 480p: two passes 228-230 registers, no spill; the "
      "speculative form spills 24 B, no local access in a loop, its redo none since kernel log v17; "
      "with 3 stages the speculative form has 6 local accesses in its loops; kernel log v7, v7b, v8, v9)"),
     (DROP, lambda f, c: f.wide and (c.bm > 64 or c.bn > 64), "above head dim 128 at most 64 x 64"),
     (DROP, lambda f, c: c.warps == 4 and (c.bm > 64 or c.bn > 32), "on 4 warps at most 64 x 32"),
     (DROP, lambda f, c: f.sm8x and f.biased and c.bn > 32 and (f.delta or f.frames or f.deep and f.block <= 96),
      "sm_8x: at most 32 keys for the bias of a custom delta, frame ids or at head dims held in 80 or 96 columns "
      "(64 x 64 spilled 16-40 B at D 80)"),
     (DROP, lambda f, c: c.bm * c.bn > (64 * 64 if f.biased or f.deep else 128 * 64),
      "at most 128 x 64 scores (64 x 128 too), 64 x 64 (128 x 32 too) with the bias or above head dim 64"),
     (KEEP, lambda f, c: f.gaussian and f.frames and not f.wide and not (f.sm8x and f.deep)
      and c.tile == (128, 32, 8), "frame ids, the 16-bit Gaussian: 128 x 32 on 8 warps up to head dim 128 "
                                  "(on sm_8x up to 64)"),
     (DROP, lambda f, c: f.biased and f.deep and (c.bm > 64 or c.warps == 4 or (f.delta and c.bn > 32)),
      "the bias above head dim 64: at most 64 rows, on 8 warps (a custom delta: at most 32 keys)"),
     (DROP, lambda f, c: f.sm8x and f.biased and f.half and (not f.deep or f.block == 96) and (c.bm, c.bn) == (64, 32)
      and c.stages > 2, "sm_8x, the 16-bit bias up to head dim 64 and at 96 columns: 64 x 32 with 2 stages only "
                        "(3 spilled 32 B at D 96)")))

# The speculative one pass (frame ids) tunes over FWD_TILED's configs and, after each 64 x 32 config on 4 warps, the
# same capped at 168 registers (Config.maxnreg): compiled for sm_90 at CogVideoX (bf16, head dim 64), the form takes
# 176 registers with 2 stages and 190 with 3 (2 programs an SM) where two passes take 148 and 158 (3); capped, 168
# and 157 without a spill and with the same hot loop (1.107 and 1.129 warp-instructions a score; ~50 more outside
# the loops): 3 programs. Two passes ran 64 x 32 x 4 on an H200 (24.6 ms) where the one pass, tuned to 128 x 64 x 8,
# took 26.7 (benchmarks/NOTES.md); the tuner picks between them on the GPU. The redo runs the same config (capped:
# 152 and 154 registers, no spill). sm_90, 16-bit, up to head dim 64 only: on sm_80 the capped form spilled 8 B,
# in its loops; float32 takes 238-252 registers there uncapped.
SPECULATIVE_MAXNREG = 168
FWD_TILED_SPECULATIVE = replace(FWD_TILED, configs=[
    x for c in FWD_TILED.configs
    for x in ([c, triton.Config(c.kwargs, num_warps=4, num_stages=c.num_stages, maxnreg=SPECULATIVE_MAXNREG)]
              if (c.kwargs.get("BLOCK_M"), c.kwargs.get("BLOCK_N"), c.num_warps) == (64, 32, 4) else [c])],
    rules=((DROP, lambda f, c: c.cap and not (f.sm90 and f.half and not f.deep),
            "a register cap on sm_90 at 16 bits up to head dim 64 only (where it was compiled)"), *FWD_TILED.rules))

# Five (SEQS x SEG_Q x SEG_K) float32 tiles live at once (S', P, dP, dS, dA).
BWD_PACKED = Tuning(
    _configs([(rows, w) for rows in (16, 32, 64, 128) for w in (4, 8)], (1,)),
    ((DROP, lambda f, c: c.rows < f.a["SEG_MAX"], "a program holds whole sequences"),
     (DROP, lambda f, c: f.deep and c.rows > max(64, f.a["SEG_MAX"]),
      "above head dim 64 at most 64 rows (or one sequence, whichever is more)"),
     (DROP, lambda f, c: c.rows <= 32 and c.warps > 4, "32 rows on at most 4 warps"),
     (DROP, lambda f, c: f.deep and c.rows >= 64 and c.warps < 8,
      "above head dim 64, 64 rows or more on 8 warps (on 4, 24-368 B spilled at D 80, sm_80 and sm_90)"),
     (DROP, lambda f, c: f.single and _BWD_WORDS(f, c) > 128, "float32: 128 words a thread")),
    fewest=(_BWD_WORDS, 3))

# 32-bit words a thread holds for the rows either tiled backward pass keeps across its walk: per
# query row Q, dO and the float32 dQ and sum P K (dQ pass), per key K, V, dK, dV (dK/dV pass).
_ROW_WORDS = lambda f, c: (c.bm + c.bn) * f.block / (32 * c.warps)  # noqa: E731
_HOPPER_16 = lambda f: f.sm90 and f.half and f.block <= 64  # noqa: E731
# Each tile on 4 and 8 warps, then the 16-key tiles, for float32 inputs only. The dQ pass and the
# dK/dV pass run the same config (`tuned_config`).
BWD_TILED = Tuning(
    _configs([(bm, bn, w) for bm, bn in ((32, 32), (32, 64), (64, 32), (64, 64), (32, 128), (128, 32), (64, 128),
                                         (128, 64)) for w in (4, 8)] + [(32, 16, 4), (32, 16, 8), (16, 16, 2),
                                                                         (16, 16, 4), (16, 16, 8)], (2,)),
    ((DROP, lambda f, c: (c.bn == 16) != f.single, "float32 inputs take the 16-key tiles, which only they use"),
     (DROP, lambda f, c: (f.single and f.deep and not f.wide) != (c.tile == (16, 16, 8)),
      "float32 in 65-128 columns: 16 x 16 on 8 warps, and that tile nowhere else (at D 80 16 x 16 on 4 warps "
      "spilled 40-64 B in the dK/dV pass, 32 x 16 80-824 B; on 8 warps none at 80, 96 or 128, sm_80 and sm_90, "
      "but 8 B in sm_80's dK/dV pass with causal and the global max; kernel log v6e)"),
     (DROP, lambda f, c: _ROW_WORDS(f, c) > 32, "at most 32 row words a thread"),
     # A score tile may take at most 8 float32 words a thread (several live at once), at most 32 x 32
     # with a custom delta (its tile is one more; 64 x 32 on sm_90 at 16 bits up to head dim 64); and
     # BLOCK_N <= BLOCK_M (at 32 x 64 the dK/dV pass spills on sm_80 where 64 x 32 does not).
     (DROP, lambda f, c: c.bn > c.bm or c.bm * c.bn > 256 * c.warps
      or c.bm * c.bn > ((2048 if _HOPPER_16(f) else 1024) if f.delta else 8192), "score tiles that spill"),
     (DROP, lambda f, c: f.single and f.sm90 and c.bm != 16, "float32 on sm_90: 16 x 16 only"),
     (DROP, lambda f, c: _HOPPER_16(f) and c.tile != (64, 32, 8),
      "sm_90, 16-bit up to head dim 64: 64 x 32 on 8 warps only, a custom delta included (32 x 32 was read as "
      "spilling: an 8-byte stack frame it never stores to, kernel log v8; untimed)"),
     (DROP, lambda f, c: f.sm8x and f.half and f.block <= 64 and f.frames and (c.bm, c.bn) == (64, 32),
      "sm_8x, 16-bit frame ids up to head dim 64: no 64 x 32")),
    # head dims over 128, which no row keeps: the input size's tiles with the fewest row words, on any
    # GPU (16-bit: 32 x 32 on 8 warps; float32: 32 x 16 on 8 warps; they spill, least)
    fewest=(_ROW_WORDS, 2))

# The lean forward (ops/tar_fwd_lean.py), sm_90 only: 128 query rows, on 4 warps warp-specialized (Triton adds
# its producer and consumer partitions) or on 8 warps without. Compiled for sm_90 without spills (tools.perf
# static, kernel-log v5); 128 x 128 above head dim 64 needs 257 KB of shared memory warp-specialized, and on 8
# warps spilled until its bias stopped copying a tile of registers (kernel log v15: at Wan 226 registers for the
# two loops, 241 for the speculative form, 160 KB of shared memory; an H100's tuner took it at Wan 480p: the two
# loops 21.95 ms where 128 x 64 took 24.8 before v15, benchmarks/NOTES.md).
FWD_LEAN = Tuning(
    [triton.Config(dict(BLOCK_M=128, BLOCK_N=bn, WARP_SPECIALIZE=ws), num_warps=w, num_stages=st)
     for bn, w, ws, st in ((64, 4, True, 2), (64, 4, True, 3), (128, 4, True, 2), (64, 8, False, 2),
                           (128, 8, False, 2))],
    ((DROP, lambda f, c: f.deep and c.bn > 64 and c.config.kwargs["WARP_SPECIALIZE"],
      "above head dim 64 at most 64 keys a tile warp-specialized"),
     (DROP, lambda f, c: not f.deep and c.stages > 2, "up to head dim 64: 2 stages"),
     (DROP, lambda f, c: f.a.get("SPECULATE") and c.config.kwargs["WARP_SPECIALIZE"],
      "the speculative form without warp specialization: Triton 3.9's pass fails on its raw running max (an "
      "assertion in NVGPUWarpSpecialization, tools.perf static)")))

