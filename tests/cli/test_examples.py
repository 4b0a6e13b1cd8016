"""The examples under examples/ run, learn, and give the same numbers on the Triton backend."""

import importlib.util
import pathlib

import pytest
import torch

from .._device import DEVICE

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


def load(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def train_example():
    return load("train_temporal_tar")


@pytest.fixture(scope="module")
def band_example():
    return load("match_band_attention")


def test_training_with_tar_learns_to_use_neighbouring_frames(train_example, capsys):
    losses = train_example.main(["--steps", "40"])
    assert "loss" in capsys.readouterr().out
    noise = 0.5  # the example's default: returning the noisy input scores noise ** 2
    final = sum(losses[-5:]) / 5
    assert final < 0.9 * noise ** 2, f"the model does not beat the identity: {final:.4f}"
    assert final < 0.5 * losses[0]


def test_training_on_triton_backend_matches_reference(train_example):
    kw = dict(steps=3, batch=8, device=DEVICE, log=None)
    triton = train_example.train(backend="triton", **kw)
    reference = train_example.train(backend="reference", **kw)
    torch.testing.assert_close(torch.tensor(triton), torch.tensor(reference), atol=1e-5, rtol=1e-4)


def test_input_optimization_makes_attention_band_like(band_example, capsys):
    result = band_example.main(["--steps", "100"])
    assert "diagonality" in capsys.readouterr().out
    losses = result["losses"]
    assert losses[-1] < 0.05 * losses[0]
    assert result["diagonality_before"] < 0.3
    assert result["diagonality_after"] > 0.85


def test_input_optimization_on_triton_backend_matches_reference(band_example):
    kw = dict(steps=4, strength=1.0, device=DEVICE, log=None)
    triton = band_example.optimize(backend="triton", **kw)
    reference = band_example.optimize(backend="reference", **kw)
    torch.testing.assert_close(torch.tensor(triton["losses"]), torch.tensor(reference["losses"]),
                               atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["train_temporal_tar", "match_band_attention"])
@pytest.mark.parametrize("option", ["--steps", "--frames"])
def test_examples_refuse_a_count_below_one(name, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        load(name).main([option, "0"])
    assert exit_.value.code == 2
    assert f"argument {option}: must be a positive int, got '0'" in capsys.readouterr().err


@pytest.mark.parametrize("name, args, message", [
    ("train_temporal_tar", ["--sigma", "0"], "--sigma: sigma must be > 0"),
    ("train_temporal_tar", ["--strength", "nan"], "--strength: strength must be finite"),
    ("match_band_attention", ["--target-sigma", "-1"], "--target-sigma: sigma must be > 0"),
    ("match_band_attention", ["--sigma", "nan"], "--sigma: sigma must be > 0"),
    ("match_band_attention", ["--frames", "1"], "--frames must be at least 2"),   # its diagonality was nan
    ("train_temporal_tar", ["--strength=-1e39"], "--strength: must be at most 3.4028234663852886e+38 in size"),
    ("match_band_attention", ["--strength", "1e39"], "--strength: must be at most 3.4028234663852886e+38 in size"),
])
def test_examples_refuse_bad_values_before_building_anything(name, args, message, capsys):
    """A band width or strength the kernels refuse was a traceback after the model was built."""
    with pytest.raises(SystemExit) as exit_:
        load(name).main(args)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("name", ["train_temporal_tar", "match_band_attention"])
def test_examples_stop_at_a_loss_that_is_not_finite(name, capsys):
    """A strength float32 holds, whose product with a row's largest score overflows: the loss was nan at every step,
    printed as a result."""
    with pytest.raises(SystemExit) as exit_:
        load(name).main(["--strength", "3e38", "--steps", "2"])
    assert exit_.value.code == 1
    assert "error: step 0: the loss is nan; strength 3e+38 times a row's largest score can overflow float32" \
        in capsys.readouterr().err
