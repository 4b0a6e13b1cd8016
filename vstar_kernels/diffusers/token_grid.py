"""A video DiT call's token layout from its runs (`runs_grid`) and the frame id of each token of a block's
self-attention (`token_frames`); the layout type is frames.TokenLayout, every front-end's (docs/dits.md, How a
token gets its frame).
"""

from __future__ import annotations

import itertools
from typing import Optional

import torch

from ..frames import FrameLayout, TokenLayout, layout_ids


def runs_grid(runs, per_frame: int) -> TokenLayout:
    """A grid from its runs (empty runs dropped, adjacent runs of one id merged); `frames` is the largest id + 1."""
    runs = [(int(frame), int(count)) for frame, count in runs if count > 0]
    runs = tuple((frame, sum(count for _, count in group)) for frame, group in itertools.groupby(runs, lambda r: r[0]))
    return TokenLayout(max((frame for frame, _ in runs), default=-1) + 1, per_frame, runs)


def token_frames(grid, text: str, nq: int, nk: int, where: str, device, block: Optional[int] = None):
    """The frames of a block's self-attention over nq = nk tokens (text -1, `text` "none", "before" or "after" the
    video), for the call's token grid (a `TokenLayout`, or a (token frames, tokens per frame) pair), as
    tar_attention's `frames=` takes them: a `FrameLayout` where the video is its frames in order (its ids then
    known without reading them), else the (N,) ids; `block` (forward order) for the grids whose later blocks see
    the video twice."""
    if grid is None:
        raise RuntimeError(f"{where}: called outside a forward call of the model, so the frame layout is unknown")
    count, per_frame = grid[0], grid[1]
    runs = getattr(grid, "runs", None)
    repeat_from = getattr(grid, "repeat_from", None)
    twice = repeat_from is not None and block is not None and block >= repeat_from
    video = (count * per_frame if runs is None else sum(tokens for _, tokens in runs)) * (2 if twice else 1)
    extra = nk - video
    if nq != nk or extra < 0 or (extra and text == "none"):
        shape = f"{count} frames x {per_frame} tokens" if runs is None else f"{count} frames"
        raise ValueError(
            f"{where}: expected a self-attention over the {video} video tokens ({shape}"
            f"{', twice' if twice else ''}){'' if text == 'none' else ' and the text tokens'}, got {nq} "
            f"queries and {nk} keys")
    before, after = (extra, 0) if text == "before" else (0, extra)
    regular = tuple((frame, per_frame) for frame in range(count))
    if not twice and runs in (None, regular):
        return FrameLayout(count, per_frame, before, after)
    runs = runs or regular
    return layout_ids(runs + runs if twice else runs, before, after, torch.device(device))
