"""Through real diffusers pipelines with tiny random components: the step TAR sees is the loop index.

Prompt embeddings are passed directly (no tokenizer, text encoder or VAE;
output_type="latent"). Classifier-free guidance is on, so each UNet call
carries both branches in one batch.
"""

import warnings

import pytest
import torch
from diffusers import (
    AnimateDiffPAGPipeline,
    AnimateDiffPipeline,
    AnimateDiffVideoToVideoPipeline,
    DDIMScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    TextToVideoSDPipeline,
)

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import TARAttnProcessor, apply_tar, remove_tar
from vstar_kernels.diffusers.processors import tar_site, temporal_attention_modules

from .tiny_video_models import (  # noqa: F401 (one_torch_thread: an autouse fixture)
    FAMILIES,
    call_args,
    motion_adapter,
    one_torch_thread,
    randn,
    tiny_text_parts,
    tiny_unet_motion,
)

UNTIL = 13


class StepRecorder(TARAttnProcessor):
    """Records (step, regularized) for every attention call it makes."""

    def __init__(self):
        self.calls = []

    def attention(self, attn, query, key, value, *, attention_mask=None, spec=None):
        self.calls.append((tar_site(attn).steps.step, spec is not None))
        return super().attention(attn, query, key, value, attention_mask=attention_mask, spec=spec)


class LoopWatcher:
    """Collects, per loop iteration, the calls the recorder saw during it."""

    def __init__(self, recorder):
        self.recorder = recorder
        self.iterations = []  # (loop index, [(step, regularized), ...])
        self._mark = 0

    def __call__(self, i):
        self.iterations.append((i, self.recorder.calls[self._mark:]))
        self._mark = len(self.recorder.calls)

    def check(self, loops, modules, until=UNTIL):
        """`loops`: the loop lengths of the runs (each restarts at 0); `modules`: regularized modules."""
        expected = [i for n in loops for i in range(n)]
        assert [i for i, _ in self.iterations] == expected
        for i, calls in self.iterations:
            assert len(calls) == modules
            assert all(step == i for step, _ in calls), (i, calls)
            assert all(regularized == (i <= until) for _, regularized in calls), (i, calls)


def record(pipe, config):
    names = apply_tar(pipe, config)
    recorder = StepRecorder()
    modules = dict(pipe.unet.named_modules())
    for name in names:
        modules[name].set_processor(recorder)
    return LoopWatcher(recorder), len(names)


def embeds():
    return dict(prompt_embeds=randn(1, 3, 8, seed=5), negative_prompt_embeds=randn(1, 3, 8, seed=6))


def test_text_to_video_pipeline_steps_are_the_loop_index():
    unet = FAMILIES["unet3d"].model()
    pipe = TextToVideoSDPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    watcher, modules = record(pipe, TARConfig.from_preset("64D1_32D8"))
    for steps in (25, 3):  # the second call starts at step 0 again
        pipe(**embeds(), num_inference_steps=steps, num_frames=8, height=32, width=32, guidance_scale=7.5,
             output_type="latent", callback=lambda i, t, latents: watcher(i), callback_steps=1)
    watcher.check([25, 3], modules)


