"""`tpplan check` always answers with a verdict: a crash, a hang or a killed rank inside the ranks
becomes a failure naming the phase and the module or parameter, exit 1, never a traceback.

Ranks are forked from the test process (``launcher="fork"``: no torch import per rank) except
where the torchrun path itself is under test.  Faults no plan produces on demand (an exception
in a given phase, a hung or killed rank) are injected with TPPLAN_CHECK_FAULT."""

from __future__ import annotations

import json
import textwrap

import pytest

from tests.conftest import SPECS, cli
from tpplan.prove.check import run_check
from tpplan.spec.loader import load_spec

pytestmark = pytest.mark.slow
TINY = SPECS / "tiny-llama.yaml"


@pytest.fixture
def fault(monkeypatch):
    def inject(kind: str, rank: int, phase: str):
        monkeypatch.setenv("TPPLAN_CHECK_FAULT", f"{kind}:{rank}:{phase}")

    return inject


@pytest.mark.parametrize("phase", ["building the twin", "the sharded backward", "clipping gradients"])
def test_an_exception_before_during_or_after_the_sharded_step_is_a_verdict(fault, phase):
    fault("raise", 1, phase)
    report = run_check(load_spec(TINY), tp=2, launcher="fork", timeout=120)
    assert not report.ok
    failure = report.failure
    assert failure["phase"] == phase and "fault injected" in failure["error"], failure
    assert phase in failure["message"] and "without" not in failure["message"]
    assert failure["error_site"]  # file:line of the raise, instead of a traceback


def test_an_exception_in_a_module_names_the_module(fault):
    fault("raise", 0, "the sharded forward")  # raised as the forward enters the model
    report = run_check(load_spec(TINY), tp=2, launcher="fork", timeout=120)
    assert not report.ok and report.failure["phase"] == "the sharded forward"
    assert "fault injected" in report.failure["error"]


def test_a_hung_rank_is_a_verdict_naming_where_it_hung(fault):
    fault("hang", 1, "the optimizer step")
    report = run_check(load_spec(TINY), tp=2, launcher="fork", timeout=25)
    assert not report.ok and report.failure["phase"] == "timeout"
    assert "did not finish within 25 s" in report.failure["message"]
    assert "rank 1 was in the optimizer step" in report.failure["message"]


def test_a_killed_rank_under_torchrun_is_a_verdict_from_the_cli(fault, tmp_path):
    result = cli("check", str(TINY), "--json", env={"TPPLAN_CHECK_FAULT": "kill:1:comparing gradients"})
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    failure = json.loads(result.stdout)["failure"]
    assert failure["phase"] == "died"
    assert "rank 1 was in comparing gradients (parameter model.embed_tokens.weight)" in failure["message"]
    assert "without a verdict" not in failure["message"]


def test_a_killed_forked_rank_is_a_verdict(fault):
    fault("kill", 0, "the unsharded backward")
    report = run_check(load_spec(TINY), tp=2, launcher="fork", timeout=60)
    assert report.failure["phase"] == "died"
    assert "rank 0 was killed by SIGKILL" in report.failure["message"]
    assert "rank 0 was in the unsharded backward" in report.failure["message"]


def test_gradient_present_on_one_side_only_is_named(tmp_path):
    # Cohere's per-head q/k norms switched off in the sharded model only (a fix-up): their
    # weights get a gradient in the unsharded model and none in the sharded one
    spec = tmp_path / "cohere-qk-norm-off.yaml"
    spec.write_text(textwrap.dedent("""\
        name: cohere-qk-norm-off
        model:
          pretrained: false
          config: {model_type: cohere, use_qk_norm: true, hidden_size: 64, intermediate_size: 128,
                   num_attention_heads: 4, num_key_value_heads: 2, num_hidden_layers: 2, vocab_size: 256}
        mesh: {tp: 2}
        plan:
          - {match: "model.layers.*.self_attn.[qkv]_proj", style: colwise}
          - {match: model.layers.*.self_attn.o_proj, style: rowwise}
        fixups:
          - {match: model.layers.*.self_attn, attr: use_qk_norm, op: set, value: false}
        train: {seq_length: 64, batch_size: 2}
        """))
    report = run_check(load_spec(spec), tp=2, launcher="fork", timeout=120)
    assert not report.ok
    message = report.failure["message"]
    assert message.startswith("a gradient exists on one side only: model.layers.0.self_attn.q_norm.weight "
                              "(unsharded model only)"), message
    assert report.failure["parameter"] == "model.layers.0.self_attn.q_norm.weight"


def test_parameters_without_gradient_on_either_side_compare_equal(tmp_path):
    # ERNIE 4.5 MoE's router bias (e_score_correction_bias) is a parameter the step never
    # differentiates: no gradient on either side, which is agreement (a TypeError in the ranks before)
    from tpplan.hf.import_hf import import_hf

    spec = tmp_path / "ernie.yaml"
    spec.write_text(import_hf("ernie4_5_moe").text)
    report = run_check(load_spec(spec), tp=2, launcher="fork", timeout=120)
    assert report.ok, report.failure
    assert report.parameters_without_gradient == ["model.layers.1.mlp.gate.moe_statics.e_score_correction_bias"]


def test_a_gradient_summed_over_tp_only_is_named_with_the_reason(tmp_path):
    # Apertus under transformers' own plan: check names the parameter and why, instead of
    # "no module output differs on its own"; the import's correction proves
    from tpplan.hf.import_hf import import_hf

    for correct in (False, True):
        spec = tmp_path / f"apertus-{correct}.yaml"
        spec.write_text(import_hf("apertus", correct=correct).text)
        report = run_check(load_spec(spec), tp=2, launcher="fork", timeout=120)
        if correct:
            assert report.ok, report.failure
            continue
        failure = report.failure
        assert failure["reason"] == "gradient_needs_tp_sum"
        assert failure["message"].startswith("gradient of model.layers.0.mlp.act_fn.alpha_p differs by ")
        assert "it is applied to a tp-sharded activation; sum its gradient over tp" in failure["message"]
        assert "sequence_dim: -1" in failure["hint"]


def test_mla_k_rot_gradient_is_named_and_mla_kv_a_proj_proves(tmp_path):
    # MiniCPM3 (MLA): with kv_a_proj_with_mqa left replicated, the rotary key k_rot (its last
    # qk_rope_head_dim output features) feeds each rank's own heads only: check names those features
    # (the rest of its gradient is complete); transformers' mla_kv_a_proj, imported as the tpplan
    # style, sums k_rot's gradient over tp and proves
    from tpplan.hf.import_hf import import_hf

    text = import_hf("minicpm3").text
    assert "{match: self_attn.kv_a_proj_with_mqa, style: mla_kv_a_proj}  # hf: mla_kv_a_proj" in text
    for replicated in (True, False):
        spec = tmp_path / f"minicpm3-{replicated}.yaml"
        spec.write_text(text.replace("style: mla_kv_a_proj}", "style: replicate}") if replicated else text)
        report = run_check(load_spec(spec), tp=2, launcher="fork", timeout=120)
        if not replicated:
            assert report.ok, report.failure
            continue
        failure = report.failure
        assert failure["reason"] == "gradient_rows_need_tp_sum", failure
        # the last layer's (its wrong input gradient then spoils everything before it); the twin's
        # kv_a_proj_with_mqa has kv_lora_rank 16 + qk_rope_head_dim 4 output features
        assert failure["message"].startswith("gradient of model.layers.1.self_attn.kv_a_proj_with_mqa.weight differs by ")
        assert "its output features 16:20 (of 20)" in failure["message"]
        assert "style: mla_kv_a_proj" in failure["hint"]
