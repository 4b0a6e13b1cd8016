"""Tiny random diffusers video models and pipelines built from configs (no downloads).

Each family gives: a model in eval mode (seeded), keyword inputs for one forward
call, and the attention modules TAR must regularize with their resolution level,
written from the issue's list of modules (independently of the code under test).

The pipelines (tiny_*_pipeline) pair 2-level UNets with a character-level CLIP text
encoder and a one-block VAE: sizes are the smallest the diffusers blocks accept, so a
4-frame 16x16 call with 2 steps takes a few hundredths of a second on a CPU.
"""

import json
import re
import string
from dataclasses import dataclass
from typing import Callable, Dict, Optional

import pytest
import torch
import torch.nn.functional as F
from diffusers import (
    AnimateDiffPAGPipeline,
    AnimateDiffPipeline,
    AutoencoderKL,
    DDIMScheduler,
    I2VGenXLUNet,
    LatteTransformer3DModel,
    MotionAdapter,
    TextToVideoSDPipeline,
    UNet2DConditionModel,
    UNet3DConditionModel,
    UNetMotionModel,
    UNetSpatioTemporalConditionModel,
)
from diffusers.models.attention_processor import Attention

from ..helpers import naive_tar


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models: one thread is fastest, and it keeps a busy CI machine from thrashing in thread barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


BLOCKS = "(?:down_blocks\\.(?P<down>\\d+)|mid_block|up_blocks\\.(?P<up>\\d+))"


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@dataclass
class Family:
    name: str
    build: Callable[[], torch.nn.Module]
    inputs: Callable[[torch.nn.Module], dict]
    temporal: str                 # regex of the regularized modules' names
    input_block: Optional[str]    # regex of the input-block temporal attentions (level 0)

    def model(self, **overrides) -> torch.nn.Module:
        """`overrides` go to the builder (unet3d and motion take channels=, one width per level)."""
        torch.manual_seed(0)
        return self.build(**overrides).eval()

    def expected_levels(self, model, include_input_block=False) -> Dict[str, int]:
        """name -> level of every attention module TAR must regularize (at any configured level)."""
        levels = len(model.down_blocks) if hasattr(model, "down_blocks") else 1
        found = {}
        for name, module in model.named_modules():
            if not isinstance(module, Attention):
                continue
            m = re.fullmatch(self.temporal, name)
            if m is not None:
                groups = m.groupdict()
                if groups.get("down") is not None:
                    found[name] = int(groups["down"])
                elif groups.get("up") is not None:
                    found[name] = levels - 1 - int(groups["up"])
                else:
                    found[name] = levels - 1 if name.startswith("mid_block") else 0
            elif include_input_block and self.input_block and re.fullmatch(self.input_block, name):
                found[name] = 0
        return found


def _unet3d(channels=(8, 16, 16), cross_attention_dim=8):
    blocks = len(channels)
    return UNet3DConditionModel(
        block_out_channels=channels, layers_per_block=1, norm_num_groups=4, cross_attention_dim=cross_attention_dim,
        attention_head_dim=4, sample_size=8,
        down_block_types=("CrossAttnDownBlock3D",) * (blocks - 1) + ("DownBlock3D",),
        up_block_types=("UpBlock3D",) + ("CrossAttnUpBlock3D",) * (blocks - 1))


def unet3d_inputs(model, batch=2, frames=8, size=8):
    return dict(sample=randn(batch, 4, frames, size, size, seed=1), timestep=torch.tensor(500),
                encoder_hidden_states=randn(batch, 3, 8, seed=2))


def _i2vgen():
    return I2VGenXLUNet(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
        attention_head_dim=4, sample_size=8,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"), up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"))


def _i2vgen_inputs(model):
    return dict(sample=randn(1, 4, 8, 8, 8, seed=1), timestep=torch.tensor(500), fps=torch.tensor([8]),
                image_latents=randn(1, 4, 8, 8, 8, seed=3), image_embeddings=randn(1, 8, seed=4),
                encoder_hidden_states=randn(1, 3, 8, seed=2))


