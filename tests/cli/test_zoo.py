"""`tpplan zoo` on the representative sample (CI, every change): one model type per family the
zoo covers -- dense, per-head norms, MoE, mixed dense/MoE with MLA, packed projections, tied
embeddings, hybrid attention/SSM, attention sinks, gradient entries near AdamW's default eps, and a
transformers plan that import-hf corrects -- imported, resolved and proven by check at tp=2, plain and
sequence parallel, into the matrix files; a plan that leaves attention, MLP or experts whole is partial."""

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
        plain = row["plain"]
        # proven, or (Bamba: transformers' plan shards only its MLP) equal with the attention left whole
        expected = ("partial", ["attention"]) if name == "bamba" else ("proven", [])
        assert (plain["status"], plain["replicated"]) == expected, (name, plain)
        mlp = max(plain["sharded"].get("mlp", 0), plain["sharded"].get("experts", 0))
        assert plain["max_rel_grad_error"] <= 1e-4 and mlp > 0.5, (name, plain)
        # sequence parallel: proven (or partial like its plain plan), or refused with a reason where the
        # architecture does not allow it
        assert row["sp"]["status"] in ("proven", "partial") or (row["sp"]["status"] == "refused"
                                                               and row["sp"]["reason"]), row["sp"]
    assert rows["glm4_moe_lite"]["sp"]["status"] == "refused"
    assert "Glm4MoeLiteMLP in some blocks and Glm4MoeLiteMoE in others" in rows["glm4_moe_lite"]["sp"]["reason"]
    assert rows["qwen3_moe"]["plain"]["sharded"]["experts"] == 1.0
    # transformers' plan for Apertus is wrong; the import corrects it, and the row says both
    apertus = rows["apertus"]
    assert any("model.layers.*.mlp.act_fn" in c for c in apertus["import_changes"])
    assert any("gradient of model.layers.0.mlp.act_fn.alpha_p differs" in b for b in apertus["hf_plan_bugs"])
    # Gemma 3n: gradient entries near AdamW's default eps; check's own eps keeps its step well-conditioned,
    # so the weights after every step agree with the unsharded run's (nothing replayed)
    assert rows["gemma3n_text"]["plain"]["status"] == "proven"
    assert data["totals_causal_lm"]["plain"]["proven"] == len(SAMPLE) - 1
    markdown = (tmp_path / "zoo.md").read_text()
    assert f"| transformers' plan (plain) | {len(SAMPLE) - 1} / {len(SAMPLE)} (90%) | 1 | 0 | 0 |" in markdown
    assert "| bamba | partial (" in markdown and "): attention whole |" in markdown
    assert f"Reproduce: `tpplan zoo --sample {len(SAMPLE)} --jobs 2 --no-bytes --no-derive -o " in markdown


def test_unknown_type_is_bad_input():
    result = cli("zoo", "--only", "lama")
    assert result.returncode == 2 and "did you mean llama?" in result.stderr and "Traceback" not in result.stderr
