"""The plan as the script's code: its ``parallelize_module`` calls, fix-ups and imports.

Holds the items the plan's part of ``train.py`` lays out (:class:`StyleItem` and :class:`CommentItem`
inside a :class:`PlanBlock`, one per top-level rule; a :class:`FixupBlock` per fix-up) and the
functions that make them from a :class:`~tpplan.plan.resolved.ResolvedPlan`: :func:`plan_blocks`,
:func:`fixups`, :func:`imports` (what ``train.py`` imports from torch for the plan) and
:func:`attribute` (an attribute name printed as code).
"""

from __future__ import annotations

import ast
import keyword
import re
from dataclasses import dataclass

from tpplan.core.patterns import matches
from tpplan.plan.resolved import ResolvedPlan, RuleUse
from tpplan.render.filters import Code, RenderError
from tpplan.render.printed import own_style_imports
from tpplan.spec.rules import GroupRule
from tpplan.spec.schema import Spec

WIDTH = 110  # the project's line length (pyproject [tool.ruff]); generated code is ruff-formatted at it


@dataclass(frozen=True)
class StyleItem:
    """One key of a ``parallelize_module`` plan dict: a pattern (or module name) and its style."""

    key: str
    torch_class: Code
    code: Code  # style_code(rule): the one-line form
    kwargs: tuple[Code, ...]  # its keyword arguments, for the one-per-line form
    one_line: bool  # whether `key: code,` fits the line at the dict's indent
    notes: tuple[str, ...] = ()  # comment lines above the key
    kind: str = "style"


@dataclass(frozen=True)
class CommentItem:
    text: str
    kind: str = "comment"


@dataclass(frozen=True)
class PlanBlock:
    """One top-level rule of the spec: comment lines and (when it shards anything) one
    ``parallelize_module`` call."""

    label: str
    comments: tuple[str, ...]
    items: tuple[StyleItem | CommentItem, ...]

    @property
    def has_styles(self) -> bool:
        return any(item.kind == "style" for item in self.items)


@dataclass(frozen=True)
class FixupBlock:
    label: str
    summary: str
    lines: tuple[Code, ...]  # the statements run on each `module`
    modules: tuple[str, ...]  # where the attribute exists: rendered one by one when some lack it
    skipped: str | None  # why the others are not
    pattern: str | None = None  # every module the pattern matches has it: the script loops over the pattern


def _style_item(key: str, rule, indent: int, notes: tuple[str, ...]) -> StyleItem:
    code = rule.code()
    tree = ast.parse(code, mode="eval").body
    if not isinstance(tree, ast.Call) or tree.args:
        raise RenderError(f"internal: unexpected style code {code!r}")
    kwargs = tuple(Code(f"{kw.arg}={ast.get_source_segment(code, kw.value)}") for kw in tree.keywords)
    one_line = indent + len(repr(key)) + 2 + len(code) + 1 <= WIDTH
    return StyleItem(
        key=key,
        torch_class=Code(rule.TORCH_STYLE),
        code=Code(code),
        kwargs=kwargs,
        one_line=one_line or not kwargs,
        notes=notes,
    )


def plan_blocks(plan: ResolvedPlan, module_names: list[str]) -> tuple[PlanBlock, ...]:
    groups: dict[tuple, list[RuleUse]] = {}
    for use in plan.rules:
        groups.setdefault(tuple(use.path[:2]), []).append(use)
    blocks = []
    for (section, index), uses in groups.items():
        label = f"{section}[{index}]"
        top = uses[0]
        comments = [f"{label} {top.pattern}" + (f": {top.rule.note}" if top.rule.note else "")]
        items: list[StyleItem | CommentItem] = []
        for use in uses:
            is_top = use is top
            rule = use.rule
            if isinstance(rule, GroupRule):
                if not is_top and rule.note:
                    items.append(CommentItem(f"{use.pattern}: {rule.note}"))
                continue
            full = tuple(n for n in module_names if matches(use.pattern, n))
            notes = () if is_top or not rule.note else (rule.note,)
            unused = None
            if not rule.applies:
                unused = "left replicated (style: replicate)"
            elif not use.matches:
                unused = "every module it matches is given a style by a later rule (plan_overrides)"
            if unused is not None:
                if is_top:
                    comments[0] = f"{label} {top.pattern}: {unused}" + (f"; {rule.note}" if rule.note else "")
                else:
                    items.append(
                        CommentItem(f"{use.pattern}: {unused}" + (f"; {rule.note}" if rule.note else ""))
                    )
                continue
            if use.matches == full:
                items.append(_style_item(use.pattern, rule, 12, notes))
                continue
            lead = (
                f"{use.pattern}: {len(use.matches)} of its {len(full)} modules, named one by one "
                "(plan_overrides decide the others)"
            )
            for i, name in enumerate(use.matches):
                items.append(_style_item(name, rule, 12, (*notes, lead) if i == 0 else ()))
        blocks.append(PlanBlock(label=label, comments=tuple(comments), items=tuple(items)))
    return tuple(blocks)


