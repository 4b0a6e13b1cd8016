"""Frame ids (`frames=`) and key masks (`key_mask=`): the reference and the op against a float64
evaluation written here, the invariants, memory bounds, gradients, validation, dispatch and torch.compile."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.library import opcheck

import vstar_kernels as vk
from vstar_kernels import cpu, dispatch, reference
from vstar_kernels._problem import make_problem

from ..helpers import TOLERANCES, LargestAllocation, ValueReads, opts_id

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)


def naive_frames(q, k, v, fq, fk, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row",
                 scale=None, key_mask=None):
    """docs/semantics.md with frame ids and a key mask, in float64, for 4-D inputs; the Gaussian from
    math.exp over the distinct frame distances. Written without the library's code."""
    q, k, v = q.double(), k.double(), v.double()
    nq, nk = q.shape[2], k.shape[2]
    fq, fk = fq.tolist(), fk.tolist()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = scale * q @ k.transpose(-1, -2)
    drop = torch.zeros(q.shape[0], 1, nq, nk, dtype=torch.bool)
    if causal:
        drop |= torch.tensor([[j > i for j in range(nk)] for i in range(nq)])
    if key_mask is not None:
        drop |= ~key_mask[:, None, None, :]
    s = s.masked_fill(drop, -math.inf)
    m = s.amax(dim=-1, keepdim=True) if max_mode == "row" else s.amax(dim=(-2, -1), keepdim=True)
    if delta is None:
        span = max(fq + fk) + 1
        gauss = torch.tensor([math.exp(-0.5 * (d / sigma) ** 2) for d in range(-span, span + 1)], dtype=torch.float64)
        table = lambda a, b: gauss[b - a + span]  # noqa: E731
    else:
        table = lambda a, b: delta.double()[a, b]  # noqa: E731
    da = torch.zeros(nq, nk, dtype=torch.float64)
    for i, a in enumerate(fq):
        if a >= 0:
            for j, b in enumerate(fk):
                if b >= 0:
                    da[i, j] = table(a, b)
    s = (s + strength * m * da).masked_fill(drop, -math.inf)
    p = torch.softmax(s, dim=-1).masked_fill(drop.all(dim=-1, keepdim=True), 0.0)
    return p @ v


def randn(*shape, seed, dtype=torch.float64, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=dtype).requires_grad_(requires_grad)


def qkv(B, H, nq, nk, d=4, *, seed=0, dtype=torch.float64, requires_grad=False):
    return tuple(randn(B, H, n, d, seed=seed + i, dtype=dtype, requires_grad=requires_grad)
                 for i, n in enumerate((nq, nk, nk)))


def random_key_mask(B, nk, seed):
    """A random (B, Nk) mask that keeps at least one key of each batch."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, nk, generator=g) < 0.7
    mask[:, torch.randint(nk, (1,), generator=g)] = True
    return mask


# ---------------------------------------------------------------------------------------------- frame_ids


def test_frame_ids_layouts():
    assert vk.frame_ids(3, 2).tolist() == [0, 0, 1, 1, 2, 2]
    assert vk.frame_ids(2, 3, text_before=2).tolist() == [-1, -1, 0, 0, 0, 1, 1, 1]
    assert vk.frame_ids(2, 1, text_after=3).tolist() == [0, 1, -1, -1, -1]
    ids = vk.frame_ids(21, 1560, text_before=226, text_after=7, device="cpu")
    assert ids.dtype == torch.int32 and ids.shape == (226 + 21 * 1560 + 7,)
    assert (ids[226:-7].view(21, 1560) == torch.arange(21, dtype=torch.int32)[:, None]).all()
    assert vk.frame_ids(0, 5, text_before=1).tolist() == [-1]


@pytest.mark.parametrize("name,bad", [("num_frames", -1), ("tokens_per_frame", 2.0), ("text_before", True),
                                      ("text_after", "3")])
def test_frame_ids_arguments(name, bad):
    args = {"num_frames": 2, "tokens_per_frame": 3, name: bad}
    with pytest.raises(ValueError, match=f"{name} must be a non-negative int"):
        vk.frame_ids(args.pop("num_frames"), args.pop("tokens_per_frame"), **args)


def test_frame_ids_device_is_named():
    """A device torch does not know, or not a device at all, raised torch's own error, which names no argument."""
    with pytest.raises(ValueError, match="device 'cuda:x' is not a device torch knows"):
        vk.frame_ids(2, 3, device="cuda:x")
    with pytest.raises(ValueError, match="device 'gpu' is not a device torch knows"):
        vk.FrameLayout(2, 3).ids("gpu")
    with pytest.raises(TypeError, match="device must be a torch.device, a device name or index, or None, got list"):
        vk.frame_ids(2, 3, device=["cpu"])
    assert vk.frame_ids(2, 3, device=torch.device("cpu")).tolist() == [0, 0, 0, 1, 1, 1]


# ------------------------------------------------------------------------ the definition, over layouts

LAYOUTS = st.fixed_dictionaries(dict(
    text_before=st.integers(0, 9), num_frames=st.integers(1, 9), tokens_per_frame=st.integers(1, 40),
    text_after=st.integers(0, 9), registers=st.integers(0, 4), causal=st.booleans(),
    max_mode=st.sampled_from(["row", "global"]), sigma=st.sampled_from([0.4, 1.0, 3.0, math.inf]),
    strength=st.sampled_from([1.0, -0.7, 2.5]), delta=st.booleans(), key_mask=st.booleans(),
    seed=st.integers(0, 2 ** 16)))


