"""Temporal attention analysis: how band-like a frame-to-frame map is, and pictures of maps.

Real videos give band matrices (each frame attends to its neighbours), plain text-to-video
models give unstructured maps, and TAR pulls them towards a band (VSTAR paper, Fig. 3 and
S.10). The measures here turn that into numbers; the plots draw the maps as the paper
does (min-max normalised, jet colormap).

The measures need only torch; the plots need matplotlib (``pip install
'vstar_kernels[plot]'``), imported on first use and always drawn with the Agg backend
into a file, without touching pyplot's global state.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch

from .regularization import gaussian_toeplitz


def diagonality(attention: torch.Tensor) -> torch.Tensor:
    """Weighted correlation coefficient of the row and column index, the map being the weights.

    For a non-negative (..., N, M) map A with total mass W = sum A::

        mu_i = sum_ij A_ij i / W          mu_j = sum_ij A_ij j / W
        r = sum_ij A_ij (i - mu_i)(j - mu_j) / sqrt(sum_ij A_ij (i - mu_i)^2 * sum_ij A_ij (j - mu_j)^2)

    1 when all mass lies on the main diagonal, near 1 for a narrow band, 0 for a uniform
    map (and for any map whose rows are all alike), -1 on the anti-diagonal. NaN when the
    mass lies in a single row or a single column (the correlation is undefined there).

    Returns a float64 tensor of shape (...): 0-d for one map.
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

    ``sum_{|i-j| <= width} A_ij / sum_ij A_ij``, in [0, 1]: 1 when the map is a band of
    that half-width (width 0: the diagonal alone), ``(N + 2 * sum_{d=1..w} (N - d)) / N^2``
    for a uniform N x N map. Attention rows sum to 1, so for an attention map this is the
    average share of attention a frame gives to frames at most `width` away.

    Returns a float64 tensor of shape (...): 0-d for one map.
    """
    a = _check_map("attention", attention)
    if isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 0:
        raise ValueError(f"width must be a non-negative int, got {width!r}")
    n, m = a.shape[-2:]
    i = torch.arange(n, device=a.device)[:, None]
    j = torch.arange(m, device=a.device)[None, :]
    band = (i - j).abs() <= width
    return (a * band).sum(dim=(-2, -1)) / a.sum(dim=(-2, -1))


def minmax_normalize(attention) -> torch.Tensor:
    """``(A - min A) / (max A - min A)`` of a 2-D map, float64; a constant map gives zeros."""
    return _minmax(_as_map("attention", attention))


def _minmax(a: torch.Tensor) -> torch.Tensor:
    low, high = a.min(), a.max()
    return (a - low) / (high - low) if high > low else torch.zeros_like(a)


def plot_attention_maps(maps, path, *, cmap: str = "jet", panel_size: float = 2.5, dpi: int = 100,
                        title=None) -> dict:
    """Draw temporal attention maps, one min-max normalised panel each, into an image file.

    Args:
        maps: ``{name: (N, N) map}`` drawn as one row, or ``{level: {layer: (N, N) map}}``
            drawn as one row per level; maps are tensors or arrays (sizes may differ).
        path: output file; the format follows its suffix (``.png``, ``.pdf``, ``.svg``, ...).
        cmap: matplotlib colormap; jet, as in the paper, by default.
        panel_size: inches per panel side; the image is ``columns * panel_size * dpi`` by
            ``rows * panel_size * dpi`` pixels (plus a title band of ``0.4 * dpi`` pixels
            when `title` is given).
        dpi: pixels per inch.
        title: optional title above all panels.

    Returns:
        ``{panel title: array drawn}`` in drawing order, each array taken back from the
        image artist (the min-max normalised map, values in [0, 1]).
    """
    rows = _panel_rows(maps)
    return _draw(rows, path, cmap=cmap, panel_size=panel_size, dpi=dpi, title=title, normalize=True)


def plot_delta(sigmas, n: int, path, *, cmap: str = "jet", panel_size: float = 2.5, dpi: int = 100) -> dict:
    """Draw TAR's Gaussian matrix dA for several sigma side by side (paper Fig. S.13).

    Each panel is `gaussian_toeplitz(n, sigma)` drawn on the fixed scale [0, 1] (no
    normalisation: the values drawn are dA's own). The image is ``len(sigmas) * panel_size
    * dpi`` by ``panel_size * dpi`` pixels. Returns ``{panel title: array drawn}``.
    """
    if isinstance(sigmas, (str, bytes)) or not hasattr(sigmas, "__iter__"):
        raise TypeError(f"sigmas must be a sequence of numbers, got {type(sigmas).__name__}")
    sigmas = list(sigmas)
    if not sigmas:
        raise ValueError("sigmas must hold at least one value")
    if isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    row = [(f"sigma = {s:g}", gaussian_toeplitz(int(n), s, dtype=torch.float64)) for s in sigmas]
    return _draw([row], path, cmap=cmap, panel_size=panel_size, dpi=dpi, title=None, normalize=False)


TITLE_BAND_INCHES = 0.4   # room for the figure title
PANEL_TITLE_INCHES = 0.3  # room above each panel for its own title
MARGIN_INCHES = 0.05      # below each panel


def _draw(rows, path, *, cmap, panel_size, dpi, title, normalize) -> dict:
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    smallest = PANEL_TITLE_INCHES + MARGIN_INCHES
    if isinstance(panel_size, bool) or not isinstance(panel_size, numbers.Real) or not panel_size > smallest:
        raise ValueError(f"panel_size must be a number of inches > {smallest:g} (room for the panel title), "
                         f"got {panel_size!r}")
    if isinstance(dpi, bool) or not isinstance(dpi, numbers.Integral) or dpi < 1:
        raise ValueError(f"dpi must be a positive int, got {dpi!r}")
    ncols = max(len(row) for row in rows)
    band = TITLE_BAND_INCHES if title else 0.0
    width, height = ncols * panel_size, len(rows) * panel_size + band
    fig = Figure(figsize=(width, height), dpi=dpi)
    FigureCanvasAgg(fig)
    if title:
        fig.suptitle(title, y=1.0 - 0.5 * band / height, va="center")
    # each row: a panel title band, then the square-ish axes; gaps are fractions of an axes' height
    axes_inches = panel_size - PANEL_TITLE_INCHES - MARGIN_INCHES
    grid = fig.add_gridspec(len(rows), ncols, left=0.02, right=0.98, bottom=MARGIN_INCHES / height,
                            top=1.0 - (band + PANEL_TITLE_INCHES) / height,
                            hspace=(PANEL_TITLE_INCHES + MARGIN_INCHES) / axes_inches, wspace=0.1)
    drawn = {}
    for r, row in enumerate(rows):
        for c in range(ncols):
            ax = fig.add_subplot(grid[r, c])
            if c >= len(row):
                ax.set_axis_off()
                continue
            name, value = row[c]
            a = _as_map(name, value)
            if normalize:
                a = _minmax(a)
            image = ax.imshow(a.numpy(), cmap=cmap, vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(name, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            drawn[name] = np.asarray(image.get_array())
    fig.savefig(path, dpi=dpi)
    return drawn


def _panel_rows(maps) -> list:
    """[[(title, map), ...], ...]: one row for a flat dict, one row per level for a nested one."""
    if not isinstance(maps, Mapping) or not maps:
        raise TypeError("maps must be a non-empty dict {name: map} or {level: {layer: map}}")
    nested = [isinstance(v, Mapping) for v in maps.values()]
    if all(nested):
        rows = []
        for level, layers in maps.items():
            if not layers:
                raise ValueError(f"maps[{level!r}] holds no layer")
            rows.append([(f"{level} / {layer}", m) for layer, m in layers.items()])
        return rows
    if any(nested):
        raise TypeError("maps must be all maps ({name: map}) or all dicts ({level: {layer: map}}), not a mix")
    return [[(str(name), m) for name, m in maps.items()]]


def _as_map(name: str, value) -> torch.Tensor:
    """A finite, non-empty 2-D map as a float64 CPU tensor (from a tensor or an array-like)."""
    a = value.detach() if isinstance(value, torch.Tensor) else torch.as_tensor(value)
    a = a.to("cpu", torch.float64)
    if a.dim() != 2 or 0 in a.shape:
        raise ValueError(f"{name} must be a non-empty 2-D map, got shape {tuple(a.shape)}")
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} has non-finite entries")
    return a


def _check_map(name: str, attention) -> torch.Tensor:
    if not isinstance(attention, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(attention).__name__}")
    if attention.dim() < 2 or 0 in attention.shape[-2:]:
        raise ValueError(f"{name} must be a (..., N, M) map, got shape {tuple(attention.shape)}")
    a = attention.detach().to(torch.float64)
    if not torch.isfinite(a).all():
        raise ValueError(f"{name} has non-finite entries")
    if (a < 0).any():
        raise ValueError(f"{name} must be non-negative (attention probabilities or a min-max normalised map)")
    if (a.sum(dim=(-2, -1)) == 0).any():
        raise ValueError(f"{name} has a map whose entries are all zero: there is no mass to measure")
    return a
