"""Backward-pass timing, `python -m vstar_kernels bench --backward` (GPU only): the implementations, rows and
files are those benchmarks/NOTES.md ("Running it") and the option's help describe."""

from __future__ import annotations

import functools
import sys

import torch
import torch.nn.functional as F

import vstar_kernels as vk

from . import measure, report
from .harness import dtype_name, results_csv
from .peers import BACKWARD_IMPLS as IMPLS


# what tar_attention runs for each of ours (the `backend` column); empty for SDPA, a peer
BACKENDS = {"vstar_triton": "triton", "vstar_reference": "reference"}


def backward_callables(batch, heads, frames, head_dim, *, dtype=torch.float16, device="cuda", impls=IMPLS, **tar):
    """name -> callable running one backward of a (batch, heads, frames, head_dim) self-attention; q, k, v are
    (B, N, H, D) storage viewed as (B, H, N, D), as diffusers hands them; `tar` goes to tar_attention."""
    g = torch.Generator(device=device).manual_seed(0)
    shape = (batch, frames, heads, head_dim)
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, generator=g).transpose(1, 2).requires_grad_()
               for _ in range(3))
    grad_out = torch.randn(batch, heads, frames, head_dim, device=device, dtype=dtype, generator=g)
    forwards = {
        "vstar_triton": lambda: vk.tar_attention(q, k, v, backend="triton", **tar),
        "vstar_reference": lambda: vk.tar_attention(q, k, v, backend="reference", **tar),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=tar.get("causal", False)),
    }

    def backward(out):
        for t in (q, k, v):
            t.grad = None
        out.backward(grad_out, retain_graph=True)
        return q.grad, k.grad, v.grad

    return {name: functools.partial(backward, forwards[name]()) for name in impls}


def time_backward(info: measure.RunInfo, batch, heads, frames, head_dim, *, dtype=torch.float16, device="cuda",
                  **tar) -> list:
    """The rows of one case: each implementation's backward, timed after an untimed call (the Triton backward's
    compile and autotuning, which time_call's warm call would take for the call's time and choose its timer by)."""
    callables = backward_callables(batch, heads, frames, head_dim, dtype=dtype, device=device, **tar)
    setup = ",".join(["backward", *(f"{k}={v}" for k, v in sorted(tar.items()))])
    rows = []
    for name, fn in callables.items():
        fn()
        timing, peak = measure.time_call(fn, torch.device(device))
        rows.append(measure.row(info, name, batch, heads, frames, head_dim, dtype_name(dtype), setup=setup,
                                timing=timing, peak_mb=peak, backend=BACKENDS.get(name, "")))
    return rows


# (batch x spatial positions, heads, frames, head dim): VideoCrafter2-like levels, N <= 256, and a long video
DEFAULT_CASES = [(2 * 40 * 64, 5, 16, 64), (2 * 20 * 32, 10, 32, 64), (2 * 10 * 16, 20, 64, 64), (256, 8, 128, 64),
                 (128, 8, 256, 64), (16, 8, 1024, 64)]
# tar_attention options of each default case: the defaults, and causal with the global max
DEFAULT_OPTIONS = [dict(), dict(causal=True, max_mode="global")]


def main(args) -> int:
    if not torch.cuda.is_available():
        print("backward benchmarks need a CUDA device (the CPU runs the Triton interpreter, not the kernels)",
              file=sys.stderr)
        return 2  # as bench --device cuda without CUDA
    info = measure.RunInfo.collect(torch.device("cuda"))
    csv_path = results_csv(args, info, "-backward")
    for case in DEFAULT_CASES:
        for tar in DEFAULT_OPTIONS:
            for row in time_backward(info, *case, **tar):
                measure.append_row(csv_path, row)  # row by row, as measured: a killed run keeps them
                print(f"{row['impl']} {row['setup']} B{row['batch']} H{row['heads']} N{row['n']} D{row['d']}: "
                      f"{row['median_ms']} ms")
    print(f"rows appended to {csv_path}")
    for path in report.render(csv_path, plots=not args.no_plots):
        print(f"wrote {path}")
    return 0
