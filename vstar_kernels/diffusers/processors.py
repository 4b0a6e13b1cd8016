"""TAR on the temporal attention of diffusers' video UNets: the processor and its state (docs/integrations.md).

`install.apply_tar` puts it on; video DiTs have `dit`. The per-module state (`TARSite`: level spec, step tracker,
the processor to restore) lives on the `Attention` module, so the processor itself is stateless and
``TARAttnProcessor()`` re-created by diffusers (as when loading IP adapters) keeps working.
"""

from __future__ import annotations

import inspect
import warnings
from dataclasses import dataclass
from typing import Any, List, Optional, Tuple

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0
from diffusers.models.modeling_utils import ModelMixin

from ..functional import tar_attention
from ..tar_config import LevelSpec, TARConfig
from .dit_families import FAMILIES
from .interception import SDPACalls, Wrapping
from .steps import TAR_OWNER, StepTracker, modules_to, values_answer, warn_step_cache

TEMPORAL_CONTAINERS = frozenset({"temp_attentions", "motion_modules", "temporal_transformer_blocks"})
INPUT_BLOCKS = frozenset({"transformer_in", "image_latents_temporal_encoder"})

# the processors whose attention TARAttnProcessor computes (it takes their place)
STANDS_IN_FOR = (AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0)

_SITE_ATTR = "_vstar_tar_site"


@dataclass(frozen=True)
class TemporalAttention:
    """A temporal self-attention of a model and the resolution level it runs at."""

    name: str
    module: Attention
    level: int
    input_block: bool


def temporal_attention_modules(model: torch.nn.Module) -> List[TemporalAttention]:
    """The model's self-attention modules over frames, in module order, with their levels."""
    where = type(model).__module__  # a UNet's blocks, and the temporal transformers in them (ModelMixin or not)
    if where.startswith("diffusers.models.unets.") and not isinstance(model, ModelMixin) \
            or where == "diffusers.models.transformers.transformer_temporal":
        raise ValueError(f"{type(model).__name__} is a block of a diffusers video UNet: a temporal attention's level "
                         "is read from where it sits in the model (down_blocks.i, mid_block, up_blocks.j), so give the "
                         "video model itself")
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
        elif input_block or parts[0] in TEMPORAL_CONTAINERS:  # Latte's blocks, an input block
            level = 0
        else:
            raise ValueError(f"{name}: a temporal attention's level is read from where it sits in a diffusers video "
                             f"model (down_blocks.i, mid_block, up_blocks.j), and {type(model).__name__} holds it "
                             f"under {parts[0]}: give the video model itself")
        found.append(TemporalAttention(name, module, level, input_block))
    return found


def temporal_at(model: torch.nn.Module, levels, capture: bool = False,
                input_block: Optional[bool] = None) -> List[TemporalAttention]:
    """`temporal_attention_modules`; a ValueError where there is none, or none at one of `levels` (ints or None).
    `capture`: the error is capture_temporal_attention's, which takes the UNets only. `input_block`: TAR's
    include_input_block, where given: levels count an input block's temporal attention only with it, and with it
    the model must have one."""
    temporal = temporal_attention_modules(model)
    if not temporal:
        unets = ("UNet3DConditionModel, I2VGenXLUNet, UNetMotionModel, UNetSpatioTemporalConditionModel and "
                 "LatteTransformer3DModel")
        dits = ", ".join(sorted(cls.__name__ for cls in FAMILIES))
        raise ValueError(
            f"{type(model).__name__} has no temporal self-attention (modules under "
            f"{', '.join(sorted(TEMPORAL_CONTAINERS | INPUT_BLOCKS))}); "
            + (f"capture_temporal_attention takes the video UNets {unets} (capture_frame_attention takes the video "
               f"DiTs {dits})" if capture else f"TAR supports {unets}, and the video DiTs {dits} (docs/dits.md)"))
    inputs = [t for t in temporal if t.input_block]
    if input_block and not inputs:
        raise ValueError(f"include_input_block=True, but {type(model).__name__} has no input block with temporal "
                         f"attention (of {', '.join(sorted(INPUT_BLOCKS))})")
    if input_block and levels is not None and not {t.level for t in inputs} & set(levels):
        raise ValueError(f"include_input_block=True regularizes the input block's temporal attention at level "
                         f"{inputs[0].level}, which levels {sorted(levels)} does not name")
    available = sorted({t.level for t in temporal if input_block is not False or not t.input_block})
    missing = sorted(set(levels or ()) - set(available))
    if missing:
        held = [t.name for t in inputs if t.level in missing]
        hint = "" if input_block is not False or not held else (
            f"; the input block's ({', '.join(held)}) is regularized with include_input_block=True")
        raise ValueError(f"levels {missing} do not exist in {type(model).__name__}: its temporal attention runs at "
                         f"levels {available} (0 = full latent resolution){hint}")
    return temporal


