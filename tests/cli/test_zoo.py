"""`tpplan zoo` on the representative sample (CI, every change): one model type per family the
zoo covers -- dense, per-head norms, MoE, mixed dense/MoE with MLA, packed projections, tied
embeddings, hybrid attention/SSM, attention sinks, an AdamW step that magnifies gradient rounding, and a
transformers plan that import-hf corrects -- imported,
resolved and proven by check at tp=2, plain and sequence parallel, into the matrix files."""

from __future__ import annotations

import json

import pytest

from tests.conftest import cli
from tpplan.zoo.matrix import SAMPLE

pytestmark = pytest.mark.slow


def test_representative_sample_is_proven(tmp_path):
    result = cli("zoo", "--sample", str(len(SAMPLE)), "--jobs", "2", "--no-bytes", "--no-derive", "-o", str(tmp_path),
                 timeout=900)
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == 0, result.stderr  # 1 when any type failed
    data = json.loads((tmp_path / "zoo.json").read_text())
    rows = {r["model_type"]: r for r in data["rows"]}
    assert set(rows) == set(SAMPLE)
    for name, row in rows.items():
        assert row["plain"]["status"] == "proven", (name, row["plain"])
        assert row["plain"]["max_abs_grad_diff"] <= 1e-5
        # sequence parallel: proven, or refused with a reason where the architecture does not allow it
        assert row["sp"]["status"] == "proven" or (row["sp"]["status"] == "refused" and row["sp"]["reason"]), row["sp"]
    assert rows["glm4_moe_lite"]["sp"]["status"] == "refused"
    assert "Glm4MoeLiteMLP in some blocks and Glm4MoeLiteMoE in others" in rows["glm4_moe_lite"]["sp"]["reason"]
    # transformers' plan for Apertus is wrong; the import corrects it, and the row says both
    apertus = rows["apertus"]
    assert any("model.layers.*.mlp.act_fn" in c for c in apertus["import_changes"])
    assert any("gradient of model.layers.0.mlp.act_fn.alpha_p differs" in b for b in apertus["hf_plan_bugs"])
    # Gemma 3n: every gradient agrees; where the unsharded AdamW step from the unsharded gradients differs
    # (entries near eps), check proves the step by replaying it on the sharded gradients
    gemma = rows["gemma3n_text"]["plain"]
    if gemma["max_abs_param_diff"] > 1e-5:
        assert gemma["max_abs_param_diff_same_gradients"] <= 1e-5, gemma
    assert data["totals_causal_lm"]["plain"]["proven"] == len(SAMPLE)
    markdown = (tmp_path / "zoo.md").read_text()
    assert f"| transformers' plan (plain) | {len(SAMPLE)} / {len(SAMPLE)} (100%) | 0 | 0 |" in markdown
    assert f"Reproduce: `tpplan zoo --sample {len(SAMPLE)} --jobs 2 --no-bytes --no-derive -o " in markdown


def test_unknown_type_is_bad_input():
    result = cli("zoo", "--only", "lama")
    assert result.returncode == 2 and "did you mean llama?" in result.stderr and "Traceback" not in result.stderr
