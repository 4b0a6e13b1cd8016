"""capture_temporal_attention: the recorded maps against float64, on every family, without and with TAR.

The float64 map of a call is computed here from the module's input and weights, independently of
the library: projections, per-head scores (TAR's bias where TAR regularizes), softmax, then the mean
over heads and over the sequences recorded (all, or the conditional second half under guidance).
"""

import copy
import math

import numpy
import pytest
import torch
import torch.nn.functional as F
from diffusers import (AnimateDiffPAGPipeline, AnimateDiffPipeline, DDIMScheduler, LattePipeline,
                       TextToVideoSDPipeline)
from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import apply_tar, capture_temporal_attention, remove_tar, reset_steps
from vstar_kernels.diffusers import capture as capture_module
from vstar_kernels.diffusers.steps import StepTracker
from vstar_kernels.regularization import delta_from_features

from .tiny_video_models import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    LEVEL_SPECS,
    attention_modules,
    forward,
    run_capturing,
    FAMILIES,
    motion_adapter,
    motion_inputs,
    one_torch_thread,
    randn,
    tiny_vae,
    unet2d,
    unet3d_inputs,
)

MAP_TOL = dict(atol=1e-6, rtol=1e-5)  # fp32 probabilities summed in float64, against float64 throughout


def map64(attn, x, *, rows=None, sigma=None, strength=1.0, delta=None):
    """Mean over heads and the sequences `rows` of softmax(q k^T / sqrt(d) [+ strength * m_i * dA]), float64."""
    assert attn.group_norm is None and attn.spatial_norm is None and attn.norm_q is None
    x = x.double() if rows is None else x[rows].double()

    def heads(layer):
        t = F.linear(x, layer.weight.double(), None if layer.bias is None else layer.bias.double())
        return t.view(x.shape[0], x.shape[1], attn.heads, -1).transpose(1, 2)

    q, k = heads(attn.to_q), heads(attn.to_k)
    n = q.shape[2]
    s = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if sigma is not None or delta is not None:
        i = torch.arange(n, dtype=torch.float64)
        da = torch.exp(-0.5 * ((i[None, :] - i[:, None]) / sigma) ** 2) if delta is None else delta.double()
        s = s + strength * s.amax(dim=-1, keepdim=True) * da
    return torch.softmax(s, dim=-1).mean(dim=(0, 1))


@pytest.mark.parametrize("family", list(FAMILIES))
def test_maps_match_float64_and_outputs_stay_bit_identical(family):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs(model)
    watched = fam.expected_levels(model, include_input_block=True)  # TAR's modules + the input blocks
    regularized = fam.expected_levels(model)
    plain = forward(model, inputs)

    with capture_temporal_attention(model) as maps:
        out, calls = run_capturing(model, inputs, watched)
    assert torch.equal(out, plain)
    assert maps.levels == watched and sorted(maps) == sorted((name, 0) for name in watched)
    modules = attention_modules(model)
    for name in watched:
        (x, _, _), = calls[name]
        assert maps[(name, 0)].shape == (x.shape[1],) * 2
        torch.testing.assert_close(maps[(name, 0)], map64(modules[name], x), **MAP_TOL)

    apply_tar(model, TARConfig(levels={lvl: LEVEL_SPECS[lvl] for lvl in set(regularized.values())}, until_step=None))
    tar_out = forward(model, inputs)
    reset_steps(model)
    with capture_temporal_attention(model) as maps:
        out, calls = run_capturing(model, inputs, watched)
    assert torch.equal(out, tar_out)
    for name, level in watched.items():
        (x, _, _), = calls[name]
        sigma, strength = LEVEL_SPECS[level] if name in regularized else (None, 1.0)
        torch.testing.assert_close(maps[(name, 0)], map64(modules[name], x, sigma=sigma, strength=strength),
                                   **MAP_TOL)
    assert not any(m._forward_hooks for m in attention_modules(model).values())


