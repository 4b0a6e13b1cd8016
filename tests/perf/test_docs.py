"""What docs/performance.md and tools/perf/model.md say of the yardstick, against what it does and the committed
tables (text and CSVs only: nothing here compiles or measures)."""

import argparse
import re
from pathlib import Path

from tools.perf import __main__ as perf

ROOT = Path(__file__).resolve().parents[2]


def prose(path: Path) -> str:
    """The file's text without its table rows, its whitespace runs one space each."""
    return " ".join(" ".join(line for line in path.read_text(encoding="utf-8").splitlines()
                             if not line.startswith("|")).split())


def test_the_cpu_quick_runs_are_said_to_write_their_file():
    """performance.md said `cpu --quick` "prints its table and writes no file": it writes its CSV into --out."""
    text = prose(ROOT / "docs" / "performance.md")
    (said,) = re.findall(r"`cpu --quick` [^;)]*", text)
    assert "writes no file" not in said and "cpu-default-path-<yyyymmdd>.csv" in said and "--out" in said


def test_the_host_before_and_after_recipe_runs_hosts_main_at_its_defaults(monkeypatch):
    """The recipe copied this checkout's __main__.py into the older one, whose package lacks what it imports
    (an ImportError), and untarred into a folder it had not made. Its `python -c` is run here with host's
    work replaced: it must call host.main with the defaults of `python -m tools.perf host`."""
    text = (ROOT / "docs" / "performance.md").read_text(encoding="utf-8")
    after = text[re.search(r"The\s+pair\s+again:", text).start():]
    block = after[after.index("\n\n"):].lstrip("\n")  # the block right after the paragraph
    assert block.startswith("```bash\n")
    recipe = block[len("```bash\n"):block.index("```", 3)]
    assert "__main__.py" not in recipe.split("tar -x")[1]  # (said in the prose, not copied)
    make, untar = recipe.index("mkdir -p /tmp/base"), recipe.index("tar -x -C /tmp/base")
    assert make < untar
    (code,) = re.findall(r'python -c "(.*?)"\)', recipe, re.S)
    from tools.perf import host

    called = []
    monkeypatch.setattr(host, "main", called.append)
    exec(compile(code, "recipe", "exec"), {})
    defaults = perf.parser().parse_args(["host"])
    assert called == [argparse.Namespace(rounds=defaults.rounds, batch=defaults.batch)]
