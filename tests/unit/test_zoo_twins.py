"""The zoo's twins and configs, without a process group: a twin that can show the bugs (two kv heads
per rank and two query heads per kv head where the model has them, windows shorter than the twin's
sequence, grouped routing kept); shrink keeps per-layer attributes, KV-shared layers and sectioned
stacks consistent; the zoo completes default configs transformers cannot build from; local_params
(attention sinks) resolves with its size checks."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tpplan.core.errors import SpecError
from tpplan.model.complete import completed_default
from tpplan.model.shrink import config_get, config_values
from tpplan.model.sources import build_model, shrink_config
from tpplan.plan.resolve import resolve
from tpplan.spec.loader import load_spec_text


def test_twin_heads_two_kv_heads_per_rank_and_two_query_heads_per_kv_head_where_the_model_has_them():
    llama = AutoConfig.for_model("llama", num_attention_heads=32, num_key_value_heads=8)  # Llama-3.1-8B's
    for tp in (2, 4):
        twin = shrink_config(llama, tp)  # 32 query heads in 8 groups: 2 kv heads per rank, 2 query heads each
        assert (twin.num_key_value_heads, twin.num_attention_heads) == (2 * tp, 4 * tp)
    twin = shrink_config(llama, 8)  # 8 kv heads: one per rank at tp=8, as the model allows
    assert (twin.num_key_value_heads, twin.num_attention_heads) == (8, 16)
    mha = shrink_config(AutoConfig.for_model("llama", num_attention_heads=32, num_key_value_heads=32), 2)
    assert mha.num_key_value_heads == mha.num_attention_heads == 4  # MHA stays MHA: 2 heads per rank


def test_twin_windows_mask_inside_the_twins_sequence():
    from tpplan.prove.verdict import TWIN_SEQ_PER_TP

    for model_type, key in (("gemma2", "sliding_window"), ("mistral", "sliding_window"),
                            ("llama4_text", "attention_chunk_size")):
        config = AutoConfig.for_model(model_type, **({"sliding_window": 4096} if model_type == "mistral"
                                                      else {}))
        window = getattr(shrink_config(config, 2), key)
        assert 0 < window < TWIN_SEQ_PER_TP, (model_type, window)  # inside each rank's sequence shard (tp=2)


def test_twin_keeps_grouped_routing():
    twin = shrink_config(AutoConfig.for_model("deepseek_v3"), 2)  # 256 experts in 8 groups, top 4 groups
    assert (twin.n_routed_experts, twin.n_group, twin.topk_group, twin.num_experts_per_tok) == (4, 2, 1, 2)
    build_model(twin, device="meta")  # transformers accepts it: each group holds top_k experts


def test_per_layer_head_lists_shrink_with_the_heads():
    twin = shrink_config(AutoConfig.for_model("laguna"), 2)  # num_attention_heads_per_layer: 48 each
    assert twin.num_attention_heads == 8 and twin.num_key_value_heads == 4
    assert set(twin.num_attention_heads_per_layer) == {8}
    assert len(twin.num_attention_heads_per_layer) == twin.num_hidden_layers


def test_kv_shared_layers_keep_a_producer_of_each_type():
    full = AutoConfig.for_model("gemma3n_text")  # 35 layers, the last 15 reuse earlier layers' keys and values
    twin = shrink_config(full, 2)
    first_shared = twin.num_hidden_layers - twin.num_kv_shared_layers
    assert 0 < twin.num_kv_shared_layers < twin.num_hidden_layers
    assert set(twin.layer_types[first_shared:]) <= set(twin.layer_types[:first_shared])
    twin.kv_sharing_modes  # noqa: B018 - transformers' own consistency check raises when it does not hold


def test_sectioned_stack_keeps_its_sections_adding_up():
    twin = shrink_config(AutoConfig.for_model("dory"), 2)  # input + recurrent + output layers = all layers
    assert twin.n_input_layers + twin.n_recurrent_layers + twin.n_output_layers == twin.num_hidden_layers
    assert min(twin.n_input_layers, twin.n_recurrent_layers, twin.n_output_layers) >= 1
    assert "full_attention" in twin.layer_types and "sliding_attention" in twin.layer_types


def test_per_layer_attributes_read_globally_and_per_layer():
    gemma4 = AutoConfig.for_model("gemma4_text")
    with pytest.raises(Exception, match="per-layer attribute"):
        gemma4.head_dim  # noqa: B018 - transformers refuses the global read
    assert config_get(gemma4, "head_dim") == 256 and config_values(gemma4, "head_dim") == {256, 512}
    twin = shrink_config(gemma4, 2)
    assert config_values(twin, "head_dim") == {16, 32}  # the global layers keep twice the head
    dots3 = shrink_config(AutoConfig.for_model("dots3_note_text"), 2)  # MLA with per-layer heads and nope dims
    assert config_values(dots3, "num_attention_heads") == {4}  # 128 and 64 heads, kv heads alike: 2 per rank
    # (transformers validated the sliding layers' head_dim = nope + rope when the twin was built)
    assert config_values(dots3, "qk_nope_head_dim") == {8, 12}


def test_default_configs_are_completed_where_the_model_cannot_build():
    assert completed_default("llama", tp=2) == {}
    assert completed_default("hunyuan_v1_dense", tp=2) == {"head_dim": 128, "vocab_size": 290944}  # 290943 padded for tp=2
    assert completed_default("cohere_compass_text", tp=2) == {
        "rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 10000.0}}}
    lfm2 = completed_default("lfm2_moe", tp=2)["layer_types"]
    assert lfm2[:3] == ["conv", "conv", "full_attention"] and len(lfm2) == 32
    assert completed_default("qwen4_exp_text", tp=2)["indexer_kv_heads"] == 1


SINKS = """
name: sinks
model: {pretrained: false, dtype: float32, config: {model_type: granite_swa}}
plan:
  - match: model.layers.*
    plan:
      - {match: self_attn.q_proj, style: colwise}
      - {match: self_attn.k_proj, style: colwise}
      - {match: self_attn.v_proj, style: colwise}
      - {match: self_attn.o_proj, style: rowwise}
      - {match: self_attn, style: local_params, sharded: [%s]}
