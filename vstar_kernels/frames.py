"""Frame ids: which latent frame each token of a video DiT's sequence belongs to (-1: outside the
video), for `tar_attention(..., frames=ids)` (docs/api.md, "Frame ids and key masks")."""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Tuple

import torch

from ._problem import check_device
from .regularization import _size


def frame_ids(num_frames: int, tokens_per_frame: int, *, text_before: int = 0, text_after: int = 0,
              device=None) -> torch.Tensor:
    """The int32 frame ids of a sequence laid out as `text_before` text tokens (id -1), then
    `num_frames` latent frames of `tokens_per_frame` tokens each (ids 0..F-1), then `text_after`
    text tokens (id -1): CogVideoX puts its text first, HunyuanVideo and Mochi last."""
    num_frames, tokens_per_frame, text_before, text_after = [
        _size(name, n) for name, n in (("num_frames", num_frames), ("tokens_per_frame", tokens_per_frame),
                                       ("text_before", text_before), ("text_after", text_after))]
    device = check_device("device", device)
    text = [torch.full((n,), -1, device=device, dtype=torch.int32) for n in (text_before, text_after)]
    # (frames of no token: no video, whatever their number)
    video = torch.arange(num_frames if tokens_per_frame else 0, device=device,
                         dtype=torch.int32).repeat_interleave(tokens_per_frame)
    return torch.cat([text[0], video, text[1]])


class FrameLayout(NamedTuple):
    """The regular layout `frame_ids` builds, as `tar_attention(..., frames=FrameLayout(...))` takes it for
    self-attention: `text_before` tokens outside the video (id -1), `num_frames` frames of `tokens_per_frame`
    tokens, `text_after` tokens outside it. The call then knows its ids' values without reading them from the
    device: under torch.compile, where a call with an id tensor reads them on every call (a host
    synchronisation), a call with a FrameLayout reads nothing (docs/compile-and-autograd.md)."""

    num_frames: int
    tokens_per_frame: int
    text_before: int = 0
    text_after: int = 0

    def tokens(self) -> int:
        # in Python ints: numpy's fixed-width ones would wrap (a traced size stays symbolic)
        frames, per_frame, before, after = (_size(f"FrameLayout.{name}", v) for name, v in zip(self._fields, self))
        return before + frames * per_frame + after

    def ids(self, device=None) -> torch.Tensor:
        """Its int32 ids, a tensor of the caller's own (`frame_ids`)."""
        self.tokens()  # its fields checked under their names here
        return frame_ids(*self[:2], text_before=self.text_before, text_after=self.text_after, device=device)

    def shared_ids(self, device) -> torch.Tensor:
        """Its ids as the calls of this layout share them, whose values the calls trust (not to be written: ids
        written through torch, which counts in-place writes, are made again at the next call; a write around that
        count, through `.data` or numpy, is not seen): kept per layout and device (the 64 last), made outside
        inference mode (they have a version counter); made in the graph when compiling."""
        if torch.compiler.is_compiling():
            return self.ids(device)
        ids = _kept_layout_ids(self, torch.device(device))
        if ids._version:
            _kept_layout_ids.cache_clear()
            ids = _kept_layout_ids(self, torch.device(device))
        return ids


