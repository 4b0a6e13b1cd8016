"""Every ```python block of README.md runs, except blocks whose first line says why it cannot here.

A block that cannot run in CI (it downloads model weights, or needs a GPU) starts with
`# not run in CI: <reason>`.
"""

import pathlib
import re

import pytest

README = pathlib.Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S)
SKIP_MARK = "# not run in CI:"


def test_readme_has_examples():
    assert any(not b.startswith(SKIP_MARK) for b in BLOCKS)


@pytest.mark.parametrize("block", [b for b in BLOCKS if not b.startswith(SKIP_MARK)],
                         ids=lambda b: b.strip().splitlines()[0][:40])
def test_readme_block_runs(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(block, str(README), "exec"), {"__name__": "__readme__"})


def test_blocks_not_run_still_compile():
    for block in BLOCKS:
        compile(block, str(README), "exec")
