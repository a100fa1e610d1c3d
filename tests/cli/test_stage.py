"""One resolve stage for every command: the same problem with the model is reported the same way,
located in the spec (file:line:col and field path), exit 2, under every command that needs it."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, cli

MODELS = REPO / "tests" / "data" / "models"


@pytest.mark.parametrize(
    "command",
    [["plan", "--resolve"], ["plan"], ["compile", "-o", "{tmp}"], ["check"], ["run", "--dry-run"]],
    ids=lambda c: " ".join(c).replace(" {tmp}", "").replace(" -o", ""),
)
def test_a_missing_model_is_located_under_every_command(command, tmp_path):
    spec = MODELS / "missing-model.yaml"
    args = [a.replace("{tmp}", str(tmp_path / "out")) for a in command]
    result = cli(*args, str(spec), "--set", f"train.save_dir={tmp_path / 'runs'}")
    assert result.returncode == 2, result.stderr
    first = result.stderr.splitlines()[0]
    assert first.startswith("tests/data/models/missing-model.yaml:6:9: error: model.name: cannot load the config of "
                            "model 'someorg/no-such-model' offline"), first
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "runs").exists()  # nothing half-written
