"""Models of your own, proven on real gloo ranks: the plain-PyTorch Llama of examples/llama (tied
and untied) and a model whose only tie is in its parameters, each sharded == unsharded (logits,
loss, every gradient, the clipped norm, the weights after one AdamW step; 1e-5); and the example
trained by `tpplan run` and exported."""

from __future__ import annotations

import json

import pytest

from tests.conftest import REPO, cli
from tests.dist.test_check import assert_equal_within_tolerance
from tpplan.prove.check import run_check
from tpplan.spec.loader import load_spec

EXAMPLE = REPO / "examples" / "llama" / "llama.yaml"
MODELS = REPO / "tests" / "data" / "models"
pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("trust_factories")]  # run_check imports the factory


def test_example_tied_is_proven_at_tp2_through_the_cli_and_at_tp4():
    result = cli("check", str(EXAMPLE), "--json", "--trust-factory")
    assert "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    assert result.returncode == 0 and report["ok"] and report["tp"] == 2 and report["loss_parallel"], report
    assert report["twin"]["factory"] == "examples/llama/llama_model.py:Llama" and report["twin"]["dim"] == 64
    # tied: tok_embeddings.weight and output.weight are one parameter (an untied copy would be one more)
    assert report["parameters_compared"] == 20
    report = run_check(load_spec(EXAMPLE), tp=4, launcher="fork")  # ranks forked: no imports per rank
    assert report.world_size == 4
    assert_equal_within_tolerance(report)


def test_example_untied_over_dp2_x_tp2():
    report = run_check(load_spec(EXAMPLE, ["model.args.tie_embeddings=false"]), tp=2, dp=2, launcher="fork")
    assert report.world_size == 4 and report.parameters_compared == 21
    assert_equal_within_tolerance(report)


def test_a_tie_only_the_parameters_declare_stays_tied_through_tp_and_fsdp():
    # blocks.*.up_a / up_b hold one weight: colwise on both, re-tied, then one FSDP unit per block
    report = run_check(load_spec(MODELS / "shared-weights.yaml"), tp=2, dp=2, launcher="fork")
    assert report.parameters_compared == 8  # 2 blocks x (norm, up_a = up_b, down) + embed + head
    assert_equal_within_tolerance(report)


def test_example_trains_with_tpplan_run_and_exports(tmp_path):
    # bf16-mixed: the script's training step puts FSDP2 (its mixed-precision policy, one rank) on the
    # factory's model after tensor parallel, with the tied output projection in the root unit
    result = cli("run", str(EXAMPLE), "--trust-factory", "--max-steps", "4", "--set", f"train.save_dir={tmp_path}",
                 "--set", "train.log_freq=2", "--set", "train.ckpt_freq=4", "--set", "train.warmup_steps=2",
                 "--set", "train.precision=bf16-mixed")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run_dir = tmp_path / "llama-own"
    script = (run_dir / "train.py").read_text()
    assert "MODEL_FACTORY_MODULE = 'llama_model'" in script and "import tpplan" not in script
    assert "TIED = [\n    ('tok_embeddings.weight', 'output.weight'),\n]" in script
    records = list(map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()))
    assert records[0]["event"] == "start" and records[0]["mesh"] == [1, 2]
    losses = [r["loss"] for r in records if "loss" in r]
    assert len(losses) == 3 and losses[-1] < losses[0]

    exported = tmp_path / "export"
    result = cli("export", str(run_dir), "-o", str(exported), "--trust-factory")
    assert result.returncode == 0, result.stderr
    description = json.loads((exported / "model.json").read_text())
    import sys

    import torch
    from safetensors.torch import load_model

    sys.path.insert(0, str(REPO / "examples" / "llama"))
    try:
        from llama_model import Llama
    finally:
        sys.path.pop(0)
    model = Llama(**description["args"])
    load_model(model, str(exported / "model.safetensors"))
    assert model.output.weight is model.tok_embeddings.weight
    with torch.no_grad():
        logits = model(torch.zeros(1, 8, dtype=torch.long))
    assert logits.shape == (1, 8, 512) and torch.isfinite(logits).all()
