"""Edge values on both backends: the NaN/inf rule of `tar_attention`, tiny sigma, empty queries,
and the reference's memory with a broadcast delta."""

import math

import numpy as np
import pytest
import torch
from ..helpers import LargestAllocation, make_qkv, opts_id, reference64

import vstar_kernels as vk
from vstar_kernels import reference

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

BACKENDS = ["reference", "triton"]
GRAD_BACKENDS = ["reference", "cpu", "triton"]  # "cpu" has a forward of its own, and the reference's backward
# a packed-layout and a tiled-layout size (the Triton kernels have one code path each)
SIZES = [8, 130]


def nonfinite_rows(out):
    """(B, H, N) bool: rows of the output with a NaN or inf."""
    return (~torch.isfinite(out)).any(-1)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_mode,strength,whole_slice", [("row", 1.0, False), ("global", 1.0, True),
                                                           ("global", 0.0, False)])
def test_nan_in_q_row(backend, n, max_mode, strength, whole_slice):
    """A NaN in q row 3 of slice (0, 1) poisons row 3; with the global max and the bias on, the max of the
    slice and so every row of it; never another slice."""
    q, k, v = make_qkv(1, 2, n, n, 16, 16, torch.float32)
    q[0, 1, 3, 5] = math.nan
    out = vk.tar_attention(q, k, v, max_mode=max_mode, strength=strength, backend=backend)
    expected = torch.zeros(1, 2, n, dtype=torch.bool)
    expected[0, 1, 3] = True
    if whole_slice:
        expected[0, 1] = True
    assert torch.equal(nonfinite_rows(out), expected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,max_mode", [(math.nan, "row"), (math.inf, "global"), (-math.inf, "global")])
def test_delta_entry_masked_by_causal_takes_no_part(backend, n, bad, max_mode):
    q, k, v = make_qkv(1, 1, n, n, 16, 16, torch.float32)
    delta = torch.rand(n, n, generator=torch.Generator().manual_seed(3))
    clean = vk.tar_attention(q, k, v, delta=delta, causal=True, max_mode=max_mode, backend=backend)
    delta[2, 5] = bad  # above the diagonal: masked
    out = vk.tar_attention(q, k, v, delta=delta, causal=True, max_mode=max_mode, backend=backend)
    assert torch.equal(out, clean)
    torch.testing.assert_close(out.double(), reference64(q, k, v, delta=delta, causal=True, max_mode=max_mode),
                               atol=2e-5, rtol=2e-5)


def _grads(q, k, v, **kwargs):
    """dq, dk, dv of tar_attention(q, k, v, **kwargs) for a fixed random grad_out."""
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    out = vk.tar_attention(q, k, v, **kwargs)
    return torch.autograd.grad(out, (q, k, v), torch.randn(out.shape, generator=torch.Generator().manual_seed(9)))


def _key_mask(n, dropped=5):
    mask = torch.ones(1, n, dtype=torch.bool)
    mask[0, dropped] = False
    return mask


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("bad,masked_by", [(math.nan, "causal"), (math.inf, "causal"), (math.nan, "key_mask"),
                                           (-math.inf, "key_mask")])
def test_delta_entry_masked_takes_no_part_in_the_gradients(backend, n, bad, masked_by):
    """The forward's rule for the backward: the gradients of the clean call, bit for bit (the reference's were
    NaN: the max's gradient summed 0 * inf over the masked entries)."""
    q, k, v = make_qkv(1, 1, n, n, 16, 16, torch.float32)
    delta = torch.rand(n, n, generator=torch.Generator().manual_seed(3))
    kwargs = dict(causal=True) if masked_by == "causal" else dict(key_mask=_key_mask(n))
    clean = _grads(q, k, v, delta=delta, backend=backend, **kwargs)
    delta[2, 5] = bad  # above the diagonal, and in the masked key's column
    for got, expected in zip(_grads(q, k, v, delta=delta, backend=backend, **kwargs), clean):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("strength", [1.0, -1.0])
def test_infinite_delta_entry_of_weight_0_gives_finite_gradients(backend, n, strength):
    """Where strength * m[i] * delta = -inf (a -inf entry with strength * m[i] > 0, a +inf one with it < 0) the key
    has weight 0 in the gradients too: those of a -+1e30 entry (they were NaN: 0 * inf in the max's gradient)."""
    q, k, v = make_qkv(1, 2, n, n, 16, 16, torch.float32)
    assert (torch.matmul(q[0, :, 5], k[0].transpose(-1, -2)).amax(-1) > 0).all()  # row 5's max, both heads
    delta = torch.rand(n, n, generator=torch.Generator().manual_seed(3))
    delta[5, 2] = -strength * 1e30
    finite = _grads(q, k, v, delta=delta, strength=strength, backend=backend)
    delta[5, 2] = -strength * math.inf
    for got, expected in zip(_grads(q, k, v, delta=delta, strength=strength, backend=backend), finite):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("shape", [(), (4, 1), (1, 4)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_broadcast_16_bit_delta_has_its_gradient_summed_in_float32(backend, shape, dtype):
    """Scores near 5e4 (m[i] * delta of the same size), their differences small: a scalar or per-row 16-bit delta's
    gradient, the sum of every entry's share, came back NaN (each share rounded to 16 bits, then summed). It is the
    float32 delta's gradient, rounded once."""
    q, k, v, grad_out = make_qkv(1, 1, 4, 4, 4, 4, torch.float32, seed=1) + (None,)
    q, k = torch.full_like(q, 100.0), 125.0 + 0.01 * k
    q, k, v = (t.to(dtype) for t in (q, k, v))
    grad_out = torch.randn(v.shape, generator=torch.Generator().manual_seed(2)).to(v)
    grads = {}
    for delta_dtype in (dtype, torch.float32):
        delta = torch.full(shape, 0.5, dtype=delta_dtype, device=q.device, requires_grad=True)
        out = vk.tar_attention(q, k, v, delta=delta, strength=-3.5, scale=1.0, backend=backend)
        (grads[delta_dtype],) = torch.autograd.grad(out, delta, grad_out)
    assert grads[dtype].dtype == dtype and not grads[dtype].isnan().any()
    if shape != (1, 4):  # a per-row delta's exact gradient is 0 (it shifts a row); a per-key one's is m[i]-sized
        assert torch.isfinite(grads[dtype]).all()
    assert torch.equal(grads[dtype], grads[torch.float32].to(dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
def test_nan_in_a_masked_key_takes_no_part_in_the_gradients(backend, n):
    """A key key_mask drops is ignored in the backward too: the clean call's gradients (the reference's dq was
    NaN: dS @ K took 0 * NaN)."""
    q, k, v = make_qkv(1, 2, n, n, 16, 16, torch.float32)
    kwargs = dict(key_mask=_key_mask(n), frames=vk.frame_ids(2, n // 2), backend=backend)
    clean = _grads(q, k, v, **kwargs)
    k[0, :, 5] = math.nan
    for got, expected in zip(_grads(q, k, v, **kwargs), clean):
        assert torch.equal(got, expected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", GRAD_BACKENDS)
@pytest.mark.parametrize("max_mode", ["row", "global"])
@pytest.mark.parametrize("causal", [False, True])
def test_a_nonfinite_first_key_of_a_sequence_without_keys_takes_no_part(backend, n, max_mode, causal):
    """A row with no key (every key masked, or every key before it under causal) has zero gradients whatever the
    masked keys hold; the Triton dQ pass read the max's key of such a row, key 0, and took 0 * NaN. A NaN and an
    inf key, each against the one clean call (the Triton backward in the interpreter is this test's time: one head,
    as a row's keys are its own head's, and two sequences, the one without keys and one with)."""
    q, k, v = make_qkv(2, 1, n, n, 16, 16, torch.float32)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, :n // 2 if causal else n] = False  # causal: the first half of the rows of sequence 0 see no key
    kwargs = dict(key_mask=mask, max_mode=max_mode, causal=causal, sigma=1.5, backend=backend)
    clean = _grads(q, k, v, **kwargs)
    for bad in (math.nan, math.inf):
        k[0, :, 0] = bad
        for got, expected in zip(_grads(q, k, v, **kwargs), clean):
            assert torch.equal(got, expected), f"key 0 = {bad}"


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_unmasked_nan_delta_entry_poisons_its_row(backend, n, max_mode):
    q, k, v = make_qkv(1, 2, n, n, 16, 16, torch.float32)  # one delta for both heads
    delta = torch.rand(n, n, generator=torch.Generator().manual_seed(3))
    delta[5, 2] = math.nan
    out = vk.tar_attention(q, k, v, delta=delta, causal=True, max_mode=max_mode, backend=backend)
    expected = torch.zeros(1, 2, n, dtype=torch.bool)
    expected[:, :, 5] = True
    assert torch.equal(nonfinite_rows(out), expected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_nan_in_k_poisons_the_rows_that_attend_to_it(backend, n, max_mode):
    """Causal: key 5 is seen by rows >= 5 only (with the global max, through it, by its whole slice)."""
    q, k, v = make_qkv(2, 1, n, n, 16, 16, torch.float32)
    k[1, 0, 5, 0] = math.nan
    out = vk.tar_attention(q, k, v, causal=True, max_mode=max_mode, backend=backend)
    expected = torch.zeros(2, 1, n, dtype=torch.bool)
    expected[1, 0, 0 if max_mode == "global" else 5:] = True
    assert torch.equal(nonfinite_rows(out), expected)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,causal", [(math.nan, False), (math.inf, True)])
def test_nonfinite_v_stays_in_its_slice(backend, n, bad, causal):
    """A NaN/inf in v (key 5, column 2 of slice (1, 0)) makes column 2 non-finite in every row attending to
    key 5, possibly in other rows of its slice, and in nothing else."""
    q, k, v = make_qkv(2, 1, n, n, 16, 16, torch.float32)
    v[1, 0, 5, 2] = bad
    out = vk.tar_attention(q, k, v, causal=causal, backend=backend)
    bad_entries = ~torch.isfinite(out)
    assert bad_entries[1, 0, 5:, 2].all()
    bad_entries[1, 0, :, 2] = False
    assert not bad_entries.any()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_nonfinite_v_stays_in_its_slice_in_16_bit(dtype):
    q, k, v = make_qkv(2, 1, 8, 8, 16, 16, dtype)
    v[1, 0, 5, 2] = math.nan
    bad_entries = ~torch.isfinite(vk.tar_attention(q, k, v, backend="triton"))
    assert bad_entries[1, 0, :, 2].all()
    bad_entries[1, 0, :, 2] = False
    assert not bad_entries.any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_no_queries(backend, max_mode):
    q = torch.randn(2, 3, 0, 8)
    k = v = torch.randn(2, 3, 5, 8)
    assert vk.tar_attention(q, k, v, max_mode=max_mode, backend=backend).shape == (2, 3, 0, 8)


EMPTY_SHAPES = [(2, 3, 0, 5), (0, 3, 4, 5), (2, 0, 4, 5)]  # (B, H, Nq, Nk): no query, no batch, no head
EMPTY_OPTIONS = [{}, dict(max_mode="global", causal=True), dict(delta="tokens"), dict(frames=True),
                 dict(frames=True, delta="frames"), dict(key_mask=True, sigma=3.0)]


@pytest.mark.parametrize("backend", ["auto", *BACKENDS])
@pytest.mark.parametrize("options", EMPTY_OPTIONS, ids=opts_id)
@pytest.mark.parametrize("shape", EMPTY_SHAPES, ids=lambda s: "B{}H{}Nq{}Nk{}".format(*s))
def test_empty_problem_backward(backend, shape, options):
    """With no query or no (batch, head) slice there are no scores: the output is empty, dq is empty
    and dk, dv and ddelta are zeros of their shapes, on every backend (the default CPU one included)."""
    B, H, nq, nk = shape
    q, k, v = (t.requires_grad_() for t in make_qkv(B, H, nq, nk, 8, 6, torch.float32))
    kwargs = dict(options)
    if kwargs.get("frames"):
        kwargs["frames"] = (torch.zeros(nq, dtype=torch.int64), torch.arange(nk) % 2)
    if "delta" in kwargs:
        kwargs["delta"] = torch.rand((2, 2) if kwargs["delta"] == "frames" else (nq, nk), requires_grad=True)
    if kwargs.get("key_mask"):
        kwargs["key_mask"] = torch.ones(B, nk, dtype=torch.bool)
    out = vk.tar_attention(q, k, v, backend=backend, **kwargs)
    assert out.shape == (B, H, nq, 6)
    grads = torch.autograd.grad(out.sum(), [q, k, v] + ([kwargs["delta"]] if "delta" in kwargs else []))
    assert grads[0].shape == q.shape
    for g, t in zip(grads[1:], [k, v] + ([kwargs["delta"]] if "delta" in kwargs else [])):
        assert torch.equal(g, torch.zeros_like(t))


TINY_SIGMAS = [1e-3, 1e-20, 1e-170, 5e-324]


@pytest.mark.parametrize("sigma", TINY_SIGMAS + [0.3, 1.0, 7.5, 1e30, math.inf])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_gaussian_is_the_float64_definition_rounded_once(sigma, dtype):
    n = 40
    d = torch.arange(n, dtype=torch.float64)
    exact = torch.exp(-0.5 * ((d[None, :] - d[:, None]) / sigma) ** 2)
    assert torch.equal(vk.gaussian_toeplitz(n, sigma, dtype=dtype), exact.to(dtype))
    if sigma < 1e-2:
        assert torch.equal(vk.gaussian_toeplitz(n, sigma, dtype=dtype), torch.eye(n, dtype=dtype))


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sigma", TINY_SIGMAS)
def test_tiny_sigma_is_the_identity(backend, n, sigma):
    """exp(-0.5 ((j - i) / sigma)^2) for a tiny sigma: 1 on the diagonal, 0 off it (a delta function)."""
    q, k, v = make_qkv(1, 1, n, n, 16, 16, torch.float32)
    out = vk.tar_attention(q, k, v, sigma=sigma, max_mode="global", backend=backend)
    assert torch.equal(out, vk.tar_attention(q, k, v, delta=torch.eye(n), max_mode="global", backend=backend))
    torch.testing.assert_close(out.double(), reference64(q, k, v, delta=torch.eye(n), max_mode="global"),
                               atol=2e-5, rtol=2e-5)


def test_float64_input_takes_factors_beyond_float32():
    q, k, v = (t.double() for t in make_qkv(1, 1, 6, 6, 4, 4, torch.float32))
    out = vk.tar_attention(q, k, v, strength=1e-39, scale=1e39)
    assert torch.isfinite(out).all()
    with pytest.raises(ValueError, match="strength must be finite"):
        vk.tar_attention(q.float(), k.float(), v.float(), strength=1e39)


def test_gaussian_toeplitz_arguments():
    assert torch.equal(vk.gaussian_toeplitz(np.int64(5), np.float32(2.0)), vk.gaussian_toeplitz(5, 2.0))
    for bad in (-1, 2.0, True, "3"):
        with pytest.raises(ValueError, match="n must be a non-negative int"):
            vk.gaussian_toeplitz(bad, 1.0)
    for dtype in (torch.int64, torch.bool, "float32"):
        with pytest.raises(TypeError, match="dtype must be a floating-point torch.dtype"):
            vk.gaussian_toeplitz(4, 1.0, dtype=dtype)
    # a device torch does not know, or not a device: named (torch's own errors named no argument)
    for bad, exc, match in (("cpux", ValueError, "device 'cpux' is not a device torch knows"),
                            (-1, ValueError, "device -1 is not a device index torch takes here"),
                            (2 ** 70, ValueError, "device 1180591620717411303424 is not a device index torch takes"),
                            (1.5, TypeError, "device must be a torch.device, a device name or index, or None, got "
                                             "float")):
        with pytest.raises(exc, match=match):
            vk.gaussian_toeplitz(4, 1.0, device=bad)
    assert vk.gaussian_toeplitz(4, 1.0, device="cpu").device == torch.device("cpu")


@pytest.mark.parametrize("slices", [3, 8])  # chunks of heads of one batch, of whole batches
@pytest.mark.parametrize("delta_shape", [(8, 12), (1, 4, 8, 12), (6, 1, 8, 12)])
def test_reference_reads_a_broadcast_delta_in_place(monkeypatch, delta_shape, slices):
    """A (Nq, Nk), per-head or per-batch delta is never copied to (B, H, Nq, Nk): no op makes a storage
    larger than one chunk of scores or the output."""
    B, H, nq, nk = 6, 4, 8, 12
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", slices * nq * nk)
    q, k, v = make_qkv(B, H, nq, nk, 2, 2, torch.float32)
    delta = torch.rand(delta_shape)
    with LargestAllocation() as mode:
        out = vk.tar_attention_reference(q, k, v, delta=delta, causal=True)
    assert mode.largest <= 4 * max(slices * nq * nk, out.numel())
    torch.testing.assert_close(out.double(), reference64(q, k, v, delta=delta, causal=True), atol=2e-6, rtol=2e-6)
