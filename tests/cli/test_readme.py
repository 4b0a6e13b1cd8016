"""Every ```python block of README.md and of the pages under docs/ runs, except blocks whose first
line says why it cannot here; every relative link points into the repository.

A block that cannot run in CI (it downloads model weights, or needs a GPU or several processes)
starts with `# not run in CI: <reason>`. The blocks of one page run in order in one namespace, as
a reader would paste them.
"""

import pathlib
import re
import warnings

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
SKIP_MARK = "# not run in CI:"


def blocks(page: pathlib.Path) -> list:
    return re.findall(r"```python\n(.*?)```", page.read_text(encoding="utf-8"), flags=re.S)


BLOCKS = blocks(README)


def _page_id(page):
    return str(page.relative_to(ROOT))


# pages the README reaches through another page rather than directly
LINKED_FROM_PAGES = set()


def test_readme_has_examples():
    assert any(not b.startswith(SKIP_MARK) for b in BLOCKS)


@pytest.mark.parametrize("page", [p for p in PAGES if any(not b.startswith(SKIP_MARK) for b in blocks(p))],
                         ids=_page_id)
def test_page_blocks_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__docs__"}
    for block in blocks(page):
        if not block.startswith(SKIP_MARK):
            exec(compile(block, str(page), "exec"), namespace)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_blocks_not_run_still_compile(page):
    for block in blocks(page):
        compile(block, str(page), "exec")


def test_blocks_write_files_of_their_own():
    """Two examples writing the same file would overwrite each other's output (and a reader's)."""
    writers = {}
    for index, block in enumerate(b for page in PAGES for b in blocks(page)):
        for name in set(re.findall(r"[\"']([\w./-]+\.(?:png|pdf|svg|gif|mp4))[\"']", block)):
            writers.setdefault(name, []).append(index)
    assert "unet_maps.png" in writers
    assert {name: blocks for name, blocks in writers.items() if len(blocks) > 1} == {}


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_relative_links_point_to_files_in_the_repository(page):
    targets = re.findall(r"\]\(([^)\s]+)\)", page.read_text(encoding="utf-8"))
    local = [t.split("#")[0] for t in targets if not re.match(r"[a-z]+:|#", t)]
    for target in local:
        path = (page.parent / target).resolve()
        assert path.is_relative_to(ROOT) and path.exists(), f"{_page_id(page)} links {target}, not in the repository"


def test_the_readme_is_a_front_door():
    """About 200 lines, linking every page of docs/ (the rest of the documentation lives there)."""
    text = README.read_text(encoding="utf-8")
    assert len(text.splitlines()) <= 210
    assert {f"docs/{p.name}" for p in PAGES[1:]} <= set(re.findall(r"\]\((docs/[\w-]+\.md)", text)) | {
        f"docs/{p.name}" for p in PAGES[1:] if p.name in LINKED_FROM_PAGES}


# What users read: the README, the docs, the package's messages and docstrings, the examples.
INSTALL_TEXTS = [README, ROOT / "Makefile", *sorted((ROOT / "docs").rglob("*.md")),
                 *sorted((ROOT / "vstar_kernels").rglob("*.py")), *sorted((ROOT / "examples").rglob("*.py")),
                 *sorted((ROOT / "benchmarks").rglob("*.md"))]
# `pip install [options] vstar_kernels...` by name, but for a direct reference `vstar_kernels[extras] @ URL`
BY_NAME = re.compile(r"pip install\s+(?:-\S+\s+)*['\"]?vstar[_-]kernels(?!\[[^\]\s]*\] @ )")
# `pip install [options] x[extras]` with the brackets outside quotes
UNQUOTED_BRACKETS = re.compile(r"pip install\s+(?:-\S+\s+)*[^\s'\"`]*\[")


def test_install_commands_fit_a_package_on_no_index():
    """vstar_kernels is on no package index: every command that installs it (or its extras) installs
    from a checkout or names the repository, with any brackets in quotes (a glob in zsh otherwise)."""
    assert 'pip install -e ".[diffusers]"' in README.read_text(encoding="utf-8")
    for path in INSTALL_TEXTS:
        text = path.read_text(encoding="utf-8")
        for pattern in (BY_NAME, UNQUOTED_BRACKETS):
            found = pattern.search(text)
            assert found is None, f"{path.relative_to(ROOT)}: {text[found.start():found.end() + 30]!r}"


def test_the_install_shows_the_cpu_torch_first_and_the_torch_the_tests_run_on():
    """Without a GPU, pip would bring a CUDA torch for the package's `torch>=...`: the README installs the CPU
    build first, and names the range setup.py accepts and the build `make` installs, which the tests run on."""
    text = README.read_text(encoding="utf-8")
    install = text[text.index("## Install"):text.index("## Quick start")]
    cpu = "pip install torch --index-url https://download.pytorch.org/whl/cpu"
    assert cpu in install and install.index(cpu) < install.index('pip install -e ".[diffusers]"')
    [accepted] = re.findall(r'"(torch>=[\d.]+)"', (ROOT / "setup.py").read_text(encoding="utf-8"))
    [tested] = re.findall(r"pip install torch==([\d.]+)", (ROOT / "Makefile").read_text(encoding="utf-8"))
    assert f"`{accepted}`" in install and f"the tests run on torch {tested}" in install


def test_the_readme_says_how_long_make_test_takes():
    text = README.read_text(encoding="utf-8")
    assert re.search(r"make test +# .*\b\d+ (?:to \d+ )?minutes", text)
    assert re.search(r"`make test` took \d+ min \d+ s on an idle 2-core machine \(\d{4}-\d\d-\d\d\)", text)


IMPORTS = re.compile(r"^(?:from vstar_kernels[\w.]* import .+|import vstar_kernels.*)$", flags=re.M)


@pytest.mark.parametrize("page", PAGES, ids=_page_id)
def test_the_pages_import_no_deprecated_name(page):
    """A reader's first run warns of nothing: every block's imports of vstar_kernels, run or not in CI, are current."""
    for line in IMPORTS.findall("\n".join(blocks(page))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            exec(line, {})
        assert not [str(w.message) for w in caught if issubclass(w.category, DeprecationWarning)
                    and "vstar_kernels" in str(w.message)], f"{_page_id(page)}: {line}"


def test_the_definition_is_referred_to_where_it_lives():
    assert (ROOT / "docs" / "semantics.md").is_file()
    for folder in ("vstar_kernels", "tests", "bindings", "benchmarks"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in (".py", ".md", ".h", ".cuh", ".cu", ".cpp") and path != pathlib.Path(__file__).resolve():
                assert "shared/semantics" not in path.read_text(encoding="utf-8"), path
