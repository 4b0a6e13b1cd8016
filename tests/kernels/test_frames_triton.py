"""The Triton tiled kernels with frame ids (`frames=`) and key masks (`key_mask=`): forward and
gradients against the float64 reference (tests/helpers.py tolerances) over frame layouts, key masks
(rows and whole batch items without a key), causal, the global max, frame matrices and the dtypes.

Calls with frames or a key mask run the tiled kernels at every length (the packed kernels take
neither), so the short sequences here exercise the tiled path; the interpreter's tiles (64 x 64
forward, 64 x 32 backward) split the longer ones.
"""

import math

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels import dispatch
from vstar_kernels._problem import make_problem
from vstar_kernels.ops import tar_bwd
from vstar_kernels.ops.launch import INTERPRETER_TILES, delta_args, frame_band_width
from vstar_kernels.ops.layout import is_packed

from .._device import DEVICE
from ..helpers import assert_close_to_reference, assert_grads_close, dtype_id, reference_grads

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

D = 16


def ids(*parts):
    """Frame ids from (frame, count) parts: frame -1 marks text."""
    return torch.cat([torch.full((n,), f, dtype=torch.int32) for f, n in parts]).to(DEVICE)


# Frame layouts: text before (CogVideoX), after (HunyuanVideo, Mochi), none, one frame, -1 ids in the
# middle, up to 40 tokens per frame, unequal frames and a repeated frame further on.
LAYOUTS = {
    "text_before": lambda: vk.frame_ids(3, 12, text_before=7, device=DEVICE),
    "text_after": lambda: vk.frame_ids(4, 9, text_after=5, device=DEVICE),
    "no_text": lambda: vk.frame_ids(5, 8, device=DEVICE),
    "one_frame": lambda: vk.frame_ids(1, 40, text_before=3, device=DEVICE),
    "long_frames": lambda: vk.frame_ids(2, 40, text_after=6, device=DEVICE),
    "holes": lambda: ids((0, 6), (-1, 3), (1, 9), (-1, 1), (2, 7), (4, 5), (-1, 2), (1, 4)),
}


def qkv(B, H, nq, nk, dtype, *, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(B, H, n, D, generator=g).to(device=DEVICE, dtype=dtype).requires_grad_(requires_grad)
                 for n in (nq, nk, nk))


def key_mask(B, nk, seed=5, keep=0.7):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, nk, generator=g) < keep
    mask[:, torch.randint(nk, (1,), generator=g)] = True
    return mask.to(DEVICE)


def frame_matrix(F, seed=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(F, F, generator=g).to(device=DEVICE, dtype=dtype)


def reference64(q, k, v, *, delta=None, **opts):
    """The float64 reference on CPU (the ids and the mask as they are)."""
    cpu = {key: (tuple(t.cpu() for t in val) if isinstance(val, tuple) else val.cpu() if torch.is_tensor(val)
                 else val) for key, val in opts.items()}
    return vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(),
                                      delta=None if delta is None else delta.double().cpu(), **cpu)


def check_forward(q, k, v, **opts):
    out = vk.tar_attention(q, k, v, backend="triton", **opts)
    assert_close_to_reference(out.cpu(), reference64(q, k, v, **opts))
    return out


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_forward_over_frame_layouts(layout):
    frames = LAYOUTS[layout]()
    n = frames.numel()
    q, k, v = qkv(2, 2, n, n, torch.float32, seed=n)
    check_forward(q, k, v, frames=frames, sigma=1.3)
    check_forward(q, k, v, frames=frames, sigma=0.7, strength=2.0, key_mask=key_mask(2, n, seed=n))


OPTIONS = [
    dict(causal=True),
    dict(max_mode="global"),
    dict(max_mode="global", causal=True),
    dict(sigma=math.inf),
    dict(sigma=2.5, strength=-1.5, scale=0.3),
    dict(delta="frames"),
    dict(delta="frames", max_mode="global", causal=True),
]


