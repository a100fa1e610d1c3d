"""``tpplan export CKPT -o DIR``: a sharded training checkpoint -> a plain Hugging Face folder.

The checkpoint is the one the training script writes (``<run dir>/checkpoints/step-N/``,
torch.distributed.checkpoint with ``{"model": ..., "optim": ...}``).  Only the model's tensors are
read, as full tensors, in this one process (DCP reassembles the shards of any tp/dp layout); the
model is rebuilt from the run's saved spec on the meta device (the resolve stage's model source),
filled, and written with ``save_pretrained`` (safetensors), next to the run's tokenizer.  The
result loads with ``AutoModelForCausalLM.from_pretrained`` and needs no tpplan.

A model of your own (``model.factory``) has no ``save_pretrained``: its folder holds
``model.safetensors`` (its state dict, each tied parameter once) and ``model.json`` (the factory and
its arguments): ``model = factory(**args); safetensors.torch.load_model(model, "model.safetensors")``.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from tpplan.core.errors import TpplanError
from tpplan.core.fileio import check_output_dir, replace_dir_atomic, shown

_STEP = re.compile(r"^step-(\d+)$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (step-N folders; a save in progress is .step-N.partial)."""
    try:
        if not root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    except OSError as exc:
        raise TpplanError(f"cannot read {shown(root)}: {exc.strerror or exc}") from None
    return [p for _, p in sorted(found)]


def find_checkpoint(path: Path) -> Path:
    """``path`` as a checkpoint folder: itself, or the newest complete one of a run directory."""
    if (path / ".metadata").exists():
        if path.name.startswith(".") and path.name.endswith(".partial"):
            raise TpplanError(f"{shown(path)} is a checkpoint whose save did not finish",
                              hint="export a complete step-N folder")
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise TpplanError(
        f"no complete checkpoint in {shown(path)}",
        hint="give a run directory (train.save_dir/<experiment>) or one of its checkpoints/step-N folders",
    )


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_run_model(run_dir: Path):
    """The spec of a run (its saved spec.yaml: the spec that ran, merged) and its model source."""
    from tpplan.plan.stage import model_source
    from tpplan.spec.loader import load_spec

    spec_file = run_dir / "spec.yaml"
    if not spec_file.exists():
        raise TpplanError(f"{shown(run_dir)} has no spec.yaml: not a tpplan run directory",
                          hint="tpplan run keeps the spec that ran in the run directory")
    spec = load_spec(spec_file)
    return spec, model_source(spec)


def _aliases(model) -> list[list[str]]:
    """The names of each parameter held by several modules (tied)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def check_not_source(output: Path, checkpoint: Path, run_dir: Path) -> None:
    """An export never writes over, above or into what it reads."""
    out = output.resolve()
    sources = {"the run directory of the checkpoint": run_dir.resolve(), "the checkpoint folder": checkpoint.resolve()}
    for what, source in sources.items():
        if out == source:
            raise TpplanError(f"-o {shown(output)} is {what}: an export never replaces its own source",
                              hint="give a new folder, e.g. -o exported/")
    for what, source in sources.items():
        if out in source.parents:
            raise TpplanError(f"-o {shown(output)} holds {what}: an export never replaces its own source",
                              hint="give a new folder, e.g. -o exported/")
    for inner in (checkpoint.resolve(), run_dir.resolve() / "checkpoints"):
        if inner in out.parents:
            raise TpplanError(f"-o {shown(output)} is inside {shown(inner)}: an export never writes into a checkpoint",
                              hint="give a folder outside the checkpoints, e.g. -o exported/")


def read_metadata(checkpoint: Path):
    """The checkpoint's DCP metadata, read as data (allow-listed classes only) and checked."""
    from tpplan.runtime.checkpoint import CheckpointRefused, SafeCheckpointReader

    try:
        return SafeCheckpointReader(str(checkpoint)).read_metadata()
    except CheckpointRefused as exc:
        code = "run code" in str(exc)
        raise TpplanError(
            f"refusing the checkpoint: {exc}",
            hint="tpplan loads only plain DCP checkpoints (tensors and plain values)" if code
            else "the checkpoint is damaged or incomplete: export another checkpoints/step-N folder",
        ) from None


