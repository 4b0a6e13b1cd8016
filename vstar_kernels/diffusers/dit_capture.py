"""Record the frame-by-frame attention of a video DiT: the DiT sibling of `capture`.

`capture_frame_attention` wraps each watched block's processor and, in a torch function mode that only listens,
records the q, k (and key mask) it hands to ``scaled_dot_product_attention``, which then runs as it would have.
The attention is formed over chunks of query rows of at most `capture.CHUNK_ELEMENTS` scores; text tokens take part
in the softmax but have no row or column. Beside each map it counts, per head, the video query rows whose max score
lies outside their own frame and the text (`FrameAttentionMaps.max_outside_own_frame`).
"""

from __future__ import annotations

import contextlib
import inspect
from typing import Optional

import torch
from torch.overrides import TorchFunctionMode

from .._problem import check_int, int_set, make_problem, type_name
from ..analysis import _outside_own_frame
from ..frames import FrameLayout, as_layout, frame_bias
from ..reference import tar_scores, without_autocast
from .capture import CHUNK_ELEMENTS, TemporalAttentionMaps
from .dit import DiTTARProcessor, layer_skip_reads_the_wrapped
from .dit_families import dit_attention_modules, dit_family, set_processor, unsupported_dit
from .dit_state import watch_layout
from .install import denoiser, tar_models, tar_state
from .interception import BACKEND_ATTRIBUTES, Wrapping, call_through_sdpa, mask_runs, sdpa_arguments
from .steps import Hook, StepTracker, loop_step, pipeline_weakref, values_answer
from .token_grid import token_frames


@contextlib.contextmanager
def capture_frame_attention(target, *, steps=None, blocks=None, cfg: Optional[bool] = None,
                            chunk_elements: int = CHUNK_ELEMENTS):
    """Record a DiT's frame-by-frame attention in the runs inside the ``with`` block (docs/dits.md, Frame maps).

    ``maps[(layer, step)]`` is an (F, F) float64 map: row f is how the tokens of latent frame f attend to
    the tokens of each frame, averaged over heads and frame f's query tokens (rows sum to 1 only without
    text; NaN for a frame id with no token); `FrameAttentionMaps.max_outside_own_frame` gives the share of
    rows whose max lies outside their frame; a pipeline's every model TAR takes is recorded (Wan 2.2's second
    expert's layers named ``transformer_2.``, as `apply_tar` names them). `steps` and `blocks` (forward order)
    narrow what is recorded;
    `cfg`, as for `capture_temporal_attention` (None: where the family batches guidance,
    `DiTFamily.batched_guidance`, the pipeline's ``do_classifier_free_guidance`` read at each call, as it is set
    only while the pipeline runs; a pipeline with a guidance_scale but without it, CogVideoX's, ConsisID's or
    Allegro's, needs
    `cfg` given; else False); `chunk_elements` bounds memory.
    """
    model, pipeline = denoiser(target)
    family = dit_family(model)
    reason = unsupported_dit(model)
    if reason is not None:
        raise ValueError(reason)
    if family is None:
        raise ValueError(f"{type(model).__name__} is not a supported video DiT: capture_frame_attention takes "
                         "the video DiTs TAR takes (Wan, CogVideoX, HunyuanVideo, ..., docs/dits.md; "
                         "capture_temporal_attention takes the UNets)")
    steps = int_set("steps", steps)
    blocks = int_set("blocks", blocks)
    if cfg is not None and not isinstance(cfg, bool):
        raise TypeError(f"cfg must be a bool or None, got {type_name(cfg)}")
    if cfg is None and pipeline is not None and family.batched_guidance \
            and not hasattr(type(pipeline), "do_classifier_free_guidance") \
            and "guidance_scale" in inspect.signature(type(pipeline).__call__).parameters:
        raise ValueError(f"{type(pipeline).__name__} batches guidance but does not say when: pass cfg=True "
                         "(guidance_scale > 1) or cfg=False")
    chunk_elements = int(check_int("chunk_elements", chunk_elements))

    # every model apply_tar takes (Wan 2.2's two experts: the second's layers prefixed "transformer_2.")
    experts = [(prefix, expert, [(index, f"{prefix}.{name}" if prefix else name, module)
                                 for index, (name, module) in enumerate(dit_attention_modules(expert, blocks))
                                 if blocks is None or index in blocks])
               for prefix, expert in tar_models(model, pipeline)]
    maps = FrameAttentionMaps({name: 0 for _, _, selected in experts for _, name, _ in selected})
    recorders, hooks, watches = [], [], {}  # watches: module -> the watches made for it
    try:
        for _, expert, selected in experts:
            recorder = _Recorder(expert, pipeline, family, maps, steps, cfg, chunk_elements)
            recorder.tracker = StepTracker.attach(expert, recorder.owner, pipeline=pipeline)
            recorders.append(recorder)
            hooks += watch_layout(expert, family, recorder)
            for index, name, module in selected:
                watches[module] = [_watch(module, recorder, name, index)]

            def resync(model, args, recorder=recorder, selected=selected):
                """A processor set while the capture is open (set_attn_processor, fuse_qkv_projections) is watched
                from the model's next call, as the one it replaced was; one of its watches set back (unfuse) is
                watched by it again."""
                for index, name, module in selected:
                    if not any(_holds(module, watch) for watch in watches[module]):
                        watches[module].append(_watch(module, recorder, name, index))
            hooks.append(expert.register_forward_pre_hook(Hook(resync)))
        yield maps
    finally:
        ours = {id(watch) for made in watches.values() for watch in made}
        for module, made in watches.items():
            for watch in made:
                watch.closed = True  # one kept elsewhere and set back later passes calls on
            outer = _without(module.processor, ours)
            if outer is not module.processor:
                set_processor(module, outer)
        for _, expert, _ in experts:  # fuse_qkv_projections's saved processors, which unfuse puts back
            saved = getattr(expert, "original_attn_processors", None)
            if isinstance(saved, dict):
                for name, processor in saved.items():
                    saved[name] = _without(processor, ours)
        for hook in hooks:
            hook.remove()
        for recorder in recorders:
            StepTracker.detach(recorder.model, recorder.owner)


