"""Frame ids: which latent frame each token of a video DiT's sequence belongs to (-1: outside the
video), for `tar_attention(..., frames=ids)` (docs/api.md, "Frame ids and key masks")."""

from __future__ import annotations

import torch

from .regularization import _size


def frame_ids(num_frames: int, tokens_per_frame: int, *, text_before: int = 0, text_after: int = 0,
              device=None) -> torch.Tensor:
    """The int32 frame ids of a sequence laid out as `text_before` text tokens (id -1), then
    `num_frames` latent frames of `tokens_per_frame` tokens each (ids 0..F-1), then `text_after`
    text tokens (id -1): CogVideoX puts its text first, HunyuanVideo and Mochi last."""
    num_frames, tokens_per_frame, text_before, text_after = [
        _size(name, n) for name, n in (("num_frames", num_frames), ("tokens_per_frame", tokens_per_frame),
                                       ("text_before", text_before), ("text_after", text_after))]
    text = [torch.full((n,), -1, device=device, dtype=torch.int32) for n in (text_before, text_after)]
    video = torch.arange(num_frames, device=device, dtype=torch.int32).repeat_interleave(tokens_per_frame)
    return torch.cat([text[0], video, text[1]])


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
