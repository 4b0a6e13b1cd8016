"""Stand-in for the part of ComfyUI's comfy_api that the node's tests use (see ../README.md)."""
