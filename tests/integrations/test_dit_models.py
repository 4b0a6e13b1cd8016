"""apply_tar / remove_tar on tiny random video DiTs: Wan, CogVideoX, HunyuanVideo, LTX-Video, Mochi (CPU).

Every regularized attention call is checked against a float64 evaluation of frame-aware TAR
(tiny_dit_models.frame_tar64) on the q, k, v the module's own processor computed, with the
frame ids and the text mask written from each model's layout in tiny_dit_models.
"""

import contextlib
import copy
import dataclasses
import functools
import gc
import inspect
import io
import math
import pathlib
import re
import warnings
from typing import List, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.testing import CompileCounter
from diffusers import (CogVideoXDDIMScheduler, CogVideoXPipeline, CogVideoXTransformer3DModel,
                       FlowMatchEulerDiscreteScheduler, IPNDMScheduler, UniPCMultistepScheduler,
                       WanPipeline, WanTransformer3DModel, WanVideoToVideoPipeline)
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, attention_backend
from diffusers.models.attention_processor import AttnProcessor2_0, CogVideoXAttnProcessor2_0

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import apply_tar, capture_frame_attention, install, remove_tar, reset_steps
from vstar_kernels.diffusers.dit import DiTTARProcessor
from vstar_kernels.diffusers.interception import SDPA_BACKENDS, SDPACalls
import vstar_kernels.frames
from vstar_kernels.frames import FrameLayout
from vstar_kernels.diffusers.steps import StepTracker

from ..helpers import TOLERANCES, ValueReads
from .tiny_dit_models import (BATCH, FAMILIES, bfloat16_run, cogvideox_inputs, expected_frames, expected_key_mask,
                              forward, frame_tar64, ids_of, processors, randn, record, wan_inputs)
from .tiny_video_models import FAMILIES as UNET_FAMILIES
from .tiny_video_models import one_torch_thread  # noqa: F401 (an autouse fixture)

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

ALL = list(FAMILIES)


def check_call(family, call, sigma, strength):
    name, q, k, v, kwargs, out = call
    frames = expected_frames(family, k.shape[2])
    assert torch.equal(ids_of(kwargs["frames"]).cpu().long(), frames), name
    mask = expected_key_mask(family, k.shape[2])
    if mask is None:
        assert kwargs["key_mask"] is None, name
    else:
        assert torch.equal(kwargs["key_mask"].cpu(), mask), name
    assert (kwargs["sigma"], kwargs["strength"]) == (sigma, strength)
    ref = frame_tar64(q, k, v, frames, sigma=sigma, strength=strength, key_mask=mask, scale=kwargs["scale"])
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("family", ALL)
def test_tar_regularizes_the_video_attention_of_every_block(family):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs()
    before = processors(model)
    plain = forward(model, inputs)

    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    assert names == fam.modules
    calls = record(model)
    out = forward(model, inputs)
    per_module = BATCH if family == "mochi" else 1  # Mochi's processor runs the attention sample by sample
    assert [c[0] for c in calls] == [n for n in fam.modules for _ in range(per_module)]
    for call in calls:
        check_call(fam, call, 1.0, 1.0)
    for name, proc in processors(model).items():
        if name in fam.modules:
            assert isinstance(proc, DiTTARProcessor) and proc.processor is before[name]
        else:
            assert proc is before[name], f"{name} was touched"
    assert (out - plain).abs().max() > 1e-4, "TAR did not change the model output"

    remove_tar(model)
    assert processors(model) == before and all(p is before[n] for n, p in processors(model).items())
    assert torch.equal(forward(model, inputs), plain)
    assert not model._forward_pre_hooks and not model._forward_hooks and StepTracker.of(model) is None


@pytest.mark.parametrize("family", ALL)
def test_only_the_attention_call_changes(family):
    """With the regularized attention swapped for plain SDPA on the q, k, v, mask it gets: stock, bit for bit."""
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs()
    plain = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    seen = []
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            def attention(attn, query, key, value, *, key_mask, scale, causal, **_):
                seen.append(query.shape)
                mask = None if key_mask is None else key_mask[:, None, None, :]
                return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                      scale=scale)
            proc.attention = attention
    assert torch.equal(forward(model, inputs), plain)
    assert seen


@pytest.mark.parametrize("family", ["wan", "hunyuan", "mochi"])
def test_identity_levels_equal_stock_bitwise(family):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs()
    plain = forward(model, inputs)
    for level in ((1.0, 0.0), (math.inf, 1.0)):
        apply_tar(model, TARConfig(levels={0: level}, until_step=None))
        assert torch.equal(forward(model, inputs), plain)


def test_a_diffusers_hook_on_the_model_before_apply_tar(monkeypatch):
    """A diffusers hook on the model itself (enable_parallelism registers one for a plan entry on the model, as
    Wan's and LTX-Video's have) wraps its forward; before diffusers 0.40 the wrapper's signature was (module, *args,
    **kwargs), imitated here. apply_tar after it reads the call's layout all the same."""
    from diffusers.hooks import HookRegistry, ModelHook

    fam = FAMILIES["wan"]
    model, inputs = fam.model(), fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    expected = forward(model, inputs)
    remove_tar(model)
    HookRegistry.check_if_exists_or_initialize(model).register_hook(ModelHook(), "root")
    hooked = model.forward  # functools.partial(the hook chain's forward, model)
    model.forward = functools.update_wrapper(functools.partial(hooked.func, model), hooked.func)
    assert list(inspect.signature(model.forward).parameters) == ["module", "args", "kwargs"]
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    assert torch.equal(forward(model, inputs), expected)


@pytest.mark.parametrize("family, blocks", [("wan", [1]), ("hunyuan", [0, 3]), ("ltx", (0,))])
def test_blocks_selects_blocks_in_forward_order(family, blocks):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs()
    before = processors(model)
    names = apply_tar(model, TARConfig(levels={0: (2.0, 0.5)}, until_step=None, blocks=blocks))
    assert names == [fam.modules[b] for b in blocks]
    assert all(p is before[n] for n, p in processors(model).items() if n not in names)
    calls = record(model)
    forward(model, inputs)
    assert [c[0] for c in calls] == names
    for call in calls:
        check_call(fam, call, 2.0, 0.5)


def test_step_gate_flips_after_until_step_and_reset_restarts():
    fam = FAMILIES["cogvideox"]
    model = fam.model()
    inputs = fam.inputs()
    plain = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    outs = [forward(model, inputs) for _ in range(4)]
    assert (outs[0] - plain).abs().max() > 1e-4 and torch.equal(outs[1], outs[0])
    assert torch.equal(outs[2], plain) and torch.equal(outs[3], plain)
    reset_steps(model)
    assert torch.equal(forward(model, inputs), outs[0])


def test_both_halves_of_a_guidance_batch_are_regularized_alike():
    """A batched CFG call [uncond, cond] gives each half what the half alone gives."""
    fam = FAMILIES["wan"]
    model = fam.model()
    inputs = fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    both = forward(model, inputs)
    for half in range(BATCH):
        alone = forward(model, {k: v[half:half + 1] for k, v in inputs.items()})
        torch.testing.assert_close(both[half:half + 1], alone, atol=1e-5, rtol=1e-5)


