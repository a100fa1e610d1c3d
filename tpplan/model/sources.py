"""Model configs and model skeletons: what resolve, check and plan need, without weights.

A spec's model is a transformers model -- a hub id, a local folder, or a config dict alone -- or
the user's own, built by a factory function (``model.factory``).  A transformers config is looked
up locally first (a folder, the Hugging Face cache, then the configs bundled with tpplan for
well-known models), and on the hub only when none of those has it and the hub is not offline.

``model_source(spec.model)`` is the one way in: a :class:`ModelSource` that builds the model (on
the meta device: no memory), its small twin for ``tpplan check``, and the description the check
ranks rebuild it from.  ``stage.resolve_stage`` puts it together with the plan.
"""

from __future__ import annotations

import contextlib
import copy
import difflib
import json
import os
import stat
from dataclasses import dataclass
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


def _shown(path: Path) -> str:
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
                f"model folder {_shown(local)} has no config.json",
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
            raise ResolveError(f"cannot read the model config in {_shown(local)}: {exc}", path="model.name") from None
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


# ------------------------------------------------------------------------------------------
# A user's own model: `model.factory` (a function or class returning an nn.Module)
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Factory:
    """Where a spec's ``model.factory`` lives.

    ``path/to/file.py:build``: a file, relative to the spec; its folder is put first on
    ``sys.path`` and the file imported by its name (as ``python path/to/file.py`` would see its
    sibling modules).  ``package.module:build``: a module on the Python path (PYTHONPATH,
    installed packages).  The part after the ``:`` may be ``Class.method``."""

    text: str  # as the spec gives it
    module: str  # the name it is imported by
    attr: str  # the callable, possibly dotted (Class.method)
    file: Path | None = None  # the .py file (file form)

    @property
    def root(self) -> Path | None:
        """The folder put first on sys.path (file form)."""
        return self.file.parent if self.file is not None else None

    @property
    def shown(self) -> str:
        return f"{_shown(self.file)}:{self.attr}" if self.file is not None else self.text


def parse_factory(text: str, base_dir: Path | None, field: str = "model.factory") -> Factory:
    """``model.factory`` (or a rule's ``style`` of one's own, ``field``) -> a Factory; a file that does
    not exist is an error at ``field``."""
    module, _, attr = text.rpartition(":")
    if not (module.endswith(".py") or "/" in module):
        return Factory(text=text, module=module, attr=attr)
    path = Path(os.path.expanduser(module))
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    shown = _shown(path)
    what, name = ("model factory", "function") if field == "model.factory" else ("parallel style", "Class")
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        raise ResolveError(
            f"{what} file not found: {module!r}" + (f" ({shown})" if shown != module else ""),
            path=field,
            hint=f"a file path in {field} is relative to the spec file; a dotted name "
            f"(package.module:{name}) is imported from the Python path",
        ) from None
    if not stat.S_ISREG(mode):  # a folder, a FIFO (importing would block), a device: never opened
        from tpplan.core.fileio import file_kind

        raise ResolveError(
            f"{what} file {module!r}" + (f" ({shown})" if shown != module else "")
            + f" is a {file_kind(mode)}, not a Python file",
            path=field,
            hint=f"name a .py file and the {name.lower()} in it: 'path/to/file.py:{name}'",
        )
    return Factory(text=text, module=path.stem, attr=attr, file=path.resolve())


def _user_frame(exc: BaseException, factory: Factory) -> str | None:
    """``file:line`` of the innermost frame of the user's code in ``exc``'s traceback."""
    import traceback

    if isinstance(exc, SyntaxError) and exc.filename:
        return f"{_shown(Path(exc.filename))}:{exc.lineno}"
    root = str(factory.root) if factory.root is not None else None
    frames = traceback.extract_tb(exc.__traceback__)
    mine = [f for f in frames if root and f.filename.startswith(root)] or [
        f for f in frames if "site-packages" not in f.filename and "/tpplan/" not in f.filename
        and "importlib" not in f.filename
    ]
    if not mine:
        return None
    frame = mine[-1]
    return f"{_shown(Path(frame.filename))}:{frame.lineno}" + (f": {frame.line.strip()}" if frame.line else "")


