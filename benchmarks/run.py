"""tpplan's benchmarks, one entry point: does tpplan cost nothing, and how much communication does it save?

    python benchmarks/run.py [--quick] [--json] [--out benchmarks/results] [--only step,compile,plan,bytes,cuda]
                             [--dry-run]

Prints a Markdown report (or, with --json, the raw numbers) and writes it to OUT.md (and the raw
numbers to OUT.json), with the command and the machine; a complete run to the default OUT also
rewrites the benchmarks section of README.md.  Five sections:

1. step    step time of `tpplan run benchmarks/specs/step-time.yaml` against benchmarks/handwritten_tp.py
           (the same model, plan, batch shape and optimizer written by hand), 2 CPU gloo ranks,
           interleaved runs A B A B ...; per run the median forward+backward+update time of the steps
           after warm-up, then the median over pairs of the per-pair ratio tpplan / hand-written.
1b. compile  step time of `tpplan run specs/tiny-llama.yaml` with train.compile (each block through
           torch.compile, inductor) against without, 2 CPU gloo ranks, interleaved: the median per-pair
           ratio compiled / eager of the steps after warm-up (the compiling steps), and the compile time.
2. plan    wall time and peak RSS of `tpplan plan` for Llama-3.1-8B, 70B and 405B, each in a fresh process.
3. bytes   bytes each rank sends per training step under four Llama-3.1-8B plans (benchmarks/comm_bytes.py).
4. cuda    tokens/s and peak CUDA memory at tp=1 on the Llama-3.2-1B config (random init, bf16),
           tpplan against hand-written; then tpplan alone with torch.compile, with float8 linears
           (compute capability 8.9+) and with async TP (9.0+, two GPUs or more); skipped, with what it
           would run, where CUDA (or the capability) is not available.

Exit status: 0 when everything ran (whatever the numbers), 1 when something failed to run.
No number is asserted: this reports, it does not judge.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEP_SPEC = HERE / "specs" / "step-time.yaml"
GPU_SPEC = HERE / "specs" / "gpu-1b.yaml"
HANDWRITTEN = HERE / "handwritten_tp.py"
SECTIONS = ("step", "compile", "plan", "bytes", "cuda")
COMPILE_SPEC = REPO / "specs" / "tiny-llama.yaml"
WORK_ROOT = ""  # the temporary folder of this run: `$TMP` in the commands shown
MIB = 2**20
GIB = 2**30

# the environment of every child process: one thread per rank (2 ranks on 2 cores), nothing online
CHILD_ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONUNBUFFERED": "1",
}

# (section 2) model, the arguments of `tpplan plan`, the mesh and the batch in words
PLAN_CASES = [
    ("Llama-3.1-8B", ["specs/llama3.yaml"], "tp=8 x dp=1: one 8-GPU node", "16 x 1024"),
    ("Llama-3.1-70B", ["specs/llama3.yaml", "--set", "model.name=meta-llama/Llama-3.1-70B", "--dp", "8",
                       "--batch-size", "4"], "tp=8 x dp=8: 8 nodes, FSDP over dp", "4 x 1024"),
    ("Llama-3.1-405B", ["specs/llama3-405b.yaml"], "tp=8 x dp=64: 64 nodes, FSDP over dp", "1 x 2048"),
]

# (sections 1 and 4) steps per run, runs per tool, steps skipped as warm-up
SETTINGS = {
    "full": {"pairs": 6, "steps": 15, "warmup": 3, "cuda_pairs": 3, "cuda_steps": 30, "cuda_warmup": 5,
             "compile_pairs": 3, "compile_steps": 40, "compile_warmup": 5},
    "quick": {"pairs": 4, "steps": 8, "warmup": 3, "cuda_pairs": 2, "cuda_steps": 15, "cuda_warmup": 5,
              "compile_pairs": 2, "compile_steps": 25, "compile_warmup": 5},
}

# (section 4) tpplan alone on a GPU with each GPU feature: name, --set items, the compute capability
# it needs, the GPUs it needs (async TP overlaps tp collectives: tp >= 2)
CUDA_FEATURES = [
    ("torch.compile", ["train.compile=true"], (7, 0), 1),
    ("float8 linears + compile", ["train.compile=true", "train.float8=true"], (8, 9), 1),
    ("async TP + compile, tp=2", ["train.compile=true", "mesh.async_tp=true", "mesh.tp=2"], (9, 0), 2),
]

# runs a tpplan command in this process and writes its peak RSS (KiB on Linux) to $TPPLAN_BENCH_RUSAGE
RUSAGE_WRAPPER = """\
import json, os, resource, sys
from tpplan.cli import main
code = main(sys.argv[1:])
peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
with open(os.environ["TPPLAN_BENCH_RUSAGE"], "w") as f:
    json.dump({"code": code, "maxrss_kib": peak}, f)
