"""The lean forward's speculative form (backend="triton-lean" with speculate=True, the default; ops/tar_fwd_lean.py):
one biased loop over the keys with a max guessed from the tiles of the block's own frames and of the text, the
rows it got wrong flagged and recomputed by the tiled forward's redo.

Each case plants where a row's max lies (tests/kernels/test_speculative.py's plants: a far frame, a text key, the
last key tile, exact ties between frames, every row flagged, none) and checks which rows are flagged against the
rule written here as sets (a video row is flagged where its largest score lies only in key tiles its block did
not walk, or ties it in a tile of one frame id its block did not walk), every unflagged row against the lean two
loops bit for bit at the same config, every flagged row's statistics against theirs (its max bit for bit in the
interpreter, whose scores are the same at the redo's tiles; to rounding on a GPU), and everything against the
float64 reference, forward and backward.
"""

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels._problem import make_problem
from vstar_kernels.ops import tar_fwd, tar_fwd_lean
from vstar_kernels.ops.launch import FWD_LEAN, INTERPRETER_TILES
from vstar_kernels.ops.layout import STAT_MAX, STATS_FIELDS

from .._device import DEVICE
from ..helpers import TOLERANCES, assert_close_to_reference, assert_grads_close, reference_grads
from .test_speculative import PLANT_CASES, PLANTS, assert_bitwise, layout, plant, poisoned_empty, qkv

pytestmark = [pytest.mark.long,  # scheduled first (tests/conftest.py)
              pytest.mark.skipif(DEVICE == "cuda" and torch.cuda.get_device_capability()[0] != 9,
                                 reason="the lean forward is built for sm_90, and this GPU is not")]

SIGMA, STRENGTH = 2.0, 0.7
# the configs the speculative form may run (FWD_LEAN's rules drop the warp-specialized ones for it)
CONFIGS = FWD_LEAN.prune(FWD_LEAN.configs, {"SPECULATE": True}, HEAD_DIM=16)


def config_under_test():
    """The interpreter's tiles (as a config), or on a GPU the first config the speculative form may run."""
    if DEVICE == "cpu":
        import triton
        return triton.Config(dict(INTERPRETER_TILES["lean"], WARP_SPECIALIZE=False))
    return CONFIGS[0]


def run(q, k, v, frames, speculate, config, **opts):
    """(out, saved statistics, flagged rows per sequence) of the lean forward at `config`."""
    problem = make_problem(q, k, v, sigma=opts.get("sigma", SIGMA), strength=opts.get("strength", STRENGTH),
                           delta=None, causal=False, max_mode="row", scale=None, frames=frames)
    bh = problem.batch * problem.heads
    stats = torch.full((bh, problem.nq, STATS_FIELDS), float("nan"), device=DEVICE)
    flags = torch.full((bh,), -7, dtype=torch.int32, device=DEVICE) if speculate else None
    out = tar_fwd_lean.lean_forward(problem, stats, flags=flags, config=config)
    return out, stats, flags


def expected_flags(q, k, frames, config):
    """(B*H, N) bool: the video rows the kernel flags, by its rule written as sets (float64 scores): a row whose
    largest score lies only in key tiles its query block does not walk for its guess (the tiles holding a text key
    or a key of one of the block's frames), and a row with a score equal to that largest walked one in a key tile of
    one frame the walk did not take (there the biased tile max against the guess's bias decides: a tie flags). No
    score here lies within rounding of a row's guess but the planted ties."""
    bm, bn = config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"]
    n = frames.numel()
    s = torch.einsum("bhid,bhjd->bhij", q.double().cpu(), k.double().cpu()).flatten(0, 1)
    f = frames.cpu()
    flagged = torch.zeros(s.shape[:2], dtype=torch.bool)
    for start in range(0, n, bm):
        rows = torch.arange(start, min(start + bm, n))
        own = set(f[rows][f[rows] >= 0].tolist())
        if not own:
            continue
        walked = torch.zeros(n, dtype=torch.bool)
        one_frame = torch.zeros(n, dtype=torch.bool)
        for t in range(0, n, bn):
            ids = set(f[t:t + bn].tolist())
            walked[t:t + bn] = -1 in ids or bool(ids & own)
            one_frame[t:t + bn] = len(ids) == 1
        video = rows[f[rows] >= 0]
        sv = s[:, video]
        guess = sv[..., walked].amax(-1)
        ties = sv[..., ~walked & one_frame].amax(-1) >= guess if bool((~walked & one_frame).any()) else False
        flagged[:, video] = (sv.amax(-1) > guess) | ties
    return flagged


