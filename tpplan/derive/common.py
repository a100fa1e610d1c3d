"""What every part of derive shares: its two refusals and a few small helpers."""

from __future__ import annotations

from typing import Any

from ..errors import TpplanError


class DeriveRefused(TpplanError):
    """No plan could be derived (the model's structure is not one derive understands): exit 2."""


class DeriveFailed(TpplanError):
    """A plan was derived but ``check`` did not prove it: exit 1, nothing written."""

    exit_code = 1


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def first_line(text: str) -> str:
    """The message's first line, with the line after it when the first only introduces it (ends in ':')."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    return line.split("error: ", 1)[-1]


def module_names(model) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if n}
