"""Groups: in every block, the Linear layers whose outputs meet (in attention, in an elementwise product) and
feed one single Linear whose output returns to the stream -- a colwise group and its rowwise partner -- and
what joins their sharded region from outside (per-head parameters, a shared rotary key, parameters read
directly).  What the dataflow shows; the form each group takes is decided by the emulation (``forms``)."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field

from tpplan.plan.module_kinds import module_kind
from tpplan.spec.tpplan_rules import MLAKVAProjRule
from tpplan.spec.write import make_rule

from .common import module_names
from .skeleton import Block, Skeleton, stream_values
from .twin import Traced


class Form(enum.IntEnum):
    """How a group is split over tp; a larger value is a weaker form (less cut, more whole)."""

    SHARDED = 0  # Megatron: the colwise members cut by heads or features, the rowwise partner sums (an expert
    #              bank: every expert's intermediate dim cut, expert tensor parallel)
    PACKED = 1  # a fused projection's equal parts cut one by one (packed_colwise), then as SHARDED
    GATHERED = 2  # the weights split, the colwise output gathered: exact whatever the forward does with it
    REPLICATED = 3  # whole on every rank

    @property
    def label(self) -> str:
        """The form as specs, notes and JSON name it: ``sharded``."""
        return self.name.lower()

    @property
    def cuts_activations(self) -> bool:
        """Whether each rank holds only its heads or features between the colwise members and the rowwise
        partner: what per-head parameters, gradient sums, shared keys and head-count fix-ups go with."""
        return self <= Form.PACKED


@dataclass(frozen=True)
class GroupForm:
    """The form the emulation proved for a group in one block, and what comes with it."""

    form: Form
    why: str = ""  # why not a stronger form
    fixups: tuple[tuple[str, str], ...] = ()  # (module, attribute) the forward reads, divided by tp
    grad_sum: dict[str, int] = field(default_factory=dict)  # a module with weights on the cut activations -> cut dim


@dataclass
class FoundGroup:
    """One colwise group and its rowwise partner in one block, as the dataflow shows it (names relative to
    the block).  What was found, never what was decided: the emulation's decision is its ``GroupForm``."""

    rowwise: str
    colwise: list[str]
    meet: list[str]  # the ops where the colwise outputs meet, e.g. ["scaled_dot_product_attention"]
    cone_nodes: set[int] = field(default_factory=set)
    cone_values: set[int] = field(default_factory=set)
    problems: list[str] = field(default_factory=list)  # why the sharded form is impossible, from the dataflow
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
    packed: dict[str, str] = field(default_factory=dict)  # colwise member -> the op that splits its output
    parts: dict[str, int | None] = field(default_factory=dict)  # ... and into how many equal parts
    experts: bool = False  # a MoE expert bank (``rowwise`` names it): its own module is both halves

    @property
    def key(self) -> tuple:
        return (self.rowwise, tuple(self.colwise))


@dataclass
class Cone:
    """Where a Linear's output flows inside its block, up to the next Linear layers."""

    reached: set[str]  # Linear modules whose input it reaches
    escapes: bool  # reaches the block's output (the residual stream) or anything after the block
    nodes: set[int]  # nodes it passes through (not the reached Linear layers)
    values: set[int]  # values it passes through


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


def _linear_names(model) -> set[str]:
    """The model's nn.Linear layers and transformers' Conv1D (GPT-2's: a Linear with its weight [in, out])."""
    return {n for n, m in model.named_modules() if module_kind(m) in ("linear", "conv1d")}


def find_groups(traced: Traced, skeleton: Skeleton) -> dict[str, list[FoundGroup]]:
    """Per block (absolute name): the colwise -> rowwise groups its dataflow shows."""
    graph = traced.graph
    linears = _linear_names(traced.model)
    modules = module_names(traced.model)
    out: dict[str, list[FoundGroup]] = {}
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
            group = FoundGroup(target[len(prefix):], [c[len(prefix):] for c in colwise], [], nodes_in, values_in)
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
                groups.append(FoundGroup(name[len(prefix):], [], [], experts=True))
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


def _side_inputs(graph, group: FoundGroup, prefix: str) -> None:
    """What joins the sharded region from outside: a tensor needing a gradient, a parameter read directly
    (a module with parameters on the way has its gradient summed over tp: the emulation measures its cut dim)."""
    for n in sorted(group.cone_nodes):
        node = graph.nodes[n]
        if node.kind != "module":
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


def _check_shared_keys(model, group: FoundGroup, prefix: str) -> None:
    """Keep a shared key only where ``mla_kv_a_proj`` will find the same width on the model
    (``qk_rope_head_dim`` on its attention module or the config); else the group cannot be sharded."""
    for rel, width in list(group.shared_keys.items()):
        name = prefix + rel  # what the style reads off the model where a plan is resolved
        found = make_rule(MLAKVAProjRule, name).bind(name, None, model).rope_dim
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


def view_heads(traced: Traced, block: str, rel: str, group: FoundGroup) -> int | None:
    """How many heads ``rel``'s output is viewed as in the twin ([..., heads, head_dim]); None if it is not.
    A view into more dims ([..., kv_heads, group, head_dim]: torchtitan's fused wqkv) gives its outermost
    count, the unit a contiguous split must keep whole."""
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
                for k in range(2, len(shape)):  # the fewest trailing dims that hold the whole width
                    if width and shape[-1] != width and math.prod(shape[-k:]) == width:
                        return shape[-k]
            if op in ("contiguous", "to", "float", "type_as") or op.startswith("__getitem__"):
                queue.extend(node.outputs)
    return None
