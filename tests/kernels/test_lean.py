"""The lean forward (backend="triton-lean", ops/tar_fwd_lean.py) against the float64 reference: regular frame
layouts (text before, after, none, one frame, frames longer than a tile), lengths that are not tile multiples,
the dtypes, head dims, with and without warp specialization, the (B, N, H, D) storage of diffusers, gradients
through the tiled backward from the statistics it saves, NaN and inf, and every input it must refuse by name.

Tensor descriptors run in the interpreter; warp specialization does not (the flag is accepted and ignored there),
so both settings run the same code here and only a GPU run tells them apart (benchmarks/run_gpu_sweep.sh lean).
"""

import contextlib

import pytest
import torch
import triton
import triton.language as tl

import vstar_kernels as vk
from vstar_kernels import dispatch
from vstar_kernels._op import _tar_attention
from vstar_kernels._problem import make_problem
from vstar_kernels.ops import tar_fwd_lean
from vstar_kernels.ops.launch import FWD_LEAN, INTERPRETER_TILES
from vstar_kernels.ops.layout import STAT_LSE, STAT_MAX, STATS_FIELDS

from .._device import DEVICE
from ..helpers import (TOLERANCES, ValueReads, assert_close_to_reference, assert_grads_close, dtype_id,
                       reference_grads)

# Built for sm_90: dispatch refuses it on other GPUs ("auto" there: test_auto_passes_it_over_where_it_does_not)
pytestmark = pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9,
                                reason="the lean forward is built for sm_90, and this GPU is not")

# (frames, tokens per frame, text before, text after): CogVideoX's text first, HunyuanVideo's last, none, one
# frame, frames longer than the 32-key interpreter tile, a video alone shorter than one tile, and text longer
# than a tile before and after
LAYOUTS = {"text_before": (3, 12, 7, 0), "text_after": (4, 9, 0, 5), "no_text": (5, 8, 0, 0),
           "one_frame": (1, 40, 3, 0), "long_frames": (2, 45, 0, 6), "short": (2, 5, 1, 1),
           "long_text": (2, 10, 40, 35),  # text runs longer than a key tile: whole tiles of frame id -1
           "text_blocks": (2, 16, 70, 80)}  # text runs longer than a query block: blocks that skip the walk
SIGMA, STRENGTH = 1.5, 0.7


def reference64(q, k, v, **opts):
    """The float64 reference on CPU (the frame ids as they are)."""
    return vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), **opts)


def lean_call(q, k, v, ids, **opts):
    return vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=ids, backend="triton-lean", **opts)


def config_id(config):
    k = config.kwargs
    return f"{k['BLOCK_M']}x{k['BLOCK_N']}-w{config.num_warps}-s{config.num_stages}{'-ws' * k['WARP_SPECIALIZE']}"


def qkv(B, H, n, d, dtype, seed=0, bnhd=False, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    shape = (B, n, H, d) if bnhd else (B, H, n, d)
    out = [torch.randn(*shape, generator=g).to(device=DEVICE, dtype=dtype) for _ in range(3)]
    if bnhd:  # diffusers' storage: (B, N, H, D) seen as (B, H, N, D)
        out = [t.transpose(1, 2) for t in out]
    return [t.requires_grad_(requires_grad) for t in out]


DTYPES = [torch.float16, torch.bfloat16]  # float32 is refused (test_refusals_name_the_argument)


@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_forward_matches_reference(layout, dtype):
    frames, per_frame, before, after = LAYOUTS[layout]
    ids = vk.frame_ids(frames, per_frame, text_before=before, text_after=after, device=DEVICE)
    q, k, v = qkv(2, 2, ids.numel(), 32, dtype)
    out = lean_call(q, k, v, ids)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=ids.cpu()))


