"""The skeleton: input embedding -> decoder blocks -> final norm -> output head, and the residual stream
threading through the blocks, read off the twin's dataflow."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpplan.model.twin_run import TRACE_BATCH, TRACE_SEQ

from .common import module_names
from .twin import Traced


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
    before: list[str]  # leaf parameter modules on the way from the embedding to the first block
    after: list[str]  # ... from the last block to the head (the final norm)

    @property
    def pattern(self) -> str | None:
        return f"{self.blocks_list}.*" if self.blocks_list else None


def _name_of(modules: dict[str, Any], module) -> str | None:
    if module is None:
        return None
    return next((n for n, m in modules.items() if m is module), None)


def find_skeleton(traced: Traced) -> Skeleton:
    import torch.nn as nn

    model, graph = traced.model, traced.graph
    modules = module_names(model)
    embed = _name_of(modules, model.get_input_embeddings()) if hasattr(model, "get_input_embeddings") else None
    head = _name_of(modules, model.get_output_embeddings()) if hasattr(model, "get_output_embeddings") else None
    if embed is None and head is None:  # a model of one's own: the first embedding called, the last Linear to the vocab
        called = list(dict.fromkeys(c.module for c in graph.calls if c.module in modules))
        embed = next((n for n in called if isinstance(modules[n], nn.Embedding)), None)
        vocab = modules[embed].num_embeddings if embed else None
        head = next((n for n in reversed(called) if isinstance(modules[n], nn.Linear)
                     and modules[n].out_features == vocab), None)
    tied = bool(embed and head and getattr(modules[head], "weight", None) is getattr(modules[embed], "weight", 1))
    # the decoder blocks: the container (ModuleList, ModuleDict, Sequential) whose members are each called
    # once, in order, the stream threading through
    best: tuple[str, list[Block]] | None = None
    for name, children in _block_containers(modules, traced.blocks):
        blocks = []
        for child in children:
            calls = graph.calls_of(child)
            if len(calls) != 1:
                break
            call = calls[0]
            tensors = [v for _, v in call.args if v is not None]
            outs = [v for v in call.outputs if v is not None]
            if not tensors or not outs:
                break
            blocks.append(Block(child, call, tensors[0], outs[0]))
        if len(blocks) != len(children):
            continue
        blocks.sort(key=lambda b: b.call.first_node)  # in the order the forward calls them
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
        return Skeleton(embed, head, tied, None, [], [], [])
    name, blocks = best
    before = _leaves_between(graph, None, blocks[0].call.first_node)
    after = _leaves_between(graph, blocks[-1].call.last_node, None)
    return Skeleton(embed, head, tied, name, blocks, before, after)


def _block_containers(modules: dict[str, Any], given: tuple[str, ...] | None) -> list[tuple[str, list[str]]]:
    """(container, its children's names) for every ModuleList, ModuleDict and Sequential: where the blocks
    may be.  ``given`` (a spec's ``model.blocks`` patterns): only containers whose children they match."""
    import torch.nn as nn

    from tpplan.core.patterns import matches

    found = []
    for name, module in modules.items():
        if isinstance(module, (nn.ModuleList, nn.ModuleDict, nn.Sequential)) and len(module):
            children = [f"{name}.{key}" for key, _ in module.named_children()]
            if not given or all(any(matches(p, c) for p in given) for c in children):
                found.append((name, children))
    return found


def _leaves_between(graph, start: int | None, stop: int | None) -> list[str]:
    names = []
    for node in graph.nodes[(start or -1) + 1: stop]:
        if node.kind == "module" and node.name not in names:
            names.append(node.name)
    return names


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


def is_stream_shaped(traced: Traced, value: int | None) -> bool:
    """Whether value ``value`` of the trace is [batch, seq, hidden]: the residual stream's shape."""
    if value is None:
        return False
    shape = traced.graph.values[value].shape
    return len(shape) == 3 and shape[:2] == (TRACE_BATCH, TRACE_SEQ) and shape[2] == _hidden_size(traced)


def _hidden_size(traced: Traced) -> int | None:
    """The twin's residual width: its config's hidden_size, else its input embedding's width."""
    import torch.nn as nn

    size = getattr(traced.twin_config, "hidden_size", None)
    if isinstance(size, int):
        return size
    embedding = next((m for m in traced.model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.embedding_dim if embedding is not None else None


def entry_problem(traced: Traced, sk: Skeleton) -> str | None:
    """None when every op from the embedding to the first block combines only what comes from the
    embedding, from other embeddings (cut to sequence shards by a rule) and scalars; else what does not."""
    import torch.nn as nn

    graph = traced.graph
    twin_modules = module_names(traced.model)
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
