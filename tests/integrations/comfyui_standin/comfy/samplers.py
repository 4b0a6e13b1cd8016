"""Euler sampling with classifier-free guidance, both branches in one batched model call per step."""

import torch


def schedule(model_patcher, steps):
    """steps + 1 sigmas: the sigma at i / steps of the sampling for each step i, then 0."""
    sampling = model_patcher.get_model_object("model_sampling")
    return torch.tensor([sampling.percent_to_sigma(i / steps) for i in range(steps)] + [0.0], dtype=torch.float64)


def _options(model_patcher):
    options = _copy_nested(model_patcher.model_options["transformer_options"])
    wrappers = options.setdefault("wrappers", {})
    for kind, by_key in model_patcher.wrappers.items():
        for key, found in by_key.items():
            wrappers.setdefault(kind, {}).setdefault(key, []).extend(found)
    return options


def _copy_nested(options):
    """A copy of nested dicts (and lists in them), the leaves shared."""
    return {k: _copy_nested(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else v
            for k, v in options.items()}


def sample(model_patcher, noise, sigmas, positive, negative, cfg):
    """Sample from `noise` along `sigmas`. `positive`, `negative`: dicts of batch-1 conditions
    (c_crossattn and extra conditions such as clip_fea); they are batched cond first."""
    model = model_patcher.model
    conds = {name: torch.cat([positive[name], negative[name]]) for name in positive}
    model_patcher.patch_model()
    try:
        with torch.inference_mode():
            x = noise * sigmas[0]
            for i in range(len(sigmas) - 1):
                sigma = sigmas[i].to(x.dtype)
                options = _options(model_patcher)
                options["sigmas"] = sigma.reshape(1)
                options["cond_or_uncond"] = [0, 1]
                batch = torch.cat([x, x])
                denoised = model.apply_model(batch, sigma.expand(2), transformer_options=options, **conds)
                cond, uncond = denoised.chunk(2)
                guided = uncond + cfg * (cond - uncond)
                x = x + (x - guided) / sigma * (sigmas[i + 1].to(x.dtype) - sigma)
        return x.clone()
    finally:
        model_patcher.unpatch_model()