@pytest.mark.parametrize("d", [16, 64, 128])
@pytest.mark.parametrize("warp_specialize", [False, True])
def test_head_dims_and_warp_specialization(d, warp_specialize, monkeypatch):
    monkeypatch.setitem(INTERPRETER_TILES, "lean", dict(BLOCK_M=32, BLOCK_N=16))
    ids = vk.frame_ids(4, 10, text_after=3, device=DEVICE)
    q, k, v = qkv(1, 2, ids.numel(), d, torch.float16, seed=d)
    problem = make_problem(q, k, v, sigma=SIGMA, strength=STRENGTH, delta=None, causal=False, max_mode="row",
                           scale=None, frames=ids)
    out = tar_fwd_lean.lean_forward(problem, warp_specialize=warp_specialize)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=ids.cpu()))


def test_strided_storage_and_options():
    """diffusers' (B, N, H, D) storage, a scale, a wide and a narrow Gaussian, a negative strength."""
    ids = vk.frame_ids(3, 16, text_before=5, device=DEVICE)
    q, k, v = qkv(2, 3, ids.numel(), 32, torch.bfloat16, seed=4, bnhd=True)
    assert not q.is_contiguous()
    for sigma, strength, scale in ((0.3, 1.0, None), (50.0, -0.4, 0.2), (float("inf"), 2.0, None)):
        out = vk.tar_attention(q, k, v, sigma=sigma, strength=strength, scale=scale, frames=ids, backend="triton-lean")
        ref = reference64(q, k, v, sigma=sigma, strength=strength, scale=scale, frames=ids.cpu())
        assert_close_to_reference(out.cpu(), ref)


@pytest.mark.parametrize("text", [(4, 3), (70, 80)], ids=["short_text", "text_blocks"])
def test_statistics_match_the_tiled_forward(text):
    """The saved row max is the tiled forward's bit for bit (the scale applied once per row is exact: rounding is
    monotone; a block of text rows alone reads it from its biased loop), and the log-sum-exp agrees to rounding
    (other tiles). On the first GPU run the max differed: half of each warp-specialized block saved rows 64 further
    on (`_tar_fwd_lean_kernel`'s rows)."""
    ids = vk.frame_ids(3, 20, text_before=text[0], text_after=text[1], device=DEVICE)
    q, k, v = qkv(2, 2, ids.numel(), 32, torch.float16, seed=7)
    problem = make_problem(q, k, v, sigma=SIGMA, strength=STRENGTH, delta=None, causal=False, max_mode="row",
                           scale=None, frames=ids)
    stats = {b: _tar_attention(*problem.op_args(), b, True, False)[1] for b in ("triton", "triton-lean")}
    assert stats["triton-lean"].shape == stats["triton"].shape
    assert torch.equal(stats["triton-lean"][..., STAT_MAX], stats["triton"][..., STAT_MAX])
    torch.testing.assert_close(stats["triton-lean"][..., STAT_LSE], stats["triton"][..., STAT_LSE], atol=1e-5,
                               rtol=1e-5)


# (config, head dim): every config the autotuner may pick at head dims 32 and 128 (FWD_LEAN's own prune rules)
PICKABLE = [(c, d) for d in (32, 128) for c in FWD_LEAN.prune(FWD_LEAN.configs, {}, HEAD_DIM=d)]


