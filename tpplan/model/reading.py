"""Reading a model as ``tpplan import-hf`` and ``tpplan derive`` take it: a hub id or a bundled name, a local
folder, a ``config.json`` or a transformers model_type -- its config, and the ``model:`` section a spec written
for it names it by."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError, short

META_KEYS = ("_name_or_path", "transformers_version", "architectures", "auto_map", "torch_dtype", "dtype")


@dataclass
class Source:
    """A model as given: its transformers config and how a spec written for it names it."""

    config: Any
    model: dict[str, Any]  # the spec's model: section
    label: str  # what the user gave, for comments
    name_hint: str


def read_source(source: str, out_dir: Path | None) -> Source:
    """``source``: a config.json (a folder's, or one of its own), a folder, a transformers model_type, or a hub
    id / bundled name; local paths named relative to ``out_dir`` (the spec's folder) when it is given."""
    from transformers import AutoConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from tpplan.model.sources import load_config
    from tpplan.spec.model_spec import ModelSpec

    path = Path(source).expanduser()
    if path.exists() and not path.is_dir():
        from tpplan.core.fileio import read_input
        from tpplan.model.sources import MAX_CONFIG_BYTES

        try:  # a regular file of a sane size (a FIFO or a device would block or never end)
            data = json.loads(read_input(path, limit=MAX_CONFIG_BYTES, what="config.json"))
        except ValueError as exc:
            raise TpplanError(f"cannot read {source} as a config.json: {exc}") from None
        if not isinstance(data, dict) or "model_type" not in data:
            raise TpplanError(f"{source} is not a transformers config.json (no model_type)")
        if path.name == "config.json":
            return Source(config_from_folder(path.parent), {"name": relative(path.parent, out_dir)}, source,
                           path.parent.resolve().name)
        config = config_for(dict(data))
        body = {k: v for k, v in data.items() if k not in META_KEYS}
        return Source(config, {"name": None, "pretrained": False, "config": body}, source, path.stem)
    if path.is_dir():
        return Source(config_from_folder(path), {"name": relative(path, out_dir)}, source, path.resolve().name)
    if "/" not in source and source in CONFIG_MAPPING:
        config = AutoConfig.for_model(source)
        return Source(config, {"name": None, "pretrained": False, "config": {"model_type": source}}, source, source)
    if "/" not in source:
        raise TpplanError(
            f"{source!r} is not a file, a folder, a hub id (org/name) or a transformers model_type",
            hint="e.g. tpplan import-hf Qwen/Qwen2.5-7B, tpplan import-hf path/to/config.json, tpplan import-hf qwen2",
        )
    config = load_config(ModelSpec(name=source, pretrained=False))
    return Source(config, {"name": source}, source, source.rsplit("/", 1)[-1])


def config_for(data: dict):
    from transformers import AutoConfig

    model_type = data.pop("model_type")
    for key in META_KEYS:
        data.pop(key, None)
    try:
        return AutoConfig.for_model(model_type, **data)
    except Exception as exc:  # noqa: BLE001 - transformers' own validation (strict dataclass errors and others)
        reason = [line.strip() for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise TpplanError(f"cannot build a config for model_type {short(model_type)}: {reason[-1]}") from None


def config_from_folder(folder: Path):
    from transformers import AutoConfig

    from tpplan.core.fileio import read_input
    from tpplan.model.sources import MAX_CONFIG_BYTES

    read_input(folder / "config.json", limit=MAX_CONFIG_BYTES, what="config.json")  # no FIFO, no device
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as exc:
        raise TpplanError(f"cannot read the model config in {folder}: {exc}") from None


def relative(path: Path, out_dir: Path | None) -> str:
    """A local model folder as the spec should name it: relative to the spec's folder when it can."""
    import os

    path = path.resolve()
    if out_dir is not None:
        try:
            return os.path.relpath(path, out_dir.resolve())
        except ValueError:
            pass
    return str(path)


def causal_lm_class(config):
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    except KeyError:
        raise TpplanError(
            f"transformers has no causal-LM class for model_type {config.model_type!r}",
            hint="tpplan trains causal language models (AutoModelForCausalLM)",
        ) from None
