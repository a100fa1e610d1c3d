"""The style registry: a plan rule -> a torch ``ParallelStyle`` object, the code that builds it, and
what it does to layouts.

A rule's fields are the torch style's keyword arguments under the same names (see ``spec.py``), so
building, printing and describing a style are three small generic functions, one source of truth.
"""

from __future__ import annotations

from typing import Any

from .layouts import REPLICATE, Layout, parse_layout
from .spec import RuleBase

TP_MODULE = "torch.distributed.tensor.parallel"
PLACEMENT_NAMES = ("Replicate", "Shard")


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
    return name.endswith("layouts")


def build_style(rule: RuleBase):
    """The torch ``ParallelStyle`` for ``rule`` (None for ``replicate``: nothing to do)."""
    if rule.TORCH_STYLE is None:
        return None
    import torch.distributed.tensor.parallel as tp

    cls = getattr(tp, rule.TORCH_STYLE)
    kwargs = {
        name: _convert(value, Layout.to_placement) if _is_layout_field(name) else value
        for name, value in rule.style_kwargs().items()
    }
    return cls(**kwargs)


def style_code(rule: RuleBase) -> str:
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


def style_summary(rule: RuleBase) -> str:
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


# ------------------------------------------------------------------------------------------
# What a style does to layouts (torch's defaults, written once here)
# ------------------------------------------------------------------------------------------


def _field(rule: RuleBase, name: str, default: Layout) -> Layout:
    value = getattr(rule, name, None)
    return default if value is None else parse_layout(value)


def output_layout(rule: RuleBase) -> Layout | None:
    """The layout of the module's (first) output under this rule; None when the rule doesn't set it."""
    style = rule.style
    if style == "colwise":
        return _field(rule, "output_layouts", Layout(-1))
    if style == "rowwise":
        return _field(rule, "output_layouts", REPLICATE)
    if style == "sequence_parallel":
        return Layout(rule.sequence_dim)
    if style in ("prepare_output", "prepare_input_output"):
        desired = rule.desired_output_layouts
        first = desired[0] if isinstance(desired, tuple) else desired
        return parse_layout(first) if first else None
    return None


def input_layout(rule: RuleBase) -> Layout | None:
    """The layout the style expects of the module's (first) input; None when it doesn't say."""
    style = rule.style
    if style == "colwise":
        return _field(rule, "input_layouts", REPLICATE)
    if style == "rowwise":
        return _field(rule, "input_layouts", Layout(-1))
    if style == "sequence_parallel":
        return Layout(rule.sequence_dim)
    return None


def returns_local(rule: RuleBase) -> bool:
    """Whether the module hands on plain local tensors (True) or DTensors (False)."""
    return bool(getattr(rule, "use_local_output", True))


def sharded_weight_dim(rule: RuleBase, module_kind: str) -> int | None:
    """Which dim of ``weight`` the style shards: Linear colwise 0, rowwise 1; Embedding colwise 1, rowwise 0."""
    if rule.style == "colwise":
        return 1 if module_kind == "embedding" else 0
    if rule.style == "rowwise":
        return 0 if module_kind == "embedding" else 1
    return None