@pytest.mark.parametrize("config, d", PICKABLE, ids=[f"{config_id(c)}-d{d}" for c, d in PICKABLE])
def test_every_config_on_several_key_tiles(config, d):
    """Each config the autotuner may pick, run as it is (on a GPU the tuner picks one per call, and not the same one
    on every GPU or size), on 182 tokens: three key tiles of 64, text blocks on both sides of the video. The output
    against the float64 reference; the saved row max against the tiled forward's, bit for bit at head dim 32 and to a
    few float32 ulps at 128 (there the two kernels' products need not sum a score's terms in one order: the
    interpreter's 128 x 128 and 64 x 64 products differ in the last bit). The first GPU run failed cases of this
    kind: the warp-specialized configs computed rows 64-127 of each block as rows 128-191 (`_tar_fwd_lean_kernel`'s
    rows); they pass since. In the interpreter,
    where BLOCK_M = 128 is one program, WARP_SPECIALIZE=True runs the path without the branches."""
    ids = vk.frame_ids(2, 16, text_before=70, text_after=80, device=DEVICE)
    q, k, v = qkv(1, 2, ids.numel(), d, torch.bfloat16, seed=d)
    problem = make_problem(q, k, v, sigma=SIGMA, strength=STRENGTH, delta=None, causal=False, max_mode="row",
                           scale=None, frames=ids)
    stats = torch.full((2, ids.numel(), STATS_FIELDS), float("nan"), device=DEVICE)
    out, launch, _ = tar_fwd_lean._launch(problem, stats)
    with tar_fwd_lean.scratch_allocator() if q.is_cuda else contextlib.nullcontext():
        launch(tar_fwd_lean._tar_fwd_lean_kernel, **config.all_kwargs())
    assert_close_to_reference(out.cpu(), reference64(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=ids.cpu()))
    tiled = _tar_attention(*problem.op_args(), "triton", True, False)[1]
    torch.testing.assert_close(stats[..., STAT_MAX], tiled[..., STAT_MAX], atol=0, rtol=0 if d == 32 else 1e-6)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_through_the_tiled_backward(dtype):
    ids = vk.frame_ids(3, 14, text_after=6, device=DEVICE)
    q, k, v = qkv(1, 2, ids.numel(), 32, dtype, seed=11, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(12)).to(DEVICE, dtype)
    out = lean_call(q, k, v, ids)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    refs = reference_grads(q, k, v, grad_out, sigma=SIGMA, strength=STRENGTH, frames=ids.cpu())
    assert_grads_close([g.cpu() for g in grads], refs, dtype)


@pytest.mark.parametrize("speculate", [True, False], ids=["one_loop", "two_loops"])
def test_nan_and_inf_rows_as_the_definition(speculate):
    """A NaN key makes every row NaN (its score enters every row's max); an infinite query entry gives that row
    an infinite max and so a non-finite bias: NaN, as the reference."""
    ids = vk.frame_ids(2, 20, text_before=3, device=DEVICE)
    q, k, v = qkv(1, 1, ids.numel(), 16, torch.float16, seed=3)
    atol, rtol = TOLERANCES[torch.float16]
    for which, where, value in ((1, (0, 0, 9, 2), float("nan")), (0, (0, 0, 17, 5), float("inf"))):
        bad = [x.clone() for x in (q, k, v)]
        bad[which][where] = value
        out = lean_call(*bad, ids, speculate=speculate)
        ref = reference64(*bad, sigma=SIGMA, strength=STRENGTH, frames=ids.cpu())
        torch.testing.assert_close(out.cpu().double(), ref, equal_nan=True, atol=atol, rtol=rtol)
        assert torch.isnan(ref).any()


