"""Shared test helpers: the checkout's root and a fresh shell's environment for subprocesses, the kernel
backends' declared dtypes, the per-dtype tolerances (the package's, vstar_kernels.bench.check), an independent
float64 evaluation, and the inputs, option grids and parametrization ids the kernel tests share."""

import collections
import math
import os
import pathlib
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import vstar_kernels as vk
from vstar_kernels.bench.check import GRAD_TOLERANCES, TOLERANCES
from vstar_kernels.dispatch import BACKENDS

from ._device import DEVICE

ROOT = pathlib.Path(__file__).resolve().parents[1]  # the checkout the suite runs from

# What an outer `make` (CI runs the suite as `make test`) passes to the commands it starts; with
# MAKELEVEL set, an inner make prints "Entering/Leaving directory" lines around its output.
MAKE_VARIABLES = ("MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES")


def interpreter_env(env):
    """`env` with tests/_site first on PYTHONPATH: a Python process started with it, and TRITON_INTERPRET=1 set
    from its start, runs the interpreter with the shim the test processes have (tests/_interpreter.py)."""
    return {**env, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT / "tests" / "_site"), env.get("PYTHONPATH")]))}


def clean_env(**extra):
    """This process's environment without TRITON_INTERPRET (nor an outer make's variables), as in a
    fresh shell; tiny CPU shapes: one thread."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET" and k not in MAKE_VARIABLES}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


DTYPE_IDS = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}
# The kernel backends' grids come from what they declare (dispatch.Backend.SUPPORTED_*).
TRITON, CUDA = BACKENDS["triton"], BACKENDS["cuda"]
DTYPES = list(TRITON.SUPPORTED_DTYPES)
CUDA_DTYPES = list(CUDA.SUPPORTED_DTYPES)


def dtype_id(dtype):
    return DTYPE_IDS[dtype]


def shape_id(shape):
    """Id of a (B, H, Nq, Nk, D, Dv) shape."""
    return "B{}H{}Nq{}Nk{}D{}Dv{}".format(*shape)


def opts_id(opts):
    """Id of a dict of tar_attention options."""
    return ",".join(f"{k}={v}" for k, v in opts.items()) or "default"


# Non-default options the kernel tests sweep: causal and the global max alone and together, other
# sigma/strength/scale values, a negative strength and sigma=inf (a constant dA).
OPTION_GRID = [
    dict(causal=True),
    dict(max_mode="global"),
    dict(max_mode="global", causal=True),
    dict(sigma=4.0, strength=2.5, scale=0.2),
    dict(strength=-1.0),
    dict(sigma=math.inf),
]


def make_qkv(B, H, nq, nk, d, dv, dtype, *, layout="bhnd", seed=0, device=DEVICE):
    """q/k/v drawn from a seeded CPU generator, in the requested memory layout on `device`, returned as
    (B, H, N, D) views: "bhnd" contiguous, "bnhd" diffusers' (B, N, H, D) projections transposed,
    "sliced" a slice of a wider head dim (non-unit row stride, offset)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def one(n, dim):
        if layout == "bnhd":
            return rand(B, n, H, dim).transpose(1, 2)
        if layout == "sliced":
            return rand(B, H, n, dim + 5)[..., 3:dim + 3]
        return rand(B, H, n, dim)

    return one(nq, d), one(nk, d), one(nk, dv)


# A custom delta in each shape tar_attention broadcasts to (B, H, Nq, Nk); "strided" is a transposed view.
DELTA_KINDS = ["nq_nk", "b_1_nq_nk", "h_nq_nk", "strided"]


def make_delta(kind, B, H, nq, nk, *, seed=2, dtype=torch.float32, device=DEVICE):
    """A uniform [0, 1) delta of one of DELTA_KINDS from a seeded CPU generator."""
    g = torch.Generator().manual_seed(seed)
    if kind == "strided":
        return torch.rand(nk, nq, generator=g).T.to(device=device, dtype=dtype)
    shape = {"nq_nk": (nq, nk), "b_1_nq_nk": (B, 1, nq, nk), "h_nq_nk": (H, nq, nk)}[kind]
    return torch.rand(*shape, generator=g).to(device=device, dtype=dtype)


def reference64(q, k, v, **opts):
    """The float64 reference on CPU for q, k, v and tensor options (delta) on any device."""
    dbl = {key: (val.double().cpu() if torch.is_tensor(val) else val) for key, val in opts.items()}
    return vk.tar_attention_reference(q.double().cpu(), k.double().cpu(), v.double().cpu(), **dbl)


def reference_grads(q, k, v, grad_out, delta=None, device="cpu", **opts):
    """float64 autograd gradients of the reference on `device`: (dq, dk, dv[, ddelta])."""
    leaves = [t.detach().to(device, torch.float64).requires_grad_() for t in (q, k, v)]
    d64 = None
    if delta is not None:
        d64 = delta.detach().to(device, torch.float64).requires_grad_()
    out = vk.tar_attention_reference(*leaves, delta=d64, **opts)
    return torch.autograd.grad(out, leaves + ([d64] if d64 is not None else []), grad_out.to(device, torch.float64))


def assert_close_to_reference(out, ref64, dtype=None):
    dtype = dtype or out.dtype
    atol, rtol = TOLERANCES[dtype]
    assert out.dtype == dtype
    assert not torch.isnan(out).any(), "output has NaN (an element was not written?)"
    torch.testing.assert_close(out.double(), ref64.double(), atol=atol, rtol=rtol)


