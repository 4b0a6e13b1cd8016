"""The video DiTs TAR takes: where each family's regularized attention sits and how its tokens lie (`FAMILIES`),
the video models TAR does not apply to and why (`UNSUPPORTED`); docs/dits.md lists both."""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import diffusers
import torch

from ..frames import TokenLayout, leading_references
from .token_grid import runs_grid


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

    def layout(model, arguments) -> TokenLayout:
        latent = _latent(model, arguments)
        p_t, p_h, p_w = _patch(model.config)
        height, width = latent.shape[2:4] if channels_last else latent.shape[-2:]
        return TokenLayout(latent.shape[frames_dim] // p_t, (height // p_h) * (width // p_w))

    return layout


def _ltx_grid(model, arguments) -> TokenLayout:
    grid = [arguments.get(name) for name in ("num_frames", "height", "width")]
    if any(g is None for g in grid):
        raise ValueError(f"{type(model).__name__}: TAR needs the num_frames, height and width arguments (the token "
                         "grid) of each forward call")
    frames, height, width = (int(g) for g in grid)
    return TokenLayout(frames, height * width)


def _ltx_layout(model, arguments) -> TokenLayout:
    """LTX-Video: the grid of its num_frames, height and width arguments, which place its tokens unless the call
    gives video_coords (the conditioning pipelines): those are seconds, and the call says neither the frame rate nor
    the VAE's temporal compression that map them to latent frames."""
    if arguments.get("video_coords") is not None:
        raise ValueError(f"{type(model).__name__}: calls with video_coords (LTXConditionPipeline, "
                         "LTXI2VLongMultiPromptPipeline) are not supported: they place the tokens in seconds, and the "
                         "call gives no frame rate to map them to latent frames")
    return _ltx_grid(model, arguments)


def _ltx2_layout(model, arguments) -> TokenLayout:
    """LTX-2: each token (appended conditioning tokens too) at the latent frame its ``video_coords`` fall in, as
    docs/dits.md (Per model) derives it; without video_coords, the model's grid of num_frames x height x width."""
    p_t, p_h, p_w = _patch(model.config)
    coords = arguments.get("video_coords")
    if coords is None:
        grid = _ltx_grid(model, arguments)
        height, width = int(arguments["height"]), int(arguments["width"])
        return TokenLayout(math.ceil(grid.frames / p_t), math.ceil(height / p_h) * math.ceil(width / p_w))
    start = coords[:, 0, :, 0]
    if not bool((start == start[:1]).all()):
        raise ValueError(f"{type(model).__name__}: TAR takes one frame layout per call, but the sequences of the "
                         "batch have different video_coords")
    scale, offset = model.config.vae_scale_factors[0], model.config.causal_offset
    pixel = torch.round(start[0].double() * float(arguments["fps"]))
    frames = torch.div(pixel + scale - offset, scale * p_t, rounding_mode="floor").long()
    values, counts = torch.unique_consecutive(frames, return_counts=True)
    return runs_grid(zip(values.tolist(), counts.tolist()), int(torch.bincount(frames).max()))


def _with_timestep(grid: TokenLayout, arguments) -> TokenLayout:
    """`grid` with the call's largest timestep, from which `steps.loop_step` reads the step."""
    return grid._replace(timestep=float(torch.as_tensor(arguments["timestep"]).max()))


def _skyreels_layout(model, arguments) -> TokenLayout:
    """SkyReels-V2: Wan's grid; under diffusion forcing (per-frame timesteps) the call's largest timestep."""
    grid = _video_5d(2)(model, arguments)
    return _with_timestep(grid, arguments) if arguments.get("enable_diffusion_forcing") else grid


def _references_first(grid: TokenLayout, references: int) -> TokenLayout:
    """`grid` whose first `references` latent frames are reference images, frame -1; the video's frames follow."""
    return runs_grid([(-1, grid.per_frame * references)] +
                     [(f, grid.per_frame) for f in range(grid.frames - references)], grid.per_frame)


def _reference_first_layout(model, arguments) -> TokenLayout:
    """Wan-Animate: the first latent frame is the reference (character) image, frame -1; the video's frames follow."""
    return _references_first(_video_5d(2)(model, arguments), 1)


def _vace_layout(model, arguments) -> TokenLayout:
    """Wan VACE: its pipeline puts each reference image before the video as a latent frame, in the control video
    too, where such a frame alone has the second half of the conditioning latent and the mask all zero (a video
    frame's second half is the VAE's latent of its masked pixels, which is not zero): those frames are frame -1."""
    grid = _video_5d(2)(model, arguments)
    control = arguments.get("control_hidden_states")
    if control is None or control.dim() != 5 or control.shape[1] <= model.config.in_channels \
            or control.shape[2] != _latent(model, arguments).shape[2]:
        return grid
    return _references_first(grid, leading_references(control, model.config.in_channels, type(model).__name__))


def _chronoedit_layout(model, arguments) -> TokenLayout:
    """ChronoEdit: with two latent frames (input image, edited image) its rotary embedding puts the second at
    temporal position rope_temporal_skip_len - 1, the last frame of the video they stand for: so does TAR."""
    grid = _video_5d(2)(model, arguments)
    if _latent(model, arguments).shape[2] != 2:
        return grid
    last = model.config.rope_temporal_skip_len - 1
    return runs_grid([(0, grid.per_frame), (last, grid.per_frame)], grid.per_frame)


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


def _history_grid(model, arguments, histories, video_indices: str) -> TokenLayout:
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
    return runs_grid(runs + [(v, per_frame) for v in values], per_frame)


def _framepack_layout(model, arguments) -> TokenLayout:
    """HunyuanVideo Framepack: the 4x, 2x and 1x (clean) history latents, then the video (`_history_grid`)."""
    if _patch(model.config)[0] != 1:
        raise ValueError(f"{type(model).__name__}: TAR reads Framepack's frame indices per latent frame: "
                         "patch_size_t must be 1")
    histories = (("latents_history_4x", (4, 8, 8), True), ("latents_history_2x", (2, 4, 4), True),
                 ("latents_clean", (1, 2, 2), False))
    return _history_grid(model, arguments, histories, "indices_latents")


def _helios_layout(model, arguments) -> TokenLayout:
    """Helios: the long, mid and short history latents (patches 4, 2 and 1 times the model's), then the video; and
    the call's timestep (its pyramid's stages each set a schedule, and its distilled scheduler keeps no step index)."""
    patch = _patch(model.config)
    histories = [(f"latents_history_{name}", tuple(factor * p for p in patch), factor > 1)
                 for name, factor in (("long", 4), ("mid", 2), ("short", 1))]
    return _with_timestep(_history_grid(model, arguments, histories, "indices_hidden_states"), arguments)


def _kandinsky_layout(model, arguments) -> TokenLayout:
    """Kandinsky 5 and 6: a channels-last latent (B, T, H, W, C); a frame's id is the temporal index of its rotary
    embedding (visual_rope_pos[0]), where given: Kandinsky 6 appends the reference image as a last frame at index 0."""
    grid = _video_5d(1, channels_last=True)(model, arguments)
    positions = arguments.get("visual_rope_pos")
    if positions is None:
        return grid
    values = _index_row(positions[0], grid.frames, "visual_rope_pos[0]", type(model).__name__)
    return runs_grid([(v, grid.per_frame) for v in values], grid.per_frame)


def _motif_layout(model, arguments) -> TokenLayout:
    """Motif-Video: the video, then the text; in its decoder blocks (num_decoder_layers) the keys after the video
    are the encoder's final video tokens, the same frames again."""
    grid = _video_5d(2)(model, arguments)
    decoder = model.config.num_decoder_layers
    if not decoder:
        return grid
    first = len(model.transformer_blocks) + len(model.single_transformer_blocks) - decoder
    return grid._replace(repeat_from=first)


def _minimax_layout(model, arguments) -> TokenLayout:
    """MiniMax-H3: one packed sequence of text, audio and video rows. Its rotary times of the latent frames are
    spaced unevenly (a latent frame spans 1 or 4 video frames) and start after the text: a video row's frame is the
    rank of its rotary time (position_ids[:, 0]) among those of the video rows; text and audio rows get -1."""
    position_ids, video = arguments["position_ids"], arguments["video_indices"]
    times, frames = torch.unique(position_ids[video, 0], sorted=True, return_inverse=True)
    ids = torch.full((position_ids.shape[0],), -1, dtype=torch.long, device=position_ids.device)
    ids[video] = frames
    values, counts = torch.unique_consecutive(ids, return_counts=True)
    per_frame = int(torch.bincount(frames).max()) if frames.numel() else 0
    return runs_grid(zip(values.tolist(), counts.tolist()), per_frame)


def _ltx2_skips_attention(kwargs: dict) -> bool:
    # LTX-2's spatio-temporal guidance: a block that perturbs every sample returns its values, with no attention
    return bool(kwargs.get("all_perturbed"))


def _ltx2_perturbs(arguments: dict) -> bool:
    # LTX-2's pipelines add, per step, a spatio-temporal-guidance call and a modality-isolation call of the
    # conditional sequences alone (diffusers' pipeline_ltx2.py), beside the batched guidance call
    blocks = arguments.get("spatio_temporal_guidance_blocks")
    return (blocks is not None and len(blocks) > 0) or bool(arguments.get("isolate_modalities"))


@dataclass(frozen=True)
class DiTFamily:
    """Where a DiT's regularized attentions sit and how its tokens are laid out."""

    layout: Callable[[torch.nn.Module, dict], TokenLayout] = _video_5d(2)
    blocks: Tuple[str, ...] = ("transformer_blocks",)  # the ModuleLists of transformer blocks, in forward order
    attention: str = "attn1"        # the (dotted) attribute path of the regularized attention in a block
    text: str = "none"              # where that attention's text tokens are: "none", "before", "after"
    batched_guidance: bool = False  # the family's pipelines batch the guidance branches into one call
    # a call (its processor keywords) for which the stock processor computes no attention: it runs stock
    skips_attention: Optional[Callable[[dict], bool]] = None
    # a model call (its bound forward arguments) that perturbs the model for guidance, beside the guidance call:
    # capture_frame_attention does not record it
    perturbs: Optional[Callable[[dict], bool]] = None


_DUAL = ("transformer_blocks", "single_transformer_blocks")  # dual-stream blocks, then single-stream ones
# By class name: a diffusers without one of them has no entry for it
_BY_NAME: Dict[str, DiTFamily] = {
    "WanTransformer3DModel": DiTFamily(blocks=("blocks",)),
    # Wan VACE: the control blocks run first, over the control video's tokens (the same token grid)
    "WanVACETransformer3DModel": DiTFamily(_vace_layout, blocks=("vace_blocks", "blocks")),
    "CogVideoXTransformer3DModel": DiTFamily(_video_5d(1), text="before", batched_guidance=True),
    "HunyuanVideoTransformer3DModel": DiTFamily(blocks=_DUAL, attention="attn", text="after"),
    "LTXVideoTransformer3DModel": DiTFamily(_ltx_layout, batched_guidance=True),
    "MochiTransformer3DModel": DiTFamily(text="after", batched_guidance=True),
    "SkyReelsV2Transformer3DModel": DiTFamily(_skyreels_layout, ("blocks",)),
    "HunyuanVideo15Transformer3DModel": DiTFamily(attention="attn", text="after"),
    "HunyuanVideoFramepackTransformer3DModel": DiTFamily(_framepack_layout, _DUAL, "attn", "after"),
    "LTX2VideoTransformer3DModel": DiTFamily(_ltx2_layout, batched_guidance=True,
                                             skips_attention=_ltx2_skips_attention, perturbs=_ltx2_perturbs),
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
FAMILIES: Dict[type, DiTFamily] = {getattr(diffusers, name): family for name, family in _BY_NAME.items()
                                   if hasattr(diffusers, name)}

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


def dit_attention_modules(model: torch.nn.Module, blocks=None) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) of the regularizable attention of each transformer block, in forward order; a ValueError
    names the `blocks` (indices in forward order, or None) the model lacks."""
    family = dit_family(model)
    found = []
    for container in family.blocks:
        for index, block in enumerate(getattr(model, container, None) or ()):
            module = functools.reduce(getattr, family.attention.split("."), block)
            found.append((f"{container}.{index}.{family.attention}", module))
    missing = sorted(set(blocks or ()) - set(range(len(found))))
    if missing:
        raise ValueError(f"blocks {missing} do not exist in {type(model).__name__}: it has blocks "
                         f"0..{len(found) - 1} (counted in forward order)")
    return found


def set_processor(module: torch.nn.Module, processor) -> None:
    """Give a DiT's attention module `processor` (MochiAttention keeps it in a plain attribute, with no setter)."""
    if hasattr(module, "set_processor"):
        module.set_processor(processor)
    else:
        module.processor = processor
