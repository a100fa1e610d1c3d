"""Nothing run unasked, no false success, nothing lost (issue 28), through the CLI as users call it.

A spec's code (``model.factory``) is imported only under ``--trust-factory``: each factory here
leaves a file behind when it is imported, so a test sees whether it ran.  A factory that exits
(``sys.exit(0)``, a usage text), raises ``KeyboardInterrupt``, returns no module or allocates past
memory is exit 2 located at ``model.factory``, never an exit 0 that did no work.  The rest: bounded
``--set`` keys, a Kubernetes name kubectl takes, ``zoo --only ''``, derive's messages about a plan it
did not write, the modes of what tpplan writes, one rule for symbolic links, the run lock."""

from __future__ import annotations

import fcntl
import os
import shutil
import stat
import sys
import textwrap

import pytest
import yaml

from tests.cli.test_files import assert_refused, tree
from tests.conftest import REPO, SPECS, cli
from tpplan.cli import main

DATA = REPO / "specs" / "data" / "tiny-alpaca.jsonl"
TOY = REPO / "tests" / "data" / "bad-model" / "toy_model.py"

# factories, each a module that leaves `imported-<name>` next to itself when it is imported
MODULES = {
    "proof_model": "from toy_model import build, build_nothing  # noqa: F401\n",
    "exits_at_import": "import sys\nsys.exit(0)\n",
    "usage_at_import": "import sys\nsys.exit('usage: exits.py [--size N]')\n",
    "interrupts": "def build(vocab_size, dim):\n    raise KeyboardInterrupt\n",
    "allocates": "import torch\n\n\ndef build(vocab_size, dim):\n"
                 "    return torch.nn.Linear(1 << 40, 1 << 20, device='cpu')  # 4 EiB: more than any machine\n",
}


def spec_text(factory: str, name: str = "own") -> str:
    return textwrap.dedent(f"""\
        name: {name}
        model:
          factory: {factory}
          args: {{vocab_size: 512, dim: 8}}
          twin_args: {{dim: 8}}
          tokenizer: {{build: byte_bpe, vocab_size: 512}}
        plan:
          - {{match: embed, style: rowwise, input_layouts: replicate, output_layouts: replicate}}
        mesh: {{tp: 2}}
        train: {{data_files: [{DATA}], text_column: text, save_dir: save, max_steps: 2}}
        launch: {{nproc_per_node: 2}}
        """)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A folder of factory specs, the working directory; ``imported(name)`` says whether that
    module's top level ran."""
    shutil.copy(TOY, tmp_path / "toy_model.py")
    for module, body in MODULES.items():
        proof = f"open(__file__.replace('{module}.py', 'imported-{module}'), 'a').write('ran')\n"
        (tmp_path / f"{module}.py").write_text(proof + body)
    attr = {"proof_model": "build"}
    for module in MODULES:
        (tmp_path / f"{module}.yaml").write_text(spec_text(f"{module}.py:{attr.get(module, 'build')}"))
    (tmp_path / "returns-none.yaml").write_text(spec_text("proof_model.py:build_nothing"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))  # a factory's folder goes first on it: not for the next test
    yield tmp_path
    for module in [*MODULES, "toy_model"]:  # each test imports its own folder's modules
        sys.modules.pop(module, None)


def imported(folder, module: str) -> bool:
    return (folder / f"imported-{module}").exists()


# ------------------------------------------------------------------------------------------
# Trust: nothing a spec names is imported unless the command was told to
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [["plan", "--resolve"], ["plan"], ["check"], ["compile", "-o", "out"],
                                     ["run", "--dry-run"], ["derive"]])
