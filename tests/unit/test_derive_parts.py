"""derive's parts one by one, at their seams (no process group, Llama's tiny twin traced once): the skeleton
finder, the emulator and the wrong split it must catch, the form choice as a value, groups merged over blocks,
the tp solver, the parameter budget and its constraints, the rule builders and the spec writer shared with
import-hf, and the zoo's derive column."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tpplan.derive import analysis as analysis_part
from tpplan.derive import emulate
from tpplan.derive.budget import params_per_rank, within_budget
from tpplan.derive.common import DeriveRefused
from tpplan.derive.draft import draft_plan
from tpplan.derive.emulate import Emulator, Trial
from tpplan.derive.forms import Constraints, choose_forms, merge_groups
from tpplan.derive.groups import Form, FoundGroup, GroupForm, find_groups
from tpplan.derive.prove import weaken
from tpplan.derive.sizes import Split, choose_tp
from tpplan.derive.skeleton import find_skeleton
from tpplan.derive.twin import build_model, trace_twin
from tpplan.spec.loader import load_spec_text
from tpplan.spec.torch_rules import ColwiseRule, PrepareInputRule, PrepareOutputRule, RowwiseRule
from tpplan.spec.tpplan_rules import LocalParamsRule
from tpplan.spec.write import make_rule, plan_lines, rule_lines, train_lines, with_fields

ATTENTION = ("self_attn.o_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"))
MLP = ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj"))


@pytest.fixture(scope="module")
def llama():
    """Llama's default config, its twin traced once, and the whole analysis (forms chosen by emulation)."""
    config = AutoConfig.for_model("llama")
    config._attn_implementation = "sdpa"
    config.use_cache = False
    traced = trace_twin(config, build_model)
    return config, traced, analysis_part.analyse(config)


def test_skeleton_is_embedding_blocks_norm_head(llama):
    _, traced, _ = llama
    sk = find_skeleton(traced)
    assert (sk.embed, sk.head, sk.blocks_list) == ("model.embed_tokens", "lm_head", "model.layers")
    assert sk.pattern == "model.layers.*"
    assert [b.name for b in sk.blocks] == ["model.layers.0", "model.layers.1"] and not sk.tied
    assert sk.blocks[1].stream_in == sk.blocks[0].stream_out  # the stream threads through
    assert sk.after == ["model.norm", "lm_head"]


def test_groups_are_found_not_decided(llama):
    _, traced, _ = llama
    groups = find_groups(traced, find_skeleton(traced))
    block = groups["model.layers.0"]
    assert {g.key for g in block} == {ATTENTION, MLP}
    assert not hasattr(block[0], "variant") and not hasattr(block[0], "fixups")  # decisions live in GroupForm


def test_emulated_shares_sum_and_a_wrong_split_is_caught(llama, monkeypatch):
    """Every rank's share of attention sums to the unsharded output; with every rank handed the same rows
    (a wrong split) the sum is tp times one share and the emulator says so."""
    _, traced, a = llama
    attention = next(g for g in a.groups["model.layers.0"] if g.key == ATTENTION)
    emulator = Emulator(traced)
    results, cut = emulator.run([Trial(attention, "model.layers.0", Form.SHARDED, [])])
    assert results == {0: None} and cut[0] == {"self_attn.o_proj": 2}  # its input is cut on the last dim
    same_rows = emulate._share
    monkeypatch.setattr(emulate, "_share", lambda size, tp, rank, parts=1: same_rows(size, tp, 0, parts))
    results, _ = emulator.run([Trial(attention, "model.layers.0", Form.SHARDED, [])])
    assert "do not sum to the unsharded output" in results[0]


def test_forms_are_returned_as_values(llama):
    """choose_forms returns a GroupForm per (block, group) and leaves the found groups as they were; a group
    the dataflow rules out of the sharded form is gathered, the reason kept."""
    _, traced, a = llama
    assert {f.form for f in a.forms.values()} == {Form.SHARDED}
    assert set(a.forms) == {(b, k) for b in ("model.layers.0", "model.layers.1") for k in (ATTENTION, MLP)}
    mlp = next(g for g in a.groups["model.layers.0"] if g.key == MLP)
    ruled_out = FoundGroup(mlp.rowwise, list(mlp.colwise), list(mlp.meet), set(mlp.cone_nodes),
                           set(mlp.cone_values), problems=["parameter x is read directly"])
    forms = choose_forms(traced, {"model.layers.0": [ruled_out]})
    assert forms == {("model.layers.0", MLP): GroupForm(Form.GATHERED, "parameter x is read directly")}
    assert ruled_out.problems == ["parameter x is read directly"]


