"""What a spec's ``model:`` section builds: a :class:`ModelSource`, the one way in (:func:`model_source`).

A spec's model is a transformers model -- a hub id, a local folder, or a config dict alone -- or
the user's own, built by a factory function (``model.factory``).  ``model_source(spec.model)``
gives a :class:`TransformersModel` or a :class:`FactoryModel` that builds the model (on the meta
device: no memory), its small twin for ``tpplan check``, and the description the check ranks
rebuild it from (:func:`source_from_job`).  ``stage.resolve_stage`` puts it together with the plan.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from tpplan.core.errors import ResolveError
from tpplan.model.factory import (
    Factory,
    bind_factory_args,
    exception_text,
    exit_text,
    from_user_code,
    import_factory,
    parse_factory,
    user_frame,
)
from tpplan.model.sources import build_model, load_config, shrink_config, torch_dtype
from tpplan.spec.model_spec import ModelSpec


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
                if not from_user_code(exc):
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
        frame = user_frame(exc, self.factory)
        on_meta = device == "meta" and ("meta" in str(exc).lower() or isinstance(exc, NotImplementedError))
        memory = isinstance(exc, MemoryError) or "can't allocate memory" in str(exc)
        what = exit_text(exc) if isinstance(exc, SystemExit) else f"raised {exception_text(exc)}"
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
