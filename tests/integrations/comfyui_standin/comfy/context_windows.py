"""Context windows: the sampler runs the model on windows of the latent's frames (dim 2 of a video latent) and
blends the results; each window's model calls find it in ``transformer_options["context_window"]``."""


class IndexListContextWindow:
    """With a `causal_anchor_index` (newer ComfyUI's causal_window_fix: the frame before the window), the window's
    latent is that frame and then the window's; the sampler drops the anchor's output."""

    def __init__(self, index_list, dim=0, causal_anchor_index=None):
        self.index_list, self.dim = list(index_list), dim
        if causal_anchor_index is not None:
            self.causal_anchor_index = causal_anchor_index

    def frames(self):
        anchor = getattr(self, "causal_anchor_index", -1)
        return ([anchor] if anchor >= 0 else []) + self.index_list

    def get_tensor(self, full, retain_index_list=()):
        """The window's frames of `full`; at each position k of `retain_index_list` (newer ComfyUI's), the whole
        latent's frame k."""
        window = full[(slice(None),) * self.dim + (self.frames(),)]
        for k in retain_index_list:
            window.select(self.dim, k).copy_(full.select(self.dim, k))
        return window


class FixedContextHandler:
    """Stand-in only: fixed windows over dim 2 (a video UNet's: dim 0) (ComfyUI's handler makes them from a
    schedule), blended flat."""

    def __init__(self, windows, dim=2, causal_window_fix=False, latent_retain_index_list=()):
        self.latent_retain_index_list = list(latent_retain_index_list)
        self.windows = [IndexListContextWindow(w, dim=dim, causal_anchor_index=w[0] - 1 if causal_window_fix else None)
                        for w in windows]
