"""Render: specs -> train.py / launch.sh / job.slurm.  The golden record in generated/, the plan as
parallelize_module calls, filters that keep every spec value a literal, atomic writes."""

from __future__ import annotations

import ast
import inspect
import io
import shutil
import subprocess
import sys
import textwrap
import tokenize
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, SPECS
from tpplan.core.errors import SpecError, TpplanError
from tpplan.core.fileio import MARKER, read_marker
from tpplan.render import context, printed
from tpplan.render.filters import Code, RenderError, environment
from tpplan.render.render import compile_spec, render_spec
from tpplan.runtime import checkpoint
from tpplan.runtime import helpers as runtime
from tpplan.spec.loader import load_spec, load_spec_text

GENERATED = REPO / "generated"
REGENERATE = "regenerate the golden record with:  tpplan compile --trust-factory specs/*.yaml examples/*/*.yaml"

TINY = """
name: t
description: a tiny llama
model:
  pretrained: false
  dtype: float32
  tokenizer: {build: byte_bpe, vocab_size: 256}
  config: {model_type: llama, hidden_size: 64, intermediate_size: 128, num_attention_heads: 4,
           num_key_value_heads: 2, num_hidden_layers: 2, vocab_size: 512, max_position_embeddings: 64}
mesh: {tp: 2}
train: {dataset: tatsu-lab/alpaca, seq_length: 32}
plan:
  - {match: model.embed_tokens, style: rowwise, input_layouts: replicate, output_layouts: shard(1),
     use_local_output: false, note: vocab-sharded embedding}
  - match: model.layers.*
    note: one block
    plan:
      - {match: input_layernorm, style: sequence_parallel}
      - match: self_attn
        style: prepare_input
        input_kwarg_layouts: {hidden_states: shard(1)}
        desired_input_kwarg_layouts: {hidden_states: replicate}
      - {match: "self_attn.[qkv]_proj", style: colwise, note: heads split}
      - {match: self_attn.o_proj, style: rowwise, output_layouts: shard(1), use_local_output: false}
      - {match: post_attention_layernorm, style: sequence_parallel}
      - {match: mlp, style: prepare_input, input_layouts: [shard(1)], desired_input_layouts: [replicate]}
      - {match: "mlp.[gu]*_proj", style: colwise}
      - {match: mlp.down_proj, style: rowwise, output_layouts: shard(1), use_local_output: false}
  - {match: model.norm, style: sequence_parallel}
  - {match: lm_head, style: colwise, input_layouts: shard(1), output_layouts: shard(-1), use_local_output: false}
loss_parallel: true
"""


def _merge(base, over):
    if isinstance(base, dict) and isinstance(over, dict):
        return {**base, **{k: _merge(base.get(k), v) for k, v in over.items()}}
    return over


def tiny(extra: str = "", directory: Path | str = REPO / "specs"):
    """The tiny spec with ``extra`` YAML merged over it (mappings key by key, like ``extends``)."""
    data = _merge(yaml.safe_load(TINY), yaml.safe_load(textwrap.dedent(extra)) or {})
    return load_spec_text(yaml.safe_dump(data, sort_keys=False), name="t.yaml", directory=directory)


def train_py(spec, out_dir=GENERATED / "t") -> str:
    return render_spec(spec, out_dir).files["train.py"]


def shipped_specs():
    """The shipped specs, and the examples' (a model of your own: its factory's script is golden too)."""
    return sorted(SPECS.glob("*.yaml")) + sorted((REPO / "examples").glob("*/*.yaml"))


# ------------------------------------------------------------------------------------------
# The golden record
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", shipped_specs(), ids=lambda p: p.stem)
@pytest.mark.usefixtures("trust_factories")  # examples/llama's factory
def test_generated_matches_compile_byte_for_byte(path):
    spec = load_spec(path)
    target = GENERATED / spec.name
    files = render_spec(spec, target).files
    assert target.is_dir(), f"generated/{spec.name}/ is missing; {REGENERATE}"
    on_disk = sorted(p.name for p in target.iterdir() if p.name != MARKER)
    assert on_disk == sorted(files), f"generated/{spec.name}/ holds {on_disk}; {REGENERATE}"
    assert read_marker(target) == {"written_by": "tpplan", "kind": "compile", "files": sorted(files)}
    for name, text in files.items():
        assert (target / name).read_text(encoding="utf-8") == text, (
            f"generated/{spec.name}/{name} is stale; {REGENERATE}"
        )


