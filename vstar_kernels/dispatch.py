"""Backends declare what they support; choosing one explains every rejection. `select(problem, name)` returns
the backend to run; an explicit name that cannot run the call raises `BackendUnavailableError` with the reasons;
"auto" takes the first that fits (CUDA tensors: the lean Triton forward where its frame layout and sm_90 allow it,
Triton, the CUDA C++ op; CPU tensors: cpu; then the reference).
"""

from __future__ import annotations

import torch

from . import _env
from ._problem import FLOAT_DTYPES, TarProblem, make_problem
from .cpu import cpu_forward
from .ops import _load, layout, tar_cuda
from .reference import reference_backward, reference_forward

# Stands for q's dtype in SUPPORTED_DELTA_DTYPES.
INPUT_DTYPE = "the input dtype"
KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this call; the message says why."""


def _dtype_name(dtype) -> str:
    return dtype if dtype == INPUT_DTYPE else str(dtype).replace("torch.", "")


def _one_of(names) -> str:
    names = list(names)
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " or " + names[-1]


class Backend:
    """A backend declares its capabilities as data (SUPPORTED_*, None: no limit), which `not_supported_reasons`
    checks; `state_reasons` / `backward_reason` cover what depends on its runtime state."""

    name = ""
    kernel = ""  # what a reason calls this backend
    # backward() is traceable PyTorch the op's autograd calls; kernels go through vstar::tar_attention_backward.
    traceable_backward = True

    SUPPORTED_DEVICES = None  # device types
    SUPPORTED_DTYPES = FLOAT_DTYPES
    SUPPORTED_MAX_HEAD_DIM = None  # of q/k and of v
    SUPPORTED_MAX_KEYS = None
    MAX_KEYS_HINT = ""  # why, and what to do instead
    SUPPORTS_BACKWARD = True
    SUPPORTED_DELTA_DTYPES = FLOAT_DTYPES  # INPUT_DTYPE: q's dtype
    SUPPORTS_FRAMES = True  # frame ids (tar_attention's `frames`)
    SUPPORTS_KEY_MASK = True

    def not_supported_reasons(self, problem: TarProblem) -> list:
        """Why this backend cannot run `problem` ([] if it can): its state, then each declared limit."""
        reasons = list(self.state_reasons(problem))
        dev = problem.device.type
        if self.SUPPORTED_DEVICES is not None and dev not in self.SUPPORTED_DEVICES:
            wanted = _one_of(d.upper() for d in self.SUPPORTED_DEVICES)
            reasons.append(f"{self.kernel} runs on {wanted} tensors, got {dev} tensors")
        if problem.dtype not in self.SUPPORTED_DTYPES:
            reasons.append(f"{_dtype_name(problem.dtype)} is not a kernel dtype "
                           f"({', '.join(map(_dtype_name, self.SUPPORTED_DTYPES))}); use backend='reference'")
        head_dim = max(problem.head_dim, problem.head_dim_v)
        if self.SUPPORTED_MAX_HEAD_DIM is not None and head_dim > self.SUPPORTED_MAX_HEAD_DIM:
            reasons.append(f"head dim {head_dim} > {self.SUPPORTED_MAX_HEAD_DIM}")
        if self.SUPPORTED_MAX_KEYS is not None and problem.nk > self.SUPPORTED_MAX_KEYS:
            reasons.append(f"Nk {problem.nk} > {self.SUPPORTED_MAX_KEYS}{self.MAX_KEYS_HINT}")
        delta_dtypes = [problem.dtype if d == INPUT_DTYPE else d for d in self.SUPPORTED_DELTA_DTYPES]
        if problem.delta is not None and problem.delta.dtype not in delta_dtypes:
            reasons.append(f"delta is {problem.delta.dtype}; pass it in "
                           f"{_one_of(map(_dtype_name, self.SUPPORTED_DELTA_DTYPES))}")
        if problem.frames_q is not None and not self.SUPPORTS_FRAMES:
            reasons.append(f"{self.kernel} cannot take frame ids (frames=) yet; use backend='reference'")
        if problem.key_mask is not None and not self.SUPPORTS_KEY_MASK:
            reasons.append(f"{self.kernel} cannot take a key mask (key_mask=) yet; use backend='reference'")
        if problem.needs_grad():
            backward_reason = self.backward_reason()
            if backward_reason:
                reasons.append(f"inputs require grad and {backward_reason}")
        return reasons

    def state_reasons(self, problem: TarProblem) -> list:
        """Reasons that come from the backend's runtime state rather than its declared limits."""
        return []

    def untraced_reasons(self, problem: TarProblem) -> list:
        """Reasons a traced call cannot give (a tensor's address, the ids' values), checked where the op runs."""
        return []

    def fits_auto(self, problem: TarProblem) -> list:
        """Why "auto" passes this backend over for `problem` ([] if it takes it): by default its reasons."""
        return self.not_supported_reasons(problem)

    def backward_reason(self) -> str:
        """Why this backend cannot differentiate a call, or ""."""
        return "" if self.SUPPORTS_BACKWARD else f"{self.kernel} has no backward"

    def forward(self, problem: TarProblem, stats=None, flags=None) -> torch.Tensor:
        """The output; `stats`: None, or the float32 tensor of `stats_shape` to fill for backward();
        `flags`: None, or (the Triton backends, `_op.SPECULATING`) the int32 (B*H,) counts the speculative one
        pass writes."""
        raise NotImplementedError

    def stats_shape(self, problem: TarProblem, needs_grad: bool) -> tuple:
        """Shape of the float32 statistics the forward saves for backward() (none by default)."""
        return (0,)

    def backward(self, problem: TarProblem, out, stats, grad_out, delta_grad: bool) -> tuple:
        """(dq, dk, dv, ddelta or None), contiguous; by default autograd on the reference definition."""
        return reference_backward(problem, grad_out, delta_grad)


