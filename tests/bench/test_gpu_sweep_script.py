"""benchmarks/run_gpu_sweep.sh without a GPU: a stand-in python3 (and nvidia-smi) on PATH says CUDA is there,
records each call, and runs each stage's command as the test asks (exit 0, or sleep); the calls recorded are then
parsed by the real parsers. The script runs from a copy in tmp_path: what it writes stays there."""

import argparse
import importlib.util
import io
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import torch

from vstar_kernels import bench
from vstar_kernels.bench import shapes

ROOT = Path(__file__).resolve().parents[2]

# The GPU machine's python3, stood in. The shape list the kernel stage asks for runs the real code.
STUB = r"""#!/usr/bin/env bash
printf '%q ' "$@" >> "$STUB_CALLS"
echo >> "$STUB_CALLS"
printf 'PYTHONPATH=%s TRITON_BACKENDS_IN_TREE=%s\n' "${PYTHONPATH:-}" "${TRITON_BACKENDS_IN_TREE:-}" >> "$STUB_ENV"
case "$*" in
    *torch.cuda.is_available*) exit 0 ;;
    *triton_ops\(\).reason*) echo; exit 0 ;;
    "-c import diffusers") exit 0 ;;
    "-c "*) PYTHONPATH="$STUB_ROOT" exec "$STUB_PYTHON" "$@" ;;
    "-m pytest"*)  # STUB_PYTEST_STUCK: deaf to SIGINT for that long
        [ -z "${STUB_PYTEST_STUCK:-}" ] || { trap '' INT; sleep "$STUB_PYTEST_STUCK"; echo ran-on >> "$STUB_CALLS"; }
        exit 0 ;;
    "-m vstar_kernels info"* | benchmarks/plot_results.py*) exit 0 ;;
esac
# a stage's command: it writes today's CSV, then exits or sleeps
touch "benchmarks/results/stub-$(date -u +%Y%m%d).csv"
[ -z "${STUB_SLEEP:-}" ] || exec sleep "$STUB_SLEEP"
"""

DATE_STUB = r"""#!/usr/bin/env bash
[ "${{!#}}" = +%Y%m%d ] || exec /bin/date "$@"
echo >> {count}
if [ "$(wc -l < {count})" -ge {shift} ]; then exec /bin/date -d tomorrow "$@"; fi
exec /bin/date "$@"
"""


def sweep(tmp_path, stage, timeout=60, date_shift=0, **env):
    """Run the script's copy in tmp_path with the stand-ins; the result, the calls (argv lists) and the folder the
    files were to be copied to ($OUT)."""
    tree = tmp_path / "tree"
    (tree / "benchmarks").mkdir(parents=True, exist_ok=True)
    shutil.copy(ROOT / "benchmarks" / "run_gpu_sweep.sh", tree / "benchmarks")
    stubs = tmp_path / "bin"
    stubs.mkdir(exist_ok=True)
    (stubs / "python3").write_text(STUB)
    (stubs / "nvidia-smi").write_text("#!/bin/sh\necho 'name, driver_version'\necho 'stand-in, 0'\n")
    if date_shift:  # `date +%Y%m%d` from its shift'th call on (the script's first is its start) says the next day
        (stubs / "date").write_text(DATE_STUB.format(count=tmp_path / "date-calls", shift=date_shift))
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    calls, env_log = tmp_path / "calls", tmp_path / "env"
    calls.write_text("")
    env_log.write_text("")
    run_env = {**os.environ, "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}", "OUT": str(out),
               "STUB_CALLS": str(calls), "STUB_ENV": str(env_log), "STUB_ROOT": str(ROOT),
               "STUB_PYTHON": sys.executable,
               "VSTAR_BENCH_COMMIT": "stand-in", **env}
    for name in ("PYTHONPATH", *(name for name, value in env.items() if value is None)):
        run_env.pop(name, None)
    res = subprocess.run(["bash", str(tree / "benchmarks" / "run_gpu_sweep.sh"), stage], capture_output=True,
                         text=True, timeout=timeout, env=run_env)
    return res, [shlex.split(line) for line in calls.read_text().splitlines()], out


def _bench_parser():
    parser = argparse.ArgumentParser()
    bench.configure(parser)
    return parser


