"""`tpplan derive` from the command line: a model it cannot plan is refused with its reasons (exit 2,
one message, no traceback, nothing written); bad arguments are bad input."""

from __future__ import annotations

from tests.conftest import REPO, cli


def test_refusal_is_one_message_with_the_reasons_and_nothing_written(tmp_path):
    # blocks without a Linear (a depthwise nn.Conv1d mixes the tokens) and a vocabulary no tp divides
    out = tmp_path / "mixer.yaml"
    result = cli("derive", str(REPO / "tests" / "data" / "models" / "conv-mixer.yaml"), "-o", str(out), "--trust-factory")
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert "no tensor-parallel plan for ConvMixer" in result.stderr
    assert "50257" in result.stderr and "Conv1d, LayerNorm" in result.stderr
    assert not out.exists()
    assert result.stdout == ""


def test_bad_arguments_are_bad_input(tmp_path):
    result = cli("derive", "llama", "--tp", "0")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --tp: expected a tensor-parallel size from 1 to 65,536, got 0" in result.stderr
    result = cli("derive", "no-such-model-type")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "is not a file, a folder, a hub id" in result.stderr


def test_a_parameter_budget_is_a_count_and_one_below_reach_is_refused(tmp_path):
    result = cli("derive", "llama", "--max-params-per-rank", "lots")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --max-params-per-rank: expected a count such as 3.5B, 800M or 1200000, got 'lots'" in result.stderr
    out = tmp_path / "qwen3.yaml"
    result = cli("derive", "qwen3", "--tp", "2", "--max-params-per-rank", "1K", "-o", str(out))
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "parameters per rank, more than --max-params-per-rank 1.00K" in result.stderr
    assert "a larger --tp, or a larger budget" in result.stderr
    assert not out.exists() and result.stdout == ""