@dataclass
class TARSite:
    """TAR's state on one attention module: what to add there, and what to restore."""

    name: str
    module: Attention
    level: int
    spec: LevelSpec
    config: TARConfig
    steps: StepTracker
    # the processors TAR stands in for, plain and fused (projecting with ``to_qkv``): the one before apply_tar, or
    # one set since (`UNetState.sync`); `_uninstall` gives back the one of the kind of TAR's processor there then
    previous: Any = None
    previous_fused: Any = None

    def spec_at(self, step: Optional[int]) -> Optional[LevelSpec]:
        """The spec to apply at `step`, or None for plain attention."""
        if step is None or not self.spec.active or not self.config.regularizes(step):
            return None
        return self.spec

    def spec_now(self) -> Optional[LevelSpec]:
        """`spec_at` the step of the call in progress (in a checkpointed block: of the call that ran it), as
        `UNetState.sync` fixed it before the call: read here, a step would be a guard of torch.compile, which
        compiled the model again at every step."""
        return self.spec if self.spec.active and self.steps.current(TAR_OWNER) else None


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

    Elsewhere it computes exactly what `AttnProcessor2_0` computes (or, `fused`, `FusedAttnProcessor2_0`, which
    TAR stands in for with a fused instance of its own), softmax scale ``head_dim ** -0.5`` included; q, k and v
    are views, no copies. Fused or not is the instance's, not the module's: diffusers' unfuse_qkv_projections
    puts back the processors it saved, TAR's plain one among them.
    """

    fused = False  # (a subclass that sets no state of its own is plain)

    def __init_subclass__(cls, **kwargs):
        """A subclass's `attention` written for the method's old form, which took the call's `step` where it now
        takes `spec`, is refused where it is defined, not at its first call."""
        super().__init_subclass__(**kwargs)
        params = inspect.signature(cls.attention).parameters
        if "step" in params and "spec" not in params:
            raise TypeError(f"{cls.__qualname__}.attention takes `step`: TARAttnProcessor.attention takes the call's "
                            "level spec as `spec` instead (None where the call is not regularized) since 2026-11-27; "
                            "the step, where wanted: vstar_kernels.diffusers.processors.tar_site(attn).steps.step "
                            "(docs/integrations.md)")

    def __init__(self, fused: bool = False):
        self.fused = fused

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None,
                 temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        residual = hidden_states
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        site = tar_site(attn)
        # project with the fused ``to_qkv`` / ``to_kv`` where the processor TAR stands in for did
        query, key, value = project_heads(attn, hidden_states, encoder_hidden_states, temb, fused=self.fused)
        batch, head_dim = query.shape[0], value.shape[-1]
        if attention_mask is not None:
            attention_mask = attn.prepare_attention_mask(attention_mask, key.shape[2], batch)
            attention_mask = attention_mask.view(batch, attn.heads, -1, attention_mask.shape[-1])

        # under diffusers' layer skip of the scores, the SDPA call its mode answers with the values
        out = self.attention(attn, query, key, value, attention_mask=attention_mask,
                             spec=None if site is None or values_answer(attn, query, value) else site.spec_now())

        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * head_dim).to(query.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if image_shape is not None:
            out = out.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor

    def attention(self, attn: Attention, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, *,
                  attention_mask: Optional[torch.Tensor] = None, spec: Optional[LevelSpec] = None) -> torch.Tensor:
        """(B, H, Nq, D) q/k/v -> (B, H, Nq, Dv): TAR with `spec`, module `attn`'s level spec where the call
        regularizes it (`TARSite.spec_now`), else SDPA."""
        site = tar_site(attn)
        if spec is None or site is None:
            return F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                  is_causal=False)
        if attention_mask is not None:
            raise ValueError(f"{site.name}: TAR takes no attention_mask, but this call passed one")
        where = f"{site.name} (level {site.level})"
        return tar_attention(query, key, value, backend=site.config.backend,
                             **spec.tar_kwargs(query.shape[2], key.shape[2], device=query.device,
                                               dtype=query.dtype, where=where))


class _TARInSDPA(SDPACalls):
    """Inside another processor's call on a regularized module: its scaled_dot_product_attention calls answered by
    `TARAttnProcessor.attention` (TAR where the module is regularized at the step, else SDPA itself)."""

    def __init__(self, attn: Attention, tar: TARAttnProcessor):
        super().__init__()
        self.attn, self.tar = attn, tar

    def answer(self, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
        if dropout_p or is_causal or scale is not None or enable_gqa:
            raise ValueError("TAR in a perturbed-attention guidance processor takes its scaled_dot_product_attention "
                             "calls without dropout, causal mask, scale or grouped heads")
        site = tar_site(self.attn)
        return self.tar.attention(self.attn, query, key, value, attention_mask=attn_mask,
                                  spec=None if site is None or values_answer(self.attn, query, value)
                                  else site.spec_now())


class PAGWithTAR(Wrapping):
    """Perturbed-attention guidance's processor on a regularized temporal attention (set by a PAG pipeline's call,
    which puts the processors it found back at the call's end): it runs as it is, its attention calls (its guided
    branches'; the perturbed branch, the identity, makes none) answered by TAR (`_TARInSDPA`)."""

    def __init__(self, inner, tar: TARAttnProcessor):
        self.inner, self.tar = inner, tar
        self.show(inner)

    def __call__(self, attn: Attention, *args, **kwargs):
        mode = _TARInSDPA(attn, self.tar)
        with mode:
            out = self.inner(attn, *args, **kwargs)
        site = tar_site(attn)
        if not mode.calls and site is not None and site.spec_now() is not None:
            raise RuntimeError(f"{site.name}: {type(self.inner).__name__} computed its attention without "
                               "torch's scaled_dot_product_attention, so TAR could not run there: leave the "
                               "regularized levels' temporal attention out of pag_applied_layers, or run with "
                               "pag_scale=0")
        return out


