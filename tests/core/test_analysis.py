"""Attention analysis: diagonality and band energy on known maps, the share of rows whose max lies outside their
own frame against an element-by-element float64 evaluation, and the pictures (PNG files read back)."""

import io
import math
import re
import shutil
import sys

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels import _env, analysis, gaussian_toeplitz
from vstar_kernels.analysis import (band_energy, diagonality, max_outside_own_frame, minmax_normalize,
                                     plot_attention_maps, plot_delta, short_layer_name)
from vstar_kernels.cli import main as cli_main

from ..helpers import LargestAllocation, rows_outside64, saved_figures

matplotlib = pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")
np = pytest.importorskip("numpy")


def weighted_index_correlation(a):
    """The same coefficient through torch.cov's frequency weights over (row, column) index pairs."""
    n, m = a.shape
    i, j = torch.meshgrid(torch.arange(n, dtype=torch.float64), torch.arange(m, dtype=torch.float64), indexing="ij")
    c = torch.cov(torch.stack([i.flatten(), j.flatten()]), aweights=a.flatten().double(), correction=0)
    return c[0, 1] / torch.sqrt(c[0, 0] * c[1, 1])


def test_diagonality_of_known_maps():
    n = 12
    assert diagonality(torch.eye(n)).item() == pytest.approx(1.0, abs=1e-12)
    assert diagonality(torch.eye(n).flip(0)).item() == pytest.approx(-1.0, abs=1e-12)
    assert diagonality(torch.ones(n, n)).item() == pytest.approx(0.0, abs=1e-12)
    assert diagonality(torch.rand(1, n).expand(n, n)).item() == pytest.approx(0.0, abs=1e-12)  # rows all alike
    assert diagonality(gaussian_toeplitz(n, 1.0)).item() > 0.9


def test_narrower_bands_are_more_diagonal():
    values = [diagonality(gaussian_toeplitz(16, s)).item() for s in (0.5, 1, 2, 4, 8, 16)]
    assert all(a > b for a, b in zip(values, values[1:]))
    assert values[0] > 0.99 and values[-1] < 0.5


def test_diagonality_matches_weighted_covariance_and_batches():
    torch.manual_seed(0)
    maps = torch.softmax(torch.randn(3, 2, 9, 7), dim=-1)
    out = diagonality(maps)
    assert out.shape == (3, 2) and out.dtype == torch.float64
    for idx in np.ndindex(3, 2):
        torch.testing.assert_close(out[idx], weighted_index_correlation(maps[idx]))


def test_diagonality_is_nan_when_undefined():
    single_row = torch.zeros(5, 5)
    single_row[2] = 1.0
    assert math.isnan(diagonality(single_row).item())


def test_band_energy_of_known_maps():
    n = 10
    assert band_energy(torch.eye(n), 0).item() == 1.0
    assert band_energy(torch.ones(n, n), n - 1).item() == 1.0
    for w in range(4):
        uniform = (n + 2 * sum(n - d for d in range(1, w + 1))) / n ** 2
        assert band_energy(torch.ones(n, n), w).item() == pytest.approx(uniform, abs=1e-15)
    assert band_energy(torch.eye(n).flip(0), 0).item() == 0.0  # n even: the anti-diagonal misses the diagonal
    assert band_energy(torch.eye(n).flip(0), 1).item() == pytest.approx(2 / n)  # and crosses it between two cells


def test_band_energy_is_average_attention_share_nearby():
    torch.manual_seed(1)
    p = torch.softmax(torch.randn(2, 8, 8), dim=-1)
    out = band_energy(p, 2)
    for b in range(2):
        share = sum(p[b, i, j].item() for i in range(8) for j in range(8) if abs(i - j) <= 2) / 8
        assert out[b].item() == pytest.approx(share, abs=1e-6)


@pytest.mark.parametrize("fn", [diagonality, lambda a: band_energy(a, 1)], ids=["diagonality", "band_energy"])
@pytest.mark.parametrize("bad,exc,match", [
    ([[1.0]], TypeError, "must be a torch.Tensor"),
    (torch.ones(4), ValueError, r"\(\.\.\., N, M\) map"),
    (-torch.eye(3), ValueError, "non-negative"),
    (torch.zeros(3, 3), ValueError, "all zero"),
    (torch.tensor([[0.5, 0.5], [math.nan] * 2]), ValueError,
     "attention has NaN entries .*a frame without a token, measure"),
    (torch.full((3, 3), math.inf), ValueError, "attention has infinite entries"),
    (torch.eye(3, device="meta"), ValueError, "attention is a meta tensor, which has no values"),  # torch's .item()
    (torch.eye(3) + 1j, TypeError, "attention must be a real map, got torch.complex64"),  # not its real part
], ids=["list", "1-D", "negative", "zero", "nan", "inf", "meta", "complex"])
def test_measures_reject_bad_maps(fn, bad, exc, match):
    with pytest.raises(exc, match=match):
        fn(bad)


