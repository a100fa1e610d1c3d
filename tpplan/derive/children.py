"""Block children: how the stream enters each child of a block that holds groups (one prepared input shared
by its sharded linears), in every block alike, or why not; and the rule running a module whole."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tpplan.plan import sequence_parallel
from tpplan.plan.sequence_parallel import SHARDS, WHOLE
from tpplan.spec.rule_base import RuleBase

from .groups import Form
from .skeleton import is_stream_shaped

if TYPE_CHECKING:
    from .analysis import Analysis


def child_of(rel: str) -> str | None:
    head, dot, _ = rel.partition(".")
    return head if dot else None


def call_arg(call, value: int):
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
    return call_arg(call, value)


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


def child_status(a: Analysis, forms: dict[tuple, tuple]) -> dict[str, Any]:
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
        # in call order (a set of names would come out in another order in every interpreter)
        children = list(dict.fromkeys(c.module[len(prefix):] for c in graph.calls
                                      if c.module.startswith(prefix) and c.module.count(".") == depth))
        for child in children:
            mine = [g for g in groups if not g.experts and forms.get(g.key, (Form.REPLICATED,))[0] is not Form.REPLICATED
                    and child_of(g.rowwise) == child and all(child_of(c) == child for c in g.colwise)]
            holds_rules = any(child_of(g.rowwise) == child for g in groups) or child in status
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


def run_whole(a: Analysis, child: str, call, note: str) -> RuleBase | None:
    """The rule running a module whole on every tp rank under sequence parallelism: every stream-shaped
    input of ``call`` (the residual stream and anything of its shape: a residual passed in) gathered;
    None when no input has the stream's shape."""
    traced = a.traced
    positional = [(w, v) for w, v in call.args if isinstance(w, int)]
    keywords = [(w, v) for w, v in call.args if not isinstance(w, int) and is_stream_shaped(traced, v)]
    layouts: dict[str, Any] = {}
    if any(is_stream_shaped(traced, v) for _, v in positional):
        layouts["input_layouts"] = [SHARDS if is_stream_shaped(traced, v) else None for _, v in positional]
        layouts["desired_input_layouts"] = [WHOLE if is_stream_shaped(traced, v) else None for _, v in positional]
    if keywords:
        layouts["input_kwarg_layouts"] = {w: SHARDS for w, _ in keywords}
        layouts["desired_input_kwarg_layouts"] = {w: WHOLE for w, _ in keywords}
    if not layouts:
        return None
    return sequence_parallel.run_whole(child, layouts, len(call.outputs) or 1, note)
