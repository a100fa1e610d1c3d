"""``tpplan import-hf``: transformers' own tensor-parallel plan -> a tpplan spec.

transformers ships a TP plan for most decoder models: ``base_model_tp_plan`` on the config class
(``layers.*.self_attn.q_proj: colwise`` ...) and ``_tp_plan`` on the model class
(``lm_head: colwise_gather_output``), merged with the embedding rule it adds itself when a model
is built (``model.tp_plan``).  This module builds the model on the meta device, reads that merged
plan, and translates each rule into a tpplan rule -- only where the translation is faithful:

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

``sequence_parallel=True`` upgrades the plan to the llama3.yaml form: the residual stream between
blocks is a shard(1) DTensor, norms are sequence_parallel, each block child with sharded linears
gathers the sequence once (prepare_input) and its rowwise projection reduce-scatters back to
shard(1), the embedding hands on shard(1), lm_head keeps vocab-sharded logits and the loss runs
on them (loss_parallel).  Which argument carries the stream into each block child (positional or
``hidden_states=``) is measured on the twin too.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.model.reading import Source, causal_lm_class, read_source
from tpplan.model.shrink import config_get, config_values
from tpplan.model.twin_run import TRACE_BATCH, TRACE_SEQ, cpu_twin, token_ids
from tpplan.plan import sequence_parallel as sp_rules
from tpplan.plan.resolve import module_kind
from tpplan.spec.rule_base import RuleBase
from tpplan.spec.torch_rules import ColwiseRule, ReplicateRule, RowwiseRule, SequenceParallelRule
from tpplan.spec.tpplan_rules import (
    ExpertParallelRule,
    ExpertTensorParallelRule,
    LocalParamsRule,
    MLAKVAProjRule,
    MoEIdentityExpertRule,
    ReplicateGradAllReduceRule,
)
from tpplan.spec.write import (
    DEFAULT_SEQ_LENGTH,
    MODEL_DTYPES,
    SCHEMA_LINE,
    TP_CANDIDATES,
    comment_text,
    config_dtype,
    launch_lines,
    loss_parallel_line,
    make_rule,
    plan_lines,
    rule_fields,
    scalar,
    train_lines,
    with_fields,
)

# ----------------------------------------------------------------------------------------------
# The style table
# ----------------------------------------------------------------------------------------------

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
_EXPERT_PARALLEL = (
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
    "grouped_gemm": _EXPERT_PARALLEL,
    "ep_router": _EXPERT_PARALLEL,
    "ep_experts": _EXPERT_PARALLEL,
    "isolated": "keeps whole experts on each rank (transformers 4 expert parallelism): " + _EXPERT_PARALLEL,
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


def _shards_output(rule: Rule) -> bool:
    """A colwise rule handing on its sharded output (no output_layouts: torch's shard(-1), local)."""
    return isinstance(rule.rule, ColwiseRule) and rule.rule.output_layouts is None


def _shards_input(rule: Rule) -> bool:
    """A rowwise rule taking a sharded input (no input_layouts: torch's shard(-1))."""
    return isinstance(rule.rule, RowwiseRule) and rule.rule.input_layouts is None


@dataclass
class Skipped:
    pattern: str
    hf_style: str
    reason: str

    def line(self) -> str:
        return f"{self.pattern}: {self.hf_style} -- {self.reason}"


@dataclass
class Imported:
    """What ``import_hf`` produced: the spec text and what it could not translate."""

    text: str
    name: str
    source: str
    model_class: str
    hf_plan: dict[str, str]
    rules: list[Rule]
    skipped: list[Skipped]
    notes: list[str] = field(default_factory=list)
    tp: int = 2
    sequence_parallel: bool = False
    corrections: list[str] = field(default_factory=list)  # where tpplan's import departs from transformers' plan


# ----------------------------------------------------------------------------------------------
# The model, its plan, and a probe of the tiny twin
# ----------------------------------------------------------------------------------------------


def _is_norm(module) -> bool:
    import torch.nn as nn

    return isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or "norm" in type(module).__name__.lower()


def _matching(pattern: str, names) -> list[str]:
    from tpplan.plan.resolve import matches

    return [n for n in names if matches(pattern, n)]


class _Probe:
    """One forward of the model's tiny twin (CPU, float32), recording how every module is first called."""

    def __init__(self, config):
        import torch

        self.calls: dict[str, dict] = {}  # module name -> first call, in execution order
        self.error: str | None = None
        self.config = None  # the twin's, once built
        try:
            self.config, model = cpu_twin(config, 2)
            handles = []
            for name, module in model.named_modules():
                if name:
                    handles.append(module.register_forward_pre_hook(self._hook(name), with_kwargs=True))
                    handles.append(module.register_forward_hook(self._out(name)))
            with torch.no_grad():
                model(input_ids=token_ids(self.config.vocab_size))
            for handle in handles:
                handle.remove()
        except Exception as exc:  # noqa: BLE001 - any failure only means "cannot measure"
            self.error = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"

    def first(self, pattern: str) -> str | None:
        """The twin's first-called module matching ``pattern`` (the twin has 2 layers: maybe none)."""
        return next((name for name in self.calls if _matching(pattern, [name])), None)

    def order(self, pattern: str) -> int:
        name = self.first(pattern)
        return list(self.calls).index(name) if name else len(self.calls)

    def _hook(self, name):
        def hook(module, args, kwargs):
            import torch

            if name in self.calls:
                return None
            self.calls[name] = {
                "args": [tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args],
                "kwargs": {k: tuple(v.shape) for k, v in kwargs.items() if isinstance(v, torch.Tensor)},
                "output": None,
            }
            return None

        return hook

    def _out(self, name):
        def hook(module, args, output):
            import torch

            call = self.calls.get(name)
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if call is not None and call["output"] is None and isinstance(first, torch.Tensor):
                call["output"] = tuple(first.shape)
                call["n_outputs"] = len(output) if isinstance(output, (tuple, list)) else 1
            return None

        return hook

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


# ----------------------------------------------------------------------------------------------
# Translation
# ----------------------------------------------------------------------------------------------


@dataclass
class _Model:
    model: Any
    modules: dict[str, Any]
    params: set[str]
    embed: str | None
    logits: str | None
    blocks: str | None  # pattern of the decoder blocks, e.g. model.layers.*


def _describe(model) -> _Model:
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
    return _Model(model, modules, params, embed, logits, blocks)


def _translate(desc: _Model, plan: dict[str, str], probe_for) -> tuple[list[Rule], list[Skipped], list[str]]:
    rules: list[Rule] = []
    skipped: list[Skipped] = []
    notes: list[str] = []
    # transformers' local_params on a module + colwise on its own parameters (attention sinks): one
    # tpplan local_params rule naming those parameters
    local = {}
    for key, hf_style in plan.items():
        if hf_style != "local_params" or not _matching(key, desc.modules):
            continue
        sharded = [k.rpartition(".")[2] for k, s in plan.items() if k.rpartition(".")[0] == key and s == "colwise"
                   and _matching(k, desc.params) and not _matching(k, desc.modules)]
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
        found = _matching(pattern, desc.modules)
        if not found:
            owner = plan.get(pattern.rpartition(".")[0])
            if owner is not None and COVERED_BY_MODULE.get(hf_style) == owner and owner in FAITHFUL:
                continue  # a parameter of a module whose tpplan style shards it
            if _matching(pattern, desc.params):
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


def _sharded_activation_params(desc: _Model, rules: list[Rule], probe: _Probe) -> tuple[list[Rule], list[str]]:
    """Corrections to transformers' plan: a module with its own parameters (Apertus' xIELU
    ``mlp.act_fn.alpha_p``) called between a colwise linear and its rowwise partner works on the
    colwise-sharded activation, so each tp rank computes only part of its parameters' gradient.
    transformers leaves it replicated and the gradients are never summed (check measures 3e-4 on
    Apertus' twin).  As ``sequence_parallel`` on the sharded (last) dim the parameters become
    replicated DTensors whose gradient is summed over tp, and the module still sees local shards."""
    covered = [r.pattern for r in rules]
    added, said = [], []
    by_parent: dict[str, dict[str, list[Rule]]] = {}
    for rule in rules:
        sharded_out, sharded_in = _shards_output(rule), _shards_input(rule)
        if sharded_out or sharded_in:
            parent = rule.pattern.rpartition(".")[0]
            by_parent.setdefault(parent, {"col": [], "row": []})["col" if sharded_out else "row"].append(rule)
    order = list(probe.calls)
    for parent_pattern, pair in by_parent.items():
        if not pair["col"] or not pair["row"]:
            continue
        parent = probe.first(parent_pattern)
        if parent is None:
            continue
        first_col = min(order.index(n) for r in pair["col"] for n in [probe.first(r.pattern)] if n)
        first_row = min((order.index(n) for r in pair["row"] for n in [probe.first(r.pattern)] if n), default=-1)
        col_out = {probe.calls[n]["output"][-1] for r in pair["col"] for n in [probe.first(r.pattern)]
                   if n and probe.calls[n]["output"]}
        for name, module in desc.modules.items():
            if not name.startswith(parent + ".") or not any(True for _ in module.parameters(recurse=False)):
                continue
            pattern = f"{parent_pattern}.{name[len(parent) + 1:]}"
            if any(_matching(c, [pattern]) or c == pattern for c in covered) or name not in probe.calls:
                continue
            if module_kind(module) != "other" or _is_norm(module):
                continue  # a Linear is a projection of its own (MLA's q_a_proj); a norm over a shard is another bug
            call = probe.calls[name]
            shape = call["args"][0] if call["args"] else None
            if not (first_col < order.index(name) < first_row and shape and call["output"] == shape
                    and shape[-1] in col_out):
                continue
            params = ", ".join(n for n, _ in module.named_parameters(recurse=False))
            added.append(Rule(make_rule(SequenceParallelRule, pattern, sequence_dim=-1, use_local_output=True),
                              f"tpplan correction: its parameters ({params}) act on the colwise-sharded activation; "
                              "transformers leaves them replicated, so their gradient must be summed over tp"))
            said.append(f"{pattern} ({type(module).__name__}: {params}) is applied to the tp-sharded activation "
                        "between colwise and rowwise linears; transformers' plan leaves it replicated and its "
                        "gradient is off on every rank: sharded on the last dim (sequence_parallel, sequence_dim: "
                        "-1) so the gradient is summed over tp")
    return added, said


def _unsharded_head_norms(desc: _Model, rules: list[Rule], probe: _Probe) -> tuple[list[Rule], list[str]]:
    """Corrections to transformers' plan: a per-head norm (weight [head_dim]: Doge, Gemma 3n, Laguna)
    after colwise q/k projections that transformers' plan leaves without a rule.  Each rank then
    normalizes only its own heads and holds part of the weight's gradient, never summed (resolve
    refuses such a plan).  The same rule transformers writes as replicated_with_grad_allreduce
    elsewhere: sequence_parallel on the measured heads dim."""
    added, said = [], []
    covered = [r.pattern for r in rules]
    colwise_parents = {r.pattern.rpartition(".")[0] for r in rules if _shards_output(r)}
    seen = set()
    for parent_pattern in sorted(colwise_parents):
        for parent in _matching(parent_pattern, desc.modules):
            head_dim = getattr(desc.modules[parent], "head_dim", None)
            for name, module in desc.modules.items():
                if name.rpartition(".")[0] != parent or not _is_norm(module):
                    continue
                weight = getattr(module, "weight", None)
                pattern = f"{parent_pattern}.{name.rpartition('.')[2]}"
                if (pattern in seen or weight is None or weight.ndim != 1 or not isinstance(head_dim, int)
                        or weight.shape[0] != head_dim or any(_matching(c, [pattern]) or c == pattern for c in covered)):
                    continue
                seen.add(pattern)
                dim, why = probe.heads_dim(pattern)
                if dim is None:
                    continue
                added.append(Rule(make_rule(SequenceParallelRule, pattern, sequence_dim=dim, use_local_output=True),
                                  "tpplan correction: per-head norm after colwise projections; transformers' plan has "
                                  "no rule for it, so its gradient must be summed over tp"))
                said.append(f"{pattern} ({type(module).__name__}, weight [{head_dim}]) normalizes single heads after "
                            "colwise projections; transformers' plan leaves it replicated and each rank's gradient "
                            f"covers only its own heads: sequence_parallel on the heads dim ({dim}) sums it over tp")
    return added, said


def _per_head_outputs(desc: _Model, rules: list[Rule]) -> tuple[list[Rule], list[str]]:
    """Corrections to transformers' plan: an attention whose heads colwise projections split over tp,
    with a rowwise Linear inside it that makes one value per head (Doge's ``dt_proj``: the value
    states of every head -> one dynamic-mask logit per kv head) and parameters of one entry per head
    (Doge's ``A``).  Rowwise with a replicated output hands every rank all heads' values, for the
    rank's own heads only -- a shape mismatch in the attention.  The rowwise output stays sharded on
    the heads (output_layouts: shard(-1): a reduce-scatter, each rank its own heads) and the per-head
    parameters are split with them (local_params)."""
    from tpplan.model.shrink import config_values

    config = getattr(desc.model, "config", None)
    counts = config_values(config, "num_attention_heads") | config_values(config, "num_key_value_heads")
    covered = {r.pattern for r in rules}
    colwise_parents = {r.pattern.rpartition(".")[0] for r in rules if _shards_output(r)}
    added, said = [], []
    for rule in rules:
        parent_pattern = rule.pattern.rpartition(".")[0]
        if not _shards_input(rule) or rule.rule.output_layouts is not None or parent_pattern not in colwise_parents:
            continue
        found = _matching(rule.pattern, desc.modules)
        module = desc.modules[found[0]] if found else None
        if module_kind(module) != "linear" or module.out_features not in counts:
            continue
        heads = module.out_features
        parent = desc.modules[found[0].rpartition(".")[0]]
        params = [n for n, p in parent.named_parameters(recurse=False) if p.ndim == 1 and p.shape[0] == heads]
        if parent_pattern in covered or not params:
            continue
        rule.rule = with_fields(rule.rule, output_layouts="shard(-1)")
        rule.comment += " + tpplan correction: its output is one value per head, kept sharded with the heads"
        added.append(Rule(make_rule(LocalParamsRule, parent_pattern, sharded=params),
                          f"tpplan correction: {', '.join(params)} hold one entry per head; split with the heads"))
        covered.add(parent_pattern)
        said.append(f"{rule.pattern} makes one value per head ({heads}) from the heads that colwise projections split "
                    f"over tp, and {parent_pattern}.{', '.join(params)} holds one per head: transformers' plan "
                    "replicates both, so each rank gets every head's values for its own heads (a shape mismatch); "
                    "rowwise with output_layouts shard(-1) keeps each rank's heads, local_params splits "
                    f"{', '.join(params)} with them")
    return added, said


def _shared_rope_params(desc: _Model, rules: list[Rule], probe: _Probe) -> tuple[list[Rule], list[str]]:
    """Corrections to transformers' plan: in MLA attention (mla_kv_a_proj), a module with parameters
    applied to the shared rotary key k_rot on its way into the attention (Dots3's
    ``k_rope_only_layernorm``).  Every rank computes it whole, but uses it for its own heads only, so
    its parameters' gradient on each rank is a partial sum (mla_kv_a_proj sums k_rot's gradient before
    the module, not after it): transformers leaves it replicated; replicate_grad_allreduce sums it."""
    from tpplan.model.shrink import config_get

    rope = config_get(probe.config, "qk_rope_head_dim")
    covered = [r.pattern for r in rules]
    added, said = [], []
    for rule in rules:
        if not isinstance(rule.rule, MLAKVAProjRule) or not isinstance(rope, int):
            continue
        parent_pattern = rule.pattern.rpartition(".")[0]
        parent = probe.first(parent_pattern)  # in the twin the probe ran
        first = next(iter(_matching(parent_pattern, desc.modules)), None)  # in the model
        for name, module in desc.modules.items():
            if first is None or name.rpartition(".")[0] != first:
                continue
            pattern = f"{parent_pattern}.{name.rpartition('.')[2]}"
            twin_name = f"{parent}.{name.rpartition('.')[2]}" if parent else None
            call = probe.calls.get(twin_name) if twin_name else None
            if (pattern in covered or not any(True for _ in module.parameters(recurse=False)) or call is None
                    or not call["args"] or not call["args"][0] or call["args"][0][-1] != rope
                    or module_kind(module) != "other"):
                continue
            covered.append(pattern)
            params = ", ".join(n for n, _ in module.named_parameters(recurse=False))
            added.append(Rule(make_rule(ReplicateGradAllReduceRule, pattern),
                              "tpplan correction: applied to MLA's shared rotary key, used per rank for its own heads: "
                              "its gradient is summed over tp"))
            said.append(f"{pattern} ({type(module).__name__}: {params}) is applied to MLA's shared rotary key k_rot "
                        f"after {rule.pattern}; each rank uses k_rot for its own heads only, so the "
                        "gradient of its parameters is a partial sum that transformers' plan never sums: "
                        "replicate_grad_allreduce sums it over tp")
    return added, said


def _outputs_modified_in_place(config, rules: list[Rule]) -> tuple[list[Rule], list[str]]:
    """Corrections to transformers' plan: a sharded Linear whose (local) output the model then modifies
    in place (Llama 4's MoE: ``out = self.shared_expert(x); out.add_(routed)``).  torch's DTensor
    styles hand on a local tensor that is a view made by an autograd Function, which autograd forbids
    to modify in place, so the forward fails.  Found by running the tiny twin with every sharded
    Linear's output passed through such a view (then one at a time, where the forward fails); the
    rules of that Linear and its siblings (the MLP's gate/up/down) are dropped: that module stays
    replicated."""
    import torch
    import torch.nn as nn

    class _View(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.view_as(x)

        @staticmethod
        def backward(ctx, grad):
            return grad

    candidates = [r for r in rules if isinstance(r.rule, (ColwiseRule, RowwiseRule))]
    if not candidates:
        return rules, []
    try:
        twin, model = cpu_twin(config, 2)
        names = {n for n, _ in model.named_modules()}
        ids = token_ids(twin.vocab_size)
    except Exception:  # noqa: BLE001 - cannot measure: nothing to correct
        return rules, []

    def fails(chosen: list[Rule]) -> bool:
        handles = []
        for rule in chosen:
            for name in _matching(rule.pattern, names):
                module = model.get_submodule(name)
                if isinstance(module, nn.Linear):
                    handles.append(module.register_forward_hook(
                        lambda m, a, out: _View.apply(out) if isinstance(out, torch.Tensor) else out))
        try:
            model(input_ids=ids)
            return False
        except RuntimeError as exc:
            return "modified inplace" in str(exc)
        except Exception:  # noqa: BLE001 - another failure is not this one
            return False
        finally:
            for handle in handles:
                handle.remove()

    if not fails(candidates):
        return rules, []
    parents = {r.pattern.rpartition(".")[0] for r in candidates if fails([r])}
    kept = [r for r in rules if r.pattern.rpartition(".")[0] not in parents]
    said = [f"{parent}: the model modifies the output of its sharded Linears in place (a view made by torch's DTensor "
            "styles, which autograd forbids to modify in place: with transformers' plan the forward fails); its "
            "rules are left out and it stays replicated" for parent in sorted(parents)]
    return kept, said


def _not_split_by_features(config, rules: list[Rule]) -> list[str]:
    """Corrections to transformers' plan: a block of colwise linears and a rowwise one (an MLP) is
    sharded on the assumption that each rank's slice of the intermediate features gives a partial
    sum of the output.  That fails where the block computes something over all the intermediate
    features (Gemma 3n's activation sparsity: mean and std of the gate's output).  Measured on the
    tiny twin, one process: every matched block run on each rank's weight slices in turn, the
    partial outputs summed, against the block run whole.  Where they differ, the colwise outputs are
    gathered (output_layouts: replicate) and the rowwise linear takes the whole input (input_layouts:
    replicate, each rank its slice): the weights stay sharded, the block sees every feature."""
    import torch
    import torch.nn as nn

    groups: dict[str, dict[str, list[Rule]]] = {}
    for rule in rules:
        if _shards_output(rule):
            groups.setdefault(rule.pattern.rpartition(".")[0], {"col": [], "row": []})["col"].append(rule)
        elif _shards_input(rule):
            groups.setdefault(rule.pattern.rpartition(".")[0], {"col": [], "row": []})["row"].append(rule)
    groups = {p: g for p, g in groups.items() if g["col"] and len(g["row"]) == 1}
    if not groups:
        return []
    try:
        _, model = cpu_twin(config, 2)
    except Exception:  # noqa: BLE001 - cannot measure: nothing to correct
        return []
    names = {n: m for n, m in model.named_modules()}
    said = []
    for parent_pattern, group in groups.items():
        blocks = _matching(parent_pattern, names)
        if not blocks or hasattr(names[blocks[0]], "head_dim"):
            continue  # attention: heads, not a plain feature split
        wrong = []
        for block_name in blocks:
            block = names[block_name]
            col = [names.get(f"{block_name}.{r.pattern.rpartition('.')[2]}") for r in group["col"]]
            row = names.get(f"{block_name}.{group['row'][0].pattern.rpartition('.')[2]}")
            if row is None or any(m is None for m in col):
                continue  # a block of another kind (DeepSeek's MoE layers beside the dense ones)
            if not all(isinstance(m, nn.Linear) for m in [*col, row]) or any(
                    m.out_features != row.in_features for m in col):
                break
            x = torch.randn(2, 5, row.out_features, generator=torch.Generator().manual_seed(0))
            seen = []  # the rowwise linear's output, where the sum over tp happens (what follows it is whole)
            handle = row.register_forward_hook(lambda m, a, out, seen=seen: seen.append(out))
            try:
                with torch.no_grad():
                    block(x)
                    saved = {m: (m.weight, m.bias) for m in [*col, row]}
                    for r in range(2):
                        for m in col:
                            m.weight = nn.Parameter(saved[m][0].chunk(2, 0)[r])
                            m.bias = None if saved[m][1] is None else nn.Parameter(saved[m][1].chunk(2, 0)[r])
                        row.weight = nn.Parameter(saved[row][0].chunk(2, 1)[r])
                        row.bias = saved[row][1] if r == 0 else None
                        block(x)
                    for m, (w, b) in saved.items():
                        m.weight, m.bias = w, b
            except Exception:  # noqa: BLE001 - not a block that runs on its own
                break
            finally:
                handle.remove()
            if len(seen) == 3 and not torch.allclose(seen[0], seen[1] + seen[2], atol=1e-5):
                wrong.append(block_name)
        if not wrong:
            continue
        for rule in group["col"]:
            rule.rule = with_fields(rule.rule, output_layouts="replicate")
            rule.comment += " + tpplan correction: output gathered (the block uses all its features at once)"
        group["row"][0].rule = with_fields(group["row"][0].rule, input_layouts="replicate")
        group["row"][0].comment += " + tpplan correction: takes the whole input, each rank its slice"
        said.append(f"{parent_pattern} ({type(names[wrong[0]]).__name__}) computes over all its intermediate features at "
                    f"once in some blocks ({', '.join(w.rpartition('.')[0].rpartition('.')[2] for w in wrong)} of the "
                    "twin): each rank's slice is no partial sum, so transformers' plan changes the output; the colwise "
                    "outputs are gathered and the rowwise linear takes the whole input (weights still sharded)")
    return said


def _under(pattern: str, prefix: str) -> bool:
    return pattern.startswith(prefix + ".")


class _NoSequenceParallel(TpplanError):
    def __init__(self, reason: str):
        super().__init__(
            f"cannot upgrade this plan to sequence parallel: {reason}",
            hint="import without --sequence-parallel (the plain plan keeps activations replicated between blocks)",
        )


def _sequence_parallel(desc: _Model, rules: list[Rule], probe: _Probe) -> tuple[list[Rule], list[str]]:
    """The llama3.yaml upgrade of a plain plan (``tpplan.sequence_parallel``'s rules, the stream's way into
    each block child measured on the twin); raises _NoSequenceParallel when the structure is unknown."""
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


def _sp_embedding(desc: _Model, embed: Rule | None) -> Rule:
    """The embedding: a vocab- (or hidden-) sharded lookup hands on shard(1); a whole one is cut to it."""
    if embed is not None and isinstance(embed.rule, (ColwiseRule, RowwiseRule)):
        said = "output shard(1)" if isinstance(embed.rule, ColwiseRule) else "reduce-scatter to shard(1)"
        return Rule(sp_rules.scatter_output(embed.rule, desc.embed), f"{embed.comment}; SP: {said}")
    return Rule(sp_rules.scatter_output(None, desc.embed), "SP: not sharded by transformers; output sliced to sequence "
                "shards")


def _sp_children(desc: _Model, rules: list[Rule], probe: _Probe) -> tuple[list[Rule], list[str]]:
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


def _sp_child(desc: _Model, pattern: str, child: str, inner: list[Rule], probe: _Probe) -> tuple[list[Rule], str]:
    """One block child: a norm on the stream runs on the local shard; a child whose sharded linears all read
    the stream gathers it once; any other runs whole.  Its inner rules, and a note when it runs whole."""
    module = desc.modules[child]
    seen = probe.first(pattern)
    if seen is None:
        raise _NoSequenceParallel(f"{pattern} ({type(module).__name__}) is not called by the 2-layer tiny twin, "
                                  "so how the residual stream enters it cannot be measured")
    call = probe.calls[seen]
    kinds = sorted({type(m).__name__ for m in (desc.modules[n] for n in _matching(pattern, desc.modules))})
    if len(kinds) > 1:
        raise _NoSequenceParallel(
            f"{pattern} is {' in some blocks and '.join(kinds)} in others (mixed blocks, e.g. dense and MoE): "
            "one rule cannot gather the sequence for both")
    if _is_norm(module) and all(r.pattern == pattern for r in inner):
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


def _final_norm(desc: _Model) -> str:
    """The one final norm beside the embedding and the blocks (under the base model)."""
    block_prefix = desc.blocks[:-2]
    base = block_prefix.rpartition(".")[0]  # model
    top = [n for n in desc.modules if n.startswith(base + ".") and n.count(".") == base.count(".") + 1] if base else []
    norms = [n for n in top if _is_norm(desc.modules[n])]
    others = [n for n in top if n not in norms and n != desc.embed and n != block_prefix
              and any(True for _ in desc.modules[n].parameters())]
    if len(norms) != 1 or others:
        raise _NoSequenceParallel(
            f"expected one final norm beside {desc.embed} and {block_prefix} under {base or 'the model'}; found norms "
            f"{norms or 'none'} and other modules with parameters {others or 'none'}")
    return norms[0]


def _all_params_covered(desc: _Model, child: str, pattern: str, inner: list[Rule]) -> bool:
    """Every parameter-holding module under ``child`` has an imported rule, or is a norm fed by one."""
    for name, module in desc.modules.items():
        if not (name == child or name.startswith(child + ".")):
            continue
        if not any(True for _ in module.parameters(recurse=False)):
            continue
        rel = f"{pattern}{name[len(child):]}"
        if any(_matching(r.pattern, [rel]) for r in inner):
            continue
        if _is_norm(module) and name != child:
            continue
        return False
    return True


# ----------------------------------------------------------------------------------------------
# Choosing tp, and writing the YAML
# ----------------------------------------------------------------------------------------------


def _choose_tp(spec_text: str, model, seq_length: int) -> tuple[int, str]:
    from tpplan.plan.stage import resolve_stage
    from tpplan.spec.loader import load_spec_text

    spec = load_spec_text(spec_text)
    last = ""
    for tp in TP_CANDIDATES:
        try:
            resolve_stage(spec, model=model, tp=tp, seq_length=seq_length)
            return tp, ""
        except TpplanError as exc:
            last = str(exc)
    return TP_CANDIDATES[-1], last


def _plan_yaml(rules: list[Rule], blocks: str | None) -> list[str]:
    """The plan: rules inside the decoder blocks under one ``blocks`` group, relative to a block."""
    entries = []
    for rule in rules:
        in_block = bool(blocks and rule.pattern.startswith(blocks + "."))
        written = rule.rule.model_copy(update={"match": rule.pattern[len(blocks) + 1:]}) if in_block else rule.rule
        entries.append((written, in_block, rule.comment))
    return plan_lines(entries, blocks=blocks, block_note="one decoder block; patterns below are relative to it",
                      flow=True)


def _ordered(rules: list[Rule], desc: _Model) -> list[Rule]:
    """Rules in module order (embedding, blocks, norm, head), stable for rules on one module."""
    order = {name: i for i, name in enumerate(desc.modules)}

    def first(rule: Rule) -> int:
        found = _matching(rule.pattern, desc.modules)
        return min((order[n] for n in found), default=len(order))

    return sorted(rules, key=first)


def _spec_name(hint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._").lower() or "imported"
    return name[:100]


def import_hf(
    source: str,
    *,
    sequence_parallel: bool = False,
    name: str | None = None,
    out_path: str | None = None,
    command: str | None = None,
    correct: bool = True,
    ep: int | None = None,
) -> Imported:
    """Translate transformers' TP plan for ``source`` into a tpplan spec (text; nothing is written).

    ``correct=False`` keeps transformers' plan as it is where tpplan knows it to be wrong (the
    zoo checks both, to show what the correction fixes).  transformers >= 5.25 keeps MoE experts in
    a separate expert-parallel plan (``base_model_ep_plan``); its experts modules become
    ``expert_parallel`` over ``mesh.ep = ep`` when ``ep`` is given, else ``expert_tensor_parallel``
    over tp (what its tensor-parallel plan said for them before 5.25)."""
    out_dir = Path(out_path).parent if out_path else None
    src = read_source(source, out_dir)
    config = src.config
    attn, model = _build(config)
    desc = _describe(model)
    plan, ep_plan = _hf_plans(model, config)
    probe_cache: list[_Probe] = []

    def probe_for() -> _Probe:
        if not probe_cache:
            probe_cache.append(_Probe(config))
        return probe_cache[0]

    rules, skipped, notes = _translate(desc, plan, probe_for)
    corrections: list[str] = []
    if correct and not probe_for().error:
        rules, corrections = _corrected(desc, config, rules, probe_for())
    skipped += [Skipped(k, v, "expert-parallel plan (base_model_ep_plan): " + _EXPERT_PARALLEL) for k, v in ep_plan.items()
                if k not in plan]
    _experts_from_ep_plan(rules, ep)
    rules = _ordered(rules, desc)
    if sequence_parallel:
        rules, sp_notes = _sequence_parallel(desc, rules, probe_for())
        notes += sp_notes

    spec_name = _spec_name(name or src.name_hint)
    command = command or f"tpplan import-hf {source}" + (" --sequence-parallel" if sequence_parallel else "")
    text = _render(spec_name, src, type(model).__name__, type(config).__name__, attn, rules, skipped, notes, desc,
                   sequence_parallel, tp=2, tp_note="", command=command, corrections=corrections, ep=ep)
    tp, problem = _choose_tp(text, model, DEFAULT_SEQ_LENGTH)
    if problem:
        tp_note = f"no tp in {list(TP_CANDIDATES)} resolves; see the errors printed by import-hf"
        notes.append(f"the plan does not resolve at tp={tp}:\n{problem}")
    else:
        tp_note = _tp_note(config, tp)
    text = _render(spec_name, src, type(model).__name__, type(config).__name__, attn, rules, skipped, notes, desc,
                   sequence_parallel, tp=tp, tp_note=tp_note, command=command, corrections=corrections, ep=ep)
    from tpplan.spec.loader import load_spec_text

    load_spec_text(text, name=spec_name + ".yaml")  # what we write must validate
    return Imported(text, spec_name, source, type(model).__name__, plan, rules, skipped, notes, tp, sequence_parallel,
                    corrections)


def _build(config) -> tuple[str, Any]:
    """(the attention path, the model of ``config`` on the meta device)."""
    from tpplan.model.sources import build_model

    model_cls = causal_lm_class(config)
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", True) else "eager"
    config._attn_implementation = attn
    if hasattr(config, "use_cache"):
        config.use_cache = False
    try:
        return attn, build_model(config)
    except Exception as exc:  # noqa: BLE001 - transformers' own failure on this config
        raise TpplanError(
            f"transformers cannot build {model_cls.__name__} from this config: {type(exc).__name__}: {exc}",
            hint="import from a complete config.json (a hub id or a local folder) rather than a bare model_type",
        ) from None


def _hf_plans(model, config) -> tuple[dict[str, str], dict[str, str]]:
    """(transformers' tensor-parallel plan with the experts of its expert-parallel plan, the ep plan)."""
    import transformers

    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan:
        raise TpplanError(
            f"transformers {transformers.__version__} has no tensor-parallel plan for {type(model).__name__} "
            f"({type(config).__name__}.base_model_tp_plan and {type(model).__name__}._tp_plan are empty)",
            hint="write the plan by hand: start from specs/llama3.yaml and `tpplan plan --modules` lists the modules",
        )
    ep_plan = dict(getattr(model, "ep_plan", None) or {})
    # the experts of the ep plan are translated with the tp plan (a key in both: the tp plan's wins)
    plan.update({k: v for k, v in ep_plan.items() if k not in plan and v in FAITHFUL | COVERED_BY_MODULE})
    return plan, ep_plan


def _corrected(desc: _Model, config, rules: list[Rule], probe: _Probe) -> tuple[list[Rule], list[str]]:
    """The rules with tpplan's corrections to transformers' plan, and what each corrected."""
    added, corrections = _sharded_activation_params(desc, rules, probe)
    norms, said = _unsharded_head_norms(desc, rules, probe)
    rules = rules + added + norms
    corrections += said
    heads, said = _per_head_outputs(desc, rules)
    rules += heads
    corrections += said
    rope, said = _shared_rope_params(desc, rules, probe)
    rules += rope
    corrections += said
    rules, said = _outputs_modified_in_place(config, rules)
    corrections += said
    corrections += _not_split_by_features(config, rules)
    return rules, corrections


def _experts_from_ep_plan(rules: list[Rule], ep: int | None) -> None:
    """The experts transformers' ep plan names: expert_parallel over ep (``ep``), else split over tp."""
    for rule in rules:
        if rule.comment != "hf: ep_dispatch_experts":
            continue
        if ep:
            rule.rule = make_rule(ExpertParallelRule, rule.pattern)
            rule.comment = f"hf: ep_dispatch_experts (base_model_ep_plan: whole experts over ep={ep})"
        else:
            rule.comment = ("hf: ep_dispatch_experts (base_model_ep_plan), split over tp here: "
                            "each expert's intermediate dim; import with --ep N for whole experts per ep rank")


def _tp_note(config, tp: int) -> str:
    heads = config_get(config, "num_attention_heads")
    kv = config_get(config, "num_key_value_heads")
    parts = [f"{heads} heads" if heads else None, f"{kv} kv heads" if kv and kv != heads else None]
    said = ", ".join(p for p in parts if p)
    return f"the largest of {'/'.join(map(str, TP_CANDIDATES))} that resolves" + (f" ({said})" if said else "")


def _render(name, src: Source, model_class, config_class, attn, rules, skipped, notes, desc, sp, *, tp, tp_note,
            command, corrections=(), ep=None) -> str:
    lines = _header(model_class, config_class, rules, skipped, notes, sp, command=command, corrections=corrections)
    description = f"{src.label}: transformers' tensor-parallel plan for {model_class}" + (
        ", sequence parallel + loss parallel" if sp else "")
    lines += [f"name: {scalar(name)}", f"description: {scalar(description)}", ""]
    lines.append("model:")
    model = src.model
    if model.get("name") is None:
        lines.append("  name: null                 # no checkpoint: set a hub id or local folder to train pretrained weights")
        lines.append("  pretrained: false")
        lines.append("  config:")
        for key, value in model["config"].items():
            lines.append(f"    {scalar(key)}: {scalar(value)}")
    else:
        lines.append(f"  name: {scalar(model['name'])}")
    dtype = config_dtype(src.config)
    lines.append(f"  dtype: {dtype if dtype in MODEL_DTYPES else 'bfloat16'}")
    lines.append(f"  attn_implementation: {attn}" + ("" if attn == "sdpa" else f"  # {model_class} does not support sdpa"))
    lines += ["", "mesh:", f"  tp: {tp}" + (f"    # {tp_note}" if tp_note else "")]
    if ep:
        lines.append(f"  ep: {ep}    # expert parallel: whole experts per ep rank (ranks borrowed from dp)")
    lines += ["  dp: auto", "", "plan:"]
    lines += _plan_yaml(rules, desc.blocks)
    lines += ["", loss_parallel_line(sp), ""]
    lines += train_lines(None)
    lines.append("")
    lines += launch_lines(None, tp)
    return "\n".join(lines) + "\n"


def _header(model_class, config_class, rules, skipped, notes, sp, *, command, corrections) -> list[str]:
    """The comment block: where the plan came from, what tpplan corrected, what it could not import."""
    import transformers

    lines = [
        SCHEMA_LINE,
        "#",
        f"# Imported by `{comment_text(command)}`",
        f"# from transformers {transformers.__version__}'s own tensor-parallel plan for {model_class}",
        f"# ({config_class}.base_model_tp_plan + {model_class}._tp_plan). Each rule's comment names the",
        "# transformers style it came from.",
    ]
    if any(r.comment.startswith("hf: ep_dispatch_experts") for r in rules):
        lines.append(f"# The experts come from its expert-parallel plan ({config_class}.base_model_ep_plan).")
    if sp:
        lines += [
            "# Upgraded to sequence parallel + loss parallel (--sequence-parallel): the residual stream between",
            "# blocks is a shard(1) DTensor; norms run on sequence shards; each block child with sharded linears",
            "# gathers the sequence once and its rowwise projection reduce-scatters back; logits stay vocab-sharded.",
        ]
    if corrections:
        lines += ["#", "# Corrected (transformers' own plan is wrong here; `tpplan check` shows the difference):"]
        for fix in corrections:
            lines += [f"#   {line}" for line in fix.splitlines()]
    if skipped:
        lines += ["#", "# Not imported (no faithful tpplan style; these stay replicated -- run `tpplan check`):"]
        lines += [f"#   {comment_text(s.line())}" for s in skipped]
    if notes:
        lines += ["#", "# Notes:"]
        for note in notes:
            lines += [f"#   {comment_text(line)}" for line in note.splitlines()]
    return lines


def report(imported: Imported, stream=None) -> None:
    """What was not imported, on stderr: one line per skipped rule."""
    stream = stream or sys.stderr
    for fix in imported.corrections:
        print(f"corrected: {fix}", file=stream)
    for s in imported.skipped:
        print(f"not imported: {s.line()}", file=stream)
    for note in imported.notes:
        print(f"note: {note}", file=stream)