def layout_ids(layout):
    """frame_ids of the layout with `registers` -1 tokens inserted in the middle of the video."""
    ids = vk.frame_ids(layout["num_frames"], layout["tokens_per_frame"], text_before=layout["text_before"],
                       text_after=layout["text_after"])
    at = layout["text_before"] + layout["num_frames"] * layout["tokens_per_frame"] // 2
    return torch.cat([ids[:at], torch.full((layout["registers"],), -1, dtype=torch.int32), ids[at:]])


@settings(max_examples=20, deadline=None)
@given(LAYOUTS)
def test_reference_and_op_match_the_definition_over_layouts(layout):
    ids = layout_ids(layout)
    n, seed = ids.numel(), layout["seed"]
    q, k, v = qkv(2, 2, n, n, seed=seed)
    opts = dict(sigma=layout["sigma"], strength=layout["strength"], causal=layout["causal"],
                max_mode=layout["max_mode"])
    if layout["delta"]:
        opts["delta"] = torch.rand(layout["num_frames"], layout["num_frames"],
                                   generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if layout["key_mask"]:
        opts["key_mask"] = random_key_mask(2, n, seed)
    expected = naive_frames(q, k, v, ids, ids, **opts)
    out = vk.tar_attention_reference(q, k, v, frames=ids, **opts)
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    opts32 = {key: val.float() if torch.is_tensor(val) and val.is_floating_point() else val
              for key, val in opts.items()}
    out32 = vk.tar_attention(q.float(), k.float(), v.float(), frames=ids.long(), **opts32)
    torch.testing.assert_close(out32.double(), expected, atol=TOLERANCES[torch.float32][0],
                               rtol=TOLERANCES[torch.float32][1])


@pytest.mark.parametrize("opts", [dict(), dict(causal=True), dict(max_mode="global", sigma=2.0)], ids=opts_id)
def test_pair_of_ids_for_queries_and_keys(opts):
    """Queries of frames 1-2 and a text token against keys of a text prefix and frames 0-3."""
    fk = vk.frame_ids(4, 3, text_before=2)
    fq = torch.tensor([1, 1, 1, 2, 2, -1, 2])
    q = randn(2, 3, 7, 8, seed=1)
    k, v = randn(2, 3, 14, 8, seed=2), randn(2, 3, 14, 5, seed=3)
    key_mask = random_key_mask(2, 14, seed=4)
    out = vk.tar_attention(q, k, v, frames=(fq, fk), key_mask=key_mask, **opts)
    torch.testing.assert_close(out, naive_frames(q, k, v, fq, fk, key_mask=key_mask, **opts), atol=1e-12, rtol=1e-12)


def test_three_d_input_with_frames_and_key_mask():
    ids = vk.frame_ids(3, 2, text_after=2)
    q, k, v = (randn(2, 8, 4, seed=s) for s in range(3))
    key_mask = random_key_mask(2, 8, seed=5)
    out = vk.tar_attention(q, k, v, frames=ids, key_mask=key_mask, sigma=0.8)
    assert out.shape == (2, 8, 4)
    expected = naive_frames(q[:, None], k[:, None], v[:, None], ids, ids, key_mask=key_mask, sigma=0.8)[:, 0]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_half_precision_inputs(dtype):
    ids = vk.frame_ids(3, 5, text_before=4)
    q, k, v = qkv(2, 2, 19, 19, d=16, seed=32, dtype=torch.float32)
    q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
    key_mask = random_key_mask(2, 19, seed=33)
    out = vk.tar_attention(q, k, v, frames=ids, key_mask=key_mask, sigma=1.2, causal=True)
    assert out.dtype == dtype
    expected = naive_frames(q, k, v, ids, ids, key_mask=key_mask, sigma=1.2, causal=True)
    torch.testing.assert_close(out.double(), expected, atol=TOLERANCES[dtype][0], rtol=TOLERANCES[dtype][1])


def test_every_id_dtype_gives_the_same_result():
    """Far-apart ids whose differences overflow int8 (127 - (-1) ... ) are subtracted in int64."""
    ids = torch.tensor([-1, 0, 0, 60, 127, 127, -1, 90])
    q, k, v = qkv(1, 2, 8, 8, seed=34)
    outs = [vk.tar_attention(q, k, v, frames=ids.to(dtype), sigma=40.0) for dtype in
            (torch.int8, torch.int16, torch.int32, torch.int64)]
    assert all(torch.equal(out, outs[0]) for out in outs)
    torch.testing.assert_close(outs[0], naive_frames(q, k, v, ids, ids, sigma=40.0), atol=1e-12, rtol=1e-12)


# ----------------------------------------------------------------------------------------- invariants

EXACT_OPTIONS = [dict(), dict(causal=True), dict(max_mode="global", causal=True), dict(sigma=0.3, strength=-1.2),
                 dict(scale=0.7, sigma=5.0)]


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "row-chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("opts", EXACT_OPTIONS, ids=opts_id)
def test_frames_arange_is_todays_call_bit_for_bit(monkeypatch, opts, dtype, chunked):
    if chunked:  # blocks of 4 query rows
        monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 4 * 13)
        monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", 4 * 13)
    q, k, v = qkv(2, 3, 13, 13, seed=7, dtype=dtype)
    for ids in (torch.arange(13), torch.arange(13, dtype=torch.int32)):
        for fn in (vk.tar_attention, vk.tar_attention_reference):
            assert torch.equal(fn(q, k, v, frames=ids, **opts), fn(q, k, v, **opts))
    delta = torch.rand(13, 13, generator=torch.Generator().manual_seed(8), dtype=dtype)
    assert torch.equal(vk.tar_attention(q, k, v, frames=torch.arange(13), delta=delta, **opts),
                       vk.tar_attention(q, k, v, delta=delta, **opts))
    q, k, v = (t.requires_grad_() for t in (q, k, v))  # the out-of-place path of autograd
    grad_out = randn(2, 3, 13, 4, seed=9, dtype=dtype)
    runs = [vk.tar_attention_reference(q, k, v, frames=frames, **opts) for frames in (torch.arange(13), None)]
    assert torch.equal(runs[0], runs[1])
    for a, b in zip(*(torch.autograd.grad(out, (q, k, v), grad_out) for out in runs)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_strength_zero_and_sigma_inf_without_outside_ids_are_plain_attention(causal, max_mode):
    ids = vk.frame_ids(3, 4)
    q, k, v = qkv(2, 2, 12, 12, seed=10)
    key_mask = random_key_mask(2, 12, seed=11)
    key_mask[:, 0] = True  # no row left without a key under the causal mask
    sdpa = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask[:, None, None, :] & (
        torch.ones(12, 12, dtype=torch.bool).tril() if causal else True))
    for kwargs in (dict(strength=0.0), dict(sigma=math.inf), dict(strength=0.0, delta=torch.rand(3, 3))):
        out = vk.tar_attention(q, k, v, frames=ids, key_mask=key_mask, causal=causal, max_mode=max_mode, **kwargs)
        torch.testing.assert_close(out, sdpa, atol=1e-12, rtol=1e-12)


