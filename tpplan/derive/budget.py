"""Fewer bytes within a parameter budget: the parameters one rank holds under a draft, and the groups left
whole where every rank has room for them (a whole group needs no all-reduce)."""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from tpplan.plan.report import human_count
from tpplan.spec.torch_rules import ColwiseRule, RowwiseRule
from tpplan.spec.tpplan_rules import ExpertTensorParallelRule

from .common import DeriveRefused
from .forms import Constraints
from .groups import Form, FoundGroup

if TYPE_CHECKING:
    from .analysis import Analysis
    from .assemble import PlanDraft


def _full_blocks(a: Analysis) -> list[str]:
    """The full-size model's blocks (``model.layers.0`` ...)."""
    prefix = (a.skeleton.blocks_list or "") + "."
    return [n for n in a.modules_full if a.skeleton.blocks_list and n.startswith(prefix)
            and n[len(prefix):] and "." not in n[len(prefix):]]


def split_numel(a: Analysis, group: FoundGroup) -> tuple[int, int]:
    """(elements of the full-size weights that sharding ``group`` splits over tp, blocks holding it): every
    weight of its colwise members and experts, the rowwise weight (its bias stays replicated)."""
    modules = a.modules_full
    total = blocks = 0
    for block in _full_blocks(a):
        if group.experts:
            bank = modules.get(f"{block}.{group.rowwise}")
            if bank is None:
                continue
            count = sum(p.numel() for n, p in bank.named_parameters(recurse=False) if n != "down_proj_bias")
        else:
            row = modules.get(f"{block}.{group.rowwise}")
            cols = [modules[f"{block}.{c}"] for c in group.colwise if f"{block}.{c}" in modules]
            if row is None or getattr(row, "weight", None) is None:
                continue
            count = row.weight.numel() + sum(p.numel() for c in cols for p in c.parameters())
        total += count
        blocks += 1
    return total, blocks


def _units(a: Analysis, draft: PlanDraft) -> list[tuple[FoundGroup, list[tuple], Form]]:
    """What ``draft`` splits, one entry per reducing module (a rowwise Linear, an expert bank): the
    groups feeding it merged (their rules name modules, not groups: Inkling 2's attention takes other
    colwise members in a block with a short convolution), their keys, and the weakest form written."""
    written = {r.pattern for r in draft.rules if r.in_block and isinstance(r.rule, (RowwiseRule, ExpertTensorParallelRule))}
    units: dict[str, tuple[FoundGroup, list[tuple], Form]] = {}
    for key, m in a.merged.items():
        group = m.group
        if group.rowwise not in written:
            continue
        form = (draft.forms.get(key) or (m.form.form, ""))[0]
        if group.rowwise not in units:
            units[group.rowwise] = (FoundGroup(group.rowwise, list(group.colwise), [], experts=group.experts), [key], form)
            continue
        unit, keys, was = units[group.rowwise]
        unit.colwise += [c for c in group.colwise if c not in unit.colwise]
        keys.append(key)
        units[group.rowwise] = (unit, keys, max(form, was))
    return list(units.values())


def params_per_rank(a: Analysis, draft: PlanDraft) -> int:
    """Parameters one tp rank holds under ``draft`` at full size (no FSDP), from the weights its rules split
    (per-head parameters split with the heads are counted whole: an estimate never below the truth)."""
    total = sum(p.numel() for p in a.full_model.parameters())  # a tied weight once
    tp = draft.tp
    for unit, _, _ in _units(a, draft):
        count, _ = split_numel(a, unit)
        total -= count - count // tp
    modules = a.modules_full
    split = {r.pattern for r in draft.rules if not r.in_block and isinstance(r.rule, (RowwiseRule, ColwiseRule))}
    weights = {id(modules[n].weight): modules[n].weight for n in (a.skeleton.embed, a.skeleton.head)
               if n in split and n in modules}  # the embedding and the head: one weight when tied
    for weight in weights.values():
        total -= weight.numel() - weight.numel() // tp
    return total


def _unit_bytes(a: Analysis, unit: FoundGroup, form: Form, stream: int) -> int:
    """Elements a sharded ``unit`` sends per token and block, up to the ring's common factor: an all-reduce
    (twice an all-gather's bytes) of its output forward and of its input's gradient backward; gathered, also
    the all-gather of the colwise output forward and of the rowwise input's gradient backward.  ``stream``:
    the width of an expert bank's output (the widest rowwise output)."""
    module = _unit_module(a, unit)
    cost = 4 * (module.out_features if isinstance(getattr(module, "out_features", None), int) else stream)
    if form is Form.GATHERED and isinstance(getattr(module, "in_features", None), int):
        cost += 2 * module.in_features
    return cost


def _unit_module(a: Analysis, unit: FoundGroup):
    modules = a.modules_full
    block = next((b for b in _full_blocks(a) if f"{b}.{unit.rowwise}" in modules), None)
    return modules.get(f"{block}.{unit.rowwise}") if block else None


def within_budget(a: Analysis, constraints: Constraints, build, budget: int) -> PlanDraft:
    """``build(constraints)`` with the groups left whole that save the most bytes while the parameters per
    rank stay within ``budget``: a sharded group costs about two all-reduces of its output per block
    (forward and backward; more when gathered), a whole one none.  Every subset of up to 16 reducing
    modules is weighed (the cheapest per parameter first beyond); the fewest parameters on ties.  The
    draft records the groups kept whole in its constraints."""
    from itertools import combinations

    draft = build(constraints)
    base = params_per_rank(a, draft)
    if base > budget:
        raise DeriveRefused(
            f"at tp={draft.tp} the derived plan holds about {human_count(base)} parameters per rank, more than "
            f"--max-params-per-rank {human_count(budget)}",
            hint="a larger --tp, or a larger budget")
    candidates = []  # (keys, parameters it adds whole, bytes it saves whole)
    units = _units(a, draft)
    stream = max([getattr(_unit_module(a, u), "out_features", 1) for u, _, _ in units if not u.experts] or [1])
    for unit, keys, form in units:
        count, blocks = split_numel(a, unit)
        candidates.append((keys, count - count // draft.tp, blocks * _unit_bytes(a, unit, form, stream)))
    best: tuple = ()
    best_score = (0, 0)
    if len(candidates) <= 16:
        subsets = (c for size in range(1, len(candidates) + 1) for c in combinations(candidates, size))
    else:
        ordered = sorted(candidates, key=lambda c: c[1] / max(1, c[2]))
        subsets = (tuple(ordered[:size]) for size in range(1, len(ordered) + 1))
    for subset in subsets:
        extra = sum(c[1] for c in subset)
        score = (sum(c[2] for c in subset), -extra)
        if base + extra <= budget and score > best_score:
            best, best_score = subset, score
    if not best:
        return draft
    held = base - best_score[1]
    kept = dict(constraints.kept)
    for keys, _, _ in best:
        for key in keys:
            kept[key] = (f"--max-params-per-rank {human_count(budget)} has room for it whole on every rank "
                         f"(about {human_count(held)} parameters per rank as written), and whole it needs no all-reduce")
    return build(dataclasses.replace(constraints, kept=kept))
