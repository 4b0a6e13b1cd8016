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
from vstar_kernels.ops.launch import BWD_PACKED, BWD_TILED, FWD_PACKED, FWD_TILED, FWD_TILED_SPECULATIVE, \
    SPECULATIVE_MAXNREG, common_meta, packed_segments, target_sm, targeting


def dims(d):
    """A forward launch's head-dim constexprs at head dim d (d = dv): its chunks (`launch.common_meta`)."""
    block, block2 = layout.head_chunks(d)
    return dict(BLOCK_D=block, BLOCK_D2=block2, BLOCK_DV=block, BLOCK_DV2=block2)


def bwd_dims(d):
    """A backward launch's: one power-of-two block (`launch.common_meta(chunked=False)`)."""
    return {k: v for k, v in common_meta(meta_problem(16, 16, d), chunked=False).items() if k.startswith("BLOCK")}


def meta_problem(nq, nk, d):
    q = torch.empty(2, 3, nq, d, device="meta")
    k = torch.empty(2, 3, nk, d, device="meta")
    return make_problem(q, k, k, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)


@pytest.mark.parametrize("d", [8, 40, 64, 80, 128, 160, 256])
def test_packed_prune_keeps_valid_configs(d):
    block = sum(layout.head_chunks(d))
    for nq in range(1, 129):
        for nk in (1, 7, 16, 33, 100, 128):
            if not layout.is_packed(nq, nk, d, d):
                continue
            seg_q, seg_k, seg_max = packed_segments(meta_problem(nq, nk, d))
            meta = dict(SEG_Q=seg_q, SEG_K=seg_k, SEG_MAX=seg_max, **dims(d))
            # the backward holds the head dim in one power-of-two block (launch.common_meta)
            whole = layout.pow2(d, layout.DOT_MIN)
            kept_bwd = BWD_PACKED.prune(BWD_PACKED.configs, {"BH": 1000}, SEG_Q=seg_q, SEG_K=seg_k,
                                        SEG_MAX=seg_max, BLOCK_D=whole, BLOCK_DV=whole)
            assert kept_bwd and all(c.kwargs["ROWS"] >= seg_max for c in kept_bwd), (nq, nk, d)
            if whole > 64:  # 64 rows and more on 8 warps (4 spilled at D 80)
                assert all(c.num_warps == 8 for c in kept_bwd if c.kwargs["ROWS"] >= 64), (nq, nk, d)
            kept = FWD_PACKED.prune(FWD_PACKED.configs, {"BH": 1000}, **meta)
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
@pytest.mark.parametrize("d", [8, 40, 64, 72, 80, 96, 128, 160, 256])
def test_tiled_prune_keeps_configs(d, dtype, sm):
    block = sum(layout.head_chunks(d))
    args = {"BH": 10, "Q": torch.empty(1, dtype=dtype)}
    with _target(sm):
        for has_delta, frames in itertools.product((False, True), (False, True)):
            kept_bwd = BWD_TILED.prune(BWD_TILED.configs, args, **bwd_dims(d),
                                        HAS_DELTA=has_delta, HAS_FRAMES=frames)
            # the dK/dV pass runs these too; neither pass may hold more than a 64 x 32 score tile
            assert kept_bwd and all(c.kwargs["BLOCK_N"] <= c.kwargs["BLOCK_M"] <= 64 for c in kept_bwd), \
                (d, has_delta)
        for flags in (dict(), dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False),
                      dict(REGULARIZE=True, HAS_DELTA=True, GLOBAL_MAX=False),
                      dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=True),
                      dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False, HAS_FRAMES=True)):
            kept = FWD_TILED.prune(FWD_TILED.configs, args, **dims(d), **flags)
            assert kept, flags
            if block > 128:
                assert all(c.kwargs["BLOCK_M"] <= 64 and c.kwargs["BLOCK_N"] <= 64 for c in kept)


def _tiles(configs):
    return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps) for c in configs}


