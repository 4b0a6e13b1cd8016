"""TAR for VideoCrafter-style (lvdm) attention modules: ``from vstar_kernels.lvdm import apply_tar_to_modules``.

Needs only torch. The implementation is in `vstar_kernels.integrations.lvdm`.
"""

from .tar_config import PRESETS, LevelSpec, TARConfig
from .integrations.lvdm import apply_tar_to_modules, remove_tar_from_modules, set_step, tar_modules

__all__ = ["PRESETS", "LevelSpec", "TARConfig", "apply_tar_to_modules", "remove_tar_from_modules", "set_step",
           "tar_modules"]
