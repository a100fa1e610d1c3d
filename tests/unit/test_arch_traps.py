"""Per-architecture traps, caught at resolve time with the arithmetic, on the real (bundled) configs.

Each shipped architecture spec is resolved against its full-size model on the meta device (no
weights, no process group): kv heads fewer than tp, an MLP width or a vocabulary that tp does not
divide, a fused projection split contiguously, a per-head norm left replicated."""

from __future__ import annotations

import pytest

from tests.conftest import SPECS
from tpplan.core.errors import ResolveError, TpplanError
from tpplan.plan.stage import resolve_spec
from tpplan.spec.loader import load_spec


def resolve_error(spec: str, tp: int, *overrides: str) -> str:
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec(SPECS / f"{spec}.yaml", list(overrides)), tp=tp)
    assert isinstance(info.value, ResolveError) or hasattr(info.value, "errors")
    return str(info.value)


# -- the shipped specs resolve at their own mesh ----------------------------------------------


@pytest.mark.parametrize(
    "spec,tp", [("qwen2", 4), ("qwen3", 8), ("mistral", 8), ("gemma2", 8), ("phi3", 8), ("qwen3-moe", 4)]
)
def test_shipped_spec_resolves_at_full_size(spec, tp):
    plan = resolve_spec(load_spec(SPECS / f"{spec}.yaml"), tp=tp)
    assert plan.tp == tp and plan.loss_parallel


def test_gemma2_keeps_its_tied_embeddings_tied():
    plan = resolve_spec(load_spec(SPECS / "gemma2.yaml"), tp=8)
    assert [(t.owner, t.others, t.layout) for t in plan.tied] == [("model.embed_tokens.weight", ("lm_head.weight",), "shard(0)")]


# -- kv heads fewer than tp ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec,tp,kv,label",
    [
        ("qwen2", 8, 4, "tp(8) > kv_heads(4)"),  # Qwen2.5-7B: 28 query heads, 4 kv heads
        ("qwen3-moe", 8, 4, "tp(8) > kv_heads(4)"),  # Qwen3-30B-A3B: 32 query heads, 4 kv heads
        ("gemma2", 16, 8, "tp(16) > kv_heads(8)"),  # Gemma 2 9B: 16 query heads, 8 kv heads
        ("mistral", 16, 8, "tp(16) > kv_heads(8)"),
    ],
)
def test_kv_heads_fewer_than_tp(spec, tp, kv, label):
    text = resolve_error(spec, tp)
    assert label in text
    assert f"splits {kv} kv heads" in text
    assert "model.layers.0.self_attn.k_proj: colwise splits" in text  # v_proj folded into "... more like it"


# -- an MLP width tp does not divide (a 6-GPU node as tp=3 x dp=2) -----------------------------


@pytest.mark.parametrize(
    "spec,width", [("qwen2", 18944), ("mistral", 14336), ("gemma2", 14336)]
)
def test_intermediate_size_not_divisible(spec, width):
    text = resolve_error(spec, 3)
    assert f"mlp.gate_proj: colwise splits {width} output features over tp=3: {width} % 3 = {width % 3}" in text
    assert f"mlp.down_proj: rowwise splits {width} input features over tp=3: {width} % 3 = {width % 3}" in text


def test_intermediate_override_not_divisible_on_phi3():
    # Phi-3's MLP is one fused gate_up_proj, packed colwise: tp must divide each part (F % tp), not
    # just the packed 2F rows (torchtitan #4535): 16382 % 2 == 0 but 8191 % 2 == 1
    text = resolve_error("phi3", 2, "model.config.intermediate_size=8191")
    assert ("mlp.gate_up_proj: packed_colwise splits each of its 2 parts (gate: 8191 features) over tp=2: "
            "8191 % 2 = 1") in text
    assert "mlp.down_proj: rowwise splits 8191 input features over tp=2: 8191 % 2 = 1" in text


def test_phi3_packed_qkv_checks_the_heads_of_each_part():
    text = resolve_error("phi3", 3)
    assert ("model.layers.0.self_attn.qkv_proj: packed_colwise splits each of [q 3072 | k 3072 | v 3072] over "
            "tp=3: 32 heads (x head_dim 96): 32 % 3 = 2") in text


def test_phi3_packed_parts_must_be_what_the_projection_packs(tmp_path):
    wrong = tmp_path / "phi3-parts.yaml"
    wrong.write_text(
        f"extends: {SPECS / 'phi3.yaml'}\nname: phi3-parts\nplan_overrides:\n"
        "  - {match: model.layers.*.self_attn.qkv_proj, style: packed_colwise, parts: 2}\n"
    )
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec(wrong), tp=2)
    text = str(info.value)
    assert "qkv_proj packs [q 3072 | k 3072 | v 3072] on its 9216 output features: 3 parts, not 2" in text
    assert "hint: parts: 3" in text
    # grouped-query attention: k and v narrower than q -- a strided split cannot hold unequal parts
    text = resolve_error("phi3", 2, "model.config.num_key_value_heads=8")
    assert "qkv_proj packs [q 3072 | k 768 | v 768] on its 4608 output features: parts of unequal sizes" in text
    assert "output_layouts: replicate" in text


# -- a vocabulary tp does not divide (a fine-tune that added one token) -------------------------


@pytest.mark.parametrize(
    "spec,vocab",
    [("mistral", 32769), ("qwen2", 152065), ("gemma2", 256001)],
)
def test_vocabulary_not_divisible(spec, vocab):
    text = resolve_error(spec, 2, f"model.config.vocab_size={vocab}")
    assert f"model.embed_tokens: rowwise splits {vocab} vocabulary over tp=2: {vocab} % 2 = 1" in text
    assert f"lm_head: colwise splits {vocab} vocabulary over tp=2: {vocab} % 2 = 1" in text
    assert "pad_to_multiple_of=2" in text


