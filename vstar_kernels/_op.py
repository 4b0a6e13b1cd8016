"""The torch.library ops behind `tar_attention`, and their autograd (docs/compile-and-autograd.md):

    vstar::tar_attention(<problem>, backend, needs_grad, speculate, compiled, layout) -> (out, stats, flags)
    vstar::tar_attention_backward(grad_out, out, stats, <problem>, backend, delta_grad) -> (dq, dk, dv, ddelta)

<problem> is `TarProblem`'s fields in `OP_FIELDS` order (`op_args` / `from_op_args`); delta is the broadcast
view, so autograd sums its broadcast dims; `layout` is `TarProblem.layout` (a list; None: ids without one).
`stats`: what the backend's backward needs (float32; may be empty); `flags`: int32 (B*H,), each sequence's rows
the speculative one pass recomputed, where it ran (`_problem.speculates`, a backend of SPECULATING, speculate),
else empty. `ddelta` is empty unless delta_grad. A plain-PyTorch backward runs straight from the autograd formula
(traced, differentiable again); the backward op is for kernel backends, whose gradients are first order.
"""

from __future__ import annotations

import contextlib
from typing import List, Optional, Tuple

import torch
from torch import Tensor

from ._problem import OP_FIELDS, TarProblem, check_frame_values, speculates, values_unkept
from .dispatch import AUTO_LEAN, BACKENDS, BackendUnavailableError, run_as
from .reference import without_autocast

_N = len(OP_FIELDS)  # the ops' leading arguments are the problem's fields, in OP_FIELDS order
SPECULATING = ("triton", "triton-lean", AUTO_LEAN)  # the backends with a speculative one pass


def _saving(backend: str):
    """The backend whose statistics, flags and backward a call given `backend` has (AUTO_LEAN: both its choices')."""
    return BACKENDS["triton" if backend == AUTO_LEAN else backend]


@torch.library.custom_op("vstar::tar_attention", mutates_args=())
def _tar_attention(q: Tensor, k: Tensor, v: Tensor, sigma: float, strength: float, delta: Optional[Tensor],
                   causal: bool, max_mode: str, scale: float, frames_q: Optional[Tensor], frames_k: Optional[Tensor],
                   key_mask: Optional[Tensor], backend: str, needs_grad: bool, speculate: bool = True,
                   compiled: bool = False, layout: Optional[List[int]] = None) -> Tuple[Tensor, Tensor, Tensor]:
    problem = TarProblem.from_op_args((q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k,
                                       key_mask), layout)
    with values_unkept() if compiled else contextlib.nullcontext():
        return _forward(problem, backend, needs_grad, speculate, compiled)


def _forward(problem: TarProblem, backend: str, needs_grad: bool, speculate: bool,
             compiled: bool = False) -> Tuple[Tensor, Tensor, Tensor]:
    q = problem.q
    check_frame_values(problem)
    given, backend = backend, run_as(problem, backend)
    impl, devices = BACKENDS[backend], BACKENDS[backend].SUPPORTED_DEVICES
    reasons = impl.state_reasons(problem)  # a traced program run elsewhere (torch.export): "auto"'s choice fixed
    if devices is not None and q.device.type not in devices:
        reasons.insert(0, f"it runs on {' or '.join(devices)} tensors, got {q.device.type} tensors")
    asked = f"'auto' (traced: {backend!r} where the op ran)" if given == AUTO_LEAN else repr(backend)
    if reasons:
        raise BackendUnavailableError(f"backend={asked} cannot run this call: {'; '.join(reasons)}. A call traced "
                                      "(torch.export) keeps the backend chosen where it was traced: trace it on the "
                                      "device it runs on")
    # (for "auto", run_as checked them choosing the lean forward)
    untraced = impl.untraced_reasons(problem) if compiled and given != AUTO_LEAN else []
    if untraced:
        raise BackendUnavailableError(f"backend={asked} cannot run this call: {'; '.join(untraced)}")
    stats, flags = _side_outputs(problem, given, needs_grad, speculate)
    with _device_of(q), without_autocast(q.device):
        out = impl.forward(problem, stats if stats.numel() else None, flags if flags.numel() else None)
    return out, stats, flags