def _exception_text(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _from_user_code(exc: BaseException) -> bool:
    """Whether ``exc``, raised while the user's code ran, is that code's failure: everything but a
    KeyboardInterrupt that a real Ctrl-C or SIGTERM caused (that one stops the command)."""
    from tpplan.core.processes import received

    return not (isinstance(exc, KeyboardInterrupt) and received() is not None)


def _exit_text(exc: BaseException) -> str:
    """A SystemExit as words: ``sys.exit(0)``, ``sys.exit('usage: ...')``."""
    code = exc.code if isinstance(exc, SystemExit) else None
    shown = repr(code if not isinstance(code, str) else code.splitlines()[0] if code else code)
    return f"called sys.exit({'' if code is None else shown[:120]})"


def import_factory(factory: Factory, field: str = "model.factory", what: str = "the model factory"):
    """The callable ``factory`` names, imported (errors: at ``field``, with the user's line).  Only when
    the user trusts the spec (``trust.require_trust``): importing runs the module.  A rule's style of
    one's own is imported by the same function, under the same trust (``field``: the rule's style)."""
    import importlib
    import sys

    from tpplan.core.trust import require_trust

    require_trust(field, f"{field} {factory.text!r}")
    if factory.root is not None:
        loaded = sys.modules.get(factory.module)
        where = getattr(loaded, "__file__", None)
        if loaded is not None and (where is None or Path(where).resolve() != factory.file):
            raise ResolveError(
                f"a module named {factory.module!r} is already imported from "
                f"{where or 'a built-in'}; {_shown(factory.file)} would not be the one used",
                path=field,
                hint=f"rename {factory.file.name} to a name no installed package uses",
            )
        root = str(factory.root)
        if root not in sys.path:
            sys.path.insert(0, root)
    try:
        module = importlib.import_module(factory.module)
    except ModuleNotFoundError as exc:
        if exc.name and (factory.module == exc.name or factory.module.startswith(exc.name + ".")):
            raise ResolveError(
                f"no module named {exc.name!r} on the Python path (for {factory.text!r})",
                path=field,
                hint="add its folder to PYTHONPATH (or pip install its package), or name a file: "
                "'path/to/file.py:function', relative to the spec",
            ) from None
        frame = _user_frame(exc, factory)
        raise ResolveError(
            f"importing {what} {factory.shown!r} failed: {_exception_text(exc)}"
            + (f" ({frame})" if frame else ""),
            path=field,
            hint=f"the {'factory' if field == 'model.factory' else 'style'}'s module imports a package that is not "
            "installed here",
        ) from None
    except BaseException as exc:  # the user's module raised, or exited, while importing: say where
        if not _from_user_code(exc):
            raise
        frame = _user_frame(exc, factory)
        outcome = _exit_text(exc) if isinstance(exc, SystemExit) else f"failed: {_exception_text(exc)}"
        raise ResolveError(
            f"importing {what} {factory.shown!r} {outcome}" + (f" ({frame})" if frame else ""),
            path=field,
            hint=f"a module that {field} names must define the {'factory' if field == 'model.factory' else 'style'} "
            "when it is imported, not run a "
            "program (keep a script's work under `if __name__ == \"__main__\":`)" if isinstance(exc, SystemExit)
            else None,
        ) from None
    target: Any = module
    where = _shown(factory.file) if factory.file is not None else factory.module
    for i, part in enumerate(factory.attr.split(".")):
        if not hasattr(target, part):
            owner = where if i == 0 else f"{where}:{'.'.join(factory.attr.split('.')[:i])}"
            names = [n for n in dir(target) if not n.startswith("_") and callable(getattr(target, n, None))]
            close = difflib.get_close_matches(part, names, n=3, cutoff=0.5)
            raise ResolveError(
                f"{owner} has no attribute {part!r}",
                path=field,
                hint=(f"did you mean {', '.join(close)}? " if close else "")
                + (f"callables in {owner}: {', '.join(names[:12])}" if names else f"{owner} defines no callables"),
            )
        target = getattr(target, part)
    if not callable(target):
        kind = type(target).__name__
        raise ResolveError(
            f"{where}:{factory.attr} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not a function or class",
            path=field,
        )
    return target


def bind_factory_args(function, factory: Factory, args: dict, twin_args: dict | None = None) -> None:
    """The factory's signature accepts ``args`` (and ``args`` merged with ``twin_args``): every key
    names a parameter, every required parameter is given.  Errors point at the key at fault."""
    import inspect

    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: nothing to check
        return
    params = signature.parameters
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    by_keyword = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    label = f"{factory.attr}()"
    for section, given in (("args", args), ("twin_args", twin_args or {})):
        for key in given:
            if key in params and params[key].kind is params[key].POSITIONAL_ONLY:
                raise ResolveError(f"{label} takes {key!r} only by position: it cannot be given in model.{section}",
                                   path=f"model.{section}.{key}")
            if key not in params and not var_kw:
                close = difflib.get_close_matches(key, by_keyword, n=3, cutoff=0.6)
                raise ResolveError(
                    f"{label} has no parameter {key!r}",
                    path=f"model.{section}.{key}",
                    hint=(f"did you mean {', '.join(repr(c) for c in close)}? " if close else "")
                    + (f"its parameters: {', '.join(by_keyword)}" if by_keyword else f"{label} takes no keyword arguments"),
                )
    cases = [("args", dict(args))]
    if twin_args is not None:
        cases.append(("twin_args", {**args, **twin_args}))
    for section, given in cases:
        missing = [
            n for n, p in params.items()
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY, p.POSITIONAL_ONLY)
            and n not in given
        ]
        if missing:
            what = "model.args" if section == "args" else "model.args merged with model.twin_args"
            raise ResolveError(
                f"{label} needs {', '.join(repr(m) for m in missing)}, missing from {what}",
                path=f"model.{section}",
                hint=f"give {', '.join(missing)} in model.args",
            )
        try:
            signature.bind(**given)
        except TypeError as exc:
            raise ResolveError(f"model.{section} do not fit {label}: {exc}", path=f"model.{section}") from None


