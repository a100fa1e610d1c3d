"""The dataflow of one forward pass: which modules and parameters every tensor flows from.

``trace(model, inputs)`` runs the model once under a ``TorchFunctionMode`` and module hooks and
returns a :class:`Graph`: every torch call (``F.linear``, ``Tensor.view``, ``torch.cat``, ...) and
every call of a *leaf parameter module* (a module holding parameters of its own and no child that
holds any: ``nn.Linear``, ``nn.Embedding``, norms, MoE expert banks, learnable activations) as a
node, each tensor as a value with the node that produced it and the nodes that consumed it.
Ops inside a leaf parameter module are folded into its node: what ``tpplan derive`` reasons about
is where a Linear's output goes, not how RMSNorm is written.

It is the order in which data flows, not the order in which modules were registered, that says
which linears feed which (DeepSpeed's AutoTP guesses from registration order and names).

The model runs for real (CPU, the tiny twin): MoE routing is data-dependent (``topk``,
``nonzero``, one-hot masks) and the meta device cannot size such outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# ops that only read metadata or move/cast a tensor: never a reason to stop a flow
_NO_DATA = {"__get__", "size", "dim", "numel", "__len__", "is_floating_point", "data_ptr", "element_size",
            "stride", "is_contiguous", "__bool__", "item", "tolist", "__format__", "__repr__", "__hash__"}


@dataclass
class Value:
    """One tensor produced during the forward."""

    index: int
    shape: tuple[int, ...]
    requires_grad: bool
    producer: int | None  # node index; None for model inputs and constants made from nothing
    consumers: list[int] = field(default_factory=list)
    params: frozenset[str] = frozenset()  # parameters it is computed from alone (a weight's view), else empty
    floating: bool = True  # a floating-point tensor (not indices or a boolean mask)


@dataclass
class Node:
    """One torch call (``kind == "op"``) or one call of a leaf parameter module (``"module"``)."""

    index: int
    kind: str
    name: str  # op name ("linear", "Tensor.view", "cat") or module name ("model.layers.0.mlp.up_proj")
    scope: str  # the innermost module running it ("" at the top)
    inputs: list[tuple[Any, int]]  # (argument position or keyword, value index)
    outputs: list[int]
    params: list[str]  # parameters it reads directly
    args: dict[str, Any] = field(default_factory=dict)  # non-tensor arguments worth keeping (dims, sizes)

    def input_values(self) -> list[int]:
        return [v for _, v in self.inputs]


@dataclass
class Call:
    """One call of any module: what went in (by position or keyword) and what came out."""

    module: str
    type: str
    args: list[tuple[Any, int | None]]  # (position or keyword, value index or None for a non-tensor)
    outputs: list[int | None]  # per element of a returned tuple: value index, or None (not a tensor)
    first_node: int
    last_node: int = -1
    # per element of a returned tuple: its shape, or None (not a tensor); a module called inside a leaf
    # parameter module returns tensors no value stands for, and their shapes are still known
    output_shapes: list[tuple[int, ...] | None] = field(default_factory=list)


@dataclass
class Graph:
    nodes: list[Node]
    values: list[Value]
    calls: list[Call]
    leaf_modules: dict[str, str]  # leaf parameter module name -> class name
    param_shapes: dict[str, tuple[int, ...]]
    inputs: dict[str, int]  # model input keyword -> value index
    output: int | None  # the logits' value index

    def calls_of(self, module: str) -> list[Call]:
        return [c for c in self.calls if c.module == module]

    def producer(self, value: int) -> Node | None:
        p = self.values[value].producer
        return None if p is None else self.nodes[p]

    def consumers(self, value: int) -> list[Node]:
        return [self.nodes[i] for i in self.values[value].consumers]


def leaf_parameter_modules(model) -> dict[str, Any]:
    """Modules that hold parameters of their own and have no descendant that holds any."""
    found = {}
    for name, module in model.named_modules():
        if not name or not any(True for _ in module.parameters(recurse=False)):
            continue
        if any(any(True for _ in child.parameters()) for child in module.children()):
            continue
        found[name] = module
    return found


def _op_name(func) -> str:
    name = getattr(func, "__name__", None) or str(func)
    owner = getattr(func, "__objclass__", None) or getattr(func, "__self__", None)
    owner_name = getattr(owner, "__name__", "") if owner is not None else ""
    if owner_name in ("TensorBase", "Tensor"):
        return f"Tensor.{name}"
    return name


def _flatten(value, path=()):
    """(path, tensor) pairs inside nested tuples/lists/dicts and ModelOutput-like objects."""
    import torch

    if isinstance(value, torch.Tensor):
        yield path, value
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from _flatten(item, (*path, i))
    elif isinstance(value, dict):
        for key, item in value.items():
            yield from _flatten(item, (*path, key))


def _small_args(args, kwargs) -> dict[str, Any]:
    """Non-tensor arguments worth keeping: ints, int sequences, slices (for split/view/getitem)."""
    import torch

    def keep(v):
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, (int, float)):
            return v
        if isinstance(v, slice):
            return ("slice", keep(v.start), keep(v.stop), keep(v.step))
        if v is Ellipsis:
            return "..."
        if isinstance(v, (tuple, list, torch.Size)) and len(v) <= 16:
            return tuple(keep(x) if not isinstance(x, torch.Tensor) else "tensor" for x in v)
        if isinstance(v, torch.Tensor):
            return "tensor"
        return type(v).__name__

    out = {str(i): keep(a) for i, a in enumerate(args)}
    out.update({k: keep(v) for k, v in kwargs.items()})
    return out


class _Recorder:
    def __init__(self, model):
        import torch
        from torch.overrides import TorchFunctionMode

        self.torch = torch
        self.model = model
        self.nodes: list[Node] = []
        self.values: list[Value] = []
        self.calls: list[Call] = []
        self.alive: list = []  # tensors kept alive so that id() is never reused during the trace
        self.by_id: dict[int, int] = {}  # id(tensor) -> value index
        self.param_names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
        self.param_shapes = {n: tuple(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
        self.leaves = leaf_parameter_modules(model)
        self.scope: list[str] = []
        self.folding = 0  # > 0 inside a leaf parameter module: its ops are folded into its node
        self.open_calls: list[Call] = []
        recorder = self

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if recorder.folding == 0:
                    recorder.op(func, args, kwargs, out)
                return out

        self.mode = Mode()

    # -- values ----------------------------------------------------------------------------

    def value_of(self, tensor) -> int:
        """The value index of ``tensor``; a tensor never seen before (a constant, a buffer) gets one."""
        index = self.by_id.get(id(tensor))
        if index is None:
            index = self.new_value(tensor, producer=None)
        return index

    def new_value(self, tensor, producer: int | None, params: frozenset[str] = frozenset()) -> int:
        index = len(self.values)
        self.values.append(Value(index, tuple(tensor.shape), bool(tensor.requires_grad), producer, params=params,
                                 floating=tensor.is_floating_point() or tensor.is_complex()))
        self.by_id[id(tensor)] = index
        self.alive.append(tensor)
        return index

    # -- ops -------------------------------------------------------------------------------

    def op(self, func, args, kwargs, out) -> None:
        name = _op_name(func)
        if name.rpartition(".")[2] in _NO_DATA:
            return
        outs = list(_flatten(out))
        if not outs:
            return
        inputs, params = self.inputs_of(args, kwargs)
        self.add_node("op", name, inputs, params, outs, _small_args(args, kwargs))

    def inputs_of(self, args, kwargs) -> tuple[list, list[str]]:
        inputs: list[tuple[Any, int]] = []
        params: list[str] = []
        for position, tensor in _flatten(tuple(args)):
            self._input(position[0], tensor, inputs, params)
        for key, item in kwargs.items():
            for _, tensor in _flatten(item):
                self._input(key, tensor, inputs, params)
        return inputs, params

    def _input(self, where, tensor, inputs, params) -> None:
        name = self.param_names.get(id(tensor))
        if name is not None:
            params.append(name)
            return
        inputs.append((where, self.value_of(tensor)))

    def add_node(self, kind, name, inputs, params, outs, args=None) -> int:
        index = len(self.nodes)
        # a value computed from parameters alone (``weight.t()``, ``1 + weight``) remembers them
        from_params = [self.values[v].params for _, v in inputs]
        if (params or inputs) and all(from_params):
            derived = frozenset(params).union(*from_params)
        else:
            derived = frozenset()
        node = Node(index, kind, name, self.scope[-1] if self.scope else "", inputs, [], params, args or {})
        self.nodes.append(node)
        for _, v in inputs:
            self.values[v].consumers.append(index)
        for _, tensor in outs:
            if self.param_names.get(id(tensor)) is not None:
                continue
            node.outputs.append(self.new_value(tensor, index, derived))
        return index

    # -- modules ---------------------------------------------------------------------------

    def pre(self, name: str):
        def hook(module, args, kwargs):
            call_args = []
            for i, a in enumerate(args):
                tensors = list(_flatten(a))
                call_args.append((i, self.value_of(tensors[0][1]) if len(tensors) == 1 and not tensors[0][0] else None))
            for k, a in kwargs.items():
                tensors = list(_flatten(a))
                call_args.append((k, self.value_of(tensors[0][1]) if len(tensors) == 1 and not tensors[0][0] else None))
            call = Call(name, type(module).__name__, call_args, [], len(self.nodes))
            self.calls.append(call)
            self.open_calls.append(call)
            if name in self.leaves:
                if self.folding == 0:
                    call.inputs_for_node = self.inputs_of(args, kwargs)  # type: ignore[attr-defined]
                self.folding += 1
            self.scope.append(name)
            return None

        return hook

    def post(self, name: str):
        def hook(module, args, kwargs, output):
            self.scope.pop()
            call = self.open_calls.pop()
            if name in self.leaves:
                self.folding -= 1
                if self.folding == 0:
                    inputs, _ = call.inputs_for_node  # type: ignore[attr-defined]
                    params = [f"{name}.{p}" for p, _ in module.named_parameters()]
                    self.add_node("module", name, inputs, params, list(_flatten(output)))
            # one entry per element of a returned tuple (None for what is not a tensor: attention weights
            # that were not computed), so a rule can name every output of the module
            items = list(output) if isinstance(output, (tuple, list)) else [output]
            call.outputs = [self.by_id.get(id(t)) if isinstance(t, self.torch.Tensor) else None for t in items]
            call.output_shapes = [tuple(t.shape) if isinstance(t, self.torch.Tensor) else None for t in items]
            call.last_node = len(self.nodes) - 1
            return None

        return hook


def trace(model, **inputs) -> Graph:
    """Run ``model(**inputs)`` once, recording its dataflow (gradients enabled: ``requires_grad`` is data)."""
    graph, error = trace_until_error(model, **inputs)
    if error is not None:
        raise error
    return graph


def trace_until_error(model, **inputs) -> tuple[Graph, Exception | None]:
    """``trace``, and where the forward raises, what was recorded until it did, with the exception."""
    recorder = _Recorder(model)
    handles = []
    for name, module in model.named_modules():
        if name:
            handles.append(module.register_forward_pre_hook(recorder.pre(name), with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post(name), with_kwargs=True))
    input_values = {}
    for key, tensor in inputs.items():
        input_values[key] = recorder.new_value(tensor, None)
    out, error = None, None
    try:
        with recorder.mode:
            out = model(**inputs)
    except Exception as exc:  # noqa: BLE001 - handed back with what was recorded until then
        error = exc
    finally:
        for handle in handles:
            handle.remove()
    logits = getattr(out, "logits", None)
    output = recorder.by_id.get(id(logits)) if logits is not None else None
    graph = Graph(recorder.nodes, recorder.values, recorder.calls,
                  {n: type(m).__name__ for n, m in recorder.leaves.items()}, recorder.param_shapes,
                  input_values, output)
    return graph, error