def test_tiled_forward_prune_keeps_each_archs_spill_free_tiles():
    """The tiles only one arch compiles without spills (tools/perf/kernel-log.md): 128 x 64 with 8 warps
    for the Gaussian at D <= 64 in 16-bit on sm_90 only; 128 x 32 with frame ids at D 128 dropped on
    sm_80. A GPU of another arch, or none named, keeps the list without these changes."""
    gaussian = dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False)

    def kept(sm, d=64, dtype=torch.float16, **flags):
        with _target(sm):
            return _tiles(FWD_TILED.prune(FWD_TILED.configs, {"Q": torch.empty(1, dtype=dtype)}, BLOCK_D=d,
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


def test_sm90_frame_ids_keep_128_x_64_at_head_dim_128():
    """sm_90, frame ids with the row max and the 16-bit Gaussian in 128 columns: 128 x 64 on 8 warps with 2
    stages beside 128 x 32 (compiled at Wan 480p without spills in its loops, kernel log v7 and v7b); not with 3
    stages (the speculative form spills in its loops), nor on another arch, in float32, without frame ids, with
    the global max, a custom delta, a causal or key mask, or at head dims held in other columns (v's included),
    none of which was compiled there."""
    def kept(sm, d=128, dtype=torch.float16, dv=None, **flags):
        flags = {**dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False, HAS_FRAMES=True), **flags}
        dims_v = dims(d if dv is None else dv)
        with _target(sm):
            configs = FWD_TILED.prune(FWD_TILED.configs, {"Q": torch.empty(1, dtype=dtype)}, **{
                **dims(d), "BLOCK_DV": dims_v["BLOCK_DV"], "BLOCK_DV2": dims_v["BLOCK_DV2"]}, **flags)
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) for c in configs}

    for dtype in (torch.float16, torch.bfloat16):
        for d in (128, 112):  # 112 is held in one block of 128 columns
            tiles = kept(90, d, dtype)
            assert (128, 64, 8, 2) in tiles and (128, 64, 8, 3) not in tiles and (128, 32, 8, 2) in tiles, (d, tiles)
    for other in (kept(80), kept(None), kept(100), kept(90, dtype=torch.float32), kept(90, HAS_FRAMES=False),
                  kept(90, GLOBAL_MAX=True), kept(90, HAS_DELTA=True), kept(90, CAUSAL=True),
                  kept(90, HAS_KEY_MASK=True), kept(90, dv=64), kept(90, d=64, dv=128), kept(90, d=80),
                  kept(90, d=96), kept(90, d=160)):
        assert not {t for t in other if t[:3] == (128, 64, 8)}, other


def test_sm90_gaussian_keeps_128_rows_at_chunked_head_dims():
    """sm_90, the 16-bit Gaussian without frame ids at head dims held in 80 or 96 columns: 128 x 32 and
    128 x 64 on 8 warps (compiled without spills); not with frame ids, a custom delta, float32, on
    another arch, or at a head dim held in 128 columns."""
    gaussian = dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False)

    def kept(sm, d=80, dtype=torch.float16, **flags):
        with _target(sm):
            return _tiles(FWD_TILED.prune(FWD_TILED.configs, {"Q": torch.empty(1, dtype=dtype)}, **dims(d),
                                           **{**gaussian, **flags}))

    for d in (72, 80, 88, 96):
        assert {(128, 32, 8), (128, 64, 8)} <= kept(90, d)
    for other in (kept(80), kept(None), kept(100), kept(90, 112), kept(90, 128), kept(90, HAS_DELTA=True),
                  kept(90, dtype=torch.float32)):
        assert not {(128, 32, 8), (128, 64, 8)} & other
    assert (128, 64, 8) not in kept(90, HAS_FRAMES=True) and (128, 32, 8) in kept(90, HAS_FRAMES=True)


def test_sm80_bias_keeps_32_keys_at_chunked_head_dims():
    """sm_8x, the 16-bit bias at head dims held in 80 or 96 columns: 32-key tiles only (64 x 64 spilled
    at D 80); D 128 and sm_90 keep 64 x 64."""
    def keys(sm, d):
        with _target(sm):
            kept = FWD_TILED.prune(FWD_TILED.configs, {"Q": torch.empty(1, dtype=torch.float16)}, **dims(d),
                                   REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False)
        return {c.kwargs["BLOCK_N"] for c in kept}

    assert keys(80, 80) == keys(86, 96) == {32}
    assert 64 in keys(80, 128) and 64 in keys(90, 80) and 64 in keys(None, 80)


