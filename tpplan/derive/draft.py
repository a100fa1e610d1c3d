"""A draft of the plan at the largest tp its splits allow (or the one asked for), within a parameter budget
when one is given, checked by resolve against the full-size model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import TpplanError
from .assemble import PlanDraft, Rule, assemble
from .budget import params_per_rank, within_budget
from .common import DeriveRefused, first_line
from .forms import Constraints
from .sizes import TP_CANDIDATES, all_splits, choose_tp
from .twin import OwnModel
from .write import generalize, plan_yaml

if TYPE_CHECKING:
    from .analysis import Analysis


def draft_plan(a: Analysis, constraints: Constraints, *, tp: int | None, sequence_parallel: bool,
               max_params_per_rank: int | None = None) -> PlanDraft:
    """The plan at the largest tp its splits allow (or ``tp``) under ``constraints``, checked by resolve against
    the full-size model; within ``max_params_per_rank``, the groups that fit whole on every rank left whole
    (fewer bytes per step: the draft's constraints say which)."""
    import torch.nn as nn

    from ..loader import load_spec_text
    from ..resolve import resolve

    vocab = None
    embed = a.modules_full.get(a.skeleton.embed or "")
    if isinstance(embed, nn.Embedding):
        vocab = embed.weight.shape[0]
    stream = a.traced.graph.values[a.skeleton.blocks[0].stream_in].shape if a.skeleton.blocks else None
    if sequence_parallel and stream is not None and len(stream) != 3:
        raise DeriveRefused(
            f"sequence parallel cuts a [batch, seq, hidden] residual stream on seq; {type(a.traced.model).__name__}'s "
            f"stream between blocks has {len(stream)} dims ({list(stream)} on the twin: parallel streams of the hidden "
            "state)", hint="derive the plain plan (without --sequence-parallel)")
    chosen, why = choose_tp(all_splits(a), vocab, tp)
    siblings = set()
    prefix = (a.skeleton.blocks_list or "") + "."
    for name in a.modules_full:
        if name.startswith(prefix):
            siblings.add(name[len(prefix):].partition(".")[2])
    candidates = [chosen] if tp is not None else [t for t in TP_CANDIDATES if t <= chosen]
    problem = None
    for size in candidates:
        note = why if size == chosen else f"{why.split(';')[0]}, lowered to {size}: at {chosen} {problem}"
        def build(given: Constraints, size=size, note=note) -> PlanDraft:
            return assemble(a, given, tp=size, tp_note=note, sequence_parallel=sequence_parallel)

        draft = (build(constraints) if max_params_per_rank is None
                 else within_budget(a, constraints, build, max_params_per_rank))
        draft.params_per_rank, draft.budget = params_per_rank(a, draft), max_params_per_rank
        draft.rules = generalize(_dedupe(draft.rules), siblings)
        if not any(r.fields.get("style") in ("colwise", "rowwise") for r in draft.rules):
            if size != candidates[-1]:
                continue
            reasons = "; ".join(draft.notes) or "no Linear layers whose outputs meet and feed one reducing Linear"
            raise DeriveRefused(
                f"no tensor-parallel plan for {type(a.traced.model).__name__}: nothing can be sharded ({reasons})",
                hint="torch's colwise/rowwise styles shard nn.Linear and nn.Embedding only; " + _no_linear_hint(a))
        own = ", positions: null" if isinstance(a.traced.config, OwnModel) else ""  # its forward makes its own
        text = "\n".join(["name: probe", f"model: {{name: null, pretrained: false, config: {{model_type: llama}}{own}}}",
                          "plan:", *plan_yaml(draft, a.skeleton.pattern, "probe"), "fixups:",
                          *[f"  - {{match: {pat!r}, attr: {attr}, op: floordiv_tp}}" for pat, attr, _ in draft.fixups],
                          f"loss_parallel: {'true' if draft.loss_parallel else 'false'}"])
        if not draft.fixups:
            text = text.replace("fixups:\n", "fixups: []\n")
        try:
            resolve(load_spec_text(text, name="derived.yaml"), a.full_model, tp=size, seq_length=1024)
            return draft
        except TpplanError as exc:
            problem = first_line(str(exc))
            last = exc
    raise DeriveRefused(f"the derived plan does not fit {type(a.full_model).__name__} at tp={candidates[-1]}:\n{last}",
                        hint="try another --tp" if tp is not None else None)


def _dedupe(rules: list[Rule]) -> list[Rule]:
    seen: dict[tuple, Rule] = {}
    out = []
    for rule in rules:
        key = (rule.in_block, rule.pattern)
        if key in seen:
            continue
        seen[key] = rule
        out.append(rule)
    return out


def _no_linear_hint(a: Analysis) -> str:
    kinds = sorted({t for n, t in a.traced.graph.leaf_modules.items()
                    if a.skeleton.blocks and n.startswith(a.skeleton.blocks[0].name + ".")})
    return f"the first block's modules with weights are {', '.join(kinds) or 'none'}"
