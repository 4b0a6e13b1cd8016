"""What the node adds to a ComfyUI model, and how a sampling run goes with it (docs/comfyui.md, How it works):
`TARPatch` (the OUTER_SAMPLE and APPLY_MODEL wrappers), `MarkedForward` (the object patch on each module holding
the video self-attention) and `tar_override` (the attention override inside such a module).

The model call under way is a thread-local (`_LIVE`), not an entry of transformer_options (docs/comfyui.md says
why). So that every block traces the same code under torch.compile, nothing that differs between blocks (a
module's name) is read on the traced path but in messages."""

from __future__ import annotations

import logging
import math
import threading
import weakref
from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from .. import tar_attention
from ..frames import FrameLayout, TokenLayout, layout_ids, one_frame
from ..functional import Speculation
from .models import Family
from .paths import replacement, resolve

KEY = "vstar_tar"               # the wrappers' key; the transformer_options key of the sampling run (a `Run`)
SITE = "vstar_tar_module"       # transformer_options key, inside a regularized module, of that module
OVERRIDE = "optimized_attention_override"
STG_SKIP = "stg_skip_self_attn"  # transformer_options key: the self-attention returns its values (LTX's STG)
EDGE = 1e-5                     # the window's ends' relative tolerance (`TARPatch.regularizes`)
LOG = logging.getLogger("vstar_kernels.comfyui")


class _Live(threading.local):
    call = None                 # the model call under way in this thread: its RegularizedCall, None outside the window


_LIVE = _Live()


@dataclass(frozen=True)
class Settings:
    strength: float
    sigma: float
    start_percent: float        # the window: steps with percent_to_sigma(end) <= sigma <= percent_to_sigma(start)
    end_percent: float
    reference_frames: int       # leading latent frames (of the whole latent) that are reference images (frame -1)
    backend: str


class Run:
    """A sampling run: the shape of its latent (a context window that wraps around needs its length; () when the
    run did not start through ComfyUI's sampler), the kinds of warning said in it, and its choice between the
    speculative one pass and two passes (the rows the last model call recomputed decide the next's)."""

    def __init__(self, shape):
        self.shape, self.said = tuple(shape), set()
        self.speculation = Speculation()
        self.calls = self.regularized = 0   # the run's model calls, and those in the window
        self.sigmas = []                    # the sigmas of its calls
        self.window = None                  # (low, high, bottom, top) of its last call (`TARPatch.bounds`)
        self.schedule = None                # the run's sigmas (transformer_options["sample_sigmas"]), if given
        self.retained = ()                  # newer ComfyUI's latent_retain_index_list of its context windows
        self.unchecked = {}                 # path -> a later node's object patch there in place of TAR's (not yet
                                            # known to call it: `TARPatch.outer_sample`, `TARPatch.apply_model`)
        self.called = {}                    # path -> the module of such a path, which `_called` marks when called

    def saw(self, sigmas, window, inside: bool, schedule) -> None:
        """A model call of the run at `sigmas`, in the window or not."""
        self.calls += 1
        self.regularized += inside
        self.sigmas += sigmas
        self.window = window
        if schedule is not None and self.schedule is None:
            self.schedule = torch.as_tensor(schedule).detach().reshape(-1).tolist()

    def steps_missed(self) -> Tuple[int, int]:
        """(steps of the window no model call ran at, steps of the window), of the run's schedule: a call runs a step
        when its sigma is the step's (to ComfyUI's own 1e-4, context windows'), or, for a first step at sigma 1 or
        more, lies between it and the next. (0, 0) when that cannot be told: no schedule, or a sampler that calls
        the model at sigmas of its own (fewer than half the steps called at theirs, as dpm_adaptive does)."""
        if not self.schedule or self.window is None:
            return 0, 0
        steps = self.schedule[:-1]  # the last sigma is where the run ends, no call's
        called = [any(abs(c - s) <= 1e-4 * abs(s) for c in self.sigmas) for s in steps]
        if steps and steps[0] >= 1:  # ComfyUI's SDE samplers call a flow model's first step (sigma 1) a little lower
            called[0] = called[0] or any(self.schedule[1] < c < steps[0] for c in self.sigmas)
        if 2 * sum(called) < len(steps):
            return 0, 0
        bottom, top = self.window[2:]
        window = [bottom <= s <= top for s in steps]
        return sum(w and not c for w, c in zip(window, called)), sum(window)

    def end(self, settings: "Settings") -> None:
        """After the run: a warning when none of its model calls was in the window, so that TAR never ran (or none
        reached the node's APPLY_MODEL wrapper: another node ran the model some other way, or skipped it)."""
        if not self.calls:
            LOG.warning("VSTAR_TAR: no model call of this sampling run reached the node (another node skipped the "
                        "model, or ran it without ComfyUI's model call), so TAR did not run")
        elif not self.regularized:
            low, high = self.window[:2]
            LOG.warning("VSTAR_TAR: no model call of this sampling run (%d in all) was in the window, so TAR did "
                        "not run: start_percent=%g and end_percent=%g give sigmas from %g down to %g, and the calls "
                        "ran at sigmas from %g down to %g. Widen the window, or move it to these steps", self.calls,
                        settings.start_percent, settings.end_percent, high, low, max(self.sigmas), min(self.sigmas))
        else:
            missed, steps = self.steps_missed()
            if missed:
                LOG.warning("VSTAR_TAR: %d of the %d steps of this sampling run in the window ran no model call, so "
                            "TAR did not run in them: a node skipped the model there (LazyCache reuses an earlier "
                            "step's result)", missed, steps)