@pytest.mark.parametrize("speculate", [True, False], ids=["one_loop", "two_loops"])
def test_text_blocks_overflowing_bias_as_the_two_passes(speculate):
    """A row whose c_i = strength * m_i overflows float32 is NaN (the definition's c_i * dA_ij with dA_ij = 0): in a
    block of text rows alone, which skips the walk, as in the tiled forward and the reference (float32 math for
    16-bit inputs); the other rows agree to rounding."""
    ids = vk.frame_ids(2, 16, text_before=70, text_after=80, device=DEVICE)
    q, k, v = qkv(1, 2, ids.numel(), 16, torch.float16, seed=13)
    q[:, :, [3, 40, 150, 170]] *= 1000  # text rows of the text-only blocks: m_i about 1e3, c_i = inf
    q[:, :, 80] *= 1000  # a video row
    opts = dict(sigma=SIGMA, strength=1e36, frames=ids)
    lean = vk.tar_attention(q, k, v, backend="triton-lean", speculate=speculate, **opts).cpu().double()
    tiled = vk.tar_attention(q, k, v, backend="triton", **opts).cpu().double()
    assert torch.equal(lean.isnan(), tiled.isnan())
    if DEVICE == "cpu":  # a GPU's fused exp2 at biased scores near 1e36 makes more rows NaN (docs/semantics.md)
        assert torch.equal(lean.isnan(), vk.tar_attention_reference(q, k, v, **opts).isnan().cpu())  # float32 math
    assert lean[:, :, [3, 40, 150, 170, 80]].isnan().all() and not lean[:, :, :3].isnan().any()
    torch.testing.assert_close(lean, tiled, equal_nan=True, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("backend", ["triton-lean", "triton"])
def test_a_whole_tile_of_minus_inf_scores(backend):
    """Keys whose scores are -inf for every row (weight 0 in the definition) filling the first key tiles: the
    online softmax starts from a running max of -inf, which must leave the rows finite (exp2(-inf - -inf) is NaN).
    The gradients of k and v match the reference; dq is NaN in both (dS_ij = 0 times k_j = -inf)."""
    ids = vk.frame_ids(3, 30, text_before=6, device=DEVICE)
    q, k, v = qkv(1, 2, ids.numel(), 16, torch.float16, seed=5)
    q[..., 0] = q[..., 0].abs() + 0.1
    k[:, :, :64, 0] = float("-inf")  # two whole interpreter tiles of 32 keys
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    out = vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=ids, backend=backend)
    ref = reference64(q.detach(), k.detach(), v.detach(), sigma=SIGMA, strength=STRENGTH, frames=ids.cpu())
    assert not torch.isnan(ref).any()
    assert_close_to_reference(out.detach().cpu(), ref)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(6)).to(DEVICE, q.dtype)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    refs = reference_grads(q.detach(), k.detach(), v.detach(), grad_out, sigma=SIGMA, strength=STRENGTH,
                           frames=ids.cpu())
    assert torch.isnan(refs[0]).any() and torch.isnan(grads[0]).any()
    assert_grads_close([g.cpu() for g in grads[1:]], refs[1:3], q.dtype, names=("dk", "dv"))


@pytest.mark.parametrize("ids, expected", [
    (lambda: vk.frame_ids(3, 4, text_before=2, text_after=1), (2, 4, 3)),
    (lambda: vk.frame_ids(1, 7), (0, 7, 1)),
    (lambda: torch.full((5,), -1, dtype=torch.int32), (5, 1, 0)),
    (lambda: torch.tensor([0, 0, 1, 1, 2], dtype=torch.int32), None),   # frames of unequal length
    (lambda: torch.tensor([0, 0, 2, 2], dtype=torch.int32), None),      # a frame missing
    (lambda: torch.tensor([1, 1, 0, 0], dtype=torch.int32), None),      # out of order
    (lambda: torch.tensor([0, 0, -1, 1, 1], dtype=torch.int32), None),  # text inside the video
])
def test_regular_layout(ids, expected):
    assert tar_fwd_lean.regular_layout(ids().to(DEVICE)) == expected


