"""Generic style machinery: a plan rule -> its torch ``ParallelStyle`` object, the code that builds
it, and a one-line summary.

What each style *knows* (layouts, weight dims, module kinds, hints) lives on its rule class in
``torch_rules.py`` or ``tpplan_rules.py``.  A rule's fields are the torch style's keyword
arguments under the same names, so building, printing and describing any style are the three
small generic functions here, called by the rule's ``build``/``code``/``summary``.
"""

from __future__ import annotations

from typing import Any

from tpplan.core.layouts import Layout, parse_layout


def _convert(value: Any, layout_fn) -> Any:
    """Map layout strings inside a rule value (str, tuple, dict) through ``layout_fn``."""
    if isinstance(value, str):
        return layout_fn(parse_layout(value))
    if isinstance(value, tuple):
        return tuple(None if v is None else layout_fn(parse_layout(v)) for v in value)
    if isinstance(value, dict):
        return {k: layout_fn(parse_layout(v)) for k, v in value.items()}
    return value


def _is_layout_field(name: str) -> bool:
    return name.endswith(("layouts", "layout"))


def build_style(rule, cls=None, extra: dict | None = None):
    """The torch ``ParallelStyle`` for ``rule`` (None for ``replicate``: nothing to do): its class
    (``cls``: a style of one's own, imported by resolve), the rule's keyword arguments with layouts
    as placements, and ``extra`` ones (the whole mesh)."""
    if rule.TORCH_STYLE is None:
        return None
    import importlib

    if cls is None:
        cls = getattr(importlib.import_module(rule.STYLE_MODULE), rule.TORCH_STYLE)
    kwargs = {
        name: _convert(value, Layout.to_placement) if _is_layout_field(name) else value
        for name, value in rule.style_kwargs().items()
    }
    return cls(**kwargs, **(extra or {}))


def style_code(rule) -> str:
    """Python source that builds the style, as a person would write it: ``RowwiseParallel(output_layouts=Shard(1))``."""
    if rule.TORCH_STYLE is None:
        raise ValueError("a replicate rule has no torch style")
    args = []
    for name, value in rule.style_kwargs().items():
        if _is_layout_field(name):
            converted = _convert(value, Layout.code)
            if isinstance(converted, tuple):
                text = "(" + ", ".join("None" if v is None else v for v in converted) + ("," if len(converted) == 1 else "") + ")"
            elif isinstance(converted, dict):
                text = "{" + ", ".join(f"{k!r}: {v}" for k, v in converted.items()) + "}"
            else:
                text = converted
        else:
            text = repr(value)
        args.append(f"{name}={text}")
    return f"{rule.TORCH_STYLE}({', '.join(args)})"


def _short(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join("-" if v is None else v for v in value)
    return str(value)


def style_summary(rule) -> str:
    """A short human description for tables: ``rowwise in=replicate out=shard(1) dtensor``,
    ``prepare_input hidden_states:shard(1)->replicate``."""
    kwargs = rule.style_kwargs()
    parts = [rule.style]
    for given, desired, label in (
        ("input_layouts", "desired_input_layouts", "in"),
        ("output_layouts", "desired_output_layouts", "out"),
    ):
        if given in kwargs and desired in kwargs:
            parts.append(f"{label}:{_short(kwargs.pop(given))}->{_short(kwargs.pop(desired))}")
        elif given in kwargs:
            parts.append(f"{label}={_short(kwargs.pop(given))}")
    given_kw = kwargs.pop("input_kwarg_layouts", None) or {}
    desired_kw = kwargs.pop("desired_input_kwarg_layouts", None) or {}
    for name in given_kw:
        parts.append(f"{name}:{given_kw[name]}->{desired_kw.get(name)}")
    for name, value in kwargs.items():
        if name == "use_local_output":
            parts.append("local" if value else "dtensor")
        elif name == "use_local_input":
            parts.append("local-input" if value else "dtensor-input")
        else:
            parts.append(f"{name}={value}")
    return " ".join(parts)
