"""Builders for the regularization matrix dA that TAR adds to the scores."""

from __future__ import annotations

import numbers

import torch

from ._problem import check_sigma


def _size(name: str, n) -> int:
    """A non-negative integer size (numpy integers too; a traced size under torch.compile)."""
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)) or n < 0:
        raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    return n if isinstance(n, torch.SymInt) else int(n)


def gaussian_bias(nq: int, nk: int, sigma: float, *, device=None, dtype=torch.float32,
                  names=("nq", "nk")) -> torch.Tensor:
    """dA_ij = exp(-0.5 * ((j - i) / sigma) ** 2) for i < nq, j < nk: (nq, nk), 1 on the diagonal.

    Evaluated in float64 and rounded once to `dtype`: exactly the definition, for every sigma > 0
    (a sigma too small for float32, down to the smallest float64, gives the identity). Only the
    nq + nk - 1 distinct values are computed; `names` are the sizes' names in errors.
    """
    sigma = check_sigma(sigma)
    nq, nk = (_size(name, n) for name, n in zip(names, (nq, nk)))
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype}")
    if nq == 0 or nk == 0:
        return torch.empty(nq, nk, device=device, dtype=dtype)
    dist = torch.arange(1 - nq, nk, device=device, dtype=torch.float64)  # j - i, from 1 - nq to nk - 1
    values = torch.exp(-0.5 * (dist / sigma) ** 2).to(dtype)
    # values[i + j] = g(j - (nq - 1) + i); flipping the rows turns that into g(j - i)
    return values.as_strided((nq, nk), (1, 1)).flip(0)


def gaussian_toeplitz(n: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The symmetric Gaussian Toeplitz matrix of TAR, shape (n, n).

    Entry (i, j) is ``exp(-0.5 * ((j - i) / sigma) ** 2)``: 1 on the diagonal,
    decaying with the frame distance. ``sigma = math.inf`` gives all ones; a sigma so small
    that every off-diagonal entry underflows gives the identity. n: a non-negative integer
    (Python or numpy); dtype: a floating-point dtype. The values are the float64 definition
    rounded once to `dtype`.
    """
    return gaussian_bias(n, n, sigma, device=device, dtype=dtype, names=("n", "n"))


NORMALIZE_MODES = ("cosine", "minmax")


def delta_from_features(features: torch.Tensor, *, normalize: str = "cosine", num_frames=None) -> torch.Tensor:
    """The inter-frame similarity matrix of a reference video, for TAR's `delta`.

    VSTAR transfers the dynamics of a real video by using its frame-to-frame similarity
    (DreamSim in the paper) in place of the Gaussian band. Any per-frame embedding works
    (DreamSim, CLIP image features, pooled VAE latents, ...).

    Args:
        features: (N, F) one feature vector per frame, N >= 1 frames in temporal order;
            floating point, any device.
        normalize: how feature vectors become similarities; both options give a symmetric
            matrix with exactly 1 on the diagonal:

            - ``"cosine"`` (default): ``S_ij = <f_i, f_j> / (|f_i| |f_j|)``, in [-1, 1]. For
              DreamSim embeddings this is one minus the DreamSim distance, the matrix the
              paper uses.
            - ``"minmax"``: the cosine matrix rescaled to [0, 1] by ``(S - min S) / (1 - min S)``,
              so the least similar pair of frames gets 0 and the diagonal keeps 1, like the
              Gaussian band. The frames of one video are often all alike (cosine 0.8..1);
              this stretches their differences over the full range. When no entry is below 1
              by more than the features' precision (4 eps of their dtype: a static video),
              the result is all ones.
        num_frames: resample to this many frames (the generated video's length) before the
            similarities are taken: the features are interpolated linearly along time, first
            and last frames kept (frame i of the result sits at time
            ``i * (N - 1) / (num_frames - 1)`` of the reference). Default: N, no resampling.

    Returns:
        (M, M) with M = num_frames or N, float32 (float64 for float64 features), on the
        features' device. Pass it to `tar_attention(..., delta=...)`.

    Raises:
        ValueError: a frame whose feature vector is all zeros (its similarity is undefined).
    """
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"features must be a torch.Tensor, got {type(features).__name__}")
    if not features.is_floating_point():
        raise TypeError(f"features must be a floating-point tensor, got {features.dtype}")
    if features.dim() != 2 or 0 in features.shape:
        raise ValueError(f"features must be a non-empty (frames, features) matrix, got shape {tuple(features.shape)}")
    if normalize not in NORMALIZE_MODES:
        raise ValueError(f"normalize must be one of {NORMALIZE_MODES}, got {normalize!r}")
    out_dtype = torch.float64 if features.dtype == torch.float64 else torch.float32
    f = features.to(torch.float64)
    norms = f.norm(dim=1)
    zero = (norms == 0).nonzero().flatten().tolist()
    if zero:
        raise ValueError(f"features of frame(s) {zero} are all zero: their similarity is undefined")
    if num_frames is not None:
        if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
            raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")
        f = _resample_frames(f, num_frames)
        norms = f.norm(dim=1)
        zero = (norms == 0).nonzero().flatten().tolist()
        if zero:
            raise ValueError(f"resampled frame(s) {zero} interpolate to all-zero features (opposite neighbours): "
                             "their similarity is undefined")
    unit = f / norms[:, None]
    sim = unit @ unit.T
    sim = (0.5 * (sim + sim.T)).clamp(-1.0, 1.0)  # exactly symmetric whatever the matmul's rounding
    sim.fill_diagonal_(1.0)
    if normalize == "minmax":
        low = sim.min()
        if 1.0 - low > 4 * torch.finfo(features.dtype).eps:
            sim = (sim - low) / (1.0 - low)
        else:  # no difference beyond the features' own precision: a static video
            sim = torch.ones_like(sim)
    return sim.to(out_dtype)


def _resample_frames(f: torch.Tensor, m: int) -> torch.Tensor:
    """Linear interpolation of (N, F) along the frame axis to (m, F), end frames kept."""
    n = f.shape[0]
    if n == 1:
        return f.expand(m, -1)
    t = torch.linspace(0, n - 1, m, dtype=torch.float64, device=f.device)
    left = t.floor().long().clamp(max=n - 2)
    return torch.lerp(f[left], f[left + 1], (t - left)[:, None])
