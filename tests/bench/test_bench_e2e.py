"""The end-to-end UNet case on a tiny UNet3DConditionModel (CPU: TAR's Triton variant runs in the interpreter).

A small stand-in with the integration's API (apply_tar, remove_tar) drives the harness; the
last test runs the real `vstar_kernels.diffusers`.
"""

import functools
import sys
import types

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels.bench import e2e, measure, shapes
from vstar_kernels.bench.check import UNET_RTOL
from vstar_kernels.bench.harness import classify

from .._device import DEVICE

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

pytest.importorskip("diffusers", reason="the end-to-end case needs diffusers")

TINY = shapes.SHAPES["unet-tiny"]
DTYPE = torch.float16 if DEVICE == "cuda" else torch.float32


class _TarProcessor:
    """Self-attention over frames with TAR, for the stand-in integration."""

    def __init__(self, backend, sigma):
        self.backend, self.sigma = backend, sigma

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        assert encoder_hidden_states is None and attention_mask is None
        b, n, _ = hidden_states.shape
        q, k, v = (proj(hidden_states).view(b, n, attn.heads, -1).transpose(1, 2)
                   for proj in (attn.to_q, attn.to_k, attn.to_v))
        out = vk.tar_attention(q, k, v, sigma=self.sigma, backend=self.backend)
        return attn.to_out[1](attn.to_out[0](out.transpose(1, 2).reshape(b, n, -1)))


def stand_in(applies=True):
    """A module with the integration's API; TAR on the finest level's temporal attention (preset 64D1)."""

    def apply_tar_checked(unet, cfg):
        assert cfg.until_step is None, "timed calls must all be regularized"
        apply_tar(unet, cfg)

    def apply_tar(unet, cfg):
        unet._saved_processors = dict(unet.attn_processors)
        last_up = f"up_blocks.{len(unet.up_blocks) - 1}."
        procs = {name: (_TarProcessor(cfg.backend, cfg.levels[0].sigma)
                        if applies and "temp_attentions" in name and name.startswith(("down_blocks.0.", last_up))
                        else proc)
                 for name, proc in unet._saved_processors.items()}
        unet.set_attn_processor(procs)

    def remove_tar(unet):
        unet.set_attn_processor(unet.__dict__.pop("_saved_processors"))

    return types.SimpleNamespace(apply_tar=apply_tar_checked, remove_tar=remove_tar)


@pytest.fixture(scope="module")
def bench():
    return e2e.UNetBench(torch.device(DEVICE))


@pytest.fixture(autouse=True)
def two_timed_calls(monkeypatch):
    """CPU forwards with the interpreter are slow: time two calls (the quantile code is tested elsewhere)."""
    monkeypatch.setattr(measure, "time_cpu", functools.partial(measure.time_cpu, min_reps=2, max_reps=2))


def run_with(monkeypatch, bench, module):
    monkeypatch.setitem(sys.modules, "vstar_kernels.diffusers", module)
    return {r.impl: r for r in bench.run(TINY, 8, DTYPE, classify)}


def test_three_variants_checked_and_timed(monkeypatch, bench):
    """On CPU the Triton variant runs in the interpreter: checked, not timed."""
    results = run_with(monkeypatch, bench, stand_in())
    assert list(results) == list(e2e.VARIANTS)
    assert [e2e.BACKENDS[r.impl] for r in results.values()] == ["", "triton", "reference"]
    for res in results.values():
        if res.impl == "unet_tar_triton" and DEVICE == "cpu":
            assert res.status == e2e.CHECKED_ONLY and res.timing is None
            continue
        assert res.status == "ok", res.status
        assert 0 < res.timing.p20_ms <= res.timing.median_ms <= res.timing.p80_ms
        assert (res.peak_mb is not None) == (DEVICE == "cuda")
    unet = bench.model(TINY.config, DTYPE)
    assert not hasattr(unet, "_saved_processors")  # remove_tar ran after each variant
    assert not any(isinstance(p, _TarProcessor) for p in unet.attn_processors.values())


def test_tar_that_changes_nothing_is_an_error(monkeypatch, bench):
    results = run_with(monkeypatch, bench, stand_in(applies=False))
    assert results["unet_stock"].status == "ok"
    for v in ("unet_tar_triton", "unet_tar_reference"):
        assert results[v].status == "error: the forward made no tar_attention call: TAR was not applied"
        assert results[v].timing is None


