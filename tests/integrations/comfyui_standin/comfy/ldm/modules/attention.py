"""The attention entry point of the models, and the override hook every call goes through."""

import torch.nn.functional as F


def _sdpa(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False, **kwargs):
    if not skip_reshape:
        q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    if mask is not None:
        if mask.dim() == 2:
            mask = mask.unsqueeze(0)
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if skip_output_reshape:
        return out
    return out.transpose(1, 2).flatten(2)


def optimized_attention(*args, **kwargs):
    """Attention of (B, L, H*D) q/k/v (or (B, H, L, D) with skip_reshape). With an override in
    transformer_options, the call goes to ``override(optimized_attention, *args, **kwargs)``; calling
    the function it got back (with the marker it received) runs the attention itself."""
    options = kwargs.get("transformer_options")
    if "_inside_attn_wrapper" not in kwargs and options is not None and "optimized_attention_override" in options:
        return options["optimized_attention_override"](optimized_attention, *args, _inside_attn_wrapper=True,
                                                       **kwargs)
    kwargs.pop("_inside_attn_wrapper", None)
    kwargs.pop("transformer_options", None)
    return _sdpa(*args, **kwargs)
