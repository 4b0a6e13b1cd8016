"""The Triton kernels and what they share. Each kernel module: @triton.jit kernels -> configs -> launcher.

* layout.py: which layout (packed or tiled) a call uses and the shape of the row statistics the
  tiled forward saves for the backward. No triton import: the op's fake (meta) functions ask it too.
* _jit.py: the @triton.jit building blocks the forward and backward kernels share (scores, the
  Gaussian band, the bias, tile loads and stores, program coordinates, the interpreter's exact
  bf16 products) and the launcher helpers both use (compile-time options, delta and frame
  arguments, the vector width, the packed launch and its float32 operand budget, autotuning or the
  interpreter's one config, the target arch).
* tar_fwd.py: the fused forward: packed, tiled, and the row-max pre-pass of max_mode="global".
* tar_bwd.py: the fused backward: packed, and the tiled dQ and dK/dV passes.
* _load.py: loads the kernel modules once and keeps the reason when one cannot be loaded.
* tar_cuda.py: the optional CUDA C++ operator (vstar_kernels._C); it loads its library itself
  (`tar_cuda.load()`).

The kernel modules import triton at import time: load them only through `_load.py`.
"""
