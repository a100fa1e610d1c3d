"""The plan printed into train.py shards a model exactly as ``tpplan.plan.apply`` does (the code `tpplan
check` proves): same DTensor placements and local shapes for every parameter, same hooks on every
module -- with plan_overrides, whose rules print module names instead of patterns, and fix-ups.

One in-process fake process group of 2 ranks (this process is rank 0): sharding needs no data."""

from __future__ import annotations

import runpy

import pytest
import torch
import torch.distributed as dist

from tpplan.plan.apply import parallelize
from tpplan.model.sources import build_model, load_config
from tpplan.render.render import render_spec

from ..unit.test_render import tiny

pytestmark = pytest.mark.slow

OVERRIDES = """
plan_overrides:
  - {match: model.layers.0.mlp.down_proj, style: replicate}
  - {match: "model.layers.1.mlp.[gu]*_proj", style: rowwise}
fixups:
  - {match: "model.layers.*.self_attn", attr: head_dim, op: floordiv_tp}
model:
  config: {tie_word_embeddings: true}
"""


@pytest.fixture(scope="module")
def fake_world():
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from tpplan.plan.apply import reset_dtensor_state

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()
    reset_dtensor_state()  # nothing of the fake world for the tests after this one


def sharding(model) -> dict:
    from torch.distributed.tensor import DTensor

    params = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if isinstance(param, DTensor):
            params[name] = (tuple(param.placements), tuple(param.to_local().shape), id(param))
        else:
            params[name] = (None, tuple(param.shape), id(param))
    hooks = {name: (len(m._forward_pre_hooks), len(m._forward_hooks)) for name, m in model.named_modules()}
    attrs = {name: getattr(m, "head_dim", None) for name, m in model.named_modules()}
    # tied weights: which names share one parameter
    groups = {}
    for name, (_, _, key) in params.items():
        groups.setdefault(key, []).append(name)
    tied = sorted(tuple(v) for v in groups.values() if len(v) > 1)
    return {"params": {k: v[:2] for k, v in params.items()}, "hooks": hooks, "attrs": attrs, "tied": tied}


@pytest.mark.parametrize("extra", ["", OVERRIDES], ids=["plan", "overrides-fixups-tied"])
def test_rendered_plan_equals_parallelize(fake_world, tmp_path, extra):
    from torch.distributed.device_mesh import init_device_mesh

    spec = tiny(extra)
    rendered = render_spec(spec, tmp_path / "t")
    script = tmp_path / "train.py"
    script.write_text(rendered.files["train.py"])
    generated = runpy.run_path(str(script), run_name="generated_train")  # defines, does not train

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    config = load_config(spec.model)
    by_tpplan = build_model(config, device="meta")
    parallelize(by_tpplan, rendered.plan, mesh)
    by_script = build_model(config, device="meta")
    # as the script's build_model does: its plan, then the step's tie_again of TIED (and check_ties)
    generated["prepare_model"](by_script, mesh, generated["apply_tensor_parallel"], blocks=generated["BLOCKS"],
                               tied=generated["TIED"])

    expected, got = sharding(by_tpplan), sharding(by_script)
    assert got["params"] == expected["params"]
    assert got["hooks"] == expected["hooks"]
    assert got["attrs"] == expected["attrs"]
    assert got["tied"] == expected["tied"]
    sharded = [name for name, (placements, _) in got["params"].items() if placements]
    assert "lm_head.weight" in sharded and "model.layers.1.mlp.down_proj.weight" in sharded
    if extra:
        assert "model.layers.0.mlp.down_proj.weight" not in sharded  # replicated by the override
        assert got["tied"] == [("model.embed_tokens.weight", "lm_head.weight")]
        generated["materialize"](by_script, torch.device("cpu"))  # to_empty keeps the tie
        assert by_script.lm_head.weight is by_script.model.embed_tokens.weight
        assert (
            got["attrs"]["model.layers.0.self_attn"] == config.hidden_size // config.num_attention_heads // 2
        )