def assert_grads_close(grads, refs, dtype, names=("dq", "dk", "dv", "ddelta")):
    """Each gradient against its float64 reference with GRAD_TOLERANCES[dtype]."""
    atol, rtol = GRAD_TOLERANCES[dtype]
    for name, g, ref in zip(names, grads, refs):
        assert g.shape == ref.shape, f"{name}: shape {tuple(g.shape)} != {tuple(ref.shape)}"
        assert not torch.isnan(g).any(), f"{name} has NaN (an element was not written?)"
        ref = ref.double()
        bound = atol * ref.abs().max().item() + rtol * ref.abs()
        err = (g.double() - ref).abs()
        worst = (err - bound).argmax()
        assert (err <= bound).all(), (f"{name}: error {err.flatten()[worst].item():.3g} > bound "
                                      f"{bound.flatten()[worst].item():.3g} at flat index {worst.item()}")


def naive_tar(q, k, v, *, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None):
    """Element-by-element float64 evaluation of docs/semantics.md for 4-D inputs.

    Written without the library's code so that the reference itself is checked.
    """
    q, k, v = q.double(), k.double(), v.double()
    B, H, nq, d = q.shape
    nk = k.shape[2]
    scale = d ** -0.5 if scale is None else scale
    out = torch.empty(B, H, nq, v.shape[-1], dtype=torch.float64)
    for b in range(B):
        for h in range(H):
            s = scale * q[b, h] @ k[b, h].T
            if causal:
                for i in range(nq):
                    for j in range(nk):
                        if j > i:
                            s[i, j] = -math.inf
            if max_mode == "row":
                m = s.max(dim=1, keepdim=True).values
            else:
                m = s.max()
            if delta is None:
                da = torch.tensor([[math.exp(-0.5 * ((j - i) / sigma) ** 2) for j in range(nk)]
                                   for i in range(nq)], dtype=torch.float64)
            else:
                da = delta.double().expand(B, H, nq, nk)[b, h]
            s2 = s + strength * m * da
            if causal:  # a masked entry takes no part, whatever its delta value
                s2 = s2.masked_fill(torch.ones(nq, nk, dtype=torch.bool).triu(1), -math.inf)
            out[b, h] = torch.softmax(s2, dim=1) @ v[b, h]
    return out


def rows_outside64(q, k, q_frames, k_frames, *, key_mask=None, scale=None):
    """(B, H, Nq) bool, element by element in float64: whether query row i's largest score scale q_i . k_j over
    the unmasked keys (key_mask (B, Nk), True = kept) is strictly larger than its largest over the keys of its
    own frame and the text (id -1), a max over no key being -inf. Written without the library's code."""
    q, k, q_frames, k_frames = q.double(), k.double(), q_frames.tolist(), k_frames.tolist()
    B, H, nq, d = q.shape
    scale = d ** -0.5 if scale is None else scale
    out = torch.zeros(B, H, nq, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for i in range(nq):
                full = inside = -math.inf
                for j in range(k.shape[2]):
                    if key_mask is not None and not key_mask[b, j]:
                        continue
                    s = scale * float(q[b, h, i] @ k[b, h, j])
                    full = max(full, s)
                    if k_frames[j] in (-1, q_frames[i]):
                        inside = max(inside, s)
                out[b, h, i] = full > inside
    return out


def saved_figures(monkeypatch):
    """A list that collects every matplotlib Figure saved from now on (to inspect what a plot drew)."""
    from matplotlib.figure import Figure

    saved, savefig = [], Figure.savefig

    def record(fig, *args, **kwargs):
        saved.append(fig)
        return savefig(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", record)
    return saved


class ValueReads:
    """Records what is read of frame-id values (`_problem.frame_value`'s `what`, wherever it is called from: a
    device synchronisation each on a GPU) while it is patched in (`monkeypatch`), in `reads`."""

    def __init__(self, monkeypatch):
        from vstar_kernels import _problem, cpu
        from vstar_kernels.ops import tar_fwd_lean

        self.reads, inner = [], _problem.frame_value

        def counted(ids, what, read):
            return inner(ids, what, lambda x: (self.reads.append(what), read(x))[1])
        for module in (_problem, cpu, tar_fwd_lean):
            monkeypatch.setattr(module, "frame_value", counted)

    def of_ids(self) -> list:
        """The reads that a GPU call makes (the cpu backend's tables of the ids, CPU tensors, left out)."""
        return [what for what in self.reads if not isinstance(what, tuple)]


class LargestAllocation(TorchDispatchMode):
    """Records the largest storage an op allocates (views of its inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


class PeakLive(TorchDispatchMode):
    """Records the most bytes the storages ops allocate hold at once (a storage counts until its last tensor
    that an op returned is freed; views of an op's inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self.size, self.refs = {}, collections.Counter()

    def _drop(self, ptr):
        self.refs[ptr] -= 1
        if not self.refs[ptr]:
            self.live -= self.size.pop(ptr)
            del self.refs[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in inputs:
                ptr = t.untyped_storage().data_ptr()
                if ptr not in self.size:
                    self.size[ptr] = t.untyped_storage().nbytes()
                    self.live += self.size[ptr]
                    self.peak = max(self.peak, self.live)
                self.refs[ptr] += 1
                weakref.finalize(t, self._drop, ptr)
        return out
