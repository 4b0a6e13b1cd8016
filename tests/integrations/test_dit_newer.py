"""apply_tar on the newer video DiTs of diffusers (CPU): SkyReels-V2, HunyuanVideo 1.5 and Framepack, LTX-2,
Wan-Animate, Cosmos, ChronoEdit, Allegro, EasyAnimate, Motif-Video, Kandinsky 5 and 6, ConsisID, AnyFlow,
Helios and MiniMax-H3, each a tiny random-weight model built from its config.

Every regularized attention (the runs of rows a per-query mask is cut into put back together) is
checked against the float64 frame-TAR oracle on the q, k, v the module's own processor computed,
with the frame ids and the mask written in tiny_dit_models from each model's design.
"""

import math

import diffusers
import pytest
import torch
import torch.nn.functional as F
import numpy as np
import PIL.Image
from diffusers import (AutoencoderKLWan, HeliosDMDScheduler, HeliosPyramidPipeline, HeliosScheduler,
                       SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler, WanVACEPipeline,
                       WanVACETransformer3DModel)

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import apply_tar, capture_frame_attention, remove_tar
from vstar_kernels.diffusers.dit import DiTTARProcessor
from vstar_kernels.diffusers.steps import StepTracker

from ..helpers import TOLERANCES
from .tiny_dit_models import (NEWER, bfloat16_run, expected_frames, expected_mask, forward, frame_map64, ids_of,
                              frame_tar64, frame_tar_probabilities64, processors, randn, record,
                              spied_plain_run)
from .tiny_video_models import one_torch_thread  # noqa: F401 (an autouse fixture)


def module_calls(fam, calls):
    """{module: [(q, k, v, kwargs, out), ...]} with the calls of one module's runs of rows joined: q and out
    over all rows, the frames and masks of each run kept."""
    joined = {}
    for name, q, k, v, kwargs, out in calls:
        joined.setdefault(name, []).append((q, k, v, kwargs, out))
    return joined


def check_module(fam, name, parts, sigma, strength):
    block = fam.modules.index(name)
    q = torch.cat([p[0] for p in parts], dim=2)
    k, v, kwargs = parts[0][1], parts[0][2], parts[0][3]
    out = torch.cat([p[4] for p in parts], dim=2)
    frames = expected_frames(fam, k.shape[2], block)
    mask = expected_mask(fam, k.shape[2], block)
    ids = ids_of(kwargs["frames"])
    if len(parts) == 1:
        assert torch.equal(ids.cpu().long(), frames), name
        given = kwargs["key_mask"]
        if mask is None:
            assert given is None, name
        else:
            assert torch.equal(given.cpu()[:, None, :].expand_as(mask), mask), name
    else:  # a per-query mask: one call per run of equal rows, with that run's ids and key mask
        assert mask is not None and all(torch.equal(p[3]["frames"][1].cpu().long(), frames) for p in parts), name
        assert torch.equal(torch.cat([p[3]["frames"][0] for p in parts]).cpu().long(), frames), name
        rows = torch.cat([p[3]["key_mask"].cpu()[:, None, :].expand(-1, p[0].shape[2], -1) for p in parts], dim=1)
        assert torch.equal(rows, mask), name
    assert (kwargs["sigma"], kwargs["strength"]) == (sigma, strength)
    ref = frame_tar64(q, k, v, frames, sigma=sigma, strength=strength, key_mask=mask, scale=kwargs["scale"])
    atol, rtol = TOLERANCES[q.dtype]
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("family", list(NEWER))
def test_newer_dit_regularizes_its_video_self_attention_against_float64(family):
    fam = NEWER[family]
    model = fam.model()
    inputs = fam.inputs()
    before = processors(model)
    plain = forward(model, inputs)
    # off: strength 0, or sigma = inf, runs the stock processors with no mode, bit for bit
    for level in ((1.0, 0.0), (math.inf, 1.0)):
        apply_tar(model, TARConfig(levels={0: level}, until_step=None))
        assert torch.equal(forward(model, inputs), plain), level

    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    assert names == fam.modules
    calls = record(model)
    out = forward(model, inputs)
    joined = module_calls(fam, calls)
    assert list(joined) == fam.modules
    for name, parts in joined.items():
        check_module(fam, name, parts, 1.0, 1.0)
    assert (out - plain).abs().max() > 1e-4, "TAR did not change the model output"
    for name, proc in processors(model).items():
        if name in fam.modules:
            assert isinstance(proc, DiTTARProcessor) and proc.processor is before[name]
        else:
            assert proc is before[name], f"{name} was touched"

    # only the attention call changes: plain SDPA on the q, k, v and masks TAR got gives stock's output
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            def attention(attn, query, key, value, *, key_mask, scale, causal, **_):
                mask = None if key_mask is None else key_mask[:, None, None, :]
                return F.scaled_dot_product_attention(query, key, value, attn_mask=mask, is_causal=causal,
                                                      scale=scale)
            proc.attention = attention
    torch.testing.assert_close(forward(model, inputs), plain, atol=1e-6, rtol=1e-6)

    remove_tar(model)
    assert all(p is before[n] for n, p in processors(model).items()) and processors(model).keys() == before.keys()
    assert torch.equal(forward(model, inputs), plain)
    assert not model._forward_pre_hooks and not model._forward_hooks and StepTracker.of(model) is None


