"""The twin and its trace: the model's tiny twin (same architecture, a few layers, small widths) runs one
forward under :mod:`tpplan.model.dataflow`, which records which modules and parameters every tensor flows from."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.model import sources as models
from tpplan.model.dataflow import trace
from tpplan.model.shrink import TWIN_HEAD_DIM as CHECK_HEAD_DIM
from tpplan.model.twin_run import position_ids, token_ids

from .common import DeriveRefused, one_line

TRACE_TP = 4  # the twin has kv heads = 4 and is emulated at EMULATE_TP: 2 heads per rank
# twice the check twin's head_dim: a view's heads dim (8 query heads at TRACE_TP) never equals it
TRACE_HEAD_DIM = 2 * CHECK_HEAD_DIM
TWIN_MAX_PARAMETERS = 64_000_000  # a twin larger than this was not shrunk: refuse rather than trace for minutes


@dataclass
class Traced:
    config: Any  # the full model's config
    twin_config: Any
    model: Any  # the twin, float32 on CPU, random init
    graph: Any  # dataflow.Graph
    inputs: dict
    blocks: tuple[str, ...] | None = None  # a spec's model.blocks: the patterns naming the decoder blocks


class OwnModel:
    """Stands in for a transformers config where the model is the user's own (``model.factory``):
    ``source`` builds it, its twin is the factory called with ``model.twin_args``; no attribute of a
    config (head counts, hidden size) is known -- derive reads what it needs off the model itself."""

    _attn_implementation = None

    def __init__(self, source):
        self.source = source

    def build(self, *, device: str = "meta", seed: int | None = None, dtype: str = "float32"):
        return self.source.build(device=device, dtype=dtype, seed=seed)


def build_model(config, *, device: str = "meta", seed: int | None = None, dtype: str = "float32"):
    """The model of a transformers config, or of a factory (``OwnModel``)."""
    if isinstance(config, OwnModel):
        return config.build(device=device, seed=seed, dtype=dtype)
    return models.build_model(config, device=device, seed=seed, dtype=dtype)


def twin_config(config):
    if isinstance(config, OwnModel):
        return OwnModel(config.source.twin(TRACE_TP))

    try:
        twin = models.shrink_config(config, TRACE_TP, head_dim=TRACE_HEAD_DIM)
    except Exception as exc:  # noqa: BLE001 - transformers' config objects refuse in many ways
        raise DeriveRefused(f"cannot shrink {type(config).__name__} to a tiny twin: {one_line(exc)}") from None
    twin._attn_implementation = config._attn_implementation
    if hasattr(twin, "use_cache"):
        twin.use_cache = False
    return twin


def trace_twin(config, build) -> Traced:
    """Build the tiny twin (``build(config, device, seed)``) and trace one forward of it."""

    twin = twin_config(config)
    try:
        size = sum(p.numel() for p in build(twin, device="meta").parameters())
    except TpplanError:
        raise  # a factory's own failure, located in its spec
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"transformers cannot build the tiny twin of {type(config).__name__}: "
                            f"{one_line(exc)}") from None
    if size > TWIN_MAX_PARAMETERS:
        raise DeriveRefused(
            f"the tiny twin of {type(config).__name__} is not tiny: {size / 1e6:.0f}M parameters (tpplan's "
            "shrink_config does not know the fields that size this model)",
            hint="derive from a small config.json of the same architecture (few layers, narrow widths): its rules "
                 "name the same modules; then set model.name to the full model and let `tpplan plan --resolve` "
                 "and `tpplan check` confirm it")
    try:
        model = build(twin, device="cpu", seed=0)
    except TpplanError:
        raise  # a factory's own failure, located in its spec
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"transformers cannot build the tiny twin of {type(config).__name__}: "
                            f"{one_line(exc)}") from None
    model.eval()  # dropout off: the emulation compares values
    if isinstance(twin, OwnModel):  # the forward's first parameter takes the token ids; its own positions
        import inspect

        first = next(iter(inspect.signature(model.forward).parameters))
        inputs = {first: token_ids(twin.source.vocab_size(model))}
    else:
        inputs = {"input_ids": token_ids(twin.vocab_size), "position_ids": position_ids()}
    try:
        graph = trace(model, **inputs)
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"the tiny twin of {type(model).__name__} does not run a forward: {one_line(exc)}") from None
    blocks = config.source.spec.blocks if isinstance(config, OwnModel) else None  # model.blocks, if the spec says
    return Traced(config, twin, model, graph, inputs, blocks)
