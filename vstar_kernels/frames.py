"""Frame ids: which latent frame each token of a video DiT's sequence belongs to.

A video diffusion transformer attends over all tokens of all frames at once (and, in joint
attention, over text tokens too). TAR's band then runs over frame distance rather than token
distance: `tar_attention(..., frames=ids)` takes one integer id per token, the token's latent
frame (counted after the patch embedding), or -1 for a token outside the video.
"""

from __future__ import annotations

import torch

from .regularization import _size


def frame_ids(num_frames: int, tokens_per_frame: int, *, text_before: int = 0, text_after: int = 0,
              device=None) -> torch.Tensor:
    """The frame ids of a sequence laid out as text, then the video frame by frame, then text.

    Args:
        num_frames: latent frames F after the patch embedding (a temporal patch of 2 halves them).
        tokens_per_frame: tokens of one frame (latent height x width over the spatial patch sizes).
        text_before: tokens before the video (CogVideoX's text), id -1.
        text_after: tokens after the video (HunyuanVideo's and Mochi's text), id -1.
        device: where the ids are made.

    Returns:
        int32 tensor of shape (text_before + num_frames * tokens_per_frame + text_after,):
        ``[-1] * text_before + [0] * tokens_per_frame + ... + [F - 1] * tokens_per_frame + [-1] * text_after``.
    """
    num_frames = _size("num_frames", num_frames)
    tokens_per_frame = _size("tokens_per_frame", tokens_per_frame)
    text_before = _size("text_before", text_before)
    text_after = _size("text_after", text_after)
    video = torch.arange(num_frames, device=device, dtype=torch.int32).repeat_interleave(tokens_per_frame)
    return torch.cat([torch.full((text_before,), -1, device=device, dtype=torch.int32), video,
                      torch.full((text_after,), -1, device=device, dtype=torch.int32)])


def frame_bias(frames_q: torch.Tensor, frames_k: torch.Tensor, *, sigma: float, delta=None,
               dtype=torch.float32) -> torch.Tensor:
    """dA for queries with ids `frames_q` (Nq,) and keys with ids `frames_k` (Nk,): (Nq, Nk) in `dtype`.

    ``exp(-0.5 * ((f(k_j) - f(q_i)) / sigma) ** 2)`` (evaluated in float64 and rounded once, as
    `gaussian_bias` does for token distances), or ``delta[f(q_i), f(k_j)]`` for an (F, F) frame
    matrix `delta` (differentiable in it); 0 where either id is -1. Ids are validated by the caller
    (-1 or more; delta (F, F) with F the largest id + 1).
    """
    fq = frames_q.to(torch.int64)[:, None]
    fk = frames_k.to(torch.int64)[None, :]
    if delta is None:
        values = torch.exp(-0.5 * ((fk - fq).to(torch.float64) / sigma) ** 2).to(dtype)
    elif delta.shape[0] == 0:  # the ids name no frame (every id is -1): no entry to read
        values = torch.zeros(fq.shape[0], fk.shape[1], device=delta.device, dtype=dtype)
    else:
        values = delta.to(dtype)[fq.clamp(min=0), fk.clamp(min=0)]
    return torch.where((fq >= 0) & (fk >= 0), values, 0.0)