def _device_of(q: Tensor):
    """q's CUDA device made the current one for a call: Triton launches on the current device and its stream, and
    a model split over GPUs (diffusers' device_map) calls with tensors on a device that is not the current one."""
    return torch.cuda.device(q.device) if q.is_cuda else contextlib.nullcontext()


def _side_outputs(problem: TarProblem, backend: str, needs_grad: bool, speculate: bool) -> tuple:
    """The op's stats and flags, for the backend to fill; empty where the call has none."""
    flags = problem.batch * problem.heads if speculate and backend in SPECULATING and speculates(problem) else 0
    return (problem.q.new_empty(_saving(backend).stats_shape(problem, needs_grad), dtype=torch.float32),
            problem.q.new_empty(flags, dtype=torch.int32))


@_tar_attention.register_fake
def _tar_attention_fake(*args):
    problem, (backend, needs_grad, *rest) = TarProblem.from_op_args(args[:_N]), args[_N:]
    speculate = rest[0] if rest else True  # the op's defaults, for a call without them
    return (problem.q.new_empty(problem.output_shape()), *_side_outputs(problem, backend, needs_grad, speculate))


@torch.library.custom_op("vstar::tar_attention_backward", mutates_args=())
def _tar_attention_backward(grad_out: Tensor, out: Tensor, stats: Tensor, q: Tensor, k: Tensor, v: Tensor,
                            sigma: float, strength: float, delta: Optional[Tensor], causal: bool, max_mode: str,
                            scale: float, frames_q: Optional[Tensor], frames_k: Optional[Tensor],
                            key_mask: Optional[Tensor], backend: str,
                            delta_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = TarProblem.from_op_args((q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k,
                                       key_mask))
    with _device_of(q), without_autocast(q.device):
        dq, dk, dv, ddelta = _saving(backend).backward(problem, out, stats, grad_out, delta_grad)
    return dq, dk, dv, ddelta.to(delta.dtype).contiguous() if delta_grad else q.new_empty(0)


@_tar_attention_backward.register_fake
def _tar_attention_backward_fake(grad_out, out, stats, *args):
    problem, (_backend, delta_grad) = TarProblem.from_op_args(args[:_N]), args[_N:]
    q, k, v, delta = problem.q, problem.k, problem.v, problem.delta
    ddelta = delta.new_empty(delta.shape) if delta_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ddelta


_DELTA = OP_FIELDS.index("delta")  # its position among vstar::tar_attention's inputs
# Which problem arguments are tensors (saved for the backward) and which are options (kept on ctx).
_TENSORS = tuple(i for i, name in enumerate(OP_FIELDS)
                 if name in ("q", "k", "v", "delta", "frames_q", "frames_k", "key_mask"))


def _setup_context(ctx, inputs, output):
    problem_args, backend = inputs[:_N], inputs[_N]
    out, stats, flags = output
    ctx.mark_non_differentiable(stats, flags)
    # a backward of the definition recomputes the call: no output kept, which the caller may then update in place
    ctx.save_for_backward(*(problem_args[i] for i in _TENSORS), None if _saving(backend).traceable_backward else out,
                          stats)
    ctx.options = (tuple(a for i, a in enumerate(problem_args) if i not in _TENSORS), backend)
    ctx.layout = inputs[_N + 4] if len(inputs) > _N + 4 else None


@contextlib.contextmanager
def _hooks_refused(backend: str):
    """torch.func.vjp (the reference's and the CPU backend's backward) refuses saved-tensor hooks, and torch's words
    name neither the call nor what to do: say both (docs/compile-and-autograd.md)."""
    try:
        yield
    except RuntimeError as exc:
        if "saved tensor hooks" not in str(exc):
            raise
        where = ("around the compiled call: torch.compile traces the backward when it compiles the forward, so call "
                 "the compiled function outside them" if torch.compiler.is_compiling() else
                 "around backward(): run the backward outside them (the forward may run under them)")
        raise RuntimeError(f"tar_attention: the {backend!r} backend's backward runs torch.func.vjp, which PyTorch "
                           "refuses while saved-tensor hooks are active (torch.autograd.graph.save_on_cpu, "
                           f"saved_tensors_hooks) {where}, or call with a Triton backend") from exc


def _backward(ctx, grad_out, _grad_stats, _grad_flags):
    *tensors, out, stats = ctx.saved_tensors
    options, backend = ctx.options
    tensors, options = iter(tensors), iter(options)
    problem = TarProblem.from_op_args([next(tensors) if i in _TENSORS else next(options) for i in range(_N)],
                                      ctx.layout)
    delta_grad = bool(ctx.needs_input_grad[_DELTA])
    impl = _saving(backend)
    if impl.traceable_backward:
        with without_autocast(grad_out.device), _hooks_refused(backend):
            dq, dk, dv, ddelta = impl.backward(problem, out, stats, grad_out, delta_grad)
    else:
        dq, dk, dv, ddelta = torch.ops.vstar.tar_attention_backward(grad_out, out, stats, *problem.op_args(),
                                                                    backend, delta_grad)
    grads = [None] * (_N + 5)  # + backend, needs_grad, speculate, compiled, layout
    grads[:3] = dq, dk, dv
    grads[_DELTA] = ddelta if delta_grad else None
    return tuple(grads)


_tar_attention.register_autograd(_backward, setup_context=_setup_context)


def _backward_setup_context(ctx, inputs, output):
    ctx.backend, ctx.device = "auto" if inputs[-2] == AUTO_LEAN else inputs[-2], inputs[0].device


def _no_double_backward(ctx, *grads):
    differentiable = "backend='reference' or 'cpu', whose backward is" if ctx.device.type == "cpu" else \
        "backend='reference', whose backward is"
    raise RuntimeError(f"tar_attention: the {ctx.backend!r} backend's gradients are first order: a gradient of them "
                       f"(create_graph=True, then backward) needs {differentiable} differentiable")


_tar_attention_backward.register_autograd(_no_double_backward, setup_context=_backward_setup_context)


def tar_attention_op(problem: TarProblem, backend: str, speculate: bool = True,
                     flags: Optional[Tensor] = None) -> Tensor:
    """Run a validated problem through vstar::tar_attention on `backend`; returns (B, H, Nq, Dv). flags:
    None, or an int64 (2,) tensor to which the call adds (flagged rows, rows) where it speculated."""
    if flags is not None and speculate and backend in SPECULATING and speculates(problem) \
            and not torch.compiler.is_compiling() and flags.is_inference() and not torch.is_inference_mode_enabled():
        # (dynamo cannot trace the question) torch would refuse the add after the whole call
        raise ValueError("flags was made in inference mode, and this call adds to it outside inference mode, which "
                         "torch refuses: make it outside inference mode (or call in inference mode)")
    # traced, the ids may be buffers that the compiled code reuses: their values are read on every call
    out, _, counts = _tar_attention(*problem.op_args(), backend, problem.needs_grad(), speculate,
                                    torch.compiler.is_compiling(),
                                    None if problem.layout is None else list(problem.layout))
    if flags is not None and counts.numel():  # device-side adds, no host copy: a CUDA graph may capture them
        try:
            flags[0].add_(counts.sum(dtype=torch.int64))
        except RuntimeError:
            if torch._C._functorch.is_batchedtensor(counts):
                raise ValueError("flags=: a call under torch.func.vmap has counts for each of its slices, which it "
                                 "cannot add into one flags tensor: call without flags there") from None
            raise
        flags[1].add_(counts.numel() * problem.nq)
    return out
