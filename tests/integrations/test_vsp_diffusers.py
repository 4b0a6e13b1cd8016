"""Video Synopsis Prompting in diffusers video UNets and pipelines (tiny random models, CPU)."""

import copy
import io
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import UNetMotionModel  # noqa: E402
from diffusers.models.attention_processor import (Attention, AttnProcessor2_0,  # noqa: E402
                                                  IPAdapterAttnProcessor2_0)
from diffusers.models.transformers.transformer_2d import Transformer2DModel  # noqa: E402

from vstar_kernels.vsp import (apply_vsp, encode_synopsis, generate_with_synopsis,  # noqa: E402
                               interpolate_embeddings, load_synopses, remove_vsp)

from .tiny_video_models import (CONTEXT_DIM, MAX_TOKENS, call_args, motion_adapter,  # noqa: E402
                                one_torch_thread, tiny_text_to_video_pipeline,  # noqa: F401 (a fixture)
                                tiny_animatediff_pag_pipeline, tiny_animatediff_pipeline, tiny_unet3d,
                                tiny_unet_motion)

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

L, C, N = MAX_TOKENS, CONTEXT_DIM, 4
UNETS = {"unet3d": tiny_unet3d, "motion": tiny_unet_motion}
PIPELINES = {"text-to-video-sd": tiny_text_to_video_pipeline, "animatediff": tiny_animatediff_pipeline}


def processors(unet):
    return {name: m.processor for name, m in unet.named_modules() if isinstance(m, Attention)}


def spatial_cross_attention(unet):
    """attn2 of the blocks of every Transformer2DModel: found by type, not by name."""
    names = set()
    for tname, transformer in unet.named_modules():
        if isinstance(transformer, Transformer2DModel):
            for bname, block in transformer.transformer_blocks.named_children():
                names.add(f"{tname}.transformer_blocks.{bname}.attn2")
    return names


def unet_inputs(kind, batch, frames=N, seed=1):
    """sample (batch, 4, frames, 8, 8) and one text context row per video; an even batch's sample is one latent
    batch twice, as classifier-free guidance runs it (what cfg=True checks)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch // 2 if batch % 2 == 0 else batch, 4, frames, 8, 8, generator=g)
    return latents.repeat(2 if batch % 2 == 0 else 1, 1, 1, 1, 1), torch.randn(batch, L, C, generator=g)


def context_for(kind, ehs, frames=N):
    """The text context as each pipeline hands it to its UNet: per video (UNet3D), per frame (motion)."""
    return ehs if kind == "unet3d" else ehs.repeat_interleave(frames, dim=0)


def call(unet, sample, context, **kwargs):
    with torch.no_grad():
        return unet(sample, 3, context, **kwargs).sample


def reference_with_context(unet, kind, sample, per_frame_rows):
    """The stock UNet with a hand-built (batch * frames, L, C) context in every spatial transformer."""
    if kind == "motion":  # UNetMotionModel takes the per-frame context as it is
        return call(unet, sample, per_frame_rows)
    hooks = [m.register_forward_pre_hook(lambda mod, a, kw: (a, {**kw, "encoder_hidden_states": per_frame_rows}),
                                         with_kwargs=True)
             for m in unet.modules() if isinstance(m, Transformer2DModel)]
    try:
        return call(unet, sample, torch.zeros(sample.shape[0], L, C))
    finally:
        for h in hooks:
            h.remove()


@pytest.mark.parametrize("kind", UNETS)
def test_wraps_only_the_spatial_cross_attention_and_restores_it(kind):
    unet = UNETS[kind]()
    before = processors(unet)
    pre, post = dict(unet._forward_pre_hooks), dict(unet._forward_hooks)
    spatial = spatial_cross_attention(unet)
    temporal_attn2 = {n for n in before if n.endswith("attn2") and n not in spatial}
    assert spatial and temporal_attn2  # a pattern like r"attn2$" would catch both
    apply_vsp(unet, torch.zeros(N, L, C))
    changed = {n for n, p in processors(unet).items() if p is not before[n]}
    assert changed == spatial
    remove_vsp(unet)
    assert all(p is before[n] for n, p in processors(unet).items())
    assert dict(unet._forward_pre_hooks) == pre and dict(unet._forward_hooks) == post
    remove_vsp(unet)  # a second removal is a no-op


@pytest.mark.parametrize("cfg", [True, False], ids=["cfg", "no-cfg"])
@pytest.mark.parametrize("kind", UNETS)
def test_same_embedding_on_every_frame_is_exactly_stock(kind, cfg):
    unet = UNETS[kind]()
    sample, ehs = unet_inputs(kind, batch=2)
    context = context_for(kind, ehs)
    stock = call(unet, sample, context)
    # cfg: row 0 unconditional, row 1 the prompt; no cfg: two prompts, both conditional
    embeds = ehs[1:, None].expand(1, N, L, C) if cfg else ehs[:, None].expand(2, N, L, C)
    apply_vsp(unet, embeds, cfg=cfg)
    assert torch.equal(call(unet, sample, context), stock)
    remove_vsp(unet)
    assert torch.equal(call(unet, sample, context), stock)


@pytest.mark.parametrize("how", ["torch.save", "deepcopy"])
def test_a_unet_under_vsp_saved_whole_or_copied_gives_the_same_output(how):
    """VSP's processor shows the wrapped processor's signature through a class made for it: pickled, torch.save of
    the whole model raised (pickle found another class by that name)."""
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=2)
    apply_vsp(unet, torch.randn(1, N, L, C, generator=torch.Generator().manual_seed(5)), cfg=True)
    if how == "deepcopy":
        copied = copy.deepcopy(unet)
    else:
        buffer = io.BytesIO()
        torch.save(unet, buffer)
        buffer.seek(0)
        copied = torch.load(buffer, weights_only=False)
    out = call(unet, sample, context_for("unet3d", ehs))
    assert torch.equal(call(copied, sample, context_for("unet3d", ehs)), out)
    remove_vsp(copied)
    assert not torch.equal(call(copied, sample, context_for("unet3d", ehs)), out)


def test_a_unet_under_vsp_with_embeddings_carrying_a_graph_deep_copies_them_as_leaves():
    """apply_vsp keeps embeddings computed with autograd as given (gradients reach what they came from); a deep
    copy of the model raised torch's "Only Tensors created explicitly by the user (graph leaves)": it copies them
    as torch.save writes them, new leaves of the same values."""
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=2)
    context = context_for("unet3d", ehs)
    source = torch.randn(1, N, L, C, generator=torch.Generator().manual_seed(5)).requires_grad_()
    embeds = source * 2
    apply_vsp(unet, embeds, cfg=True)
    copied = copy.deepcopy(unet)
    kept, taken = unet._vstar_vsp_state.embeds, copied._vstar_vsp_state.embeds
    assert kept is embeds and taken.is_leaf and taken.requires_grad and torch.equal(taken, embeds)
    assert torch.equal(call(copied, sample, context), call(unet, sample, context))
    unet(sample, 3, context).sample.sum().backward()  # the original's still reaches the source
    assert source.grad is not None and source.grad.abs().sum() > 0
    remove_vsp(unet)
    remove_vsp(copied)


def test_a_compiled_unet_takes_vsp_on_the_module_it_wraps():
    """A torch.compile'd UNet (as apply_tar takes it): VSP goes on the UNet it wraps (it was refused as "not a
    pipeline holding one"), and the compiled call runs it; a UNet of another kind is named in the error."""
    unet = UNETS["unet3d"]()
    sample, ehs = unet_inputs("unet3d", batch=2)
    context = context_for("unet3d", ehs)
    embeds = torch.randn(1, N, *ehs.shape[1:], generator=torch.Generator().manual_seed(3))
    apply_vsp(unet, embeds, cfg=True)
    expected = call(unet, sample, context)
    remove_vsp(unet)
    compiled = torch.compile(unet, backend="eager")
    apply_vsp(compiled, embeds, cfg=True)
    torch.testing.assert_close(call(compiled, sample, context), expected, rtol=0, atol=0)
    remove_vsp(compiled)
    assert torch.equal(call(unet, sample, context), call(compiled, sample, context))
    with pytest.raises(TypeError, match="got Holder holding a Linear as .unet"):
        apply_vsp(type("Holder", (), {"unet": torch.nn.Linear(2, 2)})(), embeds)
    with pytest.raises(TypeError, match="got a torch.compile'd Linear"):
        apply_vsp(torch.compile(torch.nn.Linear(2, 2), backend="eager"), embeds)


