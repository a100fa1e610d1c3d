"""Styles of one's own: a plan rule that names a ``ParallelStyle`` class by import path.

``style: path/to/file.py:Class`` (relative to the spec) or ``package.module:Class`` is code from the
spec, as ``model.factory`` is: it is imported by the same function (``factory.import_factory``),
with the same errors, located at the rule.  Here it is checked to be a ``ParallelStyle`` whose
``__init__`` takes the rule's ``args`` (and, if it has a ``mesh`` parameter, the whole mesh, which
tpplan passes), and the rule is given its class (``OwnStyleRule.with_class``) for apply, check and
plan to build and for compile to print.
"""

from __future__ import annotations

import difflib
import inspect
from pathlib import Path

from tpplan.core.errors import ResolveError
from tpplan.model.factory import import_factory, parse_factory
from tpplan.spec.rules import OwnStyleRule

#: the keyword a style's ``__init__`` takes the whole (dp, ep, tp) mesh by, if it asks for it
MESH_PARAMETER = "mesh"


def load_style(rule: OwnStyleRule, base_dir: Path | None, field: str) -> OwnStyleRule:
    """``rule`` with its class imported and its ``args`` bound; ResolveError at ``field`` (the rule's
    path, e.g. ``plan[0]``) naming what does not fit."""
    factory = parse_factory(rule.style, base_dir, field=f"{field}.style")
    cls = import_factory(factory, field=f"{field}.style", what="the parallel style")
    from torch.distributed.tensor.parallel import ParallelStyle

    if not (inspect.isclass(cls) and issubclass(cls, ParallelStyle)):
        kind = "a class" if inspect.isclass(cls) else type(cls).__name__
        raise ResolveError(
            f"{rule.style} is {kind}, not a torch ParallelStyle: parallelize_module cannot apply it",
            path=f"{field}.style",
            hint="name a subclass of torch.distributed.tensor.parallel.ParallelStyle (its _apply(module, "
            "device_mesh) shards the module), or one of the built-in styles",
        )
    wants_mesh = _bind_args(cls, rule, field)
    return rule.with_class(cls, wants_mesh)


def _bind_args(cls, rule: OwnStyleRule, field: str) -> bool:
    """``cls(**rule.args)`` binds (the whole mesh passed as ``mesh`` when its __init__ has it);
    returns whether it asks for the mesh."""
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):  # no signature to read: nothing to check
        return False
    wants_mesh = MESH_PARAMETER in params
    if MESH_PARAMETER in rule.args and wants_mesh:
        raise ResolveError(f"{rule.TORCH_STYLE} is given the whole device mesh by tpplan as {MESH_PARAMETER!r}",
                           path=f"{field}.args.{MESH_PARAMETER}", hint=f"remove {MESH_PARAMETER} from args")
    named = [n for n, p in params.items() if n != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in rule.args:
        if key not in params and not var_kw:
            close = difflib.get_close_matches(key, named, n=3, cutoff=0.6)
            raise ResolveError(
                f"{rule.TORCH_STYLE}() has no parameter {key!r}",
                path=f"{field}.args.{key}",
                hint=(f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
                + (f"its parameters: {', '.join(named)}" if named else f"{rule.TORCH_STYLE}() takes no arguments"),
            )
    given = {**rule.args, **({MESH_PARAMETER: None} if wants_mesh else {})}
    try:
        inspect.signature(cls.__init__).bind(None, **given)
    except TypeError as exc:
        raise ResolveError(f"args do not fit {rule.TORCH_STYLE}(): {exc}", path=f"{field}.args",
                           hint=f"its parameters: {', '.join(named)}") from None
    return wants_mesh


def load_spec_styles(spec, base_dir: Path | None, *, trusted: bool = True) -> int:
    """Import every style of one's own in ``spec``'s plan and plan_overrides and bind its args
    (``tpplan validate``: no model built); without the user's trust only its file is looked at, as a
    factory's is.  The first that does not fit raises.  Returns how many."""
    from tpplan.spec.yaml_reader import format_path

    count = 0

    def walk(rules, base: tuple) -> None:
        nonlocal count
        for i, rule in enumerate(rules or ()):
            if rule.user_style:
                field = format_path((*base, i))
                if trusted:
                    load_style(rule, base_dir, field)
                else:
                    parse_factory(rule.style, base_dir, field=f"{field}.style")
                count += 1
            walk(rule.plan, (*base, i, "plan"))

    walk(spec.plan, ("plan",))
    walk(spec.plan_overrides, ("plan_overrides",))
    return count