def test_frames_follow_the_latent_shape_of_each_call():
    """Tokens per frame and frames come from the call: a second resolution and length need no new apply_tar. The
    processors pass the regular layout as a FrameLayout, whose ids tar_attention knows without reading them."""
    fam = FAMILIES["wan"]
    model = fam.model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    calls = record(model)
    forward(model, wan_inputs(frames=5, size=4))
    assert calls and all(c[4]["frames"] == FrameLayout(5, 4) for c in calls)
    assert all(torch.equal(ids_of(c[4]["frames"]).long(), torch.arange(5).repeat_interleave(4)) for c in calls)
    # one id tensor per layout, shared by every block and call
    forward(model, wan_inputs(frames=5, size=4))
    assert len({id(ids_of(c[4]["frames"])) for c in calls}) == 1
    calls.clear()
    forward(model, wan_inputs(frames=3, size=4))
    assert calls and all(c[4]["frames"] == FrameLayout(3, 4) for c in calls)
    calls.clear()
    vstar_kernels.frames._kept_layout_ids.cache_clear()  # the ids are made in the call below, under inference mode
    with torch.inference_mode():  # as pipelines run: the kept ids are no inference tensor (they keep a version)
        model(**wan_inputs(frames=2, size=4), return_dict=False)
    assert calls and not any(ids_of(c[4]["frames"]).is_inference() for c in calls)


def test_delta_frame_matrix_and_its_size_check():
    fam = FAMILIES["wan"]
    model = fam.model()
    inputs = fam.inputs()
    delta = torch.tensor([[1.0, 0.5, 0.0], [0.5, 1.0, 0.5], [0.0, 0.5, 1.0]])
    apply_tar(model, TARConfig(levels={0: (delta, 1.0)}, until_step=None))
    calls = record(model)
    forward(model, inputs)
    for name, q, k, v, kwargs, out in calls:
        assert torch.equal(kwargs["delta"].cpu(), delta) and "sigma" not in kwargs
    apply_tar(model, TARConfig(levels={0: (torch.eye(4), 1.0)}, until_step=None))
    with pytest.raises(ValueError, match="4 x 4 but this attention runs over 3 frames"):
        forward(model, inputs)


@pytest.mark.parametrize("family", ALL)
def test_bfloat16_forward_runs(family):
    fam = FAMILIES[family]
    plain, out, calls = bfloat16_run(fam)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, plain)
    for call in calls:
        check_call(fam, call, 1.0, 1.0)


def test_errors_name_the_problem():
    model = FAMILIES["wan"].model()
    with pytest.raises(ValueError, match=r"one resolution level, 0.*levels \[1\]"):
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 1.0)}))
    with pytest.raises(ValueError, match=r"blocks \[2, 7\] do not exist in WanTransformer3DModel.*0\.\.1"):
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, blocks=[0, 2, 7]))
    with pytest.raises(ValueError, match="include_input_block"):
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, include_input_block=True))
    assert not model._forward_pre_hooks, "a refused apply_tar left a hook"
    with pytest.raises(ValueError, match="blocks= selects transformer blocks.*levels"):
        apply_tar(UNET_FAMILIES["unet3d"].model(), TARConfig(levels={0: (1.0, 1.0)}, blocks=[0]))
    with pytest.raises(ValueError, match="blocks must hold ints >= 0, at least one"):
        TARConfig(levels={0: (1.0, 1.0)}, blocks=[])
    with pytest.raises(ValueError, match="blocks must hold ints >= 0"):
        TARConfig(levels={0: (1.0, 1.0)}, blocks=[0, -1])
    with pytest.raises(TypeError, match="blocks must be a collection of ints"):
        TARConfig(levels={0: (1.0, 1.0)}, blocks=3)
    with pytest.raises(TypeError, match=r"blocks must be a collection of ints >= 0 or None, got \{1: 2\}"):
        TARConfig(levels={0: (1.0, 1.0)}, blocks={1: 2})  # its keys were taken, its values dropped
    assert TARConfig(levels={0: (1.0, 1.0)}, blocks=[3, 1, 3]).blocks == (1, 3)

    def no_sdpa(attn, hidden_states, *args, **kwargs):
        return attn.to_out[0](attn.to_v(hidden_states))
    model.blocks[0].attn1.set_processor(no_sdpa)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, blocks=[0]))
    with pytest.raises(RuntimeError, match="blocks.0.attn1.*scaled_dot_product_attention.*native"):
        forward(model, FAMILIES["wan"].inputs())


def wan22_pipeline(transformer, transformer_2, boundary_ratio):
    """A WanPipeline of the given experts with no text encoder and no VAE (prompt embeddings in, latents out)."""
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return WanPipeline(tokenizer=None, text_encoder=None, vae=None, scheduler=scheduler, transformer=transformer,
                       transformer_2=transformer_2, boundary_ratio=boundary_ratio)


def record_tar_calls(model, regularized, entry):
    """Each regularized attention call of `model` appends entry(processor, its kwargs) to `regularized`."""
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            def attention(attn, query, key, value, proc=proc, **kwargs):
                regularized.append(entry(proc, kwargs))
                return DiTTARProcessor.attention(proc, attn, query, key, value, **kwargs)
            proc.attention = attention


def run_wan22(pipe, steps, forwards, regularized):
    """One guided run of `steps` steps over 9 video frames (3 latent frames), the records cleared first."""
    forwards.clear()
    regularized.clear()
    with torch.no_grad():
        pipe(prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3), height=32,
             width=32, num_frames=9, num_inference_steps=steps, guidance_scale=5.0, output_type="latent")


@pytest.mark.parametrize("applied_to", ["transformer", "transformer, reset_steps", "pipeline"])
def test_tar_on_the_bare_dit_of_a_pipeline_warns_at_its_next_run(applied_to):
    """TAR applied to pipe.transformer counts forward calls across runs: the second run went on past until_step,
    stock without a word. It warns at the first call of a larger timestep, once; not after reset_steps, nor
    applied to the pipeline (whose scheduler marks the runs)."""
    model = FAMILIES["wan"].model()
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    apply_tar(pipe if applied_to == "pipeline" else model, TARConfig(levels={0: (1.0, 1.0)}, until_step=0))
    for run in range(3):
        if applied_to == "transformer, reset_steps":
            reset_steps(model)
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            run_wan22(pipe, 2, [], [])
        said = [str(w.message) for w in said if "larger timestep" in str(w.message)]
        if applied_to == "transformer" and run == 1:
            assert len(said) == 1 and re.search(r"counted on as step 4, not as a new run's step 0 \(until_step=0\): "
                                                r"on a bare DiT, TAR counts forward calls across runs", said[0]), said
        else:
            assert not said, (run, said)


@pytest.mark.parametrize("family, wrapped", [("wan", False), ("cogvideox", False), ("wan", True)])
def test_a_bare_dits_timestep_given_by_position_is_read(family, wrapped):
    """A bare DiT called as the docs call it, its timestep by position (Wan's second, CogVideoX's third), never
    said that a larger timestep was counted on: only timestep= was read. Also under a hook's wrapper of the
    forward, (module, *args, **kwargs), as diffusers before 0.40 put on the instance."""
    model, inputs = FAMILIES[family].model(), FAMILIES[family].inputs()
    if wrapped:
        model.forward = functools.partial(lambda module, *args, **kwargs: type(module).forward(module, *args, **kwargs),
                                          model)
    names = list(inspect.signature(type(model).forward).parameters)[1:]
    args = [inputs.pop(name) for name in names[:names.index("timestep") + 1]]
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=0, backend="cpu"))
    said = []
    for t in (700, 700, 750):
        args[-1] = torch.full((BATCH,), t)
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")
            model(*args, **inputs)
        said.append([str(w.message) for w in caught if "larger timestep" in str(w.message)])
    assert not said[0] and not said[1] and len(said[2]) == 1 and "(750 after 700)" in said[2][0], said