def test_refusals_name_the_argument():
    ids = vk.frame_ids(2, 8, device=DEVICE)
    q, k, v = qkv(1, 1, 16, 16, torch.float16)
    unavailable = dispatch.BackendUnavailableError
    with pytest.raises(unavailable, match=r"frames are not one regular layout \(frame_ids"):
        lean_call(q, k, v, torch.tensor([0] * 4 + [1] * 12, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="frames: backend='triton-lean' takes the regular layout"):  # the launch's
        problem = make_problem(q, k, v, sigma=SIGMA, strength=STRENGTH, delta=None, causal=False, max_mode="row",
                               scale=None, frames=torch.tensor([0] * 4 + [1] * 12, dtype=torch.int32, device=DEVICE))
        tar_fwd_lean.frame_layout(problem)
    cases = [
        (dict(frames=None), "frame ids"),
        (dict(key_mask=torch.ones(1, 16, dtype=torch.bool, device=DEVICE)), "key mask"),
        (dict(causal=True), "no causal mask"),
        (dict(max_mode="global"), "max_mode='row'"),
        (dict(delta=torch.ones(2, 2, device=DEVICE)), "no delta"),
        (dict(strength=0.0), "strength != 0"),
    ]
    for opts, match in cases:
        call = {**dict(sigma=SIGMA, strength=STRENGTH, frames=ids, backend="triton-lean"), **opts}
        with pytest.raises(unavailable, match=match):
            vk.tar_attention(q, k, v, **call)
    q80 = torch.randn(1, 1, 16, 80, device=DEVICE, dtype=torch.float16)
    with pytest.raises(unavailable, match="one head dim of 16, 32, 64 or 128"):
        lean_call(q80, q80, q80, ids)
    odd = torch.randn(1, 1, 16, 24, device=DEVICE, dtype=torch.float16)[..., :16]  # rows 48 bytes apart: aligned
    lean_call(odd, odd, odd, ids)
    odd = torch.randn(1, 1, 16, 20, device=DEVICE, dtype=torch.float16)[..., :16]  # rows 40 bytes apart
    with pytest.raises(unavailable, match="q must have .* multiples of 16 bytes"):
        lean_call(odd, k, v, ids)
    shifted = torch.randn(1, 1, 16 * 16 + 1, device=DEVICE, dtype=torch.float16)[..., 1:].view(1, 1, 16, 16)
    with pytest.raises(unavailable, match="v must have"):
        lean_call(q, k, shifted, ids)
    expanded = torch.randn(1, 1, 1, 16, device=DEVICE, dtype=torch.float16).expand(1, 1, 16, 16)
    with pytest.raises(unavailable, match="k is expanded along its tokens"):  # a descriptor's token stride 0
        lean_call(q, expanded, v, ids)
    shifted_ids = vk.frame_ids(2, 8, device=DEVICE)[torch.arange(16, device=DEVICE).roll(4)]  # a ring shard's keys
    with pytest.raises(unavailable, match="the same for queries and keys"):
        vk.tar_attention(q, k, v, frames=(ids, shifted_ids), backend="triton-lean")
    with pytest.raises(unavailable, match="q.dtype float32: use backend='triton'"):
        lean_call(q.float(), k.float(), v.float(), ids)
    with pytest.raises(unavailable, match="no key mask: use backend='triton'") as refused:
        lean_call(q, k, v, ids, key_mask=torch.ones(1, 16, dtype=torch.bool, device=DEVICE))
    assert "reference" not in str(refused.value)
    big = torch.zeros(1, 1, 1, 16, device=DEVICE, dtype=torch.float16).expand(1, 1, tar_fwd_lean.MAX_TOKENS, 16)
    with pytest.raises(unavailable, match="sequences under 4,194,304 tokens"):
        lean_call(big, big, big, vk.frame_ids(4, tar_fwd_lean.MAX_TOKENS // 4, device=DEVICE))
    with pytest.raises(unavailable, match="self-attention"):
        vk.tar_attention(q, k[:, :, :8], v[:, :, :8], frames=(ids, ids[:8]), backend="triton-lean")


def cuda_stand_in(monkeypatch, frames, dtype=torch.float16, n=16):
    """A problem whose tensors say they are on a CUDA device, with the Triton backend's own state (interpreter or
    compiled) taken as fit: what "auto" decides for it, without a GPU (every other check runs as it is; torch sees
    no GPU here, so none of the GPU's)."""
    problem = make_problem(*qkv(1, 1, n, 16, dtype), sigma=1.0, strength=1.0, delta=None, causal=False,
                           max_mode="row", scale=None, frames=frames)
    monkeypatch.setattr(type(problem), "device", property(lambda self: torch.device("cuda")))
    monkeypatch.setattr(dispatch.TritonBackend, "state_reasons", lambda self, problem: [])
    return problem


def test_auto_takes_it_where_it_fits(monkeypatch):
    ids = vk.frame_ids(2, 6, text_before=4, device=DEVICE)
    assert dispatch.select(cuda_stand_in(monkeypatch, ids), "auto").name == "triton-lean"
    assert dispatch.select(cuda_stand_in(monkeypatch, (ids, ids.clone())), "auto").name == "triton-lean"


@pytest.mark.parametrize("case", ["irregular", "two_layouts", "float32", "no_frames", "sm_80"])
def test_auto_passes_it_over_where_it_does_not(case, monkeypatch):
    """Frame ids in another layout (for queries, or keys unlike the queries), a dtype it does not take, no frame
    ids, a GPU that is not sm_90: "auto" takes the Triton backend, and says why it passed the lean forward over."""
    ids = vk.frame_ids(2, 8, device=DEVICE)
    frames = {"irregular": ids.flip(0), "two_layouts": (ids, vk.frame_ids(4, 4, device=DEVICE)),
              "no_frames": None}.get(case, ids)
    problem = cuda_stand_in(monkeypatch, frames, torch.float32 if case == "float32" else torch.float16)
    if case == "sm_80":
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    lean = dispatch.BACKENDS["triton-lean"]
    why = {"irregular": "not one regular layout", "two_layouts": "not one regular layout",
           "float32": "float16 or bfloat16", "no_frames": "takes frame ids", "sm_80": "built for sm_90"}[case]
    assert any(why in r for r in lean.fits_auto(problem))
    assert dispatch.select(problem, "auto").name == "triton"


@pytest.mark.parametrize("layout", ["regular", "irregular"])
def test_auto_under_torch_compile_leaves_the_layout_to_the_op(layout, monkeypatch):
    """Traced, the ids' values cannot be read, and "auto" took the Triton kernels on sm_90 for every call, so a
    compiled DiT never ran the lean forward. It now hands the op AUTO_LEAN, which reads the layout where it runs:
    the lean forward on regular ids, the Triton kernels on others. An explicit backend stays as it is."""
    ids = vk.frame_ids(2, 8, device=DEVICE)
    problem = cuda_stand_in(monkeypatch, ids if layout == "regular" else ids.flip(0))
    with monkeypatch.context() as tracing:
        tracing.setattr(torch.compiler, "is_compiling", lambda: True)
        assert dispatch.op_backend(problem, "auto") == dispatch.AUTO_LEAN
        assert dispatch.op_backend(problem, "triton") == "triton"
    assert dispatch.op_backend(problem, "auto") == ("triton-lean" if layout == "regular" else "triton")
    assert dispatch.run_as(problem, dispatch.AUTO_LEAN) == ("triton-lean" if layout == "regular" else "triton")
    assert dispatch.run_as(problem, "triton") == "triton"


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors stand in for sm_90 here; a GPU run tests auto itself")
@pytest.mark.parametrize("layout", ["regular", "irregular", "FrameLayout"])
def test_a_compiled_call_runs_what_auto_leaves_to_the_op(layout, monkeypatch):
    """A compiled call, forward and backward, with "auto" ordered as on sm_90 (the interpreter's CPU tensors):
    the kernel the ids' layout asks for ran, and output and gradients are the explicit backend's bit for bit. With
    an id tensor the op reads its values (a host synchronisation on a GPU), with a FrameLayout it reads none."""
    from vstar_kernels.frames import FrameLayout

    monkeypatch.setitem(dispatch.AUTO_ORDER, "cpu", dispatch.AUTO_ORDER["cuda"])
    ran, reads = [], ValueReads(monkeypatch)
    for name in ("triton", "triton-lean"):
        backend = dispatch.BACKENDS[name]
        monkeypatch.setattr(backend, "forward", lambda *a, backend=backend, name=name, **k: (
            ran.append(name), type(backend).forward(backend, *a, **k))[1])
    ids = vk.frame_ids(3, 8, text_before=5, device=DEVICE)
    frames = {"regular": ids, "irregular": ids.flip(0), "FrameLayout": FrameLayout(3, 8, text_before=5)}[layout]
    q, k, v = qkv(1, 2, ids.numel(), 16, torch.float16, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)

    def call(q, k, v, backend="auto"):
        return vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=frames, backend=backend)

    torch._dynamo.reset()
    out = torch.compile(call, backend="eager", fullgraph=True)(q, k, v)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    expected_kernel = "triton" if layout == "irregular" else "triton-lean"
    assert ran == [expected_kernel]
    assert bool(reads.of_ids()) == (layout != "FrameLayout")
    expected = call(q, k, v, backend=expected_kernel)
    assert torch.equal(out, expected)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)))


