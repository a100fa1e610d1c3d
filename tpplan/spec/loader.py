"""YAML -> Spec, keeping every value's file, line and column for error messages.

The file is parsed to nodes with source marks (tpplan/spec/yaml_reader.py), turned into plain data
while recording where each value came from, merged with the spec it ``extends``
(tpplan/spec/extends.py), given the ``--set`` values, then validated by pydantic.  Every pydantic
error is mapped back to ``file:line:col`` with the field path (``plan[3].style``), what was
expected, and for typos the closest valid name (tpplan/spec/pydantic_errors.py).

Holds :func:`load_spec`, :func:`load_spec_text` and the ``--set`` items they apply.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tpplan.core.errors import Location, SpecError, SpecErrors, short
from tpplan.spec.extends import load_data, shipped_specs_dir
from tpplan.spec.pydantic_errors import translate
from tpplan.spec.schema import Spec
from tpplan.spec.yaml_reader import MAX_DEPTH, Source, format_path, kind, parse_yaml

#: the plan a spec without one is validated with (``require_plan=False``), then dropped: ``tpplan derive``
#: reads a spec's model, data, mesh and launch to write the plan itself
_NO_PLAN = [{"match": "*", "style": "replicate"}]


def _validate(data: dict, source: Source, require_plan: bool = True) -> Spec:
    planless = not require_plan and not data.get("plan")
    try:
        spec = Spec.model_validate({**data, "plan": _NO_PLAN} if planless else data)
    except ValidationError as exc:
        errors = [translate(e, data, source) for e in exc.errors(include_url=False)]
        # one message per place: unions can report the same field twice
        unique: dict[tuple, SpecError] = {}
        for e in errors:
            unique.setdefault((e.path, e.message), e)
        errors = sorted(unique.values(), key=lambda e: (e.location.line if e.location else 0, e.path or ""))
        if len(errors) == 1:
            raise errors[0] from None
        raise SpecErrors(errors) from None
    if planless:
        spec = spec.model_copy(update={"plan": []})
    spec._source = source
    return spec


def _override_items(overrides) -> list[tuple[Location, str, tuple, Any]]:
    """``--set`` items parsed: (where, key, key parts, value); the value is read as YAML (5 is an
    int, true a bool).  Errors point at the item (``--set #2``, or the flag that made it)."""
    items = []
    for i, item in enumerate(overrides or ()):
        label, text_item = item if isinstance(item, tuple) else (f"--set #{i + 1}", item)
        where = Location(label)
        key, sep, text = text_item.partition("=")
        key = key.strip()
        parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        if not sep or not all(p != "" for p in parts):
            raise SpecError(
                f"--set takes KEY=VALUE with a dotted key, e.g. train.max_steps=10; got {short(text_item)}",
                location=where,
            )
        if len(parts) > MAX_DEPTH:  # the spec's own nesting limit: a key 3,000 levels deep is not a spec key
            raise SpecError(f"--set key {short(key)} is {len(parts):,} levels deep; a spec has at most {MAX_DEPTH}",
                            location=where)
        value, _ = parse_yaml(text, label) if text.strip() else (None, {})
        if parts[0] == "extends" and (len(parts) > 1 or not (value is None or isinstance(value, str))):
            raise SpecError("extends takes one spec: a path or a shipped spec's name", location=where,
                            path="extends")
        items.append((where, key, parts, value))
    return items


def _apply_overrides(data: dict, marks: dict, items) -> None:
    """Set each item's value in ``data``; its location (and that of everything under it) becomes
    the item, so an error in the value points at the ``--set``, not at the spec line it replaced."""
    for where, key, parts, value in items:
        if parts == ("extends",):
            continue  # applied before the spec is merged (load_spec)
        target: Any = data
        for n, part in enumerate(parts[:-1]):
            if isinstance(target, list):
                if not isinstance(part, int) or not 0 <= part < len(target):
                    raise SpecError(f"--set {key}: {format_path(parts[:n])} has no item {part}", location=where,
                                    path=format_path(parts[: n + 1]))
                child = target[part]
            else:
                child = target.get(part) if isinstance(part, str) else None
                if child is None and isinstance(part, str):
                    child = target[part] = {}
                    marks[parts[: n + 1]] = (where, where)
            if not isinstance(child, (dict, list)):
                raise SpecError(f"--set {key}: {format_path(parts[: n + 1])} is not a mapping or a list",
                                location=where, path=format_path(parts[: n + 1]))
            target = child
        last = parts[-1]
        if isinstance(target, list):
            if not isinstance(last, int) or not 0 <= last < len(target):
                raise SpecError(f"--set {key}: {format_path(parts[:-1])} has no item {last}", location=where,
                                path=format_path(parts))
        elif not isinstance(last, str):
            last = str(last)
            parts = (*parts[:-1], last)
        target[last] = value
        for stale in [p for p in marks if p[: len(parts)] == parts]:
            del marks[stale]
        _mark_all(marks, parts, value, where)


def _mark_all(marks: dict, path: tuple, value: Any, where: Location) -> None:
    marks[path] = (where, where)
    if isinstance(value, dict):
        for k, v in value.items():
            _mark_all(marks, (*path, k), v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _mark_all(marks, (*path, i), v, where)


def load_spec(path: str | os.PathLike, overrides: list | None = None, *, require_plan: bool = True) -> Spec:
    """Load, merge (``extends``) and validate one spec file; ``overrides`` are ``--set`` items
    (``KEY=VALUE`` strings, or ``(label, KEY=VALUE)`` pairs for a flag that sets a value).
    ``--set extends=OTHER`` builds on OTHER instead (a path relative to the working directory,
    or a shipped spec's name); ``--set extends=null`` drops the spec's own ``extends``.
    ``require_plan=False``: a spec without a ``plan`` loads with an empty one (``tpplan derive``)."""
    spec_path = Path(path)
    if not spec_path.exists() and not spec_path.suffix and (shipped_specs_dir() / f"{path}.yaml").is_file():
        spec_path = shipped_specs_dir() / f"{path}.yaml"  # `tpplan check llama3` finds the shipped spec
    items = _override_items(overrides)
    extends = next(((where, value) for where, _, parts, value in reversed(items) if parts == ("extends",)), None)
    if extends is not None and isinstance(extends[1], str):
        ref = os.path.expanduser(extends[1])
        if not os.path.isabs(ref) and (os.path.lexists(ref) or Path(ref).suffix or "/" in ref):
            extends = (extends[0], os.path.abspath(ref))  # a path given on the command line: from here
    data, marks, chain = load_data(spec_path, _extends=extends)
    _apply_overrides(data, marks, items)
    resolved = spec_path.resolve() if spec_path.exists() else spec_path
    source = Source(path=resolved, marks=marks, chain=chain)
    return _validate(data, source, require_plan)


def load_spec_text(text: str, name: str = "<spec>", directory: str | os.PathLike = ".") -> Spec:
    """Validate spec YAML given as text (no ``extends``); used by tests and ``--set`` overrides."""
    data, marks = parse_yaml(text, name)
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping of keys, not a {kind(data)}", location=Location(name))
    if "extends" in data:
        raise SpecError("extends needs a spec file on disk", location=marks[("extends",)][1], path="extends")
    return _validate(data, Source(path=Path(directory) / name, marks=marks, chain=()))
