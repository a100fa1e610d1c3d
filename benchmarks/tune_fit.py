"""Fit `tpplan tune`'s efficiency model on published runs, and report how well it predicts the others.

    python benchmarks/tune_fit.py [--resimulate] [--jobs N] [--dry-run]

For every run of benchmarks/tune_runs.yaml: the run's step is simulated exactly as `tpplan tune`
simulates a candidate (tpplan.tune.search.simulate_shape: the spec's model, mesh, checkpointing,
micro-batch and sequence, with the FLOP counter alongside) and cached in benchmarks/tune_features.json
(until the run's configuration changes, or --resimulate).  Then, with no simulator involved:

1. fit: the efficiency parameters (tpplan.tune.cost.Efficiency) that minimise the mean squared log
   error of predicted against published tokens/s per GPU over the runs whose split is `fit`
   (Nelder-Mead from several starts, each parameter within its bounds);
2. evaluate: every run's prediction and error, the median absolute error over the `test` runs (never
   fitted: a run is not tuned to itself) and over the `fit` runs, and for each published comparison
   whether the predicted ranking of its two runs agrees with the published one.

Writes tpplan/tune/efficiency.yaml (the parameters tune uses, with what they were fitted on),
benchmarks/tune_fit.md (the report) and the README's section between its tune-fit markers.
--dry-run prints the report and writes none of these (the cache is written either way).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import hashlib
import json
import math
import os
import random
import statistics
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
RUNS = REPO / "benchmarks" / "tune_runs.yaml"
FEATURES = REPO / "benchmarks" / "tune_features.json"
REPORT = REPO / "benchmarks" / "tune_fit.md"
README = REPO / "README.md"
BASE_SPEC = REPO / "specs" / "llama3.yaml"
DEVICES = REPO / "benchmarks" / "devices"
README_BEGIN = ("<!-- benchmarks/tune_fit.md begins: written by benchmarks/tune_fit.py, "
                "do not edit by hand -->")
README_END = "<!-- benchmarks/tune_fit.md ends -->"

# each parameter's bounds: efficiencies are fractions of a peak; memory_compiled may exceed 1 (torch.compile
# fuses elementwise ops: fewer bytes move than the eager ops counted); async_tp_hidden is a share
BOUNDS = {
    "matmul": (0.05, 1.0), "matmul_float8": (0.05, 1.0), "attention": (0.05, 1.0),
    "memory_eager": (0.05, 1.0),
    "memory_compiled": (0.05, 4.0), "comm_nvlink": (0.05, 1.0), "comm_network": (0.05, 1.0),
    "async_tp_hidden": (0.0, 1.0),
}


@functools.cache
def device(name: str):
    from tpplan.tune.profiles import load_device

    own = DEVICES / f"{name}.yaml"
    return load_device(str(own) if own.is_file() else name)


def run_overrides(run: dict, models: dict) -> list:
    """--set items that turn specs/llama3.yaml into the run's spec."""
    model = models[run["model"]]
    items = [("run", f"model.{key}={json.dumps(value)}") for key, value in model.items()]
    if "config" in model:
        items.append(("run", "model.dtype=bfloat16"))
    items += [("run", f"train.seq_length={run['seq']}"),
              ("run", f"launch.nproc_per_node={min(8, run['gpus'])}")]
    if run.get("precision"):
        items.append(("run", f"train.precision={run['precision']}"))
    return items


@functools.cache
def _counter_code() -> str:
    """The FLOP counter's and the simulator's code (their syntax trees: comments and line breaks aside):
    a change to either re-simulates every run."""
    import ast

    import tpplan.simulate.simulator
    import tpplan.tune.flops

    modules = (tpplan.tune.flops, tpplan.simulate)
    return "".join(ast.dump(ast.parse(Path(m.__file__).read_text())) for m in modules)


def run_key(run: dict, models: dict) -> str:
    """What the simulated step depends on: a change re-simulates the run."""
    shape = {k: run[k] for k in ("model", "device", "gpus", "tp", "seq", "micro_batch", "ac")}
    shape.update(model=models[run["model"]], precision=run.get("precision"), code=_counter_code())
    return hashlib.sha256(json.dumps(shape, sort_keys=True).encode()).hexdigest()[:16]


