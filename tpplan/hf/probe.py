"""What import-hf reads off the model: its parts, and how its tiny twin calls them.

``describe`` names the parts of the model built on the meta device (``Model``: its modules and
parameters, the input and output embeddings, the pattern of the decoder blocks).  ``Probe`` runs one
forward of the model's tiny twin (CPU, float32) and records how each module is first called: the
shapes of its inputs and output, from which the residual stream's way into a module and the dim of
the attention heads are measured, never guessed.  ``matching`` (the module names a pattern matches)
and ``is_norm`` are the questions every step of import-hf asks of a name and a module.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpplan.model.shrink import config_get, config_values
from tpplan.model.twin_run import TRACE_BATCH, TRACE_SEQ, cpu_twin, token_ids


def is_norm(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def matching(pattern: str, names) -> list[str]:
    from tpplan.core.patterns import matches

    return [n for n in names if matches(pattern, n)]


class Probe:
    """One forward of the model's tiny twin (CPU, float32), recording how every module is first called.

    The twin runs under the one tracer of the twin (``tpplan.model.dataflow``, which derive reads the
    dataflow from); the probe keeps each module's first call as shapes."""

    def __init__(self, config):
        from tpplan.model.dataflow import trace_until_error

        self.calls: dict[str, dict] = {}  # module name -> first call, in execution order
        self.error: str | None = None
        self.config = None  # the twin's, once built
        try:
            self.config, model = cpu_twin(config, 2)
            graph, error = trace_until_error(model, input_ids=token_ids(self.config.vocab_size))
        except Exception as exc:  # noqa: BLE001 - any failure only means "cannot measure"
            graph, error = None, exc
        if error is not None:
            self.error = f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        for call in graph.calls if graph is not None else ():
            if call.module not in self.calls:  # the calls until a failure, as far as the forward went
                self.calls[call.module] = _shapes(call, graph)

    def first(self, pattern: str) -> str | None:
        """The twin's first-called module matching ``pattern`` (the twin has 2 layers: maybe none)."""
        return next((name for name in self.calls if matching(pattern, [name])), None)

    def order(self, pattern: str) -> int:
        name = self.first(pattern)
        return list(self.calls).index(name) if name else len(self.calls)

    @property
    def stream(self) -> tuple[int, int, int]:
        text = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        return (TRACE_BATCH, TRACE_SEQ, config_get(text, "hidden_size"))  # Llama 4: the text model's width

    def stream_input(self, name: str) -> tuple[str, Any] | None:
        """("arg", 0) or ("kwarg", "hidden_states"): how the residual stream enters ``name``."""
        call = self.calls.get(name)
        if call is None:
            return None
        for i, shape in enumerate(call["args"]):
            if shape == self.stream:
                return ("arg", i)
        for key, shape in call["kwargs"].items():
            if shape == self.stream:
                return ("kwarg", key)
        return None

    def heads_dim(self, pattern: str) -> tuple[int | None, str]:
        """The dim of the attention heads in the input of the modules ``pattern`` matches, or None and why not."""
        name = self.first(pattern)
        call = self.calls.get(name) if name else None
        if call is None or not call["args"] or call["args"][0] is None:
            why = f"the tiny twin did not run ({self.error})" if self.error else "the 2-layer tiny twin never calls one"
            return None, why
        shape = call["args"][0]
        # every layer's values (Gemma 4's global layers have their own head_dim, dots3's their own heads)
        heads = config_values(self.config, "num_attention_heads") | config_values(self.config, "num_key_value_heads")
        head_dims = config_values(self.config, "head_dim") or {self.config.hidden_size // h for h in heads}
        if shape[-1] not in head_dims:
            return None, (f"its input {shape} does not end in head_dim ({' or '.join(map(str, sorted(head_dims)))}): "
                          "it normalizes more than one head")
        dims = [d for d, n in enumerate(shape[:-1]) if d > 0 and n in heads and n != TRACE_SEQ]
        if len(dims) != 1:
            return None, f"cannot tell the heads dim of its input {shape}"
        return dims[0], ""


def _shapes(call, graph) -> dict:
    """A module's call as shapes: its positional inputs (None where not one tensor), its keyword tensors,
    its (first) output and how many outputs it returned."""
    def shape(value):
        return None if value is None else graph.values[value].shape

    first = call.output_shapes[0] if call.output_shapes else None
    shapes = {
        "args": [shape(v) for where, v in call.args if isinstance(where, int)],
        "kwargs": {where: shape(v) for where, v in call.args if isinstance(where, str) and v is not None},
        "output": first,
    }
    if first is not None:
        shapes["n_outputs"] = len(call.output_shapes)
    return shapes


@dataclass
class Model:
    model: Any
    modules: dict[str, Any]
    params: set[str]
    embed: str | None
    logits: str | None
    blocks: str | None  # pattern of the decoder blocks, e.g. model.layers.*


def describe(model) -> Model:
    modules = {n: m for n, m in model.named_modules() if n}
    params = {n for n, _ in model.named_parameters()}

    def name_of(module):
        return next((n for n, m in modules.items() if m is module), None) if module is not None else None

    embed = name_of(model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    logits = name_of(model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    block_classes = set(getattr(model, "_no_split_modules", None) or ())
    blocks = None
    import torch.nn as nn

    for name, module in modules.items():
        if isinstance(module, nn.ModuleList) and len(module) and type(module[0]).__name__ in block_classes:
            blocks = f"{name}.*"
            break
    return Model(model, modules, params, embed, logits, blocks)
