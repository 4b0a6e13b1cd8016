"""The benchmark harness behind `python -m vstar_kernels bench` (benchmarks/NOTES.md): shapes, peers, check
(tolerances), measure (timers, ideal cost, CSV schema), harness (the sweep), e2e (UNet), backward, report.
This module only defines the options, so that building the CLI parser imports nothing heavy.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile

RUNTIME_DEVICES = ("auto", "cuda", "cpu")


def positive_int(text: str) -> int:
    """An argparse type: an option's value that must be an int >= 1 (argparse names the option in its error)."""
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a positive int, got {text!r}")
    return int(text)


def seconds(text: str) -> float:
    """An argparse type: a time budget, a number of seconds > 0 (argparse names the option in its error)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}")
    return value


def results_folder(text: str) -> str:
    """--out: a folder, made when missing; an existing file, one where a folder to make is, a link to nothing, or a
    folder that takes no file (read-only, /proc, not ours) is refused before any work. The check writes a
    temporary file into the folder, or where it is missing into the nearest folder above it, where the folders are
    to be made (permission bits do not tell: root passes them); it makes nothing itself. "--out=~/x": the shell
    leaves that ~ alone, this expands it."""
    text = os.path.expanduser(text)
    if os.path.exists(text) and not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a file; --out names the results folder")
    above = os.path.abspath(text)
    while not os.path.exists(above):
        if os.path.islink(above):
            raise argparse.ArgumentTypeError(f"{text} cannot be made: {above} is a link to nothing")
        above = os.path.dirname(above)
    if not os.path.isdir(above):
        raise argparse.ArgumentTypeError(f"{text} cannot be made: {above} is a file")
    try:
        with tempfile.TemporaryFile(dir=above):
            pass
    except OSError as exc:
        what = "cannot be written to" if os.path.isdir(text) else f"cannot be made in {above}"
        raise argparse.ArgumentTypeError(f"{text} {what} ({exc.strerror or exc}); --out names a folder the "
                                         "results can be written to") from None
    return text


def configure(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small preset (GPU: 3 shapes, N 16/64/256/1024, fp16; CPU: the tiny shape, N 16/64)")
    parser.add_argument("--dtype", nargs="+", metavar="DTYPE",
                        help="fp16, bf16, fp32 (default: fp16 bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--n", nargs="+", type=int, metavar="N",
                        help="sequence lengths (frames); default 16..2048 on GPU; also the UNet frame counts")
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help="named shapes (see --list)")
    parser.add_argument("--impls", nargs="+", metavar="IMPL",
                        help="implementations to run at the kernel shapes (default: all; on CUDA all but vstar_auto, "
                             "which runs the Triton kernel vstar_triton times). On CPU ours is vstar_auto, "
                             "tar_attention's default path; vstar_triton is only checked there, in the Triton "
                             "interpreter. One that cannot run here gets 'unsupported' rows; naming only such ones "
                             "is an error unless a UNet shape, which runs its own variants, is among --shapes")
    parser.add_argument("--device", choices=RUNTIME_DEVICES, default="auto",
                        help="where to run: auto, cuda or cpu (default: cuda when available)")
    parser.add_argument("--out", metavar="DIR", type=results_folder,
                        help="results directory (default: ./vstar-bench-results, in the current folder; the paths "
                             "written are printed)")
    parser.add_argument("--time-budget-s", type=seconds, metavar="S",
                        help="stop measuring after S seconds, checked before each case (one that starts in time runs "
                             "to its end: a UNet case on CPU takes minutes); the rest get 'unsupported: not run: ...' "
                             "rows")
    parser.add_argument("--resume", action="store_true",
                        help="skip cells this commit already measured in today's CSV with this device, torch "
                             "and Triton")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV and markdown only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the named shapes and implementations")
    parser.add_argument("--backward", action="store_true",
                        help="time the backward pass instead (GPU only): the Triton backward vs autograd on the eager "
                             "reference vs SDPA's, on the backward cases; rows go to <device>-<yyyymmdd>-backward.csv "
                             "in the results directory (--out)")
    parser.add_argument("--model-table", action="store_true",
                        help="print the bytes/FLOPs table for fp16 (the GPU shapes and N unless --shapes/--n), "
                             "measure nothing")


def runs_cpu_kernels(args) -> bool:
    """Whether these options time the Triton kernels on CPU tensors (in the Triton interpreter)."""
    import torch

    if args.list or args.model_table or args.backward:
        return False
    return args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())


# the modes that run no sweep: what each does, and the options it takes besides itself; any other option given
# would be taken and ignored, so it is refused, named
MODES = {"--list": ("lists the named shapes and implementations", ()),
         "--model-table": ("counts fp16 bytes and FLOPs (the GPU shapes and N unless --shapes/--n)",
                           ("--shapes", "--n")),
         "--backward": ("times its own cases (benchmarks/NOTES.md) in fp16 on CUDA", ("--out", "--no-plots",
                                                                                       "--device cuda"))}


def untaken(args) -> str:
    """Why options given do not apply to the mode given (--list, --model-table, --backward), or ''."""
    given = [f"--{name.replace('_', '-')}" for name, value in vars(args).items()
             if value not in (None, False) and name not in ("device", "command")]
    given += [f"--device {args.device}"] * (args.device != "auto")
    for mode, (does, takes) in MODES.items():
        drop = [flag for flag in given if flag not in (mode, *takes)]
        if mode in given and drop:
            takes = f"takes {', '.join(takes)} only" if takes else "takes no other option"
            return f"{mode} {does}, and {takes}: drop {', '.join(drop)}"
    return ""


def main(args) -> int:
    refused = untaken(args)
    if refused:
        print(refused, file=sys.stderr)
        return 2
    if args.backward:
        from .backward import main as run_backward

        return run_backward(args)
    from .harness import main as run

    return run(args)
