"""capture_frame_attention on tiny random video DiTs (CPU): maps, and the share of rows whose max lies outside
their own frame, against a float64 evaluation on the modules' q/k."""

import contextlib

import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline, FlowMatchEulerDiscreteScheduler, LTXPipeline

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import FrameAttentionMaps, apply_tar, capture_frame_attention, capture_temporal_attention
from vstar_kernels.diffusers.steps import StepTracker

from ..helpers import rows_outside64
from .tiny_dit_models import (BATCH, FAMILIES, expected_frames, expected_key_mask, forward, frame_map64, randn,
                              frame_tar_probabilities64, processors, record, spied_plain_run)
from .tiny_video_models import FAMILIES as UNET_FAMILIES
from .tiny_video_models import one_torch_thread  # noqa: F401 (an autouse fixture)


def expected_map(family, calls, sigma=None, strength=0.0):
    """The (F, F) map of one module's calls [(q, k), ...] in float64, averaged per query-frame row."""
    total, rows = None, 0
    for index, (q, k) in enumerate(calls):
        frames = expected_frames(family, k.shape[2])
        mask = expected_key_mask(family, k.shape[2])
        p = frame_tar_probabilities64(q, k, frames, sigma=sigma or 1.0, strength=strength, key_mask=mask)
        part = frame_map64(p, frames)
        total = part if total is None else total + part
        rows += q.shape[0] * q.shape[1] * family.per_frame
    return total / rows


def expected_share(family, calls):
    """(H,) float64: per head, the share of the video query rows of one module's calls [(q, k), ...] whose max
    lies outside their own frame and the text."""
    outside, rows = 0, 0
    for q, k in calls:
        frames = expected_frames(family, k.shape[2])
        flagged = rows_outside64(q, k, frames, frames, key_mask=expected_key_mask(family, k.shape[2]))
        outside = outside + flagged[..., frames >= 0].sum(dim=(0, 2))
        rows += q.shape[0] * int((frames >= 0).sum())
    return outside.double() / rows


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan", "mochi"])
def test_maps_of_plain_attention_match_float64(family):
    fam = FAMILIES[family]
    model, inputs, plain, seen = spied_plain_run(fam)
    before = processors(model)
    with capture_frame_attention(model) as maps:
        assert torch.equal(forward(model, inputs), plain)
    assert processors(model) == before and all(p is before[n] for n, p in processors(model).items())
    assert sorted(maps) == sorted((name, 0) for name in fam.modules) and isinstance(maps, FrameAttentionMaps)
    for name in fam.modules:
        ref = expected_map(fam, seen[name])
        torch.testing.assert_close(maps[(name, 0)], ref, atol=1e-5, rtol=1e-5, msg=name)
        share = maps.max_outside_own_frame((name, 0))
        assert share.shape == (2,) and torch.equal(share, expected_share(fam, seen[name])), name
        if fam.text == "none":
            torch.testing.assert_close(maps[(name, 0)].sum(1), torch.ones(fam.frames, dtype=torch.float64))


def before_processor(fam):
    """The stock processor of the family's first regularized module."""
    return dict(fam.model().named_modules())[fam.modules[0]].processor


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_maps_of_regularized_attention_match_float64(family):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None, blocks=[0]))
    tar_out = forward(model, inputs)
    calls = record(model)
    with capture_frame_attention(model, blocks=[0, 1]) as maps:
        assert torch.equal(forward(model, inputs), tar_out)
    assert isinstance(dict(model.named_modules())[fam.modules[0]].processor.processor, type(before_processor(fam)))
    regularized = [(q, k) for name, q, k, *_ in calls if name == fam.modules[0]]
    # steps count from apply_tar on a bare model: the captured call is the second
    torch.testing.assert_close(maps[(fam.modules[0], 1)], expected_map(fam, regularized, 1.0, 1.0),
                               atol=1e-5, rtol=1e-5)
    # the max of the unbiased scores, with TAR as without
    assert torch.equal(maps.max_outside_own_frame((fam.modules[0], 1)), expected_share(fam, regularized))
    assert sorted(maps) == sorted((name, 1) for name in fam.modules[:2])


