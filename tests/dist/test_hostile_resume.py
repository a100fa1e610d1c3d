"""The generated train.py resumes from checkpoints as data, never code (issue 14), and a resume never
loses the run's record (issue 28).

A run directory whose newest checkpoint's ``.metadata`` would run a command when unpickled is refused
by ``tpplan run`` before anything is written (exit 2) and by every rank of the script itself when it
is started directly (exit 1), naming what the pickle asked for; the command never runs.  A newest
checkpoint whose shards are garbage is skipped with a warning for the one before it; a checkpoint of
another model stops the script with one message naming the first tensor that differs."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys

import pytest

from tests.cli.test_checkpoints import STEP
from tests.conftest import REPO, SPECS, cli
from tpplan.cli import main

pytestmark = pytest.mark.slow

TINY = str(SPECS / "tiny-llama.yaml")
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def torchrun(script, run_dir, *args: str) -> subprocess.CompletedProcess:
    """The script started as launch.sh starts it: torchrun, no tpplan in between."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
               "--run-dir", str(run_dir), *args]
    return subprocess.run(command, cwd=REPO, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    save = tmp_path / "save"
    assert main(["run", TINY, "--dry-run", "--set", f"train.save_dir={save}"]) == 0
    run = save / "tiny-llama"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dcp.save({"model": {"w": torch.zeros(2)}}, checkpoint_id=run / STEP, no_dist=True)
    proof = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    (run / STEP / ".metadata").write_bytes(pickle.dumps(Payload()))
    (run / STEP / "trainer.json").write_text('{"step": 1}')  # a complete checkpoint, as the script writes it
    spec_yaml = (run / "spec.yaml").read_bytes()
    result = cli("run", TINY, "--set", f"train.save_dir={save}", "--max-steps", "2", timeout=600, env=ENV)
    assert result.returncode == 2, result.stdout[-2000:] + result.stderr[-2000:]  # before any rank starts
    assert "none of its 1 complete checkpoints can be read" in result.stderr
    assert "refers to posix.system, which checkpoint metadata never holds" in result.stderr
    assert (run / "spec.yaml").read_bytes() == spec_yaml and not proof.exists()

    result = torchrun(run / "train.py", run, "--max-steps", "2")  # the script on its own refuses it too
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "cannot resume from" in output and "refers to posix.system, which checkpoint metadata never holds" in output
    assert 'train.py", line' not in output  # the ranks say why and stop: no traceback of the script (torchrun
    # still prints its own ChildFailedError for a failed job)
    assert not proof.exists()


def test_resume_skips_a_garbage_newest_checkpoint_and_refuses_another_models_in_one_message(tmp_path):
    sets = ["--set", f"train.save_dir={tmp_path}", "--set", "train.ckpt_freq=4", "--set", "train.log_freq=1"]
    first = cli("run", TINY, *sets, "--max-steps", "8", timeout=600, env=ENV)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    run = tmp_path / "tiny-llama"
    newest = run / "checkpoints" / "step-00000008"
    for shard in newest.glob("*.distcp"):
        shard.write_bytes(bytes(range(256)) * (shard.stat().st_size // 256 + 1))  # metadata fine, shards garbage

    resumed = cli("run", TINY, *sets, "--max-steps", "10", timeout=600, env=ENV)
    output = resumed.stdout + resumed.stderr
    assert resumed.returncode == 0, output[-3000:]  # before: every rank's UnpicklingError traceback, exit 1
    assert f"warning: skipping checkpoint {newest}, which cannot be read: UnpicklingError" in output
    assert "Traceback" not in output
    log = (run / "log.txt").read_text()
    assert f"resumed from {run}/checkpoints/step-00000004: step 4" in log

    other = tmp_path / "other"  # the script of another model (intermediate_size 128 -> 256), on this run
    assert main(["compile", TINY, "-o", str(other), "--set", "model.config.intermediate_size=256"]) == 0
    result = torchrun(other / "tiny-llama" / "train.py", run, "--max-steps", "12")
    output = result.stdout + result.stderr
    assert result.returncode == 1, output[-3000:]
    message = ("cannot resume from " + str(run / "checkpoints" / "step-00000010") + ": the checkpoint's "
               "model.layers.0.mlp.gate_proj.weight is [128, 64]; the model's is [256, 64]")
    assert output.count(message) == 1, output[-3000:]  # before: 7 tracebacks, 165 lines
    assert 'train.py", line' not in output