def animatediff(scheduler, pipeline=AnimateDiffPipeline):
    pipe = pipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                               motion_adapter=motion_adapter(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_animatediff(pipe, watcher, steps):
    def on_step_end(pipeline, i, t, kwargs):
        watcher(i)
        return {}

    pipe(**embeds(), num_inference_steps=steps, num_frames=8, height=32, width=32, guidance_scale=7.5,
         output_type="latent", callback_on_step_end=on_step_end)


@pytest.mark.parametrize("scheduler", ["ddim", "heun", "replaced"])
def test_animatediff_pipeline_steps_are_the_loop_index(scheduler):
    """Heun runs the UNet twice per timestep; 'replaced' swaps pipe.scheduler after apply_tar."""
    pipe = animatediff(HeunDiscreteScheduler() if scheduler == "heun" else DDIMScheduler())
    watcher, modules = record(pipe, TARConfig.from_preset("64D1_32D8"))
    if scheduler == "replaced":
        pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    runs = (10, 2) if scheduler == "heun" else (25, 3)  # the second run starts at step 0 again
    for steps in runs:
        run_animatediff(pipe, watcher, steps)
    watcher.check([2 * n - 1 if scheduler == "heun" else n for n in runs], modules)


@pytest.mark.parametrize("scheduler", [DDIMScheduler, EulerDiscreteScheduler])
def test_apply_tar_again_from_a_step_callback_goes_on_with_the_run(scheduler):
    """TAR applied again (a new config) at loop index 4 of 10: the next call is step 5, so until_step=3 leaves it
    unregularized. With DDIM, whose scheduler keeps no step index and whose pipeline marks no loop, the count
    started again at 0 and steps 5-8 were regularized."""
    pipe = animatediff(scheduler())
    config = TARConfig.from_preset("64D1", until_step=3)
    watcher, modules = record(pipe, config)

    def on_step_end(pipeline, i, t, kwargs):
        watcher(i)
        if i == 4:  # the new processors record into the same recorder
            modules_by_name = dict(pipe.unet.named_modules())
            for name in apply_tar(pipe, config):
                modules_by_name[name].set_processor(watcher.recorder)
        return {}

    pipe(**embeds(), num_inference_steps=10, num_frames=8, height=32, width=32, guidance_scale=7.5,
         output_type="latent", callback_on_step_end=on_step_end)
    watcher.check([10], modules, until=3)


@pytest.mark.parametrize("strength", [None, 0.5])
def test_apply_tar_first_from_a_step_callback_counts_from_the_loop_index(strength):
    """TAR applied for the first time at loop index 1 (Euler keeps a step index): the next call is loop 2's, step 2,
    so until_step=3 regularizes loops 2 and 3 only (it counted from 0 there and regularized loops 2-5). The same
    in video-to-video at strength 0.5 of 16 steps, whose scheduler's index starts at 8 without a begin index (it
    counted from 10 there and regularized none)."""
    pipe = animatediff(EulerDiscreteScheduler(), AnimateDiffPipeline if strength is None
                       else AnimateDiffVideoToVideoPipeline)
    recorder, config = StepRecorder(), TARConfig.from_preset("64D1", until_step=3)
    seen = {}

    def on_step_end(pipeline, i, t, kwargs):
        seen[i] = list(recorder.calls)
        recorder.calls.clear()
        if i == 1:
            modules = dict(pipe.unet.named_modules())
            for name in apply_tar(pipe, config):
                modules[name].set_processor(recorder)
        return {}

    inputs = dict(num_frames=8) if strength is None else dict(latents=randn(1, 4, 8, 4, 4, seed=3), strength=strength)
    pipe(**embeds(), **inputs, num_inference_steps=8 if strength is None else 16, height=32, width=32,
         guidance_scale=7.5, output_type="latent", callback_on_step_end=on_step_end)
    assert sorted(seen) == list(range(8))
    assert not seen[0] and not seen[1]
    for i in range(2, 8):
        assert seen[i] and all(call == (i, i <= 3) for call in seen[i]), (i, seen[i])


def test_apply_tar_first_in_a_loop_of_ones_own_counts_from_the_scheduler_index():
    """After a video-to-video call at strength 0.5 (which leaves the pipeline's count of its run, 4 of 8 steps), a
    loop of one's own over the full schedule applies TAR at its index 6: the next call is step 6 (the pipeline's
    stale count made it step 2)."""
    pipe = animatediff(EulerDiscreteScheduler(), AnimateDiffVideoToVideoPipeline)
    pipe(**embeds(), latents=randn(1, 4, 8, 4, 4, seed=3), strength=0.5, num_inference_steps=8, height=32, width=32,
         guidance_scale=7.5, output_type="latent")
    assert pipe._num_timesteps == 4
    scheduler = pipe.scheduler
    scheduler.set_timesteps(8)
    latents = randn(2, 4, 8, 4, 4, seed=4)
    context = torch.cat([embeds()["negative_prompt_embeds"], embeds()["prompt_embeds"]]).repeat_interleave(8, dim=0)
    recorder = StepRecorder()
    for i, t in enumerate(scheduler.timesteps):
        if i == 6:
            modules = dict(pipe.unet.named_modules())
            for name in apply_tar(pipe, TARConfig.from_preset("64D1", until_step=6)):
                modules[name].set_processor(recorder)
        with torch.no_grad():
            out = pipe.unet(scheduler.scale_model_input(latents, t), t, encoder_hidden_states=context).sample
        latents = scheduler.step(out, t, latents).prev_sample
    assert sorted(set(recorder.calls)) == [(6, True), (7, False)]


def pag_pipeline(layers=("down_blocks.0", "mid"), unet=None):
    pipe = AnimateDiffPAGPipeline(vae=None, text_encoder=None, tokenizer=None, unet=unet or FAMILIES["motion"].model(),
                                  motion_adapter=motion_adapter(), scheduler=DDIMScheduler(),
                                  pag_applied_layers=list(layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run_pag(pipe, pag_scale=3.0, guidance=7.5, at_step_1=None):
    def callback(pipe, i, t, kwargs):
        if i == 0 and at_step_1 is not None:
            at_step_1(pipe)
        return {}
    return pipe(**embeds(), num_inference_steps=3, num_frames=8, height=32, width=32, guidance_scale=guidance,
                pag_scale=pag_scale, output_type="latent", generator=torch.Generator().manual_seed(0),
                callback_on_step_end=callback).frames


@pytest.mark.parametrize("guidance", [7.5, 1.0], ids=["with guidance", "without"])
def test_perturbed_attention_guidance_on_a_regularized_level_runs_tar_in_its_guided_branches(guidance):
    """AnimateDiff's PAG pipeline puts its processors on pag_applied_layers at every call and puts back the ones it
    found at the call's end. On a regularized temporal attention PAG's processor runs as it is, its attention calls
    (the guided branches'; the perturbed branch's identity makes none) answered by TAR. (TAR refused it from inside
    the call, which skipped PAG's restore and left its processors on the UNet: then every fix that error named
    failed, and remove_tar ran a pag_scale=0 call with them, wrong by up to 2.)"""
    stock = run_pag(pag_pipeline(), guidance=guidance)
    stock_unguided = run_pag(pag_pipeline(), pag_scale=0.0, guidance=guidance)
    pipe = pag_pipeline()
    sites = apply_tar(pipe, TARConfig.from_preset("64D1"))
    modules = dict(pipe.unet.named_modules())
    assert any(name.startswith("down_blocks.0.") for name in sites)
    tar = run_pag(pipe, guidance=guidance)
    assert all(type(modules[name].processor) is TARAttnProcessor for name in sites)  # the call's end put it back
    assert (tar - stock).abs().max() > 1e-3
    apply_tar(pipe, TARConfig(levels={0: (1e6, 1.0)}))  # a band flat to float32: PAG's output through TAR's kernel
    torch.testing.assert_close(run_pag(pipe, guidance=guidance), stock, rtol=0, atol=2e-4)
    remove_tar(pipe)
    assert torch.equal(run_pag(pipe, pag_scale=0.0, guidance=guidance), stock_unguided)
    assert torch.equal(run_pag(pipe, guidance=guidance), stock)
    # with PAG on other layers only, TAR runs as without PAG's processors anywhere near it
    pipe = pag_pipeline(["up_blocks.1.attentions"])
    apply_tar(pipe, TARConfig.from_preset("64D1"))
    run_pag(pipe)


def test_perturbed_attention_guidance_with_tar_changed_inside_the_call_or_elsewhere():
    """TAR applied, applied again or removed from a step callback of a PAG pipeline's call (PAG's processors on the
    regularized modules already): the call runs as with TAR applied before it, as without TAR, or as stock PAG; TAR
    applied to a pipeline without PAG whose UNet a PAG pipeline (from_pipe) runs, as applied to that one. After
    remove_tar inside a call, PAG's restore leaves TAR's processors without TAR on the modules: a later apply_tar
    takes them for the plain ones (no warning) and remove_tar gives those back. A call an exception stopped leaves
    the pipeline as diffusers leaves it without TAR (PAG's processors on)."""
    flat = TARConfig(levels={0: (1e6, 1.0)})
    config = TARConfig.from_preset("64D1")
    stock = run_pag(pag_pipeline())
    applied = pag_pipeline()
    apply_tar(applied, config)
    once = run_pag(applied)
    assert torch.equal(run_pag(applied, at_step_1=lambda pipe: apply_tar(pipe, config)), once)
    torch.testing.assert_close(run_pag(pag_pipeline(), at_step_1=lambda pipe: apply_tar(pipe, flat)), stock,
                               rtol=0, atol=1e-5)
    plain = AnimateDiffPipeline(vae=None, text_encoder=None, tokenizer=None, unet=FAMILIES["motion"].model(),
                                motion_adapter=motion_adapter(), scheduler=DDIMScheduler())
    apply_tar(plain, config)
    shared = AnimateDiffPAGPipeline.from_pipe(plain, pag_applied_layers=["down_blocks.0", "mid"])
    shared.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run_pag(shared), once, rtol=0, atol=1e-6)

    removed = pag_pipeline()
    modules = dict(removed.unet.named_modules())
    sites = apply_tar(removed, flat)
    torch.testing.assert_close(run_pag(removed, at_step_1=remove_tar), stock, rtol=0, atol=2e-4)
    assert all(type(modules[name].processor) is TARAttnProcessor for name in sites)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_tar(removed, config)
    remove_tar(removed)
    removed.unet.set_default_attn_processor()

    def stop(pipe):
        raise KeyboardInterrupt
    stopped, alone = pag_pipeline(), pag_pipeline()
    apply_tar(stopped, config)
    for pipe in (stopped, alone):
        with pytest.raises(KeyboardInterrupt):
            run_pag(pipe, at_step_1=stop)
    remove_tar(stopped)
    assert [type(p) for p in stopped.unet.attn_processors.values()] == \
        [type(p) for p in alone.unet.attn_processors.values()]


def test_a_perturbed_attention_guidance_processor_of_another_class_runs_tar_or_says_why():
    """A PAG processor of a class of one's own (set_pag_applied_layers' pag_attn_processors) runs with TAR in its
    attention calls as the stock ones do; one that makes no scaled_dot_product_attention call raises, naming it."""
    from diffusers.models.attention_processor import PAGCFGIdentitySelfAttnProcessor2_0, PAGIdentitySelfAttnProcessor2_0

    class PAGMineCFG(PAGCFGIdentitySelfAttnProcessor2_0):
        pass

    class PAGMine(PAGIdentitySelfAttnProcessor2_0):
        pass

    config = TARConfig.from_preset("64D1")
    reference = pag_pipeline()
    apply_tar(reference, config)
    mine = pag_pipeline()
    mine.set_pag_applied_layers(["down_blocks.0", "mid"], (PAGMineCFG(), PAGMine()))
    apply_tar(mine, config)
    assert torch.equal(run_pag(mine), run_pag(reference))

    class PAGOwnAttention(PAGCFGIdentitySelfAttnProcessor2_0):
        def __call__(self, attn, hidden_states, *args, **kwargs):
            return hidden_states

    own = pag_pipeline()
    own.set_pag_applied_layers(["down_blocks.0"], (PAGOwnAttention(), PAGMine()))
    apply_tar(own, config)
    with pytest.raises(RuntimeError, match="PAGOwnAttention computed its attention without torch's "
                                           "scaled_dot_product_attention"):
        run_pag(own)


def test_another_pipeline_with_its_own_scheduler_counts_its_own_loop():
    """TAR applied to one pipeline, its UNet run by another with a scheduler of its own (from_pipe(...,
    scheduler=...)), whose set_timesteps the first one's scheduler does not see: each of its runs counts from its
    first call, told by the timestep going up (it went on counting from the first pipeline's run, past until_step,
    and ran without TAR and without a word)."""
    pipe = animatediff(DDIMScheduler())
    watcher, modules = record(pipe, TARConfig.from_preset("64D1"))
    run_animatediff(pipe, watcher, 12)
    other = AnimateDiffPipeline.from_pipe(pipe, scheduler=EulerDiscreteScheduler.from_config(pipe.scheduler.config))
    other.set_progress_bar_config(disable=True)
    for steps in (12, 5):
        run_animatediff(other, watcher, steps)
    watcher.check([12, 12, 5], modules)


def test_free_init_iterations_each_restart_at_step_0():
    pipe = animatediff(DDIMScheduler())
    pipe.enable_free_init(num_iters=2)
    watcher, modules = record(pipe, TARConfig.from_preset("64D1"))
    run_animatediff(pipe, watcher, 5)
    watcher.check([5, 5], modules)


def test_tar_changes_the_generated_latents_and_remove_restores_them():
    pipe = animatediff(DDIMScheduler())

    def generate():
        return pipe(**embeds(), num_inference_steps=4, num_frames=8, height=32, width=32, guidance_scale=7.5,
                    output_type="latent", generator=torch.Generator().manual_seed(0)).frames

    plain = generate()
    apply_tar(pipe, TARConfig.from_preset("64D1"))
    assert (generate() - plain).abs().max() > 1e-3
    remove_tar(pipe)
    assert torch.equal(generate(), plain)


def test_free_noise_split_inference_enabled_after_apply_tar_keeps_tar(tmp_path):
    """Split inference wraps the motion modules' blocks after apply_tar (a preset's until_step set): TAR runs in them
    from the next call on, as where it was applied after the split."""
    tokenizer, text_encoder = tiny_text_parts(tmp_path)
    config = TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 1.0)}, until_step=0)

    def generate(tar_first):
        pipe = AnimateDiffPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet_motion(),
                                   motion_adapter=motion_adapter(channels=(8, 16)), scheduler=DDIMScheduler())
        pipe.set_progress_bar_config(disable=True)
        pipe.enable_free_noise(context_length=8, context_stride=4)
        if tar_first is not None and tar_first:
            apply_tar(pipe, config)
        pipe.enable_free_noise_split_inference(spatial_split_size=32, temporal_split_size=4)
        if tar_first is not None and not tar_first:
            apply_tar(pipe, config)
        return pipe("a fox", num_frames=16, **call_args(height=32, width=32, output_type="latent")).frames

    out = generate(tar_first=True)
    assert (out - generate(tar_first=None)).abs().max() > 1e-3, "the run went without TAR"
    torch.testing.assert_close(out, generate(tar_first=False), atol=0, rtol=0)


