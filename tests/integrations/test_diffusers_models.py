"""apply_tar / remove_tar on tiny random models of the five video families (CPU, no downloads).

Each regularized attention module is checked call by call: its output must equal
a float64 evaluation of the semantics (helpers.naive_tar) on the inputs it received,
with the (sigma, strength) of the level where the module sits.
"""

import contextlib
import math
import re

import pytest
import torch
from torch._dynamo.testing import CompileCounter
from diffusers import AnimateDiffPipeline, UNet3DConditionModel
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0, FusedAttnProcessor2_0

from vstar_kernels import PRESETS, TARConfig
from vstar_kernels.diffusers import (TARAttnProcessor, apply_tar, capture_frame_attention, capture_temporal_attention,
                                    remove_tar, reset_steps)
from vstar_kernels.diffusers import processors as tar_processors
from vstar_kernels.diffusers.processors import tar_site
from vstar_kernels.diffusers.steps import StepTracker

from .._device import DEVICE
from ..helpers import TOLERANCES, assert_close_to_reference, naive_tar
from .tiny_video_models import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    FAMILIES,
    LEVEL_SPECS,
    attention64,
    attention_modules,
    forward,
    run_capturing,
    motion_adapter,
    motion_inputs,
    one_torch_thread,
    unet2d,
    unet3d_inputs,
    wide_motion,
)

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)


def processors(model):
    return {name: m.processor for name, m in attention_modules(model).items()}


def check_modules(model, calls, specs):
    """Every call of every module in `specs` (name -> (sigma, strength)) against float64."""
    modules = attention_modules(model)
    for name, (sigma, strength) in specs.items():
        assert calls[name], f"{name} was not called"
        for x, context, out in calls[name]:
            ref = attention64(modules[name], x, context, sigma, strength)
            assert_close_to_reference(out, ref, torch.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_tar_regularizes_exactly_the_temporal_attention(family):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs(model)
    expected = fam.expected_levels(model)
    levels = sorted(set(expected.values()))
    before = processors(model)
    plain = forward(model, inputs)

    config = TARConfig(levels={lvl: LEVEL_SPECS[lvl] for lvl in levels}, until_step=None)
    names = apply_tar(model, config)
    assert sorted(names) == sorted(expected)
    out, calls = run_capturing(model, inputs, expected)
    check_modules(model, calls, {name: LEVEL_SPECS[lvl] for name, lvl in expected.items()})
    for name, proc in processors(model).items():
        if name in expected:
            assert isinstance(proc, TARAttnProcessor)
            assert tar_site(attention_modules(model)[name]).level == expected[name]
        else:
            assert proc is before[name], f"{name} was touched"
    assert (out - plain).abs().max() > 1e-3, "TAR did not change the model output"

    remove_tar(model)
    assert torch.equal(forward(model, inputs), plain)
    assert all(processors(model)[name] is proc for name, proc in before.items())
    assert not model._forward_pre_hooks
    assert StepTracker.of(model) is None
    assert all(tar_site(m) is None for m in attention_modules(model).values())


@pytest.mark.parametrize("family", ["unet3d", "i2vgen_xl"])
def test_input_block_temporal_attention_only_on_request(family):
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs(model)
    without = fam.expected_levels(model)
    with_input = fam.expected_levels(model, include_input_block=True)
    assert len(with_input) > len(without)

    assert sorted(apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))) == sorted(
        n for n, lvl in without.items() if lvl == 0)
    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, include_input_block=True))
    level0 = sorted(n for n, lvl in with_input.items() if lvl == 0)
    assert sorted(names) == level0
    _, calls = run_capturing(model, inputs, level0)
    check_modules(model, calls, {name: (1.0, 1.0) for name in level0})


def test_a_level_held_by_the_input_block_alone_needs_include_input_block():
    """A UNet whose first level has no temporal attention but the input block's: without include_input_block,
    apply_tar regularized nothing there and said nothing; it is a level the model lacks, saying what reaches it.
    include_input_block on a model without an input block (AnimateDiff's) was ignored: an error too."""
    model = UNet3DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                 cross_attention_dim=8, attention_head_dim=4, sample_size=8,
                                 down_block_types=("DownBlock3D", "CrossAttnDownBlock3D"),
                                 up_block_types=("CrossAttnUpBlock3D", "UpBlock3D"))
    with pytest.raises(ValueError, match=r"levels \[0\] do not exist in UNet3DConditionModel: its temporal attention "
                                         r"runs at levels \[1\] .* the input block's \(transformer_in\..*\) is "
                                         r"regularized with include_input_block=True"):
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, include_input_block=True))
    assert names and all(name.startswith("transformer_in.") for name in names)
    with pytest.raises(ValueError, match="include_input_block=True, but UNetMotionModel has no input block"):
        apply_tar(FAMILIES["motion"].model(), TARConfig(levels={0: (1.0, 1.0)}, include_input_block=True))
    with pytest.raises(ValueError, match=r"include_input_block=True regularizes the input block's temporal attention "
                                         r"at level 0, which levels \[1\] does not name"):
        apply_tar(model, TARConfig(levels={1: (1.0, 1.0)}, include_input_block=True))
    with pytest.raises(ValueError, match=r"levels \[5\] do not exist .* \(0 = full latent resolution\)$"):
        apply_tar(model, TARConfig(levels={1: (1.0, 1.0), 5: (1.0, 1.0)}))