def test_sigma_inf_with_outside_ids_still_biases_video_pairs():
    """At sigma = inf the video keys of a video row get strength * m_i and the text keys 0, so the
    op is not plain attention when text tokens take part (the issue's definition)."""
    ids = torch.tensor([-1, -1, 0, 0, 1, 1, 2, -1])
    q, k, v = qkv(1, 2, 8, 8, seed=12)
    out = vk.tar_attention(q, k, v, frames=ids, sigma=math.inf, strength=1.5)
    s = q @ k.transpose(-1, -2) * 0.5  # head dim 4
    video = (ids >= 0).double()
    expected = torch.softmax(s + 1.5 * s.amax(dim=-1, keepdim=True) * video[:, None] * video[None, :], dim=-1) @ v
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
    assert not torch.allclose(out, F.scaled_dot_product_attention(q, k, v), atol=1e-3)


def test_masked_keys_take_no_part_whatever_their_values():
    """NaN and huge scores at masked keys change nothing: not the max, not the softmax. (v enters
    through P @ V, where a zero weight times inf is NaN, as for the causal mask: not tested here.)"""
    ids = vk.frame_ids(2, 3, text_after=2)
    q, k, v = qkv(2, 1, 8, 8, seed=13)
    key_mask = torch.ones(2, 8, dtype=torch.bool)
    key_mask[0, [1, 6]] = False
    k2 = k.clone()
    k2[0, :, 1] = 1e30
    k2[0, :, 6] = math.nan
    for max_mode in ("row", "global"):
        out = vk.tar_attention(q, k2, v, frames=ids, key_mask=key_mask, max_mode=max_mode)
        keep = key_mask[0]
        alone = vk.tar_attention(q[:1], k[:1, :, keep], v[:1, :, keep], frames=(ids, ids[keep]), max_mode=max_mode)
        torch.testing.assert_close(out[:1], alone, atol=1e-12, rtol=1e-12)
        assert torch.isfinite(out).all()


def test_a_row_with_no_key_gives_zero():
    """All keys of batch 1 masked, and query 0 of batch 0 with key 0 masked under the causal mask:
    those rows are 0, with zero gradients (as torch 2.13's SDPA gives; some releases give NaN); the other
    rows are unaffected."""
    ids = vk.frame_ids(2, 3)
    q, k, v = qkv(2, 2, 6, 6, seed=14, requires_grad=True)
    key_mask = torch.ones(2, 6, dtype=torch.bool)
    key_mask[1] = False
    key_mask[0, 0] = False
    for fn in (vk.tar_attention, vk.tar_attention_reference):
        for max_mode in ("row", "global"):
            out = fn(q, k, v, frames=ids, key_mask=key_mask, causal=True, max_mode=max_mode)
            assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.equal(out[0, :, 0], torch.zeros(2, 4,
                                                                                        dtype=torch.float64))
            expected = naive_frames(q.detach(), k.detach(), v.detach(), ids, ids, key_mask=key_mask, causal=True,
                                    max_mode=max_mode)
            torch.testing.assert_close(out, expected, atol=1e-12, rtol=1e-12)
            dq, dk, dv = torch.autograd.grad(out.sum(), (q, k, v))
            assert all(torch.isfinite(g).all() for g in (dq, dk, dv))
            assert not dq[1].any() and not dk[1].any() and not dv[1].any() and not dq[0, :, 0].any()


# ------------------------------------------------------------------------------------------ gradients

GRAD_OPTIONS = [dict(), dict(causal=True, sigma=2.5, strength=0.7), dict(max_mode="global"),
                dict(max_mode="global", causal=True, strength=-1.3, scale=0.31)]


@pytest.mark.parametrize("fn", [vk.tar_attention_reference, vk.tar_attention], ids=["reference", "op"])
@pytest.mark.parametrize("opts", GRAD_OPTIONS, ids=opts_id)
def test_gradcheck(fn, opts):
    ids = torch.tensor([-1, 0, 0, -1, 1, 1, 2])
    q, k, v = qkv(2, 1, 7, 7, d=3, seed=15, requires_grad=True)
    key_mask = torch.ones(2, 7, dtype=torch.bool)
    key_mask[1, [2, 5]] = False
    delta = torch.rand(3, 3, generator=torch.Generator().manual_seed(16), dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b, c: fn(a, b, c, frames=ids, key_mask=key_mask, **opts), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c, dl: fn(a, b, c, frames=ids, key_mask=key_mask, delta=dl, **opts),
                                    (q, k, v, delta))


