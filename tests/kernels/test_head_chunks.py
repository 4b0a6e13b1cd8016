"""Head dims that are not powers of two, held by the forward kernels as two power-of-two column chunks
(layout.head_chunks: 80 = 64 + 16) instead of padded to the next power of two (the backward keeps one
block: launch.common_meta): the split itself, and the kernels through every layout with the chunks on
one side only (D two chunks, Dv one, and the other way round), strided storage, frame ids and the
speculative one pass, against the float64 reference and, for the one pass, bit for bit against the
two passes."""

import math

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels.ops.layout import DOT_MIN, block_dims, head_chunks, pow2

from .._device import DEVICE
from ..helpers import DTYPES, assert_close_to_reference, assert_grads_close, dtype_id, make_qkv, reference64, \
    reference_grads, shape_id


@pytest.mark.parametrize("d,chunks", [(8, (16, 0)), (16, (16, 0)), (24, (32, 0)), (40, (32, 16)), (48, (32, 16)),
                                      (64, (64, 0)), (72, (64, 16)), (80, (64, 16)), (96, (64, 32)),
                                      (112, (128, 0)), (160, (128, 32)), (192, (128, 64)), (256, (256, 0))])
def test_head_chunks(d, chunks):
    assert head_chunks(d) == chunks


def test_head_chunks_cover_and_never_widen():
    """Every head dim 1..512: each chunk a power of two of at least DOT_MIN, together at least d and
    at most the one power of two, and strictly narrower when split (a split that saves nothing is not made)."""
    for d in range(1, 513):
        first, second = head_chunks(d)
        assert first == pow2(first) and first >= DOT_MIN, d
        assert second == 0 or (second == pow2(second) and second >= DOT_MIN and second < first), d
        assert d <= first + second <= pow2(d, DOT_MIN), d
        assert second == 0 or first + second < pow2(d, DOT_MIN), d
        assert block_dims(d, d) == (first + second, first + second)


def test_forward_chunks_and_backward_holds_one_block():
    """The forward's launches take the chunks; the backward's one power-of-two block a head dim."""
    from vstar_kernels._problem import make_problem
    from vstar_kernels.ops.launch import common_meta

    q = torch.empty(1, 2, 40, 80, device="meta")
    v = torch.empty(1, 2, 40, 40, device="meta")
    problem = make_problem(q, q, v, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    forward, backward = common_meta(problem), common_meta(problem, chunked=False)
    assert (forward["BLOCK_D"], forward["BLOCK_D2"], forward["BLOCK_DV"], forward["BLOCK_DV2"]) == (64, 16, 32, 16)
    assert (backward["BLOCK_D"], backward["BLOCK_DV"]) == (128, 64)
    assert "BLOCK_D2" not in backward and "BLOCK_DV2" not in backward
    assert {k: v for k, v in forward.items() if not k.startswith("BLOCK")} == \
        {k: v for k, v in backward.items() if not k.startswith("BLOCK")}


# (B, H, Nq, Nk, D, Dv): packed (N <= 128) then tiled; each has one side split and the other not, or both
SHAPES = [
    (2, 2, 20, 20, 64, 96),      # packed: Dv 64 + 32
    (2, 1, 17, 24, 80, 48),      # packed: D 64 + 16, Dv 32 + 16
    (1, 1, 140, 130, 96, 64),    # tiled: D 64 + 32
    (1, 1, 130, 150, 32, 72),    # tiled: Dv 64 + 16
]


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES, ids=shape_id)
def test_forward_and_backward(shape, dtype):
    q, k, v = make_qkv(*shape, dtype, layout="sliced")
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    opts = dict(sigma=2.0, strength=1.5)
    out = vk.tar_attention(*leaves, backend="triton", **opts)
    assert_close_to_reference(out.detach().cpu(), reference64(q, k, v, **opts), dtype)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert_grads_close([g.cpu() for g in grads], reference_grads(q, k, v, grad_out, **opts), dtype)


@pytest.mark.parametrize("max_mode,causal", [("row", False), ("global", True)])
def test_frames_and_modes(max_mode, causal):
    """Frame ids with text (the tiled kernels at any length), the global max and causal, at D 80 (one head: the
    head dim's chunks are each program's)."""
    frames = vk.frame_ids(6, 20, text_after=9, device=DEVICE)
    n = frames.numel()
    q, k, v = make_qkv(1, 1, n, n, 80, 80, torch.float16, seed=3)
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    opts = dict(sigma=1.5, strength=0.8, frames=frames, max_mode=max_mode, causal=causal)
    out = vk.tar_attention(*leaves, backend="triton", **opts)
    ref_opts = dict(opts, frames=frames.cpu())
    ref = vk.tar_attention_reference(*(t.double().cpu() for t in (q, k, v)), **ref_opts)
    assert_close_to_reference(out.detach().cpu(), ref, torch.float16)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE, torch.float16)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert_grads_close([g.cpu() for g in grads], reference_grads(q, k, v, grad_out, **ref_opts), torch.float16)


@pytest.mark.usefixtures("same_tiles")  # tests/kernels/conftest.py
def test_speculative_bit_for_bit():
    """The one pass at D 80 with a row max planted in a far frame (rows flagged and redone, gathered
    from several query blocks): output and saved statistics the two passes' bit for bit. One head: the head dim's
    chunks are each program's (the redo's per-head indexing: tests/kernels/test_speculative.py)."""
    from vstar_kernels._problem import make_problem
    from vstar_kernels.ops.layout import STATS_FIELDS
    from vstar_kernels.ops.tar_fwd import tar_forward

    frames = vk.frame_ids(8, 24, text_before=7, device=DEVICE)
    n = frames.numel()
    q, k, v = make_qkv(1, 1, n, n, 80, 80, torch.bfloat16, seed=5)
    q[..., :, 70] = 3
    k[..., n - 1, :] = 0
    k[..., n - 1, 70] = 8   # every row's max in the last key, a far frame for most blocks
    results = []
    for speculate in (False, True):
        problem = make_problem(q, k, v, sigma=2.0, strength=0.7, delta=None, causal=False, max_mode="row",
                               scale=None, frames=frames)
        stats = torch.full((1, n, STATS_FIELDS), math.nan, device=DEVICE)
        flags = torch.zeros(1, dtype=torch.int32, device=DEVICE) if speculate else None
        results.append((tar_forward(problem, stats=stats, flags=flags), stats, flags))
    (out2, stats2, _), (out1, stats1, flags) = results
    assert int(flags.sum()) > 0, "no row was flagged: the redo did not run"
    torch.testing.assert_close(out1, out2, rtol=0, atol=0)
    torch.testing.assert_close(stats1, stats2, rtol=0, atol=0)
    ref = vk.tar_attention_reference(*(t.double().cpu() for t in (q, k, v)), sigma=2.0, strength=0.7,
                                     frames=frames.cpu())
    assert_close_to_reference(out1.cpu(), ref, torch.bfloat16)
