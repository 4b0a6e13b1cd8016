"""vstar_kernels: fused kernels for VSTAR's temporal attention regularization (TAR).

The public names: `tar_attention` (the fused op) and `tar_attention_reference` (its PyTorch
definition); the dA builders `gaussian_toeplitz`, `frame_ids` and `delta_from_features`; the
configuration of TAR in a model (`TARConfig`, `LevelSpec`, `PRESETS`), which the front-ends
(`vstar_kernels.diffusers`, `vstar_kernels.lvdm`, `vstar_kernels.comfyui`) take.
"""

from .dispatch import BackendUnavailableError
from .frames import frame_ids
from .functional import tar_attention
from .reference import tar_attention_reference
from .regularization import delta_from_features, gaussian_toeplitz
from .tar_config import PRESETS, LevelSpec, TARConfig

__version__ = "0.1.0"

__all__ = ["PRESETS", "BackendUnavailableError", "LevelSpec", "TARConfig", "delta_from_features", "frame_ids",
           "gaussian_toeplitz", "tar_attention", "tar_attention_reference", "__version__"]
