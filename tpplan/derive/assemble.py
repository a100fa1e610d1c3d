"""The plan of one draft: each group in the form it was proven to take, its sizes allow and the
constraints leave it, as rules in the shipped specs' form (patterns relative to a decoder block)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from tpplan.plan import sequence_parallel as sp_rules
from tpplan.plan.sequence_parallel import SHARDS, WHOLE, input_layouts
from tpplan.spec.rule_base import RuleBase
from tpplan.spec.torch_rules import ColwiseRule, RowwiseRule, SequenceParallelRule
from tpplan.spec.tpplan_rules import (
    ExpertTensorParallelRule,
    LocalParamsRule,
    MLAKVAProjRule,
    PackedColwiseRule,
    ReplicateGradAllReduceRule,
)
from tpplan.spec.write import make_rule

from .children import call_arg, child_of, child_status, run_whole
from .forms import Constraints, MergedGroup, union
from .groups import Form
from .sizes import Split, experts_split, group_splits
from .skeleton import entry_problem, is_stream_shaped
from .vocab import head_held_elsewhere, own_lookup, padding_offer

if TYPE_CHECKING:
    from .analysis import Analysis


@dataclass
class Rule:
    """One rule of a draft: the spec's rule object (its match relative to a decoder block when ``in_block``,
    its note why) and where it is written (execution order, a group's colwise rules together)."""

    rule: RuleBase
    in_block: bool = False
    order: tuple = (0,)

    @property
    def pattern(self) -> str:
        return self.rule.match


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
    note = (f"{kind}: every expert's intermediate dim split over tp ({split.what if split else 'sizes unknown'}); "
            "the router stays replicated, one all-reduce after the experts")
    rules.append(Rule(make_rule(ExpertTensorParallelRule, group.rowwise, note), True, order))


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
    return PlanAssembler(a, constraints, tp=tp, tp_note=tp_note, sequence_parallel=sequence_parallel).draft()


class PlanAssembler:
    """The rules of one draft, in steps (``draft`` runs them in order) that share what they decided:
    each group's form at this tp (``forms``), which block children take one prepared input (``prepared``)
    or run whole on every rank (``wrapped``), which modules have a rule (``handled``), which per-head
    parameters split with the heads (``local``).  One assembler per draft."""

    def __init__(self, a: Analysis, constraints: Constraints, *, tp: int, tp_note: str, sequence_parallel: bool):
        self.a, self.constraints, self.sk = a, constraints, a.skeleton
        self.tp, self.tp_note, self.sp = tp, tp_note, sequence_parallel
        self.rules: list[Rule] = []
        self.fixups: list[tuple[str, str, str]] = []  # (pattern, attr, note)
        self.notes: list[str] = []
        self.forms: dict[tuple, tuple[Form, str, list[Split]]] = {}  # group key -> (form, why, splits) at this tp
        self.wrapped: dict[str, str] = {}  # child -> why it runs whole on every rank (SP)
        self.prepared: dict[str, tuple] = {}  # child -> how its input enters
        self.handled: set[str] = set()  # relative modules with a rule
        self.local: dict[str, list[str]] = {}  # owner -> its per-head parameters that split with the heads
        self.loss_parallel = False

    def draft(self) -> PlanDraft:
        self.fit_forms()
        self.sort_children()
        for key, m in self.a.merged.items():
            self.group_rules(key, m)
        if self.sk.blocks:
            self.child_rules()
        self.local_rules()
        self.edge_rules()
        self.rules.sort(key=lambda r: r.order)
        return PlanDraft(self.rules, self.fixups, self.loss_parallel, self.notes, self.tp, self.tp_note, self.sp,
                         self.written_forms(), constraints=self.constraints)

    def order_of(self, rel: str, group_first: int | None = None, rank: int = 0) -> tuple:
        """Where a rule goes: rules are written in execution order, a group's together (``group_first``)
        in the order ``rank`` says."""
        own = next((found for block in self.a.groups if (found := self.a.order.get(f"{block}.{rel}")) is not None),
                   10**9)
        return (own if group_first is None else group_first, rank, own)

    # -- forms and block children ----------------------------------------------------------------

    def fit_forms(self) -> None:
        """Each group's form at this tp: weaker where tp does not divide what it splits, or where the
        constraints hold it; one form per module name over blocks of two kinds."""
        tp = self.tp
        for key, m in self.a.merged.items():
            if m.group.experts:
                continue
            splits = group_splits(self.a.traced, self.a.modules_full, self.sk, m.blocks[0], m.group, m.form)
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
            forced = self.constraints.forced(key)
            if forced is not None and forced[0] > form:
                form, why = forced
            self.forms[key] = (form, why, splits)
        _one_form_per_name(self.a.merged, self.forms)

    def sort_children(self) -> None:
        """Block children whose sharded linears share one input (``prepared``); under SP the rest of the
        children holding groups run whole (``wrapped``)."""
        for child, state in child_status(self.a, self.forms).items():
            if isinstance(state, tuple):
                self.prepared[child] = state
            elif self.sp:
                self.wrapped[child] = state

    # -- the groups --------------------------------------------------------------------------------

    def group_rules(self, key: tuple, m: MergedGroup) -> None:
        """One group's rules: its colwise members and rowwise partner in its form, and what goes with a
        cut activation (gradient sums, the shared rotary key, per-head parameters, fix-ups)."""
        group = m.group
        if group.experts:
            forced = self.constraints.forced(key)
            if forced is not None:
                self.notes.append(f"{self.sk.pattern}.{group.rowwise} stays whole: {forced[1]}")
            else:
                _experts_rule(self.a, m, self.tp, self.rules, self.notes, self.order_of(group.rowwise), self.sk.pattern)
            self.handled.add(group.rowwise)
            return
        form, why, splits = self.forms[key]
        members = ", ".join(c.rpartition(".")[2] for c in group.colwise)
        if form is Form.REPLICATED:
            self.notes.append(f"{self.sk.pattern}.{group.rowwise} and {members} stay whole: {why}")
            return
        first = min(self.order_of(c)[0] for c in group.colwise)
        self._colwise_rules(m, form, why, splits, first)
        self._rowwise_rule(m, form, first)
        if form.cuts_activations:
            self._cut_rules(m, first)

    def _colwise_rules(self, m: MergedGroup, form: Form, why: str, splits: list[Split], first: int) -> None:
        group = m.group
        members = ", ".join(c.rpartition(".")[2] for c in group.colwise)
        meet = f" meet in {' / '.join(group.meet)} and" if group.meet else ""
        child = child_of(group.rowwise)
        same_child = child is not None and all(child_of(c) == child for c in group.colwise)
        heads = list(dict.fromkeys(s.what.partition(" (")[0] for s in splits if "heads (" in s.what))
        for rel in group.colwise:
            cls, fields = ColwiseRule, {}
            if form.cuts_activations:
                note = (f"{members}{meet} feed {group.rowwise.rpartition('.')[2]}: "
                        + (f"heads split over tp ({', '.join(heads)})" if heads else "output features split over tp"))
                if form is Form.PACKED and rel in group.packed:
                    cls, fields = PackedColwiseRule, {"parts": group.parts[rel]}
                    note = (f"fused: {group.packed[rel]}; each rank keeps its slice of each of the "
                            f"{group.parts[rel]} parts; " + note)
            else:
                fields["output_layouts"] = WHOLE
                note = f"weight split, output gathered: {why}"
            if self.sp and not same_child:  # it reads the stream itself
                fields["input_layouts"] = SHARDS
            self.rules.append(Rule(make_rule(cls, rel, note, **fields), True, self.order_of(rel, first, 1)))
            self.handled.add(rel)

    def _rowwise_rule(self, m: MergedGroup, form: Form, first: int) -> None:
        group = m.group
        members = ", ".join(c.rpartition(".")[2] for c in group.colwise)
        in_wrapper = self.sp and child_of(group.rowwise) in self.wrapped
        note = (f"sums the partial products of {members}" if form is not Form.GATHERED else
                f"takes its own slice of the gathered {members} output")
        rule = make_rule(RowwiseRule, group.rowwise, note, **({"input_layouts": WHOLE} if form is Form.GATHERED else {}))
        if self.sp and not in_wrapper:
            rule = sp_rules.scatter_output(rule, group.rowwise, note + "; reduce-scatter back to sequence shards")
        self.rules.append(Rule(rule, True, self.order_of(group.rowwise, first, 3)))
        self.handled.add(group.rowwise)

    def _cut_rules(self, m: MergedGroup, first: int) -> None:
        block, twin_modules = m.blocks[0], self.a.twin_modules
        for rel, dim in m.form.grad_sum.items():
            kind = type(twin_modules.get(f"{block}.{rel}")).__name__
            note = (f"{kind} applied to the split activations (dim {dim} cut): weight replicated, its gradient "
                    "summed over tp")
            self.rules.append(Rule(make_rule(SequenceParallelRule, rel, note, sequence_dim=dim, use_local_output=True),
                                   True, self.order_of(rel, first, 2)))
            self.handled.add(rel)
        for rel in m.shared_keys:
            note = ("replicated; its last qk_rope_head_dim output features (a rotary key shared by every head) feed "
                    "each rank's own heads: their gradient summed over tp")
            self.rules.append(Rule(make_rule(MLAKVAProjRule, rel, note), True, self.order_of(rel, first, 0)))
            self.handled.add(rel)
        self.local = union(self.local, m.local_params)
        for rel in m.key_modules:
            kind = type(twin_modules.get(f"{block}.{rel}")).__name__
            note = (f"{kind} on the shared rotary key: replicated, its gradient summed over tp (each rank's heads "
                    "use the key)")
            self.rules.append(Rule(make_rule(ReplicateGradAllReduceRule, rel, note), True, self.order_of(rel, first, 0)))
            self.handled.add(rel)
        for rel, attr in m.form.fixups:
            self.fixups.append((f"{self.sk.pattern}.{rel}" if rel else self.sk.pattern, attr,
                                f"the forward reads {attr} to reshape the split activations"))

    # -- block children: sequence parallel, shared inputs, per-head parameters ---------------------

    def child_rules(self) -> None:
        if self.sp:
            self._stream_children()
        for child, how in self.prepared.items():
            if child not in self.wrapped:
                self._prepared_rule(child, how)
        for child, why in self.wrapped.items():
            self._wrapper_rule(child, why)

    def _stream_children(self) -> None:
        """Under SP, the block children no group covers: a norm on the stream runs on the sequence shard;
        another module the stream enters runs whole."""
        graph, traced = self.a.traced.graph, self.a.traced
        for block in [b.name for b in self.sk.blocks]:
            depth = block.count(".") + 1
            for call in graph.calls:
                if not call.module.startswith(block + ".") or call.module.count(".") != depth:
                    continue
                rel = call.module[len(block) + 1:]
                if rel in self.handled or rel in self.prepared or rel in self.wrapped:
                    continue
                module = self.a.twin_modules[call.module]
                if not any(True for _ in module.parameters()):
                    continue
                tensor_args = [v for _, v in call.args if v is not None]
                if (call.module in graph.leaf_modules and len(call.args) == 1 and call.args[0][0] == 0
                        and is_stream_shaped(traced, tensor_args[0] if tensor_args else None)
                        and call.outputs and is_stream_shaped(traced, call.outputs[0])):
                    note = f"{type(module).__name__} on the residual stream: runs on the local sequence shard"
                    self.rules.append(Rule(sp_rules.stream_norm(rel, note), True, self.order_of(rel)))
                    self.handled.add(rel)
                elif any(is_stream_shaped(traced, v) for _, v in call.args):
                    self.wrapped.setdefault(rel, "no sharded group inside" if not any(
                        r.startswith(rel + ".") for r in self.handled) else "it holds parameters no rule shards")

    def _prepared_rule(self, child: str, how: tuple) -> None:
        sharded = self.local.pop(child, None)  # it holds per-head parameters too: one rule does both
        if self.sp:
            note = "one all-gather of the sequence feeds every sharded linear inside"
        else:
            note = ("one DTensor input shared by the sharded linears inside: their input gradients are summed "
                    "before one all-reduce")
        if sharded:
            note += f"; its {', '.join(sharded)} split on dim 0 with the heads, used locally"
        rule = (sp_rules.gather_input(child, how, note, sharded=sharded) if self.sp
                else sp_rules.prepare_input(child, input_layouts(how, WHOLE, WHOLE), note, sharded=sharded))
        self.rules.append(Rule(rule, True, self.order_of(child, None, 0)))

    def _wrapper_rule(self, child: str, why: str) -> None:
        graph = self.a.traced.graph
        calls = graph.calls_of(f"{self.sk.blocks[0].name}.{child}") or [
            c for c in graph.calls if c.module.endswith("." + child)]
        note = f"runs whole on every tp rank ({why}): the sequence gathered in, its output cut back to sequence shards"
        rule = run_whole(self.a, child, calls[0], note) if calls else None
        if rule is None:
            self.notes.append(f"sequence parallel: cannot tell how the residual stream enters {child}")
            return
        self.rules.append(Rule(rule, True, self.order_of(child)))
        self.notes.append(f"{self.sk.pattern}.{child} runs on the full sequence on every tp rank ({why})")

    def local_rules(self) -> None:
        """Per-head parameters of a module with no other rule."""
        for owner, names in self.local.items():
            if owner in self.wrapped or owner in self.prepared or owner in self.handled:
                self.notes.append(f"{self.sk.pattern}.{owner}: its {', '.join(names)} apply per head, but it runs "
                                  "whole: check decides")
                continue
            note = f"its {', '.join(names)} split on dim 0 with the heads, used locally"
            self.rules.append(Rule(make_rule(LocalParamsRule, owner, note, sharded=names), True, self.order_of(owner)))
            self.handled.add(owner)

    # -- embedding, final norm, head ---------------------------------------------------------------

    def edge_rules(self) -> None:
        sk = self.sk
        entry = entry_problem(self.a.traced, sk) if self.sp and sk.blocks else None
        if entry:
            self.notes.append(f"sequence parallel starts at {sk.blocks[0].name}: from the embedding to it, {entry}")
        embed_sharded, head_sharded = self._vocab_splits()
        self._embedding_rule(embed_sharded, self.sp and not entry)
        if self.sp:
            self._between_rules(entry)
        if entry:
            block0 = sk.blocks[0]
            note = "the residual stream enters the first block whole and is cut to sequence shards there (see the header)"
            layouts = input_layouts(call_arg(block0.call, block0.stream_in), WHOLE, SHARDS)
            self.rules.append(Rule(sp_rules.prepare_input(block0.name, layouts, note), False,
                                   (self.a.order.get(block0.name, 0),)))
        self._head_rule(head_sharded)

    def _vocab_splits(self) -> tuple[bool, bool]:
        """Whether the embedding and the head split on the vocabulary at this tp (a tied pair both or neither)."""
        import torch.nn as nn

        sk, tp, modules_full = self.sk, self.tp, self.a.modules_full
        vocab, inner, embed_sharded, head_sharded = None, [], False, False
        if sk.embed and isinstance(modules_full.get(sk.embed), nn.Embedding):
            vocab = modules_full[sk.embed].weight.shape[0]
            inner = [n for n, m in modules_full[sk.embed].named_modules()  # Inkling's embed_norm after the lookup
                     if n and any(True for _ in m.parameters(recurse=False))]
        head_module = modules_full.get(sk.head) if sk.head else None
        head_vocab = head_module.weight.shape[0] if isinstance(head_module, nn.Linear) else None
        shared = head_held_elsewhere(self.a) if head_vocab is not None else []
        if any(r.pattern == sk.embed for r in self.a.own_rules):
            pass  # the spec's own style shards it: kept as written (draft's with_own_rules)
        elif inner:
            # the vocabulary split's partial sums would go through the module's own layers before they are
            # summed; and torch's rowwise style re-registers every parameter under the module by its dotted name
            self.notes.append(f"{sk.embed} stays whole: its forward runs {', '.join(inner)} after the lookup, which "
                              "the vocabulary split's partial sums cannot go through")
        elif vocab is not None and own_lookup(modules_full[sk.embed]):
            self.notes.append(f"{sk.embed} stays whole: {type(modules_full[sk.embed]).__name__}'s forward does a "
                              "vocab-parallel lookup of its own (its weight's local rows, a process group handed to it), "
                              "which torch's rowwise style cannot drive: name its own ParallelStyle in the spec's plan "
                              "(style: file.py:Class), and derive keeps it")
        elif vocab is not None and sk.tied and shared:
            self.notes.append(f"{sk.embed} stays whole: tied to {sk.head}, which stays whole (below)")
        elif vocab is not None and vocab % tp == 0 and (not sk.tied or (head_vocab is not None and head_vocab % tp == 0)):
            embed_sharded = True
        elif vocab is not None:
            self.notes.append(f"{sk.embed} stays whole: tp={tp} does not divide its vocabulary ({vocab}); "
                              + padding_offer(self.a, vocab, tp))
        if shared:  # BERT's cls.predictions.bias is its decoder's bias: one parameter, two holders
            self.notes.append(f"{sk.head} stays whole: its {', '.join(shared)} (tied), which a split head "
                              "would hold as shards and its other holder whole")
        elif head_vocab is not None and head_vocab % tp == 0 and (not sk.tied or embed_sharded):
            head_sharded = True
        elif head_vocab is not None and not (sk.tied and not embed_sharded and vocab is not None):
            self.notes.append(f"{sk.head} stays whole: tp={tp} does not divide its vocabulary ({head_vocab})")
        return embed_sharded, head_sharded

    def _embedding_rule(self, sharded: bool, sp_embed: bool) -> None:
        sk = self.sk
        order = (self.a.order.get(sk.embed, 0),)
        if sharded:
            tie = " (tied to the output head: both split on the vocabulary)" if sk.tied else ""
            note = f"vocabulary split{tie}; every rank looks up its own rows"
            rule = make_rule(RowwiseRule, sk.embed, note, input_layouts=WHOLE)
            if sp_embed:
                rule = sp_rules.scatter_output(rule, sk.embed, note + ", partial sums reduce-scattered to sequence shards")
            self.rules.append(Rule(rule, False, order))
        elif sp_embed and sk.embed:
            rule = sp_rules.scatter_output(None, sk.embed, "whole embedding; its output cut to sequence shards")
            self.rules.append(Rule(rule, False, order))

    def _between_rules(self, entry: str | None) -> None:
        """Under SP, the modules with weights between the embedding and the first block, and between the last
        block and the head (the final norm)."""
        import torch.nn as nn

        sk, graph, traced = self.sk, self.a.traced.graph, self.a.traced
        for name in sk.before + [n for n in sk.after if n != sk.head]:
            if (name == sk.embed or name.startswith(f"{sk.embed}.") or name not in self.a.modules_full
                    or (entry and name in sk.before)):
                continue
            module, calls = self.a.twin_modules[name], graph.calls_of(name)
            if not calls:
                continue
            call, order = calls[0], (self.a.order.get(name, 0),)
            tensors = [v for _, v in call.args if v is not None]
            kind = type(module).__name__
            if isinstance(module, nn.Embedding):
                rule = sp_rules.scatter_output(None, name, f"{kind} added to the stream: whole weight, output cut to "
                                               "sequence shards")
            elif (len(call.args) == 1 and tensors and is_stream_shaped(traced, tensors[0]) and call.outputs
                  and is_stream_shaped(traced, call.outputs[0])):
                rule = sp_rules.stream_norm(name, f"{kind} on the residual stream: runs on the local sequence shard")
            else:
                rule = run_whole(self.a, name, call, f"{kind} runs whole on every tp rank")
            if rule is not None:
                self.rules.append(Rule(rule, False, order))

    def _head_rule(self, sharded: bool) -> None:
        sk = self.sk
        order = (self.a.order.get(sk.head, 10**9),)
        if sharded:
            note = "vocabulary split; logits stay vocab-sharded into the loss (loss_parallel)"
            self.rules.append(Rule(sp_rules.vocab_head(sk.head, note, sequence_parallel=self.sp), False, order))
            self.loss_parallel = True
        elif self.sp and sk.head:
            self.rules.append(Rule(sp_rules.whole_head(sk.head, "whole output head: the sequence gathered in"), False,
                                   order))

    def written_forms(self) -> dict[tuple, tuple[Form, str]]:
        """Each group's form as written: after tp, the constraints and one form per module name had their say."""
        written = {key: (form, why) for key, (form, why, _) in self.forms.items()}
        for key, m in self.a.merged.items():
            if m.group.experts:
                written[key] = self.constraints.forced(key) or (m.form.form, m.form.why)
        return written
