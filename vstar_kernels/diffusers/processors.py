"""TAR in diffusers video models: a temporal-attention processor and apply/remove helpers (docs/integrations.md).

Video DiTs go to `dit`. The per-module state (`TARSite`: level spec, step tracker, the processor to restore) lives
on the `Attention` module, so the processor itself is stateless and ``TARAttnProcessor()`` re-created by diffusers
(as when loading IP adapters) keeps working.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from ..functional import tar_attention
from ..tar_config import LevelSpec, TARConfig
from .dit import FAMILIES, apply_dit_tar, dit_family, dit_models, remove_dit_tar, unsupported_dit
from .steps import StepTracker

TEMPORAL_CONTAINERS = frozenset({"temp_attentions", "motion_modules", "temporal_transformer_blocks"})
INPUT_BLOCKS = frozenset({"transformer_in", "image_latents_temporal_encoder"})

# the processors whose attention TARAttnProcessor computes (it takes their place)
STANDS_IN_FOR = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)

_SITE_ATTR = "_vstar_tar_site"
_STATE_ATTR = "_vstar_tar"
_OWNER = "tar"


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
    previous: Any  # the processor TAR stands in for: the one before apply_tar, or one set since (see `_sync`)

    def spec_at(self, step: Optional[int]) -> Optional[LevelSpec]:
        """The spec to apply at `step`, or None for plain attention."""
        if step is None or not self.spec.active or not self.config.regularizes(step):
            return None
        return self.spec


def tar_site(attn: Attention) -> Optional[TARSite]:
    """The TAR state of an attention module, or None where TAR is not applied."""
    return vars(attn).get(_SITE_ATTR)


def project_heads(attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None,
                  temb: Optional[torch.Tensor] = None, fused: bool = False):
    """q, k, v of an `Attention` call as (B, H, N, D) views of its projections: the steps `AttnProcessor2_0`
    takes before the attention (`fused`: `FusedAttnProcessor2_0`'s, from ``to_qkv`` or ``to_q`` and ``to_kv``)."""
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    if hidden_states.ndim == 4:
        hidden_states = hidden_states.flatten(2).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    if fused and encoder_hidden_states is None:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query = attn.to_q(hidden_states)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        if fused:
            key, value = attn.to_kv(encoder_hidden_states).chunk(2, dim=-1)
        else:
            key = attn.to_k(encoder_hidden_states)
            value = attn.to_v(encoder_hidden_states)
    batch, head_dim = hidden_states.shape[0], key.shape[-1] // attn.heads
    query, key, value = (t.view(batch, -1, attn.heads, head_dim).transpose(1, 2) for t in (query, key, value))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value


class TARAttnProcessor:
    """Scaled dot-product attention with TAR on the modules and steps `apply_tar` chose.

    Elsewhere it computes exactly what `AttnProcessor2_0` computes (or `FusedAttnProcessor2_0`, where TAR
    stands in for it), softmax scale ``head_dim ** -0.5`` included; q, k and v are views, no copies.
    """

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        site = tar_site(attn)
        # project with the fused ``to_qkv`` / ``to_kv`` where the processor TAR stands in for did
        query, key, value = project_heads(attn, hidden_states, encoder_hidden_states, temb,
                                          fused=site is not None and isinstance(site.previous, FusedAttnProcessor2_0))
        batch, head_dim = query.shape[0], value.shape[-1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        step = None if site is None else site.steps.step  # in a checkpointed block: the step that ran it
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
        """(B, H, Nq, D) q/k/v -> (B, H, Nq, Dv): TAR where module `attn` is regularized at `step`, else SDPA."""
        site = tar_site(attn)
        spec = None if site is None else site.spec_at(step)
        if spec is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)
        if attention_mask is not None:
            raise ValueError(f"{site.name}: TAR takes no attention_mask, but this call passed one")
        where = f"{site.name} (level {site.level})"
        return tar_attention(query, key, value, backend=site.config.backend,
                             **spec.tar_kwargs(query.shape[2], key.shape[2], device=query.device,
                                               dtype=query.dtype, where=where))


@dataclass
class _TARState:
    config: TARConfig
    processor: TARAttnProcessor
    steps: StepTracker
    sites: List[TARSite] = field(default_factory=list)
    layout: List[Tuple[torch.nn.Module, tuple]] = field(default_factory=list)  # see `_layout`


DENOISERS = ("unet", "transformer", "transformer_2")


def _denoiser(target):
    """(model, pipeline or None) for a pipeline (its first denoiser of `DENOISERS` present) or a model."""
    if isinstance(target, torch.nn.Module):
        return target, None
    for attr in DENOISERS:
        model = getattr(target, attr, None)
        if isinstance(model, torch.nn.Module):
            return model, target
    raise TypeError(f"expected a diffusers pipeline with a denoiser ({', '.join('.' + a for a in DENOISERS)}) "
                    f"or a model (torch.nn.Module); got {type(target).__name__}")


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


def _uninstall(site: TARSite) -> None:
    """Give the module the processor TAR stood in for; one set behind TAR's back and not yet replaced stays."""
    if isinstance(site.module.processor, TARAttnProcessor):
        site.module.set_processor(site.previous)
    delattr(site.module, _SITE_ATTR)


def _layout(model: torch.nn.Module, temporal: List[TemporalAttention]) -> List[Tuple[torch.nn.Module, tuple]]:
    """(module, its children) for the model and every module on the way down to a temporal attention.

    Swapping a block in or out (FreeNoise) replaces a child of one of these modules; comparing the
    children is a few dozen tuple comparisons, where walking the whole model takes milliseconds.
    """
    paths = {""}
    for t in temporal:
        parts = t.name.split(".")
        paths.update(".".join(parts[:i]) for i in range(len(parts)))
    return [(module, tuple(module._modules.values())) for module in map(model.get_submodule, sorted(paths))]


def _sync(model: torch.nn.Module) -> None:
    """Before each forward call: give TAR to temporal attentions swapped in since the last one (a site whose
    module left the model gets its previous processor back), and take the place of processors set since."""
    state = vars(model)[_STATE_ATTR]
    if not all(tuple(module._modules.values()) == children for module, children in state.layout):
        temporal = temporal_attention_modules(model)
        present = {id(t.module) for t in temporal}
        for site in state.sites:
            if id(site.module) not in present:
                _uninstall(site)
        state.sites = [site for site in state.sites if id(site.module) in present]
        _install(state, temporal)
        state.layout = _layout(model, temporal)
        state.steps.find_checkpointing(model)
    for site in state.sites:
        if not isinstance(site.module.processor, TARAttnProcessor):
            _stand_in(state, site)


def _stand_in(state: _TARState, site: TARSite) -> None:
    """TAR takes the place of the processor set on `site`'s module behind its back, or raises."""
    processor = site.module.processor
    if type(processor) not in STANDS_IN_FOR:
        raise RuntimeError(
            f"{site.name}: its attention processor was replaced by {type(processor).__name__} after apply_tar "
            f"(set_attn_processor?); TAR computes the attention of {', '.join(c.__name__ for c in STANDS_IN_FOR)} "
            "only and would drop what this one does. Call apply_tar again to regularize with TAR's processor "
            "in its place, or remove_tar to run it without TAR")
    site.previous = processor
    site.module.set_processor(state.processor)


def apply_tar(target, config: TARConfig) -> List[str]:
    """Regularize the temporal attention of a pipeline's denoiser (or of a model) with TAR.

    `target`: a pipeline (its ``.unet`` or ``.transformer``, and Wan 2.2's ``.transformer_2``) or the model
    (each forward call one step, from 0 now; `reset_steps`). Returns the names of the attention modules TAR
    now runs on; applying again replaces the config. docs/integrations.md has the modules, levels, steps,
    processors set afterwards, gradient checkpointing and the video DiTs (`dit`). A ValueError names a
    level or block the model lacks.
    """
    if not isinstance(config, TARConfig):
        raise TypeError(f"config must be a TARConfig, got {type(config).__name__}")
    model, pipeline = _denoiser(target)
    if dit_family(model) is not None:
        return apply_dit_tar(model, pipeline, config)
    reason = unsupported_dit(model)
    if reason is not None:
        raise ValueError(f"{reason} (docs/dits.md lists the video models of diffusers and why)")
    temporal = temporal_attention_modules(model)
    if not temporal:
        raise ValueError(
            f"{type(model).__name__} has no temporal self-attention (modules under "
            f"{', '.join(sorted(TEMPORAL_CONTAINERS | INPUT_BLOCKS))}); TAR supports UNet3DConditionModel, "
            "I2VGenXLUNet, UNetMotionModel, UNetSpatioTemporalConditionModel and LatteTransformer3DModel, and the "
            f"video DiTs {', '.join(sorted(cls.__name__ for cls in FAMILIES))} (docs/dits.md)")
    available = sorted({t.level for t in temporal})
    if config.blocks is not None:
        raise ValueError(f"blocks= selects transformer blocks of a video DiT; {type(model).__name__} is regularized "
                         f"by resolution level: use levels (its temporal attention runs at levels {available})")
    missing = sorted(set(config.levels) - set(available))
    if missing:
        raise ValueError(f"config levels {missing} do not exist in {type(model).__name__}: its temporal attention "
                         f"runs at levels {available} (0 = full latent resolution)")
    remove_tar(model)
    steps = StepTracker.attach(model, _OWNER, pipeline=pipeline, before_forward=lambda: _sync(model))
    state = _TARState(config, TARAttnProcessor(), steps)
    _install(state, temporal)
    state.layout = _layout(model, temporal)
    setattr(model, _STATE_ATTR, state)
    steps.reset()  # the next forward call is step 0, also where another feature was counting already
    return [site.name for site in state.sites]


def remove_tar(target) -> None:
    """Restore the processors from before `apply_tar` (or those set since) and remove its hooks (no-op without TAR).

    Needed before diffusers' ``set_default_attn_processor()``, which raises while TAR's processors are installed.
    """
    model, pipeline = _denoiser(target)
    if dit_family(model) is not None:
        for _, expert in dit_models(model, pipeline):
            remove_dit_tar(expert)
        return
    state = vars(model).get(_STATE_ATTR)
    if state is None:
        return
    for site in state.sites:
        _uninstall(site)
    delattr(model, _STATE_ATTR)
    StepTracker.detach(model, _OWNER)


def reset_steps(target) -> None:
    """Make the next forward call of the model step 0 (needed on a bare model between runs)."""
    model, pipeline = _denoiser(target)
    experts = dit_models(model, pipeline) if dit_family(model) is not None else [("", model)]
    for _, expert in experts:
        tracker = StepTracker.of(expert)
        if tracker is None:
            raise ValueError(f"{type(expert).__name__} has no step counter: call apply_tar first")
        tracker.reset()
