"""Resolve: a spec's rules x a real model's ``named_modules()`` -> a ResolvedPlan.

Every check that can be made before any process group exists is run here, and all problems found
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

Here: the resolver (``_Resolver``: rules walked onto the modules, styles of one's own loaded, sizes
bound, every check run) and ``resolve``.  Its parts: the state, located errors and pattern matching
(``resolver_base``), the checks on each module (``module_checks``) and on the whole plan
(``plan_checks``), module kinds (``module_kinds``); the mesh's sizes are in ``mesh_sizes``.
"""

from __future__ import annotations

from tpplan.core.errors import ResolveError, SpecErrors
from tpplan.plan.module_checks import ModuleChecks
from tpplan.plan.plan_checks import PlanChecks
from tpplan.plan.resolved import PlanEntry, ResolvedPlan, RuleUse
from tpplan.plan.resolver_base import PathKey
from tpplan.spec.rule_base import RuleBase
from tpplan.spec.rules import GroupRule
from tpplan.spec.schema import Spec


class _Resolver(ModuleChecks, PlanChecks):
    """Rules onto modules: every rule's pattern matched, each module given one style, the checks of
    ``ModuleChecks`` and ``PlanChecks`` run over the result (``run``)."""

    # -- rules onto modules ------------------------------------------------------------

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

    def load_own_styles(self) -> None:
        """Import each rule's style of one's own (``own_styles.load_style``: the same import as
        model.factory); one that does not import, is no ParallelStyle or whose args do not bind is an
        error at the rule.  A style whose rule does not say the module kinds it takes is trusted, and
        the plan says so."""
        import re

        from tpplan.plan.own_styles import load_style
        from tpplan.spec.yaml_reader import format_path

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


def _same_style(a: RuleBase, b: RuleBase) -> bool:
    return type(a) is type(b) and a.style_kwargs() == b.style_kwargs()


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