@pytest.mark.parametrize("model, cache, until_step", [
    ("wan", "first block cache", 0), ("latte", "pyramid attention broadcast", 0),
    ("latte", "pyramid attention broadcast on the spatial attention", 0), ("wan", "first block cache", None),
    ("wan", "first block cache", 2), ("latte", "pyramid attention broadcast", 2)])
def test_a_cache_that_reuses_earlier_steps_outputs_is_said_where_until_step_ends_the_window(model, cache, until_step):
    """diffusers' step caches hand a step outputs of earlier steps (a block's, an attention's): a step after
    until_step can get a regularized one. Said once, at the first step after the window; not within it (it was said
    at the first call, also of a run that ended within the window), not for a cache on modules TAR does not
    regularize, nor without a window's end."""
    from diffusers import FirstBlockCacheConfig, PyramidAttentionBroadcastConfig
    bare = (FAMILIES if model == "wan" else UNET_FAMILIES)[model].model()
    inputs = (FAMILIES if model == "wan" else UNET_FAMILIES)[model].inputs(bare) if model == "latte" \
        else FAMILIES[model].inputs()
    if cache == "first block cache":
        bare.enable_cache(FirstBlockCacheConfig(threshold=0.5))
    else:
        kind = "spatial" if "spatial" in cache else "temporal"
        bare.enable_cache(PyramidAttentionBroadcastConfig(
            **{f"{kind}_attention_block_skip_range": 2, f"{kind}_attention_timestep_skip_range": (-1, 1001)},
            spatial_attention_block_identifiers=(r"^transformer_blocks",), current_timestep_callback=lambda: 500))
    apply_tar(bare, TARConfig(levels={0: (1.0, 1.0)}, until_step=until_step, backend="cpu"))
    said = []
    for _ in range(3):
        context = bare.cache_context("cond") if model == "wan" else contextlib.nullcontext()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad(), context:
            warnings.simplefilter("always")
            bare(**inputs)
        said.append([str(w.message) for w in caught if "hands a step outputs of earlier steps" in str(w.message)])
    hook = "fbc_leader_block_hook" if cache == "first block cache" else "pyramid_attention_broadcast"
    if until_step is None or until_step >= 2 or "spatial" in cache:
        assert said == [[], [], []]
    else:
        assert said == [[], [f"TAR: diffusers' {hook} hook on this model hands a step outputs of earlier steps, so a "
                             f"step after until_step={until_step} can reuse a regularized output (for as many steps as "
                             "the cache skips). Keep the cache off around that step (its timestep range) where the "
                             "boundary matters"], []]


def test_wan22_pipeline_two_experts_and_unbatched_guidance_share_the_loop_index():
    """A real WanPipeline run (prompt embeddings given, latents out): Wan 2.2's two experts, guidance as two calls.

    Both calls of an iteration (conditional, unconditional) are one step; the low-noise expert
    continues the high-noise expert's count; steps past until_step run stock attention.
    """
    fam = FAMILIES["wan"]
    high, low = fam.model(), fam.model()
    pipe = wan22_pipeline(high, low, boundary_ratio=0.8)
    names = apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=2))
    assert names == [f"{expert}.{name}" for expert in ("transformer", "transformer_2") for name in fam.modules]
    forwards, regularized = [], []
    for expert, model in (("high", high), ("low", low)):
        model.register_forward_pre_hook(lambda *_, expert=expert: forwards.append(expert))
        record_tar_calls(model, regularized, lambda proc, kwargs, expert=expert: (
            expert, proc.state.step, ids_of(kwargs["frames"]).max().item()))

    run_wan22(pipe, 4, forwards, regularized)
    assert forwards == ["high"] * 4 + ["low"] * 4  # 2 steps each expert, 2 calls per step
    # steps 0, 1 (high) and 2 (low): 2 calls x 2 blocks each, over the 3 latent frames of 9 video frames
    assert [(e, s) for e, s, _ in regularized] == [("high", 0)] * 4 + [("high", 1)] * 4 + [("low", 2)] * 4
    assert {f for _, _, f in regularized} == {2}
    first = list(regularized)
    run_wan22(pipe, 4, forwards, regularized)  # a second run starts at step 0 again
    assert regularized == first
    remove_tar(pipe)
    assert not any(isinstance(p, DiTTARProcessor) for m in (high, low) for p in processors(m).values())


def test_calls_whose_layout_or_mask_tar_cannot_honour_raise():
    ltx = FAMILIES["ltx"].model()
    apply_tar(ltx, TARConfig(levels={0: (1.0, 1.0)}))
    inputs = FAMILIES["ltx"].inputs()
    del inputs["num_frames"]
    with pytest.raises(ValueError, match="num_frames, height and width"):
        forward(ltx, inputs)
    # LTXConditionPipeline passes video_coords alone, LTXI2VLongMultiPromptPipeline with a grid of 1 x 1 x 1
    coords = torch.zeros(2, 3, 48)
    for grid in (dict(num_frames=None, height=None, width=None), dict(num_frames=1, height=1, width=1)):
        with pytest.raises(ValueError, match="calls with video_coords .* are not supported: .* no frame rate"):
            forward(ltx, dict(FAMILIES["ltx"].inputs(), video_coords=coords, **grid))
    wan = FAMILIES["wan"].model()
    apply_tar(wan, TARConfig(levels={0: (1.0, 1.0)}))
    attn = wan.blocks[0].attn1
    x = torch.randn(1, 48, attn.inner_dim)
    with pytest.raises(RuntimeError, match="outside a forward call of the model"), torch.no_grad():
        attn(x)
    wan._vstar_tar.grid = (2, 16)  # as if inside a forward call over 2 frames of 16 tokens
    with pytest.raises(ValueError, match="blocks.0.attn1: expected a self-attention over the 32 video tokens "
                                         r"\(2 frames x 16 tokens\), got 48 queries and 48 keys"), torch.no_grad():
        attn(x)
    wan._vstar_tar.grid = (3, 16)
    with pytest.raises(ValueError, match=r"boolean key masks of shape \(B, 1, 1, Nk\).*torch.float32 mask of shape "
                                         r"\(1, 1, 48, 48\)"), torch.no_grad():
        attn(x, attention_mask=torch.zeros(1, 1, 48, 48))


def _saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("copier", [copy.deepcopy, _saved_and_loaded], ids=["deepcopy", "torch.save"])
@pytest.mark.parametrize("kind", ["dit", "unet", "capture"])
def test_a_model_under_tar_or_a_capture_is_not_deep_copied(kind, copier):
    """A deep copy's hooks and processors called back into the original's state: the copy of a DiT with
    until_step=0 was regularized at its step 1 (the original's step 0), silently. It raises; copied after
    remove_tar, the copy is stock and TAR applies to it. torch.save raised pickle's AttributeError naming a
    closure of ours."""
    model = (UNET_FAMILIES["motion"] if kind == "unet" else FAMILIES["wan"]).model()
    if kind == "capture":
        with capture_frame_attention(model, blocks=[0]), pytest.raises(TypeError, match="cannot be deep-copied"):
            copier(model)
        copier(model)  # the capture ended
        return
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)} if kind == "dit" else {1: (1.0, 1.0)}, until_step=0))
    with pytest.raises(TypeError, match="cannot be deep-copied or pickled.*copy or save it before apply_tar, or "
                                        "after remove_tar"):
        copier(model)
    remove_tar(model)
    copied = copier(model)
    assert apply_tar(copied, TARConfig(levels={0: (1.0, 1.0)} if kind == "dit" else {1: (1.0, 1.0)}))


