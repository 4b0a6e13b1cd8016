"""`tools.perf host`: the host time of `tar_attention` on the quick shape (docs/performance.md, "Host overhead").

B 4 x H 2 sequences of N 16 and 64 tokens, head dim 40, fp32, in (B, N, H, D) storage (what `bench --quick`
times on a CPU), without and with frame ids. Per call, the median over rounds of a batch of calls of each
implementation in turn: plain SDPA; the formula (TAR's operations on the whole call, the bias made
beforehand: the compute with nothing around it); `tar_attention` with backend "auto", with each other
backend that runs CPU tensors without the interpreter, and with a backend that computes nothing (the
call's validation, backend choice and custom op). "over the formula" is what the call adds to the compute.
"""

from __future__ import annotations

import contextlib
import os
import time

import torch
import torch.nn.functional as F

from .cpu import _quantile

SHAPE = (4, 2, 40)  # batch, heads, head dim
LENGTHS = (16, 64)


def formula(q, k, v, dA, scale: float):
    """softmax(S + m dA) V with S = scale q k^T and m its row max (strength 1)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    return torch.matmul(torch.softmax(s + s.amax(dim=-1, keepdim=True) * dA, dim=-1), v)


NO_COMPUTE = "no compute"


@contextlib.contextmanager
def no_compute_backend():
    """A backend NO_COMPUTE, registered while the block runs, whose forward returns an uninitialized output."""
    from vstar_kernels import dispatch

    class NoCompute(dispatch.Backend):
        name = NO_COMPUTE

        def forward(self, problem, stats=None, flags=None):
            return problem.q.new_empty(problem.output_shape())

    names, dispatch.BACKEND_NAMES = dispatch.BACKEND_NAMES, (*dispatch.BACKEND_NAMES, NO_COMPUTE)
    dispatch.BACKENDS[NO_COMPUTE] = NoCompute()
    try:
        yield
    finally:
        dispatch.BACKEND_NAMES = names
        del dispatch.BACKENDS[NO_COMPUTE]


def implementations(n: int, with_frames: bool) -> dict:
    """name -> a call on the quick shape at length `n` (frame ids: frames of 4 tokens after 4 text tokens);
    the no-compute call needs `no_compute_backend`."""
    import vstar_kernels as vk
    from vstar_kernels.dispatch import BACKENDS, TritonBackend, availability
    from vstar_kernels.frames import frame_bias
    from vstar_kernels.regularization import gaussian_bias

    batch, heads, d = SHAPE
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, n, heads, d, generator=g).transpose(1, 2) for _ in range(3))
    ids = vk.frame_ids((n - 4) // 4, 4, text_before=4) if with_frames else None
    dA = frame_bias(ids, ids, sigma=1.0) if with_frames else gaussian_bias(n, n, 1.0, device="cpu", dtype=q.dtype)
    calls = {"sdpa": lambda: F.scaled_dot_product_attention(q, k, v),
             "formula": lambda: formula(q, k, v, dA, d ** -0.5),
             "tar auto": lambda: vk.tar_attention(q, k, v, frames=ids)}
    for name, why in availability("cpu").items():
        # (on CPU tensors the Triton backends run their interpreter, which is not what a host call costs)
        if not why and name != NO_COMPUTE and not isinstance(BACKENDS[name], TritonBackend):
            calls[f"tar {name}"] = lambda name=name: vk.tar_attention(q, k, v, frames=ids, backend=name)
    calls[NO_COMPUTE] = lambda: vk.tar_attention(q, k, v, frames=ids, backend=NO_COMPUTE)
    return calls


def time_calls(calls: dict, rounds: int, batch: int) -> dict:
    """name -> median microseconds per call: `rounds` rounds, each timing `batch` calls of every
    implementation in turn (after one warm-up batch each)."""
    samples = {name: [] for name in calls}
    for r in range(rounds + 1):
        for name, fn in calls.items():
            t0 = time.perf_counter()
            for _ in range(batch):
                fn()
            if r:
                samples[name].append((time.perf_counter() - t0) / batch * 1e6)
    return {name: _quantile(x, 0.5) for name, x in samples.items()}


def main(args) -> int:
    default = torch.get_num_threads()
    print("| N | frame ids | threads | " + " | ".join(("sdpa", "formula", "tar auto", "other backends", NO_COMPUTE,
                                                     "auto over the formula", "load average")) + " |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | --- |")
    try:
        for threads in dict.fromkeys((1, default)):
            torch.set_num_threads(threads)
            for n in LENGTHS:
                for with_frames in (False, True):
                    load = os.getloadavg()[0]
                    with torch.no_grad(), no_compute_backend():
                        us = time_calls(implementations(n, with_frames), args.rounds, args.batch)
                    others = ", ".join(f"{name[4:]} {t:.0f}" for name, t in us.items() if name.startswith("tar ")
                                       and name != "tar auto")
                    print(f"| {n} | {'yes' if with_frames else 'no'} | {threads} | {us['sdpa']:.0f} | "
                          f"{us['formula']:.0f} | {us['tar auto']:.0f} | {others} | {us[NO_COMPUTE]:.0f} | "
                          f"{us['tar auto'] - us['formula']:.0f} | {load:.1f}-{os.getloadavg()[0]:.1f} |", flush=True)
    finally:
        torch.set_num_threads(default)
    print("microseconds per call, medians of", args.rounds, "rounds of", args.batch, "calls each")
    return 0
