"""tpplan derive, proven: plans derived for Llama, Qwen3, Gemma 2, Phi-3 (packed fused projections), a
MoE (Qwen3-30B-A3B), Granite-SWA (attention sinks split with the heads), HY-V4 (hyper-connections: four
parallel streams of the hidden state between blocks) and two architectures
transformers ships no plan for (OPT: a head count read from a module attribute, divided by a derived
fix-up; Bloom: ALiBi keeps attention gathered), each checked on 2 and on 4 CPU gloo ranks against the
unsharded model, the ranks forked from the test process.

The 4-rank check is tp=4 where head counts matter, dp=2 x tp=2 where FSDP meets something particular
(tied weights, per-head norms, experts).  OPT goes through derive's own proof (derive with check: the
plan is written only once check passes); the others reuse the session's derivation."""

from __future__ import annotations

import pytest

from tests.conftest import derived
from tpplan.prove.check import run_check
from tpplan.derive import derive
from tpplan.spec.loader import load_spec_text

pytestmark = pytest.mark.slow

# source -> (sequence parallel, (tp, dp) of the 4-rank check)
CASES = {
    "meta-llama/Llama-3.1-8B": (True, (4, 1)),
    "Qwen/Qwen3-8B": (False, (2, 2)),  # per-head q/k norms: gradients summed over tp, then FSDP
    "google/gemma-2-9b": (True, (2, 2)),  # tied embedding and head, four norms per block
    "microsoft/Phi-3-mini-4k-instruct": (True, (4, 1)),  # fused qkv_proj / gate_up_proj: packed, fix-ups
    "Qwen/Qwen3-30B-A3B": (True, (2, 2)),  # MoE: expert tensor parallel, the MoE block run whole
    "opt": (False, (4, 1)),  # no transformers plan: num_heads fix-up
    "bloom": (True, (2, 2)),  # no transformers plan: ALiBi, gathered attention, blocks run whole
    "granite_swa": (True, (2, 2)),  # attention sinks split with the heads (local_params) in the attention's rule
    "hy_v4": (False, (2, 2)),  # hyper-connections: [batch, seq, 4, hidden] between blocks, plain plan
}


def _assert_proven(report, tp, dp):
    assert report.ok, report.failure
    assert (report.tp, report.dp) == (tp, dp)
    assert max(report.tolerance_used.values()) <= 1  # each tensor within atol + rtol x its largest value


@pytest.mark.usefixtures("trust_factories")
def test_own_model_with_an_embedding_that_normalises_its_output_is_proven():
    """A factory model (tests/data/models/normed_embedding.py) whose embedding runs its own RMSNorm
    after the lookup: the embedding stays whole (a vocabulary split's partial sums would pass the
    norm), the blocks and head are sharded, and check proves it at tp=2 (derive refuses to write
    anything check does not prove)."""
    result = derive("tests/data/models/normed-embedding.yaml", launcher="fork")
    _assert_proven(result.report, 2, 1)
    assert result.notes == ["embed stays whole: its forward runs embed_norm after the lookup, which the vocabulary "
                            "split's partial sums cannot go through"]
    assert "- match: head\n" in result.text and "- match: embed\n" not in result.text


@pytest.mark.parametrize("source", list(CASES))
def test_derived_plan_is_proven_on_2_and_4_ranks(source):
    sequence_parallel, (tp, dp) = CASES[source]
    if source == "opt":
        result = derive(source, sequence_parallel=sequence_parallel, launcher="fork")  # proven inside, at tp=2
        _assert_proven(result.report, 2, 1)
        assert "Proven by `tpplan check` at tp=2" in result.text
    else:
        result = derived(source, sequence_parallel)
        _assert_proven(run_check(load_spec_text(result.text, name="derived.yaml"), tp=2, launcher="fork"), 2, 1)
    spec = load_spec_text(result.text, name="derived.yaml")
    assert spec.loss_parallel == result.loss_parallel
    _assert_proven(run_check(spec, tp=tp, dp=dp, launcher="fork"), tp, dp)


def test_a_plan_within_a_parameter_budget_is_proven():
    """Qwen2-MoE with room for its attention whole on every rank (--max-params-per-rank): the attention
    runs whole, the experts and shared experts stay sharded, and derive's own check proves it at tp=2."""
    from tpplan.derive import split_numel

    full = derived("qwen2_moe", False, 8)
    attention = next(g for g in full.analysis.groups[full.analysis.skeleton.blocks[0].name]
                     if g.rowwise == "self_attn.o_proj")
    count, _ = split_numel(full.analysis, attention)
    budget = full.draft.params_per_rank + count - count // 8
    result = derive("qwen2_moe", tp=8, max_params_per_rank=budget, launcher="fork")
    _assert_proven(result.report, 2, 1)
    forms = {g["rowwise"]: g["form"] for g in result.groups}
    assert forms["self_attn.o_proj"] == "replicated" and forms["mlp.experts"] == "sharded"
    assert forms["mlp.shared_expert.down_proj"] == "sharded"
    assert result.draft.params_per_rank == budget
