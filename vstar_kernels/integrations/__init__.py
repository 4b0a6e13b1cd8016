"""Glue to host libraries. Nothing here is imported by `import vstar_kernels`.

`steps` needs only torch; `diffusers`, `capture`, `attention_demo` and
`vsp_diffusers` need the diffusers package and are reached through the public
`vstar_kernels.diffusers` and `vstar_kernels.vsp` (the demo through the CLI).
"""