def test_commands_refuse_a_factory_they_were_not_told_to_trust(factories, capsys, command):
    code = main([*command, "proof_model.yaml"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("proof_model.yaml:3:12: error: model.factory: model.factory 'proof_model.py:build' is "
                          "Python code named by the spec: tpplan imports it only when you trust"), err
    assert "hint: pass --trust-factory (or set TPPLAN_TRUST_FACTORY=1)" in err
    assert not imported(factories, "proof_model")
    assert not (factories / "out").exists() and not (factories / "save").exists()


def test_validate_checks_the_rest_and_names_the_factory_it_did_not_import(factories, capsys):
    assert main(["validate", "proof_model.yaml", "exits_at_import.yaml"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == ("ok proof_model.yaml: own, 1 plan rules, tp=2, dp=auto, model factory proof_model.py:build not "
                      "imported (its code runs only with --trust-factory: then its model.args are bound too)")
    assert len(out) == 2 and not list(factories.glob("imported-*"))  # not even the one that would exit
    assert main(["validate", "--trust-factory", "proof_model.yaml"]) == 0
    assert capsys.readouterr().out.endswith("model factory proof_model.py:build\n")
    assert imported(factories, "proof_model")


def test_the_environment_variable_is_the_opt_in_for_scripts(factories):
    result = cli("plan", "--resolve", "proof_model.yaml", cwd=factories, env={"TPPLAN_TRUST_FACTORY": "1"})
    assert result.returncode == 0, result.stderr
    assert imported(factories, "proof_model")


def test_export_reads_and_checks_the_checkpoint_before_it_imports_the_runs_factory(factories):
    import importlib.util
    import warnings

    import torch.distributed.checkpoint as dcp

    assert main(["run", "proof_model.yaml", "--dry-run", "--trust-factory"]) == 0  # someone else's run
    (factories / "imported-proof_model").unlink()
    run = factories / "save" / "own"
    loaded = importlib.util.spec_from_file_location("toy_for_checkpoint", factories / "toy_model.py")
    toy = importlib.util.module_from_spec(loaded)
    loaded.loader.exec_module(toy)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # no process group: one process writes every shard
        dcp.save({"model": toy.build(vocab_size=512, dim=8).state_dict()}, checkpoint_id=run / "checkpoints" /
                 "step-00000001", no_dist=True)
    metadata = run / "checkpoints" / "step-00000001" / ".metadata"
    good = metadata.read_bytes()

    result = cli("export", str(run), "-o", "hf", cwd=factories)
    assert_refused(result, "save/own/spec.yaml:6:12: error: model.factory: model.factory '../../proof_model.py:build' "
                   "is Python code named by the spec", "--trust-factory")
    metadata.write_bytes(good[:100])  # damaged: refused before the factory is imported, even when trusted
    result = cli("export", str(run), "-o", "hf", "--trust-factory", cwd=factories)
    assert_refused(result, "refusing the checkpoint:", "is not valid checkpoint metadata")
    assert not imported(factories, "proof_model") and not (factories / "hf").exists()
    metadata.write_bytes(good)
    result = cli("export", str(run), "-o", "hf", "--trust-factory", cwd=factories)
    assert result.returncode == 0, result.stderr
    assert imported(factories, "proof_model") and (factories / "hf" / "model.safetensors").is_file()


# ------------------------------------------------------------------------------------------
# Exit codes that cannot lie: user code that exits or interrupts is exit 2, located
# ------------------------------------------------------------------------------------------


def test_a_factory_that_exits_at_import_is_exit_2_under_every_command(factories, capsys):
    (factories / "invalid.yaml").write_text("name: x\nmesh: {tp: zero}\n")
    # validate goes on to the next spec (before: sys.exit(0) ended tpplan, exit 0, no output)
    assert main(["validate", "--trust-factory", "exits_at_import.yaml", "invalid.yaml"]) == 2
    err = capsys.readouterr().err
    assert ("exits_at_import.yaml:3:12: error: model.factory: importing the model factory "
            "'exits_at_import.py:build' called sys.exit(0) (exits_at_import.py:3: sys.exit(0))") in err
    assert "invalid.yaml:2:" in err
    for command in (["plan"], ["plan", "--resolve"], ["check"], ["derive", "-o", "derived.yaml"]):
        assert main([*command, "exits_at_import.yaml", "--trust-factory"]) == 2, command
        assert "called sys.exit(0)" in capsys.readouterr().err, command
    assert not (factories / "derived.yaml").exists()
    assert main(["plan", "usage_at_import.yaml", "--trust-factory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("usage_at_import.yaml:3:12: error: model.factory: importing the model factory "
                          "'usage_at_import.py:build' called sys.exit('usage: exits.py [--size N]')"), err
    assert "keep a script's work under `if __name__ == \"__main__\":`" in err
    assert main(["plan", "--resolve", "interrupts.yaml", "--trust-factory"]) == 2  # its own KeyboardInterrupt
    assert capsys.readouterr().err.startswith("interrupts.yaml:3:12: error: model.factory: the model factory "
                                              "'interrupts.py:build' raised KeyboardInterrupt (interrupts.py:")


def test_a_factory_that_exits_is_exit_2_from_the_process_too(factories):
    for command in (["check"], ["validate"]):
        result = cli(*command, "exits_at_import.yaml", "--trust-factory", cwd=factories, timeout=120)
        assert result.returncode == 2 and "called sys.exit(0)" in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr


def test_a_factory_that_returns_none_or_allocates_past_memory_is_located(factories, capsys):
    for command in (["plan"], ["plan", "--resolve"], ["derive"], ["check"]):  # plan and derive: none before
        assert main([*command, "returns-none.yaml", "--trust-factory"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("returns-none.yaml:3:12: error: model.factory: the model factory "
                              "'proof_model.py:build_nothing' returned a NoneType, not a torch.nn.Module"), (command, err)
    assert main(["plan", "allocates.yaml", "--trust-factory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("allocates.yaml:3:12: error: model.factory: the model factory 'allocates.py:build' "
                          "raised RuntimeError:"), err
    assert "hint: the factory asked for more memory than this machine has" in err


def test_a_factory_path_that_is_a_folder_or_a_fifo_says_so(factories, capsys):
    (factories / "folder.py").mkdir()
    os.mkfifo(factories / "pipe.py")
    (factories / "folder.yaml").write_text(spec_text("folder.py:build"))
    (factories / "pipe.yaml").write_text(spec_text("pipe.py:build"))
    for trust in ([], ["--trust-factory"]):  # the file is looked at, never opened, either way
        assert main(["validate", "folder.yaml", "pipe.yaml", *trust]) == 2
        err = capsys.readouterr().err
        assert "folder.yaml:3:12: error: model.factory: model factory file 'folder.py' is a directory, not a " \
               "Python file" in err
        assert "pipe.yaml:3:12: error: model.factory: model factory file 'pipe.py' is a FIFO (named pipe), not a " \
               "Python file" in err


# ------------------------------------------------------------------------------------------
# Bounded input, names other tools accept, flags that cannot mean everything
# ------------------------------------------------------------------------------------------


def test_a_set_key_thousands_of_levels_deep_is_one_message():
    result = cli("validate", str(SPECS / "tiny-llama.yaml"), "--set", ".".join(["model"] + ["config"] * 3000) + "=1")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    assert "is 3,001 levels deep; a spec has at most 64" in result.stderr


def test_the_kubernetes_name_is_a_dns_1123_label(tmp_path):
    import re

    name = "a" * 52 + "-b-cdefg"  # 60 characters: cut at 53, the cut ends in '-'
    assert main(["compile", str(SPECS / "tiny-llama.yaml"), "-o", str(tmp_path), "--set", f"name={name}"]) == 0
    job = yaml.safe_load((tmp_path / name / "pytorchjob.yaml").read_text())
    label = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
    assert label.match(job["metadata"]["name"]) and len(job["metadata"]["name"]) <= 63, job["metadata"]["name"]
    config = [v for v in job["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["volumes"]
              if "configMap" in v]
    assert all(label.match(v["configMap"]["name"]) for v in config)


def test_zoo_only_with_no_type_is_refused(capsys):
    assert main(["zoo", "--only", ""]) == 2
    assert "error: --only '' names no model type" in capsys.readouterr().err
    assert main(["zoo", "--only", " , "]) == 2


def test_derive_errors_never_point_into_the_spec_it_did_not_write(factories, capsys):
    assert main(["derive", "llama", "--tp", "64", "-o", "derived.yaml"]) == 2
    err = capsys.readouterr().err
    assert "derived.yaml:" not in err and ".yaml:" not in err, err
    assert "plan[1].plan[2].style: model.layers.0.self_attn.o_proj: rowwise splits 32 heads" in err
    (factories / "no-twin.yaml").write_text(spec_text("proof_model.py:build").replace("  twin_args: {dim: 8}\n", ""))
    assert main(["derive", "no-twin.yaml", "--trust-factory"]) == 2
    assert capsys.readouterr().err.startswith("no-twin.yaml:3:3: error: model.twin_args: tpplan check needs a small "
                                              "model")  # in the input spec, where twin_args belongs
    assert not (factories / "derived.yaml").exists()


# ------------------------------------------------------------------------------------------
# Modes: the umask, secrets owner-only, a file written over keeps its mode
# ------------------------------------------------------------------------------------------


@pytest.fixture
def umask_077():
    previous = os.umask(0o077)
    yield
    os.umask(previous)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_secrets_are_the_owners_only_whatever_the_umask(tmp_path):
    previous = os.umask(0o002)  # a group-writable umask: still owner-only
    try:
        assert main(["compile", str(SPECS / "tiny-llama.yaml"), "-o", str(tmp_path / "gen"),
                     "--set", "launch.env.HF_TOKEN=hf_secret"]) == 0
        assert main(["run", str(SPECS / "tiny-llama.yaml"), "--dry-run", "--set", f"train.save_dir={tmp_path}",
                     "--set", "launch.env.HF_TOKEN=hf_secret"]) == 0
    finally:
        os.umask(previous)
    for folder in (tmp_path / "gen" / "tiny-llama", tmp_path / "tiny-llama"):
        assert "hf_secret" in (folder / "launch.sh").read_text()
        assert {n: mode(folder / n) for n in ("train.py", "launch.sh", "job.slurm", "pytorchjob.yaml")} == {
            "train.py": 0o700, "launch.sh": 0o700, "job.slurm": 0o700, "pytorchjob.yaml": 0o600}
    assert mode(tmp_path / "tiny-llama" / "spec.yaml") == 0o600  # it holds launch.env too
    assert mode(tmp_path / "tiny-llama" / "plan.json") == 0o664


@pytest.mark.usefixtures("umask_077")
def test_new_files_respect_the_umask_and_a_file_written_over_keeps_its_mode(tmp_path):
    assert main(["schema", "-o", str(tmp_path / "new.json")]) == 0
    assert mode(tmp_path / "new.json") == 0o600  # before: 0o644 whatever the umask
    mine = tmp_path / "mine.json"
    mine.write_text("{}")
    mine.chmod(0o640)
    assert main(["schema", "-o", str(mine)]) == 0
    assert mode(mine) == 0o640 and "tpplan spec" in mine.read_text()
    assert main(["compile", str(SPECS / "tiny-llama.yaml"), "-o", str(tmp_path / "gen")]) == 0
    assert mode(tmp_path / "gen" / "tiny-llama") == 0o700
    assert mode(tmp_path / "gen" / "tiny-llama" / ".tpplan-output.json") == 0o600


# ------------------------------------------------------------------------------------------
# One rule for symbolic links, for every -o: followed, the link stays
# ------------------------------------------------------------------------------------------


def test_compile_writes_through_a_link_to_its_folder(tmp_path):
    real = tmp_path / "real"
    assert main(["compile", str(SPECS / "tiny-llama.yaml"), "-o", str(real)]) == 0
    out = tmp_path / "out"
    out.mkdir()
    (out / "tiny-llama").symlink_to(real / "tiny-llama")
    assert main(["compile", str(SPECS / "tiny-llama.yaml"), "-o", str(out), "--set", "description=through"]) == 0
    assert (out / "tiny-llama").is_symlink() and os.readlink(out / "tiny-llama") == str(real / "tiny-llama")
    assert "through" in (real / "tiny-llama" / "train.py").read_text()


def test_import_hf_writes_through_a_link(tmp_path):
    target = tmp_path / "real.yaml"
    target.write_text("old")
    (tmp_path / "link.yaml").symlink_to(target)
    assert main(["import-hf", "llama", "-o", str(tmp_path / "link.yaml")]) == 0
    assert (tmp_path / "link.yaml").is_symlink() and "base_model_tp_plan" in target.read_text()


def test_zoo_writes_its_matrix_through_links(tmp_path):
    from tpplan.zoo.matrix import write_matrix

    keep = tmp_path / "elsewhere.md"
    keep.write_text("old")
    keep.chmod(0o640)
    (tmp_path / "zoo.md").symlink_to(keep)
    write_matrix([], tmp_path, seconds=1.0, command="tpplan zoo")
    assert (tmp_path / "zoo.md").is_symlink()  # before: replaced by a file
    assert keep.read_text().startswith("#") and mode(keep) == 0o640
    (tmp_path / "zoo.json").unlink()
    (tmp_path / "zoo.json").symlink_to(tmp_path / "nowhere.json")
    assert_refused(cli("zoo", "--only", "llama", "-o", str(tmp_path)), "zoo.json is a symbolic link to nothing")


# ------------------------------------------------------------------------------------------
# A run directory is locked while a run uses it
# ------------------------------------------------------------------------------------------


def test_a_second_run_of_a_run_directory_in_use_is_refused_and_changes_nothing(tmp_path, capsys):
    spec = str(SPECS / "tiny-llama.yaml")
    assert main(["run", spec, "--dry-run", "--set", f"train.save_dir={tmp_path}"]) == 0
    run = tmp_path / "tiny-llama"
    before = tree(tmp_path)
    holder = os.open(run / ".tpplan-run.lock", os.O_RDWR)
    fcntl.flock(holder, fcntl.LOCK_EX)  # as a `tpplan run` training in it holds it
    try:
        code = main(["run", spec, "--dry-run", "--set", f"train.save_dir={tmp_path}", "--set", "description=other"])
    finally:
        os.close(holder)
    err = capsys.readouterr().err
    assert code == 2 and f"is in use by another tpplan run (pid {os.getpid()})" in err, err
    assert tree(tmp_path) == before
    assert main(["run", spec, "--dry-run", "--set", f"train.save_dir={tmp_path}"]) == 0  # free again