def test_band_energy_width_is_checked():
    for width in (-1, 1.5, True):
        with pytest.raises(ValueError, match="width must be a non-negative int"):
            band_energy(torch.eye(3), width)
    # a width past the map takes all of it: at 2**63 the comparison wrapped (0.0), past it raised OverflowError
    for width in (4, 2 ** 63 - 1, 2 ** 63, 2 ** 64, 10 ** 30):
        assert band_energy(torch.eye(3), width).item() == 1.0
        assert band_energy(torch.ones(2, 3, 5), width).tolist() == [1.0, 1.0]


def test_measures_of_maps_whose_sum_overflows():
    """Finite float64 entries whose sum is inf gave NaN (each weight 0 / inf): the measures are scale-free, and such
    a map is measured as it is at a smaller scale; a map beside it in the batch is measured as it is alone."""
    torch.manual_seed(3)
    small = torch.rand(2, 6, 6, dtype=torch.float64) + torch.eye(6, dtype=torch.float64)
    big = small * 1e307
    assert torch.isinf(big.sum(dim=(-2, -1))).all() and torch.isfinite(big).all()
    torch.testing.assert_close(diagonality(big), diagonality(small), rtol=1e-12, atol=1e-15)
    torch.testing.assert_close(band_energy(big, 1), band_energy(small, 1), rtol=1e-12, atol=1e-15)
    assert diagonality(torch.full((3, 3), 1e308, dtype=torch.float64)).item() == 0.0  # uniform
    mixed = torch.stack([small[0], big[1]])
    assert torch.equal(diagonality(mixed)[0], diagonality(small[0])) and torch.isfinite(diagonality(mixed)).all()
    assert torch.equal(band_energy(mixed, 2)[0], band_energy(small[0], 2))


def share64(q, k, q_frames, k_frames, **kwargs):
    """(B, H) float64: the share of the video query rows that `rows_outside64` marks."""
    return rows_outside64(q, k, q_frames, k_frames, **kwargs)[..., q_frames >= 0].double().mean(dim=-1)


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=["fp32", "fp64", "bf16"])
def test_max_outside_own_frame_matches_the_definition(dtype):
    ids = vk.frame_ids(4, 5, text_before=3, text_after=2)
    q, k = randn(2, 3, 25, 8, seed=0).to(dtype), randn(2, 3, 25, 8, seed=1).to(dtype)
    key_mask = torch.rand(2, 25, generator=torch.Generator().manual_seed(2)) > 0.3
    out = max_outside_own_frame(q, k, ids)
    assert out.shape == (2, 3) and out.dtype == torch.float64
    assert torch.equal(out, share64(q, k, ids, ids))
    assert 0 < out.min() and out.max() < 1
    masked = max_outside_own_frame(q, k, ids, scale=0.7, key_mask=key_mask)
    assert torch.equal(masked, share64(q, k, ids, ids, scale=0.7, key_mask=key_mask))
    assert torch.equal(max_outside_own_frame(q[:, 0], k[:, 0], ids), out[:, 0])  # 3-D: (B, N, D) gives (B,)


def planted():
    """Frames 0, 1, 2 of 4 tokens, then 2 text tokens; every query looks along e0, and every score is 0 but
    those of the keys planted along e0: head 0 a far key (frame 2), head 1 a text key, head 2 a tie of a frame 0
    and a frame 2 key."""
    ids = vk.frame_ids(3, 4, text_after=2)
    q = torch.zeros(1, 3, 14, 4)
    q[..., 0] = 1.0
    k = torch.zeros(1, 3, 14, 4)
    k[0, 0, 9, 0] = k[0, 1, 12, 0] = k[0, 2, 1, 0] = k[0, 2, 9, 0] = 3.0
    return ids, q, k


