"""Every peer on a tiny shape: checked against float64 first, then timed with pytest-benchmark."""

import math

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels.bench import peers
from vstar_kernels.bench.check import check_indices, check_output
from vstar_kernels.bench.peers import PEERS, TarSpec, default_spec

from .._device import DEVICE

B, H, N, D = 3, 2, 16, 40
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


def inputs(n=N, dtype=DTYPE, seed=0):
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn(B, n, H, D, generator=gen, device=DEVICE, dtype=dtype).transpose(1, 2)
                 for _ in range(3))


@pytest.mark.parametrize("name", list(PEERS))
def test_peer_is_right_then_timed(name, benchmark):
    peer = PEERS[name]
    why = peer.why_not(torch.device(DEVICE), DTYPE)
    if why:
        pytest.skip(f"{name} cannot run here: {why}")
    q, k, v = inputs()
    spec = default_spec(D)
    out = peer.run(q, k, v, spec)
    assert check_output(out, q, k, v, spec, peer.plain) == ""
    benchmark.pedantic(peer.run, args=(q, k, v, spec), rounds=3, iterations=1)


def test_cpu_reasons_are_given():
    if DEVICE != "cpu":
        pytest.skip("checks the reasons given on a CPU-only machine")
    cpu = torch.device("cpu")
    assert PEERS["vstar_cuda"].why_not(cpu, torch.float32) != ""
    assert PEERS["vstar_triton"].why_not(cpu, torch.float32) == ""  # the interpreter runs it
    assert PEERS["vstar_triton"].label(cpu) == "vstar_triton_interpreter"
    assert PEERS["sdpa_plain"].label(cpu) == "sdpa_plain"


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_score_mod_pass_matches_the_reference():
    """The second FlexAttention pass (the score_mod) with an exact row max, run by flex's eager path."""
    from torch.nn.attention.flex_attention import flex_attention

    q, k, v = (t.float() for t in inputs())
    spec = TarSpec(sigma=2.0, strength=0.7, scale=0.2)
    row_max = (torch.matmul(q, k.transpose(-1, -2)) * spec.scale).amax(dim=-1)
    out = peers.flex_tar_pass(flex_attention, q, k, v, row_max, spec)
    ref = vk.tar_attention_reference(q.double(), k.double(), v.double(), sigma=2.0, strength=0.7, scale=0.2)
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_float_formula_is_the_reference_formula():
    q, k, v = (t.double() for t in inputs())
    dA = vk.gaussian_toeplitz(N, 1.5, dtype=torch.float64, device=DEVICE)
    got = peers.float_formula(q.float(), k.float(), v.float(), dA.float(), 0.3, 2.0)
    ref = vk.tar_attention_reference(q, k, v, sigma=1.5, strength=2.0, scale=0.3)
    torch.testing.assert_close(got.double(), ref, atol=2e-5, rtol=2e-5)


def test_tar_bias_is_strength_times_row_max_times_gaussian():
    q, k, _ = inputs()
    spec = TarSpec(sigma=3.0, strength=0.5, scale=0.25)
    bias = peers.tar_bias(q, k, spec)
    s = (q.double() @ k.double().transpose(-1, -2)) * 0.25
    i = torch.arange(N, dtype=torch.float64, device=DEVICE)
    gauss = torch.exp(-0.5 * ((i[None, :] - i[:, None]) / 3.0) ** 2)
    torch.testing.assert_close(bias.double(), 0.5 * s.amax(-1, keepdim=True) * gauss, atol=1e-5, rtol=1e-5)


def test_check_rejects_wrong_outputs():
    q, k, v = inputs()
    spec = default_spec(D)
    tar = vk.tar_attention_reference(q, k, v, scale=spec.scale)
    plain = torch.nn.functional.scaled_dot_product_attention(q, k, v, scale=spec.scale)
    assert check_output(tar, q, k, v, spec, plain=False) == ""
    assert check_output(plain, q, k, v, spec, plain=True) == ""
    assert "differs from the float64 reference" in check_output(plain, q, k, v, spec, plain=False)
    assert "differs from the float64 reference" in check_output(tar, q, k, v, spec, plain=True)
    broken = tar.clone()
    broken[B - 1, 1, 3, 0] += 0.05  # one element of the last batch entry
    assert "differs" in check_output(broken, q, k, v, spec, plain=False)
    broken[B - 1, 1, 3, 0] = math.nan
    assert check_output(broken, q, k, v, spec, plain=False) == "output has NaN or inf"
    assert "shape" in check_output(tar[:, :, :-1], q, k, v, spec, plain=False)
    assert "dtype" in check_output(tar.double(), q, k, v, spec, plain=False)


def test_check_covers_first_middle_and_last_batch_entries():
    assert check_indices(1) == [0]
    assert check_indices(2) == [0, 1]
    assert check_indices(92_160) == [0, 46_080, 92_159]