class UNetState:
    """TAR's state on a UNet-style model: its sites, and the modules on the way to them (FreeNoise swaps blocks)."""

    def __init__(self, model: torch.nn.Module, config: TARConfig, steps: StepTracker,
                 temporal: List[TemporalAttention]):
        self.model, self.config, self.steps = model, config, steps
        self.said_cache = False  # the warning that a cache of diffusers' reuses outputs past until_step was given
        self.regularizing = config.regularizes(steps.step)  # the call in progress does (`sync`)
        self.processor, self.fused_processor = TARAttnProcessor(), TARAttnProcessor(fused=True)
        _layer_skip_takes_tar()
        self.sites: List[TARSite] = []
        try:
            self._install(temporal)
        except BaseException:  # (a warning made an error, after some sites): the model as it was
            self.uninstall()
            raise

    def _install(self, temporal: List[TemporalAttention]) -> None:
        """Put TAR on the temporal attentions the config selects that do not have it yet."""
        config, replaced = self.config, {}
        for t in temporal:
            spec = config.levels.get(t.level)
            if spec is None or (t.input_block and not config.include_input_block):
                continue
            if tar_site(t.module) is not None:
                if tar_site(t.module).steps is not self.steps:
                    raise ValueError(f"{t.name}: TAR is applied to it already, through another model that holds it "
                                     "(or one it holds); call remove_tar on that model first")
                continue
            site = TARSite(t.name, t.module, t.level, spec, config, self.steps)
            setattr(t.module, _SITE_ATTR, site)
            self.sites.append(site)
            if is_pag(t.module.processor):  # applied inside a PAG pipeline's call
                t.module.set_processor(PAGWithTAR(t.module.processor, self.processor))
                continue
            if type(t.module.processor) not in STANDS_IN_FOR and not _stateless(t.module.processor):
                replaced.setdefault(type(t.module.processor).__name__, []).append(t.name)
            self._take(site, t.module.processor)
        self.layout = _layout(self.model, temporal)
        # for diffusers' step caches: the regularized modules by their names now (a split may have wrapped a block)
        self.watched = modules_to(self.model, [t.name for t in temporal if tar_site(t.module) is not None])
        for name, sites in replaced.items():
            kept = ", ".join(c.__name__ for c in STANDS_IN_FOR)
            warnings.warn(f"apply_tar: TAR's processor takes the place of {name} on {len(sites)} regularized temporal "
                          f"attention(s) ({sites[0]}, ...); TAR computes what {kept} compute and does not keep what "
                          f"{name} adds (remove_tar puts it back)", stacklevel=4)

    def restart(self) -> None:
        """The count restarts (a new run, reset_steps, apply_tar): what its next step regularizes, until a call."""
        self.regularizing = self.config.regularizes(self.steps.step)

    def snapshot(self) -> bool:
        """Whether the call in progress regularizes (`sync`), which every site reads (`TARSite.spec_now`)."""
        return self.regularizing

    def sync(self) -> None:
        """Before each forward call: give TAR to temporal attentions swapped in since the last one (a site whose
        module left the model gets its previous processor back), take the place of processors set since, and fix
        whether the call regularizes (`snapshot`)."""
        if not all(tuple(module._modules.values()) == children for module, children in self.layout):
            temporal = temporal_attention_modules(self.model)
            present = {id(t.module) for t in temporal}
            for site in self.sites:
                if id(site.module) not in present:
                    _uninstall(site)
            self.sites = [site for site in self.sites if id(site.module) in present]
            self._install(temporal)
            self.steps.find_checkpointing(self.model)
        for site in self.sites:
            if not isinstance(site.module.processor, (TARAttnProcessor, PAGWithTAR)):
                self._stand_in(site)
        self.regularizing = self.config.regularizes(self.steps.step)
        if not self.said_cache:
            self.said_cache = warn_step_cache(self.watched, self.config.until_step, self.steps.step)

    def _stand_in(self, site: TARSite) -> None:
        """TAR takes the place of the processor set on `site`'s module behind its back, or raises."""
        processor = site.module.processor
        if is_pag(processor):  # a PAG pipeline's call set it: its pag_applied_layers cover this attention
            site.module.set_processor(PAGWithTAR(processor, self.processor))
            return
        if type(processor) not in STANDS_IN_FOR:
            raise RuntimeError(
                f"{site.name}: its attention processor was replaced by {type(processor).__name__} after apply_tar "
                f"(set_attn_processor?); TAR computes the attention of {', '.join(c.__name__ for c in STANDS_IN_FOR)} "
                "only and would drop what this one does. Call apply_tar again to regularize with TAR's processor "
                "in its place, or remove_tar to run it without TAR")
        self._take(site, processor)

    def _take(self, site: TARSite, processor) -> None:
        """TAR's processor in `processor`'s place on `site`'s module: the fused one for a FusedAttnProcessor2_0."""
        if _stateless(processor):  # what it stands for, for remove_tar to give back
            processor = FusedAttnProcessor2_0() if processor.fused else AttnProcessor2_0()
        if isinstance(processor, FusedAttnProcessor2_0):
            site.previous_fused = processor
            site.module.set_processor(self.fused_processor)
        else:
            site.previous = processor
            site.module.set_processor(self.processor)

    def uninstall(self) -> None:
        for site in self.sites:
            _uninstall(site)

    def stood_in_for(self, key: str, processor):
        """What `processor`, saved under `key` (``name.processor``, fuse_qkv_projections's dict), stands in for
        where it is TAR's; any other as it is."""
        if processor is not self.processor and processor is not self.fused_processor:
            return processor
        try:  # the module by the name it has now (a split inference wraps blocks since the sites were named)
            module = self.model.get_submodule(key.removesuffix(".processor"))
        except AttributeError:
            module = None
        site = next((site for site in self.sites if site.module is module), None)
        return _previous(site, processor.fused)