@pytest.mark.parametrize("kind", UNETS)
def test_each_frame_gets_its_own_embedding_unconditional_half_kept(kind):
    unet = UNETS[kind]()
    sample, ehs = unet_inputs(kind, batch=4)
    embeds = torch.randn(2, N, L, C, generator=torch.Generator().manual_seed(5))  # two synopses
    # rows: videos 0, 1 unconditional (keep their own context), videos 2, 3 get synopses 0, 1
    rows = torch.cat([ehs[:2].repeat_interleave(N, dim=0), embeds.reshape(2 * N, L, C)])
    expected = reference_with_context(unet, kind, sample, rows)
    apply_vsp(unet, embeds, cfg=True)
    out = call(unet, sample, context_for(kind, ehs))
    remove_vsp(unet)
    assert torch.equal(out, expected)
    assert not torch.equal(out, call(unet, sample, context_for(kind, ehs)))


def test_one_synopsis_shared_by_several_videos_without_cfg():
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=2)
    embeds = torch.randn(N, L, C, generator=torch.Generator().manual_seed(6))
    expected = reference_with_context(unet, "unet3d", sample, embeds.repeat(2, 1, 1))
    apply_vsp(unet, embeds, cfg=False)
    assert torch.equal(call(unet, sample, ehs), expected)


def test_two_synopses_cover_their_videos():
    """Two videos per synopsis (num_videos_per_prompt's layout: a prompt's videos consecutive)."""
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=4, seed=3)
    embeds = torch.randn(2, N, L, C, generator=torch.Generator().manual_seed(8))
    expected = reference_with_context(unet, "unet3d", sample, embeds.repeat_interleave(2, dim=0).reshape(4 * N, L, C))
    apply_vsp(unet, embeds, cfg=False)
    assert torch.equal(call(unet, sample, ehs), expected)


def test_a_nan_in_one_latent_batch_twice_is_not_taken_for_a_run_without_guidance():
    """A NaN in the latents (a float16 run gone wrong) is not equal to itself: cfg=True's check took the sample for
    two latent batches and raised that guidance was off (naming cfg), not what went wrong."""
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=2)
    sample[:, 0, 0, 0, 0] = float("nan")
    apply_vsp(unet, torch.randn(N, L, C))
    assert call(unet, sample, ehs).isnan().any()


def test_motion_unet_called_with_one_context_row_per_video():
    unet = tiny_unet_motion()
    sample, ehs = unet_inputs("motion", batch=1)
    embeds = torch.randn(N, L, C, generator=torch.Generator().manual_seed(7))
    expected = call(unet, sample, embeds)
    apply_vsp(unet, embeds, cfg=False)
    assert torch.equal(call(unet, sample, ehs), expected)


def test_reapplying_replaces_the_embeddings():
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=1)
    before = processors(unet)
    apply_vsp(unet, torch.randn(N, L, C), cfg=False)
    apply_vsp(unet, ehs[0].expand(N, L, C), cfg=False)
    assert torch.equal(call(unet, sample, ehs), reference_with_context(unet, "unet3d", sample, ehs.expand(N, L, C)))
    remove_vsp(unet)
    assert all(p is before[n] for n, p in processors(unet).items())


class Spy:
    """A processor taking an extra keyword; records the context and the keyword it receives."""

    def __init__(self):
        self.seen = []

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, gain=1.0):
        self.seen.append((encoder_hidden_states, gain))
        text = encoder_hidden_states[0] if isinstance(encoder_hidden_states, tuple) else encoder_hidden_states
        return gain * AttnProcessor2_0()(attn, hidden_states, text, attention_mask)


def first_spatial(unet):
    modules = dict(unet.named_modules())
    return modules[sorted(spatial_cross_attention(unet))[0]]