sys.exit(code)
"""


class Failed(Exception):
    """A benchmark could not run (a command failed): reported, and the exit status becomes 1."""


def log(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def child_env(**extra: str) -> dict:
    return {**os.environ, **CHILD_ENV, **extra}


def run_command(argv: list[str], *, env: dict, timeout: float, what: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        raise Failed(f"{what}: no result after {timeout:.0f} s: {shlex.join(argv)}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise Failed(f"{what}: exit status {proc.returncode}: {shlex.join(argv)}\n{tail}")
    return proc


def show(argv: list[str]) -> str:
    """A command as a reader would type it: `tpplan ...` and `torchrun ...`, paths relative to the repo."""
    words = list(argv)
    if words[:3] == [sys.executable, "-m", "tpplan"]:
        words = ["tpplan", *words[3:]]
    elif words[:3] == [sys.executable, "-m", "torch.distributed.run"]:
        words = ["torchrun", *words[3:]]
    elif words[:1] == [sys.executable]:
        words = ["python", *words[1:]]
    out = []
    for word in words:
        with contextlib.suppress(ValueError):
            word = str(Path(word).relative_to(REPO)) if word.startswith("/") else word
        out.append(word)
    text = shlex.join(out)
    return text.replace(WORK_ROOT, "$TMP") if WORK_ROOT else text


# ------------------------------------------------------------------------------------------
# The machine
# ------------------------------------------------------------------------------------------


def machine() -> dict:
    import torch
    import transformers

    import tpplan

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                                text=True, timeout=10).stdout.strip() or None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cores": usable,
        "logical_cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GIB, 1)
        if hasattr(os, "sysconf") else None,
        "gpu": gpu,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tpplan": tpplan.__version__,
        "commit": commit,
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def machine_line(m: dict) -> str:
    gpu = m["gpu"] or "no GPU"
    load = f", load average at start {' / '.join(str(x) for x in m['load_average_at_start'])}" \
        if m.get("load_average_at_start") else ""
    return (f"{m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB, {gpu}; {m['os']}, Python {m['python']}, "
            f"torch {m['torch']}, transformers {m['transformers']}, tpplan {m['tpplan']}"
            f"{' (' + m['commit'] + ')' if m['commit'] else ''}; {m['date']}{load}")


# ------------------------------------------------------------------------------------------
# 1 and 4: step time, tpplan against hand-written
# ------------------------------------------------------------------------------------------


def tpplan_run_argv(spec: Path, save_dir: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "tpplan", "run", str(spec), "--max-steps", str(steps),
            "--set", f"train.save_dir={save_dir}", "--set", "train.log_freq=1", "--set", "train.ckpt_freq=null"]


def handwritten_argv(out: Path, steps: int, nproc: int = 2, extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc),
            str(HANDWRITTEN), "--steps", str(steps), "--out", str(out), *(extra or [])]


def data_args(spec_path: Path) -> list[str]:
    """handwritten_tp.py's --data and --bpe-vocab for a spec: the same corpus, tokenizer and rows."""
    from tpplan.spec.loader import load_spec

    spec = load_spec(spec_path, [])
    (data,) = spec.train.data_files
    return ["--data", str((spec_path.parent / data).resolve()), "--bpe-vocab", str(spec.model.tokenizer.vocab_size)]


def describe_spec(spec_path: Path, sets: list[str] | None = None) -> dict:
    """What a benchmark runs, read from its spec (not written here as prose): the model, batch, mesh
    and training settings."""
    from tpplan.model.sources import load_config
    from tpplan.spec.loader import load_spec
    from tpplan.spec.schema import training_precision

    spec = load_spec(spec_path, sets or [])
    c = load_config(spec.model, spec_path.parent)
    model = (f"{type(c).__name__.removesuffix('Config')}, hidden {c.hidden_size}, intermediate {c.intermediate_size}, "
             f"{c.num_hidden_layers} layers, {c.num_attention_heads} heads / {c.num_key_value_heads} kv heads, "
             f"vocab {c.vocab_size}")
    train = spec.train
    return {
        "model": model,
        "batch": f"{train.batch_size} x {train.seq_length} tokens per step per dp rank",
        "mesh": f"tp={spec.mesh.tp} on {spec.mesh.device}",
        "training": f"{training_precision(spec)}, activation checkpointing {train.activation_checkpointing}, "
                    f"AdamW (lr {train.lr:g}, weight decay {train.weight_decay:g}), "
                    + (f"gradient clipping at {train.max_grad_norm:g}" if train.max_grad_norm else "no gradient clipping")
                    + (", torch.compile per block" if train.compile else ""),
    }


def loss_difference(records: list[dict], losses: list[float]) -> float:
    """The largest difference between the per-step losses of the two runs (same seed, same batches)."""
    return max(abs(r["loss"] - x) for r, x in zip(records, losses, strict=True))


