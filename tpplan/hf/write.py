"""The spec text import-hf writes: a header of comments (the command, transformers' version and plan,
what tpplan corrected, what it could not import, notes), then the model, the mesh, the plan (the
decoder block's rules under one ``blocks`` group), loss parallel, train and launch -- through
:mod:`tpplan.spec.write`, the one writer of commented specs.
"""

from __future__ import annotations

from tpplan.hf.translate import Rule
from tpplan.model.reading import Source
from tpplan.spec.write import (
    MODEL_DTYPES,
    SCHEMA_LINE,
    comment_text,
    config_dtype,
    launch_lines,
    loss_parallel_line,
    plan_lines,
    scalar,
    train_lines,
)


def render(name, src: Source, model_class, config_class, attn, rules, skipped, notes, desc, sp, *, tp, tp_note,
           command, corrections=(), ep=None) -> str:
    lines = _header(model_class, config_class, rules, skipped, notes, sp, command=command, corrections=corrections)
    description = f"{src.label}: transformers' tensor-parallel plan for {model_class}" + (
        ", sequence parallel + loss parallel" if sp else "")
    lines += [f"name: {scalar(name)}", f"description: {scalar(description)}", ""]
    lines.append("model:")
    model = src.model
    if model.get("name") is None:
        lines.append("  name: null                 # no checkpoint: set a hub id or local folder to train pretrained weights")
        lines.append("  pretrained: false")
        lines.append("  config:")
        for key, value in model["config"].items():
            lines.append(f"    {scalar(key)}: {scalar(value)}")
    else:
        lines.append(f"  name: {scalar(model['name'])}")
    dtype = config_dtype(src.config)
    lines.append(f"  dtype: {dtype if dtype in MODEL_DTYPES else 'bfloat16'}")
    lines.append(f"  attn_implementation: {attn}" + ("" if attn == "sdpa" else f"  # {model_class} does not support sdpa"))
    lines += ["", "mesh:", f"  tp: {tp}" + (f"    # {tp_note}" if tp_note else "")]
    if ep:
        lines.append(f"  ep: {ep}    # expert parallel: whole experts per ep rank (ranks borrowed from dp)")
    lines += ["  dp: auto", "", "plan:"]
    lines += _plan_yaml(rules, desc.blocks)
    lines += ["", loss_parallel_line(sp), ""]
    lines += train_lines(None)
    lines.append("")
    lines += launch_lines(None, tp)
    return "\n".join(lines) + "\n"


def _header(model_class, config_class, rules, skipped, notes, sp, *, command, corrections) -> list[str]:
    """The comment block: where the plan came from, what tpplan corrected, what it could not import."""
    import transformers

    lines = [
        SCHEMA_LINE,
        "#",
        f"# Imported by `{comment_text(command)}`",
        f"# from transformers {transformers.__version__}'s own tensor-parallel plan for {model_class}",
        f"# ({config_class}.base_model_tp_plan + {model_class}._tp_plan). Each rule's comment names the",
        "# transformers style it came from.",
    ]
    if any(r.comment.startswith("hf: ep_dispatch_experts") for r in rules):
        lines.append(f"# The experts come from its expert-parallel plan ({config_class}.base_model_ep_plan).")
    if sp:
        lines += [
            "# Upgraded to sequence parallel + loss parallel (--sequence-parallel): the residual stream between",
            "# blocks is a shard(1) DTensor; norms run on sequence shards; each block child with sharded linears",
            "# gathers the sequence once and its rowwise projection reduce-scatters back; logits stay vocab-sharded.",
        ]
    if corrections:
        lines += ["#", "# Corrected (transformers' own plan is wrong here; `tpplan check` shows the difference):"]
        for fix in corrections:
            lines += [f"#   {line}" for line in fix.splitlines()]
    if skipped:
        lines += ["#", "# Not imported (no faithful tpplan style; these stay replicated -- run `tpplan check`):"]
        lines += [f"#   {comment_text(s.line())}" for s in skipped]
    if notes:
        lines += ["#", "# Notes:"]
        for note in notes:
            lines += [f"#   {comment_text(line)}" for line in note.splitlines()]
    return lines


def _plan_yaml(rules: list[Rule], blocks: str | None) -> list[str]:
    """The plan: rules inside the decoder blocks under one ``blocks`` group, relative to a block."""
    entries = []
    for rule in rules:
        in_block = bool(blocks and rule.pattern.startswith(blocks + "."))
        written = rule.rule.model_copy(update={"match": rule.pattern[len(blocks) + 1:]}) if in_block else rule.rule
        entries.append((written, in_block, rule.comment))
    return plan_lines(entries, blocks=blocks, block_note="one decoder block; patterns below are relative to it",
                      flow=True)
