"""The oracle's mutation score on the zoo's CI sample: every wrong plan made from a proven spec is refused
by resolve (exit 2), failed by check (exit 1), or proven equal but less parallel (partial).

Sources: each type of ``tpplan.zoo.SAMPLE`` imported plain, Phi-3 and OLMo 2 imported sequence-parallel
(OLMo 2's q_proj keeps its output whole from an input its attention module hands on as a DTensor: the full
zoo's run found that swap equivalent), and specs/phi3.yaml (packed projections and fix-ups, which no imported plan of the sample has): one mutant
of each kind each has a place for (``tpplan.prove.mutants``), each checked on forked gloo ranks at tp=2, two
sources at a time, by ``benchmarks/mutants.py`` in a process of its own (forking from a test process
that has run torch already can hang the children).  A mutant the generator calls equivalent must
survive -- check proving it equal to the unsharded model is the test that it computes what its spec
computes; any other survivor is a gap."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tpplan.prove.mutants import DTENSOR_OUTPUT, EMBEDDING_SPLIT, KINDS, LINEAR_SWAP, score
from tpplan.zoo.matrix import SAMPLE

pytestmark = pytest.mark.slow
SOURCES = [*SAMPLE, "phi3:sp", "olmo2:sp", "specs/phi3.yaml"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    docs = tmp_path_factory.mktemp("mutants")
    command = [sys.executable, str(REPO / "benchmarks" / "mutants.py"), "--only", ",".join(SOURCES),
               "--modes", "plain", "--jobs", "2", "--docs", str(docs)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=1500,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"})
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-3000:]
    data = json.loads((docs / "mutants.json").read_text())
    assert [s["source"] for s in data["sources"]] == SOURCES
    skipped = [(spec["name"], spec["skipped"]) for s in data["sources"] for spec in s["specs"]
               if spec.get("skipped")]
    assert not skipped, skipped  # every source is a proven spec
    assert "**Score: " in (docs / "mutants.md").read_text()
    return [r for s in data["sources"] for spec in s["specs"] for r in spec["results"]]


def test_every_non_equivalent_mutant_is_killed(results):
    total = score(results)
    assert total["non_equivalent"] >= 50, total
    survivors = [(r["source"], r["kind"], r["rule"], r["change"]) for r in total["unexplained_survivors"]]
    assert not survivors, survivors
    assert total["killed"] == total["non_equivalent"]
    # every kind of mistake is made at least once on the sample
    assert {r["kind"] for r in results if not r.get("equivalent")} == set(KINDS), {r["kind"] for r in results}


def test_each_kind_is_killed_for_its_reason(results):
    by_kind: dict[str, list] = {}
    for r in results:
        if not r.get("equivalent"):
            by_kind.setdefault(r["kind"], []).append(r)
    # a gradient summed over tp where every rank had it whole: check names the gradient, twice too large
    for r in by_kind["grad_sum_on_replicated_input"]:
        assert r["verdict"] == "failed" and r["message"].startswith("the gradient of "), r
        assert "differs from the unsharded model's by 100% of its largest value" in r["message"], r
    # MLA's k_rot and Apertus' xIELU alphas without their sum over tp: named with the reason (or refused)
    assert all(r["verdict"] in ("failed", "refused") for r in by_kind["grad_sum_removed"])
    assert any("sum its gradient over tp" in r["message"] or "output features 16:20" in r["message"]
               for r in by_kind["grad_sum_removed"])
    # experts left whole are proven equal, and visibly not parallel
    assert all(r["verdict"] == "partial" and "experts whole" in r["message"]
               for r in by_kind["expert_rule_dropped"])
    assert all(r["verdict"] == "refused" for r in by_kind["tie_broken"])
    assert all(r["verdict"] in ("refused", "failed")
               for r in by_kind["packed_parts_wrong"] + by_kind["fixup_wrong_value"])


def test_equivalent_mutants_compute_what_their_spec_computes(results):
    """Each reason the generator gives is tested by the mutant's own check: proven equal to the unsharded
    model (so to its spec) and as parallel -- never killed."""
    total = score(results)
    killed = [(r["source"], r["rule"], r["message"]) for r in total["equivalent_killed"]]
    assert not killed, killed
    assert {r["equivalent"] for r in total["equivalent"]} == {EMBEDDING_SPLIT, DTENSOR_OUTPUT, LINEAR_SWAP}
    assert all(r["verdict"] == "survived" for r in total["equivalent"])
    said = {(r["source"], r["rule"]): r["equivalent"] for r in total["equivalent"]}
    assert said[("olmo2 (sp)", "model.layers.*.self_attn.q_proj")] == LINEAR_SWAP