def _layer_skip_takes_tar() -> None:
    """diffusers' layer skip (``apply_layer_skip``, its guiders) looks up what skipping a module's attention returns
    by the class of the module's processor: TAR's processor computes AttnProcessor2_0's attention, and takes its
    entry (else a skip set after apply_tar raised that TARAttnProcessor is not registered)."""
    try:
        from diffusers.hooks._helpers import AttentionProcessorRegistry

        if TARAttnProcessor not in AttentionProcessorRegistry._registry:
            AttentionProcessorRegistry.register(TARAttnProcessor, AttentionProcessorRegistry.get(AttnProcessor2_0))
    except (ImportError, AttributeError, ValueError):  # a diffusers without layer skip, or without that entry
        pass


def is_pag(processor) -> bool:
    """Whether `processor` is one of perturbed-attention guidance's (diffusers' PAG...Processor classes, a class
    of one's own derived from them too, as ``set_pag_applied_layers(pag_attn_processors=...)`` takes)."""
    return any(cls.__name__.startswith("PAG") for cls in type(processor).__mro__)


def _stateless(processor) -> bool:
    """A TAR processor on a module TAR is not on (put back by a PAG pipeline's call from which TAR was removed): it
    computes what the one TAR stands in for computes."""
    return type(processor) is TARAttnProcessor


