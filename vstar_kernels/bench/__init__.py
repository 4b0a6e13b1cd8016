"""The benchmark harness behind `python -m vstar_kernels bench` (see benchmarks/NOTES.md).

Modules: shapes (named shapes and presets), peers (every implementation, one
signature), check (correctness before timing), measure (timers, bytes/FLOPs,
copy bandwidth, run metadata), harness (the sweep and its CSV rows), e2e (the
UNet forward), backward (the backward-pass cases, --backward), static and baseline
(compiled-code statistics, --static), model (a roofline model per GPU,
--model), report (markdown table and plots from a CSV). This module only
defines the command-line options, so that building the CLI parser imports
nothing heavy.
"""

from __future__ import annotations

import argparse

RUNTIME_DEVICES = ("auto", "cuda", "cpu")
MODEL_DEVICES = ("h100", "h200")


class _Device(argparse.Action):
    """--device: one of RUNTIME_DEVICES (stored as a string), or with --model one or more of
    MODEL_DEVICES (stored as a list); anything else is an argparse error."""

    def __call__(self, parser, namespace, values, option_string=None):
        if len(values) == 1 and values[0] in RUNTIME_DEVICES:
            setattr(namespace, self.dest, values[0])
        elif all(v in MODEL_DEVICES for v in values):
            setattr(namespace, self.dest, list(dict.fromkeys(values)))
        else:
            parser.error(f"argument --device: expected one of {', '.join(RUNTIME_DEVICES)}, or with --model one or "
                         f"more of {' '.join(MODEL_DEVICES)}; got {' '.join(values)}")


def configure(parser) -> None:
    parser.add_argument("--quick", action="store_true",
                        help="a small preset (GPU: 3 shapes, N 16/64/256/1024, fp16; CPU: the tiny shape, N 16/64)")
    parser.add_argument("--dtype", nargs="+", metavar="DTYPE",
                        help="fp16, bf16, fp32 (default: fp16 bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--n", nargs="+", type=int, metavar="N",
                        help="sequence lengths (frames); default 16..2048 on GPU; also the UNet frame counts")
    parser.add_argument("--shapes", nargs="+", metavar="NAME", help="named shapes (see --list)")
    parser.add_argument("--impls", nargs="+", metavar="IMPL",
                        help="implementations to run (default: all; on CUDA all but vstar_auto, which runs the "
                             "Triton kernel vstar_triton times). On CPU ours is vstar_auto, tar_attention's default "
                             "path; vstar_triton is only checked there, in the Triton interpreter")
    parser.add_argument("--device", nargs="+", action=_Device, default="auto", metavar="DEVICE",
                        help="where to run: auto, cuda or cpu (default: cuda when available); with --model the "
                             "GPUs to model: h100 h200 (default: both)")
    parser.add_argument("--out", metavar="DIR",
                        help="results directory (default: benchmarks/results of the source checkout this package "
                             "runs from, else ./vstar-bench-results; the paths written are printed)")
    parser.add_argument("--time-budget-s", type=float, metavar="S",
                        help="stop measuring after S seconds; the rest get 'unsupported: not run: ...' rows")
    parser.add_argument("--resume", action="store_true",
                        help="skip cells this commit already measured in today's CSV")
    parser.add_argument("--no-plots", action="store_true", help="write the CSV and markdown only")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--list", action="store_true", help="list the named shapes and implementations")
    parser.add_argument("--backward", action="store_true",
                        help="time the backward pass instead (GPU only): the Triton backward vs autograd on the eager "
                             "reference vs SDPA's, on the backward cases; rows go to <device>-<yyyymmdd>-backward.csv "
                             "in the results directory (--out)")
    parser.add_argument("--static", action="store_true",
                        help="no GPU needed: compile every kernel the launchers start (and a plain-attention "
                             "baseline) as a GPU launch would, and write registers, spills, occupancy, MMA kind and "
                             "instructions per score element to static-sm<arch>.csv/.md (see bench/static.py)")
    parser.add_argument("--arch", nargs="+", type=int, default=[80, 90], metavar="SM",
                        help="with --static: the SM versions to compile for (default: 80 90)")
    parser.add_argument("--model-table", action="store_true",
                        help="print the bytes/FLOPs table (the GPU shapes and N unless --shapes/--n), measure nothing")
    parser.add_argument("--traffic", action="store_true",
                        help="count the forward's bytes and MMA FLOPs in the Triton interpreter (any machine) "
                             "and write traffic.csv/.md; with --quick, the CI subset")
    parser.add_argument("--model", action="store_true",
                        help="no GPU needed: a roofline model of the forward time per call on H100/H200 for ours, "
                             "a FlashAttention loop and every peer on the GPU shapes, calibrated on published "
                             "FlashAttention-2 numbers; writes model-<gpu>.csv/.md/.png (see bench/model.py)")
    parser.add_argument("--dit", action="store_true",
                        help="with --model: the video DiT self-attention shapes (Wan 2.1, CogVideoX-5B, "
                             "HunyuanVideo, LTX-Video) with frame ids; writes model-dit-<gpu>.csv/.md")
    parser.set_defaults(device_error=parser.error)


def runs_cpu_kernels(args) -> bool:
    """Whether these options time the Triton kernels on CPU tensors (in the Triton interpreter)."""
    import torch

    if args.traffic:
        return True  # counted in the interpreter, with or without a GPU
    if args.list or args.model_table or args.backward or args.static or args.model:
        return False
    return args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available())


def _check_device(args) -> None:
    """GPU names only with --model, and --model only with GPU names (or no --device): argparse errors."""
    if args.model and isinstance(args.device, str) and args.device != "auto":
        args.device_error(f"argument --device: {args.device} is not a GPU to model; with --model use one or more "
                          f"of {' '.join(MODEL_DEVICES)}")
    if getattr(args, "dit", False) and not args.model:
        args.device_error("argument --dit: the DiT rows are a model: use it with --model")
    if not args.model and isinstance(args.device, list):
        args.device_error(f"argument --device: GPUs to model ({' '.join(args.device)}) need --model; to run, use "
                          f"one of {', '.join(RUNTIME_DEVICES)}")


def main(args) -> int:
    _check_device(args)
    if args.model:
        from .model import main as run_model

        return run_model(args)
    if args.traffic:
        from .traffic import main as traffic

        return traffic(args)
    if args.static:
        from .static import main as run_static

        return run_static(args)
    if args.backward:
        from .backward import main as run_backward

        return run_backward(args)
    from .harness import main as run

    return run(args)
