"""The speculative one pass of the Triton forward (frame ids, the Gaussian, the row max): the guessed
max is checked, the rows it got wrong are recomputed, and every output, saved statistic and gradient
is the two-pass form's (speculate=False) bit for bit, and within the float64 tolerance table.

Each case plants where a row's max lies: in a far frame, in a text key, in the last key tile, in
exact ties between frames; every row flagged, none. The interpreter's tiles (64 x 64 forward) split
the sequences into several query blocks and key tiles, so the redo gathers rows of several blocks; on
a GPU both forms run one config (`same_tiles`, tests/kernels/conftest.py).
"""

import math

import numpy as np
import pytest
import torch
import triton

import vstar_kernels as vk
from vstar_kernels._problem import make_problem
from vstar_kernels.ops import tar_fwd
from vstar_kernels.ops.layout import STAT_MAX, STATS_FIELDS

from .._device import DEVICE
from ..helpers import assert_close_to_reference, assert_grads_close, reference_grads

pytestmark = [pytest.mark.long,  # scheduled first (tests/conftest.py)
              pytest.mark.usefixtures("same_tiles")]  # tests/kernels/conftest.py

D = 16


def layout(name):
    """Frame layouts of 247-285 tokens: 4-5 key tiles, so that most tiles are outside a block's own frames
    (long_frames, frames longer than a key tile, for the lean forward's tiles of one frame)."""
    return {"text_before": lambda: vk.frame_ids(10, 26, text_before=11, device=DEVICE),
            "text_after": lambda: vk.frame_ids(12, 23, text_after=9, device=DEVICE),
            "no_text": lambda: vk.frame_ids(16, 16, device=DEVICE),
            "long_frames": lambda: vk.frame_ids(3, 80, text_before=7, device=DEVICE)}[name]()


def qkv(frames, dtype=torch.float32, B=1, H=2, seed=0):
    """Small random scores (scale 0.5), so that a planted key decides where a row's max lies."""
    g = torch.Generator().manual_seed(seed)
    n = frames.numel()
    return [(0.5 * torch.randn(B, H, n, D, generator=g)).to(DEVICE, dtype) for _ in range(3)]


def far_end(frames):
    """A video key at an end of the sequence whose tile holds no text (the guess walks every text tile)."""
    return 0 if int(frames[-1]) == -1 else frames.numel() - 1


def plant(q, k, keys, rows=None, dim=0):
    """Rows `rows` (default: all) score the keys `keys` highest, in exact ties: q_i[dim] = 3, k_j = 8 e_dim."""
    q[..., slice(None) if rows is None else rows, dim] = 3
    k[..., keys, :] = 0
    k[..., keys, dim] = 8


