"""tpplan derive without a process group: the dataflow it reads, the groups it finds, the forms the
emulation proves, the tp it solves for, the spec it writes, and the models it refuses.

Derivations are shared across the session (``tests.conftest.derived``); the proofs by ``check`` on
real ranks are in tests/dist/test_derive.py."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, SPECS, derived
from tpplan.derive import DeriveRefused, Form, derive
from tpplan.plan.stage import resolve_spec
from tpplan.spec.loader import load_spec, load_spec_text


def _groups(source: str, sequence_parallel: bool = True) -> dict[str, tuple]:
    """The first block's groups, by their rowwise module: (what the dataflow found, the form the emulation proved)."""
    analysis = derived(source, sequence_parallel).analysis
    block, groups = next(iter(analysis.groups.items()))
    return {g.rowwise: (g, analysis.forms[block, g.key]) for g in groups}


def _effective(plan) -> dict[str, tuple]:
    """module -> (style, every torch keyword argument with its default filled in; a one-input layout
    list as its one layout, which torch's PrepareModuleInput takes alike)."""
    out = {}
    for entry in plan.entries:
        rule = entry.rule
        kwargs = {k: getattr(rule, k) for k in type(rule).model_fields if k not in rule.NON_STYLE_FIELDS}
        for key in ("input_layouts", "desired_input_layouts"):  # one input: [shard(1)] is shard(1) to torch
            if isinstance(kwargs.get(key), tuple) and len(kwargs[key]) == 1:
                kwargs[key] = kwargs[key][0]
        out[entry.fqn] = (rule.style, tuple(sorted(kwargs.items(), key=lambda kv: kv[0])))
    return out