# a layout whose frames are longer than the key tiles, so that most unwalked tiles hold one frame (the guessed max
# is checked there on the biased tile max)
LONG_FRAMES = [(where, "long_frames") for where in PLANTS if where != "text"]


@pytest.mark.parametrize("where, frames_name", PLANT_CASES + LONG_FRAMES)
def test_flagged_rows_redone_the_others_the_two_loops(where, frames_name):
    frames = layout(frames_name)
    # one head: each plant is the same in every head; the flags' and the redo's per-head indexing are checked on 2
    # and 3 heads (test_rows_flagged_on_the_biased_tile_max..., test_every_config_it_may_run, test_non_finite_rows)
    q, k, v = qkv(frames, dtype=torch.float16, H=1, seed=len(where))
    PLANTS[where](q, k, frames)
    config = config_under_test()
    out1, stats1, counts = run(q, k, v, frames, True, config)
    out2, stats2, _ = run(q, k, v, frames, False, config)
    flagged = expected_flags(q, k, frames, config)
    assert counts.tolist() == flagged.sum(1).tolist()
    if where == "none":
        assert not flagged.any()
    elif where in ("far", "all"):
        assert flagged.any()
    keep = ~flagged.view(q.shape[:3]).to(DEVICE)
    assert_bitwise(out1[keep], out2[keep], "unflagged rows' output against the lean two loops")
    assert_bitwise(stats1.view(*q.shape[:3], -1)[keep], stats2.view(*q.shape[:3], -1)[keep],
                   "unflagged rows' statistics against the lean two loops")
    flagged_stats, two_loops = (t.view(*q.shape[:3], -1)[~keep] for t in (stats1, stats2))
    if DEVICE == "cpu":  # the interpreter's scores are the same at the redo's tiles: the max is
        assert_bitwise(flagged_stats[:, STAT_MAX], two_loops[:, STAT_MAX], "flagged rows' max against the two loops")
    torch.testing.assert_close(flagged_stats, two_loops, atol=1e-5, rtol=1e-5)
    # the same sums in another order, with p rounded to float16 for its product with v an ulp apart at most
    torch.testing.assert_close(out1[~keep].float(), out2[~keep].float(), atol=1e-4, rtol=2 ** -9)
    ref = vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), sigma=SIGMA,
                                     strength=STRENGTH, frames=frames.cpu())
    assert_close_to_reference(out1.cpu(), ref)


def test_rows_flagged_on_the_biased_tile_max_get_their_max_from_the_redo():
    """The rows of frame 0 score highest on the last key of a key tile of frame 2 alone, which their blocks do not
    walk: each is flagged there on the biased tile max (the loop does not take its raw max there), and the redo,
    which walks their keys, must find it: their saved max is the two loops', their output the reference's."""
    frames = vk.frame_ids(3, 160, text_before=7, device=DEVICE)
    q, k, v = qkv(frames, dtype=torch.float16, seed=9)
    config = config_under_test()
    bn = config.kwargs["BLOCK_N"]
    start = -(-int((frames == 2).nonzero()[0]) // bn) * bn  # the first key tile of frame 2 alone
    assert bool((frames[start:start + bn] == 2).all())
    plant(q, k, [start + bn - 1], frames == 0)
    out1, stats1, counts = run(q, k, v, frames, True, config)
    out2, stats2, _ = run(q, k, v, frames, False, config)
    flagged = expected_flags(q, k, frames, config)
    assert counts.tolist() == flagged.sum(1).tolist()
    assert bool(flagged[:, (frames == 0).cpu()].all())
    redone = flagged.view(q.shape[:3]).to(DEVICE)
    flagged_stats, two_loops = (t.view(*q.shape[:3], -1)[redone] for t in (stats1, stats2))
    if DEVICE == "cpu":
        assert_bitwise(flagged_stats[:, STAT_MAX], two_loops[:, STAT_MAX], "flagged rows' max against the two loops")
    torch.testing.assert_close(flagged_stats, two_loops, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out1[redone].float(), out2[redone].float(), atol=1e-4, rtol=2 ** -9)
    ref = vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), sigma=SIGMA,
                                     strength=STRENGTH, frames=frames.cpu())
    assert_close_to_reference(out1.cpu(), ref)


