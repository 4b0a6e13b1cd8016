"""TAR in video diffusion transformers: frame-aware TAR on the full 3-D attention of each block.

Models: WanTransformer3DModel (Wan 2.1 and 2.2), WanVACETransformer3DModel (its control
blocks first, in forward order), CogVideoXTransformer3DModel, HunyuanVideoTransformer3DModel,
LTXVideoTransformer3DModel and MochiTransformer3DModel.
Where TAR goes: the self-attention over all video tokens of every transformer block (Wan's,
LTX's and Mochi's ``attn1``, CogVideoX's ``attn1``, HunyuanVideo's ``attn`` in its dual- and
single-stream blocks), together with the text tokens where that attention is joint (CogVideoX:
text first; HunyuanVideo, Mochi: text after the video); never the cross-attention to the text
(Wan's and LTX's ``attn2``). A token's frame is its latent frame after the patch embedding;
text tokens have frame -1 (`vstar_kernels.frame_ids`): no bias in their rows and columns.

How only the attention call changes. Each selected module gets a `DiTTARProcessor` that
wraps the module's own (stock) processor and calls it unchanged: projections, norms, rotary
embeddings, masks, Mochi's per-sample text selection and the output projection are the stock
code. In a regularized block and step the call runs under a `torch.overrides.TorchFunctionMode`
that answers `torch.nn.functional.scaled_dot_product_attention` with `tar_attention` on the
same q, k, v (and key mask) and passes every other torch call through. Every one of the five
processors ends in that function: CogVideoX's and Mochi's call it directly, Wan's, LTX's and
HunyuanVideo's through diffusers' `dispatch_attention_fn`, whose default ("native") backend
calls it. This was chosen over the alternatives because it needs no copy of diffusers' code
and patches nothing: a custom attention backend would reach only the three processors that
use the dispatcher (and diffusers' backend registry is a closed enum), and replacing module
globals (``F`` or ``dispatch_attention_fn`` in diffusers' modules) is process-wide and not
thread-safe, where a torch function mode is per thread and lives for one call. Outside the
regularized blocks and steps, and for a level that is off (strength 0, sigma inf), the stock
processor runs with no mode at all, so the output is stock's bit for bit. A backend that
does not go through that function (``set_attention_backend("flash")``, ...) is not
intercepted: a regularized call that saw no SDPA call raises a RuntimeError.

Under diffusers' context parallelism (``enable_parallelism`` with a ``ContextParallelConfig``:
Ulysses, ring or both) a regularized call runs the stock processor on this rank's shard of the
tokens with the native backend and no parallel config, for that call only, and
`context_parallel.ContextParallelTAR` answers its SDPA call: its own collectives around one
`tar_attention` call of the rank's queries against every key, with global frame ids, exact
forward and backward whatever backend is set (docs/multi-gpu.md). Every other call is diffusers'
parallel attention, untouched.

Tokens per frame and frames come from the model's config (patch sizes) and each forward
call's input (latent shape; LTX's ``num_frames``/``height``/``width`` arguments), read by a
forward pre-hook; the text length is what the attention call receives. A block that
diffusers' gradient checkpointing recomputes in the backward pass, after the forward call
returned, gets the token layout and the step of the forward call that ran it (`steps`).

A processor set on a regularized module after `apply_tar` (``set_attn_processor``;
CogVideoX's ``fuse_qkv_projections`` sets its fused processor) is wrapped in a new
`DiTTARProcessor` before the model's next forward call, as `apply_tar` would have wrapped it:
one attribute comparison per module and call.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

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

from .. import frame_ids, tar_attention
from ..tar_config import LevelSpec, TARConfig
from .context_parallel import ContextParallelTAR, local_stock_call
from .steps import StepTracker

_STATE_ATTR = "_vstar_tar"
_OWNER = "tar"


def _video_5d(frames_dim: int) -> Callable:
    """Layout reader for models whose `hidden_states` is a 5-D latent with frames at `frames_dim`."""

    def layout(model, arguments) -> Tuple[int, int]:
        latent = arguments["hidden_states"]
        if latent.dim() != 5:
            raise ValueError(f"{type(model).__name__}: expected a 5-D latent video, got shape {tuple(latent.shape)}")
        config = model.config
        if isinstance(config.patch_size, int):
            p_t, p_h, p_w = getattr(config, "patch_size_t", None) or 1, config.patch_size, config.patch_size
        else:
            p_t, p_h, p_w = config.patch_size
        height, width = latent.shape[-2:]
        return latent.shape[frames_dim] // p_t, (height // p_h) * (width // p_w)

    return layout


def _ltx_layout(model, arguments) -> Tuple[int, int]:
    grid = [arguments.get(name) for name in ("num_frames", "height", "width")]
    if any(g is None for g in grid):
        raise ValueError(f"{type(model).__name__}: TAR needs the num_frames, height and width arguments (the token "
                         "grid) of each forward call; calls with video_coords only are not supported")
    frames, height, width = (int(g) for g in grid)
    return frames, height * width


@dataclass(frozen=True)
class DiTFamily:
    """Where a DiT's regularized attentions sit and how its tokens are laid out."""

    blocks: Tuple[str, ...]   # the ModuleLists of transformer blocks, in forward order
    attention: str            # the attribute of the regularized attention in a block
    text: str                 # where that attention's text tokens are: "none", "before", "after"
    layout: Callable[[torch.nn.Module, dict], Tuple[int, int]]  # -> (token frames, tokens per frame)
    batched_guidance: bool    # the family's pipelines batch the guidance branches into one call


