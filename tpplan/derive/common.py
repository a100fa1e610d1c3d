"""What every part of derive shares: its two refusals and a few small helpers."""

from __future__ import annotations

import contextlib
import re
from typing import Any

from tpplan.core.errors import SpecError, TpplanError


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


def features(module) -> tuple[int, int]:
    """(input features, output features) of an nn.Linear or a transformers Conv1D (weight [in, out])."""
    from tpplan.spec.rule_base import is_conv1d

    return (module.nx, module.nf) if is_conv1d(module) else (module.in_features, module.out_features)


def unwritten(exc: TpplanError, name: str | None = None) -> str:
    """A spec error about a plan derive made but never wrote (the spec ``name``, or one built without a
    file): its message with the field path in the plan, never a file:line:col that would point into a
    file that does not exist; a place in a file that does exist (the input spec) is kept."""
    lines = []
    for error in getattr(exc, "errors", None) or [exc]:
        where = getattr(error, "location", None)
        if where is not None and name is not None and where.file != name:
            lines.append(str(error))
            continue
        path = getattr(error, "path", None)
        message = getattr(error, "message", None) or str(error)
        lines.append(f"{path}: {message}" if path else message)
        if getattr(error, "hint", None):
            lines.append(f"  hint: {error.hint}")
    return "\n".join(lines)


@contextlib.contextmanager
def located_in_input(inp, name: str):
    """Errors about the derived spec (``name``, never written) point at the input instead: a model
    field at the input spec's line, anything else at no file (its field path says where)."""
    try:
        yield
    except TpplanError as exc:
        for error in getattr(exc, "errors", None) or [exc]:
            if not isinstance(error, SpecError) or error.location is None or error.location.file != name:
                continue
            error.location = None
            if inp.spec_source is not None and (error.path or "").startswith("model"):
                keys = tuple(int(k) if k.isdigit() else k for k in re.split(r"[.\[\]]+", error.path) if k)
                error.location = inp.spec_source.where(keys)
        raise