# Frames longer than a key tile, with key tiles of text alone at both ends (interpreter tiles of 32 keys: [0, 32)
# and [288, 320) text only; [64, 96), [128, 160), [160, 192), [224, 256) one frame each). The rows of frame g score
# highest on key WALKED[case](frames)(g), on a head-dim column of their own.
WALKED = {
    "own_middle": lambda f: (lambda g: int((f == g).nonzero()[40])),  # a tile of one frame the walk takes
    "text_before": lambda f: (lambda g: 0),  # a tile of text alone, walked by every block
    "text_after": lambda f: (lambda g: f.numel() - 1),
    "next_frame": lambda f: (lambda g: int((f == (g + 1) % 3).nonzero()[40])),  # skipped by some blocks: flags
}


@pytest.mark.parametrize("case", WALKED)
def test_tiles_the_walk_took_flag_nothing(case):
    """A max on a tile the guess walked, of one frame or of text alone, flags nothing (there the loop keeps the raw
    max: a biased tile max equal to its bound is the rule, not a miss); on a skipped tile of one frame it flags."""
    frames = vk.frame_ids(3, 80, text_before=40, text_after=40, device=DEVICE)
    q, k, v = qkv(frames, dtype=torch.float16, seed=1)
    key_of = WALKED[case](frames.cpu())
    for g in range(3):
        k[..., key_of(g), :] = 0
    for g in range(3):
        q[..., frames == g, g] = 3
        k[..., key_of(g), g] = 8
    config = config_under_test()
    out1, stats1, counts = run(q, k, v, frames, True, config)
    out2, stats2, _ = run(q, k, v, frames, False, config)
    flagged = expected_flags(q, k, frames, config)
    assert counts.tolist() == flagged.sum(1).tolist()
    assert (counts.sum() > 0) == (case == "next_frame")
    keep = ~flagged.view(q.shape[:3]).to(DEVICE)
    assert_bitwise(out1[keep], out2[keep], "unflagged rows' output against the lean two loops")
    assert_bitwise(stats1.view(*q.shape[:3], -1)[keep], stats2.view(*q.shape[:3], -1)[keep],
                   "unflagged rows' statistics against the lean two loops")


def near_the_guess(rows, ulps, dtype, strength, monkeypatch):
    """(out and statistics of the speculative form, the same of the two loops, each row's flag) on frame_ids(3, 64),
    one head, where rows 64 + i (i in `rows`) of frame 1 score a_i * 4 on key 74 (their guess) and a_i * (4 + `ulps`
    input ulps) on key 164, of frame 2, in a tile their block does not walk (q_i = a_i e_0, a_i = 1 + i / 64): a
    block of at most 128 rows holding frame 1 ends at frame 2 (with 128 rows it holds frame 0 too, whose keys the
    walk then takes)."""
    config = config_under_test()
    assert config.kwargs["BLOCK_M"] in (64, 128), "the planted key must lie past the block's frames"
    frames = vk.frame_ids(3, 64, device=DEVICE)
    q, k, v = qkv(frames, dtype=dtype, H=1, seed=0)
    tokens = [64 + i for i in rows]
    q[..., tokens, :] = 0
    q[..., tokens, 0] = (1 + torch.as_tensor(rows) / 64).to(DEVICE, dtype)
    k[..., [74, 164], :] = 0
    k[..., 74, 0] = 4
    k[..., 164, 0] = (torch.tensor(4.0, dtype=dtype).view(torch.int16) + ulps).view(dtype)
    seen = {}
    compact = tar_fwd.compact_rows
    monkeypatch.setattr(tar_fwd, "compact_rows", lambda f, c: compact(seen.setdefault("flags", f.clone()), c))
    out1, stats1, _ = run(q, k, v, frames, True, config, strength=strength)
    out2, stats2, _ = run(q, k, v, frames, False, config, strength=strength)
    flagged = seen["flags"].view(q.shape[:3]).bool()
    assert_bitwise(out1[~flagged], out2[~flagged], "unflagged rows' output against the lean two loops")
    stats1, stats2 = stats1.view(*q.shape[:3], -1), stats2.view(*q.shape[:3], -1)
    assert_bitwise(stats1[~flagged], stats2[~flagged], "unflagged rows' statistics against the lean two loops")
    return stats1[0, 0, 64:128], stats2[0, 0, 64:128], flagged[0, 0, 64:128]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("ulps", [1, -1], ids=["above", "below"])