@pytest.mark.parametrize("compiler", ["eager", "aot_eager"])
@pytest.mark.parametrize("layout", ["ids", "FrameLayout"])
def test_an_explicit_lean_call_compiles_without_a_graph_break(layout, compiler):
    """backend="triton-lean" under torch.compile(fullgraph=True): its checks are traced (the probe of the lean
    module and a tensor's address are not: the launch checks the address where the op runs); output and gradients
    are the eager call's bit for bit. A misaligned q and ids out of the regular layout are still refused, as in an
    eager call."""
    from vstar_kernels.frames import FrameLayout

    frames = vk.frame_ids(3, 8, text_before=2, text_after=1, device=DEVICE) if layout == "ids" else \
        FrameLayout(3, 8, text_before=2, text_after=1)
    q, k, v = qkv(1, 2, 27, 16, torch.float16, requires_grad=True)
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(3)).to(q)

    def call(q, k, v):
        return vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=frames, backend="triton-lean")

    torch._dynamo.reset()
    compiled = torch.compile(call, backend=compiler, fullgraph=True)
    out = compiled(q, k, v)
    expected = call(q, k, v)
    assert torch.equal(out, expected)
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    assert all(torch.equal(a, b) for a, b in zip(grads, torch.autograd.grad(expected, (q, k, v), grad_out)))
    shifted = torch.empty(q.numel() + 1, dtype=q.dtype, device=DEVICE)[1:].view(q.shape).copy_(q)
    with pytest.raises(vk.BackendUnavailableError, match="backend='triton-lean' cannot run this call: q must have "
                                                          "its head dim contiguous and its address"):
        compiled(shifted, k.detach(), v.detach())
    if layout == "ids":
        frames = frames.flip(0)
        with pytest.raises(vk.BackendUnavailableError, match="backend='triton-lean' cannot run this call: frames are "
                                                              "not one regular layout"):
            compiled(q, k, v)


