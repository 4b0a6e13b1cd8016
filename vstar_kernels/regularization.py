"""Builders for the regularization matrix dA that TAR adds to the scores."""

from __future__ import annotations

import torch

from ._validation import check_sigma


def gaussian_bias(nq: int, nk: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """dA_ij = exp(-0.5 * ((j - i) / sigma) ** 2) for i < nq, j < nk: (nq, nk), 1 on the diagonal."""
    sigma = check_sigma(sigma)
    for name, n in (("nq", nq), ("nk", nk)):
        if isinstance(n, bool) or not isinstance(n, (int, torch.SymInt)) or n < 0:  # SymInt: traced sizes
            raise ValueError(f"{name} must be a non-negative int, got {n!r}")
    work = torch.float64 if dtype == torch.float64 else torch.float32
    i = torch.arange(nq, device=device, dtype=work)[:, None]
    j = torch.arange(nk, device=device, dtype=work)[None, :]
    return torch.exp(-0.5 * ((j - i) / sigma) ** 2).to(dtype)


def gaussian_toeplitz(n: int, sigma: float, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """The symmetric Gaussian Toeplitz matrix of TAR, shape (n, n).

    Entry (i, j) is ``exp(-0.5 * ((j - i) / sigma) ** 2)``: 1 on the diagonal,
    decaying with the frame distance. ``sigma = math.inf`` gives all ones.
    """
    return gaussian_bias(n, n, sigma, device=device, dtype=dtype)
