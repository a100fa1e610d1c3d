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


@functools.cache
def derived(source: str, sequence_parallel: bool = False, tp: int | None = None):
    """``tpplan.derive.derive`` without check, once per arguments for the whole test session (the unit
    tests read its analysis and spec; the multi-rank tests prove the same specs)."""
    from tpplan.derive import derive

    return derive(source, sequence_parallel=sequence_parallel, tp=tp, check=False)
