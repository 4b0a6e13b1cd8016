"""`tools.perf static`: compiled-code statistics of every kernel the launchers start, without a GPU.

Each launch a forward or backward call makes is recorded and compiled as a GPU launch compiles it
(compile_check.py: Triton's own argument specialization, each pruned autotune config, for
sm_80 and sm_90 with the ptxas Triton ships), next to the plain-attention baseline
(tools/perf/baseline.py) in the tiled forward's tiles. Per kernel, from ptxas and the SASS:

* registers per thread, spill bytes (what the local stores write, compile_check), LDL/STL instructions
  inside loops,
  shared memory per CTA;
* theoretical occupancy on the arch's reference GPU (sm_90: H100, sm_80: A100): CTAs per SM is
  the least of the thread, CTA, register and shared-memory limits, where a warp holds
  ceil(32 * registers / 256) * 256 registers and a CTA its shared memory plus the 1 KiB the
  runtime reserves; warps/SM = CTAs/SM * warps per CTA;
* the hot loop: of the loops in the SASS (a backward branch and the label it returns to), the one
  with the most MMA instructions (then the longest); a kernel with no MMA in a loop (the packed
  layout) counts the whole kernel, which computes one score tile;
* MMA kind in the hot loop (`mma`) and anywhere in the kernel (`kernel_mma`): HGMMA (wgmma, sm_90)
  or HMMA (mma.sync);
* every MMA loop: a kernel with more than one loop holding MMA instructions (the tiled forward:
  its off-band loops, full tiles and the masked last one, left and right of the band, the band's
  QK^T walk for the row max, the band's softmax; the tiled backward's passes) gets, after its
  row, one row per such loop in SASS order, `loop` = 1, 2, ... (the kernel's row: `loop` = hot),
  with that loop's MMA kind, instructions, MUFU and the per-score figures below, so that a model
  can weight each loop by the key tiles it runs (which loop runs which tiles: the kernel's
  source order, ops/tar_fwd.py). `loop_mma` is the loop's MMA instruction count;
* per score element: warp-instructions = instructions in one pass of the hot loop * warps per
  CTA / score elements the pass computes (BLOCK_M * BLOCK_N; packed: SEQS sequences of
  SEG_Q x SEG_K); MUFU per element the same with the MUFU (EX2, RCP, ...)
  instructions. A warp-instruction is one instruction issued for 32 threads.
* the whole kernel per program: `outside_loops`, the instructions up to the kernel's last EXIT that
  lie in no loop (the prologue, the code between the loops, the epilogue, issued once per program;
  code a branch may skip counted too, so an upper bound), and `outside_warp_instr`, that times warps
  per CTA; a kernel without loops (the packed layout) has all of itself there and in its per-score
  figures;
* the shortest and the longest path through one pass of a loop whose body branches (a
  conditional branch forward inside the loop may go either way; the frame-id kernel's key
  tiles take a dA column or dA per score): `short_*` and `long_*`, per score element as above.
  A loop without such branches has one path, its whole body.
* warp specialization (the lean forward's WARP_SPECIALIZE configs): `partitions`, the partitions Triton
  made beside the kernel's own warps (the TMA producer stays in them; each partition is a consumer
  warp group); `cta_warps`, the warps a CTA then runs, which the occupancy counts; `register_split`, the
  setmaxnreg values of the SASS in order. Such a kernel's per-score figures still count its num_warps
  over the whole tile; they are one partition's loop, not the CTA's work, and the model does not read them.

These are statistics of compiled code, not timings. Written to
<results>/static-sm<arch>.csv and .md (see tools/perf/model.md).
"""

from __future__ import annotations

import csv
import datetime
import math
import os
import re
from dataclasses import asdict, dataclass, replace

import torch
import triton

from . import RESULTS
from .baseline import launch_args as baseline_args
from .baseline import plain_attention_kernel
from .compile_check import disassemble