def test_a_call_with_one_latent_frame_is_recorded_as_it_ran_stock():
    """TAR runs a call of one latent frame stock (test_dit_models); the map records what ran: where text shares the
    attention (CogVideoX), TAR's bias would have pulled the frame's attention off the text in the map alone."""
    fam = FAMILIES["cogvideox"]
    inputs = dict(fam.inputs(), hidden_states=randn(BATCH, 1, 4, 8, 8, seed=1))
    recorded = []
    for tar in (False, True):
        model = fam.model()
        if tar:
            apply_tar(model, TARConfig(levels={0: (1.0, 2.0)}, until_step=None))
        with pytest.warns(UserWarning, match="one latent frame") if tar else contextlib.nullcontext(), \
                capture_frame_attention(model, cfg=False) as maps:
            forward(model, inputs)
        recorded.append({key: maps[key] for key in maps})
    assert recorded[0].keys() == recorded[1].keys() and len(recorded[0]) == 2
    for key, plain in recorded[0].items():
        assert plain.shape == (1, 1) and 0.5 < plain.item() < 0.9, key  # the rest of the attention: the text
        assert torch.equal(recorded[1][key], plain), key


def test_batched_guidance_records_the_conditional_half_and_steps_filter():
    fam = FAMILIES["cogvideox"]
    model = fam.model()
    inputs = fam.inputs()
    half = {k: v[BATCH // 2:] for k, v in inputs.items()}
    with capture_frame_attention(model, cfg=True, steps=[1]) as maps:
        forward(model, inputs)
        forward(model, inputs)
    with capture_frame_attention(model) as alone:
        forward(model, half)
    assert maps.steps() == [1] and alone.steps() == [0]
    for name in fam.modules:
        torch.testing.assert_close(maps[(name, 1)], alone[(name, 0)], atol=1e-5, rtol=1e-5)
        assert torch.equal(maps.max_outside_own_frame((name, 1)), alone.max_outside_own_frame((name, 0)))
    with pytest.raises(KeyError):
        maps.max_outside_own_frame((fam.modules[0], 0))  # step 0 was not recorded


def test_a_step_that_skips_the_unconditional_branch_records_the_conditional_call():
    """diffusers' FasterCache skips the unconditional branch in some steps of batched guidance, its hook passing the
    blocks the conditional half of the model's batch: that call is the conditional branch, recorded whole (it was
    refused as an odd batch; with two videos a prompt it would have dropped the first)."""
    from diffusers import FasterCacheConfig, apply_faster_cache

    fam = FAMILIES["cogvideox"]
    model = fam.model()
    apply_faster_cache(model, FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=lambda: 500, attention_weight_callback=lambda _: 0.3,
        unconditional_batch_skip_range=5, unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BFCHW",
        is_guidance_distilled=False))
    inputs = fam.inputs()
    with torch.no_grad(), capture_frame_attention(model, cfg=True, steps=[2]) as maps:
        for _ in range(3):
            forward(model, inputs)  # step 2: the conditional half alone, its attention computed
    plain = fam.model()
    with torch.no_grad(), capture_frame_attention(plain) as alone:
        forward(plain, {k: v[BATCH // 2:] for k, v in inputs.items()})
    name = fam.modules[0]
    torch.testing.assert_close(maps[(name, 2)], alone[(name, 0)], atol=1e-5, rtol=1e-5)


def run_ltx_pipeline(pipe, guidance_scale):
    """A real LTXPipeline run (prompt embeddings in, latents out): 2 latent frames of 2 x 2 tokens, 2 steps."""
    pipe(prompt_embeds=randn(1, 5, 16, seed=5), prompt_attention_mask=torch.ones(1, 5),
         negative_prompt_embeds=randn(1, 5, 16, seed=6), negative_prompt_attention_mask=torch.ones(1, 5), num_frames=9,
         height=64, width=64, num_inference_steps=2, guidance_scale=guidance_scale, output_type="latent",
         generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("guidance_scale", [3.0, 1.0])
def test_pipeline_guidance_is_read_when_the_pipeline_runs(guidance_scale):
    """cfg=None reads the pipeline's do_classifier_free_guidance at each call (a diffusers pipeline sets it only when
    it runs; before, the property has nothing to read): with guidance the conditional half is recorded, as cfg=True
    records it; without, the one sequence, as cfg=False."""
    pipe = LTXPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                       transformer=FAMILIES["ltx"].model())
    pipe.set_progress_bar_config(disable=True)
    with capture_frame_attention(pipe, steps=[1]) as read:
        run_ltx_pipeline(pipe, guidance_scale)
    with capture_frame_attention(pipe, steps=[1], cfg=guidance_scale > 1) as given:
        run_ltx_pipeline(pipe, guidance_scale)
    assert sorted(read) == sorted(given) and len(read) == 2
    for key in read:
        assert torch.equal(read[key], given[key])
        assert torch.equal(read.max_outside_own_frame(key), given.max_outside_own_frame(key))
    if guidance_scale > 1:  # both halves give another map
        with capture_frame_attention(pipe, steps=[1], cfg=False) as both:
            run_ltx_pipeline(pipe, guidance_scale)
        assert not torch.equal(both[key], given[key])


def test_a_wan22_pipeline_records_both_experts():
    """Wan 2.2's two experts, each step run by one (the high-noise expert steps 0-1, the low-noise one 2-3, guidance
    as two calls a step): both are recorded, named as apply_tar names them, and each map is the one a capture of
    that expert alone at that call records."""
    from .test_dit_models import wan22_pipeline

    fam = FAMILIES["wan"]
    pipe = wan22_pipeline(fam.model(), fam.model(), boundary_ratio=0.8)
    pipe.set_progress_bar_config(disable=True)
    calls = {"transformer": [], "transformer_2": []}
    for attr in calls:
        getattr(pipe, attr).register_forward_pre_hook(
            lambda m, args, kwargs, seen=calls[attr]: seen.append(kwargs), with_kwargs=True)
    with torch.no_grad(), capture_frame_attention(pipe, blocks=[0]) as maps:
        pipe(prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3), height=32,
             width=32, num_frames=9, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    assert sorted(maps) == [("transformer.blocks.0.attn1", 0), ("transformer.blocks.0.attn1", 1),
                            ("transformer_2.blocks.0.attn1", 2), ("transformer_2.blocks.0.attn1", 3)]
    assert [len(c) for c in calls.values()] == [4, 4]  # two steps each, two calls a step
    expert = pipe.transformer_2
    with torch.no_grad(), capture_frame_attention(expert, blocks=[0]) as alone:  # a bare model: a step a call
        for kwargs in calls["transformer_2"][:2]:  # its first step (2): the conditional and unconditional calls
            expert(**kwargs)
    both = (alone[("blocks.0.attn1", 0)] + alone[("blocks.0.attn1", 1)]) / 2  # the two calls' tokens alike
    torch.testing.assert_close(maps[("transformer_2.blocks.0.attn1", 2)], both, atol=1e-12, rtol=1e-12)


def test_a_pipeline_without_guidance_needs_no_cfg():
    """A pipeline of a family that batches guidance, with no guidance_scale to give (LTX-2's distilled DFR
    pipelines): the capture takes cfg=False, as for a model."""
    model = FAMILIES["ltx"].model()

    class Distilled:  # a pipeline's transformer and a __call__ without guidance_scale
        transformer = model

        def __call__(self, prompt_embeds, num_inference_steps=8):
            pass

    with torch.no_grad(), capture_frame_attention(Distilled(), blocks=[0]) as maps:
        forward(model, FAMILIES["ltx"].inputs())
    with torch.no_grad(), capture_frame_attention(model, blocks=[0]) as alone:
        forward(model, FAMILIES["ltx"].inputs())
    assert sorted(maps) == sorted(alone) and all(torch.equal(maps[key], alone[key]) for key in alone)


def test_a_pipeline_that_batches_guidance_without_saying_so_needs_cfg():
    """CogVideoX's pipelines batch guidance and keep whether they do in a local: no cfg, no capture (both halves
    would be averaged as one batch); with cfg given it records."""
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=FAMILIES["cogvideox"].model(),
                             scheduler=CogVideoXDDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="CogVideoXPipeline batches guidance but does not say when: pass cfg=True"):
        with capture_frame_attention(pipe):
            pass
    with capture_frame_attention(pipe, cfg=True, steps=[0]) as maps:
        pipe(prompt_embeds=randn(1, 7, 16, seed=5), negative_prompt_embeds=randn(1, 7, 16, seed=6), num_frames=9,
             height=64, width=64, num_inference_steps=2, guidance_scale=6.0, output_type="latent")
    assert maps.steps() == [0]


def test_a_block_under_diffusers_layer_skip_of_the_scores_is_not_recorded(monkeypatch):
    """diffusers' layer skip of the scores answers the stock processor's SDPA call with the values, from a torch
    function mode around the module: the capture's listener inside it recorded a softmax map the model did not
    compute. diffusers finds the skip of a processor class it registered (Wan's is not: registered here)."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip
    from diffusers.hooks._helpers import AttentionProcessorRegistry
    from diffusers.models.attention_processor import AttnProcessor2_0

    fam = FAMILIES["wan"]
    model = fam.model()
    AttentionProcessorRegistry._register()
    monkeypatch.setitem(AttentionProcessorRegistry._registry, type(model.blocks[0].attn1.processor),
                        AttentionProcessorRegistry.get(AttnProcessor2_0))
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="blocks", skip_attention=False,
                                            skip_attention_scores=True, skip_ff=False))
    with capture_frame_attention(model) as maps:
        forward(model, fam.inputs())
    assert sorted(maps) == [(name, 0) for name in fam.modules if not name.startswith("blocks.0.")]


def test_capture_errors_name_the_problem():
    model = FAMILIES["wan"].model()
    with pytest.raises(ValueError, match=r"blocks \[5\] do not exist in WanTransformer3DModel: it has blocks 0\.\.1"):
        with capture_frame_attention(model, blocks=[5]):
            pass
    with pytest.raises(TypeError, match="cfg must be a bool"):
        with capture_frame_attention(model, cfg="yes"):
            pass
    with pytest.raises(ValueError, match="not a supported video DiT"):
        with capture_frame_attention(UNET_FAMILIES["unet3d"].model()):
            pass
    with pytest.raises(ValueError, match="odd batch"):
        with capture_frame_attention(model, cfg=True):
            forward(model, {k: v[:1] for k, v in FAMILIES["wan"].inputs().items()})
    assert not model._forward_pre_hooks and not model._forward_hooks

    def no_sdpa(attn, hidden_states, *args, **kwargs):
        return attn.to_out[0](attn.to_v(hidden_states))
    model.blocks[1].attn1.set_processor(no_sdpa)
    with pytest.raises(RuntimeError, match="blocks.1.attn1.*could not be recorded.*native"):
        with capture_frame_attention(model, blocks=[1]):
            forward(model, FAMILIES["wan"].inputs())
    assert model.blocks[1].attn1.processor is no_sdpa


def test_a_holder_that_takes_no_weak_reference_is_refused_before_any_change():
    """A holder of the DiT that takes no weak reference raised Python's own error ("cannot create weak reference"),
    where apply_tar names it."""
    class Holder:
        __slots__ = ("transformer",)

    model = FAMILIES["wan"].model()
    holder = Holder()
    holder.transformer = model
    before = processors(model)
    with pytest.raises(TypeError, match=r"^Holder holds the model, and the count of its steps keeps the object that "
                                        r"holds it by a weak reference, which it does not take .*: give the model "
                                        r"itself$"):
        with capture_frame_attention(holder):
            pass
    assert processors(model) == before and not model._forward_pre_hooks and StepTracker.of(model) is None


@pytest.mark.parametrize("ask", [{"is_causal": True}, {"enable_gqa": True}])
def test_a_causal_or_grouped_call_is_refused_not_recorded_as_full_attention(ask):
    """The maps are of attention over every key: a causal call was recorded as if it attended to later frames."""
    model = FAMILIES["wan"].model()
    stock = model.blocks[0].attn1.processor

    def asking(attn, hidden_states, *args, **kwargs):
        sdpa = torch.nn.functional.scaled_dot_product_attention
        q = attn.to_q(hidden_states).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
        k = q[:, :1] if "enable_gqa" in ask else q  # one key head for every query head
        out = sdpa(q, k, k, **ask)
        return attn.to_out[0](out.transpose(1, 2).flatten(2))
    model.blocks[0].attn1.set_processor(asking)
    what = "is_causal=True" if "is_causal" in ask else "grouped-query attention"
    with pytest.raises(ValueError, match=f"^blocks.0.attn1: capture_frame_attention records .* asks for {what}$"):
        with capture_frame_attention(model, blocks=[0]):
            forward(model, FAMILIES["wan"].inputs())
    assert model.blocks[0].attn1.processor is asking and stock is not asking


def test_the_unet_capture_on_a_dit_names_the_dit_capture():
    with pytest.raises(ValueError, match=r"^WanTransformer3DModel .*capture_frame_attention takes the video DiTs"):
        with capture_temporal_attention(FAMILIES["wan"].model()):
            pass


@pytest.mark.parametrize("tar", [False, True], ids=["stock", "tar"])
def test_captures_closed_in_the_order_they_opened_leave_the_processors_as_they_were(tar):
    """The first capture closed while the second is open: its watch sat inside the second's, was left there, and
    every later call raised a KeyError (its recorder gone from the step counter). The second goes on recording."""
    fam = FAMILIES["wan"]
    model = fam.model()
    if tar:
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    stock = {name: module.processor for name, module in model.named_modules() if name in fam.modules}
    first, second = contextlib.ExitStack(), contextlib.ExitStack()
    first.enter_context(capture_frame_attention(model))
    maps = second.enter_context(capture_frame_attention(model))
    forward(model, fam.inputs())
    first.close()
    forward(model, fam.inputs())
    second.close()
    assert sorted({step for _, step in maps}) == [0, 1]
    for name, module in model.named_modules():
        if name in fam.modules:
            assert module.processor is stock[name]
            if tar:
                assert type(module.processor.processor).__name__ == "WanAttnProcessor"
    forward(model, fam.inputs())


@pytest.mark.parametrize("tar", [False, True], ids=["stock", "tar"])
def test_a_capture_set_back_after_it_closed_passes_calls_on(tar):
    """diffusers' unfuse_qkv_projections sets back the processors fuse_qkv_projections saved: fused inside a
    capture, it set the capture's watches back after it closed, and every later call raised a KeyError (the
    capture's step counter gone). A closed watch passes the call on: the model's output is the stock one."""
    fam = FAMILIES["cogvideox"]
    model, inputs = fam.model(), fam.inputs()
    if tar:
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    expected = forward(model, inputs)
    with capture_frame_attention(model, cfg=False):
        model.fuse_qkv_projections()
    model.unfuse_qkv_projections()
    assert torch.equal(forward(model, inputs), expected)


@pytest.mark.parametrize("tar", [False, True], ids=["stock", "tar"])
def test_a_processor_set_during_a_capture_is_recorded_from_the_next_call(tar):
    """set_attn_processor while a capture is open: the new processors went unrecorded, in silence. They are
    watched from the model's next call, as TAR wraps them, and the capture closes leaving them as they were set."""
    from diffusers.models.attention_processor import CogVideoXAttnProcessor2_0

    fam = FAMILIES["cogvideox"]
    model, inputs = fam.model(), fam.inputs()
    if tar:
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    with capture_frame_attention(model, cfg=False) as maps:
        forward(model, inputs)
        model.set_attn_processor(CogVideoXAttnProcessor2_0())
        forward(model, inputs)
    assert sorted(maps) == sorted((name, step) for name in fam.modules for step in (0, 1))
    for name in fam.modules:
        torch.testing.assert_close(maps[(name, 1)], maps[(name, 0)], atol=1e-6, rtol=0)
    for name, module in model.named_modules():
        if name in fam.modules:
            inner = module.processor.processor if tar else module.processor
            assert type(inner) is CogVideoXAttnProcessor2_0


def test_set_attention_backend_during_a_capture_reaches_the_processor(monkeypatch):
    """diffusers sets an attention backend on processors that have the attribute: a capture's watch hid it, so a
    reset inside a capture never reached the processor, which kept the old backend after the capture."""
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    # set_attention_backend also makes its backend the process's active one: put it back after the test
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", _AttentionBackendRegistry._active_backend)
    fam = FAMILIES["wan"]
    model, inputs = fam.model(), fam.inputs()
    model.set_attention_backend("_native_math")
    with capture_frame_attention(model):
        forward(model, inputs)
        model.reset_attention_backend()
    assert all(module.processor._attention_backend is None
               for name, module in model.named_modules() if name in fam.modules)


@pytest.mark.parametrize("tar", [False, True], ids=["stock", "tar"])
@pytest.mark.parametrize("unfuse", ["inside", "after"])
def test_a_fuse_inside_a_capture_with_calls_between(tar, unfuse):
    """Fused inside a capture and called: the capture watches the fused processors; unfused (inside or after),
    the saved ones come back. The watch of the saved ones was left open (every call after the capture raised a
    KeyError) or, set back inside, ran beside a second one (each call recorded twice); now each call is recorded
    once, and after the capture the processors are those set, with no watch of the capture among them."""
    fam = FAMILIES["cogvideox"]
    model, inputs = fam.model(), fam.inputs()
    if tar:
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    before = processors(model)
    expected = forward(model, inputs)
    with capture_frame_attention(model, cfg=False) as maps:
        forward(model, inputs)
        model.fuse_qkv_projections()
        forward(model, inputs)
        if unfuse == "inside":
            model.unfuse_qkv_projections()
            forward(model, inputs)
    if unfuse == "after":
        model.unfuse_qkv_projections()
    steps = sorted({step for _, step in maps})  # (under TAR counted on from the call before the capture)
    assert len(steps) == 2 + (unfuse == "inside")
    assert sorted(maps) == sorted((name, step) for name in fam.modules for step in steps)
    for name in fam.modules:  # each call once: a call's map (the fused projections move it by rounding)
        for step in steps[1:]:
            torch.testing.assert_close(maps[(name, step)], maps[(name, steps[0])], atol=1e-5, rtol=0)
    assert torch.equal(forward(model, inputs), expected)
    assert all(p is before[n] for n, p in processors(model).items())


def test_a_capture_under_tar_with_an_active_backend_that_is_not_sdpa(monkeypatch):
    """CogVideoX's processor calls SDPA itself: the active diffusers backend does not concern it. A capture's watch
    inside TAR's wrapper looked like a dispatching processor (it forwards _attention_backend), and TAR refused the
    call under an active flash backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    fam = FAMILIES["cogvideox"]
    model, inputs = fam.model(), fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    expected = forward(model, inputs)
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName.FLASH)
    with capture_frame_attention(model, cfg=False) as maps:
        assert torch.equal(forward(model, inputs), expected)
    assert sorted(name for name, _ in maps) == sorted(fam.modules)


def test_a_block_recomputed_by_gradient_checkpointing_is_said_to_be_one():
    """The backward pass of a checkpointed DiT in a capture raised that its attention was called outside a forward
    call: the message names gradient checkpointing's recomputation."""
    model = FAMILIES["wan"].model()
    model.enable_gradient_checkpointing()
    model.train()
    with capture_frame_attention(model):
        out = model(**FAMILIES["wan"].inputs(), return_dict=False)[0]
        with pytest.raises(RuntimeError, match=r"frame layout is unknown \(as in a block gradient checkpointing "
                                               r"recomputes in the backward pass: the capture runs "
                                               r"without it\)"):
            out.sum().backward()
