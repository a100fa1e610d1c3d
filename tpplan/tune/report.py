"""The tables ``tpplan tune`` prints: the ranked candidates, and why the others were rejected."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from tpplan.plan.report import console

from .search import GIB, Candidate, TuneResult


def _settings(c: Candidate) -> str:
    s = c.settings
    chosen = (("float8", s.float8), ("compile", s.compile), ("async TP", s.async_tp))
    parts = [name for name, on in chosen if on]
    return ", ".join(parts) or "eager"


def ranked_table(result: TuneResult, top: int) -> Table:
    """The ``top`` fastest candidates that fit."""
    ranked = result.ranked
    title = (f"{result.spec.name} on {result.gpus} x {result.device.name} ({result.gpus_per_node} per node), "
             f"{result.precision}: {len(ranked)} of {len(result.candidates)} candidates fit; global batch "
             f"{result.global_batch:,} x {result.seq_length:,} tokens")
    table = Table(title=title, title_justify="left")
    for name, justify in (("#", "right"), ("mesh", "left"), ("checkpointing", "left"),
                          ("micro x accum", "right"),
                          ("settings", "left"), ("tok/s/GPU", "right"), ("MFU", "right"), ("step", "right"),
                          ("exposed comm", "right"), ("memory/GPU", "right"), ("headroom", "right")):
        table.add_column(name, justify=justify)
    for rank, c in enumerate(ranked[:top], 1):
        p, m = c.prediction, c.memory
        headroom = result.device.memory_bytes - m["total_bytes"]
        table.add_row(
            str(rank), c.label(), c.activation_checkpointing, f"{c.micro_batch} x {c.accumulation}",
            _settings(c),
            f"{p.tokens_per_s_per_gpu:,.0f}", f"{100 * p.mfu:.1f}%", f"{p.step_s:.3f} s",
            f"{p.exposed_comm_s:.3f} s ({100 * p.exposed_comm_s / p.step_s:.0f}%)",
            f"{m['total_bytes'] / GIB:.1f} GiB", f"{headroom / GIB:.1f} GiB",
        )
    return table


def rejected_table(result: TuneResult) -> Table | None:
    """One row per mesh and checkpointing mode with rejected candidates: how many, and why the first
    (the smallest micro-batch) was rejected."""
    rejected = result.rejected
    if not rejected:
        return None
    groups: dict[tuple, list[Candidate]] = {}
    for c in rejected:
        groups.setdefault((c.tp, c.ep, c.dp, c.activation_checkpointing), []).append(c)
    table = Table(title=f"{len(rejected)} candidates rejected", title_justify="left")
    table.add_column("mesh")
    table.add_column("checkpointing")
    table.add_column("candidates", justify="right")
    table.add_column("why (the smallest micro-batch)")
    for members in groups.values():
        first = min(members, key=lambda c: c.micro_batch)
        why = (f"micro-batch {first.micro_batch}: " if first.micro_batch else "") + first.rejected
        table.add_row(first.label(), first.activation_checkpointing, str(len(members)), Text(why))
    return table


def print_result(result: TuneResult, *, top: int, out=None) -> None:
    out = out or console()
    out.print(ranked_table(result, top))
    table = rejected_table(result)
    if table is not None:
        out.print(table)
    for note in result.notes:
        out.print(f"not tried: {note}", markup=False)
    out.print(f"{result.shapes} distinct steps simulated in {result.seconds:.1f} s; every other candidate's "
              "memory and time is arithmetic on them", markup=False)
