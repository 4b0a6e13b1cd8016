"""vstar_kernels: fused kernels for VSTAR's temporal attention regularization (TAR).

The public names: `tar_attention` (the fused op) and `tar_attention_reference` (its PyTorch
definition); the dA builders `gaussian_toeplitz`, `frame_ids` (`FrameLayout`: its layout, as `frames=`
takes it) and `delta_from_features`; the configuration of TAR in a model (`TARConfig`, `LevelSpec`,
`PRESETS`), which the front-ends (`vstar_kernels.diffusers`, `vstar_kernels.lvdm`, `vstar_kernels.comfyui`) take.

Each name loads its module (and torch) on first use, so that `python -m vstar_kernels --help`
answers without importing torch.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_HOMES = {
    "BackendUnavailableError": "dispatch",
    "frame_ids": "frames",
    "FrameLayout": "frames",
    "tar_attention": "functional",
    "tar_attention_reference": "reference",
    "delta_from_features": "regularization",
    "gaussian_toeplitz": "regularization",
    "PRESETS": "tar_config",
    "Speculation": "functional",
    "LevelSpec": "tar_config",
    "TARConfig": "tar_config",
}

__all__ = [*sorted(_HOMES), "__version__"]


def __getattr__(name):
    if name not in _HOMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted({*globals(), *_HOMES})