def test_backward_tiles_at_chunked_head_dims_are_the_padded_ones():
    """The backward holds a head dim in one power-of-two block (launch.common_meta), so at D 80 and 96
    its tiles are D 128's: 32 x 32 on 8 warps on sm_80, sm_90 and unnamed GPUs alike."""
    def kept(sm, d):
        with _target(sm):
            return _tiles(BWD_TILED.prune(BWD_TILED.configs, {"Q": torch.empty(1, dtype=torch.float16)},
                                           **bwd_dims(d), HAS_DELTA=False, HAS_FRAMES=False))

    assert bwd_dims(80) == bwd_dims(96) == dict(BLOCK_D=128, BLOCK_DV=128)
    for sm in (80, 90, None):
        assert kept(sm, 80) == kept(sm, 96) == {(32, 32, 8)}


def test_tiled_backward_prune_drops_each_archs_spills():
    """16-bit at D <= 64: sm_90 keeps 64 x 32 on 8 warps only (32 x 32 untimed, kernel log v8), a custom delta
    included; sm_80 drops 64 x 32 for frame ids. Other archs keep the list; at D 128 nothing changes."""
    def kept(sm, d=64, dtype=torch.float16, frames=True, delta=False):
        with _target(sm):
            return _tiles(BWD_TILED.prune(BWD_TILED.configs, {"Q": torch.empty(1, dtype=dtype)},
                                           BLOCK_D=d, BLOCK_DV=d, HAS_DELTA=delta, HAS_FRAMES=frames))

    assert {t[:2] for t in kept(80)} == {(32, 32)}
    for frames, delta in itertools.product((False, True), (False, True)):
        assert kept(90, frames=frames, delta=delta) == {(64, 32, 8)}
    assert kept(100) == kept(None) == kept(80, frames=False) == {(32, 32, 4), (32, 32, 8), (64, 32, 8)}
    assert kept(80, delta=True, frames=False) == kept(None, delta=True) == {(32, 32, 4), (32, 32, 8)}
    assert kept(80, d=128) == kept(90, d=128) == kept(None, d=128)


@pytest.mark.parametrize("d", [8, 64, 80, 128, 160, 256])
def test_float32_takes_its_own_tiles(d):
    """float32 (the tf32x3 dot) takes 32 x 32 forward tiles (sm_90: its 64- and 128-row tiles with 32 keys
    and 2 stages) and 16-key backward tiles (16 x 16 on sm_90); in 65-80 forward columns 64 x 16 on 8 warps
    alone and in a 128-column backward block 16 x 16 on 8 warps alone, on every arch (the tiles kept before spilled
    40-584 B at D 80 on sm_80 and sm_90, kernel log v6e); 16-bit inputs never take these."""
    block = sum(layout.head_chunks(d))
    whole = layout.pow2(d, layout.DOT_MIN)  # the backward's one block
    gaussian = dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False)
    for sm, delta in itertools.product((None, 80, 86, 90, 100), (False, True)):
        with _target(sm):
            def prune(dtype):
                args = {"Q": torch.empty(1, dtype=dtype)}
                return (_tiles(FWD_TILED.prune(FWD_TILED.configs, args, **dims(d),
                                                **{**gaussian, "HAS_DELTA": delta})),
                        _tiles(BWD_TILED.prune(BWD_TILED.configs, args, **bwd_dims(d),
                                                HAS_DELTA=delta, HAS_FRAMES=False)))

            fwd32, bwd32 = prune(torch.float32)
            fwd16, bwd16 = prune(torch.float16)
        assert fwd32 and bwd32 and {bn for _, bn, _ in bwd32} == {16}
        assert (bwd32 == {(16, 16, 8)}) == (64 < whole <= 128)
        if 64 < block <= 80:
            assert fwd32 == {(64, 16, 8)}
        elif sm == 90:
            assert {bn for _, bn, _ in fwd32} == {32} and min(bm for bm, _, _ in fwd32) == 64
            assert {bm for bm, _, _ in bwd32} == {16} or block > 128  # above 128 every tile spills
        else:
            assert {bm for bm, _, _ in fwd32} == {32}
        assert all(bm > 32 and bn > 16 for bm, bn, _ in fwd16) and all(bn > 16 for _, bn, _ in bwd16)
    with targeting(90):
        hopper = FWD_TILED.prune(FWD_TILED.configs, {"Q": torch.empty(1)}, BLOCK_D=64, BLOCK_DV=64, **gaussian)
    assert {c.num_stages for c in hopper} == {2}