def compiled_runs(family: str, layers: int, compile_model,
                  singles: bool = False) -> Tuple[List[torch.Tensor], List[torch.Tensor], int]:
    """Three calls of a `layers`-block model of `family` under TAR at step 0 only, eager and then compiled by
    `compile_model(model, backend)` (which returns what to call), and the frames torch.compile compiled. With
    `singles`, a model with single-stream blocks too (HunyuanVideo's) gets `layers` + 1 of them: its first single
    block compiles apart from the others (in stock diffusers too), so a recompile per block shows from the third."""
    base = FAMILIES[family].model()
    torch.manual_seed(0)
    single = {"num_single_layers": layers + 1} if singles and "num_single_layers" in base.config else {}
    model = type(base).from_config({**base.config, "num_layers": layers, **single}).eval()
    inputs = FAMILIES[family].inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=0))
    eager = [forward(model, inputs) for _ in range(3)]
    reset_steps(model)
    torch._dynamo.reset()
    counter = CompileCounter()
    target = compile_model(model, counter)
    return eager, [forward(target, inputs) for _ in range(3)], counter.frame_count


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_torch_compile_traces_the_processors_and_keeps_the_step_gate(family):
    """HunyuanVideo passes its rotary embedding to the attention by keyword, which diffusers keeps only where the
    processor's signature names it: compiled, TAR's wrapper showed its own (it was dropped, at every step). The frames
    compiled do not grow with the blocks: a block read its step or index, or broke its graph, and compiled again per
    block (12 frames for 12 blocks, and dynamo's limit of 8 recompiles runs the rest eager). With fullgraph=True:
    the hooks that count the steps on the host run outside the graph (traced, the second call failed on a
    data-dependent guard)."""
    frames = []
    for layers in (1, 2):
        eager, compiled, count = compiled_runs(family, layers, lambda model, backend: torch.compile(
            model, backend=backend, fullgraph=True))
        assert not torch.equal(eager[0], eager[1]) and torch.equal(eager[1], eager[2])  # TAR at step 0 only
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
        frames.append(count)
    assert frames[0] == frames[1], frames


def test_whole_model_compile_with_fullgraph_runs_tar_in_a_pipeline():
    """torch.compile(transformer, fullgraph=True) in a pipeline: TAR's hooks, which count the steps on the host,
    were traced into the graph and raised at the first call (a bare model's, at its second: the test above); they
    run eagerly around the compiled forward, which equals eager TAR's at every step of the pipeline's loop."""
    def run(compile_it):
        pipe = wan22_pipeline(FAMILIES["wan"].model(), None, boundary_ratio=None)
        apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
        if compile_it:
            torch._dynamo.reset()
            pipe.transformer = torch.compile(pipe.transformer, backend="eager", fullgraph=True)
        with torch.no_grad():
            return pipe(prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3),
                        height=32, width=32, num_frames=9, num_inference_steps=3, guidance_scale=5.0,
                        output_type="latent").frames
    assert torch.equal(run(True), run(False))


def test_a_tensor_subclass_override_runs_once_under_tar_mode():
    """TAR's mode calls torch.Tensor's methods written in Python on the tensor (torch.compile cannot trace their
    super() call under a mode); a subclass's override of one, whose super() call reached the mode, ran twice."""
    seen = []

    class Counted(torch.Tensor):
        def unflatten(self, dim, sizes):
            seen.append(dim)
            return super().unflatten(dim, sizes)

    with SDPACalls():
        out = torch.zeros(2, 6).as_subclass(Counted).unflatten(1, (2, 3))
    assert seen == [1] and out.shape == (2, 2, 3)


@pytest.mark.parametrize("family", ["wan", "hunyuan", "ltx"])
def test_regional_compile_with_fullgraph_runs_tar_without_a_graph_break(family, monkeypatch):
    """diffusers' regional compile, ``compile_repeated_blocks(fullgraph=True)``, raised under TAR: in the blocks, the
    step's context variable, Tensor.unflatten handed over by TAR's mode, and frame ids of a length their values
    give are graph breaks. Now each block kind compiles once with TAR and once without, whatever the blocks; and
    the compiled calls read no frame id's value (the processors pass a FrameLayout), where a read in each is a
    host synchronisation on a GPU, which a CUDA graph's capture refuses."""
    frames = []
    for layers in (1, 2):
        def regional(model, backend):
            model.compile_repeated_blocks(fullgraph=True, backend=backend)
            return model
        reads = ValueReads(monkeypatch)
        eager, compiled, count = compiled_runs(family, layers, regional, singles=True)
        assert reads.of_ids() == []
        assert all(torch.equal(a, b) for a, b in zip(compiled, eager))
        frames.append(count)
    assert frames[0] == frames[1], frames


