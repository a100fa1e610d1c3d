"""`tpplan import-hf`: transformers' own TP plan -> a spec that validates, maps styles only where
faithful, reports the rest, and (with --sequence-parallel) reproduces the hand-written shipped specs."""

from __future__ import annotations

import json

import pytest

from tests.conftest import SPECS, cli
from tpplan.core.errors import TpplanError
from tpplan.hf.import_hf import import_hf
from tpplan.hf.translate import FAITHFUL, NOT_FAITHFUL
from tpplan.model.sources import bundled_config_path
from tpplan.plan.resolve import resolve
from tpplan.plan.stage import model_source
from tpplan.spec.loader import load_spec, load_spec_text


def styles(spec, model, tp=2):
    plan = resolve(spec, model, tp=tp, seq_length=1024)
    return {e.fqn: (e.rule.style, e.rule.style_kwargs()) for e in plan.entries}, plan


@pytest.mark.parametrize(
    "hub,shipped",
    [
        ("meta-llama/Llama-3.1-8B", "llama3"),
        ("Qwen/Qwen2.5-7B", "qwen2"),
        ("Qwen/Qwen3-8B", "qwen3"),
        ("mistralai/Mistral-7B-v0.3", "mistral"),
        ("google/gemma-2-9b", "gemma2"),
        # transformers gathers Phi-3's fused outputs; specs/phi3.yaml packs them (packed_colwise)
        ("microsoft/Phi-3-mini-4k-instruct", "../benchmarks/specs/phi3-gather"),
        ("Qwen/Qwen3-30B-A3B", "qwen3-moe"),
    ],
)
def test_sequence_parallel_import_equals_the_shipped_spec(hub, shipped):
    """The upgrade of transformers' plan gives, module by module, the plan written by hand (and proven by
    `check` in tests/dist/test_arch_specs.py)."""
    imported = import_hf(hub, sequence_parallel=True)
    mine = load_spec_text(imported.text)
    theirs = load_spec(SPECS / f"{shipped}.yaml")
    model = model_source(theirs).build(device="meta", dtype="float32")
    got, plan = styles(mine, model)
    want, _ = styles(theirs, model)
    assert got == want
    assert mine.loss_parallel and mine.model.name == hub
    assert mine.model.attn_implementation == theirs.model.attn_implementation
    assert plan.warnings == ()


def test_plain_llama_import_is_transformers_plan_one_to_one():
    imported = import_hf("meta-llama/Llama-3.1-8B")
    assert imported.skipped == [] and imported.tp == 8
    assert imported.hf_plan["model.embed_tokens"] == "embedding_rowwise"
    rules = {r.pattern: r.fields for r in imported.rules}
    assert rules == {
        "model.embed_tokens": {"style": "rowwise", "input_layouts": "replicate"},
        "model.layers.*.self_attn.q_proj": {"style": "colwise"},
        "model.layers.*.self_attn.k_proj": {"style": "colwise"},
        "model.layers.*.self_attn.v_proj": {"style": "colwise"},
        "model.layers.*.self_attn.o_proj": {"style": "rowwise"},
        "model.layers.*.mlp.gate_proj": {"style": "colwise"},
        "model.layers.*.mlp.up_proj": {"style": "colwise"},
        "model.layers.*.mlp.down_proj": {"style": "rowwise"},
        "lm_head": {"style": "colwise", "output_layouts": "replicate"},
    }
    spec = load_spec_text(imported.text)
    assert spec.loss_parallel is False and spec.mesh.tp == 8
    assert "# hf: colwise_gather_output" in imported.text


def test_qwen2_picks_tp_4_for_its_4_kv_heads():
    imported = import_hf("Qwen/Qwen2.5-7B")
    assert imported.tp == 4
    assert "tp: 4    # the largest of 8/4/2 that resolves (28 heads, 4 kv heads)" in imported.text


def test_phi3_gathered_fused_projections_map_faithfully():
    rules = {r.pattern: r.fields for r in import_hf("microsoft/Phi-3-mini-4k-instruct").rules}
    assert rules["model.layers.*.self_attn.qkv_proj"] == {"style": "colwise", "output_layouts": "replicate"}
    assert rules["model.layers.*.self_attn.o_proj"] == {"style": "rowwise", "input_layouts": "replicate"}
    assert rules["model.layers.*.mlp.gate_up_proj"] == {"style": "colwise", "output_layouts": "replicate"}


def test_per_head_norm_dim_is_measured_not_guessed():
    # Qwen3 normalizes [batch, seq, heads, head_dim]; Gemma 3 normalizes after the transpose
    qwen3 = {r.pattern: r.fields for r in import_hf("qwen3").rules}
    assert qwen3["model.layers.*.self_attn.q_norm"] == {
        "style": "sequence_parallel", "sequence_dim": 2, "use_local_output": True}
    gemma3 = {r.pattern: r.fields for r in import_hf("gemma3_text").rules}
    assert gemma3["model.layers.*.self_attn.k_norm"]["sequence_dim"] == 1


def test_moe_experts_import_as_expert_tensor_parallel():
    imported = import_hf("Qwen/Qwen3-30B-A3B", sequence_parallel=True)
    rules = {r.pattern: r.fields for r in imported.rules}
    # transformers >= 5.25: the experts are in base_model_ep_plan (ep_dispatch_experts on the module,
    # grouped_gemm on its 3-D weights); < 5.25: moe_tp_experts in the tp plan, packed_colwise / rowwise
    # on its weights.  Either way one tpplan style on the module.
    assert rules["model.layers.*.mlp.experts"] == {"style": "expert_tensor_parallel"}
    assert not any(r.pattern.startswith("model.layers.*.mlp.experts.") for r in imported.rules)
    skipped = {(s.pattern, s.hf_style) for s in imported.skipped}
    assert not skipped, skipped
    mlp = next(r for r in imported.rules if r.pattern == "model.layers.*.mlp")
    assert mlp.fields["style"] == "prepare_input_output" and mlp.fields["use_local_input"] is True


