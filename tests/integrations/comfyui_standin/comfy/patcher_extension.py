"""Wrappers: ``wrapper(executor, *args, **kwargs)``, where calling the executor runs the next wrapper."""


class WrappersMP:
    OUTER_SAMPLE = "outer_sample"
    APPLY_MODEL = "apply_model"
    DIFFUSION_MODEL = "diffusion_model"


class WrapperExecutor:
    def __init__(self, original, class_obj, wrappers, index=0):
        self.original, self.class_obj, self.wrappers, self.index = original, class_obj, list(wrappers), index

    @classmethod
    def new_class_executor(cls, original, class_obj, wrappers, idx=0):
        return cls(original, class_obj, wrappers, idx)

    def execute(self, *args, **kwargs):
        if self.index == len(self.wrappers):
            return self.original(*args, **kwargs)
        return self.wrappers[self.index](self, *args, **kwargs)

    def __call__(self, *args, **kwargs):
        return WrapperExecutor(self.original, self.class_obj, self.wrappers, self.index + 1).execute(*args, **kwargs)


def get_all_wrappers(wrapper_type, transformer_options):
    by_key = transformer_options.get("wrappers", {}).get(wrapper_type, {})
    return [wrapper for wrappers in by_key.values() for wrapper in wrappers]
