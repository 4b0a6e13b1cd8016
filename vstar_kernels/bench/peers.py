"""Every implementation the benchmark compares, behind one signature (benchmarks/NOTES.md,
"The implementations").

`peer.run(q, k, v, spec) -> out`: q, k, v are (B, H, N, D) views of (B, N, H, D) storage,
`spec` holds sigma, strength and the softmax scale; out is (B, H, N, Dv) in q's dtype.
`peer.why_not(device, dtype)` says why a peer cannot run at all here ("" when it can); a peer
that cannot run one shape raises `Unsupported`. Ours are the peers with a `backend`.
"""

from __future__ import annotations

import functools
import importlib
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

import vstar_kernels as vk

from .. import dispatch
from .._problem import make_problem
from ..ops._load import triton_ops
from ..reference import CHUNK_ELEMENTS, reference_forward
from ..regularization import gaussian_bias


class Unsupported(Exception):
    """This peer cannot run this call; the message says why."""


@dataclass(frozen=True)
class TarSpec:
    sigma: float = 1.0
    strength: float = 1.0
    scale: float = 0.125


INTERPRETER = "vstar_triton_interpreter"
# The status of a run that was checked and not timed (a correctness run), before what it was checked against.
CHECKED = "checked: "


@dataclass(frozen=True)
class Peer:
    name: str
    run: Callable
    why_not: Callable = lambda device, dtype: ""  # noqa: E731
    plain: bool = False   # computes attention without TAR
    backend: str = ""     # ours: the tar_attention backend it asks for ("" for the other peers)

    def label(self, device: torch.device) -> str:
        """The CSV impl name; the Triton kernels on CPU tensors run in the interpreter and say so."""
        return INTERPRETER if self.correctness_only(device) else self.name

    def correctness_only(self, device: torch.device) -> bool:
        """Whether this peer is checked but not timed on `device`: the Triton kernels on CPU
        tensors run in the Triton interpreter, whose speed is not the kernels'."""
        return self.backend == "triton" and device.type == "cpu"

    def backend_run(self, q, k, v, spec) -> str:
        """The backend tar_attention runs for this call ("" for a peer that is not ours)."""
        return dispatch.select(_problem(q, k, v, spec), self.backend).name if self.backend else ""


def _problem(q, k, v, spec):
    return make_problem(q, k, v, sigma=spec.sigma, strength=spec.strength, delta=None, causal=False,
                        max_mode="row", scale=spec.scale)


@functools.lru_cache(maxsize=32)
def _gaussian(n: int, sigma: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    return gaussian_bias(n, n, sigma, device=device, dtype=dtype)


def _vstar(backend):
    def run(q, k, v, spec):  # BackendUnavailableError: a status of "unsupported: ..." (harness.classify)
        return vk.tar_attention(q, k, v, sigma=spec.sigma, strength=spec.strength, scale=spec.scale, backend=backend)
    return run


def _backend_why_not(name):
    def why_not(device, dtype):
        return "; ".join(dispatch.BACKENDS[name].not_supported_reasons(dispatch.probe_problem(device, dtype)))
    return why_not


def reference_eager(q, k, v, spec):
    return vk.tar_attention_reference(q, k, v, sigma=spec.sigma, strength=spec.strength, scale=spec.scale)


def reference_materialized(q, k, v, spec):
    """The reference's out-of-place path, the one autograd differentiates."""
    return reference_forward(_problem(q, k, v, spec))


def tar_chunk(q, k, v, dA, scale: float, strength: float):
    """The reference's materializing formula on (b, H, N, D) in float32: S, row max, S', softmax, P V."""
    s = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    s = s + strength * s.amax(dim=-1, keepdim=True) * dA
    return torch.matmul(torch.softmax(s, dim=-1), v.float()).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    """torch.compile of `fn`, made once, on first use."""
    return torch.compile(fn)


def reference_compiled(q, k, v, spec):
    """torch.compile of the reference formula, chunked over the batch as the reference chunks it."""
    B, H, n, _ = q.shape
    dA = _gaussian(n, spec.sigma, str(q.device), torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, H * n * k.shape[2]))
    fn = _compiled(tar_chunk)
    return torch.cat([fn(q[b:b + step], k[b:b + step], v[b:b + step], dA, spec.scale, spec.strength)
                      for b in range(0, B, step)])


def _compile_why_not(device, dtype):
    needs = device.type == "cuda" and not triton_ops().ok
    return f"torch.compile on CUDA needs Triton: {triton_ops().reason}" if needs else ""