def _watch(module, recorder: "_Recorder", name: str, block: int) -> "_Watch":
    """A watch on `module`'s processor, inside TAR's wrapper where TAR is on."""
    holder = module.processor if isinstance(module.processor, DiTTARProcessor) else None
    watch = _Watch(module.processor if holder is None else holder.processor, recorder, name, block)
    if holder is None:
        set_processor(module, watch)
    else:
        holder.processor = watch
    return watch


def _holds(module, watch) -> bool:
    """Whether `watch` is among the processors of `module` (TAR's and captures' wrappers, outermost first)."""
    current = module.processor
    while isinstance(current, (DiTTARProcessor, _Watch)):
        if current is watch:
            return True
        current = current.processor
    return False


def _without(processor, ours: set):
    """`processor` with the watches whose ids are in `ours` taken out, wherever they sit among TAR's and other
    captures' wrappers (a capture closed before one opened after it leaves its watch inside the later one's)."""
    if isinstance(processor, _Watch) and id(processor) in ours:
        return _without(processor.processor, ours)
    if isinstance(processor, (DiTTARProcessor, _Watch)):
        processor.processor = _without(processor.processor, ours)
    return processor


class FrameAttentionMaps(TemporalAttentionMaps):
    """`capture_frame_attention`'s maps: `TemporalAttentionMaps` of (F, F) frame maps (every layer at level 0),
    and where each call's row maxima lie."""

    def __init__(self, levels):
        super().__init__(levels)
        self._outside = {}  # (layer, step) -> [(H,) int64 rows whose max lies outside, video rows per head]

    def max_outside_own_frame(self, key) -> torch.Tensor:
        """(H,) float64 on the CPU: per head, the share of the video query rows of the (layer, step) `key`'s
        calls (every sequence recorded) whose max score lies outside their own frame and the text, as
        `vstar_kernels.analysis.max_outside_own_frame` computes it on each call's q and k: an upper bound, up to
        rounding, of the tiled speculative forward's flag rate there; the lean forward's flags ties too
        (docs/attention-analysis.md)."""
        outside, rows = self._outside[key]
        return (outside.to(torch.float64) / rows).cpu()

    def _add_outside(self, key, outside: torch.Tensor, rows: int) -> None:
        entry = self._outside.setdefault(key, [0, 0])
        entry[0], entry[1] = entry[0] + outside, entry[1] + rows