def test_sm80_bias_keeps_two_stages_for_64_x_32():
    """16-bit, the bias at D <= 64 and at 96 columns on sm_8x: 64 x 32 with 3 stages spilled; 2 stages stay,
    other tiles keep 3 (and D 80: 64 x 32 with 3 stages compiled without spills)."""
    def stages(sm, d=64, **flags):
        with _target(sm):
            kept = FWD_TILED.prune(FWD_TILED.configs, {"Q": torch.empty(1, dtype=torch.float16)}, **dims(d),
                                   **{"REGULARIZE": True, "HAS_DELTA": False, "GLOBAL_MAX": False, **flags})
        return {(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_stages) for c in kept}

    for flags in (dict(), dict(HAS_DELTA=True), dict(HAS_FRAMES=True)):
        assert (64, 32, 2) in stages(80, **flags) and (64, 32, 3) not in stages(80, **flags)
        assert (128, 32, 3) in stages(80, **flags)
        assert (64, 32, 3) in stages(90, **flags) and (64, 32, 3) in stages(None, **flags)
    assert (64, 32, 3) in stages(80, d=128) and (64, 32, 3) in stages(80, REGULARIZE=False)
    assert (64, 32, 3) not in stages(80, d=96) and (64, 32, 3) in stages(80, d=80)


@pytest.mark.parametrize("d", [40, 64, 80, 128, 160, 256])
def test_float32_packed_programs_hold_few_operand_words(d):
    """float32 packed programs keep their Q, K, V (and dO) tiles, split for the tf32x3 dot, at 96 (forward)
    and 128 (backward) words a thread: 128 rows take 8 warps at D 40 (4 warps spilled)."""
    whole = layout.pow2(d, layout.DOT_MIN)  # the backward's one block (launch.common_meta)
    for n in (16, 32, 64, 128):
        if not layout.is_packed(n, n, d, d):  # above head dim 128 a packed sequence has at most 64 rows
            continue
        seg = layout.pow2(n, layout.DOT_MIN)
        for tuning, limit, operands, block, heads in ((FWD_PACKED, 96, 3, sum(layout.head_chunks(d)), dims(d)),
                                                      (BWD_PACKED, 128, 4, whole, bwd_dims(d))):
            meta = dict(SEG_Q=seg, SEG_K=seg, SEG_MAX=seg, **heads)
            kept16 = tuning.prune(tuning.configs, {"Q": torch.empty(1, dtype=torch.float16)}, **meta)
            kept32 = tuning.prune(tuning.configs, {"Q": torch.empty(1)}, **meta)
            assert kept32 and set(kept32) <= set(kept16)
            words = [c.kwargs["ROWS"] * operands * block / (32 * c.num_warps) for c in kept32]
            assert max(words) <= limit or len(set(words)) == 1, (n, words)
    kept = _tiles_rows(FWD_PACKED.prune(FWD_PACKED.configs, {"Q": torch.empty(1)}, SEG_Q=16, SEG_K=16,
                                         SEG_MAX=16, BLOCK_D=64, BLOCK_DV=64))
    assert (128, 8) in kept and (128, 4) not in kept and (128, 2) not in kept


def _tiles_rows(configs):
    return {(c.kwargs["ROWS"], c.num_warps) for c in configs}


def test_target_sm_is_the_named_arch_or_none_off_cuda():
    assert target_sm(torch.empty(1)) is None
    with targeting(90):
        assert target_sm(torch.empty(1)) == 90
        with targeting(80):
            assert target_sm(torch.empty(1)) == 80
        assert target_sm(torch.empty(1)) == 90
    assert target_sm(torch.empty(1)) is None


