"""TAR in video diffusion transformers: frame-aware TAR on the full 3-D attention of each block.

`FAMILIES` holds the supported models (where the regularized attention sits, how the tokens lie), `UNSUPPORTED`
the video models TAR does not apply to and why; docs/dits.md lists both and how a token gets its frame.

Each selected module's stock processor is wrapped in a `DiTTARProcessor` and called unchanged (docs/integrations.md).
In a regularized block and step the call runs under a `TorchFunctionMode` that answers
`torch.nn.functional.scaled_dot_product_attention` with `tar_attention` on the same q, k, v (and key mask) and passes
every other torch call through; elsewhere no mode is set (stock output bit for bit). Why a mode: it needs no copy of
diffusers' code and patches nothing. A custom attention backend would reach only the processors that use the
dispatcher (and diffusers' backend registry is a closed enum); replacing module globals (``F``,
``dispatch_attention_fn``) is process-wide and not thread-safe, where a torch function mode is per thread and lives
for one call. Under context parallelism `context_parallel.ContextParallelTAR` answers the call (docs/multi-gpu.md).
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import diffusers
import torch
import torch.nn.functional as F
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
)
from torch.overrides import TorchFunctionMode

from .. import tar_attention
from ..tar_config import LevelSpec, TARConfig
from .context_parallel import ContextParallelTAR, local_stock_call
from .steps import StepTracker

_STATE_ATTR = "_vstar_tar"
_OWNER = "tar"


class TokenGrid(NamedTuple):
    """The token layout of one forward call of a DiT, read from its arguments by the family's layout reader.

    The video stream is `frames` frames of `per_frame` tokens, in frame order; where it is laid out otherwise,
    `runs` gives it in full, ``((frame id, tokens), ...)`` in sequence order (-1: no frame of the video), and
    `frames` is the largest id + 1. Text tokens are in neither: where they sit is the family's `text`.
    """

    frames: int                                   # F: the frames the ids span (a delta is F x F, a map too)
    per_frame: int                                # tokens per frame of the video grid
    runs: Optional[Tuple[Tuple[int, int], ...]] = None
    timestep: Optional[float] = None              # diffusion forcing: the call's largest timestep (see loop_step)
    repeat_from: Optional[int] = None             # from this block on, the keys after the video are the video again


def _runs_grid(runs, per_frame: int, **extra) -> TokenGrid:
    """A grid from its runs (empty runs dropped, adjacent runs of one id merged); `frames` is the largest id + 1."""
    runs = [(int(frame), int(count)) for frame, count in runs if count > 0]
    runs = tuple((frame, sum(count for _, count in group)) for frame, group in itertools.groupby(runs, lambda r: r[0]))
    return TokenGrid(max((frame for frame, _ in runs), default=-1) + 1, per_frame, runs, **extra)


def _patch(config) -> Tuple[int, int, int]:
    if isinstance(config.patch_size, int):
        return getattr(config, "patch_size_t", None) or 1, config.patch_size, config.patch_size
    return tuple(config.patch_size)


def _latent(model, arguments) -> torch.Tensor:
    latent = arguments["hidden_states"]
    if latent.dim() != 5:
        raise ValueError(f"{type(model).__name__}: expected a 5-D latent video, got shape {tuple(latent.shape)}")
    return latent


def _video_5d(frames_dim: int, channels_last: bool = False) -> Callable:
    """Layout reader for models whose `hidden_states` is a 5-D latent with frames at `frames_dim`
    (height and width last, or before the channels with `channels_last`)."""

    def layout(model, arguments) -> TokenGrid:
        latent = _latent(model, arguments)
        p_t, p_h, p_w = _patch(model.config)
        height, width = latent.shape[2:4] if channels_last else latent.shape[-2:]
        return TokenGrid(latent.shape[frames_dim] // p_t, (height // p_h) * (width // p_w))

    return layout


def _ltx_layout(model, arguments) -> TokenGrid:
    grid = [arguments.get(name) for name in ("num_frames", "height", "width")]
    if any(g is None for g in grid):
        raise ValueError(f"{type(model).__name__}: TAR needs the num_frames, height and width arguments (the token "
                         "grid) of each forward call; calls with video_coords only are not supported")
    frames, height, width = (int(g) for g in grid)
    return TokenGrid(frames, height * width)


def _ltx2_layout(model, arguments) -> TokenGrid:
    """LTX-2: a token's frame is the latent frame its temporal rotary coordinate falls in: the start of its
    ``video_coords`` span times ``fps`` is a video frame p, in latent frame (p + s - c) // s (s: the VAE's
    temporal scale factor, c: its causal offset), token frame that over patch_size_t. Conditioning tokens
    appended after the grid (keyframes, IC-LoRA references) get the frame they are placed at. Without
    video_coords, the model's own grid of num_frames x height x width."""
    p_t, p_h, p_w = _patch(model.config)
    coords = arguments.get("video_coords")
    if coords is None:
        grid = _ltx_layout(model, arguments)
        height, width = int(arguments["height"]), int(arguments["width"])
        return TokenGrid(math.ceil(grid.frames / p_t), math.ceil(height / p_h) * math.ceil(width / p_w))
    start = coords[:, 0, :, 0]
    if not bool((start == start[:1]).all()):
        raise ValueError(f"{type(model).__name__}: TAR takes one frame layout per call, but the sequences of the "
                         "batch have different video_coords")
    scale, offset = model.config.vae_scale_factors[0], model.config.causal_offset
    pixel = torch.round(start[0].double() * float(arguments["fps"]))
    frames = torch.div(pixel + scale - offset, scale * p_t, rounding_mode="floor").long()
    values, counts = torch.unique_consecutive(frames, return_counts=True)
    return _runs_grid(zip(values.tolist(), counts.tolist()), int(torch.bincount(frames).max()))


