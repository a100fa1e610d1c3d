"""Every value is checked when the spec is validated (issue 14), with its file:line:col and field:
non-finite numbers, NUL and lone surrogates, shell names bash will not set, SLURM and rendezvous
fields, run folders that would leave save_dir, sizes that would build forever; YAML that was
misread (dates, merge keys); values echoed whole; ``--set`` errors at the ``--set``; CLI flags
with their ranges.  Each case is a spec file; one ``tpplan validate`` subprocess reads them all."""

from __future__ import annotations

import pytest

from tests.conftest import SPECS, cli
from tpplan.cli import main

TINY = SPECS / "tiny-llama.yaml"

# name -> (the spec after `extends: tiny-llama.yaml` and `name: ...`, the error line it must give)
CASES = {
    "lr-nan": ("train: {lr: .nan}", ":3:13: error: train.lr: expected a finite number, got nan"),
    "lr-inf": ("train: {lr: .inf}", ":3:13: error: train.lr: expected a finite number, got inf"),
    "lr-nan-string": ("train: {lr: nan}", ":3:13: error: train.lr: expected a finite number, got nan"),
    "decay-minus-inf": ("train: {weight_decay: -.inf}", "error: train.weight_decay: expected a finite number, got -inf"),
    "config-nan": (
        "model:\n  config:\n    rope_theta: .nan",
        ":5:17: error: model.config.rope_theta: expected a finite number, got nan",
    ),
    "config-nested-inf": (
        "model: {config: {rope_scaling: {factor: .inf}}}",
        "error: model.config.rope_scaling.factor: expected a finite number, got inf",
    ),
    "fixup-nan": (
        "fixups: [{match: model.norm, attr: eps, op: set, value: .nan}]",
        "error: fixups[0].value: expected a finite number, got nan",
    ),
    "million-layers": (
        "model: {config: {num_hidden_layers: 1000000}}",
        "error: model.config.num_hidden_layers: expected a block count from 1 to 1,024, got 1,000,000",
    ),
    "zero-heads": (
        "model: {config: {num_attention_heads: 0}}",
        "error: model.config.num_attention_heads: expected a size from 1 to 16,777,216, got 0",
    ),
    "negative-hidden": (
        "model: {config: {hidden_size: -64}}",
        "error: model.config.hidden_size: expected a size from 1 to 16,777,216, got -64",
    ),
    "hidden-wrong-type": (
        "model: {config: {hidden_size: sixty-four}}",
        "error: model.config.hidden_size: expected a size (an integer), got 'sixty-four'",
    ),
    "config-key-not-a-name": (
        "model: {config: {hidden-size: 64}}",
        "error: model.config.hidden-size: config key 'hidden-size' is not an attribute name",
    ),
    "env-uid": ("launch: {env: {UID: '0'}}", "error: launch.env.UID: UID is a shell variable bash does not let a script set"),
    "env-ppid": ("launch: {env: {PPID: '1'}}", "error: launch.env.PPID: PPID is a shell variable bash does not let"),
    "env-nul": ('launch: {env: {X: "a\\0b"}}', ":3:19: error: launch.env.X: 'a\\x00b' holds a NUL character (\\0) at character 2"),
    "save-dir-surrogate": (
        'train: {save_dir: "out\\ud800"}',
        "error: train.save_dir: 'out\\ud800' holds a lone surrogate (\\ud800) at character 4",
    ),
    "rdzv-id-surrogate": ('launch: {rdzv_id: "\\udcff"}', "error: launch.rdzv_id: '\\udcff' holds a lone surrogate"),
    "name-nul": ('description: "a\\0"', "error: description: 'a\\x00' holds a NUL character"),
    "rdzv-endpoint-port": (
        "launch: {rdzv_endpoint: 'node0:99999'}",
        "error: launch.rdzv_endpoint: expected HOST:PORT (node0:29500, 10.0.0.1:29500, [fe80::1]:29500), got 'node0:99999'",
    ),
    "rdzv-endpoint-space": ("launch: {rdzv_endpoint: 'node 0:1'}", "error: launch.rdzv_endpoint: expected HOST:PORT"),
    "rdzv-id-space": ("launch: {rdzv_id: 'a b'}", "error: launch.rdzv_id: a rendezvous id must be one word"),
    "rdzv-backend": ("launch: {rdzv_backend: 'c10d; rm'}", "error: launch.rdzv_backend: 'c10d; rm' is not allowed here"),
    "slurm-partition-newline": (
        'launch: {slurm: {partition: "gpu\\n#SBATCH --x"}}',
        "error: launch.slurm.partition: a partition must be one word of printable text",
    ),
    "slurm-time": ("launch: {slurm: {time: tomorrow}}", "error: launch.slurm.time: expected a SLURM time limit"),
    "slurm-extra": ("launch: {slurm: {extra_sbatch: ['rm -rf /']}}", "error: launch.slurm.extra_sbatch[0]: an #SBATCH line is one sbatch option"),
    "slurm-gpus": ("launch: {slurm: {gpus_per_node: 2000}}",
                   "error: launch.slurm.gpus_per_node: expected a GPU count from 0 to 1,024, auto, or null (no GPUs), got 2000"),
    "slurm-gpus-on-cpu": ("launch: {slurm: {gpus_per_node: 4}}",
                          "error: launch.slurm.gpus_per_node: mesh.device is cpu: a CPU job requests no GPUs (set 0, "
                          "null or auto), got 4"),
    "experiment-climbs": ("train: {experiment_name: ../../etc}", "error: train.experiment_name: '../../etc' is not allowed here"),
    "experiment-absolute": ("train: {experiment_name: /tmp/x}", "error: train.experiment_name: '/tmp/x' is not allowed here"),
    "seq-length-huge": ("train: {seq_length: 1000000000000}", "error: train.seq_length: expected a sequence length from 1 to 16,777,216"),
    "seed-negative": ("train: {seed: -1}", "error: train.seed: expected a seed from 0 to 9,223,372,036,854,775,807, got -1"),
    "seed-bool": ("train: {seed: true}", "error: train.seed: expected a seed (an integer), got True"),
    "restarts-huge": ("launch: {max_restarts: 100000}", "error: launch.max_restarts: expected a restart count from 0 to 10,000"),
    "date-is-text": ("train: {lr: 2024-01-01}", ":3:13: error: train.lr: expected a number, got '2024-01-01'"),
    "date-explicit-tag": ("train: {lr: !!timestamp 2024-01-01}", "YAML tag 'tag:yaml.org,2002:timestamp' is not allowed"),
    "huge-value": ("mesh: {tp: " + "y" * 900_000 + "}", "error: mesh.tp: expected a positive integer or 'node', got 'yyyy"),
}
OK = {"merge-key-override": "train:\n  <<: &b {lr: 0.1, seed: 3}\n  seed: 4\n"}


