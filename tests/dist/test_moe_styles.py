"""tpplan's MoE expert styles and packed colwise, proven by `tpplan check` against the unsharded model
(logits, loss, every gradient, the clipped gradient norm and the weights after one AdamW step within
1e-5, fp32) on twins of four MoE architectures:

- expert tensor parallel (every expert's intermediate dim over tp, router replicated) on Mixtral,
  DeepSeek-V3 (dense first layers then MoE, shared experts as a dense MLP, MLA attention) and gpt-oss
  (expert biases, clamped SwiGLU on interleaved gate/up, attention sinks, router bias), tp=2;
- expert parallel (whole experts over ep, tokens by all-to-all, ep ranks on different data) on
  Qwen3-MoE at ep=2, and on 4 ranks as ep=2 x tp=2 and dp=2 x ep=2 (FSDP with experts);
- Qwen3-MoE's and Phi-3's shipped specs (expert tensor parallel, packed colwise) are proven by
  tests/dist/test_arch_specs.py.

Unused experts (the twin's router picks few) have no gradient on either side: the EP style still
gives every local shard a (zero) gradient so that all ranks reduce the same tensors.
"""

from __future__ import annotations

import pytest

from tests.conftest import REPO
from tpplan.prove.check import run_check
from tpplan.spec.loader import load_spec

pytestmark = pytest.mark.slow
MOE = REPO / "tests" / "data" / "moe"


def assert_ok(report, tp, dp=1, ep=1):
    assert report.ok, report.failure
    assert (report.tp, report.dp, report.ep, report.world_size) == (tp, dp, ep, tp * dp * ep)
    assert max(report.tolerance_used.values()) <= 1  # each tensor within atol + rtol x its largest value


@pytest.mark.parametrize("name", ["mixtral", "deepseek-v3", "gpt-oss"])
def test_expert_tensor_parallel(name):
    assert_ok(run_check(load_spec(MOE / f"{name}.yaml"), tp=2), 2)


def expert_parallel_spec():
    # specs/qwen3-moe.yaml with its experts expert-parallel (mesh.ep 2)
    return load_spec(REPO / "benchmarks" / "specs" / "qwen3-moe-ep.yaml")


@pytest.mark.parametrize("tp,dp,ep", [(1, 1, 2), (2, 1, 2), (1, 2, 2)], ids=["ep2", "ep2xtp2", "dp2xep2"])
def test_expert_parallel(tp, dp, ep):
    assert_ok(run_check(expert_parallel_spec(), tp=tp, dp=dp, ep=ep), tp, dp, ep)