# -- fused projections and per-head norms -------------------------------------------------------


def test_phi3_fused_qkv_plain_colwise_is_refused(tmp_path):
    spec = tmp_path / "phi3-plain.yaml"
    spec.write_text(
        f"extends: {SPECS / 'phi3.yaml'}\nname: phi3-plain\nplan_overrides:\n"
        "  - {match: model.layers.*.self_attn.qkv_proj, style: colwise}\n"
        "  - {match: model.layers.*.mlp.gate_up_proj, style: colwise}\n"
    )
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec(spec), tp=2)
    text = str(info.value)
    assert ("model.layers.0.self_attn.qkv_proj packs q, k and v into one Linear ([q 3072 | k 3072 | v 3072] "
            "output features)") in text
    assert "rank 0 would hold all of q and 1536 of 3072 k features" in text
    assert "model.layers.0.mlp.gate_up_proj packs gate and up into one Linear ([gate 8192 | up 8192]" in text
    assert "(and 31 more modules like it)" in text
    assert "hint: style: packed_colwise with parts: 3" in text
    assert "style: packed_colwise with parts: 2" in text


def test_phi3_rowwise_after_a_whole_fused_projection_is_refused(tmp_path):
    spec = tmp_path / "phi3-half.yaml"
    spec.write_text(
        f"extends: {SPECS / 'phi3.yaml'}\nname: phi3-half\nplan_overrides:\n"
        "  - {match: model.layers.*.mlp.gate_up_proj, style: replicate}\n"
        "  - {match: model.layers.*.mlp.down_proj, style: rowwise, output_layouts: shard(1), use_local_output: false}\n"
    )
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec(spec), tp=2)
    text = str(info.value)
    assert "model.layers.0.mlp.down_proj: rowwise takes its input as already split over tp" in text
    assert "the fused gate_up_proj before it is left whole" in text
    assert "would get all 8192 input features on every rank and read them as 1/2 of 16384" in text


@pytest.mark.parametrize("spec,heads", [("qwen3", 32), ("qwen3-moe", 32)])
def test_per_head_norm_left_replicated_is_refused(spec, heads):
    # qwen3.yaml says it in plan_overrides, qwen3-moe.yaml in its plan: take both out
    overrides = ["plan_overrides=[]"]
    if spec == "qwen3-moe":
        overrides.append("plan_overrides=[{match: 'model.layers.*.self_attn.[qk]_norm', style: replicate}]")
    text = resolve_error(spec, 4, *overrides)
    assert "model.layers.0.self_attn.q_norm normalizes single heads (weight [128] = head_dim)" in text
    assert f"each rank's gradient covers only its own {heads // 4} of {heads} heads" in text
    assert "sequence_dim" in text and "replicated_with_grad_allreduce" in text


# -- MoE experts: parameter-level rules, expert tensor parallel ---------------------------------


def test_qwen3_moe_experts_sharded_by_expert_tensor_parallel():
    plan = resolve_spec(load_spec(SPECS / "qwen3-moe.yaml"), tp=4)
    styles = {e.fqn: type(e.rule).__name__ for e in plan.entries}
    assert styles["model.layers.0.mlp.experts"] == "ExpertTensorParallelRule"
    assert "model.layers.0.mlp.gate" not in styles  # the router: no rule, replicated
    # 768 intermediate features per expert: tp must divide them (and 4 kv heads cap tp at 4 anyway)
    text = resolve_error("qwen3-moe", 4, "model.config.moe_intermediate_size=766")
    assert ("model.layers.0.mlp.experts: expert_tensor_parallel splits each expert's 766 intermediate features "
            "(of gate, of up, and down_proj's input) over tp=4: 766 % 4 = 2") in text


def test_parameter_level_rules(tmp_path):
    spec = tmp_path / "moe-params.yaml"
    spec.write_text(
        f"extends: {SPECS / 'qwen3-moe.yaml'}\nname: moe-params\nplan_overrides:\n"
        "  - {match: model.layers.*.mlp.gate.weight, style: replicate}\n"  # a parameter, said so
    )
    plan = resolve_spec(load_spec(spec), tp=4)
    entry = next(e for e in plan.entries if e.fqn == "model.layers.0.mlp.gate.weight")
    assert entry.module_type == "Parameter" and not entry.rule.applies
    # a module style on a parameter: refused, located, with what to do instead
    spec.write_text(
        f"extends: {SPECS / 'qwen3-moe.yaml'}\nname: moe-params\nplan_overrides:\n"
        "  - {match: model.layers.*.mlp.experts.gate_up_proj, style: colwise}\n"
        "  - {match: model.layers.*.mlp.experts.gate_up_prj, style: replicate}\n"
    )
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec(spec), tp=4)
    text = str(info.value)
    assert ("moe-params.yaml:4:61: error: plan_overrides[0].style: colwise on model.layers.0.mlp.experts.gate_up_proj: "
            "the pattern names a parameter, not a module, and colwise styles modules") in text
    assert "(mlp.experts: expert_tensor_parallel or expert_parallel)" in text
    assert "moe-params.yaml:5:13: error: plan_overrides[1].match: pattern 'model.layers.*.mlp.experts.gate_up_prj' " \
        "matches no module" in text  # a typo is still an error
    # colwise on the experts module itself says which style does take it
    spec.write_text(
        f"extends: {SPECS / 'qwen3-moe.yaml'}\nname: moe-params\nplan_overrides:\n"
        "  - {match: model.layers.*.mlp.experts, style: colwise}\n"
    )
    with pytest.raises(TpplanError, match="MoE experts .3-D weights. take expert_tensor_parallel"):
        resolve_spec(load_spec(spec), tp=4)
