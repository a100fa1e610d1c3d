"""The tables ``tpplan tune`` prints: the ranked candidates, and why the others were rejected."""

from __future__ import annotations

from collections import Counter

from rich.table import Table
from rich.text import Text

from ..report import console
from .search import GIB, Candidate, TuneResult


def _settings(c: Candidate, precision: str) -> str:
    s = c.settings
    parts = [f"{precision} + float8" if s.float8 else precision]
    if s.compile:
        parts.append("compile")
    if s.async_tp:
        parts.append("async TP")
    return " + ".join(parts)


def ranked_table(result: TuneResult, top: int) -> Table:
    """The ``top`` fastest candidates that fit."""
    ranked = result.ranked
    title = (f"{result.spec.name} on {result.gpus} x {result.device.name} ({result.gpus_per_node} per node): "
             f"{len(ranked)} of {len(result.candidates)} candidates fit; global batch {result.global_batch:,} x "
             f"{result.seq_length:,} tokens")
    table = Table(title=title, title_justify="left")
    for name, justify in (("#", "right"), ("mesh", "left"), ("checkpointing", "left"), ("micro x accum", "right"),
                          ("settings", "left"), ("tok/s/GPU", "right"), ("MFU", "right"), ("step", "right"),
                          ("exposed comm", "right"), ("memory/GPU", "right"), ("headroom", "right")):
        table.add_column(name, justify=justify)
    for rank, c in enumerate(ranked[:top], 1):
        p, m = c.prediction, c.memory
        headroom = result.device.memory_bytes - m["total_bytes"]
        table.add_row(
            str(rank), c.label(), c.activation_checkpointing, f"{c.micro_batch} x {c.accumulation}", _settings(c, result.precision),
            f"{p.tokens_per_s_per_gpu:,.0f}", f"{100 * p.mfu:.1f}%", f"{p.step_s:.3f} s",
            f"{p.exposed_comm_s:.3f} s ({100 * p.exposed_comm_s / p.step_s:.0f}%)",
            f"{m['total_bytes'] / GIB:.1f} GiB", f"{headroom / GIB:.1f} GiB",
        )
    return table


def rejected_table(result: TuneResult) -> Table | None:
    """Each reason a candidate was rejected, how many it rejected, and an example."""
    rejected = result.rejected
    if not rejected:
        return None
    reasons = Counter(_reason_kind(c.rejected) for c in rejected)
    table = Table(title=f"{len(rejected)} candidates rejected", title_justify="left")
    table.add_column("candidates", justify="right")
    table.add_column("why (an example)")
    for kind, count in reasons.most_common():
        example = next(c for c in rejected if _reason_kind(c.rejected) == kind)
        table.add_row(str(count), Text(f"{example.label()} {example.activation_checkpointing}, micro-batch "
                                       f"{example.micro_batch}: {example.rejected}"))
    return table


def _reason_kind(reason: str) -> str:
    """Rejections grouped by their wording before the numbers."""
    return reason.split(" GiB")[0].rstrip("0123456789. ") if "GiB" in reason else reason


def print_result(result: TuneResult, *, top: int, out=None) -> None:
    out = out or console()
    out.print(ranked_table(result, top))
    table = rejected_table(result)
    if table is not None:
        out.print(table)
    for note in result.notes:
        out.print(f"not tried: {note}", markup=False)
    out.print(f"{result.shapes} distinct steps simulated in {result.seconds:.1f} s; every other candidate's memory "
              "and time is arithmetic on them", markup=False)
