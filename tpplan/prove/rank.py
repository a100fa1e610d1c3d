"""One rank of ``tpplan check`` (``python -m tpplan.prove.rank JOB``): run the proof, write the verdict.

``worker`` joins the gloo process group and runs the proof (``proof.py``) inside one try, so every way a
rank can end writes a verdict: rank 0's result.json, or failure-RANK.json naming the phase and the module
or parameter at hand.  The parent (``check.py``) starts the ranks under torchrun, or forks them.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tpplan.core.errors import TpplanError
from tpplan.prove.progress import Progress, crash_failure
from tpplan.prove.proof import Proof


def _write_failure(out_dir: Path, rank: int, failure: dict) -> None:
    tmp = out_dir / f"failure-{rank}.json.tmp"
    tmp.write_text(json.dumps(failure, indent=2, default=str))
    os.replace(tmp, out_dir / f"failure-{rank}.json")


def worker(job_path: str) -> int:
    """One rank: everything it does is inside one try, so every way it can end writes a verdict
    (result.json from rank 0, or failure-RANK.json naming the phase and module/parameter)."""
    import datetime

    import torch.distributed as dist

    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job["out_dir"])
    rank = int(os.environ.get("RANK", "0"))
    progress = Progress(out_dir, rank)
    initialised = False
    try:
        progress("joining the process group")
        store = os.environ.get("TPPLAN_CHECK_STORE")
        init = {"init_method": f"file://{store}", "rank": rank, "world_size": int(os.environ["WORLD_SIZE"])} \
            if store else {}
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120), **init)
        initialised = True
        from tpplan.core.trust import trusting

        with trusting(bool(job.get("trust_factory"))):
            return _rank_check(job, out_dir, rank, progress)
    except TpplanError as exc:
        _write_failure(out_dir, rank, {"message": exc.message, "hint": exc.hint, "phase": progress.phase,
                                       "rank": rank, **progress.where})
        return 2
    except BaseException as exc:  # noqa: BLE001 - a checker answers; it never crashes
        _write_failure(out_dir, rank, crash_failure(exc, progress, rank))
        return 1
    finally:
        if initialised:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the verdict is written; tearing down may not fail it
                pass


def _rank_check(job: dict, out_dir: Path, rank: int, progress: Progress) -> int:
    """Both sides run THE training step (``tpplan.runtime.step``, what train.py prints), ``STEPS`` times: the
    sharded model as train.py prepares it (the plan, activation checkpointing, torch.compile per block,
    FSDP2) on ``accum`` micro-batches per dp rank; the unsharded model on the whole global batch at
    once, in float32 (see ``step_settings``).  Equal within tolerance
    after every step proves the plan, and that checkpointing, compile and accumulation change nothing."""
    import torch.distributed as dist

    proof = Proof(job, progress)
    proof.trace_reference()
    failure = proof.apply_plan()
    for step in range(proof.steps):
        if failure is not None:
            break
        failure = proof.run_step(step)  # the sharded step itself broke: explained from the traces
        if failure is None and not proof.compare_step(step):
            break
    if failure is not None:
        _write_failure(out_dir, rank, failure)
        return 1
    progress("writing the verdict")
    report = proof.report()
    if rank == 0:
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(report.to_dict(), indent=2))
        os.replace(tmp, out_dir / "result.json")
    progress("done")
    dist.barrier()  # every rank done before any tears the process group down
    return 0


if __name__ == "__main__":
    sys.exit(worker(sys.argv[1]))