"""


def test_local_params_shards_per_head_parameters_and_checks_them(tmp_path):
    model = build_model(shrink_config(AutoConfig.for_model("granite_swa"), 2))
    plan = resolve(load_spec_text(SINKS % "sinks"), model, tp=2)
    entry = next(e for e in plan.entries if e.fqn == "model.layers.0.self_attn")
    assert entry.rule.code() == "LocalParamsParallel(sharded=('sinks',))"
    with pytest.raises(SpecError, match=r"has no parameter 'gate' of its own \(it has sinks\)"):
        resolve(load_spec_text(SINKS % "gate"), model, tp=2)
    with pytest.raises(SpecError, match=r"sinks has 8 entries on dim 0 \(one per head\), which tp=16 does"):
        resolve(load_spec_text(SINKS.replace("colwise}", "replicate}").replace("rowwise}", "replicate}") % "sinks"),
                model, tp=16)


def test_encoder_decoder_configs_shrink_their_decoder_for_the_causal_lm():
    """BART's *ForCausalLM runs its decoder: d_model, decoder heads and ffn width shrink like a decoder
    model's, the encoder's alongside; the layers are cut to the twin's two."""
    twin = shrink_config(AutoConfig.for_model("bart"), 2)
    assert (twin.decoder_layers, twin.encoder_layers) == (2, 2)
    assert twin.decoder_attention_heads == twin.encoder_attention_heads == 4  # 2 per rank (no grouped kv)
    assert twin.d_model == 4 * 16 and twin.decoder_ffn_dim < 4096 and twin.encoder_ffn_dim < 4096
    assert sum(p.numel() for p in build_model(twin, device="meta").parameters()) < 1_000_000


