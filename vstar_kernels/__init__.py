"""vstar_kernels: fused kernels for VSTAR's temporal attention regularization (TAR)."""

from .dispatch import BackendUnavailableError
from .frames import frame_ids
from .functional import tar_attention
from .reference import tar_attention_reference
from .regularization import gaussian_toeplitz

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "frame_ids",
    "gaussian_toeplitz",
    "tar_attention",
    "tar_attention_reference",
    "__version__",
]