class ReferenceBackend(Backend):
    name = "reference"  # the PyTorch definition (reference.py), on any device

    def forward(self, problem, stats=None, flags=None):
        out = reference_forward(problem)  # the op's output: not a view, which the caller could not update in place
        return out if out._base is None else out.clone()


class CpuBackend(Backend):
    """The definition's operations in place on cache-sized chunks (cpu.py); its backward is the definition's."""

    name, kernel = "cpu", "the CPU backend"
    SUPPORTED_DEVICES = ("cpu",)

    def forward(self, problem, stats=None, flags=None):
        return cpu_forward(problem)


class TritonBackend(Backend):
    name = "triton"
    kernel = "the Triton backend"
    traceable_backward = False

    SUPPORTED_DEVICES = ("cpu", "cuda")  # CPU under the interpreter only: see state_reasons
    SUPPORTED_DTYPES = KERNEL_DTYPES
    SUPPORTED_MAX_HEAD_DIM = 256
    SUPPORTED_DELTA_DTYPES = KERNEL_DTYPES

    def not_supported_reasons(self, problem):
        load_reason = _load.triton_state()[0]
        return [load_reason] if load_reason else super().not_supported_reasons(problem)

    def state_reasons(self, problem):
        reasons = []
        _, interpreting, requested = _load.triton_state()
        if interpreting != requested:
            reasons.append(
                "the Triton kernels were loaded with TRITON_INTERPRET="
                f"{int(interpreting)} but it is now {int(not interpreting)}; {_env.SET_BEFORE_PYTHON}, "
                "and leave it unchanged"
            )
        dev = problem.device.type  # (a device outside SUPPORTED_DEVICES has its reason from the base class)
        if interpreting and dev == "cuda":
            reasons.append(f"TRITON_INTERPRET=1 runs the kernels on CPU tensors, got {dev} tensors")
        elif not interpreting and dev == "cpu":
            reasons.append(f"{dev} tensors need TRITON_INTERPRET=1 (the Triton interpreter); "
                           "compiled kernels run on CUDA tensors")
        elif not interpreting and dev == "cuda" and not torch.cuda.is_available():
            reasons.append("CUDA is not available to torch")
        return reasons

    def backward_reason(self):
        return _load.triton_backward_reason()

    def forward(self, problem, stats=None, flags=None):
        return _load.triton_ops().module.tar_forward(problem, stats=stats, flags=flags)

    def stats_shape(self, problem, needs_grad):
        bh = problem.batch * problem.heads
        if needs_grad and (problem.frames_q is not None or problem.key_mask is not None):
            return (bh, problem.nq, layout.STATS_FIELDS)  # the tiled kernels run such calls at any length
        return layout.stats_shape(bh, problem.nq, problem.nk, problem.head_dim, problem.head_dim_v, needs_grad)

    def backward(self, problem, out, stats, grad_out, delta_grad):
        return _load.triton_backward_ops().module.tar_backward(problem, out, stats, grad_out, delta_grad)


