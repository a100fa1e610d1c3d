"""A user's own model: ``model.factory`` (a function or class returning an nn.Module), found and imported.

Holds :class:`Factory` (where a ``file.py:name`` or ``package.module:name`` lives) and
:func:`parse_factory`, :func:`import_factory` (only under the user's trust: importing runs the
module; a rule's style of one's own is imported by the same function) and
:func:`bind_factory_args` (``model.args`` and ``twin_args`` against the factory's signature), with
the user's own line in every error.
"""

from __future__ import annotations

import difflib
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpplan.core.errors import ResolveError
from tpplan.model import sources

# ------------------------------------------------------------------------------------------
# A user's own model: `model.factory` (a function or class returning an nn.Module)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factory:
    """Where a spec's ``model.factory`` lives.

    ``path/to/file.py:build``: a file, relative to the spec; its folder is put first on
    ``sys.path`` and the file imported by its name (as ``python path/to/file.py`` would see its
    sibling modules).  ``package.module:build``: a module on the Python path (PYTHONPATH,
    installed packages).  The part after the ``:`` may be ``Class.method``."""

    text: str  # as the spec gives it
    module: str  # the name it is imported by
    attr: str  # the callable, possibly dotted (Class.method)
    file: Path | None = None  # the .py file (file form)

    @property
    def root(self) -> Path | None:
        """The folder put first on sys.path (file form)."""
        return self.file.parent if self.file is not None else None

    @property
    def shown(self) -> str:
        return f"{sources.shown(self.file)}:{self.attr}" if self.file is not None else self.text


def parse_factory(text: str, base_dir: Path | None, field: str = "model.factory") -> Factory:
    """``model.factory`` (or a rule's ``style`` of one's own, ``field``) -> a Factory; a file that does
    not exist is an error at ``field``."""
    module, _, attr = text.rpartition(":")
    if not (module.endswith(".py") or "/" in module):
        return Factory(text=text, module=module, attr=attr)
    path = Path(os.path.expanduser(module))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    shown = sources.shown(path)
    what, name = ("model factory", "function") if field == "model.factory" else ("parallel style", "Class")
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        raise ResolveError(
            f"{what} file not found: {module!r}" + (f" ({shown})" if shown != module else ""),
            path=field,
            hint=f"a file path in {field} is relative to the spec file; a dotted name "
            f"(package.module:{name}) is imported from the Python path",
        ) from None
    if not stat.S_ISREG(mode):  # a folder, a FIFO (importing would block), a device: never opened
        from tpplan.core.fileio import file_kind

        raise ResolveError(
            f"{what} file {module!r}" + (f" ({shown})" if shown != module else "")
            + f" is a {file_kind(mode)}, not a Python file",
            path=field,
            hint=f"name a .py file and the {name.lower()} in it: 'path/to/file.py:{name}'",
        )
    return Factory(text=text, module=path.stem, attr=attr, file=path.resolve())


def user_frame(exc: BaseException, factory: Factory) -> str | None:
    """``file:line`` of the innermost frame of the user's code in ``exc``'s traceback."""
    import traceback

    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{sources.shown(Path(exc.filename))}:{exc.lineno}"
    root = str(factory.root) if factory.root is not None else None
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if root and f.filename.startswith(root)] or [
        f for f in frames if "site-packages" not in f.filename and "/tpplan/" not in f.filename
        and "importlib" not in f.filename
    ]
    if not mine:
        return None
    frame = mine[-1]
    return f"{sources.shown(Path(frame.filename))}:{frame.lineno}" + (f": {frame.line.strip()}" if frame.line else "")


def exception_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def from_user_code(exc: BaseException) -> bool:
    """Whether ``exc``, raised while the user's code ran, is that code's failure: everything but a
    KeyboardInterrupt that a real Ctrl-C or SIGTERM caused (that one stops the command)."""
    from tpplan.core.processes import received

    return not (isinstance(exc, KeyboardInterrupt) and received() is not None)


def exit_text(exc: BaseException) -> str:
    """A SystemExit as words: ``sys.exit(0)``, ``sys.exit('usage: ...')``."""
    code = exc.code if isinstance(exc, SystemExit) else None
    shown = repr(code if not isinstance(code, str) else code.splitlines()[0] if code else code)
    return f"called sys.exit({'' if code is None else shown[:120]})"