def tpplan_steps(run_dir: Path, steps: int) -> tuple[list[dict], list[dict]]:
    """The per-step phase times (ms) and memory records of a `tpplan run`: metrics.jsonl with
    log_freq=1 holds one record per step whose time_ms is that step's (a mean over one step)."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    per_step = [r for r in records if "time_ms" in r]
    found = [r["step"] for r in per_step]
    if found != list(range(1, steps + 1)):
        raise Failed(f"{run_dir}/metrics.jsonl: expected one record per step 1..{steps}, got steps {found} "
                     "(is train.log_freq 1, and was the run dir fresh?)")
    return [r["time_ms"] for r in per_step], per_step


def summarize_run(times: list[dict], warmup: int) -> dict:
    """Medians over the steps after warm-up: forward+backward+update (the compared number), each
    phase, and the whole step as the tool reports it."""
    kept = times[warmup:]
    if not kept:
        raise Failed(f"no steps left after skipping {warmup} warm-up steps")
    fbu = [t["forward"] + t["backward"] + t["update"] for t in kept]
    out = {"fbu_ms": statistics.median(fbu), "steps_measured": len(kept)}
    for phase in ("data", "forward", "backward", "update", "step"):
        if all(phase in t for t in kept):
            out[f"{phase}_ms"] = statistics.median(t[phase] for t in kept)
    return out


def summarize_pairs(pairs: list[dict]) -> dict:
    """The per-pair ratios tpplan / hand-written and their median, min and max."""
    for pair in pairs:
        pair["ratio"] = pair["tpplan"]["fbu_ms"] / pair["handwritten"]["fbu_ms"]
    ratios = [pair["ratio"] for pair in pairs]
    phases = {}
    for phase in ("forward", "backward", "update"):
        values = [p["tpplan"][f"{phase}_ms"] / p["handwritten"][f"{phase}_ms"] for p in pairs]
        phases[phase] = statistics.median(values)
    return {
        "ratio_median": statistics.median(ratios),
        "ratio_min": min(ratios),
        "ratio_max": max(ratios),
        "phase_ratio_median": phases,
        "tpplan_fbu_ms_median": statistics.median(p["tpplan"]["fbu_ms"] for p in pairs),
        "handwritten_fbu_ms_median": statistics.median(p["handwritten"]["fbu_ms"] for p in pairs),
    }


def same_config(handwritten_config: dict, spec_path: Path) -> list[str]:
    """The keys on which the hand-written model's config differs from the spec's (empty: the same model)."""
    from tpplan.model.sources import load_config
    from tpplan.spec.loader import load_spec

    spec = load_spec(spec_path, [])
    ours = json.loads(json.dumps(load_config(spec.model, spec_path.parent).to_dict(), default=str))  # as JSON holds it
    ignore = {"transformers_version", "use_cache", "dtype", "torch_dtype", "_name_or_path", "architectures"}
    keys = (set(ours) | set(handwritten_config)) - ignore
    return sorted(k for k in keys if ours.get(k) != handwritten_config.get(k))


def step_time(settings: dict, work: Path, dry_run: bool) -> dict:
    pairs_n, steps, warmup = settings["pairs"], settings["steps"], settings["warmup"]
    extra = data_args(STEP_SPEC)
    a0 = tpplan_run_argv(STEP_SPEC, work / "step-A1", steps)
    b0 = handwritten_argv(work / "step-B1.json", steps, extra=extra)
    result = {
        "spec": str(STEP_SPEC.relative_to(REPO)),
        **describe_spec(STEP_SPEC),
        "pairs": pairs_n, "steps": steps, "warmup_steps": warmup,
        "commands": {"tpplan": show(a0), "handwritten": show(b0)},
    }
    if dry_run:
        return result
    runs = []
    for i in range(1, pairs_n + 1):
        pair = {}
        # A: tpplan run, a fresh run dir (an existing one would resume from its checkpoints)
        save_dir = work / f"step-A{i}"
        argv = tpplan_run_argv(STEP_SPEC, save_dir, steps)
        start = time.perf_counter()
        run_command(argv, env=child_env(), timeout=900, what=f"tpplan run (pair {i})")
        wall = time.perf_counter() - start
        times, records = tpplan_steps(save_dir / "step-time", steps)
        pair["tpplan"] = {**summarize_run(times, warmup), "process_s": wall, "per_step_ms": times,
                          "loss": [r["loss"] for r in records]}
        # B: hand-written
        out = work / f"step-B{i}.json"
        argv = handwritten_argv(out, steps, extra=extra)
        start = time.perf_counter()
        run_command(argv, env=child_env(), timeout=900, what=f"handwritten_tp.py (pair {i})")
        wall = time.perf_counter() - start
        data = json.loads(out.read_text())
        pair["handwritten"] = {**summarize_run(data["time_ms"], warmup), "process_s": wall,
                               "per_step_ms": data["time_ms"], "loss": data["loss"]}
        pair["max_loss_difference"] = loss_difference(records, data["loss"])
        if i == 1:
            result["config_differences"] = same_config(data["config"], STEP_SPEC)
            if result["config_differences"]:
                raise Failed("handwritten_tp.py builds another model than the spec: config keys differ: "
                             + ", ".join(result["config_differences"]))
        t, h = pair["tpplan"]["fbu_ms"], pair["handwritten"]["fbu_ms"]
        log(f"step time pair {i}/{pairs_n}: tpplan {t:.0f} ms, hand-written {h:.0f} ms, ratio {t / h:.3f}")
        runs.append(pair)
    result["runs"] = runs
    result["max_loss_difference"] = max(p["max_loss_difference"] for p in runs)
    result.update(summarize_pairs(runs))
    return result


def compile_time(settings: dict, work: Path, dry_run: bool) -> dict:
    """The tiny spec with and without train.compile, interleaved pairs (eager, compiled, ...)."""
    pairs_n, steps, warmup = settings["compile_pairs"], settings["compile_steps"], settings["compile_warmup"]
    compiled_sets = ["--set", "train.compile=true"]
    result = {
        "spec": str(COMPILE_SPEC.relative_to(REPO)), **describe_spec(COMPILE_SPEC),
        "pairs": pairs_n, "steps": steps, "warmup_steps": warmup,
        "commands": {"eager": show(tpplan_run_argv(COMPILE_SPEC, work / "eager-1", steps)),
                     "compiled": show(tpplan_run_argv(COMPILE_SPEC, work / "compiled-1", steps) + compiled_sets)},
    }
    if dry_run:
        return result
    name = describe_name(COMPILE_SPEC)
    runs = []
    for i in range(1, pairs_n + 1):
        pair = {}
        for side, extra in (("eager", []), ("compiled", compiled_sets)):
            save_dir = work / f"{side}-{i}"
            start = time.perf_counter()
            run_command(tpplan_run_argv(COMPILE_SPEC, save_dir, steps) + extra, env=child_env(), timeout=1800,
                        what=f"tpplan run, {side} (pair {i})")
            wall = time.perf_counter() - start
            times, records = tpplan_steps(save_dir / name, steps)
            first = times[0]["forward"] + times[0]["backward"] + times[0]["update"]
            pair[side] = {**summarize_run(times, warmup), "process_s": wall, "first_step_ms": first,
                          "per_step_ms": times, "loss": [r["loss"] for r in records]}
        pair["ratio"] = pair["compiled"]["fbu_ms"] / pair["eager"]["fbu_ms"]
        # the fastest measured step of each run: what a step costs when nothing else competes for
        # the cores (on a shared machine the medians carry the other load)
        fastest = {side: min(t["forward"] + t["backward"] + t["update"] for t in pair[side]["per_step_ms"][warmup:])
                   for side in ("eager", "compiled")}
        pair["fastest_ratio"] = fastest["compiled"] / fastest["eager"]
        pair["max_loss_difference"] = max(abs(a - b) for a, b in zip(pair["eager"]["loss"], pair["compiled"]["loss"],
                                                                         strict=True))
        log(f"compile pair {i}/{pairs_n}: eager {pair['eager']['fbu_ms']:.1f} ms, compiled "
            f"{pair['compiled']['fbu_ms']:.1f} ms, ratio {pair['ratio']:.3f}")
        runs.append(pair)
    ratios = [p["ratio"] for p in runs]
    result.update(runs=runs, ratio_median=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
                  fastest_ratio_median=statistics.median(p["fastest_ratio"] for p in runs),
                  eager_fbu_ms_median=statistics.median(p["eager"]["fbu_ms"] for p in runs),
                  compiled_fbu_ms_median=statistics.median(p["compiled"]["fbu_ms"] for p in runs),
                  compiled_first_step_ms_max=max(p["compiled"]["first_step_ms"] for p in runs),
                  max_loss_difference=max(p["max_loss_difference"] for p in runs))
    return result


def describe_name(spec_path: Path) -> str:
    from tpplan.spec.loader import load_spec

    spec = load_spec(spec_path, [])
    return spec.train.experiment_name or spec.name


def cuda_bench(settings: dict, work: Path, dry_run: bool) -> dict:
    import torch

    from tpplan.spec.loader import load_spec

    spec = load_spec(GPU_SPEC, [])
    steps, warmup, pairs_n = settings["cuda_steps"], settings["cuda_warmup"], settings["cuda_pairs"]
    config_json = work / "gpu-1b-config.json"
    extra = ["--config-json", str(config_json), "--dtype", spec.model.dtype, "--device", "cuda",
             "--seq", str(spec.train.seq_length), "--batch", str(spec.train.batch_size), "--lr", str(spec.train.lr),
             *data_args(GPU_SPEC)]
    result = {
        "spec": str(GPU_SPEC.relative_to(REPO)),
        "model": "Llama-3.2-1B config (random init), " + spec.model.dtype,
        "batch": f"{spec.train.batch_size} x {spec.train.seq_length} tokens per step",
        "mesh": "tp=1, one GPU",
        "pairs": pairs_n, "steps": steps, "warmup_steps": warmup,
        "commands": {"tpplan": show(tpplan_run_argv(GPU_SPEC, work / "gpu-A1", steps)),
                     "handwritten": show(handwritten_argv(work / "gpu-B1.json", steps, 1, extra))},
    }
    result["features"] = [{"feature": feature, "needs": f"compute capability {cap[0]}.{cap[1]}+, {gpus} GPU(s)",
                           "command": show(tpplan_run_argv(GPU_SPEC, work / f"gpu-F{i}", steps)
                                           + [w for item in sets for w in ("--set", item)])}
                          for i, (feature, sets, cap, gpus) in enumerate(CUDA_FEATURES, 1)]
    if not torch.cuda.is_available():
        result["skipped"] = ("skipped: no CUDA device on this machine (torch.cuda.is_available() is False); "
                             "on a GPU machine this section runs by itself")
        return result
    if dry_run:
        return result
    config_json.write_text(json.dumps(dict(spec.model.config)))
    tokens = spec.train.batch_size * spec.train.seq_length
    runs = []
    for i in range(1, pairs_n + 1):
        pair = {}
        save_dir = work / f"gpu-A{i}"
        run_command(tpplan_run_argv(GPU_SPEC, save_dir, steps), env=child_env(), timeout=1800,
                    what=f"tpplan run, CUDA (pair {i})")
        times, records = tpplan_steps(save_dir / spec.name, steps)
        peak = max(r["memory_mib"].get("cuda_max_allocated", 0.0) for r in records)
        pair["tpplan"] = {**summarize_run(times, warmup), "peak_mib": peak, "per_step_ms": times}
        out = work / f"gpu-B{i}.json"
        run_command(handwritten_argv(out, steps, 1, extra), env=child_env(), timeout=1800,
                    what=f"handwritten_tp.py, CUDA (pair {i})")
        data = json.loads(out.read_text())
        pair["handwritten"] = {**summarize_run(data["time_ms"], warmup), "peak_mib": data["cuda_max_allocated_mib"] or 0.0,
                               "per_step_ms": data["time_ms"], "loss": data["loss"]}
        pair["tpplan"]["loss"] = [r["loss"] for r in records]
        pair["max_loss_difference"] = loss_difference(records, data["loss"])
        for side in ("tpplan", "handwritten"):
            pair[side]["tokens_per_s"] = tokens / (pair[side]["fbu_ms"] / 1000)
        log(f"cuda pair {i}/{pairs_n}: tpplan {pair['tpplan']['tokens_per_s']:,.0f} tok/s, "
            f"hand-written {pair['handwritten']['tokens_per_s']:,.0f} tok/s")
        runs.append(pair)
    result["runs"] = runs
    result.update(summarize_pairs(runs))
    for side in ("tpplan", "handwritten"):
        result[f"{side}_tokens_per_s_median"] = statistics.median(p[side]["tokens_per_s"] for p in runs)
        result[f"{side}_peak_mib_max"] = max(p[side]["peak_mib"] for p in runs)
    result["max_loss_difference"] = max(p["max_loss_difference"] for p in runs)
    # tpplan alone with each GPU feature, where this machine has what it needs
    capability, gpus = torch.cuda.get_device_capability(0), torch.cuda.device_count()
    for i, ((feature, sets, cap, need_gpus), row) in enumerate(zip(CUDA_FEATURES, result["features"], strict=True), 1):
        if capability < cap or gpus < need_gpus:
            row["skipped"] = f"this machine has compute capability {capability[0]}.{capability[1]} and {gpus} GPU(s)"
            continue
        save_dir = work / f"gpu-F{i}"
        argv = tpplan_run_argv(GPU_SPEC, save_dir, steps) + [w for item in sets for w in ("--set", item)]
        try:
            run_command(argv, env=child_env(), timeout=1800, what=f"tpplan run, CUDA, {feature}")
        except Failed as exc:
            row["failed"] = str(exc)
            continue
        times, _ = tpplan_steps(save_dir / spec.name, steps)
        row.update(summarize_run(times, warmup))
        row["tokens_per_s"] = tokens / (row["fbu_ms"] / 1000)
    return result


# ------------------------------------------------------------------------------------------
# 2: tpplan plan at full scale
# ------------------------------------------------------------------------------------------


def plan_argv(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "tpplan", "plan", *args]


def measure_plan(args: list[str], work: Path, timeout: float = 600) -> dict:
    """`tpplan plan ARGS --json` in a fresh process: its wall time (interpreter start to exit, as `time`
    shows it), the simulation's own seconds, the mesh and memory it reports, and the peak RSS."""
    work.mkdir(parents=True, exist_ok=True)
    rusage = work / "plan-rusage.json"
    rusage.unlink(missing_ok=True)
    argv = [sys.executable, "-c", RUSAGE_WRAPPER, "plan", *args, "--json"]
    start = time.perf_counter()
    proc = run_command(argv, env=child_env(TPPLAN_BENCH_RUSAGE=str(rusage)), timeout=timeout,
                       what=f"tpplan plan {' '.join(args)}")
    wall = time.perf_counter() - start
    peak_kib = json.loads(rusage.read_text())["maxrss_kib"]
    data = json.loads(proc.stdout)
    memory = data["memory"]["with_fsdp" if data["dp"] > 1 else "without_fsdp"]
    return {
        "command": show(plan_argv(args)),
        "wall_s": wall,
        "simulate_s": data["seconds"],
        "tp": data["tp"],
        "dp": data["dp"],
        "ranks": data["world_size"],
        "precision": data["precision"],
        "memory_per_rank_gib": memory["total_bytes"] / GIB,
        "peak_rss_mib": peak_kib / 1024,
    }


