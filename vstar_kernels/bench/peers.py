"""Every implementation the benchmark compares, behind one signature (benchmarks/NOTES.md, "The implementations").

`peer.run(q, k, v, spec) -> out`: (B, H, N, D) views of (B, N, H, D) storage in, (B, H, N, Dv) in q's dtype out.
`peer.why_not(device, dtype)`: why it cannot run here ("" when it can); a shape it cannot run raises
`Unsupported`. Ours are `vstar_<backend>`, tar_attention with that backend.
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
from ..reference import CHUNK_ELEMENTS


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


def checked_only(against: str) -> str:
    """The status of a correctness run in the Triton interpreter, checked against `against`."""
    return (f"{CHECKED}matches {against} in the Triton interpreter; a correctness run, not timed "
            "(the interpreter's speed is not the kernels')")


def _nothing(*args) -> str:
    return ""


@dataclass(frozen=True)
class Peer:
    name: str
    run: Callable
    why_not: Callable = _nothing  # (device, dtype) -> why it cannot run here ("" when it can)
    plain: bool = False           # computes attention without TAR
    ran: Callable = _nothing      # (q, k, v, spec) -> what runs for this call (ours: tar_attention's backend)

    def label(self, device: torch.device) -> str:
        """The CSV impl name (INTERPRETER for the Triton kernels on CPU tensors)."""
        return INTERPRETER if self.correctness_only(device) else self.name

    def correctness_only(self, device: torch.device) -> bool:
        """Checked but not timed on `device`: the Triton kernels in the interpreter, on CPU tensors."""
        return self.name == "vstar_triton" and device.type == "cpu"


def _problem(q, k, v, spec):
    return make_problem(q, k, v, sigma=spec.sigma, strength=spec.strength, delta=None, causal=False,
                        max_mode="row", scale=spec.scale)


def _ours(backend: str) -> Peer:
    """vstar_<backend>: tar_attention(backend=...), a BackendUnavailableError a status of "unsupported: ..."."""
    def run(q, k, v, spec):
        return vk.tar_attention(q, k, v, sigma=spec.sigma, strength=spec.strength, scale=spec.scale, backend=backend)

    def why_not(device, dtype):
        if backend == "auto":
            return ""
        return "; ".join(dispatch.BACKENDS[backend].not_supported_reasons(dispatch.probe_problem(device, dtype)))

    return Peer(f"vstar_{backend}", run, why_not, ran=lambda q, k, v, spec: dispatch.select(_problem(q, k, v, spec),
                                                                                           backend).name)


@functools.lru_cache(maxsize=32)
def gaussian(n: int, sigma: float, device: str, dtype: torch.dtype) -> torch.Tensor:
    """VSTAR's (N, N) Gaussian dA, made once per (n, sigma, device, dtype)."""
    return vk.gaussian_toeplitz(n, sigma, device=device, dtype=dtype)


def tar_formula(q, k, v, dA, scale: float, strength: float):
    """The definition on whole (b, H, N, D) tensors in their dtype (strength 0: plain attention)."""
    s = torch.matmul(q, k.transpose(-1, -2)) * scale
    s = s + strength * s.amax(dim=-1, keepdim=True) * dA
    return torch.matmul(torch.softmax(s, dim=-1), v)


def float_formula(q, k, v, dA, scale: float, strength: float):
    """tar_formula in float32 (the reference's precision), cast back to q's dtype."""
    return tar_formula(q.float(), k.float(), v.float(), dA, scale, strength).to(q.dtype)


@functools.lru_cache(maxsize=None)
def _compiled(fn):
    """torch.compile of `fn`, made once, on first use."""
    return torch.compile(fn)