def test_max_outside_own_frame_of_planted_maxima():
    ids, q, k = planted()
    # head 0: the rows of frames 0 and 1 (8 of the 12 video rows; the text rows, whose max is there too, do not
    # count); head 1: none (the text is inside); head 2: the rows of frame 1 (frames 0 and 2 tie)
    assert max_outside_own_frame(q, k, ids, scale=1.0).tolist() == [[8 / 12, 0.0, 4 / 12]]
    assert rows_outside64(q, k, ids, ids)[0, 0].tolist() == [True] * 8 + [False] * 4 + [True] * 2


def test_max_outside_own_frame_under_autocast_is_its_float32_share():
    """Its scores are float32 whatever the caller's autocast: under CPU bf16 autocast the scores' products ran in
    bfloat16, and a head's share moved by 0.016 here (4 of its 256 rows)."""
    g = torch.Generator().manual_seed(11)
    q, k = (torch.randn(2, 3, 256, 128, generator=g) for _ in range(2))
    frames = torch.arange(256) // 32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        shares = max_outside_own_frame(q, k, frames)
    assert torch.equal(shares, max_outside_own_frame(q, k, frames))


def test_max_outside_own_frame_with_a_key_mask():
    ids, q, k = planted()
    q, k = q.expand(3, -1, -1, -1), k.expand(3, -1, -1, -1)
    # batch 1 drops the far key 9, frame 1's keys and the text: frame 1's rows have only other frames' keys, and
    # in head 2 frame 0's key is the max of frame 2's rows too
    key_mask = torch.ones(3, 14, dtype=torch.bool)
    key_mask[1, [4, 5, 6, 7, 9, 12, 13]] = False
    key_mask[2] = False  # no key: every row is inside
    out = max_outside_own_frame(q, k, ids, key_mask=key_mask)
    assert out.tolist() == [[8 / 12, 0.0, 4 / 12], [4 / 12, 4 / 12, 8 / 12], [0.0, 0.0, 0.0]]
    assert torch.equal(out, share64(q, k, ids, ids, key_mask=key_mask))


def test_max_outside_own_frame_of_a_frame_pair_and_without_video_rows():
    q_frames = torch.tensor([0, 0, 1, -1, 1, 2])
    k_frames = torch.tensor([-1, -1, 0, 0, 0, 1, 1, 2, 2, 3])
    q, k = randn(2, 2, 6, 8, seed=3), randn(2, 2, 10, 8, seed=4)
    out = max_outside_own_frame(q, k, (q_frames, k_frames))
    assert torch.equal(out, share64(q, k, q_frames, k_frames))
    text = torch.full((6,), -1)
    assert max_outside_own_frame(q, k, (text, k_frames)).isnan().all()  # no video row to count


def test_max_outside_own_frame_in_blocks_of_rows(monkeypatch):
    ids = vk.frame_ids(5, 8, text_before=4)
    q, k = randn(2, 2, 44, 4, seed=5), randn(2, 2, 44, 4, seed=6)
    whole = max_outside_own_frame(q, k, ids)
    monkeypatch.setattr(analysis, "CHUNK_ELEMENTS", 2 * 2 * 44 * 5)  # 5 rows a block, the last of 4
    with LargestAllocation() as mode:
        assert torch.equal(max_outside_own_frame(q, k, ids), whole)
    assert mode.largest <= 2 * 2 * 5 * 44 * 4  # one block's fp32 scores, never the 44 x 44 matrix
    monkeypatch.setattr(analysis, "CHUNK_ELEMENTS", 1)
    assert torch.equal(max_outside_own_frame(q, k, ids), whole)


@pytest.mark.parametrize("change,exc,match", [
    (dict(q=[[1.0]]), TypeError, "q must be a torch.Tensor"),
    (dict(k=torch.zeros(1, 2, 6, 3)), ValueError, "k has head dim 3 but q has 4"),
    (dict(frames=None), TypeError, "frames must be a torch.Tensor of frame ids or a pair"),
    (dict(frames=torch.zeros(5, dtype=torch.int32)), ValueError, r"frames must have shape \(6,\)"),
    (dict(frames=torch.zeros(6)), TypeError, "frames must hold signed integers"),
    (dict(frames=torch.tensor([0, 0, -2, 1, 1, 1])), ValueError, "frames must be frame ids >= 0, or -1"),
    (dict(k=torch.zeros(1, 2, 7, 4)), ValueError, "frames of one tensor gives the same ids"),
    (dict(key_mask=torch.ones(1, 6)), TypeError, "key_mask must be a bool tensor"),
    (dict(key_mask=torch.ones(2, 6, dtype=torch.bool)), ValueError, r"key_mask must have shape \(B, Nk\)"),
    (dict(scale=0.0), ValueError, "scale must be > 0"),
    (dict(q=torch.full((1, 2, 6, 4), math.nan)), ValueError, "q has non-finite entries"),
    (dict(k=torch.full((1, 2, 6, 4), math.inf)), ValueError, "k has non-finite entries"),
    (dict(q=torch.zeros(1, 2, 6, 4, device="meta"), k=torch.zeros(1, 2, 6, 4, device="meta"),
          frames=torch.tensor([0, 0, 1, 1, -1, -1], device="meta")), ValueError, "q is a meta tensor, which has no"),
], ids=["q-list", "head-dim", "no-frames", "frames-length", "frames-float", "frames-id", "frames-cross",
        "mask-dtype", "mask-shape", "scale", "q-nan", "k-inf", "meta"])
