"""`tpplan plan`: memory and communication at full scale, as users run it (a subprocess)."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import REPO, SPECS, cli

PLAIN = str(REPO / "tests" / "data" / "plans" / "megatron-plain.yaml")


@pytest.fixture(scope="module")
def llama_405b():
    result = cli("plan", str(SPECS / "llama3-405b.yaml"), "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_405b_json_shape_and_per_rank_parameters(llama_405b):
    data = llama_405b
    assert (data["tp"], data["dp"], data["world_size"]) == (8, 64, 512)
    assert (data["layers"], data["seq_length"], data["batch_size"]) == (126, 2048, 1)
    params = data["memory"]["parameters"]
    assert params["total"] == pytest.approx(405.85e9, rel=1e-3)
    # tp=8: what each rank holds is the tp-sharded parameters / 8 plus the replicated ones
    expected_tp = params["sharded_by_tp"] / 8 + params["replicated_over_tp"]
    assert params["per_rank_without_fsdp"] == pytest.approx(expected_tp, rel=0.005)
    assert params["per_rank_without_fsdp"] == pytest.approx(50.74e9, rel=1e-3)
    # FSDP over dp=64 divides further (dim-0 chunks, padded)
    assert params["per_rank_with_fsdp"] == pytest.approx(expected_tp / 64, rel=0.005)
    mem = data["memory"]
    assert mem["with_fsdp"]["parameters"] == params["per_rank_with_fsdp"]
    assert not mem["without_fsdp"]["fits"]  # 50.7B parameters per rank: weights + grads + AdamW > 80 GiB
    assert mem["with_fsdp"]["fits"]
    comm = data["communication"]
    assert data["extrapolated"] and data["simulated_layers"] == 3
    assert comm["total"]["dp_ring_bytes"] > comm["total"]["tp_ring_bytes"] > 0
    # the llama3 plan sits on the Megatron-SP floor
    assert 1.0 <= comm["ratio_to_floor"] < 1.05


def test_plan_human_report_has_memory_verdict_and_collectives():
    result = cli("plan", str(SPECS / "tiny-llama.yaml"), "--dp", "2", "--seq-length", "32", "--batch-size", "2",
                 "--device-memory-gib", "0.0014")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "model.layers.*.self_attn.[qkv]_proj" in out  # the resolved plan, brackets intact
    assert "memory per rank" in out
    # tp alone does not fit; FSDP over dp=2 makes the difference
    assert re.search(r"verdict\s*│\s*does not fit in 0\.0014 GiB\s*│\s*fits in 0\.0014 GiB", out), out
    assert "AdamW state" in out and "activations" in out
    assert "collectives per block" in out and "reduce_scatter" in out and "dp (2)" in out
    assert "Megatron-SP expectation" in out


def test_several_specs_side_by_side():
    args = ("--tp", "2", "--dp", "1", "--seq-length", "32", "--batch-size", "2")
    result = cli("plan", str(SPECS / "tiny-llama.yaml"), PLAIN, *args)
    assert result.returncode == 0, result.stderr
    assert "plans compared" in result.stdout
    assert "tiny-llama" in result.stdout and "megatron-plain" in result.stdout
    assert "total bytes/step" in result.stdout
    result = cli("plan", str(SPECS / "tiny-llama.yaml"), PLAIN, *args, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert [p["spec"] for p in data["plans"]] == ["tiny-llama", "megatron-plain"]
    first, second = data["comparison"]
    assert first["ratio_to_first"] == 1.0
    # the plain plan all-reduces once per colwise linear in backward and gathers full logits
    assert second["ring_bytes"] > first["ring_bytes"]


def test_resolve_only_shows_each_plan_and_simulates_nothing():
    result = cli("plan", str(SPECS / "tiny-llama.yaml"), PLAIN, "--resolve")
    assert result.returncode == 0, result.stderr
    assert "tiny-llama: LlamaForCausalLM at tp=2" in result.stdout
    assert "megatron-plain: LlamaForCausalLM at tp=2" in result.stdout
    assert "memory per rank" not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [(("--batch-size", "0"), "argument --batch-size: expected a batch size from 1 to 1,048,576, got 0"),
     (("--seq-length", "33"), "seq_length 33 % 2 = 1"),
     (("--dp", "0"), "argument --dp: expected a data-parallel size from 1 to 1,048,576, got 0")],
)
def test_bad_sizes_are_bad_input(args, message):
    result = cli("plan", str(SPECS / "tiny-llama.yaml"), *args)
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_plan_that_breaks_the_step_names_the_module_and_exits_1():
    # the chapter's plain plan as written: the colwise embedding hands on half of each hidden vector
    result = cli("plan", str(REPO / "tests" / "data" / "plans" / "chapter-plain.yaml"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "the simulated training step failed in model.layers.0" in result.stderr
    assert "tpplan check" in result.stderr
    assert "Traceback" not in result.stderr
