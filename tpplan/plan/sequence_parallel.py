"""Sequence parallelism, written once: what each part of a decoder's skeleton becomes when the residual
stream between blocks is cut on the sequence (a shard(1) DTensor), given how the stream enters it.

``tpplan import-hf --sequence-parallel`` upgrades transformers' plan with these rules and ``tpplan derive
--sequence-parallel`` drafts with them (each finds the skeleton and measures how the stream enters each
module its own way: import-hf from transformers' plan and a probe of the twin, derive from the twin's
dataflow).  The llama3.yaml form:

- the embedding hands on the stream cut to sequence shards: a sharded lookup reduce-scatters
  (``scatter_output``), a whole one is cut (``prepare_output``);
- a norm on the stream runs on the local shard (``sequence_parallel``);
- a block child whose sharded linears read the stream gathers it once (``prepare_input`` shard(1) ->
  replicate: ``gather_input``), and its rowwise projection reduce-scatters back (``scatter_output``);
- any other module the stream enters runs whole on every rank (``run_whole``);
- the head takes the shards and keeps its logits vocab-sharded into the loss (``vocab_head``), or,
  left whole, gathers the sequence (``whole_head``).

``how`` says how the stream enters a module: ``("arg", position, positional count)`` or
``("kwarg", name)``.
"""

from __future__ import annotations

from typing import Any

from tpplan.spec.rule_base import RuleBase
from tpplan.spec.torch_rules import (
    ColwiseRule,
    PrepareInputOutputRule,
    PrepareInputRule,
    PrepareOutputRule,
    SequenceParallelRule,
)
from tpplan.spec.tpplan_rules import LocalParamsRule
from tpplan.spec.write import make_rule

#: the residual stream between blocks, and what a module that needs the whole sequence sees
SHARDS, WHOLE = "shard(1)", "replicate"


def input_layouts(how: tuple, given: str, desired: str) -> dict[str, Any]:
    """PrepareModuleInput arguments moving the input that enters ``how`` from ``given`` to ``desired``."""
    if how[0] == "kwarg":
        return {"input_kwarg_layouts": {how[1]: given}, "desired_input_kwarg_layouts": {how[1]: desired}}
    _, position, count = how
    return {"input_layouts": [given if i == position else None for i in range(count)],
            "desired_input_layouts": [desired if i == position else None for i in range(count)]}


def prepare_input(match: str, layouts: dict[str, Any], note: str | None = None, *,
                  sharded: tuple[str, ...] | None = None) -> RuleBase:
    """A module whose inputs move as ``layouts`` say (``input_layouts``); with ``sharded`` per-head
    parameters (attention sinks), one local_params rule does both."""
    if sharded:
        return make_rule(LocalParamsRule, match, note, sharded=sharded, **layouts)
    return make_rule(PrepareInputRule, match, note, **layouts)


def gather_input(match: str, how: tuple, note: str | None = None, *,
                 sharded: tuple[str, ...] | None = None) -> RuleBase:
    """A block child whose sharded linears read the stream: one all-gather of the sequence feeds them."""
    return prepare_input(match, input_layouts(how, SHARDS, WHOLE), note, sharded=sharded)


def scatter_output(rule: RuleBase | None, match: str, note: str | None = None) -> RuleBase:
    """A module that hands the stream on: ``rule`` (a rowwise projection, a sharded embedding) with its output
    reduce-scattered to sequence shards; without a rule (a whole embedding), its output cut to them."""
    if rule is None:
        return make_rule(PrepareOutputRule, match, note, output_layouts=WHOLE, desired_output_layouts=SHARDS,
                         use_local_output=False)
    return make_rule(type(rule), match, note, **{**rule.style_kwargs(), "output_layouts": SHARDS,
                                                 "use_local_output": False})


def stream_norm(match: str, note: str | None = None) -> RuleBase:
    """A norm on the stream: runs on the local sequence shard."""
    return make_rule(SequenceParallelRule, match, note)


def run_whole(match: str, layouts: dict[str, Any], outputs: int, note: str | None = None) -> RuleBase:
    """A module the stream enters that runs whole on every rank: its stream inputs gathered (``layouts``:
    ``input_layouts(how, SHARDS, WHOLE)`` for each), the first of its ``outputs`` outputs cut back to
    sequence shards."""
    rest = [None] * (outputs - 1)  # one layout per output: attention returns (output, weights)
    return make_rule(PrepareInputOutputRule, match, note, **layouts, use_local_input=True,
                     output_layouts=[WHOLE, *rest], desired_output_layouts=[SHARDS, *rest],
                     use_local_output=False)


def vocab_head(match: str, note: str | None = None, *, sequence_parallel: bool) -> RuleBase:
    """The output head split on the vocabulary, its logits vocab-sharded into the loss (loss parallel); under
    sequence parallelism it takes the stream's shards."""
    stream = {"input_layouts": SHARDS} if sequence_parallel else {}
    return make_rule(ColwiseRule, match, note, **stream, output_layouts="shard(-1)", use_local_output=False)


def whole_head(match: str, note: str | None = None) -> RuleBase:
    """The output head left whole: the sequence gathered in, its logits plain tensors."""
    return make_rule(PrepareInputRule, match, note, input_layouts=[SHARDS], desired_input_layouts=[WHOLE],
                     use_local_output=True)
