"""The command line (`vstar-kernels`, `python -m vstar_kernels`) and the README's `make demo` / `make test`.

tests/conftest.py sets TRITON_INTERPRET=1 for this process, and subprocesses would inherit it;
a user's shell usually has no TRITON_INTERPRET at all, so the subprocesses here run without it.
"""

import argparse
import csv
import functools
import pathlib
import re
import shutil
import subprocess
import sys

import pytest
import torch

import vstar_kernels as vk
from vstar_kernels import _drawing, _env, cli

from ..helpers import ROOT, clean_env

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

CPU = not torch.cuda.is_available()


def run(*args, env=None, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "vstar_kernels", *args], capture_output=True, text=True,
                          timeout=600, env=clean_env() if env is None else env, cwd=cwd)


def test_kernels_run_in_the_interpreter_in_this_suite():
    """`make test` relies on tests/conftest.py turning the interpreter on (see test_make_test_...)."""
    q = torch.randn(1, 2, 16, 16, device="cpu" if CPU else "cuda")
    torch.testing.assert_close(vk.tar_attention(q, q, q, backend="triton"), vk.tar_attention_reference(q, q, q))


def test_help_names_the_command_as_typed():
    res = run("--help")
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith("usage: python -m vstar_kernels ")
    assert cli.DESCRIPTION.split(":")[0] in res.stdout and "@command" not in res.stdout
    for name in cli.COMMANDS:
        assert name in res.stdout


