"""`python -m tools.perf`: its help, and options refused before any work (each command's work is replaced by a
stub that fails the test if it runs: nothing here compiles or measures)."""

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
