"""One resolve stage per command (issue 26): the CLI resolves each spec against its full model once,
builds a ``plan.stage.Stage`` and hands it to the tool (check, plan, plan --resolve, compile, run); no
tool loads the model's config or resolves the full model a second time."""

from __future__ import annotations

import pytest

import tpplan.model.model_source as model_source_module
import tpplan.plan.resolve as resolve_module
from tests.conftest import SPECS
from tpplan.cli import main
from tpplan.plan.stage import resolve_stage

TINY = SPECS / "tiny-llama.yaml"


@pytest.fixture
def counted(monkeypatch):
    """Counts of model sources made from a spec and of plans resolved, with the layer count of the
    model each plan was resolved against (the full model has the spec's; the simulated step's fewer)."""
    calls = {"sources": 0, "resolved": []}
    real_source, real_resolve = model_source_module.model_source, resolve_module.resolve

    def source(*args, **kwargs):
        calls["sources"] += 1
        return real_source(*args, **kwargs)

    def resolve(spec, model, **kwargs):
        calls["resolved"].append(sum(1 for name, _ in model.named_modules() if name.count(".") == 2
                                     and name.startswith("model.layers.")))
        return real_resolve(spec, model, **kwargs)

    monkeypatch.setattr(model_source_module, "model_source", source)
    monkeypatch.setattr(resolve_module, "resolve", resolve)
    return calls


def test_compile_run_and_plan_resolve_the_spec_once(counted, tmp_path, capsys):
    spec = TINY
    commands = [
        ["plan", str(spec), "--resolve"],
        ["compile", str(spec), "-o", str(tmp_path / "out")],
        ["run", str(spec), "--dry-run", "--set", f"train.save_dir={tmp_path / 'runs'}"],
    ]
    for argv in commands:
        counted["sources"], counted["resolved"] = 0, []
        assert main(argv) == 0, argv
        assert (counted["sources"], len(counted["resolved"])) == (1, 1), argv


def test_plan_resolves_the_full_model_once_and_simulates_with_that_plan(counted, capsys):
    assert main(["plan", str(TINY), "--json", "--set", "model.config.num_hidden_layers=6"]) == 0
    assert counted["sources"] == 1
    assert counted["resolved"] == [6, 3]  # the full model once, then the simulated step's three blocks


def test_check_is_handed_the_stage_the_cli_resolved(counted, monkeypatch, capsys):
    import tpplan.prove.check as check_module

    class Handed(BaseException):
        pass

    handed = {}

    def run_check(spec, **kwargs):
        handed.update(kwargs)
        raise Handed

    monkeypatch.setattr(check_module, "run_check", run_check)
    with pytest.raises(Handed):
        main(["check", str(TINY), "--tp", "2"])
    stage = handed["stage"]
    assert (stage.tp, stage.ep, handed["tp"], handed["ep"]) == (2, 1, 2, 1)
    assert (counted["sources"], len(counted["resolved"])) == (1, 1)


def test_a_stage_resolved_at_other_sizes_is_refused_by_the_tool():
    from tpplan.spec.loader import load_spec

    spec = load_spec(TINY)
    stage = resolve_stage(spec, tp=2)
    assert stage.require(spec, tp=2, ep=1) is stage
    with pytest.raises(ValueError, match="tp=2 ep=1 .* tp=4"):
        stage.require(spec, tp=4, ep=1)
    with pytest.raises(ValueError):
        stage.require(load_spec(TINY), tp=2, ep=1)  # another spec