def test_console_script_help_names_it(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--help"])  # what setup.py's `vstar-kernels` entry point runs
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith("usage: vstar-kernels ")


def test_info_lists_versions_and_backends():
    res = run("info")
    assert res.returncode == 0, res.stderr
    assert f"torch         {torch.__version__}" in res.stdout
    assert ("\nTRITON_INTERPRET not set (the Triton kernels run compiled, on CUDA tensors; TRITON_INTERPRET=1 runs "
            "them on CPU tensors)\n") in res.stdout
    assert "backend reference   on cpu    : available" in res.stdout
    assert "backend triton      on cpu    : unavailable: cpu tensors need TRITON_INTERPRET=1" in res.stdout


@pytest.mark.parametrize("value,line", [
    ("1", "TRITON_INTERPRET '1' (the Triton kernels run in the interpreter, on CPU tensors)"),
    ("", "TRITON_INTERPRET '' (the Triton kernels run compiled, on CUDA tensors; TRITON_INTERPRET=1 runs them on "
         "CPU tensors)"),
])
def test_info_says_what_triton_interpret_does(value, line, monkeypatch, capsys):
    monkeypatch.setenv("TRITON_INTERPRET", value)
    assert cli.main(["info"]) == 0
    assert f"\n{line}\n" in capsys.readouterr().out


def test_help_and_a_wrong_option_answer_without_importing_torch():
    """argparse alone answers `--help` and a bad option: torch (seconds to import) is imported by the commands."""
    for argv, code in ((["--help"], 0), (["bench", "--help"], 0), (["plot-delta", "--num-frames", "x"], 2),
                       (["info", "--bogus"], 2)):
        res = subprocess.run([sys.executable, "-X", "importtime", "-m", "vstar_kernels", *argv], capture_output=True,
                             text=True, timeout=120, env=clean_env(), cwd=ROOT)
        assert res.returncode == code, res.stderr
        imported = {line.split("|")[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")}
        assert "vstar_kernels.cli" in imported and "torch" not in imported, argv


DPI_RANGE = ("argument --dpi: must be an int from 10 to 600 (fewer draws no labels' text; more is past print quality, "
             "a figure's pixels growing as the dpi squared), got")
IMAGE_OPTION_ERRORS = [
    (["--dpi", "-5"], f"{DPI_RANGE} '-5'"),
    (["--dpi", "5", "--out", "{tmp}/x.png"], f"{DPI_RANGE} '5'"),  # the command's error after parsing before
    (["--dpi", "601", "--out", "{tmp}/x.png"], f"{DPI_RANGE} '601'"),  # drawn, 185 megapixels at 1200 for the demo
    (["--dpi", "100000", "--out", "{tmp}/x.png"], f"{DPI_RANGE} '100000'"),  # a MemoryError in matplotlib before
    (["--out", "/nonexistent/dir/d.png"], "argument --out: the folder /nonexistent/dir does not exist"),
    (["--out", "{tmp}"], "argument --out: {tmp} is a folder; give the image's file name (e.g. {tmp}/out.png)"),
    (["--out", "{tmp}/delta"], "argument --out: {tmp}/delta has no suffix to name the image format (.png, .pdf, "
                               ".svg); matplotlib would add one and write another file"),
    (["--out", "{tmp}/delta.xyz"], "argument --out: {tmp}/delta.xyz names a format matplotlib does not write, .xyz "
                                   "(formats: {formats})"),
]


@pytest.mark.parametrize("command", ["plot-delta", "demo-attention"])
def test_image_commands_state_the_dpi_range_in_their_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--help"])
    assert exit_.value.code == 0
    assert "--dpi DPI pixels per inch, 10 to 600 (default: 100)" in " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command, argv, message", [
    ("plot-delta", ["--num-frames", "0"], "argument --num-frames: must be an int from 1 to 2048 (a bigger matrix "
                                          "takes GBs and minutes to draw), got '0'"),
    # an allocation's traceback before
    ("plot-delta", ["--num-frames", "100000"], "argument --num-frames: must be an int from 1 to 2048 (a bigger "
                                               "matrix takes GBs and minutes to draw), got '100000'"),
    ("plot-delta", ["--num-frames", "²"], "argument --num-frames: must be an int from 1 to 2048 (a bigger matrix "
                                          "takes GBs and minutes to draw), got '²'"),  # argparse's own error before
    ("plot-delta", ["--sigmas", "1", "-2"], "argument --sigmas: must be a number > 0 (inf: no band), got '-2'"),
    *[(command, argv, message) for command in ("plot-delta", "demo-attention")
      for argv, message in IMAGE_OPTION_ERRORS],
])
def test_image_commands_name_the_bad_option(command, argv, message, capsys, tmp_path):
    """Refused before any work (demo-attention's frame count is the demo's to check: test_attention_demo)."""
    from matplotlib.backend_bases import FigureCanvasBase

    argv = [a.format(tmp=tmp_path) for a in argv]
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, *argv])
    assert exit_.value.code == 2
    formats = ", ".join(sorted(FigureCanvasBase.get_supported_filetypes()))  # this matplotlib's (png, pdf, svg, ...)
    assert "png" in formats
    expected = f"vstar-kernels {command}: error: {message.format(tmp=tmp_path, formats=formats)}"
    assert capsys.readouterr().err.splitlines()[-1] == expected


@pytest.mark.parametrize("command", ["plot-delta", "demo-attention"])
def test_a_pgf_image_without_tex_is_refused_before_any_work(command, capsys, tmp_path, monkeypatch):
    """matplotlib sets a .pgf image's text with TeX: without it, savefig failed after the work with a traceback."""
    import matplotlib

    monkeypatch.setattr(_drawing.shutil, "which", lambda name: None)
    with pytest.raises(SystemExit) as exit_:
        cli.main([command, "--out", str(tmp_path / "d.pgf")])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vstar-kernels {command}: error: argument --out: {tmp_path}/d.pgf is a .pgf image, which needs TeX "
        f"({matplotlib.rcParams['pgf.texsystem']}), not on the PATH")


def test_demo_on_a_gpu_machine_with_triton_interpret_runs_cpu_tensors(monkeypatch, capsys):
    """The interpreter takes CPU tensors only: CUDA ones ended the demo in a traceback."""
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cli.cmd_demo(argparse.Namespace()) == 0
    out = capsys.readouterr().out
    assert out.startswith("TRITON_INTERPRET is set: the Triton kernels run in the Triton interpreter")
    assert "device: cpu (interpreter)" in out and out.endswith("all outputs match the reference\n")


