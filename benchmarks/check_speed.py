"""How long `tpplan check` takes on the shipped tiny spec, against the floor of importing torch+transformers.

    python benchmarks/check_speed.py [--rounds 3] [--spec specs/tiny-llama.yaml]
                                     [--out benchmarks/check_speed]

Each round runs, one after another in fresh processes: ``python -c "import torch, transformers"`` (the floor
every check pays at least once), the spec's model built on the meta device (transformers imports a model's
classes only when it is built: every command that needs the model pays that too), ``tpplan check SPEC --json`` (the command as users run it: its ranks
forked from the command, which has imported torch and transformers already) and the same check with
``--launcher torchrun`` (torchrun starts each rank in a fresh interpreter, which imports them again), each
timed wall clock, interpreter start to exit.  Reported: the median of each over the rounds and its ratio to the
floor's median, taken in one run (the machine is shared and noisy: ratios, not seconds, compare).  Writes
OUT.json and OUT.md.  Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
       "TOKENIZERS_PARALLELISM": "false"}


MODEL = ("import sys, torch, transformers; from tpplan.spec.loader import load_spec; "
         "from tpplan.plan.stage import model_source; model_source(load_spec(sys.argv[1])).build(device='meta')")


def timed(argv: list[str]) -> float:
    started = time.perf_counter()
    done = subprocess.run(argv, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
    seconds = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}:\n{done.stderr[-2000:]}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--spec", default="specs/tiny-llama.yaml")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "check_speed"))
    args = parser.parse_args(argv)
    commands = {
        "floor": [sys.executable, "-c", "import torch, transformers"],
        "model": [sys.executable, "-c", MODEL, args.spec],
        "check": [sys.executable, "-m", "tpplan", "check", args.spec, "--json"],
        "check_torchrun": [sys.executable, "-m", "tpplan", "check", args.spec, "--json", "--launcher", "torchrun"],
    }
    times: dict[str, list[float]] = {name: [] for name in commands}
    load = os.getloadavg()
    for _ in range(args.rounds):
        for name, command in commands.items():
            times[name].append(round(timed(command), 2))
    medians = {name: statistics.median(values) for name, values in times.items()}
    floor = medians["floor"]
    invocation = "python benchmarks/check_speed.py " + " ".join(argv if argv is not None else sys.argv[1:])
    result = {"command": invocation, "spec": args.spec, "rounds": args.rounds,
              "load_average_at_start": [round(x, 2) for x in load], "seconds": times, "median_s": medians,
              "ratio_to_floor": {name: round(medians[name] / floor, 2)
                                 for name in commands if name != "floor"}}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    load_text = " / ".join(map(str, result["load_average_at_start"]))
    lines = [f"Command: `{result['command'].strip()}` (load average at start {load_text})",
             "", "| what | median s | / floor | runs s |", "|---|---:|---:|---|"]
    labels = {"floor": '`python -c "import torch, transformers"`',
              "model": "the same, then the spec's model built on the meta device (its classes imported: what "
                       "every command that builds the model pays)",
              "check": f"`tpplan check {args.spec}` (ranks forked, the default)",
              "check_torchrun": "the same check with `--launcher torchrun` (a fresh interpreter per rank)"}
    for name in commands:
        ratio = "1.00" if name == "floor" else f"{result['ratio_to_floor'][name]:.2f}"
        runs = ", ".join(map(str, times[name]))
        lines.append(f"| {labels[name]} | {medians[name]:.1f} | {ratio} | {runs} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