def test_what_auto_takes_here_and_listed_by_info():
    """On CPU tensors "auto" leaves the interpreter's lean forward to the cpu backend; on sm_90 it takes it, and runs
    it as an explicit call does."""
    ids = vk.frame_ids(2, 8, device=DEVICE)
    q, k, v = qkv(1, 1, 16, 16, torch.float16)
    problem = make_problem(q, k, v, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                           frames=ids)
    assert dispatch.select(problem, "auto").name == ("triton-lean" if DEVICE == "cuda" else "cpu")
    assert dispatch.availability(DEVICE)["triton-lean"] == ""
    if DEVICE == "cuda":
        auto = vk.tar_attention(q, k, v, sigma=1.0, frames=ids)
        assert torch.equal(auto, vk.tar_attention(q, k, v, sigma=1.0, frames=ids, backend="triton-lean"))


def test_size_one_dims_take_any_stride_and_distinct_id_tensors():
    """A dim of size 1 is only indexed at 0: its stride may be anything (here unaligned) and the call still runs;
    queries and keys may pass distinct id tensors of the same regular layout."""
    ids = vk.frame_ids(2, 8, text_before=3, device=DEVICE)
    n = ids.numel()
    base = torch.randn(4 * n * 16, generator=torch.Generator().manual_seed(9)).to(DEVICE, torch.float16)
    q, k, v = (base[i * n * 16:].as_strided((1, 1, n, 16), (7, 5, 16, 1)) for i in range(3))
    out = vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=(ids, ids.clone()), backend="triton-lean")
    assert_close_to_reference(out.cpu(), reference64(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=ids.cpu()))
    one = vk.frame_ids(1, 1, device=DEVICE)  # N = 1: the token dim's stride is never read either
    t = base.as_strided((1, 1, 1, 16), (3, 3, 3, 1))
    out = vk.tar_attention(t, t, t, sigma=SIGMA, strength=STRENGTH, frames=one, backend="triton-lean")
    assert_close_to_reference(out.cpu(), reference64(t, t, t, sigma=SIGMA, strength=STRENGTH, frames=one.cpu()))


