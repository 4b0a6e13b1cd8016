"""The attention entry point of the models, and the override hook every call goes through."""

import functools

import torch.nn.functional as F


def wrap_attn(func):
    """An attention function whose calls go to ``transformer_options["optimized_attention_override"](func, *args,
    **kwargs)`` when the options hold one, `func` the undecorated function; the override runs the attention
    itself by calling `func` with the arguments it got (they carry a marker, ``_inside_attn_wrapper``)."""
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        options = kwargs.get("transformer_options")
        if "_inside_attn_wrapper" not in kwargs and options is not None and "optimized_attention_override" in options:
            return options["optimized_attention_override"](func, *args, _inside_attn_wrapper=True, **kwargs)
        return func(*args, **kwargs)
    return wrapper


@wrap_attn
def optimized_attention(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
                        **kwargs):
    """Attention of (B, L, H*D) q/k/v (or (B, H, L, D) with skip_reshape)."""
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