def _speculation():
    spec = importlib.util.spec_from_file_location("speculation", ROOT / "benchmarks" / "speculation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_stage_past_the_call_budget_is_cut_and_its_files_still_reach_out(tmp_path):
    """A stage's own budget is checked before each case: one begun in time ran on, and a call that passed the
    10-minute command lost every file (they reach $OUT at the end). The stage is cut where it would leave less
    than 45 s of CALL_BUDGET_S, and the failure says so."""
    start = time.monotonic()
    res, calls, out = sweep(tmp_path, "quick", CALL_BUDGET_S="50", STUB_SLEEP="120")
    assert time.monotonic() - start < 40, res.stdout + res.stderr
    assert res.returncode == 1
    assert "quick sweep (exit 124: cut by a time limit)" in res.stderr, res.stderr
    assert "cut at " in res.stdout
    assert sorted(p.suffix for p in out.iterdir()) == [".csv", ".log"]  # the stage's CSV and the log
    assert ["benchmarks/plot_results.py", f"benchmarks/results/stub-{time.strftime('%Y%m%d', time.gmtime())}.csv"] \
        in calls


def test_a_stage_left_no_time_is_not_started_and_named(tmp_path):
    res, calls, _ = sweep(tmp_path, "kernels", CALL_BUDGET_S="30")
    assert res.returncode == 1
    assert "kernel sweep (not started: CALL_BUDGET_S spent)" in res.stderr
    assert not [c for c in calls if c[:3] == ["-m", "vstar_kernels", "bench"]]


@pytest.mark.parametrize("stage", ["all", "quick", "speculation", "lean"])
def test_each_stage_command_parses_with_the_real_parsers(tmp_path, monkeypatch, stage):
    res, calls, _ = sweep(tmp_path, stage, SPEC_SHAPES="ltx-video-768x512 wan2.1-1.3b-480p", SPEC_RATES="0 0.05")
    assert res.returncode == 0, res.stdout + res.stderr
    benches = [c[3:] for c in calls if c[:3] == ["-m", "vstar_kernels", "bench"]]
    scripts = [c[1:] for c in calls if c[0] == "benchmarks/speculation.py"]
    assert len(benches) + len(scripts) == {"all": 2}.get(stage, 1), calls
    for argv in benches:
        args = _bench_parser().parse_args(argv)
        assert bench.untaken(args) == ""
        assert args.out == "benchmarks/results" and args.resume and args.no_plots and args.no_progress
        assert args.time_budget_s, f"no time budget: {argv}"  # quick had none
        assert set(args.shapes or ()) <= set(shapes.SHAPES)
    if stage == "all":
        assert [bool(shapes.is_unet(s)) for a in benches for s in _bench_parser().parse_args(a).shapes] == \
            [False] * (len(shapes.GPU_FULL) - 2) + [True, True]
    if scripts:
        from tools.perf.model_dit import DIT_SHAPES

        module = _speculation()
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # parsed, then refused: no run here
        for argv in scripts:
            assert ("--lean" in argv) == (stage == "lean")
            assert module.main(argv) == 1
            shapes_asked = argv[argv.index("--shapes") + 1:argv.index("--rates")]
            assert shapes_asked == ["ltx-video-768x512", "wan2.1-1.3b-480p"]
            assert set(shapes_asked) <= {s.name for s in DIT_SHAPES}


def _tarball(path, files):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:xz") as tar:
        for name, text in files.items():
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(text), 0o755
            tar.addfile(info, io.BytesIO(text))


def test_triton_carried_in_a_tarball_is_unpacked_onto_pythonpath(tmp_path):
    """The images' Triton is 3.6, older than the kernels take; the 3.9 carried in .whl/triton39.tar.xz
    (benchmarks/NOTES.md) had to be unpacked, linked and exported by hand before the script, which refused
    without."""
    _tarball(tmp_path / "tree" / ".whl" / "triton39.tar.xz",
             {"triton/__init__.py": b"__version__ = '3.9.0'\n", "triton/backends/nvidia/bin/ptxas": b"#!/bin/sh\n",
              "triton-3.9.0.dist-info/METADATA": b"Name: triton\n"})
    for call in range(2):  # the second call on the machine finds it unpacked
        res, calls, out = sweep(tmp_path, "quick", TMPDIR=str(tmp_path))
        assert res.returncode == 0, res.stdout + res.stderr
        [site] = tmp_path.glob("vstar-triton-*")
        lines = (tmp_path / "env").read_text().splitlines()
        # every call after the CUDA check (the Triton check first) runs with it first on PYTHONPATH
        assert all(line.startswith(f"PYTHONPATH={site}:") and line.endswith(" TRITON_BACKENDS_IN_TREE=1")
                   for line in lines[1:]), lines
        assert os.readlink(site / "triton" / "backends" / "nvidia" / "bin" / "ptxas-blackwell") == "ptxas"
        assert f"Triton: .whl/triton39.tar.xz, unpacked in {site}" in res.stdout


def test_a_tarball_without_triton_is_refused(tmp_path):
    _tarball(tmp_path / "tree" / ".whl" / "triton39.tar.xz", {"other/__init__.py": b""})
    res, calls, _ = sweep(tmp_path, "quick", TMPDIR=str(tmp_path))
    assert res.returncode == 1
    assert "run_gpu_sweep.sh: .whl/triton39.tar.xz holds no triton/__init__.py" in res.stderr
    assert len(calls) == 1  # the CUDA check only


@pytest.mark.parametrize("test_args, expected", [(None, ["-m", "gpu", "tests"]),
                                                 ("tests/kernels/test_lean_speculative.py -x",
                                                  ["tests/kernels/test_lean_speculative.py", "-x"])],
                         ids=["default", "named"])
def test_the_tests_stage_runs_the_gpu_marked_tests_or_those_named(tmp_path, test_args, expected):
    """The tests stage ran `-m gpu tests` alone: the Triton kernel files (tests/kernels/test_lean*.py,
    test_speculative.py), which run on a GPU unmarked and which NOTES.md asks the next GPU run for first, took a
    script of their own. TEST_ARGS names them."""
    res, calls, _ = sweep(tmp_path, "tests", **({"TEST_ARGS": test_args} if test_args else {}))
    assert res.returncode == 0, res.stdout + res.stderr
    [pytest_argv] = [c[2:] for c in calls if c[:2] == ["-m", "pytest"]]
    assert pytest_argv == ["-q", *expected]
    for arg in expected:  # the files and folders named exist; the gpu marker is registered
        assert arg.startswith("-") or arg == "gpu" or (ROOT / arg).exists()
    assert '"gpu: ' in (ROOT / "pyproject.toml").read_text()


def test_an_unknown_commit_is_said_and_not_resumed(tmp_path):
    """Without git (the GPU machine's copy of the tree) and VSTAR_BENCH_COMMIT, every call's rows said commit
    'unknown' and --resume skipped the cells any earlier code had measured today."""
    res, calls, _ = sweep(tmp_path, "all", VSTAR_BENCH_COMMIT=None)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "commit: unknown" in res.stdout and "run without --resume" in res.stdout
    benches = [c for c in calls if c[:3] == ["-m", "vstar_kernels", "bench"]]
    assert len(benches) == 2 and not [c for c in benches if "--resume" in c]


def test_the_tests_stage_collects_without_diffusers(tmp_path):
    """The GPU machines' images lack diffusers: the modules of tests/integrations that import it failed to
    collect, and one collection error interrupts the session, so `pytest -m gpu tests` ran nothing there. Where
    the sweep says so (VSTAR_TESTS_WITHOUT_DIFFUSERS=1), they are skipped, saying why (tests/integrations/conftest.py);
    elsewhere (make test, CI) they stay collection errors, so that a broken install cannot pass by skipping."""
    missing = tmp_path / "site" / "diffusers"
    missing.mkdir(parents=True)
    (missing / "__init__.py").write_text("raise ModuleNotFoundError(\"No module named 'diffusers'\", "
                                         "name='diffusers')\n")

    def collect(**flag):
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]), **flag}
        return subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-rs", "-p", "no:cacheprovider",
                               "-W", "ignore", "tests/integrations/test_dit_models.py",
                               "tests/integrations/test_comfyui.py"], cwd=ROOT, capture_output=True, text=True,
                              env=env, timeout=300)

    res = collect()
    assert res.returncode != 0 and "error" in res.stdout.splitlines()[-1], res.stdout[-3000:]
    res = collect(VSTAR_TESTS_WITHOUT_DIFFUSERS="1")
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "error" not in res.stdout.splitlines()[-1], res.stdout[-3000:]
    assert "diffusers is not importable here; the module's import failed: ModuleNotFoundError: No module named " \
        "'diffusers'" in res.stdout
    assert "tests/integrations/test_comfyui.py::" in res.stdout  # what needs no diffusers is still collected