@pytest.mark.parametrize("order", [("pab", "tar", "split"), ("tar", "split", "pab")])
def test_a_step_cache_is_said_whatever_split_inference_wrapped_after_apply_tar(order, tmp_path):
    """The step-cache warning looks at the regularized modules by where they are now: split inference enabled after
    apply_tar wraps their blocks (pyramid attention broadcast hooks the motion modules' attention here)."""
    from diffusers import PyramidAttentionBroadcastConfig
    from diffusers.hooks import apply_pyramid_attention_broadcast

    tokenizer, text_encoder = tiny_text_parts(tmp_path)
    pipe = AnimateDiffPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet_motion(),
                               motion_adapter=motion_adapter(channels=(8, 16)), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    pipe.enable_free_noise(context_length=8, context_stride=4)
    for step in order:
        if step == "tar":
            apply_tar(pipe, TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 1.0)}, until_step=0, backend="cpu"))
        elif step == "split":
            pipe.enable_free_noise_split_inference(spatial_split_size=32, temporal_split_size=4)
        else:
            apply_pyramid_attention_broadcast(pipe.unet, PyramidAttentionBroadcastConfig(
                spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(-1, 1001),
                current_timestep_callback=lambda: 500))
    with pytest.warns(UserWarning, match="pyramid_attention_broadcast hook on this model hands a step outputs"):
        pipe("a fox", num_frames=16, **call_args(height=32, width=32, output_type="latent"))