def simulate_run(run: dict, models: dict) -> dict:
    from tpplan.spec.loader import load_spec
    from tpplan.tune.search import candidate_memory, simulate_shape

    spec = load_spec(BASE_SPEC, run_overrides(run, models))
    profile = device(run["device"])
    dp = run["gpus"] // run["tp"]
    shape = simulate_shape(spec, tp=run["tp"], ep=1, dp=dp, ac=run["ac"], batch=run["micro_batch"],
                           seq=run["seq"], device=profile)
    memory = candidate_memory(shape, accumulation=run["accumulation"], device=profile)
    return {
        "key": run_key(run, models),
        "work": shape.work.to_dict(),
        "micro": [[dim, op, count, ring] for (dim, op), (count, ring) in sorted(shape.micro.items())],
        "per_step": [[dim, op, count, ring] for (dim, op), (count, ring) in sorted(shape.per_step.items())],
        "float8_saved": shape.float8_saved,
        "params_bytes_per_rank": shape.params_with_fsdp * shape.bytes_per_param,
        "layers": shape.layers,
        "memory_gib": round(memory["total_bytes"] / 2**30, 2),
        "seconds": round(shape.seconds, 2),
    }


def features(runs: list[dict], models: dict, *, resimulate: bool) -> dict:
    """Each run's simulated step, by run id; runs of one step shape (the same run with float8, compile
    or async TP, which change nothing the simulator measures) share one simulation.  The cache file is
    written as soon as the simulations are done."""
    cached = json.loads(FEATURES.read_text()) if FEATURES.is_file() and not resimulate else {}
    shapes = {}
    for n, run in enumerate(runs, 1):
        key = run_key(run, models)
        if key not in shapes:
            if key in cached:
                shapes[key] = cached[key]
            else:
                print(f"[{n}/{len(runs)}] simulating {run['id']}", file=sys.stderr, flush=True)
                shapes[key] = simulate_run(run, models)
    FEATURES.write_text(json.dumps(shapes, indent=1, sort_keys=True) + "\n")
    return {run["id"]: shapes[run_key(run, models)] for run in runs}


