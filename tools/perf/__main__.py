"""`python -m tools.perf <static|traffic|model|cpu|host|compile-check> ...`: the maintainers' yardstick; its
--help is the package's docstring (tools/perf/__init__.py)."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from vstar_kernels.bench import positive_int, results_folder

from . import __doc__ as OVERVIEW

GPUS = ("h100", "h200")
# `model --n`: the longest sequence the model takes, past the longest of the committed tables (N = 119,056, the DiT
# rows). The sweep of one kernel shape took 73 s at N = 4,096 and 91 s at 131,072, and had not ended after 7 min at
# 1,048,576 (the shared 2-core box, on a442e41); N = 1e9 ran for minutes before the bound
MODEL_MAX_N = 2 ** 17


def _out(parser, what: str = "") -> None:
    parser.add_argument("--out", metavar="DIR", type=results_folder,
                        help="results directory (default: benchmarks/results)" + what)


def model_length(text: str) -> int:
    """An argparse type: `model --n`, a sequence length in 1..MODEL_MAX_N."""
    n = positive_int(text)
    if n > MODEL_MAX_N:
        raise argparse.ArgumentTypeError(f"at most {MODEL_MAX_N:,} (2^17, past the longest sequence of the "
                                         f"committed tables: the DiT rows' 119,056), got {text!r}")
    return n


# why each command's --quick needs --out
QUICK_WITHOUT_OUT = {
    "static": "static --quick compiles the CI subset, whose tables would replace the committed full ones in "
              "benchmarks/results",
    "traffic": "traffic --quick counts the CI subset, whose tables would replace the committed full ones in "
               "benchmarks/results",
    "model": "model --quick compiles fewer configs, whose rows would replace the committed full tables in "
             "benchmarks/results",
    "cpu": "cpu --quick times two of the five cases, whose rows would join the committed full runs in "
           "benchmarks/results",
}


def parser() -> argparse.ArgumentParser:
    """The CLI; `.commands` maps each command's name to its parser (for its own usage in errors)."""
    top = argparse.ArgumentParser(prog="python -m tools.perf", description=OVERVIEW,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = top.add_subparsers(dest="command", required=True)
    static = sub.add_parser("static", help="compile every kernel config for sm_80/sm_90 and read its SASS: "
                                           "registers, spills, occupancy, MMA kind, instructions per score")
    static.add_argument("--arch", nargs="+", type=int, choices=(80, 90), default=[80, 90], metavar="SM",
                        help="SM versions to compile for: 80, 90 or both (default: both)")
    static.add_argument("--quick", action="store_true",
                        help="compile the CI subset (default: the full sweep); needs --out")
    static.add_argument("--kernels", nargs="+", metavar="NAME",
                        help="recompile these kernels' launches only and replace their rows in the tables "
                             "already in --out (after a change to those kernels alone)")
    static.add_argument("--cases", nargs="+", metavar="TEXT",
                        help="compile only the cases whose name holds one of these texts (e.g. D80Dv80) and "
                             "replace or add their rows in the tables already in --out")
    _out(static)
    traffic = sub.add_parser("traffic", help="count the forward's bytes and MMA FLOPs in the Triton interpreter")
    traffic.add_argument("--quick", action="store_true",
                         help="count the CI subset (default: the full sweep); needs --out")
    _out(traffic)
    model = sub.add_parser("model", help="the roofline model of one forward call on H100/H200 (a model, not a "
                                         "measurement), calibrated on published FlashAttention bars")
    model.add_argument("--gpu", nargs="+", choices=GPUS, help="the GPUs to model (default: both)")
    model.add_argument("--dit", action="store_true", help="the video DiT self-attention shapes, with frame ids")
    model.add_argument("--shapes", nargs="+", metavar="NAME",
                       help="named shapes (default: every kernel shape of vstar_kernels.bench.shapes, the UNets "
                            "aside; with --dit, every DiT shape); needs --out")
    model.add_argument("--n", nargs="+", type=model_length, metavar="N",
                       help=f"sequence lengths of the kernel shapes, each 1..{MODEL_MAX_N:,} (default: 16, 32, "
                            "..., 2048 and 4096; not with --dit, whose shapes have their own); needs --out")
    model.add_argument("--quick", action="store_true",
                       help="compile each of our autotuned kernels in the first and last configs the sm_90 pruning "
                            "keeps, not every one (fewer compiles; a config left out may be faster); needs --out")
    model.add_argument("--no-plots", action="store_true", help="write the CSV and markdown only")
    _out(model)
    cpu = sub.add_parser("cpu", help="time the CPU default path (tar_attention, backend auto) against plain SDPA, "
                                     "default threads and one thread (measured)")
    cpu.add_argument("--quick", action="store_true", help="one UNet and one DiT case (default: all five); "
                                                          "needs --out")
    cpu.add_argument("--rounds", type=positive_int, default=9,
                     help="timed calls of each implementation per case (default 9)")
    _out(cpu, "; the rows are appended to cpu-default-path-<yyyymmdd>.csv there (a new file gets the header, a "
              "same-day rerun adds to the file)")
    host_help = ("the host time of tar_attention on the quick shape, per call, against plain SDPA and the bare "
                 "formula (measured), at one thread and at torch's default thread count; prints a table, writes "
                 "no file")
    host = sub.add_parser("host", help=host_help, description=host_help)
    host.add_argument("--rounds", type=positive_int, default=50, help="rounds of timed batches (default 50)")
    host.add_argument("--batch", type=positive_int, default=20,
                      help="calls of each implementation per round (default 20)")
    check = sub.add_parser("compile-check", help="compile every launch for an NVIDIA arch (no GPU): registers, "
                                                 "spills, shared memory", add_help=False)
    check.add_argument("rest", nargs=argparse.REMAINDER)
    top.commands = sub.choices
    return top


def _model_shapes(dit: bool) -> list:
    """The names `model --shapes` takes: the DiT shapes with --dit, else the kernel shapes (a UNet has no row)."""
    if dit:
        from .model_dit import DIT_SHAPES

        return [s.name for s in DIT_SHAPES]
    from vstar_kernels.bench import shapes

    return [name for name in shapes.SHAPES if not shapes.is_unet(name)]


def main(argv=None) -> int:
    from vstar_kernels.bench.measure import commit

    commit()  # the tree as the run begins, before its first table dirties it (measure.commit)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["compile-check"]:
        from .compile_check import main as compile_check

        return compile_check(argv[1:])
    top = parser()
    args = top.parse_args(argv)
    command = top.commands[args.command]  # its errors print its own usage
    for name, value in vars(args).items():  # a value given twice is one
        if isinstance(value, list) and name != "rest":
            setattr(args, name, list(dict.fromkeys(value)))
    if args.command == "model" and args.dit and args.n:
        command.error("argument --n: the DiT shapes have their own sequence lengths; --n is for the kernel shapes")
    if args.command == "model" and args.shapes:
        valid = _model_shapes(args.dit)
        unknown = [name for name in args.shapes if name not in valid]
        if unknown:
            command.error(f"argument --shapes: unknown {'DiT ' * args.dit}shape(s) {', '.join(unknown)}; "
                          f"choose from {', '.join(valid)}")
    if args.command == "model" and (args.shapes or args.n) and not args.out:
        command.error("model --shapes/--n writes those rows only, which would replace the committed full tables "
                      "in benchmarks/results: give --out DIR")
    if args.command in ("static", "traffic", "model", "cpu") and args.quick and not args.out:
        command.error(QUICK_WITHOUT_OUT[args.command] + ": give --out DIR")
    from vstar_kernels import _env

    if args.command == "traffic" and not _env.interpreter_requested():
        # the counts come from the Triton interpreter, whose mode is fixed when triton is first imported
        env = {**os.environ, "TRITON_INTERPRET": "1"}
        return subprocess.run([sys.executable, "-m", "tools.perf", *argv], env=env).returncode
    if args.command == "static":
        from .static import main as run
    elif args.command == "traffic":
        from .traffic import main as run
    elif args.command == "cpu":
        from .cpu import main as run
    elif args.command == "host":
        from .host import main as run
    elif args.dit:
        from .model_dit import dit_main as run
    else:
        from .model import main as run
    if args.command == "model":
        from .roofline import quick_configs

        with quick_configs(args.quick):
            return run(args)
    return run(args)


if __name__ == "__main__":
    raise SystemExit(main())