def preset_levels(name):
    """Paper preset name -> {level: sigma}: "64" is level 0, "32" level 1, "D" precedes sigma."""
    width_level = {"64": 0, "32": 1, "16": 2, "8": 3}
    return {width_level[w]: float(s) for w, s in re.findall(r"(\d+)D(\d+)", name)}


# the compiled-UNet tests' models: two levels, the fewest with a level that 64D1 does not regularize
COMPILED_CHANNELS = (8, 16)


@pytest.mark.parametrize("family", ["motion", "unet3d"])
def test_a_compiled_unet_gets_its_own_levels(family):
    """pipe.unet = torch.compile(pipe.unet) names every module "_orig_mod. ...": TAR goes on the module it wraps,
    by that module's names and levels (the preset's, not every temporal attention at level 0), and the compiled
    model runs it, also when it ran once before apply_tar. Two levels (tracing the UNet is this test's time): 64D1
    leaves level 1's temporal attention (the mid block's among them) alone."""
    fam = FAMILIES[family]
    model = fam.model(channels=COMPILED_CHANNELS)
    assert set(fam.expected_levels(model).values()) == {0, 1}
    inputs = fam.inputs(model)
    config = TARConfig.from_preset("64D1")
    names = apply_tar(model, config)
    expected = forward(model, inputs)
    remove_tar(model)
    compiled = torch.compile(model, backend="eager")
    stock = forward(compiled, inputs)
    assert apply_tar(compiled, config) == names
    assert not torch.equal(expected, stock)
    torch.testing.assert_close(forward(compiled, inputs), expected, rtol=0, atol=1e-6)
    remove_tar(compiled)
    torch.testing.assert_close(forward(compiled, inputs), stock, rtol=0, atol=1e-6)


def test_a_compiled_unet_compiles_once_with_tar_and_once_without_whatever_the_steps():
    """Each regularized temporal attention read the step: under torch.compile a graph break at each (a context
    variable), and without it a guard, the whole UNet compiled again at every step until dynamo's limit of 8 ran it
    eagerly. Now the call's decision is fixed before it: one frame set with TAR, one more once until_step ends.
    With fullgraph=True: the hooks that count the steps on the host run outside the graph (traced, the first call
    failed on a data-dependent guard). Two levels, both regularized (each trace of the UNet is this test's time)."""
    fam = FAMILIES["unet3d"]
    model = fam.model(channels=COMPILED_CHANNELS)
    inputs = fam.inputs(model)
    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0), 1: (1.0, 1.0)}, until_step=1))
    expected = [forward(model, inputs) for _ in range(4)]
    reset_steps(model)
    torch._dynamo.reset()
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter, fullgraph=True)
    frames = []
    for out in expected:
        assert torch.equal(forward(compiled, inputs), out)
        frames.append(counter.frame_count)
    assert frames[0] == frames[1] < frames[2] == frames[3], frames
    site = tar_site(attention_modules(model)[names[0]])
    assert site.spec_now() is None  # after step 3
    reset_steps(model)  # step 0 next: regularized, also for a module called alone before the model's next call
    assert site.spec_now() is site.spec


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_regularize_the_levels_in_their_names(preset):
    fam = FAMILIES["unet3d"]
    model = fam.model()
    expected = fam.expected_levels(model)
    levels = preset_levels(preset)
    config = TARConfig.from_preset(preset)
    assert config.until_step == 13 and not config.include_input_block
    names = apply_tar(model, config)
    assert sorted(names) == sorted(n for n, lvl in expected.items() if lvl in levels)
    modules = attention_modules(model)
    for name in names:
        site = tar_site(modules[name])
        assert (site.spec.sigma, site.spec.strength) == (levels[expected[name]], 1.0)


def test_step_gate_flips_after_until_step_and_reset_restarts():
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    plain = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 1.0)}, until_step=2))
    outs = [forward(model, inputs) for _ in range(5)]
    assert (outs[0] - plain).abs().max() > 1e-3
    assert torch.equal(outs[1], outs[0]) and torch.equal(outs[2], outs[0])
    assert torch.equal(outs[3], plain) and torch.equal(outs[4], plain)
    reset_steps(model)
    assert torch.equal(forward(model, inputs), outs[0])


