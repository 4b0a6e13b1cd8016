"""The package's import graph: no circle among module-level imports, and no import running back up.

Read from the source (ast), so it checks every module whatever is installed. Layers, bottom up:
the kernels (`ops/`) import only each other and the core's leaf modules (`_problem`, `_env`);
the core (the top-level modules) never imports a front-end (`diffusers/`, `comfyui/`, `bench/`)
or the CLI, at module level or inside a function, except the deprecated aliases that keep an
old spelling working for one release (ALIASES).
"""

import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parents[2] / "vstar_kernels"
FRONT_ENDS = ("vstar_kernels.diffusers", "vstar_kernels.comfyui", "vstar_kernels.bench", "vstar_kernels.cli",
              "vstar_kernels.__main__")
KERNEL_LEAVES = ("vstar_kernels._problem", "vstar_kernels._env")
# (module, imported): an old public spelling that forwards, with a DeprecationWarning, to its new home
ALIASES = {("vstar_kernels.vsp", "vstar_kernels.diffusers")}


def _name(path: pathlib.Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in PACKAGE.rglob("*.py")}


def _resolve(module: str, node: ast.ImportFrom | ast.Import, is_package: bool) -> list:
    """The vstar_kernels modules an import statement loads (a `from x import y` of a submodule y counts y)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names if a.name.split(".")[0] == "vstar_kernels"]
    if node.level:
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[:len(base) - node.level + 1]
        target = ".".join(base + ([node.module] if node.module else []))
    else:
        target = node.module or ""
    if target.split(".")[0] != "vstar_kernels":
        return []
    submodules = [f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in MODULES]
    # `from pkg import submodule` loads the submodule (pkg itself is loaded before any of its modules)
    return submodules if len(submodules) == len(node.names) else [target] + submodules


def imports(module: str, top_level_only: bool) -> set:
    path = MODULES[module]
    tree = ast.parse(path.read_text())
    nodes = []
    if top_level_only:
        stack = list(tree.body)
        while stack:  # module level, including inside if/try blocks, not inside functions or classes
            node = stack.pop()
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                nodes.append(node)
            elif isinstance(node, (ast.If, ast.Try)):
                stack += node.body + node.orelse + getattr(node, "finalbody", []) + \
                    [s for h in getattr(node, "handlers", []) for s in h.body]
    else:
        nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    return {m for n in nodes for m in _resolve(module, n, path.name == "__init__.py") if m in MODULES} - {module}


def test_the_walk_sees_the_package():
    assert {"vstar_kernels", "vstar_kernels.functional", "vstar_kernels.ops.tar_fwd",
            "vstar_kernels.diffusers.dit"} <= set(MODULES)
    assert "vstar_kernels._problem" in imports("vstar_kernels.functional", True)
    assert "vstar_kernels.ops._jit" in imports("vstar_kernels.ops.tar_fwd", True)


def test_no_import_circle():
    graph = {m: imports(m, top_level_only=True) for m in MODULES}
    # a module's package __init__ runs before it: an edge from the package too
    state, circle = {}, []

    def visit(node, path):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circle.append(path[path.index(nxt):] + [nxt] if nxt in path else path + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = "done"

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    assert not circle, f"import circles: {circle}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("vstar_kernels.ops")))
def test_kernels_import_only_kernels_and_leaves(module):
    bad = {m for m in imports(module, top_level_only=False)
           if not m.startswith("vstar_kernels.ops") and m not in KERNEL_LEAVES}
    assert not bad, f"{module} imports {sorted(bad)}: ops/ may import only ops/ and {KERNEL_LEAVES}"


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith(FRONT_ENDS)))
def test_the_core_never_imports_a_front_end(module):
    bad = {m for m in imports(module, top_level_only=False)
           if m.startswith(FRONT_ENDS) and (module, m) not in ALIASES}
    assert not bad, f"{module} imports {sorted(bad)}, a front-end above it"


def test_every_module_imports_with_the_oldest_torch_compiler_disable(tmp_path):
    """`torch.compiler.disable(reason=...)` is torch 2.8's; the package takes torch 2.4 up, whose disable takes
    `fn` and `recursive` alone: `vstar_kernels.diffusers` raised a TypeError on import there."""
    import subprocess
    import sys

    names = sorted(m for m in MODULES if m != "vstar_kernels.__main__")
    code = ("import torch\n"
            "stock = torch.compiler.disable\n"
            "def disable(fn=None, recursive=True):\n"
            "    return stock(fn, recursive)\n"
            "torch.compiler.disable = disable\n"
            "import importlib, sys\n"
            "for name in sys.argv[1:]:\n"
            "    importlib.import_module(name)\n")
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=600,
                          cwd=PACKAGE.parent)
    assert done.returncode == 0, done.stderr[-3000:]
