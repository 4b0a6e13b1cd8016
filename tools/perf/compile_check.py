"""Compile the Triton kernels for NVIDIA GPUs on a machine without one.

Every launch a call would make is recorded (the autotuned kernels are swapped for recorders),
then compiled ahead of time for each autotune config that survives pruning, through Triton's
own compiler and the ptxas it ships with. Each launch is specialized for its argument values
exactly as `JITFunction.run` does on a GPU (Triton's own binder): integers equal to 1 become
constants, pointers whose address and integers whose value are divisible by 16 get
`tt.divisibility` hints, None is a constexpr. The recorded tensors are real (CPU) allocations,
so their addresses are aligned as a GPU allocation's are. No GPU and no CUDA driver are needed, so CPU CI
catches what the interpreter cannot: code the GPU compiler rejects (dot shapes, layouts,
types), and the registers, spills and shared memory of each config.

Run it in a process without TRITON_INTERPRET=1 (the kernels must be JIT functions):

    python -m tools.perf compile-check [--arch 90] [--all-configs]
"""

from __future__ import annotations

import argparse
import itertools
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass, field

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource, make_backend
from triton.runtime.jit import create_function_from_signature
from vstar_kernels._problem import make_problem, speculates
from vstar_kernels.ops.launch import targeting
from vstar_kernels.ops._load import triton_backward_ops, triton_lean_ops, triton_ops

_TORCH_TO_TRITON = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


@dataclass
class Launch:
    kernel: object  # an Autotuner, or a plain jit function
    args: tuple
    kwargs: dict
    # A plain jit launch that runs the config another launch was tuned to (the tiled backward's
    # dK/dV pass runs the dQ pass's): that launch's pruned configs, compiled as it is.
    tuned_with: list | None = None
    all_configs: bool = False  # compile every pruned config, whatever `check` is asked


@dataclass
class Compiled:
    name: str
    case: str
    config: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    options: dict = field(repr=False)  # the compile options: num_warps, num_stages, ...
    constants: dict = field(repr=False)  # the constexpr values, config included, by name
    cubin: bytes = field(repr=False)
    # warp specialization: the warps the launch runs (num_warps plus the partitions'), and the partitions
    total_warps: int = 0
    partitions: int = 0


class _Recorder:
    """Stands in for a kernel: `rec[grid](*args, **kwargs)` records the launch. For an autotuned
    kernel it also sets `best_config` to the first config that survives pruning, as a launcher
    reading the tuner's choice (the tiled backward's dK/dV pass) expects; a recorder that
    `follows` such a tuner records its launches with the tuner's pruned configs."""

    def __init__(self, kernel, sink, follows=None):
        self.kernel, self.sink, self.follows = kernel, sink, follows
        self.pruned = None

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            tuned_with = self.follows.pruned if self.follows is not None else None
            self.sink.append(Launch(self.kernel, args, kwargs, tuned_with))
            if hasattr(self.kernel, "configs"):
                self.pruned = pruned_configs(self.kernel, args, kwargs)
                self.best_config = self.pruned[0]
        return launch


def pruned_configs(tuner, args, kwargs) -> list:
    named = dict(zip(tuner.arg_names, args))
    configs = tuner.early_config_prune(tuner.configs, named, **kwargs) if tuner.early_config_prune \
        else tuner.configs
    if not configs:
        raise RuntimeError(f"{tuner.fn.__name__}: every autotune config was pruned")
    return configs


def _modules():
    fwd, bwd, lean = triton_ops(), triton_backward_ops(), triton_lean_ops()
    for probe in (fwd, bwd, lean):
        if not probe.ok:
            raise RuntimeError(probe.reason)
    if fwd.module.INTERPRETING:
        raise RuntimeError("the kernels were loaded for the interpreter: run without TRITON_INTERPRET=1")
    return fwd.module, bwd.module, lean.module