def test_llama_dataflow_groups_attention_and_mlp():
    """q/k/v meet in attention and feed o_proj; gate/up meet in the product and feed down_proj; the
    residual adds are the stream, not a group; nothing else is a group."""
    a = derived("meta-llama/Llama-3.1-8B", True).analysis
    assert a.skeleton.embed == "model.embed_tokens" and a.skeleton.head == "lm_head"
    assert a.skeleton.blocks_list == "model.layers" and len(a.skeleton.blocks) == 2  # the twin's two blocks
    assert [n for n in a.skeleton.after if n != "lm_head"] == ["model.norm"]
    groups = _groups("meta-llama/Llama-3.1-8B")
    assert {(r, tuple(g.colwise)) for r, (g, _) in groups.items()} == {
        ("self_attn.o_proj", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
        ("mlp.down_proj", ("mlp.gate_proj", "mlp.up_proj")),
    }
    assert groups["self_attn.o_proj"][0].meet == ["scaled_dot_product_attention"]
    assert all(f.form is Form.SHARDED and not f.fixups and not f.grad_sum and not g.problems for g, f in groups.values())


def test_per_head_norms_get_their_gradient_summed_on_the_heads_dim():
    """Qwen3's q_norm/k_norm see only this rank's heads: the emulation measures the cut dim (2 of
    [batch, seq, heads, head_dim]) and the plan replicates them with their gradient summed."""
    _, attention = _groups("Qwen/Qwen3-8B", False)["self_attn.o_proj"]
    assert attention.form is Form.SHARDED
    assert attention.grad_sum == {"self_attn.q_norm": 2, "self_attn.k_norm": 2}


def test_fused_projections_are_recognised_by_the_split_that_follows_them():
    """Phi-3's qkv_proj is sliced at three global offsets and gate_up_proj chunked in two: a contiguous
    share of either sums to the wrong output, a share of every part (packed_colwise) sums right -- for
    qkv_proj once the head counts the slicing reads are divided (found by trying the attributes)."""
    groups = _groups("microsoft/Phi-3-mini-4k-instruct")
    (attention, attention_form), (mlp, mlp_form) = groups["self_attn.o_proj"], groups["mlp.down_proj"]
    assert "slicing" in attention.packed["self_attn.qkv_proj"] and attention.parts == {"self_attn.qkv_proj": 3}
    assert "chunk(dim=-1)" in mlp.packed["mlp.gate_up_proj"] and mlp.parts == {"mlp.gate_up_proj": 2}
    assert attention_form.form is mlp_form.form is Form.PACKED
    assert "do not sum to the unsharded output" in mlp_form.why  # why not the plain contiguous split
    assert sorted(attention_form.fixups) == [("self_attn", "config.num_attention_heads"),
                                             ("self_attn", "num_key_value_heads")]


def test_head_counts_read_from_attributes_become_fixups():
    """OPT reshapes with view(bsz, -1, self.num_heads, head_dim): a rank's share only runs with
    num_heads divided by tp, which the emulation finds by trying the attributes holding head counts."""
    _, attention = _groups("opt", False)["self_attn.out_proj"]
    assert attention.form is Form.SHARDED
    assert attention.fixups == (("self_attn", "num_heads"),)


def test_a_bias_built_for_all_heads_keeps_attention_gathered():
    """Bloom adds an ALiBi bias built outside the block for every head: a rank's share of the heads
    cannot take it, so attention is gathered while the MLP is sharded."""
    groups = _groups("bloom")
    _, attention = groups["self_attention.dense"]
    assert attention.form is Form.GATHERED and "does not run" in attention.why
    assert groups["mlp.dense_4h_to_h"][1].form is Form.SHARDED


def test_mla_attention_with_an_indexer_is_sharded_with_its_shared_rotary_key_summed():
    """AXK2: MLA attention (DeepSeek-V3.2's form) with a sparse-attention indexer.  MLA:
    kv_a_proj_with_mqa's last qk_rope_head_dim features, k_rot, are expanded over every head and join
    the sharded heads from outside the group, so attention stays sharded with mla_kv_a_proj on
    kv_a_proj_with_mqa (k_rot's gradient summed over tp), not gathered.  The indexer's linears score
    the tokens and topk picks those attention reads: indices, not activations, so the indexer stays
    whole on every rank and is not part of the attention group."""
    result = derived("axk2", False)
    attention, form = _groups("axk2", False)["self_attn.o_proj"]
    assert attention.colwise == ["self_attn.q_gate_proj", "self_attn.kv_b_proj"]
    assert form.form is Form.SHARDED and not attention.problems
    assert list(attention.shared_keys) == ["self_attn.kv_a_proj_with_mqa"]
    assert "- match: self_attn.kv_a_proj_with_mqa\n        style: mla_kv_a_proj\n" in result.text


def test_attention_sinks_split_with_the_heads_in_the_attentions_own_rule():
    """Granite-SWA's attention applies one learned sink per head to the sharded scores: the sinks split
    on dim 0 with the heads (local_params) and attention stays sharded -- in one rule with the input
    all-gather of sequence parallelism (one module, one style)."""
    result = derived("granite_swa", True)
    attention, form = _groups("granite_swa")["self_attn.o_proj"]
    assert form.form is Form.SHARDED and attention.local_params == {"self_attn": ["sinks"]}
    assert load_spec_text(result.text, name="derived.yaml").loss_parallel  # it validates
    assert "      - match: self_attn\n        style: local_params\n        sharded: [sinks]\n" \
        "        input_kwarg_layouts: {hidden_states: shard(1)}\n" in result.text


def test_a_head_whose_bias_another_module_holds_stays_whole_with_its_tied_embedding():
    """BERT's cls.predictions.bias is its decoder's bias (one parameter, two holders), and the decoder's weight
    is the word embedding's: a split head would hold the bias as shards where cls.predictions holds it whole,
    which resolve refuses (the derive sweep found BERT's family refused so). Both stay whole, nothing padded."""
    result = derived("bert")
    spec = load_spec_text(result.text, name="bert-derived.yaml")
    patterns = {rule.match for rule in spec.plan}
    assert "cls.predictions.decoder" not in patterns and "bert.embeddings.word_embeddings" not in patterns
    assert "its bias is also cls.predictions.bias" in result.text and "vocab_size" not in result.text
    resolve_spec(spec, tp=result.tp)  # the full-size model takes the plan


def test_moe_experts_take_expert_tensor_parallel():
    experts, form = _groups("Qwen/Qwen3-30B-A3B")["mlp.experts"]
    assert experts.experts and form.form is Form.SHARDED


@pytest.mark.parametrize("source,shipped,tp", [("meta-llama/Llama-3.1-8B", "llama3.yaml", 8),
                                               (str(SPECS / "tiny-llama.yaml"), "tiny-llama.yaml", 2)])
def test_llama_family_reproduces_the_shipped_llama3_plan(source, shipped, tp):
    """derive --sequence-parallel on Llama writes specs/llama3.yaml's plan: the same style with the same
    arguments on every module of the full-size model, and loss parallel (patterns may be spelled
    differently).  From a spec file (the tiny Llama), derive keeps its model, data, mesh and launch."""
    result = derived(source, True)
    want_spec = load_spec(SPECS / shipped)
    spec = load_spec_text(result.text, name="derived.yaml", directory=SPECS)
    assert result.tp == tp and spec.loss_parallel and want_spec.loss_parallel
    assert _effective(resolve_spec(spec, tp=tp)) == _effective(resolve_spec(want_spec, tp=tp))
    assert spec.fixups == []
    if shipped == "tiny-llama.yaml":
        assert spec.model.model_dump() == want_spec.model.model_dump()
        assert spec.launch.model_dump() == want_spec.launch.model_dump() and spec.mesh.device == "cpu"
        got, want = spec.train.model_dump(), want_spec.train.model_dump()
        assert [(SPECS / f).resolve() for f in got.pop("data_files")] == [
            (SPECS / f).resolve() for f in want.pop("data_files")]  # the same corpus, named from the new spec
        assert got == want


@pytest.mark.parametrize("source,shipped", [("microsoft/Phi-3-mini-4k-instruct", "phi3.yaml"),
                                            ("Qwen/Qwen3-30B-A3B", "qwen3-moe.yaml"),
                                            ("google/gemma-2-9b", "gemma2.yaml")])
def test_derived_plans_equal_the_hand_written_specs(source, shipped):
    """The packed projections with their fix-ups (Phi-3), the expert bank and the MoE block run whole
    around it (Qwen3-30B-A3B), four norms and the tied embedding (Gemma 2): module by module, the
    derived sequence-parallel plan is the shipped spec's, so it sends the same bytes per step."""
    result = derived(source, True)
    want = load_spec(SPECS / shipped)
    spec = load_spec_text(result.text, name="derived.yaml")
    tp = want.mesh.tp if isinstance(want.mesh.tp, int) else 8
    assert result.tp == tp
    assert _effective(resolve_spec(spec, tp=tp)) == _effective(resolve_spec(want, tp=tp))
    assert {(f.match, f.attr) for f in spec.fixups} == {(f.match, f.attr) for f in want.fixups}


@pytest.mark.usefixtures("trust_factories")
def test_a_model_of_ones_own_reproduces_its_hand_written_plan():
    """derive on a spec whose model is a factory (examples/llama: plain torch, no config): the embedding
    and head found by the dataflow, the head counts from the views the attention makes, n_heads and
    n_kv_heads found as the attributes its forward reads -- the example's own plan, module by module."""
    result = derived(str(REPO / "examples" / "llama" / "llama.yaml"), True)
    want = load_spec(REPO / "examples" / "llama" / "llama.yaml")
    spec = load_spec_text(result.text, name="derived.yaml")
    assert result.tp == 4  # the largest dividing its 4 kv heads
    assert _effective(resolve_spec(spec, tp=2)) == _effective(resolve_spec(want, tp=2))
    assert {(f.match, f.attr) for f in spec.fixups} == {(f.match, f.attr) for f in want.fixups}
    assert spec.model.factory == "examples/llama/llama_model.py:Llama"  # relative to where it is read


def test_derived_plan_sends_half_the_bytes_of_transformers_plan():
    """Llama-3.1-8B at tp=8, seq 1024, bf16 (simulator): transformers' plan gathers the logits and
    all-reduces each linear's input gradient on its own; the derived plain plan (loss parallel, one
    shared input per block child) sends no more than specs/llama3.yaml and about half of transformers'."""
    from tpplan.derive import compare_bytes
    from tpplan.hf.import_hf import import_hf

    hf = load_spec_text(import_hf("meta-llama/Llama-3.1-8B").text, name="hf.yaml")
    result = compare_bytes(derived("meta-llama/Llama-3.1-8B").text,
                           {"transformers": hf, "llama3": load_spec(SPECS / "llama3.yaml")}, tp=8)
    assert result["llama3"]["ratio"] <= 1.0 and result["transformers"]["ratio"] < 0.6


def test_derived_spec_reads_like_the_shipped_ones():
    text = derived("Qwen/Qwen3-8B").text
    assert text.startswith("# yaml-language-server: $schema=tpplan.schema.json")
    assert "  - match: model.layers.*\n" in text and '"self_attn.[qkv]_proj"' in text
    assert '"self_attn.[qk]_norm"' in text
    spec = load_spec_text(text, name="derived.yaml")
    for rule in spec.plan:
        assert rule.note, rule.match  # every rule says why
        for inner in rule.plan or []:
            assert inner.note, inner.match
    assert spec.mesh.tp == 8 and "8 kv heads" in text


def test_tp_is_the_largest_that_divides_what_is_split():
    """Qwen3-30B-A3B has 4 kv heads: tp=4, with the reason in the spec."""
    result = derived("Qwen/Qwen3-30B-A3B", True)
    assert result.tp == 4 and "4 kv heads" in result.draft.tp_note


def test_asked_tp_that_does_not_divide_the_heads_degrades_that_group_and_says_so():
    result = derived("Qwen/Qwen3-30B-A3B", False, 8)
    assert result.tp == 8
    plan = resolve_spec(load_spec_text(result.text, name="derived.yaml"), tp=8)
    q = plan.styles_by_module()["model.layers.0.self_attn.q_proj"]
    assert q.style == "colwise" and q.output_layouts == "replicate"  # gathered: tp=8 > 4 kv heads
    assert "does not divide 4 kv heads" in result.text


def test_gpt2s_conv1d_attention_and_mlp_are_sharded_and_its_vocabulary_padded():
    """GPT-2's projections are transformers' Conv1D (weight [in, out]): c_attn packs [q | k | v] (split at
    split_size, divided by tp), c_fc -> c_proj the MLP; its vocabulary, 50257, is padded to a multiple of
    tp in the config the spec builds the model from, and the spec says what that costs (it was refused:
    nothing can be sharded)."""
    result = derive("gpt2", tp=2, check=False)
    plan = resolve_spec(load_spec_text(result.text, name="derived.yaml"), tp=2)
    styles = {e.fqn: e.rule for e in plan.entries if e.fqn.startswith(("transformer.h.0.", "transformer.wte", "lm_"))}
    assert styles["transformer.h.0.attn.c_attn"].style == "packed_colwise" and styles["transformer.h.0.attn.c_attn"].parts == 3
    assert type(styles["transformer.h.0.mlp.c_fc"]).__name__ == "Conv1DColwiseRule"
    assert type(styles["transformer.h.0.mlp.c_proj"]).__name__ == type(styles["transformer.h.0.attn.c_proj"]).__name__ \
        == "Conv1DRowwiseRule"
    assert styles["transformer.wte"].style == "rowwise" and styles["lm_head"].style == "colwise"
    assert "{match: transformer.h.*.attn, attr: split_size, op: floordiv_tp}" in result.text
    assert "vocab_size: 50258" in result.text and "768 parameters more" in result.text


@pytest.mark.usefixtures("trust_factories")
def test_refused_with_its_reason_when_nothing_can_be_sharded():
    """Blocks (an nn.Sequential) that mix tokens with a depthwise nn.Conv1d have no Linear to split, and
    the vocabulary, 50257, divides by no tp: derive refuses from the spec without a plan, naming both and
    what padding would cost, before any rank starts."""
    with pytest.raises(DeriveRefused) as info:
        derive(str(REPO / "tests" / "data" / "models" / "conv-mixer.yaml"), check=False)
    text = str(info.value)
    assert "ConvMixer" in text and "50257" in text and "Conv1d, LayerNorm" in text and "128 parameters more" in text
    assert info.value.exit_code == 2


@pytest.mark.usefixtures("trust_factories")
def test_a_torchtitan_shaped_model_derives_from_its_moduledict_keeping_its_own_embedding_style():
    """examples/torchtitan_llama: blocks in an nn.ModuleDict, q/k/v fused per kv head (a view into
    [kv_heads, group, head_dim]), an embedding whose forward does its own vocab-parallel lookup: derive
    finds the blocks, keeps the spec's style of its own for the embedding, and picks tp=4, not 8: the
    4 kv groups bound it (it picked 8).  At --tp 8 the attention is gathered, saying why."""
    spec = str(REPO / "examples" / "torchtitan_llama" / "titan_llama.yaml")
    result = derive(spec, sequence_parallel=True, check=False)
    a = result.analysis
    assert a.skeleton.blocks_list == "layers" and len(a.skeleton.blocks) == 2
    assert result.tp == 4 and "dividing 4 kv heads (attention.n_kv_heads)" in result.text
    plan = resolve_spec(load_spec_text(result.text, name="derived.yaml", directory=REPO), tp=4)
    rules = plan.styles_by_module()
    assert rules["tok_embeddings"].style == "titan_llama.py:VocabParallelEmbedding" or \
        rules["tok_embeddings"].style.endswith("examples/torchtitan_llama/titan_llama.py:VocabParallelEmbedding")
    assert rules["layers.0.attention.qkv_linear.wqkv"].style == "colwise"
    eight = derive(spec, tp=8, sequence_parallel=True, check=False, prepared=None)
    assert "tp=8 does not divide 4 kv heads (attention.n_kv_heads)" in eight.text


def test_a_plan_check_does_not_prove_is_never_written(monkeypatch):
    """derive runs check on what it derived; a failed check is exit 1 with check's own words."""
    from tpplan.derive import DeriveFailed
    from tpplan.prove import check
    from tpplan.prove.verdict import CheckReport

    def failing(spec, **kwargs):
        return CheckReport(ok=False, tp=2, dp=1, world_size=2, failure={
            "message": "first divergence: model.layers.0.mlp.down_proj output differs from the unsharded model by 0.3",
            "hint": "look at mlp.down_proj"})

    monkeypatch.setattr(check, "run_check", failing)
    with pytest.raises(DeriveFailed) as info:
        derive(str(SPECS / "tiny-llama.yaml"))
    assert info.value.exit_code == 1
    assert "not proven by check at tp=2" in str(info.value) and "mlp.down_proj" in str(info.value)


def test_within_a_parameter_budget_groups_every_rank_has_room_for_stay_whole():
    """--max-params-per-rank: derive's count of the parameters per rank is the simulator's, to the
    element; a budget with room for the attention leaves it whole on every rank (the cheaper group: the
    experts would not fit whole) and says why in the spec; a budget below what tp can reach is refused."""
    from tpplan.derive import params_per_rank, step_costs

    full = derived("Qwen/Qwen3-30B-A3B", False, 4)
    base = full.draft.params_per_rank
    spec = load_spec_text(full.text, name="derived.yaml")
    assert step_costs(spec, tp=4, seq_length=64)["params_per_rank"] == base
    kept = derive("Qwen/Qwen3-30B-A3B", tp=4, check=False, max_params_per_rank=base * 3)
    forms = {g["rowwise"]: g["form"] for g in kept.groups}
    assert forms == {"self_attn.o_proj": "replicated", "mlp.experts": "sharded"}
    assert params_per_rank(kept.analysis, kept.draft) == kept.draft.params_per_rank <= base * 3
    assert step_costs(load_spec_text(kept.text, name="kept.yaml"), tp=4, seq_length=64)["params_per_rank"] == (
        kept.draft.params_per_rank)
    assert "has room for it whole on every rank" in kept.text and "# Within --max-params-per-rank" in kept.text
    from tpplan.derive import prepare

    shared = prepare("Qwen/Qwen3-30B-A3B")  # one analysis for two derivations, as the zoo's SP and plain tries
    derive("Qwen/Qwen3-30B-A3B", tp=4, check=False, max_params_per_rank=base * 3, prepared=shared)
    again = derive("Qwen/Qwen3-30B-A3B", tp=4, check=False, prepared=shared)  # no budget: nothing kept whole
    assert {g["form"] for g in again.groups} == {"sharded"} and again.draft.params_per_rank == base
    with pytest.raises(DeriveRefused) as info:
        derive("Qwen/Qwen3-30B-A3B", tp=4, check=False, max_params_per_rank=base - 1)
    assert "parameters per rank, more than --max-params-per-rank" in str(info.value)
    assert info.value.hint == "a larger --tp, or a larger budget"


def test_within_transformers_parameters_per_rank_derive_sends_fewer_bytes():
    """Qwen2-MoE at tp=8: derive's sequence-parallel plan shards the experts and shared experts
    transformers' plan leaves whole (fewer parameters per rank, more bytes); within the parameters per
    rank transformers' plan holds, derive's plan leaves the attention whole instead and sends fewer
    bytes than it (simulator)."""
    from tpplan.derive import compare_bytes
    from tpplan.hf.import_hf import import_hf

    hf = {"transformers": load_spec_text(import_hf("qwen2_moe").text, name="hf.yaml")}
    sharded = compare_bytes(derive("qwen2_moe", tp=8, sequence_parallel=True, check=False).text, hf,
                            tp=8)["transformers"]
    assert sharded["ratio"] > 1 and sharded["params_ratio"] < 1
    budget = sharded["params_per_rank"]
    within = compare_bytes(derive("qwen2_moe", tp=8, check=False, max_params_per_rank=budget).text, hf, tp=8)
    assert within["derived_params_per_rank"] <= budget and within["transformers"]["ratio"] < 1


def test_blocks_of_two_kinds_sharing_module_names_take_one_form():
    """Kimi-Linear: its linear-attention layers (a short convolution over the projections: gathered) and its
    MLA layer (sharded on its own) both feed ``self_attn.o_proj``; rules name modules, not blocks, so
    both are gathered and the plan resolves (a sharded q_proj would leave the linear attention's per-head
    o_norm without a rule) -- refused before, proven by the derive sweep."""
    result = derived("kimi_linear")
    forms = [(g["rowwise"], g["form"], g["why"]) for g in result.groups if g["rowwise"] == "self_attn.o_proj"]
    assert len(forms) == 2 and {form for _, form, _ in forms} == {"gathered"}
    assert any(why.startswith("one rule per module name, and self_attn.o_proj, self_attn.q_proj are gathered in "
                              "other blocks") for _, _, why in forms)
    resolve_spec(load_spec_text(result.text, name="derived.yaml"), tp=result.tp)


def test_parallel_streams_of_the_hidden_state_get_the_plain_plan():
    """HY-V4's hyper-connections carry [batch, seq, 4, hidden] between blocks: derive plans its blocks
    (attention, MLP, shared experts, experts all sharded) and refuses sequence parallelism, which would cut
    a [batch, seq, hidden] stream, with the reason."""
    result = derived("hy_v4")
    assert {g["rowwise"]: g["form"] for g in result.groups} == {
        "self_attn.o_proj": "sharded", "mlp.down_proj": "sharded", "mlp.shared_experts.down_proj": "sharded",
        "mlp.experts": "sharded"}
    resolve_spec(load_spec_text(result.text, name="derived.yaml"), tp=result.tp)
    with pytest.raises(DeriveRefused) as info:
        derive("hy_v4", sequence_parallel=True, check=False)
    assert "sequence parallel cuts a [batch, seq, hidden] residual stream on seq; HYV4ForCausalLM's stream between " \
           "blocks has 4 dims" in str(info.value)
    assert info.value.hint == "derive the plain plan (without --sequence-parallel)"
