"""A toy SVD: a video UNet (ComfyUI's UNetModel is also the class of the image UNets) whose latent has the frames in
its batch, (batch x num_video_frames, C, H, W). Each SpatialVideoTransformer runs, per depth, a spatial block over
each frame's H x W tokens, then a temporal one (``time_stack``) over each spatial site's frames, one token per
frame: its attn1 is the temporal self-attention, its attn2 the cross-attention to the text. Every attention is
the same CrossAttention class, through optimized_attention.
"""

import torch
from torch import nn

from comfy.ldm.modules.attention import optimized_attention


class CrossAttention(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.heads = heads
        self.to_q, self.to_k, self.to_v, self.to_out = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, context=None, transformer_options={}):
        context = x if context is None else context
        return self.to_out(optimized_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads,
                                               transformer_options=transformer_options))


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn1, self.attn2 = CrossAttention(dim, heads), CrossAttention(dim, heads)

    def forward(self, x, context=None, transformer_options={}):
        x = x + self.attn1(self.norm1(x), transformer_options=transformer_options)
        return x + self.attn2(self.norm2(x), context=context, transformer_options=transformer_options)


class SpatialVideoTransformer(nn.Module):
    def __init__(self, dim, heads, depth=1):
        super().__init__()
        self.transformer_blocks = nn.ModuleList(BasicTransformerBlock(dim, heads) for _ in range(depth))
        self.time_stack = nn.ModuleList(BasicTransformerBlock(dim, heads) for _ in range(depth))

    def forward(self, x, context, timesteps, transformer_options={}):
        frames, height, width = x.shape[0], x.shape[2], x.shape[3]
        x = x.flatten(2).transpose(1, 2)                                     # (B*T, H*W, C)
        sites = context[::timesteps].repeat_interleave(height * width, 0)    # each site's text: (B*H*W, L, C)
        for block, mix in zip(self.transformer_blocks, self.time_stack):
            x = block(x, context=context, transformer_options=transformer_options)
            t = x.unflatten(0, (-1, timesteps)).transpose(1, 2).flatten(0, 1)     # (B*H*W, T, C)
            t = mix(t, context=sites, transformer_options=transformer_options)
            x = t.unflatten(0, (-1, height * width)).transpose(1, 2).flatten(0, 1)
        return x.transpose(1, 2).reshape(frames, -1, height, width)


class UNetModel(nn.Module):
    def __init__(self, in_channels=4, model_channels=16, num_heads=2, context_dim=8, temporal=True):
        super().__init__()
        self.input = nn.Conv2d(in_channels, model_channels, 3, padding=1)
        self.time_embed = nn.Sequential(nn.Linear(1, model_channels), nn.SiLU())
        self.context = nn.Linear(context_dim, model_channels)
        self.input_blocks = nn.ModuleList([SpatialVideoTransformer(model_channels, num_heads)] if temporal else [])
        self.middle_block = nn.ModuleList([SpatialVideoTransformer(model_channels, num_heads)] if temporal else [])
        self.out = nn.Conv2d(model_channels, in_channels, 3, padding=1)

    def forward(self, x, timesteps, context, transformer_options={}, num_video_frames=1, **kwargs):
        h = self.input(x) + self.time_embed(timesteps.reshape(-1, 1).to(x.dtype))[:, :, None, None]
        context = self.context(context).repeat_interleave(x.shape[0] // context.shape[0], 0)
        for block in [*self.input_blocks, *self.middle_block]:
            h = block(h, context, num_video_frames, transformer_options=transformer_options)
        return self.out(h)
