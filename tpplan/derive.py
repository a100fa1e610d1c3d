"""``tpplan derive``: a tensor-parallel plan read off the model's own dataflow, proven before it is written.

Four steps, each one a section below:

1. **Trace.**  The model's tiny twin (same architecture, a few layers, small widths) runs one
   forward under :mod:`tpplan.dataflow`, which records which modules and parameters every tensor
   flows from -- the order data flows in, not the order modules were registered in.
2. **Find the patterns.**  The skeleton (input embedding -> decoder blocks -> final norm ->
   output head, and the residual stream threading through the blocks); in every block, the
   Linear layers whose outputs meet (in attention, in an elementwise product) and feed one single
   Linear whose output returns to the stream: a colwise group and its rowwise partner.  Each
   group is then *emulated* on the twin: for every tp rank, the colwise weights cut to that
   rank's rows and the rowwise weight to its columns; the rowwise partial outputs summed over
   the ranks must equal the unsharded output.  That one test finds what no list of names does:
   fused projections whose split cuts at global offsets (Phi-3's qkv_proj), biases built for all
   heads (Bloom's ALiBi), head counts read from module attributes (fixed by a ``floordiv_tp``
   fix-up, found by trying the attributes that hold those counts).  Modules with parameters that
   see a sharded activation (per-head q/k norms, a learnable activation) get their gradients
   summed over tp; a tensor that needs a gradient and joins the sharded region from outside
   (MLA's shared rope key) makes the group unshardable, as do parameters read directly inside it.
3. **Solve divisibility.**  The largest tp of 8, 4, 2 (or the one asked for) that divides every
   head count and width the groups split, the vocabulary where the embedding and head are split;
   what does not divide stays whole and says why.
4. **Write and prove.**  A commented spec in the shipped specs' form (patterns over layer indices,
   the reason for each rule in its note), then ``tpplan check`` on it: a plan that does not pass
   is never written.
"""

from __future__ import annotations

import contextlib
import copy
import re
import time
from dataclasses import dataclass, field
from typing import Any

from .errors import TpplanError

TP_CANDIDATES = (8, 4, 2)
TRACE_BATCH, TRACE_SEQ = 3, 11  # sizes unlike any head count or width of the twin
TRACE_TP = 4  # the twin has kv heads = 4 and is emulated at EMULATE_TP: 2 heads per rank
EMULATE_TP = 2
TWIN_HEAD_DIM = 16
TWIN_MAX_PARAMETERS = 64_000_000  # a twin larger than this was not shrunk: refuse rather than trace for minutes


class DeriveRefused(TpplanError):
    """No plan could be derived (the model's structure is not one derive understands): exit 2."""


class DeriveFailed(TpplanError):
    """A plan was derived but ``check`` did not prove it: exit 1, nothing written."""

    exit_code = 1


# ----------------------------------------------------------------------------------------------
# The twin and its trace
# ----------------------------------------------------------------------------------------------


@dataclass
class Traced:
    config: Any  # the full model's config
    twin_config: Any
    model: Any  # the twin, float32 on CPU, random init
    graph: Any  # dataflow.Graph
    inputs: dict


class _OwnModel:
    """Stands in for a transformers config where the model is the user's own (``model.factory``):
    ``source`` builds it, its twin is the factory called with ``model.twin_args``; no attribute of a
    config (head counts, hidden size) is known -- derive reads what it needs off the model itself."""

    _attn_implementation = None

    def __init__(self, source):
        self.source = source

    def build(self, *, device: str = "meta", seed: int | None = None, dtype: str = "float32"):
        return self.source.build(device=device, dtype=dtype, seed=seed)


def _build(config, *, device: str = "meta", seed: int | None = None, dtype: str = "float32"):
    """The model of a transformers config, or of a factory (``_OwnModel``)."""
    if isinstance(config, _OwnModel):
        return config.build(device=device, seed=seed, dtype=dtype)
    from .models import build_model

    return build_model(config, device=device, seed=seed, dtype=dtype)


def _twin(config):
    from .models import shrink_config

    if isinstance(config, _OwnModel):
        return _OwnModel(config.source.twin(TRACE_TP))

    try:
        twin = shrink_config(config, TRACE_TP, head_dim=TWIN_HEAD_DIM)
    except Exception as exc:  # noqa: BLE001 - transformers' config objects refuse in many ways
        raise DeriveRefused(f"cannot shrink {type(config).__name__} to a tiny twin: {_one_line(exc)}") from None
    twin._attn_implementation = config._attn_implementation
    if hasattr(twin, "use_cache"):
        twin.use_cache = False
    return twin


def trace_twin(config, build) -> Traced:
    """Build the tiny twin (``build(config, device, seed)``) and trace one forward of it."""
    import torch

    from .dataflow import trace

    twin = _twin(config)
    try:
        size = sum(p.numel() for p in build(twin, device="meta").parameters())
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"transformers cannot build the tiny twin of {type(config).__name__}: "
                            f"{_one_line(exc)}") from None
    if size > TWIN_MAX_PARAMETERS:
        raise DeriveRefused(
            f"the tiny twin of {type(config).__name__} is not tiny: {size / 1e6:.0f}M parameters (tpplan's "
            "shrink_config does not know the fields that size this model)",
            hint="derive from a small config.json of the same architecture (few layers, narrow widths): its rules "
                 "name the same modules; then set model.name to the full model and let `tpplan plan --resolve` "
                 "and `tpplan check` confirm it")
    try:
        model = build(twin, device="cpu", seed=0)
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"transformers cannot build the tiny twin of {type(config).__name__}: "
                            f"{_one_line(exc)}") from None
    model.eval()  # dropout off: the emulation compares values
    generator = torch.Generator().manual_seed(0)
    if isinstance(twin, _OwnModel):  # the forward's first parameter takes the token ids; its own positions
        import inspect

        first = next(iter(inspect.signature(model.forward).parameters))
        inputs = {first: torch.randint(0, twin.source.vocab_size(model), (TRACE_BATCH, TRACE_SEQ),
                                       generator=generator)}
    else:
        inputs = {
            "input_ids": torch.randint(0, twin.vocab_size, (TRACE_BATCH, TRACE_SEQ), generator=generator),
            # one row per sequence (Qwen4-Exp reads its rotary tables by row)
            "position_ids": torch.arange(TRACE_SEQ).expand(TRACE_BATCH, -1),
        }
    try:
        graph = trace(model, **inputs)
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"the tiny twin of {type(model).__name__} does not run a forward: {_one_line(exc)}") from None
    return Traced(config, twin, model, graph, inputs)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


# ----------------------------------------------------------------------------------------------
# The skeleton: embedding -> blocks -> final norm -> head, and the residual stream
# ----------------------------------------------------------------------------------------------


@dataclass
class Block:
    name: str  # model.layers.0
    call: Any  # dataflow.Call
    stream_in: int  # value index of the residual stream entering it
    stream_out: int


@dataclass
class Skeleton:
    embed: str | None
    head: str | None
    tied: bool
    blocks_list: str | None  # model.layers
    blocks: list[Block]
    stream_entry: list[int]  # value indices from the embedding's output to the first block's input
    before: list[str]  # leaf parameter modules on the way from the embedding to the first block
    after: list[str]  # ... from the last block to the head (the final norm)

    @property
    def pattern(self) -> str | None:
        return f"{self.blocks_list}.*" if self.blocks_list else None


def _module_names(model) -> dict[str, Any]:
    return {n: m for n, m in model.named_modules() if n}


def _name_of(modules: dict[str, Any], module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in modules.items() if m is module), None)