def _lean_module():
    """ops.tar_fwd_lean, once `_load.triton_lean_reason()` says it loaded: imported, not read from the probe's cache,
    which torch.compile cannot trace (an explicit "triton-lean" is checked while tracing)."""
    from .ops import tar_fwd_lean

    return tar_fwd_lean


class TritonLeanBackend(TritonBackend):
    """The lean forward (ops/tar_fwd_lean.py): TAR with the regular frame-id layout of the video DiTs, tensor
    descriptors, one loop with a guessed max (speculate=True) or two loops, warp-specialized on sm_90. "auto"'s
    first choice on sm_90 where it fits (`fits_auto`): its GPU tests pass there, and it was the fastest form
    measured at Wan 2.1 480p, CogVideoX and LTX-Video (benchmarks/NOTES.md).
    Its backward is the Triton backend's, which reads the statistics it saves."""

    name = "triton-lean"
    kernel = "the lean Triton forward"
    SUPPORTED_MAX_HEAD_DIM = 128

    def not_supported_reasons(self, problem):
        """The Triton backend's reasons, then what the lean kernel assumes (its own words for a key mask or float32,
        which the Triton backend takes)."""
        reasons = super().not_supported_reasons(problem)
        unloaded = _load.triton_lean_reason()
        if unloaded:
            return reasons or [unloaded]
        lean = _lean_module()
        reasons += [r for r in lean.layout_reasons(problem) if r not in reasons]
        if not reasons and problem.device.type != "meta" and not torch.compiler.is_compiling():
            # the ids' values (read once per id tensor); traced or meta, the kernel's launch checks them
            if lean.common_layout(problem) is None:
                reasons.append("frames are not one regular layout (frame_ids(F, T, text_before=, text_after=)), the "
                               "same for queries and keys: use backend='triton'")
        return reasons

    def state_reasons(self, problem):
        reasons = super().state_reasons(problem)
        if not _load.triton_lean_reason() and not _lean_module().SUPPORTED:
            reasons.append(f"{self.kernel} needs a Triton with device-side tensor descriptors and warp "
                           f"specialization (3.4 or later), installed: {_env.triton_version()}")
        if problem.device.type == "cuda" and not reasons and torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability(problem.device)
            if major != 9:
                reasons.append(f"{self.kernel} is built for sm_90 (Hopper); compiled for sm_80 it spills "
                               f"(tools.perf static), and this GPU is sm_{major}{minor}: use backend='triton'")
        return reasons

    def untraced_reasons(self, problem):
        """What tracing left out of `not_supported_reasons` (its address check, the ids' layout)."""
        return self.not_supported_reasons(problem)

    def fits_auto(self, problem) -> list:
        """Why "auto" passes the lean forward over ([] if it takes it): what an explicit call needs, frame ids in
        the one regular layout it computes (read once per id tensor), and no torch.compile tracing (its checks
        read data pointers and ids: a traced call decides where the op runs, `AUTO_LEAN`). A call without frame
        ids or in float32 is passed over first, at no cost."""
        if problem.frames_q is None or problem.dtype not in (torch.float16, torch.bfloat16):
            return [f"{self.kernel} takes frame ids in float16 or bfloat16"]
        if torch.compiler.is_compiling():
            return [f"{self.kernel} is decided where the op runs, under torch.compile"]
        return self.not_supported_reasons(problem)

    def forward(self, problem, stats=None, flags=None):
        return _load.triton_lean_ops().module.lean_forward(problem, stats, flags=flags)


