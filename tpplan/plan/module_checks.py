"""Resolve's checks on each planned module: can its style shard it, and does tp divide what it splits.

A style on a module of a kind it cannot take (colwise on a norm); a sharded size that tp does not
divide -- heads and kv heads (a projection's width read as heads x head_dim), MLP widths, the
vocabulary; a packed colwise split whose parts are unequal or do not divide; colwise with a sharded
output on a fused projection (qkv_proj, gate_up_proj: ``FUSED_PROJECTIONS``), which cuts across
[q | k | v] or [gate | up], and a rowwise after an unsharded fused projection; a per-head norm
(q_norm/k_norm over head_dim) left replicated after colwise projections.  ``ModuleChecks`` is a
part of resolve's resolver: it reports through ``ResolverBase.fail``.
"""

from __future__ import annotations

from tpplan.core.layouts import REPLICATE, Layout
from tpplan.model.shrink import config_get
from tpplan.plan.module_kinds import OUT_DIM, module_kind, out_features, splits_output_features
from tpplan.plan.resolved import PlanEntry, RuleUse
from tpplan.plan.resolver_base import ResolverBase
from tpplan.spec.model_spec import head_attr
from tpplan.spec.rule_base import RuleBase

# Linear layers known to pack several projections one after the other on their output features
# ([q | k | v], [gate | up]: Phi-3's qkv_proj and gate_up_proj, Baichuan's W_pack, MPT's Wqkv), so a
# contiguous colwise split cuts across them.  Not GPT-NeoX/Falcon/Bloom's query_key_value: it
# interleaves q, k and v per head, and a contiguous split hands each rank whole heads (correct).
FUSED_PROJECTIONS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q", "k", "v"),
    "W_pack": ("q", "k", "v"),
    "Wqkv": ("q", "k", "v"),
    "gate_up_proj": ("gate", "up"),
}