def reference_compiled(q, k, v, spec):
    """torch.compile of the reference formula, chunked over the batch as the reference chunks it."""
    B, H, n, _ = q.shape
    dA = gaussian(n, spec.sigma, str(q.device), torch.float32)
    step = max(1, CHUNK_ELEMENTS // max(1, H * n * k.shape[2]))
    fn = _compiled(float_formula)
    return torch.cat([fn(q[b:b + step], k[b:b + step], v[b:b + step], dA, spec.scale, spec.strength)
                      for b in range(0, B, step)])


def _compile_why_not(device, dtype, what="torch.compile"):
    needs = device.type == "cuda" and not triton_ops().ok
    return f"{what} on CUDA needs Triton: {triton_ops().reason}" if needs else ""


def tar_bias(q, k, spec):
    """strength * m_i * dA_ij as a (B, H, N, N) tensor in q's dtype; m from a bmm in q's dtype."""
    m = (torch.matmul(q, k.transpose(-1, -2)) * spec.scale).amax(dim=-1, keepdim=True)
    return (spec.strength * m) * gaussian(q.shape[2], spec.sigma, str(q.device), q.dtype)


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
    """FlexAttention: pass 1 returns the row max (max_scores), pass 2 adds the bias in a score_mod."""
    from torch.nn.attention.flex_attention import AuxRequest, flex_attention

    _, aux = flex_attention(q, k, v, scale=spec.scale, return_aux=AuxRequest(max_scores=True))
    return flex_tar_pass(flex_attention, q, k, v, aux.max_scores, spec)


@functools.lru_cache(maxsize=None)
def _flex_why_not(device_type: str):
    try:
        from torch.nn.attention.flex_attention import AuxRequest, flex_attention
    except ImportError as exc:
        return f"torch {torch.__version__} has no flex_attention AuxRequest ({exc})"
    if why := _compile_why_not(torch.device(device_type), None, "compiled flex_attention"):
        return why
    # Ask torch (eagerly, on a tiny call) whether it returns the row max on this device.
    t = torch.zeros(1, 1, 16, 16, device=device_type)
    try:
        flex_attention(t, t, t, return_aux=AuxRequest(max_scores=True))
    except NotImplementedError as exc:
        return f"flex_attention in torch {torch.__version__} cannot return the row max here: {exc}"
    return ""


# What sdpa_floor is, by the SDPA backend it ran (its rows' backend column), in tables and plots.
FLOOR_LABELS = {"cudnn": "FA3-class floor (cuDNN SDPA)", "flash": "FA2-class (flash SDPA)"}


def floor_backend(device: torch.device) -> str:
    """The SDPA backend of the fastest plain attention on this GPU: cuDNN on Hopper (FA3 class), else flash."""
    return "cudnn" if torch.cuda.get_device_capability(device) == (9, 0) else "flash"


def sdpa_only(backend: str, q, k, v, spec):
    """Plain SDPA restricted to one of its backends ("flash" or "cudnn"); Unsupported when it cannot run the call."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    chosen = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION}[backend]
    try:
        with sdpa_kernel([chosen]):
            return F.scaled_dot_product_attention(q, k, v, scale=spec.scale)
    except RuntimeError as exc:
        if any(no in str(exc) for no in ("No available kernel", "No viable backend")):  # CUDA's, CPU's
            raise Unsupported(f"SDPA's {backend} backend cannot run this call: {str(exc).splitlines()[0]}") from None
        raise


def _floor_why_not(device, dtype):
    if device.type != "cuda":
        return f"the FA3-class floor is a GPU peer (cuDNN or flash SDPA on CUDA), there is none on {device.type}"
    if dtype not in (torch.float16, torch.bfloat16):
        return f"cuDNN and flash SDPA take fp16 and bf16, not {str(dtype).replace('torch.', '')}"
    return ""


# tar_attention's backends timed as ours, in the order the speed comparison takes its reference from: on
# CUDA the Triton kernel; on CPU the default path (vstar_triton is the interpreter's correctness run there).
OURS_BACKENDS = ("triton", "auto", "cuda")
PEERS = {p.name: p for p in (
    *map(_ours, OURS_BACKENDS),
    Peer("reference_eager", lambda q, k, v, spec: vk.tar_attention_reference(
        q, k, v, sigma=spec.sigma, strength=spec.strength, scale=spec.scale)),
    Peer("reference_compiled", reference_compiled, _compile_why_not),
    Peer("sdpa_bias", lambda q, k, v, spec: F.scaled_dot_product_attention(q, k, v, attn_mask=tar_bias(q, k, spec),
                                                                           scale=spec.scale)),
    Peer("flex_two_pass", lambda q, k, v, spec: _compiled(_flex_two_pass)(q, k, v, spec),
         lambda device, dtype: _flex_why_not(device.type)),
    Peer("xformers_bias", xformers_bias, _xformers_why_not),
    Peer("sdpa_plain", functools.partial(sdpa_only, "flash"), plain=True),
    Peer("sdpa_floor", lambda q, k, v, spec: sdpa_only(floor_backend(q.device), q, k, v, spec), _floor_why_not,
         plain=True, ran=lambda q, k, v, spec: floor_backend(q.device)),
)}
TIMED_OURS = tuple(f"vstar_{b}" for b in OURS_BACKENDS)
# Every implementation of ours: an error of any of them is a failure of this project.
OURS = (*TIMED_OURS, INTERPRETER)
# what `bench --backward` times (bench/backward.py)
BACKWARD_IMPLS = ("vstar_triton", "vstar_reference", "sdpa")


def default_impls(device: torch.device) -> list:
    """The peers a sweep runs by default: all, but on CUDA not vstar_auto (the kernel vstar_triton times)."""
    return [name for name in PEERS if not (name == "vstar_auto" and device.type == "cuda")]


def default_spec(head_dim: int) -> TarSpec:
    """TAR as VSTAR applies it at the finest level: sigma 1, strength 1, scale D^-1/2."""
    return TarSpec(sigma=1.0, strength=1.0, scale=1.0 / math.sqrt(head_dim))
