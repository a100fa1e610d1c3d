"""The shape of the code a reader meets: no function longer than a screen, and a wheel that carries
every subpackage.

A function over ``MAX_LINES`` is cut into the steps a reader follows (as ``run_check``, ``train()``
and the twin's ``_shrink_widths`` were), in tpplan/ and in the generated scripts alike; a subpackage
left out of pyproject's list installs from a checkout (editable) and is missing from the wheel."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 80
SOURCES = sorted([*(REPO / "tpplan").rglob("*.py"), *(REPO / "generated").rglob("*.py")])


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(REPO)))
def test_no_function_is_longer_than_a_screen(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines, line {node.lineno})"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: {', '.join(long)}: cut it into the steps it takes"


def test_the_wheel_lists_every_subpackage_and_its_data_files():
    setuptools = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setuptools["packages"])
    found = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "tpplan").rglob("__init__.py")}
    data = {".".join(path.relative_to(REPO).parts) for path in (REPO / "tpplan").rglob("*")
            if path.is_dir() and path.name != "__pycache__" and any(path.glob("*.yaml"))}
    assert found - listed == set(), "subpackages pyproject's [tool.setuptools] packages leaves out"
    assert data - listed == set(), "folders of data files pyproject's packages leaves out"
    globs = setuptools["package-data"]
    unshipped = [str(path.relative_to(REPO)) for path in (REPO / "tpplan").rglob("*")
                 if path.is_file() and path.suffix not in (".py", ".pyc")
                 and not any(path.match(g) for g in globs.get(".".join(path.parent.relative_to(REPO).parts), []))]
    assert not unshipped, "data files no package-data pattern ships"
