"""``tpplan export CKPT -o DIR``: a sharded training checkpoint -> a plain Hugging Face folder.

The checkpoint is the one the training script writes (``<run dir>/checkpoints/step-N/``,
torch.distributed.checkpoint with ``{"model": ..., "optim": ...}``).  Only the model's tensors are
read, as full tensors, in this one process (DCP reassembles the shards of any tp/dp layout); the
model is rebuilt from the run's saved spec on the meta device, filled, and written with
``save_pretrained`` (safetensors), next to the run's tokenizer.  The result loads with
``AutoModelForCausalLM.from_pretrained`` and needs no tpplan.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path

from .errors import TpplanError

_STEP = re.compile(r"^step-(\d+)$")


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under ``root`` (step-N folders; a save in progress is .step-N.partial)."""
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def find_checkpoint(path: Path) -> Path:
    """``path`` as a checkpoint folder: itself, or the newest complete one of a run directory."""
    if (path / ".metadata").is_file():
        if path.name.startswith(".") and path.name.endswith(".partial"):
            raise TpplanError(f"{path} is a checkpoint whose save did not finish", hint="export a complete step-N folder")
        return path
    for root in (path / "checkpoints", path):
        found = complete_checkpoints(root)
        if found:
            return found[-1]
    raise TpplanError(
        f"no complete checkpoint in {path}",
        hint="give a run directory (train.save_dir/<experiment>) or one of its checkpoints/step-N folders",
    )


def run_dir_of(checkpoint: Path) -> Path:
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def load_run_config(run_dir: Path):
    """The model config of a run: its saved spec.yaml (the spec that ran, merged)."""
    from .loader import load_spec
    from .models import load_spec_config

    spec_file = run_dir / "spec.yaml"
    if not spec_file.is_file():
        raise TpplanError(f"{run_dir} has no spec.yaml: not a tpplan run directory",
                          hint="tpplan run keeps the spec that ran in the run directory")
    spec = load_spec(spec_file)
    return spec, load_spec_config(spec)


def export_checkpoint(path: str | os.PathLike, output: str | os.PathLike, *, dtype: str | None = None) -> dict:
    """Write a ``save_pretrained`` folder for the checkpoint at ``path``; returns a summary."""
    import torch
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict_from_keys
    from transformers import AutoModelForCausalLM

    checkpoint = find_checkpoint(Path(path))
    run_dir = run_dir_of(checkpoint)
    spec, config = load_run_config(run_dir)
    import warnings

    with warnings.catch_warnings():  # "no process group: loading in a single process" is the point here
        warnings.simplefilter("ignore", UserWarning)
        state = _load_state_dict_from_keys({"model"}, checkpoint_id=str(checkpoint))["model"]
    state = {k: (v.full_tensor() if hasattr(v, "full_tensor") else v) for k, v in state.items()}
    target_dtype = getattr(torch, dtype or spec.model.dtype)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=target_dtype)
    expected = set(model.state_dict())
    missing = sorted(expected - set(state))
    tied = getattr(config, "tie_word_embeddings", False)
    if tied:
        out_emb = model.get_output_embeddings()
        names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        missing = [m for m in missing if not (out_emb is not None and m == names.get(id(out_emb.weight)))]
    if missing:
        raise TpplanError(f"the checkpoint lacks {len(missing)} of the model's tensors: {', '.join(missing[:5])}",
                          hint="was it written by a run of another model?")
    model.load_state_dict({k: v.to(target_dtype) for k, v in state.items() if k in expected}, strict=False, assign=True)
    if tied:
        model.tie_weights()
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer = run_dir / "tokenizer"
        if tokenizer.is_dir():
            for item in tokenizer.iterdir():
                if item.is_file():
                    shutil.copy2(item, staging / item.name)
        os.chmod(staging, 0o755)
        for item in staging.iterdir():
            os.chmod(item, 0o644)
        if output.exists():
            shutil.rmtree(output)
        os.replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return {
        "checkpoint": str(checkpoint),
        "output": str(output),
        "tensors": len(state),
        "parameters": sum(v.numel() for k, v in state.items() if k in expected),
        "tokenizer": (run_dir / "tokenizer").is_dir(),
    }