def test_max_outside_own_frame_rejects_bad_input(change, exc, match):
    args = dict(q=torch.zeros(1, 2, 6, 4), k=torch.zeros(1, 2, 6, 4), frames=torch.tensor([0, 0, 1, 1, -1, -1]))
    args.update(change)
    with pytest.raises(exc, match=match):
        max_outside_own_frame(args.pop("q"), args.pop("k"), args.pop("frames"), **args)


def png(path):
    img = Image.open(path)
    assert img.format == "PNG"
    return img


def colors_in(img):
    rgb = np.asarray(img.convert("RGB")).reshape(-1, 3)
    return {tuple(int(c) for c in px) for px in np.unique(rgb, axis=0)}


def jet_bytes(values):
    return {tuple(int(c) for c in matplotlib.colormaps["jet"](float(v), bytes=True)[:3]) for v in np.unique(values)}


@pytest.fixture
def figures(monkeypatch):
    return saved_figures(monkeypatch)


def panels(fig):
    """The axes that show a map (colour bars excluded), in drawing order."""
    return [ax for ax in fig.axes if ax.images]


def colour_bars(fig):
    return [ax for ax in fig.axes if not ax.images and ax.get_visible() and ax.axison]


def test_plot_delta_draws_the_gaussian_matrices(tmp_path, figures):
    path = tmp_path / "delta.png"
    drawn = plot_delta([1, 4, 8], 16, path)
    assert list(drawn) == ["sigma = 1", "sigma = 4", "sigma = 8"]
    for sigma, (title, array) in zip((1, 4, 8), drawn.items()):
        assert np.array_equal(array, gaussian_toeplitz(16, sigma, dtype=torch.float64).numpy())
    # every value drawn shows up in the file in its jet colour (nearest-neighbour, no smoothing)
    assert jet_bytes(drawn["sigma = 1"]) <= colors_in(png(path))
    [fig] = figures
    assert "TAR's Gaussian matrix dA, 16 frames" in fig.get_suptitle()
    assert "shared scale 0..1" in fig.get_suptitle()
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == list(drawn)
    assert [ax.get_xlabel() for ax in axes] == ["key frame"] * 3
    assert [ax.get_ylabel() for ax in axes] == ["query frame", "", ""]
    assert [(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in axes] == [(0.0, 1.0)] * 3
    [bar] = colour_bars(fig)
    assert bar.get_ylabel() == "dA" and axes[0].images[0].colorbar.ax is bar


def test_plot_size_follows_panel_size_and_dpi(tmp_path):
    sizes = {}
    for panel_size, dpi in ((2, 40), (2, 80), (4, 40)):
        path = tmp_path / f"{panel_size}-{dpi}.png"
        plot_delta([2.0, 4.0], 8, path, panel_size=panel_size, dpi=dpi)
        sizes[panel_size, dpi] = png(path).size
    assert sizes[2, 80] == (2 * sizes[2, 40][0], 2 * sizes[2, 40][1])
    # two more inches per panel side: two panels wider, one panel taller
    assert sizes[4, 40][0] - sizes[2, 40][0] == 2 * 2 * 40 and sizes[4, 40][1] - sizes[2, 40][1] == 2 * 40


def test_a_map_of_more_frames_than_a_panels_pixels_is_drawn_a_pixel_a_frame(tmp_path):
    """300 frames in a 2.5-inch panel at dpi 50 (125 pixels) drew dA's diagonal as its neighbours' value for most
    frames: the panel grows until every row of frames has a pixel row of its own."""
    import matplotlib.image

    n, dpi = 300, 50
    plot_delta([1.0, 2.0], n, tmp_path / "d.png", dpi=dpi)
    image = matplotlib.image.imread(tmp_path / "d.png")[:, :-dpi, :3]  # less the colour bar at the right
    diagonal = (abs(image - torch.tensor([0.5, 0.0, 0.0]).numpy()) < 0.02).all(-1)  # jet at dA = 1
    assert diagonal.any(1).sum() >= n and diagonal.any(0).sum() >= 2 * n  # rows once, columns in both panels


def test_plot_attention_maps_shared_scale(tmp_path, figures):
    torch.manual_seed(2)
    a, b = torch.rand(8, 8), torch.softmax(torch.randn(8, 8), dim=-1)
    flat = plot_attention_maps({"down.0": a, "up.1": b}, tmp_path / "flat.png")
    for name, m in (("down.0", a), ("up.1", b)):
        assert np.array_equal(flat[name], m.double().numpy())  # the values, not a rescaling
    assert jet_bytes(flat["up.1"] / float(a.max())) <= colors_in(png(tmp_path / "flat.png"))
    [fig] = figures
    high = float(a.max())
    assert f"shared scale 0..{high:.3g}: one colour bar for all panels" in fig.get_suptitle()
    axes = panels(fig)
    assert [(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in axes] == [(0.0, high)] * 2
    assert [ax.get_xlabel() for ax in axes] == ["key frame"] * 2
    assert [ax.get_ylabel() for ax in axes] == ["query frame", ""]
    assert len(colour_bars(fig)) == 1 and colour_bars(fig)[0].get_ylabel() == "attention weight"

    nested = {"level 64": {"down": a, "mid": b, "up": a.T}, "level 32": {"down": torch.eye(4)}}
    drawn = plot_attention_maps(nested, tmp_path / "nested.png", title="temporal attention", dpi=50)
    assert list(drawn) == ["level 64 / down", "level 64 / mid", "level 64 / up", "level 32 / down"]
    assert np.array_equal(drawn["level 32 / down"], np.eye(4))
    fig = figures[-1]
    assert fig.get_suptitle().startswith("temporal attention\nshared scale 0..1:")
    axes = panels(fig)
    assert [ax.get_title() for ax in axes] == ["down", "mid", "up", "down"]
    assert [ax.get_ylabel() for ax in axes] == ["level 64\nquery frame", "", "", "level 32\nquery frame"]
    # "key frame" under the last map of each column
    assert [ax.get_xlabel() for ax in axes] == ["", "key frame", "key frame", "key frame"]


def test_plot_attention_maps_per_panel_scale(tmp_path, figures):
    a, b = torch.rand(6, 6) + 1.0, torch.eye(6) * 0.25
    plot_attention_maps({"a": a, "b": b}, tmp_path / "maps.png", color_scale="per-panel")
    [fig] = figures
    assert "per-panel scale: each panel from its own min to its own max" in fig.get_suptitle()
    axes = panels(fig)
    assert [(ax.images[0].norm.vmin, ax.images[0].norm.vmax) for ax in axes] == \
        [(float(a.min()), float(a.max())), (0.0, 0.25)]
    assert all(ax.images[0].colorbar is not None for ax in axes) and len(colour_bars(fig)) == 2


@pytest.mark.parametrize("color_scale", ["shared", "per-panel"])
def test_a_captured_maps_nan_row_is_drawn_blank(tmp_path, figures, color_scale):
    """A captured map has a NaN row for a frame without a token (Framepack's indices leave gaps): it is drawn blank
    (transparent), and the scale comes from the other entries."""
    m = torch.tensor([[0.5, 0.25, 0.25], [math.nan] * 3, [0.0, 0.125, 0.875]])
    drawn = plot_attention_maps({"gaps": m}, tmp_path / "gaps.png", color_scale=color_scale)
    assert np.array_equal(drawn["gaps"], m.double().numpy(), equal_nan=True)
    [ax] = panels(figures[-1])
    assert (ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.0, 0.875)
    blank = np.asarray(ax.images[0].to_rgba(ax.images[0].get_array()))[1]
    assert (blank[:, 3] == 0).all()  # transparent


def test_a_one_frame_map_has_integer_frame_ticks(tmp_path, figures):
    # a video DiT's call of one latent frame is recorded as a 1 x 1 map (its ticks read -0.5 .. 0.5)
    plot_attention_maps({"a": torch.ones(1, 1), "b": torch.eye(3)}, tmp_path / "one.png")
    for ax in panels(figures[-1]):
        shown = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert shown and all(float(t).is_integer() for t in shown), shown


def test_long_layer_names_are_shortened_or_wrapped(tmp_path, figures):
    layers = ["transformer_in.transformer_blocks.0.attn1", "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1",
              "mid_block.temp_attentions.0.transformer_blocks.0.attn2",
              "up_blocks.3.motion_modules.1.transformer_blocks.1.attn1"]
    drawn = plot_attention_maps({0: {name: torch.eye(4) for name in layers}}, tmp_path / "maps.png")
    assert list(drawn) == [f"0 / {name}" for name in layers]
    assert [ax.get_title() for ax in panels(figures[-1])] == \
        ["transformer_in.attn1", "down0.t0.attn1", "mid.t0.attn2", "up3.m1.b1.attn1"]
    assert [short_layer_name(name) for name in layers[1:3]] == ["down0.t0.attn1", "mid.t0.attn2"]
    # a DiT's blocks keep their numbers, block 0 too (it read "attn1" beside "b1.attn1")
    assert [short_layer_name(f"{blocks}.{i}.attn") for blocks in ("transformer_blocks", "single_transformer_blocks")
            for i in (0, 1)] == ["b0.attn", "b1.attn", "single_b0.attn", "single_b1.attn"]
    with pytest.raises(TypeError, match=r"short_layer_name: layer must be a module path \(str\), got int"):
        short_layer_name(5)

    # names that shorten alike are kept, and a name wider than a panel is wrapped at its dots
    alike = {"down_blocks.0.temp_attentions.0.attn1": torch.eye(4), "down0.t0.attn1": torch.eye(4),
             "a_very_long_module_name.with.many.parts.that.will_not_fit_in_one_line": torch.eye(4)}
    plot_attention_maps(alike, tmp_path / "alike.png")
    titles = [ax.get_title() for ax in panels(figures[-1])]
    assert titles[:2] == ["down_blocks.0.temp_attentions.0.\nattn1", "down0.t0.attn1"]
    assert titles[2].replace("\n", "") == "a_very_long_module_name.with.many.parts.that.will_not_fit_in_one_line"
    assert titles[2].count("\n") >= 1 and all(len(line) <= 40 for line in titles[2].splitlines())


def test_minmax_normalize():
    m = torch.tensor([[2.0, 4.0], [3.0, 6.0]])
    assert torch.equal(minmax_normalize(m), torch.tensor([[0.0, 0.5], [0.25, 1.0]], dtype=torch.float64))
    assert torch.equal(minmax_normalize(torch.full((3, 3), 7.0)), torch.zeros(3, 3, dtype=torch.float64))
    assert torch.equal(minmax_normalize(np.array([[1.0, 3.0]])), torch.tensor([[0.0, 1.0]], dtype=torch.float64))
    # a captured map's row of a frame with no token (NaN) stays NaN; the rest is normalized (it was all zeros)
    nan = math.nan
    got = minmax_normalize(torch.tensor([[0.2, 0.8], [nan, nan]]))
    assert torch.equal(got[0], torch.tensor([0.0, 1.0], dtype=torch.float64)) and got[1].isnan().all()
    got = minmax_normalize(torch.tensor([[0.5, 0.5], [nan, nan]]))
    assert torch.equal(got[0], torch.zeros(2, dtype=torch.float64)) and got[1].isnan().all()
    # a range wider than float64's largest number (it overflowed to inf: a NaN at the max); numbers in lists are
    # taken as float64 (torch's float32 made 1e308 inf)
    wide = torch.tensor([[-1e308, 1e308, 0.0]], dtype=torch.float64)
    assert torch.equal(minmax_normalize(wide), torch.tensor([[0.0, 1.0, 0.5]], dtype=torch.float64))
    assert torch.equal(minmax_normalize(wide.tolist()), minmax_normalize(wide))
    tiny = torch.tensor([[0.0, 5e-324], [1e-323, 2e-323]], dtype=torch.float64)  # subnormals: not halved to 0
    assert torch.equal(minmax_normalize(tiny), torch.tensor([[0.0, 0.25], [0.5, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("maps,kwargs,exc,match", [
    ({}, {}, TypeError, "non-empty dict"),
    ([torch.eye(3)], {}, TypeError, "non-empty dict"),
    ({"a": torch.eye(3), "b": {"c": torch.eye(3)}}, {}, TypeError, "not a mix"),
    ({"a": {}}, {}, ValueError, r"maps\['a'\] holds no layer"),
    ({"a": torch.ones(2, 3, 3)}, {}, ValueError, "a must be a non-empty 2-D map"),
    ({"a": torch.tensor([[0.0, math.inf]])}, {}, ValueError, "a has infinite entries, or no entry that is not NaN"),
    ({"a": torch.full((2, 2), math.nan)}, {}, ValueError, "a has infinite entries, or no entry that is not NaN"),
    ({"a": torch.eye(3)}, {"dpi": 0}, ValueError, "dpi must be a positive int"),
    ({"a": torch.eye(3)}, {"dpi": 5}, ValueError,
     "dpi must be at least 10 .matplotlib cannot draw the labels' text at 5"),
    # (drawn, in GBs for a large figure; a MemoryError in matplotlib further on)
    ({"a": torch.eye(3)}, {"dpi": 601}, ValueError, r"dpi must be at most 600 \(print quality; a figure's pixels grow "
                                                    r"as the dpi squared, its size in memory with them\), got 601"),
    ({"a": torch.eye(3)}, {"panel_size": -1}, ValueError, r"panel_size must be a number of inches > 0.5"),
    ({"a": torch.eye(3)}, {"panel_size": 0.5}, ValueError, r"panel_size must be a number of inches > 0.5"),
    ({"a": torch.eye(3)}, {"panel_size": math.inf}, ValueError, r"panel_size must be a number of inches > 0.5"),
    ({"a": torch.eye(3)}, {"color_scale": "minmax"}, ValueError,
     r"color_scale must be one of \('shared', 'per-panel'\)"),
    # the imaginary part was dropped with a warning
    ({"a": torch.eye(3) * 1j}, {}, TypeError, "a must be a real map, got torch.complex64"),
    ({"a": None}, {}, TypeError, "a must be a 2-D map: a tensor, or an array or nested lists of numbers of one shape; "
                                 "got a NoneType that is not"),
    ({"a": [[1.0, 2.0], [3.0]]}, {}, TypeError, "a must be a 2-D map: .* got a list that is not"),
    # two panels titled "1": the dict returned held one of them
    ({1: torch.eye(3), "1": torch.eye(3)}, {}, ValueError, "plot_attention_maps: two panels are both named '1'"),
    ({"a": torch.eye(3, device="meta")}, {}, ValueError, "a is a meta tensor, which has no values"),
    # the deprecated spelling won over the new one
    ({"a": torch.eye(3)}, {"scale": "shared", "color_scale": "per-panel"}, TypeError,
     "plot_attention_maps: scale='shared' and color_scale='per-panel' are one argument, scale= its deprecated "
     "spelling: give color_scale= alone"),
    # and where the new one was given at its default
    ({"a": torch.eye(3)}, {"scale": "per-panel", "color_scale": "shared"}, TypeError,
     "plot_attention_maps: scale='per-panel' and color_scale='shared' are one argument"),
    # beside a deprecated keyword, an unknown one was "got an unexpected keyword argument 'bogus'", naming no function
    ({"a": torch.eye(3)}, {"scale": "shared", "bogus": 1}, TypeError,
     r"plot_attention_maps\(\) got an unexpected keyword argument 'bogus'"),
], ids=["empty", "list", "mixed", "empty-level", "3-D", "inf", "all-nan", "dpi", "dpi-too-small", "dpi-too-large",
        "panel-size", "panel-too-small", "panel-inf", "scale", "complex", "none", "ragged", "same-name", "meta",
        "both-spellings", "both-spellings-default", "old-spelling-beside-an-unknown-keyword"])
def test_plot_attention_maps_rejects_bad_input(tmp_path, maps, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        plot_attention_maps(maps, tmp_path / "x.png", **kwargs)


@pytest.mark.parametrize("sigmas,n,exc,match", [
    ([], 8, ValueError, "at least one value"),
    (1.0, 8, TypeError, "sequence of numbers"),
    ([1.0], 0, ValueError, "n must be a positive int"),
    ([0.0], 8, ValueError, "sigma must be > 0"),
    (["a"], 8, TypeError, "sigma must be a real number, got str"),  # (it failed formatting the title)
    ([None], 8, TypeError, "sigma must be a real number, got NoneType"),
    ([1, 4.0, 1.0], 8, ValueError, "sigmas holds 1 twice"),  # one panel key for two panels
    # the entry is named (the message spoke of a sigma, not which of the sigmas given)
    ([1.0, 0.0], 8, ValueError, r"sigmas\[1\]: sigma must be > 0"),
    (torch.tensor([1.0, 2.0]), 8, TypeError, r"sigmas\[0\]: sigma must be a real number, got Tensor"),
])
def test_plot_delta_rejects_bad_input(tmp_path, sigmas, n, exc, match):
    with pytest.raises(exc, match=match):
        plot_delta(sigmas, n, tmp_path / "x.png")


@pytest.mark.parametrize("name,draw", [
    ("plot_delta", lambda path: plot_delta([1.0, 4.0], 8, path)),
    ("plot_attention_maps", lambda path: plot_attention_maps({"a": torch.eye(3)}, path)),
])
def test_plots_take_a_file_name_or_a_file_object(tmp_path, name, draw):
    """path=None (or a number) failed inside matplotlib ("'NoneType' object has no attribute 'write'"), naming no
    argument; a binary file object is drawn into, as matplotlib's savefig takes one (PNG, its default format)."""
    for bad in (None, 3, io.StringIO()):  # a text file object failed inside matplotlib
        with pytest.raises(TypeError, match=rf"^{name}: path must be a file name \(str or os.PathLike\) or a binary "
                                            rf"file object, got {type(bad).__name__}$"):
            draw(bad)
    buffer = io.BytesIO()
    draw(buffer)
    assert buffer.getvalue()[:8] == b"\x89PNG\r\n\x1a\n"
    draw(str(tmp_path / "x.png"))
    assert (tmp_path / "x.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for bad in (tmp_path / "x", str(tmp_path / "x.")):  # matplotlib wrote x.png, not the path given
        with pytest.raises(ValueError, match=rf"^{name}: path '.*x\.?' has no suffix to name the image format"):
            draw(bad)
    # a format matplotlib does not write: named by path before the drawing (matplotlib's error came after it)
    with pytest.raises(ValueError, match=rf"^{name}: path '.*x\.xyz' names a format matplotlib does not write, "
                                         r"\.xyz \(formats: .*png"):
        draw(tmp_path / "x.xyz")
    import matplotlib

    if shutil.which(matplotlib.rcParams["pgf.texsystem"]) is None:  # (matplotlib's RuntimeError after the drawing)
        with pytest.raises(ValueError, match=rf"^{name}: path '.*x\.pgf' is a \.pgf image, which needs TeX"):
            draw(tmp_path / "x.pgf")
    draw(tmp_path / "y.PNG")  # the suffix in capitals is the same format
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.png", "y.PNG"]


@pytest.fixture
def no_matplotlib(monkeypatch):
    """matplotlib as if it were not installed: every import of it or of its modules fails."""
    for name in {"matplotlib", *(n for n in sys.modules if n.startswith("matplotlib."))}:
        monkeypatch.setitem(sys.modules, name, None)


@pytest.mark.parametrize("name,draw", [
    ("plot_delta", lambda path: plot_delta([1.0, 4.0], 8, path)),
    ("plot_attention_maps", lambda path: plot_attention_maps({"a": torch.eye(3)}, path)),
])
def test_plots_without_matplotlib_name_the_extra(tmp_path, no_matplotlib, name, draw):
    message = (f"vstar_kernels.analysis.{name} needs matplotlib, which is not importable (.*); install the plot extra "
               f"with: {re.escape(_env.install_hint('plot'))}$")
    with pytest.raises(ImportError, match=message) as caught:
        draw(tmp_path / "x.png")
    assert type(caught.value) is ImportError and 'pip install -e "' in str(caught.value)
    assert not list(tmp_path.iterdir())
    assert float(diagonality(torch.eye(3))) == 1.0  # the measures need only torch


def test_cli_plot_delta(tmp_path, capsys):
    out = tmp_path / "delta.png"
    plot_delta([1, 4, 8], 16, tmp_path / "api.png")
    assert cli_main(["plot-delta", "--sigmas", "1", "4", "8", "--num-frames", "16", "--out", str(out)]) == 0
    assert png(out).size == png(tmp_path / "api.png").size  # the CLI draws what the function draws
    assert "sigma = 1, sigma = 4, sigma = 8 over 16 frames" in capsys.readouterr().out
    assert cli_main(["plot-delta", "--sigmas", "1", "--num-frames", "1", "--out", str(out)]) == 0
    assert "sigma = 1 over 1 frame\n" in capsys.readouterr().out
    # two panels drawn and one reported (their key was the title)
    assert cli_main(["plot-delta", "--sigmas", "1", "1.0", "--out", str(tmp_path / "bad.png")]) == 2
    assert "plot-delta: sigmas holds 1 twice" in capsys.readouterr().err
    assert not (tmp_path / "bad.png").exists()