def _warn(run: Run, kind: str, message: str) -> None:
    """A WARNING record, once per sampling run and kind."""
    if kind not in run.said:
        run.said.add(kind)
        LOG.warning("VSTAR_TAR: %s (said once per sampling run)", message)


class RegularizedCall:
    """One model call in the window: its settings, token layout, the frame id of each of its frames (`frame_ids`),
    the device, and the first error TAR raised in it (the regularized modules it ran mark themselves:
    `MarkedForward.ran_in`)."""

    def __init__(self, settings: Settings, layout: TokenLayout, frame_ids: Tuple[int, ...], device: torch.device,
                 run: Run):
        self.settings, self.layout, self.run, self.device = settings, layout, run, device
        self.runs = tuple((frame, layout.per_frame) for frame in frame_ids)
        # video frames in order from any first one (a context window's): a FrameLayout from 0, of the same frame
        # distances, which are all TAR's Gaussian reads of the ids (no reference frame, id -1, among them)
        first = frame_ids[0]
        self.regular = first >= 0 and frame_ids == tuple(range(first, first + len(frame_ids)))
        # other frames' ids made here, outside a compiled model (TorchCompileModel): made in its graph, their values
        # would be constants that each window's frames recompile it for
        self.ids = None if self.regular else layout_ids(self.runs, layout.before, layout.after, device)
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

    def frames(self, n: int):
        """The frames of a self-attention over `n` tokens of this call (placed: `unplaced` said nothing), as
        tar_attention's `frames=` takes them: the layout's, then -1 for the tokens after them (the text of a joint
        attention); a FrameLayout where the frames are in order (their ids then known without reading them)."""
        tail = n - self.layout.tokens()
        if self.regular:
            return FrameLayout(len(self.runs), self.layout.per_frame, self.layout.before, self.layout.after + tail)
        if tail == 0:
            return self.ids
        if torch.compiler.is_compiling():
            return torch.nn.functional.pad(self.ids, (0, tail), value=-1)
        return layout_ids(self.runs, self.layout.before, self.layout.after + tail, self.device)


class _Module:
    """A regularized module at work in a call: its patch, the override it replaced, and its attention calls so far."""

    def __init__(self, call: RegularizedCall, marked: "MarkedForward", previous):
        self.call, self.marked, self.previous = call, marked, previous
        self.regularized = self.handed_on = 0

    def __str__(self) -> str:       # where an error happened, read only when one is raised
        return f"VSTAR_TAR: {self.marked.name}"

    def hand_on(self, func, args, kwargs):
        """The attention call as it came, to the override this module's options had, else to ComfyUI's function."""
        self.handed_on += 1
        if self.previous is None:
            return func(*args, **kwargs)
        return self.previous(func, *args, **kwargs)


