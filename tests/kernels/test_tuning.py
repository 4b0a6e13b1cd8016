"""The GPU autotuning config lists: every launchable shape keeps at least one valid config.

The interpreter runs one fixed config, so these pure-Python checks are what CPU CI
can say about the autotuned GPU launches.
"""

import contextlib
import itertools

import pytest
import torch

from vstar_kernels._problem import make_problem
from vstar_kernels.ops import layout
from vstar_kernels.ops._jit import target_sm, targeting
from vstar_kernels.ops._load import triton_ops


@pytest.fixture(scope="module")
def fwd():
    return triton_ops().module


@pytest.fixture(scope="module")
def bwd():
    from vstar_kernels.ops._load import triton_backward_ops

    return triton_backward_ops().module


def meta_problem(nq, nk, d):
    q = torch.empty(2, 3, nq, d, device="meta")
    k = torch.empty(2, 3, nk, d, device="meta")
    return make_problem(q, k, k, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)


@pytest.mark.parametrize("d", [8, 40, 64, 80, 128, 160, 256])
def test_packed_prune_keeps_valid_configs(fwd, bwd, d):
    block = layout.pow2(d, layout.DOT_MIN)
    for nq in range(1, 129):
        for nk in (1, 7, 16, 33, 100, 128):
            if not layout.is_packed(nq, nk, d, d):
                continue
            seg_q, seg_k, seg_max = fwd.packed_segments(meta_problem(nq, nk, d))
            meta = dict(SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max, BLOCK_D=block, BLOCK_DV=block)
            kept_bwd = bwd._prune_packed(bwd._packed_configs(), {"BH": 1000}, **meta)
            assert kept_bwd and all(c.kwargs["ROWS"] >= seg_max for c in kept_bwd), (nq, nk, d)
            kept = fwd._prune_packed(fwd._packed_configs(), {"BH": 1000}, **meta)
            assert kept, (nq, nk, d)
            for c in kept:
                seqs = c.kwargs["ROWS"] // seg_max
                assert seqs >= 1
                assert seqs * meta["SEG_Q"] >= 16 and seqs * meta["SEG_K"] >= 16
                assert c.kwargs["ROWS"] <= layout.packed_limit(block)


def _target(sm):
    return contextlib.nullcontext() if sm is None else targeting(sm)


@pytest.mark.parametrize("sm", [None, 80, 90, 100])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize("d", [8, 64, 128, 160, 256])
def test_tiled_prune_keeps_configs(fwd, bwd, d, dtype, sm):
    block = layout.pow2(d, layout.DOT_MIN)
    args = {"BH": 10, "Q": torch.empty(1, dtype=dtype)}
    with _target(sm):
        for has_delta, frames in itertools.product((False, True), (False, True)):
            kept_bwd = bwd._prune_tiled(bwd._tiled_configs(), args, BLOCK_D=block, BLOCK_DV=block,
                                        HAS_DELTA=has_delta, HAS_FRAMES=frames)
            # the dK/dV pass runs these too; neither pass may hold more than a 64 x 32 score tile
            assert kept_bwd and all(c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"] <= 64 for c in kept_bwd), \
                (d, has_delta)
        for flags in (dict(), dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False),
                      dict(REGULARIZE=True, HAS_DELTA=True, GLOBAL_MAX=False),
                      dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=True),
                      dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False, HAS_FRAMES=True)):
            kept = fwd._prune_tiled(fwd._tiled_configs(), args, BLOCK_D=block, BLOCK_DV=block, **flags)
            assert kept, flags
            if block > 128:
                assert all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs}


def test_tiled_forward_prune_keeps_each_archs_spill_free_tiles(fwd):
    """The tiles only one arch compiles without spills (tools/perf/kernel-log.md): 128 x 64 with 8 warps
    for the Gaussian at D <= 64 in 16-bit on sm_90 only; 128 x 32 with frame ids at D 128 dropped on
    sm_80. A GPU of another arch, or none named, keeps the list without these changes."""
    gaussian = dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False)

    def kept(sm, d=64, dtype=torch.float16, **flags):
        with _target(sm):
            return _tiles(fwd._prune_tiled(fwd._tiled_configs(), {"Q": torch.empty(1, dtype=dtype)}, BLOCK_D=d,
                                           BLOCK_DV=d, **{**gaussian, **flags}))

    assert (128, 64, 8) in kept(90) and (128, 64, 8) in kept(90, HAS_FRAMES=True)
    for other in (kept(80), kept(86), kept(100), kept(None), kept(90, dtype=torch.float32), kept(90, d=128),
                  kept(90, HAS_DELTA=True)):
        assert (128, 64, 8) not in other
    assert (128, 64, 8) in kept(80, REGULARIZE=False)  # no bias: both archs keep it
    for sm in (90, 100, None):
        assert (128, 32, 8) in kept(sm, d=128, HAS_FRAMES=True)
    assert (128, 32, 8) not in kept(80, d=128, HAS_FRAMES=True) and (128, 32, 8) not in kept(86, d=128, HAS_FRAMES=True)
    assert (128, 32, 8) in kept(80, d=64, HAS_FRAMES=True)
    # sm_80: a custom delta or frame ids keep 32-wide key tiles (64 x 64 spills there)
    for flags in (dict(HAS_DELTA=True), dict(HAS_FRAMES=True)):
        assert (64, 64, 8) in kept(90, **flags) and (64, 64, 8) in kept(None, **flags)
        assert (64, 64, 8) not in kept(80, **flags) and {bn for _, bn, _ in kept(80, **flags)} == {32}
    assert (64, 64, 8) in kept(80)


def test_tiled_backward_prune_drops_each_archs_frame_spills(bwd):
    """Frame ids in 16-bit at D <= 64: sm_80 drops the dQ pass's 64 x 32 tiles, sm_90 its 32 x 32 ones
    (each spills on that arch only); other archs keep both; without frame ids, at D 128 or in float32
    (which spill either way) nothing changes."""
    def kept(sm, d=64, dtype=torch.float16, frames=True):
        with _target(sm):
            return {t[:2] for t in _tiles(bwd._prune_tiled(bwd._tiled_configs(), {"Q": torch.empty(1, dtype=dtype)},
                                                          BLOCK_D=d, BLOCK_DV=d, HAS_DELTA=False, HAS_FRAMES=frames))}

    assert kept(80) == {(32, 32)} and kept(90) == {(64, 32)}
    assert kept(100) == kept(None) == kept(80, frames=False) == kept(90, dtype=torch.float32) == {(32, 32), (64, 32)}
    assert kept(80, d=128) == kept(90, d=128) == kept(None, d=128)


def test_target_sm_is_the_named_arch_or_none_off_cuda():
    assert target_sm(torch.empty(1)) is None
    with targeting(90):
        assert target_sm(torch.empty(1)) == 90
        with targeting(80):
            assert target_sm(torch.empty(1)) == 80
        assert target_sm(torch.empty(1)) == 90
    assert target_sm(torch.empty(1)) is None
