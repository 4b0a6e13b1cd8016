"""The Triton kernels and what they share. Each kernel module: @triton.jit kernels -> launcher.

* layout.py: which layout (packed or tiled) a call's shape allows and the shape of the row
  statistics the tiled forward saves for the backward. No triton import: the op's fake (meta)
  functions ask it too.
* _jit.py: the @triton.jit building blocks the forward and backward kernels share (scores, the
  frame bias, tile loads and stores, program coordinates, the interpreter's stand-ins) and the
  named groups they take their arguments in. Device code only.
* launch.py: the launch policy, host side: packed or tiled, the launch arguments both launchers
  derive from a problem (delta, frame ids, vector width, band widths, precision), the autotune
  configs and their prune rules as tables, the target arch, the interpreter's one config.
* tar_fwd.py: the fused forward: packed, tiled, and the row-max pre-pass of max_mode="global".
* tar_bwd.py: the fused backward: packed, and the tiled dQ and dK/dV passes.
* _load.py: loads the kernel modules once and keeps the reason when one cannot be loaded.
* tar_cuda.py: the optional CUDA C++ operator (vstar_kernels._C); it loads its library itself
  (`tar_cuda.load()`).

The kernel modules import triton at import time (so do _jit.py and launch.py): the package loads
them only through `_load.py`. The launchers' test variants (constexprs the production launch never
sets) go through their private entries, `tar_fwd._tar_forward` and `tar_bwd._tar_backward`.
"""
