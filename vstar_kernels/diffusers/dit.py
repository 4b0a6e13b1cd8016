"""`DiTTARProcessor`, which TAR gives each regularized attention module of a video DiT (docs/dits.md): the stock
processor, called unchanged; in a regularized block and step under `interception.TARAttention`, elsewhere under no
mode (stock output bit for bit); under context parallelism `ContextParallelTAR` answers the call (docs/multi-gpu.md).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from .. import tar_attention
from .context_parallel import ContextParallelTAR, local_stock_call
from .interception import BACKEND_ATTRIBUTES, TARAttention, Wrapping, call_through_sdpa, innermost


class DiTTARProcessor(Wrapping):
    """The module's own processor, with TAR on its attention call in the regularized steps (module docstring).

    `state`: the model's `dit_state.DiTState`. `attention` is the one place the regularized attention is computed,
    for subclasses that want to look at it.
    """

    def __init__(self, processor: Any, name: str, block: int, state):
        self.processor, self.name, self.block, self.state = processor, name, block, state
        self.show(processor)

    _attention_backend, _parallel_config = BACKEND_ATTRIBUTES

    def __call__(self, attn: torch.nn.Module, *args, **kwargs):
        if self.state.removed:  # set back after remove_tar (diffusers' unfuse_qkv_projections): stock
            return self.processor(attn, *args, **kwargs)
        grid, spec = self.state.current()  # the call's (`DiTState.begin_call`): no step or block read here
        skips = self.state.family.skips_attention
        if spec is None or (skips is not None and skips(kwargs)):
            return self.processor(attn, *args, **kwargs)
        # under context parallelism: the stock processor on this rank's shard, its attention answered over all ranks
        parallel = ContextParallelTAR.of(self.processor, self.state.family.text, self.name)
        with contextlib.nullcontext() if parallel is None else local_stock_call(self.processor):
            return call_through_sdpa(TARAttention(self, attn, spec, grid, parallel), self.processor, self.name,
                                     "TAR could not run there", attn, *args, **kwargs)

    def attention(self, attn: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  **kwargs) -> torch.Tensor:
        """TAR on (B, H, N, D) q/k/v; `kwargs` are `tar_attention`'s (frames: a `FrameLayout` for the regular
        layout, else ids; key_mask, sigma, ...)."""
        return tar_attention(query, key, value, **kwargs)


def layer_skip_reads_the_wrapped(processor_class: type) -> None:
    """diffusers' layer skip (``apply_layer_skip``, its guiders) looks up what skipping a module's attention returns
    by the class of the module's processor: for a wrapper of ours (`processor_class`, the class `Wrapping.show` made:
    TAR's, a capture's), the entry of the stock processor at the bottom of the module's wrappers, read when the skip
    runs: under TAR a capture's wrapper sits between, and after remove_tar or the capture's end the module holds the
    stock processor itself (a class diffusers did not register raises its own error there, as on the stock model)."""
    try:
        from diffusers.hooks._helpers import AttentionProcessorMetadata, AttentionProcessorRegistry

        def skipped(module, *args, **kwargs):
            entry = AttentionProcessorRegistry.get(type(innermost(module.processor)))
            return entry.skip_processor_output_fn(module, *args, **kwargs)
        if processor_class not in AttentionProcessorRegistry._registry:
            AttentionProcessorRegistry.register(processor_class, AttentionProcessorMetadata(skipped))
    except (ImportError, AttributeError):  # a diffusers without layer skip, or with another registry
        pass