def test_a_call_at_a_larger_timestep_starts_a_new_run():
    """A UNet's denoising loop passes falling timesteps (repeated: Heun's, unbatched guidance): a call at a larger
    one than the last call's starts a new run, counted from step 0, also where no scheduler marks it (a bare model;
    another pipeline's scheduler, test_diffusers_pipelines); a timestep given by keyword counts too."""
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=1))
    tracker = StepTracker.of(model)
    steps = []
    for t in (999, 600, 600, 200, 999, 500, 900):
        forward(model, {**inputs, "timestep": torch.tensor(t)})
        steps.append(tracker.step)
    assert steps == [0, 1, 2, 3, 0, 1, 0]
    with torch.no_grad():
        model(inputs["sample"], torch.tensor(100), inputs["encoder_hidden_states"])  # positional
        model(inputs["sample"], torch.tensor(950.0), encoder_hidden_states=inputs["encoder_hidden_states"])
    assert tracker.step == 0


def test_apply_tar_starts_counting_at_0_on_a_shared_step_tracker():
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    plain = forward(model, inputs)
    tracker = StepTracker.attach(model, "another feature")
    for _ in range(3):
        forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=0))
    assert StepTracker.of(model) is tracker
    assert (forward(model, inputs) - plain).abs().max() > 1e-3
    assert torch.equal(forward(model, inputs), plain)
    remove_tar(model)
    assert StepTracker.of(model) is tracker and len(model._forward_pre_hooks) == 1


def test_identity_levels_and_sdpa_path_match_attn_processor_2_0_bitwise():
    """strength 0 / sigma = inf, and a TARAttnProcessor on every module without TAR: the plain model, bit for bit."""
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    plain = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 0.0), 1: (math.inf, 1.0)}, until_step=None))
    assert torch.equal(forward(model, inputs), plain)
    remove_tar(model)
    model.set_attn_processor(TARAttnProcessor())
    assert torch.equal(forward(model, inputs), plain)


@pytest.mark.parametrize("case", ["mask-4d-residual", "cross-groupnorm-rescale"])
def test_processor_without_tar_equals_attn_processor_2_0_on_module_options(case):
    torch.manual_seed(0)
    if case == "mask-4d-residual":
        attn = Attention(query_dim=8, heads=2, dim_head=4, residual_connection=True)
        x = torch.randn(2, 8, 3, 3)  # image-shaped input
        kwargs = dict(attention_mask=torch.randn(2, 1, 9))
    else:
        attn = Attention(query_dim=8, cross_attention_dim=6, heads=2, dim_head=4, norm_num_groups=2,
                         rescale_output_factor=2.0, cross_attention_norm="layer_norm")
        x = torch.randn(2, 5, 8)
        kwargs = dict(encoder_hidden_states=torch.randn(2, 7, 6))
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(x, **kwargs)
        attn.set_processor(TARAttnProcessor())
        assert torch.equal(attn(x, **kwargs), ref)


class ViewRecorder(TARAttnProcessor):
    """Records the layout of the q/k/v it receives and the step it is called at."""

    def __init__(self):
        self.seen = []

    def attention(self, attn, query, key, value, *, attention_mask=None, spec=None):
        self.seen.append((attn.heads, query, key, value, tar_site(attn).steps.step))
        return super().attention(attn, query, key, value, attention_mask=attention_mask, spec=spec)


def test_a_subclass_written_for_the_hooks_old_step_argument_is_refused_where_it_is_defined():
    with pytest.raises(TypeError, match=r"Old.attention takes `step`: TARAttnProcessor.attention takes the call's "
                                        r"level spec as `spec` instead"):
        class Old(TARAttnProcessor):
            def attention(self, attn, query, key, value, *, attention_mask=None, step=None):
                return super().attention(attn, query, key, value, attention_mask=attention_mask)

    class Both(TARAttnProcessor):  # a step of its own beside spec: left alone
        def attention(self, attn, query, key, value, *, attention_mask=None, spec=None, step=0):
            return super().attention(attn, query, key, value, attention_mask=attention_mask, spec=spec)


def test_q_k_v_are_strided_views_and_recreated_processors_keep_tar():
    """A fresh TARAttnProcessor() (as diffusers makes when loading IP adapters) keeps the module's TAR."""
    fam = FAMILIES["motion"]
    model = fam.model()
    inputs = fam.inputs(model)
    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 1.0)}, until_step=None))
    tar_out = forward(model, inputs)
    recorder = ViewRecorder()
    modules = attention_modules(model)
    for name in names:
        modules[name].set_processor(recorder)
    assert torch.equal(forward(model, inputs), tar_out)
    assert len(recorder.seen) == len(names)
    for heads, *qkv, step in recorder.seen:
        assert step == 1
        for t in qkv:
            B, H, N, D = t.shape
            assert H == heads
            # (B, N, H, D) memory viewed as (B, H, N, D): no copy was made
            assert t.stride() == (N * H * D, D, H * D, 1)