def test_a_call_budget_not_in_whole_seconds_is_refused_at_once(tmp_path):
    res, calls, _ = sweep(tmp_path, "quick", CALL_BUDGET_S="9.5m")
    assert res.returncode == 2 and not calls
    assert res.stderr == "run_gpu_sweep.sh: CALL_BUDGET_S is whole seconds, got '9.5m'\n"


@pytest.mark.parametrize("budget", ["08", "0570"])
def test_a_call_budget_with_a_leading_zero_is_decimal(tmp_path, budget):
    """bash arithmetic reads 0570 as octal (376 s) and fails on 08, which ended the stages' subshell at the first
    one: nothing ran, and the script exited 0."""
    res, calls, _ = sweep(tmp_path, "quick", CALL_BUDGET_S=budget)
    assert "value too great for base" not in res.stdout + res.stderr
    if budget == "08":
        assert res.returncode == 1 and "quick sweep (not started: CALL_BUDGET_S spent)" in res.stderr
    else:
        assert res.returncode == 0 and "cut at 52" in res.stdout, res.stdout  # 570 - 45 s, not 376 - 45


def test_a_tests_stage_deaf_to_sigint_is_killed_with_the_call_budget(tmp_path):
    """The tests stage's own budget is a timeout inside run_stage's: run_stage's SIGKILL (15 s after its SIGINT)
    reached that timeout alone, not pytest in its process group, which ran on past the cut, holding the log's tee
    (and the GPU) until it ended."""
    start = time.monotonic()
    res, calls, _ = sweep(tmp_path, "tests", CALL_BUDGET_S="50", STUB_PYTEST_STUCK="40")
    assert time.monotonic() - start < 30, res.stdout + res.stderr
    assert res.returncode == 1 and "gpu tests (exit 137: cut by a time limit)" in res.stderr, res.stderr
    time.sleep(1)
    assert ["ran-on"] not in calls and "ran-on" not in (tmp_path / "calls").read_text()


