"""ModelPatcher: a model plus the options and patches one node chain gave it; clones share the model."""

import copy

from . import utils


class ModelPatcher:
    def __init__(self, model):
        self.model = model
        self.model_options = {"transformer_options": {}}
        self.object_patches = {}
        self.object_patches_backup = {}
        self.wrappers = {}

    def clone(self):
        other = ModelPatcher(self.model)
        other.model_options = copy.deepcopy(self.model_options)
        other.object_patches = dict(self.object_patches)
        other.object_patches_backup = self.object_patches_backup
        other.wrappers = {kind: {key: list(found) for key, found in by_key.items()}
                          for kind, by_key in self.wrappers.items()}
        return other

    def set_model_unet_function_wrapper(self, wrapper):
        """`wrapper(apply_model, {"input", "timestep", "c", "cond_or_uncond"})` runs each model call instead."""
        self.model_options["model_function_wrapper"] = wrapper

    def set_model_patch_replace(self, patch, name, block_name, number):
        """`patch(args, {"original_block": f})` runs block `number` instead (for Wan: name "dit", "double_block")."""
        replace = self.model_options["transformer_options"].setdefault("patches_replace", {}).setdefault(name, {})
        replace[(block_name, number)] = patch

    def add_object_patch(self, name, obj):
        self.object_patches[name] = obj

    def get_model_object(self, name):
        if name in self.object_patches:
            return self.object_patches[name]
        if name in self.object_patches_backup:
            return self.object_patches_backup[name]
        return utils.get_attr(self.model, name)

    def add_wrapper_with_key(self, wrapper_type, key, wrapper):
        self.wrappers.setdefault(wrapper_type, {}).setdefault(key, []).append(wrapper)

    def remove_wrappers_with_key(self, wrapper_type, key):
        self.wrappers.get(wrapper_type, {}).pop(key, None)

    def get_wrappers(self, wrapper_type, key):
        return self.wrappers.get(wrapper_type, {}).get(key, [])

    def patch_model(self):
        for name, obj in self.object_patches.items():
            previous = utils.set_attr(self.model, name, obj)
            self.object_patches_backup.setdefault(name, previous)

    def unpatch_model(self):
        for name, previous in self.object_patches_backup.items():
            utils.set_attr(self.model, name, previous)
        self.object_patches_backup.clear()
