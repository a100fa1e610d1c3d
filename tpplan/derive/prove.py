"""Proving: check on the derived spec, and a plan check disproves written again with the group at fault
one form weaker (a new constraint), at most ``MAX_WEAKENINGS`` times."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .children import child_of
from .common import first_line
from .forms import Constraints
from .groups import Form

if TYPE_CHECKING:
    from .analysis import Analysis
    from .assemble import PlanDraft


#: a plan check disproves is written again with the group at fault one form weaker, this often
MAX_WEAKENINGS = 2


def prove(a: Analysis, draft: PlanDraft, spec, *, check, redraft, rewrite) -> tuple[PlanDraft, Any]:
    """(the draft proven last, check's report on it): ``check(spec)``; while check disproves the plan and
    names a group, that group one form weaker -- ``redraft(constraints)`` a new draft, ``rewrite(draft)``
    its spec -- and check again, at most ``MAX_WEAKENINGS`` times."""
    report = check(spec)
    retries = 0
    while not report.ok and retries < MAX_WEAKENINGS:
        weakened = weaken(a, draft.constraints, report, tp=draft.tp)
        if weakened is None:
            break
        constraints, step = weakened
        retries += 1
        draft = redraft(constraints)
        draft.notes.append(step)
        report = check(rewrite(draft))
    return draft, report


def proof_line(report, check_tp: int, check_dp: int) -> str:
    """The spec header's line saying how check proved the plan."""
    return (f"Proven by `tpplan check` at tp={check_tp}" + (f" x dp={check_dp}" if check_dp > 1 else "")
            + f" on CPU gloo ranks: logits {report.max_abs_logit_diff:.2g}, gradients "
              f"{report.max_abs_grad_diff:.2g}, weights after a step {report.max_abs_param_diff_after_step:.2g} "
              "from the unsharded model.")


def weaken(a: Analysis, constraints: Constraints, report, *, tp: int) -> tuple[Constraints, str] | None:
    """The constraints with the group that check's failure names (its module, or the parameter whose
    gradient is worst) one form weaker (sharded/packed -> gathered -> replicated), and what was done;
    None when there is no such group.  ``constraints``: those of the draft check disproved."""
    failure = report.failure or {}
    if failure.get("reason") == "nothing_sharded":
        return None  # equal, but nothing inside the blocks is sharded: weakening a group cannot help
    culprit = failure.get("wrong_layout_module") or failure.get("failing_module") or report.worst_grad or ""
    prefix = (a.skeleton.blocks_list or "") + "."
    if not culprit.startswith(prefix):
        return None
    rel = culprit[len(prefix):].partition(".")[2]  # past the layer index
    if not rel:
        return None
    for key, m in a.merged.items():
        group = m.group
        names = [group.rowwise, *group.colwise, *m.form.grad_sum, *m.shared_keys, *m.key_modules]
        child = child_of(group.rowwise)
        if not any(rel == n or rel.startswith(n + ".") or n.startswith(rel + ".") for n in names) and rel != child:
            continue
        current = (constraints.forced(key) or (m.form.form, ""))[0]
        if current is Form.REPLICATED:
            return None
        weaker = Form.REPLICATED if current >= Form.GATHERED or group.experts else Form.GATHERED
        message = first_line(failure.get("message") or worst(report))[:200]
        why = f"check at tp={report.tp} disproved it {current.label}: {message}"
        return (Constraints({**constraints.weakened, key: (weaker, why)}),
                f"{a.skeleton.pattern}.{group.rowwise}: {current.label} -> {weaker.label} "
                f"(check at tp={report.tp}: {message})")
    return None


def worst(report) -> str:
    return (f"logits {report.max_abs_logit_diff}, loss {report.loss_sharded} vs {report.loss_unsharded}, "
            f"gradients {report.max_abs_grad_diff} ({report.worst_grad})")
