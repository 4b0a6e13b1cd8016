"""What the node adds to a ComfyUI model, and how a sampling run goes with it (docs/comfyui.md, How it works):
`TARPatch` (the OUTER_SAMPLE and APPLY_MODEL wrappers), `MarkedForward` (the object patch on each module holding
the video self-attention) and `tar_override` (the attention override inside such a module)."""

from __future__ import annotations

import contextvars
import functools
import logging
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .. import tar_attention
from .models import Family, Layout

KEY = "vstar_tar"               # the wrappers' key; the transformer_options key of the sampling run
SITE = "vstar_tar_module"       # transformer_options key, inside a regularized module, of that module
OVERRIDE = "optimized_attention_override"
LOG = logging.getLogger("vstar_kernels.comfyui")
_CALL = contextvars.ContextVar("vstar_tar_call", default=None)    # the model call under way, when regularized


@dataclass(frozen=True)
class Settings:
    strength: float
    sigma: float
    sigma_start: float          # the window: steps with sigma_end <= sigma <= sigma_start
    sigma_end: float
    reference_frames: int       # leading latent frames (of the whole latent) that are reference images (frame -1)
    backend: str


def _warn(run: set, kind: str, message: str) -> None:
    """A WARNING record, once per sampling run (`run`: the kinds said in it) and kind."""
    if kind not in run:
        run.add(kind)
        LOG.warning("VSTAR_TAR: %s (said once per sampling run)", message)


class RegularizedCall:
    """One model call in the window: its settings, token layout and the id of each of its latent frames, and what
    happened in it: the regularized modules entered, and the first error TAR raised."""

    def __init__(self, settings: Settings, layout: Layout, frame_ids: Tuple[int, ...], run: set):
        self.settings, self.layout, self.frame_ids, self.run = settings, layout, frame_ids, run
        self.entered = 0
        self.error: Optional[BaseException] = None

    def fail(self, error: BaseException) -> BaseException:
        """Keep TAR's first error, to raise it again after the call should another node catch it inside."""
        self.error = self.error or error
        return error

    def unplaced(self, queries: int, keys: int) -> Optional[Tuple[str, str]]:
        """(kind, reason) when a self-attention over these token counts has tokens whose frames are not known."""
        layout = self.layout
        if queries != keys:
            return "slices", (f"computed its self-attention in query slices ({queries} of {keys} queries in a call), "
                              "and a call does not say which tokens its slice holds")
        text = keys - layout.tokens()
        if text < 0 or (text and not layout.text_after):
            return "tokens", (f"ran its self-attention over {keys} tokens, but this model call's latent makes "
                              f"{layout.describe()} ({layout.tokens()} tokens): another node ran it on other tokens "
                              "(LongLook's FreeLong does, on windows of frames), whose frames are not known")
        return None

    def frames(self, n: int, device) -> torch.Tensor:
        """Frame ids of a self-attention over `n` tokens of this call (placed: `unplaced` said nothing)."""
        layout = self.layout
        return _layout_ids(self.frame_ids, layout.per_frame, layout.before, layout.after + n - layout.tokens(),
                           torch.device(device))


@functools.lru_cache(maxsize=64)
def _layout_ids(frame_ids: Tuple[int, ...], per_frame: int, before: int, after: int,
                device: torch.device) -> torch.Tensor:
    """The ids of `before` tokens (-1), each frame's `per_frame` tokens, `after` tokens (-1), kept: every block
    and step passes the same tensor, whose values tar_attention then checks once. Made outside inference mode
    (ComfyUI samples in it), so that it keeps a version counter."""
    with torch.inference_mode(False):
        video = torch.tensor(frame_ids, dtype=torch.int32, device=device).repeat_interleave(per_frame)
        return torch.cat([torch.full((before,), -1, dtype=torch.int32, device=device), video,
                          torch.full((after,), -1, dtype=torch.int32, device=device)])


class _Module:
    """A regularized module at work in a call: the override it replaced, and its attention calls so far."""

    def __init__(self, call: RegularizedCall, name: str, previous):
        self.call, self.name, self.previous = call, name, previous
        self.regularized = self.handed_on = 0

    def hand_on(self, func, args, kwargs):
        """The attention call as it came, to the override this module's options had, else to ComfyUI's function."""
        self.handed_on += 1
        if self.previous is None:
            return func(*args, **kwargs)
        return self.previous(func, *args, **kwargs)


