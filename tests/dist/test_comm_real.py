"""The simulator's collectives (fake process group, fake tensors) equal those of a real run.

One torchrun of 2 CPU gloo ranks runs one training step (forward, loss, backward, grad norm, update)
of a tiny Llama three times -- the llama3 plan at tp=2 (DTensor, sequence and loss parallel), the
plain Megatron plan at tp=2 (all-reduces, full logits) and dp=2 (FSDP2) -- recording every
collective with ``tpplan.simulate.comm``; ``tpplan.simulate.simulator`` must report the same collectives: op,
mesh dim, group size, phase, module and bytes, one for one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from tests.conftest import REPO, SPECS

TINY = str(SPECS / "tiny-llama.yaml")
PLAIN = str(REPO / "tests" / "data" / "plans" / "megatron-plain.yaml")
RUNS = [{"spec": TINY, "tp": 2, "dp": 1}, {"spec": PLAIN, "tp": 2, "dp": 1}, {"spec": TINY, "tp": 1, "dp": 2}]
SEQ, BATCH = 32, 2


def _key(record: dict) -> tuple:
    return tuple(record[k] for k in ("phase", "module", "mesh_dim", "group_size", "op", "dtype", "bytes"))


@pytest.mark.slow
def test_simulated_collectives_equal_a_real_gloo_run(tmp_path):
    from tpplan.spec.loader import load_spec
    from tpplan.simulate.simulator import simulate

    job = {"seq_length": SEQ, "batch_size": BATCH, "runs": RUNS, "out_dir": str(tmp_path)}
    (tmp_path / "job.json").write_text(json.dumps(job))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "--max-restarts=0",
         "-m", "tests.dist.comm_worker", str(tmp_path / "job.json")],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]

    for i, run in enumerate(RUNS):
        spec = load_spec(run["spec"], [])
        real = json.loads((tmp_path / f"run-{i}.json").read_text())
        sim = simulate(spec, tp=run["tp"], dp=run["dp"], seq_length=SEQ, batch_size=BATCH)
        simulated = [r.to_dict() for r in sim.records]
        assert Counter(map(_key, simulated)) == Counter(map(_key, real)), run
        assert len(real) > 0
        # what the report adds up is what the real run sent
        total = sim.data["communication"]["total"]
        assert total["count"] == len(real)
        assert total["bytes"] == sum(r["bytes"] for r in real)
        assert total["ring_bytes"] == sum(r["ring_bytes"] for r in real)
        dims = {r["mesh_dim"] for r in real}
        assert dims == ({"tp"} if run["tp"] > 1 else {"dp"}), dims
        ops = {r["op"] for r in real}
        expected = {"all_reduce"} | ({"all_gather"} if run["spec"] == PLAIN else {"all_gather", "reduce_scatter"})
        assert ops == expected, (run, ops)