def options(opts, F, dtype=torch.float32):
    return {key: frame_matrix(F, dtype=dtype) if val == "frames" else val for key, val in opts.items()}


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("masked", [False, True], ids=["frames", "frames+key_mask"])
def test_forward_options(opts, masked):
    frames = LAYOUTS["holes"]()
    n = frames.numel()
    q, k, v = qkv(2, 1, n, n, torch.float32, seed=7)
    mask = key_mask(2, n) if masked else None
    check_forward(q, k, v, frames=frames, key_mask=mask, **options(opts, 5))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("opts", [dict(), dict(causal=True, delta="frames"), dict(max_mode="global")],
                         ids=["gauss", "causal_delta", "global"])
def test_forward_half_precision(dtype, opts):
    frames = LAYOUTS["text_after"]()
    n = frames.numel()
    q, k, v = qkv(1, 2, n, n, dtype, seed=11)
    check_forward(q, k, v, frames=frames, key_mask=key_mask(1, n, seed=2), **options(opts, 4, dtype))


@pytest.mark.parametrize("opts", [dict(), dict(delta="frames"), dict(max_mode="global", causal=True)],
                         ids=["gauss", "delta", "global_causal"])
def test_query_and_key_ids_differ(opts):
    """Nq != Nk: a pair (q_frames, k_frames), with the queries' frames a subset of the keys'."""
    fq = ids((-1, 3), (1, 10), (2, 10))
    fk = vk.frame_ids(4, 20, text_before=3, device=DEVICE)
    q, k, v = qkv(2, 1, fq.numel(), fk.numel(), torch.float32, seed=3)
    check_forward(q, k, v, frames=(fq, fk), key_mask=key_mask(2, fk.numel(), seed=9), **options(opts, 4))


def test_key_mask_alone_matches_the_reference():
    q, k, v = qkv(2, 2, 70, 70, torch.float32, seed=4)
    for opts in (dict(), dict(causal=True, max_mode="global"), dict(strength=0.0)):
        check_forward(q, k, v, key_mask=key_mask(2, 70, seed=8, keep=0.4), **opts)


def empty_rows_mask(B, n):
    """Batch 0: its first 12 keys dropped (causal rows 0..11 have no key); batch 1: every key dropped."""
    mask = torch.ones(B, n, dtype=torch.bool, device=DEVICE)
    mask[0, :12] = False
    mask[1] = False
    return mask


@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_rows_without_a_key_give_zero(max_mode):
    frames = LAYOUTS["holes"]()
    n = frames.numel()
    q, k, v = qkv(2, 2, n, n, torch.float32, seed=6)
    out = check_forward(q, k, v, frames=frames, key_mask=empty_rows_mask(2, n), causal=True, max_mode=max_mode)
    assert (out[0, :, :12] == 0).all() and (out[1] == 0).all()
    assert (out[0, :, 12:].abs().sum(-1) > 0).all()


ARANGE_OPTS = (dict(sigma=3.0), dict(sigma=0.5, strength=2.0), dict(sigma=3.0, causal=True),
               dict(sigma=40.0, max_mode="global"))