# ----------------------------------------------------------------------------------- memory and chunks


@pytest.mark.parametrize("max_mode", ["row", "global"])
@pytest.mark.parametrize("grad", [False, True], ids=["inference", "autograd"])
def test_long_sequences_are_chunked_over_query_rows(monkeypatch, grad, max_mode):
    """With a budget of 4 rows, no op allocates more than 8 bytes per budgeted score (the int64 frame
    distances of one block) or the output: nothing near one slice's N x N scores, and the same result;
    the CPU backend's chunks too."""
    ids = vk.frame_ids(5, 40, text_before=7, text_after=13)
    n = ids.numel()
    q, k, v = qkv(1, 2, n, n, seed=17, dtype=torch.float32, requires_grad=grad)
    key_mask = random_key_mask(1, n, seed=18)
    opts = dict(frames=ids, key_mask=key_mask, causal=True, max_mode=max_mode, sigma=1.5)
    whole = vk.tar_attention_reference(q, k, v, **opts)
    budget = 4 * n
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", budget)
    monkeypatch.setattr(cpu, "CHUNK_ELEMENTS", budget)
    with LargestAllocation() as mode:
        chunked = vk.tar_attention_reference(q, k, v, **opts)
    assert mode.largest <= max(8 * budget, 4 * chunked.numel()) < 4 * n * n / 10
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-6)
    with LargestAllocation() as mode, torch.no_grad():
        in_place = cpu.cpu_forward(make_problem(q, k, v, strength=1.0, delta=None, scale=None, **opts))
    assert mode.largest <= max(8 * budget, 4 * chunked.numel())
    torch.testing.assert_close(in_place, whole, atol=1e-6, rtol=1e-6)
    if grad:
        grad_out = randn(*whole.shape, seed=19, dtype=torch.float32)
        grads = (torch.autograd.grad(out, (q, k, v), grad_out) for out in (chunked, whole))
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_global_max_over_row_blocks_shares_ties_evenly(monkeypatch):
    """All scores 0: every entry ties for the slice's max; the row-chunked gradient equals the whole one."""
    ids = vk.frame_ids(3, 3)
    q = torch.zeros(1, 2, 9, 4, dtype=torch.float64, requires_grad=True)
    k, v = randn(1, 2, 9, 4, seed=20, requires_grad=True), randn(1, 2, 9, 4, seed=21, requires_grad=True)
    grad_out = randn(1, 2, 9, 4, seed=22)
    whole = torch.autograd.grad(vk.tar_attention_reference(q, k, v, frames=ids, max_mode="global"), (q, k, v), grad_out)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 9)  # blocks of 2 rows: the ties span 5 blocks
    chunked = torch.autograd.grad(vk.tar_attention_reference(q, k, v, frames=ids, max_mode="global"), (q, k, v),
                                  grad_out)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)


def test_a_wan_480p_key_sequence_runs_in_bounded_memory():
    """Keys of Wan 2.1 at 480p and 81 frames (21 latent frames x 1,560 tokens = 32,760) and a text
    prefix, queries of two frames, on the CPU backend: no allocation near the 3,120 x 32,986 scores of the
    slice."""
    fk = vk.frame_ids(21, 1560, text_before=226)
    fq = fk[226 + 9 * 1560:226 + 11 * 1560]
    q = randn(1, 1, fq.numel(), 8, seed=23, dtype=torch.float32)
    k, v = randn(1, 1, fk.numel(), 8, seed=24, dtype=torch.float32), randn(1, 1, fk.numel(), 8, seed=25,
                                                                             dtype=torch.float32)
    key_mask = torch.ones(1, fk.numel(), dtype=torch.bool)
    key_mask[0, 200:226] = False  # padded text
    problem = make_problem(q, k, v, frames=(fq, fk), key_mask=key_mask, sigma=2.0, strength=1.0, delta=None,
                           causal=False, max_mode="row", scale=None)
    with LargestAllocation() as mode:
        out = cpu.cpu_forward(problem)
    assert mode.largest <= 4 * cpu.CHUNK_ELEMENTS < fq.numel() * fk.numel() * 4 / 20
    rows = [0, 1559, 1560, 3119]  # the first and last query of each frame
    expected = naive_frames(q[:, :, rows], k, v, fq[rows], fk, key_mask=key_mask, sigma=2.0)
    torch.testing.assert_close(out[:, :, rows].double(), expected, atol=2e-5, rtol=2e-5)


# --------------------------------------------------------------------------------------- bad input

ENTRY_POINTS = [vk.tar_attention, vk.tar_attention_reference]
IDS = vk.frame_ids(2, 3, text_before=2)  # 8 tokens, frames 0 and 1