def import_factory(factory: Factory, field: str = "model.factory", what: str = "the model factory"):
    """The callable ``factory`` names, imported (errors: at ``field``, with the user's line).  Only when
    the user trusts the spec (``trust.require_trust``): importing runs the module.  A rule's style of
    one's own is imported by the same function, under the same trust (``field``: the rule's style)."""
    import importlib
    import sys

    from tpplan.core.trust import require_trust

    require_trust(field, f"{field} {factory.text!r}")
    if factory.root is not None:
        loaded = sys.modules.get(factory.module)
        where = getattr(loaded, "__file__", None)
        if loaded is not None and (where is None or Path(where).resolve() != factory.file):
            raise ResolveError(
                f"a module named {factory.module!r} is already imported from "
                f"{where or 'a built-in'}; {sources.shown(factory.file)} would not be the one used",
                path=field,
                hint=f"rename {factory.file.name} to a name no installed package uses",
            )
        root = str(factory.root)
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        module = importlib.import_module(factory.module)
    except ModuleNotFoundError as exc:
        if exc.name and (factory.module == exc.name or factory.module.startswith(exc.name + ".")):
            raise ResolveError(
                f"no module named {exc.name!r} on the Python path (for {factory.text!r})",
                path=field,
                hint="add its folder to PYTHONPATH (or pip install its package), or name a file: "
                "'path/to/file.py:function', relative to the spec",
            ) from None
        frame = user_frame(exc, factory)
        raise ResolveError(
            f"importing {what} {factory.shown!r} failed: {exception_text(exc)}"
            + (f" ({frame})" if frame else ""),
            path=field,
            hint=f"the {'factory' if field == 'model.factory' else 'style'}'s module imports a package that is not "
            "installed here",
        ) from None
    except BaseException as exc:  # the user's module raised, or exited, while importing: say where
        if not from_user_code(exc):
            raise
        frame = user_frame(exc, factory)
        outcome = exit_text(exc) if isinstance(exc, SystemExit) else f"failed: {exception_text(exc)}"
        raise ResolveError(
            f"importing {what} {factory.shown!r} {outcome}" + (f" ({frame})" if frame else ""),
            path=field,
            hint=f"a module that {field} names must define the {'factory' if field == 'model.factory' else 'style'} "
            "when it is imported, not run a "
            "program (keep a script's work under `if __name__ == \"__main__\":`)" if isinstance(exc, SystemExit)
            else None,
        ) from None
    target: Any = module
    where = sources.shown(factory.file) if factory.file is not None else factory.module
    for i, part in enumerate(factory.attr.split(".")):
        if not hasattr(target, part):
            owner = where if i == 0 else f"{where}:{'.'.join(factory.attr.split('.')[:i])}"
            names = [n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None))]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            raise ResolveError(
                f"{owner} has no attribute {part!r}",
                path=field,
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + (f"callables in {owner}: {', '.join(names[:12])}" if names else f"{owner} defines no callables"),
            )
        target = getattr(target, part)
    if not callable(target):
        kind = type(target).__name__
        raise ResolveError(
            f"{where}:{factory.attr} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a function or class",
            path=field,
        )
    return target


def bind_factory_args(function, factory: Factory, args: dict, twin_args: dict | None = None) -> None:
    """The factory's signature accepts ``args`` (and ``args`` merged with ``twin_args``): every key
    names a parameter, every required parameter is given.  Errors point at the key at fault."""
    import inspect

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    params = signature.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    by_keyword = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    label = f"{factory.attr}()"
    for section, given in (("args", args), ("twin_args", twin_args or {})):
        for key in given:
            if key in params and params[key].kind is params[key].POSITIONAL_ONLY:
                raise ResolveError(f"{label} takes {key!r} only by position: it cannot be given in model.{section}",
                                   path=f"model.{section}.{key}")
            if key not in params and not var_kw:
                close = difflib.get_close_matches(key, by_keyword, n=3, cutoff=0.6)
                raise ResolveError(
                    f"{label} has no parameter {key!r}",
                    path=f"model.{section}.{key}",
                    hint=(f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
                    + (f"its parameters: {', '.join(by_keyword)}" if by_keyword else f"{label} takes no keyword arguments"),
                )
    cases = [("args", dict(args))]
    if twin_args is not None:
        cases.append(("twin_args", {**args, **twin_args}))
    for section, given in cases:
        missing = [
            n for n, p in params.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
            and n not in given
        ]
        if missing:
            what = "model.args" if section == "args" else "model.args merged with model.twin_args"
            raise ResolveError(
                f"{label} needs {', '.join(repr(m) for m in missing)}, missing from {what}",
                path=f"model.{section}",
                hint=f"give {', '.join(missing)} in model.args",
            )
        try:
            signature.bind(**given)
        except TypeError as exc:
            raise ResolveError(f"model.{section} do not fit {label}: {exc}", path=f"model.{section}") from None
