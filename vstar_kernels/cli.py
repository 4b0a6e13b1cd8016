"""`vstar-kernels <command>` (or `python -m vstar_kernels`): each subcommand registers itself with @command."""

from __future__ import annotations

import argparse
import importlib
import os
import platform
import subprocess
import sys
import time

from . import __version__, _env, bench
from ._drawing import MAX_DPI, MIN_DPI, image_path_problem

DESCRIPTION = ("Fused kernels for VSTAR's temporal attention regularization (TAR): check the installation, "
               "run the kernels against the reference, draw TAR's matrices and attention maps, benchmark.")
# The optional modules a command imports -> the extra of setup.py that installs them.
EXTRA_OF = {"matplotlib": "plot", "diffusers": "diffusers"}

COMMANDS = {}


def command(name, help_text, configure=None, cpu_kernels=None, needs=()):
    """Register `fn(args) -> exit code` as a subcommand (it imports torch inside, so `--help` does not);
    `configure(parser)` adds its options. `cpu_kernels(args)`: whether the call runs the Triton kernels on CPU
    tensors, which `main` then does in a child process with TRITON_INTERPRET=1 (a command given one needs Triton).
    `needs`: modules it imports.
    """
    def register(fn):
        COMMANDS[name] = (fn, help_text, configure, cpu_kernels, needs)
        return fn
    return register


def _unimportable(modules) -> dict:
    """Each module of `modules` that does not import, with its error (a broken install raises anything)."""
    missing = {}
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:
            missing[module] = exc
    return missing


def _naming(missing: dict) -> str:
    """"triton, not installed" or "a and b, not installed"; each other reason given with its module."""
    why = {module: "not installed" if isinstance(exc, ModuleNotFoundError)
           else f"not importable ({type(exc).__name__}: {exc})" for module, exc in missing.items()}
    if len(set(why.values())) == 1:
        return f"{' and '.join(why)}, {next(iter(why.values()))}"
    return " and ".join(f"{module} ({reason})" for module, reason in why.items())


def missing_extras(command_name, modules) -> str:
    """"" when every module imports; otherwise a message naming the extras that install the missing ones."""
    missing = _unimportable(modules)
    if not missing:
        return ""
    extras = ",".join(sorted({EXTRA_OF[m] for m in missing}))
    return f"{command_name} needs {_naming(missing)}: {_env.install_hint(extras)}"


def _interpret_line() -> str:
    """What `info` says of TRITON_INTERPRET: its value (or that it is unset), and what the Triton kernels run on."""
    value = os.environ.get("TRITON_INTERPRET")
    shown = "not set" if value is None else repr(value)
    if _env.interpreter_requested():
        return f"{shown} (the Triton kernels run in the interpreter, on CPU tensors)"
    return f"{shown} (the Triton kernels run compiled, on CUDA tensors; TRITON_INTERPRET=1 runs them on CPU tensors)"


@command("info", "versions, devices, and which backends can run (and why not)")
def cmd_info(args) -> int:
    import torch

    from .dispatch import availability
    from .ops import tar_cuda

    print(f"vstar_kernels {__version__}")
    print(f"python        {platform.python_version()}")
    print(f"torch         {torch.__version__}")
    print(f"triton        {_env.triton_version()}")
    print(f"diffusers     {_env.diffusers_version()}")
    print(f"TRITON_INTERPRET {_interpret_line()}")
    cuda_ext = tar_cuda.load()
    ext = f"built: {tar_cuda.extension_path()}" if cuda_ext.ok else f"unavailable: {cuda_ext.reason}"
    print(f"cuda ext      {ext}")
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            devices.append(f"cuda:{i}")
            print(f"cuda:{i}        {torch.cuda.get_device_name(i)}")
    else:
        print("cuda          not available")
    for dev in devices:
        reasons = availability(dev)
        width = max(map(len, reasons))  # the names in one column (triton-lean is the longest)
        for name, why in reasons.items():
            print(f"backend {name:<{width}} on {dev:<7}: {'available' if not why else 'unavailable: ' + why}")
    return 0


def _time_ms(fn, cuda: bool) -> float:
    """Median of triton's do_bench on CUDA; one warm call then one timed call on CPU."""
    if cuda:
        import triton.testing

        return float(triton.testing.do_bench(fn, return_mode="median"))
    fn()
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def _no_cuda(args) -> bool:
    import torch

    return not torch.cuda.is_available()