class CudaBackend(Backend):
    """The CUDA C++ operator of bindings/ (optional: built with VSTAR_BUILD_CUDA=1)."""

    name = "cuda"
    kernel = "the CUDA C++ kernel"

    SUPPORTED_DEVICES = ("cuda",)
    SUPPORTED_DTYPES = KERNEL_DTYPES
    # kMaxHeadDim and kMaxKeys in bindings/tar_params.h.
    SUPPORTED_MAX_HEAD_DIM = 256
    SUPPORTED_MAX_KEYS = 1024
    MAX_KEYS_HINT = (": the CUDA C++ kernel keeps whole score rows in shared memory; "
                     "use backend='triton' for longer sequences")
    SUPPORTS_BACKWARD = False
    SUPPORTED_DELTA_DTYPES = (torch.float32, INPUT_DTYPE)
    SUPPORTS_FRAMES = False
    SUPPORTS_KEY_MASK = False

    def state_reasons(self, problem):
        probe = tar_cuda.load()
        return [] if probe.ok else [probe.reason]

    def forward(self, problem, stats=None, flags=None):
        return tar_cuda.tar_forward(problem)


BACKENDS = {b.name: b for b in (TritonBackend(), TritonLeanBackend(), CudaBackend(), CpuBackend(), ReferenceBackend())}
BACKEND_NAMES = ("auto", *BACKENDS)
# "auto"'s choice for a traced call that the Triton kernels run and the lean forward might (frame ids, 16-bit):
# the trace cannot read the ids, nor run the lean forward's checks, so the op decides where it runs (`run_as`):
# the lean forward where it fits, else the Triton kernels, which save the same statistics and whose backward the
# lean forward's is
AUTO_LEAN = "auto:triton-lean"
# the order in which "auto" tries the backends, by device type
AUTO_ORDER = {"cuda": ("triton-lean", "triton", "cuda", "reference")}


def select(problem: TarProblem, name: str) -> Backend:
    if not isinstance(name, str) or name not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES}, got {name!r}")
    if name != "auto":
        reasons = BACKENDS[name].not_supported_reasons(problem)
        if reasons:
            raise BackendUnavailableError(f"backend={name!r} cannot run this call: " + "; ".join(reasons))
        return BACKENDS[name]
    candidates = AUTO_ORDER.get(problem.device.type, ("cpu", "reference"))
    rejected = []
    for cand in candidates:
        reasons = BACKENDS[cand].fits_auto(problem)
        if not reasons:
            return BACKENDS[cand]
        rejected.append(f"{cand}: " + "; ".join(reasons))
    raise BackendUnavailableError("no backend can run this call: " + " | ".join(rejected))


def op_backend(problem: TarProblem, name: str) -> str:
    """The backend name the op is given for `problem` and `name`: `select`'s, or, for "auto" in a trace where it
    takes the Triton kernels on a call the lean forward might take, `AUTO_LEAN`."""
    chosen = select(problem, name).name
    lean = name == "auto" and chosen == "triton" and problem.frames_q is not None and \
        problem.dtype in (torch.float16, torch.bfloat16) and torch.compiler.is_compiling()
    return AUTO_LEAN if lean else chosen


def run_as(problem: TarProblem, name: str) -> str:
    """The backend that runs a call the op was given `name` for: `name`, or for `AUTO_LEAN` what "auto" takes
    outside a trace, the lean forward where it fits (the ids' layout read here, where the op runs), else "triton"."""
    if name != AUTO_LEAN:
        return name
    return "triton" if BACKENDS["triton-lean"].fits_auto(problem) else "triton-lean"


def probe_problem(device, dtype=torch.float32, frames: bool = False) -> TarProblem:
    """A small plain call on `device` (with `frames`, 2 frames of 8 tokens): what `availability` and the benchmark
    ask the backends about."""
    t = torch.zeros(1, 1, 16, 16, device=device, dtype=dtype)
    ids = torch.arange(2, device=device, dtype=torch.int32).repeat_interleave(8) if frames else None
    return make_problem(t, t, t, sigma=1.0, strength=1.0, delta=None, causal=False, max_mode="row", scale=None,
                        frames=ids)


def availability(device) -> dict:
    """Backend name -> "" if it can run a small float32 call on `device` (the lean forward: float16 with frame ids),
    else why not (for `info`)."""
    plain, lean = probe_problem(device), probe_problem(device, dtype=torch.float16, frames=True)
    return {name: "; ".join(b.not_supported_reasons(lean if name == "triton-lean" else plain))
            for name, b in BACKENDS.items()}
