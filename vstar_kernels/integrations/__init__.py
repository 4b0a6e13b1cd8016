"""Glue to host libraries. Nothing here is imported by `import vstar_kernels`.

`steps` needs only torch; `diffusers` needs the diffusers package and is
reached through the public `vstar_kernels.diffusers`.
"""
