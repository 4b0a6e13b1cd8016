"""`tools.perf static` compiles what a GPU launch runs and reads its SASS (no GPU needed).

The checks run in a subprocess without TRITON_INTERPRET (the kernels must be JIT functions):
a copy kernel compiled through compile_check.specialize gets the JIT's divisibility hints and
so vector loads, which the same kernel compiled without them lacks; the tiled forward, compiled
for sm_90, has a hot loop with wgmma (HGMMA) and no spills, and the SASS statistics name it and
each of its MMA loops.
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest
import triton

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

ROOT = pathlib.Path(__file__).resolve().parents[2]
PTXAS = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"

_SCRIPT = r'''
import json
import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from tools.perf import static
from tools.perf import compile_check as cc


@triton.jit
def copy(X, Y, n, stride, BLOCK: tl.constexpr):
    offs = tl.arange(0, BLOCK)
    tl.store(Y + offs * stride, tl.load(X + offs * stride, mask=offs < n), mask=offs < n)


x, y = torch.empty(1024, dtype=torch.float16), torch.empty(1024, dtype=torch.float16)
target = GPUTarget("cuda", 90, 32)
src, options = cc.specialize(copy, (x, y, 1024, 1), {"BLOCK": 1024, "num_warps": 4}, 90)
ptx = triton.compile(src, target=target, options=options).asm["ptx"]
plain = ASTSource(copy, {"X": "*fp16", "Y": "*fp16", "n": "i32", "stride": "i32", "BLOCK": "constexpr"},
                  {(4,): 1024})
plain_ptx = triton.compile(plain, target=target, options={"num_warps": 4}).asm["ptx"]

case = (torch.float16, (2, 8, 256, 256, 64, 64), {})
name, thunk = next(cc.cases([case], backward=False))
with cc.targeting(90):  # the configs an sm_90 launch keeps
    (launch,) = cc.record(thunk)
    rows = [r for c in cc.compile_launch(launch, 90, False, name) for r in static.rows(90, c)]
    _, bf16_thunk = next(cc.cases([(torch.bfloat16, case[1], {})], backward=False))
    (bf16_launch,) = cc.record(bf16_thunk)
    every = [static._with_baseline(one)[0].all_configs for one in (launch, bf16_launch)]
print(json.dumps({"attrs": {str(k): v for k, v in src.attrs.items() if v},
                  "constants": {str(k): v for k, v in src.constants.items()},
                  "vector": ".v4." in ptx or ".v8." in ptx, "plain_vector": ".v4." in plain_ptx or ".v8." in plain_ptx,
                  "every": every,
                  "rows": [[r.kernel, r.mma, r.hot_loop, r.spill_bytes, r.local_ops_in_loops, r.instr_per_score,
                            r.mufu_per_score, r.ctas_per_sm, r.loop, r.loop_mma, r.kernel_mma,
                            r.outside_loops, r.outside_warp_instr, r.loop_instructions] for r in rows]}))
'''


@pytest.mark.skipif(not PTXAS.exists(), reason=f"triton ships no ptxas here ({PTXAS})")
def test_static_compiles_specialized_kernels(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))  # tools/ and this package
    script = tmp_path / "static_check.py"  # a file: triton reads a jit function's source
    script.write_text(_SCRIPT)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    # the JIT's specialization: 16-aligned pointers and n=1024 divisible, stride=1 a constant
    assert out["attrs"] == {"(0,)": [["tt.divisibility", 16]], "(1,)": [["tt.divisibility", 16]],
                            "(2,)": [["tt.divisibility", 16]]}
    assert out["constants"]["(3,)"] == 1
    assert out["vector"] and not out["plain_vector"]
    hot = [r for r in out["rows"] if r[8] == "hot"]
    assert len(hot) == 2  # the first and last pruned config
    assert out["every"] == [True, False]  # tools.perf static compiles every config of the fp16 tiled forward
    for kernel, mma, hot_loop, spills, local, instr, mufu, ctas, _, _, kinds, outside, warp_instr, _ in hot:
        assert (kernel, mma, hot_loop, spills, local, kinds) == ("_tar_fwd_tiled_kernel", "HGMMA", "loop", 0, 0,
                                                                 "HGMMA")
        assert instr > 0 and 0 < mufu < instr and ctas >= 1
        # the whole kernel: the prologue, the code between its six loops and the epilogue, once per program
        assert outside > 0 and warp_instr % outside == 0 and warp_instr // outside in (4, 8)
    # each config's MMA loops, in SASS order: the off-band loops (full tiles, the masked last one,
    # left and right), the band's row-max walk (QK^T only: no MUFU), the band's softmax
    loops = [r for r in out["rows"] if r[8] != "hot"]
    assert len(loops) == 2 * 6 and all(r[1] == "HGMMA" and r[2] == "loop" and r[9] > 0 for r in loops)
    for first in (0, 6):
        config = loops[first:first + 6]
        assert [r[8] for r in config] == ["1", "2", "3", "4", "5", "6"]
        assert config[4][6] == 0 and min(r[6] for r in config[:4]) > 0
        # the plain loop over full off-band tiles: one exp2 per score (and one per row), fewer
        # instructions than the band's softmax with the bias
        assert config[0][6] <= 1.15 / 32 and config[0][5] < config[5][5]


def test_sass_parse_finds_the_loop():
    from tools.perf.static import hot_loop, last_exit, loop_paths, occupancy, outside_loops, parse_sass, sass_graph

    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
        /*0010*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0020*/                   MUFU.EX2 R2, R2 ;
        /*0030*/               @P0 BRA `(.L_x_0) ;
.L_x_1:
        /*0040*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0050*/                   STL [R1], R2 ;
        /*0060*/              @!P1 BRA `(.L_x_1) ;
        /*0070*/                   EXIT ;
"""
    # past the last EXIT: the closing branch to itself, and an mbarrier wait's out-of-line retry (a tensor-descriptor
    # load's on sm_90), which branches back into the loop after the inline wait: neither is a loop
    opcodes, loops = parse_sass(sass.replace("HMMA.16816.F32 R4, R8, R12, R4 ;", """HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0014*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [R3], R5 ;
        /*0018*/              @!P2 BRA `(.L_x_3) ;
.L_x_4:""") + """
.L_x_3:
        /*0080*/                   SYNCS.PHASECHK.TRANS64.TRYWAIT P2, [R3], R5 ;
        /*0084*/              @!P2 BRA `(.L_x_3) ;
        /*0088*/                   BRA `(.L_x_4) ;
.L_x_2:
        /*0090*/                   BRA `(.L_x_2) ;
        /*00a0*/                   NOP ;
""")
    assert loops == [(1, 5), (6, 8)]
    assert last_exit(opcodes) == 9 and outside_loops(opcodes, loops) == 2  # MOV and EXIT; not the closing loop
    opcodes, loops = parse_sass(sass)
    assert loops == [(1, 3), (4, 6)]
    assert hot_loop(opcodes, loops) == (1, 3)  # the loop with the MMA
    assert hot_loop(opcodes, [(4, 6)]) is None
    branchy = """
.L_x_0:
        /*0000*/                   HMMA.16816.F32 R4, R8, R12, R4 ;
        /*0010*/              @!P4 BRA `(.L_x_1) ;
        /*0020*/                   MUFU.EX2 R2, R2 ;
        /*0030*/                   MUFU.EX2 R3, R3 ;
        /*0040*/                   FADD R2, R2, R3 ;
        /*0050*/                   BRA `(.L_x_2) ;
.L_x_1:
        /*0060*/                   FADD R2, R2, R2 ;
.L_x_2:
        /*0070*/              @!PT BRA `(.L_x_1) ;
        /*0080*/                   MUFU.EX2 R5, R5 ;
        /*0090*/               @P0 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
"""
    opcodes, loops, jumps = sass_graph(branchy)
    assert loops == [(0, 9)] and 7 not in jumps  # @!PT: never taken
    # short: MMA, branch, FADD, never-taken branch, MUFU, back branch; long: the MUFU side
    assert loop_paths(opcodes, jumps, (0, 9)) == ((6, 1), (9, 3))
    # 128 threads x 255 registers: 8 warps by registers -> 2 CTAs; 100 KB shared: 2 CTAs on H100, 1 on A100
    assert occupancy(90, 255, 100 * 1024, 4) == (2, 8)
    assert occupancy(80, 255, 100 * 1024, 4) == (1, 4)