@pytest.mark.parametrize("sm", [80, 90])
@pytest.mark.parametrize("d", [16, 64, 80, 128])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_speculative_configs_add_register_capped_64_x_32(sm, d, dtype):
    """The speculative one pass keeps the two passes' configs, in their order, each 64 x 32 on 4 warps followed by
    the same capped at SPECULATIVE_MAXNREG registers on sm_90 at 16 bits up to head dim 64 (nothing else, nowhere
    else): the first and the last config the two
    forms keep are the same (the tests' `same_tiles`, `tools.perf static`'s first-and-last), and a launch that
    follows the speculative form's config (the redo) runs its cap (`tuned_config`)."""
    frames = dict(REGULARIZE=True, HAS_DELTA=False, GLOBAL_MAX=False, HAS_FRAMES=True)
    with _target(sm):
        args = {"Q": torch.empty(1, dtype=dtype)}
        plain = FWD_TILED.prune(FWD_TILED.configs, args, **dims(d), **frames)
        spec = FWD_TILED_SPECULATIVE.prune(FWD_TILED_SPECULATIVE.configs, args, **dims(d), **frames)
    capping = sm == 90 and dtype != torch.float32 and d <= 64
    tile = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps)  # noqa: E731
    expected = [x for c in plain for x in ([c, c] if capping and tile(c) == (64, 32, 4) else [c])]
    key = lambda c: (c.kwargs, c.num_warps, c.num_stages)  # noqa: E731
    assert [key(c) for c in spec] == [key(c) for c in expected] and spec[0] is plain[0] and spec[-1] is plain[-1]
    capped = [c for c in spec if c.maxnreg]
    assert all(c.maxnreg == SPECULATIVE_MAXNREG and key(c)[1:] == (4, c.num_stages) for c in capped)
    assert len(capped) == capping * sum(1 for c in plain if tile(c) == (64, 32, 4))
    assert capped or not (capping and d == 64)  # CogVideoX's and LTX-Video's launch keep it


def test_tuned_config_carries_the_register_cap(monkeypatch):
    from vstar_kernels.ops import launch

    monkeypatch.setattr(launch, "INTERPRETING", False)
    capped = next(c for c in FWD_TILED_SPECULATIVE.configs if c.maxnreg)
    tuner = type("Tuner", (), {"best_config": capped})()
    assert launch.tuned_config(tuner, "forward") == dict(BLOCK_M=64, BLOCK_N=32, num_warps=4,
                                                         num_stages=capped.num_stages, maxnreg=SPECULATIVE_MAXNREG)
    tuner.best_config = FWD_TILED.configs[0]
    assert "maxnreg" not in launch.tuned_config(tuner, "forward")


def test_a_tuned_launch_reads_its_own_config_while_another_thread_launches(monkeypatch):
    """The autotuner keeps its latest choice only: a launch from another thread between a launch and the read of
    its config gave the redo (and the dK/dV pass) that thread's tiles. launch_tuned makes them one step."""
    import threading

    from vstar_kernels.ops import launch

    monkeypatch.setattr(launch, "INTERPRETING", False)
    first, second = FWD_TILED.configs[0], FWD_TILED.configs[-1]
    assert first.kwargs != second.kwargs
    in_first = threading.Event()

    class Tuner:  # a launch sets best_config to its key's config, as triton's Autotuner does
        best_config = None

        def __getitem__(self, grid):
            def run(config):
                self.best_config = config
                if config is first:  # the other thread launches while this launch runs (it waits on the lock)
                    in_first.set()
                    other.join(timeout=0.5)
            return run

    tuner = Tuner()
    seen = {}
    other = threading.Thread(target=lambda: in_first.wait(5) and seen.update(
        second=launch.launch_tuned(tuner, None, "forward", second)))
    other.start()
    seen["first"] = launch.launch_tuned(tuner, None, "forward", first)
    other.join()
    expected = {name: launch.tuned_config(type("T", (), {"best_config": c})(), "forward")
                for name, c in (("first", first), ("second", second))}
    assert seen == expected