class ModelSource:
    """What a spec's ``model:`` section builds: a transformers model from its config, or a user's
    model from its factory.  ``build`` makes one (on ``meta``: no memory); ``twin`` is the small
    model of the same architecture that ``tpplan check`` runs; ``to_job``/``source_from_job``
    carry it to the check ranks."""

    kind: str = ""
    spec: ModelSpec
    config: Any = None  # the transformers config (None for a factory model)
    # errors raised later (a factory's build) get the place in the spec file: stage.model_source sets it
    located: Any = contextlib.nullcontext

    @property
    def positions(self) -> str | None:
        """The forward's keyword for position ids (None: the model makes its own)."""
        return self.spec.positions

    def vocab_size(self, model) -> int:
        """The token ids the model takes: its config's vocab_size, else its (first) nn.Embedding's rows."""
        import torch.nn as nn

        size = getattr(self.config, "vocab_size", None)
        if isinstance(size, int) and size > 0:
            return size
        embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is None:
            raise ResolveError(f"{type(model).__name__} has no nn.Embedding: tpplan cannot tell its vocabulary",
                               path="model")
        return embedding.num_embeddings

    def attention_size(self, model) -> int | None:
        """layers x heads x head_dim: attention's share of the training FLOPs per token is 12 x the
        sequence length x this (MFU).  A factory model's: the sum over its attention modules (those
        with a head count and a head size, ``model.head_attrs``).  None: unknown."""
        from tpplan.spec.model_spec import head_attr

        total = 0
        for module in model.modules():
            heads, head_dim = (head_attr(module, what, self.spec.head_attrs) for what in ("heads", "head_dim"))
            if heads and head_dim:
                total += heads * head_dim
        return total or None

    @property
    def label(self) -> str:  # pragma: no cover - overridden
        raise NotImplementedError

    def build(self, *, device: str = "meta", dtype: str | None = None, seed: int | None = None):  # pragma: no cover
        raise NotImplementedError

    def twin(self, tp: int) -> ModelSource:  # pragma: no cover
        raise NotImplementedError

    def to_job(self) -> dict:  # pragma: no cover
        raise NotImplementedError

    def summary(self) -> dict:  # pragma: no cover
        raise NotImplementedError


class TransformersModel(ModelSource):
    kind = "transformers"

    def __init__(self, spec: ModelSpec, config):
        self.spec = spec
        self.config = config

    @property
    def label(self) -> str:
        return self.spec.name or self.config.model_type

    def build(self, *, device: str = "meta", dtype: str | None = None, seed: int | None = None):
        return build_model(self.config, device=device, dtype=dtype or self.spec.dtype, seed=seed)

    def attention_size(self, model) -> int | None:
        """From the config, as torchtitan counts it (a config with per-layer attributes: None)."""
        config = self.config
        try:
            heads = config.num_attention_heads
            head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
            size = config.num_hidden_layers * heads * head_dim
        except Exception:  # noqa: BLE001 - per-layer attributes raise when read globally (Gemma 4)
            return None
        return size if isinstance(size, int) and size > 0 else None

    def twin(self, tp: int) -> TransformersModel:
        twin = shrink_config(self.config, tp)
        twin._attn_implementation = self.config._attn_implementation
        return TransformersModel(self.spec, twin)

    def to_job(self) -> dict:
        return {"kind": self.kind, "model": self.spec.model_dump(mode="json", exclude_unset=True),
                "config": self.config.to_dict(), "attn_implementation": self.config._attn_implementation}

    def summary(self) -> dict:
        keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
                "head_dim", "num_hidden_layers", "vocab_size")
        out = {}
        for key in keys:
            try:
                value = getattr(self.config, key, None)
            except Exception:  # noqa: BLE001 - per-layer attributes raise when read globally (Gemma 4)
                continue
            if isinstance(value, (int, float, str)):
                out[key] = value
        return out


