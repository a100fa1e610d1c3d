"""``tpplan import-hf --sequence-parallel``: an imported plan upgraded to sequence parallel.

The upgrade turns the plan into the llama3.yaml form: the residual stream between
blocks is a shard(1) DTensor, norms are sequence_parallel, each block child with sharded linears
gathers the sequence once (prepare_input) and its rowwise projection reduce-scatters back to
shard(1), the embedding hands on shard(1), lm_head keeps vocab-sharded logits and the loss runs
on them (loss_parallel).  Which argument carries the stream into each block child (positional or
``hidden_states=``) is measured on the twin too.

The rules are :mod:`tpplan.plan.sequence_parallel`'s (one upgrade for import-hf and derive); this
module places them on the model's embedding, block children, final norm and head, and refuses
(``_NoSequenceParallel``) a structure it does not know.
"""

from __future__ import annotations

from tpplan.core.errors import TpplanError
from tpplan.hf.probe import Model, Probe, is_norm, matching
from tpplan.hf.translate import Rule
from tpplan.plan import sequence_parallel as sp_rules
from tpplan.plan.module_kinds import module_kind
from tpplan.spec.torch_rules import ColwiseRule, RowwiseRule
from tpplan.spec.tpplan_rules import LocalParamsRule


def _under(pattern: str, prefix: str) -> bool:
    return pattern.startswith(prefix + ".")


class _NoSequenceParallel(TpplanError):
    def __init__(self, reason: str):
        super().__init__(
            f"cannot upgrade this plan to sequence parallel: {reason}",
            hint="import without --sequence-parallel (the plain plan keeps activations replicated between blocks)",
        )


def sequence_parallel(desc: Model, rules: list[Rule], probe: Probe) -> tuple[list[Rule], list[str]]:
    """The llama3.yaml upgrade of a plain plan (``tpplan.plan.sequence_parallel``'s rules, the stream's way
    into each block child measured on the twin); raises _NoSequenceParallel when the structure is unknown."""
    if probe.error:
        raise _NoSequenceParallel(f"the tiny twin of the model did not run ({probe.error})")
    if not (desc.embed and desc.logits and desc.blocks):
        raise _NoSequenceParallel("no input embedding, output embedding or decoder-block list found")
    if module_kind(desc.modules[desc.embed]) != "embedding" or module_kind(desc.modules[desc.logits]) != "linear":
        raise _NoSequenceParallel(f"{desc.embed} is not an nn.Embedding or {desc.logits} not an nn.Linear")
    by_pattern = {r.pattern: r for r in rules}
    out = [_sp_embedding(desc, by_pattern.get(desc.embed))]
    children, notes = _sp_children(desc, rules, probe)
    out += children
    norm = _final_norm(desc)
    out.append(Rule(sp_rules.stream_norm(norm), "SP: final norm on the local sequence shard"))
    head = by_pattern.get(desc.logits)
    out.append(Rule(sp_rules.vocab_head(desc.logits, sequence_parallel=True),
                    (f"{head.comment}; " if head else "") + "SP: logits stay vocab-sharded (loss_parallel)"))
    used = {r.pattern for r in out}
    block_prefix = desc.blocks[:-2]  # model.layers
    for r in rules:  # every imported rule must have found its place
        if r.pattern not in used and r.pattern not in (desc.embed, desc.logits, norm):
            where = "inside a decoder block, under no block child" if _under(r.pattern, block_prefix) else \
                "outside the decoder blocks"
            raise _NoSequenceParallel(f"{r.pattern} ({r.comment}) sits {where}")
    return out, notes


def _sp_embedding(desc: Model, embed: Rule | None) -> Rule:
    """The embedding: a vocab- (or hidden-) sharded lookup hands on shard(1); a whole one is cut to it."""
    if embed is not None and isinstance(embed.rule, (ColwiseRule, RowwiseRule)):
        said = "output shard(1)" if isinstance(embed.rule, ColwiseRule) else "reduce-scatter to shard(1)"
        return Rule(sp_rules.scatter_output(embed.rule, desc.embed), f"{embed.comment}; SP: {said}")
    return Rule(sp_rules.scatter_output(None, desc.embed), "SP: not sharded by transformers; output sliced to sequence "
                "shards")


def _sp_children(desc: Model, rules: list[Rule], probe: Probe) -> tuple[list[Rule], list[str]]:
    """The blocks: every kind of block child, across all layers (hybrid models mix layer kinds), in call order."""
    block_prefix = desc.blocks[:-2]  # model.layers
    block_rules = [r for r in rules if _under(r.pattern, block_prefix)]
    depth = block_prefix.count(".") + 2
    children: dict[str, str] = {}  # pattern -> first module of the full model it matches
    for name in desc.modules:
        if _under(name, block_prefix) and name.count(".") == depth:
            children.setdefault(f"{desc.blocks}.{name.split('.')[-1]}", name)
    out: list[Rule] = []
    notes: list[str] = []
    for pattern, child in sorted(children.items(), key=lambda item: probe.order(item[0])):
        inner = [r for r in block_rules if r.pattern == pattern or _under(r.pattern, pattern)]
        if not any(True for _ in desc.modules[child].parameters()) and not inner:
            continue
        rules_out, note = _sp_child(desc, pattern, child, inner, probe)
        out += rules_out
        if note:
            notes.append(note)
    return out, notes


