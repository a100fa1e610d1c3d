"""Checkpoints outlive their layout: saved at tp=2, resumed at tp=1 and tp=4 (DCP reshards) with the
same losses, the same logits, and exported to a plain Hugging Face folder with the same logits."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO, cli

pytestmark = pytest.mark.slow
SPEC = REPO / "tests" / "data" / "plans" / "tiny-kv4.yaml"
TOL = 1e-5


def losses(run_dir) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "step" in r}


def train(save_dir, *extra):
    result = cli("run", str(SPEC), "--set", f"train.save_dir={save_dir}", *extra, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return save_dir / "tiny-kv4"


def logits_at(run_dir, checkpoint, tp: int, out):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={tp}",
           str(REPO / "tests" / "dist" / "logits_worker.py"), str(run_dir), str(checkpoint), str(out)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(out)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """8 uninterrupted steps at tp=2 with checkpoints at steps 4 and 8."""
    return train(tmp_path_factory.mktemp("tp2"))


@pytest.mark.parametrize("tp", [1, 4])
def test_resume_at_another_tp_continues_with_the_same_losses(reference, tmp_path, tp):
    run_dir = tmp_path / "tiny-kv4"
    shutil.copytree(reference, run_dir, ignore=shutil.ignore_patterns("step-00000008", "metrics.jsonl", "log.txt"))
    resumed = train(tmp_path, "--set", f"mesh.tp={tp}", "--nproc-per-node", str(tp))
    after, before = losses(resumed), losses(reference)
    assert min(after) == 5, f"resumed at step {min(after)}, expected 5 (after the step-4 checkpoint)"
    for step in range(5, 9):
        assert abs(after[step] - before[step]) <= TOL, (step, after[step], before[step])


def test_reshard_gives_equal_logits_and_export_loads_in_plain_transformers(reference, tmp_path):
    checkpoint = reference / "checkpoints" / "step-00000008"
    results = {tp: logits_at(reference, checkpoint, tp, tmp_path / f"tp{tp}.pt") for tp in (1, 2, 4)}
    base = results[2]["logits"]
    for tp in (1, 4):
        assert (results[tp]["logits"] - base).abs().max().item() <= TOL, tp

    exported = tmp_path / "hf"
    result = cli("export", str(reference), "-o", str(exported), "--json")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["checkpoint"].endswith("step-00000008") and summary["tokenizer"]
    torch.save(results[2]["ids"], tmp_path / "ids.pt")
    # a fresh interpreter that never imports tpplan
    script = (
        "import sys, torch\n"
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({str(exported)!r})\n"
        f"AutoTokenizer.from_pretrained({str(exported)!r})\n"
        f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\n"
        "with torch.no_grad():\n"
        "    logits = model(input_ids=ids).logits\n"
        f"torch.save(logits, {str(tmp_path / 'hf.pt')!r})\n"
        "assert 'tpplan' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    hf_logits = torch.load(tmp_path / "hf.pt")
    assert (hf_logits - base).abs().max().item() <= TOL
