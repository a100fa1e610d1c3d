"""The simulator's arithmetic (memory, FSDP shards, ring bytes, the Megatron floor) and the shape of
its JSON, on the tiny Llama (fake process group in this process; a few seconds)."""

from __future__ import annotations

import math

import pytest

from tests.conftest import REPO, SPECS
from tpplan.simulate.arithmetic import (
    activation_formula_bytes,
    fsdp_shard_numel,
    megatron_sp_floor,
    memory_budget,
)
from tpplan.simulate.comm import ring_bytes
from tpplan.simulate.simulator import compare, simulate
from tpplan.spec.loader import load_spec

GIB = 2**30

# -- pure arithmetic --------------------------------------------------------------------------


def test_memory_budget_counts_weights_grads_and_two_adamw_states():
    m = memory_budget(params=1000, bytes_per_param=2, activations=500, buffers=100, device_bytes=10**6)
    assert m["parameters_bytes"] == 2000
    assert m["gradients_bytes"] == 2000
    assert m["optimizer_bytes"] == 4000  # exp_avg + exp_avg_sq, each in the parameter dtype
    assert m["total_bytes"] == 2000 + 2000 + 4000 + 500 + 100
    assert m["fits"]


def test_memory_budget_fits_exactly_at_the_device_size_and_not_a_byte_over():
    at = memory_budget(params=10, bytes_per_param=4, activations=0, device_bytes=160)
    over = memory_budget(params=10, bytes_per_param=4, activations=1, device_bytes=160)
    assert at["fits"] and not over["fits"]


@pytest.mark.parametrize(
    ("shape", "dp", "expected"),
    [((10, 4), 1, 40), ((10, 4), 4, 12), ((8, 4), 4, 8), ((3,), 8, 1), ((), 4, 1), ((128256, 2048), 64, 2004 * 2048)],
)
def test_fsdp_shard_is_the_first_torch_chunk_padded(shape, dp, expected):
    assert fsdp_shard_numel(shape, dp) == expected


@pytest.mark.parametrize(
    ("op", "n", "full", "sent"),
    [("all_gather", 8, 800, 700), ("reduce_scatter", 8, 800, 700), ("all_reduce", 8, 800, 1400),
     ("all_to_all", 4, 400, 300), ("all_reduce", 1, 800, 0)],
)
def test_ring_bytes_sent_per_rank(op, n, full, sent):
    assert ring_bytes(op, n, full) == sent


def test_megatron_floor_for_llama_8b_is_eight_hidden_size_collectives_per_layer():
    # 32 layers x 8 x 7/8 x (1024 x 4096 x 2 bytes) = 1.75 GiB
    floor = megatron_sp_floor(seq=1024, batch=1, hidden=4096, layers=32, tp=8, dtype_bytes=2)
    assert floor == 32 * 8 * 7 * 1024 * 4096 * 2 // 8
    assert floor / GIB == pytest.approx(1.75)
    assert megatron_sp_floor(seq=1024, batch=1, hidden=4096, layers=32, tp=1, dtype_bytes=2) == 0


