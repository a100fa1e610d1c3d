"""The canary: tpplan against the newest releases the registry offers, before anyone adopts them.

tpplan pins the exact versions its suite passes with (constraints.txt).  This script builds a second
virtual environment with the newest torch, transformers and the rest of tpplan's dependencies, and
runs there what tells whether a release may be adopted:

1. an inventory of both environments (versions; every model type with a tensor-parallel plan, its
   tp and ep plans; transformers' registry of parallel styles): types added and removed, plans
   changed, styles tpplan's import-hf does not know;
2. the suite's fast part (``pytest -m "not slow" tests/unit tests/cli``) in the new environment;
3. the zoo's representative sample (``tpplan zoo --sample N --no-bytes --no-derive``) in both
   environments: rows whose verdict changed.

    python benchmarks/canary.py                       # newest of everything; writes docs/canary.md
    python benchmarks/canary.py --torch 2.14.1 --venv /tmp/canary-214

Run it from the pinned environment (the README's install): that environment is the baseline.  The
new one is made with ``PIP_CONSTRAINT`` pointing at an empty file, so a machine-wide pip cap does not hide a release.
Nothing here is a test: it reports, and adopting a release stays a decision (bump constraints.txt,
pyproject's range, re-run the zoo).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def packages() -> list[str]:
    """What tpplan needs to run and test, by name: pyproject's dependencies and its test extra (the extras it
    names, as tpplan[trackers], included); the canary installs the newest of each."""
    import tomllib

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    names, pending = [], [*project["dependencies"], *extras["test"]]
    while pending:
        requirement = pending.pop(0)
        name, _, extra = re.match(r"([A-Za-z0-9_.\-]+)(\[([^\]]+)\])?", requirement).groups()
        if name == "tpplan":
            pending += [r for e in extra.split(",") for r in extras[e.strip()]]
        elif name not in names:
            names.append(name)
    return names


SHOWN = ("torch", "transformers", "datasets", "tokenizers", "huggingface-hub", "safetensors", "pydantic")

# Runs inside each environment: what it has, as JSON on stdout.
INVENTORY = r'''
import json, importlib.metadata as md
import transformers
from transformers.models.auto.configuration_auto import CONFIG_MAPPING
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
out = {"versions": {}, "types": {}, "styles": []}
for name in SHOWN_NAMES:
    try:
        out["versions"][name] = md.version(name)
    except md.PackageNotFoundError:
        out["versions"][name] = None
for model_type in sorted(CONFIG_MAPPING.keys()):
    try:
        cls = CONFIG_MAPPING[model_type]
    except Exception:
        continue
    tp = dict(getattr(cls, "base_model_tp_plan", None) or {})
    ep = dict(getattr(cls, "base_model_ep_plan", None) or {})
    if tp or ep:
        out["types"][model_type] = {"tp": tp, "ep": ep, "causal": model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}
try:
    import transformers.distributed.tensor_parallel, transformers.distributed.expert_parallel
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES
    out["styles"] = sorted(ALL_PARALLEL_STYLES.valid_keys())
except Exception as exc:
    out["styles_error"] = f"{type(exc).__name__}: {exc}"
try:
    from tpplan.hf.translate import FAITHFUL, NOT_FAITHFUL, PER_HEAD_NORM
    out["tpplan_styles"] = sorted(set(FAITHFUL) | set(NOT_FAITHFUL) | {PER_HEAD_NORM})
except Exception as exc:
    out["tpplan_styles_error"] = f"{type(exc).__name__}: {exc}"
print(json.dumps(out))
'''.replace("SHOWN_NAMES", repr(SHOWN))


def run(cmd: list[str], *, env: dict | None = None, timeout: float = 3600, cwd: Path = REPO) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), file=sys.stderr, flush=True)
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def environment(python: str) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PATH"] = str(Path(python).parent) + os.pathsep + env.get("PATH", "")
    env.pop("VIRTUAL_ENV", None)
    return env


def build_venv(venv: Path, torch: str, transformers: str) -> str:
    python = str(venv / "bin" / "python")
    if not Path(python).exists():
        subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    wanted = [p + (f"=={torch}" if p == "torch" and torch != "latest" else "")
              + (f"=={transformers}" if p == "transformers" and transformers != "latest" else "") for p in packages()]
    env = dict(os.environ, PIP_CONSTRAINT=os.devnull, PIP_DISABLE_PIP_VERSION_CHECK="1")  # no machine-wide cap
    result = run([python, "-m", "pip", "install", "-q", "--upgrade", *wanted], env=env, timeout=7200)
    if result.returncode:
        raise SystemExit(f"error: installing the newest releases failed:\n{result.stderr[-3000:]}")
    result = run([python, "-m", "pip", "install", "-q", "--no-deps", "-e", str(REPO)], env=env)
    if result.returncode:
        raise SystemExit(f"error: installing tpplan into {venv} failed:\n{result.stderr[-3000:]}")
    return python


def inventory(python: str) -> dict:
    result = run([python, "-c", INVENTORY], env=environment(python))
    if result.returncode:
        raise SystemExit(f"error: the inventory failed in {python}:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def fast_suite(python: str, report_dir: Path) -> dict:
    xml = report_dir / "suite.xml"
    started = time.time()
    result = run([python, "-m", "pytest", "-q", "-m", "not slow", "tests/unit", "tests/cli", "-p", "no:cacheprovider",
                  f"--junitxml={xml}"], env=environment(python), timeout=5400)
    cases = ET.parse(xml).getroot().iter("testcase") if xml.exists() else []
    failed = []
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in cases:
        outcome = "passed"
        for child in case:
            if child.tag in ("failure", "error"):
                outcome = "failed"
                message = (child.get("message") or "").splitlines()
                failed.append((f"{case.get('classname')}::{case.get('name')}", message[0][:200] if message else ""))
            elif child.tag == "skipped":
                outcome = "skipped"
        counts[outcome] += 1
    return {"returncode": result.returncode, "seconds": round(time.time() - started), **counts, "failures": failed,
            "tail": result.stdout[-2000:] if not xml.exists() else ""}


def zoo_sample(python: str, out: Path, sample: int) -> dict:
    started = time.time()
    result = run([python, "-m", "tpplan", "zoo", "--sample", str(sample), "--jobs", "2", "--no-bytes", "--no-derive",
                  "-o", str(out)], env=environment(python), timeout=3600)
    path = out / "zoo.json"
    if not path.exists():
        return {"returncode": result.returncode, "rows": {}, "error": result.stderr[-2000:]}
    rows = {r["model_type"]: {m: (r.get(m) or {}).get("status") for m in ("plain", "sp")}
            for r in json.loads(path.read_text())["rows"]}
    return {"returncode": result.returncode, "rows": rows, "seconds": round(time.time() - started)}


def plan_changes(old: dict, new: dict) -> list[str]:
    lines = []
    for model_type in sorted(set(old) & set(new)):
        for kind in ("tp", "ep"):
            a, b = old[model_type][kind], new[model_type][kind]
            if a == b:
                continue
            added = sorted(set(b) - set(a))
            removed = sorted(set(a) - set(b))
            changed = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            parts = [f"+{k}: {b[k]}" for k in added] + [f"-{k}: {a[k]}" for k in removed]
            parts += [f"{k}: {a[k]} -> {b[k]}" for k in changed]
            lines.append(f"`{model_type}` {kind} plan: " + "; ".join(parts))
    return lines


def report(old: dict, new: dict, suite: dict, zoo_old: dict, zoo_new: dict, command: str) -> str:
    lines = ["# The canary: tpplan against the newest releases", "",
             f"Command: `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}). "
             "The pinned environment is constraints.txt + torch as the README installs it; the newest is what the "
             "registry offered that day. Adopting a release is a decision: bump constraints.txt and pyproject's "
             "range, re-run the zoo, and say so in the commit.", "",
             "| package | pinned | newest |", "|---|---|---|"]
    for name in SHOWN:
        a, b = old["versions"].get(name), new["versions"].get(name)
        lines.append(f"| {name} | {a} | {b}{'' if a == b else ' (newer)'} |")
    old_types, new_types = old["types"], new["types"]
    causal = lambda types: {t for t, v in types.items() if v["causal"]}  # noqa: E731
    lines += ["", "## Model types with a transformers plan", "",
              f"- pinned: {len(old_types)} types ({len(causal(old_types))} causal LMs); newest: {len(new_types)} "
              f"({len(causal(new_types))} causal LMs)",
              f"- added: {', '.join(f'`{t}`' for t in sorted(set(new_types) - set(old_types))) or 'none'}",
              f"- removed: {', '.join(f'`{t}`' for t in sorted(set(old_types) - set(new_types))) or 'none'}"]
    changes = plan_changes(old_types, new_types)
    lines += [f"- plans changed: {len(changes)}"] + [f"  - {c}" for c in changes[:60]]
    if len(changes) > 60:
        lines.append(f"  - ... and {len(changes) - 60} more")
    unknown = sorted(set(new.get("styles", [])) - set(new.get("tpplan_styles", [])))
    lines += [f"- transformers styles import-hf does not know: {', '.join(unknown) or 'none'}"]
    lines += ["", "## The suite's fast part in the newest environment", "",
              f"`pytest -m \"not slow\" tests/unit tests/cli`: {suite['passed']} passed, {suite['failed']} failed, "
              f"{suite['skipped']} skipped ({suite['seconds']} s)."]
    lines += [f"- `{name}`: {message}" for name, message in suite["failures"]]
    lines += ["", "## The zoo's sample, pinned vs newest", "", "| type | pinned plain / sp | newest plain / sp |",
              "|---|---|---|"]
    for model_type in sorted(set(zoo_old["rows"]) | set(zoo_new["rows"])):
        a = zoo_old["rows"].get(model_type, {})
        b = zoo_new["rows"].get(model_type, {})
        mark = "" if a == b else " **changed**"
        lines.append(f"| {model_type} | {a.get('plain')} / {a.get('sp')} | {b.get('plain')} / {b.get('sp')}{mark} |")
    for label, zoo in (("pinned", zoo_old), ("newest", zoo_new)):
        if zoo.get("error"):
            lines += ["", f"The {label} zoo run wrote no matrix:", "```", zoo["error"].strip(), "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--venv", default=str(Path(tempfile.gettempdir()) / "tpplan-canary"),
                        help="the newest environment's folder (made or upgraded)")
    parser.add_argument("--torch", default="latest", help="a torch version, or latest")
    parser.add_argument("--transformers", default="latest", help="a transformers version, or latest")
    parser.add_argument("--sample", type=int, default=10, help="zoo sample size (default: the CI sample)")
    parser.add_argument("--no-suite", action="store_true", help="skip the suite's fast part")
    parser.add_argument("-o", "--output", default=str(REPO / "docs" / "canary.md"))
    args = parser.parse_args(argv)
    python = build_venv(Path(args.venv), args.torch, args.transformers)
    old, new = inventory(sys.executable), inventory(python)
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        suite = ({"passed": 0, "failed": 0, "skipped": 0, "seconds": 0, "failures": []} if args.no_suite
                 else fast_suite(python, scratch))
        zoo_old = zoo_sample(sys.executable, scratch / "zoo-pinned", args.sample)
        zoo_new = zoo_sample(python, scratch / "zoo-newest", args.sample)
    command = "python benchmarks/canary.py" + "".join(f" {a}" for a in (argv if argv is not None else sys.argv[1:]))
    text = report(old, new, suite, zoo_old, zoo_new, re.sub(r"\s+", " ", command).strip())
    Path(args.output).write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
