"""A toy HunyuanVideo: one joint attention over the video tokens, then the text tokens, per block.

The latent is padded up to the (1, 2, 2) patch (circular padding); tokens are frame-major. Padded
text is masked by an additive mask over the keys, 0 for a token to attend to and minus the largest
value of the dtype for padding. Dual-stream blocks keep video and text apart outside the attention;
single-stream blocks see them joined.
"""

import torch
from torch import nn

from comfy.ldm.modules.attention import optimized_attention
from comfy.ldm.wan.model import pad_to_patch


def attention(q, k, v, heads, mask, transformer_options):
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    return optimized_attention(q, k, v, heads, skip_reshape=True, mask=mask, transformer_options=transformer_options)


class DoubleStreamBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.img_norm, self.txt_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.img_qkv, self.txt_qkv = nn.Linear(dim, 3 * dim), nn.Linear(dim, 3 * dim)
        self.img_proj, self.txt_proj = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, img, txt, attn_mask=None, transformer_options={}):
        iq, ik, iv = self.img_qkv(self.img_norm(img)).chunk(3, dim=-1)
        tq, tk, tv = self.txt_qkv(self.txt_norm(txt)).chunk(3, dim=-1)
        out = attention(torch.cat([iq, tq], 1), torch.cat([ik, tk], 1), torch.cat([iv, tv], 1), self.num_heads,
                        attn_mask, transformer_options)
        return img + self.img_proj(out[:, :img.shape[1]]), txt + self.txt_proj(out[:, img.shape[1]:])


class SingleStreamBlock(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.norm = nn.LayerNorm(dim)
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, attn_mask=None, transformer_options={}):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        return x + self.proj(attention(q, k, v, self.num_heads, attn_mask, transformer_options))


class HunyuanVideo(nn.Module):
    def __init__(self, in_channels=4, dim=32, num_heads=2, depth=1, depth_single_blocks=1, text_dim=8):
        super().__init__()
        self.patch_size = [1, 2, 2]
        self.out_channels = in_channels
        self.img_in = nn.Conv3d(in_channels, dim, self.patch_size, stride=self.patch_size)
        self.txt_in = nn.Linear(text_dim, dim)
        self.time_in = nn.Linear(1, dim)
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(dim, num_heads) for _ in range(depth))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(dim, num_heads) for _ in range(depth_single_blocks))
        self.final_layer = nn.Linear(dim, in_channels * 4)

    def forward(self, x, timestep, context, attention_mask=None, transformer_options={}, **kwargs):
        frames, height, width = x.shape[2:]
        img = self.img_in(pad_to_patch(x, self.patch_size))
        grid = img.shape[2:]
        img = img.flatten(2).transpose(1, 2) + self.time_in(timestep.reshape(-1, 1, 1).to(x.dtype))
        txt = self.txt_in(context)
        mask = None
        if attention_mask is not None:
            mask = torch.zeros(attention_mask.shape[0], 1, img.shape[1] + txt.shape[1], dtype=img.dtype,
                               device=img.device)
            mask[:, 0, img.shape[1]:] = (attention_mask.to(img.dtype) - 1) * torch.finfo(img.dtype).max
        for block in self.double_blocks:
            img, txt = block(img, txt, attn_mask=mask, transformer_options=transformer_options)
        joined = torch.cat([img, txt], dim=1)
        for block in self.single_blocks:
            joined = block(joined, attn_mask=mask, transformer_options=transformer_options)
        out = self.final_layer(joined[:, :img.shape[1]])
        out = out.reshape(out.shape[0], *grid, 2, 2, self.out_channels)
        out = torch.einsum("bfhwqrc->bcfhqwr", out).reshape(out.shape[0], self.out_channels, grid[0], grid[1] * 2,
                                                            grid[2] * 2)
        return out[:, :, :frames, :height, :width]
