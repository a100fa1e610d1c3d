"""Checkpoints are data, never code; an export never loses data (issue 14).

A run directory made by ``tpplan run --dry-run`` gets a DCP checkpoint written here in one process
with the training script's layout (``{"model": ..., "optim": ...}`` from ``get_state_dict``),
so the tests need no training run.  A checkpoint whose ``.metadata`` would run code when
unpickled is refused (exit 2, saying why) and the code never runs; ``-o`` aimed at the current
directory, at the run directory, at a device, a FIFO or a folder with other content is refused
before anything is read; a missing shard or corrupt metadata is exit 2 with why."""

from __future__ import annotations

import os
import pickle
import shutil
import stat
import warnings

import pytest

from tests.cli.test_files import assert_refused, fifo, tree
from tests.conftest import SPECS, cli
from tpplan.cli import main
from tpplan.core.fileio import MARKER

STEP = "checkpoints/step-00000001"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tpplan.model.sources import build_model
    from tpplan.plan.stage import model_source
    from tpplan.spec.loader import load_spec

    save = tmp_path_factory.mktemp("save")
    assert main(["run", str(SPECS / "tiny-llama.yaml"), "--dry-run", "--set", f"train.save_dir={save}"]) == 0
    run = save / "tiny-llama"
    model = build_model(model_source(load_spec(run / "spec.yaml")).config, device="cpu", dtype="float32", seed=0)
    optimizer = torch.optim.AdamW(model.parameters())
    model(input_ids=torch.randint(0, 512, (1, 8))).logits.sum().backward()
    optimizer.step()
    model_state, optim_state = get_state_dict(model, optimizer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process writes every shard
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=run / STEP, no_dist=True)
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "tokenizer.json").write_text("{}")
    os.mkfifo(run / "tokenizer" / "pipe")  # a FIFO in the run is never read (it would block)
    return run


def copy_run(run_dir, tmp_path):
    copy = tmp_path / "save" / "tiny-llama"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("pipe"))
    return copy


def test_a_checkpoint_that_would_run_code_is_refused(run_dir, tmp_path):
    run = copy_run(run_dir, tmp_path)
    proof = tmp_path / "code-ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {proof}",))

    (run / STEP / ".metadata").write_bytes(pickle.dumps(Payload()))
    result = cli("export", str(run), "-o", str(tmp_path / "hf"))
    assert_refused(result, "refusing the checkpoint:", "refers to posix.system, which checkpoint metadata never holds",
                   "loading it could run code, so it is not loaded")
    assert not proof.exists()
    assert not (tmp_path / "hf").exists()

    # the generated train.py resumes through the same reader: a resume refuses it too
    from tpplan.runtime.checkpoint import CheckpointRefused, SafeCheckpointReader

    with pytest.raises(CheckpointRefused, match="posix.system"):
        SafeCheckpointReader(str(run / STEP)).read_metadata()
    assert not proof.exists()


def test_export_never_replaces_its_source_or_what_it_did_not_write(run_dir, tmp_path):
    save = run_dir.parent
    before = tree(save)
    pipe = fifo(tmp_path / "pipe")
    other = tmp_path / "models"
    (other / "llama").mkdir(parents=True)
    (other / "llama" / "model.safetensors").write_text("weights")
    cases = [
        (["-o", "."], save, "-o . holds the run directory of the checkpoint: an export never replaces its own source"),
        (["-o", "."], tmp_path, "-o . exists and was not written by tpplan"),
        (["-o", str(run_dir)], tmp_path, "is the run directory of the checkpoint"),
        (["-o", str(run_dir / STEP)], tmp_path, "is the checkpoint folder"),
        (["-o", str(run_dir / "checkpoints" / "hf")], tmp_path, "an export never writes into a checkpoint"),
        (["-o", "/dev/null"], tmp_path, "-o /dev/null is a character device, not a folder"),
        (["-o", str(pipe)], tmp_path, "is a FIFO (named pipe), not a folder"),
        (["-o", str(other)], tmp_path, "exists and was not written by tpplan"),
    ]
    for args, cwd, message in cases:
        assert_refused(cli("export", str(run_dir), *args, cwd=cwd, timeout=60), message)
    assert tree(save) == before
    assert stat.S_ISFIFO(os.stat(pipe).st_mode) and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert (other / "llama" / "model.safetensors").read_text() == "weights"


def test_export_writes_a_marked_folder_and_replaces_only_it(run_dir, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(run_dir), "-o", str(out)]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == [MARKER, "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert main(["export", str(run_dir), "-o", str(out)]) == 0  # its own folder: replaced
    (out / "notes.txt").write_text("mine")
    assert main(["export", str(run_dir), "-o", str(out)]) == 2
    assert "holds files tpplan did not write (notes.txt)" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.parametrize(
    "damage, message",
    [
        ("missing-shard", "shard __0_0.distcp is missing (the checkpoint is incomplete)"),
        ("corrupt-metadata", "is not valid checkpoint metadata (UnpicklingError"),
        ("truncated-shard", "shard __0_0.distcp holds 1,000 bytes but the metadata reads up to byte"),
        ("shard-outside", "is not a file name inside the checkpoint folder"),
        ("not-metadata", "holds a dict, not DCP metadata"),
    ],
)
def test_damaged_checkpoints_are_exit_2_with_why(run_dir, tmp_path, capsys, damage, message):
    run = copy_run(run_dir, tmp_path)
    step = run / STEP
    if damage == "missing-shard":
        (step / "__0_0.distcp").unlink()
    elif damage == "corrupt-metadata":
        (step / ".metadata").write_bytes((step / ".metadata").read_bytes()[:100])
    elif damage == "truncated-shard":
        os.truncate(step / "__0_0.distcp", 1000)
    elif damage == "shard-outside":
        data = (step / ".metadata").read_bytes().replace(b"__0_0.distcp", b"../_0.distcp")
        (step / ".metadata").write_bytes(data)
    else:
        (step / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    assert main(["export", str(run), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err
    assert not (tmp_path / "hf").exists()