def test_wrapped_processor_keeps_its_keywords_and_sees_the_per_frame_context():
    unet = tiny_unet3d()
    spy = Spy()
    first_spatial(unet).set_processor(spy)
    sample, ehs = unet_inputs("unet3d", batch=2)
    embeds = torch.randn(N, L, C)
    apply_vsp(unet, embeds, cfg=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        call(unet, sample, ehs, cross_attention_kwargs={"gain": 2.0})
    (context, gain), = spy.seen
    assert gain == 2.0  # diffusers drops keywords the processor's signature does not name
    assert torch.equal(context, torch.cat([ehs[0].expand(N, L, C), embeds]))
    remove_vsp(unet)
    assert first_spatial(unet).processor is spy


def test_image_prompt_tuple_keeps_its_image_part():
    unet = tiny_unet_motion()
    spy = Spy()
    first_spatial(unet).set_processor(spy)
    image = [torch.randn(N, 3, C)]
    transformer = next(m for m in unet.modules() if isinstance(m, Transformer2DModel))
    transformer.register_forward_pre_hook(
        lambda mod, a, kw: (a, {**kw, "encoder_hidden_states": (kw["encoder_hidden_states"], image)}),
        with_kwargs=True)
    sample, ehs = unet_inputs("motion", batch=1)
    embeds = torch.randn(N, L, C)
    apply_vsp(unet, embeds, cfg=False)
    call(unet, sample, context_for("motion", ehs))
    (context, _), = spy.seen
    assert isinstance(context, tuple) and torch.equal(context[0], embeds) and context[1] is image


def test_a_module_processor_stays_in_the_model():
    """An IP-Adapter's processors are modules holding weights: under VSP they left the model (its state_dict, and
    unet.double() left them float32, so the next call raised); now they stay, under the same names."""
    unet = tiny_unet3d()
    for name, module in unet.named_modules():
        if name in spatial_cross_attention(unet):
            module.set_processor(IPAdapterAttnProcessor2_0(module.inner_dim, C, num_tokens=(4,)))
    keys = list(unet.state_dict())
    sample, ehs = unet_inputs("unet3d", batch=1)
    apply_vsp(unet, torch.randn(N, L, C), cfg=False)
    assert list(unet.state_dict()) == keys
    unet.double()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # the IP-Adapter's, for a context that is not a tuple
        call(unet, sample.double(), ehs.double())
    remove_vsp(unet)
    assert {p.dtype for p in unet.parameters()} == {torch.float64} and list(unet.state_dict()) == keys


def test_a_module_processor_follows_train_and_eval():
    """The wrapper of a module processor was made in training mode whatever the model's, and the model's train() and
    eval() set the wrapper's flag, not the processor's, which its call may read (dropout): both follow the model."""
    unet = tiny_unet3d().eval()
    inner = IPAdapterAttnProcessor2_0(first_spatial(unet).inner_dim, C, num_tokens=(4,)).eval()
    first_spatial(unet).set_processor(inner)
    apply_vsp(unet, torch.randn(N, L, C), cfg=False)
    wrapper = first_spatial(unet).processor
    assert wrapper is not inner and not wrapper.training and not inner.training
    unet.train()
    assert wrapper.training and inner.training and inner.to_k_ip[0].training
    unet.eval()
    remove_vsp(unet)
    assert first_spatial(unet).processor is inner and not inner.training
    unet.train()
    assert inner.training


def test_works_alongside_temporal_processors_and_a_step_counter():
    """What apply_tar does (temporal processors + a pre-hook counting steps) survives VSP, in either order."""
    unet = tiny_unet3d()
    original = processors(unet)
    spatial = spatial_cross_attention(unet)
    temporal = [n for n in original if "temp_attentions" in n or n.startswith("transformer_in")]
    modules = dict(unet.named_modules())
    steps = []

    def install_tar_stand_in():
        for n in temporal:
            modules[n].set_processor(AttnProcessor2_0())
        return unet.register_forward_pre_hook(lambda mod, args: steps.append(len(steps)))

    sample, ehs = unet_inputs("unet3d", batch=2)
    for order in ("tar-first", "vsp-first"):
        steps.clear()
        if order == "tar-first":
            hook = install_tar_stand_in()
            apply_vsp(unet, ehs[1].expand(N, L, C))
        else:
            apply_vsp(unet, ehs[1].expand(N, L, C))
            hook = install_tar_stand_in()
        tar_processors = {n: modules[n].processor for n in temporal}
        call(unet, sample, ehs)
        remove_vsp(unet)
        call(unet, sample, ehs)
        assert steps == [0, 1]
        assert all(modules[n].processor is tar_processors[n] for n in temporal)
        assert all(modules[n].processor is original[n] for n in spatial)
        hook.remove()
        for n in temporal:
            modules[n].set_processor(original[n])


def test_processors_replaced_after_apply_keep_vsp():
    """fuse_qkv_projections (as set_attn_processor and an IP-Adapter's load) sets new processors on every module
    after apply_vsp: the UNet's next call wraps them again, so the per-frame context still reaches the spatial
    cross-attention (it was dropped without a word); unfuse_qkv_projections puts the wrapped plain ones back, and
    remove_vsp gives the modules their plain processors."""
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=2)
    plain = call(unet, sample, ehs)
    embeds = torch.randn(N, L, C, generator=torch.Generator().manual_seed(5))
    apply_vsp(unet, embeds, cfg=True)
    expected = call(unet, sample, ehs)
    assert not torch.allclose(expected, plain)
    unet.fuse_qkv_projections()
    torch.testing.assert_close(call(unet, sample, ehs), expected, rtol=1e-5, atol=1e-5)
    unet.unfuse_qkv_projections()
    torch.testing.assert_close(call(unet, sample, ehs), expected, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        remove_vsp(unet)
    assert all(type(p) is AttnProcessor2_0 for p in processors(unet).values())
    torch.testing.assert_close(call(unet, sample, ehs), plain, rtol=0, atol=0)


def test_unfuse_after_remove_runs_the_plain_model():
    """remove_vsp while fused gives back the fused processors, and the ones diffusers saved at fuse time (VSP's
    wrappers) without VSP: unfuse_qkv_projections then puts back the plain processors (it put back wrappers
    whose state was gone, which raised), and set_default_attn_processor works. Applied again while fused,
    unfused, and removed: the plain processors again."""
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=2)
    plain = call(unet, sample, ehs)
    apply_vsp(unet, torch.randn(N, L, C, generator=torch.Generator().manual_seed(5)), cfg=True)
    unet.fuse_qkv_projections()
    call(unet, sample, ehs)
    remove_vsp(unet)
    unet.unfuse_qkv_projections()
    assert all(type(p) is AttnProcessor2_0 for p in processors(unet).values())
    torch.testing.assert_close(call(unet, sample, ehs), plain, rtol=0, atol=0)
    unet.fuse_qkv_projections()
    apply_vsp(unet, torch.randn(N, L, C, generator=torch.Generator().manual_seed(5)), cfg=True)
    expected = call(unet, sample, ehs)
    assert not torch.allclose(expected, plain)
    unet.unfuse_qkv_projections()
    torch.testing.assert_close(call(unet, sample, ehs), expected, rtol=1e-5, atol=1e-5)  # VSP still on
    remove_vsp(unet)
    assert all(type(p) is AttnProcessor2_0 for p in processors(unet).values())
    unet.set_default_attn_processor()


def test_remove_leaves_a_processor_replaced_after_apply():
    unet = tiny_unet3d()
    apply_vsp(unet, torch.zeros(N, L, C))
    newer = AttnProcessor2_0()
    first_spatial(unet).set_processor(newer)
    with warnings.catch_warnings():  # raised as an error, the warning comes once VSP is off: no half-removed state
        warnings.simplefilter("error")
        with pytest.raises(UserWarning, match="was replaced after apply_vsp"):
            remove_vsp(unet)
    assert first_spatial(unet).processor is newer
    sample, ehs = unet_inputs("unet3d", batch=1)
    call(unet, sample, ehs)  # raised: the other modules kept VSP's processors without its hooks


@pytest.mark.parametrize("setup,exc,match", [
    (dict(frames=5), ValueError, "cover 4 frames but the UNet is called with 5"),
    (dict(batch=3), ValueError, "cfg=True, but the UNet's sample is not one latent batch twice, as classifier-free "
                                "guidance runs it .*; it has 3 videos. For a run without classifier-free guid"),
    (dict(batch=2, embeds=torch.zeros(2, N, L, C)), ValueError, "1 video in each guidance copy, which the 2 synop"),
    (dict(embeds=torch.zeros(N, L + 1, C)), ValueError,
     r"\(tokens, channels\) \(17, 12\) but the UNet's text context has \(16, 12\)"),
], ids=["frames", "odd-batch", "synopses-vs-batch", "tokens"])
def test_call_time_mismatches_raise(setup, exc, match):
    unet = tiny_unet3d()
    sample, ehs = unet_inputs("unet3d", batch=setup.get("batch", 2), frames=setup.get("frames", N))
    apply_vsp(unet, setup.get("embeds", torch.zeros(N, L, C)), cfg=True)
    with pytest.raises(exc, match=match):
        call(unet, sample, ehs)
    remove_vsp(unet)
    call(unet, sample, ehs)  # the hooks left no stale state behind


def test_apply_arguments_are_checked():
    unet = tiny_unet3d()
    with pytest.raises(TypeError, match="UNet3DConditionModel, a UNetMotionModel or a pipeline"):
        apply_vsp(torch.nn.Linear(2, 2), torch.zeros(N, L, C))
    with pytest.raises(TypeError, match="per_frame_embeds must be a torch.Tensor"):
        apply_vsp(unet, [[0.0]])
    with pytest.raises(TypeError, match="per_frame_embeds must be a dense"):  # raised torch's error, at the NaN check
        apply_vsp(unet, torch.zeros(N, L, C).to_sparse())
    with pytest.raises(ValueError, match=r"\(N, L, C\) or \(P, N, L, C\)"):
        apply_vsp(unet, torch.zeros(L, C))
    with pytest.raises(TypeError, match="cfg must be a bool or None, got int"):
        apply_vsp(unet, torch.zeros(N, L, C), cfg=1)
    apply_vsp(unet, torch.zeros(N, L, C))
    with pytest.raises(RuntimeError, match="outside a forward call"):
        first_spatial(unet)(torch.zeros(1, 64, 8), encoder_hidden_states=torch.zeros(1, L, C))