class _NullAllocator:
    pass


@pytest.mark.parametrize("as_context_var", [True, False])
def test_scratch_allocator_is_set_for_the_launch_and_put_back(as_context_var):
    """The descriptors' scratch allocator: set while Triton has none (its allocator a ContextVar, as in Triton 3.9,
    or a module global, as before), put back after; a caller's allocator left alone."""
    import contextvars
    import types

    null = _NullAllocator()
    slot = contextvars.ContextVar("alloc", default=null) if as_context_var else null
    allocation = types.SimpleNamespace(_allocator=slot, NullAllocator=_NullAllocator)
    read = (lambda: allocation._allocator.get()) if as_context_var else (lambda: allocation._allocator)
    with tar_fwd_lean.scratch_allocator(allocation):
        assert read() is tar_fwd_lean._allocate
    assert read() is null

    def mine(size, alignment, stream):
        return None
    if as_context_var:
        slot.set(mine)
    else:
        allocation._allocator = mine
    with tar_fwd_lean.scratch_allocator(allocation):
        assert read() is mine
    assert read() is mine


@triton.jit
def _frames_of_kernel(N_PTR, OUT, BEFORE, INV_PER_FRAME, VIDEO, COUNT, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    n = tl.load(N_PTR + offs, mask=offs < COUNT, other=0)
    tl.store(OUT + offs, tar_fwd_lean.frame_of(n, BEFORE, INV_PER_FRAME, VIDEO), mask=offs < COUNT)


@pytest.mark.parametrize("per_frame", [1, 3, 7, 1560, 3600, 99991, (1 << 21) - 1])
def test_frame_of_is_the_integer_division_below_max_tokens(per_frame):
    """The kernel's float32 frame id, floor((v + 0.5) * fl(1 / P)), is v // P at every frame boundary (the last
    token of a frame, the first of the next) up to MAX_TOKENS, and -1 outside the video."""
    before, video = 5, (tar_fwd_lean.MAX_TOKENS - 5) // per_frame * per_frame
    starts = torch.arange(per_frame, video + 1, per_frame, dtype=torch.int64)
    picks = torch.unique(torch.cat([starts[:2000], starts[-2000:]]))  # the first and last 2,000 boundaries
    v = torch.cat([picks - 1, picks, torch.tensor([0, video - 1])]).clamp(0, video - 1)
    n = torch.cat([v + before, torch.tensor([0, before - 1, before + video, tar_fwd_lean.MAX_TOKENS - 1])])
    out = torch.empty(n.numel(), dtype=torch.float32, device=DEVICE)
    _frames_of_kernel[(triton.cdiv(n.numel(), 1024),)](n.to(DEVICE, torch.int32), out, before, 1.0 / per_frame,
                                                        video, n.numel(), BLOCK=1024)
    rel = n - before
    expected = torch.where((rel >= 0) & (rel < video), rel // per_frame, -1).float()
    assert torch.equal(out.cpu(), expected)
