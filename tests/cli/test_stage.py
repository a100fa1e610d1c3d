"""One resolve stage for every command: the same problem with the model is reported the same way,
located in the spec (file:line:col and field path), exit 2, under every command that needs it.

The commands run in-process (``tpplan.cli.main``, one interpreter for all five: each would spend its
seconds importing torch and transformers again); tests/cli/test_own_models.py runs the factory
errors through a real subprocess."""

from __future__ import annotations

from tests.conftest import REPO
from tpplan.cli import main

MODELS = REPO / "tests" / "data" / "models"
COMMANDS = [["plan", "--resolve"], ["plan"], ["compile", "-o", "{tmp}"], ["check"], ["run", "--dry-run"]]


def test_a_missing_model_is_located_under_every_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    spec = "tests/data/models/missing-model.yaml"
    for command in COMMANDS:
        args = [a.replace("{tmp}", str(tmp_path / "out")) for a in command]
        code = main([*args, spec, "--set", f"train.save_dir={tmp_path / 'runs'}"])
        err = capsys.readouterr().err
        assert code == 2, (command, err)
        first = err.splitlines()[0]
        assert first.startswith(f"{spec}:6:9: error: model.name: cannot load the config of model "
                                "'someorg/no-such-model' offline"), (command, first)
        assert "Traceback" not in err
        assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()  # nothing half-written
