"""Builders for the regularization matrix dA that TAR adds to the scores."""

from __future__ import annotations

import numbers

import torch

from ._problem import check_dense, check_device, check_int, check_sigma, check_values


def _size(name: str, n) -> int:
    """A non-negative integer size (numpy integers too; a traced size under torch.compile)."""
    check_int(name, n, 0, (numbers.Integral, torch.SymInt))
    return n if isinstance(n, torch.SymInt) else int(n)


def gaussian_bias(nq: int, nk: int, sigma: float, *, device=None, dtype=torch.float32,
                  names=("nq", "nk")) -> torch.Tensor:
    """dA_ij = exp(-0.5 * ((j - i) / sigma) ** 2) for i < nq, j < nk: (nq, nk), 1 on the diagonal. The
    nq + nk - 1 distinct values are evaluated in float64 and rounded once to `dtype` (a sigma too small for
    float32 gives the identity); `names` are the sizes' names in errors.
    """
    sigma = check_sigma(sigma)
    nq, nk = (_size(name, n) for name, n in zip(names, (nq, nk)))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    device = check_device("device", device)
    if nq == 0 or nk == 0:
        return torch.empty(nq, nk, device=device, dtype=dtype)
    dist = torch.arange(1 - nq, nk, device=device, dtype=torch.float64)  # j - i, from 1 - nq to nk - 1
    values = torch.exp(-0.5 * (dist / sigma) ** 2).to(dtype)
    # values[i + j] = g(j - (nq - 1) + i); flipping the rows turns that into g(j - i)
    return values.as_strided((nq, nk), (1, 1)).flip(0)


def gaussian_toeplitz(n: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """TAR's symmetric Gaussian Toeplitz matrix, (n, n): ``gaussian_bias(n, n, sigma)``; ``math.inf`` gives
    all ones, a sigma whose off-diagonal entries underflow the identity."""
    return gaussian_bias(n, n, sigma, device=device, dtype=dtype, names=("n", "n"))


NORMALIZE_MODES = ("cosine", "minmax")


def delta_from_features(features: torch.Tensor, *, normalize: str = "cosine", num_frames=None) -> torch.Tensor:
    """The inter-frame similarity matrix of a reference video, for TAR's `delta` (docs/vsp-and-dynamics.md).

    `features` is (N, F), one floating-point feature vector per frame (DreamSim in the paper; any
    per-frame embedding works). ``normalize="cosine"`` gives the cosine similarities in [-1, 1];
    ``"minmax"`` rescales them to [0, 1] by ``(S - min S) / (1 - min S)`` (all ones when no entry is
    below 1 by more than the rounding of the features and of the cosine, 4 max(eps**2, F eps64), eps the
    features' dtype's: a static video, whose frames differ by rounding alone). Both are symmetric with
    exactly 1 on the diagonal. `num_frames` first resamples the features linearly in time (end
    frames kept). Returns (M, M), M = num_frames or N, float32 (float64 for float64 features), on
    the features' device. A frame whose features are all zero raises ValueError.
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    check_dense("features", features)
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    if features.dim() != 2 or 0 in features.shape:
        raise ValueError(f"features must be a non-empty (frames, features) matrix, got shape {tuple(features.shape)}")
    check_values("features", features, "delta_from_features")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(torch.float64)
    bad = (~torch.isfinite(f)).any(dim=1).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"features of frame(s) {bad} have NaN or infinite entries")
    _check_nonzero(f, "features of frame(s) {} are all zero")
    if num_frames is not None:
        f = _resample_frames(f, int(check_int("num_frames", num_frames)))
        _check_nonzero(f, "resampled frame(s) {} interpolate to all-zero features (opposite neighbours)")
    f = f / f.abs().amax(dim=1, keepdim=True)  # each row's scale out (a cosine has none): its norm cannot overflow
    unit = f / f.norm(dim=1)[:, None]
    sim = unit @ unit.T
    sim = (0.5 * (sim + sim.T)).clamp(-1.0, 1.0)  # exactly symmetric whatever the matmul's rounding
    sim.fill_diagonal_(1.0)
    if normalize == "minmax":
        low = sim.min()
        # frames that differ by a rounding of relative size eps are eps**2 / 2 from a cosine of 1; the cosine's
        # own float64 rounding grows with the F products summed
        rounding = max(torch.finfo(features.dtype).eps ** 2, features.shape[1] * torch.finfo(torch.float64).eps)
        if 1.0 - low > 4 * rounding:
            sim = (sim - low) / (1.0 - low)
        else:  # no difference beyond the features' own precision: a static video
            sim = torch.ones_like(sim)
    return sim.to(out_dtype)


def _check_nonzero(f: torch.Tensor, what: str) -> None:
    zero = (f == 0).all(dim=1).nonzero().flatten().tolist()  # not the norm, which underflows to 0 (1e-200)
    if zero:
        raise ValueError(what.format(zero) + ": their similarity is undefined")


def _resample_frames(f: torch.Tensor, m: int) -> torch.Tensor:
    """Linear interpolation of (N, F) along the frame axis to (m, F), end frames kept."""
    n = f.shape[0]
    if n == 1:
        return f.expand(m, -1)
    t = torch.linspace(0, n - 1, m, dtype=torch.float64, device=f.device)
    left = t.floor().long().clamp(max=n - 2)
    return torch.lerp(f[left], f[left + 1], (t - left)[:, None])
