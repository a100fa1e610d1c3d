"""A draft of the plan at the largest tp its splits allow (or the one asked for), within a parameter budget
when one is given, its rules merged over sibling names (``self_attn.[qkv]_proj``), checked by resolve
against the full-size model."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tpplan.core.errors import TpplanError
from tpplan.core.patterns import matches
from tpplan.plan.resolve import resolve
from tpplan.spec.fixups import Fixup
from tpplan.spec.model_spec import ModelSpec
from tpplan.spec.rule_base import RuleBase
from tpplan.spec.rules import GroupRule
from tpplan.spec.schema import Spec
from tpplan.spec.torch_rules import ColwiseRule, RowwiseRule
from tpplan.spec.write import TP_CANDIDATES, make_rule, rule_fields

from .assemble import PlanDraft, Rule, assemble
from .budget import params_per_rank, within_budget
from .common import DeriveRefused, first_line, unwritten
from .forms import Constraints
from .sizes import all_splits, choose_tp
from .twin import OwnModel

if TYPE_CHECKING:
    from .analysis import Analysis


def draft_plan(a: Analysis, constraints: Constraints, *, tp: int | None, sequence_parallel: bool,
               max_params_per_rank: int | None = None) -> PlanDraft:
    """The plan at the largest tp its splits allow (or ``tp``) under ``constraints``, checked by resolve against
    the full-size model; within ``max_params_per_rank``, the groups that fit whole on every rank left whole
    (fewer bytes per step: the draft's constraints say which)."""
    chosen, why = _tp_choice(a, tp, sequence_parallel)
    siblings = _siblings(a)
    candidates = [chosen] if tp is not None else [t for t in TP_CANDIDATES if t <= chosen]
    problem = None
    for size in candidates:
        note = why if size == chosen else f"{why.split(';')[0]}, lowered to {size}: at {chosen} {problem}"

        def build(given: Constraints, size=size, note=note) -> PlanDraft:
            return assemble(a, given, tp=size, tp_note=note, sequence_parallel=sequence_parallel)

        draft = (build(constraints) if max_params_per_rank is None
                 else within_budget(a, constraints, build, max_params_per_rank))
        draft.params_per_rank, draft.budget = params_per_rank(a, draft), max_params_per_rank
        draft.rules = with_own_rules(a, generalize(_dedupe(draft.rules), siblings))
        if not any(isinstance(r.rule, (ColwiseRule, RowwiseRule)) for r in draft.rules):
            if size != candidates[-1]:
                continue
            reasons = "; ".join(draft.notes) or "no Linear layers whose outputs meet and feed one reducing Linear"
            raise DeriveRefused(
                f"no tensor-parallel plan for {type(a.traced.model).__name__}: nothing can be sharded ({reasons})",
                hint="colwise/rowwise shard nn.Linear, transformers' Conv1D and nn.Embedding only; " + _no_linear_hint(a))
        try:
            resolve(_probe(a, draft), a.full_model, tp=size, seq_length=1024, base_dir=a.spec_dir)
            return draft
        except TpplanError as exc:
            problem = first_line(str(exc))
            last = exc
    raise DeriveRefused(f"the derived plan does not fit {type(a.full_model).__name__} at tp={candidates[-1]}:\n"
                        + unwritten(last), hint="try another --tp" if tp is not None else None)


def _tp_choice(a: Analysis, tp: int | None, sequence_parallel: bool) -> tuple[int, str]:
    import torch.nn as nn

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
    return choose_tp(all_splits(a), vocab, tp)


def with_own_rules(a: Analysis, rules: list[Rule]) -> list[Rule]:
    """``rules`` with the spec's rules of its own styles in place of derive's for the modules they match."""
    if not a.own_rules:
        return rules
    mine = {r.pattern for r in a.own_rules}
    return [r for r in rules if r.in_block or r.pattern not in mine] + list(a.own_rules)


def _siblings(a: Analysis) -> set[str]:
    """Every module name inside a full-size block, relative to it (what a merged pattern may match)."""
    prefix = (a.skeleton.blocks_list or "") + "."
    return {name[len(prefix):].partition(".")[2] for name in a.modules_full if name.startswith(prefix)}


def _probe(a: Analysis, draft: PlanDraft) -> Spec:
    """The draft as a spec for resolve to check at full size (the written spec's model and sections aside)."""
    own = {"positions": None} if isinstance(a.traced.config, OwnModel) else {}  # its forward makes its own
    model = ModelSpec(name=None, pretrained=False, config={"model_type": "llama"}, **own)
    fixups = [Fixup(match=pattern, attr=attr, op="floordiv_tp") for pattern, attr, _ in draft.fixups]
    return Spec(name="probe", model=model, plan=plan_rules(draft, a.skeleton.pattern, "probe"), fixups=fixups,
                loss_parallel=draft.loss_parallel)


def plan_rules(draft: PlanDraft, blocks: str | None, block_note: str) -> list[RuleBase]:
    """The draft's rules as a spec's ``plan``: each run of block rules under one group rule matching
    ``blocks``."""
    plan: list[RuleBase] = []
    run: list[RuleBase] = []
    for rule in draft.rules:
        if rule.in_block:
            run.append(rule.rule)
            continue
        if run:
            plan.append(GroupRule(match=blocks, note=block_note, plan=run))
            run = []
        plan.append(rule.rule)
    if run:
        plan.append(GroupRule(match=blocks, note=block_note, plan=run))
    return plan


def generalize(rules: list[Rule], siblings: set[str]) -> list[Rule]:
    """Merge consecutive in-block rules that say the same thing about siblings into one fnmatch pattern
    (``self_attn.[qkv]_proj``, ``mlp.[gu]*_proj``), when the pattern matches exactly those siblings."""
    out: list[Rule] = []
    i = 0
    while i < len(rules):
        rule = rules[i]
        run = [rule]
        while rule.in_block and i + len(run) < len(rules):
            other = rules[i + len(run)]
            if not (other.in_block and rule_fields(other.rule) == rule_fields(rule.rule)
                    and other.rule.note == rule.rule.note
                    and other.pattern.rpartition(".")[0] == rule.pattern.rpartition(".")[0]):
                break
            run.append(other)
        if len(run) > 1:
            parent = rule.pattern.rpartition(".")[0]
            pattern = _sibling_pattern([r.pattern.rpartition(".")[2] for r in run])
            full = f"{parent}.{pattern}" if parent and pattern else pattern
            if pattern and {s for s in siblings if matches(full, s)} == {r.pattern for r in run}:
                merged = make_rule(type(rule.rule), full, rule.rule.note, **rule.rule.style_kwargs())
                out.append(Rule(merged, True, rule.order))
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


def _dedupe(rules: list[Rule]) -> list[Rule]:
    seen: set[tuple] = set()
    out = []
    for rule in rules:
        key = (rule.in_block, rule.pattern)
        if key not in seen:
            seen.add(key)
            out.append(rule)
    return out


def _no_linear_hint(a: Analysis) -> str:
    kinds = sorted({t for n, t in a.traced.graph.leaf_modules.items()
                    if a.skeleton.blocks and n.startswith(a.skeleton.blocks[0].name + ".")})
    return f"the first block's modules with weights are {', '.join(kinds) or 'none'}"
