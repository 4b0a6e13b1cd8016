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

import diffusers
import torch
from diffusers import (
    CogVideoXTransformer3DModel,
    HunyuanVideoTransformer3DModel,
    LTXVideoTransformer3DModel,
    MochiTransformer3DModel,
    WanTransformer3DModel,
    WanVACETransformer3DModel,
)
from torch.overrides import TorchFunctionMode

from vstar_kernels.diffusers.dit import DiTTARProcessor
from vstar_kernels.frames import FrameLayout

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
    # the frame of each token of the video stream in sequence order, where it is not `frames` frames of
    # `per_frame` tokens in frame order (history latents, reference frames, appended conditioning tokens)
    video_ids: Optional[List[int]] = None
    # the (B, Nq, Nk) bool mask of the regularized attention for a call with `keys` keys in `block`, where masked
    mask: Optional[Callable[["DiTFamily", int, int], torch.Tensor]] = None
    twice_from: Optional[int] = None  # from this block on (forward order), the video stream comes twice
    batch: int = BATCH

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


def ids_of(frames) -> torch.Tensor:
    """The ids a processor's `frames=` gives: an id tensor, or the one a FrameLayout's calls share (on the CPU)."""
    return frames.shared_ids("cpu") if isinstance(frames, FrameLayout) else frames


def expected_frames(family: DiTFamily, keys: int, block: int = 0) -> torch.Tensor:
    """Frame id of each of `keys` tokens of the family's regularized attention in `block` (text tokens -1)."""
    ids = family.video_ids or [f for f in range(family.frames) for _ in range(family.per_frame)]
    if family.twice_from is not None and block >= family.twice_from:
        ids = ids + ids
    text = keys - len(ids)
    if family.text == "before":
        ids = [-1] * text + ids
    else:
        assert family.text == "after" or text == 0
        ids = ids + [-1] * text
    return torch.tensor(ids)


def frame_tar_probabilities64(q, k, frames, *, sigma, strength, key_mask=None, scale=None):
    """float64 post-softmax frame-aware TAR, written from the definition: S = scale q k^T over unmasked
    keys; m_i = max_j S_ij; S'_ij = S_ij + strength * m_i * exp(-0.5 ((f_j - f_i) / sigma)^2) where both
    frames are >= 0 (else no bias); softmax(S'), and 0 in a row with no unmasked key. q, k: (B, H, N, D);
    key_mask (B, Nk), or (B, Nq, Nk) for a mask per query; returns (B, H, Nq, Nk)."""
    q, k = q.double(), k.double()
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = scale * torch.einsum("bhid,bhjd->bhij", q, k)
    if key_mask is not None:
        mask = key_mask.bool()[:, None, None, :] if key_mask.dim() == 2 else key_mask.bool()[:, None]
        scores = scores.masked_fill(~mask, float("-inf"))
    row_max = scores.amax(dim=-1, keepdim=True)
    f = frames.double()
    band = torch.exp(-0.5 * ((f[None, :] - f[:, None]) / sigma) ** 2)
    band = band * ((frames[:, None] >= 0) & (frames[None, :] >= 0))
    empty = torch.isinf(row_max) & (row_max < 0)
    probabilities = torch.softmax(scores + strength * row_max.masked_fill(empty, 0) * band, dim=-1)
    return probabilities.masked_fill(empty, 0.0)


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


class SDPASpy:
    """A processor that runs `processor` and keeps the q, k of its scaled_dot_product_attention calls."""

    def __init__(self, processor, seen):
        self.processor, self.seen = processor, seen

    def __call__(self, attn, *args, **kwargs):
        spy = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func is torch.nn.functional.scaled_dot_product_attention:
                    spy.seen.append((args[0] if args else kwargs["query"], args[1] if len(args) > 1 else kwargs["key"]))
                return func(*args, **kwargs)

        with Mode():
            return self.processor(attn, *args, **kwargs)


def spied_plain_run(fam):
    """The family's model (each module TAR would regularize behind an SDPASpy), its inputs, its plain output and
    {module: [(q, k), ...]}: the q, k of each module's attention calls from the next forward call on."""
    model = fam.model()
    inputs = fam.inputs()
    seen = {name: [] for name in fam.modules}
    modules = dict(model.named_modules())
    for name in fam.modules:
        modules[name].processor = SDPASpy(modules[name].processor, seen[name])
    plain = forward(model, inputs)
    for calls in seen.values():
        calls.clear()
    return model, inputs, plain, seen


