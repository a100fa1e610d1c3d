"""The small public API, and that loading specs never imports torch (validate stays instant)."""

from __future__ import annotations

import subprocess
import sys

import tpplan


def test_public_names_resolve():
    import tpplan.plan.apply  # noqa: F401 - submodules imported first must not shadow the API
    import tpplan.plan.resolve  # noqa: F401

    for name in ("load_spec", "resolve_spec", "parallelize", "build_mesh", "run_check", "ResolvedPlan",
                 "simulate_plan"):
        assert callable(getattr(tpplan, name)), name


def test_loading_a_spec_does_not_import_torch():
    code = (
        "import sys, tpplan; tpplan.load_spec('specs/llama3.yaml'); "
        "print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=tpplan.__path__[0] + "/..").stdout
    assert out.split() == ["False", "False"]
