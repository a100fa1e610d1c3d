"""Shared test helpers: the repository paths and a way to run the CLI as users do (a subprocess)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SPECS = REPO / "specs"
BAD = REPO / "tests" / "data" / "bad"


# The longest files, longest first (as the CI runs on 2 cores timed them): pytest-xdist hands out whole
# files (--dist loadfile) in collection order, so the longest start first and the two workers finish
# together rather than one waiting on the other's last long file.  Only the order changes.
LONGEST_FIRST = (
    "tests/dist/test_train_script.py",
    "tests/dist/test_two_nodes.py",
    "tests/cli/test_zoo.py",
    "tests/dist/test_check_training.py",
    "tests/dist/test_reshard_export.py",
    "tests/dist/test_derive.py",
    "tests/cli/test_plan_simulate.py",
    "tests/unit/test_render_injection.py",
)


def pytest_collection_modifyitems(items):
    rank = {path: i for i, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.relative_to(REPO).as_posix(), len(rank)))


def cli(*args: str, cwd: Path | str | None = None, timeout: float = 600, env: dict | None = None):
    """Run ``python -m tpplan ARGS`` and return the CompletedProcess (text mode)."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-m", "tpplan", *args],
        cwd=cwd or REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
    )


@pytest.fixture
def run_cli():
    return cli


@pytest.fixture
def trust_factories():
    """Library calls may import the factories of the repository's own specs (examples/, tests/data),
    as ``--trust-factory`` lets a command do: tpplan refuses spec code unless trusted."""
    from tpplan.core.trust import trusting

    with trusting():
        yield


@functools.cache
def derived(source: str, sequence_parallel: bool = False, tp: int | None = None):
    """``tpplan.derive.derive`` without check, once per arguments for the whole test session (the unit
    tests read its analysis and spec; the multi-rank tests prove the same specs)."""
    from tpplan.derive import derive

    return derive(source, sequence_parallel=sequence_parallel, tp=tp, check=False)
