"""`tpplan plan --resolve`: the resolved plan of Llama-3.1-8B as a readable table (meta device, no weights)."""

from __future__ import annotations

import json

from tests.conftest import SPECS, cli


def test_resolved_plan_table_for_llama3_8b():
    result = cli("plan", str(SPECS / "llama3.yaml"), "--resolve")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "llama3: LlamaForCausalLM at tp=8" in out
    assert "model.layers.*.self_attn.[qkv]_proj" in out  # brackets survive the table renderer
    assert "prepare_input hidden_states:shard(1)->replicate" in out
    assert "loss parallel" in out


def test_resolved_plan_json_lists_every_module():
    result = cli("plan", str(SPECS / "llama3.yaml"), "--resolve", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tp"] == 8
    assert len(data["entries"]) == 355
