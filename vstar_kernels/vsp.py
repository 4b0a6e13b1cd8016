"""Video Synopsis Prompting (VSP): one text embedding per frame, interpolated between key states
(docs/vsp-and-dynamics.md). Needs only torch; the diffusers glue is in `vstar_kernels.diffusers` (the old
spelling `vstar_kernels.vsp.apply_vsp` and so on still works for one release, with a DeprecationWarning).
"""

from __future__ import annotations

import json
import numbers
from importlib import resources

import torch

from ._problem import check_dense

MODES = ("linear", "same")

_DIFFUSERS_NAMES = ("apply_vsp", "remove_vsp", "encode_synopsis", "generate_with_synopsis")


def default_anchors(num_frames: int, num_states: int) -> list:
    """K anchor frames spread evenly over N frames: ``floor(i * (N - 1) / (K - 1))``, ``[0]`` for K = 1
    (integer arithmetic: N=32, K=5 -> 0, 7, 15, 23, 31)."""
    n = _positive_int("num_frames", num_frames)
    k = _positive_int("num_states", num_states)
    if k > n:
        raise ValueError(f"num_states ({k}) must not exceed num_frames ({n}): each state needs its own frame")
    return [i * (n - 1) // max(k - 1, 1) for i in range(k)]


def interpolate_embeddings(embeds: torch.Tensor, num_frames: int, *, mode: str = "linear",
                           anchors=None) -> torch.Tensor:
    """Spread K sub-prompt embeddings (K, L, C) or (B, K, L, C) over N frames: (N, L, C) or (B, N, L, C).

    `mode` "linear" interpolates between the two anchors around a frame, "same" holds each
    anchor's embedding until the next. `anchors`: K strictly increasing frames in [0, N - 1]
    (default `default_anchors(N, K)`); frames before the first (after the last) take the first
    (last) embedding. Anchor frames hold their embedding exactly; the math runs in float32 for
    float16/bfloat16 input.
    """
    if not isinstance(embeds, torch.Tensor):
        raise TypeError(f"embeds must be a torch.Tensor, got {type(embeds).__name__}")
    check_dense("embeds", embeds)
    if not embeds.is_floating_point():
        raise TypeError(f"embeds must be a floating-point tensor, got {embeds.dtype}")
    if embeds.dim() not in (3, 4):
        raise ValueError(f"embeds must be (K, L, C) or (B, K, L, C), got shape {tuple(embeds.shape)}")
    batched = embeds.dim() == 4
    e = embeds if batched else embeds.unsqueeze(0)
    k = e.shape[1]
    if k < 1:
        raise ValueError("embeds must hold at least one state (K >= 1)")
    n, anchors = _frame_anchors(num_frames, k, mode, anchors)

    anchor_t = torch.tensor(anchors, dtype=torch.float64)
    frames = torch.arange(n, dtype=torch.float64)
    # left[f]: the last anchor at or before frame f (0 before the first anchor)
    left = (torch.searchsorted(anchor_t, frames, right=True) - 1).clamp(min=0)
    if mode == "same":
        out = e[:, left.to(e.device)]
    else:
        right = (left + 1).clamp(max=k - 1)
        # anchors are distinct ints, so a span is >= 1 unless left == right (both ends equal)
        span = (anchor_t[right] - anchor_t[left]).clamp(min=1.0)
        weight = ((frames - anchor_t[left]) / span).clamp(0.0, 1.0)
        work = torch.promote_types(e.dtype, torch.float32)
        w = weight.to(device=e.device, dtype=work)[None, :, None, None]
        ew = e.to(work)
        start, end = ew[:, left.to(e.device)], ew[:, right.to(e.device)]
        # at the ends of a span, the state itself (lerp computes inf + 0 * (x - inf) there: NaN)
        out = torch.where(w == 0, start, torch.where(w == 1, end, torch.lerp(start, end, w))).to(e.dtype)
    return out if batched else out.squeeze(0)


def load_synopses() -> list:
    """The paper's example prompts with a synopsis each, ``[{"prompt": str, "synopsis": [str, ...]}, ...]``
    (``vstar_kernels/data/synopses.json``: our own wording of the states the paper's examples go through)."""
    text = resources.files("vstar_kernels").joinpath("data/synopses.json").read_text(encoding="utf-8")
    return json.loads(text)["examples"]


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _frame_anchors(num_frames, k: int, mode, anchors, states: str = "embeds holds {k} states") -> tuple:
    """`mode` checked, and N with the anchor frames of K states: `num_frames` and `anchors` checked, or the default
    (`states`: what holds the K states, in the error for anchors of another count)."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n = _positive_int("num_frames", num_frames)
    if k > n:  # (default_anchors would name its own num_states, an argument the caller never passed)
        raise ValueError(f"num_frames ({n}) must be at least the number of states: {states.format(k=k)}, and each "
                         "state needs its own frame")
    return n, default_anchors(n, k) if anchors is None else _check_anchors(anchors, n, k, states.format(k=k))


def _check_anchors(anchors, n: int, k: int, states: str) -> list:
    if isinstance(anchors, torch.Tensor):
        if anchors.dim() != 1 or anchors.is_floating_point() or anchors.is_complex() or anchors.dtype == torch.bool:
            raise TypeError(f"anchors must be a 1-D integer tensor, got {anchors.dtype} "
                            f"of shape {tuple(anchors.shape)}")
        values = anchors.tolist()
    elif isinstance(anchors, (set, frozenset, dict)):  # no order: accepted or refused by its hash order
        raise TypeError(f"anchors must be a sequence of ints in frame order, got a {type(anchors).__name__}")
    else:
        try:
            values = list(anchors)
        except TypeError:
            raise TypeError(f"anchors must be a sequence of ints, got {type(anchors).__name__}") from None
        for a in values:
            if isinstance(a, bool) or not isinstance(a, numbers.Integral):
                raise TypeError(f"anchors must be ints, got {a!r} ({type(a).__name__})")
        values = [int(a) for a in values]
    if len(values) != k:
        raise ValueError(f"anchors has {len(values)} entries but {states}: one anchor per state")
    bad = [a for a in values if not 0 <= a < n]
    if bad:
        raise ValueError(f"anchors must lie in [0, {n - 1}] for num_frames={n}, got {bad}")
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"anchors must be strictly increasing, got {values}")
    return values


def __getattr__(name):
    if name in _DIFFUSERS_NAMES:
        from ._deprecation import moved

        return moved(f"vstar_kernels.vsp.{name}", "vstar_kernels.diffusers", name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
