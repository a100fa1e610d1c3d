"""The JSON Schema is committed next to the specs; it must be current and accept every shipped spec."""

from __future__ import annotations

import json

import jsonschema
import pytest
import yaml

from tests.conftest import SPECS
from tpplan.spec.extends import load_data
from tpplan.spec.schema import json_schema

SCHEMA_FILE = SPECS / "tpplan.schema.json"
SHIPPED = sorted(SPECS.glob("*.yaml"))


def test_committed_schema_is_current():
    committed = json.loads(SCHEMA_FILE.read_text())
    assert committed == json_schema(), "stale schema: run `tpplan schema -o specs/tpplan.schema.json`"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_schema_accepts_shipped_spec_as_written_and_merged(path):
    schema = json.loads(SCHEMA_FILE.read_text())
    jsonschema.validate(yaml.safe_load(path.read_text()), schema)
    merged, _, _ = load_data(path)
    merged.pop("extends", None)
    jsonschema.validate(merged, schema)


@pytest.mark.parametrize(
    "bad",
    [
        {"name": "x", "model": {"name": "a/b"}, "plan": []},
        {
            "name": "x",
            "model": {"name": "a/b"},
            "plan": [{"match": "a", "style": "rowwise", "output_layouts": "shard(x)"}],
        },
        {
            "name": "x",
            "model": {"name": "a/b"},
            "plan": [{"match": "a", "style": "rowwise"}],
            "mesh": {"tp": 0},
        },
        {"name": "x", "model": {"name": "a/b"}, "plan": [{"match": "a", "style": "rowwise"}], "extra": 1},
    ],
)
def test_schema_rejects_bad_specs(bad):
    schema = json.loads(SCHEMA_FILE.read_text())
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