def tar_bias(q, k, spec):
    """strength * m_i * dA_ij as a (B, H, N, N) tensor in q's dtype; m from a bmm in q's dtype."""
    m = (torch.matmul(q, k.transpose(-1, -2)) * spec.scale).amax(dim=-1, keepdim=True)
    return (spec.strength * m) * _gaussian(q.shape[2], spec.sigma, str(q.device), q.dtype)


def sdpa_bias(q, k, v, spec):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=tar_bias(q, k, spec), scale=spec.scale)


def xformers_bias(q, k, v, spec):
    import xformers.ops as xops

    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                          attn_bias=tar_bias(q, k, spec), scale=spec.scale)
    return out.transpose(1, 2)


def _xformers_why_not(device, dtype):
    try:
        importlib.import_module("xformers.ops")
    except Exception as exc:
        return f"xformers is not installed ({type(exc).__name__}: {exc})"
    return ""


def flex_tar_pass(flex, q, k, v, row_max, spec):
    """The second pass: a score_mod adding strength * m_i * dA_ij, with m (B, H, Nq) from the first."""
    coef = -0.5 / spec.sigma ** 2
    strength = spec.strength

    def score_mod(score, b, h, q_idx, kv_idx):
        dist = (kv_idx - q_idx).to(torch.float32)
        return score + strength * row_max[b, h, q_idx] * torch.exp(coef * dist * dist)

    return flex(q, k, v, score_mod=score_mod, scale=spec.scale)


def _flex_two_pass(q, k, v, spec):
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    _, aux = flex_attention(q, k, v, scale=spec.scale, return_aux=AuxRequest(max_scores=True))
    return flex_tar_pass(flex_attention, q, k, v, aux.max_scores, spec)


def flex_two_pass(q, k, v, spec):
    """FlexAttention, compiled: pass 1 returns the row max (max_scores), pass 2 adds the bias in a score_mod."""
    return _compiled(_flex_two_pass)(q, k, v, spec)


@functools.lru_cache(maxsize=None)
def _flex_why_not(device_type: str):
    try:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention
    except ImportError as exc:
        return f"torch {torch.__version__} has no flex_attention AuxRequest ({exc})"
    if device_type == "cuda" and not triton_ops().ok:
        return f"compiled flex_attention needs Triton: {triton_ops().reason}"
    # Ask torch (eagerly, on a tiny call) whether it returns the row max on this device.
    t = torch.zeros(1, 1, 16, 16, device=device_type)
    try:
        flex_attention(t, t, t, return_aux=AuxRequest(max_scores=True))
    except NotImplementedError as exc:
        return f"flex_attention in torch {torch.__version__} cannot return the row max here: {exc}"
    return ""


def sdpa_plain(q, k, v, spec):
    """SDPA without TAR, flash backend only: what TAR should cost nothing over."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, scale=spec.scale)
    except RuntimeError as exc:
        if "No available kernel" in str(exc):
            raise Unsupported(f"SDPA's flash backend cannot run this call: {str(exc).splitlines()[0]}") from None
        raise


PEERS = {p.name: p for p in (
    Peer("vstar_triton", _vstar("triton"), _backend_why_not("triton"), backend="triton"),
    Peer("vstar_auto", _vstar("auto"), backend="auto"),
    Peer("vstar_cuda", _vstar("cuda"), _backend_why_not("cuda"), backend="cuda"),
    Peer("reference_eager", reference_eager),
    Peer("reference_materialized", reference_materialized),
    Peer("reference_compiled", reference_compiled, _compile_why_not),
    Peer("sdpa_bias", sdpa_bias),
    Peer("flex_two_pass", flex_two_pass, lambda device, dtype: _flex_why_not(device.type)),
    Peer("xformers_bias", xformers_bias, _xformers_why_not),
    Peer("sdpa_plain", sdpa_plain, plain=True),
)}

# Ours that are timed, in the order the speed comparison takes its reference from: on CUDA the Triton
# kernel; on CPU the default path (vstar_triton is the interpreter's correctness run there).
TIMED_OURS = ("vstar_triton", "vstar_auto", "vstar_cuda")
# Every implementation of ours: an error of any of them is a failure of this project.
OURS = (*TIMED_OURS, INTERPRETER)


def default_impls(device: torch.device) -> list:
    """The peers a sweep runs unless --impls says otherwise: all of them, but on CUDA not vstar_auto,
    which runs the Triton kernel that vstar_triton times."""
    return [name for name in PEERS if not (name == "vstar_auto" and device.type == "cuda")]


def default_spec(head_dim: int) -> TarSpec:
    """TAR as VSTAR applies it at the finest level: sigma 1, strength 1, scale D^-1/2."""
    return TarSpec(sigma=1.0, strength=1.0, scale=1.0 / math.sqrt(head_dim))