def _sp_child(desc: Model, pattern: str, child: str, inner: list[Rule], probe: Probe) -> tuple[list[Rule], str]:
    """One block child: a norm on the stream runs on the local shard; a child whose sharded linears all read
    the stream gathers it once; any other runs whole.  Its inner rules, and a note when it runs whole."""
    module = desc.modules[child]
    seen = probe.first(pattern)
    if seen is None:
        raise _NoSequenceParallel(f"{pattern} ({type(module).__name__}) is not called by the 2-layer tiny twin, "
                                  "so how the residual stream enters it cannot be measured")
    call = probe.calls[seen]
    kinds = sorted({type(m).__name__ for m in (desc.modules[n] for n in matching(pattern, desc.modules))})
    if len(kinds) > 1:
        raise _NoSequenceParallel(
            f"{pattern} is {' in some blocks and '.join(kinds)} in others (mixed blocks, e.g. dense and MoE): "
            "one rule cannot gather the sequence for both")
    if is_norm(module) and all(r.pattern == pattern for r in inner):
        if probe.stream_input(seen) != ("arg", 0) or call["output"] != probe.stream:
            raise _NoSequenceParallel(f"{pattern} ({type(module).__name__}) is a norm that does not take the "
                                      "residual stream as its first argument")
        return [Rule(sp_rules.stream_norm(pattern), "SP: norm on the local sequence shard")], ""
    how = probe.stream_input(seen)
    if how is None or call["output"] != probe.stream:
        raise _NoSequenceParallel(f"{pattern} ({type(module).__name__}) does not map the residual stream "
                                  f"[batch, seq, hidden] to itself (its inputs {call['args']} "
                                  f"{call['kwargs']}, output {call['output']})")
    if how[0] == "arg" and how[1] != 0:
        raise _NoSequenceParallel(f"{pattern} takes the residual stream as positional argument {how[1]}")
    enters = ("arg", 0, 1) if how[0] == "arg" else how  # the stream alone, as the first positional argument
    sharded = [r for r in inner if isinstance(r.rule, (ColwiseRule, RowwiseRule))]
    rowwise = [r for r in inner if isinstance(r.rule, RowwiseRule)]
    covered = _all_params_covered(desc, child, pattern, inner)
    if sharded and covered and len(rowwise) == 1:
        own = next((r for r in inner if r.pattern == pattern and isinstance(r.rule, LocalParamsRule)), None)
        said = "SP: one all-gather of the sequence feeds the sharded linears"
        out = [Rule(sp_rules.gather_input(pattern, enters, sharded=own.rule.sharded if own else None),
                    f"{own.comment}; {said}" if own else said)]  # attention sinks: one rule does both
        for r in inner:
            if r is rowwise[0]:
                out.append(Rule(sp_rules.scatter_output(r.rule, r.pattern), f"{r.comment}; SP: reduce-scatter to shard(1)"))
            elif r is not own:
                out.append(r)
        return out, ""
    why = ("no sharded linear inside" if not sharded else
           "it holds parameters no imported rule shards" if not covered else
           f"{len(rowwise)} rowwise linears inside")
    layouts = sp_rules.input_layouts(enters, sp_rules.SHARDS, sp_rules.WHOLE)
    whole = Rule(sp_rules.run_whole(pattern, layouts, call.get("n_outputs", 1)), f"SP: runs whole on every tp rank ({why})")
    return [whole, *inner], f"{pattern} runs on the full sequence on every tp rank ({why})"


def _final_norm(desc: Model) -> str:
    """The one final norm beside the embedding and the blocks (under the base model)."""
    block_prefix = desc.blocks[:-2]
    base = block_prefix.rpartition(".")[0]  # model
    top = [n for n in desc.modules if n.startswith(base + ".") and n.count(".") == base.count(".") + 1] if base else []
    norms = [n for n in top if is_norm(desc.modules[n])]
    others = [n for n in top if n not in norms and n != desc.embed and n != block_prefix
              and any(True for _ in desc.modules[n].parameters())]
    if len(norms) != 1 or others:
        raise _NoSequenceParallel(
            f"expected one final norm beside {desc.embed} and {block_prefix} under {base or 'the model'}; found norms "
            f"{norms or 'none'} and other modules with parameters {others or 'none'}")
    return norms[0]


def _all_params_covered(desc: Model, child: str, pattern: str, inner: list[Rule]) -> bool:
    """Every parameter-holding module under ``child`` has an imported rule, or is a norm fed by one."""
    for name, module in desc.modules.items():
        if not (name == child or name.startswith(child + ".")):
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        rel = f"{pattern}{name[len(child):]}"
        if any(matching(r.pattern, [rel]) for r in inner):
            continue
        if is_norm(module) and name != child:
            continue
        return False
    return True