def test_raw_max_within_rounding_of_the_guess(ulps, dtype, monkeypatch):
    """Row 5 of frame 1 scores its guess and, one input ulp above or below it, a key of a tile its block does not
    walk; at strength 1e5 the bias c_i vec_i (about 1.8e5) rounds the two biased scores together. Above, the guess
    is wrong and the row is flagged (its raw max not taken on that tile); either way every unflagged row is the two
    loops' bit for bit, and row 5's saved max the true one."""
    stats1, stats2, flagged = near_the_guess([5], ulps, dtype, 1e5, monkeypatch)
    assert flagged[5] or ulps < 0
    assert_bitwise(stats1[5, STAT_MAX], stats2[5, STAT_MAX], "row 5's saved max")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_raw_max_one_ulp_above_the_guess_on_many_rows(dtype, monkeypatch):
    """Every row of frame 1 one input ulp above its guess, a_i different a row, at strength 1e7: each must be
    flagged, so the bound must round as the scores do (an add m_i + b_i, which a GPU compile contracts with b_i's
    multiply into one FMA, missed about one row in seven)."""
    _, _, flagged = near_the_guess(list(range(64)), 1, dtype, 1e7, monkeypatch)
    missed = (~flagged).nonzero().flatten().tolist()
    assert not missed, f"rows of frame 1 whose guess was wrong, not flagged: {missed}"


def test_rows_whose_scores_are_all_negative_past_a_partial_last_tile():
    """Keys past N load as zeros (a score of 0): masked before the raw max is taken, a row whose every score is
    negative keeps its negative max (not flagged, its saved max the two loops')."""
    frames = vk.frame_ids(3, 70, text_before=5, text_after=3, device=DEVICE)  # 218 tokens: a partial last tile
    q, k, v = qkv(frames, dtype=torch.float16, seed=3)
    k[..., 0] = -(k[..., 0].abs() + 1)
    q[..., 0] = 2
    q[..., 1:] = 0  # every score of every row is 2 k_j0 < 0
    config = config_under_test()
    out1, stats1, counts = run(q, k, v, frames, True, config)
    out2, stats2, _ = run(q, k, v, frames, False, config)
    flagged = expected_flags(q, k, frames, config)
    assert counts.tolist() == flagged.sum(1).tolist()
    keep = ~flagged.view(q.shape[:3]).to(DEVICE)
    assert_bitwise(out1[keep], out2[keep], "unflagged rows' output against the lean two loops")
    assert_bitwise(stats1.view(*q.shape[:3], -1)[keep], stats2.view(*q.shape[:3], -1)[keep],
                   "unflagged rows' statistics against the lean two loops")
    ref = vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), sigma=SIGMA,
                                     strength=STRENGTH, frames=frames.cpu())
    assert_close_to_reference(out1.cpu(), ref)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.kwargs['BLOCK_M']}x{c.kwargs['BLOCK_N']}-w{c.num_warps}")
