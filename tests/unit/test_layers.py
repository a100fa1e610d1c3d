"""The direction of imports between tpplan's subpackages: each floor imports only the floors below it.

Every ``import`` and ``from ... import`` in tpplan/ is read, those inside functions too (a deferred
import is still a dependency), and checked against ``ALLOWED``.  A new module goes into the floor
whose job it does; an arrow the table does not allow is a design question, not a test to loosen.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "tpplan"

#: floor -> the floors it may import (besides itself).  Read bottom-up:
#: core (errors, files, patterns, layouts) <- runtime (printed into train.py) <- spec (the language)
#: <- model (sources, twins) <- plan (stage, resolve, apply, report) <- prove | simulate | render
#: <- launch (runs what render wrote) | hf | derive | tune <- zoo <- the CLI and the public API.
BELOW_PLAN = {"core", "runtime", "spec", "model", "plan"}
ALLOWED: dict[str, set[str]] = {
    "core": set(),
    "runtime": {"core"},
    "spec": {"core", "runtime"},
    "model": {"core", "runtime", "spec"},
    "plan": {"core", "runtime", "spec", "model"},
    "prove": BELOW_PLAN,
    "simulate": BELOW_PLAN,
    "render": BELOW_PLAN,
    "launch": BELOW_PLAN | {"render"},
    "hf": BELOW_PLAN | {"prove", "simulate"},
    "derive": BELOW_PLAN | {"prove", "simulate"},
    "tune": BELOW_PLAN | {"prove", "simulate"},
    "zoo": BELOW_PLAN | {"prove", "simulate", "hf", "derive"},
    # the top: the command line and the public API may import anything
    "cli": {"*"},
    "__init__": {"*"},
    "__main__": {"*"},
}
#: floors that stay importable without torch (``tpplan validate`` must not pay its import)
NO_TOP_LEVEL_TORCH = {"core", "spec", "model"}
#: arrows that point the wrong way today, each with the work that removes it
KNOWN: set[tuple[str, str]] = set()


#: flat modules that belong to a floor's package (until they move into it)
FLAT: dict[str, str] = {}


def floor_of(path: Path) -> str:
    floor = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
    return FLAT.get(floor, floor)


def imported_floors(path: Path) -> list[tuple[str, int, bool]]:
    """(floor imported, line, at module top) for every import of a tpplan module in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    top = {id(node) for node in tree.body}
    found = []
    package_parts = path.relative_to(PACKAGE).parts[:-1]
    for node in ast.walk(tree):
        modules = []
        if isinstance(node, ast.Import):
            modules = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ("tpplan", *package_parts[: len(package_parts) - node.level + 1])
                module = ".".join(base + ((node.module,) if node.module else ()))
                modules = [module] if node.module else [f"{module}.{alias.name}" for alias in node.names]
            elif node.module:
                modules = [node.module] if node.module != "tpplan" else [f"tpplan.{a.name}" for a in node.names]
        for module in modules:
            parts = module.split(".")
            if parts[0] == "tpplan" and len(parts) > 1:
                found.append((FLAT.get(parts[1], parts[1]), node.lineno, id(node) in top))
    return found


def modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def test_every_module_is_on_a_floor():
    floors = {floor_of(p) for p in modules()}
    assert floors <= set(ALLOWED), f"modules outside the floors of ALLOWED: {sorted(floors - set(ALLOWED))}"


@pytest.mark.parametrize("path", modules(), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_point_down(path):
    floor = floor_of(path)
    allowed = ALLOWED[floor]
    wrong = [
        f"{path.relative_to(PACKAGE.parent)}:{line}: {floor} imports {target}"
        for target, line, _ in imported_floors(path)
        if target != floor and "*" not in allowed and target not in allowed and (floor, target) not in KNOWN
    ]
    assert not wrong, "imports against the floors (tests/unit/test_layers.py ALLOWED):\n" + "\n".join(wrong)


def test_known_exceptions_still_exist():
    """A KNOWN arrow that is gone must leave the table, so it cannot hide a new one."""
    seen = {(floor_of(p), target) for p in modules() for target, _, _ in imported_floors(p)}
    assert KNOWN <= seen, f"remove from KNOWN: {sorted(KNOWN - seen)}"


@pytest.mark.parametrize("floor", sorted(NO_TOP_LEVEL_TORCH))
def test_lower_floors_do_not_import_torch_at_module_top(floor):
    heavy = []
    for path in (PACKAGE / floor).rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            heavy += [f"{path.relative_to(PACKAGE.parent)}:{node.lineno}: {n}" for n in names
                      if n.split(".")[0] in ("torch", "transformers")]
    assert not heavy, "torch/transformers imported at module top (validate must stay fast):\n" + "\n".join(heavy)
