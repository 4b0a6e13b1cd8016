"""apply_tar on the newer video DiTs of diffusers (CPU): SkyReels-V2, HunyuanVideo 1.5 and Framepack, LTX-2,
Wan-Animate, Cosmos, ChronoEdit, Allegro, EasyAnimate, Motif-Video, Kandinsky 5 and 6, ConsisID, AnyFlow,
Helios and MiniMax-H3, each a tiny random-weight model built from its config.

Every regularized attention (the runs of rows a per-query mask is cut into put back together) is
checked against the float64 frame-TAR oracle on the q, k, v the module's own processor computed,
with the frame ids and the mask written in tiny_dit_models from each model's design.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import SkyReelsV2DiffusionForcingPipeline, UniPCMultistepScheduler

from vstar_kernels import TARConfig
from vstar_kernels.diffusers import apply_tar, capture_frame_attention, remove_tar
from vstar_kernels.diffusers.dit import DiTTARProcessor
from vstar_kernels.diffusers.steps import StepTracker

from .helpers import TOLERANCES
from .test_dit_models import forward, processors, record
from .tiny_dit_models import NEWER, expected_frames, expected_mask, frame_map64, frame_tar64, \
    frame_tar_probabilities64, randn
from .tiny_video_models import one_torch_thread  # noqa: F401 (an autouse fixture)


def module_calls(fam, calls):
    """{module: [(q, k, v, kwargs, out), ...]} with the calls of one module's runs of rows joined: q and out
    over all rows, the frames and masks of each run kept."""
    joined = {}
    for name, q, k, v, kwargs, out in calls:
        joined.setdefault(name, []).append((q, k, v, kwargs, out))
    assert list(joined) == fam.modules
    return joined


def check_module(fam, name, parts, sigma, strength):
    block = fam.modules.index(name)
    q = torch.cat([p[0] for p in parts], dim=2)
    k, v, kwargs = parts[0][1], parts[0][2], parts[0][3]
    out = torch.cat([p[4] for p in parts], dim=2)
    frames = expected_frames(fam, k.shape[2], block)
    mask = expected_mask(fam, k.shape[2], block)
    ids = kwargs["frames"]
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
    for name, parts in module_calls(fam, calls).items():
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