@pytest.mark.parametrize("kind", UNETS)
def test_embeddings_of_another_channel_size_than_the_cross_attention_are_refused_up_front(kind):
    """They were taken, and the UNet's first call raised."""
    unet = UNETS[kind]()
    before = processors(unet)
    with pytest.raises(ValueError, match=f"per_frame_embeds has {C + 4} channels .* takes {C} "):
        apply_vsp(unet, torch.zeros(N, L, C + 4))
    assert not hasattr(unet, "_vstar_vsp_state") and processors(unet) == before
    assert not unet._forward_pre_hooks and not unet._forward_hooks


@pytest.mark.parametrize("bad,match", [
    (float("nan"), "per_frame_embeds has non-finite entries"),
    (float("inf"), "per_frame_embeds has non-finite entries"),
    ("meta", "per_frame_embeds is a meta tensor"),
], ids=["nan", "inf", "meta"])
def test_embeddings_without_finite_values_are_refused_up_front(bad, match):
    """A NaN or inf made the video NaN without a word; a meta tensor failed at the UNet's call."""
    unet = tiny_unet3d()
    embeds = torch.zeros(N, L, C)
    if bad == "meta":
        embeds = embeds.to("meta")
    else:
        embeds[1, 2, 3] = bad
    with pytest.raises(ValueError, match=match):
        apply_vsp(unet, embeds)
    assert not hasattr(unet, "_vstar_vsp_state")


# ----- pipelines -----

@pytest.fixture(params=list(PIPELINES))
def pipe(request, tmp_path):
    return PIPELINES[request.param](tmp_path)


@pytest.mark.parametrize("guidance", [None, 1.0], ids=["default-cfg", "no-cfg"])
def test_pipeline_with_one_repeated_state_is_exactly_stock(pipe, guidance):
    prompt = "a corgi walking on the grass"
    extra = {} if guidance is None else {"guidance_scale": guidance}
    before = processors(pipe.unet)
    stock = pipe(prompt=prompt, num_frames=N, **call_args(**extra)).frames
    for synopsis in ([prompt], [prompt, prompt, prompt]):
        out = generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(**extra)).frames
        assert torch.equal(out, stock)
    assert all(p is before[n] for n, p in processors(pipe.unet).items())
    assert not hasattr(pipe.unet, "_vstar_vsp_state")


def test_pipeline_feeds_the_interpolated_synopsis(pipe):
    example = next(ex for ex in load_synopses() if ex["prompt"].startswith("A peony"))
    frames = 7
    spy = Spy()
    first_spatial(pipe.unet).set_processor(spy)
    generate_with_synopsis(pipe, example["synopsis"], num_frames=frames, negative_prompt="blurry",
                           **call_args(guidance_scale=7.5))
    states = torch.cat([pipe.encode_prompt(s, "cpu", 1, False)[0] for s in example["synopsis"]])
    expected_cond = interpolate_embeddings(states, frames)
    negative = pipe.encode_prompt("blurry", "cpu", 1, False)[0]
    assert len(spy.seen) == 2  # one UNet call per step, both guidance halves batched
    for context, _ in spy.seen:
        assert context.shape == (2 * frames, L, C)
        assert torch.equal(context[:frames], negative.expand(frames, L, C))
        assert torch.equal(context[frames:], expected_cond)


def test_pipeline_batch_of_synopses(pipe):
    """(Neither pipeline makes several videos per prompt: TextToVideoSD takes no num_videos_per_prompt and
    AnimateDiff's sets it to 1; several videos per synopsis: test_two_synopses_cover_their_videos, on the UNet.)"""
    a, b = "a red car on a road", "a snowy road"
    embeds = torch.cat([pipe.encode_prompt(t, "cpu", 1, False)[0] for t in (a, b)])
    stock = pipe(prompt_embeds=embeds, num_frames=N, **call_args()).frames
    out = generate_with_synopsis(pipe, [[a, a], [b, b]], num_frames=N, **call_args()).frames
    assert out.shape[0] == 2
    assert torch.equal(out, stock)


def test_one_negative_prompt_for_a_batch_of_synopses(pipe):
    """A string negative_prompt with several synopses is each synopsis's (it raised a size mismatch inside the
    pipeline, which encoded the string as one sequence beside P prompt embeddings)."""
    synopses = [["a red car on a road", "a blue car"], ["a dog", "a cat"]]
    out = generate_with_synopsis(pipe, synopses, num_frames=N, negative_prompt="blurry",
                                 **call_args(guidance_scale=7.5)).frames
    assert torch.equal(out, generate_with_synopsis(pipe, synopses, num_frames=N, negative_prompt=["blurry"] * 2,
                                                   **call_args(guidance_scale=7.5)).frames)
    assert out.shape[0] == 2


def test_a_numpy_or_tensor_guidance_scale_is_the_pipelines(pipe):
    """cfg was `guidance_scale > 1`, which apply_vsp refused as not a bool after every sub-prompt was encoded."""
    synopsis = ["a red car on a road", "a blue car"]
    want = generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(guidance_scale=7.5)).frames
    for scale in (np.float64(7.5), torch.tensor(7.5)):
        got = generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(guidance_scale=scale)).frames
        assert torch.equal(got, want)


def test_generate_with_synopsis_names_what_chose_guidance_where_the_batch_contradicts_it(tmp_path):
    """A pipeline that does not batch guidance as its guidance_scale or its flag says: the error named apply_vsp's
    cfg=True (or cfg=None) and hinted at giving apply_vsp's cfg, which generate_with_synopsis does not take."""
    from diffusers import TextToVideoSDPipeline

    class Unguided(TextToVideoSDPipeline):  # no guidance whatever the guidance_scale given
        def __call__(self, *args, guidance_scale=7.5, **kwargs):
            return super().__call__(*args, guidance_scale=1.0, **kwargs)

    plain = tiny_text_to_video_pipeline(tmp_path)
    synopsis = ["a red car on a road", "a blue car"]
    with pytest.raises(ValueError, match=r"^generate_with_synopsis's guidance_scale=7.5 says classifier-free "
                                         r"guidance, but .*call encode_synopsis, apply_vsp with its cfg"):
        generate_with_synopsis(Unguided(**plain.components), synopsis, num_frames=N,
                               **call_args(guidance_scale=7.5))
    pipe = tiny_animatediff_pipeline(tmp_path)

    def preview(pipe, step, timestep, tensors):  # the UNet run on the latents alone, inside a guided call
        pipe.unet(tensors["latents"], timestep, encoder_hidden_states=tensors["prompt_embeds"][1:])
        return tensors

    with pytest.raises(ValueError, match=r"^generate_with_synopsis follows AnimateDiffPipeline\.do_classifier_free_"
                                         r"guidance, which says classifier-free guidance, but .*call encode_synopsis"):
        generate_with_synopsis(pipe, synopsis, num_frames=N, callback_on_step_end=preview,
                               callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"],
                               **call_args(guidance_scale=7.5))


def test_cfg_true_in_a_run_without_guidance_is_refused(tmp_path):
    """apply_vsp's default cfg=True with a pipeline run at guidance_scale 1 (two videos, no unconditional half): the
    first video kept the shared prompt, as if it were the unconditional half, without a word. The UNet's sample is
    one latent batch twice under guidance; two different latents are an error naming cfg."""
    pipe = tiny_animatediff_pipeline(tmp_path)
    embeds = encode_synopsis(pipe, ["a red car on a road", "a blue car"], N)
    apply_vsp(pipe, embeds, cfg=True)
    try:
        with pytest.raises(ValueError, match=r"cfg=True, but the UNet's sample is not one latent batch twice.*"
                                             r"apply_vsp\(\.\.\., cfg=False\)"):
            pipe(prompt_embeds=embeds[:1].repeat(2, 1, 1), num_frames=N, **call_args(guidance_scale=1.0))
        apply_vsp(pipe, embeds, cfg=False)
        pipe(prompt_embeds=embeds[:1].repeat(2, 1, 1), num_frames=N, **call_args(guidance_scale=1.0))
    finally:
        remove_vsp(pipe)


