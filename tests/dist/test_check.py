"""`tpplan check` on real multi-rank gloo groups (torchrun): sharded == unsharded, or a clear failure.

Each check launches dp*tp CPU ranks and compares logits, loss, every gradient, the gradient norm,
the weights and AdamW's state after each of 3 steps against the unsharded twin, each tensor within
atol + rtol x its largest unsharded value."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, SPECS, cli
from tpplan.prove.check import run_check
from tpplan.spec.loader import load_spec

PLANS = REPO / "tests" / "data" / "plans"
pytestmark = pytest.mark.slow


def assert_equal_within_tolerance(report):
    assert report.ok, report.failure
    assert max(report.tolerance_used.values()) <= 1  # each tensor within atol + rtol x its largest value
    assert report.parameters_compared > 0


def check_json(*args):
    result = cli("check", *args, "--json")
    assert "Traceback" not in result.stderr, result.stderr
    return result.returncode, json.loads(result.stdout)


def test_shipped_llama3_spec_at_its_own_tp8():
    code, report = check_json(str(SPECS / "llama3.yaml"))
    assert code == 0, report
    assert report["ok"] is True and report["tp"] == 8 and report["loss_parallel"] is True
    for key in ("max_abs_logit_diff", "loss_unsharded", "loss_sharded", "max_abs_grad_diff",
                "max_abs_param_diff_after_step"):
        assert report[key] is not None


def test_shipped_tiny_llama_spec():
    code, report = check_json(str(SPECS / "tiny-llama.yaml"))
    assert code == 0 and report["ok"] is True and report["tp"] == 2


def test_plain_megatron_plan():
    assert_equal_within_tolerance(run_check(load_spec(PLANS / "megatron-plain.yaml"), tp=2))


def test_sequence_parallel_plan_without_loss_parallel():
    report = run_check(load_spec(PLANS / "sp-local.yaml"), tp=2)
    assert not report.loss_parallel
    assert_equal_within_tolerance(report)


def test_data_parallel_2_x_tensor_parallel_2_equals_one_big_batch():
    report = run_check(load_spec(SPECS / "llama3.yaml"), tp=2, dp=2)
    assert report.world_size == 4 and report.loss_parallel
    assert_equal_within_tolerance(report)


def test_tensor_parallel_4():
    report = run_check(load_spec(SPECS / "llama3.yaml"), tp=4)
    assert report.world_size == 4
    assert_equal_within_tolerance(report)


def test_chapter_plain_embedding_fails_naming_the_module_whose_layout_is_wrong():
    code, report = check_json(str(PLANS / "chapter-plain.yaml"))
    assert code == 1 and report["ok"] is False
    failure = report["failure"]
    assert failure["wrong_layout_module"] == "model.embed_tokens"
    assert failure["failing_module"] == "model.layers.0.input_layernorm"
    assert "model.embed_tokens has the wrong output layout" in failure["message"]
    assert "output_layouts: replicate" in failure["hint"]
    assert any("colwise on an Embedding" in w for w in report["warnings"])


def test_local_sequence_shards_break_the_eager_causal_mask():
    # Trap: with local (non-DTensor) sequence shards transformers builds the causal mask from the
    # local length. sdpa needs no mask (passes); eager fails, and check says which input and why.
    spec = load_spec(PLANS / "sp-local.yaml", ["model.attn_implementation=eager"])
    report = run_check(spec, tp=2)
    assert not report.ok
    assert report.failure["failing_module"] == "model.layers.0.self_attn"
    assert "attention_mask of shape (2, 1, 8, 8) where the unsharded model has (2, 1, 16, 16)" in report.failure["message"]
    assert "use_local_output: false" in report.failure["hint"]


def test_dtensor_sequence_stream_works_with_eager_attention():
    spec = load_spec(SPECS / "tiny-llama.yaml", ["model.attn_implementation=eager"])
    assert_equal_within_tolerance(run_check(spec, tp=2))


def test_tied_embeddings_stay_tied():
    report = run_check(load_spec(PLANS / "tied-rowwise.yaml"), tp=2)
    assert_equal_within_tolerance(report)  # an untied lm_head would show up as an extra parameter


def test_gradient_clipping_engaged_matches_unsharded_norm():
    report = run_check(load_spec(PLANS / "clip-engaged.yaml"), tp=2, dp=2)
    assert report.grad_norm_unsharded > 0.05  # the clip really scaled the gradients
    unsharded = report.grad_norm_unsharded
    assert abs(report.grad_norm_sharded - unsharded) <= report.relative_tolerance * unsharded
    assert_equal_within_tolerance(report)


def test_check_of_a_spec_that_does_not_resolve_exits_2():
    result = cli("check", str(SPECS / "llama3.yaml"), "--tp", "16")
    assert result.returncode == 2
    assert "tp(16) > kv_heads(8)" in result.stderr and "Traceback" not in result.stderr
