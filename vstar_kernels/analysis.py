"""Temporal attention analysis: how band-like a frame-to-frame map is, where a DiT's row maxima lie, and
pictures of maps.

See docs/attention-analysis.md. The measures need only torch; the plots need matplotlib (the
``plot`` extra), imported on first use and drawn with the Agg backend into a file, without
touching pyplot's global state.
"""

from __future__ import annotations

import io
import math
import numbers
import os
import re
from collections.abc import Mapping

import torch

from . import _env
from ._deprecation import renamed_keywords
from ._drawing import MAX_DPI, MIN_DPI, image_path_problem
from ._problem import TarProblem, check_frame_values, check_int, check_sigma, check_values, make_problem
from .reference import CHUNK_ELEMENTS, _masked_scores, without_autocast
from .regularization import gaussian_toeplitz


def diagonality(attention: torch.Tensor) -> torch.Tensor:
    """Weighted correlation coefficient of the row and column index, the map being the weights.

    1 on the main diagonal, near 1 for a narrow band, 0 for a uniform map (or any map whose rows
    are all alike), -1 on the anti-diagonal; NaN when the mass lies in a single row or column.
    Takes a non-negative (..., N, M) map; returns float64 of shape (...).
    """
    a = _check_map("attention", attention)
    n, m = a.shape[-2:]
    i = torch.arange(n, dtype=torch.float64, device=a.device)[:, None]
    j = torch.arange(m, dtype=torch.float64, device=a.device)[None, :]
    w = a / a.sum(dim=(-2, -1), keepdim=True)
    mu_i = (w * i).sum(dim=(-2, -1), keepdim=True)
    mu_j = (w * j).sum(dim=(-2, -1), keepdim=True)
    di, dj = i - mu_i, j - mu_j
    cov = (w * di * dj).sum(dim=(-2, -1))
    var_i = (w * di * di).sum(dim=(-2, -1))
    var_j = (w * dj * dj).sum(dim=(-2, -1))
    denom = torch.sqrt(var_i * var_j)
    return torch.where(denom > 0, cov / denom, torch.full_like(cov, math.nan))


def band_energy(attention: torch.Tensor, width: int) -> torch.Tensor:
    """Fraction of a non-negative (..., N, M) map's mass within ``|i - j| <= width`` of the diagonal.

    For an attention map (rows sum to 1): the average share of attention a frame gives to frames
    at most `width` away. Returns float64 of shape (...).
    """
    a = _check_map("attention", attention)
    check_int("width", width, 0)
    n, m = a.shape[-2:]
    i = torch.arange(n, device=a.device)[:, None]
    j = torch.arange(m, device=a.device)[None, :]
    band = (i - j).abs() <= min(width, max(n, m))  # a width past the map: all of it (and no int64 overflow)
    return (a * band).sum(dim=(-2, -1)) / a.sum(dim=(-2, -1))


