"""`python -m vstar_kernels demo-attention`: the PNG it draws and the numbers it prints."""

import inspect
import sys

import numpy
import pytest
import torch

from vstar_kernels.analysis import band_energy, diagonality
from vstar_kernels.cli import main as cli_main
from vstar_kernels.diffusers.attention_demo import attention_demo

from ..helpers import saved_figures
from .tiny_video_models import one_torch_thread  # noqa: F401 (autouse fixture)

Image = pytest.importorskip("PIL.Image")

LEVEL0_LAYERS = 6  # the tiny UNet's level-0 temporal attention: down block 0 (1 transformer), up block 1 (2), x 2


def test_demo_maps_show_the_band_tar_adds(tmp_path, monkeypatch):
    figures = saved_figures(monkeypatch)
    runs = attention_demo(tmp_path / "att.png", num_frames=8, size=8, dpi=40)
    assert list(runs) == ["without TAR", "with TAR"]
    plain, tar = runs["without TAR"], runs["with TAR"]
    assert list(plain) == list(tar) and len(plain) == LEVEL0_LAYERS
    for layer in plain:
        assert plain[layer].shape == tar[layer].shape == (8, 8)
        torch.testing.assert_close(tar[layer].sum(dim=1), torch.ones(8, dtype=torch.float64))
        assert diagonality(tar[layer]) > diagonality(plain[layer]) + 0.02, layer
        assert band_energy(tar[layer], 1) > band_energy(plain[layer], 1), layer
    with Image.open(tmp_path / "att.png") as img:
        img.verify()
    with Image.open(tmp_path / "att.png") as img:
        assert img.format == "PNG"
    # one colour scale for both runs, so that the weak structure without TAR looks weak
    [fig] = figures
    high = max(float(m.max()) for maps in runs.values() for m in maps.values())
    assert f"shared scale 0..{high:.3g}: one colour bar for all panels" in fig.get_suptitle()
    axes = [ax for ax in fig.axes if ax.images]
    assert len(axes) == 2 * LEVEL0_LAYERS and len(fig.axes) == len(axes) + 1  # + one colour bar
    assert all((ax.images[0].norm.vmin, ax.images[0].norm.vmax) == (0.0, high) for ax in axes)
    assert [ax.get_title() for ax in axes[:2]] == ["down0.t0.attn1", "down0.t0.attn2"]
    assert [axes[0].get_ylabel(), axes[LEVEL0_LAYERS].get_ylabel()] == ["without TAR\nquery frame",
                                                                       "with TAR\nquery frame"]
    assert {ax.get_xlabel() for ax in axes[LEVEL0_LAYERS:]} == {"key frame"}


def test_cli_prints_the_numbers_of_the_maps(tmp_path, capsys, monkeypatch):
    figures = saved_figures(monkeypatch)
    out = tmp_path / "cli.png"
    assert cli_main(["demo-attention", "--num-frames", "8", "--size", "8", "--dpi", "40", "--color-scale",
                     "per-panel", "--out", str(out)]) == 0
    assert "per-panel scale" in figures[0].get_suptitle()
    text = capsys.readouterr().out
    assert f"wrote {out}" in text and out.exists()
    runs = attention_demo(tmp_path / "again.png", num_frames=numpy.int64(8), size=8, dpi=40)  # numpy ints taken
    mean_line = next(line for line in text.splitlines() if line.startswith("mean"))
    printed = [float(v) for v in mean_line.split()[1:]]
    expected = [sum(float(diagonality(m)) for m in runs[r].values()) / LEVEL0_LAYERS for r in runs] + \
        [sum(float(band_energy(m, 1)) for m in runs[r].values()) / LEVEL0_LAYERS for r in runs]
    assert printed == pytest.approx(expected, abs=5e-4)
    assert printed[1] > printed[0]