def test_triton_variant_must_match_the_reference_variant():
    res = {v: e2e.Result(v) for v in e2e.VARIANTS}
    stock = torch.ones(2, 4, 8, 4, 4)
    ref = stock * 1.5
    e2e.UNetBench._check(res, {"unet_stock": stock, "unet_tar_reference": ref,
                               "unet_tar_triton": ref * (1 + 2 * UNET_RTOL[torch.float32])}, torch.float32, CALLED)
    assert res["unet_tar_triton"].status.startswith("error: output differs from the reference variant")
    assert res["unet_tar_reference"].status == res["unet_stock"].status == "ok"
    res = {v: e2e.Result(v) for v in e2e.VARIANTS}
    e2e.UNetBench._check(res, {"unet_stock": stock, "unet_tar_reference": ref, "unet_tar_triton": ref * torch.nan},
                         torch.float32, CALLED)
    assert res["unet_tar_triton"].status == "error: output has NaN or inf"


# each TAR variant's forward made tar_attention calls
CALLED = {"unet_stock": 0, "unet_tar_triton": 12, "unet_tar_reference": 12}


def test_tar_is_told_by_its_calls_and_a_change_not_by_the_backends_distance():
    """TAR applied: the forward called tar_attention and moved the output by more than E2E_APPLIED_MIN. The first
    GPU run's bf16 UNet at 32 frames (TAR moved it by 0.0245, its two backends 0.0134 apart) is TAR, which a check
    against twice the backends' distance called "not applied"."""
    stock = torch.ones(2, 4, 8, 4, 4)
    res = {v: e2e.Result(v) for v in e2e.VARIANTS}
    e2e.UNetBench._check(res, {"unet_stock": stock, "unet_tar_reference": stock * 1.0245,
                               "unet_tar_triton": stock * 1.0245 * 1.0134}, torch.bfloat16, CALLED)
    assert {r.status for r in res.values()} == {"ok"}
    res = {v: e2e.Result(v) for v in e2e.VARIANTS}
    e2e.UNetBench._check(res, {"unet_stock": stock, "unet_tar_reference": stock * 1.0005,
                               "unet_tar_triton": stock * 1.0005}, torch.float16, CALLED)
    for v in ("unet_tar_triton", "unet_tar_reference"):
        assert res[v].status == "error: apply_tar moved the output by 0.0005 (relative), no more than 0.001: TAR " \
                                "changed nothing"
    res = {v: e2e.Result(v) for v in e2e.VARIANTS}
    e2e.UNetBench._check(res, {"unet_stock": stock, "unet_tar_reference": stock * 1.5, "unet_tar_triton": stock * 1.5},
                         torch.float16, {**CALLED, "unet_tar_triton": 0})
    assert res["unet_tar_triton"].status == "error: the forward made no tar_attention call: TAR was not applied"
    assert res["unet_tar_reference"].status == "ok"


def test_missing_integration_or_diffusers_is_unsupported(monkeypatch, bench):
    monkeypatch.setitem(sys.modules, "vstar_kernels.diffusers", None)  # importing it fails
    results = {r.impl: r for r in bench.run(TINY, 8, DTYPE, classify)}
    assert results["unet_stock"].status == "ok"
    for v in ("unet_tar_triton", "unet_tar_reference"):
        assert results[v].status.startswith("unsupported: the diffusers integration is not available")
    monkeypatch.setitem(sys.modules, "diffusers", None)
    for res in e2e.UNetBench(torch.device(DEVICE)).run(TINY, 8, DTYPE, classify):
        assert res.status.startswith("unsupported: diffusers not installed")


def test_with_the_real_integration(bench):
    pytest.importorskip("vstar_kernels.diffusers", reason="vstar_kernels.diffusers is not in this checkout yet")
    results = {r.impl: r for r in bench.run(TINY, 8, DTYPE, classify)}
    checked = e2e.CHECKED_ONLY if DEVICE == "cpu" else "ok"
    assert {v: r.status for v, r in results.items()} == {"unet_stock": "ok", "unet_tar_triton": checked,
                                                         "unet_tar_reference": "ok"}


def test_the_integration_is_taken_without_a_deprecated_name(recwarn):
    pytest.importorskip("vstar_kernels.diffusers")
    e2e._integration()
    assert not [w for w in recwarn if issubclass(w.category, DeprecationWarning) and "vstar_kernels" in str(w.message)]
