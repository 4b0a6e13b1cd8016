"""Flow-matching sigmas with a shift, and the percent convention of the step windows."""

import torch


class ModelSamplingDiscreteFlow(torch.nn.Module):
    def __init__(self, shift=8.0):
        super().__init__()
        self.shift = shift

    def sigma(self, t):
        """The shifted sigma at flow time t in [0, 1]."""
        return self.shift * t / (1 + (self.shift - 1) * t)

    def percent_to_sigma(self, percent):
        """The sigma at `percent` of the sampling (0: the start, sigma 1; 1: the end, sigma 0)."""
        if percent <= 0.0:
            return 1.0
        if percent >= 1.0:
            return 0.0
        return self.sigma(1.0 - percent)
