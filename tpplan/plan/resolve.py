"""Resolve: a spec's rules x a real model's ``named_modules()`` -> a ResolvedPlan.

Every check that can be made before any process group exists lives here, and all problems found
are reported together, each with the spec location of the rule at fault and the arithmetic:

- a rule (or fix-up) whose pattern matches no module;
- two rules giving one module different styles (``plan_overrides`` exist to replace on purpose);
- a style on a module it cannot shard (colwise on a norm, sequence_parallel on a Linear);
- a sharded size that tp does not divide: heads, kv heads, MLP width, vocabulary, sequence length;
- a parameter held by several modules (tied, found by identity) that they would shard differently;
- ``model.output`` / ``model.blocks`` / ``model.positions`` that do not fit the model;
- ``loss_parallel`` that disagrees with the layout of the logits.
- colwise with a sharded output on a fused projection (qkv_proj, gate_up_proj: it would cut
  across [q | k | v] or [gate | up]), and a rowwise after an unsharded fused projection;
- a per-head norm (q_norm/k_norm over head_dim) left replicated after colwise projections.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from tpplan.core.errors import Location, ResolveError, SpecErrors
from tpplan.core.layouts import REPLICATE, Layout
from tpplan.core.patterns import matches
from tpplan.model.shrink import config_get
from tpplan.plan.resolved import FixupEntry, PlanEntry, ResolvedPlan, RuleUse, TiedWeights
from tpplan.spec.model_spec import HEAD_ATTR_DEFAULTS, head_attr
from tpplan.spec.rule_base import RuleBase, is_conv1d
from tpplan.spec.rules import GroupRule
from tpplan.spec.schema import Spec

PathKey = tuple

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


def module_kind(module) -> str:
    """What a style can shard: "embedding", "linear", "conv1d" (transformers' Conv1D: a Linear with
    its weight stored [in, out]), "experts" (a transformers MoE experts module: its weights are 3-D
    parameters, one slice per expert), "parameter" (a bare parameter matched by a parameter-level
    rule), or "other"."""
    import torch.nn as nn

    if isinstance(module, nn.Parameter):
        return "parameter"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    down = module._parameters.get("down_proj") if isinstance(module, nn.Module) else None
    if down is not None and down.ndim == 3:
        return "experts"
    return "other"


@dataclass
class _Resolver:
    spec: Spec
    model: Any
    tp: int
    seq_length: int | None
    ep: int = 1
    base_dir: Any = None  # the spec's folder: styles of one's own named by a file path are relative to it
    modules: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    errors: list[ResolveError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    uses: list[RuleUse] = field(default_factory=list)
    assigned: dict[str, int] = field(default_factory=dict)  # module -> index into uses
    _pending: list = field(default_factory=list)
    _seen: dict = field(default_factory=dict)
    _logits: str | None = None

    # -- locations and errors --------------------------------------------------------------

    def where(self, path: PathKey) -> Location | None:
        source = self.spec.source
        return source.where(path) if source is not None else None

    def fail(self, message: str, path: PathKey | None = None, hint: str | None = None, *, module: str | None = None) -> None:
        """Record an error. Errors naming a ``module`` that repeat for its siblings (every layer
        of a model) are folded into the first: "... (and 31 more modules like it)"."""
        key = (path, message.replace(module, "<module>") if module else message)
        if key in self._seen:
            self._seen[key][1] += 1
            return
        self._seen[key] = [len(self._pending), 0]
        self._pending.append((message, path, hint))

    def _flush_errors(self) -> None:
        from tpplan.spec.loader import format_path

        for (message, path, hint), (_, more) in zip(self._pending, self._seen.values(), strict=True):
            if more:
                message += f" (and {more} more module{'s' if more > 1 else ''} like it)"
            self.errors.append(
                ResolveError(
                    message,
                    location=self.where(path) if path is not None else None,
                    path=format_path(path) if path is not None else None,
                    hint=hint,
                )
            )

    # -- matching --------------------------------------------------------------------------

    def match_under(self, pattern: str, parents: list[str] | None, *, names=None) -> list[str]:
        """Modules matching ``pattern`` (under each of ``parents``); a pattern that names no module
        may name parameters (a parameter-level rule: ``mlp.experts.gate_up_proj``)."""
        names = self.modules if names is None else names
        if parents is None:
            found = [name for name in names if matches(pattern, name)]
        else:
            found = []
            for parent in parents:
                prefix = parent + "."
                found.extend(name for name in names if name.startswith(prefix) and matches(pattern, name[len(prefix):]))
        if not found and names is self.modules:
            found = self.match_under(pattern, parents, names=self.parameters)
        return found

    def no_match_hint(self, pattern: str, parents: list[str] | None) -> str:
        if parents:
            prefix = parents[0] + "."
            names = [n[len(prefix):] for n in self.modules if n.startswith(prefix)]
            where = f"under {parents[0]}"
        else:
            names, where = list(self.modules), "in the model"
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
        if close:
            return f"closest module names {where}: " + ", ".join(close)
        children = sorted({n.split(".")[0] for n in names})[:12]
        return f"top-level names {where}: " + ", ".join(children)

    def walk(self, rules, base: PathKey, parents: list[str] | None, prefix: str, override: bool) -> None:
        for i, rule in enumerate(rules):
            path = (*base, i)
            pattern = f"{prefix}.{rule.match}" if prefix else rule.match
            found = self.match_under(rule.match, parents)
            if not found:
                where = f"under any of the {len(parents)} modules matched by {prefix}" if parents else "in the model"
                self.fail(
                    f"pattern {rule.match!r} matches no module {where}",
                    (*path, "match"),
                    hint=self.no_match_hint(rule.match, parents),
                )
                continue
            index = len(self.uses)
            self.uses.append(RuleUse(path=path, pattern=pattern, rule=rule, matches=tuple(found), override=override))
            if not isinstance(rule, GroupRule):
                for name in found:
                    self.assign(name, index, override)
            if rule.plan:
                self.walk(rule.plan, (*path, "plan"), found, pattern, override)

    def assign(self, name: str, index: int, override: bool) -> None:
        previous = self.assigned.get(name)
        if previous is not None and not override:
            old, new = self.uses[previous], self.uses[index]
            if _same_style(old.rule, new.rule):
                return  # the same instruction twice: harmless
            where = self.where((*old.path, "match"))
            self.fail(
                f"module {name} gets two different styles: {old.rule.style} from {old.label}"
                f"{f' (line {where.line})' if where and where.line else ''} and {new.rule.style} from {new.label}",
                (*new.path, "match"),
                hint="narrow one pattern, or move the rule that should win to plan_overrides",
                module=name,
            )
            return
        self.assigned[name] = index

    # -- checks on each planned module -----------------------------------------------------

    def target(self, name: str):
        """The module (or, for a parameter-level rule, the parameter) called ``name``."""
        return self.modules[name] if name in self.modules else self.parameters[name]

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
        splits_out = kind != "embedding" and dim == _OUT_DIM[kind]
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
        size = _out_features(module)
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

    def load_own_styles(self) -> None:
        """Import each rule's style of one's own (``own_styles.load_style``: the same import as
        model.factory); one that does not import, is no ParallelStyle or whose args do not bind is an
        error at the rule.  A style whose rule does not say the module kinds it takes is trusted, and
        the plan says so."""
        import re

        from tpplan.plan.own_styles import load_style
        from tpplan.spec.loader import format_path

        loaded: dict[tuple, RuleBase] = {}
        for i, use in enumerate(self.uses):
            if not use.rule.user_style:
                continue
            try:
                key = (use.path, use.rule.style)
                rule = loaded[key] = loaded.get(key) or load_style(use.rule, self.base_dir, format_path(use.path))
            except ResolveError as exc:
                keys = tuple(int(k) if k.isdigit() else k for k in re.split(r"[.\[\]]+", exc.path or "") if k)
                self.fail(exc.message, keys or (*use.path, "style"), exc.hint)
                continue
            self.uses[i] = RuleUse(use.path, use.pattern, rule, use.matches, use.override)
            if rule.kinds is None:
                self.warnings.append(
                    f"{use.label} {use.pattern}: {rule.TORCH_STYLE} is a style of your own and its rule does not say "
                    "which modules it takes (kinds): resolve trusts it with what it matches; check proves it")

    # -- whole-plan checks ---------------------------------------------------------------

    @property
    def logits_module(self) -> str | None:
        return self._logits

    def find_logits_module(self) -> str | None:
        """The module computing the logits: ``model.output``; else transformers'
        ``get_output_embeddings()``; else the last Linear whose width is an Embedding's vocabulary."""
        given = self.spec.model.output
        if given is not None:
            found = [name for name in self.modules if matches(given, name)]
            if len(found) != 1:
                self.fail(
                    f"model.output {given!r} names {'no module' if not found else f'{len(found)} modules'}: it must "
                    "name the one module that computes the logits",
                    ("model", "output"),
                    hint=self.no_match_hint(given, None),
                )
                return None
            return found[0]
        if hasattr(self.model, "get_output_embeddings"):
            return self.module_name(self.model.get_output_embeddings())
        vocabularies = {m.num_embeddings for m in self.modules.values() if module_kind(m) == "embedding"}
        linears = [name for name, m in self.modules.items()
                   if module_kind(m) == "linear" and m.out_features in vocabularies]
        return linears[-1] if linears else None

    def module_name(self, module) -> str | None:
        if module is None:
            return None
        for name, candidate in self.modules.items():
            if candidate is module:
                return name
        return None

    def check_sequence(self, entries: list[PlanEntry]) -> None:
        if not self.seq_length:
            return
        if any(entry.rule.splits_sequence() for entry in entries) and self.seq_length % self.tp:
            self.fail(
                f"sequence parallel splits the sequence over tp={self.tp}, but seq_length {self.seq_length} "
                f"% {self.tp} = {self.seq_length % self.tp}",
                ("train", "seq_length"),
                hint=f"use a seq_length that is a multiple of {self.tp}",
            )

    def check_logits(self, by_module: dict[str, PlanEntry]) -> None:
        name = self.logits_module
        if name is None:
            return
        entry = by_module.get(name)
        vocab_split = entry is not None and entry.rule.weight_dim(module_kind(self.modules[name])) == 0
        sharded = vocab_split and entry.rule.output_layout() == Layout(-1)
        if self.spec.loss_parallel:
            if not vocab_split:
                self.fail(
                    f"loss_parallel needs {name} colwise (vocabulary split) with output_layouts: shard(-1)",
                    ("loss_parallel",),
                    hint=f"add a colwise rule for {name}, or set loss_parallel: false",
                )
            elif not sharded or entry.rule.returns_local:
                self.fail(
                    f"loss_parallel needs the logits vocab-sharded as a DTensor, but {name} has "
                    f"output_layouts {entry.rule.output_layout()} and use_local_output {entry.rule.returns_local}",
                    (*self.uses[entry.rule_index].path, "output_layouts"),
                    hint="set output_layouts: shard(-1) and use_local_output: false on it",
                )
        elif sharded and entry.rule.returns_local:
            self.fail(
                f"{name} hands on vocab-sharded logits as plain local tensors: the loss would see 1/{self.tp} "
                "of the vocabulary",
                (*self.uses[entry.rule_index].path, "style"),
                hint="set output_layouts: replicate (gathers full logits), or loss_parallel: true with "
                "output_layouts: shard(-1) and use_local_output: false",
            )

    def rule_ref(self, index: int) -> str:
        """``plan[3] at line 61`` (or ``at specs/llama3.yaml:61`` when another file of the extends
        chain wrote it)."""
        use = self.uses[index]
        where = self.where((*use.path, "style"))
        if where is None or not where.line:
            return use.label
        own = self.spec.source.where(()).file if self.spec.source else None
        return f"{use.label} at " + (f"line {where.line}" if where.file == own else f"{where.file}:{where.line}")

    def check_tied(self, by_module: dict[str, PlanEntry]) -> list[TiedWeights]:
        """A parameter held by two or more modules -- found by identity, whatever declared it (a
        transformers ``tie_word_embeddings``, or ``self.output.weight = self.embed.weight`` in plain
        torch) -- must end up held the same way by every holder; apply then gives every holder the
        same sharded parameter again.  Sharded two ways it would silently come apart: refused."""
        holders: dict[int, list[str]] = {}
        for name, param in self.model.named_parameters(remove_duplicate=False):
            holders.setdefault(id(param), []).append(name)
        tied = []
        for names in holders.values():
            if len(names) < 2:
                continue
            sides = []
            for pname in names:
                fqn, _, attr = pname.rpartition(".")
                entry = by_module.get(fqn)
                module = self.modules.get(fqn, self.model)
                layout = entry.rule.parameter_layout(module_kind(module), attr) if entry and self.tp > 1 else "plain"
                sides.append((pname, fqn, entry, layout))
            layouts = {layout for *_, layout in sides}
            if len(layouts) == 1:
                tied.append(TiedWeights(owner=names[0], others=tuple(names[1:]), layout=layouts.pop()))
                continue

            def says(fqn, entry, layout):
                held = {"plain": "whole (a plain tensor)", "replicate": "as a replicated DTensor"}.get(layout, f"as {layout}")
                rule = "no rule" if entry is None else f"{entry.rule.style}, {self.rule_ref(entry.rule_index)}"
                return f"{fqn} ({rule}) {held}"

            first = next((e for _, _, e, _ in sides if e is not None), None)
            kinds = {module_kind(self.modules.get(fqn, self.model)) for _, fqn, _, _ in sides}
            hint = ("shard every holder alike: an embedding rowwise and the output projection colwise both split "
                    "the vocabulary (shard(0)); or untie it in the model (transformers: "
                    "config: {tie_word_embeddings: false})"
                    if kinds == {"embedding", "linear"} else
                    "give every module that holds it rules that shard it the same way, or leave all of them whole")
            self.fail(
                f"{' and '.join(names)} are one parameter (tied), but the plan would hold it in "
                + " and in ".join(says(fqn, entry, layout) for _, fqn, entry, layout in sides)
                + ": held two ways, the tie would come apart",
                (*self.uses[first.rule_index].path, "style") if first else None,
                hint=hint,
            )
        return tied

    def resolve_fixups(self) -> list[FixupEntry]:
        found: list[FixupEntry] = []
        for i, fixup in enumerate(self.spec.fixups):
            path = ("fixups", i)
            names = self.match_under(fixup.match, None)
            if not names:
                self.fail(f"pattern {fixup.match!r} matches no module", (*path, "match"),
                          hint=self.no_match_hint(fixup.match, None))
                continue
            missing = []
            for name in names:
                module = self.modules[name]
                present, before = _get_path(module, fixup.attr)
                after = None
                if present and fixup.op == "floordiv_tp":
                    if not isinstance(before, int) or isinstance(before, bool):
                        self.fail(f"{name}.{fixup.attr} is {before!r}, not an integer to divide by tp", (*path, "attr"),
                                  module=name)
                        continue
                    if before % self.tp:
                        self.fail(f"{name}.{fixup.attr} = {before} does not divide by tp={self.tp}", (*path, "attr"),
                                  module=name)
                        continue
                    after = before // self.tp
                elif present:
                    after = fixup.value
                if not present:
                    missing.append(name)
                found.append(FixupEntry(name, fixup.attr, fixup.op, fixup.value, present, before, after))
            if missing:
                shown = ", ".join(missing[:3]) + (f" and {len(missing) - 3} more" if len(missing) > 3 else "")
                text = f"{len(missing)} of {len(names)} modules matched by {fixup.match!r} have no attribute {fixup.attr!r} ({shown})"
                if fixup.missing == "error":
                    self.fail(text, (*path, "attr"), hint="remove the fix-up, or set missing: skip to skip and report")
                else:
                    self.warnings.append(f"fixups[{i}]: {text}: skipped")
        return found

    def resolve_blocks(self) -> tuple[str, ...]:
        """The transformer blocks as module-name patterns (FSDP2 units, per-block reports):
        ``model.blocks``; else the modules of transformers' ``_no_split_modules`` classes; else the
        items of the model's ModuleLists/ModuleDicts/Sequentials of one class (``layers.0`` -> ``layers.*``)."""
        given = self.spec.model.blocks
        if given:
            for i, pattern in enumerate(given):
                if not self.match_under(pattern, None):
                    self.fail(f"model.blocks pattern {pattern!r} matches no module", ("model", "blocks", i),
                              hint=self.no_match_hint(pattern, None))
            return tuple(given)
        import torch.nn as nn

        classes = set(getattr(self.model, "_no_split_modules", None) or ())
        if classes:
            names = [name for name, m in self.modules.items() if type(m).__name__ in classes]
        else:
            names = []
            for name, module in self.modules.items():
                if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and len(module) > 0:
                    children = list(module.children())
                    if len({type(c) for c in children}) == 1 and any(True for _ in children[0].parameters()):
                        names.extend(f"{name}.{key}" for key, _ in module.named_children())
        return tuple(dict.fromkeys(_block_pattern(n) for n in names))

    def check_tie_units(self, tied: list[TiedWeights], blocks: tuple[str, ...]) -> None:
        """A tie whose holders fall in different FSDP units (``model.blocks``) cannot stay tied under
        FSDP2: the training step refuses to shard it (``step.split_ties``); said here, before any rank."""
        from tpplan.runtime.step import split_ties

        units = [name for name in self.modules if any(matches(p, name) for p in blocks)]
        for names, homes in split_ties([t.names for t in tied], units):
            self.warnings.append(
                f"{' and '.join(names)} are one parameter held in different FSDP units ({', '.join(homes)}): "
                "under FSDP2 (dp > 1, or a mixed train.precision) it cannot stay tied and tpplan refuses to shard "
                "it; set model.blocks so that one unit holds all of them"
            )

    def check_forward(self) -> None:
        """The model's forward takes position ids by the keyword ``model.positions`` names."""
        import inspect

        keyword = self.spec.model.positions
        if keyword is None:
            return
        try:
            params = inspect.signature(self.model.forward).parameters
        except (TypeError, ValueError):
            return
        if keyword in params or any(p.kind is p.VAR_KEYWORD for p in params.values()):
            return
        self.fail(
            f"{type(self.model).__name__}.forward takes no {keyword!r} argument (its parameters: "
            f"{', '.join(params)}), but model.positions says position ids are passed by that keyword",
            ("model", "positions"),
            hint="set model.positions to the keyword its forward takes position ids by, or null if the model "
            "makes its own",
        )

    def lint(self, entries: list[PlanEntry]) -> None:
        """Plans that load and divide but are known to break at runtime: say so before `check` does."""
        for entry in entries:
            self.warnings.extend(entry.rule.warnings(entry.fqn, module_kind(self.target(entry.fqn)), self.tp))

    def lint_head_counts(self, entries: list[PlanEntry], fixups: list[FixupEntry]) -> None:
        """A model of your own whose attention keeps its head counts in attributes (n_heads, ...)
        usually reshapes by them; after colwise projections with local outputs each rank holds
        1/tp of the heads, so the attribute must be divided by tp (a fix-up).  transformers 5
        attention reads its head counts from the shapes: not linted."""
        if getattr(self.model, "config", None) is not None:
            return
        fixed = {(f.fqn, f.attr) for f in fixups if f.op == "floordiv_tp" and f.present}
        by_module = {e.fqn: e for e in entries}
        said: set = set()
        for name, module in self.modules.items():
            split = [
                child for child, entry in by_module.items()
                if child.rpartition(".")[0] == name and _splits_output_features(entry, self.target(child))
                and entry.rule.output_layout() == Layout(-1)
                and entry.rule.returns_local
            ]
            if not split:
                continue
            named = self.spec.model.head_attrs
            for what in ("heads", "kv_heads"):
                attrs = (getattr(named, what),) if getattr(named, what) else HEAD_ATTR_DEFAULTS[what]
                attr = next((a for a in attrs if isinstance(getattr(module, a, None), int)), None)
                if attr is None or (name, attr) in fixed:
                    continue
                count = getattr(module, attr)
                pattern = _block_pattern(name.rpartition(".")[0]) + "." + name.rpartition(".")[2] if "." in name else name
                if (pattern, attr) in said:
                    continue
                said.add((pattern, attr))
                self.warnings.append(
                    f"{pattern}.{attr} = {count} is the whole model's count, but after colwise "
                    f"{', '.join(c.rpartition('.')[2] for c in split)} each rank computes "
                    f"{count // self.tp if count % self.tp == 0 else f'1/{self.tp} of them'}: if its "
                    f"forward reshapes by {attr}, add fixups: [{{match: {pattern}, attr: {attr}, op: floordiv_tp}}]"
                )

    # -- fused projections and per-head norms (architectures beyond Llama) ------------------

    def _parts(self, name: str, module) -> list[tuple[str, int]] | None:
        """What a known fused Linear packs on its output features: [("q", 3072), ("k", 1024), ...]."""
        packs = FUSED_PROJECTIONS.get(name.rpartition(".")[2])
        size = _out_features(module)
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
            if not _splits_output_features(entry, module) or entry.rule.packed_parts:
                continue
            parts = self._parts(entry.fqn, module)
            if not parts or entry.rule.output_layout() == REPLICATE:
                continue
            groups = getattr(self.modules.get(entry.fqn.rpartition(".")[0]), "mp_num", None)
            if isinstance(groups, int) and groups > 0 and groups % self.tp == 0:
                continue  # CodeGen: [q | v | k] per group of heads, mp_num groups: a contiguous split hands each rank whole groups
            size = _out_features(module)
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
            splits = entry is not None and _splits_output_features(entry, module)
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
                if sibling.rpartition(".")[0] == parent_name and _splits_output_features(e, self.target(sibling))
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

    def bind(self, use: RuleUse) -> RuleUse:
        """The rule with the sizes its style reads off the model filled in (``RuleBase.bind``), once per
        rule: every module it matches must read the same (else the plan needs one rule per kind)."""
        if isinstance(use.rule, GroupRule) or not use.matches:
            return use
        first = use.matches[0]
        bound = use.rule.bind(first, self.target(first), self.model)
        for name in use.matches[1:]:
            other = use.rule.bind(name, self.target(name), self.model)
            if other is use.rule and bound is use.rule:
                continue
            if type(other) is not type(bound):
                kinds = f"{type(self.target(first)).__name__} and a {type(self.target(name)).__name__} ({name})"
                self.fail(f"{use.rule.style} matches {first}, a {kinds}, which it shards with different torch styles "
                          f"({bound.TORCH_STYLE}, {other.TORCH_STYLE})", (*use.path, "match"),
                          hint="one rule per kind of module: narrow the pattern")
                break
            if other.style_kwargs() != bound.style_kwargs():
                self.fail(f"{use.rule.style} reads different sizes off {first} ({bound.summary()}) and {name} "
                          f"({other.summary()}), which one rule matches", (*use.path, "match"),
                          hint="one rule per kind of module (narrow the pattern), or give the sizes in the rule")
                break
        if bound is use.rule:
            return use
        return RuleUse(use.path, use.pattern, bound, use.matches, use.override)

    # -- the whole thing -------------------------------------------------------------------

    def run(self) -> ResolvedPlan:
        self.modules = {name: module for name, module in self.model.named_modules() if name}
        self.parameters = dict(self.model.named_parameters())
        self._logits = self.find_logits_module()
        self.walk(self.spec.plan, ("plan",), None, "", override=False)
        self.walk(self.spec.plan_overrides, ("plan_overrides",), None, "", override=True)
        self.load_own_styles()

        decided: dict[int, list[str]] = {}
        for name, index in self.assigned.items():
            decided.setdefault(index, []).append(name)
        order = {name: float(i) for i, name in enumerate(self.modules)}
        # a parameter-level rule's entry sorts right after its module's
        order.update({name: order.get(name.rpartition(".")[0], -1.0) + 0.5 for name in self.parameters})
        self.uses = [
            RuleUse(u.path, u.pattern, u.rule, tuple(sorted(decided.get(i, []), key=order.get)) if not isinstance(u.rule, GroupRule) else u.matches, u.override)
            for i, u in enumerate(self.uses)
        ]
        self.uses = [self.bind(use) for use in self.uses]
        entries = [
            PlanEntry(fqn=name, rule=self.uses[index].rule, rule_index=index, module_type=type(self.target(name)).__name__)
            for name, index in sorted(self.assigned.items(), key=lambda item: order[item[0]])
        ]
        for entry in entries:
            self.check_entry(entry.fqn, self.uses[entry.rule_index])
        by_module = {e.fqn: e for e in entries}
        self.check_sequence(entries)
        if self.ep > 1 and not any(e.rule.EXPERT_PARALLEL for e in entries):
            self.fail(f"the mesh has ep={self.ep} expert-parallel ranks, but no rule places experts on them",
                      ("mesh", "ep"), hint="give the MoE experts modules style: expert_parallel, or set mesh.ep: 1")
        self.check_fused(entries, by_module)
        self.check_head_norms(by_module)
        self.check_logits(by_module)
        tied = self.check_tied(by_module)
        fixups = self.resolve_fixups()
        blocks = self.resolve_blocks()
        self.check_forward()
        self.check_tie_units(tied, blocks)
        self.lint(entries)
        self.lint_head_counts(entries, fixups)
        self._flush_errors()
        if self.errors:
            raise self.errors[0] if len(self.errors) == 1 else SpecErrors(self.errors)
        config = getattr(self.model, "config", None)
        return ResolvedPlan(
            spec_name=self.spec.name,
            model_class=type(self.model).__name__,
            model_type=getattr(config, "model_type", "") or "",
            tp=self.tp,
            entries=tuple(entries),
            rules=tuple(self.uses),
            fixups=tuple(fixups),
            tied=tuple(tied),
            loss_parallel=self.spec.loss_parallel,
            logits_module=self.logits_module,
            blocks=blocks,
            warnings=tuple(self.warnings),
        )


