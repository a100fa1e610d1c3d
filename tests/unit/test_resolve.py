"""Resolve: rules x a real (meta-device) model -> plan, and every resolve-time error with its numbers."""

from __future__ import annotations

import textwrap

import pytest

from tests.conftest import REPO, SPECS
from tpplan.core.errors import SpecError, SpecErrors
from tpplan.core.patterns import matches
from tpplan.model.sources import build_model, load_config, shrink_config
from tpplan.plan.resolve import resolve
from tpplan.plan.stage import resolve_spec
from tpplan.spec.loader import load_spec, load_spec_text

TINY = """
name: t
model:
  pretrained: false
  dtype: float32
  config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
           num_key_value_heads: 2, num_hidden_layers: 2, vocab_size: 256, max_position_embeddings: 64}
train: {seq_length: 32}
"""


def spec_with(body: str):
    return load_spec_text(TINY + textwrap.dedent(body))


def tiny_model(spec):
    return build_model(load_config(spec.model), device="meta")


def errors_of(exc) -> list[str]:
    return [str(e) for e in exc.errors] if isinstance(exc, SpecErrors) else [str(exc)]


def resolve_errors(body: str, tp: int = 2) -> list[str]:
    spec = spec_with(body)
    with pytest.raises(SpecError) as info:
        resolve(spec, tiny_model(spec), tp=tp, seq_length=spec.train.seq_length)
    return errors_of(info.value)


@pytest.mark.parametrize(
    "pattern,name,expected",
    [
        ("model.layers.*.self_attn.q_proj", "model.layers.3.self_attn.q_proj", True),
        ("model.layers.*.self_attn.[qkv]_proj", "model.layers.3.self_attn.v_proj", True),
        ("model.layers.*.self_attn.[qkv]_proj", "model.layers.3.self_attn.o_proj", False),
        ("model.layers.*", "model.layers.3.self_attn", False),  # * never crosses a dot
        ("lm_head", "lm_head", True),
        ("LM_head", "lm_head", False),  # case-sensitive, like torch on Linux
    ],
)
def test_pattern_semantics_are_torch_parallelize_module(pattern, name, expected):
    assert matches(pattern, name) is expected


def test_llama3_8b_resolves_on_meta_with_readable_counts():
    plan = resolve_spec(load_spec(SPECS / "llama3.yaml"))
    counts = {use.pattern: len(use.matches) for use in plan.rules}
    assert plan.tp == 8
    assert counts["model.layers.*.self_attn.[qkv]_proj"] == 96
    assert counts["model.layers.*.mlp.[gu]*_proj"] == 64
    assert counts["lm_head"] == 1
    assert len(plan.entries) == 1 + 32 * 11 + 2  # embed, 11 per block, norm, lm_head
    assert plan.loss_parallel and plan.logits_module == "lm_head"
    assert plan.blocks == ("model.layers.*",)
    codes = {e.fqn: e.code() for e in plan.entries}
    assert codes["model.layers.0.mlp.down_proj"] == "RowwiseParallel(output_layouts=Shard(1), use_local_output=False)"
    assert codes["model.layers.0.input_layernorm"] == "SequenceParallel()"


def test_nested_rules_are_relative_and_ordered_by_module():
    spec = spec_with("""
        plan:
          - match: model.layers.*
            plan:
              - {match: mlp.down_proj, style: rowwise}
              - {match: "mlp.[gu]*_proj", style: colwise}
          - {match: lm_head, style: colwise, output_layouts: replicate}
    """)
    plan = resolve(spec, tiny_model(spec), tp=2)
    assert [e.fqn for e in plan.entries][:3] == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj",
                                                 "model.layers.0.mlp.down_proj"]


def test_pattern_matching_nothing_names_the_rule_and_the_closest_modules():
    [message] = resolve_errors("""
        plan:
          - match: model.layers.*
            plan:
              - {match: self_attn.q_prj, style: colwise}
    """)
    assert "<spec>:" in message and "plan[0].plan[0].match" in message
    assert "pattern 'self_attn.q_prj' matches no module under any of the 2 modules matched by model.layers.*" in message
    assert "closest module names under model.layers.0: self_attn.q_proj" in message


