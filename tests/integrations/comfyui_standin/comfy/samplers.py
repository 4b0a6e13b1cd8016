"""Euler sampling with classifier-free guidance, both branches in one batched model call per step."""

import torch

from .patcher_extension import WrapperExecutor, WrappersMP, get_all_wrappers


def schedule(model_patcher, steps):
    """steps + 1 sigmas: the sigma at i / steps of the sampling for each step i, then 0."""
    sampling = model_patcher.get_model_object("model_sampling")
    return torch.tensor([sampling.percent_to_sigma(i / steps) for i in range(steps)] + [0.0], dtype=torch.float64)


def _copy_nested(options):
    """A copy of nested dicts (and lists in them), the leaves shared."""
    return {k: _copy_nested(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
            for k, v in options.items()}


class CFGGuider:
    """One sampling run of a ModelPatcher: a copy of its model options (with its wrappers added to the
    transformer_options), the OUTER_SAMPLE wrappers around the run; the object patches are on the model during it."""

    def __init__(self, model_patcher):
        self.model_patcher = model_patcher
        self.model_options = _copy_nested(model_patcher.model_options)
        wrappers = self.model_options["transformer_options"].setdefault("wrappers", {})
        for kind, by_key in model_patcher.wrappers.items():
            for key, found in by_key.items():
                wrappers.setdefault(kind, {}).setdefault(key, []).extend(found)

    def sample(self, noise, sigmas, conds, cfg):
        self.conds, self.cfg = conds, cfg
        wrappers = get_all_wrappers(WrappersMP.OUTER_SAMPLE, self.model_options["transformer_options"])
        return WrapperExecutor.new_class_executor(self.outer_sample, self, wrappers).execute(noise, None, None, sigmas)

    def outer_sample(self, noise, latent_image, sampler, sigmas, denoise_mask=None, callback=None, disable_pbar=False,
                     seed=None):  # ComfyUI's arguments; the latent, sampler and the rest unused here
        conds, cfg = self.conds, self.cfg
        self.model_options["transformer_options"]["sample_sigmas"] = sigmas  # as ComfyUI gives the run's sigmas
        self.model_patcher.patch_model()
        try:
            with torch.inference_mode():
                x = noise * sigmas[0]
                for i in range(len(sigmas) - 1):
                    sigma = sigmas[i].to(x.dtype)
                    cond, uncond = self.denoise(x, sigma, conds)
                    guided = uncond + cfg * (cond - uncond)
                    x = x + (x - guided) / sigma * (sigmas[i + 1].to(x.dtype) - sigma)
            return x.clone()
        finally:
            self.model_patcher.unpatch_model()

    def denoise(self, x, sigma, conds):
        """The (cond, uncond) model outputs at x; over context windows, the windows' outputs averaged."""
        handler = self.model_options.get("context_handler")
        if handler is None:
            return self.model_call(x, sigma, conds)
        outs, count = [torch.zeros_like(x), torch.zeros_like(x)], torch.zeros_like(x)
        for window in handler.windows:
            self.model_options["transformer_options"]["context_window"] = window
            index = (slice(None),) * window.dim + (window.index_list,)
            lead = len(window.frames()) - len(window.index_list)      # a causal anchor's output is dropped
            windowed = window.get_tensor(x, handler.latent_retain_index_list)
            for out, part in zip(outs, self.model_call(windowed, sigma, conds)):
                out[index] += part.narrow(window.dim, lead, len(window.index_list))
            count[index] += 1
        return [out / count for out in outs]

    def model_call(self, x, sigma, conds):
        """One model call, both branches batched: (cond, uncond). A video UNet's num_video_frames is the frames in
        the call's batch (a window's, under context windows)."""
        options = _copy_nested(self.model_options["transformer_options"])
        options["sigmas"] = sigma.reshape(1)
        options["cond_or_uncond"] = [0, 1]
        model = self.model_patcher.model
        c = {**conds, "transformer_options": options}
        if "num_video_frames" in c:
            c["num_video_frames"] = x.shape[0]
        batch = torch.cat([x, x])
        timestep = sigma.expand(batch.shape[0])
        wrapper = self.model_options.get("model_function_wrapper")
        if wrapper is None:
            return model.apply_model(batch, timestep, **c).chunk(2)
        return wrapper(model.apply_model, {"input": batch, "timestep": timestep, "c": c,
                                           "cond_or_uncond": [0, 1]}).chunk(2)


def sample(model_patcher, noise, sigmas, positive, negative, cfg):
    """Sample from `noise` along `sigmas`. `positive`, `negative`: dicts of batch-1 conditions
    (c_crossattn and extra conditions such as clip_fea); they are batched cond first (not
    num_video_frames, a video UNet's flag: the frames in a call's batch)."""
    conds = {name: torch.cat([positive[name], negative[name]]) if name != "num_video_frames" else positive[name]
             for name in positive}
    return CFGGuider(model_patcher).sample(noise, sigmas, conds, cfg)
