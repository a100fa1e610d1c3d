"""Each group's form, chosen by emulation (sharded, packed, gathered, or left whole) and returned as values;
the groups merged over the blocks that hold them (rules name modules, not blocks); and the constraints that
hold a group to a weaker form than its dataflow allows (check's verdicts, a parameter budget's choice)."""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

from .common import features
from .emulate import EMULATE_TP, Emulator, Trial
from .groups import Form, FoundGroup, GroupForm, view_heads
from .twin import Traced

MAX_FIXUPS = 3  # attributes tried together when a rank's share needs head counts divided
FIXUP_SEARCH_S = 20.0  # per group: a twin whose forward is slow gets fewer tries, not a stalled derive


def _fixup_candidates(traced: Traced, modules: dict, group: FoundGroup, block: str) -> list[tuple[str, str]]:
    """Integer attributes, on the modules that hold the group (up to its block; ``modules``: the twin's by
    name), whose values are the counts the group splits: a head count or a width read by the forward
    (``self.num_heads``)."""
    members = [group.rowwise, *group.colwise]
    parents = {m.rpartition(".")[0] for m in members}
    holders: list[str] = []
    for parent in sorted(parents):
        parts = parent.split(".") if parent else []
        for depth in range(len(parts), -1, -1):
            rel = ".".join(parts[:depth])
            if rel not in holders:
                holders.append(rel)
    targets: set[int] = set()
    for rel in group.colwise:  # the head counts the forward views the split outputs as
        heads = view_heads(traced, block, rel, group)
        if heads is not None and heads > 1:
            targets.add(heads)
    twin = traced.twin_config
    for key in ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "multi_query_group_num"):
        value = getattr(twin, key, None)
        if isinstance(value, int) and value > 1:
            targets.add(value)
    for rel in group.colwise:
        width = features(modules[f"{block}.{rel}"])[1]
        targets.add(width)
        if group.parts.get(rel):  # a packed projection: the width of one part (GPT-2's split_size)
            targets.add(width // group.parts[rel])
    targets.add(features(modules[f"{block}.{group.rowwise}"])[0])
    found = []
    for rel in holders:
        module = modules[f"{block}.{rel}"] if rel else modules[block]
        owners = [("", vars(module))]
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            owners.append(("config.", vars(config)))  # the forward may read the shared config's head counts
        for prefix, attrs in owners:
            for attr, value in attrs.items():
                if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
                    continue
                if value in targets and value % EMULATE_TP == 0 and attr not in ("in_features", "out_features", "nx", "nf"):
                    found.append((rel, prefix + attr))
    return found


def _try_form(traced: Traced, emulator: Emulator, group: FoundGroup, block: str, form: Form,
              search_always: bool) -> tuple[str | None, list[tuple[str, str]], dict[str, int]]:
    """(None, fix-ups, modules that saw a cut input) when ``form`` of the group sums to the unsharded
    output on the twin, trying attribute fix-ups when a share does not run (or, with ``search_always``,
    when it runs to the wrong values: a packed split read at global offsets); else (why not, [], {})."""
    import itertools

    result, sharded = emulator.run([Trial(group, block, form, [])])
    failure = result[0]
    if failure is None:
        return None, [], sharded[0]
    if "does not run" not in failure and not search_always:
        return failure, [], {}
    candidates = _fixup_candidates(traced, emulator.modules, group, block)
    deadline = time.time() + FIXUP_SEARCH_S
    for size in range(1, min(MAX_FIXUPS, len(candidates)) + 1):
        for combo in itertools.combinations(candidates, size):
            if time.time() > deadline:
                return failure, [], {}
            result, sharded = emulator.run([Trial(group, block, form, list(combo))])
            if result[0] is None:
                return None, list(combo), sharded[0]
    return failure, [], {}


def _choose_experts_form(emulator: Emulator, group: FoundGroup, block: str) -> GroupForm:
    """A MoE expert bank: expert tensor parallel when its ranks' slices sum to the unsharded output."""
    try:
        result, _ = emulator.run([Trial(group, block, Form.SHARDED, [])])
        failure = result[0]
    except ValueError as exc:  # an expert layout the style does not know
        failure = str(exc)
    return GroupForm(Form.SHARDED) if failure is None else GroupForm(Form.REPLICATED, failure)


def choose_forms(traced: Traced, groups: dict[str, list[FoundGroup]],
                 emulator: Emulator | None = None) -> dict[tuple[str, tuple], GroupForm]:
    """Each group's form, by emulation: (block, group key) -> its ``GroupForm``.  Sharded when every
    rank's share sums to the unsharded output (with head-count fix-ups when needed); packed when a fused
    projection's equal parts, each cut separately, do; else gathered (always exact: only weights are split)."""
    emulator = emulator or Emulator(traced)
    forms: dict[tuple[str, tuple], GroupForm] = {}
    for block, block_groups in groups.items():
        for group in block_groups:
            forms[block, group.key] = (_choose_experts_form(emulator, group, block) if group.experts
                                       else _choose_form(traced, emulator, group, block))
    return forms


def _choose_form(traced: Traced, emulator: Emulator, group: FoundGroup, block: str) -> GroupForm:
    modules = emulator.modules
    leaves = traced.graph.leaf_modules
    members = {group.rowwise, *group.colwise}
    failure = group.problems[0] if group.problems else None
    if failure is None:
        candidates = [Form.SHARDED]
        if group.packed and all(group.parts.get(c) for c in group.packed):
            candidates.append(Form.PACKED)
        for form in candidates:
            why, fixups, cut = _try_form(traced, emulator, group, block, form, form is Form.PACKED)
            if why is None:
                unmeasured = [rel for rel, dim in cut.items() if rel not in members and dim is None]
                if unmeasured:
                    why = f"cannot tell which dim of {unmeasured[0]}'s input is cut"
            if why is None:
                grad_sum = {  # a leaf module with weights on the cut activations, not a member's parent
                    rel: dim for rel, dim in cut.items()
                    if rel not in members and f"{block}.{rel}" in leaves
                    and any(True for _ in modules[f"{block}.{rel}"].parameters())
                }
                why = (failure or "") if form is Form.PACKED else ""  # why not the contiguous split
                return GroupForm(form, why, tuple(fixups), grad_sum)
            failure = failure or why
    if group.local_params:  # the per-head parameters did not split with the heads
        failure = f"{group.local_why} ({failure})" if failure else group.local_why
    result, _ = emulator.run([Trial(group, block, Form.GATHERED, [])])
    if result[0] is None:
        return GroupForm(Form.GATHERED, failure)
    return GroupForm(Form.REPLICATED, f"{failure}; gathered: {result[0]}")


@dataclass(frozen=True)
class Constraints:
    """What holds groups to a weaker form than their dataflow allows, passed into every draft: what check
    disproved (``weakened``: group key -> (form, why), for the later drafts of one derive) and what a parameter
    budget chose to leave whole (``kept``: group key -> why, for one draft)."""

    weakened: dict[tuple, tuple[Form, str]] = field(default_factory=dict)
    kept: dict[tuple, str] = field(default_factory=dict)

    def forced(self, key: tuple) -> tuple[Form, str] | None:
        """The form a group is held to, weaker than its dataflow allows: check's or the budget's."""
        if key in self.weakened:
            return self.weakened[key]
        return (Form.REPLICATED, self.kept[key]) if key in self.kept else None


@dataclass
class MergedGroup:
    """One group over every block holding it: the found group of its weakest form (the first block's on a
    tie), that form with the fix-ups and gradient sums of every block merged into it so far, the blocks,
    and what those blocks found beside its linears (effective only where the form cuts activations)."""

    group: FoundGroup
    form: GroupForm
    blocks: list[str]
    shared_keys: dict[str, int]
    key_modules: list[str]
    local_params: dict[str, list[str]]


def merge_groups(groups: dict[str, list[FoundGroup]],
                 forms: dict[tuple[str, tuple], GroupForm]) -> dict[tuple, MergedGroup]:
    """Groups by their names relative to a block: the representative (weakest form wins) and its blocks.
    A block whose form is weaker than the representative's takes its place with what the blocks before it
    found merged in; a block of the same form adds what it found and its fix-ups; a stronger one adds its name."""
    merged: dict[tuple, MergedGroup] = {}
    for block, block_groups in groups.items():
        for group in block_groups:
            form = forms[block, group.key]
            cut = form.form.cuts_activations  # else nothing beside the linears sees a cut activation
            found = MergedGroup(group, form, [block], dict(group.shared_keys) if cut else {},
                                list(group.key_modules) if cut else [],
                                dict(group.local_params) if cut else {})
            first = merged.get(group.key)
            if first is None:
                merged[group.key] = found
                continue
            first.blocks.append(block)
            if form.form > first.form.form:
                merged[group.key] = _merge_found(found, first, found, form.fixups)
            elif form.form == first.form.form:
                fixups = tuple(dict.fromkeys(first.form.fixups + form.fixups))
                merged[group.key] = _merge_found(first, first, found, fixups)
    return merged


def _merge_found(into: MergedGroup, earlier: MergedGroup, later: MergedGroup, fixups: tuple) -> MergedGroup:
    """``into``'s group and form with what two blocks' copies of one group found beside its linears (the later
    block's entry wins where both name a module) and ``fixups``, over ``earlier``'s blocks."""
    grad_sum = {**earlier.form.grad_sum, **later.form.grad_sum}
    form = dataclasses.replace(into.form, fixups=fixups, grad_sum=grad_sum)
    return MergedGroup(into.group, form, earlier.blocks, {**earlier.shared_keys, **later.shared_keys},
                       list(dict.fromkeys(earlier.key_modules + later.key_modules)),
                       union(earlier.local_params, later.local_params))


def union(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per-head parameters by owner, from two blocks (MiMo-V2-Flash: sinks in its sliding-window layers
    only; local_params leaves a layer without them as it is)."""
    return {owner: list(dict.fromkeys(a.get(owner, []) + b.get(owner, []))) for owner in {**a, **b}}
