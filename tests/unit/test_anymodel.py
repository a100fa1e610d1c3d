"""Models as people write them, without a process group: styles of one's own named by import path,
transformers' Conv1D under colwise/rowwise/packed_colwise, blocks in any container, and specs without
a plan.  The proofs on real ranks are in tests/dist/test_anymodel.py."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO
from tpplan.core.errors import SpecError, SpecErrors, TpplanError
from tpplan.plan.stage import resolve_spec, resolve_stage
from tpplan.spec.loader import load_spec, load_spec_text

EXAMPLE = REPO / "examples" / "torchtitan_llama" / "titan_llama.yaml"
pytestmark = pytest.mark.usefixtures("trust_factories")  # the repository's own factories and styles
GPT2 = """
name: gpt2-plan
model: {config: {model_type: gpt2, n_layer: 2, n_embd: 64, n_head: 4, vocab_size: 50258}, pretrained: false}
mesh: {tp: 2}
plan:
  - match: transformer.h.*
    plan:
      - {match: attn.c_attn, style: packed_colwise, parts: 3}
      - {match: attn.c_proj, style: rowwise}
      - {match: mlp.c_fc, style: colwise}
      - {match: mlp.c_proj, style: rowwise}
  - {match: transformer.wte, style: rowwise, input_layouts: replicate}
  - {match: lm_head, style: colwise, output_layouts: replicate}
