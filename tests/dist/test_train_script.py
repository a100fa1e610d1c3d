"""The training loop end to end on 2 CPU gloo ranks (torchrun): the generated script and `tpplan run`
train identically; a run killed with SIGKILL resumes from its last complete checkpoint and goes on
exactly as if never stopped (tp=2; and under FSDP2, dp=2); pretrained weights load shard by shard.

Each torchrun costs ~15 s on 2 cores (imports, torchrun's own start and stop): the runs are few and
shared through module-scoped fixtures; the tiny model trains a few dozen steps."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SPECS, cli

pytestmark = pytest.mark.slow

TINY = SPECS / "tiny-llama.yaml"
SCRIPT = REPO / "generated" / "tiny-llama" / "train.py"
STEPS, CKPT = 24, 4  # 24 steps of ~0.1 s: time to kill the run between two checkpoints
ENV = {
    "OMP_NUM_THREADS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
RUN_SETS = ("--set", "train.log_freq=1", "--set", f"train.ckpt_freq={CKPT}")


def torchrun_generated(run_dir: Path, *args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(SCRIPT),
        "--run-dir",
        str(run_dir),
        *args,
    ]
    return subprocess.run(
        command, cwd=run_dir.parent, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600
    )


def metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in metrics(run_dir) if "loss" in r}


def complete_checkpoints(run_dir: Path) -> list[int]:
    root = run_dir / "checkpoints"
    if not root.is_dir():
        return []
    return sorted(int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"step-(\d+)", p.name)))


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (torchrun starts its workers in new sessions, so
    a process-group kill would miss them): a node that dies."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(stat.parent.name))
    tree, todo = [pid], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            tree.append(child)
            todo.append(child)
    for target in reversed(tree):
        try:
            os.kill(target, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The generated script, run as a user would: torchrun --standalone --nproc-per-node 2."""
    run_dir = tmp_path_factory.mktemp("generated") / "run"
    result = torchrun_generated(
        run_dir, "--max-steps", str(STEPS), "--log-freq", "1", "--ckpt-freq", str(CKPT)
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return run_dir


def test_generated_script_and_tpplan_run_train_identically(reference, tmp_path):
    result = cli("run", str(TINY), "--max-steps", str(STEPS), *RUN_SETS, "--set", f"train.save_dir={tmp_path}", env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "tiny-llama"
    expected = losses(reference)
    assert sorted(expected) == list(range(1, STEPS + 1))
    assert losses(run_dir) == expected  # bit for bit: one loop, same seed, same data order
    assert expected[1] > 6.0 and expected[STEPS] < expected[1] - 0.5  # ln(512) = 6.24, then it learns
    for name in ("spec.yaml", "plan.json", "train.py", "metrics.jsonl", "log.txt", "tokenizer"):
        assert (run_dir / name).exists(), name
    assert complete_checkpoints(run_dir) == list(range(CKPT, STEPS + 1, CKPT))
    trainer = json.loads((run_dir / "checkpoints" / f"step-{STEPS:08d}" / "trainer.json").read_text())
    assert trainer["step"] == STEPS and trainer["mesh"] == {"dp": 1, "tp": 2}
    record = next(r for r in metrics(run_dir) if r.get("step") == STEPS and "loss" in r)
    assert set(record) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "time_ms", "memory_mib"}
    assert set(record["time_ms"]) == {"data", "forward", "backward", "update", "step"}
    assert record["memory_mib"]["cpu_max_rss"] > 0 and record["tokens_per_s"] > 0
    assert record["mfu"] is None  # no known peak for a CPU
    assert "done: 24 steps" in (run_dir / "log.txt").read_text()
    # the same numbers where users look: TensorBoard event files (W&B and MLflow: test_trackers.py)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "time_ms/step", "memory_mib/cpu_max_rss"} <= set(
        events.Tags()["scalars"]
    )
    assert {e.step: round(e.value, 5) for e in events.Scalars("loss")} == {k: round(v, 5) for k, v in expected.items()}