# (name, registers per SM, shared memory per SM, per CTA at most, threads per SM, CTAs per SM)
GPUS = {90: ("H100", 65536, 228 * 1024, 227 * 1024, 2048, 32), 80: ("A100", 65536, 164 * 1024, 163 * 1024, 2048, 32)}
_RESERVED_SMEM = 1024  # per CTA, by the CUDA runtime on sm_80 and later

_INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*);")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_MMA = ("HGMMA", "HMMA")


@dataclass
class Row:
    arch: int
    kernel: str
    case: str
    config: str
    tile: str
    registers: int
    spill_bytes: int
    local_ops_in_loops: int
    shared_bytes: int
    gpu: str
    ctas_per_sm: int
    warps_per_sm: int
    mma: str
    hot_loop: str
    loop_instructions: int
    loop_mufu: int
    instr_per_score: float
    mufu_per_score: float
    loop: str = "hot"  # "hot": the kernel's row; 1, 2, ...: its MMA loops in SASS order
    loop_mma: int = 0
    # the shortest and the longest path through one pass of the loop (loop_paths), per score
    short_instr_per_score: float = 0.0
    short_mufu_per_score: float = 0.0
    long_instr_per_score: float = 0.0
    long_mufu_per_score: float = 0.0
    # the whole kernel (every row of a kernel has the same): its MMA kinds anywhere, and the
    # instructions a program issues once outside every loop (prologue, code between the loops,
    # epilogue), per thread and in warp-instructions per program (x warps per CTA)
    kernel_mma: str = ""
    outside_loops: int = 0
    outside_warp_instr: int = 0
    # warp specialization (the lean forward's WARP_SPECIALIZE configs): the partitions Triton made beside the
    # kernel's own num_warps, the warps a CTA then runs, and the register split its SASS sets (setmaxnreg:
    # "+N" a warp group raising its registers to N, "-N" lowering them), in SASS order
    partitions: int = 0
    cta_warps: int = 0
    register_split: str = ""


def sass_graph(text: str) -> tuple:
    """(opcodes in order, loops as (first, last) opcode indices: a label and the branch back to it,
    jumps {branch index: (target index, conditional)} of every branch to a label).

    A branch back from past the kernel's last EXIT is no loop: the out-of-line slow paths there return
    into the kernel (an mbarrier wait, which a tensor-descriptor load makes on sm_90, retries its
    SYNCS.PHASECHK there and branches back after the inline one), as does the closing branch to itself."""
    opcodes, labels, branches = [], {}, []
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        ins = _INSTRUCTION.search(line)
        if ins:
            target = _BRANCH_TARGET.search(ins.group(4))
            predicate = (ins.group(2) or "").strip()
            if ins.group(3).startswith("BRA") and target and predicate != "@!PT":  # @!PT: never taken
                branches.append((len(opcodes), target.group(1), predicate not in ("", "@PT")))
            opcodes.append(ins.group(3))
    end = last_exit(opcodes)
    loops = [(labels[t], at) for at, t, _ in branches if t in labels and labels[t] <= at <= end]
    jumps = {at: (labels[t], conditional) for at, t, conditional in branches if t in labels}
    return opcodes, loops, jumps


def parse_sass(text: str) -> tuple:
    """(opcodes in order, loops as (first, last) opcode indices: a label and the branch back to it)."""
    opcodes, loops, _ = sass_graph(text)
    return opcodes, loops


def loop_paths(opcodes: list, jumps: dict, span: tuple) -> tuple:
    """((instructions, MUFU) of the shortest, of the longest path through one pass of the loop
    `span`: from its first instruction to its back branch, where a conditional branch forward
    inside the loop may go either way and an unconditional one must jump. A loop without such
    branches has one path, all its instructions."""
    lo, hi = span
    best = {hi + 1: ((0, 0), (0, 0))}  # after the back branch: nothing more
    for i in range(hi, lo - 1, -1):
        here = (1, int(opcodes[i].startswith("MUFU")))
        target, conditional = jumps.get(i, (None, False))
        if i == hi or target is None or not i < target <= hi:
            nexts = [i + 1] if i < hi else [hi + 1]  # a branch out of the loop (an exit) falls through here
        else:
            nexts = [target, i + 1] if conditional else [target]
        short = min((best[n][0] for n in nexts), key=lambda c: c[0])
        long = max((best[n][1] for n in nexts), key=lambda c: c[0])
        best[i] = ((here[0] + short[0], here[1] + short[1]), (here[0] + long[0], here[1] + long[1]))
    return best[lo]