def test_two_rules_giving_one_module_different_styles_is_an_error():
    [message] = resolve_errors("""
        plan:
          - {match: "model.layers.*.mlp.*_proj", style: colwise}
          - {match: model.layers.*.mlp.down_proj, style: rowwise}
          - {match: lm_head, style: colwise, output_layouts: replicate}
    """)
    assert "module model.layers.0.mlp.down_proj gets two different styles: colwise from plan[0]" in message
    assert "rowwise from plan[1]" in message and "plan_overrides" in message


def test_the_same_instruction_twice_is_harmless():
    spec = spec_with("""
        plan:
          - {match: "model.layers.*.mlp.[gu]*_proj", style: colwise}
          - {match: model.layers.*.mlp.up_proj, style: colwise}
          - {match: lm_head, style: colwise, output_layouts: replicate}
    """)
    assert len(resolve(spec, tiny_model(spec), tp=2).entries) == 5


def test_plan_overrides_replace_earlier_rules():
    spec = spec_with("""
        plan:
          - {match: "model.layers.*.mlp.*_proj", style: colwise}
          - {match: lm_head, style: colwise, output_layouts: replicate}
        plan_overrides:
          - {match: model.layers.*.mlp.down_proj, style: rowwise}
          - {match: model.layers.1.mlp.up_proj, style: replicate}
    """)
    plan = resolve(spec, tiny_model(spec), tp=2)
    styles = {e.fqn: e.style for e in plan.entries}
    assert styles["model.layers.0.mlp.down_proj"] == "rowwise"
    assert styles["model.layers.1.mlp.up_proj"] == "replicate"
    assert styles["model.layers.0.mlp.up_proj"] == "colwise"
    first = plan.rules[0]
    assert "model.layers.0.mlp.down_proj" not in first.matches and len(first.matches) == 3


@pytest.mark.parametrize(
    "rule,expected",
    [
        ("{match: model.norm, style: colwise}", "colwise cannot shard model.norm (LlamaRMSNorm)"),
        ("{match: model.layers.0.mlp, style: rowwise}", "rowwise cannot shard model.layers.0.mlp (LlamaMLP)"),
        ("{match: model.layers.0.mlp.up_proj, style: sequence_parallel}", "sequence_parallel on model.layers.0.mlp.up_proj (Linear)"),
    ],
)
def test_style_on_a_module_it_cannot_shard(rule, expected):
    [message] = resolve_errors(f"plan:\n  - {rule}\n  - {{match: lm_head, style: colwise, output_layouts: replicate}}\n")
    assert expected in message


def test_tp_larger_than_kv_heads_is_refused_with_the_numbers():
    messages = resolve_errors("""
        plan:
          - {match: "model.layers.*.self_attn.[qkv]_proj", style: colwise}
          - {match: lm_head, style: colwise, output_layouts: replicate}
    """, tp=4)
    [kv] = [m for m in messages if "kv heads" in m]
    assert "model.layers.0.self_attn.k_proj: colwise splits 2 kv heads (32 output features = 2 x head_dim 16) over tp=4: tp(4) > kv_heads(2)" in kv
    assert "(and 3 more modules like it)" in kv


def test_llama3_8b_at_tp16_refuses_kv_heads():
    with pytest.raises(SpecError) as info:
        resolve_spec(load_spec(SPECS / "llama3.yaml"), tp=16)
    text = str(info.value)
    assert "tp(16) > kv_heads(8)" in text
    assert "specs/llama3.yaml:" in text


def test_vocabulary_not_divisible_suggests_padding():
    spec = load_spec_text(TINY.replace("vocab_size: 256", "vocab_size: 255") + "plan:\n  - {match: lm_head, style: colwise, output_layouts: replicate}\n")
    with pytest.raises(SpecError) as info:
        resolve(spec, tiny_model(spec), tp=2)
    assert "lm_head: colwise splits 255 vocabulary over tp=2: 255 % 2 = 1" in str(info.value)
    assert "pad_to_multiple_of=2" in str(info.value)




def test_sequence_length_not_divisible():
    spec = load_spec_text(TINY.replace("seq_length: 32", "seq_length: 33") + textwrap.dedent("""
        plan:
          - {match: model.norm, style: sequence_parallel}
          - {match: lm_head, style: colwise, input_layouts: shard(1), output_layouts: replicate}
    """))
    with pytest.raises(SpecError) as info:
        resolve(spec, tiny_model(spec), tp=2, seq_length=33)
    assert "train.seq_length: sequence parallel splits the sequence over tp=2, but seq_length 33 % 2 = 1" in str(info.value)


