"""TAR for diffusers video pipelines: ``from vstar_kernels.diffusers import apply_tar``, with vstar_kernels.TARConfig.

Needs the diffusers package (the ``diffusers`` extra); importing this package without it raises an
ImportError that names the extra and the command that installs it. The modules: `install` (apply/remove),
`processors` (UNets), the video DiTs' `dit_families`, `token_grid`, `interception`, `dit` and `dit_state`
(docs/dits.md), `steps`, `capture` and `dit_capture` (attention maps), `context_parallel` (docs/multi-gpu.md),
`vsp` (Video Synopsis Prompting, docs/vsp-and-dynamics.md) and `attention_demo` (docs/attention-analysis.md).
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
from .dit_capture import FrameAttentionMaps, capture_frame_attention
from .install import apply_tar, remove_tar, reset_steps
from .processors import TARAttnProcessor
from .vsp import apply_vsp, encode_synopsis, generate_with_synopsis, remove_vsp

__all__ = ["FrameAttentionMaps", "TARAttnProcessor", "TemporalAttentionMaps", "apply_tar", "apply_vsp",
           "capture_frame_attention", "capture_temporal_attention", "encode_synopsis", "generate_with_synopsis",
           "remove_tar", "remove_vsp", "reset_steps"]

_MOVED = ("TARConfig", "LevelSpec", "PRESETS")  # the configuration lives in vstar_kernels itself


def __getattr__(name):
    if name in _MOVED:
        from .._deprecation import moved

        return moved(f"vstar_kernels.diffusers.{name}", "vstar_kernels", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
