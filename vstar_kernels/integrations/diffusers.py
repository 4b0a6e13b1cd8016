"""TAR in diffusers video models: a temporal-attention processor and apply/remove helpers.

Where TAR goes (../shared/semantics.md): the self-attention over frames of the
temporal transformers, per resolution level, in the early denoising steps.

* Which modules: every `Attention` inside a temporal container
  (`temp_attentions`, `motion_modules`, `temporal_transformer_blocks`) that is
  not cross-attention, plus the input-block temporal attentions
  (`transformer_in`, `image_latents_temporal_encoder`) when asked for. That
  covers UNet3DConditionModel, I2VGenXLUNet, UNetMotionModel (FreeNoise too),
  UNetSpatioTemporalConditionModel (attn1 only: its attn2 attends to the image
  token) and LatteTransformer3DModel.
* Which level: from where the module sits, never from the batch size of the
  call: ``down_blocks.i`` -> i, ``mid_block`` -> the last level,
  ``up_blocks.j`` -> last - j, input blocks and models without down blocks -> 0.
* Which step: a `StepTracker` on the denoiser counts its forward calls since
  the pipeline's last `set_timesteps` (see `steps.py`).

The per-module state (level spec, step tracker, the processor to restore)
lives on the `Attention` module, so the processor itself is stateless and
``TARAttnProcessor()`` re-created by diffusers (as when loading IP adapters)
keeps working.
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from .._validation import check_sigma
from ..dispatch import BACKEND_NAMES
from ..functional import tar_attention
from .steps import StepTracker

TEMPORAL_CONTAINERS = frozenset({"temp_attentions", "motion_modules", "temporal_transformer_blocks"})
INPUT_BLOCKS = frozenset({"transformer_in", "image_latents_temporal_encoder"})

_SITE_ATTR = "_vstar_tar_site"
_STATE_ATTR = "_vstar_tar"
_OWNER = "tar"


@dataclass(frozen=True)
class LevelSpec:
    """What TAR adds at one resolution level: ``strength * m_i * exp(-0.5 ((j - i) / sigma)^2)``."""

    sigma: float = 1.0
    strength: float = 1.0

    def __post_init__(self):
        object.__setattr__(self, "sigma", check_sigma(self.sigma))
        if isinstance(self.strength, bool) or not isinstance(self.strength, numbers.Real):
            raise TypeError(f"strength must be a real number, got {type(self.strength).__name__}")
        if not math.isfinite(self.strength):
            raise ValueError(f"strength must be finite, got {self.strength}")
        object.__setattr__(self, "strength", float(self.strength))

    @property
    def active(self) -> bool:
        """False when the bias cannot change the attention (strength 0 or sigma = inf)."""
        return self.strength != 0.0 and math.isfinite(self.sigma)


# Paper names: "64" is the full latent resolution (40x64 latent) = level 0, "32" level 1;
# "D" is followed by sigma. Strength 1 and steps 0..13 of 25 in all of them.
PRESET_UNTIL_STEP = 13
PRESETS: Dict[str, Dict[int, float]] = {
    "64D1": {0: 1.0},
    "64D4": {0: 4.0},
    "64D8": {0: 8.0},
    "64D1_32D8": {0: 1.0, 1: 8.0},
    "64D1_32D1": {0: 1.0, 1: 1.0},
    "64D1_32D12": {0: 1.0, 1: 12.0},
    "64D4_32D8": {0: 4.0, 1: 8.0},
    "64D4_32D12": {0: 4.0, 1: 12.0},
}


def _level_spec(level, spec) -> LevelSpec:
    if isinstance(spec, LevelSpec):
        return spec
    if isinstance(spec, (str, bytes)) or not hasattr(spec, "__len__") or len(spec) != 2:
        raise TypeError(f"levels[{level}] must be a (sigma, strength) pair or a LevelSpec, got {spec!r}")
    try:
        return LevelSpec(*spec)
    except (TypeError, ValueError) as exc:
        raise type(exc)(f"levels[{level}]: {exc}") from None


@dataclass(frozen=True)
class TARConfig:
    """Where and when TAR regularizes a video model's temporal attention.

    Args:
        levels: level -> (sigma, strength) (or a `LevelSpec`). Level 0 is the full latent
            resolution, 1 the next (half), and so on. Levels not listed are left alone.
        until_step: regularize the denoising steps 0..until_step (inclusive; 0 is the
            noisiest); None regularizes every step. The paper: 13 of 25 DDIM steps.
        include_input_block: also regularize the temporal attention right after conv_in
            (and I2VGen-XL's image-latent temporal encoder); the reference never does.
        backend: passed to `tar_attention` ("auto", "triton", "cuda" or "reference").
    """

    levels: Mapping[int, Any] = field(hash=False)
    until_step: Optional[int] = 13
    include_input_block: bool = False
    backend: str = "auto"

    def __post_init__(self):
        if not isinstance(self.levels, Mapping):
            raise TypeError(f"levels must be a mapping level -> (sigma, strength), got {type(self.levels).__name__}")
        if not self.levels:
            raise ValueError("levels must name at least one level, e.g. {0: (1.0, 1.0)}")
        levels = {}
        for level, spec in self.levels.items():
            if isinstance(level, bool) or not isinstance(level, int) or level < 0:
                raise ValueError(f"levels keys must be ints >= 0 (0 = full latent resolution), got {level!r}")
            levels[level] = _level_spec(level, spec)
        object.__setattr__(self, "levels", dict(sorted(levels.items())))
        if self.until_step is not None and (
                isinstance(self.until_step, bool) or not isinstance(self.until_step, int) or self.until_step < 0):
            raise ValueError(f"until_step must be an int >= 0 or None (every step), got {self.until_step!r}")
        if not isinstance(self.include_input_block, bool):
            raise TypeError(f"include_input_block must be a bool, got {type(self.include_input_block).__name__}")
        if self.backend not in BACKEND_NAMES:
            raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {self.backend!r}")

    @classmethod
    def from_preset(cls, name: str, **changes) -> "TARConfig":
        """A paper preset (``"64D1"``, ``"64D1_32D8"``, ...); `changes` override other fields."""
        if name not in PRESETS:
            raise ValueError(f"unknown TAR preset {name!r}; known presets: {', '.join(PRESETS)}")
        levels = {level: LevelSpec(sigma, 1.0) for level, sigma in PRESETS[name].items()}
        return cls(levels=levels, **{"until_step": PRESET_UNTIL_STEP, **changes})

    def regularizes(self, step: int) -> bool:
        return self.until_step is None or step <= self.until_step


@dataclass(frozen=True)
class TemporalAttention:
    """A temporal self-attention of a model and the resolution level it runs at."""

    name: str
    module: Attention
    level: int
    input_block: bool


def temporal_attention_modules(model: torch.nn.Module) -> List[TemporalAttention]:
    """The model's self-attention modules over frames, in module order, with their levels."""
    down_blocks = getattr(model, "down_blocks", None)
    last = len(down_blocks) - 1 if isinstance(down_blocks, torch.nn.ModuleList) else 0
    found = []
    for name, module in model.named_modules():
        if not isinstance(module, Attention) or module.is_cross_attention:
            continue
        parts = name.split(".")
        input_block = parts[0] in INPUT_BLOCKS
        if not input_block and TEMPORAL_CONTAINERS.isdisjoint(parts):
            continue
        if parts[0] == "down_blocks":
            level = int(parts[1])
        elif parts[0] == "up_blocks":
            level = last - int(parts[1])
        elif parts[0] == "mid_block":
            level = last
        else:
            level = 0
        found.append(TemporalAttention(name, module, level, input_block))
    return found


@dataclass
class TARSite:
    """TAR's state on one attention module: what to add there, and what to restore."""

    name: str
    module: Attention
    level: int
    spec: LevelSpec
    config: TARConfig
    steps: StepTracker
    previous: Any  # the processor before apply_tar

    def spec_at(self, step: Optional[int]) -> Optional[LevelSpec]:
        """The spec to apply at `step`, or None for plain attention."""
        if step is None or not self.spec.active or not self.config.regularizes(step):
            return None
        return self.spec


def tar_site(attn: Attention) -> Optional[TARSite]:
    """The TAR state of an attention module, or None where TAR is not applied."""
    return vars(attn).get(_SITE_ATTR)


class TARAttnProcessor:
    """Scaled dot-product attention with TAR on the modules and steps `apply_tar` chose.

    On a module without TAR state, or outside the regularized steps, it computes
    exactly what `AttnProcessor2_0` computes (same operations, equal outputs),
    including its softmax scale ``head_dim ** -0.5``. q, k and v reach the
    attention as (B, H, N, D) views of the (B, N, H * D) projections, no copies.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = None
        if hidden_states.ndim == 4:
            image_shape = hidden_states.shape
            hidden_states = hidden_states.flatten(2).transpose(1, 2)

        batch, kv_len = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, kv_len, batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        key = attn.to_k(encoder_hidden_states)
        value = attn.to_v(encoder_hidden_states)

        head_dim = key.shape[-1] // attn.heads
        query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)

        site = tar_site(attn)
        step = None if site is None else site.steps.step
        out = self.attention(attn, query, key, value, attention_mask=attention_mask, step=step)

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def attention(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  attention_mask: Optional[torch.Tensor] = None, step: Optional[int] = None) -> torch.Tensor:
        """The attention of module `attn` at denoising step `step`: (B, H, Nq, D) q/k/v -> (B, H, Nq, Dv).

        TAR with the module's level spec where it is regularized at `step`, else SDPA.
        """
        site = tar_site(attn)
        spec = None if site is None else site.spec_at(step)
        if spec is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)
        if attention_mask is not None:
            raise ValueError(f"{site.name}: TAR takes no attention_mask, but this call passed one")
        return tar_attention(query, key, value, sigma=spec.sigma, strength=spec.strength,
                             backend=site.config.backend)


@dataclass
class _TARState:
    config: TARConfig
    processor: TARAttnProcessor
    steps: StepTracker
    sites: List[TARSite]


def _denoiser(target):
    """(model, pipeline or None) for a pipeline (its .unet or .transformer) or a model."""
    if isinstance(target, torch.nn.Module):
        return target, None
    for attr in ("unet", "transformer"):
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return model, target
    raise TypeError("expected a diffusers pipeline with a .unet or .transformer, or a model (torch.nn.Module); "
                    f"got {type(target).__name__}")


def _install(state: _TARState, temporal: List[TemporalAttention]) -> None:
    """Put TAR on the temporal attentions the config selects that do not have it yet."""
    config = state.config
    for t in temporal:
        spec = config.levels.get(t.level)
        if spec is None or (t.input_block and not config.include_input_block) or tar_site(t.module) is not None:
            continue
        site = TARSite(t.name, t.module, t.level, spec, config, state.steps, t.module.processor)
        setattr(t.module, _SITE_ATTR, site)
        t.module.set_processor(state.processor)
        state.sites.append(site)


def _resync(model: torch.nn.Module) -> None:
    """At a run start: cover temporal attentions created since apply_tar (FreeNoise swaps blocks)."""
    state = vars(model).get(_STATE_ATTR)
    temporal = temporal_attention_modules(model)
    present = {id(t.module) for t in temporal}
    state.sites = [s for s in state.sites if id(s.module) in present]
    _install(state, temporal)


def apply_tar(target, config: TARConfig) -> List[str]:
    """Regularize the temporal attention of a pipeline's denoiser (or of a model) with TAR.

    Args:
        target: a diffusers pipeline (its ``.unet`` or ``.transformer`` is used; its
            scheduler's `set_timesteps` restarts the step count) or the model itself
            (each forward call is one step, counted from 0 now; see `reset_steps`).
        config: a `TARConfig`, e.g. ``TARConfig.from_preset("64D1")``.

    Returns:
        The names of the attention modules TAR now runs on. Applying again replaces the
        previous config; `remove_tar` restores the processors from before the first apply.

    Raises:
        ValueError: the model has no temporal attention, or lacks a level of the config.
    """
    if not isinstance(config, TARConfig):
        raise TypeError(f"config must be a TARConfig, got {type(config).__name__}")
    model, pipeline = _denoiser(target)
    temporal = temporal_attention_modules(model)
    if not temporal:
        raise ValueError(
            f"{type(model).__name__} has no temporal self-attention (modules under "
            f"{', '.join(sorted(TEMPORAL_CONTAINERS | INPUT_BLOCKS))}); TAR supports UNet3DConditionModel, "
            "I2VGenXLUNet, UNetMotionModel, UNetSpatioTemporalConditionModel and LatteTransformer3DModel")
    available = sorted({t.level for t in temporal})
    missing = sorted(set(config.levels) - set(available))
    if missing:
        raise ValueError(f"config levels {missing} do not exist in {type(model).__name__}: its temporal attention "
                         f"runs at levels {available} (0 = full latent resolution)")
    remove_tar(model)
    steps = StepTracker.attach(model, _OWNER, pipeline=pipeline, on_run_start=lambda: _resync(model))
    state = _TARState(config, TARAttnProcessor(), steps, [])
    _install(state, temporal)
    setattr(model, _STATE_ATTR, state)
    steps.reset()  # the next forward call is step 0, also where another feature was counting already
    return [site.name for site in state.sites]


def remove_tar(target) -> None:
    """Restore the processors from before `apply_tar` and remove its hook (no-op without TAR)."""
    model, _ = _denoiser(target)
    state = vars(model).get(_STATE_ATTR)
    if state is None:
        return
    for site in state.sites:
        site.module.set_processor(site.previous)
        delattr(site.module, _SITE_ATTR)
    delattr(model, _STATE_ATTR)
    StepTracker.detach(model, _OWNER)


def reset_steps(target) -> None:
    """Make the next forward call of the model step 0 (needed on a bare model between runs)."""
    model, _ = _denoiser(target)
    tracker = StepTracker.of(model)
    if tracker is None:
        raise ValueError(f"{type(model).__name__} has no step counter: call apply_tar first")
    tracker.reset()