def expected_key_mask(family, keys):
    """The (B, Nk) key mask the model's text padding asks for, or None where no key is masked in the call."""
    if family.text_lengths is None or family.name == "mochi":  # Mochi drops its padding tokens before the attention
        return None
    video = keys - max(family.text_lengths)
    return torch.cat([torch.ones(BATCH, video, dtype=torch.bool), text_mask(family.text_lengths, keys - video)], 1)


# The newer video DiTs. Their layouts below are read from each model's design: where its forward
# puts history latents, reference frames and appended tokens, and which frame its rotary embedding
# gives each of them.

def frames_of(*runs):
    """[frame] * tokens for each (frame, tokens) run, in order."""
    return [frame for frame, tokens in runs for _ in range(tokens)]


def grid_of(frames, per_frame):
    return frames_of(*((f, per_frame) for f in range(frames)))


def valid_pairs(valid):
    """(B, N, N) mask of a query-and-key mask: (B, N) valid tokens attend to valid tokens."""
    return valid[:, :, None] & valid[:, None, :]


def skyreels_df_inputs():
    return dict(hidden_states=randn(BATCH, 4, 4, 4, 4, seed=1),
                timestep=torch.tensor([[900, 900, 700, 700], [900, 900, 700, 700]]),
                encoder_hidden_states=randn(BATCH, 5, 16, seed=2), enable_diffusion_forcing=True)


def block_causal(family, keys, block):
    """SkyReels-V2 with num_frame_per_block = 2: frames 0, 1 and 2, 3 are blocks; a token sees its block and
    the blocks before."""
    block_of = torch.tensor(expected_frames(family, keys).tolist()) // 2
    return (block_of[None, :] <= block_of[:, None]).expand(family.batch, keys, keys)


def hunyuan15_inputs():
    return dict(hidden_states=randn(BATCH, 4, 3, 4, 4, seed=1), timestep=torch.tensor([700.0, 700.0]),
                encoder_hidden_states=randn(BATCH, 6, 16, seed=2), encoder_attention_mask=text_mask([6, 4], 6),
                encoder_hidden_states_2=randn(BATCH, 3, 8, seed=3), encoder_attention_mask_2=text_mask([3, 2], 3),
                image_embeds=randn(BATCH, 2, 12, seed=4))


def hunyuan15_mask(family, keys, block):
    """The valid tokens come first in its text (2 image, then byT5, then text tokens): 11 and 8 of them."""
    video = family.frames * family.per_frame
    return valid_pairs(torch.arange(keys)[None, :] < torch.tensor([video + 11, video + 8])[:, None])


def framepack_inputs():
    return dict(hidden_states=randn(BATCH, 4, 3, 8, 8, seed=1), timestep=torch.tensor([700.0, 700.0]),
                encoder_hidden_states=randn(BATCH, 6, 16, seed=2), encoder_attention_mask=text_mask([6, 4], 6),
                pooled_projections=randn(BATCH, 8, seed=3), image_embeds=randn(BATCH, 2, 12, seed=4),
                guidance=torch.tensor([3500.0, 3500.0]), indices_latents=torch.tensor([1, 2, 3]),
                latents_clean=randn(BATCH, 4, 2, 8, 8, seed=5), indices_latents_clean=torch.tensor([0, 4]),
                latents_history_2x=randn(BATCH, 4, 2, 8, 8, seed=6), indices_latents_history_2x=torch.tensor([5, 6]),
                latents_history_4x=randn(BATCH, 4, 6, 8, 8, seed=7),
                indices_latents_history_4x=torch.tensor([7, 8, 9, 10, 11, 12]))


# 4x history: 6 frames padded to 8 (the last repeated), two tokens of 8 x 8 latent pixels, at the integers
# nearest the means 8.5 of frames 7..10 (a tie: the earlier frame) and 11.75 of 11, 12, 12, 12; 2x: frames 5, 6
# in one slot of 2 x 2 tokens at 5.5 -> 5; clean: frames 0 and 4; then the video's frames 1, 2, 3.
# Text after: 2 image and 6 text tokens.
FRAMEPACK_IDS = frames_of((8, 1), (12, 1), (5, 4), (0, 16), (4, 16), (1, 16), (2, 16), (3, 16))