def _compile_script(tmp_path, source: str):
    """Run `source` (it compiles for sm_90 with the real ptxas, outside the interpreter) in a fresh process with a
    cache of its own: the JSON it prints last."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_DEFAULT_FP_FUSION="1",
               PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")])))
    script = tmp_path / "check_script.py"
    script.write_text(source)
    res = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


_LEAN = r'''
import json
import torch
from tools.perf import static
from tools.perf import compile_check as cc

case = (torch.bfloat16, (2, 8, 256, 256, 64, 64), dict(frames=True, lean=True))
name, thunk = next(cc.cases([case], backward=False))
with cc.targeting(90):
    (launch,) = cc.record(thunk)
    (expanded,) = static._with_baseline(launch)
    rows = [r for c in cc.compile_launch(expanded, 90, expanded.all_configs, name) for r in static.rows(90, c)]
print(json.dumps([[r.kernel, r.config, r.loop, r.spill_bytes, r.mma, r.partitions, r.cta_warps, r.register_split,
                   r.short_instr_per_score, r.long_instr_per_score] for r in rows if r.loop == "hot"]))
'''


@pytest.mark.skipif(not PTXAS.exists(), reason=f"triton ships no ptxas here ({PTXAS})")
def test_lean_forward_warp_specializes_on_sm90(tmp_path):
    """The lean forward's configs for sm_90 compile without spills; the warp-specialized ones get Triton's producer
    and two consumer partitions (12 warps a CTA) and a setmaxnreg register split; the others take the one-frame
    tiles' short path, about half the instructions of their per-score path (0.43-0.51 of it at head dim 64, kernel
    log v20)."""
    hot = _compile_script(tmp_path, _LEAN)
    specialized = [r for r in hot if "WARP_SPECIALIZE=True" in r[1]]
    plain = [r for r in hot if "WARP_SPECIALIZE=False" in r[1]]
    assert len(specialized) == 2 and len(plain) == 2  # D 64: 128 x 64 and 128 x 128 each way
    for kernel, config, _, spills, mma, partitions, warps, split, short, long in hot:
        assert (kernel, spills, mma) == ("_tar_fwd_lean_kernel", 0, "HGMMA"), config
    for *_, partitions, warps, split, short, long in specialized:
        assert (partitions, warps) == (2, 12) and "+" in split and "-" in split  # raised and lowered (order: Triton's)
    for *_, partitions, warps, split, short, long in plain:
        assert (partitions, warps, split) == (0, 8, "") and short < 0.6 * long


_LEAN_REDO = r'''
import json
import torch
from tools.perf import compile_check as cc

out = []
for d in (64, 128):
    case = (torch.bfloat16, (1, 2, 256, 256, d, d), dict(frames=True, lean=True))
    name, thunk = [c for c in cc.cases([case], backward=False) if c[0].endswith("lean speculative")][0]
    with cc.targeting(90):
        (redo,) = [launch for launch in cc.record(thunk) if "redo" in str(launch.kernel)]
        tiles = [d, redo.kwargs["BLOCK_M"], redo.kwargs["BLOCK_N"], redo.kwargs["num_warps"], redo.kwargs["LEAN"]]
        out.append(tiles + [c.spill_bytes for c in cc.compile_launch(redo, 90, False, name)])
print(json.dumps(out))
'''


@pytest.mark.skipif(not PTXAS.exists(), reason=f"triton ships no ptxas here ({PTXAS})")
def test_lean_forwards_redo_takes_its_tiles(tmp_path):
    """After a speculative lean launch the redo runs its lean form (LEAN) on 64 x 64 tiles on 4 warps
    (tar_fwd_lean.LEAN_REDO), which compiles for sm_90 without a spill at head dims 64 and 128."""
    assert _compile_script(tmp_path, _LEAN_REDO) == [[64, 64, 64, 4, True, 0], [128, 64, 64, 4, True, 0]]


def _row(kernel, case, registers, **kw):
    from tools.perf.static import Row

    fields = dict(arch=90, kernel=kernel, case=case, config="BLOCK_M=64 BLOCK_N=32 warps=8 stages=2", tile="64x32",
                  registers=registers, spill_bytes=0, local_ops_in_loops=0, shared_bytes=1024, gpu="H100",
                  ctas_per_sm=2, warps_per_sm=16, mma="HGMMA", hot_loop="loop", loop_instructions=100, loop_mufu=4,
                  instr_per_score=1.25, mufu_per_score=0.0625)
    return Row(**{**fields, **kw})


def test_recompiled_kernels_replace_their_rows_in_place(tmp_path):
    """`static --kernels`: the table read back as written, a recompiled (kernel, case)'s rows replaced
    where they were (a case the table lacked at the end, a case not recompiled kept), the other rows
    kept, and the header naming every commit, a second recompile's included."""
    from tools.perf import static

    old = [_row("fwd", "a", 100), _row("bwd", "a", 200), _row("bwd", "a", 201, loop="1"), _row("fwd", "b", 110),
           _row("bwd", "b", 210), _row("bwd", "d", 220)]
    static.write(old, 90, str(tmp_path))
    assert static.read(str(tmp_path / "static-sm90.csv")) == old
    first = static.stamp(str(tmp_path / "static-sm90.md"))
    assert first.startswith("Commit ") and ";" not in first
    new = [_row("bwd", "a", 150), _row("bwd", "c", 160), _row("bwd", "b", 170, spill_bytes=8)]
    merged = static.merge(old, new)
    assert [(r.kernel, r.case, r.registers) for r in merged] == [("fwd", "a", 100), ("bwd", "a", 150),
                                                                  ("fwd", "b", 110), ("bwd", "b", 170),
                                                                  ("bwd", "d", 220), ("bwd", "c", 160)]
    static.write(merged, 90, str(tmp_path), kernels={"bwd"})
    second = static.stamp(str(tmp_path / "static-sm90.md"))
    assert second.startswith(first + "; the rows of bwd recompiled at commit ")
    assert static.read(str(tmp_path / "static-sm90.csv")) == merged
    static.write(merged, 90, str(tmp_path), kernels={"fwd", "bwd"})
    assert static.stamp(str(tmp_path / "static-sm90.md")).startswith(second + "; the rows of bwd, fwd recompiled at ")
    (tmp_path / "static-sm90.md").write_text("no stamp here\n")
    with pytest.raises(ValueError, match="no 'Commit <hash>, <date>' stamp"):
        static.stamp(str(tmp_path / "static-sm90.md"))