def test_image_commands_name_a_seed_out_of_range(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo-attention", "--seed", str(2 ** 64)])
    assert capsys.readouterr().err.splitlines()[-1] == ("vstar-kernels demo-attention: error: argument --seed: must be "
                                                        f"an int from -2**63 to 2**64 - 1, got '{2 ** 64}'")
    assert [cli._seed(text) for text in ("-1", "+5", str(2 ** 64 - 1))] == [-1, 5, 2 ** 64 - 1]


def test_out_expands_a_tilde_and_a_failed_write_is_an_error_on_stderr(tmp_path, monkeypatch, capsys):
    """`--out=~/...` reaches the program with its ~ (the shell expands it only as a word's start): it is the home
    folder, not a folder named ~ in the working one."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    monkeypatch.chdir(tmp_path)
    assert cli.main(["plot-delta", "--out=~/delta.png", "--num-frames", "4"]) == 0
    assert (tmp_path / "home" / "delta.png").is_file() and not (tmp_path / "~").exists()
    assert cli.bench.results_folder("~/results") == str(tmp_path / "home" / "results")
    capsys.readouterr()
    taken = tmp_path / "taken.png"
    taken.mkdir()  # a folder where the image goes: the write fails after parsing
    args = argparse.Namespace(sigmas=[1.0], num_frames=4, out=str(taken), dpi=50)
    assert cli.cmd_plot_delta(args) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("plot-delta: [Errno 21] Is a directory")


@pytest.mark.parametrize("argv, message", [
    (["--time-budget-s", "0"], "argument --time-budget-s: must be a number of seconds > 0, got '0'"),
    (["--time-budget-s", "-1"], "argument --time-budget-s: must be a number of seconds > 0, got '-1'"),
    (["--time-budget-s", "nan"], "argument --time-budget-s: must be a number of seconds > 0, got 'nan'"),
    (["--out", "{file}"], "argument --out: {file} is a file; --out names the results folder"),
])
def test_bench_names_the_bad_option(argv, message, capsys, tmp_path):
    file = tmp_path / "results.csv"
    file.write_text("")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", *[a.format(file=file) for a in argv]])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"vstar-kernels bench: error: {message.format(file=file)}"


@pytest.mark.parametrize("out, why", [("/proc", "cannot be written to"), ("/proc/x", "cannot be made in /proc")])
def test_bench_refuses_an_out_that_takes_no_file_before_any_work(out, why, capsys, monkeypatch):
    """Only a file was refused: a folder no file can be written to (/proc; mode bits say nothing to root) failed
    after the sweep."""
    def ran(args):
        raise AssertionError("the sweep ran")

    monkeypatch.setitem(cli.COMMANDS, "bench", (ran, *cli.COMMANDS["bench"][1:3], None, ()))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["bench", "--quick", "--out", out])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"vstar-kernels bench: error: argument --out: {out} {why} (No such file or directory); --out names a "
        "folder the results can be written to")


def make_dry_run(target, setup_dir, cwd=ROOT, **variables):
    """The commands `make TARGET` would run (make -n), with the install stamps under setup_dir."""
    args = [f"{k}={v}" for k, v in {"PY": sys.executable, "SETUP_DIR": setup_dir, **variables}.items()]
    res = subprocess.run(["make", "-n", target, *args], capture_output=True, text=True, timeout=60, env=clean_env(),
                         cwd=cwd)
    assert res.returncode == 0, res.stderr
    return [line.strip() for line in res.stdout.splitlines()]


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_installs_the_package_without_the_test_extra(tmp_path):
    lines = make_dry_run("demo", tmp_path)
    assert [line for line in lines if "pip install" in line] == [
        f'{sys.executable} -c "import torch" 2>/dev/null || {sys.executable} -m pip install torch==2.13.0',
        f'{sys.executable} -m pip install -e "."']
    assert lines[-1] == f"{sys.executable} -m vstar_kernels demo"


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_installs_once_until_setup_py_or_the_interpreter_changes(tmp_path):
    """A stamp per install, named by setup.py's content and the interpreter: a second `make test` (or a `make demo`
    after it) runs no pip; a changed setup.py or another interpreter installs again."""
    for name in ("Makefile", "setup.py"):
        shutil.copy(ROOT / name, tmp_path / name)
    first = make_dry_run("test", ".setup", cwd=tmp_path)
    assert f'{sys.executable} -m pip install -e ".[test]"' in first
    [stamp] = [line.split()[-1] for line in first if line.startswith("mkdir -p .setup && touch ")]
    (tmp_path / stamp).parent.mkdir()
    (tmp_path / stamp).touch()
    for target in ("test", "demo"):
        assert not [line for line in make_dry_run(target, ".setup", cwd=tmp_path) if "pip" in line]
    assert any("pip install" in line for line in make_dry_run("test", ".setup", cwd=tmp_path, PY="python3.999"))
    with open(tmp_path / "setup.py", "a") as f:
        f.write("# a change\n")
    assert f'{sys.executable} -m pip install -e ".[test]"' in make_dry_run("test", ".setup", cwd=tmp_path)


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_runs_without_triton_interpret():
    """The README's first command. `-o setup-demo`: the set-up's pip install is not repeated here."""
    res = subprocess.run(["make", "-o", "setup-demo", "demo", f"PY={sys.executable}"], capture_output=True, text=True,
                         timeout=600, env=clean_env(), cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all outputs match the reference" in res.stdout
    if CPU:
        assert "Triton interpreter" in res.stdout and "MISMATCH" not in res.stdout


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_test_sets_up_then_runs_the_suite_with_the_interpreter(tmp_path):
    """The README's second command: the set-up it runs, then its pytest call on one test that needs
    the interpreter (the whole suite is what CI runs)."""
    lines = make_dry_run("test", tmp_path)
    assert f'{sys.executable} -m pip install -e ".[test]"' in lines
    assert lines[-1] == (f"{sys.executable} -m pytest -q -o console_output_style=count --durations=15 -n auto "
                         "--dist loadfile --no-loadscope-reorder")
    one = f"{pathlib.Path(__file__).resolve().relative_to(ROOT)}::test_kernels_run_in_the_interpreter_in_this_suite"
    res = subprocess.run(["make", "-o", "setup-test", "test", f"PY={sys.executable}"], capture_output=True, text=True,
                         timeout=600, env=clean_env(PYTEST_ADDOPTS=f"{one} -p no:cacheprovider"), cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 passed" in res.stdout


def test_plot_delta_and_demo_attention_draw_their_pictures(tmp_path):
    res = run("plot-delta", "--sigmas", "1", "--num-frames", "8", "--dpi", "30", "--out", str(tmp_path / "d.png"))
    assert res.returncode == 0, res.stdout + res.stderr
    res = run("demo-attention", "--num-frames", "4", "--size", "8", "--dpi", "30", "--out", str(tmp_path / "a.png"))
    assert res.returncode == 0, res.stdout + res.stderr
    for name in ("d.png", "a.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(not CPU, reason="the CPU path: the kernels in the Triton interpreter")
def test_bench_runs_the_kernels_without_triton_interpret_and_writes_where_it_runs(tmp_path):
    """Run from another folder, the package in this checkout: the results go to ./vstar-bench-results there."""
    res = run("bench", "--quick", "--n", "16", "--impls", "vstar_triton", "--no-plots", "--no-progress",
              env=clean_env(PYTHONPATH=str(ROOT)), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    [path] = (tmp_path / "vstar-bench-results").glob("*.csv")
    with path.open() as f:
        status = {r["impl"]: r["status"] for r in csv.DictReader(f)}
    assert status["vstar_triton_interpreter"].startswith("checked: "), status


@pytest.mark.parametrize("module", ["torch", "triton"])
def test_a_python_without_the_requirements_is_told_how_to_install_them(module, monkeypatch, capsys):
    """A checkout run with a Python the package was never installed in: a message, not a traceback."""
    monkeypatch.setitem(sys.modules, module, None)
    assert cli.main(["demo"]) == 1
    assert capsys.readouterr().err.strip() == (f"demo needs {module}, not installed in this Python ({sys.executable}): "
                                               "`make demo` in the checkout installs them, or see the README's Install")


def _run_code(code, folder, *argv):
    """`python -c code argv` in `folder`, which comes first on the path, as a fresh shell would run it."""
    return subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, cwd=folder,
                          env=clean_env(PYTHONPATH=f"{folder}:{ROOT}"))


def test_a_triton_that_raises_more_than_an_import_error_is_named_by_every_command(tmp_path):
    """torch imports Triton where it is and takes only an ImportError: info was a traceback of torch's import."""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text("raise RuntimeError('a broken install')\n")
    code = "import sys; from vstar_kernels import cli; sys.exit(cli.main(sys.argv[1:]))"
    for argv in (["info"], ["demo"]):
        result = _run_code(code, tmp_path, *argv)
        assert result.returncode == 1 and result.stderr.strip().startswith(
            f"{argv[0]} needs triton, not importable (RuntimeError: a broken install) in this Python"), result.stderr


