"""The derived spec as text: rules over layer indices and sibling names (``self_attn.[qkv]_proj``), each
with its reason as its note, under a header saying what the dataflow showed and what stays whole."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from .assemble import PlanDraft, Rule
from .groups import Form
from .twin import OwnModel

if TYPE_CHECKING:
    from .analysis import Analysis
    from .pipeline import ModelInput


def generalize(rules: list[Rule], siblings: set[str]) -> list[Rule]:
    """Merge consecutive in-block rules that say the same thing about siblings into one fnmatch pattern
    (``self_attn.[qkv]_proj``, ``mlp.[gu]*_proj``), when the pattern matches exactly those siblings."""
    from ..resolve import matches

    out: list[Rule] = []
    i = 0
    while i < len(rules):
        rule = rules[i]
        run = [rule]
        while (rule.in_block and i + len(run) < len(rules)):
            other = rules[i + len(run)]
            if not (other.in_block and other.fields == rule.fields and other.note == rule.note
                    and other.pattern.rpartition(".")[0] == rule.pattern.rpartition(".")[0]):
                break
            run.append(other)
        if len(run) > 1:
            parent = rule.pattern.rpartition(".")[0]
            pattern = _sibling_pattern([r.pattern.rpartition(".")[2] for r in run])
            full = f"{parent}.{pattern}" if parent and pattern else pattern
            if pattern and {s for s in siblings if matches(full, s)} == {r.pattern for r in run}:
                out.append(Rule(full, rule.fields, rule.note, True, rule.order))
                i += len(run)
                continue
        out.append(rule)
        i += 1
    return out


def _sibling_pattern(names: list[str]) -> str | None:
    """``[qkv]_proj`` for q_proj/k_proj/v_proj, ``[gu]*_proj`` for gate_proj/up_proj."""
    import os

    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    firsts = list(dict.fromkeys(n[0] for n in names if n))
    if len(firsts) != len(names) or not suffix:
        return None
    middles = {n[1:len(n) - len(suffix)] for n in names}
    if middles == {""}:
        return f"[{''.join(firsts)}]{suffix}"
    return f"[{''.join(firsts)}]*{suffix}"


def _fields_yaml(fields: dict[str, Any], indent: str) -> list[str]:
    from ..import_hf import _scalar

    return [f"{indent}{key}: {_scalar(value)}" for key, value in fields.items()]


def plan_yaml(draft: PlanDraft, blocks_pattern: str | None, block_note: str) -> list[str]:
    lines: list[str] = []
    grouped = False
    for rule in draft.rules:
        if rule.in_block:
            if not grouped:
                lines += [f"  - match: {_note(blocks_pattern)}", f"    note: {_note(block_note)}", "    plan:"]
                grouped = True
            lines.append(f"      - match: {_note(rule.pattern)}")
            lines += _fields_yaml(rule.fields, "        ")
            lines.append(f"        note: {_note(rule.note)}")
        else:
            grouped = False
            lines.append(f"  - match: {_note(rule.pattern)}")
            lines += _fields_yaml(rule.fields, "    ")
            lines.append(f"    note: {_note(rule.note)}")
        lines.append("")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _note(text: str) -> str:
    from ..import_hf import _scalar

    return _scalar(text)


def spec_name(hint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._").lower() or "derived"
    return name[:100]


def write_spec(a: Analysis, draft: PlanDraft, inp: ModelInput, *, name: str, command: str, attn: str,
           proof: str | None) -> str:
    import transformers

    from ..import_hf import _comment, _scalar

    model_class = type(a.traced.model).__name__
    sk = a.skeleton
    origin = ("model.factory" if isinstance(a.traced.config, OwnModel)
              else f"transformers {transformers.__version__}")
    lines = [
        "# yaml-language-server: $schema=tpplan.schema.json",
        "#",
        f"# Derived by `{_comment(command)}` from the dataflow of {model_class} ({origin}):",
        "# a tiny twin of the model ran once under a recorder of which modules and parameters every tensor flows",
        "# from; every group of linears below was cut into tp shares on the twin and its shares summed back.",
    ]
    if proof:
        lines.append(f"# {proof}")
    lines += ["#", "# What the dataflow shows:"]
    lines.append(f"#   {sk.embed or '(no input embedding)'} -> {sk.pattern} ({len(sk.blocks)} in the twin) -> "
                 f"{', '.join(n for n in sk.after if n != sk.head) or '(nothing)'} -> {sk.head or '(no output head)'}"
                 + (" (tied to the embedding)" if sk.tied else ""))
    for key, m in a.merged.items():
        group = m.group
        form, why = draft.forms.get(key) or (m.form.form, m.form.why)
        if group.experts:
            lines.append(f"#   {group.rowwise}: a MoE expert bank (3-D weights): "
                         + ("expert tensor parallel" if form is Form.SHARDED else f"whole ({why})"))
            continue
        meet = f" meet in {' / '.join(group.meet)} and" if group.meet else ""
        packed = "".join(f"; {c} is fused ({text})" for c, text in group.packed.items())
        lines.append(f"#   {', '.join(group.colwise)}{meet} feed {group.rowwise}: {form.label}{packed}")
        if why:
            lines.append(f"#     why not {'sharded' if form is not Form.PACKED else 'a contiguous split'}: {why}")
        if form.cuts_activations:
            for rel, attr in m.form.fixups:
                lines.append(f"#     the forward reads {rel}.{attr}: divided by tp after sharding")
    if draft.budget is not None:
        from ..report import human_count

        lines += ["#", f"# Within --max-params-per-rank {human_count(draft.budget)}: a group that fits whole on every "
                  "rank stays whole (no all-reduce for it);", f"# about {human_count(draft.params_per_rank)} parameters "
                  f"per rank at tp={draft.tp} as written (no FSDP)."]
    if draft.notes:
        lines += ["#", "# What stays whole (replicated on every tp rank) or gathered, and why:"]
        lines += [f"#   {n}" for n in draft.notes]
    sp_text = ", sequence parallel" if draft.sequence_parallel else ""
    lp_text = " + loss parallel" if draft.loss_parallel else ""
    description = f"{inp.label}: derived tensor-parallel plan for {model_class}{sp_text}{lp_text}"
    lines += [f"name: {_scalar(name)}", f"description: {_scalar(description)}", "", "model:"]
    model = dict(inp.model)
    stored = str(getattr(a.traced.config, "dtype", None) or getattr(a.traced.config, "torch_dtype", None) or "")
    stored = stored.replace("torch.", "")
    dtype_comment = f"  # the checkpoint stores {stored}" if "dtype" not in model and stored and stored != "bfloat16" else ""
    model.setdefault("dtype", "bfloat16")  # what the shipped specs train in
    if attn is not None:
        model["attn_implementation"] = attn
    if model.get("name") is None and "factory" not in model:
        model["name"] = None
        model["pretrained"] = False
    order = ["name", "pretrained", "revision", "trust_remote_code", "dtype", "attn_implementation", "tokenizer", "config"]
    for key in sorted(model, key=lambda k: order.index(k) if k in order else len(order)):
        value = model[key]
        comment = ""
        if key == "name" and value is None:
            comment = "  # no checkpoint: set a hub id or local folder to train pretrained weights"
        elif key == "attn_implementation" and value != "sdpa":
            comment = f"  # {model_class} has no sdpa path"
        elif key == "dtype":
            comment = dtype_comment
        lines += _yaml_block(key, value, "  ", comment)
    mesh = {k: v for k, v in (inp.sections.get("mesh") or {}).items() if k != "tp"}
    lines += ["", "mesh:", f"  tp: {draft.tp}    # {draft.tp_note}"]
    for key, value in {"dp": "auto", **mesh}.items():
        lines += _yaml_block(key, value, "  ")
    lines += ["", "plan:"]
    block_note = "one decoder block; patterns below are relative to it" + (
        "; the residual stream stays shard(1) between blocks" if draft.sequence_parallel else "")
    lines += plan_yaml(draft, sk.pattern, block_note)
    lines.append("")
    if draft.fixups:
        lines.append("fixups:")
        for pattern, attr, note in draft.fixups:
            lines.append(f"  - {{match: {_scalar(pattern)}, attr: {attr}, op: floordiv_tp}}  # {note}")
    else:
        lines.append("fixups: []   # the forward reads no head count from a module attribute")
    lines += ["", f"loss_parallel: {'true' if draft.loss_parallel else 'false'}", ""]
    train = inp.sections.get("train") or {"dataset": "tatsu-lab/alpaca", "text_column": "text", "seq_length": 1024,
                                          "batch_size": 8, "lr": 3.0e-5}
    launch = inp.sections.get("launch") or {"nproc_per_node": max(draft.tp, 8), "nnodes": 1}
    lines += _yaml_block("train", train, "")
    lines.append("")
    lines += _yaml_block("launch", launch, "")
    return "\n".join(lines) + "\n"


def _yaml_block(key: str, value: Any, indent: str, comment: str = "") -> list[str]:
    """``key: value`` in block style for mappings, flow style below that; values through import-hf's scalars."""
    from ..import_hf import _scalar

    if isinstance(value, dict) and value:
        lines = [f"{indent}{_scalar(key)}:{comment}"]
        for k, v in value.items():
            lines += _yaml_block(k, v, indent + "  ")
        return lines
    return [f"{indent}{_scalar(key)}: {_scalar(value)}{comment}"]