def test_groups_merged_over_blocks_take_the_weakest_form():
    """Rules name modules, not blocks: the weakest block's form wins with its own fix-ups; blocks of one form
    merge their fix-ups and gradient sums."""
    g = FoundGroup("o", ["q"], [])
    forms = {("b0", g.key): GroupForm(Form.SHARDED, "", (("", "heads"),), {"n": 2}),
             ("b1", g.key): GroupForm(Form.SHARDED, "", (("", "kv"),), {"m": 2}),
             ("b2", g.key): GroupForm(Form.GATHERED, "why")}
    merged = merge_groups({"b0": [g], "b1": [g]}, forms)[g.key]
    assert merged.form.fixups == (("", "heads"), ("", "kv")) and merged.form.grad_sum == {"n": 2, "m": 2}
    weakest = merge_groups({"b0": [g], "b1": [g], "b2": [g]}, forms)[g.key]
    assert weakest.form.form is Form.GATHERED and weakest.form.why == "why"
    assert weakest.blocks == ["b0", "b1", "b2"]
    assert weakest.form.fixups == ()


def test_tp_is_the_largest_candidate_dividing_every_split():
    heads = {"attn": [Split("q", 12, "12 heads (num_attention_heads)"),
                      Split("q", 1536, "1536 output features")]}
    assert choose_tp(heads, 32000, None) == (
        4, "the largest of 8/4/2 dividing 12 heads (num_attention_heads)")
    assert choose_tp(heads, 32001, None)[1].endswith("; the vocabulary (32001) does not divide")
    assert choose_tp(heads, None, 8) == (8, "asked for (--tp 8)")
    assert choose_tp({"x": [Split("q", 7, "7 heads (n_head)")]}, None, None)[0] == 2


def test_a_budget_keeps_groups_whole_in_the_drafts_constraints_only(llama):
    """within_budget returns a draft whose constraints keep the cheapest groups whole; the constraints it was
    given are untouched (the next draft starts from them), and a budget tp cannot reach is refused."""
    _, _, a = llama
    given = Constraints()
    base = draft_plan(a, given, tp=8, sequence_parallel=False)
    kept = within_budget(a, given, lambda c: draft_plan(a, c, tp=8, sequence_parallel=False),
                         base.params_per_rank * 4)  # room for attention whole (1.9B more), not the MLP (3.8B)
    assert given.kept == {} and base.constraints.kept == {}
    assert list(kept.constraints.kept) == [ATTENTION]
    assert params_per_rank(a, kept) > base.params_per_rank
    assert {kept.forms[k][0] for k in kept.constraints.kept} == {Form.REPLICATED}
    with pytest.raises(DeriveRefused, match="more than --max-params-per-rank"):
        within_budget(a, given, lambda c: draft_plan(a, c, tp=8, sequence_parallel=False),
                      base.params_per_rank - 1)


def test_check_disproving_a_group_weakens_it_in_new_constraints(llama):
    class Report:
        ok, tp, worst_grad = False, 2, ""
        failure = {"failing_module": "model.layers.0.mlp.down_proj", "message": "output differs by 0.3"}

    _, _, a = llama
    given = Constraints()
    weakened, step = weaken(a, given, Report(), tp=8)
    assert given.weakened == {} and weakened.weakened[MLP][0] is Form.GATHERED
    assert step == "model.layers.*.mlp.down_proj: sharded -> gathered (check at tp=2: output differs by 0.3)"
    again, _ = weaken(a, weakened, Report(), tp=8)
    assert again.forced(MLP)[0] is Form.REPLICATED
    assert Constraints(kept={MLP: "room"}).forced(MLP) == (Form.REPLICATED, "room")


