"""What the node adds to a ComfyUI model, and how a model call runs with it (docs/comfyui.md, How it works):
`TARWrapper` (the APPLY_MODEL wrapper), `MarkedForward` (the object patch on each module holding the video
self-attention) and `tar_override` (the attention override inside such a module)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Optional

import torch

from .. import frame_ids, tar_attention
from .models import Family, Layout

KEY = "vstar_tar"               # transformer_options key of the regularized call; the wrapper's key
SITE = "vstar_tar_module"       # transformer_options key, inside a regularized module, of that module
OVERRIDE = "optimized_attention_override"


@dataclass(frozen=True)
class Settings:
    strength: float
    sigma: float
    sigma_start: float          # the window: steps with sigma_end <= sigma <= sigma_start
    sigma_end: float
    reference_frames: int       # leading latent frames that are reference images (frame -1)
    backend: str


@dataclass(frozen=True)
class RegularizedCall:
    """One model call in the window: its settings and token layout."""

    settings: Settings
    layout: Layout

    def frames(self, n: int, device, where: str) -> torch.Tensor:
        """Frame ids of a self-attention over `n` tokens of this call (-1 outside the video, and the text
        after it where the layout has some)."""
        layout, lead = self.layout, self.settings.reference_frames
        text = n - layout.tokens()
        if text < 0 or (text and not layout.text_after):
            raise ValueError(f"{where}: the self-attention has {n} tokens, but this call's latent makes "
                             f"{layout.describe()} ({layout.tokens()} tokens)")
        if lead >= layout.frames:
            raise ValueError(f"{where}: reference_frames={lead} leaves none of this call's {layout.frames} latent "
                             "frames as video")
        return _layout_ids(layout.frames - lead, layout.per_frame, layout.before + lead * layout.per_frame,
                           layout.after + text, torch.device(device))


@functools.lru_cache(maxsize=64)
def _layout_ids(frames: int, per_frame: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """frame_ids of one layout, kept: every block and step passes the same tensor, whose values tar_attention
    then checks once. Made outside inference mode (ComfyUI samples in it), so that it keeps a version counter."""
    with torch.inference_mode(False):
        return frame_ids(frames, per_frame, text_before=before, text_after=after, device=device)


class _Module:
    """The regularized module a call is in, and how many attention calls it made through the override."""

    def __init__(self, call: RegularizedCall, name: str):
        self.call, self.name, self.calls = call, name, 0


class TARWrapper:
    """APPLY_MODEL wrapper: hands the call's token layout down in the window's steps."""

    def __init__(self, settings: Settings, family: Family):
        self.settings, self.family = settings, family

    def regularizes(self, sigmas: torch.Tensor) -> bool:
        """Whether a call at `sigmas` (one per batch entry) is in the window; mixed batches are an error."""
        values = torch.as_tensor(sigmas).detach().reshape(-1).tolist()
        inside = [self.settings.sigma_end <= s <= self.settings.sigma_start for s in values]
        if all(inside):
            return True
        if not any(inside):
            return False
        raise ValueError(f"VSTAR_TAR: one model call mixes sigmas inside and outside the window "
                         f"[{self.settings.sigma_end}, {self.settings.sigma_start}]: {values}")

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                 **kwargs):
        options = {} if transformer_options is None else transformer_options
        sigmas = options.get("sigmas")
        if not self.regularizes(t if sigmas is None else sigmas):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        layout = self.family.layout(executor.class_obj.diffusion_model, x, kwargs)
        options = {**options, KEY: RegularizedCall(self.settings, layout)}
        return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)


class MarkedForward:
    """Object patch on a module's forward: in a regularized call, its attention calls go to `tar_override`.

    `original`: the forward it replaced (the module's own, or an earlier object patch: `patched`).
    """

    def __init__(self, original, name: str, patched: bool):
        self.original, self.name, self.patched = original, name, patched

    def __call__(self, *args, **kwargs):
        options = kwargs.get("transformer_options")
        call = None if options is None else options.get(KEY)
        if call is None:
            return self.original(*args, **kwargs)
        module = _Module(call, self.name)
        kwargs["transformer_options"] = {**options, OVERRIDE: tar_override, SITE: module}
        out = self.original(*args, **kwargs)
        if module.calls == 0:
            raise RuntimeError(f"VSTAR_TAR: {self.name} computed its attention without ComfyUI's attention "
                               f"override ({OVERRIDE} in transformer_options), so TAR could not run there")
        return out


def _arguments(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               transformer_options=None, _inside_attn_wrapper=False, **unknown):
    """The attention call's arguments (ComfyUI's convention); attn_precision does not matter (TAR's math is float32,
    float64 for float64 inputs)."""
    return q, k, v, heads, mask, skip_reshape, skip_output_reshape, transformer_options, unknown


def key_mask(mask: Optional[torch.Tensor], batch: int, keys: int, where: str) -> Optional[torch.Tensor]:
    """A ComfyUI attention mask that only masks keys, as the (B, Nk) bool key mask of `tar_attention`.

    With ComfyUI's batch and head dimensions added it must be (B or 1, 1, 1, Nk): bool (True attends), or
    additive with entries 0 and -inf or at most minus the dtype's largest value (HunyuanVideo's padded text).
    """
    if mask is None:
        return None
    full = mask
    if full.dim() == 2:
        full = full.unsqueeze(0)
    if full.dim() == 3:
        full = full.unsqueeze(1)
    if full.dim() != 4 or full.shape[1:3] != (1, 1) or full.shape[3] != keys or full.shape[0] not in (1, batch):
        raise ValueError(f"{where}: TAR takes masks over keys only, of shape (B or 1, 1, 1, {keys}) with ComfyUI's "
                         f"batch and head dimensions; got a mask of shape {tuple(mask.shape)}")
    full = full.reshape(full.shape[0], keys)
    if full.dtype == torch.bool:
        keep = full
    elif full.is_floating_point():
        keep = full == 0
        if not bool((keep | (full <= -torch.finfo(full.dtype).max)).all()):
            raise ValueError(f"{where}: an additive mask with entries other than 0 and -inf (or minus the largest "
                             f"{full.dtype}) shifts scores; TAR takes masks that only leave keys out")
    else:
        raise ValueError(f"{where}: a {full.dtype} attention mask; TAR takes bool or additive float masks")
    return keep.expand(batch, keys)


def tar_override(func, *args, **kwargs):
    """The attention override inside a regularized module: TAR with frame ids instead of `func`."""
    q, k, v, heads, mask, skip_reshape, skip_output_reshape, options, unknown = _arguments(*args, **kwargs)
    module = options[SITE]
    where = f"VSTAR_TAR: {module.name}"
    if unknown:
        raise ValueError(f"{where}: the attention call passed arguments TAR does not know: {sorted(unknown)}")
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    batch, n = q.shape[0], q.shape[2]
    if k.shape[2] != n:
        raise ValueError(f"{where}: a self-attention over {n} queries has {k.shape[2]} keys")
    settings = module.call.settings
    out = tar_attention(q, k, v, sigma=settings.sigma, strength=settings.strength,
                        frames=module.call.frames(n, q.device, where), key_mask=key_mask(mask, batch, n, where),
                        backend=settings.backend)
    module.calls += 1
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(batch, n, -1)
