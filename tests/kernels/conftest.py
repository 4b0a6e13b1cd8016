"""Fixtures of the kernel tests."""

import pytest

from .._device import DEVICE


@pytest.fixture
def same_tiles(monkeypatch):
    """The speculative one pass and the two passes on one config. On a GPU the two forms are autotuned apart and
    may pick other tiles, whose sums run in another order (an H200 run did: 128 x 64 against 64 x 32); bit equality
    is a property of one tile shape, so each form runs the first config its pruning keeps, the same for both (the
    interpreter runs INTERPRETER_TILES already)."""
    if DEVICE != "cuda":
        return
    from vstar_kernels.ops import tar_fwd

    for tuner in (tar_fwd._tiled, tar_fwd._tiled_speculative):
        assert hasattr(tuner, "prune_configs"), "Triton's Autotuner changed: same_tiles cannot pin its config"
        monkeypatch.setattr(tuner, "prune_configs", lambda kwargs, prune=tuner.prune_configs: prune(kwargs)[:1])
        monkeypatch.setattr(tuner, "cache", {})
