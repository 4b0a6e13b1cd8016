"""The package as a wheel installs it: built from the repository, put on a path with no checkout around
it, every shipped module imports and every CLI subcommand runs (nothing in the package may need the
repository's other folders: benchmarks/, tools/, tests/).
"""

import shutil
import subprocess
import sys
import zipfile

import pytest

from ..helpers import ROOT, clean_env

pytestmark = pytest.mark.long  # scheduled first (tests/conftest.py)

# What setup.py and MANIFEST.in read: a copy of only these builds the wheel, so that a stale build/
# folder in the checkout cannot add modules the repository no longer has
BUILD_INPUTS = ("setup.py", "pyproject.toml", "README.md", "MANIFEST.in", "CMakeLists.txt", "bindings", "docs",
                "vstar_kernels")

# Run from the wheel: the imports, then each subcommand through the CLI's own entry point (demo and a CPU
# bench start `python -m vstar_kernels` again, with TRITON_INTERPRET=1: that child runs from the wheel too)
PROBE = r"""
import importlib, pathlib, pkgutil, sys
import vstar_kernels
from vstar_kernels import _env, cli

site = pathlib.Path(sys.argv[1]).resolve()
assert pathlib.Path(vstar_kernels.__file__).resolve().is_relative_to(site), vstar_kernels.__file__
assert _env.source_checkout() is None
modules = [m.name for m in pkgutil.walk_packages(vstar_kernels.__path__, "vstar_kernels.")]
for name in modules:
    if name != "vstar_kernels.__main__":  # runs the CLI
        importlib.import_module(name)
print("imported", len(modules))
from vstar_kernels.vsp import load_synopses
assert load_synopses()  # package data
work = pathlib.Path(sys.argv[2])
(work / "ComfyUI" / "custom_nodes").mkdir(parents=True)
for argv in (["info"], ["demo"], ["plot-delta", "--sigmas", "1", "--num-frames", "8", "--dpi", "30", "--out",
             str(work / "d.png")],
             ["demo-attention", "--num-frames", "4", "--size", "8", "--dpi", "30", "--out", str(work / "a.png")],
             ["comfyui-install", str(work / "ComfyUI")], ["bench", "--list"], ["bench", "--model-table"],
             ["bench", "--quick", "--n", "16", "--impls", "vstar_auto", "sdpa_plain", "--no-progress"]):
    code = cli.main(argv)
    assert code == 0, (argv, code)
    print("ran", argv[0], flush=True)
"""


def test_a_built_wheel_runs_where_no_checkout_is(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = ROOT / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.so"))
        else:
            shutil.copy2(path, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist"), str(src)],
                   check=True, timeout=300, env=clean_env())
    [wheel] = (tmp_path / "dist").glob("vstar_kernels-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names} == {"vstar_kernels", wheel.name.split("-py3")[0] + ".dist-info"}, names
    assert "vstar_kernels/data/synopses.json" in names
    site = tmp_path / "site"
    subprocess.run([*pip, "install", "--no-deps", "--target", str(site), str(wheel)], check=True, timeout=300,
                   env=clean_env())
    work = tmp_path / "work"  # the current folder: bench writes ./vstar-bench-results there
    work.mkdir()
    res = subprocess.run([sys.executable, "-c", PROBE, str(site), str(work)], capture_output=True, text=True,
                         timeout=900, cwd=work, env=clean_env(PYTHONPATH=str(site)))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "all outputs match the reference" in res.stdout
    for name in ("d.png", "a.png"):
        assert (work / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (work / "ComfyUI" / "custom_nodes" / "vstar_kernels_tar" / "__init__.py").is_file()
    [table] = (work / "vstar-bench-results").glob("*.md")
    assert "vstar_auto" in table.read_text()
