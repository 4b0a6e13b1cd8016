"""What docs/performance.md and tools/perf/model.md say of the yardstick, against what it does and the committed
tables (text and CSVs only: nothing here compiles or measures)."""

import argparse
import csv
import re
from pathlib import Path

from tools.perf import RESULTS
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


def no_spills_row() -> str:
    (row,) = [line for line in (ROOT / "tools" / "perf" / "model.md").read_text(encoding="utf-8").splitlines()
              if line.startswith("| no spills in any pruned config")]
    return row


def static_rows(arch: int) -> list:
    with open(RESULTS / f"static-sm{arch}.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_the_no_spills_target_counts_the_committed_tables():
    """The row said sm_90 1,639 rows and sm_80 1,061 with 12 redo rows at 128 x 64 (48 B): the tables hold
    1,445 and 1,047, and 8 redo rows at 64 x 64 (40 B)."""
    row = no_spills_row()
    sm90, sm80 = static_rows(90), static_rows(80)
    assert f"sm_90, {len(sm90):,} rows" in row and f"sm_80, {len(sm80):,} rows" in row
    spills = [r for r in sm90 if int(r["spill_bytes"])]
    assert {(r["kernel"], r["tile"], r["spill_bytes"]) for r in spills} == {("_tar_fwd_tiled_kernel", "128x64", "24")}
    assert all("speculative" in r["case"] and r["local_ops_in_loops"] == "0" for r in spills)
    assert f"128 x 64 tiles (24 B, {len(spills)} rows;" in row
    lean = [r for r in sm80 if int(r["spill_bytes"]) and r["kernel"] == "_tar_fwd_lean_kernel"]
    redo = [r for r in sm80 if int(r["spill_bytes"]) and r["kernel"] == "_tar_fwd_redo_kernel"]
    assert len([r for r in sm80 if int(r["spill_bytes"])]) == len(lean) + len(redo)
    speculative = [r for r in lean if "speculative" in r["case"]]
    assert f"the lean forward's {len(lean)} (its speculative form's {len(speculative)} among them)" in row
    ((tile, warps, spilled, in_loops),) = {(r["tile"], r["cta_warps"], r["spill_bytes"], r["local_ops_in_loops"])
                                           for r in redo}
    assert f"the {len(redo)} of the redo" in row
    assert f"({tile.replace('x', ' x ')} on {warps} warps, {spilled} B, {in_loops} local accesses in its loops)" in row


def test_each_yardstick_run_time_is_stated_once_with_its_commit():
    """model.md gave `model` 154 s (at 8f38c22) and 5.4 min, `model --dit` about 90 s (at 0188197) and 3.5 min,
    two of them without a commit. A statement: the run times of one clause (up to its ';' or ')')."""
    text = prose(ROOT / "tools" / "perf" / "model.md")
    said = {}
    for m in re.finditer(r"(?<![\w.])\d+(?:\.\d+)? (?:s|min)\b", text):
        command = "".join(re.findall(r"`python -m tools\.perf (\w[\w-]*)( --dit)?", text[:m.start()])[-1])
        start = max(text.rfind(c, 0, m.start()) for c in ";()")
        end = min(i for i in (text.find(";", m.end()), text.find(")", m.end())) if i >= 0)
        said.setdefault(command, set()).add(text[start + 1:end].strip())
    assert set(said) == {"model", "model --dit", "static"}
    for command, statements in said.items():
        assert len(statements) == 1, (command, statements)
        (statement,) = statements
        assert re.search(r"\b[0-9a-f]{7}\b", statement), (command, statement)