def test_free_noise_blocks_swapped_in_after_apply_tar_on_the_model_get_tar_at_the_next_forward():
    """apply_tar on the bare model, then FreeNoise swaps its motion blocks in (and out): no reset_steps in between.

    With FreeNoise the motion modules run on frame windows, each regularized on its own.
    """
    fam = FAMILIES["motion"]
    model = fam.model()
    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=model,
                               motion_adapter=motion_adapter(), scheduler=None)
    inputs = motion_inputs(model, batch=1, frames=16)
    config = TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 0.75)}, until_step=None)
    expected = {n: lvl for n, lvl in fam.expected_levels(model).items() if lvl <= 1}

    names = apply_tar(model, config)
    assert sorted(names) == sorted(expected)
    for enable, windows, frames in ((True, 3, 8), (False, 1, 16)):  # FreeNoise windows 0-8, 4-12, 8-16
        old = {name: attention_modules(model)[name] for name in expected}
        if enable:
            pipe.enable_free_noise(context_length=8, context_stride=4)
        else:
            pipe.disable_free_noise()
        assert all(attention_modules(model)[name] is not old[name] for name in expected)
        _, calls = run_capturing(model, inputs, expected)
        for name, module_calls in calls.items():
            assert len(module_calls) == windows and all(x.shape[1] == frames for x, _, _ in module_calls)
        check_modules(model, calls, {n: LEVEL_SPECS[lvl] for n, lvl in expected.items()})
        modules = attention_modules(model)
        assert {n for n, m in modules.items() if isinstance(m.processor, TARAttnProcessor)} == set(expected)
        assert all(tar_site(old[name]) is None and isinstance(old[name].processor, AttnProcessor2_0)
                   for name in expected), "a module swapped out keeps TAR"
    remove_tar(model)
    assert all(isinstance(m.processor, AttnProcessor2_0) and tar_site(m) is None
               for m in attention_modules(model).values())
    assert not model._forward_pre_hooks


@pytest.mark.parametrize("family", ["unet3d", "motion"])
def test_set_default_attn_processor_works_in_the_documented_order(family):
    """diffusers' set_default_attn_processor refuses TAR's processors: remove_tar, then it, then apply_tar again."""
    fam = FAMILIES[family]
    model = fam.model()
    inputs = fam.inputs(model)
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=None)
    apply_tar(model, config)
    installed = processors(model)
    with pytest.raises(ValueError, match="set_default_attn_processor"):
        model.set_default_attn_processor()
    assert processors(model) == installed

    remove_tar(model)
    model.set_default_attn_processor()
    assert all(type(proc) is AttnProcessor for proc in processors(model).values())
    plain = forward(model, inputs)
    apply_tar(model, config)
    assert (forward(model, inputs) - plain).abs().max() > 1e-3
    remove_tar(model)
    assert all(type(proc) is AttnProcessor for proc in processors(model).values())


def test_triton_and_reference_backends_give_the_same_unet_output():
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    outs = {}
    for backend in ("reference", "triton"):
        apply_tar(model, TARConfig.from_preset("64D1_32D8", backend=backend))
        outs[backend] = forward(model, inputs)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(outs["triton"], outs["reference"], atol=atol, rtol=rtol)


class KernelRecorder(TARAttnProcessor):
    """Keeps q, k, v, the level spec and the output of every regularized attention call."""

    def __init__(self):
        self.calls = []

    def attention(self, attn, query, key, value, *, attention_mask=None, spec=None):
        out = super().attention(attn, query, key, value, attention_mask=attention_mask, spec=spec)
        self.calls.append((query, key, value, spec, out))
        return out


@pytest.mark.gpu
def test_fused_kernel_in_a_half_precision_animatediff_unet_matches_float64():
    """CUDA fp16 with head dims 16 and 160 (AnimateDiff's widest): every TAR call against naive_tar."""
    model = wide_motion().to(DEVICE, torch.float16)
    inputs = {k: v.to(DEVICE, torch.float16) if v.is_floating_point() else v.to(DEVICE)
              for k, v in motion_inputs(model).items()}
    names = apply_tar(model, TARConfig(levels={0: (1.0, 1.0), 1: (8.0, 1.0)}, until_step=None, backend="triton"))
    recorder = KernelRecorder()
    modules = attention_modules(model)
    for name in names:
        modules[name].set_processor(recorder)
    forward(model, inputs)
    assert len(recorder.calls) == len(names)
    assert {q.shape[-1] for q, *_ in recorder.calls} == {16, 160}
    for q, k, v, spec, out in recorder.calls:
        ref = naive_tar(q.cpu(), k.cpu(), v.cpu(), sigma=spec.sigma, strength=spec.strength)
        assert_close_to_reference(out.cpu(), ref, torch.float16)