def test_apply_vsp_again_takes_its_cfg_over_a_pipelines_flag():
    """generate_with_synopsis follows the pipeline's do_classifier_free_guidance; an apply_vsp in its run (from a
    callback) kept following it, its own cfg silently set aside."""
    unet = tiny_unet3d()
    embeds = torch.randn(N, L, C)
    apply_vsp(unet, embeds, cfg=False)
    unet._vstar_vsp_state.cfg = lambda: False  # a pipeline's flag followed (cfg=None), for a run without guidance
    apply_vsp(unet, embeds, cfg=True)
    sample = torch.randn(2, 4, N, 8, 8)  # two videos, not one latent batch twice
    with pytest.raises(ValueError, match="cfg=True, but the UNet's sample is not one latent batch twice"):
        call(unet, sample, torch.randn(2, L, C))
    remove_vsp(unet)


def test_apply_vsp_on_a_pipeline_follows_its_guidance_flag(tmp_path):
    """apply_vsp(pipe, ...) took cfg=True whatever the pipeline did: a run at guidance_scale 1 raised (two videos)
    or, of one latent twice, kept the first video on the shared prompt. It reads the pipeline's
    do_classifier_free_guidance at each UNet call, as generate_with_synopsis does; outside the pipeline's call
    the flag cannot be read, an error naming cfg."""
    pipe = tiny_animatediff_pipeline(tmp_path)
    synopsis = ["a red car on a road", "a blue car"]
    embeds = encode_synopsis(pipe, synopsis, N)
    apply_vsp(pipe, embeds)  # before the pipeline's first call, which sets what its flag reads
    with pytest.raises(RuntimeError, match=r"apply_vsp\(cfg=None\) follows AnimateDiffPipeline\.do_classifier_"
                                           r"free_guidance, which could not be read .*: the UNet was called outside "
                                           r"that pipeline.s call .*; give cfg"):
        call(pipe.unet, torch.randn(2, 4, N, 2, 2), torch.zeros(2 * N, L, C))
    remove_vsp(pipe)
    want = {guidance: generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(guidance_scale=guidance)).frames
            for guidance in (1.0, 7.5)}
    apply_vsp(pipe, embeds)
    try:
        for guidance, frames in want.items():
            got = pipe(prompt_embeds=embeds[:1], num_frames=N, **call_args(guidance_scale=guidance)).frames
            assert torch.equal(got, frames)
    finally:
        remove_vsp(pipe)


@pytest.mark.parametrize("guidance, pag", [(7.5, 3.0), (1.0, 3.0), (7.5, 0.0)], ids=["cfg-pag", "pag", "cfg"])
def test_perturbed_attention_guidance_copies_take_the_synopsis(tmp_path, guidance, pag):
    """AnimateDiff's PAG pipeline runs one latent batch in copies: unconditional (with guidance), conditional,
    perturbed (with PAG). VSP took a batch of three copies for an odd one and refused it; with several synopses its
    hint said cfg=False. Both conditional copies take the synopsis, the unconditional one keeps its prompt; with one
    state repeated, the pipeline's output bit for bit. On the bare UNet (no pipeline flag to follow), PAG's
    processors on it tell its copy: without guidance its default cfg=True had fed the first, conditional, copy the
    shared prompt without a word; now the batch is not the three copies cfg=True says, an error naming cfg."""
    pipe = tiny_animatediff_pag_pipeline(tmp_path)
    prompt = "a corgi walking on the grass"

    def args():  # a fresh generator each call
        return call_args(guidance_scale=guidance, pag_scale=pag)

    stock = pipe(prompt=prompt, num_frames=N, **args()).frames
    assert torch.equal(generate_with_synopsis(pipe, [prompt, prompt], num_frames=N, **args()).frames, stock)
    synopsis = ["a red car on a road", "a blue car"]
    spy = Spy()
    first_spatial(pipe.unet).set_processor(spy)
    generate_with_synopsis(pipe, synopsis, num_frames=N, negative_prompt="blurry", **args())
    cond = encode_synopsis(pipe, synopsis, N)
    negative = pipe.encode_prompt("blurry", "cpu", 1, False)[0].expand(N, L, C)
    want = torch.cat([negative] * (guidance > 1) + [cond] * (1 + (pag > 0)))
    assert len(spy.seen) == 2 and all(torch.equal(context, want) for context, _ in spy.seen)
    frames = generate_with_synopsis(pipe, synopsis, num_frames=N, **args()).frames
    apply_vsp(pipe.unet, cond)
    try:
        if guidance == 1:
            with pytest.raises(ValueError, match="cfg=True and perturbed-attention guidance's processors are on the "
                               r"UNet, but .* three times, .*; it has 2 videos\. .* apply_vsp\(\.\.\., cfg=False\)"):
                pipe(prompt_embeds=cond[:1], num_frames=N, **args())
            apply_vsp(pipe.unet, cond, cfg=False)
        assert torch.equal(pipe(prompt_embeds=cond[:1], num_frames=N, **args()).frames, frames)
    finally:
        remove_vsp(pipe)


def test_a_pipeline_sharing_the_unet_is_not_fed_a_stale_flag(tmp_path):
    """apply_vsp(pag_pipe) follows pag_pipe's flags; a pipeline made from it (from_pipe, the same UNet) calling the
    UNet read pag_pipe's flags of its last call: at guidance_scale 1 there, its guided run fed the unconditional copy
    the synopsis without a word. A followed flag that says no guidance where the batch is one latent batch in the
    copies guidance makes is an error naming cfg; PAG is read from the UNet's processors, not from a flag."""
    from diffusers import AnimateDiffPipeline

    pag_pipe = tiny_animatediff_pag_pipeline(tmp_path)
    plain = AnimateDiffPipeline.from_pipe(pag_pipe)
    synopsis = ["a red car on a road", "a blue car"]
    embeds = encode_synopsis(pag_pipe, synopsis, N)
    want = generate_with_synopsis(plain, synopsis, num_frames=N, **call_args(guidance_scale=7.5)).frames
    apply_vsp(pag_pipe, embeds)
    try:
        pag_pipe(prompt_embeds=embeds[:1], num_frames=N, **call_args(guidance_scale=1.0, pag_scale=3.0))
        with pytest.raises(ValueError, match=r"apply_vsp\(cfg=None\) follows AnimateDiffPAGPipeline\.do_classifier_"
                                             r"free_guidance, which says no classifier-free guidance, but the UNet's "
                                             r"sample is one latent batch 2 times.*give apply_vsp's cfg"):
            plain(prompt_embeds=embeds[:1], num_frames=N, **call_args(guidance_scale=7.5))
        apply_vsp(pag_pipe, embeds, cfg=True)
        assert torch.equal(plain(prompt_embeds=embeds[:1], num_frames=N, **call_args(guidance_scale=7.5)).frames, want)
    finally:
        remove_vsp(pag_pipe)


