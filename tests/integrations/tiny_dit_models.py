"""Tiny random-weight video DiTs built from config (no downloads), and a float64 frame-TAR oracle.

Each family gives: a model in eval mode (seeded); keyword inputs for one forward call
(batch 2, so that the two halves of a classifier-free-guidance batch are both there; text
padding in the families whose processors honour a text mask); the names of the attention
modules TAR must regularize, in forward order; and the token layout of that attention
(token frames, tokens per frame, where the text tokens go), written here from each model's
design, independently of the code under test. Configs are the smallest the diffusers blocks
accept: a forward call takes a few hundredths of a second on a CPU.
"""

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
)

from vstar_kernels.diffusers.dit import DiTTARProcessor

BATCH = 2


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def text_mask(lengths, total):
    """(B, total) mask: the first lengths[b] text tokens of sample b are real, the rest padding."""
    return torch.arange(total)[None, :] < torch.tensor(lengths)[:, None]


@dataclass
class DiTFamily:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[], dict]
    modules: List[str]     # the regularized attention modules, in forward order
    frames: int            # token frames of `inputs` (after the temporal patch)
    per_frame: int         # tokens per frame (after the spatial patch)
    text: str              # "none", "before" or "after" the video tokens
    text_lengths: Optional[List[int]] = None  # real text tokens per sample where padding is masked

    def model(self) -> torch.nn.Module:
        torch.manual_seed(0)
        return self.build().eval()


def wan_inputs(frames=3, size=8):
    return dict(hidden_states=randn(BATCH, 4, frames, size, size, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 5, 16, seed=2))


def wan_vace_inputs():
    return dict(wan_inputs(), control_hidden_states=randn(BATCH, 4, 3, 8, 8, seed=4))


def cogvideox_inputs(frames=3):
    return dict(hidden_states=randn(BATCH, frames, 4, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 7, 16, seed=2))


def hunyuan_inputs():
    return dict(hidden_states=randn(BATCH, 4, 3, 4, 4, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 6, 16, seed=2), encoder_attention_mask=text_mask([6, 4], 6),
                pooled_projections=randn(BATCH, 8, seed=3), guidance=torch.tensor([3500.0, 3500.0]))


def ltx_inputs():
    return dict(hidden_states=randn(BATCH, 3 * 4 * 4, 4, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 5, 16, seed=2), encoder_attention_mask=torch.ones(BATCH, 5),
                num_frames=3, height=4, width=4)


def mochi_inputs():
    return dict(hidden_states=randn(BATCH, 4, 3, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 6, 16, seed=2), encoder_attention_mask=text_mask([6, 3], 6))


FAMILIES: Dict[str, DiTFamily] = {
    "wan": DiTFamily(
        "wan",
        lambda: WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4,
                                      out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2,
                                      rope_max_seq_len=32),
        wan_inputs, ["blocks.0.attn1", "blocks.1.attn1"], 3, 16, "none"),
    # VACE: one control block (run first) and two main blocks
    "wan_vace": DiTFamily(
        "wan_vace",
        lambda: WanVACETransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12,
                                          in_channels=4, out_channels=4, text_dim=16, freq_dim=32, ffn_dim=32,
                                          num_layers=2, rope_max_seq_len=32, vace_layers=[0], vace_in_channels=4),
        wan_vace_inputs, ["vace_blocks.0.attn1", "blocks.0.attn1", "blocks.1.attn1"], 3, 16, "none"),
    "cogvideox": DiTFamily(
        "cogvideox",
        lambda: CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                            time_embed_dim=4, text_embed_dim=16, num_layers=2, sample_width=8,
                                            sample_height=8, sample_frames=9, patch_size=2, max_text_seq_length=7),
        cogvideox_inputs, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 3, 16, "before"),
    # CogVideoX 1.5's layout: two latent frames per token frame, rotary embeddings instead of sin-cos
    "cogvideox_patch_t": DiTFamily(
        "cogvideox_patch_t",
        lambda: CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4,
                                            time_embed_dim=4, text_embed_dim=16, num_layers=2, sample_width=8,
                                            sample_height=8, sample_frames=9, patch_size=2, patch_size_t=2,
                                            max_text_seq_length=7, use_rotary_positional_embeddings=True),
        lambda: cogvideox_inputs(frames=4), ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 2, 16,
        "before"),
    "hunyuan": DiTFamily(
        "hunyuan",
        lambda: HunyuanVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2,
                                               attention_head_dim=10, num_layers=2, num_single_layers=2,
                                               num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16,
                                               pooled_projection_dim=8, rope_axes_dim=(2, 4, 4)),
        hunyuan_inputs, ["transformer_blocks.0.attn", "transformer_blocks.1.attn", "single_transformer_blocks.0.attn",
                         "single_transformer_blocks.1.attn"], 3, 16, "after", [6, 4]),
    "ltx": DiTFamily(
        "ltx",
        lambda: LTXVideoTransformer3DModel(in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=8,
                                           cross_attention_dim=16, num_layers=2, caption_channels=16),
        ltx_inputs, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 3, 16, "none"),
    "mochi": DiTFamily(
        "mochi",
        lambda: MochiTransformer3DModel(patch_size=2, num_attention_heads=2, attention_head_dim=8, num_layers=2,
                                        pooled_projection_dim=16, in_channels=4, text_embed_dim=16, time_embed_dim=4,
                                        max_sequence_length=6),
        mochi_inputs, ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"], 3, 16, "after", [6, 3]),
}