def test_errors_name_the_problem():
    with pytest.raises(ValueError,
                       match="no temporal self-attention.*UNet2DConditionModel|UNet2DConditionModel.*no temporal"):
        apply_tar(unet2d(), TARConfig.from_preset("64D1"))
    latte = FAMILIES["latte"].model()
    with pytest.raises(ValueError, match=r"levels \[1\].*levels \[0\]"):
        apply_tar(latte, TARConfig.from_preset("64D1_32D8"))
    with pytest.raises(TypeError, match="config must be a TARConfig"):
        apply_tar(latte, {0: (1.0, 1.0)})
    # every front-end function taking a pipeline or a model names its argument (the message began "expected a")
    for call in (lambda t: apply_tar(t, TARConfig.from_preset("64D1")), remove_tar, reset_steps,
                 lambda t: capture_temporal_attention(t).__enter__(), lambda t: capture_frame_attention(t).__enter__()):
        with pytest.raises(TypeError, match=r"^target must be a diffusers pipeline with a denoiser \(\.unet, .*\) or "
                                            r"a model \(torch\.nn\.Module\), got object$"):
            call(object())
    with pytest.raises(ValueError, match="apply_tar first"):
        reset_steps(latte)
    remove_tar(latte)  # nothing applied: a no-op

    names = apply_tar(latte, TARConfig.from_preset("64D1"))
    attn = attention_modules(latte)[names[0]]
    x = torch.randn(2, 8, attn.query_dim)
    with pytest.raises(ValueError, match="attention_mask"), torch.no_grad():
        attn(x, attention_mask=torch.zeros(2, 1, 8))


def all_levels(family, until_step=None):
    """TAR at every level of `family`'s temporal attention (LEVEL_SPECS)."""
    levels = sorted(set(FAMILIES[family].expected_levels(FAMILIES[family].model()).values()))
    return TARConfig(levels={level: LEVEL_SPECS[level] for level in levels}, until_step=until_step)


