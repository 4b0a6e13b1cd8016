"""The examples under examples/ run, learn, and give the same numbers on the Triton backend."""

import importlib.util
import pathlib
import subprocess
import sys

import pytest
import torch

from .._device import DEVICE
from ..helpers import clean_env

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


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CPU machine's run: without the interpreter from its start")
@pytest.mark.parametrize("name", ["train_temporal_tar", "match_band_attention"])
def test_examples_refuse_triton_on_a_cpu_without_the_interpreter(name):
    """--backend triton on a CPU machine without TRITON_INTERPRET ended in a BackendUnavailableError traceback."""
    env = clean_env()  # (no TRITON_INTERPRET)
    res = subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), "--backend", "triton", "--steps", "1"],
                         capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 2, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert "error: --backend triton: backend='triton' cannot run this call: cpu tensors need TRITON_INTERPRET=1" \
        in res.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="triton keeps the compiled mode of its first import here")
@pytest.mark.parametrize("name", ["train_temporal_tar", "match_band_attention"])
def test_examples_run_on_the_cpu_under_the_interpreter_where_torch_sees_cuda(name, monkeypatch, capsys):
    """TRITON_INTERPRET=1 on a CUDA machine: the interpreter takes CPU tensors, and the examples put them on CUDA."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a move to CUDA fails on this machine
    load(name).main(["--backend", "triton", "--steps", "1", "--frames", "4"])
    assert "loss" in capsys.readouterr().out


def test_band_example_refuses_frames_past_the_triton_head_dim(capsys):
    """--frames is v = I's head dim: past 256 the Triton backend raised "head dim 300 > 256" after the setup."""
    with pytest.raises(SystemExit) as exit_:
        load("match_band_attention").main(["--frames", "300", "--backend", "triton"])
    assert exit_.value.code == 2
    assert "error: --backend triton: backend='triton' cannot run this call: head dim 300 > 256" \
        in capsys.readouterr().err


@pytest.mark.parametrize("name, refused, message", [
    ("train_temporal_tar", 2 ** 64 - 1, "from -2**63 to 2**64 - 2 (the data is seeded with seed + 1)"),
    ("train_temporal_tar", -2 ** 63 - 1, "from -2**63 to 2**64 - 2"),
    ("match_band_attention", 99999999999999999999999, "from -2**63 to 2**64 - 1"),
    ("match_band_attention", -2 ** 63 - 1, "from -2**63 to 2**64 - 1"),
])
def test_examples_refuse_a_seed_torch_cannot_take(name, refused, message, capsys):
    """A seed past 64 bits was a traceback: Overflow when unpacking long long."""
    with pytest.raises(SystemExit) as exit_:
        load(name).main(["--seed", str(refused), "--steps", "1"])
    assert exit_.value.code == 2
    assert f"error: --seed: must be an int {message}" in capsys.readouterr().err


@pytest.mark.parametrize("name, largest", [("train_temporal_tar", 2 ** 64 - 2), ("match_band_attention", 2 ** 64 - 1)])
def test_examples_take_the_largest_seed_and_say_one_step(name, largest, capsys):
    load(name).main(["--seed", str(largest), "--steps", "1", "--frames", "4"])
    out = capsys.readouterr().out
    assert "loss" in out and "1 steps" not in out


@pytest.mark.parametrize("name", ["train_temporal_tar", "match_band_attention"])
def test_examples_options_have_help_with_their_defaults(name, capsys):
    with pytest.raises(SystemExit):
        load(name).main(["--help"])
    options = capsys.readouterr().out.split("options:")[1]
    helps = {chunk.split()[0]: " ".join(chunk.split()) for chunk in ("\n" + options).split("\n  --")[1:]}
    for option in ("steps", "frames", "backend", "seed", "sigma", "strength"):
        assert "(default: " in helps[option] or "; default: " in helps[option], (option, helps[option])