def expected_frames(family: DiTFamily, keys: int) -> torch.Tensor:
    """Frame id of each of `keys` tokens of the family's regularized attention (text tokens -1)."""
    video = family.frames * family.per_frame
    text = keys - video
    ids = [f for f in range(family.frames) for _ in range(family.per_frame)]
    if family.text == "before":
        ids = [-1] * text + ids
    else:
        assert family.text == "after" or text == 0
        ids = ids + [-1] * text
    return torch.tensor(ids)


def frame_tar_probabilities64(q, k, frames, *, sigma, strength, key_mask=None, scale=None):
    """float64 post-softmax frame-aware TAR, written from the definition: S = scale q k^T over unmasked
    keys; m_i = max_j S_ij; S'_ij = S_ij + strength * m_i * exp(-0.5 ((f_j - f_i) / sigma)^2) where both
    frames are >= 0 (else no bias); softmax(S'). q, k: (B, H, N, D); returns (B, H, Nq, Nk)."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask.bool()[:, None, None, :], float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    f = frames.double()
    band = torch.exp(-0.5 * ((f[None, :] - f[:, None]) / sigma) ** 2)
    band = band * ((frames[:, None] >= 0) & (frames[None, :] >= 0))
    return torch.softmax(scores + strength * row_max * band, dim=-1)


def frame_tar64(q, k, v, frames, *, sigma, strength, key_mask=None, scale=None):
    """float64 frame-aware TAR output: `frame_tar_probabilities64` times v."""
    return frame_tar_probabilities64(q, k, frames, sigma=sigma, strength=strength, key_mask=key_mask,
                                     scale=scale) @ v.double()


def frame_map64(probabilities, frames):
    """(F, F) sums over batch, heads and the query tokens of each frame of `probabilities` (B, H, N, N)
    summed over the key tokens of each frame (text rows and columns left out)."""
    count = int(frames.max()) + 1
    out = torch.zeros(count, count, dtype=torch.float64)
    for fq in range(count):
        for fk in range(count):
            out[fq, fk] = probabilities[:, :, frames == fq][:, :, :, frames == fk].sum()
    return out


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def processors(model):
    return {name: m.processor for name, m in model.named_modules() if hasattr(m, "processor")}


def record(model):
    """Make every DiTTARProcessor of `model` log (name, q, k, v, tar_attention kwargs, output) of its calls."""
    calls = []
    for proc in processors(model).values():
        if isinstance(proc, DiTTARProcessor):
            def attention(attn, query, key, value, proc=proc, **kwargs):
                out = DiTTARProcessor.attention(proc, attn, query, key, value, **kwargs)
                calls.append((proc.name, query, key, value, kwargs, out))
                return out
            proc.attention = attention
    return calls


def expected_key_mask(family, keys):
    """The (B, Nk) key mask the model's text padding asks for, or None where no key is masked in the call."""
    if family.text_lengths is None or family.name == "mochi":  # Mochi drops its padding tokens before the attention
        return None
    video = keys - max(family.text_lengths)
    return torch.cat([torch.ones(BATCH, video, dtype=torch.bool), text_mask(family.text_lengths, keys - video)], 1)