# the families whose checkpointed blocks hold temporal attention
@pytest.mark.parametrize("family", ["motion", "latte"])
def test_gradient_checkpointing_recomputes_each_block_at_the_step_of_its_forward_call(family):
    """Checkpointed blocks are recomputed in the backward pass after a second forward call (step 1, stock with
    until_step=0) advanced the step: outputs and every parameter gradient equal those without checkpointing."""
    fam = FAMILIES[family]
    config = all_levels(family, until_step=0)
    runs = []
    for checkpointing in (False, True):
        model = fam.model()
        if checkpointing:
            model.enable_gradient_checkpointing()
        apply_tar(model, config)
        inputs = fam.inputs(model)
        first = model(**inputs, return_dict=False)[0]
        second = model(**inputs, return_dict=False)[0]
        (first.square().mean() + second.mean()).backward()
        runs.append((first.detach(), second.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (first, second, grads), checkpointed = runs
    assert (first - second).abs().max() > 1e-3, "TAR did not change step 0"
    torch.testing.assert_close(checkpointed[0], first, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(checkpointed[1], second, atol=1e-6, rtol=1e-6)
    assert grads.keys() == checkpointed[2].keys()
    for name, grad in grads.items():
        torch.testing.assert_close(checkpointed[2][name], grad, atol=1e-6, rtol=1e-5, msg=name)


REPLACEMENTS = {
    "fuse_qkv_projections": lambda model: model.fuse_qkv_projections(),
    "AttnProcessor2_0": lambda model: model.set_attn_processor(AttnProcessor2_0()),
    "AttnProcessor": lambda model: model.set_attn_processor(AttnProcessor()),
}


@pytest.mark.parametrize("replace", list(REPLACEMENTS))
def test_processors_replaced_after_apply_tar_keep_tar(replace, monkeypatch):
    """apply_tar then a replacement of every processor: the output of the other order (replacement, then
    apply_tar), not the stock one; remove_tar gives back the replacement's processors."""
    fam = FAMILIES["unet3d"]
    config = all_levels("unet3d")
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    REPLACEMENTS[replace](model)
    replaced = processors(model)
    stock = forward(model, inputs)
    names = apply_tar(model, config)
    oracle = forward(model, inputs)
    assert (oracle - stock).abs().max() > 1e-3

    model = fam.model()
    apply_tar(model, config)
    REPLACEMENTS[replace](model)
    monkeypatch.setattr(tar_processors, "temporal_attention_modules", None)  # taking their place walks no model
    assert torch.equal(forward(model, inputs), oracle)
    for name, proc in processors(model).items():
        if name in names:
            site = tar_site(attention_modules(model)[name])
            fused = isinstance(replaced[name], FusedAttnProcessor2_0)  # TAR's fused processor stands in for it
            assert type(proc) is TARAttnProcessor and proc.fused == fused
            assert type(site.previous_fused if fused else site.previous) is type(replaced[name])
        else:
            assert type(proc) is type(replaced[name])
    remove_tar(model)
    assert {n: type(p) for n, p in processors(model).items()} == {n: type(p) for n, p in replaced.items()}
    assert torch.equal(forward(model, inputs), stock)


@pytest.mark.parametrize("order", ["skip, then apply_tar", "apply_tar, then skip"])
@pytest.mark.parametrize("scores", [True, False], ids=["skip_attention_scores", "skip_attention"])
def test_diffusers_layer_skip_on_regularized_temporal_attention_runs_as_without_tar(order, scores):
    """diffusers' layer skip on Latte's temporal blocks (``apply_layer_skip``, as its perturbed-attention and
    skip-layer guiders set it for their perturbed call): the identity attention (``skip_attention_scores``, its mode
    answers the SDPA call with the values), or no attention; with every temporal block skipped, TAR leaves nothing to
    regularize: the stock model's skipped output, bit for bit, in either order. TAR answered the identity's SDPA call
    with its attention (skip first), or diffusers raised that TARAttnProcessor is not registered (TAR first). Once the
    skip is removed (a guider's cleanup), TAR runs again."""
    from diffusers.hooks import HookRegistry, LayerSkipConfig, apply_layer_skip

    fam = FAMILIES["latte"]
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=None)

    def skip(model):
        apply_layer_skip(model, LayerSkipConfig(indices=[0, 1], fqn="temporal_transformer_blocks",
                                                skip_attention=not scores, skip_attention_scores=scores, skip_ff=False))

    model = fam.model()
    inputs = fam.inputs(model)
    tar = forward(apply_tar(model, config) and model, inputs)
    model = fam.model()
    skip(model)
    skipped = forward(model, inputs)
    assert (skipped - tar).abs().max() > 1e-2
    model = fam.model()
    if order == "skip, then apply_tar":
        skip(model)
        apply_tar(model, config)
    else:
        apply_tar(model, config)
        skip(model)
    assert torch.equal(forward(model, inputs), skipped)
    for block in model.temporal_transformer_blocks:
        HookRegistry.check_if_exists_or_initialize(block.attn1).remove_hook("layer_skip_hook")
    assert torch.equal(forward(model, inputs), tar)


def test_tar_standing_in_for_fused_projections_projects_with_them():
    """With FusedAttnProcessor2_0's place taken, q, k and v come from to_qkv, as that processor computes them."""
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    model.fuse_qkv_projections()
    stock = forward(model, inputs)
    names = apply_tar(model, all_levels("unet3d"))
    fused = forward(model, inputs)
    assert (fused - stock).abs().max() > 1e-3
    modules = attention_modules(model)
    with torch.no_grad():
        for name in names:
            for layer in (modules[name].to_q, modules[name].to_k, modules[name].to_v):
                layer.weight.zero_()
    assert torch.equal(forward(model, inputs), fused)


def test_unfuse_after_fusing_under_tar_projects_with_the_separate_weights_again():
    """apply_tar, fuse_qkv_projections, unfuse_qkv_projections (diffusers puts back the processors it saved, TAR's
    plain one): TAR projects with to_q, to_k and to_v again, which changed since (a LoRA, a training step), as it
    does on a model that was never fused; remove_tar leaves diffusers' plain processor, as stock fuse and unfuse do.
    TAR went on projecting with the stale fused to_qkv, and remove_tar left FusedAttnProcessor2_0."""
    fam = FAMILIES["motion"]
    model, fresh = fam.model(), fam.model()
    inputs = fam.inputs(model)
    config = all_levels("motion")
    names = apply_tar(model, config)
    model.fuse_qkv_projections()
    forward(model, inputs)
    model.unfuse_qkv_projections()
    for unet in (model, fresh):
        modules = attention_modules(unet)
        with torch.no_grad():
            for name in names:
                modules[name].to_q.weight.mul_(3.0)
                modules[name].to_v.weight.add_(0.1)
    apply_tar(fresh, config)
    assert torch.equal(forward(model, inputs), forward(fresh, inputs))
    remove_tar(model)
    remove_tar(fresh)
    modules = attention_modules(model)
    assert {type(modules[name].processor) for name in names} == {AttnProcessor2_0}
    assert torch.equal(forward(model, inputs), forward(fresh, inputs))


class ScaledProcessor(AttnProcessor2_0):
    """A processor TAR cannot stand in for: it does more than AttnProcessor2_0."""

    def __call__(self, attn, hidden_states, *args, **kwargs):
        return 2 * super().__call__(attn, hidden_states, *args, **kwargs)


def test_processor_tar_cannot_stand_in_for_raises_at_the_next_forward():
    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = unet3d_inputs(model, batch=1, size=4)
    config = all_levels("unet3d")
    names = apply_tar(model, config)
    custom = ScaledProcessor()
    model.set_attn_processor(custom)
    with pytest.raises(RuntimeError, match=f"{names[0]}: its attention processor was replaced by ScaledProcessor "
                                           "after apply_tar.*apply_tar again.*remove_tar"):
        forward(model, inputs)
    remove_tar(model)  # keeps the processor set last
    assert all(p is custom for p in processors(model).values())
    stock = forward(model, inputs)
    # TAR in its place, as on any processor, and it says so (it did silently)
    with pytest.warns(UserWarning, match=f"TAR's processor takes the place of ScaledProcessor on {len(names)} "
                                         f"regularized temporal attention.*{names[0]}.*remove_tar puts it back"):
        apply_tar(model, config)
    assert (forward(model, inputs) - stock).abs().max() > 1e-3
    remove_tar(model)
    assert all(p is custom for p in processors(model).values())


def test_a_model_in_data_parallel_takes_tar_on_the_model_it_wraps(tmp_path):
    """Through DataParallel or DistributedDataParallel every module name began with ``module.``, read as level 0:
    the middle block's temporal attention (level 1) ran with level 0's settings, silently; apply_tar on the model
    inside then did nothing (its modules held a site already)."""
    import torch.distributed as dist

    fam = FAMILIES["unet3d"]
    config = TARConfig(levels={0: (1.0, 1.0)}, until_step=None)
    bare = fam.model()
    inputs = fam.inputs(bare)
    names = apply_tar(bare, config)
    expected = forward(bare, inputs)
    if not torch.cuda.is_available():  # (DataParallel moves the model to a GPU where there is one)
        wrapped = torch.nn.DataParallel(fam.model())
        assert apply_tar(wrapped, config) == names and apply_tar(wrapped.module, config) == names  # applied again
        assert torch.equal(forward(wrapped, inputs), expected)
        remove_tar(wrapped)
        assert not any(tar_site(m) for m in wrapped.modules())
        wrapped.device_ids = [0, 1]  # a copy of the model called on each device: two steps a call
        with pytest.raises(ValueError, match="DataParallel over 2 devices calls a copy of the model on each"):
            apply_tar(wrapped, config)
    with pytest.raises(ValueError, match=r"^0\.down_blocks\.0\.temp_attentions\.0\.transformer_blocks\.0\.attn1: a "
                                         r"temporal attention's level is read from where it sits .* Sequential holds "
                                         r"it under 0: give the video model itself"):
        apply_tar(torch.nn.Sequential(fam.model()), config)  # another wrapper: every level was read as 0
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(fam.model())
        assert apply_tar(ddp, config) == names
        assert torch.equal(forward(ddp, inputs), expected)
    finally:
        dist.destroy_process_group()


def test_a_module_under_tar_through_another_model_is_refused():
    """A model holding another's regularized modules skipped them without a word."""
    model = FAMILIES["unet3d"].model()
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    holder = torch.nn.ModuleDict({"down_blocks": model.down_blocks, "mid_block": model.mid_block,
                                  "up_blocks": model.up_blocks})
    with pytest.raises(ValueError, match=r"^down_blocks\.0\.temp_attentions\.0\.transformer_blocks\.0\.attn1: TAR is "
                                         r"applied to it already, through another model"):
        apply_tar(holder, TARConfig(levels={0: (1.0, 1.0)}))


@pytest.mark.parametrize("family, temporal", [("unet3d", "mid_block.temp_attentions.0"),
                                              ("motion", "mid_block.motion_modules.0"),
                                              ("svd", "mid_block.attentions.0")])
def test_a_block_of_a_unet_alone_is_refused(family, temporal):
    """A UNet's block given alone read every temporal attention in it as level 0: levels={0: ...} regularized a
    level-1 block's, silently, and levels={1: ...} said the level did not exist. So did SVD's temporal transformer
    (TransformerSpatioTemporalModel) alone; the 3D UNets' (TransformerTemporalModel) was said to have none."""
    model = FAMILIES[family].model()
    config = TARConfig(levels={0: (1.0, 1.0)})
    for block in (model.down_blocks[1], model.mid_block, model.up_blocks[0], model.get_submodule(temporal)):
        with pytest.raises(ValueError, match=rf"^{type(block).__name__} is a block of a diffusers video UNet: a "
                                             r"temporal attention's level is read from where it sits in the model "
                                             r"\(down_blocks\.i, mid_block, up_blocks\.j\), so give the video model "
                                             r"itself$"):
            apply_tar(block, config)
        assert not block._forward_pre_hooks and StepTracker.of(block) is None
    assert apply_tar(model, config)  # the model itself


def test_a_holder_that_takes_no_weak_reference_is_refused_before_any_change():
    """A holder of the UNet that takes no weak reference raised Python's own error ("cannot create weak reference")
    after TAR had put its step counter on the model: remove_tar left it, and a deep copy was refused as under TAR."""
    import copy

    class Holder:
        __slots__ = ("unet",)

    model = FAMILIES["unet3d"].model()
    holder = Holder()
    holder.unet = model
    with pytest.raises(TypeError, match=r"^Holder holds the model, and the count of its steps keeps the object that "
                                        r"holds it by a weak reference, which it does not take .*: give the model "
                                        r"itself$"):
        apply_tar(holder, TARConfig(levels={0: (1.0, 1.0)}))
    assert StepTracker.of(model) is None and not model._forward_pre_hooks
    copy.deepcopy(model)
    assert apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))