PLANTS = {
    "none": lambda q, k, f: plant(q, k, [int((f == g).nonzero()[0]) for g in range(int(f.max()) + 1)], f >= 0),
    "far": lambda q, k, f: plant(q, k, [far_end(f)]),
    "text": lambda q, k, f: plant(q, k, [int((f == -1).nonzero()[0])]),
    "last_tile": lambda q, k, f: plant(q, k, [f.numel() - 1]),
    "ties": lambda q, k, f: plant(q, k, [far_end(f), int((f == int(f.max()) // 2).nonzero()[0])]),
    # the first half of the frames to the last key, the second half to the first: every video row
    # flagged where no text tile holds either (no_text)
    "all": lambda q, k, f: (plant(q, k, [f.numel() - 1], (f >= 0) & (f < (int(f.max()) + 1) // 2), 0),
                            plant(q, k, [0], f >= (int(f.max()) + 1) // 2, 1)),
}


def forward(q, k, v, frames, speculate, stats=True, **opts):
    """(out, saved statistics, (flagged, rows)) of the Triton forward."""
    problem = make_problem(q, k, v, sigma=opts.pop("sigma", 2.0), strength=opts.pop("strength", 0.7), delta=None,
                           causal=opts.pop("causal", False), max_mode="row", scale=None, frames=frames, **opts)
    from vstar_kernels.ops.tar_fwd import tar_forward
    bh = problem.batch * problem.heads
    saved = torch.full((bh, problem.nq, STATS_FIELDS), float("nan"), device=DEVICE) if stats else None
    flags = torch.full((bh,), -7, dtype=torch.int32, device=DEVICE) if speculate else None  # the launch writes all
    out = tar_forward(problem, stats=saved, flags=flags)
    return out, saved, flags


def assert_bitwise(a, b, what):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True, msg=lambda m: f"{what}: {m}")


# every plant in every layout, but a text key where there is no text
PLANT_CASES = [(where, name) for name in ("text_before", "text_after", "no_text") for where in PLANTS
               if (where, name) != ("text", "no_text")]


@pytest.mark.parametrize("where, frames_name", PLANT_CASES)
def test_forward_is_the_two_pass_bit_for_bit(where, frames_name):
    frames = layout(frames_name)
    # one head: each plant is the same in every head; the flags' and the redo's per-head indexing are checked on 2
    # heads (test_options_bit_for_bit, test_16_bit_inputs)
    q, k, v = qkv(frames, H=1, seed=len(where))
    PLANTS[where](q, k, frames)
    out2, stats2, _ = forward(q, k, v, frames, False)
    out1, stats1, flags = forward(q, k, v, frames, True)
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")
    ref = vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), sigma=2.0, strength=0.7,
                                     frames=frames.cpu())
    assert_close_to_reference(out1.cpu(), ref)
    flagged = int(flags.sum())
    if where in ("none", "text"):  # every row's max in its own frame or the text (the guess walks both)
        assert flagged == 0
    elif where == "all" and frames_name == "no_text":
        assert flagged == q.shape[1] * frames.numel()
    elif where in ("far", "all") or (where == "last_tile" and frames_name != "text_after"):  # (text there)
        assert flagged > 0


@pytest.mark.parametrize("opts", [dict(causal=True), dict(key_mask="mask"), dict(sigma=0.5, strength=3.0),
                                  dict(sigma=math.inf)], ids=["causal", "key_mask", "narrow", "sigma_inf"])
def test_options_bit_for_bit(opts):
    """Two heads (the flags' and the redo's per-head indexing); two batch items where the key mask differs by item,
    one for the options every item takes alike."""
    frames = layout("text_before")
    q, k, v = qkv(frames, B=2 if "key_mask" in opts else 1, seed=3)
    PLANTS["far"](q, k, frames)
    if opts.get("key_mask") == "mask":
        g = torch.Generator().manual_seed(4)
        opts = dict(key_mask=(torch.rand(2, frames.numel(), generator=g) < 0.7).to(DEVICE))
        opts["key_mask"][1, :50] = False  # the text and the first frame out of reach of batch item 1
    out2, stats2, _ = forward(q, k, v, frames, False, **dict(opts))
    out1, stats1, flags = forward(q, k, v, frames, True, **dict(opts))
    assert flags.sum() > 0
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_inputs(dtype):
    frames = layout("text_after")
    q, k, v = qkv(frames, dtype=dtype, seed=5)
    PLANTS["far"](q, k, frames)
    out2, stats2, _ = forward(q, k, v, frames, False)
    out1, stats1, flags = forward(q, k, v, frames, True)
    assert flags.sum() > 0
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")


@pytest.mark.skipif(DEVICE != "cuda", reason="a register cap (launch.FWD_TILED_SPECULATIVE) is a GPU compile option; "
                                              "the interpreter runs no config")
def test_register_capped_config_bit_for_bit(monkeypatch):
    """The speculative form on a 64 x 32 x 4 config capped at SPECULATIVE_MAXNREG registers (its main kernel and,
    every video row flagged, its redo) against two passes on the same config uncapped: bit for bit, a cap being a
    register allocation. On a GPU whose pruning keeps no capped config (not sm_90): skipped there."""
    from vstar_kernels.ops.launch import SPECULATIVE_MAXNREG

    def pin(tuner, capped):
        prune = type(tuner).prune_configs.__get__(tuner)  # under same_tiles' pin

        def pick(kwargs):
            kept = [c for c in prune(kwargs) if c.maxnreg == capped and c.num_warps == 4
                    and c.kwargs == dict(BLOCK_M=64, BLOCK_N=32)][:1]
            if not kept:
                pytest.skip("this GPU's pruning keeps no register-capped 64 x 32 x 4 config (sm_90, 16-bit, D <= 64)")
            return kept
        monkeypatch.setattr(tuner, "prune_configs", pick)
        monkeypatch.setattr(tuner, "cache", {})

    pin(tar_fwd._tiled_speculative, SPECULATIVE_MAXNREG)
    pin(tar_fwd._tiled, None)
    frames = layout("no_text")
    q, k, v = qkv(frames, dtype=torch.float16, seed=8)
    PLANTS["all"](q, k, frames)
    out2, stats2, _ = forward(q, k, v, frames, False)
    out1, stats1, flags = forward(q, k, v, frames, True)
    assert tar_fwd._tiled_speculative.best_config.maxnreg == SPECULATIVE_MAXNREG and flags.sum() > 0
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")


def test_non_finite_rows():
    """A NaN key in a far frame, and a video and a text query row with infinite scores (c * m_i = inf):
    NaN rows and saved maxima as the two-pass form's."""
    frames = layout("text_before")
    q, k, v = qkv(frames, seed=6)
    k[0, 0, -3, 2] = float("nan")
    q[0, 1, 50, 0] = float("inf")  # scores of +inf, -inf and NaN
    q[0, 1, 3, 0] = float("inf")  # a text row
    out2, stats2, _ = forward(q, k, v, frames, False)
    out1, stats1, flags = forward(q, k, v, frames, True)
    assert out1[0, 0].isnan().all() and out1[0, 1, 50].isnan().all() and out1[0, 1, 3].isnan().all()
    assert flags[0] == frames.numel()
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")


def test_overflowing_bias_in_text_rows():
    """A text row whose c_i = strength * m_i overflows float32 while its scores are finite is NaN in the two-pass
    form (c_i * 0 = NaN) and so in the one pass: flagged and redone, in a block with video rows and in a block
    of text rows alone (whose guess is 0)."""
    frames = vk.frame_ids(8, 16, text_before=70, device=DEVICE)
    q, k, v = qkv(frames, seed=9)
    q[0, 0, [3, 68, 100]] *= 4000  # text rows of a text-only block (3) and of a mixed block (68), a video row
    out2, stats2, _ = forward(q, k, v, frames, False, strength=1e36)
    out1, stats1, flags = forward(q, k, v, frames, True, strength=1e36)
    assert out2[0, 0, [3, 68, 100]].isnan().all()
    if DEVICE == "cpu":  # a GPU's fused exp2 at biased scores near 1e35 loses head 1's rows (docs/semantics.md)
        assert not out2[0, 1].isnan().any()
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")


def test_nan_sum_with_finite_scores():
    """A video row whose biased scores overflow float32 while its scores and c_i = strength * m_i are finite: its
    exp2 sum is NaN (inf - inf), its max finite. The one pass sends it to the redo, whose walk saves the finite max
    the two passes save (it once saved NaN: a NaN sum was read as a NaN score)."""
    frames = layout("text_before")
    q, k, v = qkv(frames, seed=9)
    k[..., 0] = k[..., 0].abs() + 0.1
    q[0, 0, 100] = 0
    q[0, 0, 100, 0] = 1e38
    out2, stats2, _ = forward(q, k, v, frames, False, strength=6.0)
    out1, stats1, flags = forward(q, k, v, frames, True, strength=6.0)
    assert out2[0, 0, 100].isnan().all() and stats2[0, 100, STAT_MAX].isfinite()
    assert flags[0] >= 1
    assert_bitwise(out1, out2, "output")
    assert_bitwise(stats1, stats2, "statistics")


@pytest.mark.parametrize("where", ["none", "far"])
def test_gradients(where):
    """The backward reads the speculative forward's statistics: the gradients are the two-pass ones bit
    for bit and within the float64 tolerance table. One head: the flags' and the redo's per-head indexing are
    checked on 2 heads by the options and 16-bit tests, and the backward is the tiled one every backward test
    checks per head."""
    frames = layout("text_after")
    q, k, v = qkv(frames, H=1, seed=7)
    PLANTS[where](q, k, frames)
    grad_out = torch.randn_like(q)
    grads = {}
    for speculate in (True, False):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        out = vk.tar_attention(*leaves, sigma=2.0, strength=0.7, frames=frames, backend="triton",
                               speculate=speculate)
        out.backward(grad_out)
        grads[speculate] = [t.grad for t in leaves]
    for name, a, b in zip(("dq", "dk", "dv"), grads[True], grads[False]):
        assert_bitwise(a, b, name)
    refs = reference_grads(q, k, v, grad_out, sigma=2.0, strength=0.7, frames=frames.cpu())
    assert_grads_close([g.cpu() for g in grads[True]], refs, torch.float32)


@pytest.mark.parametrize("nq, rate", [(637, 0.3), (640, 0.03), (200, 0.0), (75, 1.0)])
def test_redo_lists_the_flagged_rows_in_row_order(nq, rate):
    """Each query block lists its flagged rows at its own slots (`_flag_rows`, no atomics);
    `_tar_fwd_list_kernel` lays the sequence's flagged rows out in row order for the redo (so that a redo
    program's rows come from consecutive blocks), across blocks with none, more blocks than one pass
    reads (16: several passes over the counts), a partial last block, none flagged and all, and writes each
    sequence's count."""
    bm, slots, seqs = 16, 32, 3
    g = torch.Generator().manual_seed(nq)
    flagged = torch.rand(seqs, nq, generator=g) < rate
    flagged[1, 3 * bm:9 * bm] = False  # a run of blocks with none
    blocks = -(-nq // bm)
    count = torch.zeros(seqs, nq, dtype=torch.int32)
    listed = torch.full((seqs, nq), -7, dtype=torch.int32)  # slots no block writes: never read
    for s in range(seqs):
        for b in range(blocks):
            rows = flagged[s, b * bm:(b + 1) * bm].nonzero().flatten() + b * bm
            count[s, b] = rows.numel()
            listed[s, b * bm:b * bm + rows.numel()] = rows.to(torch.int32)
    flags = torch.full((seqs,), -1, dtype=torch.int32, device=DEVICE)
    ordered = torch.full((seqs, nq), -1, dtype=torch.int32, device=DEVICE)
    tar_fwd._tar_fwd_list_kernel[(seqs * triton.cdiv(nq, slots),)](count.to(DEVICE), listed.to(DEVICE), ordered,
                                                                    flags, nq, bm, SLOTS=slots, BLOCKS=16)
    for s in range(seqs):
        want = flagged[s].nonzero().flatten()
        assert int(flags[s]) == want.numel()
        assert ordered[s].cpu().tolist() == want.tolist() + [-1] * (nq - want.numel())


def test_row_lists_launch_on_one_grid_axis(monkeypatch):
    """The row-list kernels launch on grid axis 0 alone, as every kernel here: CUDA's axis 1 takes at most 65,535
    programs, which a sequence of 8.4M queries (of the 2**30 - 2**10 that speculate) passed with 128 rows a program
    (the launch failed)."""
    grids = []

    class Recorded:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    for name in ("_list", "_block_list"):
        monkeypatch.setattr(tar_fwd, name, Recorded(getattr(tar_fwd, name)))
    frames = layout("text_before")
    q, k, v = qkv(frames, seed=5)
    vk.tar_attention(q, k, v, frames=frames, backend="triton")
    tar_fwd.compact_rows(torch.ones(2, 300, dtype=torch.int32, device=DEVICE),
                         torch.empty(2, dtype=torch.int32, device=DEVICE))
    assert len(grids) == 3 and all(len(grid) == 1 for grid in grids)


def poisoned_empty(monkeypatch, value: int):
    """torch.empty gives int32 buffers filled with `value` while the test runs: a launch that leaves an entry unwritten
    which it should write shows as that value, not as whatever memory held."""
    empty = torch.empty

    def poisoned(*args, **kwargs):
        out = empty(*args, **kwargs)
        return out.fill_(value) if out.dtype == torch.int32 else out

    monkeypatch.setattr(torch, "empty", poisoned)


@pytest.mark.parametrize("n, list_block", [(1, None), (77, None), (1024, None), (2053, None), (16 * 40 + 3, 16)])
def test_compact_rows_lists_the_lean_flags_in_row_order(n, list_block, monkeypatch):
    """tar_fwd.compact_rows (the lean forward's flags to the redo's rows): each sequence's flagged rows in order
    and their count, at none, a few, half, all and a run of flagged rows crossing a list's end; one list, a whole
    number of lists, three, and with 16-row lists 41 of them (more than one pass of the join reads). Its buffers
    start poisoned: an entry it should write and does not shows."""
    if list_block:
        monkeypatch.setattr(tar_fwd, "LIST_BLOCK", list_block)
    poisoned_empty(monkeypatch, -7)
    g = torch.Generator().manual_seed(n)
    row_flags = (torch.rand(6, n, generator=g) < torch.tensor([0.0, 0.1, 0.5, 1.0, 0.03, 0.0])[:, None]).int()
    row_flags[5, n // 3:n // 2 + 1] = 1
    counts = torch.full((6,), -1, dtype=torch.int32, device=DEVICE)
    rows = tar_fwd.compact_rows(row_flags.to(DEVICE), counts).cpu()
    assert rows.shape == (6, n) and rows.dtype == torch.int32 and rows.is_contiguous()
    for seq in range(6):
        listed = row_flags[seq].nonzero().flatten()
        assert int(counts[seq]) == listed.numel()
        assert torch.equal(rows[seq, :listed.numel()].long(), listed)


def test_no_query_rows_count_no_flags():
    """Nq = 0: nothing launches, and the flags (not zeroed by the caller) still say 0 per sequence."""
    frames = layout("text_before")
    _, k, v = qkv(frames, seed=3)
    out, _, flags = forward(k[:, :, :0], k, v, (frames[:0], frames), True, stats=False)
    assert out.shape[2] == 0 and flags.tolist() == [0] * flags.numel()


def test_flags_count_through_the_public_call():
    frames = layout("text_before")
    q, k, v = qkv(frames, seed=8)
    PLANTS["far"](q, k, frames)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    vk.tar_attention(q, k, v, frames=frames, backend="triton", flags=counts)
    _, _, per_seq = forward(q, k, v, frames, True, stats=False, sigma=1.0, strength=1.0)
    assert counts.tolist() == [int(per_seq.sum()), 2 * frames.numel()]
    vk.tar_attention(q, k, v, frames=frames, backend="triton", flags=counts, speculate=False)  # counts nothing
    vk.tar_attention(q, k, v, backend="triton", flags=counts)  # no frame ids: no speculation
    assert counts.tolist() == [int(per_seq.sum()), 2 * frames.numel()]


@pytest.mark.parametrize("cut", ["queries", "keys"])
def test_sequences_past_the_int32_row_lists_run_two_passes(cut, monkeypatch):
    """Past _problem.SPECULATE_TOKENS queries or keys (the redo's int32 row lists and tile bounds) a call that may
    speculate runs two passes: nothing counted, the two-pass output; at the bound it speculates. The other side is
    cut short, so that a bound on one of Nq and Nk alone fails."""
    from vstar_kernels import _problem
    frames = layout("text_before")
    q, k, v = qkv(frames, seed=8)
    PLANTS["far"](q, k, frames)
    n = frames.numel()
    if cut == "queries":
        q, ids = q[:, :, : n - 40], (frames[: n - 40], frames)
    else:
        k, v, ids = k[:, :, : n - 40], v[:, :, : n - 40], (frames, frames[: n - 40])
    two_pass = vk.tar_attention(q, k, v, frames=ids, backend="triton", speculate=False)
    counts = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    monkeypatch.setattr(_problem, "SPECULATE_TOKENS", n - 1)
    out = vk.tar_attention(q, k, v, frames=ids, backend="triton", flags=counts)
    assert counts.tolist() == [0, 0] and torch.equal(out, two_pass)
    monkeypatch.setattr(_problem, "SPECULATE_TOKENS", n)
    vk.tar_attention(q, k, v, frames=ids, backend="triton", flags=counts)
    assert counts[0] > 0 and counts[1] == 2 * q.shape[2]


@pytest.mark.parametrize("bad, error, match", [
    (dict(speculate=1), TypeError, "speculate must be a bool"),
    (dict(flags=torch.zeros(2, dtype=torch.int32)), TypeError, "flags must be None or an int64 .* got torch.int32"),
    (dict(flags=torch.zeros(3, dtype=torch.int64)), ValueError, "flags must be None or an int64 .* got shape \\(3,\\)"),
    (dict(flags=[0, 0]), TypeError, "flags must be None or an int64 .* got list"),
    (dict(flags=torch.zeros(1, dtype=torch.int64, device=DEVICE).expand(2)), ValueError,
     "flags must be None .* whose two entries are one element"),
    # torch refused the count's update after the whole call had run, naming no argument
    (dict(flags=torch.inference_mode()(torch.zeros)(2, dtype=torch.int64, device=DEVICE), backend="triton"),
     ValueError, "flags was made in inference mode, and this call adds to it outside inference mode"),
])
def test_bad_speculation_arguments_name_themselves(bad, error, match):
    q = torch.randn(1, 1, 8, D, device=DEVICE)
    with pytest.raises(error, match=match):
        vk.tar_attention(q, q, q, frames=vk.frame_ids(2, 4, device=DEVICE), **bad)


@pytest.mark.parametrize("options", [dict(backend="reference"), dict(backend="cpu"), dict(speculate=False)],
                         ids=["reference", "cpu", "two-passes"])
def test_inference_flags_are_taken_by_a_call_that_counts_nothing(options):
    """A call that adds nothing to flags (no speculative one pass) takes flags made in inference mode, as it did."""
    if options.get("backend") == "cpu" and DEVICE != "cpu":
        pytest.skip("the cpu backend runs CPU tensors")
    with torch.inference_mode():
        flags = torch.zeros(2, dtype=torch.int64, device=DEVICE)
    q = torch.randn(1, 1, 8, D, device=DEVICE)
    vk.tar_attention(q, q, q, frames=vk.frame_ids(2, 4, device=DEVICE), flags=flags, **options)
    assert flags.tolist() == [0, 0]


def test_a_call_on_meta_tensors_counts_nothing():
    """A model run once on meta tensors (shapes only) took a meta count, which every later step failed to read."""
    spec = vk.Speculation()
    m = torch.empty(1, 2, 12, 8, device="meta")
    assert spec.kwargs("meta") == dict(speculate=True, flags=None)
    assert vk.tar_attention(m, m, m, frames=vk.FrameLayout(3, 4), **spec.kwargs(m.device)).device.type == "meta"
    spec.next_step()
    q = torch.randn(1, 2, 12, 8, device=DEVICE)
    vk.tar_attention(q, q, q, frames=vk.FrameLayout(3, 4), backend="triton", **spec.kwargs(q.device))
    spec.next_step()
    assert spec.rate is not None and spec.speculate


def test_speculation_counts_once_per_device_and_sums_them():
    """kwargs names a device as its tensors do ("cpu:0" is "cpu"; on a GPU "cuda" is "cuda:0"): one count per
    device, whatever the spelling, and next_step sums the devices' counts (a model split over GPUs)."""
    spec = vk.Speculation()
    counts = spec.kwargs("cpu")["flags"]
    assert spec.kwargs("cpu:0")["flags"] is counts and spec.kwargs(torch.device("cpu"))["flags"] is counts
    if torch.cuda.is_available():
        assert spec.kwargs("cuda")["flags"] is spec.kwargs(f"cuda:{torch.cuda.current_device()}")["flags"]
        assert spec.kwargs(np.int64(0))["flags"] is spec.kwargs(0)["flags"]  # a numpy index is its int
    else:  # an index names an accelerator: refused here naming device, not as not an index (an int64 index was)
        with pytest.raises(ValueError, match=r"Speculation.kwargs: device np.int64\(0\) is not a device index "
                                             "torch takes here .*accelerator"):
            spec.kwargs(np.int64(0))
    for wrong in (torch.zeros(1), True, None):  # the call's tensor, not its device: named, not torch's own error
        with pytest.raises(TypeError, match="Speculation.kwargs: device must be a torch.device, a device name or "
                                            f"index, got (torch.)?{type(wrong).__name__}$"):
            spec.kwargs(wrong)
    for wrong in ("cdua", "cpu:x", ""):  # a misspelt name: named, not torch's "device string" error alone
        with pytest.raises(ValueError, match=f"Speculation.kwargs: device '{wrong}' is not a device torch knows"):
            spec.kwargs(wrong)
    counts += torch.tensor([1, 100])
    spec._counts[torch.device("cuda", 7)] = torch.tensor([9, 100])  # another device's calls (a stand-in tensor)
    spec.next_step()
    assert spec.rate == 0.05 and spec.speculate
    assert all(c.tolist() == [0, 0] for c in spec._counts.values())


def test_speculation_first_used_in_inference_mode_counts_outside_it():
    """A Speculation whose first call ran under torch.inference_mode (a sampling loop) made its count there, an
    inference tensor: next_step and every later call outside inference mode raised on the in-place add."""
    frames = layout("no_text")
    q, k, v = qkv(frames, seed=4)
    spec = vk.Speculation()
    with torch.inference_mode():
        vk.tar_attention(q, k, v, frames=frames, backend="triton", **spec.kwargs(q.device))
    with torch.no_grad():
        vk.tar_attention(q, k, v, frames=frames, backend="triton", **spec.kwargs(q.device))
    counts = spec.kwargs(q.device)["flags"]
    assert int(counts[1]) == 2 * q.shape[1] * frames.numel()  # both calls' rows
    spec.next_step()
    assert counts.tolist() == [0, 0] and spec.rate is not None


def test_speculation_policy():
    """Two passes after a step whose flag rate passed BREAK_EVEN; one speculative step after PROBE two-pass steps;
    the choice kept through steps that counted nothing."""
    spec = vk.Speculation()
    assert spec.kwargs("cpu")["speculate"] is True
    counts = spec.kwargs("cpu")["flags"]
    counts += torch.tensor([6, 100])
    spec.next_step()
    assert spec.rate == 0.06 and spec.kwargs("cpu")["speculate"] is False and counts.tolist() == [0, 0]
    for _ in range(spec.PROBE - 1):
        spec.next_step()
        assert spec.kwargs("cpu")["speculate"] is False
    spec.next_step()
    assert spec.kwargs("cpu")["speculate"] is True
    spec.kwargs("cpu")["flags"].add_(torch.tensor([5, 100]))
    spec.next_step()
    assert spec.rate == 0.05 and spec.speculate
    spec.next_step()
    assert spec.speculate and spec.rate == 0.05


def speculated_steps(spec, rates):
    """The steps (0-based) at which `spec` speculated, the calls flagging rates[step] of 1000 rows when they do (a
    two-pass step counts nothing)."""
    steps = []
    for step, rate in enumerate(rates):
        if spec.kwargs("cpu")["speculate"]:
            steps.append(step)
            spec.kwargs("cpu")["flags"].add_(torch.tensor([round(rate * 1000), 1000]))
        spec.next_step()
    return steps


def test_speculation_waits_twice_as_long_after_each_failed_probe():
    """Every row flagged at every step: probes after PROBE, 2 PROBE, 4 PROBE ... two-pass steps, at most PROBE_MAX
    (a 50-step run pays for three); a probe that passes, then a step that flags too many, and the wait is PROBE
    again."""
    spec = vk.Speculation()
    p, cap = spec.PROBE, spec.PROBE_MAX
    steps = speculated_steps(spec, [1.0] * 400)
    gaps = [b - a - 1 for a, b in zip(steps, steps[1:])]
    assert steps[:3] == [0, p + 1, 3 * p + 2] and gaps[:4] == [p, 2 * p, 4 * p, min(8 * p, cap)]
    assert max(gaps) == cap and gaps[-1] == cap
    assert len([s for s in steps if s < 50]) == 3  # Speculation's comment: a 50-step run, steps 1, 10 and 27
    spec = vk.Speculation()
    rates = [1.0] * (3 * p + 2) + [0.0] * 4 + [1.0] * (2 * p)  # the probe at 3p + 2 passes, 3p + 6 fails again
    assert speculated_steps(spec, rates) == [0, p + 1, *range(3 * p + 2, 3 * p + 7), 4 * p + 7]
    # a probe step whose calls count nothing stays the probe: when one counts too many, the wait doubles
    spec = vk.Speculation()
    assert speculated_steps(spec, [1.0] * (p + 1)) == [0]
    spec.next_step()  # the probe step (p + 1): no call counted
    assert spec.speculate
    assert speculated_steps(spec, [1.0] * (2 * p + 2)) == [0, 2 * p + 1]


def test_the_op_compiles_with_counts():
    """The public call with flags under torch.compile(fullgraph=True): the counts as eager."""
    frames = layout("no_text")
    q, k, v = qkv(frames, seed=9)
    PLANTS["far"](q, k, frames)

    def call(q, k, v, counts):
        return vk.tar_attention(q, k, v, frames=frames, backend="triton", flags=counts)

    eager, compiled = (torch.zeros(2, dtype=torch.int64, device=DEVICE) for _ in range(2))
    out = call(q, k, v, eager)
    assert_bitwise(torch.compile(call, fullgraph=True, backend="eager")(q, k, v, compiled), out, "output")
    assert compiled.tolist() == eager.tolist() and eager[0] > 0
