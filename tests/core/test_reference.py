"""The reference path against an independent float64 evaluation, and the exact invariants."""

import math

import pytest
import torch
import torch.nn.functional as F

import vstar_kernels as vk
from vstar_kernels import reference

from ..helpers import PeakLive, make_delta, naive_tar, opts_id, shape_id

OPTIONS = [
    dict(),
    dict(sigma=2.5, strength=0.7),
    dict(causal=True),
    dict(max_mode="global"),
    dict(max_mode="global", causal=True, strength=-1.3),
    dict(scale=0.31),
]


@pytest.mark.parametrize("opts", OPTIONS, ids=opts_id)
@pytest.mark.parametrize("shape", [(2, 3, 7, 9, 8, 5), (1, 2, 16, 16, 40, 40), (2, 1, 1, 4, 8, 8)], ids=shape_id)
def test_reference_matches_semantics(shape, opts):
    B, H, nq, nk, d, dv = shape
    g = torch.Generator().manual_seed(1)
    q = torch.randn(B, H, nq, d, generator=g, dtype=torch.float64)
    k = torch.randn(B, H, nk, d, generator=g, dtype=torch.float64)
    v = torch.randn(B, H, nk, dv, generator=g, dtype=torch.float64)
    out = vk.tar_attention_reference(q, k, v, **opts)
    torch.testing.assert_close(out, naive_tar(q, k, v, **opts), atol=1e-12, rtol=1e-12)


def test_reference_custom_delta_broadcast():
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 6, 8, generator=g, dtype=torch.float64) for _ in range(3))
    delta = torch.rand(3, 6, 6, generator=g, dtype=torch.float64)
    out = vk.tar_attention_reference(q, k, v, delta=delta, sigma=123.0)  # sigma ignored with delta
    torch.testing.assert_close(out, naive_tar(q, k, v, delta=delta), atol=1e-12, rtol=1e-12)


def test_reference_computes_fp16_in_fp32():
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 12, 16, generator=g) for _ in range(3))
    out16 = vk.tar_attention_reference(q.half(), k.half(), v.half())
    out32 = vk.tar_attention_reference(q.half().float(), k.half().float(), v.half().float())
    assert out16.dtype == torch.float16
    torch.testing.assert_close(out16, out32.half(), atol=0, rtol=0)


def test_reference_chunks_give_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(5, 3, 10, 8, generator=g) for _ in range(3))
    whole = vk.tar_attention_reference(q, k, v, max_mode="global")
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 10 * 10)  # 2 slices per chunk
    chunked = vk.tar_attention_reference(q, k, v, max_mode="global")
    torch.testing.assert_close(chunked, whole, atol=0, rtol=0)


def test_three_d_input_means_one_head():
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(3, 9, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out = vk.tar_attention_reference(q, k, v, sigma=1.5)
    assert out.shape == (3, 9, 8)
    ref = naive_tar(q[:, None], k[:, None], v[:, None], sigma=1.5)[:, 0]
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_plain_attention_invariants(causal, max_mode):
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 3, 11, 16, generator=g, dtype=torch.float64) for _ in range(3))
    sdpa = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    for kwargs in (dict(strength=0.0), dict(sigma=math.inf)):
        out = vk.tar_attention_reference(q, k, v, causal=causal, max_mode=max_mode, **kwargs)
        torch.testing.assert_close(out, sdpa, atol=1e-12, rtol=1e-12)


def test_regularization_changes_the_output():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(1, 2, 16, 16, generator=g) for _ in range(3))
    plain = vk.tar_attention_reference(q, k, v, strength=0.0)
    assert (vk.tar_attention_reference(q, k, v, sigma=1.0) - plain).abs().max() > 1e-2


def test_gaussian_toeplitz():
    m = vk.gaussian_toeplitz(5, 2.0)
    assert m.shape == (5, 5) and m.dtype == torch.float32
    expected = torch.tensor([[math.exp(-0.5 * ((j - i) / 2.0) ** 2) for j in range(5)] for i in range(5)])
    torch.testing.assert_close(m, expected)
    assert torch.equal(m, m.T) and torch.all(m.diagonal() == 1)
    assert torch.equal(vk.gaussian_toeplitz(4, math.inf, dtype=torch.float64), torch.ones(4, 4, dtype=torch.float64))
    assert vk.gaussian_toeplitz(0, 1.0).shape == (0, 0)


@pytest.mark.parametrize("bad", [0, -1.0, float("nan")])
def test_gaussian_toeplitz_rejects_bad_sigma(bad):
    with pytest.raises(ValueError, match="sigma"):
        vk.gaussian_toeplitz(4, bad)


def test_reference_is_differentiable():
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    assert torch.autograd.gradcheck(lambda a, b, c: vk.tar_attention_reference(a, b, c, sigma=1.3), (q, k, v))


CHUNKED = [dict(), dict(causal=True, max_mode="global"), dict(delta="b_1_nq_nk"), dict(delta="frames"),
           dict(key_mask=True, frames=True), dict(max_mode="global", strength=-0.7, delta="strided")]


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("opts", CHUNKED, ids=opts_id)
@pytest.mark.parametrize("slices", [1, 3, 4, 8])  # chunks of heads of one batch, of one batch, of two
def test_backward_over_several_chunks_is_the_backward_of_one(monkeypatch, opts, slices, backend):
    """Slices in several chunks take a backward per chunk (one vjp of the whole forward kept every chunk's
    scores): the same gradients as with every slice in one chunk, delta's included."""
    B, H, n = 3, 4, 12
    g = torch.Generator().manual_seed(8)
    q, k, v = (torch.randn(B, H, n, 8, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kwargs = dict(opts)
    if kwargs.get("frames") or kwargs.get("delta") == "frames":
        kwargs["frames"] = vk.frame_ids(3, 4)
    if kwargs.pop("key_mask", False):
        kwargs["key_mask"] = torch.rand(B, n, generator=g) > 0.3
    kind = kwargs.pop("delta", None)
    if kind == "frames":
        kwargs["delta"] = torch.rand(3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    elif kind is not None:
        kwargs["delta"] = make_delta(kind, B, H, n, n, dtype=torch.float64, device="cpu").requires_grad_()
    inputs = (q, k, v) + ((kwargs["delta"],) if kind else ())
    grad_out = torch.randn(B, H, n, 8, generator=g, dtype=torch.float64)
    whole = torch.autograd.grad(vk.tar_attention(q, k, v, backend=backend, **kwargs), inputs, grad_out)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", slices * n * n)
    assert len(reference._plan(B, H, n, n, reference.CHUNK_ELEMENTS)[1]) > 1
    chunked = torch.autograd.grad(vk.tar_attention(q, k, v, backend=backend, **kwargs), inputs, grad_out)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-13, rtol=1e-13)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_backward_memory_does_not_grow_with_the_chunks(monkeypatch, backend):
    """A slice per chunk: the backward's peak grows by the gradients of each added slice (and their copy into
    one tensor), not by its scores (it grew by three slices of scores per slice)."""
    n, d = 128, 8
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", n * n)

    def peak(batch):
        q, k, v = (torch.randn(batch, 4, n, d, requires_grad=True) for _ in range(3))
        out = vk.tar_attention(q, k, v, frames=vk.frame_ids(4, n // 4), backend=backend)
        with PeakLive() as mode:
            torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
        return mode.peak

    per_slice = (peak(4) - peak(1)) / (3 * 4)
    assert per_slice < n * n * 4  # one slice's float32 scores: 64 KiB (the gradients, 12 KiB, go in at most 3 times)