def framepack_mask(family, keys, block):
    valid = torch.arange(keys)[None, :] < torch.tensor([len(FRAMEPACK_IDS) + 8, len(FRAMEPACK_IDS) + 6])[:, None]
    return valid[:, None, :].expand(family.batch, keys, keys)


def ltx2_model():
    return diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=6,
        audio_cross_attention_dim=12, num_layers=2, caption_channels=16, perturbed_attn=True)


def ltx2_inputs():
    """3 frames of 4 x 4 tokens and 5 appended (keyframe) tokens, placed by video_coords in the first frame."""
    coords = diffusers.LTX2VideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, cross_attention_dim=24,
        audio_in_channels=4, audio_out_channels=4, audio_num_attention_heads=2, audio_attention_head_dim=6,
        audio_cross_attention_dim=12, num_layers=0, caption_channels=16).rope.prepare_video_coords(
            BATCH, 3, 4, 4, torch.device("cpu"))
    return dict(hidden_states=randn(BATCH, 48 + 5, 4, seed=1), audio_hidden_states=randn(BATCH, 5, 4, seed=2),
                encoder_hidden_states=randn(BATCH, 6, 16, seed=3),
                audio_encoder_hidden_states=randn(BATCH, 6, 16, seed=4),
                timestep=torch.tensor([700.0, 700.0]), encoder_attention_mask=torch.ones(BATCH, 6),
                audio_encoder_attention_mask=torch.ones(BATCH, 6), num_frames=3, height=4, width=4, audio_num_frames=5,
                video_coords=torch.cat([coords, coords[:, :, :5]], dim=2))


def wan_animate_inputs():
    return dict(hidden_states=randn(BATCH, 12, 3, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 5, 16, seed=2), pose_hidden_states=randn(BATCH, 4, 2, 8, 8, seed=3),
                face_pixel_values=randn(BATCH, 3, 2, 16, 16, seed=4))


def helios_inputs():
    return dict(hidden_states=randn(BATCH, 4, 2, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                encoder_hidden_states=randn(BATCH, 5, 16, seed=2), indices_hidden_states=torch.tensor([[8, 9]] * BATCH),
                latents_history_short=randn(BATCH, 4, 2, 8, 8, seed=3),
                indices_latents_history_short=torch.tensor([[6, 7]] * BATCH),
                latents_history_mid=randn(BATCH, 4, 3, 8, 8, seed=4),
                indices_latents_history_mid=torch.tensor([[3, 4, 5]] * BATCH),
                latents_history_long=randn(BATCH, 4, 3, 8, 8, seed=5),
                indices_latents_history_long=torch.tensor([[0, 1, 2]] * BATCH))


# long: frames 0, 1, 2 (+2) in one 8 x 8 token at their mean 1.25 -> 1; mid: 3, 4 and 5 (+5) in two slots of
# 2 x 2 tokens at 3.5 -> 3 and 5; short: 6, 7 of 4 x 4 tokens; then the video's frames 8, 9
HELIOS_IDS = frames_of((1, 1), (3, 4), (5, 4), (6, 16), (7, 16), (8, 16), (9, 16))


def motif_mask(family, keys, block):
    if block >= family.twice_from:
        return None  # the decoder blocks attend over the video twice, unmasked
    video = family.frames * family.per_frame
    valid = torch.arange(keys)[None, :] < (video + torch.tensor(family.text_lengths))[:, None]
    return valid[:, None, :].expand(family.batch, keys, keys)


def minimax_inputs():
    """Packed: 4 text rows, 2 audio rows, then 3 latent frames of 2 x 2 video rows at rotary times 4, 4 + 5/3,
    4 + 25/3 (a latent frame spans 1, then 4 video frames; times start after the text)."""
    text, audio, frames, per_frame = 4, 2, 3, 4
    rows = text + audio + frames * per_frame
    position_ids = torch.zeros(rows, 3, dtype=torch.float64)
    position_ids[:text, 0] = torch.arange(text)
    position_ids[text:text + audio, 0] = text + torch.arange(audio)
    position_ids[text + audio:, 0] = torch.tensor([4.0, 4.0 + 5 / 3, 4.0 + 25 / 3]).repeat_interleave(per_frame)
    position_ids[text + audio:, 1] = torch.arange(per_frame).repeat(frames) // 2
    position_ids[text + audio:, 2] = torch.arange(per_frame).repeat(frames) % 2
    return dict(hidden_states=randn(BATCH, frames * per_frame, 16, seed=1),
                audio_hidden_states=randn(BATCH, audio, 4, seed=2),
                encoder_hidden_states=randn(BATCH, text, 16, seed=3), timestep=torch.tensor([0.7]),
                timestep_indices=torch.zeros(rows, dtype=torch.long),
                token_tags=torch.tensor([1] * text + [2] * audio + [0] * frames * per_frame), position_ids=position_ids,
                video_indices=torch.arange(text + audio, rows), audio_indices=torch.arange(text, text + audio),
                text_indices=torch.arange(text))


def kandinsky5_model():
    """Kandinsky 5 zero-initializes its modulations (every block's output gate is 0): random ones here."""
    model = diffusers.Kandinsky5Transformer3DModel(
        in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=8, patch_size=(1, 2, 2),
        model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4))
    for name, parameter in model.named_parameters():
        if "modulation" in name:
            torch.nn.init.normal_(parameter, std=0.2)
    return model