def test_guidance_turned_off_by_a_step_end_callback_is_followed(tmp_path):
    """AnimateDiff's callback_on_step_end may end classifier-free guidance in the run (its guidance scale set to 1,
    the conditional half of prompt_embeds kept, as diffusers' CFG cutoff callbacks do): VSP kept cfg=True from the
    start and raised that the UNet's batch of one video was odd; with two videos it would have kept the first one's
    shared prompt as an unconditional half. It follows the pipeline's do_classifier_free_guidance at each call."""
    pipe = tiny_animatediff_pipeline(tmp_path)
    synopsis = ["a red car on a road", "a blue car"]

    def cutoff(p, i, t, kwargs):
        if i != 0:
            return {}
        p._guidance_scale = 1.0
        rows = kwargs["prompt_embeds"]
        return {"prompt_embeds": rows[rows.shape[0] // 2:]}

    args = dict(num_frames=N, callback_on_step_end=cutoff, callback_on_step_end_tensor_inputs=["prompt_embeds"])
    got = generate_with_synopsis(pipe, synopsis, **args, **call_args(guidance_scale=7.5)).frames
    embeds = encode_synopsis(pipe, synopsis, N)
    negative = pipe.encode_prompt("", "cpu", 1, False)[0].expand(N, L, C)
    seen = []

    def per_frame(module, a, kwargs):  # step 0 guided (unconditional half first), step 1 not
        rows = kwargs["encoder_hidden_states"].shape[0]
        seen.append(rows)
        return a, {**kwargs, "encoder_hidden_states": torch.cat([negative, embeds]) if rows == 2 * N else embeds}

    hooks = [m.register_forward_pre_hook(per_frame, with_kwargs=True)
             for m in pipe.unet.modules() if isinstance(m, Transformer2DModel)]
    try:
        want = pipe(prompt_embeds=embeds[:1], **args, **call_args(guidance_scale=7.5)).frames
    finally:
        for h in hooks:
            h.remove()
    assert {2 * N, N} <= set(seen)
    assert torch.equal(got, want)


def test_a_video_to_video_pipeline_is_refused_before_encoding(tmp_path):
    """It was called with num_frames, which it does not take, after every sub-prompt was encoded."""
    from diffusers import AnimateDiffVideoToVideoPipeline

    pipe = AnimateDiffVideoToVideoPipeline.from_pipe(tiny_animatediff_pipeline(tmp_path))

    def encode(*args, **kwargs):  # not reached (a callable: pipe is checked to have an encode_prompt)
        raise AssertionError("encoded before the pipeline was refused")

    pipe.encode_prompt = encode
    with pytest.raises(TypeError, match="generate_with_synopsis runs text-to-video pipelines, which take "
                                        "num_frames; AnimateDiffVideoToVideoPipeline does not: call encode_synopsis"):
        generate_with_synopsis(pipe, ["a fox", "a dog"], **call_args())


def test_a_pipeline_whose_call_takes_any_keyword_runs(tmp_path):
    """A pipeline subclass whose __call__ passes *args and **kwargs on was refused as not taking num_frames (and
    before that raised a KeyError for guidance_scale)."""
    base = tiny_text_to_video_pipeline(tmp_path)

    class Logged(type(base)):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    pipe = Logged(**base.components)
    synopsis = ["a red car on a road", "a blue car"]
    want = generate_with_synopsis(base, synopsis, num_frames=N, **call_args(guidance_scale=7.5)).frames
    assert torch.equal(generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(guidance_scale=7.5)).frames,
                       want)
    with pytest.raises(TypeError, match="generate_with_synopsis needs guidance_scale= for Logged, whose __call__ "
                                        "gives no default"):
        generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args())


def test_encode_synopsis_shapes(pipe):
    one = encode_synopsis(pipe, ["a boy", "an old man"], 6)
    assert one.shape == (6, L, C)
    several = encode_synopsis(pipe, [["a boy", "an old man"], ["a bud", "a flower", "a seed"]], 6, mode="same")
    assert several.shape == (2, 6, L, C)
    assert torch.equal(several[0], encode_synopsis(pipe, ["a boy", "an old man"], 6, mode="same"))


def test_pipeline_helper_arguments_are_checked(pipe):
    with pytest.raises(TypeError, match="the sub_prompts replace the prompt"):
        generate_with_synopsis(pipe, ["a"], prompt="b")
    for bad in ("a boy", [], [1, 2], [["a"], []]):
        with pytest.raises(TypeError, match="sub_prompts must be a non-empty list of strings"):
            generate_with_synopsis(pipe, bad, num_frames=N, **call_args())
    apply_vsp(pipe, torch.zeros(N, L, C))
    with pytest.raises(ValueError, match="already applied"):
        generate_with_synopsis(pipe, ["a"], num_frames=N, **call_args())
    remove_vsp(pipe)


def test_encode_synopsis_gives_embeddings_without_a_graph(tmp_path):
    """The text encoder ran with autograd on: the embeddings carried its graph, and a UNet given them by apply_vsp
    could not be deep-copied."""
    pipe = tiny_text_to_video_pipeline(tmp_path)
    embeds = encode_synopsis(pipe, ["a red bud", "a pink flower"], N)
    assert not embeds.requires_grad and embeds.grad_fn is None
    apply_vsp(pipe, embeds)
    copy.deepcopy(pipe.unet)
    remove_vsp(pipe)


def test_pipeline_helpers_name_a_wrong_pipe_guidance_scale_or_attention_kwargs_before_encoding(tmp_path):
    """A UNet for pipe failed deep (no encode_prompt; generate_with_synopsis asked for guidance_scale first), a
    guidance_scale that is no number failed on `>` and a list of cross_attention_kwargs on `.get`."""
    pipe = tiny_text_to_video_pipeline(tmp_path)
    synopsis = ["a red bud", "a pink flower"]
    for helper in (lambda target: encode_synopsis(target, synopsis, N),
                   lambda target: generate_with_synopsis(target, synopsis, num_frames=N, **call_args())):
        for target in (pipe.unet, torch.compile(pipe.unet, backend="eager")):
            with pytest.raises(TypeError, match="pipe must be the pipeline holding the UNet as .unet .* a model, "
                                                "not a pipeline: give the pipeline holding it"):
                helper(target)

    def encode(*args, **kwargs):
        raise AssertionError("encoded before the arguments were checked")

    pipe.encode_prompt = encode
    for scale in (None, "7", torch.tensor([7.0, 8.0])):
        with pytest.raises(TypeError, match="guidance_scale must be a real number"):
            generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(guidance_scale=scale))
    for kwargs in ([1], "scale"):
        with pytest.raises(TypeError, match="cross_attention_kwargs must be a dict or None, got (list|str)"):
            generate_with_synopsis(pipe, synopsis, num_frames=N, **call_args(cross_attention_kwargs=kwargs))


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(num_frames=0), ValueError, "num_frames must be >= 1, got 0"),
    (dict(num_frames=1), ValueError, r"num_frames \(1\) must be at least the number of states: the synopsis has 2 sub"),
    (dict(mode="cubic"), ValueError, "mode must be one of"),
    (dict(anchors=[0, N]), ValueError, rf"anchors must lie in \[0, {N - 1}\]"),
    (dict(anchors=[0, 1, 2]), ValueError, "anchors has 3 entries but the synopsis has 2 sub-prompts"),
], ids=["num_frames", "states", "mode", "anchors", "anchor-count"])
def test_frames_mode_and_anchors_are_checked_before_encoding(tmp_path, kwargs, exc, match):
    """They were checked once every sub-prompt had been encoded."""
    pipe = tiny_text_to_video_pipeline(tmp_path)

    def encode(*args, **kwargs):
        raise AssertionError("encoded before the arguments were checked")

    pipe.encode_prompt = encode
    kwargs = {"num_frames": N, **kwargs}
    with pytest.raises(exc, match=match):
        encode_synopsis(pipe, [["a red bud", "a pink flower"]] * 2, **kwargs)
    with pytest.raises(exc, match=match):
        generate_with_synopsis(pipe, ["a red bud", "a pink flower"], **kwargs, **call_args())


