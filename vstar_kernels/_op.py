"""The torch.library ops behind `tar_attention`, and their autograd.

One opaque call per direction, so `torch.compile(fullgraph=True)` traces a module calling
`tar_attention` without graph breaks and CUDA graphs capture it:

    vstar::tar_attention(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q,
                         frames_k, key_mask, backend, needs_grad) -> (out, stats)
    vstar::tar_attention_backward(grad_out, out, stats, q, k, v, sigma, strength, delta, causal,
                                  max_mode, scale, frames_q, frames_k, key_mask, backend,
                                  delta_grad) -> (dq, dk, dv, ddelta)

The problem's arguments (q, k, v, sigma, ..., key_mask) come in the order of `tar_attention`'s
keywords, as in `TarProblem` (the CUDA operator takes those up to scale), so both schemas share
them.

q (B, H, Nq, D), k (B, H, Nk, D), v (B, H, Nk, Dv) are the 4-D views `make_problem` returns
(any strides), delta the (B, H, Nq, Nk) broadcast view of the custom bias (the (F, F) frame
matrix with frame ids) or None; the broadcast dims of delta's gradient are summed by autograd
through that view. frames_q (Nq,) and frames_k (Nk,) are the integer frame ids or both None,
key_mask the (B, Nk) bool key mask or None; the op checks the ids' values before it runs a
backend (`check_frame_values`: one read of an id tensor's extrema, kept while it is unchanged). `backend` is the
name `dispatch.select` resolved ("triton" or "reference"): on CPU tensors the op runs the
reference unless the caller asked for the Triton interpreter. `stats` holds what the backend's
backward needs beyond the inputs and the output (float32; empty for the reference and for the
Triton packed layout). `ddelta` is empty unless delta_grad.

A backend whose backward is plain PyTorch (the reference: torch.func.vjp of its definition)
runs it straight from the autograd formula, where torch.compile traces it; the backward op is
for kernel backends. Kernel gradients are first order (a double backward raises); the
reference's are differentiable again.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ._validation import TarProblem, check_frame_values
from .dispatch import BACKENDS


def _problem(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k,
             key_mask) -> TarProblem:
    return TarProblem(q=q, k=k, v=v, sigma=sigma, strength=strength, delta=delta, causal=causal, max_mode=max_mode,
                      scale=scale, frames_q=frames_q, frames_k=frames_k, key_mask=key_mask, was_3d=False)


def _problem_args(problem: TarProblem) -> tuple:
    """The problem as the ops take it: (q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q,
    frames_k, key_mask)."""
    return (problem.q, problem.k, problem.v, problem.sigma, problem.strength, problem.delta, problem.causal,
            problem.max_mode, problem.scale, problem.frames_q, problem.frames_k, problem.key_mask)


@torch.library.custom_op("vstar::tar_attention", mutates_args=())
def _tar_attention(q: Tensor, k: Tensor, v: Tensor, sigma: float, strength: float, delta: Optional[Tensor],
                   causal: bool, max_mode: str, scale: float, frames_q: Optional[Tensor], frames_k: Optional[Tensor],
                   key_mask: Optional[Tensor], backend: str, needs_grad: bool) -> Tuple[Tensor, Tensor]:
    problem = _problem(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k, key_mask)
    check_frame_values(problem)
    impl = BACKENDS[backend]
    if needs_grad:
        return impl.forward_saving(problem)
    return impl.forward(problem), q.new_empty(impl.stats_shape(problem, False), dtype=torch.float32)


@_tar_attention.register_fake
def _tar_attention_fake(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k, key_mask,
                        backend, needs_grad):
    problem = _problem(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k, key_mask)
    out = q.new_empty(problem.output_shape())
    return out, q.new_empty(BACKENDS[backend].stats_shape(problem, needs_grad), dtype=torch.float32)


@torch.library.custom_op("vstar::tar_attention_backward", mutates_args=())
def _tar_attention_backward(grad_out: Tensor, out: Tensor, stats: Tensor, q: Tensor, k: Tensor, v: Tensor,
                            sigma: float, strength: float, delta: Optional[Tensor], causal: bool, max_mode: str,
                            scale: float, frames_q: Optional[Tensor], frames_k: Optional[Tensor],
                            key_mask: Optional[Tensor], backend: str,
                            delta_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    problem = _problem(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k, key_mask)
    dq, dk, dv, ddelta = BACKENDS[backend].backward(problem, out, stats, grad_out, delta_grad)
    ddelta = ddelta.to(delta.dtype).contiguous() if delta_grad else q.new_empty(0)
    return dq, dk, dv, ddelta


@_tar_attention_backward.register_fake
def _tar_attention_backward_fake(grad_out, out, stats, q, k, v, sigma, strength, delta, causal, max_mode, scale,
                                 frames_q, frames_k, key_mask, backend, delta_grad):
    ddelta = delta.new_empty(delta.shape) if delta_grad else q.new_empty(0)
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), ddelta


_DELTA = 5  # delta's position among vstar::tar_attention's inputs


def _setup_context(ctx, inputs, output):
    q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k, key_mask, backend, _ = inputs
    out, stats = output
    ctx.mark_non_differentiable(stats)
    ctx.save_for_backward(q, k, v, delta, frames_q, frames_k, key_mask, out, stats)
    ctx.options = (sigma, strength, causal, max_mode, scale, backend)


def _backward(ctx, grad_out, _grad_stats):
    q, k, v, delta, frames_q, frames_k, key_mask, out, stats = ctx.saved_tensors
    delta_grad = bool(ctx.needs_input_grad[_DELTA])
    sigma, strength, causal, max_mode, scale, backend = ctx.options
    problem = _problem(q, k, v, sigma, strength, delta, causal, max_mode, scale, frames_q, frames_k, key_mask)
    impl = BACKENDS[backend]
    if impl.traceable_backward:
        dq, dk, dv, ddelta = impl.backward(problem, out, stats, grad_out, delta_grad)
    else:
        dq, dk, dv, ddelta = torch.ops.vstar.tar_attention_backward(grad_out, out, stats, *_problem_args(problem),
                                                                    backend, delta_grad)
    return dq, dk, dv, None, None, ddelta if delta_grad else None, None, None, None, None, None, None, None, None


_tar_attention.register_autograd(_backward, setup_context=_setup_context)


def tar_attention_op(problem: TarProblem, backend: str) -> Tensor:
    """Run a validated problem through vstar::tar_attention on `backend`; returns (B, H, Nq, Dv)."""
    out, _ = _tar_attention(*_problem_args(problem), backend, problem.needs_grad())
    return out
