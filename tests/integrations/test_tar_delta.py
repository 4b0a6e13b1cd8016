"""Dynamics transfer: a level of TARConfig carries a custom (N, N) delta instead of a sigma."""

import math

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels import LevelSpec, TARConfig
from vstar_kernels.diffusers import apply_tar
from vstar_kernels.regularization import delta_from_features

from ..helpers import assert_close_to_reference
from .tiny_video_models import (FAMILIES, attention64, attention_modules, forward, one_torch_thread,  # noqa: F401
                                randn, run_capturing, unet3d_inputs)


def reference_delta(frames):
    """A reference video's similarity: 12 frames of drifting synthetic features, resampled to `frames`."""
    features = randn(12, 6, seed=7).cumsum(0)
    return delta_from_features(features, normalize="minmax", num_frames=frames)


def test_levels_take_delta_pairs_and_level_specs():
    delta = reference_delta(8)
    cfg = TARConfig(levels={0: (delta, 0.5), 1: LevelSpec(delta=delta.half()), 2: (3.0, 1.0)})
    spec = cfg.levels[0]
    assert spec.sigma is None and spec.strength == 0.5 and torch.equal(spec.delta, delta)
    assert cfg.levels[1].delta.dtype == torch.float32  # fp16 given: kept as float32
    assert spec == LevelSpec(delta=delta.clone(), strength=0.5)
    assert spec != LevelSpec(delta=delta + 1e-3, strength=0.5) and spec != LevelSpec(1.0, 0.5)
    assert hash(spec) == hash(LevelSpec(delta=delta.clone(), strength=0.5))
    assert repr(spec) == "LevelSpec(delta=<8x8 float32>, strength=0.5)"
    assert LevelSpec() == LevelSpec(1.0, 1.0) and LevelSpec(delta=delta, strength=0.0).active is False
    delta.fill_(7.0)  # the spec holds its own copy
    assert spec.delta.max() <= 1.0


@pytest.mark.parametrize("spec, error, match", [
    pytest.param((torch.ones(8, 7), 1.0), ValueError, r"levels\[0\]: delta must be a square", id="not-square"),
    pytest.param((torch.ones(1, 8, 8), 1.0), ValueError, r"levels\[0\]: delta must be a square", id="3-d"),
    pytest.param((torch.ones(8, 8, dtype=torch.int64), 1.0), TypeError, r"levels\[0\]: delta must be a floating",
                 id="int"),
    pytest.param((torch.full((4, 4), math.nan), 1.0), ValueError, r"levels\[0\]: delta has non-finite", id="nan"),
    pytest.param((torch.ones(4, 4), math.inf), ValueError, r"levels\[0\]: strength must be finite", id="strength"),
    pytest.param((torch.ones(4, 4, device="meta"), 1.0), ValueError,  # torch's .item() error
                 r"levels\[0\]: delta is a meta tensor, which has no values: LevelSpec reads them", id="meta"),
    pytest.param(torch.ones(2, 2), TypeError, r"levels\[0\] must be a \(sigma, strength\) pair, a \(delta, strength\)",
                 id="bare-tensor"),
])
def test_bad_delta_raises_naming_the_level(spec, error, match):
    with pytest.raises(error, match=match):
        TARConfig(levels={0: spec})


@pytest.mark.parametrize("how", ["pickle", "deepcopy"])
def test_a_config_copied_after_use_leaves_its_device_copies_behind(how):
    """The per-device copies of a delta (a GPU's, where it ran on one) are not pickled or copied with the config."""
    import copy
    import pickle
    config = TARConfig(levels={0: LevelSpec(delta=torch.rand(4, 4, dtype=torch.float16))})
    used = config.levels[0].tar_kwargs(4, 4, device="meta", dtype=torch.float32, where="here")["delta"]
    assert used.device.type == "meta"
    copied = pickle.loads(pickle.dumps(config)) if how == "pickle" else copy.deepcopy(config)
    assert copied == config and not copied.levels[0]._copies
    assert copied.levels[0].tar_kwargs(4, 4, device="cpu", dtype=torch.float32, where="here")["delta"].dtype \
        == torch.float32


