"""The CLI shell: help, version, validate, schema, usage errors."""

from __future__ import annotations

import json

import tpplan
from tests.conftest import SPECS, cli


def test_help_lists_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("validate", "schema"):
        assert command in result.stdout


def test_version():
    result = cli("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"tpplan {tpplan.__version__}"


def test_validate_shipped_specs():
    specs = sorted(str(p) for p in SPECS.glob("*.yaml"))
    result = cli("validate", *specs)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("ok ") == len(specs)


def test_validate_reports_every_file_and_fails_if_any_is_bad(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\n")
    result = cli("validate", str(SPECS / "llama3.yaml"), str(bad))
    assert result.returncode == 2
    assert "ok " in result.stdout
    assert "bad.yaml:1:1: error: model: required key is missing" in result.stderr


def test_unknown_command_exits_2_without_traceback():
    result = cli("frobnicate")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "invalid choice" in result.stderr


def test_missing_spec_file():
    result = cli("validate", "no/such/spec.yaml")
    assert result.returncode == 2
    assert "spec file not found: no/such/spec.yaml" in result.stderr


def test_set_override_is_validated():
    result = cli("validate", str(SPECS / "tiny-llama.yaml"), "--set", "train.seq_length=0")
    assert result.returncode == 2
    assert "--set #1: error: train.seq_length: expected a sequence length from 1 to 16,777,216, got 0" in result.stderr


def test_shipped_spec_by_name():
    result = cli("validate", "llama3")
    assert result.returncode == 0, result.stderr


def test_schema_command_prints_json():
    result = cli("schema")
    assert result.returncode == 0
    schema = json.loads(result.stdout)
    assert schema["title"] == "tpplan spec"
