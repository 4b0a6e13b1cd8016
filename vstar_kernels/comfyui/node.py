"""The VSTAR_TAR node, and `apply_tar`, the same thing as a function of a ComfyUI MODEL."""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from .._problem import check_factor, check_sigma
from .models import family_of, unwrap
from .patch import KEY, LOG, MarkedForward, Settings, TARPatch, marked
from .paths import replacement, resolve, step, walk as walk_path

BACKENDS = ("auto", "triton", "reference")
MIN_COMFYUI = "0.3.60"      # the first ComfyUI whose attention functions take an override from transformer_options
# ComfyUI base models (comfy.model_base; subclasses too) that run an image model on a video model's diffusion class
IMAGE_MODELS = {"HunyuanImage21": "HunyuanImage 2.1 (its refiner too), on the HunyuanVideo class"}


def _real(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise ValueError(f"VSTAR_TAR: {name} must be a finite real number, got {value!r}")
    return float(value)


def _percent(name: str, value) -> float:
    value = _real(name, value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"VSTAR_TAR: {name} must be in [0, 1], got {value}")
    return value


def _modules(patcher, root: str):
    """`named_modules()` of the module at `root` as `patcher` runs it (`paths.step` by step), each torch.compile
    wrapper on the way unwrapped at its own path (the node patches through it): paths below `root` (its own is ""),
    every path of a module held at several (walked into once)."""
    top, live = walk_path(patcher, root)
    found, walked = {}, set()

    def walk(path, module, live):
        found[path] = module
        if id(module) in walked:
            return
        walked.add(id(module))
        for name in list(module._modules):
            child, on_model = step(patcher, f"{root}.{path}.{name}" if path else f"{root}.{name}", module, live, True)
            if isinstance(child, torch.nn.Module):
                walk(f"{path}.{name}" if path else name, unwrap(child),
                     unwrap(on_model) if isinstance(on_model, torch.nn.Module) else None)
    walk("", unwrap(top), unwrap(live) if isinstance(live, torch.nn.Module) else None)
    return found


def _refuse_replaced_above(patcher, paths) -> None:
    """A ValueError where an earlier node's object patch put another module in place of one that holds a module of
    `paths` (a torch.compile wrapper of the same module is no other): TAR's patch of the module's forward would wrap
    the module replaced, and ComfyUI, which puts object patches back in the order they were made, would leave the
    replacing module's forward on the model's own module after sampling. (A later node's: `TARPatch.outer_sample`.)"""
    found = replacement(patcher, paths)
    if found is not None:
        raise ValueError(f"VSTAR_TAR: an earlier node put another module in place of {found}: TAR cannot patch "
                         "the self-attention's forward there (it would run the module that was replaced). Leave "
                         "that node out, or ask its author to patch the module's forward instead")


def _wrappers():
    """ComfyUI's wrapper types, after checking that this ComfyUI can run the node: a clear error outside ComfyUI,
    and on a ComfyUI older than MIN_COMFYUI, whose attention functions take no override."""
    try:
        from comfy.ldm.modules import attention
        from comfy.patcher_extension import WrappersMP
    except ImportError as exc:
        raise ImportError(f"VSTAR_TAR: apply_tar needs ComfyUI: run it in ComfyUI's Python, or with a ComfyUI "
                          f"checkout on sys.path ({exc})") from exc
    if not hasattr(attention, "wrap_attn"):
        try:
            from comfyui_version import __version__ as version
        except ImportError:
            version = "of unknown version"
        raise RuntimeError(f"VSTAR_TAR needs ComfyUI {MIN_COMFYUI} or newer, whose attention functions hand each "
                           f"call to transformer_options['optimized_attention_override']: this ComfyUI ({version}) "
                           "has no such override, so TAR could not run. Update ComfyUI")
    return WrappersMP


def _refuse_image_model(model) -> None:
    """A ValueError for a ComfyUI model whose base model (`model.model`) is an `IMAGE_MODELS` one or a subclass."""
    for cls in type(getattr(model, "model", None)).__mro__:
        if cls.__module__ == "comfy.model_base" and cls.__qualname__ in IMAGE_MODELS:
            found = type(model.model)
            raise ValueError(f"VSTAR_TAR: the model is {found.__module__}.{found.__qualname__}, an image model "
                             f"({IMAGE_MODELS[cls.__qualname__]}): TAR regularizes the frames of a video model. "
                             "Connect a video model (docs/comfyui.md, Supported models), or leave the node out")


def _compute_dtype(model) -> Optional[torch.dtype]:
    """The dtype the model computes in, as ComfyUI's base model picks it (its manual cast dtype, an object patch of a
    compute-dtype node included, else its weights'); None where the base model does not say."""
    try:
        cast = model.get_model_object("manual_cast_dtype")
    except AttributeError:
        cast = None
    get_dtype = getattr(getattr(model, "model", None), "get_dtype", None)
    return cast if cast is not None else get_dtype() if callable(get_dtype) else None


def _remove(model, targets, wrappers) -> Optional[Settings]:
    """Take this node's wrappers and object patches off `model` (a clone), putting back what they replaced; returns
    the settings of the TAR taken off, if there was one."""
    earlier = [getattr(w, "__self__", None) for w in model.get_wrappers(wrappers.APPLY_MODEL, KEY)]
    earlier = next((patch.settings for patch in earlier if isinstance(patch, TARPatch)), None)
    for kind in (wrappers.OUTER_SAMPLE, wrappers.APPLY_MODEL):
        model.remove_wrappers_with_key(kind, KEY)
    for path in targets:
        ours = marked(model.object_patches.get(path))
        if ours is not None:
            if ours.patched:
                model.object_patches[path] = ours.original
            else:
                del model.object_patches[path]
    return earlier


def apply_tar(model, strength: float, sigma: float, start_percent: float = 0.0, end_percent: float = 1.0,
              reference_frames: int = 0, backend: str = "auto"):
    """A clone of the ComfyUI ModelPatcher `model` with frame-aware TAR on its video self-attention.

    The arguments are the node's inputs (docs/comfyui.md, Inputs), without the ranges of its widgets (any finite
    strength the model's compute dtype holds, a negative one too, any sigma > 0, as tar_attention takes them):
    strength 0 gives a clone that computes what `model` does, bit for bit; the steps regularized are those with
    ``percent_to_sigma(end_percent) <= sigma <= percent_to_sigma(start_percent)``, both ends with a rounding's
    tolerance (`TARPatch.regularizes`). `model` itself is left as it was; applying the node again to its own output
    replaces the settings, with a warning. After the arguments are checked: ImportError outside ComfyUI,
    RuntimeError on a ComfyUI older than 0.3.60.
    """
    strength = _real("strength", strength)
    try:
        sigma = check_sigma(sigma)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"VSTAR_TAR: {exc}") from None
    start_percent = _percent("start_percent", start_percent)
    end_percent = _percent("end_percent", end_percent)
    if isinstance(reference_frames, bool) or not isinstance(reference_frames, numbers.Integral) \
            or reference_frames < 0:
        raise ValueError(f"VSTAR_TAR: reference_frames must be a non-negative int, got {reference_frames!r}")
    if backend not in BACKENDS:
        raise ValueError(f"VSTAR_TAR: backend must be one of {BACKENDS}, got {backend!r}")
    wrappers = _wrappers()
    if not all(callable(getattr(model, name, None)) for name in ("clone", "get_model_object", "add_object_patch")):
        raise TypeError(f"VSTAR_TAR: model must be a ComfyUI MODEL (a ModelPatcher), got {type(model).__name__}")
    _refuse_image_model(model)
    try:  # a strength the model's compute dtype cannot hold refused here, not at the first call mid-sampling
        check_factor("strength", strength, _compute_dtype(model) or torch.float32)
    except ValueError as exc:
        raise ValueError(f"VSTAR_TAR: {exc}") from None
    modules = _modules(model, "diffusion_model")  # as the model runs: another clone's patches may be on it now
    family = family_of(modules[""])
    clone = model.clone()
    targets = [f"diffusion_model.{path}.forward" for path in family.targets(modules)]
    earlier = _remove(clone, targets, wrappers)
    if earlier is not None:
        LOG.warning("VSTAR_TAR: the model already had TAR from an earlier VSTAR_TAR node (strength=%g, sigma=%g, "
                    "start_percent=%g, end_percent=%g, reference_frames=%d, backend=%s); this node replaces it%s. One "
                    "node holds every setting: to keep the earlier TAR, leave this node out", earlier.strength,
                    earlier.sigma, earlier.start_percent, earlier.end_percent, earlier.reference_frames,
                    earlier.backend, " with none (strength 0)" if strength == 0.0 else " with its own settings")
    if start_percent > end_percent and strength != 0.0:
        LOG.warning("VSTAR_TAR: start_percent=%g is after end_percent=%g: the window holds no step, so the model "
                    "runs without TAR", start_percent, end_percent)
    if strength == 0.0 or start_percent > end_percent:
        return clone
    _refuse_replaced_above(clone, [path[:-len(".forward")] for path in targets])
    patch = TARPatch(Settings(strength, sigma, start_percent, end_percent, int(reference_frames), backend), family, {},
                     clone.model)
    for path in targets:
        name = path[len("diffusion_model."):-len(".forward")]
        patch.marked[path] = MarkedForward(resolve(clone, path), name, path in clone.object_patches).forward
        clone.add_object_patch(path, patch.marked[path])
    clone.add_wrapper_with_key(wrappers.OUTER_SAMPLE, KEY, patch.outer_sample)
    clone.add_wrapper_with_key(wrappers.APPLY_MODEL, KEY, patch.apply_model)
    return clone


