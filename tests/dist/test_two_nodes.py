"""Beyond one machine: two torchrun "nodes" on localhost, each started by the generated launch.sh
(NNODES=2, a c10d rendezvous), train the tiny Llama with data parallel across the nodes and tensor
parallel inside each (dp=2 x tp=2 on 4 gloo ranks), in bf16-mixed precision with selective
activation checkpointing and 2 micro-batches per step; the job resumes from a checkpoint on both
nodes and repeats the steps it lost exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import SPECS, cli

pytestmark = pytest.mark.slow

SETS = [
    "--set", "train.precision=bf16-mixed",
    "--set", "train.activation_checkpointing=selective",
    "--set", "train.grad_accum_steps=2",
    "--set", "train.batch_size=2",
    "--set", "launch.nnodes=2",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(folder: Path, run_dir: Path, *args: str) -> None:
    """launch.sh on two "nodes" at once, as on two machines: same rendezvous endpoint and id."""
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "NNODES": "2",
        "NPROC_PER_NODE": "2",
        "RDZV_ENDPOINT": f"127.0.0.1:{free_port()}",
        "RDZV_ID": "two-nodes",
        "TORCHRUN": f"{sys.executable} -m torch.distributed.run",
    }
    command = ["bash", str(folder / "launch.sh"), "--run-dir", str(run_dir), "--log-freq", "1", *args]
    nodes = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for _ in range(2)]
    outputs = [node.communicate(timeout=600)[0] for node in nodes]
    for node, output in zip(nodes, outputs, strict=True):
        assert node.returncode == 0, output[-4000:]


def losses(run_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_two_nodes_train_resume_and_repeat_their_losses(tmp_path):
    result = cli("compile", str(SPECS / "tiny-llama.yaml"), "-o", str(tmp_path), *SETS)
    assert result.returncode == 0, result.stderr
    folder = tmp_path / "tiny-llama"
    run_dir = tmp_path / "run"
    two_nodes(folder, run_dir, "--max-steps", "6", "--ckpt-freq", "2")
    first = losses(run_dir)
    assert sorted(first) == [1, 2, 3, 4, 5, 6]
    trainer = json.loads((run_dir / "checkpoints" / "step-00000006" / "trainer.json").read_text())
    assert trainer["mesh"] == {"dp": 2, "tp": 2}
    assert trainer["batch_index"] == 12  # 6 steps x 2 micro-batches of this epoch
    start = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert start == {"event": "start", "step": 0, "world_size": 4, "mesh": [2, 2]}

    shutil.rmtree(run_dir / "checkpoints" / "step-00000006")  # as if both nodes died after step 4's save
    two_nodes(folder, run_dir, "--max-steps", "6", "--ckpt-freq", "2")
    resumed = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()
               if '"resume"' in line]
    assert resumed == [{"event": "resume", "step": 4, "epoch": 0, "batch_index": 8}]
    assert losses(run_dir) == first  # steps 5 and 6 again, bit for bit
    assert (run_dir / "tensorboard").is_dir()