def test_diffusers_layer_skip_of_the_scores_leaves_a_regularized_block_stock_skipped(monkeypatch):
    """diffusers' layer skip of the attention scores (its perturbed-attention guidance) answers the stock processor's
    SDPA call with the values, from a torch function mode around the module: TAR's mode inside it answered the call
    with TAR instead. diffusers finds the skip of a processor class it registered (Wan's is not: registered here).
    A backend that does not call SDPA is refused as without the skip."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip
    from diffusers.hooks._helpers import AttentionProcessorRegistry

    AttentionProcessorRegistry._register()
    wan = type(FAMILIES["wan"].model().blocks[0].attn1.processor)
    monkeypatch.setitem(AttentionProcessorRegistry._registry, wan, AttentionProcessorRegistry.get(AttnProcessor2_0))
    skip = LayerSkipConfig(indices=[0], fqn="blocks", skip_attention=False, skip_attention_scores=True, skip_ff=False)
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=None)
    model = FAMILIES["wan"].model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None, blocks=[1]))
    apply_layer_skip(model, skip)
    expected = forward(model, FAMILIES["wan"].inputs())  # block 0 skipped as without TAR, block 1 regularized
    model = FAMILIES["wan"].model()
    apply_layer_skip(model, skip)
    stock = forward(model, FAMILIES["wan"].inputs())
    apply_tar(model, config)
    assert not torch.equal(expected, stock)
    assert torch.equal(forward(model, FAMILIES["wan"].inputs()), expected)
    # the skip set after apply_tar, of the scores and of the whole attention: diffusers looks up TAR's wrapper,
    # which answers with the entry of the processor it wraps (it raised that DiTTARProcessor is not registered)
    for whole in (False, True):
        later = dataclasses.replace(skip, skip_attention=whole, skip_attention_scores=not whole)
        tar_first, skip_first = FAMILIES["wan"].model(), FAMILIES["wan"].model()
        apply_tar(tar_first, config)
        apply_layer_skip(tar_first, later)
        got = forward(tar_first, FAMILIES["wan"].inputs())
        apply_layer_skip(skip_first, later)
        apply_tar(skip_first, config)
        assert torch.equal(got, forward(skip_first, FAMILIES["wan"].inputs())), whole
        assert torch.equal(got, expected) != whole  # the whole attention skipped is another output
    # the whole attention's skip reads the stock processor under the module's wrappers: set in a capture, with its
    # wrapper inside TAR's or alone (it raised that _Watch is not registered), and after remove_tar, where the
    # module holds the stock processor itself (it raised AttributeError: no .processor)
    whole = dataclasses.replace(skip, skip_attention=True, skip_attention_scores=False)
    stock_skipped = FAMILIES["wan"].model()
    apply_layer_skip(stock_skipped, dataclasses.replace(whole))
    stock_skipped = forward(stock_skipped, FAMILIES["wan"].inputs())
    for tar in (True, False):
        captured = FAMILIES["wan"].model()
        if tar:
            apply_tar(captured, config)
        with capture_frame_attention(captured, blocks=[0, 1]):
            apply_layer_skip(captured, dataclasses.replace(whole))
            assert torch.equal(forward(captured, FAMILIES["wan"].inputs()), got if tar else stock_skipped), tar
    removed = FAMILIES["wan"].model()
    apply_tar(removed, config)
    apply_layer_skip(removed, dataclasses.replace(whole))
    remove_tar(removed)
    assert torch.equal(forward(removed, FAMILIES["wan"].inputs()), stock_skipped)
    # a wrapped class diffusers did not register: the whole attention's skip raises diffusers' error naming it, at
    # the first skipped call (without TAR, apply_layer_skip raises it)
    monkeypatch.delitem(AttentionProcessorRegistry._registry, wan)
    unregistered = FAMILIES["wan"].model()
    apply_tar(unregistered, config)
    apply_layer_skip(unregistered, dataclasses.replace(skip, skip_attention=True, skip_attention_scores=False))
    with pytest.raises(ValueError, match=f"Model class {re.escape(str(wan))} not registered"):
        forward(unregistered, FAMILIES["wan"].inputs())
    # on a backend that does not call SDPA the skip's mode answers nothing: the block computes its attention, and
    # TAR, which cannot run there, raises (it ran stock in silence, neither skipped nor regularized)
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            proc._attention_backend = AttentionBackendName.FLEX
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1: .*\(its attention backend, 'flex', does not call it\)"):
        forward(model, FAMILIES["wan"].inputs())


def test_set_attention_backend_reaches_the_stock_processor_and_remove_tar_keeps_it(monkeypatch):
    fam = FAMILIES["wan"]
    model = fam.model()
    inputs = fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    stock = [proc.processor for proc in processors(model).values() if isinstance(proc, DiTTARProcessor)]
    # set_attention_backend also makes its backend the process's active one: put it back after the test
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    model.set_attention_backend("_native_math")  # every module, attn2 included: outputs move by rounding
    assert all(p._attention_backend == AttentionBackendName._NATIVE_MATH for p in stock)
    regularized = forward(model, inputs)  # still through SDPA: still regularized
    remove_tar(model)
    assert all(m.processor._attention_backend == AttentionBackendName._NATIVE_MATH
               for m in (b.attn1 for b in model.blocks))
    assert (forward(model, inputs) - regularized).abs().max() > 1e-4


def test_a_pipeline_sharing_the_model_is_refused_not_counted_from_the_other_pipeline():
    """TAR applied to one WanPipeline reads that pipeline's scheduler; a second pipeline made with from_pipe (its
    own scheduler, the same transformer) would have run TAR at a frozen step (0 before the first ran, its last
    step after): it raises instead, before and after the first pipeline's run, which is regularized as asked."""
    model = FAMILIES["wan"].model()
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    other = WanPipeline.from_pipe(pipe, scheduler=UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    assert other.transformer is model and other.scheduler is not pipe.scheduler
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    regularized = []
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    with pytest.raises(RuntimeError, match="scheduler of the WanPipeline it was applied to, which is not running"):
        run_wan22(other, 3, [], regularized)
    run_wan22(pipe, 3, [], regularized)
    assert regularized == [step for step in range(2) for _ in range(4)]
    with pytest.raises(RuntimeError, match="another pipeline with a scheduler of its own"):
        run_wan22(other, 3, [], regularized)
    run_wan22(WanPipeline.from_pipe(pipe), 3, [], regularized)  # from_pipe's default: the same scheduler, its steps
    assert regularized == [step for step in range(2) for _ in range(4)]


def test_a_pipeline_built_anew_around_the_model_is_refused():
    """TAR applied to a WanPipeline that is then dropped (a new pipeline built around the same transformer): the
    counted calls went on from the first pipeline's runs, never reset, so every call ran past until_step, stock,
    without a word. It raises, and TAR applied to the new pipeline regularizes its runs' first steps."""
    model = FAMILIES["wan"].model()
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=1)
    apply_tar(wan22_pipeline(model, None, boundary_ratio=None), config)
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    gc.collect()
    regularized = []
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    with pytest.raises(RuntimeError, match="scheduler of the WanPipeline it was applied to, which no longer exists"):
        run_wan22(pipe, 3, [], regularized)
    apply_tar(pipe, config)
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    for _ in range(2):
        run_wan22(pipe, 3, [], regularized)
        assert regularized == [step for step in range(2) for _ in range(4)]


def cogvideox_pipeline():
    model = FAMILIES["cogvideox"].model()
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return model, pipe


def run_cogvideox(pipe, steps=3):
    with torch.no_grad():
        pipe(prompt_embeds=randn(1, 7, 16, seed=2), negative_prompt_embeds=randn(1, 7, 16, seed=3), height=64,
             width=64, num_frames=9, num_inference_steps=steps, guidance_scale=5.0, output_type="latent")


def test_a_pipeline_sharing_the_model_is_refused_where_forward_calls_are_counted():
    """CogVideoX's DDIM keeps no step_index, so TAR counts the forward calls of the pipeline it was applied to
    (one a step: guidance batched). A second pipeline with a scheduler of its own ran at that count, past
    until_step, without TAR and without a word: it raises, before the first pipeline ran (its scheduler never
    set) and after (the count past that run's steps); the first pipeline's runs each count from 0."""
    model, pipe = cogvideox_pipeline()
    other = CogVideoXPipeline.from_pipe(pipe, scheduler=CogVideoXDDIMScheduler())
    other.set_progress_bar_config(disable=True)
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    regularized = []
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    with pytest.raises(RuntimeError, match="scheduler of the CogVideoXPipeline it was applied to, which is not"):
        run_cogvideox(other)
    for _ in range(2):
        regularized.clear()
        run_cogvideox(pipe)
        assert regularized == [step for step in range(2) for _ in range(2)]  # 2 blocks a step
    with pytest.raises(RuntimeError, match="another pipeline with a scheduler of its own"):
        run_cogvideox(other)



def test_where_calls_are_counted_tar_applied_after_a_finished_run_refuses_another_pipeline():
    """The applied pipeline ran (its scheduler set, then left at the end of its run) before apply_tar: another
    pipeline's runs are refused, not counted on from where they would be (they ran at steps 2, 3, no TAR)."""
    model, pipe = cogvideox_pipeline()
    other = CogVideoXPipeline.from_pipe(pipe, scheduler=CogVideoXDDIMScheduler())
    other.set_progress_bar_config(disable=True)
    run_cogvideox(pipe, steps=6)
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    for _ in range(2):
        with pytest.raises(RuntimeError, match="another pipeline with a scheduler of its own"):
            run_cogvideox(other, steps=2)


def run_interrupted_at_loop_1(pipe):
    """A guided run of 6 steps interrupted at loop 1 (the scheduler's step index left at 2)."""
    def stop(p, i, t, kwargs):
        p._interrupt = i == 1
        return {}

    with torch.no_grad():
        pipe(prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3), height=32,
             width=32, num_frames=9, num_inference_steps=6, guidance_scale=5.0, output_type="latent",
             callback_on_step_end=stop)