@pytest.fixture(scope="module")
def validated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("values")
    names = []
    for name, text in {**{n: t for n, (t, _) in CASES.items()}, **OK}.items():
        (folder / f"{name}.yaml").write_text(f"extends: {TINY}\nname: {name}\n{text}\n", encoding="utf-8")
        names.append(f"{name}.yaml")
    result = cli("validate", *names, cwd=folder)
    return result, folder


@pytest.mark.parametrize("name", sorted(CASES))
def test_each_value_is_refused_where_it_is_written(validated, name):
    result, _ = validated
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"{name}.yaml")]
    assert len(lines) >= 1, result.stderr
    assert CASES[name][1] in lines[0], lines[0]
    assert len(lines[0]) < 400  # a 900 KB value is shown by its start and its length


def test_huge_values_are_shown_cut_with_their_length(validated):
    result, _ = validated
    line = next(line for line in result.stderr.splitlines() if line.startswith("huge-value.yaml"))
    assert "... (900,000 characters)" in line and len(line) < 300


def test_a_valid_merge_key_override_is_not_a_duplicate(validated):
    result, _ = validated
    assert "ok merge-key-override.yaml" in result.stdout, result.stderr


def test_merge_key_override_takes_the_own_value_and_a_real_duplicate_is_refused(tmp_path):
    from tpplan.core.errors import SpecError
    from tpplan.spec.yaml_reader import parse_yaml

    data, _ = parse_yaml("a: &b {x: 1, y: 2}\nc:\n  <<: *b\n  y: 3\n", "t.yaml")
    assert data["c"] == {"x": 1, "y": 3}
    data, _ = parse_yaml("a: &a {x: 1}\nb: &b {x: 2}\nc: {<<: [*a, *b]}\n", "t.yaml")
    assert data["c"] == {"x": 1}  # the first merged mapping wins, as YAML says
    with pytest.raises(SpecError, match="duplicate key 'y' \\(first at line 3\\)"):
        parse_yaml("c:\n  <<: {x: 1}\n  y: 3\n  y: 4\n", "t.yaml")


# ------------------------------------------------------------------------------------------
# --set: errors at the --set, extends works
# ------------------------------------------------------------------------------------------


