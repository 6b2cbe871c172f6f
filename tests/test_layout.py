"""The repository stays a house a newcomer can hold in their head: no source file over 600 lines, no class over
200, a README of one sitting (tests are exempt: they read top to bottom)."""
import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
MAX_FILE_LINES = 600
MAX_CLASS_LINES = 200
MAX_README_LINES = 300
SOURCES = sorted(p for p in REPO_ROOT.rglob("*.py") if "tests" not in p.relative_to(REPO_ROOT).parts
                 and not any(part.startswith(".") or part in ("demo", "__pycache__") for part in p.parts))


def test_the_sources_are_found():
    names = {p.name for p in SOURCES}
    assert {"main.py", "Half_Trainer.py", "pipeline_ecg.py", "predict.py", "benchmark.py"} <= names


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_source_file_is_too_long(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_FILE_LINES, f"{path.name} has {lines} lines: split it by what its parts do"


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_class_is_too_long(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ClassDef):
            lines = node.end_lineno - node.lineno + 1
            assert lines <= MAX_CLASS_LINES, f"{path.name}: class {node.name} has {lines} lines"


def test_the_readme_is_one_sitting():
    lines = len((REPO_ROOT / "README.md").read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: long material belongs in docs/"
