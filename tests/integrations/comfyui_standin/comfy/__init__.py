"""Stand-in for the few ComfyUI surfaces vstar_kernels.comfyui uses (see ../README.md)."""