def test_a_scheduler_left_by_an_interrupted_run_or_only_built_is_in_no_run():
    """TAR applied to a pipeline whose last run was interrupted (its scheduler's step index left part-way), or
    whose scheduler sets its step count when built (IPNDM): a call of another pipeline is refused,
    not run at the stale index or at step 0."""
    model = FAMILIES["wan"].model()
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    other = WanPipeline.from_pipe(pipe, scheduler=UniPCMultistepScheduler(
        prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0))
    run_interrupted_at_loop_1(pipe)
    assert pipe.scheduler.step_index == 2
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    with pytest.raises(RuntimeError, match="another pipeline with a scheduler of its own"):
        run_wan22(other, 3, [], [])
    built = WanPipeline.from_pipe(pipe, scheduler=IPNDMScheduler())
    assert built.scheduler.num_inference_steps is not None
    apply_tar(built, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    with pytest.raises(RuntimeError, match="not running a denoising loop"):
        forward(model, FAMILIES["wan"].inputs())


def test_capture_given_the_pipeline_leaves_the_count_of_tar_on_the_bare_model():
    """TAR applied to the bare model counts its forward calls across runs; a capture given the pipeline reads
    that pipeline's scheduler while it is open, and no longer once closed (it restarted TAR's count at each of
    the pipeline's runs from then on)."""
    model = FAMILIES["wan"].model()
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    regularized = []
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    run_wan22(pipe, 2, [], regularized)  # four calls: steps 0 to 3
    assert regularized == [step for step in range(2) for _ in range(2)]
    with capture_frame_attention(pipe, blocks=[0]):
        pass
    run_wan22(pipe, 2, [], regularized)  # steps 4 to 7: none regularized
    assert regularized == []


@pytest.mark.parametrize("applied", ["before set_timesteps", "after set_timesteps"])
def test_a_hand_written_loop_counts_steps_from_its_begin_index(applied):
    """A loop of one's own over the pipeline's scheduler (set_begin_index(0)) that does not call the model at
    iteration 1 (as a cache skipping a step does): the call at iteration 2 is step 2, read from the scheduler.
    TAR applied after set_timesteps reads the run in progress (it raised)."""
    model = FAMILIES["wan"].model()
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    if applied == "before set_timesteps":
        apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    inputs = FAMILIES["wan"].inputs()
    latents = inputs["hidden_states"]
    pipe.scheduler.set_timesteps(4)
    pipe.scheduler.set_begin_index(0)
    if applied == "after set_timesteps":
        apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    regularized = []
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    for i, t in enumerate(pipe.scheduler.timesteps):
        out = forward(model, dict(inputs, hidden_states=latents)) if i != 1 else torch.zeros_like(latents)
        latents = pipe.scheduler.step(out, t, latents, return_dict=False)[0]
    assert regularized == [step for step in (0, 2, 3) for _ in range(2)]


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_apply_tar_again_in_a_step_callback_goes_on_with_the_run(family):
    """Applying again replaces the config, also from callback_on_step_end in the middle of a run: the steps go
    on from the run's, read from the scheduler's step_index (Wan; it raised: the scheduler's timesteps were those
    it had when applied) or counted (CogVideoX's DDIM; the count restarted at 0)."""
    if family == "wan":
        model = FAMILIES["wan"].model()
        pipe = wan22_pipeline(model, None, boundary_ratio=None)
        text, size = 5, 32
    else:
        model, pipe = cogvideox_pipeline()
        text, size = 7, 64
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    regularized = []

    def again(p, i, t, kwargs):
        if i == 0:
            apply_tar(p, TARConfig(levels={0: (1.0, 2.0)}, until_step=None))
            record_tar_calls(model, regularized, lambda proc, kwargs: (proc.state.step, kwargs["strength"]))
        return {}

    record_tar_calls(model, regularized, lambda proc, kwargs: (proc.state.step, kwargs["strength"]))
    with torch.no_grad():
        pipe(prompt_embeds=randn(1, text, 16, seed=2), negative_prompt_embeds=randn(1, text, 16, seed=3),
             height=size, width=size, num_frames=9, num_inference_steps=3, guidance_scale=5.0, output_type="latent",
             callback_on_step_end=again)
    assert sorted(set(regularized)) == [(0, 1.0), (1, 2.0), (2, 2.0)]


@pytest.mark.parametrize("strength, applied_at", [(0.6, None), (0.6, 0), (1.0, 3)])
def test_video_to_video_counts_its_loop_from_where_it_starts_the_schedule(strength, applied_at):
    """WanVideoToVideoPipeline at strength 0.6 runs the last 6 of 10 timesteps without set_begin_index, so its
    scheduler's step_index starts at 5 (then 6, 7, ...): the steps are still the loop's 0, 1, 2, 3 (until_step=3:
    four iterations of two calls, two blocks each, regularized). Applied first from a step callback (after loop 0,
    or after loop 3 at strength 1), the next call is the loop's next index: steps 1-3, or none (the count started
    at 0 there: steps 0-2 at loops 1-3, steps 0-3 at loops 4-7)."""
    model = FAMILIES["wan"].model()
    pipe = WanVideoToVideoPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=model,
                                   scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    regularized = []
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=3)

    def apply():
        apply_tar(pipe, config)
        record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)

    def on_step_end(p, i, t, kwargs):
        if i == applied_at:
            apply()
        return {}

    if applied_at is None:
        apply()
    with torch.no_grad():
        pipe(latents=randn(1, 4, 3, 8, 8, seed=1), prompt_embeds=randn(1, 5, 16, seed=2),
             negative_prompt_embeds=randn(1, 5, 16, seed=3), height=64, width=64, num_inference_steps=10,
             strength=strength, guidance_scale=5.0, output_type="latent", callback_on_step_end=on_step_end)
    first = 0 if applied_at is None else applied_at + 1
    assert regularized == [step for step in range(first, 4) for _ in range(4)]


@pytest.mark.parametrize("then", ["the model alone", "a pipeline from from_pipe", "a loop of one's own"])
def test_after_an_interrupted_run_the_model_alone_is_refused_a_new_run_is_not(then):
    """The pipeline's run was interrupted at loop 1 (its scheduler's step index left at 2 of 6): the model called
    alone is refused, as after a finished run (it ran, regularized as step 2); a run of a pipeline made with
    from_pipe (sharing the scheduler) and a loop of one's own over that scheduler are new runs, counted from 0."""
    model = FAMILIES["wan"].model()
    pipe = wan22_pipeline(model, None, boundary_ratio=None)
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    run_interrupted_at_loop_1(pipe)
    assert pipe.scheduler.step_index == 2 and pipe._interrupt
    regularized = []
    record_tar_calls(model, regularized, lambda proc, kwargs: proc.state.step)
    if then == "the model alone":
        with pytest.raises(RuntimeError, match="not running a denoising loop"):
            forward(model, FAMILIES["wan"].inputs())
        return
    if then == "a pipeline from from_pipe":
        run_wan22(WanPipeline.from_pipe(pipe), 2, [], regularized)
        assert regularized == [step for step in range(2) for _ in range(4)]  # two calls of two blocks a step
        return
    inputs = FAMILIES["wan"].inputs()
    latents = inputs["hidden_states"]
    pipe.scheduler.set_timesteps(3)
    pipe.scheduler.set_begin_index(0)
    for t in pipe.scheduler.timesteps:
        out = forward(model, dict(inputs, hidden_states=latents))
        latents = pipe.scheduler.step(out, t, latents, return_dict=False)[0]
    assert regularized == [step for step in range(3) for _ in range(2)]


def test_wan22_pipeline_with_only_the_low_noise_expert_counts_scheduler_steps():
    """Wan 2.2 with transformer=None and boundary_ratio=1.0: the low-noise expert runs every step, guidance as
    two calls per step; until_step=0 regularizes both calls of step 0 and no call of step 1."""
    fam = FAMILIES["wan"]
    low = fam.model()
    pipe = wan22_pipeline(None, low, boundary_ratio=1.0)
    names = apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=0))
    assert names == [f"transformer_2.{name}" for name in fam.modules]
    forwards, regularized = [], []
    low.register_forward_pre_hook(lambda *_: forwards.append(len(regularized)))
    record_tar_calls(low, regularized, lambda proc, kwargs: proc.name)

    run_wan22(pipe, 2, forwards, regularized)
    blocks = len(fam.modules)
    # calls 0 and 1 (step 0) regularize every block, calls 2 and 3 (step 1) none
    assert forwards == [0, blocks, 2 * blocks, 2 * blocks] and len(regularized) == 2 * blocks
    run_wan22(pipe, 2, forwards, regularized)  # the next run starts at step 0 again
    assert forwards == [0, blocks, 2 * blocks, 2 * blocks]
    reset_steps(pipe)
    remove_tar(pipe)
    assert not any(isinstance(p, DiTTARProcessor) for p in processors(low).values())


