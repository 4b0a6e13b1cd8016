"""The GPU autotuning config lists: every launchable shape keeps at least one valid config.

The interpreter runs one fixed config, so these pure-Python checks are what CPU CI
can say about the autotuned GPU launches.
"""

import pytest

from vstar_kernels._env import triton_ops


@pytest.fixture(scope="module")
def fwd():
    return triton_ops().module


@pytest.mark.parametrize("d", [8, 40, 64, 80, 128, 160, 256])
def test_packed_prune_keeps_valid_configs(fwd, d):
    block = fwd._pow2(d, fwd.DOT_MIN)
    for nq in range(1, 129):
        for nk in (1, 7, 16, 33, 100, 128):
            seg_max = fwd._pow2(max(nq, nk))
            if seg_max > fwd.packed_limit(block):
                continue
            meta = dict(SEG_Q=fwd._pow2(nq, seg_max // 4), SEG_K=fwd._pow2(nk, seg_max // 4), SEG_MAX=seg_max,
                        BLOCK_D=block, BLOCK_DV=block)
            kept = fwd._prune_packed(fwd._packed_configs(), {"BH": 1000}, **meta)
            assert kept, (nq, nk, d)
            for c in kept:
                seqs = c.kwargs["ROWS"] // seg_max
                assert seqs >= 1
                assert seqs * meta["SEG_Q"] >= 16 and seqs * meta["SEG_K"] >= 16
                assert c.kwargs["ROWS"] <= fwd.packed_limit(block)


@pytest.mark.parametrize("d", [8, 64, 128, 160, 256])
def test_tiled_prune_keeps_configs(fwd, d):
    block = fwd._pow2(d, fwd.DOT_MIN)
    kept = fwd._prune_tiled(fwd._tiled_configs(), {"BH": 10}, BLOCK_D=block, BLOCK_DV=block)
    assert kept
    if block > 128:
        assert all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)