@command("demo", "check the kernel against the reference and print a small timing table", cpu_kernels=_no_cuda)
def cmd_demo(args) -> int:
    import torch
    import torch.nn.functional as F

    from . import tar_attention, tar_attention_reference

    cuda = torch.cuda.is_available() and not _env.interpreter_requested()  # the interpreter takes CPU tensors
    if not cuda:
        print(f"{'TRITON_INTERPRET is set' if torch.cuda.is_available() else 'No CUDA device'}: the Triton kernels "
              "run in the Triton interpreter (TRITON_INTERPRET=1) on small CPU shapes. Interpreter times measure "
              "the interpreter, not the kernel.")
    device = "cuda" if cuda else "cpu"
    dtype = torch.float16 if cuda else torch.float32
    # (name, batch x spatial, heads, frames, head dim)
    shapes = ([("ModelScope 40x64 level 0", 2 * 40 * 64, 5, 16, 64),
               ("AnimateDiff 64x64 level 1", 2 * 32 * 32, 8, 32, 80),
               ("long video", 2 * 10 * 16, 5, 1024, 64)] if cuda else
              [("tiny, packed", 8, 2, 16, 40), ("tiny, tiled", 1, 2, 160, 64)])
    torch.manual_seed(0)
    print(f"\ndevice: {torch.cuda.get_device_name() if cuda else 'cpu (interpreter)'}, dtype {dtype}")
    header = (f"{'shape':<28}{'B*H':>8}{'N':>6}{'D':>5}  {'max err':>9}  {'triton ms':>10}  {'reference ms':>13}"
              f"  {'sdpa ms':>8}")
    print(header)
    print("-" * len(header))
    ok = True
    for name, batch, heads, n, d in shapes:
        q, k, v = (torch.randn(batch, n, heads, d, device=device, dtype=dtype).transpose(1, 2) for _ in range(3))
        out = tar_attention(q, k, v, sigma=1.0, backend="triton")
        ref = tar_attention_reference(q, k, v, sigma=1.0)
        err = (out.float() - ref.float()).abs().max().item()
        tol = 2e-2 if dtype == torch.float16 else 1e-4
        ok &= err <= tol
        t_tri = _time_ms(lambda: tar_attention(q, k, v, backend="triton"), cuda)
        t_ref = _time_ms(lambda: tar_attention_reference(q, k, v), cuda)
        t_sdpa = _time_ms(lambda: F.scaled_dot_product_attention(q, k, v), cuda)
        print(f"{name:<28}{batch * heads:>8}{n:>6}{d:>5}  {err:>9.2e}  {t_tri:>10.3f}  {t_ref:>13.3f}  {t_sdpa:>8.3f}"
              + ("" if err <= tol else f"  MISMATCH (tol {tol})"))
    print("\nall outputs match the reference" if ok else "\nSOME OUTPUTS DO NOT MATCH THE REFERENCE")
    return 0 if ok else 1


def _spelled(parser, namespace, dest: str, option_string: str) -> None:
    """Records which spelling of the option `dest` a command line gave; a second spelling is argparse's error
    (whatever the values: the last one given had won, in silence)."""
    key = f"_spelling_of_{dest}"
    earlier = getattr(namespace, key, None)
    if earlier is not None and earlier != option_string:
        parser.error(f"argument {option_string}: not allowed with argument {earlier} (one option, two spellings)")
    setattr(namespace, key, option_string)


class _Spelled(argparse.Action):
    """An option with an old spelling: stores its value, noting that this spelling was given."""

    def __call__(self, parser, namespace, values, option_string=None):
        _spelled(parser, namespace, self.dest, option_string)
        setattr(namespace, self.dest, values)


