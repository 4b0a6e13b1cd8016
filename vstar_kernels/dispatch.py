"""Backends declare what they support; choosing one explains every rejection.

`select(problem, name)` returns the backend to run. An explicit name that
cannot run the call raises `BackendUnavailableError` with the reasons;
"auto" takes the first backend that fits (for CUDA tensors Triton, then the
optional CUDA C++ operator; the reference otherwise).
"""

from __future__ import annotations

import torch

from . import _env
from ._validation import TarProblem
from .ops import layout
from .reference import reference_backward, reference_forward

MAX_TRITON_HEAD_DIM = 256
# The CUDA C++ operator's limits: kMaxHeadDim and kMaxKeys in bindings/tar_params.h.
MAX_CUDA_HEAD_DIM = 256
MAX_CUDA_KEYS = 1024


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


class Backend:
    name = ""
    # backward() is differentiable PyTorch that torch.compile can trace: the op's autograd formula
    # calls it directly. False for kernels: they run behind the opaque vstar::tar_attention_backward.
    traceable_backward = True

    def not_supported_reasons(self, problem: TarProblem) -> list:
        raise NotImplementedError

    def forward(self, problem: TarProblem) -> torch.Tensor:
        raise NotImplementedError

    def stats_shape(self, problem: TarProblem, needs_grad: bool) -> tuple:
        """Shape of the float32 statistics `forward_saving` returns for backward() (none by default)."""
        return (0,)

    def forward_saving(self, problem: TarProblem) -> tuple:
        """Forward of a call that will be differentiated: (output, statistics for backward())."""
        stats = torch.empty(self.stats_shape(problem, True), device=problem.device, dtype=torch.float32)
        return self.forward(problem), stats

    def backward(self, problem: TarProblem, out, stats, grad_out, delta_grad: bool) -> tuple:
        """(dq, dk, dv, ddelta or None), contiguous; by default autograd on the reference definition."""
        return reference_backward(problem, grad_out, delta_grad)


class ReferenceBackend(Backend):
    name = "reference"

    def not_supported_reasons(self, problem):
        return []

    def forward(self, problem):
        return reference_forward(problem)


class TritonBackend(Backend):
    name = "triton"
    traceable_backward = False

    def not_supported_reasons(self, problem):
        reasons = []
        load_reason, interpreting, requested = _env.triton_state()
        if load_reason:
            return [load_reason]
        if interpreting != requested:
            reasons.append(
                "the Triton kernels were loaded with TRITON_INTERPRET="
                f"{int(interpreting)} but it is now {int(not interpreting)}; {_env.SET_BEFORE_PYTHON}, "
                "and leave it unchanged"
            )
        dev = problem.device.type
        if interpreting and dev != "cpu":
            reasons.append(f"TRITON_INTERPRET=1 runs the kernels on CPU tensors, got {dev} tensors")
        if not interpreting:
            if dev != "cuda":
                reasons.append(f"{dev} tensors need TRITON_INTERPRET=1 (the Triton interpreter); "
                               "compiled kernels run on CUDA tensors")
            elif not torch.cuda.is_available():
                reasons.append("CUDA is not available to torch")
        if problem.dtype == torch.float64:
            reasons.append("float64 is not a kernel dtype (float16, bfloat16, float32); use backend='reference'")
        if max(problem.head_dim, problem.head_dim_v) > MAX_TRITON_HEAD_DIM:
            reasons.append(f"head dim {max(problem.head_dim, problem.head_dim_v)} > {MAX_TRITON_HEAD_DIM}")
        if problem.delta is not None and problem.delta.dtype == torch.float64:
            reasons.append("delta is float64; pass it in float32 or the input dtype")
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (problem.q, problem.k, problem.v, problem.delta)
        ):
            backward_reason = _env.triton_backward_reason()
            if backward_reason:
                reasons.append(f"inputs require grad and {backward_reason}")
        return reasons

    def forward(self, problem):
        return _env.triton_ops().module.tar_forward(problem)

    def stats_shape(self, problem, needs_grad):
        return layout.stats_shape(problem.batch * problem.heads, problem.nq, problem.nk, problem.head_dim,
                                  problem.head_dim_v, needs_grad)

    def forward_saving(self, problem):
        stats = torch.empty(self.stats_shape(problem, True), device=problem.device, dtype=torch.float32)
        out = _env.triton_ops().module.tar_forward(problem, stats=stats if stats.numel() else None)
        return out, stats

    def backward(self, problem, out, stats, grad_out, delta_grad):
        return _env.triton_backward_ops().module.tar_backward(problem, out, stats, grad_out, delta_grad)


class CudaBackend(Backend):
    """The CUDA C++ operator of bindings/ (optional: built with VSTAR_BUILD_CUDA=1)."""

    name = "cuda"

    def not_supported_reasons(self, problem):
        probe = _env.cuda_ops()
        reasons = [] if probe.ok else [probe.reason]
        if problem.device.type != "cuda":
            reasons.append(f"the CUDA C++ kernel runs on CUDA tensors, got {problem.device.type} tensors")
        if problem.dtype == torch.float64:
            reasons.append("float64 is not a kernel dtype (float16, bfloat16, float32); use backend='reference'")
        if max(problem.head_dim, problem.head_dim_v) > MAX_CUDA_HEAD_DIM:
            reasons.append(f"head dim {max(problem.head_dim, problem.head_dim_v)} > {MAX_CUDA_HEAD_DIM}")
        if problem.nk > MAX_CUDA_KEYS:
            reasons.append(f"Nk {problem.nk} > {MAX_CUDA_KEYS}: the CUDA C++ kernel keeps whole score rows in "
                           "shared memory; use backend='triton' for longer sequences")
        if problem.delta is not None and problem.delta.dtype not in (torch.float32, problem.dtype):
            reasons.append(f"delta is {problem.delta.dtype}; pass it in float32 or the input dtype")
        if torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (problem.q, problem.k, problem.v, problem.delta)
        ):
            reasons.append("inputs require grad and the CUDA C++ kernel has no backward")
        return reasons

    def forward(self, problem):
        return _env.cuda_ops().module.tar_forward(problem)


BACKENDS = {b.name: b for b in (TritonBackend(), CudaBackend(), ReferenceBackend())}
BACKEND_NAMES = ("auto", *BACKENDS)


def select(problem: TarProblem, name: str) -> Backend:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        reasons = BACKENDS[name].not_supported_reasons(problem)
        if reasons:
            raise BackendUnavailableError(f"backend={name!r} cannot run this call: " + "; ".join(reasons))
        return BACKENDS[name]
    candidates = ["triton", "cuda", "reference"] if problem.device.type == "cuda" else ["reference"]
    rejected = []
    for cand in candidates:
        reasons = BACKENDS[cand].not_supported_reasons(problem)
        if not reasons:
            return BACKENDS[cand]
        rejected.append(f"{cand}: " + "; ".join(reasons))
    raise BackendUnavailableError("no backend can run this call: " + " | ".join(rejected))


def availability(device) -> dict:
    """Backend name -> "" if it can run a small float32 call on `device`, else why not (for `info`)."""
    from ._validation import make_problem

    t = torch.zeros(1, 1, 16, 16, device=device)
    problem = make_problem(t, t, t, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None)
    return {name: "; ".join(b.not_supported_reasons(problem)) for name, b in BACKENDS.items()}
