"""`python -m tools.perf model --dit`: the video DiT self-attention shapes, ours with frame ids."""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from vstar_kernels.bench.measure import ideal_cost
from vstar_kernels.functional import Speculation
from vstar_kernels.ops.launch import GAUSS_COEF_MIN, LOG2E, band_width, frame_band_width
from vstar_kernels.ops.layout import block_dims

from .eager import eager
from .model import command, progress_lines, write_table_and_plot
from .roofline import (
    GPUS,
    ITEMSIZE,
    LAUNCH_S,
    ONE_PASS_LOOPS,
    Estimate,
    Gpu,
    LoopCost,
    _config_fields,
    calibrate,
    calibrate_fa3,
    calibrate_tutorial,
    compiled_launch,
    configs_compiled,
    fa3,
    finish,
    flash,
    ours_launch,
    quick_title,
    results_dir,
    short_config,
    tile_counts,
    tiled_work,
    waves_stretch,
)
from .traffic import band_tiles, tiled_bytes

# --------------------------------------------------------------------------- DiT shapes (`tools.perf model --dit`)

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
# documented defaults where those are the checkpoint's; see tools/perf/model.md, "DiT shapes (model)"):
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
DIT_EAGER = ("reference_eager", "sdpa_bias")
DIT_IMPLS = ("vstar_triton_frames", "fa3", "flash", "flex_two_pass") + DIT_EAGER
SPECULATIVE = "vstar_triton_frames_one_pass"  # rows at each of FLAG_RATES, beside the two-pass rows
FLAG_RATES = (0.0, 0.05, 0.2, 1.0)
DIT_COLUMNS = ("estimate", "gpu", "model", "batch", "heads", "d", "n", "latent_frames", "tokens_per_frame",
               "text_tokens", "dtype", "impl", "flag_rate", "guess_tile_share", "status", "config", "bound",
               "model_time_ms", "model_bytes", "model_mma_flops", "model_peak_gb", "model_fits_up_to_n",
               "model_ours_over_fa3", "model_ours_over_fa3_tutorial", "model_ours_over_fa3_eta1",
               "model_ours_over_flash", "model_ours_over_flex_two_pass", "model_time_l2_ms", "model_ours_over_fa3_l2",
               "model_ours_over_flash_l2")


# The tiled forward's MMA loops with frame ids, in SASS order: the row-max walk over every key tile
# (two passes), then the softmax in the one-pass kernel's tile order (ops/tar_fwd.py): full and
# masked tiles left of the token band, the same right of it, the band. All of them biased: each key
# tile takes one dA column (the loop's shortest path) or dA per score (its longest).
FRAME_LOOPS = ("row_max",) + ONE_PASS_LOOPS[:4] + ("biased",)


def frames_loop_costs(batch: int, heads: int, n: int, d: int, ids: torch.Tensor, sigma: float, arch: int = 90) -> tuple:
    """((BLOCK_M, BLOCK_N, config, {kind: (column LoopCost, per-score LoopCost)}, per-program
    warp-instructions outside the loops), ...) of the tiled forward with frame ids (HAS_FRAMES,
    FRAME_TILES; kinds FRAME_LOOPS) that this bf16 call launches (frame ids `ids`, the Gaussian of
    `sigma`), compiled for sm_`arch` as the call specializes it (its own N, heads and strides; every
    config the sm_`arch` pruning keeps, or its first and last inside `roofline.quick_configs`). A key tile
    of one dA column runs the loop's shortest path (static.loop_paths), a tile with dA per score its
    longest; the row-max walk has one path."""
    launch = ours_launch(batch, heads, n, d, sigma, frames=ids, dtype=torch.bfloat16, arch=arch)
    out = []
    for config, rows in compiled_launch(launch, arch):
        loops = sorted((r for r in rows if r.loop != "hot"), key=lambda r: int(r.loop))
        walk, biased = loops[0], loops[1:]
        if (len(loops) != len(FRAME_LOOPS) or walk.loop_mufu or walk.loop_mma >= min(r.loop_mma for r in biased)
                or any(r.short_instr_per_score >= r.long_instr_per_score for r in biased)):
            raise LookupError(f"the frame-id tiled kernel ({config}) has loops {[r.loop for r in loops]} "
                              f"not in the order {', '.join(FRAME_LOOPS)} (the walk without MUFU and with fewer "
                              "MMA, then loops with a dA column branch): update FRAME_LOOPS to the kernel")

        def cost(r, path):
            return LoopCost(getattr(r, f"{path}_instr_per_score"), getattr(r, f"{path}_mufu_per_score"),
                            r.ctas_per_sm, f"{r.kernel} {r.tile} {r.config} frames loop {r.loop} {path} path")

        costs = {kind: (cost(r, "short"), cost(r, "long")) for kind, r in zip(FRAME_LOOPS, loops)}
        fields = _config_fields(config)
        out.append((fields["BLOCK_M"], fields["BLOCK_N"], config, costs, rows[0].outside_warp_instr))
    return tuple(out)


def tiles_of(ids: torch.Tensor, size: int, fill: int) -> torch.Tensor:
    """The frame ids (N,) as (ceil(N / size), size) tiles, the last padded with `fill` (what a kernel reads past N)."""
    t = torch.full((math.ceil(ids.numel() / size) * size,), fill, dtype=torch.int64)
    t[:ids.numel()] = ids
    return t.view(-1, size)


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
        t = tiles_of(ids, size, -1)
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