def test_rule_objects_are_validated_when_built_and_written_in_their_fields_order():
    with pytest.raises(ValueError, match="shard"):
        make_rule(ColwiseRule, "q_proj", output_layouts="shard(x)")
    rowwise = make_rule(RowwiseRule, "o_proj", "sums", output_layouts="shard(1)", input_layouts="replicate")
    assert rule_lines(rowwise, "  ", flow=True, comment="hf: rowwise") == [
        "  - {match: o_proj, style: rowwise, input_layouts: replicate, output_layouts: shard(1)}"
        "  # hf: rowwise"]
    assert rule_lines(with_fields(rowwise, use_local_output=False), "", flow=False) == [
        "- match: o_proj", "  style: rowwise", "  input_layouts: replicate", "  output_layouts: shard(1)",
        "  use_local_output: false", "  note: sums"]


def test_written_plan_reads_back_as_the_same_rules():
    """The writer's plan, block rules grouped under the blocks' pattern, loads back to the rule objects
    it was written from (flow and block style alike)."""
    sinks = make_rule(LocalParamsRule, "self_attn", "sinks split", sharded=["sinks"],
                      input_kwarg_layouts={"hidden_states": "shard(1)"},
                      desired_input_kwarg_layouts={"hidden_states": "replicate"})
    head = make_rule(ColwiseRule, "lm_head", "vocabulary", input_layouts="shard(1)",
                     output_layouts="shard(-1)", use_local_output=False)
    embed = make_rule(PrepareOutputRule, "model.embed_tokens", "cut", output_layouts="replicate",
                      desired_output_layouts="shard(1)", use_local_output=False)
    entries = [(embed, False, ""), (sinks, True, "sinks"), (head, False, "")]
    for flow in (True, False):
        plan = plan_lines(entries, blocks="model.layers.*", block_note="a block", flow=flow)
        spec = load_spec_text("\n".join(["name: x", "model: {name: null, pretrained: false, config: "
                                          "{model_type: llama}}", "plan:", *plan, ""]))
        written = (spec.plan[0], spec.plan[1].plan[0], spec.plan[2])
        notes = {} if not flow else {"note": None}  # a flow mapping carries its comment, not a note
        want = [{**r.model_dump(), **notes} for r in (embed, sinks, head)]
        assert [r.model_dump() for r in written] == want
    assert train_lines(None)[-1] == "  lr: 3.0e-5"  # the shipped specs' learning rate, written once


def test_sequence_parallel_rules_are_written_once():
    from tpplan.plan import sequence_parallel as sp

    kwarg = sp.gather_input("self_attn", ("kwarg", "hidden_states"))
    assert isinstance(kwarg, PrepareInputRule) and kwarg.input_kwarg_layouts == {"hidden_states": "shard(1)"}
    assert sp.gather_input("mlp", ("arg", 0, 2)).input_layouts == ("shard(1)", None)
    assert sp.scatter_output(make_rule(RowwiseRule, "o", input_layouts="replicate"), "o").style_kwargs() == {
        "input_layouts": "replicate", "output_layouts": "shard(1)", "use_local_output": False}
    whole = sp.run_whole("mlp", sp.input_layouts(("arg", 0, 1), sp.SHARDS, sp.WHOLE), 2)
    assert whole.output_layouts == ("replicate", None) and whole.desired_output_layouts == ("shard(1)", None)


def test_the_zoo_column_refuses_without_raising_and_removes_the_config_it_wrote(monkeypatch, tmp_path):
    """derive_for_zoo never raises: a refusal is its row; the completed config.json it wrote for a default
    transformers cannot build (HunYuan's head_dim) is gone after the row."""
    import tempfile

    from tpplan.core.errors import TpplanError
    from tpplan.zoo import derive_column as zoo_derive

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    seen = []

    def refuse(source):
        seen.append(source)
        raise TpplanError("no plan: first line\nsecond")

    monkeypatch.setattr(zoo_derive, "prepare", refuse)
    row = zoo_derive.derive_for_zoo("hunyuan_v1_dense", check_tp=2)
    assert row["status"] == "refused" and row["summary"] == "refused: no plan: first line"
    assert row["config_completed"]["head_dim"] == 128 and seen[0].endswith("hunyuan_v1_dense.json")
    assert list(tmp_path.iterdir()) == []