BAD = [
    ("ids too short", dict(frames=IDS[:-1]), ValueError,
     r"frames must have shape \(8,\), one id per token, got \(7,\)"),
    ("ids 2-D", dict(frames=IDS.view(2, 4)), ValueError, r"frames must have shape \(8,\)"),
    ("ids float", dict(frames=IDS.float()), TypeError, "frames must hold signed integers"),
    ("ids uint8", dict(frames=IDS.clamp(min=0).to(torch.uint8)), TypeError, "frames must hold signed integers"),
    ("ids bool", dict(frames=IDS > 0), TypeError, "frames must hold signed integers"),
    ("ids not a tensor", dict(frames=IDS.tolist()), ValueError, "frames must be one"),
    ("ids below -1", dict(frames=IDS - 1), ValueError, "frames must be frame ids >= 0, or -1 .* got -2"),
    ("three ids", dict(frames=(IDS, IDS, IDS)), ValueError, r"frames must be one \(N,\) tensor or a pair"),
    ("query ids too long", dict(frames=(torch.zeros(9, dtype=torch.long), IDS)), ValueError,
     r"frames\[0\] \(the query ids\) must have shape \(8,\), one id per query token"),
    ("key ids float", dict(frames=(IDS, IDS.double())), TypeError, r"frames\[1\] \(the key ids\) must hold"),
    ("key ids below -1", dict(frames=(IDS, IDS - 3)), ValueError, r"frames\[1\] \(the key ids\) must be frame ids"),
    ("ids past 2**24", dict(frames=IDS.clamp(min=0) + 2 ** 24 - 1), ValueError,
     r"frames has frame id 16777216: ids must be below 2\*\*24"),
    ("delta too small", dict(frames=IDS, delta=torch.rand(1, 1)), ValueError,
     r"frames has frame id 1 but delta is a \(1, 1\) frame matrix"),
    ("delta not square", dict(frames=IDS, delta=torch.rand(2, 3)), ValueError,
     r"with frames, delta must be a square \(F, F\) frame matrix .* got shape \(2, 3\)"),
    ("delta token-sized 4-D", dict(frames=IDS, delta=torch.rand(1, 1, 8, 8)), ValueError,
     r"delta must be a square .* got shape \(1, 1, 8, 8\), the shape of a per-token delta"),
    ("delta token-sized", dict(frames=IDS, delta=torch.rand(8, 8)), ValueError,
     r"delta is \(8, 8\), the size of the token matrix \(Nq, Nk\), but with frames delta is read as a frame "
     r"matrix .* the ids span F = 2 frames \(largest id 1, in frames\): pass the \(2, 2\) frame matrix"),
    ("delta for more frames", dict(frames=IDS, delta=torch.rand(3, 3)), ValueError,
     r"delta is a \(3, 3\) frame matrix but the ids span F = 2 frames .* delta must be \(2, 2\); .* "
     r"pass delta\[:2, :2\]"),
    ("delta with no frame", dict(frames=torch.full((8,), -1), delta=torch.rand(2, 2)), ValueError,
     r"the ids name no frame \(every id is -1\), so F = 0: with frames, delta must be \(0, 0\)"),
    ("delta below the key ids", dict(frames=(IDS.clamp(max=0), IDS), delta=torch.rand(1, 1)), ValueError,
     r"frames\[1\] \(the key ids\) has frame id 1 but delta is a \(1, 1\) frame matrix: with frames, delta "
     r"must be \(2, 2\)"),
    ("delta above both id vectors", dict(frames=(IDS.clamp(max=0), IDS), delta=torch.rand(8, 8)), ValueError,
     r"delta is \(8, 8\), the size of the token matrix .* F = 2 frames \(largest id 1, in frames\[1\]"),
    ("delta integer", dict(frames=IDS, delta=torch.ones(2, 2, dtype=torch.long)), TypeError,
     "delta must be a floating-point"),
    ("key_mask shape", dict(key_mask=torch.ones(2, 7, dtype=torch.bool)), ValueError,
     r"key_mask must have shape \(B, Nk\) = \(2, 8\), got \(2, 7\)"),
    ("key_mask 4-D", dict(key_mask=torch.ones(2, 1, 1, 8, dtype=torch.bool)), ValueError, "key_mask must have shape"),
    ("key_mask float", dict(key_mask=torch.ones(2, 8)), TypeError, "key_mask must be a bool tensor"),
    ("key_mask list", dict(key_mask=[[True] * 8] * 2), TypeError, "key_mask must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=["tar_attention", "reference"])
@pytest.mark.parametrize("name,kwargs,exc,match", BAD, ids=[c[0] for c in BAD])
def test_bad_input(fn, name, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        fn(*qkv(2, 3, 8, 8, dtype=torch.float32), **kwargs)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=["tar_attention", "reference"])
def test_token_shaped_delta_of_a_pair_is_named(fn):
    """A non-square delta of the token shape (Nq, Nk) with frame ids: the error says it is a per-token shape."""
    q, k, v = qkv(1, 1, 8, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"got shape \(8, 6\), the shape of a per-token delta: leave out frames"):
        fn(q, k, v, frames=(IDS, IDS[:6]), delta=torch.rand(8, 6))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_frame_matrix_of_no_frame(backend):
    """Ids that are all -1 span no frame: the (0, 0) frame matrix is read nowhere, the result is that of the
    ids alone, and its gradient is (0, 0)."""
    q, k, v = qkv(2, 2, 8, 8, dtype=torch.float32, requires_grad=True)
    ids = torch.full((8,), -1)
    delta = torch.zeros(0, 0, requires_grad=True)
    out = vk.tar_attention(q, k, v, frames=ids, delta=delta, backend=backend)
    assert torch.equal(out, vk.tar_attention(q, k, v, frames=ids, backend=backend))
    assert torch.autograd.grad(out.sum(), delta)[0].shape == (0, 0)


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=["tar_attention", "reference"])
def test_one_id_vector_needs_self_attention_and_one_device(fn):
    q, k, v = qkv(1, 1, 8, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="q has 8 tokens and k has 6: pass a pair"):
        fn(q, k, v, frames=IDS)
    q, k, v = qkv(2, 1, 8, 8, dtype=torch.float32)
    with pytest.raises(ValueError, match="frames is on meta but q is on cpu"):
        fn(q, k, v, frames=IDS.to("meta"))
    with pytest.raises(ValueError, match="key_mask is on meta but q is on cpu"):
        fn(q, k, v, key_mask=torch.ones(2, 8, dtype=torch.bool, device="meta"))


# ---------------------------------------------------------------------------------- dispatch and op


@pytest.mark.parametrize("kwargs,what", [(dict(frames=IDS), "frame ids"),
                                         (dict(key_mask=torch.ones(1, 8, dtype=torch.bool)), "key mask")],
                         ids=["frames", "key_mask"])
def test_cuda_kernel_declares_it_takes_neither_yet(kwargs, what):
    """The CUDA C++ operator takes neither (the Triton kernels do: tests/kernels/test_frames_triton.py)."""
    backend = "cuda"
    q = torch.randn(1, 1, 8, 16)
    problem = make_problem(q, q, q, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                           **kwargs)
    assert any(what in reason for reason in dispatch.BACKENDS[backend].not_supported_reasons(problem))
    assert dispatch.select(problem, "auto").name == "cpu"
    with pytest.raises(vk.BackendUnavailableError, match=f"backend='{backend}' cannot run this call: .*{what}"):
        vk.tar_attention(q, q, q, backend=backend, **kwargs)


def op_args(needs_grad):
    q, k, v = qkv(2, 2, 8, 8, dtype=torch.float32, requires_grad=needs_grad)
    delta = torch.rand(2, 2).requires_grad_(needs_grad)
    key_mask = random_key_mask(2, 8, seed=26)
    return (q, k, v, 1.0, 1.0, delta, True, "row", 0.5, IDS, IDS, key_mask, "reference", needs_grad)


@pytest.mark.parametrize("needs_grad", [True, False])
def test_opcheck_with_frames_and_key_mask(needs_grad):
    opcheck(torch.ops.vstar.tar_attention.default, op_args(needs_grad))


def dit_attention(q, k, v, frames, key_mask, sigma):
    return vk.tar_attention(q, k, v, frames=frames, key_mask=key_mask, sigma=sigma, max_mode="global")


@pytest.mark.parametrize("dynamic", [True, None], ids=["dynamic", "default"])
def test_torch_compile_fullgraph_with_frames_and_key_mask(dynamic):
    """Two layouts through one compiled function (no graph break; the ids' value checks run inside
    the op), outputs and gradients equal to eager."""
    torch._dynamo.reset()
    compiled = torch.compile(dit_attention, fullgraph=True, dynamic=dynamic, backend="aot_eager")
    for frames, text, sigma in ((2, 3, 1.5), (3, 2, 0.7)):
        ids = vk.frame_ids(frames, 4, text_after=text)
        n = ids.numel()
        q, k, v = qkv(2, 2, n, n, seed=frames, dtype=torch.float32, requires_grad=True)
        key_mask = random_key_mask(2, n, seed=frames)
        grad_out = randn(2, 2, n, 4, seed=27, dtype=torch.float32)
        results = []
        for fn in (compiled, dit_attention):
            out = fn(q, k, v, ids, key_mask, sigma)
            results.append((out, *torch.autograd.grad(out, (q, k, v), grad_out)))
        for a, b in zip(*results):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    with pytest.raises(ValueError, match="frames must be frame ids >= 0"):
        compiled(q, k, v, ids - 2, key_mask, 1.0)


# ------------------------------------------------------------------------ FrameLayout: ids known, not read

LAYOUT_CASES = [dict(num_frames=3, tokens_per_frame=4), dict(num_frames=3, tokens_per_frame=4, text_before=5),
                dict(num_frames=2, tokens_per_frame=5, text_after=3, key_mask=True, max_mode="global"),
                dict(num_frames=4, tokens_per_frame=2, text_before=1, text_after=2, delta=True, causal=True),
                dict(num_frames=0, tokens_per_frame=4, text_before=6), dict(num_frames=3, tokens_per_frame=0,
                                                                            text_after=5, delta=True)]


@pytest.mark.parametrize("backend", ["reference", "cpu", "triton"])
@pytest.mark.parametrize("case", LAYOUT_CASES, ids=opts_id)
def test_a_frame_layout_is_its_ids_and_is_not_read(case, backend, monkeypatch):
    """frames=FrameLayout(...) gives the call of frame_ids' ids bit for bit, forward and backward (a frame matrix's
    gradient too), with no read of the ids' values (the cpu backend's tables of them aside: CPU tensors)."""
    from vstar_kernels.frames import FrameLayout

    case = dict(case)
    opts = dict(sigma=1.5, strength=0.8, causal=case.pop("causal", False), max_mode=case.pop("max_mode", "row"))
    layout = FrameLayout(**{k: case.pop(k) for k in list(case) if k in FrameLayout._fields})
    ids = vk.frame_ids(**layout._asdict())
    n = ids.numel()
    q, k, v = qkv(2, 2, n, n, dtype=torch.float32, seed=n, requires_grad=True)
    leaves = [q, k, v]
    if case.get("delta"):
        frames = layout.num_frames if layout.tokens_per_frame else 0  # F = the largest id + 1
        opts["delta"] = torch.rand(frames, frames, requires_grad=True)
        leaves.append(opts["delta"])
    if case.get("key_mask"):
        opts["key_mask"] = random_key_mask(2, n, seed=n)
    grad_out = randn(2, 2, n, 4, seed=7, dtype=torch.float32)
    reads = ValueReads(monkeypatch)
    out = vk.tar_attention(q, k, v, frames=layout, backend=backend, **opts)
    grads = torch.autograd.grad(out, leaves, grad_out)
    assert reads.of_ids() == []
    expected = vk.tar_attention(q, k, v, frames=ids, backend=backend, **opts)
    assert reads.reads  # the same call with an id tensor reads them
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(expected, leaves, grad_out)))
    assert torch.equal(vk.tar_attention_reference(q, k, v, frames=layout, **opts),
                       vk.tar_attention_reference(q, k, v, frames=ids, **opts))