# tpplan's own styles (packed colwise, expert tensor parallel, expert parallel): the script prints
# their classes (no tpplan import), shards like tpplan.plan.apply, and its sharded model runs a training
# step (forward, loss, backward) on the fake process group
TWINS = {
    "phi3": {"model_type": "phi3", "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
             "num_key_value_heads": 4, "num_hidden_layers": 2, "vocab_size": 256, "max_position_embeddings": 64,
             "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1},
    "qwen3-moe": {"model_type": "qwen3_moe", "hidden_size": 32, "intermediate_size": 64, "moe_intermediate_size": 16,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8, "num_hidden_layers": 2,
                  "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 256, "max_position_embeddings": 64},
}


def own_style_spec(tmp_path, name: str, extra: str = "", mesh: str = "{tp: 2, dp: 1}"):
    import json

    from tests.conftest import SPECS
    from tpplan.spec.loader import load_spec

    path = tmp_path / f"t-{name}.yaml"
    path.write_text(
        f"extends: {SPECS / (name + '.yaml')}\nname: t-{name}\nmodel:\n  name: null\n  pretrained: false\n"
        f"  dtype: float32\n  tokenizer: {{build: byte_bpe, vocab_size: 256}}\n  config: {json.dumps(TWINS[name])}\n"
        f"mesh: {mesh}\ntrain: {{dataset: tatsu-lab/alpaca, seq_length: 16, batch_size: 2}}\n" + extra)
    return load_spec(path)


@pytest.mark.parametrize(
    "name,extra,styles",
    [
        ("phi3", "", ["PackedColwiseParallel"]),
        ("qwen3-moe", "", ["ExpertTensorParallel"]),
        ("qwen3-moe", "plan_overrides:\n  - {match: 'model.layers.*.mlp.experts', style: expert_parallel}\n",
         ["ExpertParallel"]),
    ],
    ids=["packed-colwise", "expert-tensor-parallel", "expert-parallel"],
)
def test_rendered_own_styles_shard_like_apply_and_run(fake_world, tmp_path, name, extra, styles):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = "{tp: 1, ep: 2, dp: 1}" if "expert_parallel" in extra else "{tp: 2, dp: 1}"
    spec = own_style_spec(tmp_path, name, extra, mesh)
    rendered = render_spec(spec, tmp_path / "t")
    source = rendered.files["train.py"]
    import ast

    imported = {alias.name.split(".")[0] for node in ast.walk(ast.parse(source))
                if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(ast.parse(source))
                 if isinstance(node, ast.ImportFrom) and node.module}
    assert "tpplan" not in imported
    for style in styles:
        assert f"class {style}(ParallelStyle):" in source
    script = tmp_path / "train.py"
    script.write_text(source)
    generated = runpy.run_path(str(script), run_name="generated_train")

    ep = spec.mesh.ep
    mesh = init_device_mesh("cpu", (1, ep, 2 // ep), mesh_dim_names=("dp", "ep", "tp"))
    config = load_config(spec.model)
    by_tpplan = build_model(config, device="meta")
    parallelize(by_tpplan, rendered.plan, mesh)
    by_script = build_model(config, device="meta")
    generated["prepare_model"](by_script, mesh, generated["apply_tensor_parallel"], blocks=generated["BLOCKS"],
                               tied=generated["TIED"],
                               shard_placement_fn=generated["fsdp_shard_placement"])
    assert sharding(by_script)["params"] == sharding(by_tpplan)["params"]
    if ep > 1:
        return  # expert parallel sizes its all-to-alls from values, which the fake process group has not
    generated["materialize"](by_script, torch.device("cpu"))
    with torch.no_grad():
        for param in by_script.parameters():
            param.normal_(std=0.02)
    ids = torch.randint(0, config.vocab_size, (2, 16))
    position_ids = torch.arange(16).unsqueeze(0)
    logits = by_script(input_ids=ids, position_ids=position_ids).logits
    from torch.distributed.tensor.parallel import loss_parallel

    with loss_parallel():
        generated["causal_lm_loss"](logits, ids).backward()
    assert all(p.grad is not None for p in by_script.parameters())