class TARPatch:
    """The node's wrappers. `outer_sample` (OUTER_SAMPLE) starts a sampling run, after checking that no later node
    put another module on the path of the node's object patches (`marked`, by path) and noting the later nodes'
    patches on those paths; `apply_model` (APPLY_MODEL) regularizes the model calls in the window and checks each one
    afterwards (the first to run a module whose forward a later node patched: that TAR's patch ran there)."""

    def __init__(self, settings: Settings, family: Family, marked: Dict[str, object], model=None):
        self.settings, self.family, self.marked = settings, family, marked
        # the model the node patched (its ModelPatcher's), weakly: a copy of a clone's wrappers keeps the reference
        self.model = None if model is None else weakref.ref(model)

    def outer_sample(self, executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        guider = executor.class_obj
        patcher = guider.model_patcher
        patches = patcher.object_patches
        if self.model is not None and self.model() is not patcher.model:
            raise RuntimeError("VSTAR_TAR: the model sampled is not the one VSTAR_TAR patched: it was built anew with "
                               "the object patches kept (a clone onto a new model, as newer ComfyUI's "
                               "clone(disable_dynamic=True) makes), so TAR's patches would run the earlier model's "
                               "modules and their weights. A node after VSTAR_TAR may have done it: apply VSTAR_TAR "
                               "after that node. With dynamic VRAM on, newer ComfyUI's sampler does it itself for a "
                               "conditioning that carries hooks (a hooked LoRA): start ComfyUI with "
                               "--disable-dynamic-vram, or take the hooks off the conditioning")
        found = replacement(patcher, [path[:-len(".forward")] for path in self.marked])
        if found is not None:
            raise RuntimeError(f"VSTAR_TAR: a node after VSTAR_TAR put another module in place of {found}: TAR's "
                               "patch is on the forward of the module it replaced, which does not run, so TAR would "
                               "not run. Leave that node out, or ask its author to patch the module's forward "
                               "instead (TAR cannot reach a self-attention inside a module an object patch puts in "
                               "place, before VSTAR_TAR or after)")
        unchecked = {}
        for path, ours in self.marked.items():
            if path not in patches:
                raise RuntimeError(f"VSTAR_TAR: a node after VSTAR_TAR took TAR's object patch off {path}, so TAR "
                                   "would not run there. Apply VSTAR_TAR after that node")
            if patches[path] is not ours:  # a later node's: one that calls TAR's (told in a call that ran it)
                unchecked[path] = patches[path]
        run = guider.model_options.setdefault("transformer_options", {})[KEY] = Run(noise.shape)
        run.unchecked = unchecked
        run.retained = tuple(getattr(guider.model_options.get("context_handler"), "latent_retain_index_list", ()))
        # a hook on each module whose forward a later node patched tells a call that ran it from one that skipped
        # it (a cache that skips blocks): only the former tells whether the later patch calls TAR's. The module
        # this patcher runs (`resolve`), not the one the shared model holds now: another branch's object patches
        # stay on it until this one loads, and a hook on that branch's module would never be called
        run.called = {path: resolve(patcher, path[:-len(".forward")]) for path in unchecked}
        hooks = [module.register_forward_pre_hook(_called) for module in run.called.values()]
        try:
            out = executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
            for module in run.called.values():
                vars(module).pop(CALLED, None)
        if len(sigmas) > 1:  # a run of one sigma has no step, so no model call
            run.end(self.settings)
        return out

    def bounds(self, sampling) -> Tuple[float, float, float, float]:
        """(low, high): the window's sigmas, `percent_to_sigma` of end_percent and start_percent by `sampling` (the
        model_sampling in force when the model runs, a shift node's applied after this one included), and (bottom,
        top): the sigmas a call's may take. Both ends included. A step's sigma is the schedule's float32 and
        percent_to_sigma's a float64 of the same percent, a rounding apart (the first step at shift 1.32 is
        1.00000012 against 1.0): the ends take a relative tolerance far below any two steps' distance, and percents
        0 and 1 bound nothing."""
        start, end = self.settings.start_percent, self.settings.end_percent
        high, low = float(sampling.percent_to_sigma(start)), float(sampling.percent_to_sigma(end))
        return low, high, -math.inf if end >= 1 else low * (1 - EDGE), math.inf if start <= 0 else high * (1 + EDGE)

    def regularizes(self, sigmas: torch.Tensor, sampling, run: Optional[Run] = None, schedule=None) -> bool:
        """Whether a call at `sigmas` (one per batch entry) is in the window (`bounds` by `sampling`). Mixed
        batches are an error. The call is counted in `run`, if given, with the run's `schedule` of sigmas."""
        window = self.bounds(sampling)
        low, high, bottom, top = window
        values = torch.as_tensor(sigmas).detach().reshape(-1).tolist()
        inside = [bottom <= s <= top for s in values]
        if any(inside) and not all(inside):
            raise ValueError(f"VSTAR_TAR: one model call mixes sigmas inside and outside the window [{low}, {high}]: "
                             f"{values}")
        if run is not None:
            run.saw(values, window, all(inside), schedule)
        return all(inside)

    def frame_ids(self, layout: TokenLayout, options: dict, run: Run, references: Optional[int] = None,
                  frames: Optional[int] = None) -> Tuple[int, ...]:
        """The id of each video frame of a call: its index in the whole latent (a context window's by its
        ``index_list``, after its ``causal_anchor_index`` where it has one, a looped one's as docs/comfyui.md,
        Context windows, says; k at a position k that newer ComfyUI's ``latent_retain_index_list`` holds, as the
        latent's frame k is there), -1 for the leading `reference_frames` of the whole latent, or, where that is
        0, for the call's leading `references` (the frames its conditioning marks as reference images:
        `Family.references`), which a nonzero `reference_frames` must agree with. `frames`: the length in frames
        of the call's 5-D latent, if it has one; with `reference_frames`, a call outside a context window on fewer
        frames than the run's latent (a temporal crop) is an error, as where its frames lie in the latent is not
        known."""
        window, index, length = options.get("context_window"), list(range(layout.frames)), 0
        in_window = window is not None and getattr(window, "dim", None) == self.family.time_dim
        if in_window:
            # newer ComfyUI's causal_window_fix puts the frame before a window in front of it (its output dropped)
            anchor = getattr(window, "causal_anchor_index", None)
            frames_of_window = ([] if anchor is None or anchor < 0 else [anchor]) + list(window.index_list)
            index = frames_of_window[:layout.frames]
            length = run.shape[window.dim] if len(run.shape) > window.dim else 0
        whole = len(frames_of_window) if in_window else run.shape[2] if len(run.shape) == 5 else None
        if self.settings.reference_frames and frames is not None and whole is not None and frames != whole:
            raise ValueError(f"VSTAR_TAR: reference_frames={self.settings.reference_frames} are the leading frames "
                             f"of the whole latent, but this model call runs on {frames} of the {whole} frames "
                             f"{'of its context window' if in_window else 'of the latent, without a context window'} "
                             "(a temporal crop: an area conditioning over time, such as "
                             "ConditioningSetAreaPercentageVideo's), so which of its frames are references is not "
                             "known. Take the temporal area off the conditioning; or, unless the references are "
                             "WanAnimateToVideo's (refused at 0), set reference_frames to 0 (TAR then treats the "
                             "reference frames as video)")
        ids = index[:1]
        for previous, this in zip(index, index[1:]):
            if this <= previous and not length:
                raise ValueError(f"VSTAR_TAR: the context window {index} wraps around the latent's end, and the "
                                 "latent's length is not known: sample through ComfyUI's sampler (whose "
                                 "OUTER_SAMPLE wrappers read it)")
            ids.append(ids[-1] + this - previous + (length if this <= previous else 0))
        retained = run.retained if in_window else ()  # newer ComfyUI's: the latent's frame k at the window's k
        if retained and (min(retained) < 0 or layout.frames < len(frames_of_window)):
            raise ValueError(f"VSTAR_TAR: the context windows' latent_retain_index_list {list(retained)} puts "
                             "latent frames at positions of the window, but "
                             + ("which frame a negative index retains is not known to the node; count from the "
                                "latent's first frame" if min(retained) < 0 else
                                f"this model call runs on {layout.frames} of the window's {len(frames_of_window)} "
                                "frames (a temporal crop), and where the crop lies is not known"))
        first, wraps = index[0], any(this <= previous for previous, this in zip(index, index[1:]))
        for k in retained:  # in a window across the latent's end, a frame before its first is a loop further on
            if k < len(index):
                ids[k], index[k] = k + (length if wraps and k < first else 0), k
        lead = self.settings.reference_frames
        marked = [r < lead for r in index]
        if references is not None:
            by_call = [k < references for k in range(len(index))]
            if lead and by_call != marked:
                raise ValueError(f"VSTAR_TAR: reference_frames={lead} makes {sum(marked)} of this call's latent "
                                 f"frames {index} reference images, but its VACE conditioning marks {references}: "
                                 "connect WanVaceToVideo's trim_latent, or leave reference_frames at 0 to read them "
                                 "from the conditioning")
            marked = by_call
        ids = tuple(-1 if reference else i for reference, i in zip(marked, ids))
        if all(i < 0 for i in ids):
            given = f"reference_frames={lead}" if lead else "the VACE conditioning's reference images"
            raise ValueError(f"VSTAR_TAR: {given} leaves none of this call's latent frames {index} as video")
        return ids

    def apply_model(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options=None,
                    **kwargs):
        options = {} if transformer_options is None else transformer_options
        sigmas = options.get("sigmas")
        base = executor.class_obj
        call = None
        if self.regularizes(t if sigmas is None else sigmas, base.model_sampling, options.get(KEY),
                            options.get("sample_sigmas")):
            layout = self.family.layout(base.diffusion_model, x, dict(kwargs, transformer_options=options))
            run = options.get(KEY) or Run(())
            references = None if self.family.references is None else self.family.references(x, kwargs)
            ids = self.frame_ids(layout, options, run, references, x.shape[2] if x.dim() == 5 else None)
            if ids[0] == 0 and self.family.reference_first is not None and self.family.reference_first(c_concat):
                raise ValueError(f"VSTAR_TAR: this {self.family.name} model call's first latent frame has mask 1 in "
                                 "its concat conditioning, as WanAnimateToVideo marks the reference image it puts "
                                 "before the video, but reference_frames is 0, so TAR would take the reference for "
                                 "the video's first frame. Connect WanAnimateToVideo's trim_latent output to "
                                 "reference_frames")
            if one_frame(ids):
                _warn(run, "one frame", "a model call in the window has one latent frame of video: TAR needs two "
                                        "frames or more, so such calls run without TAR (the stock model's output)")
            else:
                run.speculation.next_step()
                call = RegularizedCall(self.settings, layout, ids, x.device, run)
        outer, _LIVE.call = _LIVE.call, call
        try:
            out = executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        finally:
            _LIVE.call = outer
        if call is not None:
            ours = [patch.__self__ for patch in self.marked.values()]  # MarkedForwards (their `forward` marks them)
            entered = sum(module.ran_in is call for module in ours)
            unchecked = call.run.unchecked
            # a later node's patch on a path of TAR's, told by the first call that ran the module it patched: one
            # that replaces TAR's patch ran there without it
            called = [path for path in unchecked if vars(call.run.called[path]).get(CALLED) is call]
            replaced = [path for path in called if self.marked[path].__self__.ran_in is not call]
            call.run.unchecked = {path: patch for path, patch in unchecked.items() if path not in called}
            for module in ours:
                module.ran_in = None
            if call.error is not None:
                raise call.error
            if replaced:
                more = len(replaced) - 1
                more = f", nor on {more} other path{'s' if more > 1 else ''} a later patch holds" if more else ""
                raise RuntimeError(f"VSTAR_TAR: the object patch on {replaced[0]} is "
                                   f"{_qualified_name(unchecked[replaced[0]])}, set by a node after VSTAR_TAR: it "
                                   "replaces TAR's patch there (TAR's did not run there in a model call of the "
                                   f"window{more}), so TAR would not run. Apply VSTAR_TAR after that node (it keeps "
                                   "the forward it finds and calls it)")
            if not entered:
                _warn(call.run, "skipped", "a model call in the window ran none of the regularized self-attention "
                                           "modules: another node skipped the model's computation (a cache node "
                                           "reusing an earlier result does) or computed it without those modules; "
                                           "TAR regularizes only what the model computes")
            elif entered < len(self.marked):
                _warn(call.run, "some skipped", f"a model call in the window ran {entered} of the "
                                                f"{len(self.marked)} regularized self-attention modules: another node "
                                                "computed the others' attention without them (an attn1 replace patch, "
                                                "as SelfAttentionGuidance sets, or a pass that skips blocks or their "
                                                "self-attention, as skip-layer guidance's and LTX's spatio-temporal "
                                                "guidance's do), so TAR did not run there")
        return out


CALLED = "vstar_tar_called_in"  # set on a module a later node patched: the RegularizedCall it was last called in


def _called(module, args) -> None:
    """A forward pre-hook: `module` was called in the model call under way (None outside the window)."""
    setattr(module, CALLED, _LIVE.call)


class MarkedForward:
    """The object patch on a module's forward is ``MarkedForward(...).forward``, a bound method of one function for
    every module; in a regularized call, the module's attention calls go to `tar_override`.

    `original`: the forward it replaced (the module's own, or an earlier object patch: `patched`). One reached
    inside a regularized module of the same call (an earlier node's, in another node's patch that this one wraps)
    calls its `original` as it came.
    """

    def __init__(self, original, name: str, patched: bool):
        self.original, self.name, self.patched = original, name, patched
        self.ran_in = None  # the RegularizedCall it last ran in, until that call's end

    def forward(self, *args, **kwargs):
        call = _LIVE.call
        if call is None:
            return self.original(*args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        site = options.get(SITE)
        if isinstance(site, _Module) and site.call is call:
            # inside a regularized module of this call: a MarkedForward of an earlier VSTAR_TAR node, kept inside
            # another node's patch that the node now in force wraps; the attention calls are that module's
            return self.original(*args, **kwargs)
        module = _Module(call, self, options.get(OVERRIDE))
        kwargs["transformer_options"] = {**options, OVERRIDE: tar_override, SITE: module}
        out = self.original(*args, **kwargs)
        if module.regularized + module.handed_on == 0:
            if options.get(STG_SKIP):
                # newer ComfyUI's LTX spatio-temporal guidance: in its perturbed call the self-attention returns its
                # values, without attention, so there was nothing to regularize: counted as a module not run
                return out
            earlier = f" ({_qualified_name(self.original)})" if self.patched else ""
            raise call.fail(RuntimeError(f"VSTAR_TAR: {self.name} computed its attention without ComfyUI's attention "
                                         f"override ({OVERRIDE} in transformer_options), so TAR could not run there: "
                                         f"a node computes it itself (an earlier node's patch of this forward"
                                         f"{earlier}, or an attention-backend patch that replaces ComfyUI's attention "
                                         "function instead of setting that override). Leave that node out, or use one "
                                         "that sets the override"))
        # recorded on the module itself: traced, where one compiled code serves every block, a set's add was
        # replayed with the module it was traced with; an attribute is set on the module the code runs for
        self.ran_in = call
        return out


def marked(patch) -> Optional[MarkedForward]:
    """The MarkedForward whose patch `patch` is, else None."""
    owner = getattr(patch, "__self__", None)
    return owner if isinstance(owner, MarkedForward) else None


def _arguments(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **_):
    """The attention call's arguments (ComfyUI's convention). The others (attn_precision, transformer_options,
    hints such as low_precision_attention) do not change TAR's math: float32, float64 for float64 inputs."""
    return q, k, v, heads, mask, skip_reshape, skip_output_reshape


def key_mask(mask: Optional[torch.Tensor], batch: int, keys: int, where) -> Optional[torch.Tensor]:
    """A ComfyUI attention mask that only masks keys, as the (B, Nk) bool key mask of `tar_attention` (`where`:
    where the call is made, for the messages).

    With ComfyUI's batch and head dimensions added it must be (B or 1, 1, 1, Nk): bool (True attends), or
    additive with entries 0 and -inf or at most minus the dtype's largest value (HunyuanVideo's padded text).
    """
    if mask is None:
        return None
    full = mask.unsqueeze(0) if mask.dim() == 2 else mask        # ComfyUI's batch (2-D), then head (3-D) dimension
    full = full.unsqueeze(1) if full.dim() == 3 else full
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


@torch.compiler.disable
def _qualified_name(obj) -> str:
    """`obj`'s module and name, read outside compiled code (traced, a function's ``__qualname__`` reads wrong)."""
    return f"{getattr(obj, '__module__', '')}.{getattr(obj, '__qualname__', type(obj).__qualname__)}"


def tar_override(func, *args, **kwargs):
    """The attention override inside a regularized module: TAR with frame ids instead of `func`, or, for a call
    whose tokens' frames are not known, the call handed on as it came (said once per sampling run)."""
    module = kwargs["transformer_options"][SITE]
    call = module.call
    q, k, v, heads, mask, skip_reshape, skip_output_reshape = _arguments(*args, **kwargs)
    axis = 2 if skip_reshape else 1
    unplaced = call.unplaced(q.shape[axis], k.shape[axis])
    if unplaced is not None:
        kind, reason = unplaced
        _warn(call.run, kind, f"{module.marked.name} {reason}; such calls run without TAR, as they came")
        return module.hand_on(func, args, kwargs)
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    batch, n = q.shape[0], q.shape[2]
    settings = call.settings
    if module.previous is not None and "override" not in call.run.said:
        _warn(call.run, "override", f"the attention override on the model ({_qualified_name(module.previous)}) "
                                    "does not run in the regularized self-attention calls, which TAR computes with "
                                    "its own kernel; it runs in every other attention call")
    try:
        out = tar_attention(q, k, v, sigma=settings.sigma, strength=settings.strength, frames=call.frames(n),
                            key_mask=key_mask(mask, batch, n, module), backend=settings.backend,
                            **call.run.speculation.kwargs(q.device))
    except Exception as exc:
        raise call.fail(exc)
    module.regularized += 1
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).reshape(batch, n, -1)