def fixups(spec: Spec, plan: ResolvedPlan) -> tuple[FixupBlock, ...]:
    blocks = []
    for i, fix in enumerate(spec.fixups):
        entries = [f for f in plan.fixups if f.attr == fix.attr and matches(fix.match, f.fqn)]
        present = tuple(f.fqn for f in entries if f.present)
        absent = [f.fqn for f in entries if not f.present]
        how = "//= tp" if fix.op == "floordiv_tp" else f"= {fix.value!r}"
        skipped = None
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            skipped = f"skipped where the attribute does not exist: {len(absent)} of {len(entries)} modules ({shown})"
        blocks.append(
            FixupBlock(
                label=f"fixups[{i}]",
                summary=f"{fix.match}.{fix.attr} {how}",
                lines=_fixup_lines(fix, f"fixups[{i}].attr"),
                modules=present,
                skipped=skipped,
                pattern=fix.match if present and not absent else None,
            )
        )
    return tuple(blocks)


def _fixup_lines(fix, what: str) -> tuple[Code, ...]:
    """``module.a.b //= tp_mesh.size()``, after giving the module its own copy of ``module.a`` (a
    config is shared by every layer: changed in place it would shrink once per layer)."""
    parts = [str(attribute(part, what)) for part in fix.attr.split(".")]
    lines = []
    for depth in range(1, len(parts)):
        owner = ".".join(["module", *parts[:depth]])
        lines.append(Code(f"{owner} = copy.copy({owner})  # shared with other modules: this module's own copy"))
    target = ".".join(["module", *parts])
    lines.append(Code(f"{target} //= tp_mesh.size()" if fix.op == "floordiv_tp" else f"{target} = {fix.value!r}"))
    return tuple(lines)


TP_IMPORTS_FROM, TENSOR_IMPORTS_FROM = "torch.distributed.tensor.parallel", "torch.distributed.tensor"


def imports(plan: ResolvedPlan) -> tuple[tuple[Code, ...], tuple[Code, ...], tuple[Code, ...]]:
    """The names train.py imports from torch.distributed.tensor.parallel and torch.distributed.tensor,
    and any further ``from X import a, b`` lines that tpplan's own styles need."""
    styles, placements = set(), set()
    for entry in plan.sharded_entries():
        code = entry.rule.code()
        if not entry.rule.own_style and not entry.rule.user_style:
            styles.add(entry.rule.TORCH_STYLE)
        placements.update(re.findall(r"\b(Replicate|Shard)\(", code))
    # (DTensor and loss_parallel: the training step imports them where it uses them)
    names: dict[str, set[str]] = {TP_IMPORTS_FROM: styles | {"parallelize_module"}, TENSOR_IMPORTS_FROM: set(placements)}
    for module, needed in own_style_imports(plan).items():
        names.setdefault(module, set()).update(needed)
    tp_names = sorted(names.pop(TP_IMPORTS_FROM), key=lambda n: (n[0].islower(), n))
    tensor_names = sorted(names.pop(TENSOR_IMPORTS_FROM), key=lambda n: (n[0].islower(), n.lstrip("_")))
    extra = tuple(Code(f"from {module} import {', '.join(sorted(found))}") for module, found in sorted(names.items()))
    return tuple(Code(n) for n in tp_names), tuple(Code(n) for n in tensor_names), extra


def attribute(name: str, what: str) -> Code:
    """An attribute name printed as code (``module.weight``): a plain identifier only."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise RenderError(f"{what}: {name!r} is not a Python attribute name")
    return Code(name)
