"""Each training feature proven against the unsharded reference by `tpplan check`, which runs THE
training step (tpplan.runtime.step: prepare_model, forward_backward, optimizer_step) on both sides.

The sharded side is prepared as train.py prepares it (the plan, activation checkpointing,
torch.compile per block, FSDP2 with the precision's policy) and trains on grad_accum_steps
micro-batches per dp rank; the unsharded reference never checkpoints, compiles or accumulates: it
runs the whole global batch at once.  So an ok verdict (every tensor within 1e-4 of its largest
unsharded value, after each of 3 steps, in float32) proves that checkpointing, compile and accumulation
leave the gradients, the loss and the updates unchanged.  Ranks are forked from this process (no torch
import per rank); features are grouped into few runs."""

from __future__ import annotations

import pytest

from tests.conftest import SPECS
from tpplan.prove.check import run_check
from tpplan.prove.verdict import ATOL, RTOL, STEPS
from tpplan.spec.loader import load_spec

pytestmark = pytest.mark.slow
TINY = SPECS / "tiny-llama.yaml"


def check(sets, launcher="fork", **kw):
    report = run_check(load_spec(TINY, sets), launcher=launcher, timeout=300, **kw)
    assert report.ok, report.failure
    return report


def assert_exact(report):
    """float32: every compared tensor within 1e-4 of its largest unsharded value after each step (the plan
    proof's own tolerance)."""
    assert report.step["precision"] == "fp32"
    assert (report.tolerance, report.relative_tolerance) == (ATOL, RTOL)
    assert report.steps == STEPS
    assert max(report.tolerance_used.values()) <= 1


def test_full_and_selective_checkpointing_leave_the_gradients_unchanged():
    for mode in ("full", "selective"):
        # torchrun: fresh rank processes.  Forked from a pytest worker that ran other files first, the
        # checkpointed and compiled checks disagreed (state left in the parent; to be found)
        report = check([f"train.activation_checkpointing={mode}"], tp=2, launcher="torchrun")
        assert report.step["activation_checkpointing"] == mode
        assert_exact(report)


def test_accumulation_dp2_x_tp2_equals_one_batch_twice_as_large_with_every_2nd_block_checkpointed():
    report = check(["train.grad_accum_steps=2", "train.activation_checkpointing=2"], tp=2, dp=2)
    assert report.step == {"precision": "fp32", "trains_in": "fp32", "activation_checkpointing": 2,
                           "grad_accum_steps": 2, "compile": False}
    assert_exact(report)
    # FSDP reduce-scattered the gradients after the last micro-batch only: after the first
    # backward the sharded model held no gradient
    assert report.gradient_sync_micro_batches == [1]


def test_torch_compile_per_block_with_tensor_parallel():
    report = check(["train.compile=true"], tp=2, launcher="torchrun")  # fresh ranks: see above
    assert report.step["compile"] is True
    assert_exact(report)


def test_a_16_bit_spec_is_proven_in_fp32_and_a_real_plan_error_still_fails(tmp_path):
    """bf16-mixed: between two correct plans bfloat16 gradients differ by up to 3% of a tensor's largest
    value, as much as some plan errors, so the plan is proven in float32 and the report says so; a plan
    whose gradient is a partial sum (Apertus under transformers' plan: off by half on each tp rank) fails."""
    from tpplan.hf.import_hf import import_hf

    report = check(["train.precision=bf16-mixed"], tp=2, dp=2)
    assert report.step["precision"] == "fp32" and report.step["trains_in"] == "bf16-mixed"
    assert_exact(report)
    assert report.gradient_sync_micro_batches == [0]

    spec = tmp_path / "apertus.yaml"
    spec.write_text(import_hf("apertus", correct=False).text)
    wrong = run_check(load_spec(spec, ["train.precision=bf16-mixed"]), tp=2, launcher="fork", timeout=300)
    assert not wrong.ok and wrong.tolerance_used["gradients"] > 10
    assert wrong.failure["reason"] == "gradient_needs_tp_sum", wrong.failure