def test_a_call_past_midnight_utc_renders_the_files_of_the_day_they_were_written(tmp_path):
    """The tables and plots took the CSVs named with the day the call began: a stage that wrote its file after
    midnight UTC had it left unrendered."""
    res, calls, out = sweep(tmp_path, "quick", date_shift=2)  # the day changes after the script's start
    assert res.returncode == 0, res.stdout + res.stderr
    tomorrow = time.strftime("%Y%m%d", time.gmtime(time.time() + 86400))
    assert ["benchmarks/plot_results.py", f"benchmarks/results/stub-{tomorrow}.csv"] in calls


def test_a_failed_copy_to_out_is_a_failure(tmp_path):
    """The copy to $OUT is how a GPU call's files come back: where it failed the script still said 'copied N
    files' and exited 0."""
    res, _, out = sweep(tmp_path, "quick", OUT=str(tmp_path / "no-such-folder"))
    assert res.returncode == 1
    assert "copied" not in res.stdout and "stages that failed: copy to $OUT (exit 1)" in res.stderr


def test_only_an_import_of_diffusers_failing_is_skipped():
    """Under VSTAR_TESTS_WITHOUT_DIFFUSERS=1 any ImportError of an integration module was skipped as diffusers'
    absence, a real one (a name a test imports renamed) among them."""
    from tests.integrations.conftest import _from_missing_diffusers

    missing = ModuleNotFoundError("No module named 'diffusers'", name="diffusers")
    ours = ImportError("vstar_kernels.diffusers needs the diffusers package")  # raised from diffusers' error
    ours.__cause__ = missing
    assert _from_missing_diffusers(missing) and _from_missing_diffusers(ours)
    assert _from_missing_diffusers(ModuleNotFoundError("No module named 'tqdm.auto'", name="tqdm.auto"))
    assert not _from_missing_diffusers(ImportError("cannot import name 'apply_tar'", name="vstar_kernels.comfyui"))
    assert not _from_missing_diffusers(ModuleNotFoundError("No module named 'diffusers_x'", name="diffusers_x"))