@pytest.mark.parametrize("target", ["pipe", "unet"])
def test_free_noise_enabled_or_disabled_after_apply_tar_keeps_tar(target, tmp_path):
    """The blocks FreeNoise swaps in after apply_tar(pipe) or apply_tar(pipe.unet) run TAR from the next call on.

    Oracle: the same pipeline with TAR applied after the swap, when the blocks are already there.
    """
    tokenizer, text_encoder = tiny_text_parts(tmp_path)  # FreeNoise encodes the prompt itself
    pipe = AnimateDiffPipeline(vae=None, text_encoder=text_encoder, tokenizer=tokenizer, unet=tiny_unet_motion(),
                               motion_adapter=motion_adapter(channels=(8, 16)), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    config = TARConfig(levels={0: (1.0, 1.0), 1: (2.0, 1.0)}, until_step=None)

    def generate():
        return pipe("a fox", num_frames=16, guidance_scale=7.5,
                    **call_args(height=32, width=32, output_type="latent")).frames

    def free_noise(enable):
        if enable:
            pipe.enable_free_noise(context_length=8, context_stride=4)
        else:
            pipe.disable_free_noise()

    stock, oracle = {}, {}
    for enable in (True, False):
        free_noise(enable)
        stock[enable] = generate()
        apply_tar(pipe, config)
        oracle[enable] = generate()
        remove_tar(pipe)

    apply_tar(pipe if target == "pipe" else pipe.unet, config)
    for enable in (True, False):
        free_noise(enable)
        out = generate()
        assert all(isinstance(t.module.processor, TARAttnProcessor) and tar_site(t.module) is not None
                   for t in temporal_attention_modules(pipe.unet))
        assert (out - stock[enable]).abs().max() > 1e-3, "the run went without TAR"
        torch.testing.assert_close(out, oracle[enable], atol=0, rtol=0)
