"""Glue to host libraries. Nothing here is imported by `import vstar_kernels`.

`steps` and `lvdm` (VideoCrafter-style modules, public as
`vstar_kernels.lvdm`) need only torch; `diffusers`, `capture`, `attention_demo` and
`vsp_diffusers` need the diffusers package and are reached through the public
`vstar_kernels.diffusers` and `vstar_kernels.vsp` (the demo through the CLI).
"""