def test_anchors_given_as_a_generator_serve_every_synopsis(tmp_path):
    """The anchors were read once per synopsis: a generator's second reading was empty ("anchors has 0 entries")."""
    pipe = tiny_text_to_video_pipeline(tmp_path)
    pipe.encode_prompt = lambda text, *args, **kwargs: (torch.full((1, 2, 3), float(len(text))),)
    synopses = [["a red bud", "a pink flower"], ["a seed", "a tall tree"]]
    want = encode_synopsis(pipe, synopses, N, anchors=[1, N - 2])
    assert torch.equal(encode_synopsis(pipe, synopses, N, anchors=(a for a in (1, N - 2))), want)


# ----- FreeNoise, SDXL -----

def freenoise_pipeline(directory):
    pipe = tiny_animatediff_pipeline(directory)
    pipe.motion_adapter = motion_adapter(channels=(8, 16))
    pipe.enable_free_noise(context_length=4, context_stride=2)
    return pipe


@pytest.mark.parametrize("order", ["vsp-first", "split-first"])
def test_freenoise_split_inference_gives_each_slice_its_frames_context(tmp_path, order):
    """FreeNoise's split inference runs the spatial transformers on slices of the (batch * frames) rows."""
    frames, prompt = 8, "a fox"
    pipe = freenoise_pipeline(tmp_path)
    synopsis = encode_synopsis(pipe, ["a red fox", "a blue bird", "a green frog"], frames)
    seen = []  # FreeNoise's own per-frame rows of the prompt (it interpolates them: not encode_prompt's bit for bit)
    pipe.unet.register_forward_pre_hook(lambda _, args, kwargs: seen.append(kwargs["encoder_hidden_states"]),
                                        with_kwargs=True)
    with torch.no_grad():
        pipe(prompt=prompt, num_frames=frames, **call_args(output_type="latent", num_inference_steps=1))
    same = seen[0][frames:]  # the conditional half, (frames, L, C)

    def run(embeds, split=None):
        pipe = freenoise_pipeline(tmp_path)
        if split and order == "split-first":
            pipe.enable_free_noise_split_inference(temporal_split_size=split)
        if embeds is not None:
            apply_vsp(pipe, embeds)
        if split and order == "vsp-first":
            pipe.enable_free_noise_split_inference(temporal_split_size=split)
        with torch.no_grad():
            return pipe(prompt=prompt, num_frames=frames, **call_args(output_type="latent")).frames

    unsplit = run(synopsis)
    assert (unsplit - run(None)).abs().max() > 0.1  # VSP changes the video
    for split in (2, 3):  # 16 rows a guidance half: slices of whole frames' rows, and a last short one
        # split inference alone changes the float32 sums by ~3e-5 here
        torch.testing.assert_close(run(synopsis, split), unsplit, rtol=0, atol=1e-4)
        assert torch.equal(run(same, split), run(None, split))


def test_generate_with_synopsis_under_freenoise(tmp_path):
    pipe = freenoise_pipeline(tmp_path)
    stock = pipe(prompt="a fox", num_frames=8, **call_args()).frames
    # FreeNoise interpolates the prompt's rows (1e-7 from encode_prompt's): close, not equal
    torch.testing.assert_close(generate_with_synopsis(pipe, ["a fox"], num_frames=8, **call_args()).frames,
                               stock, rtol=0, atol=1e-4)
    assert (generate_with_synopsis(pipe, ["a bird"], num_frames=8, **call_args()).frames - stock).abs().max() > 0.01
    encoded = []  # refused before the text encoder runs (it ran first, for nothing)
    pipe.text_encoder.register_forward_hook(lambda *_: encoded.append(1))
    with pytest.raises(ValueError, match="FreeNoise takes one prompt a call: give one synopsis"):
        generate_with_synopsis(pipe, [["a fox"], ["a bird"]], num_frames=8, **call_args())
    assert not hasattr(pipe.unet, "_vstar_vsp_state") and not encoded


def test_the_pag_pipeline_under_freenoise_takes_several_synopses(tmp_path):
    """AnimateDiff's PAG pipeline encodes its prompt the plain way under FreeNoise too: generate_with_synopsis
    refused several synopses there as AnimateDiff's own pipeline needs (one FreeNoise prompt a call). It runs them
    as with FreeNoise off, each video's frames taking its synopsis, as a call by hand gives."""
    pipe = tiny_animatediff_pag_pipeline(tmp_path)
    pipe.motion_adapter = motion_adapter(channels=(8, 16))
    pipe.enable_free_noise(context_length=4, context_stride=2)
    synopses = [["a red fox", "a blue bird"], ["a green frog", "a dog"]]

    def args():
        return call_args(guidance_scale=7.5, pag_scale=3.0)

    got = generate_with_synopsis(pipe, synopses, num_frames=8, **args()).frames
    embeds = encode_synopsis(pipe, synopses, 8)
    apply_vsp(pipe, embeds)
    try:
        want = pipe(prompt_embeds=embeds[:, 0], num_frames=8, **args()).frames
    finally:
        remove_vsp(pipe)
    assert got.shape[0] == 2 and torch.equal(got, want)


def test_a_freenoise_pipeline_whose_call_runs_animatediffs_takes_one_synopsis(tmp_path):
    """A subclass of AnimateDiff's pipeline whose __call__ runs its base's through super() (or a decorator that does
    not say what it wraps) names no FreeNoise encoder itself: read from its own code only, generate_with_synopsis
    gave it prompt embeddings, which FreeNoise's encoder refuses, one synopsis or several. The bases' calls are
    read too: one synopsis runs as on AnimateDiff's own pipeline, several are refused before any encoding."""
    from diffusers import AnimateDiffPipeline

    class Subclass(AnimateDiffPipeline):
        @torch.no_grad()
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    def plain_wrapper(call):
        def wrapped(self, *args, **kwargs):
            return call(self, *args, **kwargs)
        return wrapped

    class Wrapped(AnimateDiffPipeline):
        __call__ = plain_wrapper(AnimateDiffPipeline.__call__)

    synopsis = ["a red fox", "a blue bird"]
    outputs = []
    for cls in (AnimateDiffPipeline, Subclass, Wrapped):
        pipe = cls(**tiny_animatediff_pipeline(tmp_path).components)
        pipe.set_progress_bar_config(disable=True)
        pipe.motion_adapter = motion_adapter(channels=(8, 16))
        pipe.enable_free_noise(context_length=4, context_stride=2)
        outputs.append(generate_with_synopsis(pipe, synopsis, num_frames=8, **call_args(guidance_scale=7.5)).frames)
        with pytest.raises(ValueError, match="FreeNoise takes one prompt a call: give one synopsis"):
            generate_with_synopsis(pipe, [synopsis, synopsis], num_frames=8, **call_args(guidance_scale=7.5))
    assert all(torch.equal(frames, outputs[0]) for frames in outputs)