def test_sigkill_after_a_checkpoint_then_resume_continues_exactly(reference, tmp_path):
    run_dir = tmp_path / "tiny-llama"
    command = [
        sys.executable,
        "-m",
        "tpplan",
        "run",
        str(TINY),
        "--max-steps",
        str(STEPS),
        *RUN_SETS,
        "--set",
        f"train.save_dir={tmp_path}",
    ]
    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(
        command, cwd=REPO, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT
    )
    deadline = time.time() + 400
    while not complete_checkpoints(run_dir) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(proc.pid)
    proc.wait()
    log.close()
    saved = complete_checkpoints(run_dir)
    assert saved, (tmp_path / "killed.log").read_text()[-3000:]
    assert saved[-1] < STEPS, "the run finished before it could be killed"
    resumed_at = saved[-1]

    result = cli(
        "run", str(TINY), "--max-steps", str(STEPS), *RUN_SETS, "--set", f"train.save_dir={tmp_path}", env=ENV
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    events = [r for r in metrics(run_dir) if r.get("event") == "resume"]
    assert events == [{"event": "resume", "step": resumed_at, "epoch": 0, "batch_index": resumed_at}]
    assert (
        f"resumed from {run_dir / 'checkpoints' / f'step-{resumed_at:08d}'}" in result.stdout + result.stderr
    )
    # the losses after the resume equal those of the run that was never stopped
    assert losses(run_dir) == losses(reference)
    assert not list((run_dir / "checkpoints").glob(".step-*"))  # a half-written checkpoint is cleaned up


def test_fsdp_over_dp2_checkpoint_resume(tmp_path):
    """tp=1, dp=2: FSDP2 shards every block; resuming from step 4 repeats steps 5-6 exactly."""
    sets = [
        "--set",
        "mesh.tp=1",
        "--set",
        "train.log_freq=1",
        "--set",
        "train.ckpt_freq=2",
        "--set",
        "train.batch_size=4",
        "--set",
        f"train.save_dir={tmp_path}",
        "--max-steps",
        "6",
    ]
    result = cli("run", str(TINY), *sets, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "tiny-llama"
    first = losses(run_dir)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    assert json.loads((run_dir / "checkpoints" / "step-00000006" / "trainer.json").read_text())["mesh"] == {
        "dp": 2,
        "tp": 1,
    }
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # as if the run had died after step 4's save
    result = cli("run", str(TINY), *sets, env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert [r["step"] for r in metrics(run_dir) if r.get("event") == "resume"] == [4]
    assert losses(run_dir) == first


def test_pretrained_weights_from_a_local_folder_load_shard_by_shard(reference, tmp_path):
    """A local model folder saved from the seed's random init trains exactly like the random init."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from tpplan.spec.loader import load_spec

    spec = load_spec(TINY)
    config = AutoConfig.for_model(**spec.model.config)
    config.use_cache = False
    torch.manual_seed(spec.train.seed)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").save_pretrained(
        tmp_path / "tiny-model"
    )
    data = spec.model_dump(mode="json", exclude_unset=True, exclude={"extends"})
    data["name"] = "tiny-pretrained"
    data["model"].update(name="tiny-model", pretrained=True, config={})
    data["train"].update(
        data_files=[str(SPECS / "data" / "tiny-alpaca.jsonl")],
        save_dir=str(tmp_path),
        max_steps=STEPS,
        log_freq=1,
        ckpt_freq=None,
    )
    (tmp_path / "pretrained.yaml").write_text(yaml.safe_dump(data))
    result = cli("run", str(tmp_path / "pretrained.yaml"), env=ENV)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    source = (tmp_path / "tiny-pretrained" / "train.py").read_text()
    assert "MODEL_NAME = '../tiny-model'" in source and "PRETRAINED = True" in source
    assert losses(tmp_path / "tiny-pretrained") == losses(reference)
