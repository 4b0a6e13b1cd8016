"""The CUDA C++ TAR forward of bindings/, as ``torch.ops.vstar.tar_attention_fwd``.

The operator lives in the compiled library ``vstar_kernels._C`` (built on request:
``VSTAR_BUILD_CUDA=1``, see setup.py and CMakeLists.txt). Importing this module loads
nothing: `load()` loads the library on first use and keeps the reason it cannot.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path
from typing import Optional

import torch

from .. import _env
from .._problem import TarProblem
from ._load import Probe

EXTENSION = "vstar_kernels._C"


def build_hint(checkout: Optional[Path]) -> str:
    """How to build the extension, for a package running from `checkout` (None: a wheel)."""
    if checkout is None:
        return ("this is an installed wheel, built without it: in a source checkout of vstar_kernels run "
                "VSTAR_BUILD_CUDA=1 pip install . --no-build-isolation, on a machine with nvcc")
    return f"VSTAR_BUILD_CUDA=1 pip install -e . --no-build-isolation in {checkout}, on a machine with nvcc"


NOT_BUILT = f"the CUDA C++ extension is not built ({build_hint(_env.source_checkout())})"


def extension_path() -> Optional[str]:
    """Where the compiled library is, without loading it; None if it is not built."""
    spec = importlib.util.find_spec(EXTENSION)
    return spec.origin if spec is not None else None


@functools.lru_cache(maxsize=None)
def load() -> Probe:
    """This module once its operator is loaded, or why the extension is unavailable."""
    path = extension_path()
    if path is None:
        return Probe(None, NOT_BUILT)
    try:
        _load_library(path)
    except Exception as exc:  # OSError for a library built against another torch or CUDA, and the like
        cause = f"; {exc.__cause__}" if exc.__cause__ is not None else ""  # torch.ops.load_library hides dlerror
        return Probe(None, f"the CUDA C++ extension failed to load ({type(exc).__name__}: {exc}{cause})")
    return Probe(sys.modules[__name__], "")


@functools.lru_cache(maxsize=None)
def _load_library(path: str) -> None:
    """Load the library and register the operator's fake function, once per library."""
    torch.ops.load_library(path)
    torch.library.register_fake("vstar::tar_attention_fwd")(_tar_attention_fwd_fake)


def _tar_attention_fwd_fake(q, k, v, sigma, strength, delta, causal, global_max, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def tar_forward(problem: TarProblem) -> torch.Tensor:
    """Run the operator on a validated problem; returns (B, H, Nq, Dv) in q's dtype."""
    return torch.ops.vstar.tar_attention_fwd(problem.q, problem.k, problem.v, problem.sigma, problem.strength,
                                             problem.delta, problem.causal, problem.max_mode == "global",
                                             problem.scale)
