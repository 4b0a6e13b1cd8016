"""TAR for diffusers video pipelines: ``from vstar_kernels.diffusers import apply_tar, TARConfig``.

Needs the diffusers package (the ``diffusers`` extra: ``pip install -e ".[diffusers]"`` in a
checkout); importing this package, or any module in it, without diffusers raises an ImportError
that names the extra and the command that installs it.
The modules: `processors` (TARAttnProcessor, apply/remove), `dit` (frame-aware TAR in the
video diffusion transformers: Wan, CogVideoX, HunyuanVideo, LTX-Video, Mochi; apply_tar
dispatches there), `steps` (the denoising-step tracker), `capture` (temporal attention
maps), `dit_capture` (a DiT's frame-by-frame attention maps), `vsp` (Video Synopsis
Prompting for diffusers UNets, public as `vstar_kernels.vsp`) and `attention_demo` (the
CLI's ``demo-attention``).
The config (TARConfig) needs only torch and lives in `vstar_kernels.tar_config`, shared with
`vstar_kernels.lvdm`.
"""

try:
    import diffusers  # noqa: F401
except ImportError as exc:
    from .._env import install_hint

    raise ImportError(
        "vstar_kernels.diffusers needs the diffusers package, which is not importable "
        f"({exc}); install the diffusers extra with: {install_hint('diffusers')}"
    ) from exc

from .capture import TemporalAttentionMaps, capture_temporal_attention
from .dit_capture import capture_frame_attention
from .processors import (
    PRESETS,
    LevelSpec,
    TARAttnProcessor,
    TARConfig,
    apply_tar,
    remove_tar,
    reset_steps,
)

__all__ = ["PRESETS", "LevelSpec", "TARAttnProcessor", "TARConfig", "TemporalAttentionMaps", "apply_tar",
           "capture_frame_attention", "capture_temporal_attention", "remove_tar", "reset_steps"]
