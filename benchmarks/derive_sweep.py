"""tpplan derive on every causal LM transformers knows -- with a tensor-parallel plan of its own or without:

    python benchmarks/derive_sweep.py [--jobs 2] [--only llama,opt] [--sample N] [--timeout 480] [--no-bytes]
                                      [--docs docs]

For each causal-LM model type (``MODEL_FOR_CAUSAL_LM_MAPPING_NAMES``): ``tpplan.zoo.derive_column.derive_for_zoo``
-- derive the sequence-parallel plan (the plain one when SP cannot be derived or proven), prove it with
``check`` at tp=2, and compare its bytes per step at full size with transformers' own plan (simulator,
seq 1024, batch 1, bf16, at the largest tp both plans take).  Each type runs in a process forked from
this one (``tpplan.zoo.run_forked``: memory limit, deadline), ``--jobs`` at a time.

Writes DOCS/derive.json (one row per type), fills the derive column of DOCS/zoo.json and re-renders
DOCS/zoo.md (``tpplan.zoo.to_markdown``) with derive's totals and a table of the causal LMs transformers
ships no plan for, and prints the numbers the README quotes.  A partial run (--only/--sample) merges
into the existing files.  Nothing is asserted: this reports.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def causal_types() -> tuple[list[str], set[str]]:
    """(every causal-LM model type, those whose config carries transformers' tensor-parallel plan)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = sorted(t for t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES if t in CONFIG_MAPPING)
    planned = set()
    for t in types:
        try:
            if getattr(CONFIG_MAPPING[t], "base_model_tp_plan", None):
                planned.add(t)
        except Exception:  # noqa: BLE001 - a config module that does not import: no plan we can read
            pass
    return types, planned


def _job(model_type: str, *, with_bytes: bool, check_timeout: float, sequence_parallel: bool = True,
         budgets: dict | None = None) -> dict:
    from tpplan.zoo.derive_column import derive_for_zoo

    tp, budget = (budgets or {}).get(model_type, (None, None))
    row = derive_for_zoo(model_type, compare_transformers=with_bytes, check_timeout=check_timeout,
                         sequence_parallel=sequence_parallel, tp=tp, bytes_tp=tp, max_params_per_rank=budget)
    row.pop("spec", None)  # the matrix keeps the verdict, not the text
    if not with_bytes:
        row["bytes"] = None
    return row


def totals(rows: dict[str, dict], planned: set[str]) -> dict:
    out = {}
    for label, chosen in (("with_plan", [t for t in rows if t in planned]),
                          ("without_plan", [t for t in rows if t not in planned]), ("all", list(rows))):
        counts = {"proven": 0, "partial": 0, "refused": 0, "failed": 0}
        sp = 0
        for t in chosen:
            counts[rows[t].get("status") or "failed"] = counts.get(rows[t].get("status") or "failed", 0) + 1
            sp += bool(rows[t].get("status") == "proven" and rows[t].get("sequence_parallel"))
        out[label] = {"types": len(chosen), **counts, "proven_sp": sp}
    ratios = [r["bytes"]["ratio"] for r in rows.values()
              if r.get("status") == "proven" and isinstance(r.get("bytes"), dict) and r["bytes"].get("ratio")]
    out["bytes_ratio_vs_transformers"] = ({"types": len(ratios), "median": round(statistics.median(ratios), 3),
                                          "min": min(ratios), "max": max(ratios),
                                          "above_1": sum(1 for x in ratios if x > 1.0)} if ratios else None)
    # rows above 1: what they shard that transformers' plan leaves whole, and their plain form's bytes
    above = {t: r for t, r in rows.items() if r.get("status") == "proven" and isinstance(r.get("bytes"), dict)
             and (r["bytes"].get("ratio") or 0) > 1}
    plain = {t: r["plain_form"]["bytes"]["ratio"] for t, r in above.items()
             if (r.get("plain_form") or {}).get("status") == "proven"
             and ((r["plain_form"].get("bytes") or {}).get("ratio"))}
    budgeted = {t: r["at_transformers_params"]["bytes"] for t, r in above.items()
                if (r.get("at_transformers_params") or {}).get("status") == "proven"
                and ((r["at_transformers_params"].get("bytes") or {}).get("ratio"))}
    out["above_1"] = {
        "types": sorted(above),
        "fewer_parameters_per_rank": sorted(t for t, r in above.items() if (r["bytes"].get("params_ratio") or 1) < 0.99),
        "plain_form_ratio": {t: plain[t] for t in sorted(plain)},
        # derive --max-params-per-rank <transformers' plan's parameters per rank>: (bytes ratio, parameters ratio)
        "at_transformers_params": {t: [budgeted[t]["ratio"], budgeted[t].get("params_ratio")] for t in sorted(budgeted)},
        "at_transformers_params_not_proven": sorted(
            t for t, r in above.items() if r.get("at_transformers_params") and t not in budgeted),
    } if above else None
    return out


def _md(text, limit=200) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def markdown_tables(rows: dict[str, dict], planned: set[str], summary: dict, command: str) -> str:
    """The derive part of docs/zoo.md: totals, and the causal LMs without a transformers plan."""
    lines = ["## tpplan derive", "",
             "`tpplan derive MODEL_TYPE --sequence-parallel` (the plain plan where SP cannot be derived or proven), "
             "proven by `tpplan check --tp 2`; bytes per step of the derived plan / transformers' own plan at full "
             "size (simulator, seq 1024, batch 1, bf16, the largest tp both take). "
             f"Reproduce: `{command}`.", "",
             "Proven: equal, and the plan shards the attention and the MLP or experts; partial: equal, but "
             "one of them left mostly whole on every rank (the row says which).", "",
             "| causal LMs | types | proven | of them with SP | partial | refused | failed |",
             "|---|---|---|---|---|---|---|"]
    for key, label in (("with_plan", "with a transformers plan"), ("without_plan", "without one"), ("all", "all")):
        t = summary[key]
        pct = f" ({100 * t['proven'] / max(1, t['types']):.0f}%)"
        lines.append(f"| {label} | {t['types']} | {t['proven']}{pct} | {t['proven_sp']} | "
                     f"{t.get('partial', 0)} | {t['refused']} | {t['failed']} |")
    ratio = summary.get("bytes_ratio_vs_transformers")
    if ratio:
        lines += ["", f"Bytes per step, derived / transformers' plan, over {ratio['types']} types where both resolve: "
                      f"median {ratio['median']}, min {ratio['min']}, max {ratio['max']} "
                      f"({ratio['above_1']} above 1)."]
    above = summary.get("above_1")
    if above:
        fewer = above["fewer_parameters_per_rank"]
        plain = above["plain_form_ratio"]
        lines += ["", f"Above 1: {', '.join(above['types'])}. Of them, {len(fewer)} hold fewer parameters per rank than "
                      "under transformers' plan (derive shards what it leaves whole: "
                      f"{', '.join(fewer) or 'none'})"
                      + ("; the derived plain (not sequence-parallel) plan, proven too, against transformers' plain plan: "
                         + ", ".join(f"{t} {v}" for t, v in plain.items()) if plain else "") + "."]
        budgeted = above.get("at_transformers_params") or {}
        if budgeted:
            worse = [t for t, (ratio, _) in budgeted.items() if ratio > 1]
            fewer = [t for t, (_, params) in budgeted.items() if params is not None and params < 1]
            lines += ["", "Within transformers' parameters per rank (`tpplan derive --max-params-per-rank N` with N its "
                          "plan's parameters per rank, plain, the same tp; groups every rank has room for stay whole), "
                          "proven too, bytes per step / transformers': "
                          + ", ".join(f"{t} {ratio:.2f}" for t, (ratio, _) in budgeted.items())
                          + f" -- {len(budgeted) - len(worse)} of {len(budgeted)} at or below 1"
                          + (f" (above: {', '.join(worse)})" if worse else "")
                          + f"; parameters per rank equal to its plan's, fewer in {', '.join(fewer) or 'none'}."]
    lines += ["", "### Causal LMs transformers ships no tensor-parallel plan for", "",
              "| model type | derive |", "|---|---|"]
    for t in sorted(rows):
        if t not in planned:
            lines.append(f"| {t} | {_md(rows[t].get('summary'))} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--only", help="comma-separated model types")
    parser.add_argument("--sample", type=int, help="the first N types (with a plan and without, alternating)")
    parser.add_argument("--timeout", type=float, default=480, help="seconds per type, everything included")
    parser.add_argument("--no-bytes", action="store_true", help="skip the simulator comparison")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="folder of zoo.json / zoo.md (default: docs)")
    parser.add_argument("--plain-form", action="store_true",
                        help="derive and prove the plain (not sequence-parallel) plan too, for the bytes it sends against "
                        "transformers' plain plan; kept in each row's plain_form (default --only: the rows whose "
                        "derived plan sends more bytes than transformers')")
    parser.add_argument("--at-transformers-params", action="store_true",
                        help="derive and prove the plain plan within transformers' plan's parameters per rank "
                        "(--max-params-per-rank, the same tp) for the bytes it sends then; kept in each row's "
                        "at_transformers_params (default --only: the rows whose derived plan sends more bytes than "
                        "transformers')")
    parser.add_argument("--merge-only", action="store_true",
                        help="run nothing: merge DOCS/derive.json into DOCS/zoo.json and zoo.md (after `tpplan zoo` "
                        "rewrote them)")
    args = parser.parse_args(argv)

    # every module a job uses, imported here: the forked jobs share them (and a source file edited while
    # the sweep runs does not mix two versions of tpplan in one matrix)
    import tpplan.derive  # noqa: F401
    import tpplan.hf.import_hf  # noqa: F401
    import tpplan.simulate.simulator  # noqa: F401
    import tpplan.zoo.derive_column  # noqa: F401
    from tpplan.zoo import matrix as zoo

    types, planned = causal_types()
    if args.only:
        wanted = [t.strip() for t in args.only.split(",") if t.strip()]
        unknown = [t for t in wanted if t not in types]
        if unknown:
            print(f"not causal-LM model types: {', '.join(unknown)}", file=sys.stderr)
            return 2
        types = wanted
    beside_rows = args.plain_form or args.at_transformers_params  # measured beside the rows derive.json has
    old_rows = json.loads((Path(args.docs) / "derive.json").read_text())["rows"] if beside_rows else {}
    if beside_rows and not args.only:
        types = [t for t, r in old_rows.items() if r.get("status") == "proven"
                 and (r.get("sequence_parallel") or args.at_transformers_params)
                 and ((r.get("bytes") or {}).get("ratio") or 0) > 1]
    elif args.sample and not args.only:
        with_plan = [t for t in types if t in planned]
        without = [t for t in types if t not in planned]
        types = [t for pair in zip(with_plan, without, strict=False) for t in pair][: args.sample]
    budgets = {}  # type -> (tp, transformers' plan's parameters per rank) from its row
    if args.at_transformers_params:
        for t in types:
            costs = old_rows.get(t, {}).get("bytes") or {}
            if costs.get("transformers_params_per_rank"):
                budgets[t] = (costs["tp"], costs["transformers_params_per_rank"])
        types = [t for t in types if t in budgets]
    started = time.time()
    if args.merge_only:
        types = []

    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/derive_sweep.py " + " ".join(argv if argv is not None else sys.argv[1:])
    summary: dict = {}

    def write(results: dict) -> None:
        """Merge ``results`` into DOCS/derive.json, zoo.json and zoo.md (after every type: an interrupted
        sweep keeps what it measured)."""
        nonlocal summary
        from tpplan.core.fileio import write_text_atomic

        path = docs / "derive.json"
        old = json.loads(path.read_text()) if path.is_file() else {}
        rows = dict(old.get("rows", {}))
        for t, result in results.items():
            if not isinstance(result, dict):
                result = {"model_type": t, "status": "failed", "reason": result, "summary": f"failed: {result}"}
            if args.plain_form:  # beside the row, which keeps the sequence-parallel plan
                rows[t]["plain_form"] = {k: result.get(k) for k in ("status", "reason", "summary", "tp", "forms",
                                                                     "check", "bytes")}
            elif args.at_transformers_params:
                rows[t]["at_transformers_params"] = {k: result.get(k) for k in (
                    "status", "reason", "summary", "tp", "forms", "kept_whole", "max_params_per_rank",
                    "params_per_rank", "check", "bytes")}
                base = rows[t]["summary"].split("; within its parameters")[0]
                costs = result.get("bytes") or {}
                rows[t]["summary"] = base + (f"; within its parameters per rank {costs['ratio']:.2f}x its bytes"
                                             if result.get("status") == "proven" and costs.get("ratio") else
                                             f"; within its parameters per rank: {result.get('status')}")
            else:
                rows[t] = result
        for t in rows:
            rows[t]["has_transformers_plan"] = t in planned
        summary = totals(rows, planned)
        beside = args.merge_only or beside_rows  # the rows' own command stays
        used = old.get("command", command) if beside else command
        data = {"command": used.strip(),
                "seconds": old.get("seconds") if beside else round(time.time() - started, 1),
                "totals": summary, "rows": {t: rows[t] for t in sorted(rows)}}
        write_text_atomic(path, json.dumps(data, indent=1, default=str) + "\n")
        zoo_json = docs / "zoo.json"
        if zoo_json.is_file():
            matrix = json.loads(zoo_json.read_text())
            for row in matrix["rows"]:
                if row["model_type"] in rows:
                    row["derive"] = rows[row["model_type"]]
            matrix["derive"] = {"command": data["command"], "totals": summary,
                                "tables": markdown_tables(rows, planned, summary, data["command"])}
            write_text_atomic(zoo_json, json.dumps(matrix, indent=1) + "\n")
            write_text_atomic(docs / "zoo.md", zoo.to_markdown(matrix))

    def progress(item, result, done, total):
        text = result.get("summary") if isinstance(result, dict) else f"failed: {result}"
        print(f"[{done}/{total}] {item}: {text}", file=sys.stderr, flush=True)
        write({item: result})

    if types:
        zoo.run_forked(types, _job, kwargs={"with_bytes": not args.no_bytes,
                                            "check_timeout": max(60.0, args.timeout / 3),
                                            "sequence_parallel": not (args.plain_form or args.at_transformers_params),
                                            "budgets": budgets},
                       jobs=args.jobs, timeout=args.timeout, progress=progress)
    else:
        write({})
    print(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