FAMILIES: Dict[type, DiTFamily] = {
    WanTransformer3DModel: DiTFamily(("blocks",), "attn1", "none", _video_5d(2), False),
    # Wan VACE: the control blocks run first, over the control video's tokens (the same token grid)
    WanVACETransformer3DModel: DiTFamily(("vace_blocks", "blocks"), "attn1", "none", _video_5d(2), False),
    CogVideoXTransformer3DModel: DiTFamily(("transformer_blocks",), "attn1", "before", _video_5d(1), True),
    HunyuanVideoTransformer3DModel: DiTFamily(("transformer_blocks", "single_transformer_blocks"), "attn",
                                              "after", _video_5d(2), False),
    LTXVideoTransformer3DModel: DiTFamily(("transformer_blocks",), "attn1", "none", _ltx_layout, True),
    MochiTransformer3DModel: DiTFamily(("transformer_blocks",), "attn1", "after", _video_5d(2), True),
}


def dit_family(model: torch.nn.Module) -> Optional[DiTFamily]:
    """The family of a supported video DiT, or None for any other model."""
    for cls in type(model).__mro__:
        if cls in FAMILIES:
            return FAMILIES[cls]
    return None


def dit_attention_modules(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Module]]:
    """(name, module) of the regularizable attention of each transformer block, in forward order."""
    family = dit_family(model)
    found = []
    for container in family.blocks:
        for index, block in enumerate(getattr(model, container, None) or ()):
            found.append((f"{container}.{index}.{family.attention}", getattr(block, family.attention)))
    return found


def _sdpa_arguments(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                    enable_gqa=False):
    return query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa


class _TARAttention(TorchFunctionMode):
    """Answers scaled_dot_product_attention calls with `processor.attention`; passes all else through."""

    def __init__(self, processor: "DiTTARProcessor", attn: torch.nn.Module, spec: LevelSpec,
                 grid: Optional[Tuple[int, int]], parallel: Optional[ContextParallelTAR] = None):
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
        key_mask = key_mask_of(mask, query.shape[0], key.shape[2], where)
        state = self.processor.state
        frames = token_frames(state.family, self.grid, query.shape[2], key.shape[2], where, query.device)
        count = self.grid[0]  # a delta is a (frames, frames) matrix
        kwargs = dict(causal=is_causal, scale=scale, frames=frames, key_mask=key_mask, backend=state.config.backend,
                      **self.spec.tar_kwargs(count, count, device=query.device, dtype=query.dtype, where=where))
        return self.processor.attention(self.attn, query, key, value, **kwargs)

    def _attend(self, scale, where, query, key, value, *, frames):
        """The regularized attention of a context-parallel call, over all keys (`ContextParallelTAR.attention`)."""
        count = self.grid[0]
        kwargs = self.spec.tar_kwargs(count, count, device=query.device, dtype=query.dtype, where=where)
        return self.processor.attention(self.attn, query, key, value, scale=scale, frames=frames,
                                        backend=self.processor.state.config.backend, **kwargs)


