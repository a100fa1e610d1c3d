"""tpplan's corrections to transformers' plan, where the plan is measurably wrong.

Each correction finds one kind of wrong on the model or its tiny twin and returns the rules that fix
it, with a sentence saying what it corrected (written into the spec's header, printed by import-hf):
parameters acting on a colwise-sharded activation, per-head norms the plan leaves without a rule, a
rowwise linear making one value per head, parameters on MLA's shared rotary key, sharded outputs the
model modifies in place, and MLPs that compute over all their features at once.  ``corrected``
applies them in that order.
"""

from __future__ import annotations

from tpplan.hf.probe import Model, Probe, is_norm, matching
from tpplan.hf.translate import Rule
from tpplan.model.twin_run import cpu_twin, token_ids
from tpplan.plan.module_kinds import module_kind
from tpplan.spec.torch_rules import ColwiseRule, RowwiseRule, SequenceParallelRule
from tpplan.spec.tpplan_rules import LocalParamsRule, MLAKVAProjRule, ReplicateGradAllReduceRule
from tpplan.spec.write import make_rule, with_fields


def _shards_output(rule: Rule) -> bool:
    """A colwise rule handing on its sharded output (no output_layouts: torch's shard(-1), local)."""
    return isinstance(rule.rule, ColwiseRule) and rule.rule.output_layouts is None


def _shards_input(rule: Rule) -> bool:
    """A rowwise rule taking a sharded input (no input_layouts: torch's shard(-1))."""
    return isinstance(rule.rule, RowwiseRule) and rule.rule.input_layouts is None


def _sharded_activation_params(desc: Model, rules: list[Rule], probe: Probe) -> tuple[list[Rule], list[str]]:
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
            if any(matching(c, [pattern]) or c == pattern for c in covered) or name not in probe.calls:
                continue
            if module_kind(module) != "other" or is_norm(module):
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


def _unsharded_head_norms(desc: Model, rules: list[Rule], probe: Probe) -> tuple[list[Rule], list[str]]:
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
        for parent in matching(parent_pattern, desc.modules):
            head_dim = getattr(desc.modules[parent], "head_dim", None)
            for name, module in desc.modules.items():
                if name.rpartition(".")[0] != parent or not is_norm(module):
                    continue
                weight = getattr(module, "weight", None)
                pattern = f"{parent_pattern}.{name.rpartition('.')[2]}"
                if (pattern in seen or weight is None or weight.ndim != 1 or not isinstance(head_dim, int)
                        or weight.shape[0] != head_dim or any(matching(c, [pattern]) or c == pattern for c in covered)):
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


def _per_head_outputs(desc: Model, rules: list[Rule]) -> tuple[list[Rule], list[str]]:
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
        found = matching(rule.pattern, desc.modules)
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


def _shared_rope_params(desc: Model, rules: list[Rule], probe: Probe) -> tuple[list[Rule], list[str]]:
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
        first = next(iter(matching(parent_pattern, desc.modules)), None)  # in the model
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
            for name in matching(rule.pattern, names):
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
        blocks = matching(parent_pattern, names)
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


def corrected(desc: Model, config, rules: list[Rule], probe: Probe) -> tuple[list[Rule], list[str]]:
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
