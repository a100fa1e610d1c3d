"""Human-readable tables (rich) for resolved plans and check results; ``--json`` bypasses these."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table
from rich.text import Text

from .plan import ResolvedPlan
from .spec import GroupRule
from .styles import style_summary


def console(stderr: bool = False) -> Console:
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=160)


def plan_table(plan: ResolvedPlan, *, modules: bool = False) -> Table:
    """One row per rule (pattern, style, modules matched); with ``modules`` one row per module."""
    title = f"{plan.spec_name}: {plan.model_class} at tp={plan.tp}"
    if modules:
        table = Table(title=title, title_justify="left")
        table.add_column("module")
        table.add_column("type")
        table.add_column("torch style")
        for entry in plan.entries:
            table.add_row(Text(entry.fqn), Text(entry.module_type), Text(entry.code() or "(replicated: left as is)"))
        return table
    table = Table(title=title, title_justify="left")
    table.add_column("rule")
    table.add_column("pattern")
    table.add_column("style")
    table.add_column("modules", justify="right")
    for use in plan.rules:
        style = "(group)" if isinstance(use.rule, GroupRule) else style_summary(use.rule)
        table.add_row(Text(use.label), Text(use.pattern), Text(style), str(len(use.matches)))
    return table


def print_plan(plan: ResolvedPlan, *, modules: bool = False, out: Console | None = None) -> None:
    out = out or console()
    out.print(plan_table(plan, modules=modules))
    extra = []
    if plan.loss_parallel:
        extra.append(f"loss parallel: cross-entropy on vocab-sharded logits of {plan.logits_module}")
    for tie in plan.tied:
        extra.append(f"tied weights: {tie.other}.{tie.attr} is {tie.owner}.{tie.attr} (kept tied after sharding)")
    applied = sum(1 for f in plan.fixups if f.present)
    if plan.fixups:
        extra.append(f"fix-ups: {applied} applied, {len(plan.fixups) - applied} skipped (attribute missing)")
    for line in extra:
        out.print(line, markup=False)
    for warning in plan.warnings:
        out.print(Text("warning: ", style="yellow") + Text(warning))


def print_check(report, out: Console | None = None) -> None:
    out = out or console()
    verdict = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    out.print(f"check {verdict}: tp={report.tp} dp={report.dp} on {report.world_size} CPU gloo ranks, "
              f"tolerance {report.tolerance:g} ({report.seconds:.1f} s)")
    if report.twin:
        out.print(Text("twin: " + ", ".join(f"{k}={v}" for k, v in report.twin.items())))
    if report.max_abs_logit_diff is not None:
        table = Table(show_header=True)
        table.add_column("quantity")
        table.add_column("unsharded", justify="right")
        table.add_column("sharded", justify="right")
        table.add_column("max |diff|", justify="right")
        table.add_row("logits", "", "", f"{report.max_abs_logit_diff:.3g}")
        table.add_row("loss" + (" (loss parallel)" if report.loss_parallel else ""), f"{report.loss_unsharded:.6f}",
                      f"{report.loss_sharded:.6f}", f"{abs(report.loss_sharded - report.loss_unsharded):.3g}")
        table.add_row(f"gradients ({report.parameters_compared} params)", "", "",
                      Text(f"{report.max_abs_grad_diff:.3g} ({report.worst_grad})"))
        table.add_row("grad norm", f"{report.grad_norm_unsharded:.6f}", f"{report.grad_norm_sharded:.6f}",
                      f"{abs(report.grad_norm_sharded - report.grad_norm_unsharded):.3g}")
        table.add_row("weights after 1 AdamW step", "", "",
                      Text(f"{report.max_abs_param_diff_after_step:.3g} ({report.worst_param})"))
        out.print(table)
    if report.failure:
        out.print(Text("error: ", style="red") + Text(str(report.failure.get("message"))))
        if report.failure.get("hint"):
            out.print(Text(f"  hint: {report.failure['hint']}"))
        if report.failure.get("stderr_tail"):
            out.print(Text(report.failure["stderr_tail"]))
    for warning in report.warnings:
        out.print(Text("warning: ", style="yellow") + Text(warning))
