"""ComfyUI node for TAR: ``VSTAR_TAR`` puts frame-aware TAR on a video model's self-attention.

ComfyUI loads ``NODE_CLASS_MAPPINGS`` and ``NODE_DISPLAY_NAME_MAPPINGS`` from a custom_nodes
package; ``vstar-kernels comfyui-install /path/to/ComfyUI`` writes one that imports these.
Importing this package needs no ComfyUI: ``comfy`` is imported when the node runs. See docs/comfyui.md.
"""

from .node import VSTARTemporalAttentionRegularization, apply_tar

NODE_CLASS_MAPPINGS = {"VSTAR_TAR": VSTARTemporalAttentionRegularization}
NODE_DISPLAY_NAME_MAPPINGS = {"VSTAR_TAR": "VSTAR temporal attention regularization (TAR)"}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "VSTARTemporalAttentionRegularization", "apply_tar"]
