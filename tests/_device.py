"""Where the tests run, decided before any test loads the kernels.

Without CUDA the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET
must be set before they are first loaded, so it is set when this module is imported
(tests/conftest.py imports it at collection time), with a step of the interpreter that repeats
itself skipped (tests/_interpreter.py).
"""

import os

import torch

from vstar_kernels import _env

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if _env.interpreter_requested():
    from . import _interpreter

    _interpreter.install()  # one patch of triton.language per grid, not per helper call

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