fixups: [{match: transformer.h.*.attn, attr: split_size, op: floordiv_tp}]
"""


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


def test_a_style_of_ones_own_resolves_builds_and_prints_like_a_built_in():
    stage = resolve_stage(load_spec(EXAMPLE))
    rule = stage.plan.styles_by_module()["tok_embeddings"]
    assert rule.user_style and rule.TORCH_STYLE == "VocabParallelEmbedding" and rule.kinds == ("embedding",)
    assert rule.output_layout().dim == 1 and not rule.returns_local  # read from its args: the stream is seq-sharded
    style = rule.build()
    assert type(style).__name__ == "VocabParallelEmbedding" and style.use_local_output is False
    assert repr(style.output_layouts) == "Shard(dim=1)"  # a layout argument built as a torch placement
    assert rule.code() == "VocabParallelEmbedding(output_layouts=Shard(1), use_local_output=False)"
    assert not stage.plan.warnings  # its rule says the kinds it takes


def test_the_generated_script_imports_the_style_as_it_imports_the_factory():
    golden = (REPO / "generated" / "titan-llama" / "train.py").read_text()
    assert ("    VocabParallelEmbedding = import_code(\n        '../../examples/torchtitan_llama', 'titan_llama', "
            "'VocabParallelEmbedding'\n    )\n") in golden
    assert "'tok_embeddings': VocabParallelEmbedding(output_layouts=Shard(1), use_local_output=False)," in golden
    assert "return import_code(MODEL_FACTORY_FOLDER, MODEL_FACTORY_MODULE, MODEL_FACTORY)" in golden
    assert not re.search(r"^\s*(import|from) tpplan", golden, re.M)


def test_a_style_of_ones_own_without_kinds_is_trusted_and_said_so_and_with_kinds_checked():
    text = EXAMPLE.read_text()
    trusted = load_spec_text(text.replace("    kinds: [embedding]\n", ""), name="titan.yaml", directory=EXAMPLE.parent)
    plan = resolve_spec(trusted)
    assert any("VocabParallelEmbedding is a style of your own and its rule does not say which modules it takes"
               in w for w in plan.warnings)
    wrong = load_spec_text(text.replace("kinds: [embedding]", "kinds: [linear]"), name="titan.yaml",
                           directory=EXAMPLE.parent)
    with pytest.raises(TpplanError) as info:
        resolve_spec(wrong)
    assert "VocabParallelEmbedding (titan_llama.py:VocabParallelEmbedding) takes linear modules (kinds), but " \
           "tok_embeddings is Embedding, an embedding module" in str(info.value)
    assert f"titan.yaml:{_line(text, 'style: titan_llama.py')}:" in str(info.value)  # located at the rule's style


def test_a_style_that_asks_for_the_mesh_is_given_the_whole_mesh(tmp_path):
    (tmp_path / "meshy.py").write_text(
        "from torch.distributed.tensor.parallel import ParallelStyle\n"
        "class Meshy(ParallelStyle):\n"
        "    def __init__(self, *, mesh, scale=1):\n"
        "        super().__init__()\n        self.mesh, self.scale = mesh, scale\n"
        "    def _apply(self, module, device_mesh):\n        return module\n")
    text = EXAMPLE.read_text().replace("../../specs/data", str(REPO / "specs" / "data")).replace(
        "titan_llama.py:TitanLlama", f"{EXAMPLE.parent}/titan_llama.py:TitanLlama")
    text = text.replace("style: titan_llama.py:VocabParallelEmbedding\n    args: {output_layouts: shard(1), "
                        "use_local_output: false}", "style: meshy.py:Meshy\n    args: {scale: 2}")
    plan = resolve_spec(load_spec_text(text, name="meshy.yaml", directory=tmp_path))
    rule = plan.styles_by_module()["tok_embeddings"]
    assert rule.code() == "Meshy(scale=2, mesh=mesh)"  # train.py's apply_tensor_parallel(model, mesh)
    assert rule.build(mesh="the mesh").mesh == "the mesh"
    given = load_spec_text(text.replace("args: {scale: 2}", "args: {scale: 2, mesh: 1}"), name="meshy.yaml",
                           directory=tmp_path)
    with pytest.raises(TpplanError, match="is given the whole device mesh by tpplan as 'mesh'"):
        resolve_spec(given)


def test_style_paths_and_args_are_validated_before_anything_is_imported():
    bad = EXAMPLE.read_text().replace("args: {output_layouts: shard(1), use_local_output: false}",
                                      "args: {output_layouts: shard(x)}")
    with pytest.raises(SpecError) as info:
        load_spec_text(bad, name="titan.yaml", directory=EXAMPLE.parent)
    assert "plan[0].args.output_layouts" in str(info.value) and f"titan.yaml:{_line(bad, 'shard(x)')}:" in str(info.value)
    with pytest.raises((SpecError, SpecErrors)) as info:
        load_spec_text(EXAMPLE.read_text().replace("titan_llama.py:VocabParallelEmbedding", "titan llama.py:V"),
                       name="titan.yaml", directory=EXAMPLE.parent)
    assert "plan[0].style" in str(info.value)


def test_conv1d_takes_colwise_rowwise_and_packed_colwise_on_its_transposed_weight():
    plan = resolve_spec(load_spec_text(GPT2, name="gpt2.yaml"))
    rules = plan.styles_by_module()
    c_fc, c_proj = rules["transformer.h.0.mlp.c_fc"], rules["transformer.h.0.mlp.c_proj"]
    assert (c_fc.style, type(c_fc).__name__, c_fc.code()) == ("colwise", "Conv1DColwiseRule", "Conv1DColwiseParallel()")
    assert (c_proj.style, type(c_proj).__name__) == ("rowwise", "Conv1DRowwiseRule")
    assert c_fc.weight_dim("conv1d") == 1 and c_proj.weight_dim("conv1d") == 0  # weight [in, out]
    assert rules["transformer.h.0.attn.c_attn"].parameter_layout("conv1d", "weight") == "shard(1) in 3 parts"
    assert type(rules["lm_head"]).__name__ == "ColwiseRule"  # an nn.Linear keeps torch's style


def test_conv1d_divisibility_is_said_in_features_and_one_rule_does_not_take_two_kinds():
    odd = GPT2.replace("n_embd: 64, n_head: 4", "n_embd: 60, n_head: 4").replace("vocab_size: 50258", "vocab_size: 50256")
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec_text(odd, name="gpt2.yaml"), tp=8)
    # the MLP's 240 features divide; attention's do not: counted on the right dim of the [in, out] weights
    assert "mlp.c_" not in str(info.value)
    assert "transformer.h.0.attn.c_proj: rowwise splits 4 heads (60 input features = 4 x head_dim 15) over tp=8: " \
           "tp(8) > heads(4)" in str(info.value)
    assert "transformer.h.0.attn.c_attn: packed_colwise splits each of its 3 parts (each part: 60 features) over " \
           "tp=8: 60 % 8 = 4" in str(info.value)


def test_one_rule_on_a_conv1d_and_a_linear_is_refused(tmp_path):
    (tmp_path / "mixed.py").write_text(
        "import torch.nn as nn\nfrom transformers.pytorch_utils import Conv1D\n"
        "class Mixed(nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n        self.embed, self.a, self.b = nn.Embedding(16, 8), Conv1D(8, 8), nn.Linear(8, 16)\n"
        "    def forward(self, tokens):\n        return self.b(self.a(self.embed(tokens)))\n")
    text = "name: mixed\nmodel: {factory: mixed.py:Mixed}\nplan: [{match: '[ab]', style: colwise}]\n"
    with pytest.raises(TpplanError) as info:
        resolve_spec(load_spec_text(text, name="mixed.yaml", directory=tmp_path), tp=2)
    assert "colwise matches a, a Conv1D and a Linear (b), which it shards with different torch styles " \
           "(Conv1DColwiseParallel, ColwiseParallel)" in str(info.value)
    assert "mixed.yaml:3:" in str(info.value)


def test_blocks_are_found_in_a_moduledict_and_an_nn_sequential():
    assert resolve_stage(load_spec(EXAMPLE)).plan.blocks == ("layers.*",)  # the spec names them; and by default:
    text = EXAMPLE.read_text().replace("  blocks: layers.*                  # the ModuleDict's blocks: one FSDP2 unit "
                                       "each\n", "")
    assert "blocks:" not in text
    assert resolve_spec(load_spec_text(text, name="t.yaml", directory=EXAMPLE.parent)).blocks == ("layers.*",)
    mixer = load_spec(REPO / "tests" / "data" / "models" / "conv-mixer.yaml", require_plan=False)
    mixer = mixer.model_copy(update={"plan": load_spec_text(
        "name: x\nmodel: {config: {model_type: llama}, pretrained: false}\nplan: [{match: norm, style: replicate}]\n"
    ).plan})
    assert resolve_spec(mixer).blocks == ("blocks.*",)  # the items of an nn.Sequential


def test_a_spec_without_a_plan_loads_only_where_derive_asks():
    path = REPO / "tests" / "data" / "models" / "conv-mixer.yaml"
    with pytest.raises(SpecError, match="required key is missing"):
        load_spec(path)
    spec = load_spec(path, require_plan=False)
    assert spec.plan == [] and spec.model.factory == "conv_mixer.py:ConvMixer" and spec.source.path == path


def test_import_hf_maps_colwise_and_rowwise_onto_conv1d(monkeypatch):
    """transformers ships no plan for GPT-2; one written in its terms (colwise/rowwise on the Conv1D
    MLP) imports as colwise/rowwise, which resolve binds to the Conv1D styles."""
    from transformers import GPT2Config

    from tpplan.hf.import_hf import import_hf

    monkeypatch.setattr(GPT2Config, "base_model_tp_plan", {"h.*.mlp.c_fc": "colwise", "h.*.mlp.c_proj": "rowwise"},
                        raising=False)
    imported = import_hf("gpt2")
    rules = resolve_spec(load_spec_text(imported.text, name="imported.yaml"), tp=2).styles_by_module()
    assert type(rules["transformer.h.0.mlp.c_fc"]).__name__ == "Conv1DColwiseRule"
    assert type(rules["transformer.h.0.mlp.c_proj"]).__name__ == "Conv1DRowwiseRule"


def test_a_style_of_ones_own_is_code_imported_only_under_trust(tmp_path, capsys):
    """The same opt-in as model.factory: without --trust-factory a rule's style of its own is refused at
    the rule (located, nothing imported); validate only looks at its file; with it, it is imported."""
    from tpplan.cli import main
    from tpplan.core.trust import trusting

    (tmp_path / "marker_style.py").write_text(
        "import pathlib\npathlib.Path(__file__).with_name('IMPORTED').write_text('yes')\n"
        "from torch.distributed.tensor.parallel import ParallelStyle\n"
        "class Marked(ParallelStyle):\n    def _apply(self, module, device_mesh):\n        return module\n")
    (tmp_path / "spec.yaml").write_text(
        "name: marked\nmodel: {config: {model_type: llama, hidden_size: 64, intermediate_size: 128, "
        "num_attention_heads: 4, num_hidden_layers: 2, vocab_size: 256}, pretrained: false}\n"
        "mesh: {tp: 2}\nplan:\n  - {match: model.embed_tokens, style: marker_style.py:Marked, kinds: [embedding]}\n")
    with trusting(False):
        code = main(["plan", str(tmp_path / "spec.yaml"), "--resolve"])
        err = capsys.readouterr().err
        assert code == 2 and "spec.yaml:5:" in err and "plan[0].style" in err and "--trust-factory" in err, err
        assert main(["validate", str(tmp_path / "spec.yaml")]) == 0
        assert not (tmp_path / "IMPORTED").exists()
    assert main(["plan", str(tmp_path / "spec.yaml"), "--resolve", "--trust-factory"]) == 0
    assert (tmp_path / "IMPORTED").exists()


def test_the_simulator_splits_a_conv1d_plan_as_it_splits_a_linear_one():
    """GPT-2's Conv1D attention and MLP at tp=2 on the fake world: parameters split as the weights are (the
    packed c_attn's bias stays whole), and one all-reduce after each rowwise Conv1D, forward."""
    from tpplan.simulate.simulator import simulate

    sim = simulate(load_spec_text(GPT2, name="gpt2.yaml"), tp=2, dp=1, seq_length=64, batch_size=1)
    p = sim.data["memory"]["parameters"]
    assert p["total"] == p["sharded_by_tp"] + p["replicated_over_tp"]
    assert p["per_rank_without_fsdp"] == p["sharded_by_tp"] // 2 + p["replicated_over_tp"]
    per_layer = {(r["module"], r["phase"], r["mesh_dim"], r["op"]): r["count"]
                 for r in sim.data["communication"]["per_layer"]}
    assert per_layer[("transformer.h.*.attn.c_proj", "forward", "tp", "all_reduce")] == 1
    assert per_layer[("transformer.h.*.mlp.c_proj", "forward", "tp", "all_reduce")] == 1
