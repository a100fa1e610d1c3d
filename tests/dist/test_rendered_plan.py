"""The plan printed into train.py shards a model exactly as ``tpplan.apply`` does (the code `tpplan
check` proves): same DTensor placements and local shapes for every parameter, same hooks on every
module -- with plan_overrides, whose rules print module names instead of patterns, and fix-ups.

One in-process fake process group of 2 ranks (this process is rank 0): sharding needs no data."""

from __future__ import annotations

import runpy

import pytest
import torch
import torch.distributed as dist

from tpplan.apply import apply
from tpplan.models import build_model, load_config
from tpplan.render import render_spec

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

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield
    dist.destroy_process_group()


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
def test_rendered_plan_equals_apply(fake_world, tmp_path, extra):
    from torch.distributed.device_mesh import init_device_mesh

    spec = tiny(extra)
    rendered = render_spec(spec, tmp_path / "t")
    script = tmp_path / "train.py"
    script.write_text(rendered.files["train.py"])
    generated = runpy.run_path(str(script), run_name="generated_train")  # defines, does not train

    mesh = init_device_mesh("cpu", (1, 2), mesh_dim_names=("dp", "tp"))
    config = load_config(spec.model)
    by_tpplan = build_model(config, device="meta")
    apply(by_tpplan, rendered.plan, mesh)
    by_script = build_model(config, device="meta")
    generated["parallelize"](by_script, mesh)

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