def test_every_config_it_may_run(config):
    """Each config the speculative form may run, as it is, at head dim 64 on 212 tokens whose later query block
    aims at the last frame (flagged where its block does not hold it): the reference, and the flag count."""
    frames = vk.frame_ids(6, 30, text_before=20, text_after=12, device=DEVICE)
    q, k, v = qkv(frames, dtype=torch.bfloat16, seed=2)
    q, k, v = (torch.cat([t] * 4, -1) for t in (q, k, v))  # head dim 64
    last = int((frames == 5).nonzero()[0])
    q[..., 100:180, 0] = 3
    k[..., last, :] = 0
    k[..., last, 0] = 8
    out, _, counts = run(q, k, v, frames, True, config)
    assert counts.tolist() == expected_flags(q, k, frames, config).sum(1).tolist()
    ref = vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), sigma=SIGMA,
                                     strength=STRENGTH, frames=frames.cpu())
    assert_close_to_reference(out.cpu(), ref)


@pytest.mark.parametrize("where", ["far", "all"])
def test_gradients(where):
    """The backward reads the statistics each row was computed with (the redo's for a flagged row; checked in
    test_flagged_rows_redone_the_others_the_two_loops, since the tiled backward's own row sums hide an error in a
    saved log-sum-exp from the gradients). One head: the flags' and the redo's per-head indexing are checked on 2 and
    3 heads (test_flagged_rows_redone_the_others_the_two_loops names where), and the backward is the tiled one."""
    frames = layout("text_before")
    q, k, v = qkv(frames, dtype=torch.bfloat16, H=1, seed=4)
    PLANTS[where](q, k, frames)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    grad_out = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE, q.dtype)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out = vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=frames, backend="triton-lean",
                           flags=counts)
    assert counts[0] > 0 and counts[1] == q.shape[1] * frames.numel()
    grads = torch.autograd.grad(out, (q, k, v), grad_out)
    refs = reference_grads(q.detach(), k.detach(), v.detach(), grad_out, sigma=SIGMA, strength=STRENGTH,
                           frames=frames.cpu())
    assert_grads_close([g.cpu() for g in grads], refs, q.dtype)


@pytest.mark.parametrize("per_frame", [16, 48], ids=["short_frames", "long_frames"])
def test_non_finite_rows(per_frame):
    """A NaN key in a far frame (every row NaN), a video and a text row with infinite scores, and rows whose
    c_i = strength * m_i overflows: NaN exactly where the two loops and the reference (float32 math) have it,
    the other rows to the tolerance table. At strength 1e36 a GPU's fused exp2 makes more rows NaN, in both forms
    (docs/semantics.md): there the reference is checked in the interpreter only. Frames of 16 tokens put two
    in every key tile; of 48, some hold one (the flag read off the biased tile max there)."""
    frames = vk.frame_ids(8 if per_frame == 16 else 3, per_frame, text_before=70, device=DEVICE)
    q, k, v = qkv(frames, dtype=torch.float16, seed=6, H=3)
    k[0, 0, -3, 2] = float("nan")
    q[0, 1, 90, 0] = float("inf")
    q[0, 1, 3, 0] = float("inf")
    q[0, 2, [3, 68, 100]] *= 1000  # scores near 1e3: c_i = 1e36 * 1e3 overflows
    strength = 1e36
    atol, rtol = TOLERANCES[torch.float16]
    for heads, s in (((0, 1), STRENGTH), ((2,), strength)):
        qs, ks, vs = (t[:, list(heads)] for t in (q, k, v))
        out1, _, counts = run(qs, ks, vs, frames, True, config_under_test(), strength=s)
        out2 = run(qs, ks, vs, frames, False, config_under_test(), strength=s)[0]
        ref = vk.tar_attention_reference(qs.float().cpu(), ks.float().cpu(), vs.float().cpu(), sigma=SIGMA,
                                         strength=s, frames=frames.cpu())
        assert torch.equal(out1.isnan(), out2.isnan()) and counts.sum() > 0
        if DEVICE == "cpu" or s == STRENGTH:
            torch.testing.assert_close(out1.cpu().float(), ref, equal_nan=True, atol=atol, rtol=rtol)
    assert out1[0, 0, [3, 68, 100]].isnan().all()


