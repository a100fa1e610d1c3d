"""transformers' styles -> tpplan rules: the style table, and transformers' plan translated with it.

Each rule of transformers' merged plan is translated into a tpplan rule -- only where the
translation is faithful:

=================================  ===================================================================
transformers style                 tpplan rule
=================================  ===================================================================
moe_tp_experts                     expert_tensor_parallel (MoE experts modules; the packed_colwise and
                                   rowwise rules on their gate_up_proj / down_proj are part of it)
moe_identity_expert                moe_identity_expert (an identity expert's input divided by tp: the
                                   experts' all-reduce sums it over tp; transformers < 5.25)
ep_dispatch_experts (ep plan)      expert_tensor_parallel, or expert_parallel with ``ep=N`` (transformers
                                   >= 5.25 keeps MoE experts in a separate ``base_model_ep_plan``: whole
                                   experts per ep rank, ``grouped_gemm`` on their 3-D weights, tokens
                                   dispatched; without ep the experts are split over tp instead, each
                                   expert's intermediate dim, as ``moe_tp_experts`` did before 5.25)
unit_colwise, unit_rowwise         colwise, rowwise (a head-aligned split; transformers replicates heads
                                   over ranks when tp exceeds them, tpplan's resolve refuses that tp)
mla_kv_a_proj                      mla_kv_a_proj (MLA's kv_a_proj_with_mqa: k_rot's gradient summed
                                   over tp; its width read off the model when the plan is resolved)
colwise                            colwise                                  (nn.Linear only)
rowwise                            rowwise                                  (nn.Linear only)
colwise_rep, colwise_gather_output colwise, output_layouts: replicate       (nn.Linear only)
rowwise_rep, rowwise_split_input   rowwise, input_layouts: replicate        (nn.Linear only)
embedding_rowwise                  rowwise, input_layouts: replicate        (nn.Embedding only)
embedding_colwise                  colwise, output_layouts: replicate       (nn.Embedding only)
sequence_parallel                  sequence_parallel, use_local_output: true
replicate                          replicate
local_params + colwise on its params local_params, sharded: [those parameters] (attention sinks, a per-head
                                   gate bias: split on dim 0 with the heads, used as local tensors)
replicated_with_grad_allreduce     sequence_parallel on the heads dim, use_local_output: true
                                   (a per-head norm after a colwise projection; the heads dim is
                                   measured by running a tiny twin of the model, never guessed)
=================================  ===================================================================

Everything else -- packed (strided) shards of fused weights, MoE expert styles, expert parallel,
rules on a bare parameter rather than a module, transformers 4's local_* / gather / isolated
styles -- has no faithful tpplan equivalent: it is reported (stderr and YAML comments) and the
module stays replicated.

``translate`` applies the table to a model's plan: a ``Rule`` for each style translated (with the
transformers style it came from), a ``Skipped`` for each left out (and why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tpplan.hf.probe import Model, matching
from tpplan.plan.module_kinds import module_kind
from tpplan.spec.rule_base import RuleBase
from tpplan.spec.torch_rules import ColwiseRule, ReplicateRule, RowwiseRule, SequenceParallelRule
from tpplan.spec.tpplan_rules import (
    ExpertTensorParallelRule,
    LocalParamsRule,
    MLAKVAProjRule,
    MoEIdentityExpertRule,
)
from tpplan.spec.write import make_rule, rule_fields

#: transformers style -> (the tpplan rule class and the arguments it is built with, module kinds it applies to);
#: colwise and rowwise take an nn.Linear or a transformers Conv1D (weight [in, out]: resolve binds the
#: rule to its Conv1D style)
LINEARS = ("linear", "conv1d")
FAITHFUL: dict[str, tuple[type[RuleBase], dict[str, Any], tuple[str, ...]]] = {
    "colwise": (ColwiseRule, {}, LINEARS),
    "rowwise": (RowwiseRule, {}, LINEARS),
    "colwise_rep": (ColwiseRule, {"output_layouts": "replicate"}, LINEARS),
    "colwise_gather_output": (ColwiseRule, {"output_layouts": "replicate"}, LINEARS),
    "rowwise_rep": (RowwiseRule, {"input_layouts": "replicate"}, LINEARS),
    "rowwise_split_input": (RowwiseRule, {"input_layouts": "replicate"}, LINEARS),
    "embedding_rowwise": (RowwiseRule, {"input_layouts": "replicate"}, ("embedding",)),
    "embedding_colwise": (ColwiseRule, {"output_layouts": "replicate"}, ("embedding",)),
    "sequence_parallel": (SequenceParallelRule, {"use_local_output": True}, ("other",)),
    "replicate": (ReplicateRule, {}, (*LINEARS, "embedding", "other")),
    "moe_tp_experts": (ExpertTensorParallelRule, {}, ("experts",)),
    "mla_kv_a_proj": (MLAKVAProjRule, {}, ("linear",)),
    "moe_identity_expert": (MoEIdentityExpertRule, {}, ("other",)),
    "ep_dispatch_experts": (ExpertTensorParallelRule, {}, ("experts",)),
    "unit_colwise": (ColwiseRule, {}, LINEARS),
    "unit_rowwise": (RowwiseRule, {}, LINEARS),
}
#: transformers styles on an experts module's own parameters that the tpplan style of the module
#: (FAITHFUL above) already does: {parameter-level style: the module-level style that covers it}
COVERED_BY_MODULE: dict[str, str] = {
    "packed_colwise": "moe_tp_experts",  # experts.gate_up_proj: [gate | up] split separately
    "rowwise": "moe_tp_experts",  # experts.down_proj: split on the intermediate dim
    "grouped_gemm": "ep_dispatch_experts",  # experts.gate_up_proj / down_proj: one slice per ep rank
}
#: needs a measurement on the twin (the dim of the heads) before it maps
PER_HEAD_NORM = "replicated_with_grad_allreduce"

_PACKED = (
    "splits a fused weight ([gate | up] or [q | k | v]) with a strided shard so each rank holds the same "
    "fraction of every part; torch's ColwiseParallel/RowwiseParallel split contiguously and tpplan has no "
    "packed style"
)
EXPERT_PARALLEL = (
    "transformers' expert-parallel plan (whole experts per rank, tokens dispatched), separate from its tensor-parallel "
    "plan that import-hf translates: tpplan's equivalent is style: expert_parallel on the experts module with mesh.ep"
)
NOT_FAITHFUL: dict[str, str] = {
    "packed_colwise": _PACKED,
    "packed_rowwise": _PACKED,
    "local_packed_rowwise": _PACKED,
    "local_params": "runs a module on its parameter-level shards as local tensors (e.g. attention sinks); "
    "tpplan's local_params takes the parameters colwise shards on dim 0, and this module has none",
    "all_reduce": "all-reduces a module's partial output, produced by parameter-level shards inside it; tpplan "
    "layouts have no partial placement",
    "grouped_gemm": EXPERT_PARALLEL,
    "ep_router": EXPERT_PARALLEL,
    "ep_experts": EXPERT_PARALLEL,
    "isolated": "keeps whole experts on each rank (transformers 4 expert parallelism): " + EXPERT_PARALLEL,
    "local_colwise": "transformers 4: colwise with plain local (non-DTensor) weights, whose reductions an "
    "enclosing 'gather'/'local' module does; tpplan shards with DTensor styles only",
    "local_rowwise": "transformers 4: rowwise with plain local (non-DTensor) weights, whose reductions an "
    "enclosing 'gather'/'local' module does; tpplan shards with DTensor styles only",
    "local": "transformers 4: a module run on local tensors (IsolatedParallel); no DTensor style equivalent",
    "gather": "transformers 4: all-reduces the output of a module holding local_* shards; no DTensor style "
    "equivalent",
}


@dataclass
class Rule:
    """One imported rule: the rule object (its match absolute, e.g. model.layers.*.self_attn.q_proj) and the
    comment written after it (the transformers style it came from, what tpplan corrected)."""

    rule: RuleBase
    comment: str = ""

    @property
    def pattern(self) -> str:
        return self.rule.match

    @property
    def fields(self) -> dict[str, Any]:
        """Its style and the arguments it sets, as the spec says them."""
        return rule_fields(self.rule)


@dataclass
class Skipped:
    pattern: str
    hf_style: str
    reason: str

    def line(self) -> str:
        return f"{self.pattern}: {self.hf_style} -- {self.reason}"


def translate(desc: Model, plan: dict[str, str], probe_for) -> tuple[list[Rule], list[Skipped], list[str]]:
    rules: list[Rule] = []
    skipped: list[Skipped] = []
    notes: list[str] = []
    # transformers' local_params on a module + colwise on its own parameters (attention sinks): one
    # tpplan local_params rule naming those parameters
    local = {}
    for key, hf_style in plan.items():
        if hf_style != "local_params" or not matching(key, desc.modules):
            continue
        sharded = [k.rpartition(".")[2] for k, s in plan.items() if k.rpartition(".")[0] == key and s == "colwise"
                   and matching(k, desc.params) and not matching(k, desc.modules)]
        if sharded:
            local[key] = sharded
    for key, hf_style in plan.items():
        pattern = key  # transformers' `*` stands for a layer number: one fnmatch part in tpplan
        if key in local:
            rules.append(Rule(make_rule(LocalParamsRule, pattern, sharded=local[key]),
                              f"hf: local_params, colwise on {', '.join(local[key])}"))
            continue
        if key.rpartition(".")[0] in local and key.rpartition(".")[2] in local[key.rpartition(".")[0]]:
            continue
        found = matching(pattern, desc.modules)
        if not found:
            owner = plan.get(pattern.rpartition(".")[0])
            if owner is not None and COVERED_BY_MODULE.get(hf_style) == owner and owner in FAITHFUL:
                continue  # a parameter of a module whose tpplan style shards it
            if matching(pattern, desc.params):
                reason = NOT_FAITHFUL.get(hf_style) or (
                    "shards one parameter, not a module: tpplan's styles shard nn.Linear / nn.Embedding modules"
                )
                skipped.append(Skipped(pattern, hf_style, reason))
            else:
                notes.append(f"{pattern}: {hf_style} -- matches no module of this config; left out")
            continue
        kinds = {module_kind(desc.modules[n]) for n in found}
        if hf_style in FAITHFUL:
            cls, fields, allowed = FAITHFUL[hf_style]
            if not kinds <= set(allowed):
                what = ", ".join(sorted({type(desc.modules[n]).__name__ for n in found}))
                skipped.append(Skipped(pattern, hf_style, f"applied to {what}: tpplan maps {hf_style} on "
                                       f"{' / '.join(allowed)} modules only"))
                continue
            nested = sorted({f"{type(desc.modules[n]).__name__}.{p}" for n in found
                             for p, _ in desc.modules[n].named_parameters() if "." in p})
            if nested and cls in (ColwiseRule, RowwiseRule):
                # torch's ColwiseParallel / RowwiseParallel re-register every parameter of the module,
                # its children's too, and a child's name has a dot (Inkling's embedding carries an RMSNorm)
                skipped.append(Skipped(pattern, hf_style, f"the module holds a child with parameters ({nested[0]}): "
                                       "torch's colwise/rowwise styles shard a module's own weight only and fail on "
                                       "its children's; left replicated"))
                continue
            rules.append(Rule(make_rule(cls, pattern, **fields), f"hf: {hf_style}"))
        elif hf_style == PER_HEAD_NORM:
            dim, why = probe_for().heads_dim(pattern)
            if dim is None:
                skipped.append(Skipped(pattern, hf_style, "replicated weight with gradients summed over tp: "
                                       f"tpplan expresses it as sequence_parallel on the heads dim, but {why}"))
                continue
            rules.append(Rule(make_rule(SequenceParallelRule, pattern, sequence_dim=dim, use_local_output=True),
                              f"hf: {hf_style} (per-head norm; heads are dim {dim} of its input)"))
        else:
            reason = NOT_FAITHFUL.get(hf_style, "a transformers style tpplan does not know")
            skipped.append(Skipped(pattern, hf_style, reason))
    return rules, skipped, notes