def test_generated_holds_only_shipped_specs():
    names = {load_spec(p).name for p in shipped_specs()}
    folders = {p.name for p in GENERATED.iterdir() if p.is_dir() and not p.name.startswith(".")}
    assert folders == names, f"generated/ has {sorted(folders - names)} without a spec; {REGENERATE}"


@pytest.mark.parametrize("name", ["tiny-llama", "llama3", "llama3-405b", "llama-own"])
def test_generated_script_parses_and_does_not_import_tpplan(name):
    source = (GENERATED / name / "train.py").read_text()
    tree = ast.parse(source)
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert "tpplan" not in imported
    assert {"torch", "transformers", "datasets"} <= imported
    assert imported <= {
        "torch",
        "transformers",
        "datasets",
        "tqdm",
        "safetensors",
        "huggingface_hub",
        "tokenizers",
        "argparse",
        "contextlib",
        "datetime",
        "dataclasses",
        "fnmatch",
        "functools",
        "glob",
        "hashlib",
        "importlib",
        "io",
        "itertools",
        "json",
        "math",
        "os",
        "pickle",
        "re",
        "resource",
        "shutil",
        "stat",
        "sys",
        "time",
        "torchao",  # only when train.float8 is on (imported inside convert_to_float8)
        "wandb",  # only when WANDB names a project (imported inside WandbTracker)
        "mlflow",  # only when MLFLOW is set (imported inside MlflowTracker)
    }