def expected_map(fam, calls, block, sigma=1.0, strength=0.0):
    """The (F, F) map of one module's calls [(q, k), ...] in float64: each frame's row averaged over its query
    tokens (a frame with none: a NaN row), every sequence and head."""
    total, rows = 0, 0
    for q, k in calls:
        frames = expected_frames(fam, k.shape[2], block)
        p = frame_tar_probabilities64(q, k, frames, sigma=sigma, strength=strength,
                                      key_mask=expected_mask(fam, k.shape[2], block))
        total = total + frame_map64(p, frames)
        tokens = torch.bincount(frames[frames >= 0], minlength=total.shape[0]).double()
        rows = rows + tokens[:, None] * q.shape[0] * q.shape[1]
    return total / rows


@pytest.mark.parametrize("family", ["framepack", "hunyuan15", "skyreels_df", "motif", "ltx2"])
def test_newer_dit_maps_match_float64(family):
    """Plain attention maps of every block; history frames at their indices (a frame with no token: NaN row),
    per-query masks, the decoder blocks' video twice, appended tokens out of the map."""
    fam = NEWER[family]
    model, inputs, plain, seen = spied_plain_run(fam)
    with capture_frame_attention(model) as maps:
        assert torch.equal(forward(model, inputs), plain)
    assert sorted(maps) == sorted((name, 0) for name in fam.modules)
    for block, name in enumerate(fam.modules):
        ref = expected_map(fam, seen[name], block)
        assert maps[(name, 0)].shape == (fam.frames, fam.frames)
        torch.testing.assert_close(maps[(name, 0)], ref, atol=1e-5, rtol=1e-5, equal_nan=True, msg=name)
    if family == "framepack":  # frames 6, 7, 9, 10 and 11 have no token
        assert [f for f in range(fam.frames) if maps[(fam.modules[0], 0)][f].isnan().all()] == [6, 7, 9, 10, 11]


@pytest.mark.parametrize("family", ["hunyuan15", "skyreels_df"])
def test_newer_dit_maps_of_regularized_attention_with_per_query_masks(family):
    fam = NEWER[family]
    model = fam.model()
    inputs = fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None, blocks=[0]))
    tar_out = forward(model, inputs)
    calls = record(model)
    with capture_frame_attention(model, blocks=[0]) as maps:
        assert torch.equal(forward(model, inputs), tar_out)
    parts = module_calls(fam, calls)[fam.modules[0]]
    q, k = torch.cat([p[0] for p in parts], dim=2), parts[0][1]
    # steps count from apply_tar on a bare model: the captured call is the second
    torch.testing.assert_close(maps[(fam.modules[0], 1)], expected_map(fam, [(q, k)], 0, 1.0, 1.0),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("family", ["hunyuan15", "framepack"])
def test_newer_dit_bfloat16_forward_runs(family):
    fam = NEWER[family]
    plain, out, calls = bfloat16_run(fam)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all() and not torch.equal(out, plain)
    for name, parts in module_calls(fam, calls).items():
        check_module(fam, name, parts, 1.0, 1.0)


def train_two_steps(model, inputs):
    """Two forward calls (steps 0 and 1), then one backward pass through both."""
    first = model(**inputs, return_dict=False)[0]
    second = model(**inputs, return_dict=False)[0]
    (first.square().mean() + second.mean()).backward()
    return first.detach(), second.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["skyreels_df", "framepack"])