def test_activation_formula_is_korthikanti_with_and_without_sp():
    kw = dict(seq=1024, batch=2, hidden=4096, vocab=128256, layers=32, tp=8, dtype_bytes=2)
    sbh = 1024 * 2 * 4096
    sp = activation_formula_bytes(**kw, sequence_parallel=True, loss_parallel=True)
    plain = activation_formula_bytes(**kw, sequence_parallel=False, loss_parallel=False)
    assert sp["per_layer_bytes"] == 34 * sbh // 8
    assert plain["per_layer_bytes"] == sbh * (10 + 24 // 8)
    assert sp["logits_bytes"] == 1024 * 2 * (128256 // 8) * (2 + 4)  # vocab-sharded under loss parallel
    assert plain["logits_bytes"] == 1024 * 2 * 128256 * (2 + 4)  # full logits on every rank
    assert sp["total_bytes"] == 32 * sp["per_layer_bytes"] + sp["logits_bytes"]


# -- the simulation on the tiny Llama -----------------------------------------------------------

TOP_KEYS = {"spec", "model", "model_class", "dtype", "precision", "activation_checkpointing", "grad_accum_steps",
            "compile", "float8", "async_tp", "tp", "dp", "ep", "world_size", "seq_length", "batch_size",
            "loss_parallel", "sequence_parallel", "layers", "simulated_layers", "extrapolated", "memory",
            "communication", "warnings", "seconds", "plan"}
MEMORY_KEYS = {"device_memory_gib", "precision", "param_dtype", "compute_dtype", "reduce_dtype", "dtype",
               "bytes_per_param", "activation_checkpointing", "grad_accum_steps", "parameters", "experts",
               "activations", "without_fsdp", "with_fsdp"}
BUDGET_KEYS = {"parameters", "parameters_bytes", "gradients_bytes", "optimizer_bytes", "activations_bytes",
               "fsdp_buffers_bytes", "accumulated_gradients_bytes", "total_bytes", "fits"}
ROW_KEYS = {"module", "rule", "phase", "mesh_dim", "op", "group_size", "dtype", "count", "bytes", "ring_bytes"}


@pytest.fixture(scope="module")
def tiny_dp2():
    return simulate(load_spec(SPECS / "tiny-llama.yaml", []), tp=2, dp=2, seq_length=32, batch_size=2)


def test_json_keys(tiny_dp2):
    data = tiny_dp2.to_dict()
    assert set(data) == TOP_KEYS
    assert set(data["memory"]) == MEMORY_KEYS
    assert set(data["memory"]["parameters"]) == {"total", "sharded_by_tp", "replicated_over_tp",
                                                 "per_rank_without_fsdp", "per_rank_with_fsdp"}
    assert BUDGET_KEYS <= set(data["memory"]["with_fsdp"]) and BUDGET_KEYS <= set(data["memory"]["without_fsdp"])
    assert {"per_layer_bytes", "per_layer_kind_bytes", "layers_bytes", "outside_layers_bytes", "logits_bytes",
            "total_bytes", "formula", "formula_bytes", "source"} == set(data["memory"]["activations"])
    comm = data["communication"]
    assert set(comm) == {"representative_layer", "per_layer", "layer_kinds", "outside_layers", "summary", "total",
                         "megatron_sp_floor_ring_bytes", "ratio_to_floor", "float8"}
    assert set(comm["total"]) == {"count", "bytes", "ring_bytes", "tp_ring_bytes", "dp_ring_bytes", "ep_ring_bytes",
                                  "all_to_all_ring_bytes", "per_layer_ring_bytes", "block_dp_all_gather_ring_bytes"}
    assert data["memory"]["experts"] == {"total": 0, "per_rank_without_fsdp": 0, "per_rank_with_fsdp": 0}  # dense
    for row in comm["per_layer"] + comm["outside_layers"]:
        assert set(row) == ROW_KEYS
    assert {"pattern", "style", "modules"} == set(data["plan"][0])
    assert (data["tp"], data["dp"], data["ep"], data["world_size"]) == (2, 2, 1, 4)


def test_parameter_arithmetic_tp_then_fsdp(tiny_dp2):
    p = tiny_dp2.data["memory"]["parameters"]
    assert p["total"] == p["sharded_by_tp"] + p["replicated_over_tp"]
    # tiny widths divide by tp: exact
    assert p["per_rank_without_fsdp"] == p["sharded_by_tp"] // 2 + p["replicated_over_tp"]
    # FSDP splits each tp-local tensor's dim 0 over dp (64-wide norms and 128-row shards divide by 2)
    assert p["per_rank_with_fsdp"] == p["per_rank_without_fsdp"] // 2
    mem = tiny_dp2.data["memory"]
    assert mem["with_fsdp"]["parameters_bytes"] == p["per_rank_with_fsdp"] * 4  # float32
    assert mem["with_fsdp"]["fsdp_buffers_bytes"] > 0 and mem["without_fsdp"]["fsdp_buffers_bytes"] == 0


def test_collectives_split_by_mesh_dim_and_phase(tiny_dp2):
    comm = tiny_dp2.data["communication"]
    total = comm["total"]
    assert total["ring_bytes"] == total["tp_ring_bytes"] + total["dp_ring_bytes"]
    assert total["tp_ring_bytes"] > 0 and total["dp_ring_bytes"] > 0
    per_layer = {(r["module"], r["phase"], r["mesh_dim"], r["op"]): r["count"] for r in comm["per_layer"]}
    # sequence parallel: one all-gather into attention and into the MLP, one reduce-scatter out of each
    assert per_layer[("model.layers.*.self_attn", "forward", "tp", "all_gather")] == 1
    assert per_layer[("model.layers.*.self_attn.o_proj", "forward", "tp", "reduce_scatter")] == 1
    assert per_layer[("model.layers.*.mlp", "backward", "tp", "reduce_scatter")] == 1
    # FSDP2: each block all-gathered in forward and again in backward, gradients reduce-scattered
    assert per_layer[("model.layers.*", "forward", "dp", "all_gather")] == 1
    assert per_layer[("model.layers.*", "backward", "dp", "all_gather")] == 1
    assert per_layer[("model.layers.*", "backward", "dp", "reduce_scatter")] == 1
    # the loss-parallel cross-entropy's all-reduces (max, sum of exp, target logit)
    loss = [r for r in comm["outside_layers"] if r["module"] == "(loss)" and r["phase"] == "forward"]
    assert sum(r["count"] for r in loss) == 3


def test_extrapolating_identical_blocks_equals_simulating_all_of_them():
    spec = load_spec(SPECS / "tiny-llama.yaml", ["model.config.num_hidden_layers=6"])
    kw = dict(tp=2, dp=2, seq_length=16, batch_size=1)
    fast = simulate(spec, **kw).data
    full = simulate(spec, all_layers=True, **kw).data
    assert (fast["simulated_layers"], full["simulated_layers"], fast["layers"]) == (3, 6, 6)
    assert fast["extrapolated"] and not full["extrapolated"]
    assert fast["communication"]["total"] == full["communication"]["total"]
    assert fast["communication"]["summary"] == full["communication"]["summary"]
    assert fast["memory"]["activations"]["total_bytes"] == full["memory"]["activations"]["total_bytes"]
    assert fast["memory"]["parameters"] == full["memory"]["parameters"]


def test_compare_rows_rank_plans_by_bytes(tiny_dp2):
    plain = simulate(load_spec(REPO / "tests" / "data" / "plans" / "megatron-plain.yaml", []), tp=2, dp=1,
                     seq_length=32, batch_size=2)
    rows = compare([tiny_dp2, plain])
    assert [r["spec"] for r in rows] == ["tiny-llama", "megatron-plain"]
    assert rows[0]["ratio_to_first"] == 1.0
    assert rows[1]["ratio_to_first"] == pytest.approx(rows[1]["ring_bytes"] / rows[0]["ring_bytes"], rel=1e-3)
    assert math.isclose(rows[1]["dp_ring_bytes"], 0)


def test_activations_do_not_depend_on_fsdp(tiny_dp2):
    tp_only = simulate(load_spec(SPECS / "tiny-llama.yaml", []), tp=2, dp=1, seq_length=32, batch_size=2)
    a, b = tp_only.data["memory"]["activations"], tiny_dp2.data["memory"]["activations"]
    assert a["total_bytes"] == b["total_bytes"] > 0
    # sequence + loss parallel: the logits each rank holds are vocab-sharded (seq 32 x batch 2 x 512/2 x fp32)
    assert a["logits_bytes"] == 32 * 2 * 256 * 4
    assert tp_only.data["memory"]["with_fsdp"] == tp_only.data["memory"]["without_fsdp"]  # dp=1: nothing to shard


MOE_TWIN = """extends: {specs}/qwen3-moe.yaml
name: tiny-moe
model:
  name: null
  pretrained: false
  dtype: bfloat16  # grouped matmuls of experts on fake tensors take bf16
  config: {{model_type: qwen3_moe, hidden_size: 32, intermediate_size: 64, moe_intermediate_size: 16,
           num_attention_heads: 4, num_key_value_heads: 2, head_dim: 8, num_hidden_layers: 2, num_experts: 4,
           num_experts_per_tok: 2, vocab_size: 256, max_position_embeddings: 64}}
mesh: {{tp: 2, dp: 1, ep: {ep}}}
{extra}"""


def moe_plan(tmp_path, ep: int, extra: str = "", **kwargs):
    path = tmp_path / f"tiny-moe-{ep}.yaml"
    path.write_text(MOE_TWIN.format(specs=SPECS, ep=ep, extra=extra))
    return simulate(load_spec(path), seq_length=16, batch_size=2, **kwargs).data


def test_expert_memory_and_all_to_all_bytes(tmp_path):
    # 2 layers x 4 experts x (gate_up [32, 32] + down [32, 16]) = 12288 expert parameters
    etp = moe_plan(tmp_path, 1)  # expert tensor parallel, tp=2: every expert's intermediate dim halved
    assert etp["memory"]["experts"] == {"total": 12288, "per_rank_without_fsdp": 6144, "per_rank_with_fsdp": 6144}
    assert etp["communication"]["total"]["all_to_all_ring_bytes"] == 0
    ep = moe_plan(tmp_path, 2, "plan_overrides:\n  - {match: 'model.layers.*.mlp.experts', style: expert_parallel}\n",
                  tp=1)  # expert parallel, ep=2: half the experts per rank, whole
    assert (ep["tp"], ep["ep"], ep["world_size"]) == (1, 2, 2)
    assert ep["memory"]["experts"]["per_rank_without_fsdp"] == 6144
    rows = [r for r in ep["communication"]["per_layer"] if r["op"] == "all_to_all" and r["dtype"] == "bfloat16"]
    # dispatch and combine, forward and backward: 16 tokens x 2 sequences x top-2 = 64 pairs of 32 bf16
    # values each way, half of them to the other rank (balanced routing)
    assert {(r["phase"], r["mesh_dim"], r["count"]) for r in rows} == {("forward", "ep", 2), ("backward", "ep", 2)}
    assert all(r["bytes"] == 2 * 64 * 32 * 2 for r in rows)
    assert ep["communication"]["total"]["all_to_all_ring_bytes"] > 0
    assert ep["communication"]["total"]["ep_ring_bytes"] > 0


def test_fewer_layers_of_a_config_with_read_only_per_layer_properties():
    """Bamba's layers_block_type is a property computed from its fields: the simulator's shortened
    config is rebuilt by its class (attention indices kept inside), not assigned to."""
    from transformers import BambaConfig

    from tpplan.simulate.blocks import with_layers

    full = BambaConfig(num_hidden_layers=8, attn_layer_indices=[1, 5])
    short = with_layers(full, "num_hidden_layers", 3)
    assert short.num_hidden_layers == 3 and short.attn_layer_indices == [1]
    assert short.layers_block_type == ["linear_attention", "full_attention", "linear_attention"]
    assert full.num_hidden_layers == 8  # the full config is left as it was