def last_exit(opcodes: list) -> int:
    """The index of the kernel's last EXIT: what follows it (the closing branch to itself, padding, out-of-line
    slow paths such as a 64-bit division's) is not a pass through the kernel."""
    return max((i for i, op in enumerate(opcodes) if op == "EXIT"), default=len(opcodes) - 1)


def outside_loops(opcodes: list, loops: list) -> int:
    """Instructions up to the last EXIT that lie in no loop: what one program issues once (the
    prologue, the code between its loops, the epilogue; code a branch may skip counted too)."""
    inside = {i for a, b in loops for i in range(a, b + 1)}
    return sum(i not in inside for i in range(last_exit(opcodes) + 1))


def hot_loop(opcodes: list, loops: list) -> tuple:
    """(first, last) opcode indices of the loop with the most MMA instructions, then the longest;
    None when no loop has one (the whole kernel is the hot path)."""
    mmas = lambda lp: sum(op.startswith(_MMA) for op in opcodes[lp[0]:lp[1] + 1])  # noqa: E731
    best = max(loops, key=lambda lp: (mmas(lp), lp[1] - lp[0]), default=None)
    return best if best is not None and mmas(best) else None


def occupancy(arch: int, registers: int, shared: int, warps: int) -> tuple:
    """(CTAs per SM, warps per SM) in theory on the arch's reference GPU (see the module doc)."""
    _, regs_sm, smem_sm, smem_cta, threads_sm, ctas_sm = GPUS[arch]
    if shared > smem_cta:
        return 0, 0
    per_warp = math.ceil(32 * max(registers, 1) / 256) * 256
    limits = [ctas_sm, threads_sm // (32 * warps), (regs_sm // per_warp) // warps]
    if shared:
        limits.append(smem_sm // (shared + _RESERVED_SMEM))
    ctas = min(limits)
    return ctas, ctas * warps


def score_tile(constants: dict) -> tuple:
    """(rows, columns) of the score elements one hot-loop pass (a packed kernel: one program) computes;
    a packed program's SEQS sequences of SEG_Q x SEG_K scores count as SEQS * SEG_Q rows. The speculative
    forward's listings compute no score: their SLOTS or BLOCK_M rows count as SLOTS x 1 or BLOCK_M x 1."""
    if "ROWS" in constants:
        seqs = constants["ROWS"] // constants["SEG_MAX"]
        return seqs * constants["SEG_Q"], constants["SEG_K"]
    if "SLOTS" in constants:
        return constants["SLOTS"], 1
    if "BLOCK_N" not in constants:
        return constants["BLOCK_M"], 1
    return constants["BLOCK_M"], constants["BLOCK_N"]


def _is_mma(op: str) -> bool:
    return op.startswith(_MMA)


def _kinds(opcodes: list) -> str:
    """The MMA instruction kinds among `opcodes`: "HGMMA" (wgmma), "HMMA" (mma.sync), both, or "none"."""
    return "/".join(sorted({op.split(".")[0] for op in opcodes if _is_mma(op)})) or "none"


def _stats(arch: int, compiled, opcodes: list, loops: list, jumps: dict, span, loop: str, text: str = "") -> Row:
    """The Row of one compiled kernel, its figures from the opcodes of `span` ((first, last); None:
    the whole kernel up to its last EXIT)."""
    lo, hi = span if span else (0, last_exit(opcodes))
    body = opcodes[lo:hi + 1]
    in_loops = {i for a, b in loops for i in range(a, b + 1)}
    warps = compiled.options["num_warps"]
    cta_warps = compiled.total_warps or warps
    ctas, warps_sm = occupancy(arch, compiled.registers, compiled.shared_bytes, cta_warps)
    m, n = score_tile(compiled.constants)
    outside = outside_loops(opcodes, loops)
    mufu = sum(op.startswith("MUFU") for op in body)
    short, long = loop_paths(opcodes, jumps, span) if span else ((len(body), mufu),) * 2
    per_score = lambda count: round(count * warps / (m * n), 4)  # noqa: E731
    return Row(arch, compiled.name, compiled.case, compiled.config, f"{m}x{n}", compiled.registers,
               compiled.spill_bytes, sum(opcodes[i].startswith(("LDL", "STL")) for i in in_loops),
               compiled.shared_bytes, GPUS[arch][0], ctas, warps_sm,
               _kinds(body),
               "loop" if span else "kernel", len(body), mufu, per_score(len(body)), per_score(mufu), loop,
               sum(_is_mma(op) for op in body), per_score(short[0]), per_score(short[1]), per_score(long[0]),
               per_score(long[1]), kernel_mma=_kinds(opcodes), outside_loops=outside,
               outside_warp_instr=outside * warps, partitions=compiled.partitions, cta_warps=cta_warps,
               register_split=register_split(text))


_SETMAXREG = re.compile(r"SETMAXREG\.(TRY_ALLOC|DEALLOC)\S*\s+(?:U?P\w+,\s*)?(0x[0-9a-f]+|\d+)")


def register_split(text: str) -> str:
    """The setmaxnreg of a warp-specialized kernel's SASS, in order: "+N" raises a warp group's registers to N,
    "-N" lowers them; "" without."""
    return " ".join(("+" if kind == "TRY_ALLOC" else "-") + str(int(n, 0)) for kind, n in _SETMAXREG.findall(text))


def rows(arch: int, compiled) -> list:
    """The statistics of one compiled kernel (compile_check.Compiled): its hot-loop row, then
    one row per MMA loop when it has more than one (see the module doc)."""
    text = disassemble(compiled.cubin)
    opcodes, loops, jumps = sass_graph(text)
    out = [_stats(arch, compiled, opcodes, loops, jumps, hot_loop(opcodes, loops), "hot", text)]
    mma_loops = [lp for lp in loops if any(_is_mma(op) for op in opcodes[lp[0]:lp[1] + 1])]
    if len(mma_loops) > 1:
        out += [_stats(arch, compiled, opcodes, loops, jumps, lp, str(i), text)
                for i, lp in enumerate(sorted(mma_loops), 1)]
    return out


def row(arch: int, compiled) -> Row:
    """The hot-loop row of one compiled kernel (compile_check.Compiled)."""
    return rows(arch, compiled)[0]


def _with_baseline(launch) -> list:
    """A recorded launch, and after a tiled forward the plain-attention baseline on its tensors in
    its first and last pruned config. An fp16 tiled forward compiles every pruned config (the
    model's rows: the autotuner picks among them), any other launch its first and last."""
    from .compile_check import Launch, pruned_configs

    name = getattr(getattr(launch.kernel, "fn", None), "__name__", "")
    if name == "_tar_fwd_lean_kernel":  # every pruned config: warp-specialized or not
        return [replace(launch, all_configs=True)]
    if name != "_tar_fwd_tiled_kernel":
        return [launch]
    q, k, v = launch.args[:3]
    launch = replace(launch, all_configs=q.dtype == torch.float16)
    configs = pruned_configs(launch.kernel, launch.args, launch.kwargs)
    out = [launch]
    for c in dict.fromkeys((configs[0], configs[-1])).keys():
        args, constexprs = baseline_args(q, k, v, c.kwargs["BLOCK_N"])
        out.append(Launch(plain_attention_kernel, args, {**constexprs, **c.kwargs, "num_warps": c.num_warps,
                                                         "num_stages": c.num_stages}))
    return out


# The Wan 2.1 1.3B self-attention at 832 x 480 (tools/perf/model_dit.py): 12 heads of 128, 21 x 1560 tokens.
# The JIT specializes on N modulo 16, and Wan's 32,760 is not a multiple of 16.
DIT_SHAPE = (1, 12, 32760, 32760, 128, 128)
# A head dim of 80 (AnimateDiff's deeper blocks), tiled: 512 frames, the forward in 64 + 16 columns
# (layout.head_chunks), the backward in one block of 128.
D80_SHAPE = (2, 8, 512, 512, 80, 80)


def combos(quick: bool) -> list:
    """(dtype, (B, H, Nq, Nk, D, Dv), options): a packed and a tiled shape (D 40 and 64, in the
    (B, N, H, D) storage of diffusers; N multiples of 16, as frame and token counts are, since the
    JIT specializes on it), plain, causal with the global max, a custom delta; frame ids (the tiled
    kernels, forward and backward) on the tiled shape and on a DiT's own self-attention call
    (DIT_SHAPE, D 128), and there the lean forward too (its every config); float32 inputs (the tf32x3 dot) on
    both shapes, plain; D80_SHAPE as the tiled shape (frame ids too, float32 plain); --quick: fp16 plain and
    causal-global only."""
    shapes = [(64, 8, 16, 16, 40, 40), (2, 8, 256, 256, 64, 64)]
    options = [dict(), dict(causal=True, max_mode="global"), dict(delta=True)]
    dtypes = (torch.float16,) if quick else (torch.float16, torch.bfloat16)
    out = [(dt, s, o) for dt in dtypes for s in shapes for o in (options[:2] if quick else options)]
    if not quick:
        out += [(dt, s, dict(frames=True)) for dt in dtypes for s in (shapes[1], DIT_SHAPE)]
        out += [(dt, s, dict(frames=True, lean=True)) for dt in dtypes for s in (shapes[1], DIT_SHAPE)]
        out += [(torch.float32, s, dict()) for s in shapes]
        out += [(dt, D80_SHAPE, o) for dt in dtypes for o in options + [dict(frames=True)]]
        out += [(torch.float32, D80_SHAPE, dict())]
    return out


def _kernel_name(launch) -> str:
    kernel = launch.kernel
    while hasattr(kernel, "fn"):  # an autotuner's JIT function, a JIT function's Python function
        kernel = kernel.fn
    return kernel.__name__


def collect(arch: int, quick: bool = False, report=None, kernels=None, cases=None) -> list:
    """The rows of every launch of `combos(quick)`; with `kernels` (names), of those kernels' only; with
    `cases` (texts), of the cases whose name holds one of them only."""
    from . import compile_check

    out = []

    def add(compiled):
        for r in rows(arch, compiled):
            out.append(r)
            if report is not None:
                report(r)

    expand = _with_baseline if kernels is None else \
        (lambda launch: [one for one in _with_baseline(launch) if _kernel_name(one) in kernels])
    select = None if cases is None else (lambda name: any(text in name for text in cases))
    compile_check.check(arch, False, add, combos(quick), backward=True, expand=expand, select=select)
    return out


def read(path: str) -> list:
    """The Rows of a static-sm<arch>.csv that `write` wrote."""
    types = {"int": int, "float": float, "str": str}
    kinds = {name: types[str(field.type)] for name, field in Row.__dataclass_fields__.items()}
    with open(path, newline="") as f:
        return [Row(**{k: kinds[k](v) for k, v in line.items()}) for line in csv.DictReader(f)]


def merge(old: list, new: list) -> list:
    """`old` with each (kernel, case) that `new` has replaced by `new`'s rows, where its old rows were
    (a pair `old` lacks at the end); the other rows kept."""
    fresh, out, placed = {}, [], set()
    for r in new:
        fresh.setdefault((r.kernel, r.case), []).append(r)
    for r in old:
        key = (r.kernel, r.case)
        if key not in fresh:
            out.append(r)
        elif key not in placed:
            placed.add(key)
            out += fresh[key]
    return out + [r for key, rs in fresh.items() if key not in placed for r in rs]


# A table's stamp: its commit and date, and those of each later recompile of some kernels (`write`)
_STAMP = re.compile(r"Commit \S+, \d{4}-\d\d-\d\d(?:; the rows of [^;]+? recompiled at commit \S+, \d{4}-\d\d-\d\d)*")


def stamp(path: str) -> str:
    """The stamp of the static-sm<arch>.md at `path`."""
    with open(path) as f:
        found = _STAMP.search(f.read())
    if found is None:
        raise ValueError(f"{path} has no 'Commit <hash>, <date>' stamp: not a table `write` wrote")
    return found[0]


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def write(rows: list, arch: int, directory: str, kernels=None, cases=None) -> list:
    """static-sm<arch>.csv and .md in `directory`; returns their paths. With `kernels` or `cases`, `rows`
    are the table already there with those kernels' rows, or those cases' (`collect`), recompiled
    (`merge`), and the header says so."""
    from vstar_kernels.bench.measure import commit

    os.makedirs(directory, exist_ok=True)
    fields = list(Row.__dataclass_fields__)
    base = os.path.join(directory, f"static-sm{arch}")
    now = f"commit {commit()}, {datetime.date.today().isoformat()}"
    which = (", ".join(sorted(kernels or ())) or "every kernel") + (f" in the cases with {', '.join(cases)}"
                                                                    if cases else "")
    provenance = (f"{stamp(base + '.md')}; the rows of {which} recompiled at {now}" if kernels or cases
                  else now[0].upper() + now[1:])
    with open(base + ".csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(asdict(r) for r in rows)
    header = [f"# Compiled-code statistics, sm_{arch} (occupancy for {GPUS[arch][0]})", "",
              f"Not timings: what Triton {triton.__version__} and its bundled ptxas produce for each kernel "
              f"launch, specialized as a GPU launch is. {provenance}. Columns and formulas: tools/perf/static.py.", "",
              "| " + " | ".join(fields[1:]) + " |", "|" + "---|" * (len(fields) - 1)]
    with open(base + ".md", "w") as f:
        f.write("\n".join(header + ["| " + " | ".join(_fmt(v) for v in list(asdict(r).values())[1:]) + " |"
                                    for r in rows]) + "\n")
    return [base + ".csv", base + ".md"]


def main(args) -> int:
    directory = os.path.abspath(args.out) if args.out else str(RESULTS)
    for arch in args.arch:
        print(f"sm_{arch}: kernel, tile, config, registers, spill B, smem B, CTAs/SM, MMA, instr/score, MUFU/score, "
              "loop", flush=True)
        kernels = set(args.kernels or ()) or None
        cases = list(args.cases or ()) or None
        base = os.path.join(directory, f"static-sm{arch}")
        if kernels or cases:  # the table the rows go into, read (and its stamp checked) before the long compile
            if not os.path.isfile(base + ".csv"):
                raise SystemExit(f"--kernels / --cases replace rows of the table in {directory}, which has no "
                                 f"static-sm{arch}.csv: run a full `python -m tools.perf static --out DIR` first")
            old = read(base + ".csv")
            stamp(base + ".md")
        table = collect(arch, args.quick, kernels=kernels, cases=cases, report=lambda r: print(
            f"  {r.kernel:<26} {r.tile:>7} {r.config:<40} {r.registers:>4} {r.spill_bytes:>5} {r.shared_bytes:>7} "
            f"{r.ctas_per_sm:>2} {r.mma:<6} {r.instr_per_score:>7.3f} {r.mufu_per_score:>6.3f} {r.loop:>4} | {r.case}",
            flush=True))
        if kernels:
            missing = kernels - {r.kernel for r in table}
            if missing:
                raise SystemExit(f"--kernels {' '.join(sorted(missing))}: no launch of the cases runs such a kernel "
                                 f"(names: the kernels' function names, e.g. _tar_bwd_dq_kernel)")
        unmatched = [text for text in cases or () if not any(text in r.case for r in table)]
        if unmatched:
            raise SystemExit(f"--cases {' '.join(unmatched)}: no case's name holds it (names as in the tables' "
                             "case column, e.g. D80Dv80)")
        if kernels or cases:
            table = merge(old, table)
        for path in write(table, arch, directory, kernels, cases):
            print(f"wrote {path}")
    return 0
