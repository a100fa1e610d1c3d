"""Resolve's checks on the plan as a whole, and the two things it resolves beside the rules.

Which module computes the logits and whether ``loss_parallel`` agrees with its layout; a sequence
length sequence parallel cannot split; a parameter held by several modules (tied, found by
identity) that they would shard differently, or that falls in different FSDP units; the fix-ups
(``fixups``: attributes set or divided by tp) and the blocks (``model.blocks``, the FSDP units);
``model.positions`` that the model's forward does not take; and the lints -- plans that load and
divide but are known to break at runtime, head counts a model of one's own keeps in attributes.
``PlanChecks`` is a part of resolve's resolver: it reports through ``ResolverBase.fail``.
"""

from __future__ import annotations

from typing import Any

from tpplan.core.layouts import Layout
from tpplan.core.patterns import matches
from tpplan.plan.module_kinds import module_kind, splits_output_features
from tpplan.plan.resolved import FixupEntry, PlanEntry, TiedWeights, tied_names
from tpplan.plan.resolver_base import ResolverBase
from tpplan.spec.model_spec import HEAD_ATTR_DEFAULTS


class PlanChecks(ResolverBase):
    """The checks on the whole plan, the fix-ups and the blocks (see the module docstring)."""

    # -- whole-plan checks ---------------------------------------------------------------

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
        tied = []
        for names in tied_names(self.model):
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
                if child.rpartition(".")[0] == name and splits_output_features(entry, self.target(child))
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


def _block_pattern(name: str) -> str:
    """``model.layers.3`` -> ``model.layers.*``: one pattern for the blocks of one container."""
    head, _, last = name.rpartition(".")
    return f"{head}.*" if head and last.isdigit() else name


def _get_path(obj, path: str) -> tuple[bool, Any]:
    """(present, value) of a dotted attribute path such as ``config.num_attention_heads``."""
    for part in path.split("."):
        if not hasattr(obj, part):
            return False, None
        obj = getattr(obj, part)
    return True, obj
