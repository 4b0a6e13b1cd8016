"""Record the temporal attention maps of a diffusers video model (VSTAR paper, Fig. 3 and S.10).

Forward hooks on the temporal self-attention modules TAR targets recompute each call's post-softmax attention
from the module's own inputs and weights, in chunks of sequences of at most `CHUNK_ELEMENTS` scores (or one
sequence), and add it to a float64 N x N sum per (layer, step) (docs/attention-analysis.md).
"""

from __future__ import annotations

import contextlib
import functools
import numbers
from collections.abc import Mapping
from typing import Dict, Iterator, List, Optional, Tuple

import torch

try:
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule
except ImportError:  # a diffusers without FreeNoise's split inference: nothing is one
    SplitInferenceModule = ()

from .._deprecation import renamed
from .._problem import check_int, int_set, make_problem, type_name
from ..reference import tar_scores, without_autocast
from ..regularization import gaussian_bias
from .install import denoiser
from .processors import is_pag, project_heads, tar_site, temporal_at
from .steps import ATTENTION_REUSE, StepTracker, attention_skipped, diffusers_hook

# fp32 probabilities of one chunk (sequences x heads x N x N here, batch x heads x rows x Nk in dit_capture): 64 MiB
CHUNK_ELEMENTS = 1 << 24


class TemporalAttentionMaps(Mapping):
    """``maps[(layer, step)]``: the mean temporal attention of one layer at one step, (N, N) float64 on the CPU.

    Row i is how frame i attends to the frames, averaged over heads and every sequence of the calls; rows sum
    to 1. Under FreeNoise, N is the context length and row i the i-th frame of every window of the step (the mean
    over the windows). Keys are in recording order.
    """

    def __init__(self, levels: Dict[str, int]):
        self.levels: Dict[str, int] = dict(levels)  # layer -> resolution level, every watched layer
        self._sums: Dict[Tuple[str, int], list] = {}  # (layer, step) -> [float64 sum, rows]

    def __getitem__(self, key) -> torch.Tensor:
        total, rows = self._sums[key]
        return (total / rows).cpu()

    def __iter__(self) -> Iterator[Tuple[str, int]]:
        return iter(list(self._sums))

    def __len__(self) -> int:
        return len(self._sums)

    def steps(self) -> List[int]:
        """The steps with at least one map, ascending."""
        return sorted({step for _, step in self._sums})

    def by_level(self, step: int) -> Dict[int, Dict[str, torch.Tensor]]:
        """``{level: {layer: map}}`` at `step`, levels ascending: the input `plot_attention_maps` takes."""
        found: Dict[int, Dict[str, torch.Tensor]] = {}
        for layer, level in self.levels.items():
            if (layer, step) in self._sums:
                found.setdefault(level, {})[layer] = self[(layer, step)]
        if not found:
            raise KeyError(f"no map recorded at step {step}; recorded steps: {self.steps()}")
        return dict(sorted(found.items()))

    def _add(self, key: Tuple[str, int], total: torch.Tensor, rows: int) -> None:
        entry = self._sums.get(key)
        if entry is None:
            self._sums[key] = [total, rows]
            return
        if entry[0].shape != total.shape:
            raise ValueError(f"{key[0]} attended over {tuple(total.shape)} frames at step {key[1]} after "
                             f"{tuple(entry[0].shape)} in the same step: one map per (layer, step) needs one size")
        entry[0] += total
        entry[1] += rows


