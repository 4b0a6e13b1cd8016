"""Wan 2.2 Animate's diffusion class, by name: the toy Wan (its pose and face inputs are not modelled)."""

from comfy.ldm.wan.model import WanModel


class AnimateWanModel(WanModel):
    pass
