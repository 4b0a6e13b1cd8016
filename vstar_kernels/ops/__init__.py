"""Kernel families. Each module: @triton.jit kernels -> launcher -> (autograd) entry point.

Modules here import triton at import time: load them only through
`vstar_kernels._env`, which records why one cannot be loaded.
"""