def key_mask_of(mask: Optional[torch.Tensor], batch: int, keys: int, where: str) -> Optional[torch.Tensor]:
    """An SDPA mask that only masks keys, as the (B, Nk) bool key mask `tar_attention` takes."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1 \
            or mask.shape[3] != keys or mask.shape[0] not in (1, batch):
        raise ValueError(f"{where}: TAR honours boolean key masks of shape (B, 1, 1, Nk); this processor passed a "
                         f"{mask.dtype} mask of shape {tuple(mask.shape)}")
    return mask.reshape(mask.shape[0], keys).expand(batch, keys)


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


class DiTTARProcessor:
    """The module's own processor, with TAR on its attention call in the regularized steps.

    Delegates every call to `processor` (the stock processor it replaced); see the module
    docstring for how the attention call alone is replaced. `attention` is the one place the
    regularized attention is computed, for subclasses (and tests) that want to look at it.
    """

    def __init__(self, processor: Any, name: str, block: int, state: "_DiTState"):
        self.processor, self.name, self.block, self.state = processor, name, block, state
        # diffusers' attention modules keep only the keyword arguments named in
        # inspect.signature(processor.__call__): this attribute (the same call) gives it the stock one's
        self.__call__ = functools.wraps(processor.__call__)(functools.partial(type(self).__call__, self))

    # diffusers' set_attention_backend / context parallelism set these on the processor
    @property
    def _attention_backend(self):
        return getattr(self.processor, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, backend):
        self.processor._attention_backend = backend

    @property
    def _parallel_config(self):
        return getattr(self.processor, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, config):
        self.processor._parallel_config = config

    def __call__(self, attn: torch.nn.Module, *args, **kwargs):
        grid, step = self.state.call()
        spec = self.state.spec_at(self.block, step)
        if spec is None:
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
    grid: Optional[Tuple[int, int]] = None   # (token frames, tokens per frame) of the call in progress
    _hooks: Tuple = ()

    @property
    def step(self) -> int:
        return loop_step(self.steps, self.pipeline)

    def call(self) -> Tuple[Optional[Tuple[int, int]], int]:
        """(token grid, step) of the forward call in progress; in a gradient-checkpointed block, of the
        forward call that ran it, also when torch recomputes the block in the backward pass."""
        return self.steps.current(_OWNER)

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


def loop_step(steps: StepTracker, pipeline) -> int:
    """The denoising-loop index of a DiT's call in progress (`pipeline`: a weakref, or None).

    In a pipeline whose scheduler keeps a ``step_index`` (the flow-matching and multistep
    schedulers these models ship with), the number of scheduler steps taken in this run:
    the same for the conditional and unconditional calls of one iteration (Wan and
    HunyuanVideo run them as separate calls) and for both experts of Wan 2.2. Otherwise the
    model's forward calls since the run began (`StepTracker`), which is the loop index where
    guidance is batched into one call (CogVideoX's DDIM schedulers) and on a bare model.
    """
    scheduler = getattr(pipeline(), "scheduler", None) if pipeline is not None else None
    if scheduler is None or not hasattr(scheduler, "step_index"):
        return steps.step
    index = scheduler.step_index
    return 0 if index is None else index - (getattr(scheduler, "begin_index", None) or 0)


def token_frames(family: DiTFamily, grid: Optional[Tuple[int, int]], nq: int, nk: int, where: str,
                 device) -> torch.Tensor:
    """Frame ids (N,) of a block's self-attention over nq = nk tokens (text -1), for the call's token grid."""
    if grid is None:
        raise RuntimeError(f"{where}: called outside a forward call of the model, so the frame layout is unknown")
    count, per_frame = grid
    video = count * per_frame
    text = nk - video
    if nq != nk or text < 0 or (text and family.text == "none"):
        raise ValueError(
            f"{where}: expected a self-attention over the {video} video tokens ({count} frames x {per_frame} "
            f"tokens){'' if family.text == 'none' else ' and the text tokens'}, got {nq} queries and {nk} keys")
    before, after = (text, 0) if family.text == "before" else (0, text)
    return _layout_ids(count, per_frame, before, after, torch.device(device))


@functools.lru_cache(maxsize=64)
def _layout_ids(count: int, per_frame: int, before: int, after: int, device: torch.device) -> torch.Tensor:
    """frame_ids of one layout, kept: every block and step of a call passes the same tensor, whose
    values tar_attention then checks once (a device synchronisation per layout, not per call). Made
    outside inference mode (a pipeline runs in it), so that it keeps a version counter."""
    with torch.inference_mode(False):
        return frame_ids(count, per_frame, text_before=before, text_after=after, device=device)


def watch_layout(model: torch.nn.Module, family: DiTFamily, target) -> Tuple:
    """Hooks that keep ``target.grid`` the (token frames, tokens per frame) of the model's call in progress.

    Returns the two hook handles; the grid is None outside a forward call (also after one raised).
    """
    signature = inspect.signature(model.forward)

    def read_layout(module, args, kwargs):
        target.grid = family.layout(module, signature.bind(*args, **kwargs).arguments)

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
    """`apply_tar` for a supported DiT (and a pipeline's other expert): returns the regularized modules' names.

    With Wan 2.2's experts (``transformer`` and ``transformer_2``, or ``transformer_2`` alone) the
    names carry the expert's attribute as a prefix; ``config.blocks`` applies to each.
    """
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
    names = []
    for index, (name, module) in enumerate(modules):
        if index not in blocks:
            continue
        processor = DiTTARProcessor(module.processor, name, index, state)
        state.installed.append((module, processor))
        _set_processor(module, processor)
        names.append(name)
    setattr(model, _STATE_ATTR, state)
    steps.reset()
    return names


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