def test_delta_levels_are_recorded_with_their_delta():
    model = FAMILIES["unet3d"].model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    delta = delta_from_features(randn(5, 4, seed=3).cumsum(0), num_frames=8)
    names = apply_tar(model, TARConfig(levels={0: (delta, 0.5)}, until_step=None))
    with capture_temporal_attention(model, layers=names) as maps:
        _, calls = run_capturing(model, inputs, names)
    for name in names:
        (x, _, _), = calls[name]
        expected = map64(attention_modules(model)[name], x, strength=0.5, delta=delta)
        torch.testing.assert_close(maps[(name, 0)], expected, **MAP_TOL)


def test_batched_guidance_records_the_conditional_second_half():
    model = FAMILIES["unet3d"].model()
    inputs = unet3d_inputs(model, batch=2, size=4)  # two different samples: the halves differ
    names = ["down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1", "mid_block.temp_attentions.0."
             "transformer_blocks.0.attn2"]
    with capture_temporal_attention(model, layers=names, cfg=True) as cond, \
            capture_temporal_attention(model, layers=names) as both:
        _, calls = run_capturing(model, inputs, names)
    for name in names:
        (x, _, _), = calls[name]
        half = x.shape[0] // 2
        attn = attention_modules(model)[name]
        torch.testing.assert_close(cond[(name, 0)], map64(attn, x, rows=slice(half, None)), **MAP_TOL)
        torch.testing.assert_close(both[(name, 0)], map64(attn, x), **MAP_TOL)
        assert (map64(attn, x, rows=slice(0, half)) - cond[(name, 0)]).abs().max() > 1e-3


def test_batched_guidance_needs_an_even_unet_batch():
    """cfg=True on a UNet call of one video: its temporal attention's batch (videos x height x width) is even, but
    its second half is half the video's positions, not a guidance branch: refused, naming the UNet's batch."""
    model = FAMILIES["unet3d"].model()
    with capture_temporal_attention(model, cfg=True):
        with pytest.raises(ValueError, match=r"guidance is batched .* model call's batch is not even .*1 videos"):
            model(**unet3d_inputs(model, batch=1, size=4))


