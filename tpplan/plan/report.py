"""Human-readable tables (rich) for resolved plans and check results; ``--json`` bypasses these."""

from __future__ import annotations

import contextlib
import os
import sys
import time

from rich.console import Console
from rich.table import Table
from rich.text import Text

from tpplan.plan.resolved import ResolvedPlan
from tpplan.spec.rules import GroupRule

WIDE = 160  # columns of a table written to a pipe or a file: each row one line, whatever the terminal
NARROW = 100  # below this width, tables leave out the columns that repeat another or matter least


def console(stderr: bool = False) -> Console:
    """As wide as the terminal (rich measures it; $COLUMNS overrides); WIDE into a pipe or a file."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() or os.environ.get("COLUMNS", "").isdigit() else WIDE
    return Console(stderr=stderr, highlight=False, soft_wrap=False, width=width)


def plan_table(plan: ResolvedPlan, *, modules: bool = False, width: int = WIDE) -> Table:
    """One row per rule (pattern, style, modules matched); with ``modules`` one row per module.  Under
    NARROW columns the rule's label goes (its pattern names it) and the module's type."""
    title = f"{plan.spec_name}: {plan.model_class} at tp={plan.tp}"
    narrow = width < NARROW
    table = Table(title=title, title_justify="left")
    if modules:
        table.add_column("module", overflow="fold")
        if not narrow:
            table.add_column("type")
        table.add_column("torch style", overflow="fold")
        for entry in plan.entries:
            cells = [Text(entry.fqn), Text(entry.module_type), Text(entry.code() or "(replicated: left as is)")]
            table.add_row(*(cells[::2] if narrow else cells))
        return table
    if not narrow:
        table.add_column("rule")
    table.add_column("pattern", overflow="fold")
    table.add_column("style", overflow="fold")
    table.add_column("modules", justify="right", no_wrap=True)
    for use in plan.rules:
        style = "(group)" if isinstance(use.rule, GroupRule) else use.rule.summary()
        cells = [Text(use.label), Text(use.pattern), Text(style), str(len(use.matches))]
        table.add_row(*(cells[1:] if narrow else cells))
    return table


def print_plan(plan: ResolvedPlan, *, modules: bool = False, out: Console | None = None) -> None:
    out = out or console()
    out.print(plan_table(plan, modules=modules, width=out.width))
    extra = []
    if plan.loss_parallel:
        extra.append(f"loss parallel: cross-entropy on vocab-sharded logits of {plan.logits_module}")
    for tie in plan.tied:
        extra.append(f"tied weights: {' is '.join(tie.names)} ({tie.layout}; kept one parameter after sharding)")
    applied = sum(1 for f in plan.fixups if f.present)
    if plan.fixups:
        extra.append(f"fix-ups: {applied} applied, {len(plan.fixups) - applied} skipped (attribute missing)")
    for line in extra:
        out.print(line, markup=False)
    for warning in plan.warnings:
        out.print(Text("warning: ", style="yellow") + Text(warning))


@contextlib.contextmanager
def check_phases(out: Console | None = None):
    """On a terminal: a status line naming the phase ``check`` is in, since when (to stderr, gone when
    done); into a pipe or a file nothing.  Yields what ``run_check(on_phase=...)`` takes, or None."""
    out = out or console(stderr=True)
    if not out.is_terminal:
        yield None
        return
    started = time.monotonic()
    with out.status("check: starting") as status:
        def show(phase: str) -> None:
            status.update(Text(f"check: {phase} (at {time.monotonic() - started:.0f} s)"))

        yield show


def print_check(report, out: Console | None = None) -> None:
    out = out or console()
    verdict = "[green]OK[/green]" if report.ok else "[red]FAILED[/red]"
    ep = f" ep={report.ep}" if report.ep > 1 else ""
    opt = report.optimizer
    planned = opt.get("steps", report.steps)
    done = f"{report.steps} of {planned}" if report.steps < planned else f"{planned}"
    steps = f"{done} AdamW steps (lr {opt['lr']:g}, eps {opt['eps']:g})" if opt else "no step compared"
    out.print(f"check {verdict}: tp={report.tp} dp={report.dp}{ep} on {report.world_size} CPU gloo ranks, "
              f"{steps}, each tensor within {report.tolerance:g} + {report.relative_tolerance:g} x its "
              f"largest unsharded value ({report.seconds:.1f} s)")
    if report.step:
        step = report.step
        accum = step["grad_accum_steps"]
        trains_in = step.get("trains_in")
        out.print(Text(f"step: {step['precision']}, activation checkpointing {step['activation_checkpointing']}, "
                       f"{accum} micro-batch{'es' if accum > 1 else ''} per step"
                       + (", torch.compile per block" if step["compile"] else "")
                       + " (the unsharded model: one batch, eager)"
                       + (f"; the spec trains in {trains_in}, the plan is proven in fp32 (16-bit rounding "
                          "between two correct plans is as large as some plan errors)"
                          if trains_in not in (None, "fp32") else "")))
    if report.twin:
        out.print(Text("twin: " + ", ".join(f"{k}={v}" for k, v in report.twin.items())))
    rules = report.sharded_rules
    if rules:
        modules = sum(r["modules"] for r in rules)
        out.print(Text(f"sharded over tp: {modules} module{'s' if modules > 1 else ''} by {len(rules)} rule"
                       f"{'s' if len(rules) > 1 else ''}: "
                       + ", ".join(f"{r['pattern']} ({r['style']})" for r in rules)))
    if report.routing:
        idle = report.routing.get("experts_without_tokens") or {}
        out.print(Text(f"routing: {report.routing['steered']} ({report.routing['routers']} routers); "
                       + (f"experts without a token in the first step: {_idle_text(idle)}" if idle
                          else "every expert got a token")))
    if report.max_abs_logit_diff is not None:
        out.print(_check_table(report))
    if report.sharded:
        out.print(_sharded_table(report))
    if report.parameters_without_gradient:
        names = report.parameters_without_gradient
        out.print(Text(f"{len(names)} parameter{'s' if len(names) > 1 else ''} without a gradient on either side "
                       f"(unused by this step; compared as equal): {', '.join(names[:5])}"
                       + (f" and {len(names) - 5} more" if len(names) > 5 else "")))
    rounding = {name for names in report.within_rounding_only.values() for name in names}
    if rounding:
        out.print(Text(f"within tolerance only by the unsharded model's own rounding (zero in exact "
                       f"arithmetic, compared within 10x its distance from float64): "
                       f"{', '.join(sorted(rounding)[:5])}"
                       + (f" and {len(rounding) - 5} more" if len(rounding) > 5 else "")))
    if report.replicated and report.ok:
        out.print(Text("note: ", style="yellow") + Text(
            f"the plan leaves most of the {' and the '.join(report.replicated)} parameters whole on every "
            "rank"))
    if report.failure:
        out.print(Text("error: ", style="red") + Text(str(report.failure.get("message"))))
        if report.failure.get("hint"):
            out.print(Text(f"  hint: {report.failure['hint']}"))
        if report.failure.get("stderr_tail"):
            out.print(Text(report.failure["stderr_tail"]))
    for warning in report.warnings:
        out.print(Text("warning: ", style="yellow") + Text(warning))


def _idle_text(idle: dict) -> str:
    experts = sorted({i for rows in idle.values() for i in rows})
    banks = f"{len(idle)} bank{'s' if len(idle) > 1 else ''}"
    return f"expert{'s' if len(experts) > 1 else ''} {', '.join(map(str, experts))} (in {banks})"


def _check_table(report) -> Table:
    """One row per compared quantity: values, the largest difference, the tensor that used most of its
    tolerance (its relative error and largest unsharded magnitude) and how much of the tolerance it used."""
    table = Table(show_header=True)
    worst_column = "worst tensor: relative error of its max |unsharded|"
    for name, justify in (("quantity", "left"), ("unsharded", "right"), ("sharded", "right"),
                          ("max |diff|", "right"), (worst_column, "left"), ("of tolerance", "right")):
        table.add_column(name, justify=justify)
    used = report.tolerance_used

    def worst(name, kind):
        entry = (report.parameters.get(name) or {}).get(kind) if name else None
        if not entry:
            return Text(name or "")
        rel, ref = entry[:2]
        return Text(f"{name}: {'-' if rel is None else f'{rel:.2g}'} of {ref:.3g}")

    def share(quantity):
        if quantity not in used:
            return ""
        return f"{100 * used[quantity]:.2g}%" if used[quantity] < 10 else f"{used[quantity]:.3g}x"

    def diff(value):
        return "" if value is None else f"{value:.3g}"

    table.add_row("logits", "", "", diff(report.max_abs_logit_diff), "", share("logits"))
    loss = "loss" + (" (loss parallel)" if report.loss_parallel else "")
    table.add_row(loss, f"{report.loss_unsharded:.6f}", f"{report.loss_sharded:.6f}",
                  f"{abs(report.loss_sharded - report.loss_unsharded):.3g}", "", share("loss"))
    table.add_row(f"gradients ({report.parameters_compared or len(report.parameters)} params)", "", "",
                  diff(report.max_abs_grad_diff), worst(report.worst_grad, "gradient"), share("gradients"))
    if report.grad_norm_unsharded is not None:
        unsharded, sharded = report.grad_norm_unsharded, report.grad_norm_sharded
        table.add_row("grad norm (first step)", f"{unsharded:.6f}", f"{sharded:.6f}",
                      f"{abs(sharded - unsharded):.3g}", "", share("grad_norm"))
        table.add_row(f"weights after each of {report.steps} steps", "", "",
                      diff(report.max_abs_param_diff_after_step), worst(report.worst_param, "update"),
                      share("weights_after_step"))
        table.add_row("AdamW state (exp_avg, sqrt exp_avg_sq)", "", "", diff(report.max_abs_state_diff), "",
                      share("optimizer_state"))
    return table


def _sharded_table(report) -> Table:
    """What the plan shards over tp (and ep), per kind of parameter, in the twin."""
    table = Table(title="what the plan shards (the twin's parameters)", title_justify="left")
    for name, justify in (("kind", "left"), ("sharded / parameters", "right"),
                          ("elements unsharded", "right"), ("per rank", "right"),
                          ("per rank / unsharded", "right")):
        table.add_column(name, justify=justify)
    for kind, entry in report.sharded.items():
        style = "bold" if kind in ("blocks", "total") else ""
        label = {"blocks": "inside the blocks", "total": "all"}.get(kind, kind)
        table.add_row(Text(label, style=style), f"{entry['sharded']} / {entry['parameters']}",
                      f"{entry['numel']:,}", f"{entry['per_rank']:,}",
                      f"{entry['per_rank'] / max(1, entry['numel']):.2f}")
    return table


# ------------------------------------------------------------------------------------------
# tpplan plan: memory and communication at full scale (simulate.py)
# ------------------------------------------------------------------------------------------


def human_bytes(n: float) -> str:
    """1536 -> '1.50 KiB'; binary units, as GPU memory is quoted."""
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover


def human_count(n: float) -> str:
    """405853388800 -> '405.85B'."""
    for div, unit in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{unit}"
    return str(int(n))


def memory_table(data: dict) -> Table:
    """Per-rank memory, tensor parallel alone (dp replicas) beside TP + FSDP over dp."""
    mem = data["memory"]
    a, b = mem["without_fsdp"], mem["with_fsdp"]
    dp = data["dp"]
    device = f"{mem['device_memory_gib']:g} GiB"
    ac = mem.get("activation_checkpointing", "none")
    accum = mem.get("grad_accum_steps", 1)
    title = (f"memory per rank ({mem.get('precision', mem['dtype'])}: {mem.get('param_dtype', mem['dtype'])} weights "
             f"and AdamW state, {mem['dtype']} compute; batch {data['batch_size']} x seq {data['seq_length']}"
             + (f" x {accum} micro-batches" if accum > 1 else "")
             + (f"; activation checkpointing {ac}" if ac != "none" else "") + ")")
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column(f"tp={data['tp']} only" + (f" (dp={dp} replicas)" if dp > 1 else ""), justify="right")
    table.add_column(f"tp={data['tp']} + FSDP over dp={dp}" if dp > 1 else "with FSDP (dp=1: none)", justify="right")
    table.add_row("parameters", f"{human_count(a['parameters'])} = {human_bytes(a['parameters_bytes'])}",
                  f"{human_count(b['parameters'])} = {human_bytes(b['parameters_bytes'])}")
    experts = mem.get("experts") or {}
    if experts.get("total"):
        size = mem["bytes_per_param"]
        table.add_row(f"  of which MoE experts (of {human_count(experts['total'])})",
                      f"{human_count(experts['per_rank_without_fsdp'])} = "
                      f"{human_bytes(experts['per_rank_without_fsdp'] * size)}",
                      f"{human_count(experts['per_rank_with_fsdp'])} = {human_bytes(experts['per_rank_with_fsdp'] * size)}")
    table.add_row("gradients", human_bytes(a["gradients_bytes"]), human_bytes(b["gradients_bytes"]))
    table.add_row("AdamW state (exp_avg + exp_avg_sq)", human_bytes(a["optimizer_bytes"]), human_bytes(b["optimizer_bytes"]))
    table.add_row("activations", human_bytes(a["activations_bytes"]), human_bytes(b["activations_bytes"]))
    table.add_row("FSDP buffers (unsharded units)", human_bytes(a["fsdp_buffers_bytes"]), human_bytes(b["fsdp_buffers_bytes"]))
    if a.get("accumulated_gradients_bytes") or b.get("accumulated_gradients_bytes"):
        table.add_row("gradients kept unsharded between micro-batches", human_bytes(a["accumulated_gradients_bytes"]),
                      human_bytes(b["accumulated_gradients_bytes"]))
    table.add_row(Text("total", style="bold"), Text(human_bytes(a["total_bytes"]), style="bold"),
                  Text(human_bytes(b["total_bytes"]), style="bold"))

    def verdict(entry):
        return Text(f"fits in {device}", style="green") if entry["fits"] else Text(f"does not fit in {device}", style="red")

    table.add_row("verdict", verdict(a), verdict(b))
    return table


def _comm_rows_table(title: str, rows: list[dict], width: int = WIDE) -> Table:
    """One row per collective; under NARROW columns without the rule (mostly the module again) and the
    size (the bytes sent are what a rank pays)."""
    narrow = width < NARROW
    table = Table(title=title, title_justify="left")
    columns = [("module", "left"), ("rule", "left"), ("phase", "left"), ("mesh", "left"), ("collective", "left"),
               ("count", "right"), ("size", "right"), ("sent/rank" if narrow else "ring bytes sent/rank", "right")]
    keep = [i for i, (name, _) in enumerate(columns) if not (narrow and name in ("rule", "size"))]
    for i in keep:
        name, justify = columns[i]
        table.add_column(name, justify=justify, **({"overflow": "fold"} if i < 2 else {"no_wrap": True}))
    for r in rows:
        cells = [Text(r["module"] or ""), Text(r.get("rule") or ""), r["phase"], f"{r['mesh_dim']} ({r['group_size']})",
                 r["op"], str(r["count"]), human_bytes(r["bytes"]), human_bytes(r["ring_bytes"])]
        table.add_row(*(cells[i] for i in keep))
    return table


def communication_tables(data: dict, width: int = WIDE) -> list[Table]:
    comm = data["communication"]
    layers = data["layers"]
    note = ""
    if data.get("extrapolated"):
        note = f", simulated {data['simulated_layers']} of {layers} identical blocks"
    tables = []
    if comm["per_layer"]:
        tables.append(_comm_rows_table(
            f"collectives per block ({comm['representative_layer']}; x{layers} blocks{note})", comm["per_layer"], width))
    tables.append(_comm_rows_table("collectives outside the blocks", comm["outside_layers"], width))
    summary = Table(title="per training step (forward + loss + backward + grad clipping), rank 0", title_justify="left")
    for name, justify in (("phase", "left"), ("mesh", "left"), ("collective", "left"), ("count", "right"),
                          ("size", "right"), ("ring bytes sent/rank", "right")):
        summary.add_column(name, justify=justify)
    for r in comm["summary"]:
        summary.add_row(r["phase"], r["mesh_dim"], r["op"], str(r["count"]), human_bytes(r["bytes"]), human_bytes(r["ring_bytes"]))
    total = comm["total"]
    summary.add_row(Text("total", style="bold"), "", "", Text(str(total["count"]), style="bold"),
                    Text(human_bytes(total["bytes"]), style="bold"), Text(human_bytes(total["ring_bytes"]), style="bold"))
    tables.append(summary)
    return tables


def print_simulation(sim, *, modules: bool = False, out: Console | None = None) -> None:
    """The whole `tpplan plan` report: the resolved plan, memory per rank, collectives per step."""
    out = out or console()
    data = sim.to_dict()
    print_plan(sim.plan, modules=modules, out=out)
    out.print()
    out.print(Text(f"{data['spec']}: {data['model']} ({data['model_class']}), tp={data['tp']} x dp={data['dp']} = "
                   f"{data['world_size']} ranks, simulated on a fake process group in {data['seconds']:.1f} s"))
    out.print(memory_table(data))
    acts = data["memory"]["activations"]
    kinds = {k["kind"]: k["layers"] for k in data["communication"].get("layer_kinds", [])}
    per_block = " + ".join(f"{human_bytes(acts['per_layer_kind_bytes'][kind])} per {kind} block x {count}"
                           for kind, count in kinds.items()) or f"{human_bytes(acts['per_layer_bytes'])} per block"
    formula = (f"formula estimate {human_bytes(acts['formula_bytes'])} (Korthikanti et al. 2022, flash attention)"
               if acts.get("formula_bytes") is not None else "no formula for selective checkpointing")
    out.print(Text(
        f"activations measured: {per_block} + {human_bytes(acts['outside_layers_bytes'])} outside the blocks "
        f"(of which {human_bytes(acts['logits_bytes'])} logits): what one micro-batch's forward leaves alive for "
        f"backward, weights excluded; {formula}"))
    for note in data.get("warnings", []):
        if note.startswith(("train.", "mesh.")):
            out.print(Text(f"note: {note}"))
    out.print()
    for table in communication_tables(data, out.width):
        out.print(table)
    comm = data["communication"]
    total = comm["total"]
    line = (f"bytes sent per rank per step: {human_bytes(total['ring_bytes'])} "
            f"(tp {human_bytes(total['tp_ring_bytes'])}, dp/FSDP {human_bytes(total['dp_ring_bytes'])}"
            + (f", ep {human_bytes(total['ep_ring_bytes'])}" if total.get("ep_ring_bytes") else "")
            + (f", of which all-to-all {human_bytes(total['all_to_all_ring_bytes'])}"
               if total.get("all_to_all_ring_bytes") else "") + "; "
            "ring algorithm: all-gather/reduce-scatter (n-1)/n x size, all-reduce 2(n-1)/n)")
    out.print(Text(line))
    f8 = comm.get("float8")
    if f8 and f8["block_all_gather_ring_bytes"]:
        lead = "train.float8 is on: FSDP sends" if f8["enabled"] else "with train.float8, FSDP would send"
        out.print(Text(
            f"{lead} the blocks' Linear weights ({100 * f8['eligible_fraction']:.0f}% of their bytes) in float8: "
            f"{human_bytes(f8['saved_ring_bytes'])} less per step than the "
            f"{human_bytes(f8['block_all_gather_ring_bytes'])} of the blocks' all-gathers counted above"))
    if comm["megatron_sp_floor_ring_bytes"]:
        out.print(Text(
            f"Megatron-SP expectation: {human_bytes(comm['megatron_sp_floor_ring_bytes'])} over tp "
            f"(8 hidden-size collectives per block, forward + backward); this plan sends "
            f"{comm['ratio_to_floor']:.2f}x that over tp"))


def comparison_table(rows: list[dict]) -> Table:
    """Several plans side by side: bytes per step, per-rank memory, fits (rows from simulate.compare)."""
    table = Table(title="plans compared (per rank, one training step)", title_justify="left")
    table.add_column("")
    for r in rows:
        table.add_column(Text(r["spec"]), justify="right")

    def row(label, fn):
        table.add_row(label, *[fn(r) for r in rows])

    row("model", lambda r: Text(r["model"]))
    row("tp x dp", lambda r: f"{r['tp']} x {r['dp']}")
    row("batch x seq", lambda r: f"{r['batch_size']} x {r['seq_length']}")
    row("loss parallel / SP", lambda r: f"{'yes' if r['loss_parallel'] else 'no'} / {'yes' if r['sequence_parallel'] else 'no'}")
    row("parameters per rank", lambda r: human_count(r["parameters_per_rank"]))
    row("memory, tp only", lambda r: _fit_text(r["memory_without_fsdp_bytes"], r["fits_without_fsdp"]))
    row("memory, tp + FSDP", lambda r: _fit_text(r["memory_with_fsdp_bytes"], r["fits_with_fsdp"]))
    row("tp bytes/step", lambda r: human_bytes(r["tp_ring_bytes"]))
    row("dp bytes/step", lambda r: human_bytes(r["dp_ring_bytes"]))
    row("total bytes/step", lambda r: Text(human_bytes(r["ring_bytes"]), style="bold"))
    row("vs first", lambda r: f"{r['ratio_to_first']:.2f}x" if r["ratio_to_first"] is not None else "-")
    row("tp vs Megatron-SP floor", lambda r: f"{r['ratio_to_floor']:.2f}x" if r["ratio_to_floor"] else "-")
    return table


def _fit_text(nbytes: int, fits: bool) -> Text:
    return Text(human_bytes(nbytes) + (" fits" if fits else " too big"), style="green" if fits else "red")
