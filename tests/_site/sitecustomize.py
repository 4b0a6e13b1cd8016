"""Test subprocesses only: tests.helpers.interpreter_env puts this folder first on PYTHONPATH for a Python
process a test starts to run kernels in the Triton interpreter. Where TRITON_INTERPRET=1 is set from the process's
start, it installs the interpreter shim the test processes install for themselves (tests/_interpreter.py, from
tests/_device.py): the speculation script's smoke runs spent most of their time in the step the shim skips. A
sitecustomize further on the path (a Python distribution's own) then runs as it would without this one."""

import importlib.machinery
import importlib.util
import os
import pathlib
import sys


def _run(name, path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if os.environ.get("TRITON_INTERPRET") == "1":
    _run("_vstar_tests_interpreter", pathlib.Path(__file__).resolve().parents[1] / "_interpreter.py").install()

_here = pathlib.Path(__file__).resolve().parent
_next = importlib.machinery.PathFinder.find_spec(
    "sitecustomize", [p for p in sys.path if pathlib.Path(p or os.curdir).resolve() != _here])
if _next is not None:
    _run("_sitecustomize_next", _next.origin)
