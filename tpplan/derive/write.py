"""The derived spec as text: a header saying what the dataflow showed and what stays whole, the model and
mesh, and the plan's rule objects written by :mod:`tpplan.spec_write`, each with its reason as its note."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpplan.plan.report import human_count
from tpplan.spec.write import (
    SCHEMA_LINE,
    comment_text,
    config_dtype,
    launch_lines,
    loss_parallel_line,
    mapping_lines,
    plan_lines,
    scalar,
    train_lines,
)

from .assemble import PlanDraft
from .groups import Form
from .twin import OwnModel

if TYPE_CHECKING:
    from .analysis import Analysis


@dataclass
class ModelInput:
    """The model derive was given, as the written spec names it: its config (None for a factory), the spec's
    ``model:`` section, and the sections of a spec given as the source that the written spec keeps."""

    config: Any
    model: dict[str, Any]  # the spec's model: section
    label: str
    name_hint: str
    sections: dict[str, Any] = field(default_factory=dict)  # a spec's train:, launch:, mesh: (but tp), kept
    own: Any = None  # OwnModel: a spec whose model is a factory (config None)
    spec_source: Any = None  # yaml_reader.Source of an input spec: where its model: fields are written
    own_rules: tuple = ()  # an input spec's rules of styles of its own, kept as written (pipeline._own_rules)


#: the order of a written spec's model: keys (the rest after them, as the source gave them)
MODEL_KEYS = ("name", "pretrained", "revision", "trust_remote_code", "dtype", "attn_implementation", "tokenizer",
              "config")


def spec_name(hint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._").lower() or "derived"
    return name[:100]


def write_spec(a: Analysis, draft: PlanDraft, inp: ModelInput, *, name: str, command: str, attn: str | None,
               proof: str | None) -> str:
    """The spec of ``draft``: ``inp``'s model and sections, ``proof`` (how check proved it) in the header."""
    model_class = type(a.traced.model).__name__
    sp_text = ", sequence parallel" if draft.sequence_parallel else ""
    lp_text = " + loss parallel" if draft.loss_parallel else ""
    description = f"{inp.label}: derived tensor-parallel plan for {model_class}{sp_text}{lp_text}"
    lines = _header(a, draft, command, proof)
    lines += [f"name: {scalar(name)}", f"description: {scalar(description)}", "", "model:"]
    lines += _model_lines(a, inp, attn)
    mesh = {k: v for k, v in (inp.sections.get("mesh") or {}).items() if k != "tp"}
    lines += ["", "mesh:", f"  tp: {draft.tp}    # {draft.tp_note}"]
    for key, value in {"dp": "auto", **mesh}.items():
        lines += mapping_lines(key, value, "  ")
    block_note = "one decoder block; patterns below are relative to it" + (
        "; the residual stream stays shard(1) between blocks" if draft.sequence_parallel else "")
    lines += ["", "plan:"]
    lines += plan_lines(((r.rule, r.in_block, "") for r in draft.rules), blocks=a.skeleton.pattern,
                        block_note=block_note, flow=False)
    lines.append("")
    if draft.fixups:
        lines.append("fixups:")
        for pattern, attr, note in draft.fixups:
            lines.append(f"  - {{match: {scalar(pattern)}, attr: {attr}, op: floordiv_tp}}  # {note}")
    else:
        lines.append("fixups: []   # the forward reads no head count from a module attribute")
    lines += ["", loss_parallel_line(draft.loss_parallel), ""]
    lines += train_lines(inp.sections.get("train"))
    lines.append("")
    lines += launch_lines(inp.sections.get("launch"), draft.tp)
    return "\n".join(lines) + "\n"


def _header(a: Analysis, draft: PlanDraft, command: str, proof: str | None) -> list[str]:
    import transformers

    model_class = type(a.traced.model).__name__
    sk = a.skeleton
    origin = ("model.factory" if isinstance(a.traced.config, OwnModel)
              else f"transformers {transformers.__version__}")
    lines = [
        SCHEMA_LINE,
        "#",
        f"# Derived by `{comment_text(command)}` from the dataflow of {model_class} ({origin}):",
        "# a tiny twin of the model ran once under a recorder of which modules and parameters every tensor flows",
        "# from; every group of linears below was cut into tp shares on the twin and its shares summed back.",
    ]
    if proof:
        lines.append(f"# {proof}")
    lines += ["#", "# What the dataflow shows:"]
    lines.append(f"#   {sk.embed or '(no input embedding)'} -> {sk.pattern} ({len(sk.blocks)} in the twin) -> "
                 f"{', '.join(n for n in sk.after if n != sk.head) or '(nothing)'} -> {sk.head or '(no output head)'}"
                 + (" (tied to the embedding)" if sk.tied else ""))
    lines += _group_lines(a, draft)
    if draft.budget is not None:
        lines += ["#", f"# Within --max-params-per-rank {human_count(draft.budget)}: a group that fits whole on every "
                  "rank stays whole (no all-reduce for it);", f"# about {human_count(draft.params_per_rank)} parameters "
                  f"per rank at tp={draft.tp} as written (no FSDP)."]
    if draft.notes:
        lines += ["#", "# What stays whole (replicated on every tp rank) or gathered, and why:"]
        lines += [f"#   {n}" for n in draft.notes]
    return lines


def _group_lines(a: Analysis, draft: PlanDraft) -> list[str]:
    """One header line per group: its members, where they meet, the form written and why not a stronger
    one."""
    lines = []
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
    return lines


def _model_lines(a: Analysis, inp: ModelInput, attn: str | None) -> list[str]:
    """The model: section: ``inp``'s, in the shipped specs' dtype, with the attention path derive traced."""
    model_class = type(a.traced.model).__name__
    model = dict(inp.model)
    stored = config_dtype(a.traced.config) or ""
    dtype_comment = f"  # the checkpoint stores {stored}" if "dtype" not in model and stored and stored != "bfloat16" else ""
    model.setdefault("dtype", "bfloat16")  # what the shipped specs train in
    if attn is not None:
        model["attn_implementation"] = attn
    if model.get("name") is None and "factory" not in model:
        model["name"] = None
        model["pretrained"] = False
    lines = []
    for key in sorted(model, key=lambda k: MODEL_KEYS.index(k) if k in MODEL_KEYS else len(MODEL_KEYS)):
        value = model[key]
        comment = ""
        if key == "name" and value is None:
            comment = "  # no checkpoint: set a hub id or local folder to train pretrained weights"
        elif key == "attn_implementation" and value != "sdpa":
            comment = f"  # {model_class} has no sdpa path"
        elif key == "dtype":
            comment = dtype_comment
        lines += mapping_lines(key, value, "  ", comment)
    return lines
