"""The filters every spec value passes through into a template, and the Jinja environment refusing the rest.

Every value that comes from a spec enters a template through one of these filters, each made in
Python, never escaped by hand in Jinja:

- ``py``: ``repr()``, a Python literal;
- ``sh``: ``shlex.quote()``, one shell word;
- ``comment``: the inside of ``repr()`` of the text, for ``#`` comments: newlines and control
  characters come out escaped, so a comment stays one line;
- ``yaml``: a double-quoted YAML scalar made by PyYAML (``pytorchjob.yaml``, ``trainjob.yaml``).

The environment's ``finalize`` refuses anything else (a raw string, a number) with an error, so a
template that forgets a filter fails to render instead of writing an injectable script.  Code made
in Python from validated values (a torch style from its rule's ``code()``, the runtime helpers
printed with ``inspect.getsource``) is marked :class:`Code` and passes as it is.

Holds :class:`Code`, :class:`RenderError`, the filters and :func:`environment`.
"""

from __future__ import annotations

import shlex
from importlib import resources
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError


class Code(str):
    """Text that may enter a template as it is: a filter's output, or code made in Python."""


class RenderError(TpplanError):
    """A spec value that cannot be rendered safely (e.g. a newline in an #SBATCH value)."""


def py(value: Any) -> Code:
    """A Python literal: ``repr`` (strings, numbers, booleans, None, and lists/dicts of them)."""
    return Code(repr(value))


def sh(value: Any) -> Code:
    """One shell word."""
    return Code(shlex.quote(str(value)))


def yaml_scalar(value: Any) -> Code:
    """A YAML scalar: strings double-quoted by PyYAML (every special or non-ASCII character escaped,
    so ``yaml.safe_load`` gives the string back), integers and booleans as they are."""
    import json

    import yaml

    if isinstance(value, bool) or isinstance(value, int):
        return Code(json.dumps(value))
    if not isinstance(value, str):
        raise RenderError(f"internal: no YAML form for {value!r}", hint="this is a bug in a tpplan template")
    text = yaml.safe_dump(value, default_style='"', allow_unicode=False, width=float("inf"))
    return Code(text.rstrip("\n"))


def comment(value: Any) -> Code:
    """Text for a ``#`` comment, kept on one line: the inside of ``repr`` (escapes newlines and
    every non-printable character)."""
    return Code(repr(str(value))[1:-1])


def _finalize(value: Any) -> Any:
    if isinstance(value, Code):
        return value
    raise RenderError(
        f"internal: a value reached a template without the py, sh or comment filter: {value!r}",
        hint="this is a bug in a tpplan template",
    )


def environment():
    import jinja2

    folder = Path(str(resources.files("tpplan.templates")))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters.update(py=py, sh=sh, comment=comment, yaml=yaml_scalar)
    return env
