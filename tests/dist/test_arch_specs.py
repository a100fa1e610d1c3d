"""Every shipped architecture spec, proven by `tpplan check` on 2 and on 4 CPU gloo ranks.

Each check is one torchrun of the spec's shrunken twin (same architecture and plan, 2 layers) whose
logits, loss, gradients, gradient norm, weights and AdamW state after each of 3 steps must equal the
unsharded model's, each tensor within 1e-4 of its largest unsharded value.  The 4-rank run of each
architecture is tp=4 where its head counts matter most, dp=2 x tp=2 where FSDP meets something
particular to the architecture.
"""

from __future__ import annotations

import pytest

from tests.conftest import SPECS, cli
from tpplan.prove.check import run_check
from tpplan.spec.loader import load_spec

pytestmark = pytest.mark.slow

# spec -> (tp, dp) of its 4-rank run, and why that one
FOUR_RANKS = {
    "qwen2": (4, 1),  # 4 kv heads at full size: tp=4 gives each rank one kv head (and its q/k/v biases)
    "qwen3": (2, 2),  # the per-head q/k norms' summed gradients under FSDP
    "mistral": (4, 1),  # Llama's block: the widest tp
    "gemma2": (2, 2),  # tied embedding/lm_head, re-tied after TP, then sharded by FSDP
    "phi3": (2, 2),  # packed qkv/gate_up (_StridedShard over tp) under FSDP, which splits them on dim 1
    "qwen3-moe": (2, 2),  # experts sharded by tp (expert tensor parallel) and by FSDP over dp
}


def assert_ok(report, tp, dp):
    assert report.ok, report.failure
    assert (report.tp, report.dp, report.world_size) == (tp, dp, tp * dp)
    assert max(report.tolerance_used.values()) <= 1  # each tensor within atol + rtol x its largest value
    assert report.loss_parallel is True
    assert report.parameters_compared > 0


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_architecture_on_2_ranks(name):
    assert_ok(run_check(load_spec(SPECS / f"{name}.yaml"), tp=2), 2, 1)


@pytest.mark.parametrize("name", list(FOUR_RANKS))
def test_architecture_on_4_ranks(name):
    tp, dp = FOUR_RANKS[name]
    assert_ok(run_check(load_spec(SPECS / f"{name}.yaml"), tp=tp, dp=dp), tp, dp)


@pytest.mark.parametrize(
    "source,flags",
    [("meta-llama/Llama-3.1-8B", []), ("Qwen/Qwen2.5-7B", ["--sequence-parallel"])],
    ids=["llama-plain", "qwen2-sequence-parallel"],
)
def test_imported_spec_validates_and_checks(tmp_path, source, flags):
    """import-hf output, as a user runs it: import, validate, check (tp=2) from the command line."""
    import json

    out = tmp_path / "imported.yaml"
    result = cli("import-hf", source, *flags, "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert cli("validate", str(out)).returncode == 0
    checked = cli("check", str(out), "--tp", "2", "--json")
    assert checked.returncode == 0, checked.stdout + checked.stderr
    report = json.loads(checked.stdout)
    assert report["ok"] is True and report["tp"] == 2
    assert report["loss_parallel"] is bool(flags)
    assert max(report["tolerance_used"].values()) <= 1