def test_loss_parallel_needs_vocab_sharded_dtensor_logits():
    [message] = resolve_errors("""
        loss_parallel: true
        plan:
          - {match: lm_head, style: colwise, output_layouts: replicate}
    """)
    assert "loss_parallel needs the logits vocab-sharded as a DTensor" in message


def test_local_vocab_shards_without_loss_parallel_are_refused():
    [message] = resolve_errors("""
        plan:
          - {match: lm_head, style: colwise}
    """)
    assert "lm_head hands on vocab-sharded logits as plain local tensors" in message


def test_tied_embeddings_sharded_two_ways_are_refused():
    with pytest.raises(SpecError) as info:
        resolve_spec(load_spec(REPO / "tests/data/plans/tied-mismatch.yaml"), tp=2)
    text = str(info.value)
    assert "tied-mismatch.yaml:8:" in text  # points at the override that broke the tie
    assert "model.embed_tokens.weight and lm_head.weight are one parameter (tied)" in text
    assert ("hold it in model.embed_tokens (colwise, plan_overrides[0] at line 8) as shard(1) and in lm_head "
            "(colwise, plan[3] at specs/llama3.yaml:61) as shard(0)") in text


def test_tied_embeddings_sharded_alike_are_kept_tied():
    plan = resolve_spec(load_spec(REPO / "tests/data/plans/tied-rowwise.yaml"), tp=2)
    [tie] = plan.tied
    assert (tie.owner, tie.others, tie.layout) == ("model.embed_tokens.weight", ("lm_head.weight",), "shard(0)")


def test_llama32_1b_bundled_config_is_tied_and_resolves():
    spec = load_spec(SPECS / "llama3.yaml", ["model.name=meta-llama/Llama-3.2-1B"])
    plan = resolve_spec(spec)
    assert plan.tied and plan.tied[0].layout == "shard(0)"


def test_fixups_skip_missing_attributes_and_report_them():
    spec = spec_with("""
        plan:
          - {match: lm_head, style: colwise, output_layouts: replicate}
        fixups:
          - {match: model.layers.*.self_attn, attr: num_heads, op: floordiv_tp}
          - {match: model.layers.*.self_attn, attr: num_key_value_groups, op: set, value: 2}
    """)
    plan = resolve(spec, tiny_model(spec), tp=2)
    skipped = [f for f in plan.fixups if not f.present]
    applied = [f for f in plan.fixups if f.present]
    assert len(skipped) == 2 and len(applied) == 2
    assert applied[0].before == 2 and applied[0].after == 2
    assert any("have no attribute 'num_heads'" in w and "skipped" in w for w in plan.warnings)


def test_fixup_missing_attribute_under_error_policy():
    [message] = resolve_errors("""
        plan:
          - {match: lm_head, style: colwise, output_layouts: replicate}
        fixups:
          - {match: model.layers.*.self_attn, attr: num_heads, op: floordiv_tp, missing: error}
    """)
    assert "2 of 2 modules matched by 'model.layers.*.self_attn' have no attribute 'num_heads'" in message


def test_fixup_floordiv_must_divide():
    [message] = resolve_errors("""
        plan:
          - {match: lm_head, style: colwise, output_layouts: replicate}
        fixups:
          - {match: model.layers.*.self_attn, attr: layer_idx, op: floordiv_tp}
    """, tp=2)
    assert "model.layers.1.self_attn.layer_idx = 1 does not divide by tp=2" in message


def test_chapter_plain_embedding_is_flagged_before_check():
    spec = load_spec(REPO / "tests/data/plans/chapter-plain.yaml")
    plan = resolve_spec(spec, tp=2)
    assert any("model.embed_tokens: colwise on an Embedding" in w for w in plan.warnings)


def test_shrunken_twin_keeps_ratios_and_divides():
    config = load_config(load_spec(SPECS / "llama3.yaml").model)  # 8 kv heads, 4 query heads each
    for tp in (2, 4, 8):
        twin = shrink_config(config, tp)
        # two kv heads per rank where the model has them (head order inside a slice matters), else one
        assert twin.num_key_value_heads == (2 * tp if tp <= 4 else tp)
        assert twin.num_attention_heads == 2 * twin.num_key_value_heads  # the GQA group kept (at most 2)
        assert twin.hidden_size == twin.num_attention_heads * twin.head_dim
        assert twin.intermediate_size % (2 * tp) == 0
        assert twin.vocab_size % tp == 0 and twin.num_hidden_layers == 2