def _block_pattern(name: str) -> str:
    """``model.layers.3`` -> ``model.layers.*``: one pattern for the blocks of one container."""
    head, _, last = name.rpartition(".")
    return f"{head}.*" if head and last.isdigit() else name


def _same_style(a: RuleBase, b: RuleBase) -> bool:
    return type(a) is type(b) and a.style_kwargs() == b.style_kwargs()


def _get_path(obj, path: str) -> tuple[bool, Any]:
    """(present, value) of a dotted attribute path such as ``config.num_attention_heads``."""
    for part in path.split("."):
        if not hasattr(obj, part):
            return False, None
        obj = getattr(obj, part)
    return True, obj


#: the dim of a module's weight that holds its output features: nn.Linear [out, in], Conv1D [in, out]
_OUT_DIM = {"linear": 0, "conv1d": 1}


def _out_features(module) -> int:
    """A Linear's (or Conv1D's) output features."""
    return module.weight.shape[_OUT_DIM[module_kind(module)]]


def _splits_output_features(entry: PlanEntry, module) -> bool:
    """A Linear (or Conv1D) whose output features the entry's style splits over tp (colwise)."""
    kind = module_kind(module)
    return kind in _OUT_DIM and entry.rule.weight_dim(kind) == _OUT_DIM[kind]


