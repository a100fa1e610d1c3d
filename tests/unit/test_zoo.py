"""tpplan zoo without running it: which types, the totals, and the matrix's Markdown and JSON."""

from __future__ import annotations

import pytest

from tpplan.core.errors import TpplanError
from tpplan.zoo.matrix import SAMPLE, ModeResult, Row, planned_types, select, to_json, to_markdown, totals


def test_planned_types_are_the_configs_with_a_tp_plan():
    types, causal = planned_types()
    assert len(types) >= 150 and len(causal) >= 100  # 166 and 119 in transformers 5.25 (164 and 116 in 5.24)
    assert {"llama", "qwen3_moe", "phi3"} <= causal <= set(types)
    assert set(SAMPLE) <= causal


def test_select_only_sample_and_unknown_names():
    types, causal = planned_types()
    assert select(types, only=["qwen3", "llama"]) == ["llama", "qwen3"]  # in matrix order
    chosen = select(types, sample=10, causal=causal)
    assert len(chosen) == 10 and set(SAMPLE) <= set(chosen) and set(chosen) <= causal
    with pytest.raises(TpplanError, match="did you mean llama"):
        select(types, only=["lama"])


def _rows():
    shares = {"embedding": 1.0, "attention": 1.0, "mlp": 1.0}
    ok = ModeResult("proven", "check", max_abs_logit_diff=1e-7, max_abs_grad_diff=2e-7,
                    max_abs_param_diff=1e-8, max_rel_grad_error=6e-7, sharded=shares)
    partial = ModeResult("partial", "check", reason="experts whole on every rank", max_rel_grad_error=4e-7,
                         sharded={**shares, "experts": 0.0}, replicated=["experts"])
    refused = ModeResult("refused", "import", reason="cannot upgrade this plan | to sequence parallel")
    failed = ModeResult("failed", "job", reason="did not finish within 300 s")
    return [
        Row("llama", True, plain=ok, sp=ok, bytes_transformers_plan=2 * 2**30, bytes_tpplan_plan=2**30),
        Row("moe", True, plain=partial, sp=refused),
        Row("odd", True, plain=failed, sp=refused, hf_plan_bugs=["plain: gradient of x differs"]),
        Row("vision", False, plain=refused, sp=refused),
    ]


def test_totals_count_causal_lms_and_all():
    rows = _rows()
    assert totals(rows)["plain"] == {"proven": 1, "partial": 1, "refused": 0, "failed": 1, "not run": 0}
    assert totals(rows, causal_only=False)["plain"]["refused"] == 1 and totals(rows, False)["types"] == 4


def test_matrix_markdown_and_json():
    data = to_json(_rows(), seconds=90, command="tpplan zoo -o docs")
    assert data["totals_causal_lm"]["sp"]["proven"] == 1 and len(data["rows"]) == 4
    text = to_markdown(data)
    assert "Reproduce: `tpplan zoo -o docs`" in text
    # the headline counts only plans that shard attention and MLP/experts; experts whole: a column of its own
    assert "| transformers' plan (plain) | 1 / 3 (33%) | 1 | 0 | 1 |" in text
    shares = "embedding 100%, attention 100%, mlp 100%"
    assert f"| llama | proven (6.0e-07) | {shares} | proven (6.0e-07) | 2.00 | 1.00 |" in text
    assert f"| moe | partial (4.0e-07): experts whole | {shares}, experts 0% |" in text
    assert "cannot upgrade this plan \\| to sequence parallel" in text  # table cells escape |
    assert "vision (not a causal LM)" in text and "plain: gradient of x differs" in text