def test_text_row_whose_guess_overflows_its_bias():
    """A text row of a video block whose walked keys score about -1000 and whose max, -1, lies in a far frame: at
    strength 1e36 its guessed c_i overflows (c_i * 0 = NaN in its biased loop) while its true c_i does not, so its
    row is finite in the definition. Its NaN denominator flags it and the redo gives the finite row."""
    frames = layout("text_before")  # 11 text tokens, then 10 frames of 26
    q, k, v = qkv(frames, dtype=torch.float16, seed=1)
    k.zero_()
    k[..., 0] = 1
    k[..., -1, 0] = 0.001  # the last frame's last key, in a tile block 0 does not walk
    q[..., 5, :] = 0
    q[..., 5, 0] = -4000  # text row 5 (block 0): scores -1000 (scale 1/4), and -1 at that key
    out, _, counts = run(q, k, v, frames, True, config_under_test(), strength=1e36)
    ref = vk.tar_attention_reference(q.float().cpu(), k.float().cpu(), v.float().cpu(), sigma=SIGMA, strength=1e36,
                                     frames=frames.cpu())
    assert counts.sum() > 0
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(out[0, :, 5].cpu().float(), ref[0, :, 5], atol=atol, rtol=rtol)


def test_every_row_gets_a_flag(monkeypatch):
    """The lean kernel writes every row's flag (the buffer is torch.empty): with int32 buffers poisoned to 1, a call
    counts what it counts without, on a layout whose first query block is text alone (it flags nothing)."""
    frames = vk.frame_ids(3, 40, text_before=150, text_after=70, device=DEVICE)
    q, k, v = qkv(frames, dtype=torch.float16, seed=5)
    config = config_under_test()
    clean = run(q, k, v, frames, True, config)[2]
    poisoned_empty(monkeypatch, 1)
    assert torch.equal(run(q, k, v, frames, True, config)[2], clean)


def test_flags_and_warp_specialization_refused():
    frames = layout("no_text")
    q, k, v = qkv(frames, dtype=torch.float16)
    problem = make_problem(q, k, v, sigma=SIGMA, strength=STRENGTH, delta=None, causal=False, max_mode="row",
                           scale=None, frames=frames)
    with pytest.raises(ValueError, match="flags: an int32 \\(2,\\) tensor"):
        tar_fwd_lean.lean_forward(problem, flags=torch.zeros(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="flags: an int32"):
        tar_fwd_lean.lean_forward(problem, flags=torch.zeros(2, dtype=torch.int64, device=DEVICE))
    with pytest.raises(ValueError, match="warp_specialize"):
        tar_fwd_lean.lean_forward(problem, warp_specialize=True, flags=torch.zeros(2, dtype=torch.int32,
                                                                                   device=DEVICE))


def test_speculate_false_runs_the_two_loops_and_counts_nothing():
    frames = layout("text_after")
    q, k, v = qkv(frames, dtype=torch.float16, seed=3)
    PLANTS["far"](q, k, frames)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    out = vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=frames, backend="triton-lean",
                           speculate=False, flags=counts)
    assert counts.tolist() == [0, 0]
    problem = make_problem(q, k, v, sigma=SIGMA, strength=STRENGTH, delta=None, causal=False, max_mode="row",
                           scale=None, frames=frames)
    assert_bitwise(out, tar_fwd_lean.lean_forward(problem), "speculate=False against the two loops")
    vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=frames, backend="triton-lean", flags=counts)
    assert counts[0] > 0 and counts[1] == q.shape[1] * frames.numel()


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a GPU")
def test_captured_in_a_cuda_graph():
    """Captured once (its ids' layout read before), replayed on data whose rows it must flag: the flags are
    counted and the flagged rows redone on the device, the output the eager call's bit for bit."""
    frames = layout("text_before")
    q, k, v = qkv(frames, dtype=torch.float16, seed=7)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)

    def call():
        return vk.tar_attention(q, k, v, sigma=SIGMA, strength=STRENGTH, frames=frames, backend="triton-lean",
                                flags=counts)

    call()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    q2, k2, v2 = qkv(frames, dtype=torch.float16, seed=8)
    PLANTS["far"](q2, k2, frames)
    for t, new in ((q, q2), (k, k2), (v, v2)):
        t.copy_(new)
    counts.zero_()
    graph.replay()
    torch.cuda.synchronize()
    assert counts[0] > 0 and counts[1] == q.shape[1] * frames.numel()
    assert_bitwise(out, call(), "the replayed graph against the eager call")