def export_checkpoint(path: str | os.PathLike, output: str | os.PathLike, *, dtype: str | None = None) -> dict:
    """Write a ``save_pretrained`` folder for the checkpoint at ``path``; returns a summary."""
    checkpoint = find_checkpoint(Path(path))
    run_dir = run_dir_of(checkpoint)
    output = Path(output)
    check_not_source(output, checkpoint, run_dir)  # both before torch is imported: refused in a moment
    check_output_dir(output, flag="-o")

    import warnings

    import torch
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tpplan.runtime.checkpoint import CheckpointRefused, SafeCheckpointReader, SafeLoadPlanner

    spec, source = load_run_model(run_dir)
    metadata = read_metadata(checkpoint)
    target_dtype = getattr(torch, dtype or spec.model.dtype)
    model = source.build(device="meta", dtype=dtype or spec.model.dtype)
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    aliases = _aliases(model)  # tied: one parameter under several names, read under one that is stored
    for names in aliases:
        present = [n for n in names if f"model.{n}" in metadata.state_dict_metadata]
        for name in names:
            if present and name not in present[:1]:
                expected.pop(name, None)
    stored = metadata.state_dict_metadata
    missing = sorted(k for k in expected if f"model.{k}" not in stored)
    if missing:
        raise TpplanError(f"the checkpoint lacks {len(missing)} of the model's tensors: {', '.join(missing[:5])}",
                          hint="was it written by a run of another model?")
    state = {}
    for name, shape in expected.items():
        entry = stored[f"model.{name}"]
        if not isinstance(entry, TensorStorageMetadata) or tuple(entry.size) != shape:
            have = tuple(entry.size) if isinstance(entry, TensorStorageMetadata) else "not a tensor"
            raise TpplanError(f"the checkpoint's model.{name} is {have}; the run's model has {shape}",
                              hint="was it written by a run of another model?")
        state[name] = torch.empty(shape, dtype=entry.properties.dtype)
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load({"model": state}, storage_reader=SafeCheckpointReader(str(checkpoint)),
                     planner=SafeLoadPlanner(), no_dist=True)
        except CheckpointRefused as exc:
            raise TpplanError(f"refusing the checkpoint: {exc}") from None
        except Exception as exc:  # noqa: BLE001 - DCP's own failure on a damaged shard
            raise TpplanError(f"cannot read the checkpoint {shown(checkpoint)}: {type(exc).__name__}: "
                              f"{str(exc).splitlines()[0] if str(exc) else ''}",
                              hint="a shard is damaged or does not belong to this checkpoint") from None
    model.load_state_dict({k: v.to(target_dtype) for k, v in state.items()}, strict=False, assign=True)
    for names in aliases:  # assign=True gave the read name a tensor of its own: one parameter again
        param = model.get_parameter(next(n for n in names if n in state))
        for name in names:
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, param)
    tokenizer = run_dir / "tokenizer"

    def fill(folder: Path) -> None:
        if source.kind == "factory":
            _save_factory_model(model, source, folder, dtype or spec.model.dtype)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        if tokenizer.is_dir() and not tokenizer.is_symlink():
            for item in sorted(tokenizer.iterdir()):
                if stat.S_ISREG(os.lstat(item).st_mode):  # plain files only: no links, FIFOs, devices
                    (folder / item.name).write_bytes(item.read_bytes())
        for item in folder.iterdir():
            os.chmod(item, 0o644)

    replace_dir_atomic(fill, output, kind="export")
    return {
        "checkpoint": str(checkpoint),
        "output": str(output),
        "tensors": len(state),
        "parameters": sum(v.numel() for v in state.values()),
        "tokenizer": tokenizer.is_dir(),
    }


def _save_factory_model(model, source, folder: Path, dtype: str) -> None:
    """``model.safetensors`` (each tied parameter once) and ``model.json`` (how to build the model)."""
    import json

    from safetensors.torch import save_model

    save_model(model, str(folder / "model.safetensors"))
    factory = source.factory
    description = {
        "factory": f"{factory.file}:{factory.attr}" if factory.file else factory.text,
        "args": source.args,
        "dtype": dtype,
        "load": "model = factory(**args); safetensors.torch.load_model(model, 'model.safetensors')",
    }
    (folder / "model.json").write_text(json.dumps(description, indent=2) + "\n")