def test_newer_dit_gradient_checkpointing_recomputes_blocks_as_their_call_ran_them(family):
    fam = NEWER[family]
    inputs = fam.inputs()
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=0)
    model = fam.model()
    apply_tar(model, config)
    first, second, grads = train_two_steps(model, inputs)
    model = fam.model()
    model.enable_gradient_checkpointing()
    apply_tar(model, config)
    checkpointed = train_two_steps(model, inputs)
    torch.testing.assert_close(checkpointed[0], first, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(checkpointed[1], second, atol=1e-6, rtol=1e-6)
    for name, grad in grads.items():
        if grad is not None:
            torch.testing.assert_close(checkpointed[2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


def spy_steps(model):
    """([the TAR step of each forward call], [the forward call of each regularized attention call]) of `model`."""
    steps, regularized = [], []
    model.register_forward_pre_hook(lambda *_: steps.append(model._vstar_tar.step))
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            def attention(attn, query, key, value, proc=proc, **kwargs):
                regularized.append(len(steps) - 1)
                return DiTTARProcessor.attention(proc, attn, query, key, value, **kwargs)
            proc.attention = attention
    return steps, regularized


def test_skyreels_diffusion_forcing_pipeline_steps_follow_the_noisiest_frame():
    """SkyReels-V2's diffusion-forcing pipeline steps a copy of its scheduler per frame, so its own scheduler counts
    no step: a call's step is that of its noisiest frame. A long video (here 3 chunks of 3 latent frames, 2 of them
    history) starts each chunk's new frames from noise: every chunk runs steps 0, 1, 2, the guidance branches as
    two calls each, and until_step=0 regularizes the two calls of each chunk's step 0."""
    model = NEWER["skyreels"].model()
    scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=8.0)
    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                                             scheduler=scheduler)
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=0))
    steps, regularized = spy_steps(model)
    with torch.no_grad():
        pipe(prompt=None, prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3),
             height=32, width=32, num_frames=17, base_num_frames=9, overlap_history=5, num_inference_steps=3,
             guidance_scale=5.0, output_type="latent")
    assert steps == [0, 0, 1, 1, 2, 2] * 3
    assert regularized == [call for chunk in (0, 6, 12) for call in (chunk, chunk, chunk + 1, chunk + 1)]


def test_skyreels_asynchronous_run_with_renoised_condition_frames():
    """Asynchronous diffusion forcing (ar_step=1) over a long video with addnoise_condition=60: a call's frames carry
    999 (not started), 60 (the re-noised condition frames, above the schedule's last timesteps) and the schedule's
    timesteps; each call's step is the number of timesteps above its largest (60 at the end of a chunk: no value of
    the schedule), and the run goes through."""
    model = NEWER["skyreels"].model()
    pipe = SkyReelsV2DiffusionForcingPipeline(
        tokenizer=None, text_encoder=None, transformer=model, vae=None,
        scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=1.0))
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    seen = []
    model.register_forward_pre_hook(lambda _, args, kwargs: seen.append(
        (float(kwargs["timestep"].max()), model._vstar_tar.step)), with_kwargs=True)
    with torch.no_grad():
        pipe(prompt=None, prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3),
             height=32, width=32, num_frames=33, base_num_frames=17, overlap_history=9, num_inference_steps=20,
             guidance_scale=1.0, output_type="latent", ar_step=1, causal_block_size=1, addnoise_condition=60)
    schedule = pipe.scheduler.timesteps.tolist()
    assert len(seen) > 20 and [step for _, step in seen] == [sum(t > top for t in schedule) for top, _ in seen]
    assert {top for top, _ in seen} - set(schedule) == {60.0}, schedule  # the last timesteps lie below 60


def tiny_wan_vae():
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=16, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True]).eval()