class TARPatch:
    """The node's wrappers. `outer_sample` (OUTER_SAMPLE) starts a sampling run, after checking that the node's
    object patches (`marked`, by path) are the ones in force; `apply_model` (APPLY_MODEL) regularizes the model
    calls in the window and checks each one afterwards."""

    def __init__(self, settings: Settings, family: Family, marked: Dict[str, "MarkedForward"]):
        self.settings, self.family, self.marked = settings, family, marked

    def outer_sample(self, executor, *args, **kwargs):
        guider = executor.class_obj
        patches = guider.model_patcher.object_patches
        for path, ours in self.marked.items():
            found = patches.get(path)
            if found is not ours:
                what = f"{getattr(found, '__module__', '')}.{getattr(found, '__qualname__', type(found).__qualname__)}"
                raise RuntimeError(f"VSTAR_TAR: the object patch on {path} is {what}, set by a node after VSTAR_TAR: "
                                   "it replaces TAR's patch there, so TAR would not run. Apply VSTAR_TAR after that "
                                   "node (it keeps the forward it finds and calls it)")
        guider.model_options.setdefault("transformer_options", {})[KEY] = set()     # the run: the warnings said
        return executor(*args, **kwargs)

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

    def frame_ids(self, x: torch.Tensor, layout: Layout, options: dict) -> Tuple[int, ...]:
        """The id of each video frame of a call's latent `x`: its index in the whole latent (when ComfyUI's context
        windows run the model on some of its frames, the window's ``index_list``), -1 for the whole latent's
        leading `reference_frames`."""
        window = options.get("context_window")
        index = range(x.shape[2])
        if window is not None and getattr(window, "dim", None) == 2:     # a window over the frames (B, C, T, H, W)
            index = window.index_list
        lead = self.settings.reference_frames
        ids = tuple(int(i) if i >= lead else -1 for i in index[:layout.frames])
        if all(i < 0 for i in ids):
            raise ValueError(f"VSTAR_TAR: reference_frames={lead} leaves none of this call's latent frames "
                             f"{list(index[:layout.frames])} as video")
        return ids

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        options = {} if transformer_options is None else transformer_options
        sigmas = options.get("sigmas")
        call = None
        if self.regularizes(t if sigmas is None else sigmas):
            layout = self.family.layout(executor.class_obj.diffusion_model, x, kwargs)
            call = RegularizedCall(self.settings, layout, self.frame_ids(x, layout, options), options.get(KEY, set()))
        token = _CALL.set(call)
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _CALL.reset(token)
        if call is not None:
            if call.error is not None:
                raise call.error
            if call.entered == 0:
                _warn(call.run, "skipped", "a model call in the window ran none of the regularized self-attention "
                                           "modules: another node skipped the model's computation (a cache node "
                                           "reusing an earlier result does) or computed it without those modules; "
                                           "TAR regularizes only what the model computes")
        return out


class MarkedForward:
    """Object patch on a module's forward: in a regularized call, its attention calls go to `tar_override`.

    `original`: the forward it replaced (the module's own, or an earlier object patch: `patched`).
    """

    def __init__(self, original, name: str, patched: bool):
        self.original, self.name, self.patched = original, name, patched

    def __call__(self, *args, **kwargs):
        call = _CALL.get()
        if call is None:
            return self.original(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        module = _Module(call, self.name, options.get(OVERRIDE))
        kwargs["transformer_options"] = {**options, OVERRIDE: tar_override, SITE: module}
        call.entered += 1
        out = self.original(*args, **kwargs)
        if module.regularized + module.handed_on == 0:
            raise call.fail(RuntimeError(f"VSTAR_TAR: {self.name} computed its attention without ComfyUI's attention "
                                         f"override ({OVERRIDE} in transformer_options), so TAR could not run there"))
        return out


def _arguments(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **_):
    """The attention call's arguments (ComfyUI's convention). The others (attn_precision, transformer_options,
    hints such as low_precision_attention) do not change TAR's math: float32, float64 for float64 inputs."""
    return q, k, v, heads, mask, skip_reshape, skip_output_reshape


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
    """The attention override inside a regularized module: TAR with frame ids instead of `func`, or, for a call
    whose tokens' frames are not known, the call handed on as it came (said once per sampling run)."""
    module = kwargs["transformer_options"][SITE]
    q, k, v, heads, mask, skip_reshape, skip_output_reshape = _arguments(*args, **kwargs)
    axis = 2 if skip_reshape else 1
    unplaced = module.call.unplaced(q.shape[axis], k.shape[axis])
    if unplaced is not None:
        kind, reason = unplaced
        _warn(module.call.run, kind, f"{module.name} {reason}; such calls run without TAR, as they came")
        return module.hand_on(func, args, kwargs)
    where = f"VSTAR_TAR: {module.name}"
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    batch, n = q.shape[0], q.shape[2]
    settings = module.call.settings
    try:
        out = tar_attention(q, k, v, sigma=settings.sigma, strength=settings.strength,
                            frames=module.call.frames(n, q.device), key_mask=key_mask(mask, batch, n, where),
                            backend=settings.backend)
    except Exception as exc:
        raise module.call.fail(exc)
    module.regularized += 1
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(batch, n, -1)
