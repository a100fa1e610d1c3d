"""Divisibility: what each group splits over tp at full size (heads, features, the attributes fix-ups
divide), and the largest tp of 8, 4, 2 (or the one asked for) that divides them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tpplan.model.shrink import config_get, config_values
from tpplan.spec.write import TP_CANDIDATES

from .common import features, module_names
from .groups import Form, FoundGroup, GroupForm, view_heads
from .skeleton import Skeleton
from .twin import OwnModel, Traced

if TYPE_CHECKING:
    from .analysis import Analysis


@dataclass
class Split:
    """One size a rule splits over tp, at full size, and what it is ("32 heads", "14336 features")."""

    module: str  # relative to the block, or absolute outside blocks
    size: int
    what: str


def _head_split(traced: Traced, block: str, rel: str, group: FoundGroup) -> tuple[int, str] | None:
    """(heads in the twin, the config attribute that holds them) when ``rel``'s output is viewed as heads;
    for a model of one's own (no config), ``holder:attribute``: the module attribute that holds them."""
    heads = view_heads(traced, block, rel, group)
    if heads is None:
        return None
    if isinstance(traced.twin_config, OwnModel):
        return _heads_holder(traced, block, rel, heads)
    return _heads_attr(traced.twin_config, heads)


def _heads_holder(traced: Traced, block: str, rel: str, count: int) -> tuple[int, str] | None:
    """The integer attribute holding ``count`` (a head or kv-group count) on ``rel``'s parents up to the block,
    as ``holder:attr`` (holder relative to the block): the full model's value is read from the same place."""
    modules = module_names(traced.model)
    parts = rel.split(".")[:-1]
    for depth in range(len(parts), -1, -1):
        holder = ".".join(parts[:depth])
        module = modules.get(f"{block}.{holder}" if holder else block)
        names = sorted(vars(module) if module is not None else (), key=lambda n: ("kv" not in n, n))
        for attr in names:
            value = getattr(module, attr)
            if ("head" in attr or "group" in attr) and isinstance(value, int) and not isinstance(value, bool) \
                    and value == count:
                return count, f"{holder}:{attr}"
    return None


def _heads_attr(config, count: int) -> tuple[int, str] | None:
    """The config attribute holding ``count`` heads: query heads first (equal counts mean no grouping)."""
    for key in ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "multi_query_group_num",
                "num_kv_heads", "n_head_kv"):
        if config_get(config, key) == count:
            return count, key
    return None


def group_splits(traced: Traced, modules: dict[str, Any], skeleton: Skeleton, block: str, group: FoundGroup,
                 form: GroupForm) -> list[Split]:
    """What the group splits over tp at full size (``modules``: the full-size model's, by name) in ``form``:
    heads (for heads-shaped outputs) and features."""
    full_block = _first_full_block(modules, skeleton, block, group.rowwise)
    if full_block is None:
        return []
    splits: list[Split] = []
    for rel in group.colwise:
        linear = modules.get(f"{full_block}.{rel}")
        if linear is None:
            continue
        if form.form.cuts_activations:
            heads = _head_split(traced, block, rel, group)
            if heads is not None:
                label = "kv heads" if "kv" in heads[1] or "key_value" in heads[1] else "heads"
                if ":" in heads[1]:  # a model of one's own: the attribute on the full model's module
                    holder, attr = heads[1].split(":")
                    value = getattr(modules.get(f"{full_block}.{holder}" if holder else full_block), attr, None)
                    counts, where = ([value] if isinstance(value, int) else []), f"{holder + '.' if holder else ''}{attr}"
                else:
                    counts, where = config_values(traced.config, heads[1]), heads[1]
                for count in sorted(c for c in counts if isinstance(c, int)):
                    # per-layer head counts (dots3): every layer's must divide
                    splits.append(Split(rel, count, f"{count} {label} ({where})"))
        parts = group.parts.get(rel) if form.form is Form.PACKED else None
        out = features(linear)[1]
        if parts:
            splits.append(Split(rel, out // parts, f"{out // parts} output features per part ({parts} parts)"))
        else:
            splits.append(Split(rel, out, f"{out} output features"))
    row = modules.get(f"{full_block}.{group.rowwise}")
    if row is not None:
        splits.append(Split(group.rowwise, features(row)[0], f"{features(row)[0]} input features"))
    for rel, attr in form.fixups:
        holder = modules.get(f"{full_block}.{rel}" if rel else full_block)
        value = getattr(holder, attr, None)
        if isinstance(value, int):
            splits.append(Split(rel or "(block)", value, f"{rel + '.' if rel else ''}{attr} = {value}"))
    return splits


def _first_full_block(modules: dict, skeleton: Skeleton, block: str, rel: str) -> str | None:
    """The first block of the full model holding ``rel`` (the twin's blocks are a sample of the full model's)."""
    prefix = skeleton.blocks_list + "."
    for name in modules:  # the container's children, in order (a ModuleDict's keys need not be 0, 1, ...)
        if name.startswith(prefix) and "." not in name[len(prefix):] and f"{name}.{rel}" in modules:
            return name
    return None


def choose_tp(splits: dict[tuple, list[Split]], vocab: int | None, asked: int | None) -> tuple[int, str]:
    """The largest tp in TP_CANDIDATES dividing every sharded group's splits (or ``asked``); and why.  (At an
    ``asked`` tp, a group whose head counts it does not divide is gathered or left whole, never split unevenly.)"""
    if asked is not None:
        return asked, f"asked for (--tp {asked})"
    for tp in TP_CANDIDATES:
        bad = [s for group in splits.values() for s in group if s.size % tp]
        if not bad:
            counts = sorted({s.what for group in splits.values() for s in group if "heads" in s.what})
            vocab_note = "" if vocab is None or vocab % tp == 0 else f"; the vocabulary ({vocab}) does not divide"
            return tp, f"the largest of {'/'.join(map(str, TP_CANDIDATES))} dividing " + (
                ", ".join(counts) if counts else "every split width") + vocab_note
    return TP_CANDIDATES[-1], "the smallest tp; what it does not divide stays whole"


def experts_split(a: Analysis, block: str, rel: str) -> Split | None:
    """Each expert's intermediate size at full size: what expert tensor parallel splits over tp."""
    from tpplan.runtime.parallel_styles import expert_weight_dims

    modules = a.modules_full
    full_block = _first_full_block(modules, a.skeleton, block, rel)
    experts = modules.get(f"{full_block}.{rel}") if full_block else None
    if experts is None:
        return None
    dim = expert_weight_dims(experts).get("down_proj", (None,))[0]
    if dim is None:
        return None
    size = experts.down_proj.shape[dim]
    return Split(rel, size, f"{size} intermediate features per expert")


def all_splits(a: Analysis) -> dict[tuple, list[Split]]:
    out = {}
    for key, m in a.merged.items():
        if m.group.experts:
            split = experts_split(a, m.blocks[0], m.group.rowwise) if m.form.form is Form.SHARDED else None
            if split is not None:
                out[key] = [split]
        elif m.form.form.cuts_activations:
            out[key] = group_splits(a.traced, a.modules_full, a.skeleton, m.blocks[0], m.group, m.form)
    return out
