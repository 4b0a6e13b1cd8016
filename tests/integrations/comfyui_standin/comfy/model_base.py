"""A flow-matching model: apply_model runs the APPLY_MODEL wrappers around the diffusion model."""

import torch

from . import patcher_extension
from .model_sampling import ModelSamplingDiscreteFlow


class BaseModel(torch.nn.Module):
    def __init__(self, diffusion_model, shift=8.0):
        super().__init__()
        self.diffusion_model = diffusion_model
        self.model_sampling = ModelSamplingDiscreteFlow(shift)
        self.manual_cast_dtype = None  # a compute dtype other than the weights' (an object patch sets it)

    def get_dtype(self):
        return next(self.diffusion_model.parameters()).dtype

    def apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        wrappers = patcher_extension.get_all_wrappers(patcher_extension.WrappersMP.APPLY_MODEL, transformer_options)
        return patcher_extension.WrapperExecutor.new_class_executor(self._apply_model, self, wrappers).execute(
            x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def _apply_model(self, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        xc = x if c_concat is None else torch.cat([x, c_concat], dim=1)
        velocity = self.diffusion_model(xc, t, c_crossattn, transformer_options=transformer_options, **kwargs)
        return x - t.reshape(-1, *[1] * (x.dim() - 1)) * velocity


class HunyuanImage21(BaseModel):
    """HunyuanImage 2.1, an image model on the HunyuanVideo class (its diffusion model here: any)."""


class HunyuanImage21Refiner(HunyuanImage21):
    """Its refiner."""
