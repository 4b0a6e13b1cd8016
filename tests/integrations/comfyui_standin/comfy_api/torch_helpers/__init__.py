"""TorchCompileModel's way with a model: the diffusion model compiled once, when the node runs, and put in place
of the model's own for each model call (an APPLY_MODEL wrapper), which the object patches then reach through; the
compile's arguments kept in the model options (``torch_compile_kwargs``)."""

import torch

from comfy.patcher_extension import WrappersMP


def set_torch_compile_wrapper(model, backend, options=None):
    compiled = torch.compile(model.get_model_object("diffusion_model"), backend=backend, options=options)

    def wrapper(executor, *args, **kwargs):
        base = executor.class_obj
        own, base.diffusion_model = base.diffusion_model, compiled
        try:
            return executor(*args, **kwargs)
        finally:
            base.diffusion_model = own
    model.remove_wrappers_with_key(WrappersMP.APPLY_MODEL, "torch.compile")
    model.add_wrapper_with_key(WrappersMP.APPLY_MODEL, "torch.compile", wrapper)
    model.model_options["torch_compile_kwargs"] = {"backend": backend, "options": options}
