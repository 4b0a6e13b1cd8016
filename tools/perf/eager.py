"""The eager peers in the roofline model: their aten ops counted on meta tensors (bytes, FLOPs, peak
memory), each op memory- or FLOP-bound on its own."""

from __future__ import annotations

import math
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from .roofline import LAUNCH_S, Estimate, Gpu, flash

# --------------------------------------------------------------------------- eager peers

_FREE = {"empty", "empty_strided", "empty_like", "detach", "lift_fresh"}
_MATMUL = {"bmm", "mm", "matmul", "addmm", "baddbmm"}


def _tensor_bytes(t: torch.Tensor) -> int:
    return min(t.numel() * t.element_size(), t.untyped_storage().nbytes())


class OpCounter(TorchDispatchMode):
    """Sums each aten op's roofline on the tensors it sees: bytes of its tensor inputs (an `out=`
    and the destination of copy_ are written, not read) and outputs, matmul FLOPs; views and
    allocations cost nothing. Also tracks the bytes of the storages live at once (`peak`): the
    `inputs` held throughout, and every storage an op returns, until its last tensor is freed."""

    def __init__(self, gpu: Gpu, eta: float, inputs=()):
        super().__init__()
        self.gpu, self.eta = gpu, eta
        self.total = Estimate()
        self.held, self.live, self.peak = {}, 0, 0
        self._keep = list(inputs)
        for t in inputs:
            self._hold(t)

    def _hold(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in self.held:
            self.held[key] = [0, storage.nbytes()]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.held[key][0] += 1
        weakref.finalize(t, self._drop, key)

    def _drop(self, key) -> None:
        entry = self.held[key]
        entry[0] -= 1
        if not entry[0]:
            self.live -= entry[1]
            del self.held[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self._hold(t)
        name = func.overloadpacket.__name__
        if func.is_view or name in _FREE or name.startswith("_unsafe_view"):
            return out
        reads = list(args[1:] if name == "copy_" else args) + [v for k, v in kwargs.items() if k != "out"]
        outs = out if isinstance(out, (tuple, list)) else (out,)
        op = Estimate(launches=1)
        op.bytes = (sum(_tensor_bytes(t) for t in reads if isinstance(t, torch.Tensor))
                    + sum(_tensor_bytes(t) for t in outs if isinstance(t, torch.Tensor)))
        if name in _MATMUL:
            a, b = [t for t in args if isinstance(t, torch.Tensor)][-2:]
            op.mma_flops = 2 * a.numel() * b.shape[-1]
        self.add(op, args[0].dtype if args and isinstance(args[0], torch.Tensor) else torch.float32)
        return out

    def add(self, op: Estimate, dtype: torch.dtype) -> None:
        peak = self.gpu.tensor_flop_s * self.eta if dtype in (torch.float16, torch.bfloat16) else self.gpu.fp32_flop_s
        seconds = max(op.bytes / self.gpu.hbm_bytes_s, op.mma_flops / peak) + op.launches * LAUNCH_S
        t = self.total
        t.bytes += op.bytes
        t.mma_flops += op.mma_flops
        t.launches += op.launches
        t.seconds += seconds


def _fused_sdpa(counter: OpCounter):
    """SDPA as the GPU runs it with a mask: one fused kernel, modeled as the flash loop plus the mask read."""
    def sdpa(q, k, v, attn_mask=None, **_):
        e = flash(*q.shape, counter.gpu, counter.eta)
        mask = _tensor_bytes(attn_mask) if attn_mask is not None else 0
        counter.total.bytes += e.bytes + mask
        counter.total.mma_flops += e.mma_flops
        counter.total.launches += e.launches
        counter.total.seconds += e.seconds + mask / counter.gpu.hbm_bytes_s
        return torch.empty(*q.shape[:-1], v.shape[-1], device=q.device, dtype=q.dtype)
    return sdpa


def _count_once(peer, batch, heads, n, d, gpu, eta) -> Estimate:
    import torch.nn.functional as F
    from vstar_kernels.bench.peers import default_spec

    q, k, v = (torch.empty(batch, n, heads, d, device="meta", dtype=torch.float16).transpose(1, 2) for _ in range(3))
    spec = default_spec(d)
    with torch.no_grad():
        peer.run(q, k, v, spec)  # warm the peers' caches, as the harness's warm-up call does
        counter = OpCounter(gpu, eta, (q, k, v))
        saved = F.scaled_dot_product_attention
        F.scaled_dot_product_attention = _fused_sdpa(counter)
        try:
            with counter:
                peer.run(q, k, v, spec)
        finally:
            F.scaled_dot_product_attention = saved
    counter.total.bound = "per-op"
    counter.total.peak_bytes = counter.peak
    return counter.total


def eager(peer, batch: int, heads: int, n: int, d: int, gpu: Gpu, eta: float) -> Estimate:
    """An eager peer's summed per-op roofline. Large calls are counted at batch b and 2b (b: about
    64 reference chunks of score elements) and extrapolated linearly to `batch`: the chunked
    references repeat the same ops per chunk, the others scale with the batch."""
    b = min(batch, max(1, math.ceil(64 * (1 << 22) / (heads * n * n))))
    one = _count_once(peer, b, heads, n, d, gpu, eta)
    if b == batch:
        return one
    two = _count_once(peer, 2 * b, heads, n, d, gpu, eta)
    f = (batch - b) / b
    lin = lambda x, y: x + (y - x) * f  # noqa: E731
    return Estimate(bytes=lin(one.bytes, two.bytes), mma_flops=lin(one.mma_flops, two.mma_flops),
                    launches=round(lin(one.launches, two.launches)), seconds=lin(one.seconds, two.seconds),
                    bound="per-op", peak_bytes=lin(one.peak_bytes, two.peak_bytes))


