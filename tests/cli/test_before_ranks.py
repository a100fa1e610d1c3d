"""What used to fail late or quietly is refused before any rank starts (issue 14): data files
that training could not read, model configs transformers refuses or that would build forever,
and the files tpplan writes stay what they say (YAML through an emitter, job.slurm finding its
own folder for any path)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import REPO, SPECS, cli
from tests.unit.test_render_injection import fake_bin
from tpplan.cli import main

TINY = SPECS / "tiny-llama.yaml"


def test_bad_data_files_and_configs_are_refused_with_what_exists(tmp_path):
    data = {
        "empty.jsonl": b"",
        "binary.jsonl": bytes(range(256)) * 4,
        "columns.jsonl": b'{"prompt": "a", "answer": "b"}\n',
        "no-columns.jsonl": b"[1, 2, 3]\n",
        "latin1.jsonl": '{"text": "caf\u00e9"}\n'.encode("latin-1"),
        "columns.csv": b"question,answer\nq,a\n",
    }
    for name, content in data.items():
        (tmp_path / name).write_bytes(content)
    os.mkfifo(tmp_path / "pipe.jsonl")
    specs = {name: f"train: {{data_files: [{name}]}}" for name in [*data, "pipe.jsonl"]}
    specs["columns.csv"] = "train: {dataset: csv, data_files: [columns.csv]}"
    specs["hidden-65"] = "model: {config: {hidden_size: 65}}"
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "config.json").write_text(json.dumps(
        {"model_type": "llama", "num_hidden_layers": 1_000_000, "hidden_size": 64, "num_attention_heads": 4,
         "intermediate_size": 128, "vocab_size": 512}))
    specs["million-layers-config"] = f"extends: {SPECS / 'llama3.yaml'}\nmodel: {{name: ./model}}"
    (tmp_path / "fifo-model").mkdir()
    os.mkfifo(tmp_path / "fifo-model" / "config.json")
    specs["fifo-config"] = f"extends: {SPECS / 'llama3.yaml'}\nmodel: {{name: ./fifo-model}}"
    paths = []
    for i, body in enumerate(specs.values()):
        spec = tmp_path / f"s{i}.yaml"
        base = "" if body.startswith("extends:") else f"extends: {TINY}\n"
        spec.write_text(f"{base}name: s{i}\n{body}\n")
        paths.append(str(spec))
    result = cli("compile", *paths, "-o", str(tmp_path / "out"), cwd=tmp_path, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    err = result.stderr
    for needle in [
        "s0.yaml:3:22: error: data file empty.jsonl is empty",
        "s1.yaml:3:22: error: data file binary.jsonl is binary (it holds NUL bytes), not json text",
        "error: train.text_column: data file columns.jsonl has no column 'text'; its columns: 'prompt', 'answer'",
        "s3.yaml:3:22: error: data file no-columns.jsonl has no columns: its first record is 1, not an object",
        "s4.yaml:3:22: error: data file latin1.jsonl is not UTF-8 text (byte 13 cannot be decoded)",
        "error: train.text_column: data file columns.csv has no column 'text'; its columns: 'question', 'answer'",
        "s6.yaml:3:22: error: pipe.jsonl is a FIFO (named pipe), not a regular file",
        "s7.yaml:3:31: error: model.config.hidden_size: transformers refuses this llama config: ValueError: "
        "The hidden size (65) is not a multiple of the number of attention heads (4).",
        "s8.yaml:3:15: error: model.name: the model's num_hidden_layers is 1,000,000; tpplan takes a block count "
        "from 1 to 1,024",
        "s9.yaml:3:15: error: model.name: fifo-model/config.json is a FIFO (named pipe), not a regular file",
    ]:
        assert needle in err, needle + "\n\n" + err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_run_checks_data_before_the_run_dir_is_made(tmp_path, capsys):
    (tmp_path / "d.jsonl").write_text('{"prompt": "x"}\n')
    spec = tmp_path / "s.yaml"
    spec.write_text(f"extends: {TINY}\nname: s\ntrain: {{data_files: [d.jsonl], save_dir: {tmp_path / 'runs'}}}\n")
    assert main(["run", str(spec), "--dry-run"]) == 2
    assert "has no column 'text'; its columns: 'prompt'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_yaml_tpplan_writes_goes_through_an_emitter(tmp_path, capsys):
    assert main(["import-hf", "llama", "--name", "x\ny: 1\n#SBATCH"]) == 0
    text = capsys.readouterr().out
    data = yaml.safe_load(text)
    assert "y" not in data and data["name"] == "x-y-1-sbatch"
    assert "# Imported by `tpplan import-hf llama --name x\\ny: 1\\n#SBATCH`" in text

    folder = tmp_path / "a\nb: 1"
    folder.mkdir()
    spec = folder / "s.yaml"
    spec.write_text(f"extends: {TINY}\nname: s\ntrain: {{save_dir: {json.dumps(str(tmp_path / 'runs'))}}}\n")
    assert main(["run", str(spec), "--dry-run"]) == 0
    saved = (tmp_path / "runs" / "s" / "spec.yaml").read_text()
    first, second = saved.splitlines()[:2]
    assert first.startswith("# the merged spec of this run (from ") and "a\\nb: 1" in first
    assert not second.startswith("b:")
    assert "b" not in yaml.safe_load(saved) and yaml.safe_load(saved)["name"] == "s"


def test_job_slurm_finds_its_own_folder_when_the_path_has_spaces(tmp_path):
    base = tmp_path / "x"
    real = base / "my job"  # scontrol prints: Command=/.../x/my job/job.slurm --max-steps 3
    real.mkdir(parents=True)
    shutil.copy(REPO / "generated" / "llama3" / "job.slurm", real / "job.slurm")
    (real / "train.py").write_text("# the right one\n")
    (base / "train.py").write_text("# a decoy: the first word of the path is x/my, whose folder is x\n")
    out = tmp_path / "launched.json"
    env = {
        **os.environ,
        "PATH": f"{fake_bin(tmp_path / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "SLURM_JOB_ID": "42",
        "SLURM_NNODES": "2",
        "SLURM_JOB_NODELIST": "node[0-1]",
        "FAKE_JOB_SCRIPT": str(real / "job.slurm"),
    }
    env.pop("TPPLAN_SCRIPT_DIR", None)
    # sbatch runs a copy from its spool folder: bash_source is not the original
    spool = tmp_path / "spool"
    spool.mkdir()
    shutil.copy(real / "job.slurm", spool / "slurm_script")
    done = subprocess.run(["bash", str(spool / "slurm_script"), "--max-steps", "3"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["argv"][-3:] == [str(real / "train.py"), "--max-steps", "3"]

    env["FAKE_JOB_SCRIPT"] = str(tmp_path / "nowhere" / "job.slurm")
    lost = subprocess.run(["bash", str(spool / "slurm_script")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=60)
    assert lost.returncode == 2 and "set TPPLAN_SCRIPT_DIR" in lost.stderr


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.floats(), st.integers(), st.booleans(), st.none(),
                 st.lists(st.text(max_size=5), max_size=3)))
def test_values_tpplan_writes_read_back_the_same_inside_a_flow_mapping(value):
    from tpplan.spec.write import scalar

    text = scalar(value)
    assert "\n" not in text
    back = yaml.safe_load("{key: " + text + "}")["key"]
    assert back == value or (isinstance(value, float) and value != value and back != back)
