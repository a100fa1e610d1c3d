"""``extends``: a spec merged over the one it builds on, each file's local paths rebased first.

Holds :func:`load_data` (a spec file and everything it extends -> data, locations, the chain of
files), the merge of data and of locations, where a parent is found (a path relative to the file,
or a shipped spec: :func:`shipped_specs_dir`), and the rebasing of a parent's relative paths onto
the root spec's folder.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Any

from tpplan.core.errors import Location, SpecError
from tpplan.spec.yaml_reader import PathKey, kind, parse_yaml, read_text

MAX_EXTENDS_DEPTH = 16


def shipped_specs_dir() -> Path:
    """The specs shipped with tpplan (the top-level specs/ folder, packaged as tpplan.specs)."""
    return Path(str(resources.files("tpplan.specs")))


def _display(path: Path) -> str:
    """A path as messages show it: relative to the working directory, escaped if unprintable."""
    try:
        text = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        text = str(path)
    return text if text.isprintable() else repr(text)


def _merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; every other value (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return over


def _merge_marks(base_marks: dict, over_marks: dict, over_data: Any) -> dict:
    """Locations of the merged data: the child's wherever it wrote a value, else the parent's."""
    merged = dict(base_marks)
    for path in over_marks:
        # a value the child wrote replaces the parent's value *and everything under it*
        # unless both are mappings (merged key by key)
        if not isinstance(_get(over_data, path), dict):
            for stale in [p for p in merged if p[: len(path)] == path and len(p) > len(path)]:
                del merged[stale]
    merged.update(over_marks)
    return merged


def _get(data: Any, path: PathKey) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _find_parent(ref: str, child: Path, where: Location) -> Path:
    candidates = []
    ref_path = Path(os.path.expanduser(ref))
    candidates.append(ref_path if ref_path.is_absolute() else child.parent / ref_path)
    if not ref_path.suffix and os.sep not in ref and "/" not in ref:
        candidates.append(child.parent / f"{ref}.yaml")
        candidates.append(shipped_specs_dir() / f"{ref}.yaml")
    for candidate in candidates:
        if os.path.lexists(candidate) and not candidate.is_dir():
            return candidate.resolve() if candidate.exists() else candidate  # read_input says what it is
    shipped = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))
    raise SpecError(
        f"{ref!r} not found (looked for {', '.join(_display(c) for c in candidates)})",
        location=where,
        path="extends",
        hint=f"a path relative to this file, or a shipped spec: {', '.join(shipped)}",
    )


def load_data(
    path: Path, _stack: tuple[Path, ...] = (), _via: Location | None = None, _extends: tuple | None = None
) -> tuple[dict, dict, tuple[Path, ...]]:
    """Read a spec file and everything it extends. Returns (data, marks, chain of files).
    ``_extends`` is (location, value) of a ``--set extends=...``: it replaces the file's own."""
    path = path.resolve() if path.exists() else path
    display = _display(path)
    text = read_text(path, display, _via)
    data, marks = parse_yaml(text, display)
    if data is None:
        raise SpecError(
            "the spec file is empty", location=Location(display), hint="see specs/tiny-llama.yaml"
        )
    if not isinstance(data, dict):
        raise SpecError(
            f"a spec is a mapping of keys (name, model, plan, ...), not a {kind(data)}",
            location=marks.get((), (Location(display),) * 2)[1],
        )
    _rebase_paths(data, path.parent, (_stack[0] if _stack else path).parent)
    if _extends is not None:
        where, value = _extends
        for stale in [p for p in marks if p[:1] == ("extends",)]:
            del marks[stale]
        if value is None:
            data.pop("extends", None)
        else:
            data["extends"] = value
            marks[("extends",)] = (where, where)
    ref = data.get("extends")
    if ref is None:
        return data, marks, (path,)
    where = marks[("extends",)][1]
    if not isinstance(ref, str) or not ref.strip():
        raise SpecError(
            "extends takes one spec: a path or a shipped spec's name", location=where, path="extends"
        )
    parent = _find_parent(ref, path, where)
    chain = (*_stack, path)
    if parent in chain:
        cycle = " -> ".join(_display(p) for p in (*chain[chain.index(parent) :], parent))
        raise SpecError(
            f"makes a cycle: {cycle}",
            location=where,
            path="extends",
            hint="a spec cannot build on itself, directly or through others",
        )
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise SpecError(
            f"extends chain is longer than {MAX_EXTENDS_DEPTH} files", location=where, path="extends"
        )
    base, base_marks, base_chain = load_data(parent, chain, where)
    merged = _merge(base, data)
    return merged, _merge_marks(base_marks, marks, data), (path, *base_chain)


def _is_local_path(value: Any, *, always: bool) -> bool:
    """A relative local path: for data files always (unless a URL); for model/tokenizer names only
    when written as one (./x, ../x), since `org/name` is a hub id."""
    if not isinstance(value, str) or not value or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return False
    return always or value.startswith(("./", "../", "~"))


def _rebase_paths(data: dict, directory: Path, root: Path) -> None:
    """Local paths are relative to the file that writes them.  Before `extends` merges files from
    several folders, re-express each parent file's relative paths relative to the root spec's
    folder: the corpus named in specs/tiny-llama.yaml stays that corpus for a spec extending it
    from elsewhere, and every consumer keeps resolving paths against the root spec's folder."""
    if directory == root:
        return

    def rebase(value: str) -> str:
        return os.path.relpath(directory / os.path.expanduser(value), root)

    def rebase_code(value: Any) -> Any:
        """``file.py:name`` (model.factory, a rule's style of one's own); a dotted module stays."""
        if isinstance(value, str) and ":" in value:  # a file path (not a dotted module) before the ':'
            module, _, attr = value.rpartition(":")
            if (module.endswith(".py") or "/" in module) and _is_local_path(module, always=True):
                return f"{rebase(module)}:{attr}"
        return value

    def rebase_rules(rules: Any) -> None:
        for rule in rules if isinstance(rules, list) else ():
            if isinstance(rule, dict):
                if "style" in rule:
                    rule["style"] = rebase_code(rule["style"])
                rebase_rules(rule.get("plan"))

    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("data_files"), list):
        train["data_files"] = [rebase(f) if _is_local_path(f, always=True) else f for f in train["data_files"]]
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("name", "tokenizer"):
            if _is_local_path(model.get(key), always=False):
                rebased = rebase(model[key])
                model[key] = rebased if rebased.startswith(".") else f"./{rebased}"  # still reads as a path
        if "factory" in model:
            model["factory"] = rebase_code(model["factory"])
    rebase_rules(data.get("plan"))
    rebase_rules(data.get("plan_overrides"))
