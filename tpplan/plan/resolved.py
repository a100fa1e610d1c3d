"""The resolved plan: a spec's rules matched against a concrete model.

Frozen dataclasses that need no process group: resolve builds them, apply/render/simulate read
them, and ``to_dict``/``table`` print them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpplan.spec.rule_base import RuleBase
from tpplan.spec.rules import GroupRule


@dataclass(frozen=True)
class RuleUse:
    """One rule of the spec (nested rules flattened): its full pattern and what it matched."""

    path: tuple  # where the rule is in the spec: ("plan", 1, "plan", 3)
    pattern: str  # absolute pattern: model.layers.*.self_attn.q_proj
    rule: RuleBase
    matches: tuple[str, ...]  # module names this rule decided (after overrides)
    override: bool = False

    @property
    def label(self) -> str:
        return "".join(f"[{p}]" if isinstance(p, int) else (f".{p}" if i else p) for i, p in enumerate(self.path))


@dataclass(frozen=True)
class PlanEntry:
    """One module and the style it gets."""

    fqn: str
    rule: RuleBase
    rule_index: int  # index into ResolvedPlan.rules
    module_type: str

    @property
    def style(self) -> str:
        return self.rule.style

    def code(self) -> str | None:
        return self.rule.code() if self.rule.applies else None


@dataclass(frozen=True)
class FixupEntry:
    fqn: str
    attr: str
    op: str
    value: Any
    present: bool
    before: Any = None
    after: Any = None


def tied_names(model) -> list[list[str]]:
    """The names of each parameter several modules hold (tied weights), found by identity:
    ``[[name, name], ...]``, in the model's order."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


@dataclass(frozen=True)
class TiedWeights:
    """One parameter held by several modules (found by identity: ``named_parameters(
    remove_duplicate=False)``), every holder sharded the same way.  After sharding, each of
    ``others`` is given the ``owner``'s parameter again."""

    owner: str  # parameter name that keeps it, e.g. model.embed_tokens.weight
    others: tuple[str, ...]  # the other names of it, e.g. ("lm_head.weight",)
    layout: str = "plain"  # how every holder keeps it after sharding: plain, replicate or shard(d)

    @property
    def names(self) -> tuple[str, ...]:
        return (self.owner, *self.others)


@dataclass(frozen=True)
class ResolvedPlan:
    spec_name: str
    model_class: str
    model_type: str
    tp: int
    entries: tuple[PlanEntry, ...]
    rules: tuple[RuleUse, ...]
    fixups: tuple[FixupEntry, ...] = ()
    tied: tuple[TiedWeights, ...] = ()
    loss_parallel: bool = False
    logits_module: str | None = None
    blocks: tuple[str, ...] = ()  # module-name patterns of the transformer blocks: one FSDP2 unit each
    warnings: tuple[str, ...] = ()

    def styles_by_module(self) -> dict[str, RuleBase]:
        return {e.fqn: e.rule for e in self.entries}

    def sharded_entries(self) -> tuple[PlanEntry, ...]:
        return tuple(e for e in self.entries if e.rule.applies)

    def to_dict(self) -> dict:
        return {
            "spec": self.spec_name,
            "model_class": self.model_class,
            "model_type": self.model_type,
            "tp": self.tp,
            "loss_parallel": self.loss_parallel,
            "rules": [
                {
                    "rule": r.label,
                    "pattern": r.pattern,
                    "style": "(group)" if isinstance(r.rule, GroupRule) else r.rule.summary(),
                    "modules": len(r.matches),
                }
                for r in self.rules
            ],
            "entries": [
                {"module": e.fqn, "type": e.module_type, "style": e.style, "code": e.code()} for e in self.entries
            ],
            "fixups": [
                {"module": f.fqn, "attr": f.attr, "op": f.op, "applied": f.present, "before": f.before, "after": f.after}
                for f in self.fixups
            ],
            "tied": [{"owner": t.owner, "others": list(t.others), "layout": t.layout} for t in self.tied],
            "blocks": list(self.blocks),
            "warnings": list(self.warnings),
        }
