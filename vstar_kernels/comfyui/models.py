"""The video models of ComfyUI the node knows: where their video self-attention sits and how their tokens lie.

A model is recognised by the exact class of its diffusion model (module and name: nothing of ComfyUI is
imported here). `targets` names the modules whose forward makes the regularized attention calls and
nothing else, from the diffusion model's modules by path (its `named_modules()`, as the model will run);
`layout` says where one call's frames are in that attention's tokens (docs/comfyui.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from ..frames import TokenLayout, leading_references
from ..tar_config import uncompiled as unwrap


@dataclass(frozen=True)
class Family:
    name: str
    targets: Callable[[Dict[str, torch.nn.Module]], List[str]]  # named_modules() -> paths
    # (diffusion model, x, the call's keyword arguments and its transformer_options) -> its tokens
    layout: Callable[[torch.nn.Module, torch.Tensor, dict], TokenLayout]
    time_dim: int = 2           # the latent's dimension of frames (that of ComfyUI's context windows over them)
    # the call's leading latent frames that its conditioning marks as reference images, or None where it says nothing
    references: Optional[Callable[[torch.Tensor, dict], Optional[int]]] = None
    # whether the call's concat conditioning (c_concat) marks its first latent frame as a reference image, where
    # the family's conditioning puts reference images first that the node cannot count (Wan Animate)
    reference_first: Optional[Callable[[Optional[torch.Tensor]], bool]] = None


def _ceil(size: int, patch: int) -> int:
    return -(-size // patch)


def _grid(shape, patch, rounding) -> Tuple[int, int]:
    """(frames, tokens per frame) of a (.., T, H, W) latent under a (pt, ph, pw) patch."""
    t, h, w = (rounding(int(s), int(p)) for s, p in zip(shape[-3:], patch))
    return t, h * w


def _video(x: torch.Tensor, where: str) -> torch.Tensor:
    if x.dim() != 5:
        raise ValueError(f"VSTAR_TAR: {where}: expected a 5-D video latent (batch, channels, frames, height, width), "
                         f"got shape {tuple(x.shape)}")
    return x


def _listed(*places: Tuple[str, str]) -> Callable[[Dict[str, torch.nn.Module]], List[str]]:
    """`targets` for the modules at ``(container, attribute)`` of each block of each container, in that order."""
    def targets(modules) -> List[str]:
        return [f"{container}.{i}.{attribute}" if attribute else f"{container}.{i}"
                for container, attribute in places for i in range(len(modules.get(container) or ()))]
    return targets


# Wan: the latent (and Phantom's subject frames, time_dim_concat) is padded up to the patch size (circular
# padding), so a frame has ceil(H / 2) x ceil(W / 2) tokens. The Fun models' reference image
# (reference_latent, through ref_conv, no padding) comes first; HuMo's reference frames (through the patch
# embedding, no padding) come last. Newer ComfyUI's in-context references (context_latents, padded) come after the
# video and Phantom's frames, in WanModel's own forward (not in VACE's, which has one of its own).
def _wan_layout(dm, x, extra) -> TokenLayout:
    frames, per_frame = _grid(_video(x, "Wan").shape, dm.patch_size, _ceil)
    concat, reference = extra.get("time_dim_concat"), extra.get("reference_latent")
    after = 0 if concat is None else _ceil(concat.shape[-3], dm.patch_size[0]) * per_frame
    own = type(getattr(dm, "_orig_mod", dm))  # a torch.compile'd model's module
    wan = next((c for c in own.__mro__ if c.__name__ == "WanModel"), None)
    if extra.get("context_latents") is not None and wan is not None and \
            getattr(own, "forward_orig", None) is getattr(wan, "forward_orig", None):
        after += sum(math.prod(_grid(latent.shape, dm.patch_size, _ceil)) for latent in extra["context_latents"])
    before = 0
    if reference is not None and getattr(dm, "ref_conv", None) is not None:
        before = (reference.shape[-2] // dm.patch_size[1]) * (reference.shape[-1] // dm.patch_size[2])
    return TokenLayout(frames, per_frame, before=before, after=after)


def _humo_layout(dm, x, extra) -> TokenLayout:
    layout = _wan_layout(dm, x, extra)
    reference = extra.get("reference_latent")
    if reference is None:
        return layout
    ref_frames, ref_per_frame = _grid(reference.shape, dm.patch_size, lambda s, p: s // p)
    return layout._replace(after=layout.after + ref_frames * ref_per_frame)


# Wan S2V: the video (padded), then the reference frames' tokens and the motion frames' (as many as its frame
# packer makes), in one self-attention.
def _s2v_layout(dm, x, extra) -> TokenLayout:
    frames, per_frame = _grid(_video(x, "Wan S2V").shape, dm.patch_size, _ceil)
    return TokenLayout(frames, per_frame, text_after=True, tail="the reference and motion tokens")


# SVD / SV3D: a video UNet (ComfyUI's UNetModel, the class of the image UNets too) with frames in the batch; each
# SpatialVideoTransformer's temporal attention (time_stack[j].attn1) runs over the frames of each spatial site,
# one token per frame.
def _time_stack_targets(modules) -> List[str]:
    first = {id(module): name for name, module in reversed(modules.items())}  # a module held at several paths: once
    targets = [f"{name}.time_stack.{j}.attn1" for name, module in modules.items()
               if type(module).__name__ == "SpatialVideoTransformer" and first[id(module)] == name
               for j in range(len(modules[f"{name}.time_stack"]))]
    if not targets:
        raise ValueError("VSTAR_TAR: this UNet has no temporal attention (SVD's time_stack): an image model. "
                         "AnimateDiff-Evolved's motion modules cannot be regularized: they call ComfyUI's attention "
                         "without transformer_options, so its attention override never reaches them "
                         "(docs/comfyui.md)")
    return targets


def _svd_layout(dm, x, extra) -> TokenLayout:
    frames = extra.get("num_video_frames")
    if x.dim() != 4 or not frames or x.shape[0] % int(frames):
        raise ValueError(f"VSTAR_TAR: SVD: expected a latent of (batch x num_video_frames, channels, height, width), "
                         f"got shape {tuple(x.shape)} with num_video_frames={frames}")
    return TokenLayout(int(frames), 1)


# HunyuanVideo: joint attention over [reference image (ref_latent), video, text (+ byT5)], padded patches.
def _hunyuan_layout(dm, x, extra) -> TokenLayout:
    patch = list(dm.patch_size)
    if len(patch) != 3:
        raise ValueError(f"VSTAR_TAR: HunyuanVideo: this model has a {len(patch)}-D patch {tuple(patch)}: an image "
                         "model, not a video model")
    frames, per_frame = _grid(_video(x, "HunyuanVideo").shape, patch, _ceil)
    reference = extra.get("ref_latent")
    before = 0 if reference is None else math.prod(_grid(reference.shape, patch, _ceil))
    return TokenLayout(frames, per_frame, before=before, text_after=True)


# LTX-Video: patch size 1; keyframe guides (keyframe_idxs: (batch, 3, guide tokens), newer ComfyUI's with a last
# dimension of 2) are appended to the latent after the video frames and keep positions of their own: they are tokens
# outside the video here. Newer ComfyUI drops the tokens whose denoise_mask is negative in the first batch entry (the
# dilated guides') before the blocks, and its context windows cut the guides to those in the window (a window has
# guide_frames_indices); ComfyUI 0.3.64's cut the latent, guides' frames included, and keep every guide's
# keyframe_idxs, so the model takes the window's last frames for the guides: refused.
def _ltx_layout(dm, x, extra) -> TokenLayout:
    frames, per_frame = _grid(_video(x, "LTX-Video").shape, (1, 1, 1), _ceil)
    guides = extra.get("keyframe_idxs")
    after = 0 if guides is None else int(guides.shape[2])
    if after % per_frame:
        raise ValueError(f"VSTAR_TAR: LTX-Video: {after} keyframe guide tokens are not whole frames of {per_frame} "
                         "tokens")
    window = (extra.get("transformer_options") or {}).get("context_window")
    if after and getattr(window, "dim", None) == 2 and not hasattr(window, "guide_frames_indices"):
        raise ValueError("VSTAR_TAR: LTX-Video: keyframe guides under context windows that do not cut the guides to "
                         "each window (ComfyUI 0.3.64's): the model runs the window's last latent frames in the "
                         "guides' places, so which of them are video is not known. Update ComfyUI (newer context "
                         "windows cut the guides), or take the context windows or the guides off")
    video = frames - after // per_frame
    if video < 1:
        raise ValueError(f"VSTAR_TAR: LTX-Video: {after // per_frame} keyframe guide frames of this call's {frames} "
                         "latent frames leave none as video")
    mask = extra.get("denoise_mask")
    if after and isinstance(mask, torch.Tensor) and mask.dim() == 5 and mask.shape[2:] == x.shape[2:]:
        dropped = (mask[0] < 0).any(0).flatten()
        if bool(dropped[:video * per_frame].any()):
            raise ValueError("VSTAR_TAR: LTX-Video: this call's denoise_mask drops video tokens (it is negative "
                             "outside the keyframe guides), so where its frames lie in the attention is not known")
        after -= int(dropped.sum())
    return TokenLayout(video, per_frame, after=after)


# Mochi: joint attention over [video, the unpadded text], spatial patch padded up.
def _mochi_layout(dm, x, extra) -> TokenLayout:
    patch = int(dm.patch_size)
    frames, per_frame = _grid(_video(x, "Mochi").shape, (1, patch, patch), _ceil)
    return TokenLayout(frames, per_frame, text_after=True)


# Cosmos: the latent must divide into patches; tokens are (t h w), frame-major.
def _cosmos_layout(dm, x, extra) -> TokenLayout:
    patch = (int(dm.patch_temporal), int(dm.patch_spatial), int(dm.patch_spatial))
    frames, per_frame = _grid(_video(x, "Cosmos").shape, patch, lambda s, p: s // p)
    return TokenLayout(frames, per_frame)


def _vace_references(x, extra) -> Optional[int]:
    """Wan VACE: WanVaceToVideo puts a reference image before the control video as a latent frame whose second
    half (the reactive latent) is the latent format's zero and whose mask is 0, so its `vace_context` (batch,
    inputs, 16 + 16 + mask channels, frames, H, W; the model's latent_in applied) is exactly 0 past its first 16
    channels there; a video frame's reactive half is the VAE's latent of grey or of pixels, never 0. The count of
    such leading frames, the same in every input and sequence; None without a vace_context of the call's frames."""
    context = extra.get("vace_context")
    if not isinstance(context, torch.Tensor) or context.dim() != 6 or context.shape[3] != x.shape[2]:
        return None
    return leading_references(context.flatten(0, 1), 16, "VSTAR_TAR")


