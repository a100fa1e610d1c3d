"""`tpplan compile` and `tpplan run --dry-run` as users call them (subprocesses): files written, the
torchrun command, and bad input as one message with exit 2."""

from __future__ import annotations

import ast
import json
import shlex

import yaml

from tests.conftest import SPECS, cli

TINY = str(SPECS / "tiny-llama.yaml")


def test_compile_writes_the_four_files(tmp_path):
    result = cli("compile", TINY, "-o", str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert f"wrote {tmp_path}/tiny-llama/ (train.py, launch.sh, job.slurm, pytorchjob.yaml, trainjob.yaml)" in result.stdout
    folder = tmp_path / "tiny-llama"
    assert sorted(p.name for p in folder.iterdir()) == [
        ".tpplan-output.json", "job.slurm", "launch.sh", "pytorchjob.yaml", "train.py", "trainjob.yaml"
    ]
    job = yaml.safe_load((folder / "pytorchjob.yaml").read_text())
    assert job["kind"] == "PyTorchJob" and job["spec"]["nprocPerNode"] == "2"
    ast.parse((folder / "train.py").read_text())
    for name in ("train.py", "launch.sh", "job.slurm"):
        assert (folder / name).stat().st_mode & 0o111  # executable: each starts with #!
    data_line = next(
        line for line in (folder / "train.py").read_text().splitlines() if "tiny-alpaca.jsonl" in line
    )
    relative = ast.literal_eval(data_line.strip().rstrip(","))
    assert (folder / relative).resolve() == (SPECS / "data" / "tiny-alpaca.jsonl").resolve()


def test_compile_missing_data_file_is_bad_input_and_the_other_specs_still_compile(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(f"extends: {TINY}\nname: s\ntrain: {{data_files: [missing.jsonl]}}\n")
    result = cli("compile", str(spec), TINY, "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert f"{spec}:\n" in result.stderr
    assert "train.data_files[0]: data file not found: 'missing.jsonl'" in result.stderr
    assert not (tmp_path / "out" / "s").exists()
    assert (tmp_path / "out" / "tiny-llama" / "train.py").is_file()


def test_compile_model_not_available_offline_is_bad_input(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text(
        f"extends: {SPECS / 'llama3.yaml'}\nname: s\nmodel: {{name: someone/not-cached-anywhere}}\n"
    )
    result = cli("compile", str(spec), "-o", str(tmp_path / "out"))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "cannot load the config of model 'someone/not-cached-anywhere' offline" in result.stderr
    assert "point model.name at a local folder" in result.stderr


def dry_run(tmp_path, *args, env=None):
    result = cli("run", TINY, "--dry-run", "--set", f"train.save_dir={tmp_path}", *args, env=env)
    command = next((line for line in result.stdout.splitlines() if line.startswith("launch: ")), None)
    return result, (shlex.split(command[len("launch: ") :]) if command else None)


def test_run_dry_run_writes_the_run_dir(tmp_path):
    result, argv = dry_run(tmp_path, "--max-steps", "7", "--max-restarts", "2")
    assert result.returncode == 0, result.stderr
    run_dir = tmp_path / "tiny-llama"
    assert argv[1:] == [
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "2",
        "--standalone",
        str(run_dir / "train.py"),
        "--run-dir",
        str(run_dir),
    ]
    assert sorted(p.name for p in run_dir.iterdir()) == [
        ".tpplan-output.json",
        ".tpplan-run.lock",  # the lock a run holds while it uses the folder (issue 28)
        "job.slurm",
        "launch.sh",
        "plan.json",
        "pytorchjob.yaml",
        "spec.yaml",
        "train.py",
        "trainjob.yaml",
    ]
    saved = yaml.safe_load((run_dir / "spec.yaml").read_text())
    assert saved["train"]["max_steps"] == 7 and saved["launch"]["max_restarts"] == 2
    assert "extends" not in saved
    assert (run_dir / saved["train"]["data_files"][0]).resolve() == (
        SPECS / "data" / "tiny-alpaca.jsonl"
    ).resolve()
    assert "\nMAX_STEPS = 7  #" in (run_dir / "train.py").read_text()
    plan = json.loads((run_dir / "plan.json").read_text())
    assert plan["tp"] == 2 and plan["loss_parallel"] is True
    assert {
        "module": "lm_head",
        "type": "Linear",
        "style": "colwise",
        "code": "ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False)",
    } in plan["entries"]
    # the saved spec is a spec: it validates, and compiles to the same script
    check = cli("validate", str(run_dir / "spec.yaml"))
    assert check.returncode == 0, check.stderr
    again = cli("compile", str(run_dir / "spec.yaml"), "-o", str(tmp_path / "again"))
    assert again.returncode == 0, again.stderr


def test_run_multi_node_needs_an_endpoint(tmp_path):
    result, argv = dry_run(tmp_path, "--nnodes", "2", env={"MASTER_ADDR": ""})
    assert result.returncode == 2 and argv is None
    assert "several nodes need a rendezvous endpoint" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_world_size_must_fit_the_mesh(tmp_path):
    result, _ = dry_run(tmp_path, "--nproc-per-node", "3")
    assert result.returncode == 2
    assert "does not match the world size 3" in result.stderr


def test_run_help_lists_the_flags():
    result = cli("run", "--help")
    for flag in ("--nproc-per-node", "--nnodes", "--rdzv-endpoint", "--max-restarts", "--max-steps", "--set"):
        assert flag in result.stdout
