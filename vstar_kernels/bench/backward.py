"""Backward-pass timing (`python -m vstar_kernels bench --backward`, GPU only; benchmarks/NOTES.md): the Triton
backward, autograd on the eager reference, and SDPA's (without TAR), one CSV row per default case."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

import vstar_kernels as vk

from . import measure

IMPLS = ("triton", "reference", "sdpa")


def backward_callables(batch, heads, frames, head_dim, *, dtype=torch.float16, device="cuda", impls=IMPLS, **tar):
    """name -> callable running one backward of a (batch, heads, frames, head_dim) self-attention.

    q, k, v are (batch, frames, heads, head_dim) projections viewed as (B, H, N, D), as diffusers
    hands them over; `tar` goes to tar_attention (sigma, strength, causal, max_mode, ...).
    """
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, frames, heads, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(batch, heads, frames, head_dim, device=device, dtype=dtype, generator=g)
    forwards = {
        "triton": lambda: vk.tar_attention(q, k, v, backend="triton", **tar),
        "reference": lambda: vk.tar_attention(q, k, v, backend="reference", **tar),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=tar.get("causal", False)),
    }

    def backward(out):
        for t in (q, k, v):
            t.grad = None
        out.backward(grad_out, retain_graph=True)
        return q.grad, k.grad, v.grad

    return {name: functools.partial(backward, forwards[name]()) for name in impls}


def time_backward(batch, heads, frames, head_dim, *, dtype=torch.float16, device="cuda", impls=IMPLS, **tar) -> dict:
    """One benchmark row: the case, each implementation's backward time and the ratios to triton."""
    callables = backward_callables(batch, heads, frames, head_dim, dtype=dtype, device=device, impls=impls, **tar)
    cuda = torch.device(device).type == "cuda"
    row = dict(case="tar_attention backward", batch=batch, heads=heads, frames=frames, head_dim=head_dim,
               dtype=str(dtype).replace("torch.", ""), device=torch.cuda.get_device_name(device) if cuda else "cpu",
               options=",".join(f"{k}={v}" for k, v in sorted(tar.items())) or "default")
    for name, fn in callables.items():
        t = measure.time_fn(fn, cuda, measure.warm_call_ms(fn, cuda))
        row[f"{name}_ms"], row[f"{name}_p20_ms"], row[f"{name}_p80_ms"] = t.median_ms, t.p20_ms, t.p80_ms
    row.update({f"triton_vs_{peer}": row["triton_ms"] / row[f"{peer}_ms"] for peer in ("sdpa", "reference")
                if "triton" in callables and peer in callables})
    return row


# (batch x spatial positions, heads, frames, head dim): VideoCrafter2-like levels, N <= 256, and a long video
DEFAULT_CASES = [
    (2 * 40 * 64, 5, 16, 64),
    (2 * 20 * 32, 10, 32, 64),
    (2 * 10 * 16, 20, 64, 64),
    (256, 8, 128, 64),
    (128, 8, 256, 64),
    (16, 8, 1024, 64),
]


# tar_attention options of each default case: the defaults, and causal with the global max
DEFAULT_OPTIONS = [dict(), dict(causal=True, max_mode="global")]


def main(args) -> int:
    if not torch.cuda.is_available():
        print("backward benchmarks need a CUDA device (the CPU runs the Triton interpreter, not the kernels)")
        return 1
    from .harness import append_row, results_csv

    info = measure.RunInfo.collect(torch.device("cuda"))
    csv_path = results_csv(args, info, "-backward")
    for case in DEFAULT_CASES:
        for tar in DEFAULT_OPTIONS:
            row = dict(timestamp=measure.now_iso(), commit=info.commit, torch=info.torch, triton=info.triton,
                       **time_backward(*case, **tar))
            append_row(csv_path, row)  # row by row, as measured: a killed run keeps them
            print(row)
    print(f"rows appended to {csv_path}")
    return 0
