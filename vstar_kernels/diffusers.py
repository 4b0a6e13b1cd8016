"""TAR for diffusers video pipelines: ``from vstar_kernels.diffusers import apply_tar, TARConfig``.

Needs the diffusers package (``pip install vstar_kernels[diffusers]``). The
implementation is in `vstar_kernels.integrations.diffusers`.
"""

try:
    import diffusers  # noqa: F401
except ImportError as exc:
    raise ImportError(
        "vstar_kernels.diffusers needs the diffusers package, which is not importable "
        f"({exc}); install it with: pip install vstar_kernels[diffusers]"
    ) from exc

from .integrations.capture import TemporalAttentionMaps, capture_temporal_attention
from .integrations.diffusers import (
    PRESETS,
    LevelSpec,
    TARAttnProcessor,
    TARConfig,
    apply_tar,
    remove_tar,
    reset_steps,
)

__all__ = ["PRESETS", "LevelSpec", "TARAttnProcessor", "TARConfig", "TemporalAttentionMaps", "apply_tar",
           "capture_temporal_attention", "remove_tar", "reset_steps"]