def _animate_reference_first(c_concat: Optional[torch.Tensor]) -> bool:
    """Wan Animate: WanAnimateToVideo puts its reference image's latent frame(s) first (a zero image's when none is
    given) with concat_mask 0, and Wan's concat_cond makes c_concat's first 4 channels 1 - concat_mask: exactly 1
    there, 0 (or 1 minus the character mask) on the video's frames, 1 again on continue-motion frames (video, after
    the reference). Whether the call's first latent frame has that mask 1 everywhere."""
    if not isinstance(c_concat, torch.Tensor) or c_concat.dim() != 5 or c_concat.shape[1] < 4:
        return False
    return bool((c_concat[:, :4, 0] == 1).all())


def _cosmos1_targets(modules) -> List[str]:
    return [f"blocks.{name}.blocks.{index}.block" for name in modules["blocks"].keys()
            for index in range(len(modules[f"blocks.{name}.blocks"]))
            if modules[f"blocks.{name}.blocks.{index}"].block_type in ("fa", "full_attn")]


_WAN_BLOCKS = _listed(("blocks", "self_attn"))
WAN = Family("Wan", _WAN_BLOCKS, _wan_layout)
FAMILIES: Dict[Tuple[str, str], Family] = {
    ("comfy.ldm.wan.model", "WanModel"): WAN,
    ("comfy.ldm.wan.model", "CameraWanModel"): WAN,
    ("comfy.ldm.wan.model", "VaceWanModel"): Family("Wan VACE", _listed(("vace_blocks", "self_attn"),
                                                                        ("blocks", "self_attn")), _wan_layout,
                                                    references=_vace_references),
    ("comfy.ldm.wan.model", "HumoWanModel"): Family("Wan HuMo", _WAN_BLOCKS, _humo_layout),
    ("comfy.ldm.wan.model_animate", "AnimateWanModel"): Family("Wan Animate", _WAN_BLOCKS, _wan_layout,
                                                               reference_first=_animate_reference_first),
    ("comfy.ldm.wan.model", "WanModel_S2V"): Family("Wan S2V", _WAN_BLOCKS, _s2v_layout),
    ("comfy.ldm.hunyuan_video.model", "HunyuanVideo"): Family(
        "HunyuanVideo", _listed(("double_blocks", ""), ("single_blocks", "")), _hunyuan_layout),
    ("comfy.ldm.lightricks.model", "LTXVModel"): Family("LTX-Video", _listed(("transformer_blocks", "attn1")),
                                                        _ltx_layout),
    ("comfy.ldm.genmo.joint_model.asymm_models_joint", "AsymmDiTJoint"): Family(
        "Mochi", _listed(("blocks", "attn")), _mochi_layout),
    ("comfy.ldm.cosmos.model", "GeneralDIT"): Family("Cosmos Predict1", _cosmos1_targets, _cosmos_layout),
    ("comfy.ldm.cosmos.predict2", "MiniTrainDIT"): Family("Cosmos Predict2", _WAN_BLOCKS, _cosmos_layout),
    ("comfy.ldm.modules.diffusionmodules.openaimodel", "UNetModel"): Family("SVD / SV3D", _time_stack_targets,
                                                                            _svd_layout, time_dim=0),
}


def family_of(diffusion_model: torch.nn.Module) -> Family:
    """The family of a ComfyUI diffusion model (`unwrap`ped); a ValueError naming the supported ones for any other."""
    cls = type(diffusion_model)
    family = FAMILIES.get((cls.__module__, cls.__qualname__))
    if family is None and "wanvideo" in cls.__module__.lower():
        raise ValueError(f"VSTAR_TAR: {cls.__module__}.{cls.__qualname__} is ComfyUI-WanVideoWrapper's model, which "
                         "the node cannot reach: its sampler calls the model itself and its attention skips ComfyUI's "
                         "override (docs/comfyui.md, Not supported, and why). Load Wan with ComfyUI's own nodes")
    if family is None:
        known = ", ".join(f"{family.name} ({module}.{name})" for (module, name), family in FAMILIES.items())
        raise ValueError(f"VSTAR_TAR: the diffusion model {cls.__module__}.{cls.__qualname__} is not a video model the "
                         f"node knows; it supports {known}")
    return family


__all__ = ["FAMILIES", "Family", "family_of", "unwrap"]