def test_generated_is_ruff_clean():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    if not Path(ruff).exists():
        pytest.skip("ruff is not installed")
    check = subprocess.run([ruff, "check", "generated"], cwd=REPO, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    fmt = subprocess.run([ruff, "format", "--check", "generated"], cwd=REPO, capture_output=True, text=True)
    assert fmt.returncode == 0, fmt.stdout + fmt.stderr


def test_runtime_helpers_and_the_training_step_are_printed_verbatim():
    from tpplan.runtime import step

    source = (GENERATED / "tiny-llama" / "train.py").read_text()
    for name in printed.RUNTIME_FUNCTIONS:
        assert inspect.getsource(getattr(runtime, name)) in source, name
    for name in printed.CHECKPOINT_CLASSES:  # the resume path reads checkpoints as tpplan export does
        assert inspect.getsource(getattr(checkpoint, name)) in source, name
    assert "dcp.load(state, storage_reader=SafeCheckpointReader(path), planner=SafeLoadPlanner())" in source
    for name in printed.STEP_FUNCTIONS:
        assert inspect.getsource(getattr(step, name)) in source, name
    # every public function and class of the step module is printed: nothing check runs is left out
    defined = {name for name, value in vars(step).items()
               if (inspect.isfunction(value) or inspect.isclass(value)) and value.__module__ == step.__name__}
    assert defined == set(printed.STEP_FUNCTIONS)


def test_llama3_script_reads_like_the_chapter():
    source = (GENERATED / "llama3" / "train.py").read_text()
    assert "TP = 8\n" in source and "DP = None" in source
    assert "MODEL_NAME = 'meta-llama/Llama-3.1-8B'" in source and "PRETRAINED = True" in source
    assert "DATASET = 'tatsu-lab/alpaca'" in source and "DATA_FILES = None" in source
    assert "'model.layers.*.self_attn.[qkv]_proj': ColwiseParallel()," in source
    assert "# one all-gather of the sequence feeds q, k and v together" in source
    assert "# plan[3] lm_head: logits never gathered; cross-entropy runs on vocab shards" in source
    assert "'lm_head': ColwiseParallel(\n" in source
    assert 'init_device_mesh(device_type, (dp, TP), mesh_dim_names=("dp", "tp"))' in source
    assert "data_mesh = data_parallel_mesh(mesh)" in source  # the ranks holding different batches (dp x ep)
    assert "num_replicas=data_mesh.size()," in source and "rank=data_mesh.get_local_rank()" in source
    assert "self.tokens_per_step = data_mesh.size() * GRAD_ACCUM_STEPS * BATCH_SIZE * SEQ_LENGTH" in source
    # float32 master weights, bfloat16 compute: the 16-bit shipped specs train mixed
    assert "PRECISION = 'bf16-mixed'  # float32 master weights and AdamW state; bfloat16 compute" in source


def test_local_data_files_are_relative_to_the_script():
    source = (GENERATED / "tiny-llama" / "train.py").read_text()
    assert "    '../../specs/data/tiny-alpaca.jsonl',\n" in source
    assert (GENERATED / "tiny-llama" / "../../specs/data/tiny-alpaca.jsonl").resolve().is_file()


# ------------------------------------------------------------------------------------------
# The plan in the script
# ------------------------------------------------------------------------------------------


def test_overridden_rules_name_their_modules_and_overrides_keep_patterns():
    spec = tiny("""
    plan_overrides:
      - {match: model.layers.0.mlp.down_proj, style: replicate}
      - {match: "model.layers.1.mlp.[gu]*_proj", style: rowwise, note: an experiment}
    """)
    source = train_py(spec)
    ast.parse(source)
    # the down_proj rule lost layer 0: its remaining module by name
    assert "'model.layers.*.mlp.down_proj'" not in source
    assert "'model.layers.1.mlp.down_proj': RowwiseParallel(" in source
    assert "# model.layers.*.mlp.down_proj: 1 of its 2 modules, named one by one" in source
    assert "'model.layers.0.mlp.gate_proj': ColwiseParallel()," in source
    assert "'model.layers.0.mlp.up_proj': ColwiseParallel()," in source
    assert "'model.layers.1.mlp.[gu]*_proj': RowwiseParallel()," in source
    assert "# plan_overrides[0] model.layers.0.mlp.down_proj: left replicated (style: replicate)" in source
    assert "# plan_overrides[1] model.layers.1.mlp.[gu]*_proj: an experiment" in source
    # unchanged rules keep their pattern
    assert "'model.layers.*.self_attn.[qkv]_proj': ColwiseParallel()," in source
    assert "# heads split" in source


def test_fixups_rendered_where_the_attribute_exists_and_skips_explained():
    spec = tiny("""
    fixups:
      - {match: model.layers.*.self_attn, attr: head_dim, op: set, value: 16}
      - {match: model.layers.*.self_attn, attr: num_heads, op: floordiv_tp}
    """)
    source = train_py(spec)
    ast.parse(source)
    assert "    # fixups[0]: model.layers.*.self_attn.head_dim = 16\n" in source
    # every module the pattern matches has the attribute: the script loops over the pattern
    assert "    for name, module in model.named_modules():\n        if not matches('model.layers.*.self_attn', name):\n" in source
    assert "        module.head_dim = 16\n" in source
    assert "# fixups[1]: model.layers.*.self_attn.num_heads //= tp" in source
    assert "skipped where the attribute does not exist: 2 of 2 modules (model.layers.0.self_attn" in source
    assert "num_heads //= tp_mesh.size()" not in source


def test_tied_weights_are_tied_again():
    spec = tiny("""
    model:
      config: {tie_word_embeddings: true}
    """)
    source = train_py(spec)
    # the names of each tie (found by identity), handed to the step, which ties them again after
    # tensor parallel and stops the run if one came apart (after FSDP2 and after materializing)
    assert "TIED = [\n    ('model.embed_tokens.weight', 'lm_head.weight'),\n]\n" in source
    assert "        tied=TIED,\n" in source and "    check_ties(model, TIED)\n" in source
    assert "        tie_again(model, tied)\n" in source
    assert "TIED = []" in train_py(tiny())


def test_each_style_comes_from_style_code():
    from tpplan.spec.styles import style_code

    spec = tiny()
    rendered = render_spec(spec, GENERATED / "t")
    source = rendered.files["train.py"]
    for use in rendered.plan.rules:
        if use.rule.TORCH_STYLE:
            code = style_code(use.rule)
            flat = " ".join(line.strip() for line in source.splitlines())
            kwargs = code[len(use.rule.TORCH_STYLE) + 1 : -1]
            assert code in source or all(part in flat for part in kwargs.split(", ")), code


# ------------------------------------------------------------------------------------------
# Filters, bad input, atomic writes
# ------------------------------------------------------------------------------------------


def test_template_without_filter_is_refused():
    env = environment()
    with pytest.raises(RenderError, match="without the py, sh or comment filter"):
        env.from_string("x = {{ value }}").render(value="1; import os")
    assert env.from_string("x = {{ value|py }}").render(value="a'b\"c") == "x = 'a\\'b\"c'"
    assert env.from_string("# {{ value|comment }}").render(value="a\nimport os") == "# a\\nimport os"
    assert env.from_string("x={{ value|sh }}").render(value="$(id)") == "x='$(id)'"


def test_missing_data_file_is_bad_input(tmp_path):
    spec = tiny("train: {dataset: json, data_files: [nowhere.jsonl]}", directory=tmp_path)
    with pytest.raises(SpecError, match="data file not found: 'nowhere.jsonl'"):
        render_spec(spec, tmp_path / "out")


def test_config_only_model_needs_a_tokenizer():
    spec = tiny("model: {tokenizer: null}")
    with pytest.raises(TpplanError, match="no tokenizer"):
        render_spec(spec, GENERATED / "t")


def test_sbatch_values_must_be_one_line():
    with pytest.raises(SpecError, match="a partition must be one word of printable text"):
        tiny('launch: {slurm: {partition: "gpu\\n#SBATCH --x\\nrm -rf /"}}')


def test_failed_compile_leaves_the_previous_folder(tmp_path, monkeypatch):
    spec = tiny()
    target = compile_spec(spec, tmp_path)
    before = {p.name: p.read_text() for p in target.iterdir()}
    monkeypatch.setattr(context, "runtime_source", lambda: Code("def broken(:\n    pass\n"))
    with pytest.raises(RenderError, match="does not compile"):
        compile_spec(tiny("description: changed"), tmp_path)
    assert {p.name: p.read_text() for p in target.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no staging folder left behind


def test_output_is_deterministic(tmp_path):
    one = render_spec(tiny(), tmp_path / "a" / "t").files
    two = render_spec(tiny(), tmp_path / "a" / "t").files
    assert one == two


def code_tokens(source: str):
    """(type, text) of every token that is code: not a string, comment or layout token."""
    skip = {
        tokenize.STRING,
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
    fstring = {
        getattr(tokenize, n)
        for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
        if hasattr(tokenize, n)
    }
    return [t for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in skip | fstring]


def with_values(spec, **changes):
    """``spec`` with values set by dotted path (built from data: no YAML quoting involved)."""
    from tpplan.spec.schema import Spec

    data = spec.model_dump(mode="json", exclude_unset=True)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for part in parents:
            target = target.setdefault(part, {}) if not part.isdigit() else target[int(part)]
        target[last] = value
    new = Spec.model_validate(data)
    new._source = spec.source
    return new


PAYLOAD = "x'''\"\"\"\n{{ ctx }}{% raw %}\\\nimport os; os.system('touch PWNED') # INJECTED\r\u2028end"


def test_hostile_strings_stay_literals():
    spec = with_values(
        tiny(),
        description=PAYLOAD,
        train__dataset=PAYLOAD,
        train__text_column=PAYLOAD,
        train__split=PAYLOAD,
        train__save_dir=PAYLOAD,
        plan__0__note=PAYLOAD,
        launch__env={"EVIL": PAYLOAD},
    )
    files = render_spec(spec, GENERATED / "t").files
    source = files["train.py"]
    ast.parse(source)
    assert not any("INJECTED" in tok.string or "PWNED" in tok.string for tok in code_tokens(source))
    assert "os.system('touch PWNED')" in ast.literal_eval(
        next(line.split(" = ", 1)[1] for line in source.splitlines() if line.startswith("DATASET = "))
    )