def record(fn) -> list:
    """The kernel launches `fn()` makes, with the kernels swapped for recorders (nothing runs)."""
    fwd, bwd, lean = _modules()
    launches = []
    kernels = ("_packed", "_tiled_row_max", "_tiled", "_tiled_speculative", "_block_list", "_list", "_redo", "_dq",
               "_dkdv")
    saved = {(m, name): getattr(m, name) for m in (fwd, bwd) for name in kernels if hasattr(m, name)}
    lean_kernels = dict(lean._lean)  # the lean forward's autotuners, by warp specialization
    try:
        for (m, name), kernel in saved.items():
            setattr(m, name, _Recorder(kernel, launches))
        lean._lean.update({ws: _Recorder(kernel, launches) for ws, kernel in lean_kernels.items()})
        bwd._dkdv.follows = bwd._dq  # the dK/dV pass runs the dQ pass's tuned config
        fwd._redo.follows = fwd._tiled_speculative  # and the redo the speculative forward's
        fn()
    finally:
        for (m, name), kernel in saved.items():
            setattr(m, name, kernel)
        lean._lean.update(lean_kernels)
    return launches


def specialize(jit_fn, args, kwargs: dict, arch: int) -> tuple:
    """(ASTSource, options) for launching `jit_fn(*args, **kwargs)` (kwargs: constexprs and
    compile options such as num_warps), built by the binder `JITFunction.run` uses, for sm_`arch`."""
    backend = make_backend(GPUTarget("cuda", arch, 32))
    binder = create_function_from_signature(jit_fn.signature, jit_fn.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = jit_fn._pack_args(backend, kwargs, bound, specialization, options)
    return ASTSource(jit_fn, signature, constexprs, attrs), options.__dict__


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def _dump(tool: str, flags: list, cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool(tool), *flags, f.name], capture_output=True, text=True, check=True).stdout


def disassemble(cubin: bytes) -> str:
    """The SASS of a cubin, by the nvdisasm Triton ships. Without its dataflow analysis (-ndf), which only labels
    the targets of jumps through the branch stack: the listing of each of our kernels for sm_80 and sm_90, the
    warp-specialized ones included, is the same with it (84 compared), in half the time (about 0.5 s a kernel)."""
    return _dump("nvdisasm", ["-c", "-ndf"], cubin)


# a local store (STL) and its modifiers; its width: 32 bits, or the one width modifier it carries
_LOCAL_STORE = re.compile(r"\bSTL((?:\.\w+)*)\s")
_STORE_BYTES = {"U8": 1, "S8": 1, "U16": 2, "S16": 2, "64": 8, "128": 16}


def _resources(cubin: bytes) -> tuple:
    """(registers, spill bytes) of a cubin: the registers cuobjdump reports, and the bytes its local stores
    write (`spill_store_bytes`). A stack frame no instruction stores to is not a spill: ptxas keeps 8 bytes
    for an unused local array in the PTX (the sm_90 dQ pass at head dim 80)."""
    text = _dump("cuobjdump", ["--dump-resource-usage"], cubin)
    field = lambda key: int(re.search(rf"{key}:(\d+)", text).group(1))  # noqa: E731
    if not field("STACK") + field("LOCAL"):  # no frame: no local store to look for
        return field("REG"), 0
    return field("REG"), spill_store_bytes(disassemble(cubin))


def spill_store_bytes(sass: str) -> int:
    """The bytes the local stores (STL) of a SASS listing write, each instruction counted once, statically: what
    ptxas -v reports as spill stores while the kernel uses no local array (its stores would count here too; our
    kernels have none). A modifier this does not know is an error, not a guess at its width."""
    total = 0
    for m in _LOCAL_STORE.finditer(sass):
        mods = m.group(1).split(".")[1:]
        unknown = [x for x in mods if x not in _STORE_BYTES]
        if unknown:
            raise ValueError(f"a local store with modifiers spill_store_bytes does not know, {unknown}: "
                             f"{m.group(0).strip()!r}")
        total += sum(_STORE_BYTES[x] for x in mods) or 4
    return total


def config_text(config) -> str:
    return " ".join([*(f"{k}={v}" for k, v in config.kwargs.items()), f"warps={config.num_warps}",
                     f"stages={config.num_stages}", *([f"maxnreg={config.maxnreg}"] if config.maxnreg else [])])