@pytest.mark.parametrize("tiles", [None, dict(BLOCK_M=64, BLOCK_N=16)], ids=["default_tiles", "64x16"])
def test_frames_arange_is_the_call_without_frames(tiles, monkeypatch):
    """Token i in frame i is today's Gaussian bit for bit where both run the tiled layout (150
    tokens: past the packed layout, which takes no ids) and the same tiles (the interpreter's; on a
    GPU each variant is tuned on its own): the ids run in the tile order of the one-pass kernel,
    and dA is 0 exactly where that kernel skips the bias; a second head, with one query row whose
    scores overflow (c * m_i = inf), is NaN there in both (under the first options and causal). sigma = inf
    with ids is the formula with dA = 1 (a constant per row, equal to plain attention only to the rounding:
    docs/semantics.md)."""
    if tiles is not None:
        if DEVICE != "cpu":
            pytest.skip("the interpreter's tiles are set by the launcher; on a GPU the autotuner picks them")
        monkeypatch.setitem(INTERPRETER_TILES, "forward", tiles)
    n = 150
    q, k, v = qkv(1, 2, n, n, torch.float32, seed=12)
    assert not is_packed(n, n, D, D)
    q[0, 1, 40] *= 1e38
    for opts in ARANGE_OPTS:
        heads = 2 if opts in ARANGE_OPTS[::2] else 1
        qh, kh, vh = q[:, :heads], k[:, :heads], v[:, :heads]
        plain = vk.tar_attention(qh, kh, vh, backend="triton", **opts)
        framed = vk.tar_attention(qh, kh, vh, backend="triton", frames=torch.arange(n, device=DEVICE), **opts)
        if DEVICE == "cpu":
            torch.testing.assert_close(framed, plain, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{opts}: {m}")
        else:  # the autotuner may pick other tiles for each variant: another summation order
            assert_close_to_reference(framed[:, :1], plain[:, :1].double())
        if heads == 2:
            assert plain[0, 1, 40].isnan().all()
        assert_close_to_reference(framed[:, :1], reference64(q[:, :1], k[:, :1], v[:, :1], **opts))
    framed = vk.tar_attention(q[:, :1], k[:, :1], v[:, :1], backend="triton", frames=torch.arange(n, device=DEVICE),
                              sigma=math.inf)
    assert_close_to_reference(framed, reference64(q[:, :1], k[:, :1], v[:, :1], sigma=math.inf))


def tile_kinds(q_ids, k_ids, block_m, block_n, band):
    """(key tiles of one id, key tiles off the band of their query block, other tiles) over the
    (query block, key tile) pairs: which dA form _jit.frame_tile_id picks (every pair counted);
    band None: no tile is off the band (a frame matrix)."""
    one = far = other = 0
    for r in range(0, q_ids.numel(), block_m):
        rows = q_ids[r:r + block_m]
        video_rows = rows[rows >= 0]
        for c in range(0, k_ids.numel(), block_n):
            keys = k_ids[c:c + block_n]
            video = keys[keys >= 0]
            if keys.numel() < block_n:  # the launcher's padding keys have id -1
                keys = torch.cat([keys, keys.new_full((block_n - keys.numel(),), -1)])
            if keys.min() == keys.max():
                one += 1
            elif band is not None and (not video.numel() or not video_rows.numel() or video.min() - video_rows.max()
                                       >= band or video_rows.min() - video.max() >= band):
                far += 1
            else:
                other += 1
    return one, far, other


# (ids, options, the kinds of (query block, key tile) pairs in 16 x 16 tiles: "one" (a key tile of one
# id), "far" (off the band, or no video on one side), "other" (dA per score)). "far_edge": a strength
# so large that the Gaussian one frame inside the band (about 2**-128) moves the scores, so that a
# tile taken as off the band one frame too soon changes the result; "text_inf": sigma = inf, where a
# text-only tile's column must be 0 and a video one's 1; "nan_row": a query row whose c * m_i
# overflows (a NaN row). The interpreter's time grows with the square of the tokens: "gauss" has 6 frames, the
# fewest whose tiles off the band (sigma 0.3: 5 frames) hold video on both sides in each pass; "far_edge" 10, where
# each pass has pairs 4 frames apart (the band's last frame) and pairs off the band.
FRAME_TILE_CASES = {
    "gauss": (lambda: vk.frame_ids(6, 24, text_before=8, text_after=5, device=DEVICE), dict(sigma=0.3),
              "one far other"),
    "far_edge": (lambda: vk.frame_ids(10, 12, device=DEVICE), dict(sigma=0.3, strength=-1e37), "far other"),
    "text_inf": (lambda: vk.frame_ids(4, 12, text_after=32, device=DEVICE), dict(sigma=math.inf),
                 "one far other"),
    "nan_row": (lambda: vk.frame_ids(4, 20, text_before=16, device=DEVICE), dict(sigma=0.5, nan_row=True),
                "one far other"),
    "gauss_strong_causal": (lambda: vk.frame_ids(7, 20, text_after=16, device=DEVICE),
                            dict(sigma=1.0, strength=-3.0, causal=True), "one far other"),
    "wide": (lambda: vk.frame_ids(6, 20, device=DEVICE), dict(sigma=40.0), "one other"),
    "holes": (lambda: torch.cat([LAYOUTS["holes"](), ids((-1, 11)), vk.frame_ids(5, 16, device=DEVICE) + 5]),
              dict(sigma=0.3), "one far other"),
    "delta": (lambda: vk.frame_ids(6, 20, text_before=16, device=DEVICE), dict(delta="frames", causal=True),
              "one other"),
    "key_mask": (lambda: vk.frame_ids(6, 20, text_after=16, device=DEVICE), dict(sigma=0.3, key_mask=True),
                 "one far other"),
    # frames of 32 tokens: the backward's 32-row query tiles of one video frame take dA as a row
    "rows": (lambda: vk.frame_ids(3, 32, text_before=32, text_after=5, device=DEVICE), dict(sigma=0.5), "one"),
    "rows_delta": (lambda: vk.frame_ids(3, 32, text_before=32, text_after=5, device=DEVICE),
                   dict(delta="frames", causal=True), "one"),
    # a frame matrix with -inf for later frames, hidden by the causal mask where a 32-row query block
    # spans two frames of 16: the dQ pass's dA column must stay masked (0 * -inf is NaN in its sums)
    "delta_neg_inf": (lambda: vk.frame_ids(8, 16, text_before=32, device=DEVICE),
                      dict(delta="frames_neg_inf", causal=True), "one"),
}


@pytest.mark.parametrize("case", list(FRAME_TILE_CASES))
def test_frame_tiles_are_the_per_score_dA_bit_for_bit(case, monkeypatch):
    """Key tiles of one frame id take dA as a column, tiles off the Gaussian's band take 0 (and in
    the backward's dK/dV pass, query tiles likewise take a row): the output, the saved statistics
    and the gradients (the frame matrix's too) equal those of dA per score on every tile, bit for
    bit (16 x 16 forward and 32 x 16 backward tiles, layouts with every kind of tile), and the
    float64 reference to the tolerance."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter's tiles are set by the launcher; on a GPU the autotuner picks them")
    from vstar_kernels.ops._load import triton_backward_ops, triton_ops

    fwd, bwd = triton_ops().module, triton_backward_ops().module
    monkeypatch.setitem(INTERPRETER_TILES, "forward", dict(BLOCK_M=16, BLOCK_N=16))
    monkeypatch.setitem(INTERPRETER_TILES, "backward", dict(BLOCK_M=32, BLOCK_N=16))
    make_ids, opts, kinds = FRAME_TILE_CASES[case]
    frames = make_ids()
    n = frames.numel()
    opts = dict(opts)
    # one batch item and head: the tile paths are the same in every item (a key mask per item against the
    # reference: test_forward_over_frame_layouts)
    q, k, v = qkv(1, 1, n, n, torch.float32, seed=41)
    nan_row = opts.pop("nan_row", False)
    if nan_row:
        q[0, 0, 21] *= 1e38
    if opts.get("delta") in ("frames", "frames_neg_inf"):
        delta = frame_matrix(int(frames.max()) + 1, seed=8)
        if opts["delta"] == "frames_neg_inf":
            delta = delta.masked_fill(torch.ones_like(delta, dtype=torch.bool).triu(1), -math.inf)
        opts["delta"] = delta
    if opts.pop("key_mask", False):
        opts["key_mask"] = key_mask(1, n, seed=9)
    problem = make_problem(q, k, v, sigma=opts.get("sigma", 1.0), strength=opts.get("strength", 1.0),
                           delta=opts.get("delta"), causal=opts.get("causal", False), max_mode="row", scale=None,
                           frames=frames, key_mask=opts.get("key_mask"))
    band = frame_band_width(delta_args(problem)[2]) if problem.delta is None else None
    one, far, other = tile_kinds(frames.cpu(), frames.cpu(), 16, 16, band)
    assert [bool(one), bool(far), bool(other)] == [k in kinds.split() for k in ("one", "far", "other")], \
        (one, far, other)
    if case.startswith("rows"):  # a 32-row query tile of one video frame (the dK/dV pass's row path)
        assert any(frames[r] >= 0 and (frames[r:r + 32] == frames[r]).all() for r in range(0, n - 31, 32))
    grad_out = torch.randn(problem.output_shape(), generator=torch.Generator().manual_seed(2)).to(DEVICE)
    runs = []
    for frame_tiles in (True, False):
        stats = torch.full(dispatch.BACKENDS["triton"].stats_shape(problem, True), math.nan, device=DEVICE)
        out = torch.full(problem.output_shape(), math.nan, device=DEVICE)
        variant = {} if frame_tiles else dict(FRAME_TILES=False)
        fwd._tar_forward(problem, out, stats, variant)
        grads = bwd._tar_backward(problem, out, stats, grad_out, problem.delta is not None, None, variant)
        runs.append((out, stats, grads))
    (out, stats, grads), (out_per_score, stats_per_score, grads_per_score) = runs
    torch.testing.assert_close(out, out_per_score, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(stats, stats_per_score, rtol=0, atol=0, equal_nan=True)
    for g, g_per_score in zip(grads, grads_per_score):
        if g is not None:  # the frame matrix's gradient is summed atomically: equal to the rounding
            exact = g.shape != opts.get("delta", torch.empty(0)).shape
            torch.testing.assert_close(g, g_per_score, rtol=0 if exact else 1e-6, atol=0 if exact else 1e-6,
                                       equal_nan=True)
    rows = torch.arange(n) != 21 if nan_row else torch.ones(n, dtype=torch.bool)
    if nan_row:  # such rows against the reference: tests/kernels/test_one_pass.py; the others (row max) are their own
        assert out[0, 0, 21].isnan().all() and not out[0, 0, rows].isnan().any()
    assert_close_to_reference(out.cpu()[:, :, rows], reference64(q, k, v, frames=frames, **opts)[:, :, rows])


def triton_grads(q, k, v, grad_out, delta=None, **opts):
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]
    d = None if delta is None else delta.detach().clone().requires_grad_()
    out = vk.tar_attention(*leaves, delta=d, backend="triton", **opts)
    return torch.autograd.grad(out, leaves + ([d] if d is not None else []), grad_out)


GRAD_CASES = {
    "gauss": dict(),
    "causal": dict(causal=True),
    "global": dict(max_mode="global"),
    "global_causal": dict(max_mode="global", causal=True),
    "delta": dict(delta="frames"),
    "delta_global": dict(delta="frames", max_mode="global"),
    "strong": dict(sigma=0.6, strength=3.0),
}


@pytest.mark.parametrize("case", list(GRAD_CASES))
def test_gradients(case):
    frames = LAYOUTS["holes"]()
    n = frames.numel()
    q, k, v = qkv(2, 1, n, n, torch.float32, seed=21)
    opts = options(GRAD_CASES[case], 5)
    delta = opts.pop("delta", None)
    opts.update(frames=frames, key_mask=key_mask(2, n, seed=13))
    grad_out = torch.randn(2, 1, n, D, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    assert_grads_close(triton_grads(q, k, v, grad_out, delta, **opts),
                       reference_grads(q, k, v, grad_out, delta, device=DEVICE, **opts), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_gradients_half_precision_query_and_key_ids_differ(dtype):
    fq = ids((0, 20), (-1, 4), (1, 20))
    fk = vk.frame_ids(3, 24, text_after=5, device=DEVICE)
    q, k, v = qkv(1, 2, fq.numel(), fk.numel(), dtype, seed=5)
    delta = frame_matrix(3, dtype=dtype)
    opts = dict(frames=(fq, fk), key_mask=key_mask(1, fk.numel(), seed=4), causal=True)
    grad_out = torch.randn(1, 2, fq.numel(), D, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
    assert_grads_close(triton_grads(q, k, v, grad_out, delta, **opts),
                       reference_grads(q, k, v, grad_out, delta, device=DEVICE, **opts), dtype)


@pytest.mark.parametrize("max_mode", ["row", "global"])
@pytest.mark.parametrize("with_delta", [False, True], ids=["gauss", "frame_matrix"])
def test_rows_without_a_key_get_zero_gradients(max_mode, with_delta):
    """Rows without a key take no part: zero dq rows, and the other rows' gradients (a frame
    matrix's too: finite, the empty rows add nothing) match the reference."""
    frames = LAYOUTS["holes"]()
    n = frames.numel()
    q, k, v = qkv(2, 1, n, n, torch.float32, seed=8)
    delta = frame_matrix(int(frames.max()) + 1) if with_delta else None
    opts = dict(frames=frames, key_mask=empty_rows_mask(2, n), causal=True, max_mode=max_mode)
    grad_out = torch.randn(2, 1, n, D, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = triton_grads(q, k, v, grad_out, delta, **opts)
    assert (grads[0][0, :, :12] == 0).all() and all((g[1] == 0).all() for g in grads[:3])
    expected = reference_grads(q, k, v, grad_out, delta, device=DEVICE, **opts)
    assert all(torch.isfinite(g).all() for g in expected)
    assert_grads_close(grads, expected, torch.float32)


def test_triton_takes_frames_and_key_masks_and_cuda_does_not():
    q = torch.randn(1, 1, 8, 16, device=DEVICE)
    frames = torch.tensor([-1, 0, 0, 1, 1, 2, 2, -1], device=DEVICE)
    problem = make_problem(q, q, q, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                           frames=frames, key_mask=torch.ones(1, 8, dtype=torch.bool, device=DEVICE))
    reasons = dispatch.BACKENDS["triton"].not_supported_reasons(problem)
    assert not any("frame" in r or "key mask" in r for r in reasons)
    assert dispatch.BACKENDS["triton"].stats_shape(problem, True) == (1, 8, 2)
    cuda = dispatch.BACKENDS["cuda"].not_supported_reasons(problem)
    assert any("frame ids" in r for r in cuda) and any("key mask" in r for r in cuda)


@pytest.mark.parametrize("max_mode", ["row", "global"])
def test_small_tiles_split_frames_and_masks(max_mode, monkeypatch):
    """Tiles smaller than a frame and than the text runs (16 x 16 forward, 32 x 16 backward): ids,
    masks and the causal limit cut across many tiles; forward and gradients still match."""
    if DEVICE != "cpu":
        pytest.skip("the interpreter's tiles are set by the launcher; on a GPU the autotuner picks them")
    monkeypatch.setitem(INTERPRETER_TILES, "forward", dict(BLOCK_M=16, BLOCK_N=16))
    monkeypatch.setitem(INTERPRETER_TILES, "backward", dict(BLOCK_M=32, BLOCK_N=16))
    frames = vk.frame_ids(3, 17, text_before=5, text_after=9, device=DEVICE)
    n = frames.numel()
    q, k, v = qkv(2, 1, n, n, torch.float32, seed=31)
    delta = frame_matrix(3, seed=4)
    opts = dict(frames=frames, key_mask=key_mask(2, n, seed=17, keep=0.6), causal=True, max_mode=max_mode)
    check_forward(q, k, v, delta=delta, **opts)
    grad_out = torch.randn(2, 1, n, D, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    assert_grads_close(triton_grads(q, k, v, grad_out, delta, **opts),
                       reference_grads(q, k, v, grad_out, delta, device=DEVICE, **opts), torch.float32)


def big_storage(tmp_path, numel, dtype, name):
    """A tensor of `numel` zeros: on CPU a sparse file mapped in (no memory or disk until written), on a GPU
    memory."""
    if DEVICE != "cpu":
        if torch.cuda.mem_get_info()[0] < 1.2 * numel * dtype.itemsize:
            pytest.skip(f"{numel * dtype.itemsize / 2 ** 30:.1f} GiB on the GPU")
        return torch.zeros(numel, dtype=dtype, device=DEVICE)
    path = tmp_path / name
    with open(path, "wb") as f:
        f.truncate(numel * dtype.itemsize)
    return torch.from_file(str(path), shared=True, size=numel, dtype=dtype)


@pytest.mark.parametrize("strides, tokens", [((2 ** 30, 1), 8), ((1, 2 ** 30), 64)],
                         ids=["rows-apart", "columns-apart-one-frame-tiles"])
def test_frame_matrix_offsets_past_2_31(tmp_path, strides, tokens):
    """A frame matrix viewed with rows (or columns) 2**30 entries apart, a legal view: frame 2's entries start
    2**31 entries on, past int32, and the call gives what the matrix's contiguous copy gives, forward and q, k, v
    gradients, bit for bit (the offsets wrapped to the storage's start, whose -30s moved frame 2's rows by 1.3).
    Frames of 64 tokens fill the interpreter's tiles: a tile's dA is one vector there (`frame_vector`)."""
    storage = big_storage(tmp_path, 2 ** 32 + 3, torch.float16, "delta")
    delta = storage.as_strided((3, 3), strides, 2 ** 31)
    delta.copy_(frame_matrix(3, seed=2).to(torch.float16))
    storage[:3] = -30.0
    frames = vk.frame_ids(3, tokens, text_before=2, device=DEVICE)
    n = frames.numel()
    results = []
    for matrix in (delta, delta.clone()):
        q, k, v = qkv(1, 2, n, n, torch.float16, seed=4, requires_grad=True)
        out = vk.tar_attention(q, k, v, frames=frames, delta=matrix, strength=2.0, backend="triton")
        results.append((out, *torch.autograd.grad(out.float().square().sum(), (q, k, v))))
    for strided, contiguous in zip(*results):
        assert torch.equal(strided, contiguous)
    assert_close_to_reference(results[0][0].detach().cpu(), reference64(q, k, v, frames=frames, delta=delta.clone(),
                                                                        strength=2.0))


def test_frame_matrix_gradient_past_2_31(tmp_path, monkeypatch):
    """Frame ids 0 and F - 1 of an (F, F) frame matrix with F = 46,400: the gradient's entry (F - 1, j) lies
    (F - 1) * F > 2**31 entries on (it wrapped: a write out of bounds). Its four entries are the gradient of the
    same call with ids 0 and 1 of the (2, 2) matrix they form."""
    F = 46_400
    if DEVICE == "cpu":  # the gradient's (F, F) zeros, as a sparse file (8.6 GB otherwise)
        zeros = torch.zeros

        def sparse_zeros(*size, **kw):
            if size in (((F, F),), (F, F)):
                return big_storage(tmp_path, F * F, kw.get("dtype") or torch.float32, "grad").view(F, F)
            return zeros(*size, **kw)

        monkeypatch.setattr(torch, "zeros", sparse_zeros)
    delta = big_storage(tmp_path, F * F, torch.float32, "delta").view(F, F)
    small = frame_matrix(2, seed=6)
    corners = (0, F - 1)
    for a, fa in enumerate(corners):
        for b, fb in enumerate(corners):
            delta[fa, fb] = small[a, b]
    delta.requires_grad_()
    small.requires_grad_()
    frames = vk.frame_ids(2, 8, device=DEVICE)
    q, k, v = qkv(1, 2, 16, 16, torch.float32, seed=9)
    out = vk.tar_attention(q, k, v, frames=frames * (F - 1), delta=delta, strength=0.5, backend="triton")
    (grad,) = torch.autograd.grad(out.sum(), [delta])
    expected = reference64(q, k, v, frames=frames, delta=small, strength=0.5)
    (grad_small,) = torch.autograd.grad(expected.sum(), [small])
    assert_grads_close((grad[corners, :][:, corners].cpu(),), (grad_small,), torch.float32, names=("ddelta",))


def test_deterministic_mode_alerts_on_the_frame_matrix_gradient(monkeypatch):
    """torch.use_deterministic_algorithms(True): the frame matrix's gradient, summed with atomic adds in an order
    that may vary on a GPU, raises there as torch's nondeterministic CUDA ops do (warns with warn_only=True); the
    interpreter's adds run in program order, and the CPU call runs."""
    frames = LAYOUTS["text_before"]()
    q, k, v = qkv(1, 2, frames.numel(), frames.numel(), torch.float32, seed=3)
    delta = frame_matrix(3).requires_grad_()

    def gradient():
        out = vk.tar_attention(q, k, v, frames=frames, delta=delta, backend="triton")
        return torch.autograd.grad(out.sum(), [delta])[0]

    expected = gradient()
    alerts = []
    alert = tar_bwd._alert_atomic_sum
    monkeypatch.setattr(tar_bwd, "_alert_atomic_sum", lambda: (alerts.append(1), alert())[1])
    gradient()
    assert alerts == ([1] if DEVICE == "cuda" else [])  # the backward asks on a GPU only
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    try:
        torch.use_deterministic_algorithms(True)
        if DEVICE == "cuda":
            with pytest.raises(RuntimeError, match="frame matrix's gradient .* atomic adds"):
                gradient()
            torch.use_deterministic_algorithms(True, warn_only=True)
            with pytest.warns(UserWarning, match="no deterministic implementation"):
                gradient()
        else:
            assert torch.equal(gradient(), expected)
            with pytest.raises(RuntimeError, match="frame matrix's gradient .* atomic adds"):
                tar_bwd._alert_atomic_sum()  # what a CUDA call runs
            torch.use_deterministic_algorithms(True, warn_only=True)
            with pytest.warns(UserWarning, match="no deterministic implementation"):
                tar_bwd._alert_atomic_sum()
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
