"""Model configs and model skeletons: a transformers model as resolve, check and plan need it (no weights).

A transformers config is looked up locally first (a folder, the Hugging Face cache, then the configs
bundled with tpplan for well-known models), and on the hub only when none of those has it and the
hub is not offline (:func:`load_config`, the spec's overrides applied and bounded).
:func:`build_model` makes the model from it (on the meta device: no memory), :func:`shrink_config`
its small twin's config.  A spec's model as one object (a transformers model, or the user's own
built by a factory function) is a ``ModelSource``: tpplan/model/model_source.py.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from tpplan.core.errors import ResolveError
from tpplan.spec.model_spec import ModelSpec

MAX_CONFIG_BYTES = 16 << 20  # a config.json is a few KB


def local_model_dir(name: str, base_dir: Path | None) -> Path | None:
    """``name`` as a local folder (absolute, or relative to the spec file), if it is one."""
    candidates = [Path(os.path.expanduser(name))]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, base_dir / name)
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return None


def shown(path: Path) -> str:
    """A path as messages show it: relative to the working directory when below it."""
    try:
        relative = os.path.relpath(path)
    except ValueError:
        return str(path)
    return str(path) if relative.startswith("..") else relative


def bundled_config_path(name: str) -> Path | None:
    path = Path(str(resources.files("tpplan.model.configs"))) / (name.replace("/", "--") + ".json")
    return path if path.is_file() else None


def bundled_config_names() -> list[str]:
    folder = Path(str(resources.files("tpplan.model.configs")))
    return sorted(p.stem.replace("--", "/") for p in folder.glob("*.json"))


def _hub_offline() -> bool:
    """HF_HUB_OFFLINE, or no route to the hub: one quick connection attempt instead of the hub
    client's minute of retries on a machine without network."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        return True
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout=3).close()
    except OSError:
        return True
    return False