@contextlib.contextmanager
def capture_temporal_attention(target, *, steps=None, levels=None, layers=None, cfg: Optional[bool] = None,
                               chunk_elements: int = CHUNK_ELEMENTS, chunk_size: Optional[int] = None):
    """Record the temporal attention maps of the runs inside the ``with`` block (docs/attention-analysis.md).

    ``with capture_temporal_attention(pipe, steps=[0, 10]) as maps: pipe(...)``, then ``maps[(layer, step)]``
    is an (N, N) map (`TemporalAttentionMaps`), with TAR where it regularizes. `steps`, `levels` and `layers`
    narrow what is recorded; `cfg` says whether guidance is batched (None: the pipeline's
    ``do_classifier_free_guidance``, False for a bare model); `chunk_elements` bounds the scores formed at
    once (fp32) and does not change the map; `chunk_size` is its deprecated spelling in sequences. Modules
    swapped in during the capture (FreeNoise) are watched from the model's next call on.
    """
    model, pipeline = denoiser(target)
    steps = int_set("steps", steps)
    levels = int_set("levels", levels)
    temporal = temporal_at(model, levels, capture=True)
    if layers is not None:
        if isinstance(layers, str) or not hasattr(layers, "__iter__"):
            raise TypeError(f"layers must be a collection of module names, got {type(layers).__name__}")
        layers = set(layers)
        unknown = sorted(layers - {t.name for t in temporal})
        if unknown:
            raise ValueError(f"layers {unknown} are not temporal attention modules of {type(model).__name__}; "
                             f"they are: {', '.join(t.name for t in temporal)}")
    if cfg is not None and not isinstance(cfg, bool):
        raise TypeError(f"cfg must be a bool or None, got {type_name(cfg)}")
    if cfg is None and pipeline is not None and not hasattr(type(pipeline), "do_classifier_free_guidance"):
        raise ValueError(f"{type(pipeline).__name__} does not say whether guidance is batched: pass cfg=True "
                         "(guidance_scale > 1) or cfg=False")
    if chunk_size is not None:
        chunk_size = renamed("capture_temporal_attention", "chunk_size (sequences)", "chunk_elements (scores)",
                             chunk_size)
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
        chunk_size = int(chunk_size)
    chunk_elements = int(check_int("chunk_elements", chunk_elements))
    selected = [t for t in temporal
                if (levels is None or t.level in levels) and (layers is None or t.name in layers)]
    if not selected:
        raise ValueError("no temporal attention module is both at the levels and among the layers asked for")

    maps = TemporalAttentionMaps({t.name: t.level for t in selected})
    recorder = _Recorder(model, pipeline, maps, steps, cfg, chunk_size, chunk_elements)
    recorder.tracker = StepTracker.attach(model, recorder.owner, pipeline=pipeline)
    recorder.resync()
    batch_hook = model.register_forward_pre_hook(recorder.begin_call, with_kwargs=True)
    try:
        yield maps
    finally:
        batch_hook.remove()
        for _, handle in recorder.handles.values():
            handle.remove()
        for _, handles in recorder.split_hooks.values():
            for handle in handles:
                handle.remove()
        StepTracker.detach(model, recorder.owner)