def resolve(spec: Spec, model, *, tp: int, seq_length: int | None = None, ep: int | None = None,
            base_dir=None) -> ResolvedPlan:
    """Match ``spec``'s plan against ``model`` (meta or real) for a tensor-parallel size ``tp`` (and
    an expert-parallel size ``ep``, default the spec's ``mesh.ep``).  ``base_dir``: the folder a
    style of one's own named by a file path is relative to (default: the spec's own).

    Raises ResolveError (or SpecErrors with several) naming every problem; returns the plan."""
    if tp < 1:
        raise ResolveError(f"tp must be a positive integer, got {tp}")
    ep = spec.mesh.ep if ep is None else ep
    if ep < 1:
        raise ResolveError(f"ep must be a positive integer, got {ep}")
    if base_dir is None and spec.source is not None:
        base_dir = spec.source.directory
    return _Resolver(spec=spec, model=model, tp=tp, seq_length=seq_length, ep=ep, base_dir=base_dir).run()


def tp_size(spec: Spec, override: int | None = None) -> int:
    """The tensor-parallel size: ``--tp``, else ``mesh.tp``; ``node`` means launch.nproc_per_node."""
    if override is not None:
        if override < 1:
            raise ResolveError(f"--tp must be a positive integer, got {override}")
        return override
    if isinstance(spec.mesh.tp, int):
        return spec.mesh.tp
    nproc = spec.launch.nproc_per_node
    if isinstance(nproc, int):
        return nproc
    raise ResolveError(
        "mesh.tp is 'node' but the node size is not known here (launch.nproc_per_node is "
        f"{nproc!r})",
        location=spec.source.where(("mesh", "tp")) if spec.source else None,
        path="mesh.tp",
        hint="pass --tp N, or set launch.nproc_per_node to the number of GPUs per node",
    )


