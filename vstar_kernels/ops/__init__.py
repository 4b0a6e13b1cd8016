"""Kernel families. Each module: @triton.jit kernels -> launcher -> (autograd) entry point.

Modules here import triton at import time: load them only through
`vstar_kernels._env`, which records why one cannot be loaded. The exception is layout.py
(no triton): which layout a call uses and the shape of what its forward saves, also asked by
the op's fake functions.
"""