def max_outside_own_frame(q, k, frames, *, scale=None, key_mask=None) -> torch.Tensor:
    """Per (batch, head), the share of the video query rows whose max score lies outside their own frame.

    q (B, H, Nq, D) and k (B, H, Nk, D) (3-D (B, N, D) give (B,)), with `frames`, `scale` and `key_mask` as
    `vstar_kernels.tar_attention` takes them: one (N,) tensor of frame ids (-1 for text) or a pair
    (q_frames, k_frames). A row of a video query (id >= 0) counts when its max of S = scale q k^T over the
    unmasked keys is strictly larger than its max over the keys of its own frame and the text (a tie is
    inside; a row with no unmasked key is inside). Returns float64 (B, H), NaN where no query is a video token.

    This share bounds the tiled speculative forward's flag rate from above, up to rounding
    (docs/attention-analysis.md says why, and why the lean forward's is not bounded: it flags ties too; the kernel
    also flags a row with no unmasked key, and no text row with a finite max: text rows are not counted).
    Scores in float32 (float64 for float64 input), in blocks of query rows of `reference.CHUNK_ELEMENTS` at most.
    """
    if frames is None:
        raise TypeError("frames must be a torch.Tensor of frame ids or a pair (q_frames, k_frames), got None")
    problem = make_problem(q, k, k, sigma=1.0, strength=0.0, delta=None, causal=False, max_mode="row",
                           scale=scale, frames=frames, key_mask=key_mask)
    check_values("q", problem.q, "max_outside_own_frame")
    check_frame_values(problem)
    for name, t in (("q", problem.q), ("k", problem.k)):
        if not torch.isfinite(t).all():
            raise ValueError(f"{name} has non-finite entries")
    k = problem.k.to(torch.float64 if problem.dtype == torch.float64 else torch.float32)
    dropped = None if problem.key_mask is None else ~problem.key_mask[:, None, None, :]
    video = problem.frames_q >= 0
    outside = torch.zeros(problem.batch, problem.heads, dtype=torch.int64, device=problem.device)
    rows = max(1, CHUNK_ELEMENTS // max(1, problem.batch * problem.heads * problem.nk))
    with without_autocast(problem.device):  # scores in float32, as above
        for start in range(0, problem.nq, rows):
            block = slice(start, start + rows)
            outside += (_outside_own_frame(problem, block, k, dropped) & video[block]).sum(dim=-1)
    share = outside.to(torch.float64) / video.sum()
    return share.squeeze(1) if problem.was_3d else share


def _outside_own_frame(problem: TarProblem, rows: slice, k: torch.Tensor, dropped=None) -> torch.Tensor:
    """(B, H, rows) bool: whether the max score of each query row of the block `rows` of `problem` (which has
    frame ids) is strictly larger than its max over the keys of its own frame and the text. k: problem.k in the
    compute dtype; `dropped`: None or True where a key is masked, broadcast to (B, H, rows, Nk)."""
    s = _masked_scores(problem, problem.q[:, :, rows].to(k.dtype), k, dropped)
    keys = problem.frames_k[None, :]
    own = (keys == problem.frames_q[rows, None]) | (keys == -1)
    return s.amax(dim=-1) > s.masked_fill(~own, -math.inf).amax(dim=-1)


def minmax_normalize(attention) -> torch.Tensor:
    """``(A - min A) / (max A - min A)`` of a 2-D map, float64, over its entries that are not NaN (a captured map's
    row of a frame with no token), which stay NaN; a constant map gives zeros."""
    a = _as_map("attention", attention)
    low, high = _range(a)
    if not high > low:
        return torch.where(a.isnan(), a, 0.0)
    if math.isinf(high - low):  # a range wider than float64's largest number: halved first (exactly, at that size)
        return (a / 2 - low / 2) / (high / 2 - low / 2)
    return (a - low) / (high - low)


SCALES = ("shared", "per-panel")


def short_layer_name(layer: str) -> str:
    """A module path shortened for a panel title.

    ``down_blocks.0.temp_attentions.0.transformer_blocks.0.attn1`` -> ``down0.t0.attn1``,
    ``transformer_in.transformer_blocks.0.attn1`` -> ``transformer_in.attn1``, a DiT's
    ``transformer_blocks.0.attn1`` -> ``b0.attn1``; a name without these parts is returned as it is.
    """
    if not isinstance(layer, str):
        raise TypeError(f"short_layer_name: layer must be a module path (str), got {type(layer).__name__}")
    name = re.sub(r"(down|up)_blocks\.(\d+)", r"\1\2", layer)
    name = name.replace("mid_block.", "mid.").replace("temp_attentions.", "t").replace("motion_modules.", "m")
    name = name.replace("temporal_transformer_blocks.", "tb")
    # the one block of a UNet's temporal transformer goes; a DiT's block numbers stay
    name = re.sub(r"((?:^|\.)(?:t\d+|m\d+|transformer_in))\.transformer_blocks\.0\.", r"\1.", name)
    return name.replace("transformer_blocks.", "b")


@renamed_keywords(scale="color_scale")
def plot_attention_maps(maps, path, *, color_scale: str = "shared", cmap: str = "jet", panel_size: float = 2.5,
                        dpi: int = 100, title=None) -> dict:
    """Draw temporal attention maps, one panel each (query frame down, key frame across), into an image file.

    `maps` is ``{name: (N, N) map}`` (one row) or ``{level: {layer: (N, N) map}}`` (one row per
    level), tensors or arrays; layer names are shortened in the titles (`short_layer_name`) unless
    two would then read alike. `path` is a file name, whose suffix gives the format, or a binary file
    object (PNG). `color_scale` is ``"shared"`` (one scale 0..max for all panels, one colour bar) or
    ``"per-panel"`` (each panel on its own min..max, the paper's look): see
    docs/attention-analysis.md. `scale` is the deprecated spelling of `color_scale` (kept for one
    release).

    Returns ``{panel key: array drawn}`` in drawing order (``"level / layer"`` for nested maps).
    """
    rows = _panel_rows(maps)
    return _draw(rows, path, caller="plot_attention_maps", cmap=cmap, panel_size=panel_size, dpi=dpi, title=title,
                 color_scale=color_scale, value_label="attention weight")


def plot_delta(sigmas, n: int, path, *, cmap: str = "jet", panel_size: float = 2.5, dpi: int = 100) -> dict:
    """Draw TAR's Gaussian matrix dA for several sigma side by side (paper Fig. S.13).

    Each panel is `gaussian_toeplitz(n, sigma)`, its values drawn as they are on the shared
    scale 0..1 (dA's diagonal is 1), one colour bar for all, into `path` as `plot_attention_maps`
    takes it. Returns ``{panel title: array drawn}``.
    """
    if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__iter__"):
        raise TypeError(f"sigmas must be a sequence of numbers, got {type(sigmas).__name__}")
    sigmas = list(sigmas)
    if not sigmas:
        raise ValueError("sigmas must hold at least one value")
    check_int("n", n)
    checked = []
    for i, s in enumerate(sigmas):
        try:
            checked.append(check_sigma(s))
        except (TypeError, ValueError) as exc:  # (its message names a sigma: which of the caller's sigmas)
            raise type(exc)(f"sigmas[{i}]: {exc}") from None
    sigmas = checked
    titles = [f"{s:g}" for s in sigmas]
    for title in titles:
        if titles.count(title) > 1:
            raise ValueError(f"sigmas holds {title} twice (as its panel title shows it): give each sigma once")
    row = [(f"sigma = {s:g}", f"sigma = {s:g}", gaussian_toeplitz(int(n), s, dtype=torch.float64)) for s in sigmas]
    return _draw([(None, row)], path, caller="plot_delta", cmap=cmap, panel_size=panel_size, dpi=dpi,
                 title=f"TAR's Gaussian matrix dA, {int(n)} frames", color_scale="shared", value_label="dA")


MIN_PANEL_INCHES = 0.5
LEFT_INCHES = 0.75         # tick labels, the y-axis label and a row name
BOTTOM_INCHES = 0.45       # tick labels and the x-axis label
COLORBAR_INCHES = 0.9      # the shared colour bar and its label
PANEL_COLORBAR_INCHES = 0.75  # a per-panel colour bar and its tick labels
LINE_INCHES = 0.2          # one line of a (panel or figure) title
PANEL_MARGIN_INCHES = 0.5  # and 1.25 inches a map inch: what a panel gives to its frame, ticks and colour bar
TITLE_FONT = 8


def check_dpi(dpi) -> int:
    """`dpi` if it is an int from MIN_DPI (matplotlib draws the figures' text from there) to MAX_DPI (print
    quality; a figure's pixels grow as the dpi squared), else a ValueError."""
    if check_int("dpi", dpi) < MIN_DPI:
        raise ValueError(f"dpi must be at least {MIN_DPI} (matplotlib cannot draw the labels' text at 5 or less; "
                         f"it is readable from about 72), got {dpi}")
    if dpi > MAX_DPI:  # (matplotlib failed allocating the figure, a MemoryError, or drew for minutes in GBs)
        raise ValueError(f"dpi must be at most {MAX_DPI} (print quality; a figure's pixels grow as the dpi squared, "
                         f"its size in memory with them), got {dpi}")
    return dpi


def check_drawing(caller: str, path, color_scale, dpi) -> None:
    """The drawing arguments of the public function `caller` (named in the errors), checked before any work."""
    if isinstance(path, io.TextIOBase) or not isinstance(path, (str, os.PathLike)) and not callable(
            getattr(path, "write", None)):
        raise TypeError(f"{caller}: path must be a file name (str or os.PathLike) or a binary file object, got "
                        f"{type(path).__name__}")
    problem = image_path_problem(os.fsdecode(path)) if isinstance(path, (str, os.PathLike)) else None
    if problem:
        raise ValueError(f"{caller}: path {os.fsdecode(path)!r} {problem}")
    if color_scale not in SCALES:
        raise ValueError(f"color_scale must be one of {SCALES}, got {color_scale!r}")
    check_dpi(dpi)


def _draw(rows, path, *, caller, cmap, panel_size, dpi, title, color_scale, value_label) -> dict:
    """Draw `rows` for the public function `caller` (named in the error raised without matplotlib)."""
    check_drawing(caller, path, color_scale, dpi)
    import numpy as np
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError as exc:
        raise ImportError(f"vstar_kernels.analysis.{caller} needs matplotlib, which is not importable ({exc}); "
                          f"install the plot extra with: {_env.install_hint('plot')}") from exc

    if isinstance(panel_size, bool) or not isinstance(panel_size, numbers.Real) or not panel_size > MIN_PANEL_INCHES \
            or not math.isfinite(panel_size):
        raise ValueError(f"panel_size must be a number of inches > {MIN_PANEL_INCHES:g}, got {panel_size!r}")
    rows = [(label, [(key, shown, _as_map(key, value)) for key, shown, value in row]) for label, row in rows]
    keys = [key for _, row in rows for key, _, _ in row]
    for key in keys:
        if keys.count(key) > 1:  # the dict returned holds one array per panel key
            raise ValueError(f"{caller}: two panels are both named {key!r}; give each panel a name of its own")
    values = [a for _, row in rows for _, _, a in row]
    # a pixel or more per frame (fewer, and drawing "nearest" drops frames: a diagonal drawn as its neighbours)
    panel_size = max(panel_size, 1.25 * max(max(a.shape) for a in values) / dpi + PANEL_MARGIN_INCHES)
    if color_scale == "shared":
        low = min(0.0, min(_range(a)[0] for a in values))
        high = max(_range(a)[1] for a in values)
        high = high if high > low else low + 1.0
        note = f"shared scale {low:.3g}..{high:.3g}: one colour bar for all panels"
    else:
        note = "per-panel scale: each panel from its own min to its own max (see its colour bar)"
    suptitle = f"{title}\n{note}" if title else note

    ncols = max(len(row) for _, row in rows)
    per_panel = PANEL_COLORBAR_INCHES if color_scale == "per-panel" else 0.0
    wrap = max(8, int((panel_size - 0.1) * 72 / (0.6 * TITLE_FONT)))  # characters across one panel
    titles = [[_wrap(shown, wrap) for _, shown, _ in row] for _, row in rows]
    title_lines = [max(t.count("\n") + 1 for t in row) for row in titles]
    width = LEFT_INCHES + ncols * (panel_size + per_panel) + (COLORBAR_INCHES if color_scale == "shared" else 0.0)
    height = (sum(panel_size + LINE_INCHES * lines for lines in title_lines) + BOTTOM_INCHES
              + LINE_INCHES * (suptitle.count("\n") + 1.5))
    fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(suptitle, fontsize=9)
    grid = fig.add_gridspec(len(rows), ncols, height_ratios=[panel_size + LINE_INCHES * n for n in title_lines])
    drawn, images, used = {}, [], []
    for r, (label, row) in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(grid[r, c])
            if c >= len(row):
                ax.set_axis_off()
                continue
            key, _, a = row[c]
            vmin, vmax = (low, high) if color_scale == "shared" else _range(a)
            vmax = vmax if vmax > vmin else vmin + 1.0
            image = ax.imshow(a.numpy(), cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest")
            ax.set_title(titles[r][c], fontsize=TITLE_FONT)
            # integer frames, also for one frame (else the locator falls back to fractions)
            ax.xaxis.set_major_locator(MaxNLocator(nbins=4, integer=True, min_n_ticks=1))
            ax.yaxis.set_major_locator(MaxNLocator(nbins=4, integer=True, min_n_ticks=1))
            ax.tick_params(labelsize=7)
            if r == len(rows) - 1 or c >= len(rows[r + 1][1]):
                ax.set_xlabel("key frame", fontsize=8)
            if c == 0:
                ax.set_ylabel("query frame" if label is None else f"{label}\nquery frame", fontsize=8)
            if color_scale == "per-panel":
                fig.colorbar(image, ax=ax, shrink=0.8).ax.tick_params(labelsize=7)
            drawn[key] = np.asarray(image.get_array())
            images.append(image)
            used.append(ax)
    if color_scale == "shared":
        bar = fig.colorbar(images[0], ax=used, shrink=0.9)
        bar.set_label(value_label, fontsize=8)
        bar.ax.tick_params(labelsize=7)
    fig.savefig(path, dpi=dpi)
    return drawn


def _wrap(text: str, width: int) -> str:
    """`text` in lines of at most `width` characters where it can, broken after '.', '/', '_' or ' '."""
    parts = re.findall(r"[^./_ ]*(?:[./_ ]+|$)", text)
    lines, line = [], ""
    for part in filter(None, parts):
        if line and len(line) + len(part.rstrip()) > width:
            lines.append(line.rstrip())
            line = ""
        line += part
    lines.append(line.rstrip())
    return "\n".join(lines)


def _panel_rows(maps) -> list:
    """[(row label or None, [(key, panel title, map), ...]), ...]: one row for a flat dict, one
    row per level for a nested one (labelled ``level <n>`` for an int level)."""
    if not isinstance(maps, Mapping) or not maps:
        raise TypeError("maps must be a non-empty dict {name: map} or {level: {layer: map}}")
    nested = [isinstance(v, Mapping) for v in maps.values()]
    if all(nested):
        rows = []
        for level, layers in maps.items():
            if not layers:
                raise ValueError(f"maps[{level!r}] holds no layer")
            label = f"level {level}" if isinstance(level, numbers.Integral) else str(level)
            rows.append((label, [(f"{level} / {layer}", str(layer), m) for layer, m in layers.items()]))
    elif any(nested):
        raise TypeError("maps must be all maps ({name: map}) or all dicts ({level: {layer: map}}), not a mix")
    else:
        rows = [(None, [(str(name), str(name), m) for name, m in maps.items()])]
    for _, row in rows:
        short = [short_layer_name(shown) for _, shown, _ in row]
        if len(set(short)) == len(short):
            row[:] = [(key, s, m) for (key, _, m), s in zip(row, short)]
    return rows


def _as_map(name: str, value) -> torch.Tensor:
    """A non-empty 2-D map as a float64 CPU tensor (from a tensor or an array-like): finite, but for NaN entries (a
    captured map's row of a frame without a token), drawn blank; not all NaN."""
    import numpy as np
    try:  # numbers in lists through numpy: float64 (torch would make them float32)
        a = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):
        raise TypeError(f"{name} must be a 2-D map: a tensor, or an array or nested lists of numbers of one shape; "
                        f"got a {type(value).__name__} that is not") from None
    if a.is_complex():
        raise TypeError(f"{name} must be a real map, got {a.dtype}")
    check_values(name, a, "normalizing or drawing a map")
    a = a.to("cpu", torch.float64)
    if a.dim() != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty 2-D map, got shape {tuple(a.shape)}")
    if torch.isinf(a).any() or torch.isnan(a).all():
        raise ValueError(f"{name} has infinite entries, or no entry that is not NaN")
    return a


def _range(a: torch.Tensor) -> tuple:
    """(min, max) of a map's entries that are not NaN."""
    shown = a[~a.isnan()]
    return float(shown.min()), float(shown.max())


def _check_map(name: str, attention) -> torch.Tensor:
    if not isinstance(attention, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attention).__name__}")
    if attention.dim() < 2 or 0 in attention.shape[-2:]:
        raise ValueError(f"{name} must be a (..., N, M) map, got shape {tuple(attention.shape)}")
    if attention.is_complex():  # its cast to float64 would drop the imaginary part
        raise TypeError(f"{name} must be a real map, got {attention.dtype}")
    check_values(name, attention, "an attention measure")
    a = attention.detach().to(torch.float64)
    if a.isnan().any():  # a captured DiT map's row of a frame without a token, which has no attention to measure
        raise ValueError(f"{name} has NaN entries (where a captured map has a NaN row, a frame without a token, "
                         "measure the frames that have tokens: m[keep][:, keep])")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} has infinite entries")
    if (a < 0).any():
        raise ValueError(f"{name} must be non-negative (attention probabilities or a min-max normalised map)")
    total = a.sum(dim=(-2, -1), keepdim=True)
    if (total == 0).any():
        raise ValueError(f"{name} has a map whose entries are all zero: there is no mass to measure")
    if not torch.isfinite(total).all():  # finite entries whose sum overflows: the measures are scale-free, so
        a = torch.where(total.isfinite(), a, a / a.amax(dim=(-2, -1), keepdim=True))  # such a map is taken by its max
    return a
