"""End-to-end: one UNet3DConditionModel forward (random weights), stock and with `apply_tar` (preset 64D1) on
each backend, checked before timed (benchmarks/NOTES.md, "UNet rows"); on CPU the Triton variant is only checked.
"""

from __future__ import annotations

import contextlib
import importlib
from dataclasses import dataclass
from typing import Optional

import torch

from ..tar_config import TARConfig
from . import measure
from .check import UNET_RTOL
from .peers import Unsupported, checked_only
from .shapes import CFG_BATCH, UNetShape

# UNet3DConditionModel configs; "modelscope" is ModelScope's text-to-video UNet (1.4B; heads 5/10/20 x 64).
UNET_CONFIGS = {
    "modelscope": dict(
        in_channels=4, out_channels=4, block_out_channels=(320, 640, 1280, 1280), layers_per_block=2,
        down_block_types=("CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=64, cross_attention_dim=1024, norm_num_groups=32, sample_size=32,
    ),
    "tiny": dict(
        in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=8, cross_attention_dim=32, norm_num_groups=8, sample_size=4,
    ),
}
# Each variant and the backend apply_tar is given ("" for stock processors).
BACKENDS = {"unet_stock": "", "unet_tar_triton": "triton", "unet_tar_reference": "reference"}
VARIANTS = tuple(BACKENDS)
PRESET = "64D1"
TEXT_TOKENS = 77
# Least relative change of the output that counts as TAR applied (benchmarks/NOTES.md, "UNet rows").
E2E_APPLIED_MIN = 1e-3
CHECKED_ONLY = checked_only("the reference variant")


@dataclass
class Result:
    impl: str
    status: str = "ok"
    timing: Optional[measure.Timing] = None
    peak_mb: Optional[float] = None


def _integration():
    """(apply_tar, remove_tar) from vstar_kernels.diffusers, or raise Unsupported."""
    try:
        mod = importlib.import_module("vstar_kernels.diffusers")
        return mod.apply_tar, mod.remove_tar
    except Exception as exc:
        raise Unsupported(f"the diffusers integration is not available (vstar_kernels.diffusers: "
                          f"{type(exc).__name__}: {exc})") from None


@contextlib.contextmanager
def _tar_calls():
    """[n]: how many tar_attention calls (any front end's: they all pass functional.tar_attention) ran inside."""
    from .. import functional

    real, count = functional.tar_attention_op, [0]

    def counted(*args, **kwargs):
        count[0] += 1
        return real(*args, **kwargs)

    functional.tar_attention_op = counted
    try:
        yield count
    finally:
        functional.tar_attention_op = real


@contextlib.contextmanager
def _status_of(result: Result, classify):
    """An exception in the block becomes `result`'s status."""
    try:
        yield
    except Exception as exc:
        result.status = classify(exc)


class UNetBench:
    """Builds each (config, dtype) model once and runs the three variants on it."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self._key = None
        self._unet = None

    def model(self, config: str, dtype: torch.dtype):
        if self._key != (config, dtype):
            self._unet = None
            if self.cuda:
                torch.cuda.empty_cache()
            from diffusers import UNet3DConditionModel
            from diffusers.utils import logging as dlogging

            torch.manual_seed(0)
            verbosity = dlogging.get_verbosity()
            dlogging.set_verbosity_error()  # random weights cast whole: no from_pretrained dtype advice
            try:
                with torch.device(self.device):
                    unet = UNet3DConditionModel(**UNET_CONFIGS[config])
                self._unet = unet.to(dtype).eval().requires_grad_(False)
            finally:
                dlogging.set_verbosity(verbosity)
            self._key = (config, dtype)
        return self._unet

    def run(self, shape: UNetShape, frames: int, dtype: torch.dtype, classify) -> list:
        """One Result per variant: every output checked, then those that passed timed; `classify(exc)` maps an
        exception to a status."""
        try:
            importlib.import_module("diffusers")
        except Exception as exc:
            return [Result(v, f"unsupported: diffusers not installed ({type(exc).__name__}: {exc})") for v in VARIANTS]
        try:
            unet = self.model(shape.config, dtype)
            cfg = UNET_CONFIGS[shape.config]
            gen = torch.Generator(device="cpu").manual_seed(1)
            lh, lw = shape.latent_hw
            sample = torch.randn(CFG_BATCH, cfg["in_channels"], frames, lh, lw, generator=gen).to(self.device, dtype)
            text = torch.randn(CFG_BATCH, TEXT_TOKENS, cfg["cross_attention_dim"], generator=gen).to(self.device, dtype)
            timestep = torch.tensor([500], device=self.device)
        except Exception as exc:
            return [Result(v, classify(exc)) for v in VARIANTS]

        def forward():
            with torch.no_grad():
                return unet(sample, timestep, encoder_hidden_states=text).sample

        results, outputs, calls = {v: Result(v) for v in VARIANTS}, dict.fromkeys(VARIANTS), dict.fromkeys(VARIANTS, 0)
        for v, res in results.items():
            with _status_of(res, classify), self._variant(unet, v), _tar_calls() as count:
                outputs[v] = forward()
            calls[v] = count[0]
        self._check(results, outputs, dtype, calls)
        if not self.cuda and results["unet_tar_triton"].status == "ok":
            results["unet_tar_triton"].status = CHECKED_ONLY
        for v, res in results.items():
            if res.status == "ok":
                with _status_of(res, classify), self._variant(unet, v):
                    res.timing, res.peak_mb = measure.time_call(forward, self.device)
        return list(results.values())

    @contextlib.contextmanager
    def _variant(self, unet, variant):
        """The UNet with TAR applied for the duration (stock: as it is)."""
        if not BACKENDS[variant]:
            yield
            return
        apply_tar, remove_tar = _integration()
        # until_step=None: on a bare model every forward call is one step, and the timing loop makes
        # far more calls than the preset's 14 regularized steps; every timed call must carry TAR.
        apply_tar(unet, TARConfig.from_preset(PRESET, until_step=None, backend=BACKENDS[variant]))
        try:
            yield
        finally:
            remove_tar(unet)

    @staticmethod
    def _check(results, outputs, dtype, calls):
        """Mark wrong outputs: NaN/inf, TAR not applied (no `tar_attention` call in the forward, `calls[variant]`,
        or no change from stock beyond E2E_APPLIED_MIN), or Triton far from the reference variant."""
        for variant, out in list(outputs.items()):
            if out is not None and not torch.isfinite(out).all():
                results[variant].status = "error: output has NaN or inf"
                outputs[variant] = None
            elif out is not None and BACKENDS[variant] and not calls[variant]:
                results[variant].status = "error: the forward made no tar_attention call: TAR was not applied"
                outputs[variant] = None
        ref, tri, stock = (outputs[v] for v in ("unet_tar_reference", "unet_tar_triton", "unet_stock"))
        rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
        err = rel(tri, ref) if tri is not None and ref is not None else None
        if ref is not None and stock is not None:
            change = rel(ref, stock)
            if not change > E2E_APPLIED_MIN:
                for v in ("unet_tar_reference", "unet_tar_triton"):
                    if results[v].status == "ok":
                        results[v].status = (f"error: apply_tar moved the output by {change:.3g} (relative), no more "
                                             f"than {E2E_APPLIED_MIN:g}: TAR changed nothing")
                return
        if tri is not None and ref is None:
            results["unet_tar_triton"].status = "error: no reference-variant output to check against"
        elif err is not None and not err <= UNET_RTOL[dtype]:
            results["unet_tar_triton"].status = (f"error: output differs from the reference variant: "
                                                 f"relative error {err:.3g} > {UNET_RTOL[dtype]}")