def test_set_errors_point_at_the_set_argument():
    result = cli(
        "validate", str(TINY), "--set", "train.max_steps=5",
        "--set", "plan=[{match: model.norm, style: colwise, bogus: 1}]",
    )
    assert result.returncode == 2
    assert result.stderr.startswith("--set #2: error: plan[0].bogus: unknown key 'bogus'"), result.stderr


@pytest.mark.parametrize(
    "item, message",
    [
        ("plan.0.style=bogus", "--set #1: error: plan[0].style: unknown style 'bogus'"),
        ("plan.99.style=x", "--set #1: error: plan[99]: --set plan.99.style: plan has no item 99"),
        ("name.x=1", "--set #1: error: name: --set name.x: name is not a mapping or a list"),
        ("extends.x=1", "--set #1: error: extends: extends takes one spec"),
        ("extends=nope.yaml", "--set #1: error: extends: '/"),
        ("train.lr=nan", "--set #1: error: train.lr: expected a finite number, got nan"),
        ("mesh=", "--set #1: error: mesh: expected a mapping"),
        ("novalue", "--set #1: error: --set takes KEY=VALUE"),
    ],
)
def test_set_items_are_refused_at_the_set(capsys, item, message):
    assert main(["validate", str(TINY), "--set", item]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message), err


def test_set_extends_builds_on_another_spec(tmp_path, capsys):
    from tpplan.spec.loader import load_spec

    spec = load_spec(TINY, ["extends=qwen2"])
    assert spec.name == "tiny-llama" and spec.source.chain[1].name == "qwen2.yaml"
    (tmp_path / "base.yaml").write_text((SPECS / "llama3.yaml").read_text().replace("name: llama3", "name: b"))
    spec = load_spec(TINY, [f"extends={tmp_path / 'base.yaml'}"])
    assert spec.source.chain[1] == tmp_path / "base.yaml"
    assert main(["validate", str(TINY), "--set", "extends=null"]) == 2  # tiny-llama alone has no plan
    assert "plan: required key is missing" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# CLI flags
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["check", str(TINY), "--dp", "0"], "argument --dp: expected a data-parallel size from 1 to 1,048,576, got 0"),
        (["check", str(TINY), "--dp", "-1"], "argument --dp: expected a data-parallel size from 1 to 1,048,576, got -1"),
        (["check", str(TINY), "--tp", "two"], "argument --tp: expected a tensor-parallel size, got 'two'"),
        (["check", str(TINY), "--timeout", "inf"], "argument --timeout: expected a number of seconds above 0"),
        (["check", str(TINY), "--dp", "512"], "check starts dp*ep*tp = 1024 CPU ranks (one process each)"),
        (["plan", str(TINY), "--device-memory-gib", "nan"], "argument --device-memory-gib: expected a memory size in GiB"),
        (["plan", str(TINY), "--seq-length", "0"], "argument --seq-length: expected a sequence length from 1"),
        (["plan", str(TINY), "--batch-size", "1e3"], "argument --batch-size: expected a batch size, got '1e3'"),
        (["run", str(TINY), "--max-steps", "0"], "argument --max-steps: expected a step count from 1"),
        (["derive", "llama", "--tp", "0"], "argument --tp: expected a tensor-parallel size from 1 to 65,536, got 0"),
        (["zoo", "--jobs", "0"], "argument --jobs: expected a number of jobs from 1 to 1,024, got 0"),
        (["zoo", "--timeout", "nan"], "argument --timeout: expected a number of seconds above 0"),
        (["zoo", "--only", "llama", "-o", "/dev/null"], "-o /dev/null is not a folder: zoo writes zoo.json and zoo.md"),
        (["run", str(TINY), "--max-restarts", "-1"], "argument --max-restarts: expected a restart count from 0"),
        (["run", str(TINY), "--nnodes", "0"], "--nnodes: error: launch.nnodes: expected a node count (2) or a range"),
        (["run", str(TINY), "--nproc-per-node", "many"], "--nproc-per-node: error: launch.nproc_per_node: expected"),
        (["run", str(TINY), "--rdzv-endpoint", "a b:1"], "--rdzv-endpoint: error: launch.rdzv_endpoint: expected HOST:PORT"),
    ],
)
def test_flags_are_validated(capsys, args, message):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_flag_errors_through_a_subprocess():
    result = cli("check", str(TINY), "--dp", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --dp: expected a data-parallel size from 1 to 1,048,576, got 0" in result.stderr