@pytest.mark.parametrize("broken", [False, True], ids=["none", "broken"])
def test_without_triton_info_and_the_pictures_run_and_the_kernels_commands_say_why_not(broken, tmp_path):
    """Every command was refused without Triton (info too, which says why a backend cannot run: the CUDA
    extension's page sends a machine without Triton there), and a broken install was a traceback."""
    if broken:
        (tmp_path / "triton").mkdir()
        (tmp_path / "triton" / "__init__.py").write_text("raise ImportError('a broken install')\n")
        setup, reason = "", "not importable (ImportError: a broken install)"
    else:
        setup, reason = "sys.modules['triton'] = None; ", "not installed"
    code = f"import sys; {setup}from vstar_kernels import cli; sys.exit(cli.main(sys.argv[1:]))"
    run = functools.partial(_run_code, code, tmp_path)
    info = run("info")
    assert info.returncode == 0, info.stderr
    assert re.search(r"^triton +not (installed|importable \(ImportError\))$", info.stdout, re.M), info.stdout
    assert re.search(r"^backend triton +on cpu +: unavailable: triton is not importable", info.stdout, re.M)
    assert re.search(r"^backend cpu +on cpu +: available$", info.stdout, re.M)
    assert run("plot-delta", "--out", "d.png").returncode == 0 and (tmp_path / "d.png").stat().st_size
    for argv in (["demo"], ["bench", "--quick", "--out", "b"]):
        result = run(*argv)
        assert result.returncode == 1 and result.stderr.strip().startswith(
            f"{argv[0]} needs triton, {reason} in this Python"), result.stderr


