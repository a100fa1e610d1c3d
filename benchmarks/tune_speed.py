"""How long `tpplan tune` takes to answer: the search alone (no check), each in a fresh process.

    python benchmarks/tune_speed.py [--jobs N] [--dry-run]

Runs `tpplan tune SPEC --gpus N --gpu h100-sxm --top 5` for Llama-3.1-70B on 256 GPUs
(benchmarks/specs/llama3-70b.yaml: 4M tokens per step, sequence 8192) and Llama-3.1-8B on 8
(specs/llama3.yaml) and reports, from one run each: wall seconds, CPU seconds (the process and its
forked workers), candidates and distinct steps simulated, the machine's load average before and
after (the CPUs are shared: wall time grows with other load, CPU time much less), and the tables tune
printed.  Writes benchmarks/tune_speed.md and the README section between its tune-speed markers
(--dry-run: neither).  No number is asserted.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REPORT = REPO / "benchmarks" / "tune_speed.md"
README = REPO / "README.md"
README_BEGIN = ("<!-- benchmarks/tune_speed.md begins: written by benchmarks/tune_speed.py, "
                "do not edit by hand -->")
README_END = "<!-- benchmarks/tune_speed.md ends -->"

CASES = [
    ("Llama-3.1-70B, 256 x h100-sxm", "benchmarks/specs/llama3-70b.yaml", ["--gpus", "256"]),
    ("Llama-3.1-8B, 8 x h100-sxm", "specs/llama3.yaml", ["--gpus", "8"]),
]


def one(spec: str, args: list[str], jobs: int | None) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    started = time.perf_counter()
    command = [sys.executable, "-m", "tpplan", "tune", spec, *args, "--gpu", "h100-sxm", "--top", "5"]
    if jobs:
        command += ["--jobs", str(jobs)]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True,
                         env={**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200"})
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if run.returncode:
        raise SystemExit(f"{' '.join(command)} failed:\n{run.stderr[-3000:]}")
    fit = re.search(r"(\d[\d,]*) of (\d[\d,]*) candidates fit", run.stdout)
    steps = re.search(r"(\d+) distinct steps simulated in ([\d.]+) s", run.stdout)
    return {
        "command": "tpplan " + " ".join(command[3:]),
        "wall_s": round(wall, 1),
        "cpu_s": round((after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime), 1),
        "candidates": fit.group(2), "fit": fit.group(1), "shapes": steps.group(1), "search_s": steps.group(2),
        "load_before": round(load, 1),
        "load_after": round(os.getloadavg()[0], 1),
        "output": run.stdout.rstrip(),
    }


def markdown(rows: list[tuple[str, dict]]) -> str:
    lines = ["# tpplan tune: time to an answer", "",
             f"`python benchmarks/tune_speed.py` on {os.cpu_count()} CPUs ({time.strftime('%Y-%m-%d')}), "
             "one run each in a fresh process: the search alone (the check of the chosen spec comes after "
             "it, with -o only). Wall time is the process's, start-up and imports included; CPU time adds "
             "its forked workers'.", "",
             "| case | candidates (fit) | distinct steps simulated | wall | CPU (all processes) "
             "| load average before / after |",
             "|---|---:|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['candidates']} ({r['fit']}) | {r['shapes']} | {r['wall_s']:.0f} s | "
                     f"{r['cpu_s']:.0f} s | {r['load_before']} / {r['load_after']} |")
    for _, r in rows:
        lines += ["", f"`{r['command']}`:", "", "```", r["output"], "```"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, help="tune's --jobs (default: its own, the CPU cores)")
    parser.add_argument("--dry-run", action="store_true", help="print the report only")
    args = parser.parse_args(argv)
    rows = [(name, one(spec, extra, args.jobs)) for name, spec, extra in CASES]
    report = markdown(rows)
    print(report)
    if args.dry_run:
        return 0
    REPORT.write_text(report)
    readme = README.read_text()
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"README.md has no {README_BEGIN!r} ... {README_END!r} section")
    body = "\n".join(("##" + line) if line.startswith("#") else line for line in report.splitlines())
    README.write_text(readme[: begin + len(README_BEGIN)] + "\n" + body + "\n" + readme[end:])
    return 0


if __name__ == "__main__":
    sys.exit(main())
