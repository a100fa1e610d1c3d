"""Styles for architectures beyond Llama that the zoo needs, resolved on meta models (no process
group): MLA's kv_a_proj (its rotary width read off the model, so one spec fits the model and its
twin), an identity expert inside MoE experts (LongCat before transformers 5.25)."""

from __future__ import annotations

import pytest

from tpplan.core.errors import SpecError
from tpplan.model.sources import build_model, load_config, shrink_config
from tpplan.plan.resolve import resolve
from tpplan.render.render import render_spec
from tpplan.spec.loader import load_spec_text

MLA = """
name: mla
model: {pretrained: false, dtype: float32, config: {model_type: minicpm3}, tokenizer: {build: byte_bpe}}
mesh: {tp: 2}
train: {seq_length: 32}
plan:
  - match: model.layers.*
    plan:
      - {match: self_attn.q_b_proj, style: colwise}
      - {match: self_attn.kv_a_proj_with_mqa, style: mla_kv_a_proj%s}
      - {match: self_attn.kv_b_proj, style: colwise}
      - {match: self_attn.o_proj, style: rowwise}
"""


def _entry(plan, suffix):
    return next(e for e in plan.entries if e.fqn.endswith(suffix))


def test_mla_kv_a_proj_reads_the_rotary_width_off_the_model_and_its_twin(tmp_path):
    spec = load_spec_text(MLA % "")
    config = load_config(spec.model)
    full = resolve(spec, build_model(config), tp=2)
    twin = resolve(spec, build_model(shrink_config(config, 2)), tp=2)
    assert config.qk_rope_head_dim == 32
    assert _entry(full, "0.self_attn.kv_a_proj_with_mqa").rule.rope_dim == 32
    assert _entry(twin, "0.self_attn.kv_a_proj_with_mqa").rule.rope_dim == 4
    # the rule of the resolved plan carries it too: what compile prints, per rule
    use = next(u for u in full.rules if u.pattern.endswith("kv_a_proj_with_mqa"))
    assert use.rule.code() == "MLAKVAProjParallel(rope_dim=32)"
    script = render_spec(spec, tmp_path).files["train.py"]
    assert "MLAKVAProjParallel(rope_dim=32)" in script and "class MLAKVAProjParallel(ParallelStyle):" in script


def test_mla_kv_a_proj_refuses_a_rotary_width_that_leaves_no_compressed_kv():
    spec = load_spec_text(MLA % ", rope_dim: 4096")
    with pytest.raises(SpecError, match=r"rope_dim 4096 leaves nothing of its 288 output features"):
        resolve(spec, build_model(load_config(spec.model)), tp=2)


def test_mla_kv_a_proj_takes_a_linear_only():
    spec = load_spec_text((MLA % "").replace("self_attn.kv_a_proj_with_mqa, style", "self_attn.kv_a_layernorm, style"))
    with pytest.raises(SpecError, match="mla_kv_a_proj cannot style model.layers.0.self_attn.kv_a_layernorm"):
        resolve(spec, build_model(load_config(spec.model)), tp=2)


def _identity_expert_moe():
    """LongCat's MoE as transformers < 5.25 held it (5.25 folded the identity expert into the MoE's
    forward): 3-D experts, a parameter-free identity expert inside them, a router with a weight."""
    import torch
    import torch.nn as nn

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_up_proj = nn.Parameter(torch.empty(4, 16, 8))
            self.down_proj = nn.Parameter(torch.empty(4, 8, 8))
            self.identity_expert = nn.Identity()

    class Router(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.empty(4, 8))

    class Mlp(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = Experts()
            self.router = Router()

    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mlp = Mlp()

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Layer(), Layer()])

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, input_ids, position_ids=None):
            raise NotImplementedError  # resolved on the meta device only

    with torch.device("meta"):
        return Model()


def test_moe_identity_expert_takes_a_module_without_parameters():
    spec = load_spec_text("""
name: longcat
model: {pretrained: false, dtype: float32, config: {model_type: llama}}
plan:
  - {match: model.layers.*.mlp.experts, style: expert_tensor_parallel}
  - {match: model.layers.*.mlp.experts.identity_expert, style: moe_identity_expert}
  - {match: model.layers.*.mlp.router, style: moe_identity_expert}
""")
    with pytest.raises(SpecError) as info:
        resolve(spec, _identity_expert_moe(), tp=2)
    assert "moe_identity_expert on model.layers.0.mlp.router (Router): it has parameters" in str(info.value)
    assert "identity_expert:" not in str(info.value)


