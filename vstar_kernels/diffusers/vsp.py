"""Video Synopsis Prompting for diffusers video UNets: one text embedding per frame (docs/vsp-and-dynamics.md).

Batch layout: the spatial blocks see ``B_total * N`` rows of context, batch-major (row ``b * N + f``
is video b, frame f). Guidance runs copies of one latent batch: classifier-free guidance's unconditional copy
first, which keeps its context, then the conditional one, then perturbed-attention guidance's; in each conditional
copy, each of the ``P`` synopses covers ``videos / P`` consecutive videos.
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from collections.abc import Mapping

import torch
from diffusers import UNet3DConditionModel, UNetMotionModel
from diffusers.models.attention_processor import Attention

from .._problem import check_dense, check_values, type_name
from ..vsp import _frame_anchors, interpolate_embeddings
from .capture import SplitInferenceModule
from .install import uncompiled
from .interception import Wrapping
from .processors import is_pag

SUPPORTED_UNETS = (UNet3DConditionModel, UNetMotionModel)

# Spatial cross-attention: <block>.attentions.<i>.transformer_blocks.<j>.attn2, nothing before or after
# (``.module`` after <i> where FreeNoise's split inference wraps the spatial transformer).
SPATIAL_CROSS_ATTENTION = re.compile(
    r"(?:down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\.(?:module\.)?transformer_blocks\.\d+\.attn2"
)

_STATE_ATTR = "_vstar_vsp_state"


def apply_vsp(target, per_frame_embeds: torch.Tensor, *, cfg: bool | None = None) -> None:
    """Feed one text embedding per frame into the spatial cross-attention of a video UNet.

    `target`: a `UNet3DConditionModel` or `UNetMotionModel`, or a pipeline holding one as ``.unet``;
    `per_frame_embeds`: (N, L, C), or (P, N, L, C) for P synopses; `cfg`: classifier-free guidance batched the
    diffusers way (an unconditional copy of the batch first, kept as is). None follows the pipeline's
    ``do_classifier_free_guidance`` at each UNet call where `target` is a pipeline that has it, else is True.
    Perturbed-attention guidance (a conditional copy after the others) is read from the UNet at each call: a PAG
    pipeline's call puts its processors there. Calling it again replaces the embeddings and `cfg`.

    `per_frame_embeds` must hold finite values (a NaN or inf would make the video NaN) on a real device (not
    meta). It is kept as given, an autograd graph it carries included (gradients reach what it was computed
    from, and the graph stays alive until `remove_vsp` or the next `apply_vsp`); `encode_synopsis` gives
    embeddings without one. ``copy.deepcopy`` of the patched model copies such embeddings as ``torch.save``
    saves them: a new leaf tensor of the same values and ``requires_grad``, cut from the graph.
    """
    unet = _unet_of(target)
    if unet.config.get("addition_embed_type") == "text_time":
        raise ValueError(_SDXL)
    embeds = _check_embeds(per_frame_embeds)
    cfg = _guidance(target, cfg)
    modules = [(name, module) for name, module in unet.named_modules()
               if SPATIAL_CROSS_ATTENTION.fullmatch(name) and getattr(module, "is_cross_attention", False)]
    if not modules:
        raise ValueError(f"{type(unet).__name__} has no spatial cross-attention module to feed")
    dims = sorted({module.cross_attention_dim for _, module in modules})  # per block where its config gives a list
    if embeds.shape[-1] not in dims:  # the key projection of every one refuses it
        raise ValueError(f"per_frame_embeds has {embeds.shape[-1]} channels (last dimension), but the UNet's spatial "
                         f"cross-attention takes {' or '.join(map(str, dims))} (its config's cross_attention_dim)")
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        state = _SynopsisState(embeds, cfg)
        for name, module in modules:
            original = _unwrapped(module.processor)
            wrapper = _wrap(original, state)
            state.originals[name] = (module, original, wrapper)
            module.set_processor(wrapper)
        state.hooks = [
            unet.register_forward_pre_hook(state.begin_call, with_kwargs=True),
            unet.register_forward_hook(state.end_call, always_call=True),
        ]
        setattr(unet, _STATE_ATTR, state)
    else:
        state.embeds, state.cfg, state.via = embeds, cfg, None


def remove_vsp(target) -> None:
    """Undo `apply_vsp` (no-op if not applied): each module gets back the processor VSP wrapped last (one set since
    `apply_vsp` is wrapped at the UNet's next call); a processor set since that call stays, with a warning."""
    unet = _unet_of(target)
    state = getattr(unet, _STATE_ATTR, None)
    if state is None:
        return
    for hook in [*state.hooks, *(hook for hooks in state.splits.values() for hook in hooks)]:
        hook.remove()
    kept = []  # warned of once all is undone: a warning raised as an error leaves no half-removed state
    for name, (module, original, wrapper) in state.originals.items():
        if module.processor is wrapper:
            module.set_processor(original)
        else:
            kept.append(name)
    state.removed = True  # a wrapper diffusers put back regardless (a stale copy) runs what it wraps
    saved = getattr(unet, "original_attn_processors", None)  # fuse_qkv_projections's, which unfuse puts back
    if isinstance(saved, dict):
        for name, processor in saved.items():
            saved[name] = _unwrapped(processor)
    delattr(unet, _STATE_ATTR)
    if kept:
        warnings.warn(f"remove_vsp: the processor of {', '.join(kept)} was replaced after apply_vsp; leaving it",
                      stacklevel=2)


def encode_synopsis(pipe, sub_prompts, num_frames: int, *, mode: str = "linear", anchors=None,
                    clip_skip=None, lora_scale=None) -> torch.Tensor:
    """Encode sub-prompts with the pipeline's own ``encode_prompt``, then interpolate (`interpolate_embeddings`).

    `sub_prompts`: a list of K strings (one synopsis) or a list of P such lists (one per video).
    Returns (N, L, C) or (P, N, L, C) on the pipeline's execution device, without an autograd graph: the
    encoding runs under ``torch.no_grad()``, as a pipeline's call encodes its prompt. Each sub-prompt is encoded
    on its own, as the pipeline encodes a prompt, so identical sub-prompts give its own embedding bit for bit.
    `pipe` must be the pipeline (its ``encode_prompt``), not its UNet; `num_frames`, `mode` and `anchors` are checked
    before any encoding.
    """
    _pipeline_unet(pipe, "encode_synopsis")
    if "prompt_2" in inspect.signature(pipe.encode_prompt).parameters:  # a second text encoder's prompt
        raise ValueError(f"VSP encodes each sub-prompt with a pipeline's one text encoder; {type(pipe).__name__}'s "
                         "encode_prompt takes a second prompt for a second encoder (prompt_2, as SDXL's does)")
    synopses, batched = _check_sub_prompts(sub_prompts)
    plans = []  # before encoding
    for synopsis in synopses:
        plans.append(_frame_anchors(num_frames, len(synopsis), mode, anchors, "the synopsis has {k} sub-prompts")[1])
        anchors = anchors if anchors is None else plans[-1]  # read once (a generator), checked for each synopsis
    device = pipe._execution_device
    out = []
    with torch.no_grad():  # inference, as the pipeline's own prompt encoding in its __call__
        for synopsis, plan in zip(synopses, plans):
            states = [pipe.encode_prompt(text, device, 1, False, clip_skip=clip_skip, lora_scale=lora_scale)[0]
                      for text in synopsis]
            out.append(interpolate_embeddings(torch.cat(states), num_frames, mode=mode, anchors=plan))
    return torch.stack(out) if batched else out[0]


def generate_with_synopsis(pipe, sub_prompts, *, num_frames: int = 16, mode: str = "linear", anchors=None,
                           **pipe_kwargs):
    """Run a video pipeline with one interpolated text embedding per frame: `encode_synopsis`, then VSP for
    this call only (guidance as the pipeline's flags say at each UNet call, or from ``guidance_scale`` for a
    pipeline without them); `pipe_kwargs` go to the pipeline, but for the prompt. `pipe` (the pipeline, not its
    UNet), `num_frames`, `mode`, `anchors`, ``guidance_scale`` (a real number) and ``cross_attention_kwargs`` (a dict
    or None) are checked before any encoding."""
    unet = _pipeline_unet(pipe, "generate_with_synopsis")
    for name in ("prompt", "prompt_embeds"):
        if name in pipe_kwargs:
            raise TypeError(f"generate_with_synopsis got {name}=...: the sub_prompts replace the prompt")
    if getattr(unet, _STATE_ATTR, None) is not None:
        raise ValueError("VSP is already applied to this pipeline; call remove_vsp(pipe) first")
    # FreeNoise encodes a prompt of its own (one string) where the pipeline's call encodes with it (AnimateDiff's;
    # not its PAG pipeline, which encodes the plain way under FreeNoise too)
    free_noise = getattr(pipe, "free_noise_enabled", False) and _encodes_free_noise(pipe)
    if free_noise and _check_sub_prompts(sub_prompts)[1]:  # before any encoding
        raise ValueError("FreeNoise takes one prompt a call: give one synopsis (a list of strings)")
    params = inspect.signature(pipe.__call__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "num_frames" not in params and not takes_any:  # a video-to-video pipeline takes its frame count from its video
        raise TypeError(f"generate_with_synopsis runs text-to-video pipelines, which take num_frames; "
                        f"{type(pipe).__name__} does not: call encode_synopsis and apply_vsp, then the pipeline")
    default = params["guidance_scale"].default if "guidance_scale" in params else inspect.Parameter.empty
    guidance_scale = pipe_kwargs.get("guidance_scale", default)
    if guidance_scale is inspect.Parameter.empty:
        raise TypeError(f"generate_with_synopsis needs guidance_scale= for {type(pipe).__name__}, whose __call__ "
                        "gives no default (it says whether VSP's embeddings are batched for classifier-free guidance)")
    try:  # as the pipeline compares it (a number, a numpy or a one-element torch scalar)
        guided = bool(guidance_scale > 1)
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"guidance_scale must be a real number, got {guidance_scale!r} "
                        f"({type_name(guidance_scale)})") from None
    attention_kwargs = pipe_kwargs.get("cross_attention_kwargs")
    if attention_kwargs is not None and not isinstance(attention_kwargs, Mapping):
        raise TypeError(f"cross_attention_kwargs must be a dict or None, got {type_name(attention_kwargs)}")
    attention_kwargs = attention_kwargs or {}
    embeds = encode_synopsis(pipe, sub_prompts, num_frames, mode=mode, anchors=anchors,
                             clip_skip=pipe_kwargs.get("clip_skip"), lora_scale=attention_kwargs.get("scale"))
    # The conditional context the pipeline builds is replaced frame by frame; it only has
    # to have the right shape, and the first frame's embedding is what frame 0 gets anyway.
    prompt = {"prompt": ""} if free_noise else {"prompt_embeds": embeds[:, 0] if embeds.dim() == 4 else embeds[:1]}
    if embeds.dim() == 4 and isinstance(pipe_kwargs.get("negative_prompt"), str):
        # one negative for every synopsis (the pipeline, given embeddings, encodes a string as one sequence)
        pipe_kwargs = {**pipe_kwargs, "negative_prompt": [pipe_kwargs["negative_prompt"]] * embeds.shape[0]}
    # the pipeline's own flag at each UNet call where it has one: a step-end callback may turn guidance off
    follows = isinstance(getattr(type(pipe), "do_classifier_free_guidance", None), property)
    apply_vsp(pipe, embeds, cfg=None if follows else guided)
    state = getattr(unet, _STATE_ATTR)
    state.via = "generate_with_synopsis" if follows else f"generate_with_synopsis's guidance_scale={guidance_scale}"
    if follows:  # the flag read is this call's: several videos of one latent without guidance are not a stale flag
        state.cfg.live = True
    before = {name: module.processor for name, module in unet.named_modules() if isinstance(module, Attention)}
    try:
        return pipe(num_frames=num_frames, **prompt, **pipe_kwargs)
    except BaseException:
        # a PAG pipeline's call raising (VSP's own errors among them) skips its restore: put back the processors
        # it had set for the call, as the call's end would
        for name, module in unet.named_modules():
            if name in before and is_pag(module.processor) and not is_pag(before[name]):
                module.set_processor(before[name])
        raise
    finally:
        remove_vsp(pipe)


class _SynopsisState:
    """Embeddings, the current UNet call's shape, and the per-call context cache."""

    def __init__(self, embeds: torch.Tensor, cfg):
        self.embeds = embeds  # (P, N, L, C)
        self.cfg = cfg        # a bool, or a pipeline's flag read at each UNet call (`_guidance`)
        self.copies = 1       # of one latent batch in the current UNet call
        self.unconditional = False  # whether its first copy is classifier-free guidance's unconditional one
        self.originals = {}   # name -> (module, original processor, wrapper)
        self.hooks = []
        self.removed = False  # by remove_vsp
        self.via = None       # what set cfg where apply_vsp's caller did not: generate_with_synopsis's guidance
        self.batch = None     # videos in the current UNet call (every copy)
        self.splits = {}      # FreeNoise's split module above a spatial transformer -> its two hook handles
        self.presplit = []    # per split call in progress: whether it replaced the context for its slices
        self._source = None
        self._context = None

    def __deepcopy__(self, memo):
        """A copy whose tensors carrying an autograd graph (embeddings `apply_vsp` was given so) are new leaves
        of their values and ``requires_grad``, as ``torch.save`` writes them: torch deep-copies graph leaves
        only."""
        for value in vars(self).values():
            if isinstance(value, torch.Tensor) and value.grad_fn is not None and id(value) not in memo:
                memo[id(value)] = value.detach().clone().requires_grad_(value.requires_grad)
        copied = type(self).__new__(type(self))
        memo[id(self)] = copied  # the wrappers the state holds refer back to it
        copied.__dict__.update(copy.deepcopy(vars(self), memo))
        return copied

    def begin_call(self, module, args, kwargs):
        sample = args[0] if args else kwargs.get("sample")
        if not isinstance(sample, torch.Tensor) or sample.dim() != 5:
            raise ValueError("VSP expects the UNet's sample as a (batch, channels, frames, height, width) tensor")
        batch, frames = sample.shape[0], sample.shape[2]
        prompts, n = self.embeds.shape[:2]
        if frames != n:
            raise ValueError(f"the per-frame embeddings cover {n} frames but the UNet is called with {frames}")
        cfg = self.cfg() if callable(self.cfg) else self.cfg
        # where a PAG pipeline's call puts its processors: the self-attention modules the UNet has now (FreeNoise,
        # enabled since apply_vsp, replaces the motion modules' blocks and their attention)
        pag = any(_perturbs(m.processor) for m in module.modules()
                  if isinstance(m, Attention) and not m.is_cross_attention)
        copies = 1 + cfg + pag
        # guidance runs one latent batch in copies; a call without it would give the first copy's videos the shared
        # prompt, as if unconditional, or the wrong synopses (a host sync; not while compiling)
        checks = not torch.compiler.is_compiling()
        if copies > 1 and (batch % copies or (checks and not _copies_of_one(sample, copies))):
            raise ValueError(_copies(cfg, pag, batch, getattr(self.cfg, "flag", None), self.via))
        if checks and callable(self.cfg) and not self.cfg.live and not cfg and _copies_of_one(sample, copies + 1):
            # a flag followed says no guidance, but the batch is laid out as guidance lays it: a stale flag (the
            # UNet called outside that pipeline's call, by another sharing it) would feed the unconditional copy
            raise ValueError(f"apply_vsp(cfg=None) follows {self.cfg.flag}, which says no classifier-free "
                             f"guidance, but the UNet's sample is one latent batch {copies + 1} times, as "
                             f"guidance runs it: give apply_vsp's cfg (True or False) for this UNet's calls")
        if batch // copies % prompts:
            each = batch // copies
            raise ValueError(f"the UNet batch has {each} video{'s' * (each != 1)} in each guidance copy, which the "
                             f"{prompts} synopses of per_frame_embeds do not divide evenly")
        self.batch, self.copies, self.unconditional = batch, copies, cfg
        self._source = self._context = None
        self.presplit.clear()
        self.rewrap()
        self.follow_splits(module)

    def follow_splits(self, unet) -> None:
        """FreeNoise's split inference runs each spatial transformer on slices of its rows: the context is replaced
        whole above the split, which slices it with the hidden states, and the slices pass the processors as they
        are."""
        for block in (*unet.down_blocks, unet.mid_block, *unet.up_blocks):
            for split in getattr(block, "attentions", None) or ():
                if isinstance(split, SplitInferenceModule) and split not in self.splits:
                    self.splits[split] = (split.register_forward_pre_hook(self.split_call, with_kwargs=True),
                                          split.register_forward_hook(self.split_done, always_call=True))

    def split_call(self, split, args, kwargs):
        context = kwargs.get("encoder_hidden_states")
        replace = not self.removed and isinstance(context, torch.Tensor)
        if replace and (split.split_dim != 0 or "encoder_hidden_states" not in split.input_kwargs_to_split):
            raise ValueError("VSP takes a split inference of the spatial transformers that slices their rows "
                             "(dimension 0) with the text context, as FreeNoise's does")
        self.presplit.append(replace)
        if replace:
            return args, {**kwargs, "encoder_hidden_states": self.context(context)}
        return None

    def split_done(self, split, args, output):
        if self.presplit:
            self.presplit.pop()

    def rewrap(self) -> None:
        """Wrap again each module whose processor was replaced since (`fuse_qkv_projections`, `set_attn_processor`,
        an IP-Adapter's load set new ones on every module): VSP follows the processor the module has now, as TAR
        does, and `remove_vsp` gives that one back. A processor of this state's (`unfuse_qkv_projections` puts
        back the ones it saved, wrappers among them) is taken as it is."""
        for name, (module, original, wrapper) in self.originals.items():
            found = _unwrapped(module.processor)
            if found is wrapper:
                continue
            if isinstance(found, _SynopsisProcessor) and found.state is self:
                self.originals[name] = (module, found.inner, found)
            else:
                wrapper = _wrap(found, self)
                self.originals[name] = (module, found, wrapper)
                module.set_processor(wrapper)

    def end_call(self, module, args, output):
        self.batch = None
        self._source = self._context = None
        self.presplit.clear()

    def context(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """The (batch * N, L, C) per-frame context replacing `encoder_hidden_states`."""
        if self.batch is None:
            raise RuntimeError("a VSP processor ran outside a forward call of the UNet it was applied to (as in a "
                               "block gradient checkpointing recomputes in the backward pass: VSP runs without it)")
        if encoder_hidden_states is self._source:
            return self._context
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.dim() != 3:
            raise ValueError("VSP expects the cross-attention context as a (rows, tokens, channels) tensor")
        prompts, n, tokens, channels = self.embeds.shape
        rows = encoder_hidden_states.shape[0]
        if tuple(encoder_hidden_states.shape[1:]) != (tokens, channels):
            raise ValueError(f"the per-frame embeddings have (tokens, channels) {(tokens, channels)} but the UNet's "
                             f"text context has {tuple(encoder_hidden_states.shape[1:])}")
        if rows == self.batch * n:      # repeated over frames (UNet3D inside, AnimateDiff's pipeline)
            per_video = encoder_hidden_states.view(self.batch, n, tokens, channels)
        elif rows == self.batch:        # one row per video
            per_video = encoder_hidden_states[:, None].expand(self.batch, n, tokens, channels)
        else:
            raise ValueError(f"the text context has {rows} rows, neither batch ({self.batch}) nor "
                             f"batch x frames ({self.batch * n})")
        videos = self.batch // self.copies
        cond = self.embeds.to(device=encoder_hidden_states.device, dtype=encoder_hidden_states.dtype)
        cond = cond.repeat_interleave(videos // prompts, dim=0).repeat(self.copies - self.unconditional, 1, 1, 1)
        if self.unconditional:
            cond = torch.cat([per_video[:videos], cond])
        self._source = encoder_hidden_states
        self._context = cond.reshape(self.batch * n, tokens, channels)
        return self._context


class _SynopsisProcessor(Wrapping):
    """Calls the wrapped processor with the per-frame context in place of the shared one."""

    def __init__(self, inner, state: _SynopsisState):
        self.inner = inner
        self.state = state
        self.show(inner)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kwargs):
        if self.state.removed or (self.state.presplit and self.state.presplit[-1]):
            pass  # removed, or the context was replaced above FreeNoise's split of this block (a slice of it here)
        elif isinstance(encoder_hidden_states, tuple):  # (text, image prompts) with IP-Adapter
            encoder_hidden_states = (self.state.context(encoder_hidden_states[0]),) + encoder_hidden_states[1:]
        else:
            encoder_hidden_states = self.state.context(encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states=encoder_hidden_states, **kwargs)


class _SynopsisModule(_SynopsisProcessor, torch.nn.Module):
    """The wrapper of a processor that is a module (an IP-Adapter's): it holds that one's parameters, buffers and
    submodules under their names, so the model's ``to``, ``state_dict`` and ``parameters`` reach them as before."""

    def __init__(self, inner, state: _SynopsisState):
        torch.nn.Module.__init__(self)
        for name in ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules"):
            self.__dict__[name] = inner.__dict__[name]
        self.__dict__.update(inner=inner, state=state)  # not a submodule: its own ones are this one's
        self.training = inner.training
        self.show(inner)

    def train(self, mode: bool = True):
        """The model's ``train()`` and ``eval()`` reach the wrapped processor's own flag too (its call may read it),
        as they did before it was wrapped."""
        self.inner.train(mode)
        self.training = mode
        return self


def _wrap(processor, state: _SynopsisState) -> _SynopsisProcessor:
    return (_SynopsisModule if isinstance(processor, torch.nn.Module) else _SynopsisProcessor)(processor, state)


def _unwrapped(processor):
    """`processor` without the wrappers of VSP states since removed."""
    while isinstance(processor, _SynopsisProcessor) and processor.state.removed:
        processor = processor.inner
    return processor


def _guidance(target, cfg):
    """`cfg` checked, or for None the pipeline's ``do_classifier_free_guidance`` read at each UNet call (a
    pipeline with it), else True."""
    if cfg is not None:
        if not isinstance(cfg, bool):
            raise TypeError(f"cfg must be a bool or None, got {type_name(cfg)}")
        return cfg
    flag = "do_classifier_free_guidance"
    if not hasattr(target, "unet") or not isinstance(getattr(type(target), flag, None), property):
        return True

    def read() -> bool:
        try:
            return bool(getattr(target, flag))
        except AttributeError as error:  # the pipeline sets what the property reads in its call
            raise RuntimeError(f"apply_vsp(cfg=None) follows {type(target).__name__}.{flag}, which could not be "
                               f"read ({error}): the UNet was called outside that pipeline's call (directly, or by "
                               f"another pipeline sharing it); give cfg") from error
    read.flag = f"{type(target).__name__}.{flag}"
    read.live = False  # generate_with_synopsis's: the flag of the pipeline call in progress, never another's
    return read


def _perturbs(processor) -> bool:
    """Whether `processor`, or one it wraps, is perturbed-attention guidance's."""
    while processor is not None:
        if is_pag(processor):
            return True
        processor = getattr(processor, "inner", None) if isinstance(processor, Wrapping) else None
    return False


def _copies_of_one(sample: torch.Tensor, copies: int) -> bool:
    """Whether `sample` is one latent batch `copies` times over, bit for bit."""
    videos, left = divmod(sample.shape[0], copies)
    return not left and all(_same_bits(sample[:videos], sample[i * videos:(i + 1) * videos])
                            for i in range(1, copies))


def _copies(cfg: bool, pag: bool, batch: int, flag=None, via=None) -> str:
    """The error for a UNet batch that is not one latent batch in the copies `cfg` and `pag` say (`flag`: the
    pipeline's flag cfg followed, if it did; `via`: what chose cfg, where apply_vsp's caller did not)."""
    said = f"{via or 'apply_vsp(cfg=None)'} follows {flag}, which says classifier-free guidance" if flag else \
        f"{via} says classifier-free guidance" if via else "cfg=True"
    said = {(True, False): f"{said}, but the UNet's sample is not one latent batch twice, as classifier-free "
                           "guidance runs it (unconditional copy first)",
            (False, True): "perturbed-attention guidance's processors are on the UNet, but its sample is not one "
                           "latent batch twice, as that guidance runs it (conditional copy, then perturbed)",
            (True, True): f"{said} and perturbed-attention guidance's processors are on the UNet, but its sample "
                          "is not one latent batch three times, as the two guidances run it (unconditional, "
                          "conditional, perturbed)"}[cfg, pag]
    hint = ("the UNet ran otherwise than the pipeline's guidance batches it (a pipeline batching its own way, a "
            "call from a callback): call encode_synopsis, apply_vsp with its cfg (True or False) and the pipeline "
            "instead" if via else
            "the flag is not that of the call running the UNet (another pipeline sharing it, or a call outside the "
            "pipeline's), or the pipeline does not batch guidance as diffusers' do: give apply_vsp's cfg (True or "
            "False) for this UNet's calls" if flag else
            "for a run without classifier-free guidance (guidance_scale 1), give apply_vsp(..., cfg=False)")
    return f"{said}; it has {batch} video{'s' * (batch != 1)}. {hint[0].upper()}{hint[1:]}"


def _encodes_free_noise(pipe) -> bool:
    """Whether `pipe`'s call may encode its prompt with FreeNoise's own encoder, where FreeNoise is on: a ``__call__``
    of its class or of one it derives from names it (a subclass's call may run its base's through super(), or be
    wrapped by a decorator that does not say what it wraps); a call of no code to read is taken to."""
    for cls in type(pipe).__mro__:
        call = cls.__dict__.get("__call__")
        if call is None:
            continue
        code = getattr(inspect.unwrap(getattr(call, "func", call)), "__code__", None)
        if code is None or "_encode_prompt_free_noise" in code.co_names:
            return True
    return False


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether `a` and `b` hold the same values bit for bit: a NaN (a run gone wrong) equals its copy."""
    bits = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.view(bits), b.view(bits))


def _pipeline_unet(pipe, caller: str):
    """The UNet of `pipe`, checked to be a pipeline that encodes its prompts (``encode_prompt``)."""
    unet = _unet_of(pipe, "pipe")  # a video DiT's pipeline encodes its prompts otherwise; VSP takes UNets only
    if not hasattr(pipe, "unet") or not callable(getattr(pipe, "encode_prompt", None)):
        given = "a model, not a pipeline: give the pipeline holding it" if not hasattr(pipe, "unet") \
            else "it has no encode_prompt"
        raise TypeError(f"pipe must be the pipeline holding the UNet as .unet ({caller} encodes the sub-prompts "
                        f"with its encode_prompt), got {type(pipe).__name__}: {given}")
    return unet


def _unet_of(target, argument: str = "target"):
    unet = uncompiled(getattr(target, "unet", target))
    if not isinstance(unet, SUPPORTED_UNETS):
        held = f"{type(target).__name__} holding a {type(unet).__name__} as .unet" if hasattr(target, "unet") \
            else type(target).__name__ if unet is target else f"a torch.compile'd {type(unet).__name__}"
        raise TypeError(f"{argument} must be a UNet3DConditionModel, a UNetMotionModel or a pipeline holding one as "
                        f".unet (torch.compile'd or not), got {held}")
    return unet


_SDXL = ("VSP does not take SDXL's video UNet (AnimateDiff SDXL): its pooled text embedding, added to the time "
         "embedding, would stay the shared prompt's on every frame")


def _check_embeds(embeds) -> torch.Tensor:
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"per_frame_embeds must be a torch.Tensor, got {type(embeds).__name__}")
    check_dense("per_frame_embeds", embeds)
    if not embeds.is_floating_point():
        raise TypeError(f"per_frame_embeds must be floating point, got {embeds.dtype}")
    if embeds.dim() not in (3, 4) or 0 in embeds.shape:
        raise ValueError(f"per_frame_embeds must be a non-empty (N, L, C) or (P, N, L, C) tensor, "
                         f"got shape {tuple(embeds.shape)}")
    check_values("per_frame_embeds", embeds, "apply_vsp (to check them) and the UNet's calls")
    if not torch.isfinite(embeds).all():
        raise ValueError("per_frame_embeds has non-finite entries (NaN or inf): the video would come out NaN")
    return embeds if embeds.dim() == 4 else embeds.unsqueeze(0)


def _check_sub_prompts(sub_prompts):
    """The synopses as lists of strings, and whether a list of synopses was given."""
    batched = isinstance(sub_prompts, (list, tuple)) and len(sub_prompts) > 0 and not isinstance(sub_prompts[0], str)
    synopses = list(sub_prompts) if batched else [sub_prompts]
    for synopsis in synopses:
        if (isinstance(synopsis, str) or not isinstance(synopsis, (list, tuple)) or not synopsis
                or not all(isinstance(text, str) for text in synopsis)):
            raise TypeError("sub_prompts must be a non-empty list of strings (one synopsis) or a list of such "
                            f"lists (one per video), got {sub_prompts!r}")
    return [list(synopsis) for synopsis in synopses], batched
