"""Bytes each rank sends per training step under four tensor-parallel plans of Llama-3.1-8B.

Measured by ``tpplan.simulate`` (fake process group, fake tensors, every collective recorded),
not by formula; ring bytes: all-gather / reduce-scatter (n-1)/n x size, all-reduce 2(n-1)/n.

    python benchmarks/comm_bytes.py                  # Markdown table, tp=8, seq 1024, batch 1
    python benchmarks/comm_bytes.py --json
    from benchmarks.comm_bytes import comm_bytes     # rows as dicts (benchmarks/run.py)
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
GIB = 2**30

# (name, spec, what it is); the first is the reference the ratios are taken to
PLANS = [
    ("chapter-plain", HERE / "specs" / "chapter-plain.yaml",
     "chapter's plain plan: embedding colwise -> replicate, no SP, full logits"),
    ("chapter-sp", HERE / "specs" / "chapter-sp.yaml",
     "chapter's SP plan, full logits gathered (no loss parallel)"),
    ("llama3", REPO / "specs" / "llama3.yaml",
     "tpplan llama3: SP + loss parallel (logits stay vocab-sharded)"),
    ("colwise-embedding", HERE / "specs" / "colwise-embedding.yaml",
     "llama3 with the embedding colwise (hidden dim) -> shard(1)"),
]


def comm_bytes(plans=None, *, tp: int = 8, dp: int = 1, seq_length: int = 1024, batch_size: int = 1) -> list[dict]:
    """Simulate each plan and return one row per plan: bytes sent per rank per step (total and over
    tp), collective count, the Megatron-SP floor, and ratios to the first plan and to the floor."""
    from tpplan.simulate.simulator import simulate
    from tpplan.spec.loader import load_spec

    rows = []
    for name, path, what in plans or PLANS:
        sim = simulate(load_spec(path, []), tp=tp, dp=dp, seq_length=seq_length, batch_size=batch_size)
        data = sim.data
        comm = data["communication"]
        rows.append({
            "plan": name,
            "description": what,
            "spec": str(Path(path).resolve().relative_to(REPO)) if Path(path).resolve().is_relative_to(REPO) else str(path),
            "model": data["model"],
            "tp": tp,
            "dp": dp,
            "seq_length": seq_length,
            "batch_size": batch_size,
            "dtype": data["dtype"],
            "collectives": comm["total"]["count"],
            "ring_bytes": comm["total"]["ring_bytes"],
            "tp_ring_bytes": comm["total"]["tp_ring_bytes"],
            "per_layer_ring_bytes": comm["total"]["per_layer_ring_bytes"],
            "megatron_sp_floor_ring_bytes": comm["megatron_sp_floor_ring_bytes"],
            "ratio_to_floor": comm["ratio_to_floor"],
            "seconds": data["seconds"],
        })
    first = rows[0]["ring_bytes"] if rows else 0
    for row in rows:
        row["ratio_to_first"] = round(row["ring_bytes"] / first, 4) if first else None
    return rows


def markdown(rows: list[dict]) -> str:
    if not rows:
        return ""
    r0 = rows[0]
    lines = [
        f"Bytes sent per rank per training step (forward + loss + backward + grad clipping), {r0['model']}, "
        f"tp={r0['tp']} dp={r0['dp']}, seq {r0['seq_length']}, batch {r0['batch_size']}, {r0['dtype']}; "
        f"Megatron-SP floor {r0['megatron_sp_floor_ring_bytes'] / GIB:.2f} GiB (8 hidden-size collectives per layer).",
        "",
        f"| plan | what | collectives | bytes/step | vs {r0['plan']} | vs Megatron-SP floor |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        floor = f"{r['ratio_to_floor']:.2f}x" if r["ratio_to_floor"] else "-"
        lines.append(f"| `{r['plan']}` | {r['description']} | {r['collectives']} | {r['ring_bytes'] / GIB:.2f} GiB "
                     f"| {r['ratio_to_first']:.2f}x | {floor} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=8)
    parser.add_argument("--dp", type=int, default=1)
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    args = parser.parse_args(argv)
    rows = comm_bytes(tp=args.tp, dp=args.dp, seq_length=args.seq_length, batch_size=args.batch_size)
    sys.stdout.write(json.dumps(rows, indent=2) + "\n" if args.json else markdown(rows))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # run from anywhere without installing
    sys.exit(main())
