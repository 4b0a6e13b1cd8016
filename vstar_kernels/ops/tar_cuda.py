"""The CUDA C++ TAR forward of bindings/, as ``torch.ops.vstar.tar_attention_fwd``.

Importing this module loads the compiled library ``vstar_kernels._C`` (built on
request: ``VSTAR_BUILD_CUDA=1``, see setup.py and CMakeLists.txt) and raises if
it is missing or cannot be loaded. Load it only through
``vstar_kernels._env.cuda_ops()``, which keeps the reason.
"""

from __future__ import annotations

import torch

from .. import _env
from .._validation import TarProblem

_path = _env.cuda_extension_path()
if _path is None:
    raise ImportError(_env.CUDA_NOT_BUILT)
torch.ops.load_library(_path)


@torch.library.register_fake("vstar::tar_attention_fwd")
def _tar_attention_fwd_fake(q, k, v, sigma, strength, delta, causal, global_max, scale):
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


def tar_forward(problem: TarProblem) -> torch.Tensor:
    """Run the operator on a validated problem; returns (B, H, Nq, Dv) in q's dtype."""
    return torch.ops.vstar.tar_attention_fwd(problem.q, problem.k, problem.v, problem.sigma, problem.strength,
                                             problem.delta, problem.causal, problem.max_mode == "global",
                                             problem.scale)