@pytest.mark.parametrize("fn", ENTRY_POINTS, ids=["tar_attention", "reference"])
def test_frame_layout_arguments(fn):
    from vstar_kernels.frames import FrameLayout

    q, k, v = qkv(1, 1, 12, 12, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"frames: FrameLayout\(num_frames=3, tokens_per_frame=4, text_before=1, "
                                         r"text_after=0\) lays out 13 tokens of a self-attention, but q has 12"):
        fn(q, k, v, frames=FrameLayout(3, 4, 1))
    with pytest.raises(ValueError, match="q has 12 tokens and k has 8: a FrameLayout is a self-attention's; pass a "
                                         r"pair \(q_frames, k_frames\) of ids"):
        fn(q, k[:, :, :8], v[:, :, :8], frames=FrameLayout(3, 4))
    for field, bad in (("num_frames", -1), ("tokens_per_frame", 4.0), ("text_before", True), ("text_after", "0")):
        values = dict(num_frames=3, tokens_per_frame=4, text_before=0, text_after=0)
        values[field] = bad
        with pytest.raises(ValueError, match=f"frames.{field} must be a non-negative int, got {bad!r}"):
            fn(q, k, v, frames=FrameLayout(**values))
    with pytest.raises(ValueError, match=r"has frame id 2 but delta is a \(2, 2\) frame matrix"):
        fn(q, k, v, frames=FrameLayout(3, 4), delta=torch.rand(2, 2))
    # numpy's int16 would wrap 257 x 256 to 256 tokens, which the layout check took (and the ids were 65,792)
    assert FrameLayout(np.int16(257), np.int16(256)).tokens() == 65792
    for bad in (FrameLayout(-1, 4), FrameLayout(3, 4.0)):  # a token count of -4 (and a TypeError naming no field)
        with pytest.raises(ValueError, match=r"FrameLayout\.(num_frames|tokens_per_frame) must be a non-negative "):
            bad.tokens()
        with pytest.raises(ValueError, match=r"FrameLayout\.(num_frames|tokens_per_frame) must be a non-negative "):
            bad.ids()
    q256 = qkv(1, 1, 256, 8, dtype=torch.float32)[0]
    with pytest.raises(ValueError, match=r"lays out 65792 tokens of a self-attention, but q has 256"):
        fn(q256, q256, q256, frames=FrameLayout(np.int16(257), np.int16(256)))
    # frames of no token: all 12 tokens are text, and no id is made for the frames (2**40 int32s before)
    out = fn(q, k, v, frames=FrameLayout(2 ** 40, 0, text_after=12))
    assert torch.equal(out, fn(q, k, v, frames=torch.full((12,), -1, dtype=torch.int32)))


