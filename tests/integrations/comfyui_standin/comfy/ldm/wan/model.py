"""A toy Wan: Wan's token layout and attention calls, none of its weights or embeddings.

The latent (B, C, T, H, W) is padded up to the (1, 2, 2) patch (circular padding) and embedded by
a strided Conv3d; tokens are frame-major, ceil(H / 2) * ceil(W / 2) per frame. Extra frames
(``time_dim_concat``) are padded and joined in time first; with ``ref_conv`` a reference image
(``reference_latent``, (B, C, H, W), no padding) comes first as tokens of its own. Every block runs
its self-attention, then the cross-attention to the text (an I2V block: first to the CLIP image
tokens that lead the context, then to the text), both through optimized_attention. ``forward`` pads
and crops; ``forward_orig`` runs the rest, and the blocks through block replacement patches.
``WanModel_S2V`` puts tokens after the video's and runs its blocks without transformer_options.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from comfy.ldm.modules.attention import optimized_attention


class WanSelfAttention(nn.Module):
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))

    def forward(self, x, transformer_options={}):
        return self.o(optimized_attention(self.q(x), self.k(x), self.v(x), heads=self.num_heads,
                                          transformer_options=transformer_options))


class WanT2VCrossAttention(WanSelfAttention):
    def forward(self, x, context, context_img_len=None, transformer_options={}):
        return self.o(optimized_attention(self.q(x), self.k(context), self.v(context), heads=self.num_heads,
                                          transformer_options=transformer_options))


class WanI2VCrossAttention(WanSelfAttention):
    def __init__(self, dim, num_heads):
        super().__init__(dim, num_heads)
        self.k_img, self.v_img = nn.Linear(dim, dim), nn.Linear(dim, dim)

    def forward(self, x, context, context_img_len=None, transformer_options={}):
        image, text = context[:, :context_img_len], context[:, context_img_len:]
        q = self.q(x)
        from_image = optimized_attention(q, self.k_img(image), self.v_img(image), heads=self.num_heads,
                                         transformer_options=transformer_options)
        from_text = optimized_attention(q, self.k(text), self.v(text), heads=self.num_heads,
                                        transformer_options=transformer_options)
        return self.o(from_image + from_text)


class WanAttentionBlock(nn.Module):
    def __init__(self, dim, num_heads, image_to_video):
        super().__init__()
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(dim) for _ in range(3))
        self.self_attn = WanSelfAttention(dim, num_heads)
        self.cross_attn = (WanI2VCrossAttention if image_to_video else WanT2VCrossAttention)(dim, num_heads)
        self.ffn = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x, time, context, context_img_len=None, transformer_options={}):
        x = x + self.self_attn(self.norm1(x) * (1 + time), transformer_options=transformer_options)
        x = x + self.cross_attn(self.norm3(x), context, context_img_len=context_img_len,
                                transformer_options=transformer_options)
        return x + self.ffn(self.norm2(x))


def pad_to_patch(x, patch):
    pad = []
    for size, p in zip(reversed(x.shape[2:]), reversed(patch)):
        pad += [0, (p - size % p) % p]
    return F.pad(x, pad, mode="circular")


class WanModel(nn.Module):
    def __init__(self, in_dim=4, dim=32, num_heads=2, num_layers=2, text_dim=8, out_dim=4, image_to_video=False,
                 clip_dim=6, in_dim_ref_conv=None):
        super().__init__()
        self.patch_size = (1, 2, 2)
        self.out_dim = out_dim
        self.patch_embedding = nn.Conv3d(in_dim, dim, self.patch_size, stride=self.patch_size)
        self.text_embedding = nn.Linear(text_dim, dim)
        self.time_embedding = nn.Sequential(nn.Linear(1, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.img_emb = nn.Linear(clip_dim, dim) if image_to_video else None
        self.ref_conv = (nn.Conv2d(in_dim_ref_conv, dim, self.patch_size[1:], stride=self.patch_size[1:])
                         if in_dim_ref_conv else None)
        self.blocks = nn.ModuleList(WanAttentionBlock(dim, num_heads, image_to_video) for _ in range(num_layers))
        self.head = nn.Linear(dim, out_dim * math.prod(self.patch_size))

    blocks_take_options = True

    def after_video(self, extra):
        """Tokens that follow the video's in the self-attention (none here)."""
        return []

    def forward(self, x, timestep, context, clip_fea=None, time_dim_concat=None, transformer_options={}, **kwargs):
        frames, height, width = x.shape[2:]
        x = pad_to_patch(x, self.patch_size)
        if time_dim_concat is not None:
            x = torch.cat([x, pad_to_patch(time_dim_concat, self.patch_size)], dim=2)
        out = self.forward_orig(x, timestep, context, clip_fea=clip_fea, transformer_options=transformer_options,
                                **kwargs)
        return out[:, :, :frames, :height, :width]

    def forward_orig(self, x, timestep, context, clip_fea=None, transformer_options={}, **kwargs):
        """The padded latent through the embeddings, the blocks and the head. Block i runs through
        ``transformer_options["patches_replace"]["dit"][("double_block", i)]`` when there is one."""
        x = self.patch_embedding(x)
        grid = x.shape[2:]
        x = x.flatten(2).transpose(1, 2)
        reference = kwargs.get("reference_latent")
        ref_tokens = 0
        if self.ref_conv is not None and reference is not None:
            reference = self.ref_conv(reference).flatten(2).transpose(1, 2)
            ref_tokens = reference.shape[1]
            x = torch.cat([reference, x], dim=1)
        x = torch.cat([x, *self.after_video(kwargs)], dim=1)
        time = self.time_embedding(timestep.reshape(-1, 1, 1).to(x.dtype))
        context = self.text_embedding(context)
        context_img_len = None
        if clip_fea is not None:
            context = torch.cat([self.img_emb(clip_fea), context], dim=1)
            context_img_len = clip_fea.shape[1]
        replace = transformer_options.get("patches_replace", {}).get("dit", {})
        for i, block in enumerate(self.blocks):
            def original(args, block=block):
                options = args["transformer_options"] if self.blocks_take_options else {}
                return {"img": block(args["img"], args["vec"], args["txt"], context_img_len=context_img_len,
                                     transformer_options=options)}
            args = {"img": x, "txt": context, "vec": time, "transformer_options": transformer_options}
            x = (replace[("double_block", i)](args, {"original_block": original}) if ("double_block", i) in replace
                 else original(args))["img"]
        x = self.head(x[:, ref_tokens:ref_tokens + math.prod(grid)])
        x = x.reshape(x.shape[0], *grid, *self.patch_size, self.out_dim)
        x = torch.einsum("bfhwpqrc->bcfphqwr", x)
        return x.reshape(x.shape[0], self.out_dim, *[g * p for g, p in zip(grid, self.patch_size)])


class WanModel_S2V(WanModel):
    """Wan S2V as ComfyUI 0.3.64 runs it: the reference frames' tokens (`reference_latent`) and the motion frames'
    (`reference_motion`), both unpadded, follow the video in the self-attention, and the blocks run without
    transformer_options."""

    blocks_take_options = False

    def after_video(self, extra):
        return [self.patch_embedding(extra[name]).flatten(2).transpose(1, 2)
                for name in ("reference_latent", "reference_motion") if extra.get(name) is not None]


class VaceWanModel(WanModel):
    """Wan VACE: the `vace_context` condition (batch, inputs, channels, frames, H, W) reaches the model as a keyword;
    the toy's control blocks are none (the node reads the condition, not what the blocks make of it)."""

    def __init__(self, **config):
        super().__init__(**config)
        self.vace_blocks = nn.ModuleList()
