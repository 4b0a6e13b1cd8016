"""Kernel families. Each module: @triton.jit kernels -> launcher -> (autograd) entry point.

Modules here import triton at import time: load them only through `_load.py`, which
records why one cannot be loaded. The exceptions: layout.py (no triton), which layout a call
uses and the shape of what its forward saves, also asked by the op's fake functions; and
tar_cuda.py, the CUDA C++ operator, which loads its library itself (`tar_cuda.load()`).
"""