class VSTARTemporalAttentionRegularization:
    """ComfyUI node: TAR (VSTAR's temporal attention regularization) on a video model's self-attention."""

    DESCRIPTION = ("Temporal attention regularization (VSTAR): each video token's attention to the tokens of "
                   "nearby frames gets strength * (its best score) * exp(-(frame distance / sigma)^2 / 2) added, "
                   "for more and longer motion. Self-attention only, in the steps between start_percent and "
                   "end_percent; text cross-attention is untouched. Apply it after any model merge node (a merge "
                   "takes only the weights of its second model, so TAR there is dropped).")
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "apply"
    CATEGORY = "model_patches/video"

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "A Wan, HunyuanVideo, LTX-Video, Mochi, Cosmos or SVD video model."}),
                "strength": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 10.0, "step": 0.01,
                                       "tooltip": "TAR's strength c; 0: no TAR (an earlier VSTAR_TAR's taken "
                                                  "off too, with a warning)."}),
                "sigma": ("FLOAT", {"default": 1.0, "min": 0.05, "max": 64.0, "step": 0.05,
                                    "tooltip": "Width of the band in latent frames; smaller is a stronger pull "
                                               "towards neighbouring frames."}),
            },
            "optional": {
                "start_percent": ("FLOAT", {"default": 0.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                            "tooltip": "Where TAR starts: steps at sigmas up to the model "
                                                       "sampling's percent_to_sigma(start_percent) (ComfyUI's "
                                                       "percent, not a fraction of the steps)."}),
                "end_percent": ("FLOAT", {"default": 1.0, "min": 0.0, "max": 1.0, "step": 0.001,
                                          "tooltip": "Where TAR ends: steps at sigmas down to the model "
                                                     "sampling's percent_to_sigma(end_percent) (ComfyUI's percent, "
                                                     "not a fraction of the steps: how many steps it holds depends "
                                                     "on the scheduler)."}),
                "reference_frames": ("INT", {"default": 0, "min": 0, "max": 4096,
                                             "tooltip": "Leading latent frames that are reference images, not "
                                                        "video: no bias. Required for Wan Animate: connect "
                                                        "WanAnimateToVideo's trim_latent (at 0 its reference is an "
                                                        "error). Wan VACE reads them from its conditioning."}),
                "backend": (list(BACKENDS), {"default": "auto",
                                             "tooltip": "auto: the Triton kernels on a GPU (the lean forward on "
                                                        "an H100 or H200 where it fits), the CPU backend on CPU."}),
            },
        }

    def apply(self, model, strength, sigma, start_percent=0.0, end_percent=1.0, reference_frames=0, backend="auto"):
        return (apply_tar(model, strength, sigma, start_percent, end_percent, reference_frames, backend),)
