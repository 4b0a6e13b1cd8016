"""Context windows: the sampler runs the model on windows of the latent's frames (dim 2 of a video latent) and
blends the results; each window's model calls find it in ``transformer_options["context_window"]``."""


class IndexListContextWindow:
    def __init__(self, index_list, dim=0):
        self.index_list, self.dim = list(index_list), dim

    def get_tensor(self, full):
        return full[(slice(None),) * self.dim + (self.index_list,)]


class FixedContextHandler:
    """Stand-in only: fixed windows over dim 2 (a video UNet's: dim 0) (ComfyUI's handler makes them from a
    schedule), blended flat."""

    def __init__(self, windows, dim=2):
        self.windows = [IndexListContextWindow(w, dim=dim) for w in windows]