@functools.cache
def _static(run_id: str) -> dict:
    """What the cost model takes for a run besides the efficiencies (built once per run)."""
    from tpplan.tune.cost import Mesh, Settings, Traffic
    from tpplan.tune.flops import StepWork

    run, feat = _RUNS[run_id], _FEATS[run_id]
    profile = device(run["device"])
    return dict(
        work=StepWork(**feat["work"]), micro=[Traffic(*t) for t in feat["micro"]],
        per_step=[Traffic(*t) for t in feat["per_step"]], float8_saved_ring_bytes=feat["float8_saved"],
        mesh=Mesh(run["gpus"] // run["tp"], 1, run["tp"], min(profile.gpus_per_node, run["gpus"])),
        accumulation=run["accumulation"],
        tokens_per_rank=run["micro_batch"] * run["accumulation"] * run["seq"],
        params_bytes_per_rank=feat["params_bytes_per_rank"], blocks=feat["layers"], device=profile,
        settings=Settings(float8=run["float8"], compile=run["compile"] or run.get("fused", False),
                          async_tp=run["async_tp"]))


_RUNS: dict = {}
_FEATS: dict = {}


def predict(run: dict, feat: dict, eff) -> float:
    from tpplan.tune.cost import predict as cost_predict

    _RUNS.setdefault(run["id"], run)
    _FEATS.setdefault(run["id"], feat)
    return cost_predict(**_static(run["id"]), eff=eff).tokens_per_s_per_gpu


# ------------------------------------------------------------------------------------------------
# the fit: Nelder-Mead on a box (each parameter through a logistic map into its bounds)
# ------------------------------------------------------------------------------------------------


def _to_params(x: list[float]):
    from tpplan.tune.cost import Efficiency

    values = {}
    for (name, (lo, hi)), v in zip(BOUNDS.items(), x, strict=True):
        values[name] = lo + (hi - lo) / (1 + math.exp(-max(-50.0, min(50.0, v))))
    return Efficiency(**values)


def _from_params(eff) -> list[float]:
    x = []
    for name, (lo, hi) in BOUNDS.items():
        share = min(max((getattr(eff, name) - lo) / (hi - lo), 1e-6), 1 - 1e-6)
        x.append(math.log(share / (1 - share)))
    return x


def loss(eff, runs: list[dict], feats: dict) -> float:
    return statistics.fmean(math.log(predict(r, feats[r["id"]], eff) / r["tokens_per_s_per_gpu"]) ** 2
                            for r in runs)


def nelder_mead(f, x0: list[float], *, steps: int = 1500, scale: float = 0.7) -> tuple[list[float], float]:
    n = len(x0)
    simplex = [list(x0)] + [[x0[j] + (scale if j == i else 0.0) for j in range(n)] for i in range(n)]
    values = [f(x) for x in simplex]
    for _ in range(steps):
        order = sorted(range(n + 1), key=values.__getitem__)
        simplex, values = [simplex[i] for i in order], [values[i] for i in order]
        if values[-1] - values[0] < 1e-10:
            break
        centroid = [sum(p[j] for p in simplex[:-1]) / n for j in range(n)]
        worst = simplex[-1]
        reflected = [c + (c - w) for c, w in zip(centroid, worst, strict=True)]
        fr = f(reflected)
        if fr < values[0]:
            expanded = [c + 2 * (c - w) for c, w in zip(centroid, worst, strict=True)]
            fe = f(expanded)
            simplex[-1], values[-1] = (expanded, fe) if fe < fr else (reflected, fr)
        elif fr < values[-2]:
            simplex[-1], values[-1] = reflected, fr
        else:
            contracted = [c + 0.5 * (w - c) for c, w in zip(centroid, worst, strict=True)]
            fc = f(contracted)
            if fc < values[-1]:
                simplex[-1], values[-1] = contracted, fc
            else:
                best = simplex[0]
                simplex = [best] + [[b + 0.5 * (p - b) for b, p in zip(best, q, strict=True)]
                                    for q in simplex[1:]]
                values = [values[0]] + [f(x) for x in simplex[1:]]
    i = min(range(n + 1), key=values.__getitem__)
    return simplex[i], values[i]


def fit(runs: list[dict], feats: dict, *, starts: int = 8, seed: int = 0):
    from tpplan.tune.cost import Efficiency

    rng = random.Random(seed)
    objective = lambda x: loss(_to_params(x), runs, feats)  # noqa: E731
    best_x, best = _from_params(Efficiency()), float("inf")
    for start in range(starts):
        x0 = _from_params(Efficiency()) if start == 0 else [rng.uniform(-2.5, 2.5) for _ in BOUNDS]
        x, value = nelder_mead(objective, x0)
        x, value = nelder_mead(objective, x)  # a restart from the end point
        if value < best:
            best_x, best = x, value
    return _to_params(best_x), best


# ------------------------------------------------------------------------------------------------
# report
# ------------------------------------------------------------------------------------------------


def evaluate(data: dict, feats: dict, eff) -> dict:
    rows = []
    for run in data["runs"]:
        predicted = predict(run, feats[run["id"]], eff)
        published = run["tokens_per_s_per_gpu"]
        rows.append({"id": run["id"], "split": run["split"], "stack": run["stack"], "device": run["device"],
                     "published": published, "predicted": round(predicted, 1),
                     "error": round(100 * (predicted - published) / published, 1),
                     "memory_gib": feats[run["id"]]["memory_gib"],
                     "published_memory_gib": run.get("memory_gib")})
    by_id = {r["id"]: r for r in rows}
    comparisons = []
    for c in data["comparisons"]:
        a, b = by_id[c["a"]], by_id[c["b"]]
        published = a["published"] < b["published"]
        predicted = a["predicted"] < b["predicted"]
        comparisons.append({**c, "published_ratio": round(b["published"] / a["published"], 3),
                            "predicted_ratio": round(b["predicted"] / a["predicted"], 3),
                            "agrees": published == predicted,
                            "held_out": "test" in (a["split"], b["split"])})
    errors = {split: [abs(r["error"]) for r in rows if r["split"] == split] for split in ("fit", "test")}
    return {
        "rows": rows, "comparisons": comparisons,
        "median_test_error": round(statistics.median(errors["test"]), 1),
        "median_fit_error": round(statistics.median(errors["fit"]), 1),
        "mean_test_error": round(statistics.fmean(errors["test"]), 1),
        "agreeing": sum(c["agrees"] for c in comparisons), "comparisons_total": len(comparisons),
    }


def markdown(data: dict, result: dict, eff, *, command: str, seconds: float) -> str:
    lines = [
        "# tpplan tune: published runs against the cost model's predictions",
        "",
        f"`{command}` ({datetime.date.today().isoformat()}): each run of "
        "`benchmarks/tune_runs.yaml` (its source, model, device, mesh and settings) simulated as "
        "`tpplan tune` simulates a candidate, the efficiency model fitted on the runs marked *fit* and "
        f"evaluated on all. Simulating the runs took {seconds:.0f} s (cached in "
        "benchmarks/tune_features.json).",
        "",
        f"**Median error on the {sum(r['split'] == 'test' for r in result['rows'])} held-out runs: "
        f"{result['median_test_error']}%** (mean {result['mean_test_error']}%); on the "
        f"{sum(r['split'] == 'fit' for r in result['rows'])} fitted runs {result['median_fit_error']}%. "
        f"Predicted ranking agrees with the published one in {result['agreeing']} of "
        f"{result['comparisons_total']} comparisons.",
        "",
        "Fitted parameters (tpplan/tune/efficiency.yaml): "
        + ", ".join(f"{k} {getattr(eff, k):.3f}" for k in BOUNDS) + ".",
        "",
        "| run | split | stack | device | published tok/s/GPU | predicted | error "
        "| memory: published / simulated |",
        "|---|---|---|---|---:|---:|---:|---:|",
    ]
    for r in result["rows"]:
        published_memory = f"{r['published_memory_gib']:.1f}" if r["published_memory_gib"] else "-"
        lines.append(f"| {r['id']} | {r['split']} | {r['stack']} | {r['device']} | {r['published']:,} | "
                     f"{r['predicted']:,.0f} | {r['error']:+.1f}% | {published_memory} / "
                     f"{r['memory_gib']:.1f} GiB |")
    lines += ["", "| comparison | runs a -> b | published b/a | predicted b/a | ranking "
              "| a held-out run in it |",
              "|---|---|---:|---:|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['setting']} | {c['a']} -> {c['b']} | {c['published_ratio']:.3f} | "
                     f"{c['predicted_ratio']:.3f} | {'agrees' if c['agrees'] else '**disagrees**'} | "
                     f"{'yes' if c['held_out'] else 'no'} |")
    return "\n".join(lines) + "\n"


def write_efficiency(eff, fit_ids: list[str], result: dict, command: str) -> None:
    from tpplan.tune.cost import efficiency_path

    text = (
        "# The efficiency model of `tpplan tune`'s cost model (tpplan/tune/cost.py), fitted by\n"
        f"# `{command}` on the published runs named below (benchmarks/tune_runs.yaml, split: fit).\n"
        "# Do not edit by hand: run the script again.\n"
        + yaml.safe_dump({
            "parameters": {k: round(getattr(eff, k), 4) for k in BOUNDS},
            "fitted_on": fit_ids,
            "median_test_error": f"{result['median_test_error']}%",
            "median_fit_error": f"{result['median_fit_error']}%",
            "comparisons_agreeing": f"{result['agreeing']} of {result['comparisons_total']}",
            "date": datetime.date.today().isoformat(),
        }, sort_keys=False)
    )
    efficiency_path().write_text(text)


def readme_with(readme: str, report: str) -> str:
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise SystemExit(f"README.md has no {README_BEGIN!r} ... {README_END!r} section")
    body = "\n".join(("##" + line) if line.startswith("#") else line for line in report.splitlines())
    return readme[: begin + len(README_BEGIN)] + "\n" + body.strip("\n") + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resimulate", action="store_true",
                        help="simulate every run again (ignore the cache)")
    parser.add_argument("--dry-run", action="store_true", help="print the report; write nothing")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import time

    command = "python benchmarks/tune_fit.py" + (" --resimulate" if args.resimulate else "")
    data = yaml.safe_load(RUNS.read_text())
    started = time.perf_counter()
    feats = features(data["runs"], data["models"], resimulate=args.resimulate)
    seconds = sum(f["seconds"] for f in {f["key"]: f for f in feats.values()}.values())
    fit_runs = [r for r in data["runs"] if r["split"] == "fit"]
    eff, value = fit(fit_runs, feats)
    result = evaluate(data, feats, eff)
    report = markdown(data, result, eff, command=command, seconds=seconds)
    print(report)
    print(f"fit loss {value:.4f}; {time.perf_counter() - started:.0f} s", file=sys.stderr)
    if args.dry_run:
        return 0
    write_efficiency(eff, [r["id"] for r in fit_runs], result, command)
    REPORT.write_text(report)
    README.write_text(readme_with(README.read_text(), report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
