"""Tiny random diffusers video models and pipelines, built offline (no weights downloaded).

Sizes are the smallest the diffusers blocks accept, so a 4-frame 16x16 pipeline call with
2 steps takes a few hundredths of a second on a CPU.
"""

import json
import string

import torch

CONTEXT_DIM = 12   # text encoder width = UNet cross-attention dim
MAX_TOKENS = 16    # tokenizer length (77 in real CLIP)


def tiny_unet3d(seed=0):
    from diffusers import UNet3DConditionModel

    torch.manual_seed(seed)
    return UNet3DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=CONTEXT_DIM,
        down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
        up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"),
        attention_head_dim=4, norm_num_groups=4, sample_size=8,
    ).eval()


def tiny_unet_motion(seed=0):
    from diffusers import UNetMotionModel

    torch.manual_seed(seed)
    return UNetMotionModel(
        block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=CONTEXT_DIM,
        down_block_types=("CrossAttnDownBlockMotion", "DownBlockMotion"),
        up_block_types=("UpBlockMotion", "CrossAttnUpBlockMotion"),
        num_attention_heads=2, motion_num_attention_heads=2, motion_max_seq_length=32,
        norm_num_groups=4, sample_size=8,
    ).eval()


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
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                         up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4,
                         sample_size=16).eval()


def tiny_text_to_video_pipeline(directory):
    from diffusers import DDIMScheduler, TextToVideoSDPipeline

    tokenizer, text_encoder = tiny_text_parts(directory)
    pipe = TextToVideoSDPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                                 unet=tiny_unet3d(), scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_animatediff_pipeline(directory):
    from diffusers import AnimateDiffPipeline, DDIMScheduler

    tokenizer, text_encoder = tiny_text_parts(directory)
    pipe = AnimateDiffPipeline(vae=tiny_vae(), text_encoder=text_encoder, tokenizer=tokenizer,
                               unet=tiny_unet_motion(), motion_adapter=None, scheduler=DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def call_args(**overrides):
    """Arguments for a seeded 16x16 2-step pipeline call returning the frames as a tensor."""
    args = dict(height=16, width=16, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0))
    args.update(overrides)
    return args