def test_recompiling_a_kernel_no_case_runs_is_an_error(tmp_path, monkeypatch):
    """A misspelt --kernels name compiles nothing: an error naming it, the tables left as they were."""
    import argparse

    from tools.perf import static

    static.write([_row("bwd", "a", 200)], 90, str(tmp_path))
    before = (tmp_path / "static-sm90.md").read_text()
    monkeypatch.setattr(static, "collect", lambda *args, **kwargs: [_row("bwd", "a", 150)])
    args = argparse.Namespace(out=str(tmp_path), arch=[90], quick=False, kernels=["bwd", "bwdd"], cases=None)
    with pytest.raises(SystemExit, match="--kernels bwdd: no launch"):
        static.main(args)
    assert (tmp_path / "static-sm90.md").read_text() == before


def test_compiling_some_cases_adds_their_rows(tmp_path, monkeypatch):
    """`static --cases`: only the cases whose name holds a text compile (compile_check's select), their rows
    added to the table (or replacing theirs), the header naming them; a text no case holds is an error."""
    import argparse

    from tools.perf import compile_check, static

    seen = []
    monkeypatch.setattr(compile_check, "cases", lambda combos, backward: iter([("fp16 D64", None), ("fp16 D80", None),
                                                                               ("bf16 D80 +bwd", None)]))
    monkeypatch.setattr(compile_check, "record", lambda thunk: seen.append(thunk) or [])
    compile_check.check(90, False, None, [], select=lambda name: "D80" in name)
    assert len(seen) == 2
    calls = []
    monkeypatch.setattr(compile_check, "check", lambda *a, select=None, **kw: calls.append(select))
    static.collect(90, cases=["D80", "D96"])
    assert [calls[0](n) for n in ("fp16 D64", "fp16 D80 +bwd", "bf16 D96")] == [False, True, True]

    static.write([_row("bwd", "a", 200)], 90, str(tmp_path))
    first = static.stamp(str(tmp_path / "static-sm90.md"))
    monkeypatch.setattr(static, "collect", lambda *args, **kwargs: [_row("bwd", "fp16 D80", 150, spill_bytes=8)])
    args = argparse.Namespace(out=str(tmp_path), arch=[90], quick=False, kernels=None, cases=["D80"])
    static.main(args)
    rows = static.read(str(tmp_path / "static-sm90.csv"))
    assert [(r.case, r.registers, r.spill_bytes) for r in rows] == [("a", 200, 0), ("fp16 D80", 150, 8)]
    assert static.stamp(str(tmp_path / "static-sm90.md")).startswith(
        first + "; the rows of every kernel in the cases with D80 recompiled at commit ")
    monkeypatch.setattr(static, "collect", lambda *args, **kwargs: [])
    before = (tmp_path / "static-sm90.md").read_text()
    with pytest.raises(SystemExit, match="--cases D9: no case's name holds"):
        static.main(argparse.Namespace(out=str(tmp_path), arch=[90], quick=False, kernels=None, cases=["D9"]))
    assert (tmp_path / "static-sm90.md").read_text() == before
    monkeypatch.setattr(static, "collect", lambda *args, **kwargs: [_row("bwd", "fp16 D80", 150, spill_bytes=8)])
    with pytest.raises(SystemExit, match="--cases D9: no case's name holds"):  # one text that matches none: it was
        static.main(argparse.Namespace(out=str(tmp_path), arch=[90], quick=False, kernels=None,  # named recompiled
                                       cases=["D80", "D9"]))
    assert (tmp_path / "static-sm90.md").read_text() == before
    with pytest.raises(SystemExit, match="replace rows of the table in .*empty, which has no static-sm90.csv"):
        static.main(argparse.Namespace(out=str(tmp_path / "empty"), arch=[90], quick=False, kernels=None,
                                       cases=["D80"]))


_SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;
        /*00c0*/                   VIADD R1, R1, 0xfffffff8 ;
        /*0ea0*/                   STL [R1+0x34], R13 ;
        /*0ed0*/               @P0 STL.64 [R1+0x30], R16 ;
        /*0f10*/                   STL.128 [R1+0x20], R20 ;
        /*0f20*/                   STL.U8 [R1+0x1f], R9 ;
        /*0f30*/                   LDL R13, [R1+0x34] ;
        /*0f40*/                   STG.E.128 desc[UR4][R2.64], R20 ;
"""


@pytest.mark.parametrize("stack, local, sass, want", [(0, 0, _SASS, 0), (8, 0, "", 0), (64, 0, _SASS, 4 + 8 + 16 + 1),
                                                      (0, 16, _SASS, 4 + 8 + 16 + 1)],
                         ids=["no_frame", "unused_frame", "stores", "local_only"])
def test_spill_bytes_are_what_the_local_stores_write(monkeypatch, stack, local, sass, want):
    """A spill is a local store: its bytes, each instruction once (what ptxas -v counts); a stack frame no instruction
    stores to is none (ptxas reserves 8 B for an unused local array, as in the sm_90 dQ pass at head dim 80);
    without a stack or local frame the SASS is not read."""
    from tools.perf import compile_check as cc

    usage = f" Function k:\n  REG:217 STACK:{stack} SHARED:1024 LOCAL:{local} CONSTANT[0]:744\n"
    read = []
    monkeypatch.setattr(cc, "_dump", lambda tool, flags, cubin: read.append(tool) or (
        usage if tool == "cuobjdump" else sass))
    assert cc._resources(b"") == (217, want)
    assert read == (["cuobjdump"] if stack + local == 0 else ["cuobjdump", "nvdisasm"])


def test_a_local_store_of_unknown_width_is_an_error():
    from tools.perf import compile_check as cc

    with pytest.raises(ValueError, match=r"\['EF'\]: 'STL.EF.64'"):
        cc.spill_store_bytes("        /*0ea0*/                   STL.EF.64 [R1+0x34], R12 ;\n")
