"""`python -m tools.perf`: its help, and options refused before any work (each command's work is replaced by a
stub that fails the test if it runs: nothing here compiles or measures)."""

import argparse

import pytest

from tools.perf import __doc__ as overview
from tools.perf import __main__ as perf
from vstar_kernels import _env
from vstar_kernels.bench import results_folder


@pytest.fixture
def no_work(monkeypatch):
    """Every command's work a failure, and traffic run in this process (no child with TRITON_INTERPRET=1)."""
    from tools.perf import cpu, host, model, model_dit, static, traffic

    def ran(args):
        raise AssertionError(f"the work ran: {args}")

    for module in (cpu, host, model, static, traffic):
        monkeypatch.setattr(module, "main", ran)
    monkeypatch.setattr(model_dit, "dit_main", ran)
    monkeypatch.setattr(_env, "interpreter_requested", lambda: True)


def refused(argv, capsys) -> str:
    """The last line of stderr of a call refused with argparse's exit status 2."""
    with pytest.raises(SystemExit) as exit_:
        perf.main(argv)
    assert exit_.value.code == 2
    return capsys.readouterr().err.splitlines()[-1]


@pytest.mark.parametrize("out, why", [("/proc", "cannot be written to"), ("/proc/x", "cannot be made in /proc"),
                                      ("/proc/x/y", "cannot be made in /proc")])
@pytest.mark.parametrize("argv", [["static", "--quick"], ["traffic", "--quick"], ["model"], ["model", "--dit"],
                                  ["cpu", "--quick"]])
def test_an_out_that_takes_no_file_is_refused_before_any_work(argv, out, why, no_work, capsys):
    """`model` and `traffic` took /proc and failed with a traceback after all their work: the folder's mode bits
    say nothing to root, so the check writes a file there."""
    command = " ".join(a for a in argv if a != "--dit" and a != "--quick")
    assert refused([*argv, "--out", out], capsys) == (
        f"python -m tools.perf {command}: error: argument --out: {out} {why} (No such file or directory); --out "
        "names a folder the results can be written to")


def test_results_folder_leaves_nothing_of_its_check(tmp_path):
    """A writable folder passes; the check makes no folder and leaves no file (the command makes the folders: a
    check that made and removed them raced another command making the same ones)."""
    assert results_folder(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    assert results_folder(str(tmp_path)) == str(tmp_path) and list(tmp_path.iterdir()) == []
    (tmp_path / "gone").symlink_to(tmp_path / "nowhere")  # it said "cannot be made (File exists)"
    with pytest.raises(argparse.ArgumentTypeError, match=f"{tmp_path}/gone/x cannot be made: {tmp_path}/gone is a "
                                                         "link to nothing"):
        results_folder(str(tmp_path / "gone" / "x"))


def test_the_help_is_the_packages_docstring(capsys):
    with pytest.raises(SystemExit):
        perf.main(["--help"])
    out = capsys.readouterr().out
    assert "see __init__" not in out
    assert " ".join(overview.split()[:40]) in " ".join(out.split())  # its layout kept: the commands' lines
    assert "    python -m tools.perf static   [--arch 80 90] [--quick]" in out


@pytest.mark.parametrize("command, texts", [
    ("model", ["named shapes (default: every kernel shape", "with --dit, every DiT shape",
               "(default: 16, 32, ..., 2048 and 4096", "each 1..131,072"]),
    ("static", ["compile the CI subset (default: the full sweep)"]),
    ("traffic", ["count the CI subset (default: the full sweep)"]),
    ("host", ["at one thread and at torch's default thread count", "prints a table, writes no file"]),
    ("cpu", ["appended to cpu-default-path-<yyyymmdd>.csv", "(default: all five)"]),
])
def test_each_commands_help_states_its_defaults(command, texts, capsys):
    with pytest.raises(SystemExit):
        perf.main([command, "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for text in texts:
        assert text in out


def test_the_model_lengths_default_is_what_the_help_says():
    from tools.perf.model import MODEL_N

    assert list(MODEL_N) == [16, 32, 64, 128, 256, 512, 1024, 2048, 4096]


@pytest.mark.parametrize("command, why", [
    ("static", "static --quick compiles the CI subset, whose tables would replace the committed full ones"),
    ("traffic", "traffic --quick counts the CI subset, whose tables would replace the committed full ones"),
    ("cpu", "cpu --quick times two of the five cases, whose rows would join the committed full runs"),
])
def test_quick_without_out_says_what_that_command_would_write(command, why, no_work, capsys):
    """cpu was told it "writes the CI subset", static's and traffic's words."""
    from tools.perf import cpu

    assert len(cpu.CASES) == 5 and len(cpu.QUICK) == 2
    assert refused([command, "--quick"], capsys) == (f"python -m tools.perf {command}: error: {why} in "
                                                     "benchmarks/results: give --out DIR")


@pytest.mark.parametrize("argv", [["model", "--dit", "--n", "16"], ["model", "--shapes", "nonesuch"],
                                  ["model", "--n", "16"], ["static", "--quick"]])
def test_an_error_after_parsing_prints_its_commands_usage(argv, no_work, capsys):
    """They printed the top-level usage (`python -m tools.perf [-h] {static,...}`), not the command's options."""
    with pytest.raises(SystemExit) as exit_:
        perf.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"usage: python -m tools.perf {argv[0]} [-h]")
    assert f"python -m tools.perf {argv[0]}: error: " in err


@pytest.mark.parametrize("n", ["131073", "1000000000"])
def test_model_lengths_are_bounded(n, no_work, capsys):
    """N = 1e9 ran for minutes: the model walks every query block of a call in Python."""
    assert refused(["model", "--n", n, "--out", "/tmp"], capsys) == (
        f"python -m tools.perf model: error: argument --n: at most 131,072 (2^17, past the longest sequence of "
        f"the committed tables: the DiT rows' 119,056), got '{n}'")


def test_the_longest_length_passes_and_the_committed_tables_fit_under_it():
    import csv

    from tools.perf import RESULTS

    assert perf.model_length(str(perf.MODEL_MAX_N)) == perf.MODEL_MAX_N
    with pytest.raises(argparse.ArgumentTypeError, match="must be a positive int"):
        perf.model_length("0")
    longest = max(int(r["n"]) for name in ("model-h100", "model-h200", "model-dit-h100", "model-dit-h200",
                                           "model-h100-calibration")
                  for r in csv.DictReader(open(RESULTS / f"{name}.csv", newline="")) if r.get("n"))
    assert longest == 119056 <= perf.MODEL_MAX_N