def test_a_frame_layouts_ids_are_the_callers_own():
    """FrameLayout.ids() is frame_ids' tensor, a new one each time: writing it changes no later call of the layout,
    whose ids the calls share (`shared_ids`, kept per layout and device, with a version counter)."""
    from vstar_kernels.frames import FrameLayout

    layout = FrameLayout(3, 4, text_after=2)
    q = randn(1, 1, 14, 8, seed=3, dtype=torch.float32)
    before = vk.tar_attention(q, q, q, frames=layout)
    ids = layout.ids()
    assert torch.equal(ids, vk.frame_ids(3, 4, text_after=2)) and ids is not layout.ids()
    ids[ids >= 0] = 0
    assert torch.equal(vk.tar_attention(q, q, q, frames=layout), before)
    with torch.inference_mode():
        shared = FrameLayout(2, 5).shared_ids(torch.device("cpu"))
    assert shared is FrameLayout(2, 5).shared_ids("cpu") and not shared.is_inference()
    kept = layout.shared_ids("cpu")
    kept.fill_(-7)  # written, though it is not to be: made again, not trusted with these values
    assert torch.equal(layout.shared_ids("cpu"), layout.ids())
    assert torch.equal(vk.tar_attention(q, q, q, frames=layout), before)


def test_opcheck_with_a_frame_layout():
    args = op_args(True)
    opcheck(torch.ops.vstar.tar_attention.default, (*args, True, False, [2, 3, 2]))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_compiled_call_with_a_frame_layout_reads_no_id_value(backend, monkeypatch):
    """Under torch.compile a call with an id tensor reads its values on every call (a host synchronisation on a GPU,
    which a CUDA graph's capture refuses); with a FrameLayout, none, in the forward and the backward, whose output
    and gradients are the eager call's."""
    from vstar_kernels.frames import FrameLayout

    layout = FrameLayout(3, 4, text_after=2)
    q, k, v = qkv(1, 2, 14, 14, dtype=torch.float32, requires_grad=True)

    def call(q, k, v, frames):
        return vk.tar_attention(q, k, v, sigma=0.8, frames=frames, backend=backend)

    reads = ValueReads(monkeypatch)
    torch._dynamo.reset()
    compiled = torch.compile(call, backend="aot_eager", fullgraph=True)
    for _ in range(2):
        out = compiled(q, k, v, layout)
        grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert reads.reads == []
    ids = vk.frame_ids(**layout._asdict())
    compiled(q, k, v, ids)
    assert reads.reads == ["extrema"]  # an id tensor: read (a second call would read again)
    expected = call(q, k, v, ids)
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(expected.sum(), (q, k, v))))


BACKWARD_CASES = [dict(), dict(max_mode="global", causal=True), dict(delta="frames"), dict(delta="entries"),
                  dict(delta="frames", max_mode="global", key_mask=True), dict(delta="entries", max_mode="global")]


