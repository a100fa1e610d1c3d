"""A model of your own (``model.factory``): `tpplan validate` imports the factory and binds its
arguments, and says exactly what is wrong, where, with exit 2.

Each ``tests/data/bad-model/NAME.yaml`` sits next to ``NAME.expected`` (the exact stderr).  The
catalogue runs the CLI in-process; the three cases the issue names also run as one real
subprocess."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, cli
from tpplan.cli import main

BAD_MODELS = REPO / "tests" / "data" / "bad-model"
CASES = sorted(p.stem for p in BAD_MODELS.glob("*.yaml") if p.stem != "base")


@pytest.mark.parametrize("name", CASES)
def test_bad_model_exits_2_with_message(name, monkeypatch, capsys):
    monkeypatch.chdir(BAD_MODELS)
    code = main(["validate", "--trust-factory", f"{name}.yaml"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert captured.out == ""
    assert captured.err == (BAD_MODELS / f"{name}.expected").read_text()
    assert captured.err.startswith(f"{name}.yaml:")


def test_import_fails_callable_missing_args_do_not_bind_through_a_real_subprocess():
    # one interpreter for the three refusals and a good factory spec (validate goes on after an error)
    example = REPO / "examples" / "llama" / "llama.yaml"
    result = cli("validate", "--trust-factory", "import-fails.yaml", "callable-missing.yaml", "args-unknown.yaml",
                 str(example), cwd=BAD_MODELS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stdout.startswith(f"ok {example}: llama-own, 12 plan rules, tp=2, dp=auto, model factory ")
    assert result.stdout.endswith("examples/llama/llama_model.py:Llama\n")  # relative to the cwd when below it
    lines = [line for line in result.stderr.splitlines() if not line.startswith("  hint:")]
    assert [line.split(": error: ")[0] for line in lines] == [
        "import-fails.yaml:4:12", "callable-missing.yaml:4:12", "args-unknown.yaml:5:32"]
    assert "No module named 'a_package_that_is_not_installed' (broken_import.py:3:" in lines[0]
    assert "toy_model.py has no attribute 'buld'" in lines[1]
    assert "model.args.dimm: build() has no parameter 'dimm'" in lines[2]
