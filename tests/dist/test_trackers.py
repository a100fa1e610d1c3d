"""The trackers with the real packages (no stand-ins): `tpplan run` of the tiny spec with TensorBoard,
Weights & Biases (wandb, offline) and MLflow (mlflow-skinny, a file store in the run directory), then
a resume from an earlier checkpoint than the last step logged (as after a crash): each tracker holds
one run, every step once, with the losses of metrics.jsonl.

What each package wrote is read back with that package (MLflow's client, TensorBoard's event reader)
or, for W&B offline, from its transaction log (LevelDB-style records of W&B's own protobufs; its
Python reader left wandb with 0.28)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path

import pytest

from tests.conftest import SPECS, cli

pytestmark = pytest.mark.slow

wandb = pytest.importorskip("wandb", reason="pip install -e '.[test]' installs wandb (the trackers extra)")
mlflow = pytest.importorskip("mlflow", reason="pip install -e '.[test]' installs mlflow-skinny (the trackers extra)")


def wandb_records(path: Path):
    """The records of one W&B transaction log (run-ID.wandb): a 7-byte header (":W&B", magic, version),
    then 32 KiB blocks of records, each with a 7-byte header (crc32c, length, type: full/first/middle/last)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, block, parts = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        body = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        parts = body if kind in (1, 2) else parts + body
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            yield record


def wandb_runs(run_dir: Path) -> list[dict]:
    """Each offline W&B session in the run directory: its run id, project, name, tags, config and history."""
    sessions = []
    for log in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        session = {"history": {}, "config": {}}
        for record in wandb_records(log):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                session.update(id=run.run_id, project=run.project, name=run.display_name, tags=list(run.tags))
                session["config"].update({i.key: json.loads(i.value_json) for i in run.config.update})
            elif kind == "history":
                items = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                session["history"][items["_step"]] = items
        sessions.append(session)
    return sessions


def metrics(run_dir: Path) -> dict[int, dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r for r in map(json.loads, lines) if "loss" in r}


def test_tensorboard_wandb_and_mlflow_log_every_step_once_across_a_resume(tmp_path, monkeypatch):
    env = {
        "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-home"),
        "WANDB_CACHE_DIR": str(tmp_path / "wandb-home"), "WANDB_DATA_DIR": str(tmp_path / "wandb-home"),
    }
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default: a file store in the run directory
    sets = ["--set", "train.log_freq=1", "--set", "train.ckpt_freq=4", "--set", f"train.save_dir={tmp_path}",
            "--set", "train.wandb={project: tiny, tags: [ci]}", "--set", "train.mlflow={tags: {team: ci}}"]
    run_dir = tmp_path / "tiny-llama"

    first = cli("run", str(SPECS / "tiny-llama.yaml"), "--max-steps", "6", *sets, env=env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    wandb_id = (run_dir / "wandb-run-id").read_text()
    mlflow_id = (run_dir / "mlflow-run-id").read_text()
    log = (run_dir / "log.txt").read_text()
    assert f"Weights & Biases: run {wandb_id} (offline)" in log and f"MLflow: run {mlflow_id} in file://" in log
    # a crash after step 6 was logged, before its checkpoint: the resume starts at 4 and repeats 5 and 6
    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")
    second = cli("run", str(SPECS / "tiny-llama.yaml"), "--max-steps", "8", *sets, env=env)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    assert "resumed from" in second.stdout + second.stderr
    expected = metrics(run_dir)
    assert sorted(expected) == list(range(1, 9)) and expected[8]["loss"] < expected[1]["loss"] - 0.3
    loss = {step: round(r["loss"], 5) for step, r in expected.items()}

    # W&B: two offline sessions of one run (wandb sync makes them one), steps 1-6 then 7-8
    sessions = wandb_runs(run_dir)
    assert [s["id"] for s in sessions] == [wandb_id, wandb_id]
    assert all(s["project"] == "tiny" and s["name"] == "tiny-llama" and s["tags"] == ["ci"] for s in sessions)
    assert sessions[0]["config"]["PRECISION"] == "fp32" and sessions[0]["config"]["TP"] == 2
    assert [sorted(s["history"]) for s in sessions] == [[1, 2, 3, 4, 5, 6], [7, 8]]
    history = {step: items for s in sessions for step, items in s["history"].items()}
    assert {step: round(items["loss"], 5) for step, items in history.items()} == loss
    assert {"lr", "grad_norm", "tokens_per_s", "time_ms/step", "memory_mib/cpu_max_rss"} <= set(history[8])

    # MLflow: one run, resumed, every step once
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    client = mlflow.MlflowClient(tracking_uri=(run_dir / "mlruns").as_uri())
    run = client.get_run(mlflow_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "tiny-llama"
    assert client.get_experiment(run.info.experiment_id).name == "tiny-llama"
    assert run.data.tags["team"] == "ci" and run.data.params["PRECISION"] == "fp32"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    history = client.get_metric_history(mlflow_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))
    assert {m.step: round(m.value, 5) for m in history} == loss
    assert {"lr", "grad_norm", "time_ms/step", "memory_mib/cpu_max_rss"} <= set(run.data.metrics)

    # TensorBoard: the repeated steps purged, not doubled
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    scalars = events.Scalars("loss")
    assert sorted(e.step for e in scalars) == list(range(1, 9))
    assert {e.step: round(e.value, 5) for e in scalars} == loss


def test_trackers_off_and_missing_packages_do_not_stop_a_run(tmp_path):
    """TENSORBOARD off writes no event files; a tracker whose package is missing is named, and the run trains."""
    hide = tmp_path / "hide"
    hide.mkdir()
    for name in ("wandb", "mlflow"):  # a module that fails to import, as an uninstalled package does
        (hide / f"{name}.py").write_text("raise ImportError('not installed')\n")
    env = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(hide), os.environ.get("PYTHONPATH", "")])}
    result = cli("run", str(SPECS / "tiny-llama.yaml"), "--max-steps", "2", "--set", f"train.save_dir={tmp_path}",
                 "--set", "train.tensorboard=false", "--set", "train.wandb={project: tiny}", "--set", "train.mlflow={}",
                 env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "tiny-llama"
    log = (run_dir / "log.txt").read_text()
    assert "Weights & Biases off: WANDB is set, but wandb is not installed" in log
    assert "MLflow off: MLFLOW is set, but mlflow is not installed" in log
    assert "TensorBoard" not in log and not (run_dir / "tensorboard").exists()
    assert sorted(metrics(run_dir)) == [1, 2]
