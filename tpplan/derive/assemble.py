"""The plan of one draft: each group in the form it was proven to take, its sizes allow and the
constraints leave it, as rules in the shipped specs' form (patterns relative to a decoder block)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .children import call_arg, child_of, child_status, layouts_for, run_whole
from .forms import Constraints, MergedGroup, union
from .groups import Form
from .sizes import Split, experts_split, group_splits
from .skeleton import entry_problem, is_stream_shaped

if TYPE_CHECKING:
    from .analysis import Analysis


@dataclass
class Rule:
    pattern: str  # relative to the blocks pattern when in_block, else absolute
    fields: dict[str, Any]  # style and its keyword arguments, in the order written
    note: str  # why: written as the rule's note
    in_block: bool = False
    order: tuple = (0,)  # rules are written in execution order, a group's colwise rules together


@dataclass
class PlanDraft:
    rules: list[Rule]
    fixups: list[tuple[str, str, str]]  # (pattern, attr, note)
    loss_parallel: bool
    notes: list[str]  # what stays whole, and why
    tp: int
    tp_note: str
    sequence_parallel: bool
    forms: dict = field(default_factory=dict)  # group key -> (Form, why) as written: after tp and check had their say
    params_per_rank: int | None = None  # at full size, no FSDP (params_per_rank: from the weights the rules split)
    budget: int | None = None  # --max-params-per-rank it was drafted within
    constraints: Constraints = field(default_factory=Constraints)  # what it was drafted under


def _experts_rule(a: Analysis, m: MergedGroup, tp: int, rules: list, notes: list, order: tuple,
                  blocks_pattern: str) -> None:
    group, block = m.group, m.blocks[0]
    kind = type(a.twin_modules[f"{block}.{group.rowwise}"]).__name__
    if m.form.form is not Form.SHARDED:
        notes.append(f"{blocks_pattern}.{group.rowwise} ({kind}) stays whole: {m.form.why}")
        return
    split = experts_split(a, block, group.rowwise)
    if split is not None and split.size % tp:
        notes.append(f"{blocks_pattern}.{group.rowwise} ({kind}) stays whole: tp={tp} does not divide {split.what}")
        return
    rules.append(Rule(group.rowwise, {"style": "expert_tensor_parallel"},
                      f"{kind}: every expert's intermediate dim split over tp ({split.what if split else 'sizes unknown'}); "
                      "the router stays replicated, one all-reduce after the experts", True, order))


def _one_form_per_name(merged: dict[tuple, MergedGroup], forms: dict) -> None:
    """Rules name modules, not blocks: where groups of different blocks share a module name (Kimi-Linear's
    linear-attention layers and its MLA layer both feed ``self_attn.o_proj``), a group gathered or left
    whole in some blocks is gathered or left whole in all of them."""
    names = {key: {m.group.rowwise, *m.group.colwise} for key, m in merged.items() if key in forms}
    changed = True
    while changed:
        changed = False
        for key, (form, _, splits) in list(forms.items()):
            for other, (other_form, other_why, _) in forms.items():
                shared = names[key] & names[other]
                if other != key and shared and other_form >= Form.GATHERED and other_form > form:
                    forms[key] = (other_form, f"one rule per module name, and {', '.join(sorted(shared))} "
                                  f"{'is' if len(shared) == 1 else 'are'} {other_form.label} in other blocks: {other_why}",
                                  splits)
                    changed = True
                    break


def assemble(a: Analysis, constraints: Constraints, *, tp: int, tp_note: str, sequence_parallel: bool) -> PlanDraft:
    """The rules for ``tp``: each group in the form it was proven to take, its sizes allow and
    ``constraints`` leave it."""
    sp = sequence_parallel
    rules: list[Rule] = []
    fixups: list[tuple[str, str, str]] = []
    notes: list[str] = []
    modules_full = a.modules_full
    twin_modules = a.twin_modules
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
    merged = a.merged
    forms: dict[tuple, tuple[Form, str, list[Split]]] = {}
    for key, m in merged.items():
        if m.group.experts:
            continue
        splits = group_splits(a.traced, a.modules_full, sk, m.blocks[0], m.group, m.form)
        form, why = m.form.form, m.form.why
        bad = [s for s in splits if s.size % tp]
        if form.cuts_activations and bad:
            if all(s.size % tp == 0 for s in splits if "features" in s.what):
                form, why = Form.GATHERED, f"tp={tp} does not divide {bad[0].what}"
            else:
                form, why = Form.REPLICATED, f"tp={tp} does not divide {bad[0].what}"
        if form is Form.GATHERED and [s for s in splits if "features" in s.what and s.size % tp]:
            bad = [s for s in splits if "features" in s.what and s.size % tp]
            form, why = Form.REPLICATED, f"tp={tp} does not divide {bad[0].what}"
        forced = constraints.forced(key)
        if forced is not None and forced[0] > form:
            form, why = forced
        forms[key] = (form, why, splits)
    _one_form_per_name(merged, forms)
    status = child_status(a, forms)  # child -> how its input enters (clean in every block), or why not
    for child, state in status.items():
        if isinstance(state, tuple):
            prepared[child] = state
        elif sp:
            wrapped[child] = state
    for key, m in merged.items():
        group, block = m.group, m.blocks[0]
        if group.experts:
            if constraints.forced(key) is not None:
                notes.append(f"{sk.pattern}.{group.rowwise} stays whole: {constraints.forced(key)[1]}")
            else:
                _experts_rule(a, m, tp, rules, notes, order_of(group.rowwise), sk.pattern)
            handled.add(group.rowwise)
            continue
        form, why, splits = forms[key]
        members = ", ".join(c.rpartition(".")[2] for c in group.colwise)
        row_short = group.rowwise.rpartition(".")[2]
        meet = f" meet in {' / '.join(group.meet)} and" if group.meet else ""
        if form is Form.REPLICATED:
            notes.append(f"{sk.pattern}.{group.rowwise} and {members} stay whole: {why}")
            continue
        child = child_of(group.rowwise)
        same_child = child is not None and all(child_of(c) == child for c in group.colwise)
        in_wrapper = sp and child in wrapped
        heads = list(dict.fromkeys(s.what.partition(" (")[0] for s in splits if "heads (" in s.what))
        first = min(order_of(c)[0] for c in group.colwise)
        for rel in group.colwise:
            fields: dict[str, Any] = {"style": "colwise"}
            if form.cuts_activations:
                note = (f"{members}{meet} feed {row_short}: " + (f"heads split over tp ({', '.join(heads)})"
                                                                             if heads else "output features split over tp"))
                if form is Form.PACKED and rel in group.packed:
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
        if form is Form.GATHERED:
            fields["input_layouts"] = "replicate"
        if sp and not in_wrapper:
            fields.update(output_layouts="shard(1)", use_local_output=False)
        note = (f"sums the partial products of {members}" if form is not Form.GATHERED else
                f"takes its own slice of the gathered {members} output")
        if sp and not in_wrapper:
            note += "; reduce-scatter back to sequence shards"
        rules.append(Rule(group.rowwise, fields, note, True, order_of(group.rowwise, first, 3)))
        handled.add(group.rowwise)
        if form.cuts_activations:
            for rel, dim in m.form.grad_sum.items():
                kind = type(twin_modules.get(f"{block}.{rel}")).__name__
                rules.append(Rule(rel, {"style": "sequence_parallel", "sequence_dim": dim, "use_local_output": True},
                                  f"{kind} applied to the split activations (dim {dim} cut): weight replicated, "
                                  "its gradient summed over tp", True, order_of(rel, first, 2)))
                handled.add(rel)
            for rel in m.shared_keys:
                rules.append(Rule(rel, {"style": "mla_kv_a_proj"},
                                  "replicated; its last qk_rope_head_dim output features (a rotary key shared by every head) "
                                  "feed each rank's own heads: their gradient summed over tp", True,
                                  order_of(rel, first, 0)))
                handled.add(rel)
            local = union(local, m.local_params)
            for rel in m.key_modules:
                kind = type(twin_modules.get(f"{block}.{rel}")).__name__
                rules.append(Rule(rel, {"style": "replicate_grad_allreduce"},
                                  f"{kind} on the shared rotary key: replicated, its gradient summed over tp (each rank's "
                                  "heads use the key)", True, order_of(rel, first, 0)))
                handled.add(rel)
            for rel, attr in m.form.fixups:
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
                if (leaf and len(call.args) == 1 and call.args[0][0] == 0 and is_stream_shaped(a.traced, tensor_args[0] if tensor_args else None)
                        and call.outputs and is_stream_shaped(a.traced, call.outputs[0])):
                    rules.append(Rule(rel, {"style": "sequence_parallel"},
                                      f"{type(module).__name__} on the residual stream: runs on the local sequence shard",
                                      True, order_of(rel)))
                    handled.add(rel)
                    continue
                stream_args = [(w, v) for w, v in call.args if is_stream_shaped(a.traced, v)]
                if stream_args:
                    wrapped.setdefault(rel, "no sharded group inside" if not any(
                        r.startswith(rel + ".") for r in handled) else "it holds parameters no rule shards")
        for child, how in prepared.items():
            if child in wrapped:
                continue
            if sp:
                fields = {"style": "prepare_input", **layouts_for(how, "shard(1)", "replicate")}
                note = "one all-gather of the sequence feeds every sharded linear inside"
            else:
                fields = {"style": "prepare_input", **layouts_for(how, "replicate", "replicate")}
                note = ("one DTensor input shared by the sharded linears inside: their input gradients are summed "
                        "before one all-reduce")
            if child in local:  # it holds per-head parameters too: one rule does both
                fields = {"style": "local_params", "sharded": local.pop(child),
                          **{k: v for k, v in fields.items() if k != "style"}}
                note += f"; its {', '.join(fields['sharded'])} split on dim 0 with the heads, used locally"
            rules.append(Rule(child, fields, note, True, order_of(child, None, 0)))
        for child, why in wrapped.items():
            calls = graph.calls_of(f"{first_block}.{child}") or [c for c in graph.calls if c.module.endswith("." + child)]
            fields = run_whole(a, calls[0]) if calls else None
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
    entry = entry_problem(a.traced, a.skeleton) if sp and sk.blocks else None
    if entry:
        notes.append(f"sequence parallel starts at {sk.blocks[0].name}: from the embedding to it, {entry}")
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
    sp_embed = sp and not entry
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
                    or (entry and name in sk.before)):
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
            elif (len(call.args) == 1 and tensors and is_stream_shaped(a.traced, tensors[0]) and call.outputs
                  and is_stream_shaped(a.traced, call.outputs[0])):
                rules.append(Rule(name, {"style": "sequence_parallel"},
                                  f"{type(module).__name__} on the residual stream: runs on the local sequence shard",
                                  False, (a.order.get(name, 0),)))
            else:
                fields = run_whole(a, call)
                if fields is None:
                    continue
                rules.append(Rule(name, fields, f"{type(module).__name__} runs whole on every tp rank", False,
                                  (a.order.get(name, 0),)))
    if entry:
        block0 = sk.blocks[0]
        fields = {"style": "prepare_input", **layouts_for(call_arg(block0.call, block0.stream_in), "replicate", "shard(1)")}
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
    for key, m in merged.items():
        if m.group.experts:
            written[key] = constraints.forced(key) or (m.form.form, m.form.why)
    return PlanDraft(rules, fixups, loss_parallel, notes, tp, tp_note, sp, written, constraints=constraints)
