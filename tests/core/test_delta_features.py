"""delta_from_features: a reference video's frame similarity as TAR's regularization matrix."""

import math

import numpy as np
import pytest
import torch

from vstar_kernels import gaussian_toeplitz, tar_attention
from vstar_kernels.regularization import delta_from_features

from ..helpers import assert_close_to_reference, naive_tar


def moving_bump(n, *, speed, width, grid=4001, span=60.0, dtype=torch.float64):
    """Per-frame features of a Gaussian bump moving at constant speed: frame t is exp(-(x - speed t)^2 / 2 width^2).

    Shifted Gaussians have cosine similarity exp(-(speed (i - j))^2 / (4 width^2)): TAR's
    Gaussian band with sigma = sqrt(2) * width / speed.
    """
    x = torch.linspace(-span, span, grid, dtype=torch.float64)
    centres = speed * (torch.arange(n, dtype=torch.float64) - (n - 1) / 2)
    return torch.exp(-((x[None, :] - centres[:, None]) ** 2) / (2 * width ** 2)).to(dtype)


def rotating(n, step, extra=3):
    """Unit vectors turning by `step` radians per frame (plus constant zero channels)."""
    t = torch.arange(n, dtype=torch.float64) * step
    return torch.cat([torch.cos(t)[:, None], torch.sin(t)[:, None], torch.zeros(n, extra, dtype=torch.float64)], 1)


def test_moving_signal_gives_the_gaussian_band():
    n, speed, width = 12, 1.5, 2.0
    delta = delta_from_features(moving_bump(n, speed=speed, width=width))
    expected = gaussian_toeplitz(n, math.sqrt(2) * width / speed, dtype=torch.float64)
    torch.testing.assert_close(delta, expected.to(delta.dtype), atol=1e-6, rtol=0)