class FactoryModel(ModelSource):
    kind = "factory"

    def __init__(self, spec: ModelSpec, factory: Factory, args: dict):
        self.spec = spec
        self.factory = factory
        self.args = dict(args)
        self._callable = None

    @property
    def label(self) -> str:
        return self.factory.shown

    def callable(self):
        if self._callable is None:
            self._callable = import_factory(self.factory)
        return self._callable

    def validate(self) -> None:
        """Import the factory and bind ``args`` (and ``args`` + ``twin_args``) to its signature."""
        bind_factory_args(self.callable(), self.factory, self.spec.args, self.spec.twin_args)

    def build(self, *, device: str = "meta", dtype: str | None = None, seed: int | None = None):
        import torch

        with self.located():
            function = self.callable()
            if seed is not None:
                torch.manual_seed(seed)
            previous = torch.get_default_dtype()
            torch.set_default_dtype(torch_dtype(dtype or self.spec.dtype))  # as from_config(dtype=...) does
            try:
                with torch.device(device):
                    model = function(**self.args)
            except BaseException as exc:  # an exception, sys.exit, a KeyboardInterrupt of its own: its failure
                if not _from_user_code(exc):
                    raise
                raise self._build_failed(exc, device) from None
            finally:
                torch.set_default_dtype(previous)
            if not isinstance(model, torch.nn.Module):
                raise ResolveError(
                    f"the model factory {self.factory.shown!r} returned a {type(model).__name__}, not a "
                    "torch.nn.Module",
                    path="model.factory",
                )
        return model

    def _build_failed(self, exc: BaseException, device: str) -> ResolveError:
        frame = _user_frame(exc, self.factory)
        on_meta = device == "meta" and ("meta" in str(exc).lower() or isinstance(exc, NotImplementedError))
        memory = isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)
        what = _exit_text(exc) if isinstance(exc, SystemExit) else f"raised {_exception_text(exc)}"
        hint = None
        if on_meta:
            hint = ("tpplan builds the model on the meta device (no memory): a factory must create its tensors on "
                    "the current device (no .to('cuda'), no weights read, no .item() on new tensors)")
        elif memory:
            hint = ("the factory asked for more memory than this machine has: create tensors on the current "
                    "device (tpplan builds on the meta device) and check model.args")
        return ResolveError(f"the model factory {self.factory.shown!r} {what}" + (f" ({frame})" if frame else ""),
                            path="model.factory", hint=hint)

    def twin(self, tp: int) -> FactoryModel:
        if self.spec.twin_args is None:
            with self.located():
                self._no_twin()
        twin = FactoryModel(self.spec, self.factory, {**self.args, **self.spec.twin_args})
        twin.located = self.located
        return twin

    def _no_twin(self) -> None:
        raise ResolveError(
                "tpplan check needs a small model of the same architecture, and a factory model has no config "
                "to shrink: set model.twin_args",
                path="model.twin_args",
                hint="e.g. twin_args: {n_layers: 2, dim: 64, n_heads: 4, n_kv_heads: 2, vocab_size: 256}: merged "
                "over model.args; keep head counts divisible by the tp you check with",
        )

    def to_job(self) -> dict:
        factory = f"{self.factory.file}:{self.factory.attr}" if self.factory.file else self.factory.text
        return {"kind": self.kind, "model": self.spec.model_dump(mode="json", exclude_unset=True),
                "factory": factory, "args": self.args}

    def summary(self) -> dict:
        return {"factory": self.factory.shown, **self.args}


def model_source(model: ModelSpec, base_dir: Path | None = None) -> ModelSource:
    """The source of a spec's model: its transformers config (loaded) or its factory (imported and
    checked against ``args``).  Errors carry the field path; ``stage.model_source`` locates them."""
    if model.factory is not None:
        source = FactoryModel(model, parse_factory(model.factory, base_dir), model.args)
        source.validate()
        return source
    return TransformersModel(model, load_config(model, base_dir))


def source_from_job(job: dict) -> ModelSource:
    """The ModelSource that ``to_job`` described (inside a check rank)."""
    model = ModelSpec.model_validate(job["model"])
    if job["kind"] == "factory":
        return FactoryModel(model, parse_factory(job["factory"], None), job["args"])
    from transformers import AutoConfig

    data = dict(job["config"])
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    config._attn_implementation = job["attn_implementation"]
    config.use_cache = False
    return TransformersModel(model, config)
