"""Facts about the environment: TRITON_INTERPRET, where the package runs from, versions. The bottom layer:
it imports nothing from this package. The optional pieces' loaders live with what they load (ops/_load.py,
ops/tar_cuda.py)."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
from pathlib import Path
from typing import Optional


def interpreter_requested() -> bool:
    """TRITON_INTERPRET=1 in the environment: Triton kernels run on CPU tensors. As the installed Triton reads it
    (its knobs); without Triton as Triton 3.9 does (1, y, yes, on, true in any case, nothing stripped)."""
    try:
        from triton import knobs
    except ImportError:
        return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "y", "yes", "on", "true")
    return bool(knobs.runtime.interpret)


SET_BEFORE_PYTHON = ("set TRITON_INTERPRET in the environment before Python starts "
                     "(TRITON_INTERPRET=1 python script.py), or in os.environ at the top of the script, "
                     "before importing torch or vstar_kernels")


def triton_mode_mismatch() -> str:
    """Why the Triton kernels cannot load in the mode TRITON_INTERPRET asks for now, or "". triton.language
    builds its jit helpers (tl.max, ...) once, in the mode of triton's first import (torch._dynamo,
    torch.compile and diffusers import it); kernels loaded in the other mode fail calling them.
    """
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    imported_interpreting = isinstance(tl.max, InterpretedFunction)
    requested = interpreter_requested()
    if imported_interpreting == requested:
        return ""
    return (f"TRITON_INTERPRET was {int(imported_interpreting)} when triton was imported and is {int(requested)} "
            f"now; triton keeps the mode of its first import, so {SET_BEFORE_PYTHON}")


def source_checkout() -> Optional[Path]:
    """The source checkout this package runs from (editable install, PYTHONPATH); None from a wheel."""
    root = Path(__file__).resolve().parents[1]
    return root if (root / "setup.py").is_file() and (root / "bindings").is_dir() else None


def install_hint(extras: str) -> str:
    """The command that installs this package's `extras` ("diffusers", "plot", ...) from its source checkout
    (it is on no package index; brackets quoted, a glob in zsh otherwise)."""
    checkout = source_checkout()
    if checkout is None:
        return f'pip install ".[{extras}]" in a checkout of the vstar_kernels repository'
    return f'pip install -e "{checkout}[{extras}]"'


def triton_version() -> str:
    try:
        return importlib.import_module("triton").__version__
    except ModuleNotFoundError:
        return "not installed"
    except Exception as exc:  # a broken install raises anything
        return f"not importable ({type(exc).__name__})"


def diffusers_version() -> str:
    """The installed diffusers version (read from its metadata: diffusers is not imported)."""
    try:
        return importlib.metadata.version("diffusers")
    except importlib.metadata.PackageNotFoundError:
        return f"not installed ({install_hint('diffusers')} for vstar_kernels.diffusers)"
