"""The catalogue of broken specs: each one exits 2 with exactly its expected message, no traceback.

Each ``tests/data/bad/NAME.yaml`` sits next to ``NAME.expected``, the stderr a user sees.  The
messages name file:line:column, the field path and what was expected; review them by reading
the .expected files."""

from __future__ import annotations

import pytest

from tests.conftest import BAD, cli

CASES = sorted(p.stem for p in BAD.glob("*.yaml"))


def test_catalogue_is_large():
    assert len(CASES) >= 40


@pytest.mark.parametrize("name", CASES)
def test_bad_spec_exits_2_with_message(name):
    result = cli("validate", f"{name}.yaml", cwd=BAD)
    expected = (BAD / f"{name}.expected").read_text()
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    assert result.stderr == expected
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{name}.yaml") or first.startswith("extends-cycle-"), first