def ours_frames(batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float, ids: torch.Tensor,
                sigma: float) -> Estimate:
    """Modeled `vstar_triton` forward with frame ids `ids` (N,) and the Gaussian of `sigma` (no key
    mask, not causal): bytes and MMA of the two-pass form (traffic.tiled_bytes with every tile
    walked and biased, plus the int32 ids: each query block's once, the keys' once per query block
    in the biased pass); instructions/MUFU per loop and path from `frames_loop_costs`, each key tile
    on the path `frame_tile_counts` gives it, and each program's instructions outside the loops; the
    fastest config."""
    out = []
    for bm, bn, config, costs, program_instr in frames_loop_costs(batch, heads, n, d, ids, sigma):
        bh = batch * heads
        e = tiled_work(bh, n, d, tile_counts(n, bm, bn, None), bm, bn, sigma=None, frame_ids=True)
        for kind, (column, per_score) in frame_tile_counts(ids, bm, bn, sigma).items():
            short, long = costs[kind]
            e.instr += bh * bm * bn * (column * short.instr + per_score * long.instr)
            e.mufu += bh * bm * bn * (column * short.mufu + per_score * long.mufu)
        programs = bh * math.ceil(n / bm)
        e.instr += programs * program_instr
        e.config = f"tiled {bm}x{bn} {short_config(config)} frames"
        ctas = min(c.ctas_per_sm for pair in costs.values() for c in pair)
        out.append(finish(e, gpu, eta, waves_stretch(programs, ctas, gpu)))
    return min(out, key=lambda e: e.seconds)


def guess_tiles(ids: torch.Tensor, block_m: int, block_n: int) -> int:
    """Key tiles the speculative forward's guess walks over one sequence of frame ids (ops/tar_fwd.py
    `_guess_max`): for each query block with a video row, the tiles holding a text key or a key of a
    frame within the block's span of frames."""
    none = 1 << 30
    k, q = tiles_of(ids, block_n, -2), tiles_of(ids, block_m, -2)
    k_lo, k_hi, text = torch.where(k >= 0, k, none).min(1).values, k.max(1).values, (k == -1).any(1)
    q_lo, q_hi = torch.where(q >= 0, q, none).min(1).values, q.max(1).values
    walk = text[None, :] | ((k_lo[None, :] <= q_hi[:, None]) & (k_hi[None, :] >= q_lo[:, None]))
    return int((walk & (q_lo <= q_hi)[:, None]).sum())


def one_id_tiles(ids: torch.Tensor, block_n: int) -> int:
    """Key tiles of BLOCK_N keys (the last padded with -1, as the kernels read keys past N) whose frame ids are
    one value (text included): there dA is one column along any block of rows (ops/_jit.frame_tile_id)."""
    t = tiles_of(ids, block_n, -1)
    return int((t.min(1).values == t.max(1).values).sum())


