"""Where the tests run, decided before any test loads the kernels.

Without CUDA the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET
must be set before they are first loaded, so it is set when this module is imported
(tests/conftest.py imports it at collection time).
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
