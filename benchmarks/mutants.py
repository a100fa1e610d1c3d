"""The oracle's mutation score: wrong plans made from proven specs, which resolve or check must each refuse.

    python benchmarks/mutants.py [--sample | --only llama,qwen3] [--specs] [--jobs 2] [--per-kind 1]
                                 [--docs docs]

Sources: every transformers causal LM with a tensor-parallel plan (``tpplan zoo``'s types), imported by
import-hf plain and sequence-parallel (``--sample``: the zoo's CI sample, ``tpplan.zoo.SAMPLE``), and with
``--specs`` the shipped specs (specs/*.yaml, examples/*/*.yaml).  For each proven spec, ``tpplan.prove.mutants``
makes up to ``--per-kind`` mutants of each kind and runs check on each (forked gloo ranks at tp=2), each
source in a process forked from this one (``tpplan.zoo.run_forked``: memory limit, deadline).  Writes
DOCS/mutants.json and DOCS/mutants.md (after every source: a pass stopped early keeps what it ran).
Nothing is asserted here: ``tests/dist/test_mutants.py`` asserts the score on the CI sample.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES: dict[str, str] = {}  # job item (a name without "/") -> source (a model type or a spec file)


def _job(item: str, **kwargs) -> dict:
    from tpplan.zoo.mutants import mutate

    return mutate(SOURCES[item], **kwargs)


def sources(args) -> list[str]:
    from tpplan.zoo import matrix as zoo

    if args.only:
        chosen = [t.strip() for t in args.only.split(",") if t.strip()]
    elif args.sample:
        chosen = list(zoo.SAMPLE)
    else:
        types, causal = zoo.planned_types()
        chosen = [t for t in zoo.SAMPLE] + [t for t in types if t in causal and t not in zoo.SAMPLE]
    if args.specs:
        chosen += [str(p.relative_to(REPO)) for p in sorted((REPO / "specs").glob("*.yaml"))]
        chosen += [str(p.relative_to(REPO)) for p in sorted((REPO / "examples").glob("*/*.yaml"))]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sample", action="store_true", help="the zoo's CI sample only")
    parser.add_argument("--only", help="comma-separated model types (TYPE:MODE for one mode) or spec files")
    parser.add_argument("--specs", action="store_true", help="also the shipped specs")
    parser.add_argument("--modes", default="plain,sp", help="import-hf modes of a model type (plain,sp)")
    parser.add_argument("--per-kind", type=int, default=1, help="mutants of each kind per spec (default 1)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=float, default=900, help="seconds per source, its mutants included")
    parser.add_argument("--docs", default=str(REPO / "docs"), help="folder of mutants.json / mutants.md")
    args = parser.parse_args(argv)

    import torch
    import transformers

    import tpplan.hf.import_hf  # noqa: F401

    # every module a job uses, imported before forking (one version of tpplan in the whole pass)
    import tpplan.prove.check  # noqa: F401
    from tpplan.core.fileio import write_text_atomic
    from tpplan.prove.mutants import score
    from tpplan.zoo import matrix as zoo
    from tpplan.zoo.mutants import to_markdown

    chosen = sources(args)
    SOURCES.update({source.replace("/", "__").replace(":", "_"): source for source in chosen})
    modes = tuple(m for m in args.modes.split(",") if m)
    docs = Path(args.docs)
    docs.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/mutants.py " + " ".join(argv if argv is not None else sys.argv[1:])
    started = time.time()
    done: dict[str, dict] = {}

    def write() -> None:
        data = {"command": command.strip(), "seconds": round(time.time() - started, 1),
                "per_kind": args.per_kind,
                "torch": torch.__version__.split("+")[0], "transformers": transformers.__version__,
                "sources": [done[s] for s in chosen if s in done]}
        results = [r for s in data["sources"] for spec in s["specs"] for r in spec.get("results", [])]
        data["score"] = {k: v for k, v in score(results).items() if not isinstance(v, list)}
        write_text_atomic(docs / "mutants.json", json.dumps(data, indent=1) + "\n")
        write_text_atomic(docs / "mutants.md", to_markdown(data))

    def progress(item, result, count, total):
        item = SOURCES[item]
        if not isinstance(result, dict):
            result = {"source": item, "specs": [{"name": item, "skipped": f"the job failed: {result}"}]}
        done[item] = result
        write()
        results = [r for spec in result["specs"] for r in spec.get("results", [])]
        survivors = [f"{r['kind']} {r['rule']}" for r in results
                     if not r["killed"] and not r.get("equivalent")]
        print(f"[{count}/{total}] {item}: {sum(r['killed'] for r in results)} of {len(results)} killed"
              + (f"; survived: {', '.join(survivors)}" if survivors else ""), file=sys.stderr, flush=True)

    zoo.run_forked(list(SOURCES), _job, kwargs={"modes": modes, "per_kind": args.per_kind}, jobs=args.jobs,
                   timeout=args.timeout, progress=progress)
    write()
    total = score([r for s in done.values() for spec in s["specs"] for r in spec.get("results", [])])
    print(f"wrote {docs / 'mutants.md'}: {total['killed']} killed of {total['non_equivalent']} "
          "non-equivalent "
          f"mutants, {len(total['equivalent'])} equivalent ({time.time() - started:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