def _skyreels_layout(model, arguments) -> TokenGrid:
    """SkyReels-V2: Wan's grid; under diffusion forcing (per-frame timesteps) the call's largest timestep."""
    grid = _video_5d(2)(model, arguments)
    if not arguments.get("enable_diffusion_forcing"):
        return grid
    return grid._replace(timestep=float(torch.as_tensor(arguments["timestep"]).max()))


def _reference_first_layout(model, arguments) -> TokenGrid:
    """Wan-Animate: the first latent frame is the reference (character) image, frame -1; the video's frames follow."""
    grid = _video_5d(2)(model, arguments)
    return _runs_grid([(-1, grid.per_frame)] + [(f, grid.per_frame) for f in range(grid.frames - 1)], grid.per_frame)


def _chronoedit_layout(model, arguments) -> TokenGrid:
    """ChronoEdit: with two latent frames (input image, edited image) its rotary embedding puts the second at
    temporal position rope_temporal_skip_len - 1, the last frame of the video they stand for: so does TAR."""
    grid = _video_5d(2)(model, arguments)
    if _latent(model, arguments).shape[2] != 2:
        return grid
    last = model.config.rope_temporal_skip_len - 1
    return _runs_grid([(0, grid.per_frame), (last, grid.per_frame)], grid.per_frame)


def _index_row(indices, count: int, what: str, where: str) -> List[int]:
    """The frame indices of one sequence (the rows of a (B, T) index tensor must agree: one layout per call)."""
    indices = torch.as_tensor(indices)
    if indices.dim() == 2:
        if not bool((indices == indices[:1]).all()):
            raise ValueError(f"{where}: TAR takes one frame layout per call, but the sequences of the batch have "
                             f"different {what}")
        indices = indices[0]
    values = [int(v) for v in indices.tolist()]
    if len(values) != count or min(values, default=0) < 0:
        raise ValueError(f"{where}: {what} must be {count} frame indices >= 0, got {values}")
    return values