def test_skyreels_diffusion_forcing_refuses_another_pipelines_calls():
    """A pipeline made with from_pipe and a scheduler of its own runs the model that TAR applied to the first
    pipeline steps by: its calls' timesteps are not of that scheduler's run, and are refused (they ran at steps of
    the first pipeline's finished schedule)."""
    model = NEWER["skyreels"].model()
    scheduler = lambda: UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                flow_shift=8.0)
    pipe = SkyReelsV2DiffusionForcingPipeline(tokenizer=None, text_encoder=None, transformer=model, vae=None,
                                             scheduler=scheduler())
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=0))
    kwargs = dict(prompt=None, prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3),
                  height=32, width=32, num_frames=9, guidance_scale=5.0, output_type="latent")
    with torch.no_grad():
        pipe(num_inference_steps=3, **kwargs)
        other = SkyReelsV2DiffusionForcingPipeline.from_pipe(pipe, scheduler=scheduler())
        with pytest.raises(RuntimeError, match="scheduler of the SkyReelsV2DiffusionForcingPipeline it was applied"):
            other(num_inference_steps=10, **kwargs)


@pytest.mark.parametrize("distilled", [False, True], ids=["helios", "helios-distilled"])
def test_helios_pyramid_counts_steps_across_its_stages(distilled):
    """Helios' pyramid pipeline sets a schedule per stage, each below the last one's end, and its distilled
    scheduler keeps no step index: a chunk's calls are steps 0..5 over 2 stages of 3 steps (each stage counted from 0
    before, and every call step 0 on the distilled one), each chunk from 0 again, and until_step=1 regularizes the
    first two calls of each chunk."""
    vae = tiny_wan_vae()
    model = diffusers.HeliosTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                               in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                               num_layers=1, rope_dim=(4, 4, 4)).eval()
    scheduler = (HeliosDMDScheduler if distilled else HeliosScheduler)(stages=2, stage_range=[0, 0.5, 1], gamma=0.2)
    pipe = HeliosPyramidPipeline(tokenizer=None, text_encoder=None, vae=vae, scheduler=scheduler, transformer=model,
                                 is_distilled=distilled)
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    steps, regularized = spy_steps(model)
    with torch.no_grad():
        pipe(prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3), height=64,
             width=64, num_frames=9, guidance_scale=1.0, history_sizes=[4, 2, 1], num_latent_frames_per_chunk=2,
             pyramid_num_inference_steps_list=[3, 3], output_type="latent")
    assert steps == [0, 1, 2, 3, 4, 5] * 2
    assert regularized == [0, 1, 6, 7]


@pytest.mark.parametrize("references, keep", [(0, False), (0, True), (1, False), (2, True)],
                         ids=["none", "none-first-frames-kept", "one", "two-first-frames-kept"])
def test_wan_vace_reference_images_are_no_frame(references, keep):
    """WanVACEPipeline puts each reference image before the video as a latent frame (and drops it before decoding):
    in every block, control and main, those frames' tokens get frame -1 and the video's frames are 0..2. A mask that
    keeps the first frames (zero) makes no reference."""
    model = WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                      in_channels=16, out_channels=16, text_dim=16, freq_dim=32, ffn_dim=32,
                                      num_layers=2, rope_max_seq_len=32, vace_layers=[0], vace_in_channels=96).eval()
    pipe = WanVACEPipeline(tokenizer=None, text_encoder=None, vae=tiny_wan_vae(), transformer=model,
                           scheduler=UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                             flow_shift=3.0))
    image = lambda seed: PIL.Image.fromarray(np.random.RandomState(seed).randint(0, 255, (32, 32, 3), dtype=np.uint8))
    mask = [PIL.Image.fromarray(np.full((32, 32, 3), 0 if i < 5 else 255, dtype=np.uint8)) for i in range(9)]
    apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0)}))
    seen = {}
    for name, proc in processors(model).items():
        if isinstance(proc, DiTTARProcessor):
            def attention(attn, query, key, value, proc=proc, name=name, **kwargs):
                seen.setdefault(name, ids_of(kwargs["frames"]).tolist())
                return DiTTARProcessor.attention(proc, attn, query, key, value, **kwargs)
            proc.attention = attention
    with torch.no_grad():
        out = pipe(video=[image(i) for i in range(9)], mask=mask if keep else None,
                   reference_images=[image(99 + i) for i in range(references)] or None,
                   prompt_embeds=randn(1, 5, 16, seed=2), negative_prompt_embeds=randn(1, 5, 16, seed=3), height=32,
                   width=32, num_frames=9, num_inference_steps=2, guidance_scale=5.0, output_type="latent")
    assert out.frames.shape[2] == references + 3  # the latent output keeps the references
    expected = [-1] * 4 * references + [f for f in range(3) for _ in range(4)]
    assert seen == {name: expected for name in ("vace_blocks.0.attn1", "blocks.0.attn1", "blocks.1.attn1")}


