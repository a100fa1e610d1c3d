"""pydantic's validation errors -> SpecError with file:line:col, the field path, what was expected, a hint.

Holds :func:`translate` (one pydantic error, mapped back to where the value was written: the field
path without pydantic's union-branch labels, the closest valid name for a typo, the keys valid at
that place) and what it needs to find the model that validates a place in the data.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel

from tpplan.core.errors import SpecError, short
from tpplan.spec import yaml_reader
from tpplan.spec.rules import GROUP_TAG, STYLE_NAMES, STYLE_RULES, GroupRule
from tpplan.spec.schema import Spec
from tpplan.spec.yaml_reader import PathKey, Source, format_path


def _data_path(loc: tuple, data: Any) -> PathKey:
    """Drop pydantic's union-branch labels from ``loc``, keeping the real keys and indexes."""
    path: list = []
    current = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, dict) and part in current:
            path.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        elif last and isinstance(part, (str, int)) and not _is_branch_label(part):
            path.append(part)  # a missing or extra key: keep it for the message
            current = None
        # else: a union tag or validator label such as 'colwise' or 'function-after[...]'
    return tuple(path)


def _is_branch_label(part: Any) -> bool:
    return isinstance(part, str) and (
        part in STYLE_NAMES or part == GROUP_TAG or "[" in part or part in {"str", "int"}
    )


def _model_at(path: PathKey, data: Any) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at ``path`` (for listing its keys)."""
    annotation: Any = Spec
    current = data
    for part in path:
        if isinstance(part, int):
            annotation = _list_item(annotation)
            current = current[part] if isinstance(current, list) and 0 <= part < len(current) else None
            continue
        model = _model_of_annotation(annotation, current)
        field_info = model.model_fields.get(part) if model else None
        if field_info is None:
            return None
        annotation = field_info.annotation
        current = current.get(part) if isinstance(current, dict) else None
    return _model_of_annotation(annotation, current)


def _list_item(annotation: Any) -> Any:
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is list:
            return typing.get_args(candidate)[0]
    return None


def _model_of_annotation(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The model class an annotation (a model, Optional[model], or the rule union) gives ``value``."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _model_of_annotation(args[0], value)
    if any(_is_rule_class(a) for a in args):
        return _rule_class_for(value)
    for arg in args:
        if typing.get_origin(arg) is list:
            continue
        found = _model_of_annotation(arg, value)
        if found is not None:
            return found
    return None


def _is_rule_class(annotation: Any) -> bool:
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return isinstance(annotation, type) and (annotation is GroupRule or annotation in STYLE_RULES.values())


def _rule_class_for(value: Any):
    if isinstance(value, dict):
        style = value.get("style")
        if style is None:
            return GroupRule
        return STYLE_RULES.get(style) if isinstance(style, str) else None
    return None


def _closest(word: str, choices) -> str | None:
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping (key: value lines)",
    "list_type": "a list (lines starting with '- ')",
    "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
    "tuple_type": "a list",
}


def translate(err: dict, data: Any, source: Source) -> SpecError:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    path = _data_path(loc, data)
    given = err.get("input")
    location = source.where(path, key=kind == "extra_forbidden")
    hint = None
    if kind == "extra_forbidden":
        key = path[-1] if path else loc[-1]
        model = _model_at(path[:-1], data)
        valid = sorted(model.model_fields) if model else []
        close = _closest(key, valid)
        message = f"unknown key '{key}'"
        if close:
            hint = f"did you mean '{close}'?"
        elif valid:
            hint = "valid keys here: " + ", ".join(valid)
    elif kind == "missing":
        message = "required key is missing"
        location = source.where(path[:-1])
        model = _model_at(path[:-1], data)
        if model is GroupRule:
            hint = "a rule needs a `style` (" + ", ".join(STYLE_NAMES) + ") or a nested `plan`"
    elif kind == "unknown_style":
        style = given.get("style") if isinstance(given, dict) else None
        path = (*path, "style")
        location = source.where(path)
        message = f"unknown style {short(style)}"
        close = _closest(style, STYLE_NAMES) if isinstance(style, str) else None
        hint = (f"did you mean '{close}'? " if close else "") + "styles: " + ", ".join(STYLE_NAMES)
        if style == GROUP_TAG:
            hint = "a group is a rule with a nested `plan` and no `style` key"
    elif kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        message = f"expected {expected}; got {short(given)}"
        words = [w.strip().strip("'") for w in expected.replace(" or ", ",").split(",")]
        close = _closest(given, words) if isinstance(given, str) else None
        if close:
            hint = f"did you mean '{close}'?"
    elif kind in ("value_error", "assertion_error"):
        error = (err.get("ctx") or {}).get("error")
        message = str(error or err.get("msg", ""))
        subpath = getattr(error, "subpath", ())
        if subpath:  # a FieldError about one key inside the field: point at that key
            path = (*path, *subpath)
            location = source.where(path)
    elif kind == "string_pattern_mismatch":
        message = f"{short(given)} is not allowed here"
        if path and path[-1] == "name":
            hint = "a name is letters, digits, '.', '_' and '-' (it names folders), starting with a letter or digit"
        else:
            hint = f"it must match {(err.get('ctx') or {}).get('pattern')}"
    elif kind in ("too_short", "too_long"):
        ctx = err.get("ctx") or {}
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        message = f"expected {'at least' if kind == 'too_short' else 'at most'} {bound} item(s), got {ctx.get('actual_length')}"
        if path and path[-1] == "plan":
            hint = "a plan needs at least one rule"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {yaml_reader.kind(given)} {short(given)}"
    else:
        message = err.get("msg", kind)
    return SpecError(message, location=location, path=format_path(path), hint=hint)
