"""The spec's field types: scalar types with one clear message each (no multi-branch union errors
for the user to read), and ``Strict``, the base of every model in the spec.

Layouts (``LayoutStr``, ``Layouts``, ``KwargLayouts``); bounded integers (``int_between``,
``positive_int``, ``TpSize``, ``DpSize``, ``NprocPerNode``); module-name patterns (``Pattern``,
``Patterns``); ``finite`` numbers (the generated script prints them as literals); import paths as
``model.factory`` takes them (``FactoryStr``, ``factory``); and ``FieldError``, which points the
loader at a key inside a field.  ``Strict`` forbids unknown keys, so a typo is an error with a
suggestion, not a silent default.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema

from tpplan.core.errors import short
from tpplan.core.layouts import LAYOUT_HELP, LAYOUT_PATTERN, parse_layout


def _layout(value: Any) -> str:
    return str(parse_layout(value))


def layouts(value: Any) -> Any:
    """A layout, or a list of layouts (``null`` for a positional input that is not a tensor)."""
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError(f"expected {LAYOUT_HELP}, or a non-empty list of them")
        return tuple(None if v is None else _layout(v) for v in value)
    return _layout(value)


_LAYOUT_SCHEMA = {"type": "string", "pattern": LAYOUT_PATTERN, "description": LAYOUT_HELP}

LayoutStr = Annotated[str, BeforeValidator(_layout), WithJsonSchema(_LAYOUT_SCHEMA)]
Layouts = Annotated[
    str | tuple[str | None, ...],
    BeforeValidator(layouts),
    WithJsonSchema(
        {
            "oneOf": [
                _LAYOUT_SCHEMA,
                {"type": "array", "minItems": 1, "items": {"oneOf": [_LAYOUT_SCHEMA, {"type": "null"}]}},
            ]
        }
    ),
]
KwargLayouts = dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], LayoutStr]


class FieldError(ValueError):
    """A validation error about a part of the value: ``subpath`` (keys below the field) makes the
    loader point at that key's line, e.g. ``model.config.hidden_size`` rather than ``model``."""

    def __init__(self, message: str, subpath: tuple = ()):
        super().__init__(message)
        self.subpath = tuple(subpath)


MAX_INT = 2**31 - 1  # every count and size in a spec fits a C int; beyond it is a typo


def int_between(low: int, high: int, what: str = "an integer"):
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"expected {what} (an integer), got {short(value)}")
        if not low <= value <= high:
            raise ValueError(f"expected {what} from {low:,} to {high:,}, got {short(value)}")
        return value

    return check


def positive_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected a positive integer, got {short(value)}")
    if value <= 0:
        raise ValueError(f"expected a positive integer, got {value}")
    if value > MAX_INT:
        raise ValueError(f"expected a positive integer up to {MAX_INT:,}, got {short(value)}")
    return value


def _int_or_word(*words: str):
    def check(value: Any) -> Any:
        if isinstance(value, str) and value in words:
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return positive_int(value)
        choices = (
            ", ".join(repr(w) for w in words[:-1]) + (" or " if len(words) > 1 else "") + repr(words[-1])
        )
        raise ValueError(f"expected a positive integer or {choices}, got {short(value)}")

    return check


def _int_or_word_schema(*words: str) -> dict:
    return {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "enum": list(words)}]}


TpSize = Annotated[
    int | Literal["node"], BeforeValidator(_int_or_word("node")), WithJsonSchema(_int_or_word_schema("node"))
]
DpSize = Annotated[
    int | Literal["auto"], BeforeValidator(_int_or_word("auto")), WithJsonSchema(_int_or_word_schema("auto"))
]
NprocPerNode = Annotated[
    int | Literal["auto", "gpu", "cpu"],
    BeforeValidator(_int_or_word("auto", "gpu", "cpu")),
    WithJsonSchema(_int_or_word_schema("auto", "gpu", "cpu")),
]

NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$"
# One dotted part of a pattern: identifier characters plus fnmatch's * ? [ ] !
_PATTERN_PART = re.compile(r"^[A-Za-z0-9_*?\[\]!-]+$")


def _pattern(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"expected a module-name pattern such as 'model.layers.*.mlp', got {short(value)}")
    parts = value.split(".")
    for part in parts:
        if not part:
            raise ValueError(f"empty part in pattern {short(value)}: two dots in a row, or a leading/trailing dot")
        if not _PATTERN_PART.match(part):
            raise ValueError(
                f"pattern {short(value)}: part {short(part)} may hold only letters, digits, '_', '-' and the "
                "wildcards * ? [...]"
            )
        if part.count("[") != part.count("]"):
            raise ValueError(f"pattern {short(value)}: unbalanced [ ] in part {short(part)}")
    return value


Pattern = Annotated[
    str,
    BeforeValidator(_pattern),
    WithJsonSchema(
        {
            "type": "string",
            "description": "dotted module name; each part an fnmatch pattern (* ? [abc]), as in torch's parallelize_module",
        }
    ),
]


def _patterns(value: Any) -> Any:
    if isinstance(value, str):
        return (_pattern(value),)
    if isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("expected a module-name pattern or a non-empty list of them")
        return tuple(_pattern(v) for v in value)
    raise ValueError(f"expected a module-name pattern such as 'layers.*', or a list of them, got {value!r}")


Patterns = Annotated[
    tuple[str, ...],
    BeforeValidator(_patterns),
    WithJsonSchema(
        {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
         "description": "module-name pattern(s), as in plan rules"}
    ),
]


def finite(item: Any, path: tuple) -> None:
    """Every number in ``item`` (nested dicts and lists too) is finite: nan and inf have no literal
    in the generated script."""
    if isinstance(item, float) and not math.isfinite(item):
        raise FieldError(f"expected a finite number, got {item}", path)
    if isinstance(item, dict):
        for k, v in item.items():
            finite(v, (*path, k))
    elif isinstance(item, list):
        for i, v in enumerate(item):
            finite(v, (*path, i))


_IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENTIFIER}(?:\.{_IDENTIFIER})*"
FACTORY_HELP = (
    "'path/to/file.py:function' (a file, relative to this spec) or 'package.module:function' "
    "(a module on the Python path)"
)


def factory(value: Any) -> str:
    """``MODULE:CALLABLE``: MODULE a ``.py`` file (relative to the spec) or a dotted module name."""
    if not isinstance(value, str) or value.count(":") < 1:
        raise ValueError(f"expected {FACTORY_HELP}, got {value!r}")
    module, _, attr = value.rpartition(":")
    if not re.fullmatch(_DOTTED, attr):
        raise ValueError(f"{value!r}: {attr!r} after the ':' is not a Python name (function, or Class.method)")
    if module.endswith(".py") or "/" in module or "\\" in module:
        if not module.endswith(".py"):
            raise ValueError(f"{value!r}: a file path before the ':' must name a .py file")
        if not re.fullmatch(_IDENTIFIER, module.replace("\\", "/").rsplit("/", 1)[-1][:-3]):
            raise ValueError(f"{value!r}: the file name must be a Python module name (letters, digits, _)")
        return value
    if not re.fullmatch(_DOTTED, module):
        raise ValueError(f"{value!r}: {module!r} before the ':' is not a module name or a .py file")
    return value


FactoryStr = Annotated[
    str,
    BeforeValidator(factory),
    WithJsonSchema({"type": "string", "pattern": r"^.+:[A-Za-z_][A-Za-z0-9_.]*$", "description": FACTORY_HELP}),
]
Identifier = Annotated[str, Field(pattern=rf"^{_IDENTIFIER}$")]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