@pytest.mark.parametrize("argv, module, extra", [
    (["plot-delta"], "matplotlib", "plot"),
    (["demo-attention"], "diffusers", "diffusers"),
    (["demo-attention"], "matplotlib", "plot"),
])
def test_a_missing_extra_is_named(argv, module, extra, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # import fails with ModuleNotFoundError
    assert cli.main([*argv, "--out", str(tmp_path / "x.png")]) == 1
    assert capsys.readouterr().err.strip() == (f"{argv[0]} needs {module}, not installed: "
                                               f'pip install -e "{ROOT}[{extra}]"')
    assert not list(tmp_path.iterdir())


def test_install_hint_fits_a_checkout_or_a_wheel(monkeypatch):
    """The package is on no index: its extras install from the checkout it runs from, or from one."""
    assert _env.install_hint("diffusers,plot") == f'pip install -e "{ROOT}[diffusers,plot]"'
    monkeypatch.setattr(_env, "source_checkout", lambda: None)
    assert _env.install_hint("plot") == 'pip install ".[plot]" in a checkout of the vstar_kernels repository'


def test_cuda_build_hint_fits_a_checkout_or_a_wheel(tmp_path):
    from vstar_kernels.ops.tar_cuda import build_hint

    assert "pip install -e . --no-build-isolation in " + str(tmp_path) in build_hint(tmp_path)
    wheel = build_hint(None)
    assert "installed wheel" in wheel and "-e" not in wheel.split()
    assert _env.source_checkout() == ROOT