def _uninstall(site: TARSite) -> None:
    """Give the module the processor TAR stood in for, of the kind (fused or not) of TAR's processor there now (one
    TAR never stood in for, diffusers' `AttnProcessor2_0`); one set behind TAR's back and not yet replaced stays."""
    processor = site.module.processor
    if isinstance(processor, PAGWithTAR):
        site.module.set_processor(processor.inner)  # in a PAG pipeline's call: its processor for the rest of it
    elif isinstance(processor, TARAttnProcessor):
        site.module.set_processor(_previous(site, processor.fused))
    delattr(site.module, _SITE_ATTR)


def _previous(site: Optional[TARSite], fused: bool):
    """The processor TAR stood in for at `site` (fused or not), or diffusers' own of that kind."""
    previous = None if site is None else site.previous_fused if fused else site.previous
    return previous if previous is not None else FusedAttnProcessor2_0() if fused else AttnProcessor2_0()


def _layout(model: torch.nn.Module, temporal: List[TemporalAttention]) -> List[Tuple[torch.nn.Module, tuple]]:
    """(module, its children) for the model and every module on the way down to a temporal attention.

    Swapping a block in or out (FreeNoise) replaces a child of one of these modules; comparing the
    children is a few dozen tuple comparisons, where walking the whole model takes milliseconds.
    """
    parents = [t.name.rpartition(".")[0] for t in temporal]
    return [(module, tuple(module._modules.values())) for module in modules_to(model, parents)]