def _history_runs(latent, indices, kernel: Tuple[int, int, int], padded: bool, what: str, where: str):
    """Runs of a history latent patchified by a (kt, kh, kw) kernel (with replicate padding where `padded`):
    each token stands for kt latent frames, and gets the index nearest to their mean (ties: the earlier)."""
    frames, height, width = latent.shape[2:]
    kt, kh, kw = kernel
    values = _index_row(indices, frames, what, where)
    if padded:
        values += values[-1:] * ((-frames) % kt)
        per_slot = math.ceil(height / kh) * math.ceil(width / kw)
    else:
        per_slot = (height // kh) * (width // kw)
    slots = len(values) // kt
    return [((2 * sum(values[s * kt:(s + 1) * kt]) + kt - 1) // (2 * kt), per_slot) for s in range(slots)]


def _history_grid(model, arguments, histories, video_indices: str) -> TokenGrid:
    """History latents before the video, each token at the frame index its rotary embedding gets (``indices_<name>``;
    a token of a compressed history: the nearest to the mean of its frames), then the video at `video_indices`.
    `histories`: ``(name, (kt, kh, kw) patch kernel, replicate-padded)`` in sequence order."""
    where = type(model).__name__
    latent = _latent(model, arguments)
    p_t, p_h, p_w = _patch(model.config)
    runs = []
    for name, kernel, padded in histories:
        history, indices = arguments.get(name), arguments.get(f"indices_{name}")
        if history is not None and indices is not None:
            runs += _history_runs(history, indices, kernel, padded, f"indices_{name}", where)
    frames = latent.shape[2] // p_t
    indices = arguments.get(video_indices)
    values = list(range(frames)) if indices is None else _index_row(indices, frames, video_indices, where)
    per_frame = (latent.shape[3] // p_h) * (latent.shape[4] // p_w)
    return _runs_grid(runs + [(v, per_frame) for v in values], per_frame)


def _framepack_layout(model, arguments) -> TokenGrid:
    """HunyuanVideo Framepack: the 4x, 2x and 1x (clean) history latents, then the video (`_history_grid`)."""
    _latent(model, arguments)
    if _patch(model.config)[0] != 1:
        raise ValueError(f"{type(model).__name__}: TAR reads Framepack's frame indices per latent frame: "
                         "patch_size_t must be 1")
    histories = (("latents_history_4x", (4, 8, 8), True), ("latents_history_2x", (2, 4, 4), True),
                 ("latents_clean", (1, 2, 2), False))
    return _history_grid(model, arguments, histories, "indices_latents")


def _helios_layout(model, arguments) -> TokenGrid:
    """Helios: the long, mid and short history latents (patches 4, 2 and 1 times the model's), then the video."""
    patch = _patch(model.config)
    histories = [(f"latents_history_{name}", tuple(factor * p for p in patch), factor > 1)
                 for name, factor in (("long", 4), ("mid", 2), ("short", 1))]
    return _history_grid(model, arguments, histories, "indices_hidden_states")


def _kandinsky_layout(model, arguments) -> TokenGrid:
    """Kandinsky 5 and 6: a channels-last latent (B, T, H, W, C); a frame's id is the temporal index of its rotary
    embedding (visual_rope_pos[0]), where given: Kandinsky 6 appends the reference image as a last frame at index 0."""
    grid = _video_5d(1, channels_last=True)(model, arguments)
    positions = arguments.get("visual_rope_pos")
    if positions is None:
        return grid
    values = _index_row(positions[0], grid.frames, "visual_rope_pos[0]", type(model).__name__)
    return _runs_grid([(v, grid.per_frame) for v in values], grid.per_frame)


def _motif_layout(model, arguments) -> TokenGrid:
    """Motif-Video: the video, then the text; in its decoder blocks (num_decoder_layers) the keys after the video
    are the encoder's final video tokens, the same frames again."""
    grid = _video_5d(2)(model, arguments)
    decoder = model.config.num_decoder_layers
    if not decoder:
        return grid
    first = len(model.transformer_blocks) + len(model.single_transformer_blocks) - decoder
    return grid._replace(repeat_from=first)


def _minimax_layout(model, arguments) -> TokenGrid:
    """MiniMax-H3: one packed sequence of text, audio and video rows. Its rotary times of the latent frames are
    spaced unevenly (a latent frame spans 1 or 4 video frames) and start after the text: a video row's frame is the
    rank of its rotary time (position_ids[:, 0]) among those of the video rows; text and audio rows get -1."""
    position_ids, video = arguments["position_ids"], arguments["video_indices"]
    times, frames = torch.unique(position_ids[video, 0], sorted=True, return_inverse=True)
    ids = torch.full((position_ids.shape[0],), -1, dtype=torch.long, device=position_ids.device)
    ids[video] = frames
    values, counts = torch.unique_consecutive(ids, return_counts=True)
    per_frame = int(torch.bincount(frames).max()) if frames.numel() else 0
    return _runs_grid(zip(values.tolist(), counts.tolist()), per_frame)


def _ltx2_skips_attention(kwargs: dict) -> bool:
    # LTX-2's spatio-temporal guidance: a block that perturbs every sample returns its values, with no attention
    return bool(kwargs.get("all_perturbed"))


@dataclass(frozen=True)
class DiTFamily:
    """Where a DiT's regularized attentions sit and how its tokens are laid out."""

    layout: Callable[[torch.nn.Module, dict], TokenGrid] = _video_5d(2)
    blocks: Tuple[str, ...] = ("transformer_blocks",)  # the ModuleLists of transformer blocks, in forward order
    attention: str = "attn1"        # the (dotted) attribute path of the regularized attention in a block
    text: str = "none"              # where that attention's text tokens are: "none", "before", "after"
    batched_guidance: bool = False  # the family's pipelines batch the guidance branches into one call
    # a call (its processor keywords) for which the stock processor computes no attention: it runs stock
    skips_attention: Optional[Callable[[dict], bool]] = None


_DUAL = ("transformer_blocks", "single_transformer_blocks")  # dual-stream blocks, then single-stream ones
FAMILIES: Dict[type, DiTFamily] = {
    WanTransformer3DModel: DiTFamily(blocks=("blocks",)),
    # Wan VACE: the control blocks run first, over the control video's tokens (the same token grid)
    WanVACETransformer3DModel: DiTFamily(blocks=("vace_blocks", "blocks")),
    CogVideoXTransformer3DModel: DiTFamily(_video_5d(1), text="before", batched_guidance=True),
    HunyuanVideoTransformer3DModel: DiTFamily(blocks=_DUAL, attention="attn", text="after"),
    LTXVideoTransformer3DModel: DiTFamily(_ltx_layout, batched_guidance=True),
    MochiTransformer3DModel: DiTFamily(text="after", batched_guidance=True),
}

# The video DiTs added to diffusers since (by class name: an older diffusers without one has no entry for it)
_NEWER: Dict[str, DiTFamily] = {
    "SkyReelsV2Transformer3DModel": DiTFamily(_skyreels_layout, ("blocks",)),
    "HunyuanVideo15Transformer3DModel": DiTFamily(attention="attn", text="after"),
    "HunyuanVideoFramepackTransformer3DModel": DiTFamily(_framepack_layout, _DUAL, "attn", "after"),
    "LTX2VideoTransformer3DModel": DiTFamily(_ltx2_layout, batched_guidance=True,
                                             skips_attention=_ltx2_skips_attention),
    "WanAnimateTransformer3DModel": DiTFamily(_reference_first_layout, ("blocks",)),
    "CosmosTransformer3DModel": DiTFamily(),
    "ChronoEditTransformer3DModel": DiTFamily(_chronoedit_layout, ("blocks",)),
    "AllegroTransformer3DModel": DiTFamily(batched_guidance=True),
    "EasyAnimateTransformer3DModel": DiTFamily(text="before", batched_guidance=True),
    "MotifVideoTransformer3DModel": DiTFamily(_motif_layout, _DUAL, "attn", "after"),
    "Kandinsky5Transformer3DModel": DiTFamily(_kandinsky_layout, ("visual_transformer_blocks",), "self_attention"),
    "Kandinsky6Transformer3DModel": DiTFamily(_kandinsky_layout, ("visual_transformer_blocks",),
                                              "video_dec_block.self_attention"),
    "ConsisIDTransformer3DModel": DiTFamily(_video_5d(1), text="before", batched_guidance=True),
    "AnyFlowTransformer3DModel": DiTFamily(_video_5d(1), ("blocks",), batched_guidance=True),
    "HeliosTransformer3DModel": DiTFamily(_helios_layout, ("blocks",)),
    "MiniMaxH3Transformer3DModel": DiTFamily(_minimax_layout, attention="attn"),
}
FAMILIES.update({getattr(diffusers, name): family for name, family in _NEWER.items() if hasattr(diffusers, name)})

# Video models of diffusers whose attention TAR does not apply to, and why
UNSUPPORTED: Dict[str, str] = {
    "SanaVideoTransformer3DModel": "its self-attention is linear attention (ReLU kernels, no softmax over the keys), "
                                   "so there is no score matrix for TAR's bias",
    "SanaWMTransformer3DModel": "its video attention is gated-delta-net linear attention, and its softmax variant is "
                                "a plain module with no attention processor",
    "SanaWMLTX2RefinerTransformer3DModel": "its queries (one window) attend to keys from a sliding-window KV cache "
                                           "that the call's arguments do not lay out",
    "Kandinsky6SRTransformer3DModel": "its self-attention is NABLA sparse attention, which runs only on diffusers' "
                                      "flex backend with a block mask (never through scaled_dot_product_attention)",
    "AnyFlowFARTransformer3DModel": "its causal self-attention runs only on diffusers' flex backend with a block "
                                    "mask (never through scaled_dot_product_attention)",
    "WanAnimate2Transformer3DModel": "its generation pass attends through a flex block mask on diffusers' flex "
                                     "backend (never through scaled_dot_product_attention)",
    "Cosmos3OmniTransformer": "its packed two-pathway attention uses grouped-query attention (fewer key heads than "
                              "query heads), which TAR does not take",
}


def dit_family(model: torch.nn.Module) -> Optional[DiTFamily]:
    """The family of a supported video DiT, or None for any other model."""
    return next((FAMILIES[cls] for cls in type(model).__mro__ if cls in FAMILIES), None)


def unsupported_dit(model: torch.nn.Module) -> Optional[str]:
    """Why TAR does not apply to `model`, a video model of diffusers it does not take; None for any other model."""
    name = next((cls.__name__ for cls in type(model).__mro__
                 if cls.__module__.startswith("diffusers.") and cls.__name__ in UNSUPPORTED), None)
    return None if name is None else f"{name}: TAR does not apply: {UNSUPPORTED[name]}"


def dit_attention_modules(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) of the regularizable attention of each transformer block, in forward order."""
    family = dit_family(model)
    found = []
    for container in family.blocks:
        for index, block in enumerate(getattr(model, container, None) or ()):
            module = functools.reduce(getattr, family.attention.split("."), block)
            found.append((f"{container}.{index}.{family.attention}", module))
    return found


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class _TARAttention(TorchFunctionMode):
    """Answers scaled_dot_product_attention calls with `processor.attention`; passes all else through."""

    def __init__(self, processor: "DiTTARProcessor", attn: torch.nn.Module, spec: LevelSpec,
                 grid: Optional[TokenGrid], parallel: Optional[ContextParallelTAR] = None):
        super().__init__()
        self.processor, self.attn, self.spec, self.grid, self.parallel = processor, attn, spec, grid, parallel
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        self.calls += 1
        query, key, value, mask, dropout_p, is_causal, scale, enable_gqa = _sdpa_arguments(*args, **kwargs)
        where = self.processor.name
        if dropout_p != 0.0:
            raise ValueError(f"{where}: TAR takes no attention dropout, but the processor asked for {dropout_p}")
        if enable_gqa and query.shape[1] != key.shape[1]:
            raise ValueError(f"{where}: TAR needs as many key heads as query heads (no grouped-query attention)")
        if self.parallel is not None:  # this rank's shard: the layout's communication around one TAR call
            return self.parallel.attention(query, key, value, mask, is_causal, self.grid,
                                           functools.partial(self._attend, scale, where))
        runs = mask_runs(mask, query.shape[0], query.shape[2], key.shape[2], where)
        state = self.processor.state
        frames = token_frames(state.family, self.grid, query.shape[2], key.shape[2], where, query.device,
                              self.processor.block)
        count = self.grid[0]  # a delta is a (frames, frames) matrix
        kwargs = dict(causal=is_causal, scale=scale, backend=state.config.backend,
                      **self.spec.tar_kwargs(count, count, device=query.device, dtype=query.dtype, where=where))
        if len(runs) == 1:
            return self.processor.attention(self.attn, query, key, value, frames=frames, key_mask=runs[0][1],
                                            **kwargs)
        return torch.cat([self.processor.attention(self.attn, query[:, :, rows], key, value,
                                                   frames=(frames[rows], frames), key_mask=key_mask, **kwargs)
                          for rows, key_mask in runs], dim=2)

    def _attend(self, scale, where, query, key, value, *, frames):
        """The regularized attention of a context-parallel call, over all keys (`ContextParallelTAR.attention`)."""
        count = self.grid[0]
        kwargs = self.spec.tar_kwargs(count, count, device=query.device, dtype=query.dtype, where=where)
        return self.processor.attention(self.attn, query, key, value, scale=scale, frames=frames,
                                        backend=self.processor.state.config.backend, **kwargs)


# The most runs of equal rows a (B, 1, Nq, Nk) mask may have: TAR runs one attention call per run
MAX_MASK_RUNS = 64
# bool elements compared at once while finding the runs of a mask
_RUN_CHUNK = 1 << 26


def mask_runs(mask, batch: int, queries: int, keys: int, where: str) -> List[Tuple[slice, Optional[torch.Tensor]]]:
    """The query rows of an SDPA call in runs that share one key mask: ``[(rows, (B, Nk) bool key mask or None)]``.

    A (B, 1, 1, Nk) key mask (or none) is one run; a (B, 1, Nq, Nk) boolean mask is cut where a row differs
    from the one before it (docs/dits.md, Masks). Any other mask raises a ValueError.
    """
    if mask is None:
        return [(slice(0, queries), None)]
    shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else None
    if shape is None or mask.dtype != torch.bool or mask.dim() != 4 or shape[1] != 1 or shape[2] not in (1, queries) \
            or shape[3] != keys or shape[0] not in (1, batch):
        what = f"{mask.dtype} mask of shape {shape}" if shape is not None else f"{type(mask).__name__} mask"
        raise ValueError(f"{where}: TAR honours boolean key masks of shape (B, 1, 1, Nk) and boolean masks "
                         f"(B, 1, Nq, Nk) whose rows come in at most {MAX_MASK_RUNS} runs of equal rows; this "
                         f"processor passed a {what}")
    rows = mask[:, 0]  # (B or 1, Nq or 1, Nk)
    starts = [0]
    if shape[2] > 1:
        step = max(1, _RUN_CHUNK // (shape[0] * keys))
        changed = [(rows[:, s:min(s + step, queries)] != rows[:, s - 1:min(s + step, queries) - 1]).any(-1).any(0)
                   for s in range(1, queries, step)]
        starts += (torch.nonzero(torch.cat(changed)).flatten() + 1).tolist()
        if len(starts) > MAX_MASK_RUNS:
            raise ValueError(f"{where}: the processor's (B, 1, Nq, Nk) mask has {len(starts)} runs of equal rows; "
                             f"TAR runs one attention call per run and takes at most {MAX_MASK_RUNS}")
    stops = starts[1:] + [queries]
    return [(slice(start, stop), rows[:, start if shape[2] > 1 else 0].expand(batch, keys))
            for start, stop in zip(starts, stops)]


def no_sdpa_call(name: str, consequence: str, processor: Any = None) -> RuntimeError:
    """The error for a wrapped `processor` whose call never reached scaled_dot_product_attention."""
    backend = getattr(processor, "_attention_backend", None)
    backend = getattr(backend, "value", backend)
    if backend is None:
        why = "a processor of its own, or a non-native attention backend set for every model"
    elif backend == "native":
        why = "its backend is the native one: the processor itself does not call it"
    else:
        why = f"its attention backend, {backend!r}, does not call it"
    return RuntimeError(
        f"{name}: the processor computed its attention without torch.nn.functional.scaled_dot_product_attention "
        f"({why}), so {consequence}; diffusers' native backend calls it: model.set_attention_backend('native')")


def _forwarded(name: str) -> property:
    """An attribute of the wrapped processor, read and set through the wrapper."""
    return property(lambda self: getattr(self.processor, name, None),
                    lambda self, value: setattr(self.processor, name, value))


class DiTTARProcessor:
    """The module's own processor, with TAR on its attention call in the regularized steps (module docstring).

    `attention` is the one place the regularized attention is computed, for subclasses that want to look at it.
    """

    def __init__(self, processor: Any, name: str, block: int, state: "_DiTState"):
        self.processor, self.name, self.block, self.state = processor, name, block, state
        # diffusers' attention modules keep only the keyword arguments named in
        # inspect.signature(processor.__call__): this attribute (the same call) gives it the stock one's
        self.__call__ = functools.wraps(processor.__call__)(functools.partial(type(self).__call__, self))

    # diffusers' set_attention_backend / context parallelism set these on the processor
    _attention_backend = _forwarded("_attention_backend")
    _parallel_config = _forwarded("_parallel_config")

    def __call__(self, attn: torch.nn.Module, *args, **kwargs):
        # (token grid, step) of the call in progress; in a checkpointed block, of the forward call that ran it
        grid, step = self.state.steps.current(_OWNER)
        spec = self.state.spec_at(self.block, step)
        skips = self.state.family.skips_attention
        if spec is None or (skips is not None and skips(kwargs)):
            return self.processor(attn, *args, **kwargs)
        # under context parallelism: the stock processor on this rank's shard, its attention answered over all ranks
        parallel = ContextParallelTAR.of(self.processor, self.state.family.text, self.name)
        mode = _TARAttention(self, attn, spec, grid, parallel)
        with contextlib.nullcontext() if parallel is None else local_stock_call(self.processor), mode:
            out = self.processor(attn, *args, **kwargs)
        if mode.calls == 0:
            raise no_sdpa_call(self.name, "TAR could not run there", self.processor)
        return out

    def attention(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  **kwargs) -> torch.Tensor:
        """TAR on (B, H, N, D) q/k/v; `kwargs` are `tar_attention`'s (frames, key_mask, sigma, ...)."""
        return tar_attention(query, key, value, **kwargs)


@dataclass
class _DiTState:
    config: TARConfig
    family: DiTFamily
    steps: StepTracker
    spec: LevelSpec
    blocks: frozenset
    pipeline: Any = None  # weakref to the pipeline, or None on a bare model
    installed: List[Tuple[torch.nn.Module, DiTTARProcessor]] = field(default_factory=list)
    grid: Optional[TokenGrid] = None   # the token layout of the call in progress
    _hooks: Tuple = ()

    @property
    def step(self) -> int:
        return loop_step(self.steps, self.pipeline, self.grid)

    def sync(self) -> None:
        """Before each forward call: wrap the processors set on the regularized modules since the last one
        (``set_attn_processor``, ``fuse_qkv_projections``): one attribute comparison per module."""
        for index, (module, installed) in enumerate(self.installed):
            current = module.processor
            if current is installed:
                continue
            if isinstance(current, DiTTARProcessor) and current.state is self and current.block == installed.block:
                self.installed[index] = (module, current)  # TAR's own, set back (unfuse_qkv_projections)
                continue
            stock = current.processor if isinstance(current, DiTTARProcessor) else current
            wrapper = DiTTARProcessor(stock, installed.name, installed.block, self)
            _set_processor(module, wrapper)
            self.installed[index] = (module, wrapper)

    def spec_at(self, block: int, step: Optional[int] = None) -> Optional[LevelSpec]:
        """The spec of `block` at `step` (default: the live step), or None where it runs stock."""
        step = self.step if step is None else step
        if block not in self.blocks or not self.spec.active or not self.config.regularizes(step):
            return None
        return self.spec


def loop_step(steps: StepTracker, pipeline, grid=None) -> int:
    """The denoising-loop index of a DiT's call in progress (`pipeline`: a weakref, or None; docs/dits.md, Steps):
    the scheduler's ``step_index`` where it keeps one, else the forward calls counted by `StepTracker`; under
    diffusion forcing (`grid.timestep` set), the number of scheduler timesteps above the call's largest one."""
    scheduler = getattr(pipeline(), "scheduler", None) if pipeline is not None else None
    if scheduler is None or not hasattr(scheduler, "step_index"):
        return steps.step
    timestep = getattr(grid, "timestep", None)
    if timestep is not None and getattr(scheduler, "timesteps", None) is not None:
        return sum(t > timestep for t in _schedule(scheduler.timesteps))
    index = scheduler.step_index
    return 0 if index is None else index - (getattr(scheduler, "begin_index", None) or 0)


# id(a scheduler's timesteps tensor) -> (weak reference, its values): read once per run, not per attention call
# (schedulers set a new tensor in set_timesteps)
_SCHEDULES: Dict[int, Tuple[Any, List[float]]] = {}


def _schedule(timesteps: torch.Tensor) -> List[float]:
    key = id(timesteps)
    hit = _SCHEDULES.get(key)
    if hit is not None and hit[0]() is timesteps:
        return hit[1]
    values = [float(t) for t in timesteps.tolist()]
    _SCHEDULES[key] = (weakref.ref(timesteps, lambda _, k=key: _SCHEDULES.pop(k, None)), values)
    return values


def token_frames(family: DiTFamily, grid, nq: int, nk: int, where: str, device,
                 block: Optional[int] = None) -> torch.Tensor:
    """Frame ids (N,) of a block's self-attention over nq = nk tokens (text -1), for the call's token grid
    (a `TokenGrid`, or a (token frames, tokens per frame) pair); `block` (forward order) for the grids whose
    later blocks see the video twice."""
    if grid is None:
        raise RuntimeError(f"{where}: called outside a forward call of the model, so the frame layout is unknown")
    count, per_frame = grid[0], grid[1]
    runs = getattr(grid, "runs", None)
    repeat_from = getattr(grid, "repeat_from", None)
    twice = repeat_from is not None and block is not None and block >= repeat_from
    video = (count * per_frame if runs is None else sum(tokens for _, tokens in runs)) * (2 if twice else 1)
    text = nk - video
    if nq != nk or text < 0 or (text and family.text == "none"):
        shape = f"{count} frames x {per_frame} tokens" if runs is None else f"{count} frames"
        raise ValueError(
            f"{where}: expected a self-attention over the {video} video tokens ({shape}"
            f"{', twice' if twice else ''}){'' if family.text == 'none' else ' and the text tokens'}, got {nq} "
            f"queries and {nk} keys")
    before, after = (text, 0) if family.text == "before" else (0, text)
    runs = runs or tuple((frame, per_frame) for frame in range(count))
    return _layout_ids(runs + runs if twice else runs, before, after, torch.device(device))


@functools.lru_cache(maxsize=64)
def _layout_ids(runs: Tuple[Tuple[int, int], ...], before: int, after: int, device: torch.device) -> torch.Tensor:
    """The int32 frame ids of a layout given by its runs, between `before` and `after` text tokens, kept: every
    block and step of a call passes the same tensor, whose values tar_attention then checks once (a device
    synchronisation per layout, not per call). Made outside inference mode (a pipeline runs in it), so that it
    keeps a version counter."""
    with torch.inference_mode(False):
        frames = torch.tensor([-1] + [frame for frame, _ in runs] + [-1], dtype=torch.int32)
        tokens = torch.tensor([before] + [count for _, count in runs] + [after])
        return frames.repeat_interleave(tokens).to(device)


def watch_layout(model: torch.nn.Module, family: DiTFamily, target) -> Tuple:
    """Hooks that keep ``target.grid`` the `TokenGrid` of the model's call in progress.

    Returns the two hook handles; the grid is None outside a forward call (also after one raised).
    """
    signature = inspect.signature(model.forward)

    def read_layout(module, args, kwargs):
        bound = signature.bind(*args, **kwargs)
        bound.apply_defaults()
        target.grid = family.layout(module, bound.arguments)

    def forget_layout(module, args, output):
        target.grid = None

    return (model.register_forward_pre_hook(read_layout, with_kwargs=True),
            model.register_forward_hook(forget_layout, always_call=True))


def _set_processor(module: torch.nn.Module, processor) -> None:
    # MochiAttention keeps its processor in a plain attribute, with no set_processor
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor


def _check_config(model: torch.nn.Module, config: TARConfig, count: int) -> None:
    name = type(model).__name__
    if config.preset is not None:
        raise ValueError(f"{config.preset!r} is a paper preset for video UNets and {name} is a video DiT, for "
                         "which the paper has none: give its level, levels={0: (sigma, strength)} with sigma in "
                         "latent frames")
    other = sorted(set(config.levels) - {0})
    if other:
        raise ValueError(f"{name} is a video DiT with one resolution level, 0 (levels={{0: (sigma, strength)}}, "
                         f"sigma in latent frames); the config has levels {other}")
    if config.include_input_block:
        raise ValueError(f"include_input_block applies to video UNets; {name} has no input-block temporal attention")
    missing = [b for b in config.blocks or () if b >= count]
    if missing:
        raise ValueError(f"blocks {missing} do not exist in {name}: it has blocks 0..{count - 1} "
                         "(counted in forward order)")


def dit_models(model: torch.nn.Module, pipeline) -> List[Tuple[str, torch.nn.Module]]:
    """(name prefix, model) of every DiT TAR goes on: a bare model; a pipeline's ``transformer`` and
    Wan 2.2's second expert ``transformer_2``, whichever are present (prefixed by the attribute, unless
    ``transformer`` is the only one)."""
    if pipeline is None:
        return [("", model)]
    experts = []
    for attr in ("transformer", "transformer_2"):
        expert = getattr(pipeline, attr, None)
        if isinstance(expert, torch.nn.Module) and dit_family(expert) is not None \
                and all(expert is not other for _, other in experts):
            experts.append((attr, expert))
    return [("", model)] if [attr for attr, _ in experts] == ["transformer"] else experts


def apply_dit_tar(model: torch.nn.Module, pipeline, config: TARConfig) -> List[str]:
    """`apply_tar` for a supported DiT (and Wan 2.2's other expert, see `dit_models`): the regularized modules."""
    experts = dit_models(model, pipeline)
    for _, expert in experts:
        _check_config(expert, config, len(dit_attention_modules(expert)))
    names = []
    for prefix, expert in experts:
        names += [f"{prefix}.{name}" if prefix else name for name in _install(expert, pipeline, config)]
    return names


def _install(model: torch.nn.Module, pipeline, config: TARConfig) -> List[str]:
    family = dit_family(model)
    modules = dit_attention_modules(model)
    remove_dit_tar(model)
    blocks = frozenset(range(len(modules)) if config.blocks is None else config.blocks)
    # the hooks run in forward calls, once `state` below exists
    steps = StepTracker.attach(model, _OWNER, pipeline=pipeline, before_forward=lambda: state.sync(),
                               snapshot=lambda: (state.grid, state.step))
    state = _DiTState(config, family, steps, config.levels[0], blocks,
                      None if pipeline is None else weakref.ref(pipeline))
    state._hooks = watch_layout(model, family, state)
    for index, (name, module) in enumerate(modules):
        if index not in blocks:
            continue
        processor = DiTTARProcessor(module.processor, name, index, state)
        state.installed.append((module, processor))
        _set_processor(module, processor)
    setattr(model, _STATE_ATTR, state)
    steps.reset()
    return [processor.name for _, processor in state.installed]


def remove_dit_tar(model: torch.nn.Module) -> None:
    """Give every module its stock processor back and remove the hooks (no-op without TAR)."""
    state = vars(model).get(_STATE_ATTR)
    if state is None:
        return
    state.sync()  # a processor set since the last forward call is the one to give back
    for module, processor in state.installed:
        _set_processor(module, processor.processor)
    for hook in state._hooks:
        hook.remove()
    delattr(model, _STATE_ATTR)
    StepTracker.detach(model, _OWNER)