class _Deprecated(argparse.Action):
    """An old option's spelling: sets the new option's value and says on stderr that it is deprecated."""

    def __call__(self, parser, namespace, values, option_string=None):
        _spelled(parser, namespace, self.dest, option_string)
        new = "--" + self.dest.replace("_", "-")
        print(f"{option_string} is deprecated and will be removed in the next release: use {new}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def _deprecated_option(parser, old: str, new: str, **kwargs) -> None:
    """`new` (its keywords `kwargs`, given with action=_Spelled) and `old`, its deprecated spelling."""
    parser.add_argument(old, dest=new.lstrip("-").replace("-", "_"), action=_Deprecated, help=argparse.SUPPRESS,
                        default=argparse.SUPPRESS, **kwargs)


def _seed(text: str) -> int:
    """--seed: an int torch.manual_seed takes, -2**63 to 2**64 - 1."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not -2 ** 63 <= value < 2 ** 64:
        raise argparse.ArgumentTypeError(f"must be an int from -2**63 to 2**64 - 1, got {text!r}")
    return value


def _int_in(low: int, high: int, why: str):
    """An argparse type: an int from `low` to `high` (`why`: what a larger one would do)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be an int from {low} to {high} ({why}), got {text!r}")
        return value
    return parse


def _float(ok, what: str):
    """An argparse type: a number for which `ok` holds (`what` says which)."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value
    return parse


_sigma = _float(lambda value: value > 0, "a number > 0 (inf: no band)")  # a Gaussian's width
# what the demo's float32 model takes (the library's bound, refused there naming its parameter)
_strength32 = _float(lambda value: abs(value) <= 3.4028234663852886e38,
                     "a number of at most 3.4028234663852886e+38 in size (the largest float32)")


# the largest pictures the commands draw in about a minute and 1 GB (plot-delta: at its three default sigmas;
# demo-attention: with the other size at its default, DEMO_WORK bounding the two together)
_DELTA_FRAMES = _int_in(1, 2048, "a bigger matrix takes GBs and minutes to draw")
_DEMO_FRAMES = _int_in(2, 256, "the demo's maps grow as the frames squared")
_DEMO_SIZE = _int_in(2, 64, "the demo's spatial attention grows as the size to the fourth")
DEMO_WORK = 256 * 16 ** 2  # frames x size^2: 256 frames at size 16, or 16 frames at size 64
# the library's bounds (analysis.check_dpi), checked here to name the option
_DPI = _int_in(MIN_DPI, MAX_DPI, "fewer draws no labels' text; more is past print quality, a figure's pixels "
               "growing as the dpi squared")
_DPI_HELP = f"pixels per inch, {MIN_DPI} to {MAX_DPI} (default: 100)"


def _image_path(text: str) -> str:
    """An output image's path, refused before any work when its folder does not exist, when it is a folder, or
    when matplotlib would not write it as named (`image_path_problem`)."""
    text = os.path.expanduser(text)  # "--out=~/x.png": the shell leaves that ~ alone
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"the folder {folder} does not exist")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text} is a folder; give the image's file name (e.g. {text}/out.png)")
    problem = image_path_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text} {problem}")
    return text


def _plot_delta_options(parser) -> None:
    parser.add_argument("--sigmas", type=_sigma, nargs="+", default=[1.0, 4.0, 8.0],
                        help="one panel per sigma (default: 1 4 8)")
    parser.add_argument("--num-frames", type=_DELTA_FRAMES, default=16, action=_Spelled,
                        help="frames N of the N x N matrix, at most 2048 (default: 16)")
    _deprecated_option(parser, "--frames", "--num-frames", type=_DELTA_FRAMES)
    parser.add_argument("--out", type=_image_path, default="delta.png",
                        help="output image; format from the suffix (default: delta.png)")
    parser.add_argument("--dpi", type=_DPI, default=100, help=_DPI_HELP)


@command("plot-delta", "draw TAR's Gaussian matrix dA for several sigma (paper Fig. S.13)", _plot_delta_options,
         needs=("matplotlib",))
def cmd_plot_delta(args) -> int:
    from .analysis import plot_delta

    try:
        drawn = plot_delta(args.sigmas, args.num_frames, args.out, dpi=args.dpi)
    except (TypeError, ValueError, OSError) as exc:  # OSError: the image could not be written
        print(f"plot-delta: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: {', '.join(drawn)} over {args.num_frames} frame{'s' * (args.num_frames > 1)}")
    return 0


def _demo_attention_options(parser) -> None:
    parser.add_argument("--num-frames", type=_DEMO_FRAMES, default=16, action=_Spelled,
                        help="frames of the random video, 2 to 256 (default: 16)")
    _deprecated_option(parser, "--frames", "--num-frames", type=_DEMO_FRAMES)
    parser.add_argument("--sigma", type=_sigma, default=1.0, help="TAR's sigma at level 0 (default: 1)")
    parser.add_argument("--strength", type=_strength32, default=1.0, help="TAR's strength at level 0 (default: 1)")
    parser.add_argument("--size", type=_DEMO_SIZE, default=16, help="latent height and width, 2 to 64 (default: 16)")
    parser.add_argument("--seed", type=_seed, default=0, help="seed of the weights and the latents (default: 0)")
    parser.add_argument("--out", type=_image_path, default="attention.png",
                        help="output image (default: attention.png)")
    parser.add_argument("--dpi", type=_DPI, default=100, help=_DPI_HELP)
    parser.add_argument("--color-scale", choices=("shared", "per-panel"), default="shared", action=_Spelled,
                        help="one colour scale for all panels, or each panel on its own min..max (default: shared)")
    _deprecated_option(parser, "--scale", "--color-scale", choices=("shared", "per-panel"))


@command("demo-attention", "temporal attention maps of a tiny random video UNet without and with TAR",
         _demo_attention_options, needs=("diffusers", "matplotlib"))
def cmd_demo_attention(args) -> int:
    if args.num_frames * args.size ** 2 > DEMO_WORK:  # before the demo's import (diffusers: seconds)
        print(f"demo-attention: --num-frames {args.num_frames} with --size {args.size} is too large a demo (frames x "
              f"size^2 at most {DEMO_WORK:,}, e.g. 256 frames at size 16 or 16 frames at size 64)", file=sys.stderr)
        return 2
    from .diffusers.attention_demo import attention_demo, report

    try:
        runs = attention_demo(args.out, num_frames=args.num_frames, sigma=args.sigma, strength=args.strength,
                              size=args.size, seed=args.seed, dpi=args.dpi, color_scale=args.color_scale)
    except (TypeError, ValueError, OSError) as exc:  # OSError: the image could not be written
        print(f"demo-attention: {exc}", file=sys.stderr)
        return 2
    print(f"Step-0 temporal attention of a tiny random UNet3DConditionModel ({args.num_frames} frames), averaged over "
          f"heads and positions; TAR sigma={args.sigma:g}, strength={args.strength:g} at level 0.")
    print("diag: diagonality (1 = diagonal, 0 = unstructured); band1: attention share within 1 frame "
          f"(uniform: {(3 * args.num_frames - 2) / args.num_frames ** 2:.3f})\n")
    print(report(runs))
    print(f"\nwrote {args.out}")
    return 0


@command("comfyui-install", "add the VSTAR_TAR node to a ComfyUI installation (a small custom_nodes package)",
         lambda parser: parser.add_argument("comfyui", help="the ComfyUI directory (the one with custom_nodes/)"))
def cmd_comfyui_install(args) -> int:
    from .comfyui.install import install

    try:
        path = install(args.comfyui)
    except (ValueError, OSError) as exc:  # OSError: a folder it cannot write (read-only, another user's)
        print(f"comfyui-install: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}\nrestart ComfyUI; the node is 'VSTAR temporal attention regularization (TAR)' under "
          f"model_patches/video. vstar_kernels must be installed in the Python environment that runs ComfyUI.")
    return 0


command("bench", "benchmark every implementation: CSV rows, a markdown table, plots", bench.configure,
        cpu_kernels=bench.runs_cpu_kernels)(bench.main)


def run_with_interpreter(argv) -> int:
    """Run `python -m vstar_kernels argv` in a child process with TRITON_INTERPRET=1 from its start (triton
    keeps the mode of its first import: _env.triton_mode_mismatch)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    return subprocess.run([sys.executable, "-m", "vstar_kernels", *argv], env=env).returncode


def main(argv=None, prog="vstar-kernels") -> int:
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (_, help_text, configure, _cpu, _needs) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if configure is not None:
            configure(p)
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    fn, _, _, cpu_kernels, needs = COMMANDS[args.command]
    # a checkout run without installing the package. Only the commands that run the Triton kernels need Triton (info
    # says why they cannot run, on a platform without it too), but torch imports it where it is and takes only an
    # ImportError: a Triton that raises anything else breaks every command
    required = _unimportable(("torch", "triton"))
    if cpu_kernels is None and isinstance(required.get("triton"), ImportError):
        del required["triton"]
    if required:
        print(f"{args.command} needs {_naming(required)} in this Python ({sys.executable}): "
              "`make demo` in the checkout installs them, or see the README's Install", file=sys.stderr)
        return 1
    missing = missing_extras(args.command, needs)
    if missing:
        print(missing, file=sys.stderr)
        return 1
    if cpu_kernels is not None and cpu_kernels(args) and not _env.interpreter_requested():
        sys.stdout.flush()
        return run_with_interpreter(argv)
    return fn(args)