def dp_size(spec: Spec, tp: int, world_size: int | None = None, override: int | None = None, ep: int = 1) -> int:
    """The data-parallel size: ``--dp``, else ``mesh.dp``, else (auto) world_size // (ep x tp)."""
    if override is not None:
        if override < 1:
            raise ResolveError(f"--dp must be a positive integer, got {override}")
        dp = override
    elif isinstance(spec.mesh.dp, int):
        dp = spec.mesh.dp
    elif world_size is not None:
        dp = world_size // (ep * tp)
    else:
        nproc = spec.launch.nproc_per_node
        nnodes = int(spec.launch.nnodes.split(":")[-1])
        dp = max(1, (nproc * nnodes) // (ep * tp)) if isinstance(nproc, int) else 1
    if world_size is not None and dp * ep * tp != world_size:
        mesh = f"dp({dp}) x ep({ep}) x tp({tp})" if ep > 1 else f"dp({dp}) x tp({tp})"
        raise ResolveError(
            f"the mesh {mesh} = {dp * ep * tp} does not match the world size {world_size}",
            path="mesh",
            hint=f"launch {dp * ep * tp} processes, or set mesh.dp: auto (and a tp that divides {world_size})",
        )
    return dp


def ep_size(spec: Spec, override: int | None = None) -> int:
    """The expert-parallel size: ``--ep``, else ``mesh.ep``."""
    if override is not None:
        if override < 1:
            raise ResolveError(f"--ep must be a positive integer, got {override}")
        return override
    return spec.mesh.ep
