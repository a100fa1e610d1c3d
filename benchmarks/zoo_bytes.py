"""The zoo matrix's bytes columns, filled after `tpplan zoo --no-bytes` proved and refused every type:

    python benchmarks/zoo_bytes.py [--jobs 2] [--only llama,qwen3] [--timeout 600] [--docs docs]

For each row of DOCS/zoo.json: import-hf (transformers' plan, and tpplan's --sequence-parallel upgrade) at
the full-size config the zoo imported -- completed where transformers' default cannot build -- and
`tpplan plan`'s simulator on each: tp ring bytes sent per rank in one training step (seq 1024, batch 1,
tp=2), the same numbers `tpplan zoo` computes without --no-bytes (``tpplan.zoo.plan_bytes``).  Simulating
every layer of a 100B-parameter config on the meta device takes minutes on 2 shared cores, so the sweep
proves first and measures bytes here, in a second pass, each type in a process forked from this one
(``tpplan.zoo.run_forked``: memory limit, deadline).  A row that cannot be measured in time keeps its
bytes empty; the matrix says which command filled them.  Re-renders DOCS/zoo.md.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="comma-separated model types (default: every row of the matrix)")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per type")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="folder of zoo.json / zoo.md (default: docs)")
    args = parser.parse_args(argv)

    # every module a job uses, imported before forking (one version of tpplan in the whole pass)
    import tpplan.hf.import_hf  # noqa: F401
    import tpplan.simulate.simulator  # noqa: F401
    from tpplan.core.fileio import write_text_atomic
    from tpplan.zoo import matrix as zoo

    path = Path(args.docs) / "zoo.json"
    matrix = json.loads(path.read_text())
    rows = {r["model_type"]: r for r in matrix["rows"]}
    types = [t.strip() for t in args.only.split(",")] if args.only else list(rows)
    unknown = [t for t in types if t not in rows]
    if unknown:
        print(f"not rows of {path}: {', '.join(unknown)}", file=sys.stderr)
        return 2
    types = [t for t in zoo.SAMPLE if t in types] + [t for t in types if t not in zoo.SAMPLE]  # the families first
    started = time.time()
    command = "python benchmarks/zoo_bytes.py " + " ".join(argv if argv is not None else sys.argv[1:])

    def write() -> None:  # after every type: a pass stopped early leaves what it measured
        matrix["bytes_command"] = command.strip()
        matrix["bytes_seconds"] = round(time.time() - started, 1)
        write_text_atomic(path, json.dumps(matrix, indent=1) + "\n")
        write_text_atomic(path.with_name("zoo.md"), zoo.to_markdown(matrix))

    def progress(item, result, done, total):
        if isinstance(result, dict):
            rows[item].update(result)
            write()
        text = result if isinstance(result, str) else ", ".join(
            f"{k} {zoo._gib(v) or '-'} GiB" for k, v in result.items())
        print(f"[{done}/{total}] {item}: {text}", file=sys.stderr, flush=True)

    zoo.run_forked(types, zoo.plan_bytes, jobs=args.jobs, timeout=args.timeout, progress=progress)
    write()
    measured = sum(1 for r in matrix["rows"] if r.get("bytes_transformers_plan"))
    print(f"bytes of transformers' plan for {measured} of {len(matrix['rows'])} types, "
          f"{sum(1 for r in matrix['rows'] if r.get('bytes_tpplan_plan'))} with tpplan's SP plan too "
          f"({time.time() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
