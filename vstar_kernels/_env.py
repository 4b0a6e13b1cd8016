"""Probes for the optional pieces. Each is tried once; the reason it is missing is kept.

Nothing here runs at `import vstar_kernels`: the probes run on first use.
"""

from __future__ import annotations

import functools
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Optional

import torch


@dataclass(frozen=True)
class Probe:
    module: Optional[ModuleType]
    reason: str  # why the module is unavailable ("" when it loaded)

    @property
    def ok(self) -> bool:
        return self.module is not None


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1 in the environment: Triton kernels run on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


SET_BEFORE_PYTHON = ("set TRITON_INTERPRET in the environment before Python starts "
                     "(TRITON_INTERPRET=1 python script.py), or in os.environ at the top of the script, "
                     "before importing torch or vstar_kernels")


def triton_mode_mismatch() -> str:
    """Why the Triton kernels cannot load in the mode TRITON_INTERPRET asks for now, or "".

    triton.language builds its own jit helpers (tl.max, tl.sum, ...) once, in the mode the
    environment had when triton was first imported (`import vstar_kernels` imports it, through
    torch._dynamo; so do torch.compile and diffusers). Kernels loaded in the other mode call
    those helpers and fail, so a change of TRITON_INTERPRET after that import cannot be honoured.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    imported_interpreting = isinstance(tl.max, InterpretedFunction)
    requested = interpreter_requested()
    if imported_interpreting == requested:
        return ""
    return (f"TRITON_INTERPRET was {int(imported_interpreting)} when triton was imported and is {int(requested)} "
            f"now; triton keeps the mode of its first import, so {SET_BEFORE_PYTHON}")


def triton_ops() -> Probe:
    """vstar_kernels.ops.tar_fwd, which needs triton. Loaded once, in the mode the environment asks for.

    Until it has loaded, a TRITON_INTERPRET that triton cannot follow is reported without being
    remembered: setting the variable back to the mode of triton's import still loads the kernels.
    """
    if _load_triton_ops.cache_info().currsize == 0:
        try:
            mismatch = triton_mode_mismatch()
        except Exception:  # no triton, or a broken one: _load_triton_ops says why
            mismatch = ""
        if mismatch:
            return Probe(None, mismatch)
    return _load_triton_ops()


@functools.lru_cache(maxsize=None)
def _load_triton_ops() -> Probe:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install raising anything
        return Probe(None, f"triton is not importable ({type(exc).__name__}: {exc}); pip install triton")
    try:
        mod = importlib.import_module("vstar_kernels.ops.tar_fwd")
    except Exception as exc:
        return Probe(None, f"the Triton kernels failed to load ({type(exc).__name__}: {exc})")
    return Probe(mod, "")


def source_checkout() -> Optional[Path]:
    """The source tree this package runs from (an editable install, or PYTHONPATH pointing at a
    checkout); None when it runs from an installed wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "setup.py").is_file() and (root / "bindings").is_dir() else None


def cuda_build_hint(checkout: Optional[Path]) -> str:
    """How to build the CUDA C++ extension, for a package running from `checkout` (None: a wheel)."""
    if checkout is None:
        return ("this is an installed wheel, built without it: in a source checkout of vstar_kernels run "
                "VSTAR_BUILD_CUDA=1 pip install . --no-build-isolation, on a machine with nvcc")
    return f"VSTAR_BUILD_CUDA=1 pip install -e . --no-build-isolation in {checkout}, on a machine with nvcc"


CUDA_EXTENSION = "vstar_kernels._C"
CUDA_NOT_BUILT = f"the CUDA C++ extension is not built ({cuda_build_hint(source_checkout())})"


def cuda_extension_path() -> Optional[str]:
    """Where the compiled vstar_kernels._C library is, without loading it; None if it is not built."""
    spec = importlib.util.find_spec(CUDA_EXTENSION)
    return spec.origin if spec is not None else None


@functools.lru_cache(maxsize=None)
def cuda_ops() -> Probe:
    """vstar_kernels.ops.tar_cuda, which loads the optional CUDA C++ operator."""
    if cuda_extension_path() is None:
        return Probe(None, CUDA_NOT_BUILT)
    try:
        mod = importlib.import_module("vstar_kernels.ops.tar_cuda")
    except Exception as exc:  # OSError for a library built against another torch or CUDA, and the like
        cause = f"; {exc.__cause__}" if exc.__cause__ is not None else ""  # torch.ops.load_library hides dlerror
        return Probe(None, f"the CUDA C++ extension failed to load ({type(exc).__name__}: {exc}{cause})")
    return Probe(mod, "")


def triton_backward_ops() -> Probe:
    """vstar_kernels.ops.tar_bwd, the fused backward; needs what triton_ops() needs."""
    forward = triton_ops()
    return forward if not forward.ok else _load_triton_backward_ops()


@functools.lru_cache(maxsize=None)
def _load_triton_backward_ops() -> Probe:
    try:
        mod = importlib.import_module("vstar_kernels.ops.tar_bwd")
    except Exception as exc:
        return Probe(None, f"the Triton backward kernels failed to load ({type(exc).__name__}: {exc})")
    return Probe(mod, "")


@torch.compiler.assume_constant_result
def triton_state() -> tuple:
    """(why the Triton kernels cannot load or "", whether they loaded in interpreter mode,
    whether TRITON_INTERPRET=1 now). torch.compile calls this once while tracing and keeps the
    result instead of tracing the probe's imports (a graph break)."""
    probe = triton_ops()
    interpreting = bool(probe.module.INTERPRETING) if probe.ok else False
    return probe.reason, interpreting, interpreter_requested()


@torch.compiler.assume_constant_result
def triton_backward_reason() -> str:
    """Why the Triton backward kernels cannot load, or "" (constant under torch.compile, as above)."""
    return triton_backward_ops().reason


def triton_version() -> str:
    try:
        return importlib.import_module("triton").__version__
    except Exception:
        return "not installed"


def diffusers_version() -> str:
    """The installed diffusers version (read from its metadata: diffusers is not imported)."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "not installed (pip install vstar_kernels[diffusers] for vstar_kernels.diffusers)"