class ModuleChecks(ResolverBase):
    """The checks on each planned module (see the module docstring)."""

    # -- checks on each planned module -----------------------------------------------------

    def check_entry(self, name: str, use: RuleUse) -> None:
        rule, module = use.rule, self.target(name)
        kind = module_kind(module)
        problem = rule.kind_problem(name, type(module).__name__, kind)
        if problem is not None:
            message, hint = problem
            self.fail(message, (*use.path, "style"), hint, module=name)
            return
        for message, hint, field_name in rule.size_problems(name, module, tp=self.tp, ep=self.ep):
            self.fail(message, (*use.path, field_name), hint, module=name)
        if rule.weight_dim(kind) is not None:
            self.check_divides(name, module, kind, rule, use)

    def check_divides(self, name: str, module, kind: str, rule: RuleBase, use: RuleUse) -> None:
        tp, path = self.tp, (*use.path, "style")
        dim = rule.weight_dim(kind)
        size = module.weight.shape[dim]  # Linear weight is [out, in]: colwise dim 0, rowwise dim 1; Conv1D [in, out]
        splits_out = kind != "embedding" and dim == OUT_DIM[kind]
        if kind == "embedding":
            what = "vocabulary" if dim == 0 else "embedding dim"
        else:
            what = "output features" if splits_out else "input features"
        if splits_out and self._is_logits(name):
            what = "vocabulary"
        if rule.packed_parts:
            self.check_packed(name, module, rule, use)
            return
        # a colwise projection whose output is gathered splits its weight, not its heads: only the width must divide
        gathered = splits_out and rule.output_layout() == REPLICATE
        heads = None if gathered else self.head_count(name, size)
        if heads is not None:
            count, label, head_dim = heads
            if count % tp:
                relation = f"tp({tp}) > {label.replace(' ', '_')}({count})" if tp > count else f"{count} % {tp} = {count % tp}"
                self.fail(
                    f"{name}: {rule.style} splits {count} {label} ({size} {what} = {count} x head_dim {head_dim}) "
                    f"over tp={tp}: {relation}",
                    path,
                    hint=f"use a tp that divides {count}"
                    + (" (or replicate kv heads, which tpplan does not do)" if "kv" in label else ""),
                    module=name,
                )
            return
        if size % tp:
            hint = f"use a tp that divides {size}"
            if what == "vocabulary":
                hint = f"pad the vocabulary to a multiple of {tp} (model.resize_token_embeddings(n, pad_to_multiple_of={tp}))"
            self.fail(
                f"{name}: {rule.style} splits {size} {what} over tp={tp}: {size} % {tp} = {size % tp}", path, hint, module=name
            )

    def check_packed(self, name: str, module, rule: RuleBase, use: RuleUse) -> None:
        """A packed colwise split: the weight must hold ``parts`` equal parts (as measured, for the known
        fused projections), and tp must divide each part -- F % tp, not (parts x F) % tp -- and, for
        [q | k | v], each part's heads."""
        tp, path, parts = self.tp, (*use.path, "parts"), rule.packed_parts
        size = out_features(module)
        measured = self._parts(name, module)
        packed = " | ".join(f"{p} {n}" for p, n in measured) if measured else None
        if measured and (len(measured) != parts or len({n for _, n in measured}) != 1):
            equal = len({n for _, n in measured}) == 1
            self.fail(
                f"{name} packs [{packed}] on its {size} output features: "
                + (f"{len(measured)} parts, not {parts}" if equal else "parts of unequal sizes, which a strided "
                   "(packed) split cannot hold"),
                path,
                hint=f"parts: {len(measured)}" if equal else "gather its output instead: style: colwise with "
                "output_layouts: replicate, and input_layouts: replicate on the projection after it",
                module=name,
            )
            return
        if size % parts:
            self.fail(f"{name}: packed_colwise splits {size} output features into {parts} equal parts: "
                      f"{size} % {parts} = {size % parts}", path, hint="give the number of packed projections",
                      module=name)
            return
        part = size // parts
        heads = self.head_count(name, part)
        label = (measured[0][0] if measured else "each part")
        if heads is not None and measured and measured[0][0] in ("q", "k", "v"):
            count, kind_label, head_dim = heads
            config = getattr(self.model, "config", None)
            kv = config_get(config, "num_key_value_heads") or count
            for what, n in (("heads", count), ("kv_heads", kv)):
                if n % tp:
                    relation = f"tp({tp}) > {what}({n})" if tp > n else f"{n} % {tp} = {n % tp}"
                    self.fail(f"{name}: packed_colwise splits each of [{packed}] over tp={tp}: {n} "
                              f"{what.replace('_', ' ')} (x head_dim {head_dim}): {relation}",
                              (*use.path, "style"), hint=f"use a tp that divides {n}", module=name)
                    return
            return
        if part % tp:
            self.fail(f"{name}: packed_colwise splits each of its {parts} parts ({label}: {part} features) over "
                      f"tp={tp}: {part} % {tp} = {part % tp}", (*use.path, "style"),
                      hint=f"use a tp that divides {part}", module=name)

    def head_count(self, name: str, size: int) -> tuple[int, str, int] | None:
        """(heads, 'heads' or 'kv heads', head_dim) when ``name`` projects attention heads: its parent
        (the attention module) has a head_dim and ``size`` is a multiple of it."""
        parent = self.modules.get(name.rpartition(".")[0])
        head_dim = self.head_attr(parent, "head_dim")
        if not isinstance(head_dim, int) or head_dim <= 0 or size % head_dim:
            return None
        config = getattr(self.model, "config", None)
        q_heads = config_get(config, "num_attention_heads") or self.head_attr(parent, "heads")
        kv_heads = config_get(config, "num_key_value_heads") or self.head_attr(parent, "kv_heads")
        count = size // head_dim
        label = "kv heads" if kv_heads and count == kv_heads and count != q_heads else "heads"
        return count, label, head_dim

    def head_attr(self, module, what: str):
        """An attention module's head count or head size (``spec.head_attr``, by ``model.head_attrs``)."""
        return head_attr(module, what, self.spec.model.head_attrs)

    def _is_logits(self, name: str) -> bool:
        return name == self.logits_module

    # -- fused projections and per-head norms (architectures beyond Llama) ------------------

    def _parts(self, name: str, module) -> list[tuple[str, int]] | None:
        """What a known fused Linear packs on its output features: [("q", 3072), ("k", 1024), ...]."""
        packs = FUSED_PROJECTIONS.get(name.rpartition(".")[2])
        size = out_features(module)
        if packs is None:
            return None
        if packs == ("q", "k", "v"):
            config = getattr(self.model, "config", None)
            parent = self.modules.get(name.rpartition(".")[0])
            heads = config_get(config, "num_attention_heads")
            kv = config_get(config, "num_key_value_heads") or heads
            head_dim = getattr(parent, "head_dim", None) or (
                config.hidden_size // heads if heads and config_get(config, "hidden_size") else None)
            if heads and head_dim and (heads + 2 * kv) * head_dim == size:
                return [("q", heads * head_dim), ("k", kv * head_dim), ("v", kv * head_dim)]
        if size % len(packs):
            return [(" + ".join(packs), size)]
        return [(part, size // len(packs)) for part in packs]

    def _rank0(self, parts: list[tuple[str, int]], block: int) -> str:
        held, start = [], 0
        for part, size in parts:
            take = max(0, min(block, start + size) - start)
            if take:
                held.append(f"all of {part}" if take == size else f"{take} of {size} {part} features")
            start += size
            if start >= block:
                break
        return " and ".join(held)

    def check_fused(self, entries: list[PlanEntry], by_module: dict[str, PlanEntry]) -> None:
        """Plain colwise on a fused projection cuts across what it packs; a rowwise after an unsharded
        fused projection would take a whole activation for a shard."""
        for entry in entries:
            module = self.target(entry.fqn)
            if not splits_output_features(entry, module) or entry.rule.packed_parts:
                continue
            parts = self._parts(entry.fqn, module)
            if not parts or entry.rule.output_layout() == REPLICATE:
                continue
            groups = getattr(self.modules.get(entry.fqn.rpartition(".")[0]), "mp_num", None)
            if isinstance(groups, int) and groups > 0 and groups % self.tp == 0:
                continue  # CodeGen: [q | v | k] per group of heads, mp_num groups: a contiguous split hands each rank whole groups
            size = out_features(module)
            packed = " | ".join(f"{p} {n}" for p, n in parts)
            names = " and ".join([", ".join(p for p, _ in parts[:-1]), parts[-1][0]]) if len(parts) > 1 else parts[0][0]
            rank0 = f", so rank 0 would hold {self._rank0(parts, size // self.tp)}" if size % self.tp == 0 else ""
            self.fail(
                f"{entry.fqn} packs {names} into one Linear ([{packed}] output features): colwise with a sharded "
                f"output splits them into {self.tp} contiguous blocks{rank0}, and the code that splits the output "
                "at its global offsets would cut each rank's block in the wrong places",
                (*self.uses[entry.rule_index].path, "style"),
                hint=f"style: packed_colwise with parts: {len(parts)} (each rank holds its slice of every part"
                + ("; the attention then needs its local head counts: fix-ups config.num_attention_heads and "
                   "num_key_value_heads, op: floordiv_tp, see specs/phi3.yaml)" if parts[0][0] == "q" else ")")
                + ", or gather its output (output_layouts: replicate) and give the projection after it "
                "input_layouts: replicate",
                module=entry.fqn,
            )
        for name, module in self.modules.items():
            if module_kind(module) != "linear" or name.rpartition(".")[2] not in FUSED_PROJECTIONS:
                continue
            entry = by_module.get(name)
            splits = entry is not None and splits_output_features(entry, module)
            if splits and entry.rule.output_layout() != REPLICATE:
                continue  # reported above
            parent = name.rpartition(".")[0]
            how = "gathers its output" if splits else "is left whole"
            for sibling, other in by_module.items():
                if sibling.rpartition(".")[0] != parent or other.rule.weight_dim(module_kind(self.target(sibling))) != 1:
                    continue
                if module_kind(self.target(sibling)) != "linear" or other.rule.input_layout() != Layout(-1):
                    continue
                width = self.target(sibling).weight.shape[1]
                self.fail(
                    f"{sibling}: rowwise takes its input as already split over tp (input_layouts shard(-1)), but the "
                    f"fused {name.rpartition('.')[2]} before it {how}: {sibling} would get all {width} input features on every rank "
                    f"and read them as 1/{self.tp} of {width * self.tp}",
                    (*self.uses[other.rule_index].path, "style"),
                    hint=f"set input_layouts: replicate on {sibling.rpartition('.')[2]} (each rank keeps its own slice)",
                    module=sibling,
                )

    def check_head_norms(self, by_module: dict[str, PlanEntry]) -> None:
        """A norm over one head (Qwen3's q_norm/k_norm) after colwise projections sees only this rank's
        heads: left a plain replicated weight, each rank's gradient covers only its own heads."""
        config = getattr(self.model, "config", None)
        heads = config_get(config, "num_attention_heads")
        for name, module in self.modules.items():
            weight = getattr(module, "weight", None)
            parent_name = name.rpartition(".")[0]
            head_dim = getattr(self.modules.get(parent_name), "head_dim", None)
            if (module_kind(module) != "other" or "norm" not in type(module).__name__.lower() or weight is None
                    or weight.ndim != 1 or not isinstance(head_dim, int) or weight.shape[0] != head_dim):
                continue
            entry = by_module.get(name)
            if entry is not None and entry.rule.applies:
                continue
            sharding = [
                (sibling, e) for sibling, e in by_module.items()
                if sibling.rpartition(".")[0] == parent_name and splits_output_features(e, self.target(sibling))
                and e.rule.output_layout() == Layout(-1) and e.rule.returns_local
            ]
            if not sharding:
                continue
            what = "has no rule" if entry is None else "is replicate"
            mine = f"its own {heads // self.tp} of {heads} heads" if heads and heads % self.tp == 0 else "its own heads"
            self.fail(
                f"{name} normalizes single heads (weight [{head_dim}] = head_dim) of the heads that "
                f"{', '.join(s.rpartition('.')[2] for s, _ in sharding)} split over tp={self.tp}, but {what}: its "
                f"weight stays a plain tensor and each rank's gradient covers only {mine}",
                (*self.uses[(entry or sharding[0][1]).rule_index].path, "style"),
                hint="give it style: sequence_parallel with sequence_dim: the heads dim of its input (2 for "
                "[batch, seq, heads, head_dim]) and use_local_output: true -- a replicated weight whose gradient is "
                "summed over tp (transformers: replicated_with_grad_allreduce)",
                module=name,
            )