def load_config(model: ModelSpec, base_dir: Path | None = None):
    """The transformers config for a spec's model, with the spec's overrides applied."""
    from transformers import AutoConfig

    overrides = dict(model.config)
    if model.name is None:
        model_type = overrides.pop("model_type")
        from transformers.models.auto.configuration_auto import CONFIG_MAPPING

        if model_type not in CONFIG_MAPPING:
            close = difflib.get_close_matches(str(model_type), list(CONFIG_MAPPING.keys()), n=3, cutoff=0.6)
            raise ResolveError(
                f"unknown model_type {model_type!r}: transformers {_transformers_version()} has no such model",
                path="model.config.model_type",
                hint=(f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
                + "model_type is a transformers model type such as llama, qwen2, mistral, gemma2",
            )
        try:
            config = AutoConfig.for_model(model_type, **overrides)
        except Exception as exc:  # noqa: BLE001 - transformers' own validation: strict dataclass errors and others
            raise _config_refused(exc, model_type, overrides) from None
        return _finish(config, model)

    kwargs: dict[str, Any] = {"trust_remote_code": _remote_code_trusted(model)}
    if model.revision:
        kwargs["revision"] = model.revision
    local = local_model_dir(model.name, base_dir)
    config = None
    errors: list[str] = []
    if local is not None:
        if not os.path.lexists(local / "config.json"):
            raise ResolveError(
                f"model folder {shown(local)} has no config.json",
                path="model.name",
                hint="point model.name at a folder made by save_pretrained or `huggingface-cli download`",
            )
        from tpplan.core.fileio import FileProblem, read_input

        try:  # a regular file of a sane size before transformers reads it (a FIFO would block)
            read_input(local / "config.json", limit=MAX_CONFIG_BYTES, what="config.json")
        except FileProblem as exc:
            raise ResolveError(exc.message, path="model.name", hint=exc.hint) from None
        try:
            config = AutoConfig.from_pretrained(str(local), **kwargs)
        except (OSError, ValueError) as exc:
            raise ResolveError(f"cannot read the model config in {shown(local)}: {exc}", path="model.name") from None
    if config is None:
        try:  # the Hugging Face cache: fast, no network
            config = AutoConfig.from_pretrained(model.name, local_files_only=True, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"not in the Hugging Face cache ({type(exc).__name__})")
    if config is None:
        bundled = bundled_config_path(model.name)
        if bundled is not None:
            config = AutoConfig.for_model(**json.loads(bundled.read_text()))
        else:
            errors.append("not bundled with tpplan")
    if config is None and not _hub_offline():
        try:
            config = AutoConfig.from_pretrained(model.name, **kwargs)
        except (OSError, ValueError) as exc:
            errors.append(f"the hub did not give it ({str(exc).splitlines()[0][:160]})")
    if config is None:
        where = "; ".join(errors + (["the hub is out of reach (offline)"] if _hub_offline() else []))
        raise ResolveError(
            f"cannot load the config of model {model.name!r} offline: not a local folder; {where}",
            path="model.name",
            hint="point model.name at a local folder holding config.json (and weights to train), e.g. one made "
            f"with `huggingface-cli download {model.name}`; configs bundled with tpplan: "
            + ", ".join(bundled_config_names()),
        )
    try:
        config.update(overrides)
        if overrides and hasattr(config, "validate"):
            config.validate()  # transformers' checks of the whole config, with the spec's values in it
    except Exception as exc:  # noqa: BLE001 - transformers' own validation
        raise _config_refused(exc, getattr(config, "model_type", "model"), overrides) from None
    return _finish(config, model)


def _remote_code_trusted(model: ModelSpec) -> bool:
    """``model.trust_remote_code``, refused unless the user trusts the spec (transformers would import
    the model repository's Python code: tpplan's rule for a spec's code, ``trust.require_trust``)."""
    if model.trust_remote_code:
        from tpplan.core.trust import require_trust

        require_trust("model.trust_remote_code", "model.trust_remote_code: true (the model repository's modeling code)")
    return model.trust_remote_code


def _config_refused(exc: Exception, model_type: str, overrides: dict) -> ResolveError:
    """transformers refused a config value: the message, located at the key when it names one
    the spec wrote (model.config.<key>), else at model.config."""
    import re

    text = str(exc).strip()
    cause = exc.__cause__ or exc.__context__
    if cause is not None and str(cause) and str(cause) not in text:
        text = f"{text}: {cause}"
    field = re.search(r"field '(\w+)'", text)
    key = field.group(1) if field and field.group(1) in overrides else None
    if key is None:
        lowered = text.lower()
        named = [k for k in overrides if k != "model_type" and (k in text or k.replace("_", " ") in lowered)]
        key = named[0] if len(named) == 1 else None
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    reason = lines[-1] if lines else type(exc).__name__
    if isinstance(exc, ZeroDivisionError):
        reason = "a size that divides others is 0 (ZeroDivisionError in transformers)"
    return ResolveError(
        f"transformers refuses this {model_type} config: {reason}",
        path=f"model.config.{key}" if key else "model.config",
        hint="set values the model class accepts (transformers validates each config when it is built)",
    )


def check_config_bounds(config, model: ModelSpec) -> None:
    """Counts that make modules (blocks, experts) within bounds, whatever the config's source: a
    config with a million layers is an error, not a model that never finishes building."""
    from tpplan.model.shrink import config_get
    from tpplan.spec.model_spec import CONFIG_BOUNDS

    for key, (low, high, what) in CONFIG_BOUNDS.items():
        value = config_get(config, key) if key in vars(config) or hasattr(type(config), key) else None
        if not isinstance(value, int) or isinstance(value, bool) or low <= value <= high:
            continue
        where = f"model.config.{key}" if key in model.config else ("model.name" if model.name else "model.config")
        raise ResolveError(
            f"the model's {key} is {value:,}; tpplan takes {what} from {low:,} to {high:,}",
            path=where,
            hint="is the config right? set model.config." + key + " to override it",
        )


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _finish(config, model: ModelSpec):
    check_config_bounds(config, model)
    config._attn_implementation = model.attn_implementation
    if hasattr(config, "use_cache"):
        config.use_cache = False  # training: no KV cache
    return config


def torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def build_model(config, *, device: str = "meta", dtype: str = "float32", seed: int | None = None):
    """A causal-LM skeleton from ``config``: on ``meta`` no memory is used; elsewhere random init."""
    import torch
    from transformers import AutoModelForCausalLM

    if seed is not None:
        torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(
            copy.deepcopy(config),
            dtype=torch_dtype(dtype),
            attn_implementation=config._attn_implementation,
        )
    return model


def shrink_config(config, tp: int, *, layers: int = 2, head_dim: int | None = None, vocab: int | None = None):
    """A small twin of ``config`` (see ``tpplan.model.shrink``): same architecture, toy widths that divide by tp."""
    from tpplan.model.shrink import TWIN_HEAD_DIM
    from tpplan.model.shrink import shrink_config as shrink

    return shrink(config, tp, layers=layers, head_dim=head_dim or TWIN_HEAD_DIM, vocab=vocab)