def kandinsky5_inputs():
    return dict(hidden_states=randn(1, 3, 8, 8, 4, seed=1), encoder_hidden_states=randn(1, 5, 16, seed=2),
                timestep=torch.tensor([700.0]), pooled_projections=randn(1, 8, seed=3),
                visual_rope_pos=[torch.arange(3), torch.arange(4), torch.arange(4)], text_rope_pos=torch.arange(5))


def kandinsky6_inputs():
    """Two frames and the reference image appended as a third, at the first frame's rotary position."""
    return dict(hidden_states=randn(BATCH, 3, 8, 8, 4, seed=1), encoder_hidden_states=randn(BATCH, 5, 16, seed=2),
                pooled_projections=randn(BATCH, 8, seed=3), timestep=torch.tensor([700.0, 700.0]),
                visual_rope_pos=(torch.tensor([0, 1, 0]), torch.arange(4), torch.arange(4)))


def wan_like(cls, **extra):
    config = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                  text_dim=16, freq_dim=32, ffn_dim=32, num_layers=2)
    return lambda: cls(**{**config, **extra})


TWO = ["transformer_blocks.0.attn1", "transformer_blocks.1.attn1"]
WAN_TWO = ["blocks.0.attn1", "blocks.1.attn1"]

NEWER: Dict[str, DiTFamily] = {
    "skyreels": DiTFamily("skyreels", wan_like(diffusers.SkyReelsV2Transformer3DModel, rope_max_seq_len=32),
                          wan_inputs, WAN_TWO, 3, 16, "none"),
    # diffusion forcing with causal blocks of 2 frames (its asynchronous mode): a block-causal frame mask
    "skyreels_df": DiTFamily("skyreels_df", wan_like(diffusers.SkyReelsV2Transformer3DModel, rope_max_seq_len=32,
                                                     num_frame_per_block=2),
                             skyreels_df_inputs, WAN_TWO, 4, 4, "none", mask=block_causal),
    "hunyuan15": DiTFamily(
        "hunyuan15",
        lambda: diffusers.HunyuanVideo15Transformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=2,
            num_refiner_layers=1, patch_size=1, patch_size_t=1, text_embed_dim=16, text_embed_2_dim=8,
            image_embed_dim=12, rope_axes_dim=(2, 4, 4)),
        hunyuan15_inputs, ["transformer_blocks.0.attn", "transformer_blocks.1.attn"], 3, 16, "after",
        mask=hunyuan15_mask),
    "framepack": DiTFamily(
        "framepack",
        lambda: diffusers.HunyuanVideoFramepackTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=1, num_refiner_layers=1, patch_size=2, patch_size_t=1, text_embed_dim=16,
            pooled_projection_dim=8, rope_axes_dim=(2, 4, 4), has_image_proj=True, image_proj_dim=12,
            has_clean_x_embedder=True),
        framepack_inputs, ["transformer_blocks.0.attn", "single_transformer_blocks.0.attn"], 13, 16, "after",
        video_ids=FRAMEPACK_IDS, mask=framepack_mask),
    "ltx2": DiTFamily("ltx2", ltx2_model, ltx2_inputs, TWO, 3, 16, "none",
                      video_ids=grid_of(3, 16) + [0] * 5),
    # the first latent frame is the reference image
    "wan_animate": DiTFamily(
        "wan_animate",
        wan_like(diffusers.WanAnimateTransformer3DModel, in_channels=12, latent_channels=4, image_dim=None,
                 rope_max_seq_len=32, motion_encoder_size=16, motion_style_dim=8, motion_dim=4, motion_encoder_dim=8,
                 face_encoder_hidden_dim=8, face_encoder_num_heads=2, inject_face_latents_blocks=2,
                 motion_encoder_batch_size=4, motion_encoder_channel_sizes={"4": 8, "8": 8, "16": 8}),
        wan_animate_inputs, WAN_TWO, 2, 16, "none", video_ids=[-1] * 16 + grid_of(2, 16)),
    "cosmos": DiTFamily(
        "cosmos",
        lambda: diffusers.CosmosTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=12, num_layers=2, mlp_ratio=2,
            text_embed_dim=16, adaln_lora_dim=4, max_size=(4, 8, 8), patch_size=(1, 2, 2), concat_padding_mask=False),
        lambda: dict(hidden_states=randn(BATCH, 4, 3, 8, 8, seed=1), timestep=torch.tensor([0.7, 0.7]),
                     encoder_hidden_states=randn(BATCH, 5, 16, seed=2)),
        TWO, 3, 16, "none"),
    # two latent frames (input and edited image): the second at the rotary position rope_temporal_skip_len - 1
    "chronoedit": DiTFamily(
        "chronoedit", wan_like(diffusers.ChronoEditTransformer3DModel, rope_max_seq_len=32, rope_temporal_skip_len=5),
        lambda: wan_inputs(frames=2), WAN_TWO, 5, 16, "none", video_ids=frames_of((0, 16), (4, 16))),
    "allegro": DiTFamily(
        "allegro",
        lambda: diffusers.AllegroTransformer3DModel(
            patch_size=2, patch_size_t=1, num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
            num_layers=2, cross_attention_dim=24, sample_height=8, sample_width=8, sample_frames=3,
            caption_channels=16),
        lambda: dict(hidden_states=randn(BATCH, 4, 3, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                     encoder_hidden_states=randn(BATCH, 5, 16, seed=2)),
        TWO, 3, 16, "none"),
    # one joint (text first) block, then one whose attention concatenates the text before the video itself
    "easyanimate": DiTFamily(
        "easyanimate",
        lambda: diffusers.EasyAnimateTransformer3DModel(
            num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
            sample_height=8, num_layers=2, mmdit_layers=1, time_embed_dim=8, text_embed_dim=16),
        lambda: dict(hidden_states=randn(BATCH, 4, 3, 8, 8, seed=1), timestep=torch.tensor([700, 700]),
                     encoder_hidden_states=randn(BATCH, 5, 16, seed=2)),
        TWO, 3, 16, "before"),
    # a dual-stream block, three single-stream blocks, the last of them a decoder block
    "motif": DiTFamily(
        "motif",
        lambda: diffusers.MotifVideoTransformer3DModel(
            in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
            num_single_layers=3, num_decoder_layers=1, mlp_ratio=2, patch_size=2, patch_size_t=1, text_embed_dim=16,
            rope_axes_dim=(2, 4, 4)),
        lambda: dict(hidden_states=randn(BATCH, 4, 3, 8, 8, seed=1), timestep=torch.tensor([700.0, 700.0]),
                     encoder_hidden_states=randn(BATCH, 6, 16, seed=2), encoder_attention_mask=text_mask([6, 3], 6)),
        ["transformer_blocks.0.attn"] + [f"single_transformer_blocks.{i}.attn" for i in range(3)], 3, 16, "after",
        text_lengths=[6, 3], mask=motif_mask, twice_from=3),
    # Kandinsky 5 takes one sequence per call (its pipelines run the guidance branches as two calls)
    "kandinsky5": DiTFamily(
        "kandinsky5",
        kandinsky5_model, kandinsky5_inputs, [f"visual_transformer_blocks.{i}.self_attention" for i in range(2)],
        3, 16, "none", batch=1),
    "kandinsky6": DiTFamily(
        "kandinsky6",
        lambda: diffusers.Kandinsky6Transformer3DModel(
            in_visual_dim=4, out_visual_dim=4, in_text_dim=16, in_text_dim2=8, time_dim=8, patch_size=(1, 2, 2),
            model_dim=24, ff_dim=32, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 4, 4), visual_cond=False,
            in_audio_dim=4, out_audio_dim=4),
        kandinsky6_inputs, [f"visual_transformer_blocks.{i}.video_dec_block.self_attention" for i in range(2)],
        2, 16, "none", video_ids=frames_of((0, 16), (1, 16), (0, 16))),
    "consisid": DiTFamily(
        "consisid",
        lambda: diffusers.ConsisIDTransformer3DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=4, time_embed_dim=4,
            text_embed_dim=16, num_layers=2, sample_width=8, sample_height=8, sample_frames=9, patch_size=2,
            max_text_seq_length=7),
        lambda: dict(hidden_states=randn(BATCH, 3, 4, 8, 8, seed=1), encoder_hidden_states=randn(BATCH, 7, 16, seed=2),
                     timestep=torch.tensor([700, 700])),
        TWO, 3, 16, "before"),
    "anyflow": DiTFamily(
        "anyflow", wan_like(diffusers.AnyFlowTransformer3DModel, rope_max_seq_len=32),
        lambda: dict(hidden_states=randn(BATCH, 3, 4, 8, 8, seed=1), timestep=torch.full((BATCH, 3), 700.0),
                     r_timestep=torch.full((BATCH, 3), 500.0), encoder_hidden_states=randn(BATCH, 5, 16, seed=2)),
        WAN_TWO, 3, 16, "none"),
    "helios": DiTFamily("helios", wan_like(diffusers.HeliosTransformer3DModel, rope_dim=(4, 4, 4)), helios_inputs,
                        WAN_TWO, 10, 16, "none", video_ids=HELIOS_IDS),
    "minimax": DiTFamily(
        "minimax",
        lambda: diffusers.MiniMaxH3Transformer3DModel(
            num_attention_heads=2, attention_head_dim=12, hidden_size=24, num_layers=2, num_refiner_layers=1,
            ffn_dim=32, in_channels=4, audio_in_channels=4, patch_size=(1, 2, 2), text_dim=16, freq_dim=32,
            time_embed_hidden_dim=16, time_embed_dim=16, rope_freq_dim=2),
        minimax_inputs, ["transformer_blocks.0.attn", "transformer_blocks.1.attn"], 3, 4, "none",
        video_ids=[-1] * 6 + grid_of(3, 4)),
}


def expected_mask(family: DiTFamily, keys: int, block: int = 0) -> Optional[torch.Tensor]:
    """The (B, Nq, Nk) mask of the family's regularized attention in `block`, or None where it has none."""
    if family.mask is not None:
        return family.mask(family, keys, block)
    if family.text_lengths is None:
        return None
    video = keys - max(family.text_lengths)
    key_mask = torch.cat([torch.ones(family.batch, video, dtype=torch.bool),
                          text_mask(family.text_lengths, keys - video)], 1)
    return key_mask[:, None, :].expand(family.batch, keys, keys)


def bfloat16_run(fam):
    """The family's model and inputs in bfloat16: (stock output, the output with TAR on every block and
    step, the recorded regularized calls of that run)."""
    from vstar_kernels import TARConfig
    from vstar_kernels.diffusers import apply_tar

    model = fam.model().to(torch.bfloat16)
    inputs = {k: v.to(torch.bfloat16) if torch.is_tensor(v) and v.is_floating_point() else v
              for k, v in fam.inputs().items()}
    plain = forward(model, inputs)
    apply_tar(model, TARConfig(levels={0: (1.0, 1.0)}, until_step=None))
    calls = record(model)
    return plain, forward(model, inputs), calls
