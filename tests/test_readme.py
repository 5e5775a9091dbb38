"""Every ```python block of README.md and docs/*.md runs as written.

The blocks of one file run in order in one shared namespace (a later block may use
what an earlier one defined), on the CPU with the default backend. Every fenced block
must name its language, so a shell or output block is never mistaken for Python.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)[^\n]*\n(.*?)^```[ \t]*$", re.MULTILINE | re.DOTALL)
LANGUAGES = {"python", "bash", "text"}


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """``(language, line, code)`` of every fenced block of ``path``."""
    text = path.read_text()
    return [(m.group(1), text.count("\n", 0, m.start()) + 1, m.group(2)) for m in FENCE.finditer(text)]


@pytest.mark.parametrize("path", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_fenced_blocks_name_their_language(path):
    found = blocks(path)
    unnamed = [line for language, line, _ in found if language not in LANGUAGES]
    assert not unnamed, f"{path.name}: fenced blocks at lines {unnamed} need one of {sorted(LANGUAGES)}"


def python_blocks(path: Path) -> list[tuple[int, str]]:
    return [(line, code) for language, line, code in blocks(path) if language == "python"]


def test_readme_has_python_examples():
    assert len(python_blocks(ROOT / "README.md")) >= 5


@pytest.mark.parametrize("path", [p for p in DOCUMENTS if python_blocks(p)], ids=lambda p: str(p.relative_to(ROOT)))
def test_python_blocks_run(path):
    found = python_blocks(path)
    namespace: dict = {"__name__": f"doc_{path.stem}"}
    torch.manual_seed(0)
    for line, code in found:
        try:
            exec(compile(code, f"{path.name}:{line}", "exec"), namespace)
        except Exception as err:
            raise AssertionError(f"the python block at {path.name}:{line} failed: {err!r}") from err
