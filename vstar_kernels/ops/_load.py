"""Loading the Triton kernels of this package. Each is tried once; the reason it is missing is kept.

Nothing here runs at `import vstar_kernels`: the kernels load on first use. The CUDA C++
extension has its own loader, `tar_cuda.load()`.
"""

from __future__ import annotations

import functools
import importlib
import re
from dataclasses import dataclass
from types import ModuleType
from typing import Optional

import torch

from .. import _env


@dataclass(frozen=True)
class Probe:
    module: Optional[ModuleType]
    reason: str  # why the module is unavailable ("" when it loaded)

    @property
    def ok(self) -> bool:
        return self.module is not None


def triton_ops() -> Probe:
    """ops.tar_fwd, which needs triton. Loaded once, in the mode the environment asks for.

    Until it has loaded, a TRITON_INTERPRET that triton cannot follow is reported without being
    remembered: setting the variable back to the mode of triton's import still loads the kernels.
    """
    if _load_triton_ops.cache_info().currsize == 0:
        try:
            mismatch = _env.triton_mode_mismatch()
        except Exception:  # no triton, or a broken one: _load_triton_ops says why
            mismatch = ""
        if mismatch:
            return Probe(None, mismatch)
    return _load_triton_ops()


@functools.lru_cache(maxsize=None)
def _load_triton_ops() -> Probe:
    try:
        import triton
    except Exception as exc:  # ImportError, or a broken install raising anything
        return Probe(None, f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton")
    release = re.match(r"(\d+)\.(\d+)", triton.__version__)  # "3.9.0", "3.7.1+git1234", "3.8rc1"
    if release and tuple(map(int, release.groups())) < MIN_TRITON:
        return Probe(None, f"the Triton kernels need Triton 3.7 or later (older front ends reject them: 3.6 cannot "
                           f"compile the tiled forward), installed: {triton.__version__}; a CUDA torch pins its "
                           f"Triton (torch 2.13 brings 3.7.1)")
    return _import("tar_fwd", "the Triton kernels")


# The oldest Triton the kernels are known to compile with: 3.7.1 compiles the sm_90 kernels of
# `tools.perf.compile_check --quick`; 3.6.0 fails there.
MIN_TRITON = (3, 7)


def triton_backward_ops() -> Probe:
    """ops.tar_bwd, the fused backward; needs what triton_ops() needs."""
    forward = triton_ops()
    return forward if not forward.ok else _import("tar_bwd", "the Triton backward kernels")


def triton_lean_ops() -> Probe:
    """ops.tar_fwd_lean, the lean forward; needs what triton_ops() needs."""
    forward = triton_ops()
    return forward if not forward.ok else _import("tar_fwd_lean", "the lean Triton forward")


@functools.lru_cache(maxsize=None)
def _import(name: str, what: str) -> Probe:
    try:
        module = importlib.import_module(f"{__package__}.{name}")
    except Exception as exc:
        return Probe(None, f"{what} failed to load ({type(exc).__name__}: {exc})")
    return Probe(module, "")


@torch.compiler.assume_constant_result
def triton_state() -> tuple:
    """(why the Triton kernels cannot load or "", whether they loaded in interpreter mode,
    whether TRITON_INTERPRET=1 now). torch.compile calls this once while tracing and keeps the
    result instead of tracing the probe's imports (a graph break)."""
    probe = triton_ops()
    interpreting = bool(probe.module.INTERPRETING) if probe.ok else False
    return probe.reason, interpreting, _env.interpreter_requested()


@torch.compiler.assume_constant_result
def triton_lean_reason() -> str:
    """Why the lean forward cannot load, or "" (constant under torch.compile, as above)."""
    return triton_lean_ops().reason


@torch.compiler.assume_constant_result
def triton_backward_reason() -> str:
    """Why the Triton backward kernels cannot load, or "" (constant under torch.compile, as above)."""
    return triton_backward_ops().reason