def ours_frames_speculative(batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float, ids: torch.Tensor,
                            sigma: float, flag_rate: float) -> tuple:
    """(Estimate, guess tile share) of the speculative forward (frame ids, the Gaussian of `sigma`, no key
    mask) when `flag_rate` of the video rows are flagged: the one-pass kernel (the guess walk over
    `guess_tiles`, then the biased softmax over every tile in the two-pass tile order, each loop's
    path as `frame_tile_counts` gives it) and the redo, both compiled for sm_90 at the call's shape,
    with the listing launch between them counted as a launch only (its bytes, 8 a flagged row and the
    block counts it reads, are not counted: under 0.1% of the call's at these shapes).
    The redo, modeled: ceil(f x video rows / BLOCK_M) programs per sequence, each over every key tile
    (its rows' off-band tiles) and the union of its rows' bands: its rows, listed in row order, come
    from ceil(1 / f) consecutive query blocks, whose bands span one block's band and BLOCK_M / BLOCK_N
    tiles more for each further block (at most every tile), each tile at the costlier of its two
    softmax loops: on the shortest path where the pass over every tile meets a tile of one frame id
    (dA one column, as ops/_jit.frame_tile_id takes it), the longest elsewhere (dA per score: an upper
    bound, the far-frame test spares some); its other programs exit at once (not counted); a launch of its
    own, in waves of its programs (as the lean redo, `ours_lean`). Bytes as
    requested: Q, O once, K and V once per tile, K of the guess tiles, the key ids twice (the guess's
    scan, the softmax), the flagged rows' index and max, and the redo's Q rows, K, V and ids of its
    tiles, O rows; the fastest config."""
    main, _listing, redo = ours_launch(batch, heads, n, d, sigma, frames=ids, dtype=torch.bfloat16, speculate=True)
    redo_rows = dict(compiled_launch(redo))
    bh, bd = batch * heads, block_dims(d, d)[0]
    video = int((ids >= 0).sum())
    out = []
    for config, rows in compiled_launch(main):
        loops = sorted((r for r in rows if r.loop != "hot"), key=lambda r: int(r.loop))
        fields = _config_fields(config)
        bm, bn = fields["BLOCK_M"], fields["BLOCK_N"]
        blocks, tiles = math.ceil(n / bm), math.ceil(n / bn)
        redo_loops = sorted((r for r in redo_rows[config] if r.loop != "hot"), key=lambda r: int(r.loop))
        if (len(loops) != len(FRAME_LOOPS) or loops[0].loop_mufu or len(redo_loops) != 3 or redo_loops[0].loop_mufu
                or not all(r.loop_mufu and r.short_instr_per_score < r.long_instr_per_score for r in redo_loops[1:])):
            raise LookupError(f"the speculative kernels ({config}) have loops {[r.loop for r in loops]} and "
                              f"{[r.loop for r in redo_loops]}, not the guess walk, the five softmax loops and the "
                              "redo's walk and two softmax loops: update the model to the kernels")
        guess = guess_tiles(ids, bm, bn)
        counts = frame_tile_counts(ids, bm, bn, sigma)
        e = Estimate(launches=3, config=f"tiled {bm}x{bn} {short_config(config)} frames, speculative")
        e.bytes = bh * (tiled_bytes(n, n, d, d, ITEMSIZE, bm, bn, frame_ids=True) - blocks * n * d * ITEMSIZE
                        + guess * bn * d * ITEMSIZE + blocks * n * 4 + flag_rate * video * 8)
        softmax_tiles = sum(sum(counts[kind]) for kind in FRAME_LOOPS[1:])
        e.mma_flops = bh * 2 * bm * bn * (guess * bd + softmax_tiles * 2 * bd)
        e.instr = bh * bm * bn * guess * loops[0].instr_per_score
        for kind, r in zip(FRAME_LOOPS[1:], loops[1:]):
            column, per_score = counts[kind]
            e.instr += bh * bm * bn * (column * r.short_instr_per_score + per_score * r.long_instr_per_score)
            e.mufu += bh * bm * bn * (column * r.short_mufu_per_score + per_score * r.long_mufu_per_score)
        e.instr += bh * blocks * rows[0].outside_warp_instr
        if flag_rate > 0:
            programs = bh * math.ceil(flag_rate * video / bm)
            band = math.ceil(sum(counts["biased"]) / blocks)
            extra = min(tiles, (math.ceil(1 / flag_rate) - 1) * bm // bn + band)
            walked = tiles + extra
            single = one_id_tiles(ids, bn)  # of the pass over every tile; the band's tiles: dA per score
            softmax = redo_loops[1:]
            short_instr, long_instr = (max(getattr(r, f"{path}_instr_per_score") for r in softmax)
                                       for path in ("short", "long"))
            short_mufu, long_mufu = (max(getattr(r, f"{path}_mufu_per_score") for r in softmax)
                                     for path in ("short", "long"))
            redo = Estimate()  # a launch of its own (counted in e's), in waves of its own programs
            redo.bytes = programs * (bm * (d + d) * ITEMSIZE + bm * 8 + walked * bn * ((d + d) * ITEMSIZE + 4))
            redo.mma_flops = programs * walked * 2 * bm * bn * 2 * bd
            redo.instr = programs * (bm * bn * (single * short_instr + (walked - single) * long_instr)
                                     + redo_loops[0].outside_warp_instr)
            redo.mufu = programs * bm * bn * (single * short_mufu + (walked - single) * long_mufu)
            redo = finish(redo, gpu, eta, waves_stretch(programs, min(r.ctas_per_sm for r in redo_loops), gpu))
        e = finish(e, gpu, eta, waves_stretch(bh * blocks, min(r.ctas_per_sm for r in loops), gpu))
        if flag_rate > 0:
            e.seconds += redo.seconds
            e.bytes, e.mma_flops = e.bytes + redo.bytes, e.mma_flops + redo.mma_flops
        out.append((e, guess / (blocks * tiles)))
    return min(out, key=lambda pair: pair[0].seconds)


# --------------------------------------------------------------------------- the lean forward (backend="triton-lean")

LEAN = "vstar_triton_lean"  # its two loops (the walk, the biased loop), what speculate=False and the fallback run
LEAN_SPECULATIVE = "vstar_triton_lean_one_pass"  # its speculative form at each of FLAG_RATES, with the fallback


def lean_launches(batch: int, heads: int, d: int, s: Dit, speculate: bool) -> list:
    """The launches `tar_fwd_lean.lean_forward` makes for the DiT call `s` (bf16, recorded, nothing runs): the lean
    kernel, and with `speculate` the two listing launches and the redo. Its inputs are CPU tensors never written
    (the launcher reads the frame ids' layout, which meta tensors cannot give). The kernel is autotuned over the
    configs without warp specialization, the only ones `ours_lean` can model (--quick's first and last among them)."""
    from vstar_kernels._problem import make_problem
    from vstar_kernels.ops.launch import targeting

    from .compile_check import _modules, record

    lean = _modules()[2]
    q, k, v = (torch.empty(batch, s.n, heads, d, dtype=torch.bfloat16).transpose(1, 2) for _ in range(3))
    problem = make_problem(q, k, v, sigma=s.sigma, strength=1.0, delta=None, causal=False, max_mode="row",
                           scale=None, frames=s.frames())
    flags = torch.zeros(batch * heads, dtype=torch.int32) if speculate else None
    with targeting(90):
        return record(lambda: lean.lean_forward(problem, flags=flags, warp_specialize=False))


def lean_loops(rows: tuple, config: str) -> tuple:
    """(walk, biased) static rows of a lean or redo kernel compiled without warp specialization: its two MMA loops,
    the walk the one without MUFU."""
    loops = sorted((r for r in rows if r.loop != "hot"), key=lambda r: int(r.loop))
    if len(loops) != 2 or loops[0].loop_mufu or not loops[1].loop_mufu:
        raise LookupError(f"{rows[0].kernel} ({config}) has loops {[r.loop for r in loops]}, not the walk and the "
                          "biased loop: update model_dit.lean_loops to the kernel")
    return tuple(loops)


def lean_blocks(s: Dit, block_m: int, block_n: int) -> tuple:
    """(query blocks with a video row, tiles each of them walks speculatively, summed, one-frame key tiles) of the
    lean kernel over the call `s`: the walk's tiles as `_tar_fwd_lean_kernel` bounds them (the text before the
    video, the block's own frames, the text after), and the key tiles whose keys (up to N) are one frame id (its
    short path: dA one vector along the rows)."""
    n, before, per, video = s.n, s.text_before, s.tokens_per_frame, s.latent_frames * s.tokens_per_frame
    end = math.ceil(n / block_n) * block_n
    e1 = math.ceil(before / block_n) * block_n
    t1_text = (before + video) // block_n * block_n if before + video < n else end
    blocks, guess = 0, 0
    for start_m in range(0, n, block_m):
        if not (start_m < before + video and start_m + block_m > before):
            continue
        blocks += 1
        v_lo = max(start_m - before, 0) // per * per
        v_hi = (min(start_m + block_m - before, video) - 1) // per * per + per
        a0 = max((before + v_lo) // block_n * block_n, e1)
        a1 = max(min(math.ceil((before + v_hi) / block_n) * block_n, end), a0)
        t1 = max(t1_text, a1)
        guess += (e1 + a1 - a0 + end - t1) // block_n
    ids = s.frames()
    single = sum(int(ids[a:a + block_n].min() == ids[a:a + block_n].max()) for a in range(0, n, block_n))
    return blocks, guess, single


def ours_lean(batch: int, heads: int, d: int, gpu: Gpu, eta: float, s: Dit, flag_rate: float | None) -> Estimate:
    """Modeled lean forward (frame ids of the regular layout from the token index, tensor-descriptor loads, no
    stats), compiled for sm_90 at the call's shape: flag_rate None runs its two loops (the walk over every key tile
    for each query block with a video row, the biased loop over every tile); a number, its speculative form with
    that share of the video rows flagged: the walk over the tiles `lean_blocks` gives, the biased loop over every
    tile, the flags written, the two listing launches (as launches, their bytes the flags read and the lists), and
    the redo (tar_fwd_lean.LEAN_REDO: ceil(f x video rows / BLOCK_M) programs a sequence, each walking every key
    tile and then running its softmax over every tile: an upper bound, the walk taken only for rows flagged on a
    biased tile max) as a launch of its own, with its own waves. Each biased tile on its loop's shortest path where
    its keys are one frame id, the longest elsewhere. Configs without warp specialization only (the speculative
    form has no other; the two loops' warp-specialized configs run partitions whose loops the model cannot add up):
    the fastest."""
    speculate = flag_rate is not None
    main, *rest = lean_launches(batch, heads, d, s, speculate)
    bh, n, bd = batch * heads, s.n, block_dims(d, d)[0]
    video = s.latent_frames * s.tokens_per_frame
    out = []
    for config, rows in compiled_launch(main):
        walk, biased = lean_loops(rows, config)
        config = config.replace(" WARP_SPECIALIZE=False", "")
        fields = _config_fields(config)
        bm, bn = fields["BLOCK_M"], fields["BLOCK_N"]
        blocks, tiles = math.ceil(n / bm), math.ceil(n / bn)
        video_blocks, guess, single = lean_blocks(s, bm, bn)
        walked = guess if speculate else video_blocks * tiles
        e = Estimate(launches=1, config=f"lean {bm}x{bn} {short_config(config)}" + (", speculative" if speculate
                                                                                    else ""))
        e.bytes = bh * (2 * n * d * ITEMSIZE + walked * bn * d * ITEMSIZE + blocks * tiles * bn * 2 * d * ITEMSIZE)
        e.mma_flops = bh * 2 * bm * bn * (walked * bd + blocks * tiles * 2 * bd)
        e.instr = bh * bm * bn * (walked * walk.short_instr_per_score
                                  + blocks * (single * biased.short_instr_per_score
                                              + (tiles - single) * biased.long_instr_per_score))
        e.mufu = bh * bm * bn * blocks * (single * biased.short_mufu_per_score
                                          + (tiles - single) * biased.long_mufu_per_score)
        e.instr += bh * blocks * rows[0].outside_warp_instr
        flagged = (flag_rate or 0.0) * video
        if speculate:
            e.bytes += bh * (n * 4 + flagged * 4)  # the flags written, the flagged rows' max
        e = finish(e, gpu, eta, waves_stretch(bh * blocks, min(walk.ctas_per_sm, biased.ctas_per_sm), gpu))
        if speculate:  # the listing: the flags read, each block's list written, then read and joined
            listing = Estimate(bytes=bh * (n * 4 + 3 * flagged * 4), launches=2)
            e.seconds += finish(listing, gpu, eta).seconds
            e.launches += 2
            if flagged:
                (redo_config, redo_rows), = compiled_launch(rest[-1])
                r_walk, r_soft = lean_loops(redo_rows, redo_config)
                rm, rn = rest[-1].kwargs["BLOCK_M"], rest[-1].kwargs["BLOCK_N"]
                programs = bh * math.ceil(flagged / rm)
                r_tiles = math.ceil(n / rn)
                r_single = lean_blocks(s, rm, rn)[2]
                redo = Estimate(launches=1, config=f"redo {rm}x{rn}")
                redo.bytes = programs * (rm * (2 * d * ITEMSIZE + 8) + r_tiles * rn * (3 * d * ITEMSIZE + 4))
                redo.mma_flops = programs * r_tiles * 2 * rm * rn * 3 * bd
                redo.instr = programs * (rm * rn * (r_tiles * r_walk.short_instr_per_score
                                                   + r_single * r_soft.short_instr_per_score
                                                   + (r_tiles - r_single) * r_soft.long_instr_per_score)
                                         + redo_rows[0].outside_warp_instr)
                redo.mufu = programs * rm * rn * (r_single * r_soft.short_mufu_per_score
                                                  + (r_tiles - r_single) * r_soft.long_mufu_per_score)
                redo = finish(redo, gpu, eta, waves_stretch(programs, min(r_walk.ctas_per_sm, r_soft.ctas_per_sm),
                                                            gpu))
                e.seconds += redo.seconds
                e.launches += 1
                e.bytes += redo.bytes
                e.mma_flops += redo.mma_flops
                e.config += f", redo {rm}x{rn} {short_config(redo_config)}"
        out.append(e)
    return min(out, key=lambda e: e.seconds)


# the steps of the sampler run `with_fallback` averages over (Wan 2.1's and CogVideoX's default)
RUN_STEPS = 50


def with_fallback(one_pass: float, two_pass: float, flag_rate: float, steps: int = RUN_STEPS) -> float:
    """Seconds per call under `vk.Speculation` over a run of `steps` steps whose speculative calls flag `flag_rate`
    of their rows: the policy itself run step by step (two passes past BREAK_EVEN, probes after PROBE, 2 PROBE ...
    two-pass steps)."""
    spec, total = Speculation(), 0.0
    for _ in range(steps):
        args = spec.kwargs("cpu")
        if args["speculate"]:
            args["flags"].add_(torch.tensor([round(flag_rate * 10**6), 10**6]))
        total += one_pass if args["speculate"] else two_pass
        spec.next_step()
    return total / steps


def l2_resident(e: Estimate, compulsory_bytes: float, gpu: Gpu) -> float:
    """Seconds of a finished kernel estimate if its repeated K and V loads (once per query block)
    hit L2: the memory term from the compulsory bytes (each tensor once per pass), the compute
    terms unchanged. The other bound of the model, whose `bytes` go to HBM as requested."""
    return max({**e.terms, "memory": compulsory_bytes / gpu.hbm_bytes_s}.values()) + e.launches * LAUNCH_S


def fits_up_to(peak_bytes: float, n: int, capacity: float) -> int:
    """The largest N whose peak fits in `capacity` when the whole peak scales as N^2 from `peak_bytes`
    at `n`: exact for a peak of N x N tensors only (sdpa_bias), a lower bound where part of it grows
    slower (reference_eager: chunks of at most 2^26 scores beside its (N, N) Gaussian)."""
    return int(n * math.sqrt(capacity / peak_bytes))


def fit_status(peak_bytes: float, capacity: float) -> str:
    """"ok" when the peak fits in the GPU's memory, else why the row has no time."""
    if peak_bytes <= capacity:
        return "ok"
    return f"does not fit (peak {peak_bytes / 1e9:.1f} GB > {capacity / 1e9:.0f} GB)"


def dit_sweep(gpu_key: str, eta: float, exposed: float, dits=DIT_SHAPES, batch: int = 1, progress=print,
              eta_tutorial: float | None = None) -> list:
    """Rows of the model for every DiT shape (bf16): ours with frame ids in two passes and, at each of
    FLAG_RATES, the speculative one pass with the adaptive fallback (`with_fallback`), FlashAttention-3,
    flash, flex_two_pass and the eager peers that materialize the bias, whose rows say "does not fit"
    where their traced peak exceeds the GPU's memory; then the lean forward (what "auto" runs on sm_90 at
    these calls, `ours_lean`): its two loops, and its speculative form at each of FLAG_RATES with the fallback
    to its two loops. eta_tutorial: the MMA efficiency of our loops
    fitted on the tutorial's published numbers (`calibrate_tutorial`), for model_ours_over_fa3_tutorial."""
    from vstar_kernels.bench.peers import PEERS

    gpu = GPUS[gpu_key]
    rows = []
    for s in dits:
        bh, n = batch * s.heads, s.n
        call = (batch, s.heads, n, s.head_dim, gpu)
        est = {"vstar_triton_frames": ours_frames(*call, eta, s.frames(), s.sigma), "fa3": fa3(*call, exposed),
               "flash": flash(*call, eta)}
        eta1 = ours_frames(*call, 1.0, s.frames(), s.sigma)
        two = est["flash"]
        est["flex_two_pass"] = Estimate(2 * two.bytes, 2 * two.mma_flops, 2 * two.instr, 2 * two.mufu, 2,
                                        2 * two.seconds, two.bound, "2 x " + two.config + " (lower bound)")
        qkvo = ideal_cost(bh, n, n, s.head_dim, s.head_dim, ITEMSIZE).bytes  # Q, K, V and O
        for impl in ("vstar_triton_frames", "fa3", "flash", "flex_two_pass"):
            est[impl].peak_bytes = qkvo
        # compulsory bytes; ours: + K once more (the walk) and the frame ids of both passes
        l2 = {"vstar_triton_frames": l2_resident(est["vstar_triton_frames"], qkvo * 5 / 4 + 2 * n * 4, gpu),
              "fa3": l2_resident(est["fa3"], qkvo, gpu), "flash": l2_resident(two, qkvo, gpu)}
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
                row.update(model_ours_over_fa3=round(ours_s / est["fa3"].seconds, 3),
                           model_ours_over_fa3_eta1=round(eta1.seconds / est["fa3"].seconds, 3),
                           model_ours_over_flash=round(ours_s / est["flash"].seconds, 3),
                           model_ours_over_flex_two_pass=round(ours_s / est["flex_two_pass"].seconds, 3),
                           model_ours_over_fa3_l2=round(l2[impl] / l2["fa3"], 3),
                           model_ours_over_flash_l2=round(l2[impl] / l2["flash"], 3))
            rows.append(row)
        two_tut = ours_frames(*call, eta_tutorial, s.frames(), s.sigma).seconds if eta_tutorial else None
        if two_tut:
            rows[-len(DIT_IMPLS)]["model_ours_over_fa3_tutorial"] = round(two_tut / est["fa3"].seconds, 3)
        for f in FLAG_RATES:
            one, share = ours_frames_speculative(*call, eta, s.frames(), s.sigma, f)
            seconds = with_fallback(one.seconds, ours_s, f)
            row = {**base, "impl": SPECULATIVE, "flag_rate": f, "guess_tile_share": round(share, 4), "status": "ok",
                   "config": one.config, "bound": one.bound, "model_bytes": int(one.bytes),
                   "model_mma_flops": int(one.mma_flops), "model_peak_gb": round(qkvo / 1e9, 3),
                   "model_time_ms": round(seconds * 1e3, 4),
                   "model_ours_over_fa3": round(seconds / est["fa3"].seconds, 3),
                   "model_ours_over_flash": round(seconds / est["flash"].seconds, 3)}
            if eta_tutorial:
                one_tut = ours_frames_speculative(*call, eta_tutorial, s.frames(), s.sigma, f)[0].seconds
                row["model_ours_over_fa3_tutorial"] = round(with_fallback(one_tut, two_tut, f) / est["fa3"].seconds,
                                                            3)
            rows.append(row)
        lean_two = {e: ours_lean(batch, s.heads, s.head_dim, gpu, e, s, None).seconds for e in (eta, eta_tutorial)
                    if e}
        for f in (None, *FLAG_RATES):
            est_lean = ours_lean(batch, s.heads, s.head_dim, gpu, eta, s, f)
            seconds = est_lean.seconds if f is None else with_fallback(est_lean.seconds, lean_two[eta], f)
            row = {**base, "impl": LEAN if f is None else LEAN_SPECULATIVE, "flag_rate": "" if f is None else f,
                   "status": "ok", "config": est_lean.config, "bound": est_lean.bound,
                   "model_bytes": int(est_lean.bytes), "model_mma_flops": int(est_lean.mma_flops),
                   "model_peak_gb": round(qkvo / 1e9, 3), "model_time_ms": round(seconds * 1e3, 4),
                   "model_ours_over_fa3": round(seconds / est["fa3"].seconds, 3),
                   "model_ours_over_flash": round(seconds / est["flash"].seconds, 3)}
            if eta_tutorial:
                tut = ours_lean(batch, s.heads, s.head_dim, gpu, eta_tutorial, s, f).seconds
                tut = tut if f is None else with_fallback(tut, lean_two[eta_tutorial], f)
                row["model_ours_over_fa3_tutorial"] = round(tut / est["fa3"].seconds, 3)
            rows.append(row)
        progress(f"  {gpu_key} {s.name} N={n}: ours (frames) {ours_s * 1e3:.2f} ms, ours/fa3 "
                 f"{ours_s / est['fa3'].seconds:.2f} (ETA 1: {eta1.seconds / est['fa3'].seconds:.2f}), ours/flash "
                 f"{ours_s / est['flash'].seconds:.2f} (K, V from L2: {l2['vstar_triton_frames'] / l2['flash']:.2f}), "
                 f"ours/flex_two_pass {ours_s / est['flex_two_pass'].seconds:.2f} (model)")
    return rows


def dit_markdown(rows: list, gpu_key: str, dits=DIT_SHAPES, args=None) -> str:
    """The DiT table: modeled ms per self-attention call, the ratios and where the eager peers stop fitting."""
    from vstar_kernels.bench.measure import commit

    g = GPUS[gpu_key]
    lines = [f"# DiT self-attention, {g.name} (model, not measured)", "",
             f"`{command(gpu_key, args, dit=True)}`, commit {commit()}. Modeled ms per "
             f"self-attention call (one layer, one denoising step), batch 1, bf16; classifier-free guidance runs it "
             f"at batch 2 (about twice the time; sdpa_bias's peak doubles). Memory: {g.memory_bytes / 1e9:.0f} GB "
             "(nominal). Assumptions as in the model table, and:", "",
             "- ours (vstar_triton_frames): frame ids, no key mask, sigma = latent frames / 16 (the README's starting "
             "point): the two-pass form (a Q K^T row-max walk over every key tile, then the biased online softmax over "
             "every tile); per-loop instructions/MUFU of the frame-id kernel compiled for sm_90 (bf16, "
             f"{configs_compiled()}, compiled at the shape's own N, heads and head dim), each key tile on "
             "its loop's shortest path (one dA column: a tile of one frame, or off the Gaussian's band) or longest "
             "(dA per score), counted from the layout (`model_dit.frame_tile_counts`), plus each program's "
             "instructions outside the loops; the fastest config.",
             "- fa3: FlashAttention-3 as in the model table (the plain-attention floor on an H100); ours / fa3 at ETA "
             "and, in brackets, with ours at ETA = 1 (the two bounds of the model table's assumptions).",
             "- flash: the calibrated plain loop (no TAR); flex_two_pass: two such loops (a lower bound).",
             "- eager peers as bench/peers.py runs them (the token-index Gaussian): time = summed per-op roofline of "
             "their aten ops on meta tensors; peak = the most storage bytes live at once in that trace (Q, K, V "
             "included). A peak above the memory gives \"does not fit\"; fits up to N: the peak scaled as N^2 "
             "(exact for sdpa_bias, whose peak is two (B, H, N, N) tensors; a lower bound for "
             "reference_eager, whose score chunks stop growing at 2^26 scores beside its full (N, N) float32 "
             "Gaussian).",
             "- K, V from L2: the same kernels with their repeated K and V loads (once per query block) served by L2: "
             "the memory term from each tensor once per pass, compute terms unchanged. The model's own column sends "
             "every requested byte to HBM; a GPU lies between the two.",
             "", "| model | heads x D | N (frames x tokens + text) | ours (frames) | fa3 | flash | flex_two_pass "
             "| reference_eager | sdpa_bias | ours / fa3 | ours / flash | ours / flex_two_pass "
             "| ours bound (config) | ours, K V from L2 | fa3, K V from L2 | ours / fa3, K V from L2 "
             "| ours / flash, K V from L2 | reference_eager fits up to N | sdpa_bias fits up to N |",
             "| --- | --- | --- |" + " ---: |" * 9 + " --- |" + " ---: |" * 6]
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
                     + f" | {o['model_ours_over_fa3']:.2f} ({o['model_ours_over_fa3_eta1']:.2f}) "
                       f"| {o['model_ours_over_flash']:.2f} | {o['model_ours_over_flex_two_pass']:.2f} "
                       f"| {o['bound']} ({o['config']}) | {o['model_time_l2_ms']:.3f} "
                       f"| {c['fa3']['model_time_l2_ms']:.3f} | {o['model_ours_over_fa3_l2']:.2f} "
                       f"| {o['model_ours_over_flash_l2']:.2f} | {c['reference_eager']['model_fits_up_to_n']:,} "
                       f"| {c['sdpa_bias']['model_fits_up_to_n']:,} |")
    lines += ["", "The speculative one pass (model): ours at each flag rate f (the share of video rows whose max "
              "lies outside the key tiles the guess walks, g of all key tiles), under `vk.Speculation` (two passes "
              f"past f = {Speculation.BREAK_EVEN:g}, a speculative step after {Speculation.PROBE}, then twice as "
              f"many two-pass steps each time: the average of a {RUN_STEPS}-step run), against the "
              "two-pass rows above; the redo "
              "modeled as `model_dit.ours_frames_speculative` says (an upper bound). Ours / fa3 at the "
              "FlashAttention-2 calibration of our loops and, in brackets, at the calibration on the Triton "
              "tutorial's published H100 numbers (head dim 128).", "",
              "| model | g | two passes | f = " + " | f = ".join(f"{f:g}" for f in FLAG_RATES) + " |",
              "| --- |" + " ---: |" * (2 + len(FLAG_RATES))]
    for s in dits:
        one = {r["flag_rate"]: r for r in rows if r["model"] == s.name and r["impl"] == SPECULATIVE}
        two = by[s.name]["vstar_triton_frames"]

        def ratio(r):
            tut = r.get("model_ours_over_fa3_tutorial")
            return f"{r['model_ours_over_fa3']:.2f}" + (f" ({tut:.2f})" if tut else "")

        lines.append(f"| {s.name} | {one[FLAG_RATES[0]]['guess_tile_share']:.3f} | {ratio(two)} | "
                     + " | ".join(ratio(one[f]) for f in FLAG_RATES) + " |")
    lines += ["", "The lean forward (model; `backend=\"triton-lean\"`, what \"auto\" runs on sm_90 at these calls): "
              "frame ids from the token index, tensor-descriptor loads, its configs without warp specialization "
              "(`model_dit.ours_lean`): its two loops (the walk, the biased loop) and its speculative form at each f "
              "under `vk.Speculation` as above, the redo its own launch (`tar_fwd_lean.LEAN_REDO`, each program "
              "walking every key tile, then its softmax over every tile: an upper bound), the two listing launches "
              "beside it. Ours / fa3 as above, the tutorial calibration in brackets; the H100 timings of these "
              "calls are in benchmarks/results/speculation-*.csv and docs/performance.md.", "",
              "| model | two loops (config) | f = " + " | f = ".join(f"{f:g}" for f in FLAG_RATES) + " |",
              "| --- | --- |" + " ---: |" * len(FLAG_RATES)]
    for s in dits:
        lean = {r["flag_rate"]: r for r in rows if r["model"] == s.name and r["impl"] == LEAN_SPECULATIVE}
        two = next(r for r in rows if r["model"] == s.name and r["impl"] == LEAN)

        def ratio(r):
            tut = r.get("model_ours_over_fa3_tutorial")
            return f"{r['model_ours_over_fa3']:.2f}" + (f" ({tut:.2f})" if tut else "")

        lines.append(f"| {s.name} | {ratio(two)} ({two['config']}) | "
                     + " | ".join(ratio(lean[f]) for f in FLAG_RATES) + " |")
    lines += ["", "Config values:", ""] + [f"- {s.name}: {s.source}" for s in dits]
    return "\n".join(lines) + "\n"


def dit_plot(rows: list, gpu_key: str, path: Path) -> None:
    """Modeled ms per call of each impl on each DiT shape (log scale); rows that do not fit are marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(dict.fromkeys(r["model"] for r in rows))
    by = {(r["model"], r["impl"]): r for r in rows if r["impl"] not in (SPECULATIVE, LEAN_SPECULATIVE)}
    one_pass, lean_pass = (f"{impl}, f = {FLAG_RATES[1]:g}" for impl in (SPECULATIVE, LEAN_SPECULATIVE))
    for impl, key in ((SPECULATIVE, one_pass), (LEAN_SPECULATIVE, lean_pass)):
        by.update({(r["model"], key): r for r in rows if r["impl"] == impl and r["flag_rate"] == FLAG_RATES[1]})
    impls = (DIT_IMPLS[0], one_pass, lean_pass) + DIT_IMPLS[1:]
    fig, ax = plt.subplots(figsize=(12, 7.5))
    width = 0.8 / len(impls)
    for k, impl in enumerate(impls):
        for i, name in enumerate(names):
            r = by[name, impl]
            y = i + (k - (len(impls) - 1) / 2) * width
            if r["status"] == "ok":
                label = {DIT_IMPLS[0]: f"{impl} (two passes)",
                         one_pass: f"{DIT_IMPLS[0]} (one pass, {FLAG_RATES[1]:.0%} of rows flagged)",
                         lean_pass: f"{LEAN} (sm_90's \"auto\": one pass, {FLAG_RATES[1]:.0%} flagged)"}.get(impl, impl)
                ax.barh(y, r["model_time_ms"], height=width, color=f"C{k}", label=label if i == 0 else None)
            else:
                ax.text(0.012, y, f"{impl}: does not fit ({r['model_peak_gb']:.0f} GB)", va="center", fontsize=7,
                        transform=ax.get_yaxis_transform())
    ax.set_yticks(range(len(names)), [f"{n}\nN={by[n, 'flash']['n']:,}" for n in names], fontsize=8)
    ax.invert_yaxis()
    ax.set(xscale="log", xlabel="modeled time per self-attention call, batch 1, bf16 (ms, model)",
           title=f"DiT self-attention, {GPUS[gpu_key].name} - model, not measured{quick_title()}")
    # below the axes: inside, the legend covered the ends of the longest bars
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.09), ncol=3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def dit_main(args) -> int:
    """`python -m tools.perf model --dit [--gpu h100 h200] [--shapes DIT ...] [--quick] [--out DIR] [--no-plots]`:
    the DiT
    rows (every DIT_SHAPES entry, or those --shapes names), model-dit-<gpu>.csv/.md/.png."""
    directory = Path(os.path.abspath(args.out)) if args.out else results_dir()
    directory.mkdir(parents=True, exist_ok=True)
    devices = args.gpu or list(GPUS)
    by_name = {s.name: s for s in DIT_SHAPES}  # (--shapes is checked by the CLI)
    dits = tuple(by_name[name] for name in args.shapes) if args.shapes else DIT_SHAPES
    progress = progress_lines(len(devices) * len(dits))
    eta, _ = calibrate(GPUS["h100"])
    exposed, _ = calibrate_fa3(GPUS["h100"])
    eta_tutorial = calibrate_tutorial(GPUS["h100"])
    for key in devices:
        rows = dit_sweep(key, eta, exposed, dits, progress=progress, eta_tutorial=eta_tutorial)
        base = directory / f"model-dit-{key}"
        with open(base.with_suffix(".csv"), "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(DIT_COLUMNS)
            for r in rows:
                w.writerow([r.get(c, "") for c in DIT_COLUMNS])
        table = dit_markdown(rows, key, dits, args)
        print(table)
        write_table_and_plot(base, table, None if args.no_plots else lambda path: dit_plot(rows, key, path))
    return 0