def test_ltx2_spatio_temporal_guidance_blocks_run_stock():
    """LTX-2's STG: a perturbed block returns its values with no attention; TAR leaves it to the stock processor
    and regularizes the other blocks (the capture records no block of such a call: a guidance perturbation)."""
    fam = NEWER["ltx2"]
    model = fam.model()
    inputs = dict(fam.inputs(), spatio_temporal_guidance_blocks=[0])
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    calls = record(model)
    forward(model, inputs)
    assert [c[0] for c in calls] == ["transformer_blocks.1.attn1"]
    with capture_frame_attention(model) as maps:
        forward(model, inputs)
    assert list(maps) == []


def test_ltx2_guidance_perturbation_calls_are_not_recorded():
    """An LTX-2 pipeline's step: the batched guidance call, then a spatio-temporal-guidance call and a
    modality-isolation call of the conditional sequence alone (diffusers' LTX2Pipeline, its default scales). The
    capture records the guidance call's conditional half, and only it: the maps equal a capture of that call alone
    (it raised "odd batch" on the perturbation calls)."""
    fam = NEWER["ltx2"]
    model = fam.model()
    inputs = fam.inputs()  # batch 2: [unconditional, conditional]
    conditional = {k: v[1:] if torch.is_tensor(v) and v.dim() and v.shape[0] == 2 else v for k, v in inputs.items()}

    class Pipeline:  # what the capture reads of LTX2Pipeline: its transformer, scheduler and guidance flag
        transformer, scheduler = model, UniPCMultistepScheduler()
        do_classifier_free_guidance = True

    with torch.no_grad(), capture_frame_attention(Pipeline(), blocks=[0, 1]) as step:
        Pipeline.scheduler.set_timesteps(2)  # a run starts (else the model runs outside any: refused)
        forward(model, inputs)
        forward(model, dict(conditional, spatio_temporal_guidance_blocks=[1]))
        forward(model, dict(conditional, isolate_modalities=True))
    with torch.no_grad(), capture_frame_attention(Pipeline(), blocks=[0, 1]) as alone:
        Pipeline.scheduler.set_timesteps(2)
        forward(model, inputs)
    assert sorted(step) == sorted(alone) == [("transformer_blocks.0.attn1", 0), ("transformer_blocks.1.attn1", 0)]
    for key in alone:
        assert torch.equal(step[key], alone[key])


def test_cosmos_refuses_a_non_sdpa_backend_before_its_kernel_runs(monkeypatch):
    """Cosmos's processors call dispatch_attention_fn with no backend of their own (no _attention_backend): the
    active backend runs them. One that does not call scaled_dot_product_attention (flash, a stand-in kernel here)
    is refused by name before its kernel runs, as for the processors that keep a backend."""
    from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry

    fam = NEWER["cosmos"]
    model, inputs = fam.model(), fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    ran = []
    monkeypatch.setitem(_AttentionBackendRegistry._backends, AttentionBackendName.FLASH,
                        lambda query, key, value, **kwargs: ran.append(query.shape) or torch.zeros_like(query))
    monkeypatch.setattr(_AttentionBackendRegistry, "_active_backend", AttentionBackendName.FLASH)
    monkeypatch.setattr(_AttentionBackendRegistry, "_checks_enabled", False)
    with pytest.raises(RuntimeError, match=r"attn1: .*its attention backend, 'flash', does not call it"):
        forward(model, inputs)
    assert ran == []