@pytest.mark.parametrize("family", ["unet3d", "dit"])
def test_remove_tar_after_fusing_leaves_none_of_tars_processors_in_fuses_saved_ones(family):
    """fuse_qkv_projections saves the processors it replaces (TAR's), and unfuse_qkv_projections puts them back:
    after remove_tar a DiT still held TAR's processors (its deep copy refused as under TAR, torch.save failed), a
    UNet got TAR's processor back at unfuse (set_default_attn_processor raised)."""
    import copy
    import io

    from .tiny_dit_models import FAMILIES as DIT_FAMILIES

    model = DIT_FAMILIES["cogvideox"].model() if family == "dit" else FAMILIES["unet3d"].model()
    if family == "unet3d":  # one a user set, which remove_tar puts back
        kept = next(name for name in attention_modules(model) if "temp_attentions.0" in name)
        attention_modules(model)[kept].set_processor(MyProcessor())
    with pytest.warns(UserWarning, match="takes the place of MyProcessor") if family == "unet3d" \
            else contextlib.nullcontext():
        apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    model.fuse_qkv_projections()
    remove_tar(model)
    model.unfuse_qkv_projections()
    assert not any(type(p).__name__ in ("TARAttnProcessor", "DiTTARProcessor") for p in model.attn_processors.values())
    if family == "unet3d":
        assert type(attention_modules(model)[kept].processor) is MyProcessor
    copy.deepcopy(model)
    torch.save(model, io.BytesIO())
    if family == "unet3d":
        attention_modules(model)[kept].set_processor(AttnProcessor2_0())  # diffusers' own only, below
        model.set_default_attn_processor()


