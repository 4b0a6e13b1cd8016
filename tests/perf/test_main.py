"""`python -m tools.perf`: its help, and options refused before any work (each command's work is replaced by a
stub that fails the test if it runs: nothing here compiles or measures)."""

import argparse

import pytest

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


@pytest.mark.parametrize("out, why", [("/proc", "cannot be written to"), ("/proc/x", "cannot be made"),
                                      ("/proc/x/y", "cannot be made")])
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
    """A writable folder passes; the folders the check made and its file are gone (the command makes them)."""
    assert results_folder(str(tmp_path / "a" / "b")) == str(tmp_path / "a" / "b")
    assert list(tmp_path.iterdir()) == []
    assert results_folder(str(tmp_path)) == str(tmp_path) and list(tmp_path.iterdir()) == []


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
