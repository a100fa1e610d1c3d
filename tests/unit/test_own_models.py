"""Models that are not transformers models: a factory in the spec, ties found by identity, and what
transformers' conventions used to supply (FSDP blocks, the logits module, head counts, positions),
resolved on the meta device without a process group."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, SPECS
from tpplan.core.errors import SpecError, TpplanError
from tpplan.plan.stage import model_source, resolve_spec, resolve_stage
from tpplan.spec.loader import load_spec

EXAMPLE = REPO / "examples" / "llama" / "llama.yaml"
MODELS = REPO / "tests" / "data" / "models"
pytestmark = pytest.mark.usefixtures("trust_factories")  # the repository's own factories (docs/trust.md)


def error_of(spec, **kwargs) -> str:
    with pytest.raises(TpplanError) as info:
        resolve_spec(spec, **kwargs)
    return str(info.value)


def test_the_plain_torch_tie_is_found_by_identity_and_kept():
    # before: ties were found only through get_input/output_embeddings(), which a plain nn.Module lacks,
    # so parallelize untied tok_embeddings/output silently (logits equal, gradients 0.23 off)
    plan = resolve_spec(load_spec(EXAMPLE))
    [tie] = plan.tied
    assert (tie.owner, tie.others, tie.layout) == ("tok_embeddings.weight", ("output.weight",), "shard(0)")
    assert resolve_spec(load_spec(EXAMPLE, ["model.args.tie_embeddings=false"])).tied == ()


def test_a_tie_sharded_two_ways_is_refused_naming_both_holders_and_their_rules():
    spec = load_spec(EXAMPLE, ["plan_overrides=[{match: output, style: colwise, input_layouts: shard(1), "
                               "output_layouts: replicate}, {match: tok_embeddings, style: colwise, "
                               "output_layouts: shard(1), use_local_output: false}]"])
    text = error_of(spec)
    assert "tok_embeddings.weight and output.weight are one parameter (tied)" in text
    assert "tok_embeddings (colwise, plan_overrides[1]) as shard(1) and in output (colwise, plan_overrides[0]) " \
           "as shard(0): held two ways, the tie would come apart" in text


def test_a_tie_no_config_declares_between_two_linears():
    spec = load_spec(MODELS / "shared-weights.yaml")
    plan = resolve_spec(spec)
    assert [(t.owner, t.others, t.layout) for t in plan.tied] == [
        ("blocks.0.up_a.weight", ("blocks.0.up_b.weight",), "shard(0)"),
        ("blocks.1.up_a.weight", ("blocks.1.up_b.weight",), "shard(0)"),
    ]
    text = error_of(load_spec(MODELS / "shared-weights.yaml", ["plan_overrides=[{match: blocks.1.up_b, style: rowwise}]"]))
    assert "shared-weights.yaml:14:35: error: plan[1].plan[0].style: blocks.1.up_a.weight and blocks.1.up_b.weight" in text
    assert "blocks.1.up_a (colwise, plan[1].plan[0] at line 14) as shard(0) and in blocks.1.up_b (rowwise, " \
           "plan_overrides[0]) as shard(1)" in text


def test_a_tie_across_fsdp_units_is_a_warning_at_resolve():
    plan = resolve_spec(load_spec(MODELS / "shared-weights.yaml", ["model.blocks=blocks.*.up_b"]))
    assert any("blocks.0.up_a.weight and blocks.0.up_b.weight are one parameter held in different FSDP units "
               "((root), blocks.0.up_b)" in w for w in plan.warnings)


def test_what_transformers_conventions_supplied_comes_from_the_spec_or_the_module():
    stage = resolve_stage(load_spec(EXAMPLE))
    assert stage.source.kind == "factory" and stage.source.config is None
    assert stage.plan.blocks == ("layers.*",)
    assert stage.plan.logits_module == "output"  # no get_output_embeddings: the last Linear as wide as the vocab
    assert stage.source.positions == "positions"
    # without model.blocks: the items of the model's ModuleList; a transformers model: _no_split_modules
    assert resolve_spec(load_spec(MODELS / "shared-weights.yaml")).blocks == ("blocks.*",)
    assert resolve_spec(load_spec(SPECS / "tiny-llama.yaml")).blocks == ("model.layers.*",)
    assert model_source(load_spec(SPECS / "tiny-llama.yaml")).positions == "position_ids"


def test_head_counts_are_read_from_the_attention_module():
    plan = resolve_spec(load_spec(EXAMPLE, ["fixups=[]"]))  # forgot the fix-ups: said before any rank starts
    assert ("layers.*.attention.n_kv_heads = 4 is the whole model's count, but after colwise wq, wk, wv each rank "
            "computes 2: if its forward reshapes by n_kv_heads, add fixups: [{match: layers.*.attention, attr: "
            "n_kv_heads, op: floordiv_tp}]") in plan.warnings
    assert not [w for w in resolve_spec(load_spec(EXAMPLE)).warnings if "whole model's count" in w]
    text = error_of(load_spec(EXAMPLE), tp=8)
    assert "layers.0.attention.wk: colwise splits 4 kv heads (64 output features = 4 x head_dim 16) over tp=8: " \
           "tp(8) > kv_heads(4)" in text
    # a head count under another attribute name: model.head_attrs says where
    spec = load_spec(EXAMPLE, ["model.head_attrs={kv_heads: n_heads}"])
    assert "splits 4 heads" in error_of(spec, tp=8)


def test_spec_fields_that_do_not_fit_the_model_are_located():
    spec = load_spec(EXAMPLE, ["model.positions=position_ids"])
    text = error_of(spec)
    assert text.startswith("--set #1: error: model.positions: ")  # where the value came from
    assert "Llama.forward takes no 'position_ids' argument (its parameters: tokens, positions)" in text
    text = error_of(load_spec(EXAMPLE, ["model.blocks=layer.*"]))
    assert "model.blocks pattern 'layer.*' matches no module" in text
    text = error_of(load_spec(EXAMPLE, ["model.output=head"]))
    assert "model.output 'head' names no module" in text


def test_a_factory_that_raises_or_returns_no_module_is_located(tmp_path):
    text = error_of(load_spec(EXAMPLE, ["model.args.n_heads=7"]))
    assert "examples/llama/llama.yaml:14:12: error: model.factory: the model factory " \
           "'examples/llama/llama_model.py:Llama' raised ValueError: dim 128 must divide by n_heads 7" in text
    assert "(examples/llama/llama_model.py:63: raise ValueError(" in text  # the line of the user's code
    spec = load_spec(REPO / "tests" / "data" / "bad-model" / "not-callable.yaml",
                     ["model.factory=toy_model.py:build_nothing", "model.args={vocab_size: 8, dim: 4}"])
    assert "returned a NoneType, not a torch.nn.Module" in error_of(spec)


def test_check_without_twin_args_says_so_before_any_rank_starts():
    from tpplan.prove.check import run_check

    spec = load_spec(MODELS / "shared-weights.yaml", ["model.twin_args=null"])
    with pytest.raises(SpecError) as info:
        run_check(spec, tp=2)  # raises before any rank starts
    text = str(info.value)
    assert text.startswith("--set #1: error: model.twin_args: tpplan check needs a small model of the same architecture")


def test_plan_sizes_a_factory_model_at_full_size_on_the_meta_device():
    from tpplan.simulate.simulator import simulate

    spec = load_spec(EXAMPLE, ["model.args={vocab_size: 128256, dim: 4096, n_layers: 32, n_heads: 32, "
                               "n_kv_heads: 8, ffn_dim: 14336, max_seq_len: 1024, tie_embeddings: false}",
                               "model.dtype=bfloat16", "train.seq_length=1024", "train.batch_size=1"])
    sim = simulate(spec, tp=8)
    data = sim.to_dict()
    assert data["model"] == "examples/llama/llama_model.py:Llama" and data["layers"] == 32
    assert data["simulated_layers"] == 3 and data["extrapolated"]
    params = data["memory"]["parameters"]["total"]
    assert params == 8_030_261_248  # Llama-3.1-8B's count
    assert data["memory"]["activations"]["logits_bytes"] == 1024 * (128256 // 8) * 2  # vocab-sharded bf16 logits
    # the same plan as specs/llama3.yaml, in this model's names: the same collectives
    assert 1.0 <= data["communication"]["ratio_to_floor"] <= 1.03


def test_a_factory_file_stays_relative_to_the_spec_that_names_it(tmp_path):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {EXAMPLE}\nname: child\n")
    source = model_source(load_spec(child))
    assert source.factory.file == (REPO / "examples" / "llama" / "llama_model.py").resolve()


def test_a_tie_split_across_fsdp_units_is_refused_where_fsdp2_would_untie_it():
    """The tie check lives in the training step (step.split_ties / check_ties), which train.py prints,
    `tpplan check` runs through apply and `tpplan plan` records; tpplan says it as an error, the
    script stops with one line (SystemExit)."""
    from tpplan.plan.apply import build_mesh
    from tpplan.runtime import step
    from tpplan.simulate.simulator import simulate
    from tpplan.simulate.world import fake_world

    split = ["model.blocks=blocks.*.up_b"]  # up_a in the root unit, up_b a unit of its own
    with pytest.raises(TpplanError, match=r"blocks.0.up_a.weight and blocks.0.up_b.weight are one parameter held "
                       r"in different FSDP units \(\(root\), blocks.0.up_b\)"):
        simulate(load_spec(MODELS / "shared-weights.yaml", split), tp=2, dp=2)
    # dp=1 in float32: no FSDP2, nothing to refuse; under a mixed precision FSDP2 runs on one rank too
    assert simulate(load_spec(MODELS / "shared-weights.yaml", split), tp=2, dp=1).data["tp"] == 2
    with pytest.raises(TpplanError, match="held in different FSDP units"):
        simulate(load_spec(MODELS / "shared-weights.yaml", [*split, "train.precision=bf16-mixed"]), tp=2, dp=1)

    # the step itself (as train.py runs it): refused before FSDP2 touches anything
    stage = resolve_stage(load_spec(MODELS / "shared-weights.yaml", split), tp=2)
    model, tied = stage.source.build(device="meta"), [t.names for t in stage.plan.tied]
    with fake_world(2):
        mesh = build_mesh("cpu", dp=2, tp=1)
        with pytest.raises(SystemExit, match="held in different FSDP units"):
            step.prepare_model(model, mesh, None, blocks=stage.plan.blocks, tied=tied)
    assert step.untied(model, tied) == []
    model.blocks[1].up_b.weight = type(model.blocks[1].up_a.weight)(model.blocks[1].up_a.weight.detach().clone())
    assert step.untied(model, tied) == [("blocks.1.up_a.weight", "blocks.1.up_b.weight")]
    with pytest.raises(SystemExit, match="tied weights came apart: blocks.1.up_a.weight and blocks.1.up_b.weight"):
        step.check_ties(model, tied)
    assert step.tie_again(model, tied) == ["blocks.1.up_b.weight = blocks.1.up_a.weight"]
    assert step.untied(model, tied) == []


def test_flops_per_token_count_a_tied_output_projection_and_the_factory_models_attention():
    """MFU's FLOPs (runtime.model_flops_per_token, printed into train.py): a tie does not change the
    count (the output matmul runs either way); attention's layers x heads x head_dim comes from the
    factory model's attention modules (model.head_attrs), or a transformers config."""
    from tpplan.runtime.helpers import model_flops_per_token

    counts = []
    for tie in ("true", "false"):
        stage = resolve_stage(load_spec(EXAMPLE, [f"model.args.tie_embeddings={tie}"]))
        size = stage.source.attention_size(stage.model)
        assert size == 4 * 8 * 16  # n_layers x n_heads x head_dim
        counts.append(model_flops_per_token(stage.model, 128, size))
    untied = sum(p.numel() for p in stage.model.parameters())  # the last one built: untied
    assert counts[0] == counts[1] == 6 * (untied - 512 * 128) + 12 * 512 * 128  # the input embedding: no matmul
    stage = resolve_stage(load_spec(SPECS / "tiny-llama.yaml"))
    config = stage.source.config
    assert stage.source.attention_size(stage.model) == config.num_hidden_layers * config.hidden_size
