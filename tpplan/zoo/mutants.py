"""The mutation score over the zoo: every mutant (``tpplan.prove.mutants``) of the specs a zoo model type
imports to (plain and sequence parallel) or of a spec file, run, and the score as docs/mutants.md shows it.
``benchmarks/mutants.py`` runs it over the zoo's sample and the shipped specs."""

from __future__ import annotations

from tpplan.core.errors import TpplanError
from tpplan.prove.mutants import KINDS, first_line, md_text, mutants, run_mutant, score


def mutate(source: str, *, modes=("plain", "sp"), per_kind: int = 1, tp: int = 2,
           timeout: float = 180) -> dict:
    """Every mutant of the proven spec(s) ``source`` stands for, run: a spec file, or a transformers model
    type imported by import-hf (``modes``: plain, and sequence parallel where it imports; ``TYPE:MODE`` for
    one mode).  Each spec is checked as it is first; one check does not prove is not mutated (``skipped``
    says why)."""
    from tpplan.prove.check import run_check
    from tpplan.prove.shards import parallel_status

    out: dict = {"source": source, "specs": []}
    for name, spec in _specs_of(source, modes):
        entry: dict = {"name": name}
        out["specs"].append(entry)
        if isinstance(spec, str):
            entry["skipped"] = spec
            continue
        try:
            base = run_check(spec, tp=tp, launcher="fork", timeout=timeout)
        except TpplanError as exc:
            entry["skipped"] = f"refused: {first_line(exc.message)}"
            continue
        entry.update(baseline=parallel_status(base), replicated=list(base.replicated))
        if not base.ok:
            entry["skipped"] = f"not proven: {first_line(str((base.failure or {}).get('message')))}"
            continue
        entry["results"] = [
            {**run_mutant(m, tp=tp, baseline=base.replicated, timeout=timeout), "source": name}
            for m in mutants(spec, tp=tp, per_kind=per_kind)]
    return out


def _specs_of(source: str, modes) -> list[tuple[str, object]]:
    """(name, Spec, or why there is none) for a spec file or a zoo model type in each mode."""
    from tpplan.spec.loader import load_spec, load_spec_text

    if source.endswith((".yaml", ".yml")):
        try:
            return [(source, load_spec(source))]
        except TpplanError as exc:
            return [(source, f"does not load: {first_line(exc.message)}")]
    from tpplan.hf.import_hf import import_hf
    from tpplan.zoo.matrix import _source

    source, _, mode = source.partition(":")
    modes = (mode,) if mode else modes
    found = []
    imported, _ = _source(source)
    for mode in modes:
        name = f"{source} ({mode})"
        try:
            text = import_hf(imported, sequence_parallel=(mode == "sp")).text
            found.append((name, load_spec_text(text, name=f"{source}-{mode}.yaml")))
        except TpplanError as exc:
            found.append((name, f"import-hf refused: {first_line(exc.message, 160)}"))
    return found


def to_markdown(data: dict) -> str:
    """The mutation score as docs/mutants.md shows it: per kind, then every survivor with its reason."""
    results = [r for source in data["sources"] for spec in source["specs"] for r in spec.get("results", [])]
    total = score(results)
    lines = [
        "# Mutants: wrong plans the oracle must refuse",
        "",
        f"Each proven spec is mutated one rule at a time (`tpplan/prove/mutants.py`, {len(KINDS)} kinds, up to "
        f"{data['per_kind']} per kind and spec); a mutant is killed when resolve refuses it (exit 2), "
        "`tpplan check` fails it (exit 1), or check proves it equal but less parallel than its spec (a kind "
        "of parameter left whole: partial). Equivalent mutants -- the generator says why they compute what "
        "the spec computes -- are not counted.",
        "",
        f"Reproduce: `{data['command']}` ({data['seconds'] / 60:.0f} min, torch {data.get('torch', '?')}, "
        f"transformers {data.get('transformers', '?')}).",
        "",
        f"**Score: {total['killed']} killed of {total['non_equivalent']} non-equivalent mutants"
        + (f" ({100 * total['score']:.1f}%)" if total["score"] is not None else "")
        + f"**, from {sum('results' in spec for s in data['sources'] for spec in s['specs'])} proven specs; "
        f"{len(total['equivalent'])} equivalent.",
        "",
        "| kind | mutants | equivalent | refused by resolve | failed by check | partial | survived |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        mine = [r for r in results if r["kind"] == kind]
        counted = [r for r in mine if not r.get("equivalent")]
        by = {v: sum(r["verdict"] == v for r in counted)
              for v in ("refused", "failed", "partial", "survived")}
        lines.append(f"| {kind} | {len(mine)} | {len(mine) - len(counted)} | {by['refused']} | "
                     f"{by['failed']} | {by['partial']} | {by['survived']} |")
    lines += ["", "## Survivors not explained (gaps in the oracle)", ""]
    survivors = total["unexplained_survivors"]
    lines += [f"- {r['source']}: {r['kind']} on `{r['rule']}` ({r['change']})"
              for r in survivors] or ["None."]
    lines += ["", "## Equivalent mutants (not counted), with the reason", ""]
    reasons: dict[str, list] = {}
    for r in total["equivalent"]:
        reasons.setdefault(r["equivalent"], []).append(r)
    for reason, rows in reasons.items():
        lines.append(f"- **{reason}**: " + "; ".join(
            f"{r['source']} `{r['rule']}` ({r['change']}, {r['verdict']})" for r in rows))
    skipped = [(spec["name"], spec["skipped"]) for s in data["sources"] for spec in s["specs"]
               if spec.get("skipped")]
    if skipped:
        lines += ["", "## Specs not mutated", ""] + [f"- {name}: {md_text(why)}" for name, why in skipped]
    lines += ["", "## Every mutant", "", "| spec | kind | rule | change | verdict | message |",
              "|---|---|---|---|---|---|"]
    for r in results:
        verdict = r["verdict"] + (" (equivalent)" if r.get("equivalent") else "")
        lines.append(f"| {md_text(r['source'])} | {r['kind']} | `{md_text(r['rule'])}` | {md_text(r['change'])} | "
                     f"{verdict} | {md_text(r['message'], 160)} |")
    return "\n".join(lines) + "\n"
