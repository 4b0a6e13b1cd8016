"""Named benchmark shapes (real video UNets' temporal attention calls) and the sweep presets. A call's batch is
the CFG batch (2) times the latent height x width at its level (each level halves both)."""

from __future__ import annotations

from dataclasses import dataclass

CFG_BATCH = 2
KERNEL_N = (16, 32, 64, 128, 256, 512, 1024, 2048)
E2E_FRAMES = (16, 32, 64)


@dataclass(frozen=True)
class KernelShape:
    """One temporal attention call: q, k, v are (batch, heads, n, head_dim), n swept."""

    name: str
    batch: int
    heads: int
    head_dim: int
    source: str


@dataclass(frozen=True)
class UNetShape:
    """One UNet3DConditionModel forward: CFG batch x frames x latent (height, width)."""

    name: str
    config: str          # key of vstar_kernels.bench.e2e.UNET_CONFIGS
    latent_hw: tuple
    heads: int           # of the level-0 temporal attention
    head_dim: int
    frames: tuple        # default frame counts
    source: str

    @property
    def batch(self) -> int:
        """Sequences per head of the level-0 temporal attention: how e2e rows name the resolution."""
        return CFG_BATCH * self.latent_hw[0] * self.latent_hw[1]


def _temporal(name, latent_hw, level, heads, head_dim, source) -> KernelShape:
    h, w = latent_hw
    return KernelShape(name, CFG_BATCH * (h >> level) * (w >> level), heads, head_dim, source)


_KERNEL = (
    # VideoCrafter2 / ModelScope UNet: heads 5/10/20 with head dim 64 at levels 0/1/2.
    _temporal("vc2-320x512-l0", (40, 64), 0, 5, 64, "VideoCrafter2 320x512, level 0"),
    _temporal("vc2-320x512-l1", (40, 64), 1, 10, 64, "VideoCrafter2 320x512, level 1"),
    _temporal("vc2-320x512-l2", (40, 64), 2, 20, 64, "VideoCrafter2 320x512, level 2"),
    _temporal("modelscope-256x256-l0", (32, 32), 0, 5, 64, "ModelScope T2V 256x256, level 0"),
    _temporal("zeroscope-576x320-l0", (40, 72), 0, 5, 64, "Zeroscope v2 576x320, level 0"),
    # AnimateDiff motion modules: 8 heads, head dim = channels / 8.
    _temporal("animatediff-512x512-l0", (64, 64), 0, 8, 40,
              "AnimateDiff 512x512, level 0 (batch x heads = 65,536)"),
    _temporal("animatediff-512x512-l1", (64, 64), 1, 8, 80, "AnimateDiff 512x512, level 1"),
    # Stable Video Diffusion: heads 5 x head dim 64 at level 0; batch x heads = 92,160 > 65,535.
    _temporal("svd-576x1024-l0", (72, 128), 0, 5, 64,
              "Stable Video Diffusion 576x1024, level 0: the batch x heads > 65,535 case"),
    # CPU: small enough for the Triton interpreter; head dim 40 exercises two head-dim chunks (32 + 16 columns).
    KernelShape("tiny", 4, 2, 40, "CPU smoke shape (Triton interpreter)"),
)

_UNET = (
    UNetShape("unet-modelscope-320x512", "modelscope", (40, 64), 5, 64, E2E_FRAMES,
              "ModelScope UNet3DConditionModel config, random weights, 320x512"),
    UNetShape("unet-modelscope-256x256", "modelscope", (32, 32), 5, 64, E2E_FRAMES,
              "ModelScope UNet3DConditionModel config, random weights, 256x256"),
    UNetShape("unet-tiny", "tiny", (2, 2), 4, 8, (8,), "two-level UNet3DConditionModel for CPU runs"),
)

SHAPES = {s.name: s for s in (*_KERNEL, *_UNET)}

GPU_FULL = tuple(s.name for s in _KERNEL if s.name != "tiny") + tuple(s.name for s in _UNET[:2])
# (on CUDA, --quick) -> the sweep's default (shape names, N, dtypes)
PRESETS = {
    (True, False): (GPU_FULL, KERNEL_N, ("fp16", "bf16")),
    (True, True): (("vc2-320x512-l0", "vc2-320x512-l2", "animatediff-512x512-l1"), (16, 64, 256, 1024), ("fp16",)),
    (False, False): (("tiny", "unet-tiny"), (16, 64, 160), ("fp32",)),
    (False, True): (("tiny",), (16, 64), ("fp32",)),
}


def is_unet(name: str) -> bool:
    return isinstance(SHAPES[name], UNetShape)


def shape_label(batch, heads, d, unet: bool = False) -> str:
    """The registered name for a CSV row's (batch, heads, d), or a generic label."""
    for s in SHAPES.values():
        if (isinstance(s, UNetShape) == unet and (s.batch, s.heads, s.head_dim) == (batch, heads, d)):
            return s.name
    return f"B{batch} H{heads} D{d}"