def test_newer_dit_errors_name_the_problem(monkeypatch):
    helios = NEWER["helios"]
    model = helios.model()
    with pytest.raises(ValueError, match="'64D1' is a VSTAR preset for video UNets and HeliosTransformer3DModel"):
        apply_tar(model, TARConfig.from_preset("64D1"))
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    inputs = helios.inputs()
    inputs["indices_latents_history_short"] = torch.tensor([[6, 7], [5, 7]])
    with pytest.raises(ValueError, match="one frame layout per call.*different indices_latents_history_short"):
        forward(model, inputs)

    ltx2 = NEWER["ltx2"]
    model = ltx2.model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    with pytest.raises(ValueError, match=r"boolean key masks of shape \(B, 1, 1, Nk\) and boolean masks.*"
                                         r"torch.float32 mask of shape \(2, 2, 53, 53\)"):
        forward(model, dict(ltx2.inputs(), video_self_attention_mask=torch.ones(2, 53, 53)))

    hunyuan = NEWER["hunyuan15"]
    model = hunyuan.model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    monkeypatch.setattr("vstar_kernels.diffusers.interception.MAX_MASK_RUNS", 1)
    with pytest.raises(ValueError, match="transformer_blocks.0.attn: the processor's .* mask has 2 runs of equal rows"):
        forward(model, hunyuan.inputs())

    sana = diffusers.SanaVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                                  attention_head_dim=8, num_layers=1, num_cross_attention_heads=2,
                                                  cross_attention_head_dim=8, cross_attention_dim=16,
                                                  caption_channels=16, sample_size=8)
    with pytest.raises(ValueError, match="SanaVideoTransformer3DModel: TAR does not apply: its self-attention is "
                                         "linear attention.*docs/dits.md"):
        apply_tar(sana, TARConfig(levels={0: (1.0, 1.0)}))
    with pytest.raises(ValueError, match="SanaVideoTransformer3DModel: TAR does not apply"):
        with capture_frame_attention(sana):
            pass
    with pytest.raises(ValueError, match="TAR supports .* video DiTs .*HunyuanVideoFramepackTransformer3DModel.*"
                                         "SkyReelsV2Transformer3DModel.*docs/dits.md"):
        apply_tar(torch.nn.Linear(2, 2), TARConfig(levels={0: (1.0, 1.0)}))


def test_ltx2_frames_come_from_video_coords_when_the_grid_arguments_are_not_given():
    """LTX-2's DFR pipelines pass video_coords alone (a tile of the canvas): the frames come from them, as the
    rotary embedding's do; a tile keeps the frames of the canvas it is cut from."""
    fam = NEWER["ltx2"]
    model = fam.model()
    inputs = fam.inputs()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    with_grid = forward(model, inputs)
    calls = record(model)
    coords_only = {k: v for k, v in inputs.items() if k not in ("num_frames", "height", "width")}
    assert torch.equal(forward(model, coords_only), with_grid)
    assert all(torch.equal(ids_of(c[4]["frames"]).long(), expected_frames(fam, 53)) for c in calls)
    calls.clear()
    keep = torch.arange(16, 48)  # frames 1 and 2 of the canvas, as a tile
    tile = dict(coords_only, hidden_states=inputs["hidden_states"][:, keep],
                video_coords=inputs["video_coords"][:, :, keep])
    forward(model, tile)
    assert all(torch.equal(ids_of(c[4]["frames"]).long(), torch.tensor([1] * 16 + [2] * 16)) for c in calls)


def test_per_query_mask_runs_on_the_triton_kernels():
    """The Triton kernels (the interpreter here, as on a GPU) take each run's query rows with the run's key mask
    and the (query ids, key ids) pair; rows whose keys are all masked in one sequence give 0."""
    fam = NEWER["hunyuan15"]
    model = fam.model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None, backend="triton"))
    calls = record(model)
    forward(model, fam.inputs())
    joined = module_calls(fam, calls)
    assert [len(parts) for parts in joined.values()] == [2, 2]
    for name, parts in joined.items():
        check_module(fam, name, parts, 1.0, 1.0)