class _Recorder:
    """The forward hooks of one capture and what they add to its maps."""

    def __init__(self, model, pipeline, maps: TemporalAttentionMaps, steps, cfg, chunk_size, chunk_elements):
        self.model, self.pipeline, self.maps, self.steps, self.cfg = model, pipeline, maps, steps, cfg
        self.chunk_size, self.chunk_elements = chunk_size, chunk_elements
        self.owner = f"capture-{id(self)}"
        self.tracker: Optional[StepTracker] = None
        self.handles: Dict[str, tuple] = {}  # layer -> (module hooked, hook handle)
        self.batch = None  # videos in the UNet call in progress (both guidance halves)
        self.perturbed = False  # that call batches a perturbed-attention-guidance branch
        # FreeNoise's split inference (diffusers' SplitInferenceModule around a layer's transformer block) runs the
        # block on slices of its sequences: layer -> the split modules above it; split module -> [its call's
        # sequences, the first sequence of the slice in progress, of the next]; the pre-hooks that fill these
        self.splits: Dict[str, list] = {}
        self.slices: Dict[int, list] = {}
        self.split_hooks: Dict[int, tuple] = {}

    def begin_call(self, module, args, kwargs) -> None:
        # the UNets' sample; Latte's is its hidden_states, passed by keyword
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.batch = sample.shape[0] if isinstance(sample, torch.Tensor) and sample.dim() == 5 else None
        # a PAG pipeline sets its processors for the call: the model called alone batches its branch too
        self.perturbed = any(is_pag(getattr(m, "processor", None)) for m in self.model.modules())
        self.resync()  # modules swapped in since (FreeNoise's blocks, split inference's wrappers), from this call on

    def resync(self) -> None:
        """Hook the watched layers; a layer whose module was replaced gets its new module hooked, also where a split
        inference's wrapper (``.module.``) now stands above it; a layer gone from the model raises."""
        modules = dict(self.model.named_modules())
        unwrapped = {path.replace(".module.", "."): module for path, module in modules.items() if ".module." in path}
        for name in self.maps.levels:
            module = modules.get(name, unwrapped.get(name))
            hooked = self.handles.get(name)
            if module is None:
                raise ValueError(f"{name}: this layer the capture records is no longer in the model (replaced under "
                                 "another name): open the capture after changing the model")
            if hooked is not None and hooked[0] is module:
                continue
            if hooked is not None:
                hooked[1].remove()
            hook = functools.partial(self.record, name)
            self.handles[name] = (module, module.register_forward_hook(hook, with_kwargs=True))
        paths = {id(module): path for path, module in modules.items()}
        for name, (module, _) in self.handles.items():  # where each hooked module is now (a split moves it down)
            parts = paths.get(id(module), "").split(".")
            self.splits[name] = [modules[path] for path in (".".join(parts[:i]) for i in range(1, len(parts)))
                                 if isinstance(modules.get(path), SplitInferenceModule)]
            for split in self.splits[name]:
                if id(split) not in self.split_hooks:
                    self.split_hooks[id(split)] = (split, (
                        split.register_forward_pre_hook(functools.partial(self._split_call, split), with_kwargs=True),
                        split.module.register_forward_pre_hook(functools.partial(self._split_slice, split),
                                                               with_kwargs=True)))

    def _split_call(self, split, module, args, kwargs) -> None:
        hidden = kwargs.get("hidden_states")
        rows = hidden.shape[split.split_dim] if isinstance(hidden, torch.Tensor) else None
        self.slices[id(split)] = [rows, None, 0]

    def _split_slice(self, split, module, args, kwargs) -> None:
        state, hidden = self.slices.get(id(split)), kwargs.get("hidden_states")
        if state is not None and isinstance(hidden, torch.Tensor):
            state[1] = state[2]
            state[2] += hidden.shape[split.split_dim]

    def conditional_start(self, name: str, rows: int) -> int:
        """The first of a call's `rows` sequences in the conditional half of batched guidance: the second half,
        of the call or, under FreeNoise's split inference, of the split block's call, of which this is a slice."""
        splits = self.splits.get(name, [])
        if not splits:
            return rows // 2
        split = splits[0]
        state = self.slices.get(id(split))
        if len(splits) > 1 or split.split_dim != 0 or "hidden_states" not in split.input_kwargs_to_split \
                or state is None or state[0] is None or state[1] is None:
            raise ValueError(f"{name}: the model's split inference runs this layer on slices that "
                             "capture_temporal_attention cannot place in the batch (it takes FreeNoise's: one "
                             "split of the sequences, dimension 0): capture without it, or with cfg=False")
        total, first, _ = state
        return min(rows, max(0, total // 2 - first))

    def _guidance_batched(self) -> bool:
        if self.cfg is not None:
            return self.cfg
        if self.pipeline is None:
            return False
        try:
            return bool(self.pipeline.do_classifier_free_guidance)
        except AttributeError:  # the pipeline's call sets what it reads: none has run
            raise ValueError(f"{type(self.pipeline).__name__} has not run, so it does not say whether this call of its "
                             "model batches guidance: pass cfg=True or cfg=False") from None

    def record(self, name: str, module, args, kwargs, output) -> None:
        """The forward hook of layer `name`: add the call's attention probabilities to its map."""
        step = self.tracker.step
        if (self.steps is not None and step not in self.steps) or attention_skipped(module):
            return  # (diffusers' layer skip answers the call with its values, or its input: no map to record)
        names = ("hidden_states", "encoder_hidden_states", "attention_mask")
        call = dict(zip(names, args))
        call.update({k: v for k, v in kwargs.items() if k in names or k == "temb"})
        if call.get("attention_mask") is not None:
            raise ValueError(f"{name}: capture_temporal_attention records unmasked temporal attention, but this "
                             "call passed an attention_mask")
        reusing = [h for h in ATTENTION_REUSE if diffusers_hook(module, h) is not None]  # an earlier call's output
        if reusing:
            raise ValueError(f"{name}: diffusers' {reusing[0]} hook on this attention reuses its output in some "
                             "steps, where capture_temporal_attention, which records each call from the module's "
                             "inputs, would record a map the model did not compute: capture without it")
        rows = call["hidden_states"].shape[0]
        if self.perturbed:
            raise ValueError(f"{name}: perturbed-attention guidance's processors are on the model (a PAG pipeline "
                             "sets them for a call at pag_scale > 0, and one interrupted leaves them): the call "
                             "batches a perturbed-attention-guidance branch beside its guidance ([unconditional, "
                             "conditional, perturbed]), which capture_temporal_attention does not take apart: "
                             "capture with pag_scale=0")
        start = 0
        if self._guidance_batched():
            cache = diffusers_hook(self.model, "faster_cache_denoiser")  # may skip the unconditional branch
            if cache is not None and not cache.is_guidance_distilled and cache.unconditional_batch_skip_range > 1:
                raise ValueError(f"{name}: diffusers' FasterCache on this model skips the unconditional branch in some "
                                 "steps, where the model's blocks see the conditional half alone, which the capture "
                                 "cannot tell from its input: capture without it, or with FasterCacheConfig("
                                 "unconditional_batch_skip_range=1)")
            if self.batch is None or self.batch % 2:
                raise ValueError(f"{name}: guidance is batched (cfg=True, or the pipeline's "
                                 "do_classifier_free_guidance) but the model call's batch is not even (its "
                                 + ("input is no 5-D video latent)" if self.batch is None else
                                    f"sample: {self.batch} videos)"))
            # diffusers batches [unconditional, conditional], each video's sequences together
            start = self.conditional_start(name, rows)
            if start == rows:  # a slice of the unconditional half
                return
        site = tar_site(module)
        spec = None if site is None else site.spec_at(step)
        where = f"{name} (level {self.maps.levels[name]})"
        with torch.no_grad():
            total = self._probability_sum(module, call, spec, where, start, rows)
        self.maps._add((name, step), total, (rows - start) * module.heads)

    def _probability_sum(self, module, call, spec, where, start, rows) -> torch.Tensor:
        """Sum over sequences start..rows and heads of the call's attention probabilities, float64 (Nq, Nk)."""
        hidden, context, temb = call["hidden_states"], call.get("encoder_hidden_states"), call.get("temb")
        nq = hidden.shape[1] if hidden.ndim == 3 else hidden.shape[2] * hidden.shape[3]
        nk = nq if context is None else context.shape[1]
        chunk = self.chunk_size or max(1, self.chunk_elements // (module.heads * nq * nk))
        total = None
        for first in range(start, rows, chunk):
            part = slice(first, min(first + chunk, rows))
            q, k, v = project_heads(module, hidden[part], None if context is None else context[part],
                                    None if temb is None else temb[part])
            kwargs = {"strength": 0.0} if spec is None else spec.tar_kwargs(
                q.shape[2], k.shape[2], device=q.device, dtype=q.dtype, where=where)
            problem = make_problem(q, k, v, causal=False, max_mode="row", scale=None,
                                   **{"sigma": 1.0, "delta": None, **kwargs})
            compute = torch.float64 if q.dtype == torch.float64 else torch.float32
            bias = None
            if problem.delta is None and problem.regularized:
                bias = gaussian_bias(problem.nq, problem.nk, problem.sigma, device=q.device, dtype=compute)
            with without_autocast(q.device):  # the maps in `compute`, whatever the model's autocast
                scores = tar_scores(problem, problem.q.to(compute), problem.k.to(compute), problem.delta, bias)
                summed = torch.softmax(scores, dim=-1).sum(dim=(0, 1), dtype=torch.float64)
            total = summed if total is None else total + summed
        return total