def _motion(channels=(8, 16, 16), groups=4, cross_attention_dim=8):
    blocks = len(channels)
    return UNetMotionModel(
        block_out_channels=channels, layers_per_block=1, norm_num_groups=groups,
        cross_attention_dim=cross_attention_dim, num_attention_heads=2, motion_num_attention_heads=2,
        motion_max_seq_length=32, sample_size=8,
        down_block_types=("CrossAttnDownBlockMotion",) * (blocks - 1) + ("DownBlockMotion",),
        up_block_types=("UpBlockMotion",) + ("CrossAttnUpBlockMotion",) * (blocks - 1))


def wide_motion():
    """AnimateDiff's widest temporal head dim, 160 (1280 channels / 8 heads), at level 1."""
    torch.manual_seed(0)
    return _motion(channels=(32, 320), groups=32).eval()


def motion_adapter(channels=(8, 16, 16)):
    """The adapter matching `_motion` (AnimateDiff pipelines read its config, e.g. for FreeNoise)."""
    torch.manual_seed(0)
    return MotionAdapter(block_out_channels=channels, motion_layers_per_block=1, motion_num_attention_heads=2,
                         motion_norm_num_groups=4, motion_max_seq_length=32)


def motion_inputs(model, batch=2, frames=16):
    # the pipeline repeats the text embedding per frame before calling the UNet
    text = randn(batch, 3, 8, seed=2).repeat_interleave(frames, dim=0)
    return dict(sample=randn(batch, 4, frames, 8, 8, seed=1), timestep=torch.tensor(500), encoder_hidden_states=text)


def _svd():
    # the spatio-temporal blocks hard-code 32 norm groups: 32 channels is the smallest width
    return UNetSpatioTemporalConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=8, num_attention_heads=(2, 4),
        sample_size=8, in_channels=8, out_channels=4, addition_time_embed_dim=4,
        projection_class_embeddings_input_dim=12,
        down_block_types=("CrossAttnDownBlockSpatioTemporal", "DownBlockSpatioTemporal"),
        up_block_types=("UpBlockSpatioTemporal", "CrossAttnUpBlockSpatioTemporal"))


def _svd_inputs(model):
    return dict(sample=randn(1, 8, 8, 8, 8, seed=1), timestep=torch.tensor(10.0),
                encoder_hidden_states=randn(1, 1, 8, seed=2), added_time_ids=torch.tensor([[6.0, 127.0, 0.02]]))


def _latte():
    return LatteTransformer3DModel(
        num_attention_heads=2, attention_head_dim=4, in_channels=4, out_channels=8, num_layers=2,
        cross_attention_dim=8, sample_size=8, patch_size=2, norm_type="ada_norm_single", caption_channels=8,
        video_length=8)


def _latte_inputs(model):
    return dict(hidden_states=randn(1, 4, 8, 8, 8, seed=1), timestep=torch.tensor([500]),
                encoder_hidden_states=randn(1, 3, 8, seed=2))


FAMILIES = {
    "unet3d": Family("unet3d", _unet3d, unet3d_inputs,
                     BLOCKS + r"\.temp_attentions\.\d+\.transformer_blocks\.\d+\.attn[12]",
                     r"transformer_in\.transformer_blocks\.\d+\.attn[12]"),
    "i2vgen_xl": Family("i2vgen_xl", _i2vgen, _i2vgen_inputs,
                        BLOCKS + r"\.temp_attentions\.\d+\.transformer_blocks\.\d+\.attn[12]",
                        r"transformer_in\.transformer_blocks\.\d+\.attn[12]|image_latents_temporal_encoder\.attn1"),
    "motion": Family("motion", _motion, motion_inputs,
                     BLOCKS + r"\.motion_modules\.\d+\.transformer_blocks\.\d+\.attn[12]", None),
    "svd": Family("svd", _svd, _svd_inputs,
                  BLOCKS + r"\.attentions\.\d+\.temporal_transformer_blocks\.\d+\.attn1", None),
    "latte": Family("latte", _latte, _latte_inputs, r"temporal_transformer_blocks\.\d+\.attn1", None),
}


def unet2d():
    """An image UNet: no temporal attention at all."""
    torch.manual_seed(0)
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                                cross_attention_dim=8, attention_head_dim=4, sample_size=8,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")).eval()


# --------------------------------------------------------------------------- pipelines

