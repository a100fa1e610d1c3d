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
        ("garbage-shard", "cannot read the checkpoint"),  # DCP's CheckpointException is a BaseException
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
    elif damage == "garbage-shard":
        size = (step / "__0_0.distcp").stat().st_size
        (step / "__0_0.distcp").write_bytes(bytes(range(256)) * (size // 256 + 1))
    elif damage == "shard-outside":
        data = (step / ".metadata").read_bytes().replace(b"__0_0.distcp", b"../_0.distcp")
        (step / ".metadata").write_bytes(data)
    else:
        (step / ".metadata").write_bytes(pickle.dumps({"state_dict_metadata": {}}))
    assert main(["export", str(run), "-o", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and message in err, err
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------
# Bounded: the memory a checkpoint's tensors take, a tokenizer file's size (issue 28)
# ------------------------------------------------------------------------------------------


def huge_checkpoint(run):
    """The run's spec made a 400 GB model, and a checkpoint whose metadata says it holds that model
    (every tensor's bytes at offset 0 of a 1-byte shard: never read, the export stops before)."""
    import torch
    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        TensorProperties,
        TensorStorageMetadata,
    )

    from tpplan.plan.stage import model_source
    from tpplan.spec.loader import load_spec

    spec = (run / "spec.yaml").read_text()
    for key, value in {"hidden_size": 65536, "intermediate_size": 262144, "num_attention_heads": 512}.items():
        spec = spec.replace(f"    {key}: ", f"    {key}: {value}  # ", 1)
    (run / "spec.yaml").write_text(spec)
    model = model_source(load_spec(run / "spec.yaml")).build(device="meta")
    entries, storage = {}, {}
    for name, tensor in model.state_dict().items():
        size, zero = torch.Size(tensor.shape), torch.Size([0] * tensor.dim())
        entries[f"model.{name}"] = TensorStorageMetadata(TensorProperties(dtype=torch.float32), size,
                                                         [ChunkStorageMetadata(zero, size)])
        storage[MetadataIndex(f"model.{name}", zero, 0)] = _StorageInfo("__0_0.distcp", 0, 1)
    step = run / STEP
    (step / ".metadata").write_bytes(pickle.dumps(Metadata(entries, storage_data=storage)))
    return sum(t.numel() for t in model.state_dict().values()) * 4


def test_export_refuses_a_checkpoint_larger_than_memory_before_allocating(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    size = huge_checkpoint(run)
    assert size > 400e9
    assert main(["export", str(run), "-o", str(tmp_path / "hf")]) == 2  # before: the allocator's traceback
    err = capsys.readouterr().err
    assert f"exporting this checkpoint needs {size / 2**30:,.1f} GiB of memory" in err and "Traceback" not in err, err
    assert not (tmp_path / "hf").exists()


def test_export_refuses_a_tokenizer_file_no_tokenizer_is_and_copies_in_chunks(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    with open(run / "tokenizer" / "huge.json", "wb") as f:
        f.truncate(6 * 2**30)  # sparse: 6 GB that take no disk
    assert main(["export", str(run), "-o", str(tmp_path / "hf")]) == 2  # before: MemoryError (read whole)
    err = capsys.readouterr().err
    assert "huge.json holds 6,442,450,944 bytes: more than the 1,073,741,824 a tokenizer file has" in err, err
    assert not (tmp_path / "hf").exists()
    (run / "tokenizer" / "huge.json").unlink()
    (run / "tokenizer" / "vocab.json").write_bytes(b"x" * (3 << 20))  # several chunks
    assert main(["export", str(run), "-o", str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "vocab.json").read_bytes() == b"x" * (3 << 20)


# ------------------------------------------------------------------------------------------
# Export: one rule for links, the umask (issue 28)
# ------------------------------------------------------------------------------------------


def test_export_writes_through_a_link_and_respects_the_umask(run_dir, tmp_path):
    real = tmp_path / "real"
    assert main(["export", str(run_dir), "-o", str(real)]) == 0
    (tmp_path / "link").symlink_to(real)
    previous = os.umask(0o077)
    try:
        assert main(["export", str(run_dir), "-o", str(tmp_path / "link")]) == 0  # before: refused, a link
    finally:
        os.umask(previous)
    assert (tmp_path / "link").is_symlink() and os.readlink(tmp_path / "link") == str(real)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in real.iterdir()}
    assert set(modes.values()) == {0o600}, modes  # before: 0o644 whatever the umask
    assert stat.S_IMODE(real.stat().st_mode) == 0o755  # the folder replaced kept its mode


# ------------------------------------------------------------------------------------------
# A run directory is a record: a refused resume changes nothing (issue 28)
# ------------------------------------------------------------------------------------------


def test_a_resume_of_another_model_is_refused_and_changes_nothing(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    (run / STEP / "trainer.json").write_text('{"step": 1}')  # complete, as the script writes it
    before = tree(tmp_path)
    code = main(["run", str(SPECS / "tiny-llama.yaml"), "--dry-run", "--set", f"train.save_dir={tmp_path / 'save'}",
                 "--set", "model.config.intermediate_size=256"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert ("cannot resume the run in" in err and "from step-00000001: the checkpoint's "
            "model.layers.0.mlp.gate_proj.weight is [128, 64]; the model's is [256, 64]") in err, err
    assert tree(tmp_path) == before  # before: spec.yaml claimed the other model; export then failed
    assert main(["export", str(run), "-o", str(tmp_path / "hf")]) == 0


def test_an_unreadable_newest_checkpoint_is_skipped_and_none_readable_is_refused(run_dir, tmp_path, capsys):
    run = copy_run(run_dir, tmp_path)
    (run / STEP / "trainer.json").write_text('{"step": 1}')
    newer = run / "checkpoints" / "step-00000002"
    shutil.copytree(run / STEP, newer)
    (newer / ".metadata").write_bytes(b"\x80garbage")
    argv = ["run", str(SPECS / "tiny-llama.yaml"), "--dry-run", "--set", f"train.save_dir={tmp_path / 'save'}"]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert "warning: skipping checkpoint" in captured.err and "step-00000002, which cannot be read" in captured.err
    assert "resumes from" in captured.out and captured.out.split("resumes from ")[1].startswith(str(run / STEP))
    (run / STEP / ".metadata").write_bytes(b"\x80garbage")
    before = tree(tmp_path)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "none of its 2 complete checkpoints can be read (step-00000002, step-00000001)" in err, err
    assert tree(tmp_path) == before
