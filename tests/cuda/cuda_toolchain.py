"""Finding nvcc, the CUDA headers and torch's headers; building and calling the host emulation.

The CPU tests compile bindings/ with the machine's tools: the kernels with nvcc,
the TORCH_LIBRARY glue with the host C++ compiler against torch's headers, and
bindings/emulate.cpp into a shared library that runs the kernel's block code on
CPU (see that file for what it covers).
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

BINDINGS = Path(__file__).resolve().parents[2] / "bindings"
DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def cuda_home():
    """A CUDA toolkit root holding include/cuda_fp16.h, or None."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(str(Path(nvcc).resolve().parent.parent))
    candidates.append("/usr/local/cuda")
    for root in candidates:
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root)
    return None


def nvcc_path():
    home = cuda_home()
    if home is not None and (home / "bin" / "nvcc").is_file():
        return str(home / "bin" / "nvcc")
    return shutil.which("nvcc")


def cxx_path():
    return shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")


def torch_include_dirs():
    from torch.utils.cpp_extension import include_paths

    dirs = [Path(p) for p in include_paths()]
    return dirs if (dirs[0] / "torch" / "library.h").is_file() else None


def compile_or_fail(cmd, what):
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, f"{what} failed:\n{' '.join(map(str, cmd))}\n{res.stdout}\n{res.stderr}"
    return res


@lru_cache(maxsize=None)
def emulation_library():
    """Build bindings/emulate.cpp (cached by source hash) and load it with ctypes."""
    home, cxx = cuda_home(), cxx_path()
    if home is None or cxx is None:
        return None
    sources = sorted(BINDINGS.glob("*.h")) + sorted(BINDINGS.glob("*.cuh")) + [BINDINGS / "emulate.cpp"]
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    lib = Path(tempfile.gettempdir()) / f"vstar_emulate_{digest}.so"
    if not lib.exists():
        tmp = lib.with_suffix(f".{os.getpid()}.tmp")
        compile_or_fail([cxx, "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", "-fPIC", "-shared",
                         f"-I{home / 'include'}", str(BINDINGS / "emulate.cpp"), "-o", str(tmp)],
                        "compiling the host emulation")
        tmp.replace(lib)
    dll = ctypes.CDLL(str(lib))
    i64p = ctypes.POINTER(ctypes.c_int64)
    dll.vstar_emulate_forward.restype = ctypes.c_int
    dll.vstar_emulate_forward.argtypes = [ctypes.c_void_p] * 5 + [i64p, i64p] + [ctypes.c_double] * 3 + \
        [ctypes.c_int] * 5 + [ctypes.c_int64, ctypes.c_int]
    dll.vstar_plan.restype = ctypes.c_int
    dll.vstar_plan.argtypes = [i64p, ctypes.c_int, ctypes.c_int, i64p]
    dll.vstar_limit.restype = ctypes.c_int64
    dll.vstar_limit.argtypes = [ctypes.c_int]
    return dll


def _int64s(values):
    values = list(values)
    return (ctypes.c_int64 * len(values))(*values)


def emulate(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
            threads=256, grid=None, reverse=False, out=None):
    """Run the kernel's block code on CPU tensors q (B, H, Nq, D), k, v (any strides).

    `delta` is a (B, H, Nq, Nk) view (stride 0 allowed). Writes into `out` (NaN-poisoned by
    default) and returns it. `grid` < number of blocks exercises the grid-stride loop.
    """
    dll = emulation_library()
    B, H, nq, d = q.shape
    nk, dv = k.shape[2], v.shape[3]
    if out is None:
        out = torch.full((B, H, nq, dv), math.nan, dtype=q.dtype)
    if grid is None:
        grid = plan(B, H, nq, nk, d, dv)["num_blocks"]  # what the launcher's grid covers
    strides = [*q.stride(), *k.stride(), *v.stride(), *out.stride(),
               *(delta.stride() if delta is not None else (0, 0, 0, 0))]
    rc = dll.vstar_emulate_forward(
        q.data_ptr(), k.data_ptr(), v.data_ptr(), out.data_ptr(), None if delta is None else delta.data_ptr(),
        _int64s((B, H, nq, nk, d, dv)), _int64s(strides), d ** -0.5 if scale is None else scale, sigma, strength,
        int(causal), int(max_mode == "global"), DTYPE_CODES[q.dtype],
        DTYPE_CODES[delta.dtype if delta is not None else q.dtype], threads, grid, int(reverse))
    assert rc == 0, "the emulation found no plan for this shape"
    return out


def plan(B, H, nq, nk, d, dv, *, global_max=False, regularize=True):
    """The launcher's plan as a dict, or None for an unsupported shape."""
    dll = emulation_library()
    res = (ctypes.c_int64 * 7)()
    if dll.vstar_plan(_int64s((B, H, nq, nk, d, dv)), int(global_max), int(regularize), res) != 0:
        return None
    keys = ("rows", "seqs", "key_tile", "row_tiles", "num_blocks", "smem_bytes", "two_pass")
    return dict(zip(keys, res))
