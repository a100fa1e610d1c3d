"""Specs that load but do not fit their model: `tpplan plan --resolve` exits 2 with the numbers.

Each ``tests/data/bad-plan/NAME.yaml`` (extending ``base.yaml``, a tiny Llama) sits next to
``NAME.expected``: the exact stderr.  A line ending in `` ...`` matches by prefix (for lists
that grow, such as the bundled configs); ``{transformers_version}`` stands for the installed
transformers' version (a message that names it must name the one installed).  The catalogue runs the CLI entry point in-process
(one torch import for all); one case also runs as a real subprocess."""

from __future__ import annotations

import pytest

from tests.conftest import REPO, cli
from tpplan.cli import main

BAD_PLANS = REPO / "tests" / "data" / "bad-plan"
CASES = sorted(p.stem for p in BAD_PLANS.glob("*.yaml") if p.stem != "base")


def expected_text(name: str) -> str:
    import transformers

    text = (BAD_PLANS / f"{name}.expected").read_text()
    return text.replace("{transformers_version}", transformers.__version__)


def lines_match(got: str, expected: str) -> bool:
    got_lines, want_lines = got.splitlines(), expected.splitlines()
    if len(got_lines) != len(want_lines):
        return False
    return all(g.startswith(w[:-4]) if w.endswith(" ...") else g == w for g, w in zip(got_lines, want_lines, strict=True))


def test_catalogue_is_large():
    assert len(CASES) >= 25


@pytest.mark.parametrize("name", CASES)
def test_bad_plan_exits_2_with_message(name, monkeypatch, capsys):
    monkeypatch.chdir(BAD_PLANS)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    code = main(["plan", f"{name}.yaml", "--resolve"])
    stderr = capsys.readouterr().err
    expected = expected_text(name)
    assert code == 2, stderr
    assert lines_match(stderr, expected), f"got:\n{stderr}\nexpected:\n{expected}"
    assert stderr.startswith(f"{name}.yaml:") or stderr.startswith("base.yaml:")


def test_one_bad_plan_through_a_real_subprocess():
    result = cli("plan", "kv-heads-below-tp.yaml", "--resolve", cwd=BAD_PLANS)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr == expected_text("kv-heads-below-tp")