@pytest.mark.parametrize("normalize", ["cosine", "minmax"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_symmetric_unit_diagonal_in_range_band_shaped(normalize, dtype):
    n = 16
    delta = delta_from_features(rotating(n, step=0.15).to(dtype), normalize=normalize)
    assert delta.shape == (n, n) and delta.dtype == dtype
    assert torch.equal(delta, delta.T)
    assert torch.equal(delta.diagonal(), torch.ones(n, dtype=dtype))
    low = -1.0 if normalize == "cosine" else 0.0
    assert delta.min() >= low and delta.max() <= 1.0
    # a band: every row decreases away from its diagonal
    for i in range(n):
        assert (delta[i, i:].diff() < 0).all() and (delta[i, : i + 1].diff() > 0).all()


def test_cosine_values():
    n, step = 10, 0.3
    delta = delta_from_features(rotating(n, step))
    i = torch.arange(n, dtype=torch.float64)
    torch.testing.assert_close(delta, torch.cos(step * (i[:, None] - i[None, :])))


def test_minmax_stretches_to_unit_range():
    n, step = 10, 0.05
    cos = torch.cos(step * (torch.arange(n)[:, None] - torch.arange(n)[None, :]).double())
    delta = delta_from_features(rotating(n, step), normalize="minmax")
    low = cos.min()
    torch.testing.assert_close(delta, (cos - low) / (1 - low))
    assert delta.min() == 0.0


def test_static_video_gives_all_ones():
    f = torch.randn(1, 7).expand(5, 7)
    for normalize in ("cosine", "minmax"):
        assert torch.equal(delta_from_features(f, normalize=normalize), torch.ones(5, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
def test_minmax_tells_slow_motion_from_a_static_video_in_every_dtype(dtype):
    """A static video (frames equal up to their scale and a rounding of the features) gives all ones; a slow one
    is stretched as its float32 copy is, whatever the dtype: the cut-off was 4 eps of the dtype, which flattened
    a 16-bit video moving by 1 - cos = 2.4e-3 to all ones, and below a float64 cosine's rounding over 4,096
    features, which stretched that rounding of a static video to [0, 1]."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(1, 64, generator=g)
    moving = (base + 0.02 * torch.randn(16, 64, generator=g).cumsum(0)).to(dtype)
    torch.testing.assert_close(delta_from_features(moving, normalize="minmax").double(),
                               delta_from_features(moving.double(), normalize="minmax"), atol=1e-6, rtol=0)
    assert delta_from_features(moving, normalize="minmax").min() == 0.0
    for features in (64, 4096):
        frame = torch.randn(1, features, generator=g, dtype=torch.float64)
        scaled = torch.cat([frame, 3 * frame, 0.7 * frame, 1e3 * frame]).to(dtype)
        assert torch.equal(delta_from_features(scaled, normalize="minmax"), torch.ones(4, 4, dtype=scaled.dtype
                                                                                        if dtype == torch.float64
                                                                                        else torch.float32))


def test_scale_of_features_does_not_matter():
    f = torch.randn(6, 9, dtype=torch.float64)
    scaled = f * torch.tensor([1.0, 10.0, 0.1, 3.0, 7.0, 0.5], dtype=torch.float64)[:, None]
    torch.testing.assert_close(delta_from_features(f), delta_from_features(scaled))
    # at float64's ends too: a norm of 1e200 rows overflowed (every similarity 0), one of 1e-200 rows underflowed
    # (the rows called all zero), 1e-160 lost digits
    for scale in (1e200, 1e-160, 1e-200):
        torch.testing.assert_close(delta_from_features(f * scale), delta_from_features(f), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("m", [1, 4, 9, 17, 40])
def test_resampling_interpolates_features_linearly_in_time(m):
    n = 9
    a, b = torch.randn(2, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(3))

    def linear_features(times):  # features linear in time are resampled exactly
        return a[None] + times[:, None] * b[None]

    frames = torch.arange(n, dtype=torch.float64)
    resampled = delta_from_features(linear_features(frames), num_frames=m)
    times = torch.linspace(0, n - 1, m, dtype=torch.float64)
    expected = delta_from_features(linear_features(times))
    assert resampled.shape == (m, m)
    torch.testing.assert_close(resampled, expected)
    assert torch.equal(resampled.diagonal(), torch.ones(m, dtype=torch.float64))


def test_resampling_to_a_divisor_keeps_original_frames():
    f = torch.randn(13, 5, dtype=torch.float64)
    full = delta_from_features(f)
    torch.testing.assert_close(delta_from_features(f, num_frames=5), full[::3, ::3])
    torch.testing.assert_close(delta_from_features(f, num_frames=13), full)


def test_upsampling_a_turning_vector_halves_the_angle_steps():
    n, step = 8, 0.2
    up = delta_from_features(rotating(n, step), num_frames=2 * n - 1)
    i = torch.arange(2 * n - 1, dtype=torch.float64)
    torch.testing.assert_close(up, torch.cos(step / 2 * (i[:, None] - i[None, :])))


def test_single_frame():
    assert torch.equal(delta_from_features(torch.randn(1, 4)), torch.ones(1, 1))
    assert torch.equal(delta_from_features(torch.randn(1, 4), num_frames=3), torch.ones(3, 3))
    assert torch.equal(delta_from_features(torch.randn(1, 4), num_frames=np.int64(3)), torch.ones(3, 3))


@pytest.mark.parametrize("features,kwargs,exc,match", [
    ([[1.0, 2.0]], {}, TypeError, "features must be a torch.Tensor"),
    (torch.ones(3, 2, dtype=torch.long), {}, TypeError, "floating-point"),
    (torch.ones(3, 2).to_sparse(), {}, TypeError, "features must be a dense"),
    (torch.ones(3), {}, ValueError, r"\(frames, features\) matrix"),
    (torch.ones(0, 3), {}, ValueError, r"\(frames, features\) matrix"),
    (torch.ones(3, 2), {"normalize": "l2"}, ValueError, "normalize must be one of"),
    (torch.ones(3, 2), {"num_frames": 0}, ValueError, "num_frames must be a positive int"),
    (torch.ones(3, 2), {"num_frames": 2.0}, ValueError, "num_frames must be a positive int"),
    (torch.tensor([[1.0, 0.0], [0.0, 0.0], [0.0, 1.0]]), {}, ValueError, r"frame\(s\) \[1\] are all zero"),
    (torch.tensor([[1.0, 0.0], [0.0, math.nan], [math.inf, 1.0]]), {}, ValueError,
     r"frame\(s\) \[1, 2\] have NaN or infinite entries"),
    (torch.tensor([[1.0, 0.0], [-1.0, 0.0]]), {"num_frames": 3}, ValueError, r"resampled frame\(s\) \[1\]"),
    (torch.ones(3, 2, device="meta"), {}, ValueError, "features is a meta tensor, which has no values"),
], ids=["list", "int-dtype", "sparse", "1-D", "empty",
        "mode", "zero-frames", "float-frames", "zero-vector", "non-finite",
        "zero-after-resample", "meta"])
def test_bad_input(features, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        delta_from_features(features, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_delta_feeds_tar_attention(backend):
    torch.manual_seed(0)
    n = 11
    delta = delta_from_features(rotating(n, 0.25).float(), normalize="minmax")
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    out = tar_attention(q, k, v, delta=delta, backend=backend)
    assert_close_to_reference(out, naive_tar(q, k, v, delta=delta.double()))
    plain = tar_attention(q, k, v, strength=0.0, backend=backend)
    assert (out - plain).abs().max() > 1e-2  # the matrix does change the attention


def test_reference_video_band_matches_the_sigma_form_in_tar():
    n, speed, width = 10, 1.0, 1.5
    delta = delta_from_features(moving_bump(n, speed=speed, width=width, dtype=torch.float32))
    torch.manual_seed(1)
    q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
    by_delta = tar_attention(q, k, v, delta=delta, backend="reference")
    by_sigma = tar_attention(q, k, v, sigma=math.sqrt(2) * width / speed, backend="reference")
    torch.testing.assert_close(by_delta, by_sigma, atol=1e-5, rtol=1e-5)


def test_delta_of_another_length_is_rejected_by_tar_attention():
    delta = delta_from_features(torch.randn(8, 4))
    q = torch.randn(1, 1, 6, 8)
    with pytest.raises(ValueError, match="does not broadcast"):
        tar_attention(q, q, q, delta=delta)
    out = tar_attention(q, q, q, delta=delta_from_features(torch.randn(8, 4), num_frames=6))
    assert out.shape == q.shape