def parameter_grads(model):
    return {name: p.grad for name, p in model.named_parameters()}


def train_two_steps(model, inputs):
    """Two forward calls (steps 0 and 1), then one backward pass through both."""
    first = model(**inputs, return_dict=False)[0]
    second = model(**inputs, return_dict=False)[0]
    (first.square().mean() + second.mean()).backward()
    return first.detach(), second.detach(), parameter_grads(model)


@pytest.mark.parametrize("family", ALL)
def test_gradient_checkpointing_recomputes_each_block_as_its_forward_call_ran_it(family):
    """diffusers' gradient checkpointing recomputes blocks in the backward pass, after the forward call returned
    and here after a second call (step 1, stock with until_step=0) advanced the step: outputs and every
    parameter gradient equal those without checkpointing."""
    fam = FAMILIES[family]
    inputs = fam.inputs()
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=0)
    plain = forward(fam.model(), inputs)
    model = fam.model()
    apply_tar(model, config)
    first, second, grads = train_two_steps(model, inputs)
    assert (first - plain).abs().max() > 1e-4 and torch.equal(second, plain)

    model = fam.model()
    model.enable_gradient_checkpointing()
    apply_tar(model, config)
    checkpointed = train_two_steps(model, inputs)
    assert model.is_gradient_checkpointing
    torch.testing.assert_close(checkpointed[0], first, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(checkpointed[1], second, atol=1e-6, rtol=1e-6)
    assert grads.keys() == checkpointed[2].keys() and all(g is not None for g in grads.values())
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_gradient_checkpointing_enabled_after_apply_tar_and_remove_tar_gives_its_function_back():
    fam = FAMILIES["wan"]
    inputs = fam.inputs()
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=None)
    model = fam.model()
    apply_tar(model, config)
    out = model(**inputs, return_dict=False)[0]
    out.square().mean().backward()
    grads = parameter_grads(model)

    model = fam.model()
    apply_tar(model, config)
    model.enable_gradient_checkpointing()
    stock_function = model._gradient_checkpointing_func
    checkpointed = model(**inputs, return_dict=False)[0]
    checkpointed.square().mean().backward()
    torch.testing.assert_close(checkpointed, out, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, atol=1e-6, rtol=1e-5, msg=name)
    assert model._gradient_checkpointing_func is not stock_function  # bound to each forward call's state
    remove_tar(model)
    assert model._gradient_checkpointing_func is stock_function


# fuse_qkv_projections replaces CogVideoX's processors; the others' (Wan, LTX, HunyuanVideo) read the fused
# projections themselves; Mochi has no fused projections
REPLACEMENTS = {
    "fuse_qkv_projections": lambda model: model.fuse_qkv_projections(),
    "set_attn_processor": lambda model: model.set_attn_processor(CogVideoXAttnProcessor2_0()),
}


@pytest.mark.parametrize("family, replace", [("cogvideox", "fuse_qkv_projections"), ("cogvideox", "set_attn_processor"),
                                             ("wan", "fuse_qkv_projections"), ("hunyuan", "fuse_qkv_projections")])
def test_processors_replaced_after_apply_tar_keep_tar(family, replace, monkeypatch):
    """apply_tar then a processor replacement: the output of the other order (replacement, then apply_tar), not
    the stock one; remove_tar gives back the replacement's processors."""
    fam = FAMILIES[family]
    inputs = fam.inputs()
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=None)
    model = fam.model()
    REPLACEMENTS[replace](model)
    replaced = processors(model)
    stock = forward(model, inputs)
    apply_tar(model, config)
    oracle = forward(model, inputs)
    assert (oracle - stock).abs().max() > 1e-4

    model = fam.model()
    apply_tar(model, config)
    REPLACEMENTS[replace](model)
    # taking the new processors' place costs no model walk
    monkeypatch.setattr(install, "dit_attention_modules", None)
    assert torch.equal(forward(model, inputs), oracle)
    calls = record(model)
    forward(model, inputs)
    assert sorted({c[0] for c in calls}) == sorted(fam.modules)
    for name, proc in processors(model).items():
        if name in fam.modules:
            assert isinstance(proc, DiTTARProcessor) and type(proc.processor) is type(replaced[name])
        else:
            assert type(proc) is type(replaced[name])
    remove_tar(model)
    assert {n: type(p) for n, p in processors(model).items()} == {n: type(p) for n, p in replaced.items()}
    assert torch.equal(forward(model, inputs), stock)


def test_unfuse_qkv_projections_after_fusing_under_tar_keeps_tar():
    """CogVideoX's unfuse_qkv_projections sets back the processors it saved when fusing: TAR's own."""
    fam = FAMILIES["cogvideox"]
    inputs = fam.inputs()
    model = fam.model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    regularized = forward(model, inputs)
    model.fuse_qkv_projections()
    forward(model, inputs)
    model.unfuse_qkv_projections()
    calls = record(model)
    assert torch.equal(forward(model, inputs), regularized) and len(calls) == len(fam.modules)
    remove_tar(model)
    assert all(type(p) is CogVideoXAttnProcessor2_0 for n, p in processors(model).items() if n in fam.modules)


def test_unfuse_qkv_projections_after_remove_tar_runs_stock():
    """Fused under TAR, then remove_tar, then unfuse_qkv_projections: diffusers sets back the processors it saved
    when fusing, TAR's, whose state remove_tar detached; they run the stock processor (the model's stock output bit
    for bit), and TAR applied again regularizes as before."""
    fam = FAMILIES["cogvideox"]
    inputs = fam.inputs()
    model = fam.model()
    stock = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    regularized = forward(model, inputs)
    model.fuse_qkv_projections()
    remove_tar(model)
    model.unfuse_qkv_projections()
    assert torch.equal(forward(model, inputs), stock)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    assert torch.equal(forward(model, inputs), regularized)


SERVED = re.escape(", ".join(SDPA_BACKENDS))


@pytest.mark.parametrize("backend,why", [
    (None, r"a processor of its own, or a non-native attention backend set for every model"),
    ("native", r"its backend, 'native', calls it, but the processor does not call its backend"),
    ("_native_math", r"its backend, '_native_math', calls it, but the processor does not call its backend"),
])
def test_the_error_for_a_call_without_sdpa_says_which_backend_the_processor_has(backend, why):
    class Processor:  # computes its attention without scaled_dot_product_attention
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return attn.to_out[0](attn.to_v(hidden_states))

    class Dispatching(Processor):  # with an attention backend, as diffusers' processors that use the dispatcher
        _attention_backend = None

    processor = Processor() if backend is None else Dispatching()
    if backend is not None:
        processor._attention_backend = AttentionBackendName(backend)
    model = FAMILIES["wan"].model()
    model.blocks[0].attn1.set_processor(processor)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, blocks=[0]))
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1: the processor computes its attention without torch\.nn"
                                           rf"\.functional\.scaled_dot_product_attention \({why}\), so TAR could not "
                                           rf"run there; the diffusers attention backends that call it: {SERVED}"):
        forward(model, FAMILIES["wan"].inputs())


