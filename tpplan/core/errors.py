"""Errors a user can act on.

Every error tpplan raises on purpose is a :class:`TpplanError`.  The CLI prints its
``str()`` (one block, no traceback) and exits with ``exit_code`` (2: bad input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MAX_MESSAGE = 2000  # a message is read by a person: a 900 KB value is shown by its start and length


def short(value: Any, limit: int = 60) -> str:
    """``repr(value)``, cut to about ``limit`` characters with the value's length when longer:
    ``'aaaaaaaa...' (900,000 characters)``."""
    text = repr(value)
    if len(text) <= limit:
        return text
    if isinstance(value, (str, bytes)):
        size = f"{len(value):,} characters" if isinstance(value, str) else f"{len(value):,} bytes"
    elif isinstance(value, (list, tuple, dict, set)):
        size = f"{len(value):,} items"
    else:
        size = f"{len(text):,} characters as text"
    return f"{text[: limit - 3]}... ({size})"


def _clip(text: str | None) -> str | None:
    if text is None or len(text) <= MAX_MESSAGE:
        return text
    return f"{text[: MAX_MESSAGE - 300]} ... [{len(text) - MAX_MESSAGE + 250:,} characters left out] ... {text[-50:]}"


class TpplanError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in tpplan."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
        message, hint = _clip(message), _clip(hint)
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        text = f"error: {self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


@dataclass(frozen=True)
class Location:
    """A place in a spec file: 1-based line and column (column 0 when unknown)."""

    file: str
    line: int = 0
    column: int = 0

    def __str__(self) -> str:
        if not self.line:
            return self.file
        return f"{self.file}:{self.line}:{self.column}"


class SpecError(TpplanError):
    """A spec that cannot be loaded: YAML syntax, unknown key, wrong type, bad layout, ..."""

    def __init__(
        self,
        message: str,
        *,
        location: Location | None = None,
        path: str | None = None,
        hint: str | None = None,
    ):
        super().__init__(message, hint)
        self.location = location
        self.path = path

    def __str__(self) -> str:
        where = f"{self.location}: " if self.location else ""
        field = f"{self.path}: " if self.path else ""
        text = f"{where}error: {field}{self.message}"
        if self.hint:
            text += f"\n  hint: {self.hint}"
        return text


class SpecErrors(TpplanError):
    """Several independent problems found in one spec file, reported together."""

    def __init__(self, errors: list[SpecError]):
        super().__init__(errors[0].message, errors[0].hint)
        self.errors = errors

    def __str__(self) -> str:
        return "\n".join(str(e) for e in self.errors)


class ResolveError(SpecError):
    """A valid spec that does not fit its model: a pattern matching nothing, a size not dividing tp, ..."""
