"""Errors a user can act on.

Every error tpplan raises on purpose is a :class:`TpplanError`.  The CLI prints its
``str()`` (one block, no traceback) and exits with ``exit_code`` (2: bad input).
"""

from __future__ import annotations

from dataclasses import dataclass


class TpplanError(Exception):
    """Base class: a problem with the user's input or environment, not a bug in tpplan."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None):
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
