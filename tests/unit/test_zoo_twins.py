"""The zoo's twins and configs, without a process group: shrink keeps per-layer attributes, KV-shared
layers and sectioned stacks consistent; the zoo completes default configs transformers cannot build
from; local_params (attention sinks) resolves with its size checks."""

from __future__ import annotations

import pytest
from transformers import AutoConfig

from tpplan.core.errors import SpecError
from tpplan.model.complete import completed_default
from tpplan.model.shrink import config_get, config_values
from tpplan.model.sources import build_model, shrink_config
from tpplan.plan.resolve import resolve
from tpplan.spec.loader import load_spec_text


def test_per_layer_head_lists_shrink_with_the_heads():
    twin = shrink_config(AutoConfig.for_model("laguna"), 2)  # num_attention_heads_per_layer: 48 each
    assert twin.num_attention_heads == 4 and twin.num_key_value_heads == 2
    assert set(twin.num_attention_heads_per_layer) == {4}
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
    assert config_values(twin, "head_dim") == {8, 16}  # the global layers keep twice the head
    dots3 = shrink_config(AutoConfig.for_model("dots3_note_text"), 2)  # MLA with per-layer heads and nope dims
    assert config_values(dots3, "num_attention_heads") == {2}  # 128 and 64 heads, kv heads alike: 2 each
    # (transformers validated the sliding layers' head_dim = nope + rope when the twin was built)
    assert config_values(dots3, "qk_nope_head_dim") == {8, 4}


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
    with pytest.raises(SpecError, match=r"sinks has 4 entries on dim 0 \(one per head\), which tp=8 does not divide"):
        resolve(load_spec_text(SINKS.replace("colwise}", "replicate}").replace("rowwise}", "replicate}") % "sinks"),
                model, tp=8)


def test_encoder_decoder_configs_shrink_their_decoder_for_the_causal_lm():
    """BART's *ForCausalLM runs its decoder: d_model, decoder heads and ffn width shrink like a decoder
    model's, the encoder's alongside; the layers are cut to the twin's two."""
    twin = shrink_config(AutoConfig.for_model("bart"), 2)
    assert (twin.decoder_layers, twin.encoder_layers) == (2, 2)
    assert twin.decoder_attention_heads == twin.encoder_attention_heads == 2  # = tp (no grouped kv heads)
    assert twin.d_model == 2 * 8 and twin.decoder_ffn_dim < 4096 and twin.encoder_ffn_dim < 4096
    assert sum(p.numel() for p in build_model(twin, device="meta").parameters()) < 1_000_000