def animatediff():
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                               motion_adapter=motion_adapter(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, guidance_scale, steps=2, frames=8):
    return pipe(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6),
                num_inference_steps=steps, num_frames=frames, height=16, width=16, guidance_scale=guidance_scale,
                output_type="latent", generator=torch.Generator().manual_seed(0)).frames


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_pipeline_guidance_is_read_from_the_pipeline(guidance_scale):
    pipe = animatediff()
    name = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1"
    with capture_temporal_attention(pipe, steps=[1], layers=[name]) as maps:
        recorded = []
        handle = attention_modules(pipe.unet)[name].register_forward_hook(
            lambda m, args, out: recorded.append(args[0]))
        generate(pipe, guidance_scale)
        handle.remove()
    assert list(maps) == [(name, 1)]
    x = recorded[1]  # the step-1 call
    rows = slice(x.shape[0] // 2, None) if guidance_scale > 1 else None
    torch.testing.assert_close(maps[(name, 1)], map64(attention_modules(pipe.unet)[name], x, rows=rows), **MAP_TOL)


def test_latte_pipeline_guidance_is_read_from_the_pipeline():
    """Latte's transformer takes its latent as hidden_states, by keyword: under the pipeline's guidance the capture
    read no batch there and refused every call."""
    pipe = LattePipeline(tokenizer=None, text_encoder=None, vae=tiny_vae(), transformer=FAMILIES["latte"].model(),
                         scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    name = "temporal_transformer_blocks.0.attn1"
    with capture_temporal_attention(pipe, steps=[1], layers=[name]) as maps:
        recorded = []
        handle = attention_modules(pipe.transformer)[name].register_forward_hook(
            lambda m, args, out: recorded.append(args[0]))
        pipe(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6), negative_prompt=None,
             video_length=8, height=8, width=8, num_inference_steps=2, guidance_scale=7.5, output_type="latent",
             generator=torch.Generator().manual_seed(0))
        handle.remove()
    x = recorded[1]  # the step-1 call
    torch.testing.assert_close(maps[(name, 1)], map64(attention_modules(pipe.transformer)[name], x,
                                                      rows=slice(x.shape[0] // 2, None)), **MAP_TOL)


@pytest.mark.parametrize("skip", [5, 1])
def test_fastercache_skipping_the_unconditional_branch_is_refused(skip):
    """diffusers' FasterCache on Latte, under batched guidance, runs some steps on the conditional half alone, which
    the capture cannot tell from the model's input (it kept the second half of that half's rows: half the positions,
    without a word): refused; with no step skipped (unconditional_batch_skip_range=1) it records."""
    from diffusers import FasterCacheConfig, apply_faster_cache

    fam = FAMILIES["latte"]
    model = fam.model()
    inputs = {k: torch.cat([v, v]) if k != "timestep" else v.repeat(2) for k, v in fam.inputs(model).items()}
    apply_faster_cache(model, FasterCacheConfig(
        spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 681),
        current_timestep_callback=lambda: 500, attention_weight_callback=lambda _: 0.3,
        unconditional_batch_skip_range=skip, unconditional_batch_timestep_skip_range=(-1, 781), tensor_format="BCFHW",
        is_guidance_distilled=False))
    name = "temporal_transformer_blocks.0.attn1"
    with torch.no_grad(), capture_temporal_attention(model, cfg=True, layers=[name]) as maps:
        if skip > 1:
            with pytest.raises(ValueError, match="FasterCache on this model skips the unconditional branch"):
                forward(model, inputs)
        else:
            forward(model, inputs)
            assert list(maps) == [(name, 0)]


def test_an_attention_whose_output_a_cache_reuses_is_refused():
    """diffusers' pyramid attention broadcast on Latte's temporal attention reuses its output in some steps: the
    capture, which records each call from the module's inputs, recorded a map at every step, also where the model
    ran no attention (one step in two here). Refused, naming the hook; the other temporal attentions record."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    fam = FAMILIES["latte"]
    model = fam.model()
    inputs = fam.inputs(model)
    timestep = {"now": 900}
    apply_pyramid_attention_broadcast(model, PyramidAttentionBroadcastConfig(
        temporal_attention_block_skip_range=2, temporal_attention_timestep_skip_range=(-1, 1000),
        temporal_attention_block_identifiers=("temporal_transformer_blocks.0",),
        current_timestep_callback=lambda: timestep["now"]))
    with torch.no_grad(), capture_temporal_attention(model, layers=["temporal_transformer_blocks.1.attn1"]) as maps:
        forward(model, inputs)
    assert list(maps) == [("temporal_transformer_blocks.1.attn1", 0)]
    with torch.no_grad(), capture_temporal_attention(model, layers=["temporal_transformer_blocks.0.attn1"]):
        with pytest.raises(ValueError, match="diffusers' pyramid_attention_broadcast hook on this attention reuses "
                                             "its output"):
            forward(model, inputs)


@pytest.mark.parametrize("scores", [True, False], ids=["skip_attention_scores", "skip_attention"])
def test_an_attention_under_diffusers_layer_skip_is_not_recorded(scores):
    """diffusers' layer skip of the scores (its perturbed-attention and skip-layer guiders, for their perturbed call)
    answers the module's SDPA call with the values, and its skip of the attention returns the module's input: the
    model computes no attention there, and the capture, which records each call from the module's inputs (a forward
    hook, which sees the call either way), recorded a softmax map; the block it leaves alone is recorded."""
    from diffusers.hooks import LayerSkipConfig, apply_layer_skip

    fam = FAMILIES["latte"]
    model = fam.model()
    inputs = fam.inputs(model)
    apply_layer_skip(model, LayerSkipConfig(indices=[0], fqn="temporal_transformer_blocks", skip_attention=not scores,
                                            skip_attention_scores=scores, skip_ff=False))
    with torch.no_grad(), capture_temporal_attention(model) as maps:
        forward(model, inputs)
    assert list(maps) == [("temporal_transformer_blocks.1.attn1", 0)]


def test_a_pipeline_with_perturbed_attention_guidance_is_refused():
    """AnimateDiff's PAG pipeline batches [unconditional, conditional, perturbed]: at two videos a prompt the
    conditional half of the batch would mix conditional and perturbed rows; the capture refuses it, whatever cfg
    says, on the pipeline or on its model called alone (which recorded the mix), and records at pag_scale=0."""
    def pipeline():  # a fresh one each run: a run the capture stopped leaves PAG's processors set
        pipe = AnimateDiffPAGPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                                      motion_adapter=motion_adapter(), scheduler=DDIMScheduler(),
                                      pag_applied_layers=["mid"])
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def run(pipe, pag_scale):
        pipe(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6),
             num_inference_steps=2, num_frames=8, height=16, width=16, guidance_scale=7.5, pag_scale=pag_scale,
             num_videos_per_prompt=2, output_type="latent")

    for cfg, on_model, own in ((None, False, False), (True, False, False), (True, True, False), (False, True, False),
                               (None, False, True), (True, True, True)):
        pipe = pipeline()
        if own:  # PAG's processors of classes of one's own, derived from diffusers' (they were recorded)
            pipe.set_pag_applied_layers(["mid"], pag_attn_processors=(
                type("PerturbedCFG", (PAGCFGIdentitySelfAttnProcessor2_0,), {})(),
                type("Perturbed", (PAGIdentitySelfAttnProcessor2_0,), {})()))
        with pytest.raises(ValueError, match="perturbed-attention-guidance branch .* capture with pag_scale=0"):
            with capture_temporal_attention(pipe.unet if on_model else pipe, steps=[1], cfg=cfg):
                run(pipe, 3.0)
    pipe = pipeline()
    with capture_temporal_attention(pipe, steps=[1]) as maps:
        run(pipe, 0.0)
    assert maps.steps() == [1]
    run(pipe, 3.0)  # a PAG run that finished: its processors are off the model, its pipeline still says PAG
    inputs = motion_inputs(pipe.unet, batch=2, frames=8)
    recorded = []
    for opened_on in (pipe.unet, pipe):
        with capture_temporal_attention(opened_on, cfg=True) as maps, torch.no_grad():
            pipe.unet(**inputs)
        recorded.append(maps)
    assert len(recorded[0]) > 0 and all(torch.equal(recorded[1][key], recorded[0][key]) for key in recorded[0])


def test_text_to_video_pipeline_needs_cfg_given():
    unet = FAMILIES["unet3d"].model()
    pipe = TextToVideoSDPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="TextToVideoSDPipeline does not say whether guidance is batched.*cfg=True"):
        with capture_temporal_attention(pipe):
            pass
    with capture_temporal_attention(pipe, cfg=True, steps=[0], levels=[2]) as maps:
        pipe(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6),
             num_inference_steps=2, num_frames=8, height=16, width=16, guidance_scale=7.5, output_type="latent")
    assert {step for _, step in maps} == {0} and set(maps.by_level(0)) == {2}


def test_a_pipelines_model_called_before_any_run_needs_cfg_given():
    """capture_temporal_attention(pipe) reads the pipeline's do_classifier_free_guidance, which its call sets: the
    model called alone before any run raised AttributeError from inside a forward hook."""
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                               motion_adapter=motion_adapter(), scheduler=DDIMScheduler())
    inputs = motion_inputs(pipe.unet, batch=1, frames=8)
    with pytest.raises(ValueError, match="AnimateDiffPipeline has not run, so it does not say whether this call of "
                                         "its model batches guidance: pass cfg=True or cfg=False"):
        with torch.no_grad(), capture_temporal_attention(pipe):
            pipe.unet(**inputs)
    with torch.no_grad(), capture_temporal_attention(pipe, cfg=False) as maps:
        pipe.unet(**inputs)
    assert len(maps) > 0


@pytest.mark.parametrize("when", ["before the capture", "during the capture", "replaced during the capture"])
@pytest.mark.parametrize("split", [32, 48])
def test_batched_guidance_under_free_noise_split_inference_keeps_the_conditional_half(split, when):
    """FreeNoise's split inference (diffusers' SplitInferenceModule around the motion modules' transformer blocks)
    runs each layer on slices of the 128 sequences (2 videos x 8 x 8), [unconditional, conditional]: the capture
    takes the second half of the whole call, as without the split (it took the second half of each slice; with
    slices of 48 the second one straddles the halves), also where the split comes in while the capture is open
    (the same run: its modules are found under their new names from the next call), also around new blocks (as
    enable_free_noise then enable_free_noise_split_inference make: those layers were no longer recorded)."""
    from diffusers.pipelines.free_noise_utils import SplitInferenceModule

    model = FAMILIES["motion"].model()
    inputs = motion_inputs(model, batch=2, frames=16)

    motions = [motion for block in [*model.down_blocks, model.mid_block, *model.up_blocks]
               for motion in getattr(block, "motion_modules", [])]
    # new blocks with the same weights, made before any capture hooks the model's
    fresh = [[copy.deepcopy(transformer) for transformer in motion.transformer_blocks] for motion in motions]

    def split_inference():
        for motion, copies in zip(motions, fresh):
            for i, transformer in enumerate(motion.transformer_blocks):
                block = copies[i] if when.startswith("replaced") else transformer
                motion.transformer_blocks[i] = SplitInferenceModule(block, split, 0,
                                                                    ["hidden_states", "encoder_hidden_states"])

    with torch.no_grad(), capture_temporal_attention(model, cfg=True) as whole:
        model(**inputs)
    if when == "before the capture":
        split_inference()
    with torch.no_grad(), capture_temporal_attention(model, cfg=True) as sliced:
        model(**inputs)
        if when != "before the capture":
            split_inference()
            model(**inputs)  # step 1 of a bare model's run
    step = 0 if when == "before the capture" else 1
    assert len(sliced) == len(whole) * (step + 1)
    with torch.no_grad(), capture_temporal_attention(model, cfg=False) as both:
        model(**inputs)
    differ = []
    for (name, _), expected in whole.items():
        split_name = name.replace(".transformer_blocks.0.", ".transformer_blocks.0.module.")
        got = sliced[(name if step else split_name, step)]  # a capture keeps the names it opened with
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
        differ.append((both[(split_name, 0)] - got).abs().max())
    assert max(differ) > 1e-4  # the halves differ


def test_a_layer_gone_from_the_model_during_the_capture_raises():
    """A watched layer's block put under another name (not a split's wrapper) was no longer recorded, silently."""
    model = FAMILIES["motion"].model()
    inputs = motion_inputs(model, batch=1, frames=8)
    motion = model.down_blocks[0].motion_modules[0]
    with torch.no_grad(), capture_temporal_attention(model) as maps:
        model(**inputs)
        motion.transformer_blocks = torch.nn.ModuleList([torch.nn.ModuleDict({"inner": motion.transformer_blocks[0]})])
        with pytest.raises(ValueError, match=r"down_blocks\.0\.motion_modules\.0\.transformer_blocks\.0\.attn1: this "
                                             r"layer the capture records is no longer in the model"):
            model(**inputs)
    assert maps.steps() == [0]


def test_free_noise_blocks_swapped_in_are_watched_from_the_next_run():
    pipe = animatediff()
    model = pipe.unet
    with capture_temporal_attention(model, levels=[0]) as maps:
        pipe.enable_free_noise(context_length=8, context_stride=4)  # new attention modules, same names
        reset_steps(model)  # a new run (a pipeline's set_timesteps does the same)
        _, calls = run_capturing(model, motion_inputs(model, batch=1, frames=16), maps.levels)
    assert sorted(maps) == sorted((name, 0) for name in maps.levels)
    for name in maps.levels:
        windows = [x for x, _, _ in calls[name]]
        assert len(windows) == 3 and all(x.shape[1] == 8 for x in windows)  # frames 0-8, 4-12, 8-16
        expected = map64(attention_modules(model)[name], torch.cat(windows))  # the windows averaged together
        torch.testing.assert_close(maps[(name, 0)], expected, **MAP_TOL)


def test_steps_levels_and_layers_filter_what_is_recorded():
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    levels = fam.expected_levels(model, include_input_block=True)
    with capture_temporal_attention(model, steps=[0, 2], levels=[1]) as by_level, \
            capture_temporal_attention(model, layers=["mid_block.temp_attentions.0.transformer_blocks.0.attn1"]) as one:
        outs = [forward(model, inputs) for _ in range(3)]
    assert sorted(by_level) == sorted((n, s) for n, lvl in levels.items() if lvl == 1 for s in (0, 2))
    assert by_level.steps() == [0, 2] and set(by_level.levels.values()) == {1}
    assert list(one) == [("mid_block.temp_attentions.0.transformer_blocks.0.attn1", s) for s in range(3)]
    assert set(one.by_level(1)) == {2}
    assert torch.equal(outs[0], outs[2])
    with pytest.raises(KeyError, match="no map recorded at step 5"):
        one.by_level(5)


@pytest.mark.parametrize("tar", ["none", "applied", "removed"])
def test_a_bare_unets_steps_are_numbered_by_its_timesteps_with_or_without_tar(tar):
    """Two bare-model runs of two steps (timesteps 999, 500 each): a capture numbers them 0, 1 and 0, 1 whether
    TAR was never applied, is applied, or was applied and removed (the rule is the model's, not the feature's)."""
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    if tar != "none":
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    name = "mid_block.temp_attentions.0.transformer_blocks.0.attn1"
    with capture_temporal_attention(model, layers=[name], steps=[1, 2]) as maps:
        if tar == "removed":
            remove_tar(model)
        for t in (999, 500, 999, 500):
            forward(model, {**inputs, "timestep": torch.tensor(t)})
    assert list(maps) == [(name, 1)]


def test_chunks_give_the_map_of_one_chunk_and_bound_the_probabilities(monkeypatch):
    model = FAMILIES["unet3d"].model()
    inputs = unet3d_inputs(model, batch=2, size=8)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    names = [n for n, lvl in FAMILIES["unet3d"].expected_levels(model).items() if lvl == 0]
    sizes = []
    real_scores = capture_module.tar_scores

    def counting_scores(problem, *args):
        sizes.append(problem.batch * problem.heads * problem.nq * problem.nk)
        return real_scores(problem, *args)

    monkeypatch.setattr(capture_module, "tar_scores", counting_scores)
    runs = {}
    one = 2 * 8 * 8  # the scores of one sequence of the level-0 modules (2 heads, 8 frames)
    for elements in (1, numpy.int64(7 * one), 10 ** 6):  # 1: a sequence per chunk all the same; numpy ints taken
        reset_steps(model)
        with capture_temporal_attention(model, layers=names, chunk_elements=elements) as maps:
            forward(model, inputs)
        runs[elements] = maps
    budget = 5 * one
    sizes.clear()
    reset_steps(model)
    with capture_temporal_attention(model, layers=names, chunk_elements=budget) as runs["budget"]:
        forward(model, inputs)
    assert max(sizes) <= budget and len(sizes) >= len(names) * one // 5
    reset_steps(model)
    with pytest.warns(DeprecationWarning, match="chunk_size"):
        with capture_temporal_attention(model, layers=names, chunk_size=numpy.int64(3)) as runs["sequences"]:
            forward(model, inputs)
    for chunk, maps in runs.items():
        for key in runs[10 ** 6]:
            torch.testing.assert_close(maps[key], runs[10 ** 6][key], atol=1e-7, rtol=0, msg=f"chunk {chunk}")


def test_exit_removes_hooks_and_the_step_tracker_it_added():
    model = FAMILIES["unet3d"].model()
    with capture_temporal_attention(model):
        assert StepTracker.of(model) is not None
    assert StepTracker.of(model) is None and not model._forward_pre_hooks
    assert not any(m._forward_hooks for m in model.modules())
    apply_tar(model, TARConfig.from_preset("64D1"))
    tracker = StepTracker.of(model)
    with capture_temporal_attention(model):
        pass
    assert StepTracker.of(model) is tracker and len(model._forward_pre_hooks) == 1
    remove_tar(model)


@pytest.mark.parametrize("kwargs, error, match", [
    pytest.param(dict(levels=[3]), ValueError, r"levels \[3\] do not exist.*levels \[0, 1, 2\]", id="level"),
    pytest.param(dict(layers=["conv_in"]), ValueError, r"layers \['conv_in'\] are not temporal", id="layer"),
    pytest.param(dict(layers="mid_block"), TypeError, "layers must be a collection", id="layers-str"),
    pytest.param(dict(steps=[-1]), ValueError, "steps must hold ints >= 0", id="step-negative"),
    pytest.param(dict(steps=[]), ValueError, "steps must hold ints >= 0", id="steps-empty"),
    pytest.param(dict(steps=3), TypeError, "steps must be a collection", id="steps-int"),
    pytest.param(dict(cfg=1), TypeError, "cfg must be a bool or None", id="cfg"),
    pytest.param(dict(chunk_elements=0), ValueError, "chunk_elements must be a positive int", id="chunk"),
    pytest.param(dict(levels=[0], layers=["mid_block.temp_attentions.0.transformer_blocks.0.attn1"]), ValueError,
                 "no temporal attention module is both", id="disjoint"),
])
def test_bad_arguments_raise_naming_them(kwargs, error, match):
    model = FAMILIES["unet3d"].model()
    with pytest.raises(error, match=match):
        with capture_temporal_attention(model, **kwargs):
            pass
    assert StepTracker.of(model) is None


def test_models_without_temporal_attention_are_rejected():
    with pytest.raises(ValueError, match="UNet2DConditionModel has no temporal self-attention"):
        with capture_temporal_attention(unet2d()):
            pass


def test_tar_applied_mid_run_under_ddim_keeps_an_open_captures_count():
    """DDIM keeps no step index: TAR applied first from a step callback restarted the count the capture kept, so
    steps 2 and 3 were recorded as steps 0 and 1 and averaged into their maps, without a word. TAR takes the
    count the capture kept of the run, and regularizes from the loop's next step."""
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                               motion_adapter=motion_adapter(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    seen = []

    def on_step_end(p, i, t, kwargs):
        if i == 1:
            apply_tar(p, TARConfig(levels={1: (1.0, 1.0)}, until_step=2))
            seen.append(StepTracker.of(p.unet).next_step)
        return {}

    with capture_temporal_attention(pipe, layers=["mid_block.motion_modules.0.transformer_blocks.0.attn1"]) as maps:
        pipe(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6),
             num_inference_steps=4, num_frames=8, height=32, width=32, output_type="latent",
             callback_on_step_end=on_step_end)
    assert maps.steps() == [0, 1, 2, 3] and seen == [2]


def test_tar_applied_mid_run_under_euler_counts_from_the_loop_index_with_a_capture_opened_mid_run():
    """A capture opened mid-run counts from its opening: TAR, applied first later, took that count where the
    scheduler's step index says the loop's (1 for loop step 3), and regularized past until_step."""
    import contextlib

    from diffusers import EulerDiscreteScheduler
    from vstar_kernels.diffusers.install import tar_state

    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                               motion_adapter=motion_adapter(), scheduler=EulerDiscreteScheduler())
    pipe.set_progress_bar_config(disable=True)
    stack, seen = contextlib.ExitStack(), []

    def on_step_end(p, i, t, kwargs):
        if i == 1:
            stack.enter_context(capture_temporal_attention(p))
        if i == 2:
            apply_tar(p, TARConfig(levels={1: (1.0, 1.0)}, until_step=3))
            seen.append(StepTracker.of(p.unet).next_step)
        if i > 2:
            seen.append((i, tar_state(p.unet).regularizing))
        return {}

    with stack:
        pipe(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6),
             num_inference_steps=6, num_frames=8, height=32, width=32, output_type="latent",
             callback_on_step_end=on_step_end)
    assert seen == [3, (3, True), (4, False), (5, False)]