def test_expert_parallel_plan_imports_as_expert_parallel_with_ep():
    import transformers

    if not getattr(transformers.Qwen3MoeConfig, "base_model_ep_plan", None):
        pytest.skip(f"transformers {transformers.__version__} has no base_model_ep_plan (added in 5.25)")
    imported = import_hf("qwen3_moe", ep=2)
    spec = load_spec_text(imported.text)
    assert spec.mesh.ep == 2
    experts = next(r for r in imported.rules if r.pattern == "model.layers.*.mlp.experts")
    assert experts.fields == {"style": "expert_parallel"} and "base_model_ep_plan" in experts.comment


def test_style_table_covers_transformers_registry():
    import transformers.distributed.expert_parallel  # noqa: F401 - registers the expert-parallel styles
    import transformers.distributed.tensor_parallel  # noqa: F401 - registers the tensor-parallel styles
    from transformers.distributed.parallel_utils import ALL_PARALLEL_STYLES

    known = set(FAITHFUL) | set(NOT_FAITHFUL) | {"replicated_with_grad_allreduce"}
    assert set(ALL_PARALLEL_STYLES.valid_keys()) <= known


def test_sources_model_type_folder_and_config_file(tmp_path):
    by_type = load_spec_text(import_hf("qwen2").text)
    assert by_type.model.name is None and by_type.model.config == {"model_type": "qwen2"}
    assert by_type.model.pretrained is False

    folder = tmp_path / "qwen"
    folder.mkdir()
    (folder / "config.json").write_text(bundled_config_path("Qwen/Qwen2.5-7B").read_text())
    out = tmp_path / "specs" / "q.yaml"
    by_folder = import_hf(str(folder), out_path=str(out))
    assert load_spec_text(by_folder.text).model.name == "../qwen"  # relative to the spec's folder
    assert by_folder.tp == 4

    loose = tmp_path / "mistral-like.json"
    loose.write_text(bundled_config_path("mistralai/Mistral-7B-v0.3").read_text())
    spec = load_spec_text(import_hf(str(loose)).text)
    assert spec.model.config["vocab_size"] == 32768 and spec.model.pretrained is False
    assert spec.model.config["rms_norm_eps"] == 1e-05 and spec.model.config["rope_theta"] == 1e6  # floats
    assert "torch_dtype" not in spec.model.config


def test_refusals_are_bad_input():
    with pytest.raises(TpplanError, match="no tensor-parallel plan for GPT2LMHeadModel"):
        import_hf("gpt2")
    with pytest.raises(TpplanError, match="not a file, a folder, a hub id"):
        import_hf("no-such-thing")


def test_cli_writes_a_spec_that_validates(tmp_path):
    out = tmp_path / "qwen3-moe.yaml"
    result = cli("import-hf", "Qwen/Qwen3-30B-A3B", "--sequence-parallel", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "not imported:" not in result.stderr  # the experts come from the ep plan (transformers >= 5.25)
    assert "{match: mlp.experts, style: expert_tensor_parallel}" in out.read_text()
    assert f"wrote {out}" in result.stderr
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temp file left behind
    validated = cli("validate", str(out))
    assert validated.returncode == 0, validated.stderr
    assert "ok " in validated.stdout


def test_cli_prints_to_stdout_and_exits_2_on_bad_input():
    result = cli("import-hf", "mistralai/Mistral-7B-v0.3")
    assert result.returncode == 0 and result.stdout.startswith("# yaml-language-server")
    bad = cli("import-hf", "gpt2")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr and bad.stderr.startswith("error:")


def test_plan_json_of_an_import_resolves(tmp_path):
    out = tmp_path / "gemma.yaml"
    assert cli("import-hf", "google/gemma-2-9b", "-o", str(out)).returncode == 0
    result = cli("plan", str(out), "--resolve", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["tied"] == [{"owner": "model.embed_tokens.weight", "others": ["lm_head.weight"], "layout": "shard(0)"}]


def test_apertus_activation_parameters_are_corrected_and_said_so():
    # transformers' plan shards up_proj colwise and leaves the xIELU activation (alpha_p, alpha_n),
    # which runs on that sharded activation, replicated: its gradient is partial on every rank
    imported = import_hf("apertus")
    rule = next(r for r in imported.rules if r.pattern == "model.layers.*.mlp.act_fn")
    assert rule.fields == {"style": "sequence_parallel", "sequence_dim": -1, "use_local_output": True}
    assert "tpplan correction" in rule.comment and "alpha_p, alpha_n" in rule.comment
    assert "# Corrected (transformers' own plan is wrong here" in imported.text
    assert imported.corrections and "model.layers.*.mlp.act_fn (XIELUActivation: alpha_p, alpha_n)" in imported.corrections[0]
    assert not any(r.pattern.endswith("act_fn") for r in import_hf("apertus", correct=False).rules)
    assert not import_hf("llama").corrections  # SiLU has no parameters: nothing to correct
    result = cli("import-hf", "apertus")
    assert result.returncode == 0 and "corrected: model.layers.*.mlp.act_fn" in result.stderr