class MyProcessor(AttnProcessor2_0):
    """A processor of the user's, which TAR takes the place of (with a warning) and remove_tar puts back."""


def test_an_apply_tar_that_raises_leaves_the_model_as_it_was():
    """With warnings made errors, apply_tar's warning (a processor it takes the place of) left the step counter's
    hook, TAR's processors and sites on the model and no state for remove_tar: every call raised a NameError."""
    import warnings

    fam = FAMILIES["unet3d"]
    model = fam.model()
    inputs = fam.inputs(model)
    first = next(name for name in attention_modules(model) if "temp_attentions.0" in name)
    attention_modules(model)[first].set_processor(MyProcessor())
    before, stock = dict(model.attn_processors), forward(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="TAR's processor takes the place of MyProcessor"):
            apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}))
    assert model.attn_processors == before and not model._forward_pre_hooks
    assert not any(tar_site(m) for m in model.modules()) and StepTracker.of(model) is None
    assert torch.equal(forward(model, inputs), stock)


def test_remove_tar_after_a_split_inference_fused_gives_the_users_processor_back():
    """FreeNoise's split inference wraps blocks after apply_tar, so fuse_qkv_projections saves TAR's processor under
    a name with .module. in it, which the site (named at apply_tar) did not match: unfuse gave diffusers' plain
    processor where the user's had been."""
    import warnings

    from diffusers import DDIMScheduler

    from .tiny_video_models import motion_adapter

    pipe = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                               motion_adapter=motion_adapter(), scheduler=DDIMScheduler())
    pipe.enable_free_noise(context_length=4, context_stride=2)
    attn = pipe.unet.get_submodule("down_blocks.1.motion_modules.0.transformer_blocks.0.attn1")
    attn.set_processor(MyProcessor())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TAR takes its place
        apply_tar(pipe, TARConfig(levels={1: (1.0, 1.0)}))
    pipe.enable_free_noise_split_inference(spatial_split_size=8, temporal_split_size=4)
    pipe.unet.fuse_qkv_projections()
    remove_tar(pipe)
    pipe.unet.unfuse_qkv_projections()
    assert type(attn.processor) is MyProcessor