@pytest.mark.parametrize("case", BACKWARD_CASES, ids=opts_id)
def test_op_backward_by_row_blocks(monkeypatch, case):
    """The reference backend's backward of a row-chunked call (blocks of 3 rows) equals autograd on the
    whole definition, and allocates no more than the forward's chunks or the gradients themselves."""
    ids = torch.tensor([-1, 0, 0, 1, 1, 1, 2, -1, 2, 3, 3])
    n = ids.numel()
    q, k, v = qkv(2, 2, n, n, seed=28, requires_grad=True)
    opts = dict(frames=ids, sigma=1.3, max_mode=case.get("max_mode", "row"), causal=case.get("causal", False))
    if case.get("key_mask"):
        opts["key_mask"] = random_key_mask(2, n, seed=29)
    leaves = [q, k, v]
    if case.get("delta") == "frames":
        opts["delta"] = torch.rand(4, 4, dtype=torch.float64, requires_grad=True)
        leaves.append(opts["delta"])
    elif case.get("delta") == "entries":  # a per-token delta (no frame ids), broadcast over heads
        del opts["frames"]
        opts["delta"] = torch.rand(2, 1, n, n, dtype=torch.float64, requires_grad=True)
        leaves.append(opts["delta"])
    grad_out = randn(2, 2, n, 4, seed=30)
    whole = torch.autograd.grad(vk.tar_attention_reference(q, k, v, **opts), leaves, grad_out)
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 3 * n)
    out = vk.tar_attention(q, k, v, backend="reference", **opts)
    with LargestAllocation() as mode:
        chunked = torch.autograd.grad(out, leaves, grad_out)
    for a, b in zip(chunked, whole):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-12)
    # A per-token delta's gradient is (B, H, Nq, Nk) before autograd sums it over the broadcast heads.
    assert mode.largest <= max(8 * 3 * n, 8 * 2 * 2 * n * n if case.get("delta") == "entries" else 0,
                               *(8 * g.numel() for g in chunked))


def test_row_blocked_backward_is_differentiable(monkeypatch):
    monkeypatch.setattr(reference, "CHUNK_ELEMENTS", 2 * 5)
    ids = torch.tensor([0, -1, 0, 1, 1])
    q, k, v = qkv(1, 1, 5, 5, d=2, seed=31, requires_grad=True)
    assert torch.autograd.gradgradcheck(
        lambda a, b, c: vk.tar_attention(a, b, c, frames=ids, max_mode="global", backend="reference"), (q, k, v))


def test_frame_values_are_read_once_per_unchanged_tensor():
    """check_frame_values reads a tensor's extrema once (a device synchronisation); the same tensor
    passed again is not read, and an in-place change makes it read (and checked) again."""
    from torch.utils._python_dispatch import TorchDispatchMode

    from vstar_kernels._problem import check_frame_values, make_problem

    class Reads(TorchDispatchMode):
        count = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.min.default, torch.ops.aten.max.default):
                Reads.count += 1
            return func(*args, **(kwargs or {}))

    ids = vk.frame_ids(3, 4, text_after=2)
    q = torch.zeros(1, 1, ids.numel(), 8)

    def check(frames):
        check_frame_values(make_problem(q, q, q, sigma=1.0, strength=1.0, delta=None, causal=False,
                                        max_mode="row", scale=None, frames=frames))

    with Reads():
        check(ids)
        check(ids)
        assert Reads.count == 2  # one min, one max
        check(ids.clone())
        assert Reads.count == 4  # another tensor: read
        ids[0] = -5
        with pytest.raises(ValueError, match="frames must be frame ids >= 0"):
            check(ids)
        with torch.inference_mode():  # an inference tensor has no version counter: read every time
            fresh = vk.frame_ids(3, 4, text_after=2)
            before = Reads.count
            check(fresh)
            fresh[0] = -5
            with pytest.raises(ValueError, match="frames must be frame ids >= 0"):
                check(fresh)
            assert Reads.count == before + 4
    from vstar_kernels._problem import values_unkept

    ids = vk.frame_ids(3, 4, text_after=2)
    with Reads(), values_unkept():  # a call from compiled code: once for the call, whatever asks
        before = Reads.count
        # two tensors alive together (as in a call, which holds its ids: a freed clone's id could be the next's)
        one, other = ids.clone(), ids.clone()
        check(one)
        check(other)
        held = ids.clone()
        check(held)
        check(held)  # the lean forward's layout read after dispatch's, in one call, read twice before
        assert Reads.count == before + 6


def test_token_layouts_give_their_ids_once_per_layout():
    """frames.layout_ids, every front-end's frame-id builder: runs between -1 tokens, as frame_ids gives them
    for a grid and element by element for other runs; one tensor per layout, made outside inference mode.
    TokenLayout counts and names the tokens the same way."""
    from vstar_kernels.frames import TokenLayout, layout_ids as build

    grid = TokenLayout(3, 4, before=2, after=5, text_after=True)
    ids = build(grid.video_runs(), grid.before, grid.after, torch.device("cpu"))
    assert torch.equal(ids, vk.frame_ids(3, 4, text_before=2, text_after=5)) and ids.dtype == torch.int32
    assert grid.tokens() == ids.numel() == 19
    assert grid.describe() == "2 reference tokens, then 3 frames x 4 tokens, then 5 reference tokens, then the text"
    runs = ((-1, 2), (0, 3), (2, 1), (0, 2))
    odd = TokenLayout(3, 3, runs)
    assert odd.tokens() == 8 and odd.describe() == "8 tokens in 4 runs over 3 frames"
    want = [f for f, count in runs for _ in range(count)]
    assert build(runs, 1, 0, torch.device("cpu")).tolist() == [-1] + want
    with torch.inference_mode():
        kept = build(runs, 0, 3, torch.device("cpu"))
    assert not kept.is_inference() and kept is build(runs, 0, 3, torch.device("cpu"))
    assert kept.tolist() == want + [-1] * 3