@pytest.mark.parametrize("argv, message", [
    (["--num-frames", "1"], "argument --num-frames: must be an int from 2 to 256 (the demo's maps grow as the frames "
                            "squared), got '1'"),
    # sizes past what a machine holds ended in an allocation's traceback
    (["--num-frames", "100000"], "argument --num-frames: must be an int from 2 to 256"),
    (["--size", "100000"], "argument --size: must be an int from 2 to 64 (the demo's spatial attention grows as the "
                           "size to the fourth), got '100000'"),
    # the library's checks named its parameters (levels[0]: sigma), not the options
    (["--sigma", "-1"], "argument --sigma: must be a number > 0 (inf: no band), got '-1'"),
    (["--strength", "inf"], "argument --strength: must be a number of at most 3.4028234663852886e+38 in size"),
    (["--strength", "1e300"], "argument --strength: must be a number of at most 3.4028234663852886e+38 in size"),
])
def test_cli_rejects_bad_sizes(tmp_path, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        cli_main(["demo-attention", *argv, "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.splitlines()[-1]
    assert not (tmp_path / "x.png").exists()


def test_cli_bounds_the_frames_and_the_size_together(tmp_path, capsys, monkeypatch):
    """Each at its cap ran in about a minute; both at theirs would take about fifteen. Refused before the demo's
    import (diffusers: seconds), as the options' own checks are: here the import would fail."""
    monkeypatch.setitem(sys.modules, "vstar_kernels.diffusers.attention_demo", None)
    assert cli_main(["demo-attention", "--num-frames", "256", "--size", "64", "--out", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == ("demo-attention: --num-frames 256 with --size 64 is too large a demo "
                                               "(frames x size^2 at most 65,536, e.g. 256 frames at size 16 or 16 "
                                               "frames at size 64)")
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", [
    ["demo-attention", "--num-frames", "8", "--frames", "4"], ["demo-attention", "--frames", "4", "--num-frames", "8"],
    ["demo-attention", "--num-frames", "16", "--frames", "4"],  # the new one at its default
    ["demo-attention", "--color-scale", "shared", "--scale", "per-panel"],
    ["plot-delta", "--frames", "4", "--num-frames", "16"], ["plot-delta", "--num-frames", "16", "--frames", "16"]])
def test_an_option_beside_its_old_spelling_is_an_argparse_error(tmp_path, capsys, command):
    """Both spellings given: the last one had won in silence (beside the old one's deprecation notice), whatever
    the values, the default's included."""
    with pytest.raises(SystemExit) as exit_:
        cli_main([*command, "--out", str(tmp_path / "x.png")])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.endswith(f"error: argument {command[3]}: not allowed with argument {command[1]} (one option, two "
                        "spellings)"), err
    assert not (tmp_path / "x.png").exists()


def test_old_spellings_still_work_with_a_deprecation(tmp_path, capsys, monkeypatch):
    figures = saved_figures(monkeypatch)
    assert cli_main(["demo-attention", "--frames", "4", "--size", "8", "--dpi", "30", "--scale", "per-panel",
                     "--out", str(tmp_path / "old.png")]) == 0
    err = capsys.readouterr().err
    assert "--frames is deprecated" in err and "use --num-frames" in err and "use --color-scale" in err
    assert "per-panel scale" in figures[0].get_suptitle() and "4 frames" in figures[0].get_suptitle()
    with pytest.warns(DeprecationWarning, match="attention_demo: frames= is deprecated") as record:
        runs = attention_demo(tmp_path / "old2.png", frames=4, size=8, dpi=30)
    assert [w.filename for w in record] == [__file__]  # the caller's line
    assert next(iter(runs["with TAR"].values())).shape == (4, 4)
    # both spellings at two values: the old one won, with a warning; the new one given at its default too
    for old, new, values in (("frames", "num_frames", (4, 8)), ("scale", "color_scale", ("shared", "per-panel")),
                             ("frames", "num_frames", (4, 16)), ("scale", "color_scale", ("per-panel", "shared"))):
        with pytest.raises(TypeError, match=f"attention_demo: {old}={values[0]!r} and {new}={values[1]!r} are one "
                                            f"argument, {old}= its deprecated spelling: give {new}= alone"):
            attention_demo(tmp_path / "both.png", size=8, dpi=30, **{old: values[0], new: values[1]})
    assert not (tmp_path / "both.png").exists()
    with pytest.warns(DeprecationWarning, match="attention_demo: scale= is deprecated"):  # one value, two spellings
        attention_demo(tmp_path / "same.png", num_frames=4, size=8, dpi=30, scale="per-panel", color_scale="per-panel")
    assert {"frames", "scale"}.isdisjoint(inspect.signature(attention_demo).parameters)


@pytest.mark.parametrize("seed", [1.5, "1", True, 2 ** 64, -2 ** 63 - 1])
def test_a_seed_torch_does_not_take_is_refused_by_name(tmp_path, seed):
    """It failed in torch's error ("manual_seed expected a long, but got float", "Overflow when unpacking long
    long"), naming no argument."""
    with pytest.raises(ValueError, match=rf"^seed must be an int from -2\*\*63 to 2\*\*64 - 1 .*, got {seed!r}$"):
        attention_demo(tmp_path / "x.png", num_frames=2, size=2, seed=seed)
    assert not (tmp_path / "x.png").exists()


def test_a_numpy_seed_is_its_int(tmp_path):
    """The seed check took a numpy int, which torch.Generator's manual_seed then refused ("an integer is required")
    once the model was built."""
    runs = attention_demo(tmp_path / "a.png", num_frames=2, size=2, dpi=30, seed=numpy.int64(3))
    expected = attention_demo(tmp_path / "b.png", num_frames=2, size=2, dpi=30, seed=3)
    assert runs.keys() == expected.keys()
    for run, maps in expected.items():
        assert runs[run].keys() == maps.keys()
        for layer, want in maps.items():
            torch.testing.assert_close(runs[run][layer], want, rtol=0, atol=0)


@pytest.mark.parametrize("bad", [dict(path="x"), dict(path=1), dict(path="x.xyz"), dict(color_scale="log"),
                                 dict(dpi=5)])
def test_the_drawing_arguments_are_checked_before_the_runs(tmp_path, monkeypatch, bad):
    """A path, colour scale or dpi the picture cannot take was refused after both runs of the model (a minute at the
    largest sizes); now before the model is built."""
    import vstar_kernels.diffusers.attention_demo as demo

    def no_model(seed):
        raise AssertionError("the model was built before the drawing arguments were checked")
    monkeypatch.setattr(demo, "tiny_unet3d", no_model)
    with pytest.raises((TypeError, ValueError), match=r"attention_demo: path|color_scale must be|dpi must be"):
        attention_demo(**{"path": tmp_path / "x.png", "num_frames": 2, "size": 2, **bad})


def test_a_strength_past_float32_in_the_scores_is_named(tmp_path, capsys):
    """strength * a row's max score past float32's range made the maps with TAR non-finite, and the drawing then
    refused them ("has infinite entries, or no entry that is not NaN"), naming neither the strength nor the cause."""
    with pytest.raises(ValueError, match=r"^strength=3.4e\+38 made the attention with TAR non-finite"):
        attention_demo(tmp_path / "x.png", num_frames=2, size=2, strength=3.4e38)
    assert not (tmp_path / "x.png").exists()
    assert cli_main(["demo-attention", "--num-frames", "2", "--size", "2", "--strength", "3.4e38",
                     "--out", str(tmp_path / "y.png")]) == 2
    assert "demo-attention: strength=3.4e+38 made the attention with TAR non-finite" in capsys.readouterr().err