def plan_time(work: Path, dry_run: bool) -> dict:
    rows = []
    for model, args, mesh, shape in PLAN_CASES:
        row = {"model": model, "mesh": mesh, "batch_x_seq": shape, "command": show(plan_argv(args))}
        if not dry_run:
            row.update(measure_plan(args, work))
            log(f"tpplan plan {model}: {row['wall_s']:.1f} s, peak RSS {row['peak_rss_mib']:,.0f} MiB")
        rows.append(row)
    return {"rows": rows, "goal": "405B: under 10 s and under 2 GiB"}


# ------------------------------------------------------------------------------------------
# 3: bytes per step
# ------------------------------------------------------------------------------------------


def bytes_per_step(dry_run: bool) -> dict:
    from benchmarks.comm_bytes import PLANS, comm_bytes

    setting = {"tp": 8, "dp": 1, "seq_length": 1024, "batch_size": 1}
    result = {**setting, "plans": [name for name, _, _ in PLANS],
              "command": "python benchmarks/comm_bytes.py --tp 8 --seq-length 1024 --batch-size 1"}
    if not dry_run:
        result["rows"] = comm_bytes(**setting)
        log("bytes per step: " + ", ".join(f"{r['plan']} {r['ring_bytes'] / GIB:.2f} GiB" for r in result["rows"]))
    return result


