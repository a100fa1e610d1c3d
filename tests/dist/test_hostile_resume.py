"""The generated train.py resumes from checkpoints as data, never code (issue 14): a run directory
whose newest checkpoint's ``.metadata`` would run a command when unpickled is refused by every
rank on resume, the run fails (exit 1) naming what the pickle asked for, and the command never runs."""

from __future__ import annotations

import os
import pickle

import pytest

from tests.cli.test_checkpoints import STEP
from tests.conftest import SPECS, cli
from tpplan.cli import main

pytestmark = pytest.mark.slow


def test_resume_refuses_a_checkpoint_that_would_run_code(tmp_path):
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    save = tmp_path / "save"
    spec = str(SPECS / "tiny-llama.yaml")
    assert main(["run", spec, "--dry-run", "--set", f"train.save_dir={save}"]) == 0
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
    result = cli("run", spec, "--set", f"train.save_dir={save}", "--max-steps", "2", timeout=600,
                 env={"OMP_NUM_THREADS": "1"})
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    output = result.stdout + result.stderr
    assert "cannot resume from" in output and "refers to posix.system, which checkpoint metadata never holds" in output
    assert 'train.py", line' not in output  # the ranks say why and stop: no traceback of the script (torchrun
    # still prints its own ChildFailedError for a failed job)
    assert not proof.exists()
