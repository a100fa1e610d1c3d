"""Writing specs: rule objects and comment blocks -> commented YAML, in the shipped specs' form.

``tpplan import-hf`` and ``tpplan derive`` both write a spec for a model.  They build their rules as
rule objects (``tpplan.spec``'s style classes, validated when built: a misspelt layout or a field a
style does not take fails where the rule is made, not when the YAML is read back), and write them here:
a rule's ``match``, its style and the keyword arguments it sets, in the style class's field order; one
flow mapping per line with a comment after it (import-hf), or a block mapping with its ``note`` last
(derive).  The sections a spec gets when its source says nothing (train, launch) are written once, here.
"""

from __future__ import annotations

import typing
from collections.abc import Iterable
from typing import Any

import yaml

from tpplan.spec.model_spec import ModelSpec
from tpplan.spec.rule_base import RuleBase

#: tp sizes a spec writer tries, largest first, when no tp is asked for
TP_CANDIDATES = (8, 4, 2)
#: the first line of every written spec: editors validate it against the committed schema
SCHEMA_LINE = "# yaml-language-server: $schema=tpplan.schema.json"
#: the train: section a written spec gets when its source has none (what the shipped specs train with)
DEFAULT_SEQ_LENGTH = 1024
DEFAULT_TRAIN_LINES = ("dataset: tatsu-lab/alpaca", "text_column: text", f"seq_length: {DEFAULT_SEQ_LENGTH}",
                       "batch_size: 8", "lr: 3.0e-5")
#: the dtypes a spec's model may train in (``ModelSpec.dtype``)
MODEL_DTYPES = typing.get_args(ModelSpec.model_fields["dtype"].annotation)


# ----------------------------------------------------------------------------------------------
# Rule objects
# ----------------------------------------------------------------------------------------------


def make_rule(cls: type[RuleBase], match: str, note: str | None = None, **fields: Any) -> RuleBase:
    """A rule of style class ``cls`` (``ColwiseRule``, ...), validated: ``make_rule(ColwiseRule, "q_proj",
    output_layouts="replicate")``.  The fields given are the ones written, in the class's field order."""
    (style,) = typing.get_args(cls.model_fields["style"].annotation)
    return cls(style=style, match=match, note=note, **fields)


def with_fields(rule: RuleBase, **changes: Any) -> RuleBase:
    """``rule`` with ``changes`` to its keyword arguments (validated again); the others as they were set."""
    return make_rule(type(rule), rule.match, rule.note, **{**rule.style_kwargs(), **changes})


def rule_fields(rule: RuleBase) -> dict[str, Any]:
    """What a spec says of ``rule`` besides its match and note: its style and the arguments it sets."""
    return rule.spec_fields()


def rule_lines(rule: RuleBase, indent: str, *, flow: bool, comment: str = "") -> list[str]:
    """``rule`` as one item of a plan list at ``indent``: one flow mapping (``comment`` after it), or a
    block mapping, its note last."""
    if flow:
        items = {"match": rule.match, **rule_fields(rule)}
        text = f"{indent}- {{" + ", ".join(f"{k}: {scalar(v)}" for k, v in items.items()) + "}"
        return [f"{text}  # {comment_text(comment)}" if comment else text]
    lines = [f"{indent}- match: {scalar(rule.match)}"]
    lines += [f"{indent}  {key}: {scalar(value)}" for key, value in rule_fields(rule).items()]
    if rule.note is not None:
        lines.append(f"{indent}  note: {scalar(rule.note)}")
    return lines


def plan_lines(entries: Iterable[tuple[RuleBase, bool, str]], *, blocks: str | None, block_note: str,
               flow: bool) -> list[str]:
    """The ``plan:`` list: ``entries`` are (rule, whether its match is relative to a decoder block, comment)
    in the order written.  Consecutive block rules go under one ``- match: BLOCKS`` group with
    ``block_note``; block mappings (not ``flow``) are separated by a blank line."""
    lines: list[str] = []
    grouped = False
    for rule, in_block, comment in entries:
        if in_block:
            if not grouped:
                lines += [f"  - match: {scalar(blocks)}", f"    note: {scalar(block_note)}", "    plan:"]
                grouped = True
            lines += rule_lines(rule, "      ", flow=flow, comment=comment)
        else:
            grouped = False
            lines += rule_lines(rule, "  ", flow=flow, comment=comment)
        if not flow:
            lines.append("")
    while lines and not lines[-1]:
        lines.pop()
    return lines


# ----------------------------------------------------------------------------------------------
# Values, comments, sections
# ----------------------------------------------------------------------------------------------


def scalar(value: Any) -> str:
    """One YAML value in flow style, on one line: leaves through the YAML emitter (quoting what
    needs it, ``1.0e-06`` for floats, escapes for newlines and control characters)."""
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(scalar(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{scalar(k)}: {scalar(v)}" for k, v in value.items()) + "}"
    # emitted as the item of a flow list, so the emitter quotes what a flow mapping cannot hold plain
    # ([ ] , { })
    text = yaml.safe_dump([value], default_flow_style=True, width=float("inf"),
                          allow_unicode=True).strip()[1:-1]
    if isinstance(value, str) and (text.startswith("'") or not value.isprintable()):
        # quoted: the double-quoted form, as the shipped specs write it ("self_attn.[qkv]_proj")
        text = yaml.safe_dump([value], default_style='"', default_flow_style=True, width=float("inf"),
                              allow_unicode=True).strip()[1:-1]
    return text


def comment_text(text: str) -> str:
    """Text for a ``#`` comment line, kept on that line: newlines and control characters escaped."""
    return text if text.isprintable() else repr(text)[1:-1]


def mapping_lines(key: str, value: Any, indent: str, comment: str = "") -> list[str]:
    """``key: value`` in block style for mappings, flow style below that."""
    if isinstance(value, dict) and value:
        lines = [f"{indent}{scalar(key)}:{comment}"]
        for k, v in value.items():
            lines += mapping_lines(k, v, indent + "  ")
        return lines
    return [f"{indent}{scalar(key)}: {scalar(value)}{comment}"]


def config_dtype(config) -> str | None:
    """The dtype a transformers config says its checkpoint stores (``bfloat16``), or None."""
    stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(stored).replace("torch.", "") if stored else None


def train_lines(train: dict | None) -> list[str]:
    """The ``train:`` section: the source's own, or the shipped specs' defaults."""
    if train is None:
        return ["train:", *(f"  {line}" for line in DEFAULT_TRAIN_LINES)]
    return mapping_lines("train", train, "")


def launch_lines(launch: dict | None, tp: int) -> list[str]:
    """The ``launch:`` section: the source's own, or one node with a rank per GPU (at least tp)."""
    return mapping_lines("launch", launch or {"nproc_per_node": max(tp, 8), "nnodes": 1}, "")


def loss_parallel_line(on: bool) -> str:
    return f"loss_parallel: {'true' if on else 'false'}"