def compile_launch(launch: Launch, arch: int, all_configs: bool, case: str, first_only: bool = False) -> list:
    """Compile one recorded launch: an autotuned kernel (or a launch that runs another's tuned
    config) for each pruned config, first and last unless all_configs (the first alone with
    first_only); any other plain jit kernel with the options its launch named."""
    kernel = launch.kernel
    jit_fn = kernel.fn if hasattr(kernel, "configs") else kernel
    configs = pruned_configs(kernel, launch.args, launch.kwargs) if hasattr(kernel, "configs") else launch.tuned_with
    if configs is not None:
        if not (all_configs or launch.all_configs):
            configs = configs[:1] if first_only else configs[:1] + configs[1:][-1:]
        runs = [(config, {**launch.kwargs, **config.all_kwargs()}) for config in configs]
    else:
        options = {k: launch.kwargs[k] for k in ("num_warps", "num_stages") if k in launch.kwargs}
        runs = [(triton.Config({}, **options), launch.kwargs)]
    results = []
    for config, kwargs in runs:
        src, options = specialize(jit_fn, launch.args, kwargs, arch)
        try:
            compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
        except Exception as exc:
            raise RuntimeError(f"{jit_fn.__name__} [{case}] with {config} for sm_{arch} failed to compile: "
                               f"{type(exc).__name__}: {exc}") from exc
        regs, spills = _resources(compiled.asm["cubin"])
        constants = {jit_fn.arg_names[path[0]]: value for path, value in src.constants.items() if len(path) == 1}
        results.append(Compiled(jit_fn.__name__, case, config_text(config), regs, spills, compiled.metadata.shared,
                                options, constants, compiled.asm["cubin"], compiled.metadata.num_warps,
                                len(re.findall(r"^\s*partition\d+\(", compiled.asm["ttgir"], re.M))))
    return results


# (B, H, Nq, Nk, D, Dv) covering both layouts and the head-dim regimes (<= 128, > 128)
SHAPES = [(64, 4, 16, 16, 40, 40), (64, 4, 64, 64, 80, 80), (8, 2, 128, 128, 128, 128), (8, 2, 24, 24, 160, 160),
          (2, 2, 300, 300, 64, 64), (2, 2, 200, 200, 256, 256)]
OPTIONS = [dict(), dict(causal=True, max_mode="global"), dict(delta=True), dict(frames=True)]
FULL = list(itertools.product((torch.float16, torch.bfloat16, torch.float32), SHAPES, OPTIONS))
# The CI subset: forward and backward in fp16 over both layouts, both head-dim regimes and every
# option; the bf16 and fp32 (tf32x3 dot) forwards once per layout.
QUICK = list(itertools.product((torch.float16,), (SHAPES[0], SHAPES[3], SHAPES[4]), OPTIONS))
QUICK_FORWARD_ONLY = [(torch.bfloat16, SHAPES[0], OPTIONS[0]), (torch.bfloat16, SHAPES[4], OPTIONS[1]),
                      (torch.float32, SHAPES[0], OPTIONS[0]), (torch.float32, SHAPES[4], OPTIONS[1])]


FRAMES_PER_CASE = 4


def cases(combos=FULL, backward=True):
    """(name, thunk) pairs whose launches cover the forward (and backward) kernels for each
    (dtype, shape, options) combination."""
    fwd, bwd, lean = _modules()
    for dtype, shape, opts in combos:
        B, H, nq, nk, d, dv = shape
        q = torch.empty(B, nq, H, d, dtype=dtype).transpose(1, 2)
        k = torch.empty(B, nk, H, d, dtype=dtype).transpose(1, 2)
        v = torch.empty(B, nk, H, dv, dtype=dtype).transpose(1, 2)
        opts = dict(opts)
        delta = torch.empty(nq, nk, dtype=dtype) if opts.pop("delta", False) else None
        # frame ids: FRAMES_PER_CASE latent frames (the tiled kernels at any length)
        frames = torch.arange(nq, dtype=torch.int32) * FRAMES_PER_CASE // nq if opts.pop("frames", False) else None
        problem = make_problem(q, k, v, sigma=1.0, strength=1.0, delta=delta, causal=opts.get("causal", False),
                               max_mode=opts.get("max_mode", "row"), scale=None, frames=frames)
        lean_only = opts.pop("lean", False)  # the lean forward alone (frame ids of a regular layout)
        name = (f"{_TORCH_TO_TRITON[dtype]} B{B}H{H}Nq{nq}Nk{nk}D{d}Dv{dv} {opts or ''}"
                f"{' delta' if delta is not None else ''}{' frames' if frames is not None else ''}")
        if lean_only:
            yield name + " lean", (lambda p=problem: lean.lean_forward(p))
            yield name + " lean speculative", (lambda p=problem: lean.lean_forward(  # its listing and redo
                p, flags=torch.zeros(p.batch * p.heads, dtype=torch.int32)))
            continue
        yield name, (lambda p=problem: fwd.tar_forward(p))
        if speculates(problem):  # the speculative one pass and its redo (speculate=True, the default)
            yield name + " speculative", (lambda p=problem: fwd.tar_forward(
                p, flags=torch.zeros(p.batch * p.heads, dtype=torch.int32)))
        if backward:
            stats = torch.empty(_layout_stats(problem), dtype=torch.float32)
            out = torch.empty(problem.output_shape(), dtype=dtype)

            def run_bwd(p=problem, s=stats, o=out):
                fwd.tar_forward(p, stats=s if s.numel() else None)
                bwd.tar_backward(p, o, s, torch.empty_like(o), delta_grad=p.delta is not None)

            yield name + " +bwd", run_bwd


