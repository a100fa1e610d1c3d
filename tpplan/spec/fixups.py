"""The spec's ``fixups``: attributes changed on matched modules after sharding (a head count that must
shrink by tp: divided by it, or set), each value one the generated script can print.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from tpplan.core.errors import short
from tpplan.spec.fields import Pattern, Strict

_ATTR_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def _attribute_path(value: Any) -> str:
    if not isinstance(value, str) or not re.match(_ATTR_PATH, value):
        raise ValueError(f"expected an attribute name (head_dim) or a dotted path (config.num_attention_heads), "
                         f"got {short(value)}")
    return value


def _plain_value(value: Any) -> Any:
    """A value printed into generated code: a finite number (nan and inf have no literal)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


class Fixup(Strict):
    """Change an attribute on matched modules after sharding (e.g. a head count that must shrink by tp)."""

    match: Pattern
    attr: Annotated[
        str,
        BeforeValidator(_attribute_path),
        WithJsonSchema({"type": "string", "pattern": _ATTR_PATH}),
        Field(
            description="attribute name, or a dotted path (config.num_attention_heads): the objects along the "
            "path are copied for each matched module first, so a config shared by every layer changes only there",
        ),
    ]
    op: Literal["floordiv_tp", "set"]
    value: Annotated[int | float | bool | str | None, BeforeValidator(_plain_value)] = None
    missing: Literal["skip", "error"] = Field(
        "skip",
        description="what to do where a matched module lacks the attribute: skip (and report) or error",
    )

    @model_validator(mode="after")
    def _value(self):
        if self.op == "set" and "value" not in self.model_fields_set:
            raise ValueError("op 'set' needs a value")
        if self.op == "floordiv_tp" and self.value is not None:
            raise ValueError("op 'floordiv_tp' takes no value: it divides the attribute by the tp size")
        return self