def find_skeleton(traced: Traced) -> Skeleton:
    import torch.nn as nn

    model, graph = traced.model, traced.graph
    modules = _module_names(model)
    embed = _name_of(modules, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    head = _name_of(modules, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    if embed is None and head is None:  # a model of one's own: the first embedding called, the last Linear to the vocab
        called = list(dict.fromkeys(c.module for c in graph.calls if c.module in modules))
        embed = next((n for n in called if isinstance(modules[n], nn.Embedding)), None)
        vocab = modules[embed].num_embeddings if embed else None
        head = next((n for n in reversed(called) if isinstance(modules[n], nn.Linear)
                     and modules[n].out_features == vocab), None)
    tied = bool(embed and head and getattr(modules[head], "weight", None) is getattr(modules[embed], "weight", 1))
    # the decoder blocks: the ModuleList whose members are each called once, in order, the stream threading through
    best: tuple[str, list[Block]] | None = None
    for name, module in modules.items():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        blocks = []
        for i in range(len(module)):
            calls = graph.calls_of(f"{name}.{i}")
            if len(calls) != 1:
                break
            call = calls[0]
            tensors = [v for _, v in call.args if v is not None]
            outs = [v for v in call.outputs if v is not None]
            if not tensors or not outs:
                break
            blocks.append(Block(f"{name}.{i}", call, tensors[0], outs[0]))
        if len(blocks) != len(module):
            continue
        # the stream threads through: block i+1 takes what block i returned
        if any(b.stream_in != a.stream_out for a, b in zip(blocks, blocks[1:], strict=False)):
            continue
        shape = graph.values[blocks[0].stream_in].shape
        # [batch, seq, hidden]; or with a dim of parallel streams after [batch, seq] (DeepSeek-V4's
        # hyper-connections) or before it (Gemma 3n's AltUp): no sequence parallelism, the plain plan
        if len(shape) < 3 or (TRACE_BATCH, TRACE_SEQ) not in (tuple(shape[:2]), tuple(shape[1:3])):
            continue
        if best is None or len(blocks) > len(best[1]):
            best = (name, blocks)
    if best is None:
        return Skeleton(embed, head, tied, None, [], [], [], [])
    name, blocks = best
    before = _leaves_between(graph, None, blocks[0].call.first_node)
    after = _leaves_between(graph, blocks[-1].call.last_node, None)
    return Skeleton(embed, head, tied, name, blocks, [], before, after)


def _leaves_between(graph, start: int | None, stop: int | None) -> list[str]:
    names = []
    for node in graph.nodes[(start or -1) + 1: stop]:
        if node.kind == "module" and node.name not in names:
            names.append(node.name)
    return names


# ----------------------------------------------------------------------------------------------
# Groups: linears whose outputs meet and feed one reducing linear
# ----------------------------------------------------------------------------------------------


@dataclass
class Cone:
    """Where a Linear's output flows inside its block, up to the next Linear layers."""

    reached: set[str]  # Linear modules whose input it reaches
    escapes: bool  # reaches the block's output (the residual stream) or anything after the block
    nodes: set[int]  # nodes it passes through (not the reached Linear layers)
    values: set[int]  # values it passes through


def stream_values(graph, block: Block) -> set[int]:
    """The residual stream inside a block: values on a path from its input to its output through ops
    (adds, scalings, dropout) and norms (a post-LN block normalizes the stream itself: BERT, BART),
    never through a Linear or any other module with weights."""
    inside = range(block.call.first_node, block.call.last_node + 1)
    width = graph.values[block.stream_in].shape

    def passes(node) -> bool:
        if node.kind == "op":
            return True
        outs = [graph.values[v].shape for v in node.outputs]
        ins = [graph.values[v].shape for v in node.input_values()]
        return (outs == [width] and ins == [width]
                and all(len(graph.param_shapes[p]) == 1 and graph.param_shapes[p][0] == width[-1] for p in node.params))

    forward = {block.stream_in}
    queue = [block.stream_in]
    while queue:
        v = queue.pop()
        for n in graph.values[v].consumers:
            node = graph.nodes[n]
            if n in inside and passes(node):
                for out in node.outputs:
                    if out not in forward:
                        forward.add(out)
                        queue.append(out)
    backward = {block.stream_out}
    queue = [block.stream_out]
    while queue:
        node = graph.producer(queue.pop())
        if node is None or node.index not in inside or not passes(node):
            continue
        for v in node.input_values():
            if v not in backward:
                backward.add(v)
                queue.append(v)
    return forward & backward


def cone(graph, start: list[int], linears: set[str], block: Block, stream: set[int]) -> Cone:
    outputs = {block.stream_out} | stream  # other outputs (attention weights) escape only if something reads them
    seen_values: set[int] = set()
    seen_nodes: set[int] = set()
    reached: set[str] = set()
    escapes = False
    queue = list(start)
    while queue:
        v = queue.pop()
        if v in seen_values:
            continue
        seen_values.add(v)
        if v in outputs:
            escapes = True
            continue
        for n in graph.values[v].consumers:
            node = graph.nodes[n]
            if not block.call.first_node <= n <= block.call.last_node:
                escapes = True
                continue
            if node.kind == "module" and node.name in linears:
                reached.add(node.name)
                continue
            if n not in seen_nodes:
                seen_nodes.add(n)
                # indices and boolean masks carry no activation (DSA's indexer picks the tokens attention
                # reads with topk: its linears do not feed the attention's output)
                queue.extend(o for o in node.outputs if graph.values[o].floating)
    return Cone(reached, escapes, seen_nodes, seen_values)


@dataclass
class Group:
    """One colwise group and its rowwise partner, in one block (names relative to the block)."""

    rowwise: str
    colwise: list[str]
    meet: list[str]  # the ops where the colwise outputs meet, e.g. ["scaled_dot_product_attention"]
    cone_nodes: set[int] = field(default_factory=set)
    cone_values: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)  # why the sharded form is impossible, from the dataflow
    grad_sum: dict[str, int] = field(default_factory=dict)  # module seeing a sharded activation -> its dim
    # a replicated Linear whose last features join the sharded region as a tensor needing a gradient
    # (MLA's shared rotary key k_rot, expanded over the heads) -> that width: mla_kv_a_proj sums their
    # gradient over tp
    shared_keys: dict[str, int] = field(default_factory=dict)
    # modules with weights on that key's way (Dots3's k_rope_only_layernorm): replicated, gradient summed
    key_modules: list[str] = field(default_factory=list)
    # parameters of a module that apply per head to the sharded activations (attention sinks): owner ->
    # names, split on dim 0 with the heads (local_params); ``local_why``: the problem if that fails
    local_params: dict[str, list[str]] = field(default_factory=dict)
    local_why: str = ""
    fixups: list[tuple[str, str]] = field(default_factory=list)  # (module, attribute) divided by tp
    packed: dict[str, str] = field(default_factory=dict)  # colwise member -> the op that splits its output
    parts: dict[str, int | None] = field(default_factory=dict)  # ... and into how many equal parts
    variant: str = "sharded"  # sharded | packed | gathered | replicated (experts: sharded = expert tensor parallel)
    why: str = ""
    experts: bool = False  # a MoE expert bank (``rowwise`` names it): its own module is both halves

    @property
    def key(self) -> tuple:
        return (self.rowwise, tuple(self.colwise))


def _linear_names(model) -> set[str]:
    import torch.nn as nn

    return {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def find_groups(traced: Traced, skeleton: Skeleton) -> dict[str, list[Group]]:
    """Per block (absolute name): the colwise -> rowwise groups its dataflow shows."""
    from .resolve import module_kind

    graph = traced.graph
    linears = _linear_names(traced.model)
    modules = _module_names(traced.model)
    out: dict[str, list[Group]] = {}
    for block in skeleton.blocks:
        prefix = block.name + "."
        nodes = [n for n in graph.nodes[block.call.first_node: block.call.last_node + 1]
                 if n.kind == "module" and n.name in linears and n.name.startswith(prefix)]
        names = list(dict.fromkeys(n.name for n in nodes))
        stream = stream_values(graph, block)
        cones = {}
        for name in names:
            start = [v for n in nodes if n.name == name for v in n.outputs]
            cones[name] = cone(graph, start, linears, block, stream)
        rowwise = {name for name, c in cones.items() if c.escapes and not c.reached}
        members: dict[str, list[str]] = {}
        for name, c in cones.items():
            if not c.escapes and len(c.reached) == 1:
                (target,) = c.reached
                if target in rowwise:
                    members.setdefault(target, []).append(name)
        groups = []
        for target, colwise in members.items():
            nodes_in = set().union(*(cones[c].nodes for c in colwise))
            values_in = set().union(*(cones[c].values for c in colwise))
            group = Group(target[len(prefix):], [c[len(prefix):] for c in colwise], [], nodes_in, values_in)
            group.meet = _meeting_ops(graph, colwise, cones)
            _side_inputs(graph, group, prefix)
            _check_shared_keys(traced.model, group, prefix)
            for c in colwise:
                split = _packed_split(graph, c, nodes)
                if split is not None:
                    group.packed[c[len(prefix):]], group.parts[c[len(prefix):]] = split
            groups.append(group)
        for name in dict.fromkeys(n.name for n in graph.nodes[block.call.first_node: block.call.last_node + 1]
                                  if n.kind == "module" and n.name.startswith(prefix)):
            if module_kind(modules[name]) == "experts":  # a MoE expert bank: 3-D weights, one slice per expert
                groups.append(Group(name[len(prefix):], [], [], experts=True))
        out[block.name] = groups
    return out


def _meeting_ops(graph, colwise: list[str], cones: dict[str, Cone]) -> list[str]:
    """Ops reached from more than one colwise member: where their outputs meet."""
    if len(colwise) < 2:
        return []
    counts: dict[int, int] = {}
    for name in colwise:
        for n in cones[name].nodes:
            counts[n] = counts.get(n, 0) + 1
    shared = sorted(n for n, k in counts.items() if k > 1)
    # the first op reached by several: for attention the attention op itself, for a gated MLP the product
    names = []
    for n in shared:
        node = graph.nodes[n]
        if all(graph.nodes[graph.values[v].producer].index not in counts or counts.get(graph.values[v].producer, 0) < 2
               for v in node.input_values() if graph.values[v].producer is not None):
            label = node.name.rpartition(".")[2] if node.kind == "op" else node.name
            if label not in names:
                names.append(label)
    return names[:3]


def _side_inputs(graph, group: Group, prefix: str) -> None:
    """What joins the sharded region from outside: a tensor needing a gradient, a parameter read directly,
    a module with parameters (its gradient must be summed over tp)."""
    for n in sorted(group.cone_nodes):
        node = graph.nodes[n]
        if node.kind == "module":
            group.grad_sum.setdefault(node.name[len(prefix):], -1)  # its dim is measured by the emulation
        elif node.params:
            for p in node.params:
                group.problems.append(f"parameter {p[len(prefix):] if p.startswith(prefix) else p} is read directly "
                                      f"by {node.name} on the sharded activations")
        for _, v in node.inputs:
            value = graph.values[v]
            if v in group.cone_values:
                continue
            if value.params and node.kind == "op":
                names = ", ".join(sorted(p[len(prefix):] if p.startswith(prefix) else p for p in value.params))
                why = f"parameter {names} is applied by {node.name} to the sharded activations"
                owned = [p[len(prefix):].rpartition(".") for p in value.params if p.startswith(prefix)]
                if len(owned) == len(value.params) and all(owner for owner, _, _ in owned):
                    for owner, _, name in owned:  # per head, perhaps (sinks): tried split with the heads
                        group.local_params.setdefault(owner, [])
                        if name not in group.local_params[owner]:
                            group.local_params[owner].append(name)
                    group.local_why = group.local_why or why
                else:
                    group.problems.append(why)
            elif value.requires_grad and not value.params:
                source = _shared_key_source(graph, v, prefix)
                if source is not None:
                    linear, between = source
                    group.shared_keys.setdefault(linear, value.shape[-1])
                    group.key_modules = list(dict.fromkeys(group.key_modules + between))
                    continue
                producer = graph.producer(v)
                what = (producer.name if producer.kind == "module" else f"{producer.name} in {producer.scope or 'the model'}") \
                    if producer else "a model input"
                group.problems.append(
                    f"{node.name} combines the sharded activations with a tensor that needs a gradient, made by {what}: "
                    "its gradient would be summed over one rank's share only")
    group.problems = list(dict.fromkeys(group.problems))


def _shared_key_source(graph, value: int, prefix: str) -> tuple[str, list[str]] | None:
    """The Linear of this block (relative name) that alone makes ``value`` -- a tensor needing a
    gradient that joins a sharded region from outside -- through ops that read no parameter (MLA:
    kv_a_proj_with_mqa -> split -> k_rot -> rotary -> expand over the heads), and the modules with
    weights between them that keep the width (Dots3's norm of k_rot alone); None when it is made
    otherwise."""
    width = graph.values[value].shape[-1] if graph.values[value].shape else None
    found, between, seen, stack = set(), [], set(), [value]
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        node = graph.producer(v)
        if node is not None and node.kind == "module":
            inputs = [u for _, u in node.inputs if graph.values[u].requires_grad and not graph.values[u].params]
            if (node.name not in graph.leaf_modules or graph.leaf_modules[node.name] == "Linear" or len(inputs) != 1
                    or graph.values[inputs[0]].shape[-1:] != graph.values[v].shape[-1:]):
                found.add(node.name)
            else:  # a norm on the way: its gradient, too, is a partial sum on each rank
                between.append(node.name)
                stack.append(inputs[0])
            continue
        if node is None or node.params:
            return None
        for _, u in node.inputs:
            if graph.values[u].params:
                return None
            if graph.values[u].requires_grad:
                stack.append(u)
        if len(seen) > 64:  # not a short path from one projection
            return None
    if len(found) != 1:
        return None
    (name,) = found
    if (not name.startswith(prefix) or graph.leaf_modules.get(name) != "Linear" or not width
            or not all(b.startswith(prefix) for b in between)):
        return None
    return name[len(prefix):], [b[len(prefix):] for b in between]


def _check_shared_keys(model, group: Group, prefix: str) -> None:
    """Keep a shared key only where ``mla_kv_a_proj`` will find the same width on the model
    (``qk_rope_head_dim`` on its attention module or the config); else the group cannot be sharded."""
    from .spec import _rope_dim_of

    for rel, width in list(group.shared_keys.items()):
        found = _rope_dim_of(prefix + rel, model)
        if found != width:
            del group.shared_keys[rel]
            group.problems.append(
                f"{rel}'s last {width} output features join the sharded activations as a tensor that needs a gradient "
                f"(a shared rotary key), but no qk_rope_head_dim of {width} names that width for mla_kv_a_proj "
                f"(found {found}): its gradient would be summed over one rank's share only")


_SPLITS = {"split", "chunk", "tensor_split", "unbind", "split_with_sizes", "narrow"}


def _packed_split(graph, name: str, block_nodes) -> tuple[str, int | None] | None:
    """How ``name``'s output is split at fixed offsets of its last dim (a fused projection): the op, and
    into how many equal parts (None when the parts differ in size); None when nothing splits it."""
    for node in block_nodes:
        if node.name != name:
            continue
        for v in node.outputs:
            shape = graph.values[v].shape
            width = shape[-1]
            slices = []
            for consumer in graph.consumers(v):
                op = consumer.name.rpartition(".")[2]
                if op in _SPLITS:
                    dim = consumer.args.get("dim", consumer.args.get("2", 0 if op != "narrow" else consumer.args.get("1")))
                    if dim in (-1, len(shape) - 1):
                        return f"{op}(dim=-1) of its {width} output features", _equal_parts(op, consumer.args.get("1"), width)
                if op == "__getitem__":
                    index = consumer.args.get("1")
                    parts = index if isinstance(index, tuple) else (index,)
                    last = parts[-1] if parts else None
                    if parts and parts[0] == "..." and isinstance(last, tuple) and last[:1] == ("slice",):
                        slices.append(last)
            if slices:
                cuts = sorted({0, width, *(b for s in slices for b in s[1:3] if isinstance(b, int))})
                sizes = {b - a for a, b in zip(cuts, cuts[1:], strict=False)}
                text = ", ".join(f"[..., {_slice_text(s)}]" for s in slices)
                return f"slicing {text} of its {width} output features", (len(cuts) - 1 if len(sizes) == 1 else None)
    return None


def _equal_parts(op: str, arg, width: int) -> int | None:
    if op in ("chunk", "tensor_split") and isinstance(arg, int):
        return arg
    if op in ("split", "split_with_sizes"):
        if isinstance(arg, int) and arg and width % arg == 0:
            return width // arg
        if isinstance(arg, tuple) and arg and len(set(arg)) == 1:
            return len(arg)
    return None


def _slice_text(s) -> str:
    _, start, stop, _ = s
    return f"{'' if start is None else start}:{'' if stop is None else stop}"


# ----------------------------------------------------------------------------------------------
# Emulation: every tp rank's share of a group computed on the twin, summed, compared
# ----------------------------------------------------------------------------------------------


@dataclass
class Trial:
    """How one group is cut for the emulation."""

    group: Group
    block: str  # absolute block name
    variant: str  # sharded | gathered
    fixups: list[tuple[str, str]]


class Emulator:
    """Runs the twin once unsharded (recording every Linear's output), then once per tp rank with the
    trial groups cut to that rank's share.  Each rowwise output is replaced by the unsharded one as it
    is produced (so one group's partial sum never disturbs the next), and its partial value kept."""

    def __init__(self, traced: Traced, tp: int = EMULATE_TP):
        import torch

        self.torch = torch
        self.traced = traced
        self.model = traced.model
        self.tp = tp
        self.modules = _module_names(self.model)
        self.reference: dict[str, list] = {}
        self.ref_inputs: dict[str, list] = {}
        hooks = []
        for name, module in self.modules.items():
            hooks.append(module.register_forward_hook(self._record(name, self.reference, self.ref_inputs),
                                                      with_kwargs=True))
        try:
            with torch.no_grad():
                self.model(**traced.inputs)
        finally:
            for h in hooks:
                h.remove()

    def _record(self, name, outputs, inputs):
        def hook(module, args, kwargs, output):
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            outputs.setdefault(name, []).append(first.detach().clone() if isinstance(first, self.torch.Tensor) else None)
            inputs.setdefault(name, []).append(tuple(a.shape for a in args if isinstance(a, self.torch.Tensor))
                                               + tuple(v.shape for v in kwargs.values() if isinstance(v, self.torch.Tensor)))
        return hook

    def run(self, trials: list[Trial]) -> tuple[dict[int, str | None], dict[int, dict[str, int]]]:
        """Per trial (by position): None when the ranks' shares sum to the unsharded output, else why not;
        and per trial the modules that saw a sharded input (module -> the dim the emulation found cut)."""
        torch = self.torch
        partial: dict[str, list] = {}
        seen_inputs: dict[str, list] = {}
        results: dict[int, str | None] = {}
        rowwise = {f"{t.block}.{t.group.rowwise}": i for i, t in enumerate(trials)}
        for rank in range(self.tp):
            calls: dict[str, int] = {}
            with contextlib.ExitStack() as stack:
                for trial in trials:
                    stack.enter_context(self._cut(trial, rank))
                hooks = []
                for name, module in self.modules.items():
                    hooks.append(module.register_forward_hook(self._teacher(name, rowwise, calls, partial, rank,
                                                                            seen_inputs), with_kwargs=True))
                stack.callback(lambda hs=hooks: [h.remove() for h in hs])
                try:
                    with torch.no_grad():
                        self.model(**self.traced.inputs)
                except Exception as exc:  # noqa: BLE001 - the cut model failing is the answer
                    why = f"a rank's share does not run: {_one_line(exc)}"
                    return {i: why for i in range(len(trials))}, {i: {} for i in range(len(trials))}
        sharded: dict[int, dict[str, int]] = {i: {} for i in range(len(trials))}
        for name, index in rowwise.items():
            ref = self.reference.get(name) or []
            got = partial.get(name) or []
            if not ref or len(got) != len(ref) * self.tp:
                results[index] = f"{name} ran {len(got)} times on {self.tp} ranks, {len(ref)} times unsharded"
                continue
            worst = 0.0
            for k, want in enumerate(ref):
                total = sum(got[r * len(ref) + k] for r in range(self.tp))
                if total.shape != want.shape:
                    worst = float("inf")
                    break
                scale = max(1.0, want.abs().max().item())
                worst = max(worst, (total - want).abs().max().item() / scale)
            results[index] = None if worst <= 1e-4 else (
                f"the ranks' partial outputs of {name} do not sum to the unsharded output (relative difference {worst:.2g})")
        for i, trial in enumerate(trials):
            prefix = trial.block + "."
            for name, shapes in seen_inputs.items():
                if not name.startswith(prefix):
                    continue
                dim = _cut_dim(self.ref_inputs.get(name, [()])[0], shapes[0], self.tp)
                if dim is not None:
                    sharded[i][name[len(prefix):]] = dim
        return results, sharded

    def _teacher(self, name, rowwise, calls, partial, rank, seen_inputs):
        def hook(module, args, kwargs, output):
            k = calls.get(name, 0)
            calls[name] = k + 1
            if rank == 0 and k == 0:
                seen_inputs[name] = [tuple(a.shape for a in args if isinstance(a, self.torch.Tensor))
                                     + tuple(v.shape for v in kwargs.values() if isinstance(v, self.torch.Tensor))]
            if name in rowwise:
                partial.setdefault(name, []).append(output.detach().clone())
                ref = self.reference.get(name) or []
                if k < len(ref):
                    return ref[k].clone()
            return None

        return hook

    @contextlib.contextmanager
    def _cut(self, trial: Trial, rank: int):
        torch = self.torch
        tp = self.tp
        saved: list[tuple[Any, str, Any]] = []

        def swap(module, attr, value):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)

        prefix = trial.block + "."
        try:
            if trial.variant in ("sharded", "packed"):
                for rel in trial.group.colwise:
                    linear = self.modules[prefix + rel]
                    parts = trial.group.parts.get(rel) if trial.variant == "packed" else None
                    rows = _share(linear.weight.shape[0], tp, rank, parts or 1)
                    swap(linear, "weight", torch.nn.Parameter(linear.weight.detach()[rows].clone()))
                    if linear.bias is not None:
                        swap(linear, "bias", torch.nn.Parameter(linear.bias.detach()[rows].clone()))
                    swap(linear, "out_features", rows.stop - rows.start if isinstance(rows, slice) else len(rows))
            if trial.variant in ("sharded", "packed"):
                for owner, names in trial.group.local_params.items():  # per-head parameters: this rank's heads
                    module = self.modules[prefix + owner]
                    for name in names:
                        param = module._parameters[name].detach()
                        if param.ndim and param.shape[0] % tp == 0:  # else left whole: the share fails to run
                            rows = _share(param.shape[0], tp, rank)
                            swap(module, name, torch.nn.Parameter(param[rows].clone()))
            handle = None
            if trial.variant == "experts":  # each rank a slice of every expert's intermediate dim
                from .parallel_styles import expert_weight_dims

                experts = self.modules[prefix + trial.group.rowwise]
                for name, (dim, packed) in expert_weight_dims(experts).items():
                    param = experts._parameters[name].detach()
                    if dim is None:  # added after the split matmul (down_proj's bias): once in the sum
                        value = param / tp
                    else:
                        index = _share(param.shape[dim], tp, rank, 2 if packed else 1)
                        value = param.index_select(dim, torch.arange(param.shape[dim])[index])
                    swap(experts, name, torch.nn.Parameter(value.clone()))
            else:
                row = self.modules[prefix + trial.group.rowwise]
                cols = _share(row.weight.shape[1], tp, rank)
                swap(row, "weight", torch.nn.Parameter(row.weight.detach()[:, cols].clone()))
                if row.bias is not None:
                    swap(row, "bias", torch.nn.Parameter(row.bias.detach() / tp))
                swap(row, "in_features", cols.stop - cols.start)
            if trial.variant == "gathered":  # the rowwise takes the full input and keeps its own slice
                handle = row.register_forward_pre_hook(lambda m, args: (args[0][..., cols], *args[1:]))
            for rel, attr in trial.fixups:
                module = self.modules[prefix + rel] if rel else self.modules[trial.block]
                *path, last = attr.split(".")
                for step in path:  # a shared object on the way (config.num_attention_heads): a copy of it
                    inner = copy.copy(getattr(module, step))
                    swap(module, step, inner)
                    module = inner
                swap(module, last, getattr(module, last) // tp)
            yield
        finally:
            if trial.variant == "gathered" and handle is not None:
                handle.remove()
            for module, attr, value in reversed(saved):
                setattr(module, attr, value)


def _share(size: int, tp: int, rank: int, parts: int = 1):
    """The rows rank ``rank`` holds: a contiguous 1/tp (``parts`` = 1), or 1/tp of each of ``parts`` parts."""
    import torch

    if parts == 1:
        step = size // tp
        return slice(rank * step, (rank + 1) * step)
    part = size // parts
    step = part // tp
    return torch.cat([torch.arange(p * part + rank * step, p * part + (rank + 1) * step) for p in range(parts)])


def _cut_dim(ref_shapes, shapes, tp: int) -> int | None:
    """The dim of the first input that is 1/tp of the unsharded one, if exactly one is."""
    if not ref_shapes or not shapes or len(ref_shapes[0]) != len(shapes[0]):
        return None
    dims = [d for d, (a, b) in enumerate(zip(ref_shapes[0], shapes[0], strict=True)) if a != b]
    if len(dims) == 1 and shapes[0][dims[0]] * tp == ref_shapes[0][dims[0]]:
        return dims[0]
    return None


# ----------------------------------------------------------------------------------------------
# Choosing each group's form: sharded (Megatron), gathered, or left whole
# ----------------------------------------------------------------------------------------------

MAX_FIXUPS = 3  # attributes tried together when a rank's share needs head counts divided
FIXUP_SEARCH_S = 20.0  # per group: a twin whose forward is slow gets fewer tries, not a stalled derive


def _fixup_candidates(traced: Traced, group: Group, block: str) -> list[tuple[str, str]]:
    """Integer attributes, on the modules that hold the group (up to its block), whose values are the
    counts the group splits: a head count or a width read by the forward (``self.num_heads``)."""
    modules = _module_names(traced.model)
    members = [group.rowwise, *group.colwise]
    parents = {m.rpartition(".")[0] for m in members}
    holders: list[str] = []
    for parent in sorted(parents):
        parts = parent.split(".") if parent else []
        for depth in range(len(parts), -1, -1):
            rel = ".".join(parts[:depth])
            if rel not in holders:
                holders.append(rel)
    targets: set[int] = set()
    for rel in group.colwise:  # the head counts the forward views the split outputs as
        heads = _view_heads(traced, block, rel, group)
        if heads is not None and heads > 1:
            targets.add(heads)
    twin = traced.twin_config
    for key in ("num_attention_heads", "num_key_value_heads", "n_head", "num_heads", "multi_query_group_num"):
        value = getattr(twin, key, None)
        if isinstance(value, int) and value > 1:
            targets.add(value)
    for rel in group.colwise:
        targets.add(modules[f"{block}.{rel}"].out_features)
    targets.add(modules[f"{block}.{group.rowwise}"].in_features)
    found = []
    dotted = _dotted_fixups_available()
    for rel in holders:
        module = modules[f"{block}.{rel}"] if rel else modules[block]
        owners = [("", vars(module))]
        config = getattr(module, "config", None)
        if dotted and config is not None and hasattr(config, "to_dict"):
            owners.append(("config.", vars(config)))  # the forward may read the shared config's head counts
        for prefix, attrs in owners:
            for attr, value in attrs.items():
                if attr.startswith("_") or isinstance(value, bool) or not isinstance(value, int):
                    continue
                if value in targets and value % EMULATE_TP == 0 and attr not in ("in_features", "out_features"):
                    found.append((rel, prefix + attr))
    return found


def _dotted_fixups_available() -> bool:
    """Whether fix-ups take dotted paths (config.num_attention_heads) in this tpplan's spec language."""
    from .spec import Fixup

    try:
        Fixup(match="x", attr="config.num_attention_heads", op="floordiv_tp")
    except Exception:  # noqa: BLE001 - pydantic's validation error: not available
        return False
    return True


def _packed_style_available() -> bool:
    from .spec import STYLE_RULES

    return "packed_colwise" in STYLE_RULES


def _try_form(traced: Traced, emulator: Emulator, group: Group, block: str, variant: str,
              search_always: bool) -> tuple[str | None, list[tuple[str, str]], dict[str, int]]:
    """(None, fix-ups, modules that saw a cut input) when ``variant`` of the group sums to the unsharded
    output on the twin, trying attribute fix-ups when a share does not run (or, with ``search_always``,
    when it runs to the wrong values: a packed split read at global offsets); else (why not, [], {})."""
    import itertools

    result, sharded = emulator.run([Trial(group, block, variant, [])])
    failure = result[0]
    if failure is None:
        return None, [], sharded[0]
    if "does not run" not in failure and not search_always:
        return failure, [], {}
    candidates = _fixup_candidates(traced, group, block)
    deadline = time.time() + FIXUP_SEARCH_S
    for size in range(1, min(MAX_FIXUPS, len(candidates)) + 1):
        for combo in itertools.combinations(candidates, size):
            if time.time() > deadline:
                return failure, [], {}
            result, sharded = emulator.run([Trial(group, block, variant, list(combo))])
            if result[0] is None:
                return None, list(combo), sharded[0]
    return failure, [], {}


def _choose_experts_form(emulator: Emulator, group: Group, block: str) -> None:
    """A MoE expert bank: expert tensor parallel when its ranks' slices sum to the unsharded output."""
    from .spec import STYLE_RULES

    if "expert_tensor_parallel" not in STYLE_RULES:
        group.variant, group.why = "replicated", "this tpplan has no expert style"
        return
    try:
        result, _ = emulator.run([Trial(group, block, "experts", [])])
        failure = result[0]
    except ValueError as exc:  # an expert layout the style does not know
        failure = str(exc)
    group.variant, group.why = ("sharded", "") if failure is None else ("replicated", failure)


def choose_forms(traced: Traced, groups: dict[str, list[Group]], emulator: Emulator | None = None) -> Emulator:
    """Decide each group's form by emulation (mutates the groups): sharded when every rank's share sums
    to the unsharded output (with head-count fix-ups when needed); packed when a fused projection's
    equal parts, each cut separately, do; else gathered (always exact: only weights are split)."""
    emulator = emulator or Emulator(traced)
    modules = _module_names(traced.model)
    leaves = traced.graph.leaf_modules
    for block, block_groups in groups.items():
        for group in block_groups:
            if group.experts:
                _choose_experts_form(emulator, group, block)
                continue
            members = {group.rowwise, *group.colwise}
            failure = group.problems[0] if group.problems else None
            chosen = None
            if failure is None:
                candidates = ["sharded"]
                if group.packed and _packed_style_available() and all(group.parts.get(c) for c in group.packed):
                    candidates.append("packed")
                for variant in candidates:
                    why, fixups, cut = _try_form(traced, emulator, group, block, variant, variant == "packed")
                    if why is None:
                        unmeasured = [rel for rel, dim in cut.items() if rel not in members and dim is None]
                        if unmeasured:
                            why = f"cannot tell which dim of {unmeasured[0]}'s input is cut"
                    if why is None:
                        chosen = variant
                        group.fixups = fixups
                        group.grad_sum = {  # a leaf module with weights on the cut activations, not a member's parent
                            rel: dim for rel, dim in cut.items()
                            if rel not in members and f"{block}.{rel}" in leaves
                            and any(True for _ in modules[f"{block}.{rel}"].parameters())
                        }
                        break
                    failure = failure or why
            if chosen is not None:
                group.variant, group.why = chosen, (failure or "") if chosen == "packed" else ""
                continue
            if group.local_params:  # the per-head parameters did not split with the heads
                failure = f"{group.local_why} ({failure})" if failure else group.local_why
            group.grad_sum, group.fixups, group.shared_keys, group.key_modules = {}, [], {}, []
            group.local_params = {}
            result, _ = emulator.run([Trial(group, block, "gathered", [])])
            if result[0] is None:
                group.variant, group.why = "gathered", failure
            else:
                group.variant, group.why = "replicated", f"{failure}; gathered: {result[0]}"
    return emulator


# ----------------------------------------------------------------------------------------------
# Divisibility: what each tp size splits, at full size
# ----------------------------------------------------------------------------------------------


@dataclass
class Split:
    """One size a rule splits over tp, at full size, and what it is ("32 heads", "14336 features")."""

    module: str  # relative to the block, or absolute outside blocks
    size: int
    what: str


def _head_split(traced: Traced, block: str, rel: str, group: Group) -> tuple[int, str] | None:
    """(heads in the twin, the config attribute that holds them) when ``rel``'s output is viewed as heads."""
    heads = _view_heads(traced, block, rel, group)
    return None if heads is None else _heads_attr(traced.twin_config, heads)


def _view_heads(traced: Traced, block: str, rel: str, group: Group) -> int | None:
    """How many heads ``rel``'s output is viewed as in the twin ([..., heads, head_dim]); None if it is not."""
    graph = traced.graph
    name = f"{block}.{rel}"
    outputs = [v for n in graph.nodes if n.kind == "module" and n.name == name for v in n.outputs]
    queue, seen = list(outputs), set()
    while queue:
        v = queue.pop(0)
        if v in seen:
            continue
        seen.add(v)
        width = graph.values[v].shape[-1] if graph.values[v].shape else None
        for node in graph.consumers(v):
            op = node.name.rpartition(".")[2]
            if node.kind != "op" or node.index not in group.cone_nodes:
                continue
            if op in ("view", "reshape", "unflatten") and node.outputs:
                shape = graph.values[node.outputs[0]].shape
                if len(shape) >= 2 and width and shape[-2] * shape[-1] == width and shape[-1] != width:
                    return shape[-2]
            if op in ("contiguous", "to", "float", "type_as") or op.startswith("__getitem__"):
                queue.extend(node.outputs)
    return None


def _heads_attr(config, count: int) -> tuple[int, str] | None:
    """The config attribute holding ``count`` heads: query heads first (equal counts mean no grouping)."""
    from .shrink import config_get

    for key in ("num_attention_heads", "n_head", "num_heads", "num_key_value_heads", "multi_query_group_num",
                "num_kv_heads", "n_head_kv"):
        if config_get(config, key) == count:
            return count, key
    return None


def group_splits(traced: Traced, full_model, skeleton: Skeleton, block: str, group: Group) -> list[Split]:
    """What the group splits over tp at full size: heads (for heads-shaped outputs) and features."""
    modules = _module_names(full_model)
    full_block = _first_full_block(modules, skeleton, block, group.rowwise)
    if full_block is None:
        return []
    splits: list[Split] = []
    for rel in group.colwise:
        linear = modules.get(f"{full_block}.{rel}")
        if linear is None:
            continue
        if group.variant in ("sharded", "packed"):
            heads = _head_split(traced, block, rel, group)
            if heads is not None:
                from .shrink import config_values

                label = "kv heads" if "kv" in heads[1] or "key_value" in heads[1] else "heads"
                for count in sorted(c for c in config_values(traced.config, heads[1]) if isinstance(c, int)):
                    # per-layer head counts (dots3): every layer's must divide
                    splits.append(Split(rel, count, f"{count} {label} ({heads[1]})"))
        parts = group.parts.get(rel) if group.variant == "packed" else None
        if parts:
            splits.append(Split(rel, linear.out_features // parts, f"{linear.out_features // parts} output features "
                                f"per part ({parts} parts)"))
        else:
            splits.append(Split(rel, linear.out_features, f"{linear.out_features} output features"))
    row = modules.get(f"{full_block}.{group.rowwise}")
    if row is not None:
        splits.append(Split(group.rowwise, row.in_features, f"{row.in_features} input features"))
    for rel, attr in group.fixups:
        holder = modules.get(f"{full_block}.{rel}" if rel else full_block)
        value = getattr(holder, attr, None)
        if isinstance(value, int):
            splits.append(Split(rel or "(block)", value, f"{rel + '.' if rel else ''}{attr} = {value}"))
    return splits


def _first_full_block(modules: dict, skeleton: Skeleton, block: str, rel: str) -> str | None:
    """The first block of the full model holding ``rel`` (the twin's blocks are a sample of the full model's)."""
    prefix = skeleton.blocks_list + "."
    i = 0
    while f"{prefix}{i}" in modules:
        if f"{prefix}{i}.{rel}" in modules:
            return f"{prefix}{i}"
        i += 1
    return None


def choose_tp(splits: dict[tuple, list[Split]], vocab: int | None, asked: int | None) -> tuple[int, str]:
    """The largest tp in TP_CANDIDATES dividing every sharded group's splits (or ``asked``); and why."""
    if asked is not None:
        return asked, f"asked for (--tp {asked})"
    for tp in TP_CANDIDATES:
        bad = [s for group in splits.values() for s in group if s.size % tp]
        if not bad:
            counts = sorted({s.what for group in splits.values() for s in group if "heads" in s.what})
            vocab_note = "" if vocab is None or vocab % tp == 0 else f"; the vocabulary ({vocab}) does not divide"
            return tp, f"the largest of {'/'.join(map(str, TP_CANDIDATES))} dividing " + (
                ", ".join(counts) if counts else "every split width") + vocab_note
    return TP_CANDIDATES[-1], "the smallest tp; what it does not divide stays whole"


# ----------------------------------------------------------------------------------------------
# The plan: rules in the shipped specs' form
# ----------------------------------------------------------------------------------------------


@dataclass
class Rule:
    pattern: str  # relative to the blocks pattern when in_block, else absolute
    fields: dict[str, Any]  # style and its keyword arguments, in the order written
    note: str  # why: written as the rule's note
    in_block: bool = False
    order: tuple = (0,)  # rules are written in execution order, a group's colwise rules together


@dataclass
class Analysis:
    """Everything derive learned from the twin, shared by the plain and the sequence-parallel plans."""

    traced: Traced
    skeleton: Skeleton
    groups: dict[str, list[Group]]  # per twin block
    full_model: Any  # the full-size model on the meta device (sizes, attribute values)
    order: dict[str, int]  # module -> index of its first call
    weakened: dict[tuple, tuple[str, str]] = field(default_factory=dict)  # group key -> (form, why): check disproved more
    kept: dict[tuple, str] = field(default_factory=dict)  # group key -> why it stays whole (a parameter budget's choice)

    def forced(self, key: tuple) -> tuple[str, str] | None:
        """The form a group is held to, weaker than its dataflow allows: check's or the budget's."""
        if key in self.weakened:
            return self.weakened[key]
        return ("replicated", self.kept[key]) if key in self.kept else None


@dataclass
class PlanDraft:
    rules: list[Rule]
    fixups: list[tuple[str, str, str]]  # (pattern, attr, note)
    loss_parallel: bool
    notes: list[str]  # what stays whole, and why
    tp: int
    tp_note: str
    sequence_parallel: bool
    forms: dict = field(default_factory=dict)  # group key -> (form, why) as written: after tp and check had their say
    params_per_rank: int | None = None  # at full size, no FSDP (params_per_rank: from the weights the rules split)
    budget: int | None = None  # --max-params-per-rank it was drafted within


_FORM_ORDER = {"sharded": 0, "packed": 1, "gathered": 2, "replicated": 3}


def _merged_groups(a: Analysis) -> dict[tuple, tuple[Group, list[str]]]:
    """Groups by their names relative to a block: the representative (weakest form wins) and its blocks."""
    merged: dict[tuple, tuple[Group, list[str]]] = {}
    for block, groups in a.groups.items():
        for group in groups:
            if group.key not in merged:
                merged[group.key] = (group, [block])
                continue
            first, blocks = merged[group.key]
            blocks.append(block)
            if _FORM_ORDER[group.variant] > _FORM_ORDER[first.variant]:
                _merge_found(group, first, group)
                merged[group.key] = (group, blocks)
            elif group.variant == first.variant:
                _merge_found(first, first, group)
                first.fixups = list(dict.fromkeys(first.fixups + group.fixups))
    return merged


def _merge_found(into: Group, earlier: Group, later: Group) -> None:
    """What two blocks' copies of one group found beside its linears, together in ``into`` (the later
    block's entry wins where both name a module)."""
    into.grad_sum = {**earlier.grad_sum, **later.grad_sum}
    into.shared_keys = {**earlier.shared_keys, **later.shared_keys}
    into.key_modules = list(dict.fromkeys(earlier.key_modules + later.key_modules))
    into.local_params = _union(earlier.local_params, later.local_params)


def _union(a: dict[str, list[str]], b: dict[str, list[str]]) -> dict[str, list[str]]:
    """Per-head parameters by owner, from two blocks (MiMo-V2-Flash: sinks in its sliding-window layers
    only; local_params leaves a layer without them as it is)."""
    return {owner: list(dict.fromkeys(a.get(owner, []) + b.get(owner, []))) for owner in {**a, **b}}


def _child_of(rel: str) -> str | None:
    head, dot, _ = rel.partition(".")
    return head if dot else None


def _call_arg(call, value: int):
    """How ``value`` enters ``call``: ("arg", position, count of positional args) or ("kwarg", name), or None."""
    positional = [w for w, _ in call.args if isinstance(w, int)]
    for where, v in call.args:
        if v == value:
            return ("arg", where, len(positional)) if isinstance(where, int) else ("kwarg", where)
    return None


def _clean_input(a: Analysis, block: str, child: str, members: set[str]) -> tuple | None:
    """How the colwise members' shared input enters ``child``, when nothing else in the child reads it."""
    graph = a.traced.graph
    calls = graph.calls_of(f"{block}.{child}")
    if len(calls) != 1:
        return None
    call = calls[0]
    inputs = set()
    for node in graph.nodes[call.first_node: call.last_node + 1]:
        if node.kind == "module" and node.name[len(block) + 1:] in members:
            vals = node.input_values()
            if not vals:
                return None
            inputs.add(vals[0])
    if len(inputs) != 1:
        return None
    (value,) = inputs
    for n in graph.values[value].consumers:
        node = graph.nodes[n]
        if call.first_node <= n <= call.last_node and not (node.kind == "module" and node.name[len(block) + 1:] in members):
            return None
    return _call_arg(call, value)


def _clean_output(a: Analysis, block: str, child: str, rowwise: str) -> bool:
    """The child returns the rowwise output as its first output, through elementwise ops at most."""
    graph = a.traced.graph
    calls = graph.calls_of(f"{block}.{child}")
    if len(calls) != 1 or not calls[0].outputs or calls[0].outputs[0] is None:
        return False
    call, target = calls[0], calls[0].outputs[0]
    starts = [v for n in graph.nodes[call.first_node: call.last_node + 1]
              if n.kind == "module" and n.name == f"{block}.{rowwise}" for v in n.outputs]
    queue, seen = list(starts), set()
    while queue:
        v = queue.pop()
        if v == target:
            return True
        if v in seen:
            continue
        seen.add(v)
        for n in graph.values[v].consumers:
            node = graph.nodes[n]
            if not call.first_node <= n <= call.last_node or node.kind != "op":
                continue
            others = [u for u in node.input_values() if u != v]
            if any(graph.values[u].requires_grad for u in others):
                continue
            queue.extend(node.outputs)
    return False


def _child_status(a: Analysis, forms: dict[tuple, tuple]) -> dict[str, Any]:
    """For each block child holding a group: how its input enters (a tuple) when, in *every* block
    where the child exists, that input is read by its groups' colwise linears alone and each rowwise
    output is what the child returns; else why not (a string).  A rule on a child applies to it in
    every block: DeepSeek-V3's ``mlp`` is a dense MLP in the first blocks and a MoE block (whose
    router reads the input) in the rest, so neither may take a sharded-linears-only input rule."""
    graph = a.traced.graph
    status: dict[str, Any] = {}
    for block, groups in a.groups.items():
        prefix = block + "."
        depth = block.count(".") + 1
        children = {c.module[len(prefix):] for c in graph.calls
                    if c.module.startswith(prefix) and c.module.count(".") == depth}
        for child in children:
            mine = [g for g in groups if not g.experts and forms.get(g.key, ("replicated",))[0] != "replicated"
                    and _child_of(g.rowwise) == child and all(_child_of(c) == child for c in g.colwise)]
            holds_rules = any(_child_of(g.rowwise) == child for g in groups) or child in status
            if not holds_rules:
                continue
            if not mine:
                why = "it holds parameters no sharded group covers"
                status[child] = status[child] if isinstance(status.get(child), str) else why
                continue
            members = {c for g in mine for c in g.colwise}
            how = _clean_input(a, block, child, members)
            if how is None:
                status[child] = "its input is read by more than the sharded linears"
            elif not all(_clean_output(a, block, child, g.rowwise) for g in mine):
                status[child] = status.get(child) if isinstance(status.get(child), str) else \
                    f"{mine[0].rowwise}'s output is changed before {child} returns it"
            elif child not in status or status[child] == how:
                status[child] = how
            elif isinstance(status[child], tuple):
                status[child] = "its input enters it differently in different blocks"
    return status


def _layouts_for(how: tuple, given: str, desired: str) -> dict[str, Any]:
    """PrepareModuleInput arguments moving the input ``how`` enters from ``given`` to ``desired``."""
    if how[0] == "kwarg":
        return {"input_kwarg_layouts": {how[1]: given}, "desired_input_kwarg_layouts": {how[1]: desired}}
    _, position, count = how
    given_list = [given if i == position else None for i in range(count)]
    desired_list = [desired if i == position else None for i in range(count)]
    return {"input_layouts": given_list, "desired_input_layouts": desired_list}


def _stream_layouts(a: Analysis, call, given: str, desired: str) -> dict[str, Any]:
    """PrepareModuleInput arguments moving every stream-shaped input of ``call`` (the residual stream
    and anything of its shape: a residual passed in) from ``given`` to ``desired``."""
    positional = [(w, v) for w, v in call.args if isinstance(w, int)]
    keywords = [(w, v) for w, v in call.args if not isinstance(w, int) and _is_stream_shaped(a, v)]
    out: dict[str, Any] = {}
    if any(_is_stream_shaped(a, v) for _, v in positional):
        out["input_layouts"] = [given if _is_stream_shaped(a, v) else None for _, v in positional]
        out["desired_input_layouts"] = [desired if _is_stream_shaped(a, v) else None for _, v in positional]
    if keywords:
        out["input_kwarg_layouts"] = {w: given for w, _ in keywords}
        out["desired_input_kwarg_layouts"] = {w: desired for w, _ in keywords}
    return out


def _run_whole(a: Analysis, call) -> dict[str, Any] | None:
    """prepare_input_output fields that run a module whole on every tp rank under sequence parallel."""
    layouts = _stream_layouts(a, call, "shard(1)", "replicate")
    if not layouts:
        return None
    n = len(call.outputs) or 1
    return {"style": "prepare_input_output", **layouts, "use_local_input": True,
            "output_layouts": ["replicate" if i == 0 else None for i in range(n)],
            "desired_output_layouts": ["shard(1)" if i == 0 else None for i in range(n)],
            "use_local_output": False}


def _entry_is_clean(a: Analysis) -> str | None:
    """None when every op from the embedding to the first block combines only what comes from the
    embedding, from other embeddings (cut to sequence shards by a rule) and scalars; else what does not."""
    import torch.nn as nn

    graph, sk = a.traced.graph, a.skeleton
    twin_modules = _module_names(a.traced.model)
    target = sk.blocks[0].stream_in
    embed_out = [v for n in graph.nodes if n.kind == "module" and n.name == sk.embed for v in n.outputs]
    forward, queue = set(embed_out), list(embed_out)
    while queue:
        for n in graph.values[queue.pop()].consumers:
            node = graph.nodes[n]
            for out in node.outputs:
                if out not in forward and n < sk.blocks[0].call.first_node:
                    forward.add(out)
                    queue.append(out)
    backward, queue = {target}, [target]
    while queue:
        node = graph.producer(queue.pop())
        if node is None:
            continue
        for v in node.input_values():
            if v not in backward:
                backward.add(v)
                queue.append(v)
    path = forward & backward
    for v in sorted(path):
        node = graph.producer(v)
        if node is None or node.kind != "op":
            continue
        for u in node.input_values():
            if u in path or not graph.values[u].shape:
                continue
            producer = graph.producer(u)
            if producer is not None and producer.kind == "module" and isinstance(twin_modules.get(producer.name), nn.Embedding):
                continue
            what = f"{producer.name} in {producer.scope or 'the model'}" if producer else "a tensor made from nothing"
            return f"{node.name} in {node.scope or 'the model'} combines it with {what}, which no rule can cut"
    return None


def _is_stream_shaped(a: Analysis, value: int | None) -> bool:
    if value is None:
        return False
    shape = a.traced.graph.values[value].shape
    return len(shape) == 3 and shape[:2] == (TRACE_BATCH, TRACE_SEQ) and shape[2] == _hidden_size(a.traced)


def _hidden_size(traced: Traced) -> int | None:
    """The twin's residual width: its config's hidden_size, else its input embedding's width."""
    import torch.nn as nn

    size = getattr(traced.twin_config, "hidden_size", None)
    if isinstance(size, int):
        return size
    embedding = next((m for m in traced.model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.embedding_dim if embedding is not None else None


def _experts_split(a: Analysis, block: str, rel: str) -> Split | None:
    """Each expert's intermediate size at full size: what expert tensor parallel splits over tp."""
    from .parallel_styles import expert_weight_dims

    modules = _module_names(a.full_model)
    full_block = _first_full_block(modules, a.skeleton, block, rel)
    experts = modules.get(f"{full_block}.{rel}") if full_block else None
    if experts is None:
        return None
    dim = expert_weight_dims(experts).get("down_proj", (None,))[0]
    if dim is None:
        return None
    size = experts.down_proj.shape[dim]
    return Split(rel, size, f"{size} intermediate features per expert")


def _experts_rule(a: Analysis, group: Group, block: str, tp: int, rules: list, notes: list, order: tuple,
                  blocks_pattern: str) -> None:
    kind = type(_module_names(a.traced.model)[f"{block}.{group.rowwise}"]).__name__
    if group.variant != "sharded":
        notes.append(f"{blocks_pattern}.{group.rowwise} ({kind}) stays whole: {group.why}")
        return
    split = _experts_split(a, block, group.rowwise)
    if split is not None and split.size % tp:
        notes.append(f"{blocks_pattern}.{group.rowwise} ({kind}) stays whole: tp={tp} does not divide {split.what}")
        return
    rules.append(Rule(group.rowwise, {"style": "expert_tensor_parallel"},
                      f"{kind}: every expert's intermediate dim split over tp ({split.what if split else 'sizes unknown'}); "
                      "the router stays replicated, one all-reduce after the experts", True, order))


def _one_form_per_name(merged: dict, forms: dict) -> None:
    """Rules name modules, not blocks: where groups of different blocks share a module name (Kimi-Linear's
    linear-attention layers and its MLA layer both feed ``self_attn.o_proj``), a group gathered or left
    whole in some blocks is gathered or left whole in all of them."""
    names = {key: {group.rowwise, *group.colwise} for key, (group, _) in merged.items() if key in forms}
    changed = True
    while changed:
        changed = False
        for key, (form, _, splits) in list(forms.items()):
            for other, (other_form, other_why, _) in forms.items():
                shared = names[key] & names[other]
                if (other != key and shared and _FORM_ORDER[other_form] >= _FORM_ORDER["gathered"]
                        and _FORM_ORDER[other_form] > _FORM_ORDER[form]):
                    forms[key] = (other_form, f"one rule per module name, and {', '.join(sorted(shared))} "
                                  f"{'is' if len(shared) == 1 else 'are'} {other_form} in other blocks: {other_why}",
                                  splits)
                    changed = True
                    break


def assemble(a: Analysis, *, tp: int, tp_note: str, sequence_parallel: bool) -> PlanDraft:
    """The rules for ``tp``: each group in the form it was proven to take and its sizes allow."""
    sp = sequence_parallel
    rules: list[Rule] = []
    fixups: list[tuple[str, str, str]] = []
    notes: list[str] = []
    modules_full = _module_names(a.full_model)
    twin_modules = _module_names(a.traced.model)
    sk = a.skeleton
    first_block = sk.blocks[0].name if sk.blocks else None

    def order_of(rel: str, group_first: int | None = None, rank: int = 0) -> tuple:
        own = 10**9
        for block in a.groups:
            found = a.order.get(f"{block}.{rel}")
            if found is not None:
                own = found
                break
        return (own if group_first is None else group_first, rank, own)

    # -- the decoder blocks ------------------------------------------------------------------
    wrapped: dict[str, str] = {}  # child -> why it runs whole on every rank (SP)
    prepared: dict[str, tuple] = {}  # child -> how its input enters
    handled: set[str] = set()  # relative modules with a rule
    local: dict[str, list[str]] = {}  # owner -> its per-head parameters that split with the heads (local_params)
    merged = _merged_groups(a)
    forms: dict[tuple, tuple[str, str, list[Split]]] = {}
    for key, (group, blocks) in merged.items():
        if group.experts:
            continue
        splits = group_splits(a.traced, a.full_model, sk, blocks[0], group)
        form, why = group.variant, group.why
        bad = [s for s in splits if s.size % tp]
        if form in ("sharded", "packed") and bad:
            if all(s.size % tp == 0 for s in splits if "features" in s.what):
                form, why = "gathered", f"tp={tp} does not divide {bad[0].what}"
            else:
                form, why = "replicated", f"tp={tp} does not divide {bad[0].what}"
        if form == "gathered" and [s for s in splits if "features" in s.what and s.size % tp]:
            bad = [s for s in splits if "features" in s.what and s.size % tp]
            form, why = "replicated", f"tp={tp} does not divide {bad[0].what}"
        forced = a.forced(key)
        if forced is not None and _FORM_ORDER[forced[0]] > _FORM_ORDER[form]:
            form, why = forced
        forms[key] = (form, why, splits)
    _one_form_per_name(merged, forms)
    status = _child_status(a, forms)  # child -> how its input enters (clean in every block), or why not
    for child, state in status.items():
        if isinstance(state, tuple):
            prepared[child] = state
        elif sp:
            wrapped[child] = state
    for key, (group, blocks) in merged.items():
        block = blocks[0]
        if group.experts:
            if a.forced(key) is not None:
                notes.append(f"{sk.pattern}.{group.rowwise} stays whole: {a.forced(key)[1]}")
            else:
                _experts_rule(a, group, block, tp, rules, notes, order_of(group.rowwise), sk.pattern)
            handled.add(group.rowwise)
            continue
        form, why, splits = forms[key]
        members = ", ".join(c.rpartition(".")[2] for c in group.colwise)
        row_short = group.rowwise.rpartition(".")[2]
        meet = f" meet in {' / '.join(group.meet)} and" if group.meet else ""
        if form == "replicated":
            notes.append(f"{sk.pattern}.{group.rowwise} and {members} stay whole: {why}")
            continue
        child = _child_of(group.rowwise)
        same_child = child is not None and all(_child_of(c) == child for c in group.colwise)
        in_wrapper = sp and child in wrapped
        heads = list(dict.fromkeys(s.what.partition(" (")[0] for s in splits if "heads (" in s.what))
        first = min(order_of(c)[0] for c in group.colwise)
        for rel in group.colwise:
            fields: dict[str, Any] = {"style": "colwise"}
            if form in ("sharded", "packed"):
                note = (f"{members}{meet} feed {row_short}: " + (f"heads split over tp ({', '.join(heads)})"
                                                                             if heads else "output features split over tp"))
                if form == "packed" and rel in group.packed:
                    fields = {"style": "packed_colwise", "parts": group.parts[rel]}
                    note = (f"fused: {group.packed[rel]}; each rank keeps its slice of each of the "
                            f"{group.parts[rel]} parts; " + note)
            else:
                fields["output_layouts"] = "replicate"
                note = f"weight split, output gathered: {why}"
            if sp and not same_child:
                fields = {"style": fields["style"], "input_layouts": "shard(1)",
                          **{k: v for k, v in fields.items() if k != "style"}}
            rules.append(Rule(rel, fields, note, True, order_of(rel, first, 1)))
            handled.add(rel)
        fields = {"style": "rowwise"}
        if form == "gathered":
            fields["input_layouts"] = "replicate"
        if sp and not in_wrapper:
            fields.update(output_layouts="shard(1)", use_local_output=False)
        note = (f"sums the partial products of {members}" if form != "gathered" else
                f"takes its own slice of the gathered {members} output")
        if sp and not in_wrapper:
            note += "; reduce-scatter back to sequence shards"
        rules.append(Rule(group.rowwise, fields, note, True, order_of(group.rowwise, first, 3)))
        handled.add(group.rowwise)
        if form in ("sharded", "packed"):
            for rel, dim in group.grad_sum.items():
                kind = type(twin_modules.get(f"{block}.{rel}")).__name__
                rules.append(Rule(rel, {"style": "sequence_parallel", "sequence_dim": dim, "use_local_output": True},
                                  f"{kind} applied to the split activations (dim {dim} cut): weight replicated, "
                                  "its gradient summed over tp", True, order_of(rel, first, 2)))
                handled.add(rel)
            for rel in group.shared_keys:
                rules.append(Rule(rel, {"style": "mla_kv_a_proj"},
                                  "replicated; its last qk_rope_head_dim output features (a rotary key shared by every head) "
                                  "feed each rank's own heads: their gradient summed over tp", True,
                                  order_of(rel, first, 0)))
                handled.add(rel)
            local = _union(local, group.local_params)
            for rel in group.key_modules:
                kind = type(twin_modules.get(f"{block}.{rel}")).__name__
                rules.append(Rule(rel, {"style": "replicate_grad_allreduce"},
                                  f"{kind} on the shared rotary key: replicated, its gradient summed over tp (each rank's "
                                  "heads use the key)", True, order_of(rel, first, 0)))
                handled.add(rel)
            for rel, attr in group.fixups:
                fixups.append((f"{sk.pattern}.{rel}" if rel else sk.pattern, attr,
                               f"the forward reads {attr} to reshape the split activations"))

    # -- block children under sequence parallel, and shared inputs ------------------------------
    if first_block is not None:
        graph = a.traced.graph
        for block in [b.name for b in sk.blocks]:
            depth = block.count(".") + 1
            for call in graph.calls:
                if not call.module.startswith(block + ".") or call.module.count(".") != depth:
                    continue
                rel = call.module[len(block) + 1:]
                if rel in handled or rel in prepared or rel in wrapped:
                    continue
                module = twin_modules[call.module]
                has_params = any(True for _ in module.parameters())
                if not has_params:
                    continue
                tensor_args = [v for _, v in call.args if v is not None]
                if not sp:
                    continue
                leaf = call.module in graph.leaf_modules
                if (leaf and len(call.args) == 1 and call.args[0][0] == 0 and _is_stream_shaped(a, tensor_args[0] if tensor_args else None)
                        and call.outputs and _is_stream_shaped(a, call.outputs[0])):
                    rules.append(Rule(rel, {"style": "sequence_parallel"},
                                      f"{type(module).__name__} on the residual stream: runs on the local sequence shard",
                                      True, order_of(rel)))
                    handled.add(rel)
                    continue
                stream_args = [(w, v) for w, v in call.args if _is_stream_shaped(a, v)]
                if stream_args:
                    wrapped.setdefault(rel, "no sharded group inside" if not any(
                        r.startswith(rel + ".") for r in handled) else "it holds parameters no rule shards")
        for child, how in prepared.items():
            if child in wrapped:
                continue
            if sp:
                fields = {"style": "prepare_input", **_layouts_for(how, "shard(1)", "replicate")}
                note = "one all-gather of the sequence feeds every sharded linear inside"
            else:
                fields = {"style": "prepare_input", **_layouts_for(how, "replicate", "replicate")}
                note = ("one DTensor input shared by the sharded linears inside: their input gradients are summed "
                        "before one all-reduce")
            if child in local:  # it holds per-head parameters too: one rule does both
                fields = {"style": "local_params", "sharded": local.pop(child),
                          **{k: v for k, v in fields.items() if k != "style"}}
                note += f"; its {', '.join(fields['sharded'])} split on dim 0 with the heads, used locally"
            rules.append(Rule(child, fields, note, True, order_of(child, None, 0)))
        for child, why in wrapped.items():
            calls = graph.calls_of(f"{first_block}.{child}") or [c for c in graph.calls if c.module.endswith("." + child)]
            fields = _run_whole(a, calls[0]) if calls else None
            if fields is None:
                notes.append(f"sequence parallel: cannot tell how the residual stream enters {child}")
                continue
            rules.append(Rule(child, fields, f"runs whole on every tp rank ({why}): the sequence gathered in, "
                              "its output cut back to sequence shards", True, order_of(child)))
            notes.append(f"{sk.pattern}.{child} runs on the full sequence on every tp rank ({why})")

    for owner, names in local.items():  # per-head parameters of a module with no other rule
        if owner in wrapped or owner in prepared or owner in handled:
            notes.append(f"{sk.pattern}.{owner}: its {', '.join(names)} apply per head, but it runs whole: "
                         "check decides")
            continue
        rules.append(Rule(owner, {"style": "local_params", "sharded": names},
                          f"its {', '.join(names)} split on dim 0 with the heads, used locally", True, order_of(owner)))
        handled.add(owner)

    # -- embedding, final norm, head --------------------------------------------------------------
    import torch.nn as nn

    loss_parallel = False
    vocab = None
    embed_sharded = head_sharded = False
    entry_problem = _entry_is_clean(a) if sp and sk.blocks else None
    if entry_problem:
        notes.append(f"sequence parallel starts at {sk.blocks[0].name}: from the embedding to it, {entry_problem}")
    inner = []  # modules with weights inside the embedding (Inkling's embed_norm after the lookup)
    if sk.embed and isinstance(modules_full.get(sk.embed), nn.Embedding):
        vocab = modules_full[sk.embed].weight.shape[0]
        inner = [n for n, m in modules_full[sk.embed].named_modules()
                 if n and any(True for _ in m.parameters(recurse=False))]
    head_module = modules_full.get(sk.head) if sk.head else None
    head_vocab = head_module.weight.shape[0] if isinstance(head_module, nn.Linear) else None
    if inner:
        # the vocabulary split's partial sums would go through the module's own layers before they are
        # summed; and torch's rowwise style re-registers every parameter under the module by its dotted name
        notes.append(f"{sk.embed} stays whole: its forward runs {', '.join(inner)} after the lookup, which the "
                     "vocabulary split's partial sums cannot go through")
    elif vocab is not None and vocab % tp == 0 and (not sk.tied or (head_vocab is not None and head_vocab % tp == 0)):
        embed_sharded = True
    elif vocab is not None:
        notes.append(f"{sk.embed} stays whole: tp={tp} does not divide its vocabulary ({vocab}); pad it "
                     f"(model.resize_token_embeddings(n, pad_to_multiple_of={tp}))")
    if head_vocab is not None and head_vocab % tp == 0 and (not sk.tied or embed_sharded):
        head_sharded = True
    elif head_vocab is not None and not (sk.tied and not embed_sharded and vocab is not None):
        notes.append(f"{sk.head} stays whole: tp={tp} does not divide its vocabulary ({head_vocab})")
    tie = " (tied to the output head: both split on the vocabulary)" if sk.tied else ""
    sp_embed = sp and not entry_problem
    if embed_sharded:
        fields = {"style": "rowwise", "input_layouts": "replicate"}
        if sp_embed:
            fields.update(output_layouts="shard(1)", use_local_output=False)
        rules.append(Rule(sk.embed, fields, f"vocabulary split{tie}; every rank looks up its own rows" + (
            ", partial sums reduce-scattered to sequence shards" if sp_embed else ""), False, (a.order.get(sk.embed, 0),)))
    elif sp_embed and sk.embed:
        rules.append(Rule(sk.embed, {"style": "prepare_output", "output_layouts": "replicate",
                                      "desired_output_layouts": "shard(1)", "use_local_output": False},
                          "whole embedding; its output cut to sequence shards", False, (a.order.get(sk.embed, 0),)))
    graph = a.traced.graph
    if sp:
        for name in sk.before + [n for n in sk.after if n != sk.head]:
            if (name == sk.embed or name.startswith(f"{sk.embed}.") or name not in modules_full
                    or (entry_problem and name in sk.before)):
                continue
            module = twin_modules[name]
            calls = graph.calls_of(name)
            if not calls:
                continue
            call = calls[0]
            tensors = [v for _, v in call.args if v is not None]
            if isinstance(module, nn.Embedding):
                rules.append(Rule(name, {"style": "prepare_output", "output_layouts": "replicate",
                                          "desired_output_layouts": "shard(1)", "use_local_output": False},
                                  f"{type(module).__name__} added to the stream: whole weight, output cut to sequence shards",
                                  False, (a.order.get(name, 0),)))
            elif (len(call.args) == 1 and tensors and _is_stream_shaped(a, tensors[0]) and call.outputs
                  and _is_stream_shaped(a, call.outputs[0])):
                rules.append(Rule(name, {"style": "sequence_parallel"},
                                  f"{type(module).__name__} on the residual stream: runs on the local sequence shard",
                                  False, (a.order.get(name, 0),)))
            else:
                fields = _run_whole(a, call)
                if fields is None:
                    continue
                rules.append(Rule(name, fields, f"{type(module).__name__} runs whole on every tp rank", False,
                                  (a.order.get(name, 0),)))
    if entry_problem:
        block0 = sk.blocks[0]
        fields = {"style": "prepare_input", **_layouts_for(_call_arg(block0.call, block0.stream_in), "replicate", "shard(1)")}
        rules.append(Rule(block0.name, fields, "the residual stream enters the first block whole and is cut to sequence "
                          "shards there (see the header)", False, (a.order.get(block0.name, 0),)))
    if head_sharded:
        fields = {"style": "colwise"}
        if sp:
            fields["input_layouts"] = "shard(1)"
        fields.update(output_layouts="shard(-1)", use_local_output=False)
        rules.append(Rule(sk.head, fields, "vocabulary split; logits stay vocab-sharded into the loss (loss_parallel)",
                          False, (a.order.get(sk.head, 10**9),)))
        loss_parallel = True
    elif sp and sk.head:
        rules.append(Rule(sk.head, {"style": "prepare_input", "input_layouts": ["shard(1)"],
                                     "desired_input_layouts": ["replicate"], "use_local_output": True},
                          "whole output head: the sequence gathered in", False, (a.order.get(sk.head, 10**9),)))
    rules.sort(key=lambda r: r.order)
    written = {key: (form, why) for key, (form, why, _) in forms.items()}
    for key, (group, _) in merged.items():
        if group.experts:
            written[key] = a.forced(key) or (group.variant, group.why)
    return PlanDraft(rules, fixups, loss_parallel, notes, tp, tp_note, sp, written)


# ----------------------------------------------------------------------------------------------
# Patterns over layer indices and sibling names, and the YAML
# ----------------------------------------------------------------------------------------------


def _generalize(rules: list[Rule], siblings: set[str]) -> list[Rule]:
    """Merge consecutive in-block rules that say the same thing about siblings into one fnmatch pattern
    (``self_attn.[qkv]_proj``, ``mlp.[gu]*_proj``), when the pattern matches exactly those siblings."""
    from .resolve import matches

    out: list[Rule] = []
    i = 0
    while i < len(rules):
        rule = rules[i]
        run = [rule]
        while (rule.in_block and i + len(run) < len(rules)):
            other = rules[i + len(run)]
            if not (other.in_block and other.fields == rule.fields and other.note == rule.note
                    and other.pattern.rpartition(".")[0] == rule.pattern.rpartition(".")[0]):
                break
            run.append(other)
        if len(run) > 1:
            parent = rule.pattern.rpartition(".")[0]
            pattern = _sibling_pattern([r.pattern.rpartition(".")[2] for r in run])
            full = f"{parent}.{pattern}" if parent and pattern else pattern
            if pattern and {s for s in siblings if matches(full, s)} == {r.pattern for r in run}:
                out.append(Rule(full, rule.fields, rule.note, True, rule.order))
                i += len(run)
                continue
        out.append(rule)
        i += 1
    return out


def _sibling_pattern(names: list[str]) -> str | None:
    """``[qkv]_proj`` for q_proj/k_proj/v_proj, ``[gu]*_proj`` for gate_proj/up_proj."""
    import os

    suffix = os.path.commonprefix([n[::-1] for n in names])[::-1]
    firsts = list(dict.fromkeys(n[0] for n in names if n))
    if len(firsts) != len(names) or not suffix:
        return None
    middles = {n[1:len(n) - len(suffix)] for n in names}
    if middles == {""}:
        return f"[{''.join(firsts)}]{suffix}"
    return f"[{''.join(firsts)}]*{suffix}"


def _fields_yaml(fields: dict[str, Any], indent: str) -> list[str]:
    from .import_hf import _scalar

    return [f"{indent}{key}: {_scalar(value)}" for key, value in fields.items()]


def plan_yaml(draft: PlanDraft, blocks_pattern: str | None, block_note: str) -> list[str]:
    lines: list[str] = []
    grouped = False
    for rule in draft.rules:
        if rule.in_block:
            if not grouped:
                lines += [f"  - match: {_note(blocks_pattern)}", f"    note: {_note(block_note)}", "    plan:"]
                grouped = True
            lines.append(f"      - match: {_note(rule.pattern)}")
            lines += _fields_yaml(rule.fields, "        ")
            lines.append(f"        note: {_note(rule.note)}")
        else:
            grouped = False
            lines.append(f"  - match: {_note(rule.pattern)}")
            lines += _fields_yaml(rule.fields, "    ")
            lines.append(f"    note: {_note(rule.note)}")
        lines.append("")
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _note(text: str) -> str:
    from .import_hf import _scalar

    return _scalar(text)


# ----------------------------------------------------------------------------------------------
# derive(): read the model, analyse, write, prove
# ----------------------------------------------------------------------------------------------


@dataclass
class Derived:
    """What ``derive`` produced: the spec text, how it was proven, and what stays whole."""

    text: str
    name: str
    source: str
    model_class: str
    tp: int
    sequence_parallel: bool
    loss_parallel: bool
    draft: PlanDraft
    groups: list[dict]  # one per group: rowwise, colwise, form, why, ...
    report: Any = None  # check.CheckReport
    seconds: float = 0.0
    analysis: Any = field(default=None, repr=False)  # the Analysis it was derived from (twin, trace, groups)

    @property
    def notes(self) -> list[str]:
        return self.draft.notes

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "model_class": self.model_class,
            "tp": self.tp,
            "tp_note": self.draft.tp_note,
            "sequence_parallel": self.sequence_parallel,
            "loss_parallel": self.loss_parallel,
            "groups": self.groups,
            "fixups": [{"match": p, "attr": a, "op": "floordiv_tp"} for p, a, _ in self.draft.fixups],
            "left_whole": list(self.notes),
            "params_per_rank": self.draft.params_per_rank,
            "max_params_per_rank": self.draft.budget,
            "check": self.report.to_dict() if self.report is not None else None,
            "seconds": self.seconds,
        }


@dataclass
class _Input:
    config: Any
    model: dict[str, Any]  # the spec's model: section
    label: str
    name_hint: str
    sections: dict[str, Any] = field(default_factory=dict)  # a spec's train:, launch: and mesh: (all but tp), kept
    own: Any = None  # _OwnModel: a spec whose model is a factory (config None)


def _read_input(source: str, out_dir) -> _Input:
    """MODEL as import-hf takes it (hub id, bundled name, folder, config.json, model_type) or a spec file."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        from .import_hf import _rel
        from .loader import load_spec
        from .models import load_spec_config, local_model_dir

        spec = load_spec(str(path))
        config = load_spec_config(spec)
        data = spec.model_dump(mode="json", exclude_unset=True)
        model = data.get("model", {})
        if spec.model.name and spec.source is not None:
            local = local_model_dir(spec.model.name, spec.source.directory)
            if local is not None:
                model["name"] = _rel(local, out_dir)
        sections = {key: data[key] for key in ("train", "launch", "mesh") if key in data}
        files = sections.get("train", {}).get("data_files")
        if files and spec.source is not None:  # local data files stay where they are, named from the new spec
            sections["train"]["data_files"] = [_rel(Path(spec.source.directory) / f, out_dir) for f in files]
        own = None
        if config is None:  # model.factory: the model source builds it and its twin
            from .stage import model_source

            own = _OwnModel(model_source(spec))
            module, _, attr = spec.model.factory.rpartition(":")
            if (module.endswith(".py") or "/" in module) and spec.source is not None:
                # a file path, relative to the spec written (or to here, where the check reads it)
                file = Path(spec.source.directory) / Path(module).expanduser()
                model["factory"] = f"{_rel(file, out_dir or Path.cwd())}:{attr}"
        return _Input(config, model, source, spec.name, sections, own)
    from .import_hf import _read_source

    src = _read_source(source, out_dir)
    return _Input(src.config, dict(src.model), src.label, src.name_hint)


def analyse(config, build=None) -> Analysis:
    """Trace the twin of ``config`` (a transformers config, or ``_OwnModel``) and find its skeleton
    and groups, each in the form it can take."""
    build = build or _build
    traced = trace_twin(config, build)
    skeleton = find_skeleton(traced)
    if not skeleton.blocks:
        raise DeriveRefused(
            f"{type(traced.model).__name__}: no stack of decoder blocks, each called once, carrying a [batch, seq, "
            "...] residual stream was found in its dataflow",
            hint="derive plans decoder-only transformers; write this plan by hand (start from specs/llama3.yaml)")
    groups = find_groups(traced, skeleton)
    choose_forms(traced, groups)
    try:
        full = build(config, device="meta")
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"transformers cannot build {type(traced.model).__name__} at full size: {_one_line(exc)}") from None
    order: dict[str, int] = {}
    for i, call in enumerate(traced.graph.calls):
        order.setdefault(call.module, i)
    return Analysis(traced, skeleton, groups, full, order)


def _all_splits(a: Analysis) -> dict[tuple, list[Split]]:
    out = {}
    for key, (group, blocks) in _merged_groups(a).items():
        if group.experts:
            split = _experts_split(a, blocks[0], group.rowwise) if group.variant == "sharded" else None
            if split is not None:
                out[key] = [split]
        elif group.variant in ("sharded", "packed"):
            out[key] = group_splits(a.traced, a.full_model, a.skeleton, blocks[0], group)
    return out


# ----------------------------------------------------------------------------------------------
# Fewer bytes within a parameter budget: groups left whole where every rank has room for them
# ----------------------------------------------------------------------------------------------


def _full_blocks(a: Analysis) -> list[str]:
    """The full-size model's blocks (``model.layers.0`` ...)."""
    prefix = (a.skeleton.blocks_list or "") + "."
    return [n for n in _module_names(a.full_model) if a.skeleton.blocks_list and n.startswith(prefix)
            and n[len(prefix):].isdigit()]


def split_numel(a: Analysis, group: Group) -> tuple[int, int]:
    """(elements of the full-size weights that sharding ``group`` splits over tp, blocks holding it): every
    weight of its colwise members and experts, the rowwise weight (its bias stays replicated)."""
    modules = _module_names(a.full_model)
    total = blocks = 0
    for block in _full_blocks(a):
        if group.experts:
            bank = modules.get(f"{block}.{group.rowwise}")
            if bank is None:
                continue
            count = sum(p.numel() for n, p in bank.named_parameters(recurse=False) if n != "down_proj_bias")
        else:
            row = modules.get(f"{block}.{group.rowwise}")
            cols = [modules[f"{block}.{c}"] for c in group.colwise if f"{block}.{c}" in modules]
            if row is None or getattr(row, "weight", None) is None:
                continue
            count = row.weight.numel() + sum(p.numel() for c in cols for p in c.parameters())
        total += count
        blocks += 1
    return total, blocks


def _units(a: Analysis, draft: PlanDraft) -> list[tuple[Group, list[tuple], str]]:
    """What ``draft`` splits, one entry per reducing module (a rowwise Linear, an expert bank): the
    groups feeding it merged (their rules name modules, not groups: Inkling 2's attention takes other
    colwise members in a block with a short convolution), their keys, and the weakest form written."""
    written = {r.pattern for r in draft.rules if r.in_block and r.fields.get("style") in ("rowwise", "expert_tensor_parallel")}
    units: dict[str, tuple[Group, list[tuple], str]] = {}
    for key, (group, _) in _merged_groups(a).items():
        if group.rowwise not in written:
            continue
        form = (draft.forms.get(key) or (group.variant, ""))[0]
        if group.rowwise not in units:
            units[group.rowwise] = (Group(group.rowwise, list(group.colwise), [], experts=group.experts), [key], form)
            continue
        unit, keys, was = units[group.rowwise]
        unit.colwise += [c for c in group.colwise if c not in unit.colwise]
        keys.append(key)
        units[group.rowwise] = (unit, keys, form if _FORM_ORDER[form] > _FORM_ORDER[was] else was)
    return list(units.values())


def params_per_rank(a: Analysis, draft: PlanDraft) -> int:
    """Parameters one tp rank holds under ``draft`` at full size (no FSDP), from the weights its rules split
    (per-head parameters split with the heads are counted whole: an estimate never below the truth)."""
    total = sum(p.numel() for p in a.full_model.parameters())  # a tied weight once
    tp = draft.tp
    for unit, _, _ in _units(a, draft):
        count, _ = split_numel(a, unit)
        total -= count - count // tp
    modules = _module_names(a.full_model)
    split = {r.pattern for r in draft.rules if not r.in_block and r.fields.get("style") in ("rowwise", "colwise")}
    weights = {id(modules[n].weight): modules[n].weight for n in (a.skeleton.embed, a.skeleton.head)
               if n in split and n in modules}  # the embedding and the head: one weight when tied
    for weight in weights.values():
        total -= weight.numel() - weight.numel() // tp
    return total


def _unit_bytes(a: Analysis, unit: Group, form: str, stream: int) -> int:
    """Elements a sharded ``unit`` sends per token and block, up to the ring's common factor: an all-reduce
    (twice an all-gather's bytes) of its output forward and of its input's gradient backward; gathered, also
    the all-gather of the colwise output forward and of the rowwise input's gradient backward.  ``stream``:
    the width of an expert bank's output (the widest rowwise output)."""
    module = _unit_module(a, unit)
    cost = 4 * (module.out_features if isinstance(getattr(module, "out_features", None), int) else stream)
    if form == "gathered" and isinstance(getattr(module, "in_features", None), int):
        cost += 2 * module.in_features
    return cost


def _unit_module(a: Analysis, unit: Group):
    modules = _module_names(a.full_model)
    block = next((b for b in _full_blocks(a) if f"{b}.{unit.rowwise}" in modules), None)
    return modules.get(f"{block}.{unit.rowwise}") if block else None


def _within_budget(a: Analysis, build, budget: int) -> PlanDraft:
    """``build()`` with the groups left whole that save the most bytes while the parameters per rank stay
    within ``budget``: a sharded group costs about two all-reduces of its output per block (forward and
    backward; more when gathered), a whole one none.  Every subset of up to 16 reducing modules is weighed
    (the cheapest per parameter first beyond); the fewest parameters on ties."""
    from itertools import combinations

    from .report import human_count

    draft = build()
    base = params_per_rank(a, draft)
    if base > budget:
        raise DeriveRefused(
            f"at tp={draft.tp} the derived plan holds about {human_count(base)} parameters per rank, more than "
            f"--max-params-per-rank {human_count(budget)}",
            hint="a larger --tp, or a larger budget")
    candidates = []  # (keys, parameters it adds whole, bytes it saves whole)
    units = _units(a, draft)
    stream = max([getattr(_unit_module(a, u), "out_features", 1) for u, _, _ in units if not u.experts] or [1])
    for unit, keys, form in units:
        count, blocks = split_numel(a, unit)
        candidates.append((keys, count - count // draft.tp, blocks * _unit_bytes(a, unit, form, stream)))
    best: tuple = ()
    best_score = (0, 0)
    if len(candidates) <= 16:
        subsets = (c for size in range(1, len(candidates) + 1) for c in combinations(candidates, size))
    else:
        ordered = sorted(candidates, key=lambda c: c[1] / max(1, c[2]))
        subsets = (tuple(ordered[:size]) for size in range(1, len(ordered) + 1))
    for subset in subsets:
        extra = sum(c[1] for c in subset)
        score = (sum(c[2] for c in subset), -extra)
        if base + extra <= budget and score > best_score:
            best, best_score = subset, score
    if not best:
        return draft
    held = base - best_score[1]
    for keys, _, _ in best:
        for key in keys:
            a.kept[key] = (f"--max-params-per-rank {human_count(budget)} has room for it whole on every rank "
                           f"(about {human_count(held)} parameters per rank as written), and whole it needs no all-reduce")
    return build()


def draft_plan(a: Analysis, *, tp: int | None, sequence_parallel: bool,
               max_params_per_rank: int | None = None) -> PlanDraft:
    """The plan at the largest tp its splits allow (or ``tp``), checked by resolve against the full-size model;
    within ``max_params_per_rank``, the groups that fit whole on every rank left whole (fewer bytes per step)."""
    import torch.nn as nn

    from .loader import load_spec_text
    from .resolve import resolve

    vocab = None
    embed = _module_names(a.full_model).get(a.skeleton.embed or "")
    if isinstance(embed, nn.Embedding):
        vocab = embed.weight.shape[0]
    stream = a.traced.graph.values[a.skeleton.blocks[0].stream_in].shape if a.skeleton.blocks else None
    if sequence_parallel and stream is not None and len(stream) != 3:
        raise DeriveRefused(
            f"sequence parallel cuts a [batch, seq, hidden] residual stream on seq; {type(a.traced.model).__name__}'s "
            f"stream between blocks has {len(stream)} dims ({list(stream)} on the twin: parallel streams of the hidden "
            "state)", hint="derive the plain plan (without --sequence-parallel)")
    chosen, why = choose_tp(_all_splits(a), vocab, tp)
    siblings = set()
    prefix = (a.skeleton.blocks_list or "") + "."
    for name in _module_names(a.full_model):
        if name.startswith(prefix):
            siblings.add(name[len(prefix):].partition(".")[2])
    candidates = [chosen] if tp is not None else [t for t in TP_CANDIDATES if t <= chosen]
    problem = None
    for size in candidates:
        note = why if size == chosen else f"{why.split(';')[0]}, lowered to {size}: at {chosen} {problem}"
        def build(size=size, note=note):
            return assemble(a, tp=size, tp_note=note, sequence_parallel=sequence_parallel)

        a.kept.clear()  # a budget's choice belongs to one draft: not to the next tp, nor to a later derive
        draft = build() if max_params_per_rank is None else _within_budget(a, build, max_params_per_rank)
        draft.params_per_rank, draft.budget = params_per_rank(a, draft), max_params_per_rank
        draft.rules = _generalize(_dedupe(draft.rules), siblings)
        if not any(r.fields.get("style") in ("colwise", "rowwise") for r in draft.rules):
            if size != candidates[-1]:
                continue
            reasons = "; ".join(draft.notes) or "no Linear layers whose outputs meet and feed one reducing Linear"
            raise DeriveRefused(
                f"no tensor-parallel plan for {type(a.traced.model).__name__}: nothing can be sharded ({reasons})",
                hint="torch's colwise/rowwise styles shard nn.Linear and nn.Embedding only; " + _no_linear_hint(a))
        own = ", positions: null" if isinstance(a.traced.config, _OwnModel) else ""  # its forward makes its own
        text = "\n".join(["name: probe", f"model: {{name: null, pretrained: false, config: {{model_type: llama}}{own}}}",
                          "plan:", *plan_yaml(draft, a.skeleton.pattern, "probe"), "fixups:",
                          *[f"  - {{match: {pat!r}, attr: {attr}, op: floordiv_tp}}" for pat, attr, _ in draft.fixups],
                          f"loss_parallel: {'true' if draft.loss_parallel else 'false'}"])
        if not draft.fixups:
            text = text.replace("fixups:\n", "fixups: []\n")
        try:
            resolve(load_spec_text(text, name="derived.yaml"), a.full_model, tp=size, seq_length=1024)
            return draft
        except TpplanError as exc:
            problem = _first_line(str(exc))
            last = exc
    raise DeriveRefused(f"the derived plan does not fit {type(a.full_model).__name__} at tp={candidates[-1]}:\n{last}",
                        hint="try another --tp" if tp is not None else None)


def _first_line(text: str) -> str:
    """The message's first line, with the line after it when the first only introduces it (ends in ':')."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if line.endswith(":") and len(lines) > 1:
        line = f"{line} {lines[1]}"
    return line.split("error: ", 1)[-1]


def _dedupe(rules: list[Rule]) -> list[Rule]:
    seen: dict[tuple, Rule] = {}
    out = []
    for rule in rules:
        key = (rule.in_block, rule.pattern)
        if key in seen:
            continue
        seen[key] = rule
        out.append(rule)
    return out


def _spec_name(hint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._").lower() or "derived"
    return name[:100]


def render(a: Analysis, draft: PlanDraft, inp: _Input, *, name: str, command: str, attn: str,
           proof: str | None) -> str:
    import transformers

    from .import_hf import _comment, _scalar

    model_class = type(a.traced.model).__name__
    sk = a.skeleton
    origin = ("model.factory" if isinstance(a.traced.config, _OwnModel)
              else f"transformers {transformers.__version__}")
    lines = [
        "# yaml-language-server: $schema=tpplan.schema.json",
        "#",
        f"# Derived by `{_comment(command)}` from the dataflow of {model_class} ({origin}):",
        "# a tiny twin of the model ran once under a recorder of which modules and parameters every tensor flows",
        "# from; every group of linears below was cut into tp shares on the twin and its shares summed back.",
    ]
    if proof:
        lines.append(f"# {proof}")
    lines += ["#", "# What the dataflow shows:"]
    lines.append(f"#   {sk.embed or '(no input embedding)'} -> {sk.pattern} ({len(sk.blocks)} in the twin) -> "
                 f"{', '.join(n for n in sk.after if n != sk.head) or '(nothing)'} -> {sk.head or '(no output head)'}"
                 + (" (tied to the embedding)" if sk.tied else ""))
    for key, (group, _) in _merged_groups(a).items():
        form, why = draft.forms.get(key) or (group.variant, group.why)
        if group.experts:
            lines.append(f"#   {group.rowwise}: a MoE expert bank (3-D weights): "
                         + ("expert tensor parallel" if form == "sharded" else f"whole ({why})"))
            continue
        meet = f" meet in {' / '.join(group.meet)} and" if group.meet else ""
        packed = "".join(f"; {c} is fused ({text})" for c, text in group.packed.items())
        lines.append(f"#   {', '.join(group.colwise)}{meet} feed {group.rowwise}: {form}{packed}")
        if why:
            lines.append(f"#     why not {'sharded' if form != 'packed' else 'a contiguous split'}: {why}")
        if form in ("sharded", "packed"):
            for rel, attr in group.fixups:
                lines.append(f"#     the forward reads {rel}.{attr}: divided by tp after sharding")
    if draft.budget is not None:
        from .report import human_count

        lines += ["#", f"# Within --max-params-per-rank {human_count(draft.budget)}: a group that fits whole on every "
                  "rank stays whole (no all-reduce for it);", f"# about {human_count(draft.params_per_rank)} parameters "
                  f"per rank at tp={draft.tp} as written (no FSDP)."]
    if draft.notes:
        lines += ["#", "# What stays whole (replicated on every tp rank) or gathered, and why:"]
        lines += [f"#   {n}" for n in draft.notes]
    sp_text = ", sequence parallel" if draft.sequence_parallel else ""
    lp_text = " + loss parallel" if draft.loss_parallel else ""
    description = f"{inp.label}: derived tensor-parallel plan for {model_class}{sp_text}{lp_text}"
    lines += [f"name: {_scalar(name)}", f"description: {_scalar(description)}", "", "model:"]
    model = dict(inp.model)
    stored = str(getattr(a.traced.config, "dtype", None) or getattr(a.traced.config, "torch_dtype", None) or "")
    stored = stored.replace("torch.", "")
    dtype_comment = f"  # the checkpoint stores {stored}" if "dtype" not in model and stored and stored != "bfloat16" else ""
    model.setdefault("dtype", "bfloat16")  # what the shipped specs train in
    if attn is not None:
        model["attn_implementation"] = attn
    if model.get("name") is None and "factory" not in model:
        model["name"] = None
        model["pretrained"] = False
    order = ["name", "pretrained", "revision", "trust_remote_code", "dtype", "attn_implementation", "tokenizer", "config"]
    for key in sorted(model, key=lambda k: order.index(k) if k in order else len(order)):
        value = model[key]
        comment = ""
        if key == "name" and value is None:
            comment = "  # no checkpoint: set a hub id or local folder to train pretrained weights"
        elif key == "attn_implementation" and value != "sdpa":
            comment = f"  # {model_class} has no sdpa path"
        elif key == "dtype":
            comment = dtype_comment
        lines += _yaml_block(key, value, "  ", comment)
    mesh = {k: v for k, v in (inp.sections.get("mesh") or {}).items() if k != "tp"}
    lines += ["", "mesh:", f"  tp: {draft.tp}    # {draft.tp_note}"]
    for key, value in {"dp": "auto", **mesh}.items():
        lines += _yaml_block(key, value, "  ")
    lines += ["", "plan:"]
    block_note = "one decoder block; patterns below are relative to it" + (
        "; the residual stream stays shard(1) between blocks" if draft.sequence_parallel else "")
    lines += plan_yaml(draft, sk.pattern, block_note)
    lines.append("")
    if draft.fixups:
        lines.append("fixups:")
        for pattern, attr, note in draft.fixups:
            lines.append(f"  - {{match: {_scalar(pattern)}, attr: {attr}, op: floordiv_tp}}  # {note}")
    else:
        lines.append("fixups: []   # the forward reads no head count from a module attribute")
    lines += ["", f"loss_parallel: {'true' if draft.loss_parallel else 'false'}", ""]
    train = inp.sections.get("train") or {"dataset": "tatsu-lab/alpaca", "text_column": "text", "seq_length": 1024,
                                          "batch_size": 8, "lr": 3.0e-5}
    launch = inp.sections.get("launch") or {"nproc_per_node": max(draft.tp, 8), "nnodes": 1}
    lines += _yaml_block("train", train, "")
    lines.append("")
    lines += _yaml_block("launch", launch, "")
    return "\n".join(lines) + "\n"


def _yaml_block(key: str, value: Any, indent: str, comment: str = "") -> list[str]:
    """``key: value`` in block style for mappings, flow style below that; values through import-hf's scalars."""
    from .import_hf import _scalar

    if isinstance(value, dict) and value:
        lines = [f"{indent}{_scalar(key)}:{comment}"]
        for k, v in value.items():
            lines += _yaml_block(k, v, indent + "  ")
        return lines
    return [f"{indent}{_scalar(key)}: {_scalar(value)}{comment}"]


@dataclass
class _Prepared:
    """What derive reads once per model: the input, the analysis of its twin, the attention path."""

    source: str
    inp: _Input
    analysis: Analysis
    attn: str
    out_dir: Any


def prepare(source: str, out_path: str | None = None) -> _Prepared:
    """Read MODEL and analyse its twin (the part of derive that does not depend on --tp or SP)."""
    from pathlib import Path

    from .import_hf import _model_class

    out_dir = Path(out_path).parent if out_path else None
    with _as_refusal(f"the config of {source}"):
        inp = _read_input(source, out_dir)
    config = inp.config
    if config is None:  # a model of the user's own (model.factory): no transformers class, no attention choice
        attn = None
        config = inp.own
        label = inp.model.get("factory") or "the model"
    else:
        model_cls = _model_class(config)
        attn = inp.model.get("attn_implementation") or ("sdpa" if getattr(model_cls, "_supports_sdpa", True) else "eager")
        config._attn_implementation = attn
        if hasattr(config, "use_cache"):
            config.use_cache = False
        label = model_cls.__name__
    with _as_refusal(f"the dataflow of {label}"):
        analysis = analyse(config)
    return _Prepared(source, inp, analysis, attn, out_dir)


@contextlib.contextmanager
def _as_refusal(what: str):
    """An exception derive did not foresee, on a model it has not seen, is a refusal naming it: one
    message (exit 2), never a traceback."""
    try:
        yield
    except TpplanError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' 800 model types do unforeseen things
        raise DeriveRefused(f"derive cannot read {what}: {_one_line(exc)}",
                            hint="a limit of derive on this architecture: write the plan by hand (start from "
                                 "`tpplan import-hf` or specs/llama3.yaml) and prove it with `tpplan check`") from None


def derive(
    source: str,
    *,
    tp: int | None = None,
    sequence_parallel: bool = False,
    max_params_per_rank: int | None = None,
    name: str | None = None,
    out_path: str | None = None,
    command: str | None = None,
    check: bool = True,
    check_tp: int = 2,
    check_dp: int = 1,
    launcher: str | None = None,
    timeout: float = 600,
    prepared: _Prepared | None = None,
) -> Derived:
    """Derive a plan for ``source`` and prove it with ``tpplan check`` (at ``check_tp`` x ``check_dp`` ranks).

    Raises DeriveRefused (exit 2) when no plan can be derived, DeriveFailed (exit 1) when check
    does not prove the one derived; nothing is written here (the caller writes ``text``).
    ``prepared``: a ``prepare(source)`` already made (the twin is traced and emulated once).
    ``max_params_per_rank``: leave whole the groups that fit on every rank within it (fewer bytes per step)."""
    from .loader import load_spec_text
    from .resolve import resolve

    started = time.time()
    if tp is not None and tp < 1:
        raise TpplanError(f"--tp must be a positive integer, got {tp}")
    p = prepared or prepare(source, out_path)
    a, inp, attn, out_dir = p.analysis, p.inp, p.attn, p.out_dir
    with _as_refusal(f"a plan for {type(a.traced.model).__name__}"):
        draft = draft_plan(a, tp=tp, sequence_parallel=sequence_parallel, max_params_per_rank=max_params_per_rank)
    spec_name = _spec_name(name or f"{inp.name_hint}-derived")
    command = command or f"tpplan derive {source}" + (" --sequence-parallel" if sequence_parallel else "") + (
        f" --max-params-per-rank {max_params_per_rank}" if max_params_per_rank else "")
    text = render(a, draft, inp, name=spec_name, command=command, attn=attn, proof=None)
    spec = load_spec_text(text, name=f"{spec_name}.yaml", directory=out_dir or ".")
    try:  # the full-size model must take the plan at the chosen tp
        resolve(spec, a.full_model, tp=draft.tp, seq_length=spec.train.seq_length)
    except TpplanError as exc:
        raise DeriveRefused(f"the derived plan does not fit {type(a.traced.model).__name__} at tp={draft.tp}:\n{exc}",
                            hint="try another --tp") from None
    derived = Derived(text, spec_name, source, type(a.traced.model).__name__, draft.tp, sequence_parallel,
                      draft.loss_parallel, draft, _group_summary(a, draft), analysis=a)
    if check:
        import inspect

        from .check import run_check

        extra = {"launcher": launcher} if launcher and "launcher" in inspect.signature(run_check).parameters else {}
        report = run_check(spec, tp=check_tp, dp=check_dp, timeout=timeout, **extra)
        retries = 0
        while not report.ok and retries < MAX_WEAKENINGS:
            # check names the module at fault: take its group one form weaker, write and check again
            step = _weaken(a, report, tp=draft.tp)
            if step is None:
                break
            retries += 1
            draft = draft_plan(a, tp=tp, sequence_parallel=sequence_parallel,
                               max_params_per_rank=max_params_per_rank)
            draft.notes.append(step)
            text = render(a, draft, inp, name=spec_name, command=command, attn=attn, proof=None)
            spec = load_spec_text(text, name=f"{spec_name}.yaml", directory=out_dir or ".")
            derived = Derived(text, spec_name, source, type(a.traced.model).__name__, draft.tp, sequence_parallel,
                              draft.loss_parallel, draft, _group_summary(a, draft), analysis=a)
            report = run_check(spec, tp=check_tp, dp=check_dp, timeout=timeout, **extra)
        derived.report = report
        if not report.ok:
            failure = report.failure or {}
            raise DeriveFailed(
                f"the plan derived for {derived.model_class} is not proven by check at tp={check_tp}: "
                + (failure.get("message") or _worst(report)),
                hint=failure.get("hint") or "derive could not find a plan it can prove; nothing was written")
        proof = (f"Proven by `tpplan check` at tp={check_tp}" + (f" x dp={check_dp}" if check_dp > 1 else "")
                 + f" on CPU gloo ranks: logits {report.max_abs_logit_diff:.2g}, gradients "
                   f"{report.max_abs_grad_diff:.2g}, weights after a step {report.max_abs_param_diff_after_step:.2g} "
                   "from the unsharded model.")
        derived.text = render(a, draft, inp, name=spec_name, command=command, attn=attn, proof=proof)
    derived.seconds = round(time.time() - started, 2)
    return derived


MAX_WEAKENINGS = 2  # a plan check disproves is written again with the group at fault one form weaker, this often


def _weaken(a: Analysis, report, *, tp: int) -> str | None:
    """Take the group that check's failure names (its module, or the parameter whose gradient is worst)
    one form weaker: sharded/packed -> gathered -> replicated.  Returns what was done, or None."""
    failure = report.failure or {}
    if failure.get("reason") == "nothing_sharded":
        return None  # equal, but nothing inside the blocks is sharded: weakening a group cannot help
    culprit = failure.get("wrong_layout_module") or failure.get("failing_module") or report.worst_grad or ""
    prefix = (a.skeleton.blocks_list or "") + "."
    if not culprit.startswith(prefix):
        return None
    rel = culprit[len(prefix):].partition(".")[2]  # past the layer index
    if not rel:
        return None
    for key, (group, _) in _merged_groups(a).items():
        names = [group.rowwise, *group.colwise, *group.grad_sum, *group.shared_keys, *group.key_modules]
        child = _child_of(group.rowwise)
        if not any(rel == n or rel.startswith(n + ".") or n.startswith(rel + ".") for n in names) and rel != child:
            continue
        current = (a.forced(key) or (group.variant, ""))[0]
        weaker = {"sharded": "gathered", "packed": "gathered", "gathered": "replicated"}.get(current)
        if weaker is None or group.experts and weaker == "gathered":
            weaker = "replicated"
        if current == "replicated":
            return None
        message = _first_line(failure.get("message") or _worst(report))[:200]
        a.weakened[key] = (weaker, f"check at tp={report.tp} disproved it {current}: {message}")
        return f"{a.skeleton.pattern}.{group.rowwise}: {current} -> {weaker} (check at tp={report.tp}: {message})"
    return None


def _worst(report) -> str:
    return (f"logits {report.max_abs_logit_diff}, loss {report.loss_sharded} vs {report.loss_unsharded}, "
            f"gradients {report.max_abs_grad_diff} ({report.worst_grad})")


def _no_linear_hint(a: Analysis) -> str:
    kinds = sorted({t for n, t in a.traced.graph.leaf_modules.items()
                    if a.skeleton.blocks and n.startswith(a.skeleton.blocks[0].name + ".")})
    return f"the first block's modules with weights are {', '.join(kinds) or 'none'}"


def _group_summary(a: Analysis, draft: PlanDraft | None = None) -> list[dict]:
    out = []
    for key, (g, blocks) in _merged_groups(a).items():
        form, why = (draft.forms.get(key) if draft is not None else None) or (g.variant, g.why)
        out.append({"rowwise": g.rowwise, "colwise": list(g.colwise), "form": form, "why": why,
                    "experts": g.experts, "meet": list(g.meet), "packed": dict(g.packed),
                    "grad_sum": dict(g.grad_sum) if form in ("sharded", "packed") else {},
                    "shared_keys": dict(g.shared_keys) if form in ("sharded", "packed") else {},
                    "fixups": [list(f) for f in g.fixups] if form in ("sharded", "packed") else [],
                    "blocks": len(blocks)})
    return out


def report(derived: Derived, stream=None) -> None:
    """What derive found and what stays whole, on stderr."""
    import sys

    stream = stream or sys.stderr
    for group in derived.groups:
        line = f"{', '.join(group['colwise'])} -> {group['rowwise']}: {group['form']}"
        if group["why"]:
            line += f" ({group['why']})"
        print(f"group: {line}", file=stream)
    for note in derived.notes:
        print(f"note: {note}", file=stream)
    r = derived.report
    if r is not None:
        print(f"check OK at tp={r.tp}" + (f" x dp={r.dp}" if r.dp > 1 else "") + f": logits {r.max_abs_logit_diff:.2g}, "
              f"gradients {r.max_abs_grad_diff:.2g}, weights after a step {r.max_abs_param_diff_after_step:.2g} "
              f"({r.seconds:.0f} s)", file=stream)


# ----------------------------------------------------------------------------------------------
# Bytes per step against the hand-written plans (the simulator)
# ----------------------------------------------------------------------------------------------


def bytes_per_step(spec, *, tp: int, seq_length: int = 1024, batch_size: int = 1, dtype: str | None = "bfloat16") -> int:
    """Ring bytes one tp rank sends in a training step of ``spec`` at full size (dp=1: tp traffic only),
    in ``dtype`` (plans compare at one dtype; None: the spec's own)."""
    return step_costs(spec, tp=tp, seq_length=seq_length, batch_size=batch_size, dtype=dtype)["bytes"]


def step_costs(spec, *, tp: int, seq_length: int = 1024, batch_size: int = 1,
               dtype: str | None = "bfloat16") -> dict[str, int]:
    """Bytes one tp rank sends per step and the parameters it holds (no FSDP), at full size (simulator)."""
    from .simulate import simulate

    if dtype is not None and spec.model.dtype != dtype:
        source = spec.source
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": dtype})})
        spec._source = source
    sim = simulate(spec, tp=tp, dp=1, seq_length=seq_length, batch_size=batch_size)
    return {"bytes": int(sim.data["communication"]["total"]["ring_bytes"]),
            "params_per_rank": int(sim.data["memory"]["parameters"]["per_rank_without_fsdp"])}


def compare_bytes(derived_text: str, others: dict[str, Any], *, tp: int, seq_length: int = 1024,
                  batch_size: int = 1) -> dict[str, Any]:
    """Bytes per step of the derived spec and of each other spec (name -> Spec) at the same tp; a spec
    that does not resolve at that tp gets its error instead of a number."""
    from .loader import load_spec_text

    mine = step_costs(load_spec_text(derived_text, name="derived.yaml"), tp=tp, seq_length=seq_length,
                      batch_size=batch_size)
    out: dict[str, Any] = {"tp": tp, "seq_length": seq_length, "batch_size": batch_size, "derived": mine["bytes"],
                           "derived_params_per_rank": mine["params_per_rank"]}
    for name, spec in others.items():
        try:
            costs = step_costs(spec, tp=tp, seq_length=seq_length, batch_size=batch_size)
        except TpplanError as exc:
            out[name] = {"error": _first_line(str(exc))}
            continue
        value = costs["bytes"]
        out[name] = {"bytes": value, "ratio": round(mine["bytes"] / value, 4) if value else None,
                     "params_per_rank": costs["params_per_rank"],
                     "params_ratio": round(mine["params_per_rank"] / costs["params_per_rank"], 4)
                     if costs["params_per_rank"] else None}
    return out


# ----------------------------------------------------------------------------------------------
# One row of the zoo matrix
# ----------------------------------------------------------------------------------------------


def derive_for_zoo(
    model_type: str,
    *,
    check_tp: int = 2,
    sequence_parallel: bool = True,
    launcher: str = "fork",
    bytes_tp: int | None = None,
    seq_length: int = 1024,
    batch_size: int = 1,
    compare_transformers: bool = True,
    check_timeout: float = 300,
    tp: int | None = None,
    max_params_per_rank: int | None = None,
) -> dict[str, Any]:
    """derive + check for one model_type, as the zoo matrix's derive column needs it; never raises.

    Tries the sequence-parallel plan first (``sequence_parallel``), the plain plan when that one
    cannot be derived or proven.  ``status``: ``proven`` (check passed at ``check_tp``), ``refused``
    (no plan derived: ``reason`` says why, before any rank started) or ``failed`` (derived, not
    proven: check's message).  ``bytes``: ring bytes per step per rank at full size (simulator, dp=1)
    of the derived plan and of transformers' own plan (``tpplan import-hf``) at the same tp, and
    their ratio (derived / transformers); None where a plan does not resolve or the model has none.
    ``tp``, ``max_params_per_rank``: as ``derive`` takes them."""
    started = time.time()
    row: dict[str, Any] = {"model_type": model_type, "status": None, "reason": "", "summary": "", "sequence_parallel": False,
                           "tp": None, "forms": {}, "fixups": 0, "grad_sum": 0, "left_whole": [], "check": None,
                           "bytes": None, "sp_refused": None}
    derived = None
    source = _completed_source(model_type, row)
    try:
        prepared = prepare(source)
    except TpplanError as exc:
        row.update(status="refused", reason=_first_line(str(exc)))
        prepared = None
    except Exception as exc:  # noqa: BLE001 - a row of the matrix, never a crash of the sweep
        row.update(status="failed", reason=f"derive crashed: {_one_line(exc)}")
        prepared = None
    attempts = ([True, False] if sequence_parallel else [False]) if prepared is not None else []
    for sp in attempts:
        prepared.analysis.weakened.clear()  # what check disproved in the sequence-parallel plan may hold in the plain one
        try:
            derived = derive(source, tp=tp, sequence_parallel=sp, check_tp=check_tp, launcher=launcher,
                             timeout=check_timeout, prepared=prepared, max_params_per_rank=max_params_per_rank)
        except DeriveFailed as exc:
            row.update(status="failed", reason=_first_line(str(exc)))
        except TpplanError as exc:
            row.update(status="refused", reason=_first_line(str(exc)))
        except Exception as exc:  # noqa: BLE001
            row.update(status="failed", reason=f"derive crashed: {_one_line(exc)}")
        if derived is not None:
            break
        if sp and len(attempts) > 1:
            row["sp_refused"] = row["reason"]
    if derived is None:
        row["summary"] = f"{row['status']}: {row['reason']}"
        row["seconds"] = round(time.time() - started, 1)
        return row
    forms: dict[str, int] = {}
    for group in derived.groups:
        forms[group["form"]] = forms.get(group["form"], 0) + 1
    r = derived.report
    from .check import parallel_status, sharded_fractions

    row.update(status=parallel_status(r), replicated=list(r.replicated), sharded=sharded_fractions(r.sharded))
    row.update(reason="", sequence_parallel=derived.sequence_parallel, tp=derived.tp, forms=forms,
               fixups=len(derived.draft.fixups), grad_sum=sum(len(g["grad_sum"]) for g in derived.groups),
               left_whole=list(derived.notes), loss_parallel=derived.loss_parallel,
               check={"tp": r.tp, "max_abs_logit_diff": r.max_abs_logit_diff,
                      "max_abs_grad_diff": r.max_abs_grad_diff,
                      "max_abs_param_diff_after_step": r.max_abs_param_diff_after_step, "seconds": r.seconds})
    if max_params_per_rank is not None:
        row.update(max_params_per_rank=max_params_per_rank, params_per_rank=derived.draft.params_per_rank,
                   kept_whole=list(dict.fromkeys(rowwise for rowwise, _ in derived.analysis.kept)))
    row["spec"] = derived.text
    try:
        row["bytes"] = _bytes_against_transformers(derived, source, bytes_tp, seq_length, batch_size,
                                                   compare_transformers)
    except Exception as exc:  # noqa: BLE001 - the simulator failing is a note in the row, not a crash
        row["bytes"] = {"error": _one_line(exc)}
    row["summary"] = _zoo_summary(row)
    row["seconds"] = round(time.time() - started, 1)
    return row


def _completed_source(model_type: str, row: dict) -> str:
    """``model_type``, or a config.json of transformers' default completed the way ``tpplan zoo`` completes it
    where the default leaves a size its own model needs None (HunYuan's head_dim, DeepSeek-V2's expert counts)."""
    import json
    import tempfile
    from pathlib import Path

    try:
        from .zoo import _completed_default

        completed = _completed_default(model_type)
    except Exception:  # noqa: BLE001 - no completion: derive reads the default and says what it cannot do
        return model_type
    if not completed:
        return model_type
    row["config_completed"] = completed
    path = Path(tempfile.mkdtemp(prefix="tpplan-derive-config-")) / f"{model_type}.json"
    path.write_text(json.dumps({"model_type": model_type, **completed}))
    return str(path)


def _zoo_summary(row: dict) -> str:
    """One cell: ``proven, SP, tp=8: 2 sharded; 0.53x transformers' bytes``."""
    forms = ", ".join(f"{n} {form}" for form, n in row["forms"].items()) or "embedding/head only"
    whole = f" ({', '.join(row['replicated'])} whole)" if row.get("replicated") else ""
    text = f"{row['status']}{whole}, {'SP' if row['sequence_parallel'] else 'plain'}, tp={row['tp']}: {forms}"
    if row["fixups"]:
        text += f", {row['fixups']} fix-up{'s' if row['fixups'] > 1 else ''}"
    costs = row.get("bytes") or {}
    if costs.get("ratio") is not None:
        text += f"; {costs['ratio']:.2f}x transformers' bytes"
        if costs.get("params_ratio") is not None and costs["params_ratio"] < 0.99:
            text += f", {costs['params_ratio']:.2f}x its parameters per rank"
    return text


def _bytes_against_transformers(derived: Derived, model_type: str, bytes_tp: int | None, seq_length: int,
                                batch_size: int, compare: bool) -> dict[str, Any]:
    from .loader import load_spec_text

    tp = bytes_tp or derived.tp
    others: dict[str, Any] = {}
    note = ""
    if compare:
        from .import_hf import import_hf

        try:
            imported = import_hf(model_type)
            others["transformers"] = load_spec_text(imported.text, name="transformers.yaml")
            if bytes_tp is None and imported.tp < tp:
                tp = imported.tp  # the largest tp both plans take
        except TpplanError as exc:
            note = _first_line(str(exc))
    result = compare_bytes(derived.text, others, tp=tp, seq_length=seq_length, batch_size=batch_size)
    hf = result.get("transformers")
    got = hf if isinstance(hf, dict) else {}
    return {"tp": tp, "seq_length": seq_length, "batch_size": batch_size, "derived": result["derived"],
            "transformers": got.get("bytes"), "ratio": got.get("ratio"),
            "derived_params_per_rank": result["derived_params_per_rank"],
            "transformers_params_per_rank": got.get("params_per_rank"), "params_ratio": got.get("params_ratio"),
            "note": note or got.get("error", "")}