# ------------------------------------------------------------------------------------------
# The report
# ------------------------------------------------------------------------------------------


def _ratio(section: dict, key: str) -> str:
    a, b = section[f"tpplan_{key}"], section[f"handwritten_{key}"]
    return f"{a / b:.3f}" if b else "-"


def _ms(x: float) -> str:
    return f"{x:,.0f}"


TITLES = {
    "step": "## 1. Step time: `tpplan run` vs hand-written TP",
    "compile": "## 1b. torch.compile: `tpplan run` with and without `train.compile`, CPU",
    "plan": "## 2. `tpplan plan` at full scale: time and peak memory",
    "bytes": "## 3. Bytes sent per rank per training step, Llama-3.1-8B",
    "cuda": "## 4. CUDA: tp=1, tokens/s and peak memory",
}


def _md_step(step: dict) -> list[str]:
    lines = [TITLES["step"], "",
              f"{step['model']}; {step['batch']}; {step['mesh']} (gloo ranks, 1 thread each); the llama3 plan "
              f"(sequence parallel + loss parallel); {step['training']}, cosine schedule. "
              f"{step['pairs']} interleaved pairs (tpplan, hand-written, tpplan, ...), {step['steps']} steps "
              f"per run, the first {step['warmup_steps']} skipped as warm-up.", "",
              f"- A: `{step['commands']['tpplan']}` (per-step phase times from RUN_DIR/metrics.jsonl)",
              f"- B: `{step['commands']['handwritten']}`", ""]
    if "runs" in step:
        lines += ["| pair | tpplan fwd+bwd+update ms | hand-written ms | ratio | tpplan fwd / bwd / update ms "
                  "| hand-written fwd / bwd / update ms | process wall s (tpplan / hand-written) |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for i, p in enumerate(step["runs"], 1):
            t, h = p["tpplan"], p["handwritten"]
            lines.append(
                f"| {i} | {_ms(t['fbu_ms'])} | {_ms(h['fbu_ms'])} | {p['ratio']:.3f} "
                f"| {_ms(t['forward_ms'])} / {_ms(t['backward_ms'])} / {_ms(t['update_ms'])} "
                f"| {_ms(h['forward_ms'])} / {_ms(h['backward_ms'])} / {_ms(h['update_ms'])} "
                f"| {t['process_s']:.1f} / {h['process_s']:.1f} |")
        pr = step["phase_ratio_median"]
        lines += ["", f"**tpplan / hand-written, forward+backward+update: median {step['ratio_median']:.3f} "
                  f"(min {step['ratio_min']:.3f}, max {step['ratio_max']:.3f} over {len(step['runs'])} pairs)**; "
                  f"per phase (median of the per-pair ratios): forward {pr['forward']:.3f}, backward "
                  f"{pr['backward']:.3f}, update {pr['update']:.3f}. Goal: <= 1.00.", "",
                  "The update phases differ in structure, not only in speed: the gradients of the "
                  "sequence-parallel norm weights come out of backward as pending sums (Partial); tpplan's "
                  "gradient-norm pass reduces them once, before AdamW, while the hand-written AdamW receives "
                  "them as they are and DTensor reduces them inside each op that reads them (an all-reduce per "
                  "op that reads a norm weight's gradient instead of one per norm weight).", "",
                  "Each run's number is the median over its measured steps of forward + backward + update "
                  "(forward includes the loss; update is optimizer step + LR scheduler + zero_grad, and for "
                  "tpplan also the gradient norm it logs, computed even without clipping). tpplan's data phase "
                  "(~0 ms) and per-step logging are outside this sum; the process wall time (start to exit: "
                  "imports, tokenizer training, model build, all steps) is shown for information. "
                  "Same computation, checked: the hand-written model config equals the spec's "
                  f"({'no key differs' if not step.get('config_differences') else 'DIFFERS'}), and with the same "
                  "seed, corpus, tokenizer and sampler the two runs' losses agree at every step of every pair "
                  f"(largest difference {step['max_loss_difference']:.2g})."]
    lines.append("")
    return lines


def _md_compile(comp: dict) -> list[str]:
    lines = [TITLES["compile"], "",
             f"`{comp['spec']}`: {comp['model']}; {comp['batch']}; {comp['mesh']}; {comp['training']}. "
             f"{comp['pairs']} interleaved pairs (eager, compiled, ...), {comp['steps']} steps per run, the first "
             f"{comp['warmup_steps']} skipped (the compiled run compiles in its first steps).", "",
             f"- eager: `{comp['commands']['eager']}`", f"- compiled: `{comp['commands']['compiled']}`", ""]
    if "runs" in comp:
        lines += ["| pair | eager fwd+bwd+update ms | compiled ms | compiled / eager | fastest steps, compiled / eager "
                  "| compiled first step ms |",
                  "|---:|---:|---:|---:|---:|---:|"]
        for i, p in enumerate(comp["runs"], 1):
            lines.append(f"| {i} | {p['eager']['fbu_ms']:.1f} | {p['compiled']['fbu_ms']:.1f} | {p['ratio']:.3f} "
                         f"| {p['fastest_ratio']:.3f} | {_ms(p['compiled']['first_step_ms'])} |")
        lines += ["", f"**compiled / eager: median {comp['ratio_median']:.3f}** (min {comp['ratio_min']:.3f}, max "
                  f"{comp['ratio_max']:.3f}); of each run's fastest step: median {comp['fastest_ratio_median']:.3f}. "
                  "The first compiled step includes inductor's compile (the longest when its cache is cold). "
                  "Losses of the two runs differ by at most "
                  f"{comp['max_loss_difference']:.2g} over {comp['steps']} steps."]
    lines.append("")
    return lines


def _md_plan(plan: dict) -> list[str]:
    lines = [TITLES["plan"], "",
              "Each in a fresh process: wall time from interpreter start to exit (imports included, as "
              "`time` shows it), the simulation's own time as it reports it, and the peak RSS (max resident "
              "memory) of the process. Default simulation: 3 blocks of identical ones, extrapolated to all. "
              f"Goal: {plan['goal']}.", "",
              "| model | mesh | ranks | batch x seq | command | wall s | simulate s | peak RSS |",
              "|---|---|---:|---|---|---:|---:|---:|"]
    for r in plan["rows"]:
        if "wall_s" in r:
            lines.append(f"| {r['model']} | {r['mesh']} | {r['ranks']} | {r['batch_x_seq']} | `{r['command']}` "
                         f"| {r['wall_s']:.1f} | {r['simulate_s']:.1f} | {r['peak_rss_mib']:,.0f} MiB |")
        else:
            lines.append(f"| {r['model']} | {r['mesh']} | - | {r['batch_x_seq']} | `{r['command']}` | - | - | - |")
    lines.append("")
    return lines


def _md_bytes(comm: dict) -> list[str]:
    lines = [TITLES["bytes"], "",
              f"tp={comm['tp']}, dp={comm['dp']}, seq {comm['seq_length']}, batch {comm['batch_size']}, bfloat16; "
              "measured by `tpplan.simulate` (every collective of forward + loss + backward + grad-norm on a "
              "fake process group), ring bytes: all-gather / reduce-scatter (n-1)/n x size, all-reduce "
              f"2(n-1)/n x size. `{comm['command']}`", ""]
    if "rows" in comm:
        first = comm["rows"][0]["plan"]
        lines += [f"| plan | what | collectives | bytes/step | vs {first} | vs Megatron-SP floor |",
                  "|---|---|---:|---:|---:|---:|"]
        for r in comm["rows"]:
            floor = f"{r['ratio_to_floor']:.2f}x" if r["ratio_to_floor"] else "-"
            lines.append(f"| `{r['plan']}` | {r['description']} | {r['collectives']} "
                         f"| {r['ring_bytes'] / GIB:.2f} GiB | {r['ratio_to_first']:.2f}x | {floor} |")
        floor = comm["rows"][0]["megatron_sp_floor_ring_bytes"] / GIB
        lines += ["", f"Megatron-SP floor: {floor:.2f} GiB (8 hidden-size collectives per block, forward + "
                  "backward)."]
    lines.append("")
    return lines


def _md_cuda(cuda: dict) -> list[str]:
    lines = [TITLES["cuda"], ""]
    if cuda.get("skipped"):
        lines += [cuda["skipped"] + f" (would run `{cuda['commands']['tpplan']}` against "
                  f"`{cuda['commands']['handwritten']}`; then tpplan alone with each GPU feature, below).", ""]
    else:
        lines += [f"{cuda['model']}; {cuda['batch']}; {cuda['mesh']}; {cuda['pairs']} interleaved pairs of "
                  f"{cuda['steps']} steps, the first {cuda['warmup_steps']} skipped. tokens/s = tokens per step / "
                  "median forward+backward+update time; peak = torch.cuda.max_memory_allocated.", "",
                  f"- A: `{cuda['commands']['tpplan']}`", f"- B: `{cuda['commands']['handwritten']}`", ""]
        if "runs" in cuda:
            lines += ["| | tpplan | hand-written | ratio |", "|---|---:|---:|---:|",
                      f"| tokens/s (median over pairs) | {cuda['tpplan_tokens_per_s_median']:,.0f} "
                      f"| {cuda['handwritten_tokens_per_s_median']:,.0f} "
                      f"| {_ratio(cuda, 'tokens_per_s_median')} |",
                      f"| fwd+bwd+update ms, ratio median (min, max) | | | {cuda['ratio_median']:.3f} "
                      f"({cuda['ratio_min']:.3f}, {cuda['ratio_max']:.3f}) |",
                      f"| peak CUDA memory (max allocated) | {cuda['tpplan_peak_mib_max']:,.0f} MiB "
                      f"| {cuda['handwritten_peak_mib_max']:,.0f} MiB | {_ratio(cuda, 'peak_mib_max')} |",
                      f"| losses, largest difference between the runs | | | {cuda['max_loss_difference']:.2g} |", ""]
    if cuda.get("features"):
        lines += ["| tpplan with | needs | command | tokens/s |", "|---|---|---|---:|"]
        for row in cuda["features"]:
            got = (f"{row['tokens_per_s']:,.0f}" if "tokens_per_s" in row else
                   "failed" if "failed" in row else f"skipped: {row['skipped']}" if "skipped" in row else "not run: no CUDA here")
            lines.append(f"| {row['feature']} | {row['needs']} | `{row['command']}` | {got} |")
        lines.append("")
    return lines


def _summary(results: dict) -> list[str]:
    """One line per section that ran: the headline number."""
    out = []
    step = results.get("step") or {}
    if "ratio_median" in step:
        out.append(f"- Step time, tpplan / hand-written (forward+backward+update): **{step['ratio_median']:.3f}** "
                   f"(min {step['ratio_min']:.3f}, max {step['ratio_max']:.3f} over {len(step['runs'])} pairs; "
                   "goal <= 1.00)")
    comp = results.get("compile") or {}
    if "ratio_median" in comp:
        out.append(f"- torch.compile, tiny spec on CPU, compiled / eager step time: **{comp['ratio_median']:.3f}** "
                   f"(min {comp['ratio_min']:.3f}, max {comp['ratio_max']:.3f} over {len(comp['runs'])} pairs; "
                   f"fastest steps {comp['fastest_ratio_median']:.3f})")
    plan = results.get("plan") or {}
    for row in plan.get("rows", []):
        if row["model"].endswith("405B") and "wall_s" in row:
            out.append(f"- `tpplan plan` Llama-3.1-405B ({row['ranks']} ranks): **{row['wall_s']:.1f} s, "
                       f"{row['peak_rss_mib']:,.0f} MiB peak RSS** (goal: under 10 s and 2 GiB)")
    comm = results.get("bytes") or {}
    rows = {r["plan"]: r for r in comm.get("rows", [])}
    if "llama3" in rows and comm["rows"]:
        first = comm["rows"][0]
        out.append(f"- Bytes per step, Llama-3.1-8B tp=8: tpplan llama3 {rows['llama3']['ring_bytes'] / GIB:.2f} GiB "
                   f"vs the chapter's {first['ring_bytes'] / GIB:.2f} GiB: **{rows['llama3']['ratio_to_first']:.2f}x**")
    cuda = results.get("cuda") or {}
    if cuda.get("skipped"):
        out.append("- CUDA tp=1: skipped (no GPU)")
    elif "ratio_median" in cuda:
        out.append(f"- CUDA tp=1, Llama-3.2-1B: tokens/s tpplan / hand-written "
                   f"**{_ratio(cuda, 'tokens_per_s_median')}**, "
                   f"peak memory {_ratio(cuda, 'peak_mib_max')}x")
    return [*out, ""] if out else []


def markdown(results: dict) -> str:
    lines = ["# tpplan benchmarks", "",
             f"Command: `{results['command']}`{' (dry run: nothing measured)' if results.get('dry_run') else ''}  ",
             f"Machine: {machine_line(results['machine'])}  ",
             *([f"Whole run: {results['seconds']:.0f} s"] if "seconds" in results else []), "",
             *_summary(results)]
    render = {"step": _md_step, "compile": _md_compile, "plan": _md_plan, "bytes": _md_bytes, "cuda": _md_cuda}
    for name in SECTIONS:
        section = results.get(name)
        if section is None:
            continue
        if "failed" in section:
            lines += [TITLES[name], "", f"**failed to run:** {section['failed']}", ""]
        else:
            lines += render[name](section)
    return "\n".join(lines).rstrip() + "\n"


README = REPO / "README.md"
README_BEGIN = "<!-- benchmarks/results.md begins: written by benchmarks/run.py, do not edit by hand -->"
README_END = "<!-- benchmarks/results.md ends -->"


def readme_with(readme: str, report: str) -> str:
    """``readme`` with the text between the two markers replaced by ``report``, its headings moved
    two levels down (the report's ``#`` title under the README's ``## Benchmarks``)."""
    begin, end = readme.find(README_BEGIN), readme.find(README_END)
    if begin < 0 or end < begin:
        raise ValueError(f"README.md has no {README_BEGIN!r} ... {README_END!r} section")
    body = "\n".join("##" + line if line.startswith("#") else line for line in report.splitlines()[1:])
    return readme[: begin + len(README_BEGIN)] + "\n" + body.strip("\n") + "\n" + readme[end:]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer pairs and steps (under 10 minutes on 2 cores)")
    parser.add_argument("--out", default=str(HERE / "results"), metavar="PREFIX",
                        help="writes PREFIX.md and PREFIX.json (default: benchmarks/results)")
    parser.add_argument("--only", default=",".join(SECTIONS), metavar="LIST",
                        help=f"comma-separated sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--pairs", type=int, help="step time: interleaved pairs (overrides the mode's)")
    parser.add_argument("--steps", type=int, help="step time: steps per run (overrides the mode's)")
    parser.add_argument("--dry-run", action="store_true", help="describe the commands and the machine; run nothing")
    parser.add_argument("--json", action="store_true", help="print the raw numbers (OUT.json) instead of the report")
    parser.add_argument("--no-readme", action="store_true",
                        help="leave README.md alone (by default a complete run with the default --out updates "
                        "its benchmarks section)")
    args = parser.parse_args(argv)

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"--only: unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    settings = dict(SETTINGS["quick" if args.quick else "full"])
    if args.pairs:
        settings["pairs"] = args.pairs
    if args.steps:
        settings["steps"] = args.steps
    if settings["steps"] <= settings["warmup"]:
        parser.error(f"--steps must be more than the {settings['warmup']} warm-up steps")

    command = "python benchmarks/run.py" + (" " + shlex.join(argv if argv is not None else sys.argv[1:])
                                            if (argv if argv is not None else sys.argv[1:]) else "")
    results: dict = {"command": command, "mode": "quick" if args.quick else "full", "dry_run": args.dry_run,
                     "settings": settings, "machine": machine(), "errors": {}}
    log(f"machine: {machine_line(results['machine'])}")
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tpplan-bench-") as tmp:
        work = Path(tmp)
        global WORK_ROOT
        WORK_ROOT = str(work)
        jobs = {
            "bytes": lambda: bytes_per_step(args.dry_run),
            "plan": lambda: plan_time(work / "plan", args.dry_run),
            "step": lambda: step_time(settings, work / "step", args.dry_run),
            "compile": lambda: compile_time(settings, work / "compile", args.dry_run),
            "cuda": lambda: cuda_bench(settings, work / "cuda", args.dry_run),
        }
        for name in SECTIONS:
            if name not in only:
                continue
            (work / name).mkdir(parents=True, exist_ok=True)
            log(f"{name}: {'describing' if args.dry_run else 'running'}")
            try:
                results[name] = jobs[name]()
            except Failed as exc:
                results["errors"][name] = str(exc)
                results[name] = {"failed": str(exc)}
                log(f"{name} FAILED: {exc}")
    results["seconds"] = round(time.perf_counter() - started, 1)
    # the report lists the sections in their numbered order
    ordered = {k: v for k, v in results.items() if k not in SECTIONS}
    for name in SECTIONS:
        if name in results:
            ordered[name] = results[name]
    report = markdown(ordered)
    prefix = Path(args.out)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    prefix.with_name(prefix.name + ".md").write_text(report)
    prefix.with_name(prefix.name + ".json").write_text(json.dumps(ordered, indent=2) + "\n")
    sys.stdout.write(json.dumps(ordered, indent=2) + "\n" if args.json else report)
    log(f"wrote {prefix}.md and {prefix}.json in {results['seconds']:.0f} s")
    if (not args.no_readme and not args.dry_run and prefix.resolve() == (HERE / "results").resolve()
            and only == list(SECTIONS)):
        README.write_text(readme_with(README.read_text(), report))
        log("updated the benchmarks section of README.md")
    return 1 if results["errors"] else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))  # `from benchmarks.comm_bytes import ...` from anywhere
    sys.exit(main())