def test_the_backends_tar_serves_are_those_whose_function_calls_sdpa():
    """Each diffusers attention backend, classified by what its registered function runs: those that call
    scaled_dot_product_attention are SDPA_BACKENDS (served); a backend diffusers adds is classified here too."""
    registry = _AttentionBackendRegistry._backends
    calls_sdpa = {backend.value for backend in AttentionBackendName
                  if "torch.nn.functional.scaled_dot_product_attention(" in inspect.getsource(registry[backend])}
    assert calls_sdpa == set(SDPA_BACKENDS)


def regularized_wan():
    """The tiny Wan with TAR on every block, its inputs, and its output on the native backend."""
    fam = FAMILIES["wan"]
    model, inputs = fam.model(), fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    return model, inputs, forward(model, inputs)


@pytest.mark.parametrize("backend", [backend.value for backend in AttentionBackendName])
def test_every_attention_backend_is_served_or_raises_before_its_kernel_runs(backend, monkeypatch):
    """A backend set on the regularized processors (as set_attention_backend does; most cannot be installed on a
    CPU): one of SDPA_BACKENDS gives the native backend's TAR output bit for bit, any other raises and its
    kernel never runs."""
    model, inputs, native = regularized_wan()
    if backend not in SDPA_BACKENDS:
        def kernel(**kwargs):
            raise AssertionError(f"the {backend} kernel ran")
        monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName(backend), kernel)
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            proc._attention_backend = AttentionBackendName(backend)
    if backend in SDPA_BACKENDS:
        assert torch.equal(forward(model, inputs), native)
        return
    with pytest.raises(RuntimeError, match=rf"blocks\.0\.attn1: .*\(its attention backend, '{backend}', does not call "
                                           rf"it\), so TAR could not run there; .*call it: {SERVED}"):
        forward(model, inputs)


def test_the_active_backend_decides_for_a_processor_without_its_own(monkeypatch):
    """The backend of the attention_backend context (or DIFFUSERS_ATTN_BACKEND) runs a dispatching processor that
    has none set (Wan's); a processor that calls scaled_dot_product_attention itself (CogVideoX's) is served on
    any backend."""
    model, inputs, native = regularized_wan()
    with attention_backend("_native_math"):  # the cross-attention, not regularized, takes the math kernel: rounding
        torch.testing.assert_close(forward(model, inputs), native, atol=2e-6, rtol=1e-5)
    fam = FAMILIES["cogvideox"]
    cogvideox, cogvideox_inputs = fam.model(), fam.inputs()
    apply_tar(cogvideox, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    expected = forward(cogvideox, cogvideox_inputs)
    # what the context sets; flash-attn is not installed here
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName.FLASH)
    with pytest.raises(RuntimeError, match=r"blocks\.0\.attn1: .*its attention backend, 'flash', does not call it"):
        forward(model, inputs)
    assert torch.equal(forward(cogvideox, cogvideox_inputs), expected)
    for proc in processors(cogvideox).values():
        if isinstance(proc, DiTTARProcessor):
            proc._attention_backend = AttentionBackendName.FLASH  # set_attention_backend("flash"), where it installs
    assert torch.equal(forward(cogvideox, cogvideox_inputs), expected)


def test_the_docs_say_which_backends_tar_serves_and_which_raise():
    page = (pathlib.Path(__file__).resolve().parents[2] / "docs" / "dits.md").read_text(encoding="utf-8")
    rows = dict(re.findall(r"^\| (served|raises)[^|]*\| (.*) \|$", page, flags=re.M))
    served, raising = (set(re.findall(r"`(\w+)`", rows[kind])) for kind in ("served", "raises"))
    assert served == set(SDPA_BACKENDS)
    assert raising == {backend.value for backend in AttentionBackendName} - served


def test_the_speculative_forward_is_chosen_per_call_from_the_last_calls_flag_rate(monkeypatch):
    """On the Triton kernels every regularized call speculates and counts its flagged rows; the next forward
    call reads the rate and runs two passes past Speculation.BREAK_EVEN, and either form gives the same output
    bit for bit."""
    import vstar_kernels as vk
    from vstar_kernels.diffusers.install import STATE_ATTR

    fam = FAMILIES["wan"]
    model = fam.model()
    inputs = fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None, backend="triton"))
    state = getattr(model, STATE_ATTR)
    calls = record(model)
    first = forward(model, inputs)
    assert calls and all(c[4]["speculate"] is True and c[4]["flags"] is calls[0][4]["flags"] for c in calls)
    flagged, rows = calls[0][4]["flags"].tolist()
    assert rows == sum(c[1].shape[0] * c[1].shape[1] * c[1].shape[2] for c in calls) and 0 <= flagged <= rows
    monkeypatch.setattr(vk.Speculation, "BREAK_EVEN", -1.0)  # any rate is above it: the next call runs two passes
    calls.clear()
    second = forward(model, inputs)
    assert state.speculation.rate == flagged / rows
    assert calls and all(c[4]["speculate"] is False for c in calls)
    assert torch.equal(first, second)


# The lean forward takes head dims of 16, 32, 64 or 128: Wan (no text in its self-attention) and CogVideoX (text
# first) built with head dim 16.
LEAN_MODELS = {
    "wan": (lambda: WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32), wan_inputs),
    "cogvideox": (lambda: CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4,
                                                      out_channels=4, time_embed_dim=4, text_embed_dim=16, num_layers=2,
                                                      sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
                                                      max_text_seq_length=7), cogvideox_inputs),
}


@pytest.mark.parametrize("family", list(LEAN_MODELS))
def test_lean_backend_through_the_dit_processors(family):
    """TARConfig(backend="triton-lean") reaches the processors: the frame ids they build are the regular layout the
    lean forward takes, and the model's output is the Triton backend's to rounding (and not stock). In bfloat16:
    the lean forward refuses float32."""
    build, inputs = LEAN_MODELS[family]
    outs = {}
    for backend in ("triton", "triton-lean", None):
        torch.manual_seed(0)
        model = build().eval().to(torch.bfloat16)
        if backend:
            apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None, backend=backend))
        outs[backend] = forward(model, {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point()
                                        else v for k, v in inputs().items()}).float()
    atol, rtol = TOLERANCES[torch.bfloat16]
    torch.testing.assert_close(outs["triton-lean"], outs["triton"], atol=atol, rtol=rtol)
    assert (outs["triton-lean"] - outs[None]).abs().max() > 1e-2


@pytest.mark.parametrize("family, inputs", [
    ("wan", lambda: wan_inputs(frames=1)), ("cogvideox", lambda: cogvideox_inputs(frames=1)),
    ("hunyuan", lambda: dict(FAMILIES["hunyuan"].inputs(), hidden_states=randn(BATCH, 4, 1, 4, 4, seed=1))),
    ("mochi", lambda: dict(FAMILIES["mochi"].inputs(), hidden_states=randn(BATCH, 4, 1, 8, 8, seed=1)))])
def test_a_call_with_one_latent_frame_runs_stock_and_says_so(family, inputs):
    """One latent frame (an image from a video DiT): TAR needs two frames. Where text shares the attention
    (CogVideoX, HunyuanVideo, Mochi) its bias would only pull the frame's attention off the text, which the output
    showed; such calls run stock, bit for bit, with a warning."""
    fam = FAMILIES[family]
    model = fam.model()
    plain = forward(model, inputs())
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    calls = record(model)
    with pytest.warns(UserWarning, match="one latent frame of video"):
        assert torch.equal(forward(model, inputs()), plain)
    assert not calls
    regularized = forward(model, fam.inputs())  # the family's inputs have several frames: TAR runs there
    remove_tar(model)
    assert calls and not torch.equal(regularized, forward(model, fam.inputs()))