CONTEXT_DIM = 12   # text encoder width = UNet cross-attention dim
MAX_TOKENS = 16    # tokenizer length (77 in real CLIP)


def tiny_unet3d(seed=0):
    torch.manual_seed(seed)
    return _unet3d(channels=(8, 16), cross_attention_dim=CONTEXT_DIM).eval()


def tiny_unet_motion(seed=0):
    torch.manual_seed(seed)
    return _motion(channels=(8, 16), cross_attention_dim=CONTEXT_DIM).eval()


def tiny_text_parts(directory, seed=0):
    """A character-level CLIP tokenizer (vocabulary files written to `directory`) and a 1-layer encoder."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    chars = list(string.ascii_lowercase + string.digits + ",.'-!?")
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    tokenizer = CLIPTokenizer(str(directory / "vocab.json"), str(directory / "merges.txt"),
                              model_max_length=MAX_TOKENS)
    torch.manual_seed(seed)
    config = CLIPTextConfig(vocab_size=len(vocab), hidden_size=CONTEXT_DIM, intermediate_size=16,
                            num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=MAX_TOKENS,
                            bos_token_id=vocab["<|startoftext|>"], eos_token_id=vocab["<|endoftext|>"],
                            pad_token_id=vocab["<|endoftext|>"])
    return tokenizer, CLIPTextModel(config).eval()


def tiny_vae(seed=0):
    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                         sample_size=16).eval()


def tiny_text_to_video_pipeline(directory):
    tokenizer, text_encoder = tiny_text_parts(directory)
    pipe = TextToVideoSDPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                 unet=tiny_unet3d(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_pipeline(directory):
    tokenizer, text_encoder = tiny_text_parts(directory)
    pipe = AnimateDiffPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                               unet=tiny_unet_motion(), motion_adapter=None, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_pag_pipeline(directory, layers=("mid",)):
    tokenizer, text_encoder = tiny_text_parts(directory)
    pipe = AnimateDiffPAGPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                  unet=tiny_unet_motion(), motion_adapter=None, scheduler=DDIMScheduler(),
                                  pag_applied_layers=list(layers))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_args(**overrides):
    """Arguments for a seeded 16x16 2-step pipeline call returning the frames as a tensor."""
    args = dict(height=16, width=16, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    args.update(overrides)
    return args


# distinct (sigma, strength) per level, so that a module at the wrong level fails its check
LEVEL_SPECS = {0: (1.0, 1.0), 1: (2.0, 0.75), 2: (3.0, 0.5)}


def forward(model, inputs):
    with torch.no_grad():
        return model(**inputs, return_dict=False)[0]


def attention_modules(model):
    return {name: m for name, m in model.named_modules() if isinstance(m, Attention)}


def run_capturing(model, inputs, names):
    """Forward once; returns {name: [(hidden_states, encoder_hidden_states, output), ...]} for `names`."""
    calls = {name: [] for name in names}
    handles = []
    modules = attention_modules(model)
    for name in names:
        def hook(module, args, kwargs, output, name=name):
            x = args[0] if args else kwargs["hidden_states"]
            calls[name].append((x, kwargs.get("encoder_hidden_states"), output))
        handles.append(modules[name].register_forward_hook(hook, with_kwargs=True))
    try:
        out = forward(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return out, calls


def attention64(attn, x, context, sigma, strength, delta=None):
    """The module's output in float64: projections, TAR (naive_tar; `delta` replaces sigma), output projection."""
    assert attn.group_norm is None and attn.spatial_norm is None and attn.norm_q is None
    assert not attn.residual_connection and attn.rescale_output_factor == 1.0

    def linear(layer, t):
        return F.linear(t.double(), layer.weight.double(), None if layer.bias is None else layer.bias.double())

    context = x if context is None else context
    B, N, _ = x.shape

    def heads(t):
        return t.view(B, t.shape[1], attn.heads, -1).transpose(1, 2)

    out = naive_tar(heads(linear(attn.to_q, x)), heads(linear(attn.to_k, context)),
                    heads(linear(attn.to_v, context)), sigma=sigma, strength=strength, delta=delta)
    return linear(attn.to_out[0], out.transpose(1, 2).reshape(B, N, -1))