def test_several_videos_of_one_latent_without_guidance_run_in_generate_with_synopsis(tmp_path):
    """Several synopses from one latent at guidance_scale 1 (to compare them from one seed) lay the batch out as
    guidance would: generate_with_synopsis, following the flag of the call it runs, refused it as a stale flag and
    named apply_vsp's cfg, which it does not take. It runs, as apply_vsp(cfg=False) by hand gives."""
    pipe = tiny_animatediff_pipeline(tmp_path)
    synopses = [["a red fox", "a blue bird"], ["a green frog", "a dog"]]
    latents = torch.randn(1, 4, N, 2, 2, generator=torch.Generator().manual_seed(1)).repeat(2, 1, 1, 1, 1)
    got = generate_with_synopsis(pipe, synopses, num_frames=N, latents=latents, **call_args(guidance_scale=1.0))
    embeds = encode_synopsis(pipe, synopses, N)
    apply_vsp(pipe, embeds, cfg=False)
    try:
        want = pipe(prompt_embeds=embeds[:, 0], num_frames=N, latents=latents, **call_args(guidance_scale=1.0))
    finally:
        remove_vsp(pipe)
    assert torch.equal(got.frames, want.frames)


def test_pag_on_motion_modules_replaced_by_freenoise_after_apply_vsp_is_seen(tmp_path):
    """PAG was read from the self-attention modules the UNet had at apply_vsp: FreeNoise enabled since replaces the
    motion modules' blocks, so PAG on those alone went unseen, and without guidance the batch [conditional,
    perturbed] of two videos was taken as four videos, [s0, s0, s1, s1] in place of [s0, s1, s0, s1], without a
    word. The modules are read at each call: the output is that of FreeNoise enabled first."""
    synopses = [["a red fox", "a blue bird"], ["a green frog", "a dog"]]
    outputs = []
    for freenoise_first in (True, False):
        pipe = tiny_animatediff_pag_pipeline(tmp_path, layers=("motion_modules",))
        pipe.motion_adapter = motion_adapter(channels=(8, 16))
        embeds = encode_synopsis(pipe, synopses, N)
        if freenoise_first:
            pipe.enable_free_noise(context_length=4, context_stride=2)
        apply_vsp(pipe, embeds, cfg=False)
        if not freenoise_first:
            pipe.enable_free_noise(context_length=4, context_stride=2)
        try:
            outputs.append(pipe(prompt_embeds=embeds[:, 0], num_frames=N,
                                **call_args(guidance_scale=1.0, pag_scale=3.0)).frames)
        finally:
            remove_vsp(pipe)
    assert torch.equal(outputs[1], outputs[0])


def test_a_pag_call_that_raises_in_generate_with_synopsis_leaves_no_pag_processors(tmp_path):
    """A PAG pipeline's call puts its processors back at its end, which a call that raises skips (VSP's own errors
    are raised inside it): generate_with_synopsis left them on the UNet, so the next plain pipeline sharing it ran
    perturbed attention on its conditional copy, and every later VSP run there was refused as PAG's. It puts them
    back as the call's end would."""
    pipe = tiny_animatediff_pag_pipeline(tmp_path)
    before = processors(pipe.unet)

    def interrupted(pipe, i, t, kwargs):
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError, match="interrupted"):
        generate_with_synopsis(pipe, ["a red fox", "a blue bird"], num_frames=N, callback_on_step_end=interrupted,
                               **call_args(guidance_scale=7.5, pag_scale=3.0))
    assert processors(pipe.unet) == before


def test_a_followed_flag_that_says_guidance_is_named_where_the_batch_contradicts_it(tmp_path):
    """apply_vsp(plain) follows plain's flag, left saying guidance by its last call; the PAG pipeline sharing the
    UNet runs without guidance. The error said cfg=True, which was not given, and hinted cfg=False, which would
    break plain's guided runs: it names the flag followed."""
    from diffusers import AnimateDiffPipeline

    pag_pipe = tiny_animatediff_pag_pipeline(tmp_path)
    plain = AnimateDiffPipeline.from_pipe(pag_pipe)
    embeds = encode_synopsis(pag_pipe, ["a red fox", "a blue bird"], N)
    apply_vsp(plain, embeds)
    try:
        plain(prompt_embeds=embeds[:1], num_frames=N, **call_args(guidance_scale=7.5))
        with pytest.raises(ValueError, match=r"^apply_vsp\(cfg=None\) follows AnimateDiffPipeline\.do_classifier_"
                                             r"free_guidance, which says classifier-free guidance and perturbed.*"
                                             r"three times.*give apply_vsp's cfg \(True or False\)"):
            pag_pipe(prompt_embeds=embeds[:1], num_frames=N, **call_args(guidance_scale=1.0, pag_scale=3.0))
    finally:
        remove_vsp(plain)


def test_sdxl_video_unet_is_refused():
    torch.manual_seed(0)
    unet = UNetMotionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, num_attention_heads=2,
                           motion_num_attention_heads=2, cross_attention_dim=C, sample_size=8,
                           down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
                           up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
                           addition_embed_type="text_time", addition_time_embed_dim=4,
                           projection_class_embeddings_input_dim=6 * 4 + C)
    with pytest.raises(ValueError, match="VSP does not take SDXL's video UNet"):
        apply_vsp(unet, torch.zeros(N, L, C))
    remove_vsp(unet)  # a no-op where VSP is not applied, as anywhere


def test_a_pipeline_with_two_text_encoders_is_refused_by_encode_synopsis():
    class TwoEncoders:  # encode_prompt as SDXL pipelines have it, beside AnimateDiff SDXL's motion UNet
        unet = tiny_unet_motion()

        def encode_prompt(self, prompt, prompt_2=None, device=None, num_images_per_prompt=1, cfg=True):
            raise AssertionError("not called")

    with pytest.raises(ValueError, match="TwoEncoders's encode_prompt takes a second prompt for a second encoder"):
        encode_synopsis(TwoEncoders(), ["a", "b"], 4)


def test_encode_synopsis_refuses_a_video_dit_pipeline_before_encoding():
    """A video DiT's pipeline (VSP feeds the video UNets) raised diffusers' own TypeError from inside its
    encode_prompt, which takes its arguments in another order (an unexpected keyword, clip_skip), naming no argument
    of encode_synopsis."""
    from diffusers import CogVideoXDDIMScheduler, CogVideoXPipeline

    from .tiny_dit_models import FAMILIES

    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=None, transformer=FAMILIES["cogvideox"].model(),
                             scheduler=CogVideoXDDIMScheduler())

    def encode_prompt(prompt, negative_prompt=None, do_classifier_free_guidance=True, **kwargs):
        raise AssertionError("not reached")

    pipe.encode_prompt = encode_prompt
    with pytest.raises(TypeError, match="pipe must be a UNet3DConditionModel, a UNetMotionModel or a pipeline "
                                        "holding one as .unet .*got CogVideoXPipeline"):
        encode_synopsis(pipe, ["a fox", "a dog"], 4)


def test_a_block_recomputed_by_gradient_checkpointing_is_said_to_be_one():
    """The backward pass of a checkpointed UNet under VSP raised that a processor ran outside a forward call, which
    the user never did: the message names gradient checkpointing's recomputation."""
    unet = tiny_unet_motion()
    unet.enable_gradient_checkpointing()
    unet.train()
    apply_vsp(unet, torch.randn(4, MAX_TOKENS, CONTEXT_DIM))
    out = unet(torch.randn(1, 4, 4, 8, 8).repeat(2, 1, 1, 1, 1), 3, torch.randn(8, MAX_TOKENS, CONTEXT_DIM)).sample
    with pytest.raises(RuntimeError, match=r"outside a forward call of the UNet it was applied to \(as in a block "
                                           r"gradient checkpointing recomputes in the backward pass: VSP runs "
                                           r"without it\)"):
        out.sum().backward()
