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


MAX_TOKENIZER_FILE_BYTES = 1 << 30  # the largest tokenizer.json of the hub's models is ~35 MB


def _available_memory() -> int | None:
    """Bytes this process can still allocate (MemAvailable, within an address-space limit), or None."""
    import resource

    available = None
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    available = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    limit = resource.getrlimit(resource.RLIMIT_AS)[0]
    if limit != resource.RLIM_INFINITY:
        available = limit if available is None else min(available, limit)
    return available


def _tokenizer_files(tokenizer: Path) -> list[Path]:
    """The run's tokenizer files to copy (regular files only: no links, FIFOs or devices), each
    within MAX_TOKENIZER_FILE_BYTES: checked before anything is written."""
    if not tokenizer.is_dir() or tokenizer.is_symlink():
        return []
    files = []
    for item in sorted(tokenizer.iterdir()):
        info = os.lstat(item)
        if not stat.S_ISREG(info.st_mode):
            continue
        if info.st_size > MAX_TOKENIZER_FILE_BYTES:
            raise TpplanError(f"{shown(item)} holds {info.st_size:,} bytes: more than the {MAX_TOKENIZER_FILE_BYTES:,} "
                              "a tokenizer file has", hint="is this the run's tokenizer? move the file away to export "
                              "the model without it")
        files.append(item)
    return files


def _copy_file(source: Path, dest: Path) -> None:
    """Copy a regular file in bounded chunks (never the whole file in memory), at most its checked size."""
    import shutil

    with open(source, "rb", opener=lambda p, f: os.open(p, f | os.O_NOFOLLOW | os.O_NONBLOCK)) as f_in, \
            open(dest, "wb") as f_out:
        shutil.copyfileobj(f_in, f_out, length=1 << 20)
        if f_out.tell() > MAX_TOKENIZER_FILE_BYTES:
            raise TpplanError(f"{shown(source)} grew past {MAX_TOKENIZER_FILE_BYTES:,} bytes while it was copied")


def _checked_state(metadata, model, dtype: str, target_dtype) -> dict:
    """Name -> shape and dtype of each tensor to read (one name per tied group), after the
    checkpoint is proven to fit the model and the memory to hold it is proven to be there."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    from tpplan.plan.resolved import tied_names
    from tpplan.runtime.checkpoint import checkpoint_mismatch

    stored = metadata.state_dict_metadata
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    why = checkpoint_mismatch(metadata, expected, tied_names(model))
    if why is not None:
        raise TpplanError(f"{why}", hint="was it written by a run of another model?")
    for names in tied_names(model):  # tied: one parameter under several names, read under one that is stored
        present = [n for n in names if f"model.{n}" in stored]
        for name in names:
            if present and name not in present[:1]:
                expected.pop(name, None)
    state = {name: (shape, stored[f"model.{name}"].properties.dtype) for name, shape in expected.items()
             if isinstance(stored.get(f"model.{name}"), TensorStorageMetadata)}
    needed = sum(_bytes(shape, d) + (0 if d == target_dtype else _bytes(shape, target_dtype))
                 for shape, d in state.values())
    available = _available_memory()
    if available is not None and needed > available:
        raise TpplanError(f"exporting this checkpoint needs {needed / 2**30:,.1f} GiB of memory (every tensor whole, "
                          f"in {dtype}); {available / 2**30:,.1f} GiB is available",
                          hint="export on a machine with more memory (the checkpoint reshards to any size)")
    return state


def _bytes(shape: tuple, dtype) -> int:
    import math

    return math.prod(shape) * dtype.itemsize


def _read_tensors(checkpoint: Path, state: dict) -> dict:
    """The checkpoint's tensors, whole, in this one process (DCP reassembles the shards)."""
    import warnings

    import torch
    import torch.distributed.checkpoint as dcp

    from tpplan.runtime.checkpoint import CheckpointRefused, SafeCheckpointReader, SafeLoadPlanner

    try:
        tensors = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in state.items()}
    except (MemoryError, RuntimeError) as exc:
        raise TpplanError(f"not enough memory to hold the checkpoint's tensors: {_one_line(exc)}") from None
    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        try:
            dcp.load({"model": tensors}, storage_reader=SafeCheckpointReader(str(checkpoint)),
                     planner=SafeLoadPlanner(), no_dist=True)
        except CheckpointRefused as exc:
            raise TpplanError(f"refusing the checkpoint: {exc}") from None
        except (Exception, dcp.CheckpointException) as exc:  # noqa: BLE001 - DCP's failure on a damaged shard
            raise TpplanError(f"cannot read the checkpoint {shown(checkpoint)}: {_one_line(exc)}",
                              hint="a shard is damaged or does not belong to this checkpoint") from None
    return tensors


def _one_line(exc: BaseException) -> str:
    """An exception in one line; DCP's CheckpointException holds each rank's failure (and their tracebacks)."""
    failures = getattr(exc, "failures", None)
    if failures:
        exc = next(iter(failures.values()))
        exc = exc[0] if isinstance(exc, tuple) else exc  # torch's _WrappedException: (exception, frames)
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__


def export_checkpoint(path: str | os.PathLike, output: str | os.PathLike, *, dtype: str | None = None) -> dict:
    """Write a ``save_pretrained`` folder for the checkpoint at ``path``; returns a summary.

    Everything that can refuse is read and checked before any code of the run is imported (its
    ``model.factory``: only under ``--trust-factory``) and before memory is taken: the
    checkpoint's metadata, the run's spec, the tokenizer's file sizes; then the model is built on
    the meta device and the checkpoint's tensors compared with it; then the memory to hold them."""
    checkpoint = find_checkpoint(Path(path))
    run_dir = run_dir_of(checkpoint)
    output = Path(output)
    check_not_source(output, checkpoint, run_dir)  # both before torch is imported: refused in a moment
    check_output_dir(output, flag="-o")
    metadata = read_metadata(checkpoint)  # data, never code: before the run's own code is imported
    tokenizer = run_dir / "tokenizer"
    tokenizer_files = _tokenizer_files(tokenizer)
    spec, source = load_run_model(run_dir)

    import torch

    target_dtype = getattr(torch, dtype or spec.model.dtype)
    model = source.build(device="meta", dtype=dtype or spec.model.dtype)
    wanted = _checked_state(metadata, model, dtype or spec.model.dtype, target_dtype)
    state = _read_tensors(checkpoint, wanted)
    from tpplan.plan.resolved import tied_names

    tied = tied_names(model)
    model.load_state_dict({k: v.to(target_dtype) for k, v in state.items()}, strict=False, assign=True)
    for names in tied:  # assign=True gave the read name a tensor of its own: one parameter again
        param = model.get_parameter(next(n for n in names if n in state))
        for name in names:
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, param)

    def fill(folder: Path) -> None:
        if source.kind == "factory":
            _save_factory_model(model, source, folder, dtype or spec.model.dtype)
        else:
            model.save_pretrained(folder, safe_serialization=True)
        for item in tokenizer_files:
            _copy_file(item, folder / item.name)

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