def test_sigma_and_delta_together_are_rejected():
    with pytest.raises(ValueError, match="sigma or delta, not both"):
        LevelSpec(sigma=2.0, delta=torch.ones(3, 3))


def test_delta_level_regularizes_every_call_like_the_float64_semantics():
    model = FAMILIES["unet3d"].model()
    inputs = unet3d_inputs(model, batch=1, frames=8, size=4)
    delta = reference_delta(8)
    names = apply_tar(model, TARConfig(levels={0: (delta, 0.75), 1: (2.0, 0.5)}, until_step=None))
    levels = FAMILIES["unet3d"].expected_levels(model)
    _, calls = run_capturing(model, inputs, names)
    modules = attention_modules(model)
    for name in names:
        kwargs = dict(sigma=1.0, strength=0.75, delta=delta.double()) if levels[name] == 0 else \
            dict(sigma=2.0, strength=0.5)
        assert calls[name], name
        for x, context, out in calls[name]:
            assert_close_to_reference(out, attention64(modules[name], x, context, **kwargs), torch.float32)


def test_a_delta_equal_to_the_gaussian_gives_the_sigma_output():
    model = FAMILIES["unet3d"].model()
    inputs = unet3d_inputs(model, batch=1, frames=8, size=4)
    apply_tar(model, TARConfig(levels={0: (1.5, 1.0)}, until_step=None))
    with_sigma = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (vk.gaussian_toeplitz(8, 1.5), 1.0)}, until_step=None))
    torch.testing.assert_close(forward(model, inputs), with_sigma, atol=2e-5, rtol=2e-5)


def test_a_delta_for_another_frame_count_is_rejected_not_resampled():
    model = FAMILIES["unet3d"].model()
    apply_tar(model, TARConfig(levels={0: (reference_delta(8), 1.0)}, until_step=None))
    with pytest.raises(ValueError, match=r"level 0\).*delta is 8 x 8 but this attention runs over 6 frames.*"
                                         r"delta_from_features\(features, num_frames=6\)"):
        forward(model, unet3d_inputs(model, batch=1, frames=6, size=4))


def test_a_delta_against_more_key_frames_than_query_frames_names_both_counts():
    """With 4 query frames against 6 key frames the message said a 4 x 4 delta ran over 4 frames, and to build
    it for 4 frames."""
    spec = LevelSpec(delta=torch.eye(4))
    with pytest.raises(ValueError, match=r"^attn2: the level's delta is 4 x 4 \(a delta is square\) but this "
                                         r"attention runs 4 query frames against 6 key frames: regularize this "
                                         r"level with sigma$"):
        spec.tar_kwargs(4, 6, device="cpu", dtype=torch.float32, where="attn2")


def test_a_float64_delta_past_float32s_range_is_refused_where_the_attention_computes_in_float32():
    """Made inf in float32, the entry made every row NaN; a float64 attention takes it."""
    delta = torch.zeros(4, 4, dtype=torch.float64)
    delta[:, 1] = 1e300
    spec = LevelSpec(delta=delta)
    assert spec.tar_kwargs(4, 4, device="cpu", dtype=torch.float64, where="attn1")["delta"][0, 1] == 1e300
    with pytest.raises(ValueError, match=r"^attn1: the level's strength times its delta's largest entry is 1e\+300, "
                                         r"beyond float32's range, and this attention computes in float32$"):
        spec.tar_kwargs(4, 4, device="cpu", dtype=torch.float16, where="attn1")
    # entries within float32's range whose product with the strength is not
    spec = LevelSpec(delta=torch.full((4, 4), 1e30), strength=1e10)
    with pytest.raises(ValueError, match=r"strength times its delta's largest entry is 1e\+40"):
        spec.tar_kwargs(4, 4, device="cpu", dtype=torch.float32, where="attn1")


def test_a_float64_delta_is_checked_without_a_graph_break():
    """The check read the delta's values in the call, which fullgraph compile refuses (data-dependent branch)."""
    spec = LevelSpec(delta=torch.eye(4, dtype=torch.float64))
    kwargs = torch.compile(lambda: spec.tar_kwargs(4, 4, device="cpu", dtype=torch.float32, where="attn1"),
                           fullgraph=True, backend="eager")()
    assert kwargs["delta"].dtype == torch.float32