class TokenLayout(NamedTuple):
    """Where the frames are in the tokens of one video call, for every front-end (diffusers' DiTs and their
    context-parallel shards, ComfyUI): `before` tokens outside the video (id -1), the video stream, `after` tokens
    outside it, then, where the attention is joint, the text (`text_after`; `tail` names what follows when it is
    not a text). The video stream is `frames` frames of `per_frame` tokens in frame order; where it is laid out
    otherwise, `runs` gives it in full, ``((frame id, tokens), ...)`` in sequence order (-1: no frame), and
    `frames` is the largest id + 1. diffusers' DiT readers say where the text is by their family instead, and
    fill `timestep` (diffusion forcing: the call's largest timestep) and `repeat_from` (from this block on, the
    keys after the video are the video again).
    """

    frames: int                                   # F: the frames the ids span (a delta is F x F, a map too)
    per_frame: int                                # tokens per frame of the video grid
    runs: Optional[Tuple[Tuple[int, int], ...]] = None
    timestep: Optional[float] = None
    repeat_from: Optional[int] = None
    before: int = 0
    after: int = 0
    text_after: bool = False
    tail: str = "the text"

    def video_runs(self) -> Tuple[Tuple[int, int], ...]:
        """The video stream as runs: `runs`, or each frame's `per_frame` tokens in frame order."""
        return self.runs or tuple((frame, self.per_frame) for frame in range(self.frames))

    def one_frame(self) -> bool:
        """Whether the video stream holds one frame (`one_frame`)."""
        return one_frame(frame for frame, _ in self.video_runs())

    def tokens(self) -> int:
        """The tokens before the text: `before`, the video's, `after`."""
        return self.before + sum(count for _, count in self.video_runs()) + self.after

    def describe(self) -> str:
        parts = [f"{self.before} reference tokens"] if self.before else []
        if self.runs:
            parts.append(f"{sum(count for _, count in self.runs)} tokens in {len(self.runs)} runs over {self.frames} "
                         "frames")
        else:
            parts.append(f"{self.frames} frames x {self.per_frame} tokens")
        if self.after:
            parts.append(f"{self.after} reference tokens")
        if self.text_after:
            parts.append(self.tail)
        return ", then ".join(parts)


def leading_references(control: torch.Tensor, unused_from: int, where: str) -> int:
    """The leading frames of a (sequences, channels, frames, ...) control latent that are reference images, which
    Wan VACE's pipelines mark by channels `unused_from`.. all exactly 0 (the reactive half and the mask: docs/dits.md,
    docs/comfyui.md); the same count in every sequence, else a ValueError naming `where`."""
    unused = (control[:, unused_from:] == 0).flatten(3).all(dim=3).all(dim=1)  # (sequences, frames)
    leading = unused.to(torch.int32).cumprod(dim=1).sum(dim=1)
    if not bool((leading == leading[:1]).all()):
        raise ValueError(f"{where}: TAR takes one frame layout per call, but its sequences (or VACE inputs) lead with "
                         f"different numbers of reference images, {leading.tolist()}")
    return int(leading[0])


def one_frame(ids) -> bool:
    """Whether the frame ids `ids` (-1: no frame) hold one frame: TAR needs two (with one, its bias is the same on
    every video key, and beside other tokens would only pull the video's attention off them)."""
    return len({i for i in ids if i >= 0}) == 1


def as_layout(grid) -> TokenLayout:
    """A TokenLayout, or a (frames, tokens per frame) pair as one."""
    return grid if isinstance(grid, TokenLayout) else TokenLayout(*grid)


def layout_ids(runs: Tuple[Tuple[int, int], ...], before: int, after: int, device: torch.device) -> torch.Tensor:
    """The int32 ids of a token layout given as runs ``((frame id, tokens), ...)`` in sequence order (-1: no
    frame), between `before` and `after` tokens of id -1: the one frame-id builder of the front-ends (diffusers'
    DiTs, their context-parallel shards, ComfyUI). Kept per layout (the 64 last), so that every block and step of
    a call passes the same tensor, whose values tar_attention then checks once (a synchronisation per layout, not
    per call); made outside inference mode (pipelines and ComfyUI sample in it), so that it has a version counter.
    Under torch.compile, made in the graph (a compiled call reads its ids' values every time).
    """
    if torch.compiler.is_compiling():
        return _built_ids(runs, before, after, device)
    return _kept_ids(runs, before, after, device)


def _built_ids(runs, before: int, after: int, device) -> torch.Tensor:
    frames = torch.tensor([-1] + [frame for frame, _ in runs] + [-1], dtype=torch.int32)
    counts = [before] + [count for _, count in runs] + [after]
    # the length given: a shape torch.compile knows without the counts' values
    return frames.repeat_interleave(torch.tensor(counts), output_size=sum(counts)).to(device)


@functools.lru_cache(maxsize=64)
def _kept_layout_ids(layout: FrameLayout, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):
        return layout.ids(device)


@functools.lru_cache(maxsize=64)
def _kept_ids(runs, before: int, after: int, device) -> torch.Tensor:
    with torch.inference_mode(False):
        return _built_ids(runs, before, after, device)


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