class _Recorder:
    """What one capture adds to its maps."""

    def __init__(self, model, pipeline, family, maps, steps, cfg, chunk_elements):
        self.model, self.family, self.maps, self.steps = model, family, maps, steps
        self.pipeline = pipeline_weakref(pipeline)  # before any change to the model
        self.cfg, self.chunk_elements = cfg, chunk_elements
        self.owner = f"capture-{id(self)}"
        self.tracker: Optional[StepTracker] = None
        self.grid = None  # kept by watch_layout's hooks, as is:
        self.perturbed = False  # the call in progress perturbs the model for guidance (not recorded)
        self.call_batch = None  # the batch the model was called with

    def _guidance_batched(self) -> bool:
        """Whether this call batches guidance: `cfg` where given, else what the running pipeline says."""
        if self.cfg is not None:
            return self.cfg
        pipeline = None if self.pipeline is None else self.pipeline()
        return self.family.batched_guidance and bool(getattr(pipeline, "do_classifier_free_guidance", False))

    def step(self) -> Optional[int]:
        """The step of the call in progress, or None when it is not recorded."""
        if self.perturbed:
            return None
        step = loop_step(self.tracker, self.owner, self.grid)
        return step if self.steps is None or step in self.steps else None

    def record(self, name, block, step, query, key, mask, scale, first, batch) -> None:
        """Add one SDPA call (q, k: (B, H, N, D)) whose first sequence is sequence `first` of the call's `batch`."""
        if self.grid is None:
            raise RuntimeError(f"{name}: called outside a forward call of the model, so the frame layout is unknown "
                               "(as in a block gradient checkpointing recomputes in the backward pass: the capture "
                               "runs without it)")
        runs = mask_runs(mask, query.shape[0], query.shape[2], key.shape[2], name)
        frames = token_frames(self.grid, self.family.text, query.shape[2], key.shape[2], name, query.device, block)
        frames = frames.shared_ids(query.device) if isinstance(frames, FrameLayout) else frames
        state = tar_state(self.model)  # TAR's, where applied and where it runs (a call of one frame runs stock)
        spec = None if state is None or as_layout(self.grid).one_frame() else state.spec_at(block)
        regularized = {"strength": 0.0} if spec is None else spec.tar_kwargs(
            self.grid[0], self.grid[0], device=query.device, dtype=query.dtype, where=name)
        keep = slice(0, query.shape[0])
        # a call of the conditional half alone: diffusers' FasterCache skips the unconditional branch in some steps,
        # its hook passing the blocks the second half of the batch the model was called with
        if self._guidance_batched() and batch * 2 != self.call_batch:
            if batch % 2:
                raise ValueError(f"{name}: guidance is batched but the call has an odd batch ({batch} sequences)")
            start = max(batch // 2 - first, 0)
            if start >= query.shape[0]:
                return
            keep = slice(start, query.shape[0])
        query, key = query[keep], key[keep]
        total = torch.zeros(self.grid[0], self.grid[0], dtype=torch.float64, device=query.device)
        outside = torch.zeros(query.shape[1], dtype=torch.int64, device=query.device)
        with torch.no_grad():
            for rows, key_mask in runs:
                key_mask = None if key_mask is None else key_mask[keep]
                self._frame_sum(total, outside, query[:, :, rows], key, frames[rows], frames, key_mask, scale,
                                regularized)
        # the query tokens of each frame, in every sequence and head of the call (a frame with none: a NaN row)
        tokens = torch.bincount(frames[frames >= 0].long(), minlength=self.grid[0]).to(torch.float64)
        self.maps._add((name, step), total, tokens[:, None] * (query.shape[0] * query.shape[1]))
        self.maps._add_outside((name, step), outside, int(tokens.sum()) * query.shape[0])

    def _frame_sum(self, total, outside, query, key, q_frames, k_frames, key_mask, scale, regularized) -> None:
        """Add to `total` ((F, F) float64) the probabilities per key frame summed over batch, heads and each frame's
        query tokens, and to `outside` ((H,) int64) the video query rows per head whose max lies outside their
        frame and the text."""
        video = torch.nonzero(q_frames >= 0).flatten()
        if video.numel() == 0:
            return
        # the values take no part: a one-column view of k stands in for them
        problem = make_problem(query, key, key[..., :1], causal=False, max_mode="row", scale=scale,
                               frames=(q_frames, k_frames), key_mask=key_mask,
                               **{"sigma": 1.0, "delta": None, **regularized})
        compute = torch.float64 if query.dtype == torch.float64 else torch.float32
        k = problem.k.to(compute)
        first, stop = int(video[0]), int(video[-1]) + 1
        key_frames = torch.nn.functional.one_hot(k_frames.clamp(min=0).long(), self.grid[0]).to(compute)
        key_frames[k_frames < 0] = 0
        dropped = None if key_mask is None else ~key_mask[:, None, None, :]
        rows = max(1, self.chunk_elements // (query.shape[0] * query.shape[1] * key.shape[2]))
        with without_autocast(query.device):  # the maps in `compute`, whatever the model's autocast
            for start in range(first, stop, rows):
                block = slice(start, min(start + rows, stop))
                ids = q_frames[block]
                bias = None
                if problem.regularized:
                    bias = frame_bias(ids, k_frames, sigma=problem.sigma, delta=problem.delta, dtype=compute)
                scores = tar_scores(problem, problem.q[:, :, block].to(compute), k, None, bias, mask=dropped)
                per_frame = (torch.softmax(scores, dim=-1) @ key_frames).sum(dim=(0, 1), dtype=torch.float64)
                video_rows = ids >= 0  # a text or reference token between the video's has no row
                total.index_add_(0, ids[video_rows].long(), per_frame[video_rows])
                outside += _outside_own_frame(problem, block, k, dropped)[:, :, video_rows].sum(dim=(0, 2))


class _Listen(TorchFunctionMode):
    """Hands each scaled_dot_product_attention call to the recorder, then lets it run as it would have."""

    def __init__(self, watch: "_Watch", attn: torch.nn.Module, step: int, batch: int):
        super().__init__()
        self.watch, self.attn, self.step, self.batch, self.seen, self.calls = watch, attn, step, batch, 0, 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.scaled_dot_product_attention:
            query, key, value, mask, _, is_causal, scale, gqa = sdpa_arguments(*args, **kwargs)
            if is_causal or (gqa and query.shape[1] != key.shape[1]):  # the maps are of full attention, one k a head
                raise ValueError(f"{self.watch.name}: capture_frame_attention records attention over every key with "
                                 f"a key head per query head; this call asks for "
                                 f"{'is_causal=True' if is_causal else 'grouped-query attention'}")
            self.calls += 1
            # Mochi's processor runs one call per sequence: the calls come in batch order
            first = 0 if query.shape[0] == self.batch else self.seen
            self.seen += query.shape[0]
            if values_answer(self.attn, query, value):  # diffusers' layer skip of the scores: no attention to record
                return func(*args, **kwargs)
            self.watch.recorder.record(self.watch.name, self.watch.block, self.step, query, key, mask, scale, first,
                                       self.batch)
        return func(*args, **kwargs)


class _Watch(Wrapping):
    """Wraps a block's processor; in the recorded steps its attention calls are recorded; `closed` after its
    capture (set back since, by diffusers' unfuse_qkv_projections or a saved set of processors: passes calls on)."""

    def __init__(self, processor, recorder: _Recorder, name: str, block: int):
        self.processor, self.recorder, self.name, self.block = processor, recorder, name, block
        self.closed = False
        self.show(processor)
        layer_skip_reads_the_wrapped(type(self))

    _attention_backend, _parallel_config = BACKEND_ATTRIBUTES

    def __call__(self, attn, *args, **kwargs):
        if self.closed:
            return self.processor(attn, *args, **kwargs)
        # every call, recorded or not (TAR's processor around this one does not see the parallel config through it),
        # and a model made parallel while the capture is open (diffusers does not give this wrapper the config)
        if getattr(self.processor, "_parallel_config", None) is not None \
                or getattr(self.recorder.model, "_parallel_config", None) is not None:
            raise ValueError(f"{self.name}: capture_frame_attention records one process's attention calls; under "
                             "diffusers' context parallelism each rank's call holds a share of the queries or heads: "
                             "capture on a model without enable_parallelism")
        step = self.recorder.step()
        skips = self.recorder.family.skips_attention
        if step is None or (skips is not None and skips(kwargs)):
            return self.processor(attn, *args, **kwargs)
        hidden_states = args[0] if args else kwargs["hidden_states"]
        return call_through_sdpa(_Listen(self, attn, step, hidden_states.shape[0]), self.processor, self.name,
                                 "it could not be recorded", attn, *args, **kwargs)