def _kinds(model_type: str, blocks: str = "model.layers.*") -> dict[str, str]:
    """check's kind of every parameter of the model type's twin (meta device), by name."""
    from tpplan.prove.shards import _embeddings, parameter_kind
    from tpplan.runtime.step import block_names

    model = build_model(shrink_config(AutoConfig.for_model(model_type), 2), device="meta")
    modules = dict(model.named_modules())
    blocks = block_names(model, [blocks])
    inputs, outputs = _embeddings(model), _embeddings(model, output=True)
    return {name: parameter_kind(name, modules, next((b for b in blocks if name.startswith(b + ".")), None),
                                 inputs, outputs, param.ndim) for name, param in model.named_parameters()}


def test_check_counts_parameters_by_kind():
    """The shard report's kinds: attention (with SSM and linear-attention mixers), MLP (with shared experts),
    experts, routers, norms, embedding, head -- from class names first (Nemotron-H names every mixer
    `mixer`)."""
    qwen = _kinds("qwen3_moe")
    experts = "model.layers.0.mlp.experts"
    assert qwen[f"{experts}.gate_up_proj"] == qwen[f"{experts}.down_proj"] == "experts"
    assert qwen["model.layers.0.mlp.gate.weight"] == "routers"
    assert qwen["model.layers.0.self_attn.q_proj.weight"] == "attention"
    assert qwen["model.layers.0.self_attn.q_norm.weight"] == qwen["model.norm.weight"] == "norms"
    assert (qwen["model.embed_tokens.weight"], qwen["lm_head.weight"]) == ("embedding", "head")
    deepseek = _kinds("deepseek_v3")
    assert deepseek["model.layers.3.mlp.shared_experts.up_proj.weight"] == "mlp"
    assert deepseek["model.layers.0.mlp.up_proj.weight"] == "mlp"  # a dense first layer
    assert deepseek["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"] == "attention"
    bamba = _kinds("bamba")
    assert {bamba[n] for n in bamba if ".mamba." in n and "norm" not in n} == {"attention"}
    assert {bamba[n] for n in bamba if ".feed_forward." in n} == {"mlp"}
    gpt2 = _kinds("gpt2", "transformer.h.*")  # transformers' Conv1D is GPT-2's linear: its class says nothing of the kind
    assert gpt2["transformer.h.0.mlp.c_fc.weight"] == gpt2["transformer.h.0.mlp.c_proj.weight"] == "mlp"
    assert gpt2["transformer.h.0.attn.c_attn.weight"] == "attention"
    nemotron = _kinds("nemotron_h")  # layers 0-3 of the twin: Mamba, MoE, attention, MLP, each named `mixer`
    assert nemotron["model.layers.0.mixer.in_proj.weight"] == "attention"  # Mamba
    assert nemotron["model.layers.2.mixer.q_proj.weight"] == "attention"
    assert nemotron["model.layers.1.mixer.experts.up_proj"] == "experts"
    assert nemotron["model.layers.1.mixer.gate.weight"] == "routers"
    assert nemotron["model.layers.1.mixer.shared_experts.up_proj.weight"] == "mlp"
    assert nemotron["model.layers.3.mixer.up_proj.weight"] == "mlp"
    recurrent = _kinds("recurrent_gemma")  # its RG-LRU's gates are [heads, width, width]: a mixer, not experts
    temporal = {recurrent[n] for n in recurrent if ".temporal_block." in n and "norm" not in n}
    assert temporal == {"attention"}, temporal
    assert {recurrent[n] for n in recurrent if ".mlp_block." in n} == {"mlp"}


def test_a_verdict_without_a_result_counts_as_failed_with_nothing_sharded():
    """A report read back from a rank that died (no result.json) takes every default: the zoo and derive
    still count it (failed, an empty shard report), never an exception."""
    from tpplan.prove.shards import parallel_status, sharded_fractions
    from tpplan.prove.verdict import CheckReport

    report = CheckReport(ok=False, tp=2, dp=1, world_size=2, failure={"message": "rank 1 died"})
    assert report.sharded == {} and report.sharded_rules == []
    assert parallel_status(report) == "failed" and sharded_fractions(report.sharded) == {}