def _layout_stats(problem):
    from vstar_kernels.dispatch import BACKENDS

    return BACKENDS["triton"].stats_shape(problem, True)


def launch_key(launch: Launch, arch: int) -> tuple:
    """What makes two launches one compiled kernel: the function, its specialized signature and
    attributes, the constexprs and the warps and stages (the first pruned config's, for an
    autotuned kernel)."""
    kernel, kwargs = launch.kernel, launch.kwargs
    if hasattr(kernel, "configs"):
        kwargs = {**kwargs, **pruned_configs(kernel, launch.args, kwargs)[0].all_kwargs()}
        kernel = kernel.fn
    src, options = specialize(kernel, launch.args, kwargs, arch)
    return (kernel.__name__, str(src.signature), str(src.attrs), str(src.constants), options["num_warps"],
            options["num_stages"])


def check(arch: int = 90, all_configs: bool = False, report=None, combos=FULL, backward=True,
          expand=lambda launch: [launch], select=None, ends_once: bool = False) -> list:
    """Compile every distinct launch of `cases(combos, backward)` (each recorded launch replaced by
    the launches `expand(launch)` returns; with `select`, of the cases whose name it accepts);
    `report(row)` is called as each compiles. With ends_once, a kernel's first and last configs
    compile once per dtype and shape (its first case's launch), its other launches there (the
    options' constexpr variants) at the first config alone."""
    results, seen, ends = [], set(), set()
    with targeting(arch):  # the configs a launch on an sm_`arch` GPU keeps
        for name, thunk in cases(combos, backward):
            if select is not None and not select(name):
                continue
            for launch in (one for recorded in record(thunk) for one in expand(recorded)):
                key = launch_key(launch, arch)
                if key in seen:
                    continue
                seen.add(key)
                at = (key[0], *name.split()[:2])  # the kernel, at the case's dtype and shape (its name's first words)
                for row in compile_launch(launch, arch, all_configs, name, first_only=ends_once and at in ends):
                    results.append(row)
                    if report is not None:
                        report(row)
                ends.add(at)
    return results


# the SM versions Triton 3.9 compiled a kernel for (LLVM aborts the process on others, 76 or 91 among them)
ARCHS = (75, 80, 86, 87, 89, 90, 100, 103, 110, 120, 121)


def _arch(text: str) -> int:
    """An argparse type: one of ARCHS."""
    if not text.isdigit() or int(text) not in ARCHS:
        raise argparse.ArgumentTypeError(f"an SM version Triton compiles for ({', '.join(map(str, ARCHS))}), "
                                         f"got {text!r}")
    return int(text)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.perf compile-check",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=_arch, default=90, metavar="SM",
                        help="SM version, e.g. 80 or 90 (default: 90)")
    parser.add_argument("--all-configs", action="store_true", help="every pruned config, not the first and last")
    parser.add_argument("--quick", action="store_true",
                        help="the CI subset: fewer dtypes and shapes; a kernel's first and last configs once per "
                             "dtype and shape, its other variants there at the first")
    args = parser.parse_args(argv)
    print(f"{'kernel':<26} {'regs':>4} {'spill B':>7} {'smem B':>7}  config | case", flush=True)

    def report(r):
        print(f"{r.name:<26} {r.registers:>4} {r.spill_bytes:>7} {r.shared_bytes:>7}  {r.config} | {r.case}",
              flush=True)

    if args.quick:
        rows = check(args.arch, args.all_configs, report, QUICK, ends_once=True)
        rows += check(args.arch, args.all_configs, report, QUICK_FORWARD_ONLY, backward=False, ends_once=True)
    else:
        rows = check(args.arch, args.all_configs, report)
    print(f"{len(rows)} kernels compiled for sm_{args.arch}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
