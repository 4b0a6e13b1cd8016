"""The GPU autotuning config lists: every launchable shape keeps at least one valid config.

The interpreter runs one fixed config, so these pure-Python checks are what CPU CI
can say about the autotuned GPU launches.
"""

import pytest
import torch

from vstar_kernels._validation import make_problem
from vstar_kernels.ops import layout
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


@pytest.mark.parametrize("d", [8, 64, 128, 160, 256])
def test_tiled_prune_keeps_configs(fwd, bwd, d):
    block = layout.pow2(d, layout.DOT_MIN)
    for has_delta in (False, True):
        kept_bwd = bwd._prune_tiled(bwd._tiled_configs(), {"BH": 10}, BLOCK_D=block, BLOCK_DV=block,
                                    HAS_DELTA=has_delta)
        # the dK/dV pass runs these too; neither pass may hold more than a 64 x 32 score tile
        assert kept_bwd and all(c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"] <= 64 for c in kept_bwd), (d, has_delta)
    for flags in (dict(), dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False),
                  dict(REGULARIZE=True, HAS_DELTA=True, GLOBAL_MAX=False),
                  dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=True)):
        kept = fwd._prune_tiled(fwd._tiled_configs(), {"BH": 10}, BLOCK_D=block, BLOCK_DV=block, **flags)
        assert kept, flags
        if block > 128:
            assert all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
