"""``tpplan check``: prove a plan on CPU before it reaches a GPU.

A shrunken twin of the spec's model (same architecture and plan, few layers, widths that still
divide by tp, random init; see ``shrink.py``) trains ``STEPS`` optimizer steps twice on the same
global batches: unsharded on every rank, and sharded by the plan over ``dp x ep x tp`` real gloo
ranks.  After each step, logits, loss, every gradient, the gradient norm, every weight and AdamW's
state must agree, each tensor within ``ATOL + RTOL x max |unsharded|`` (weights also within a few
units in the last place of their own largest value, see ``Tolerance``), in float32 whatever the
spec trains in (see ``step_settings``).  The weights are compared against the unsharded run's,
always: check's own AdamW (``OPTIMIZER``) takes an eps well above the twin's gradients, so an update
is close to linear in its gradient and a rounding difference is never magnified into a verdict.

A plan that is equal but shards nothing inside the blocks fails too (unless the spec says
``replicated_blocks: true``): the report counts what the plan shards, per kind of parameter.

When the sharded forward fails, the failure is traced to the module whose *output layout* is
wrong: module hooks record which module produced each tensor and its shape, and the first input
whose shape differs from the unsharded model's names its producer.

This module is the parent side (``run_check``): it resolves the plan at full size, builds the twin,
writes the job every rank reads, starts the ranks (under torchrun, or forked) and reads their verdict
back.  A rank runs ``rank.py`` (the proof itself: ``proof.py``; its explanations: ``explain.py``; where a
rank is and how it failed: ``progress.py``); the constants, ``Tolerance`` and ``CheckReport`` are in
``verdict.py``, what a plan shards in ``shards.py``, the twin's MoE routing in ``routing.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tpplan.prove.progress import where_text
from tpplan.prove.rank import worker
from tpplan.prove.shards import sharded_rules
from tpplan.prove.verdict import ATOL, OPTIMIZER, RTOL, STEPS, TWIN_BATCH, TWIN_SEQ_PER_TP, CheckReport
from tpplan.spec.schema import Spec

# ------------------------------------------------------------------------------------------
# Parent side: build the twin, launch the ranks, read the verdict
# ------------------------------------------------------------------------------------------


def run_check(
    spec: Spec,
    *,
    tp: int | None = None,
    dp: int | None = None,
    ep: int | None = None,
    timeout: float = 600,
    keep_dir: str | None = None,
    launcher: str = "torchrun",
    on_phase: Callable[[str], None] | None = None,
    stage=None,
) -> CheckReport:
    """Resolve at full size (sizes must divide there too), then prove the twin on dp*tp gloo ranks.

    ``stage``: the spec already resolved at full size at this tp and ep (``plan.stage.Stage``, what the
    CLI builds once), or None to resolve it here.
    ``launcher``: ``torchrun`` (a fresh interpreter per rank, as training runs) or ``fork`` (ranks
    forked from this process, which has imported torch and transformers already: what ``tpplan check``
    does by default, and ``tpplan zoo`` to check hundreds of twins without paying the imports each time).  Whatever happens inside
    the ranks -- an exception, a hang, a rank killed -- the report is a verdict, never an exception.
    ``on_phase`` is told each phase as it starts: this process's, then rank 0's (its progress file)."""
    from tpplan.plan.mesh_sizes import ep_size, tp_size
    from tpplan.plan.stage import located, resolve_stage

    started = time.time()
    if on_phase and stage is None:
        on_phase("resolving the plan")
    tp = tp_size(spec, tp)
    ep = ep_size(spec, ep)
    dp = dp or 1
    full_stage = resolve_stage(spec, tp=tp, ep=ep) if stage is None else stage.require(spec, tp=tp, ep=ep)
    seq = TWIN_SEQ_PER_TP * tp
    with located(spec):
        twin = full_stage.source.twin(tp)  # a factory model without twin_args: refused here, located
    resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, source=twin)  # the twin must fit too

    settings = step_settings(spec)
    world = dp * ep * tp
    workdir = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="tpplan-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    for stale in (*workdir.glob("failure-*.json"), *workdir.glob("progress-*.json"), workdir / "result.json"):
        stale.unlink(missing_ok=True)  # a kept dir reused: only this run's verdict counts
    job = _job(spec, twin, settings, tp=tp, dp=dp, ep=ep, seq=seq, workdir=workdir)
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    watch = _PhaseWatch(workdir / "progress-0.json", on_phase, f"starting {world} CPU ranks")
    if launcher == "fork":  # no thread of tpplan's runs while it forks: the ranks' wait polls the phases
        outcome = _launch_forked(job_path, world, timeout, poll=watch.poll)
    else:
        with _watching(watch):
            outcome = _launch_torchrun(job_path, world, timeout)
    report = _read_verdict(workdir, tp, dp, outcome, timeout, ep)
    _describe(report, spec, full_stage, twin, settings)
    report.seconds = round(time.time() - started, 2)
    if not keep_dir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return report


def _job(spec: Spec, twin, settings: dict, *, tp: int, dp: int, ep: int, seq: int, workdir: Path) -> dict:
    """What every rank reads (job.json): the spec, the twin's source, the mesh, check's own step."""
    from tpplan.core.trust import trusted

    return {
        "spec": spec.model_dump(mode="json", exclude_unset=True),
        "twin": twin.to_job(),
        # the folder that styles of one's own named by a file path are relative to
        "spec_dir": str(Path(spec.source.directory).resolve()) if spec.source is not None else None,
        "tp": tp,
        "dp": dp,
        "ep": ep,
        "seq_length": seq,
        "batch_per_dp": TWIN_BATCH,
        "seed": spec.train.seed,
        "max_grad_norm": spec.train.max_grad_norm,
        **settings,
        "tolerance": ATOL,
        "relative_tolerance": RTOL,
        "steps": STEPS,
        "optimizer": {**OPTIMIZER, "steps": STEPS},
        "replicated_blocks": spec.replicated_blocks,
        "out_dir": str(workdir),
        "trust_factory": trusted(),  # the ranks import the factory this command was allowed to (docs/trust.md)
    }


def _describe(report: CheckReport, spec: Spec, full_stage, twin, settings: dict) -> None:
    """What the parent knows and the ranks do not: the rules that shard at full size, the twin, the step
    settings, the plan's warnings and the GPU features this CPU check does not run."""
    report.sharded_rules = sharded_rules(full_stage)
    report.twin = {**twin.summary(), **_twin_extras(twin)}
    report.loss_parallel = spec.loss_parallel
    report.step = settings
    report.warnings = list(full_stage.plan.warnings) + [
        f"{key} is a GPU feature: not run by this CPU check" for key, on in
        (("train.float8", spec.train.float8), ("mesh.async_tp", spec.mesh.async_tp)) if on
    ]


class _PhaseWatch:
    """``on_phase`` of the first phase, then of each phase rank 0 writes to its progress file (``poll``)."""

    def __init__(self, progress: Path, on_phase: Callable[[str], None] | None, first: str):
        self.progress, self.on_phase, self.last = progress, on_phase, None
        if on_phase is not None:
            on_phase(first)

    def poll(self) -> None:
        if self.on_phase is None:
            return
        try:
            phase = json.loads(self.progress.read_text()).get("phase")
        except (OSError, ValueError, AttributeError):
            return  # not written yet
        if phase and phase != self.last:
            self.last = phase
            self.on_phase(phase)


@contextlib.contextmanager
def _watching(watch: _PhaseWatch):
    """While torchrun's ranks run: ``watch`` polled by a thread of its own."""
    if watch.on_phase is None:
        yield
        return
    stop = threading.Event()

    def run() -> None:
        while not stop.wait(0.1):
            watch.poll()

    watcher = threading.Thread(target=run, daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join()


def _twin_extras(twin) -> dict:
    """What the twin's config says about windows, experts and routing groups (the summary leaves them out)."""
    from tpplan.model.shrink import EXPERT_KEYS, TOP_K_KEYS, WINDOW_KEYS

    config = getattr(twin, "config", None)
    if config is None:
        return {}
    keys = (*WINDOW_KEYS, *EXPERT_KEYS, *TOP_K_KEYS, "n_group", "topk_group")
    values = {key: getattr(config, key, None) for key in keys if key in vars(config)}
    return {key: value for key, value in values.items()
            if isinstance(value, int) and not isinstance(value, bool)}


def step_settings(spec: Spec) -> dict:
    """The training settings ``check`` runs the step with: the spec's activation checkpointing,
    accumulation and compile, in float32 whatever ``train.precision`` says (``trains_in``).  Between two
    correct plans a 16-bit step's gradients differ by rounding as much as some plan errors do (bf16-mixed
    on the tiny Llama twin: 2.9% of a norm weight's largest gradient, against the 3% a 2^-5 tolerance
    allows): no element-wise tolerance there fails every wrong plan and passes every right one, so the
    plan is proven exactly, in float32; the precision's policy is the same for every plan."""
    from tpplan.spec.schema import training_precision

    return {
        "precision": "fp32",
        "trains_in": training_precision(spec),
        "activation_checkpointing": spec.train.activation_checkpointing,
        "grad_accum_steps": spec.train.grad_accum_steps,
        "compile": spec.train.compile,
    }


@dataclass
class _Outcome:
    """How the ranks ended: ``returncode`` None when they were stopped for running past the timeout."""

    returncode: int | None
    stderr: str = ""
    detail: str = ""  # what the launcher knows about a rank that died (signal, exit code)


# After one rank has written its verdict and exited, the others get this long to finish before
# they are stopped: a rank that failed alone leaves the rest waiting in a collective forever.
_GRACE_S = 3.0


def _launch_torchrun(job_path: Path, world: int, timeout: float) -> _Outcome:
    from tpplan.core.processes import Child

    workdir = job_path.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": str(workdir / "error.json")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        "--max-restarts=0", "-m", "tpplan.prove.rank", str(job_path),
    ]
    # a session of its own, its ranks tagged: a hung job, Ctrl-C or SIGTERM stops every rank it started
    with Child(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env) as child:
        try:
            _, stderr = child.proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            child.stop()
            _, stderr = child.proc.communicate()
            return _Outcome(None, _torchrun_output(stderr or "")[0])
    return _Outcome(child.proc.returncode, *_torchrun_output(stderr or ""))


def _torchrun_output(stderr: str) -> tuple[str, str]:
    """The ranks' own output, without torchrun's launcher lines and its traceback, and torchrun's
    root cause of a failure in one line ("rank 1 exitcode -9 (SIGKILL)")."""
    import re

    kept, detail = [], ""
    lines = stderr.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("Traceback (most recent call last):") and any(
                "ChildFailedError" in later for later in lines[i:]):
            cause = "\n".join(lines[i:]).partition("Root Cause")[2]
            rank = re.search(r"rank\s*:\s*(\d+)", cause)
            code = re.search(r"exitcode\s*:\s*(-?\d+)[^\n]*?(\(SIG\w+\))?\n", cause)
            if rank and code:
                detail = f"rank {rank.group(1)} exitcode {code.group(1)}" + (f" {code.group(2)}" if code.group(2) else "")
            break
        if re.match(r"^[WEI]\d{4} .*torch/distributed/elastic", line):
            continue
        kept.append(line)
    return "\n".join(kept), detail


def _launch_forked(job_path: Path, world: int, timeout: float, poll: Callable[[], None] = lambda: None) -> _Outcome:
    """The ranks as children forked from this process, rendezvous through a file store; each
    rank's output goes to rank-N.log in the job folder.  ``poll`` is called while they run."""
    import multiprocessing
    import signal

    workdir = job_path.parent
    store = workdir / "store"
    store.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_rank, args=(str(job_path), rank, world, str(store), os.getpid()), daemon=True)
             for rank in range(world)]
    try:
        for proc in procs:
            proc.start()
        deadline = time.time() + timeout
        first_exit = None
        while any(p.is_alive() for p in procs):
            now = time.time()
            ended = [p for p in procs if not p.is_alive()]
            if ended and first_exit is None:
                first_exit = now
            if now > deadline or (first_exit is not None and now - first_exit > _GRACE_S):
                break
            poll()
            time.sleep(0.05)
    except BaseException:  # Ctrl-C, SIGTERM: no rank outlives this process
        for proc in procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(2)
        raise
    timed_out = any(p.is_alive() for p in procs) and time.time() > deadline
    detail = []
    for rank, proc in enumerate(procs):
        if proc.is_alive():
            proc.terminate()
            proc.join(2)
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGKILL)
                proc.join(2)
            if not timed_out:
                detail.append(f"rank {rank} was stopped {_GRACE_S:.0f} s after another rank ended")
        elif proc.exitcode:
            code = proc.exitcode
            detail.append(f"rank {rank} " + (f"was killed by {signal.Signals(-code).name}" if code < 0 else f"exited with code {code}"))
    logs = "".join((workdir / f"rank-{r}.log").read_text(errors="replace") for r in range(world)
                   if (workdir / f"rank-{r}.log").is_file())
    if timed_out:
        return _Outcome(None, logs)
    codes = [p.exitcode for p in procs]
    return _Outcome(next((c for c in codes if c), 0), logs, "; ".join(detail))


def _end_with_parent(parent: int) -> None:
    """This process is killed when ``parent`` ends, however it ends (SIGKILL leaves it no time to stop its
    ranks): Linux's PR_SET_PDEATHSIG; elsewhere the rank's own timeout bounds it."""
    import ctypes
    import signal

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:  # it ended before the request was made
        os._exit(1)


def _forked_rank(job_path: str, rank: int, world: int, store: str, parent: int) -> None:
    _end_with_parent(parent)
    log = os.open(Path(job_path).parent / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    # fresh stdout and stderr objects: a lock another thread of the parent held at the fork (a terminal's
    # status line redrawing) is never taken here
    sys.stdout = os.fdopen(1, "w", buffering=1, closefd=False)
    sys.stderr = os.fdopen(2, "w", buffering=1, closefd=False)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", TPPLAN_CHECK_STORE=store)
    import torch

    from tpplan.plan.apply import reset_dtensor_state

    torch.set_num_threads(1)
    reset_dtensor_state()  # the forking process may have used DTensor (in another world, or a fake one)
    code = 1
    try:
        code = worker(job_path)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _read_verdict(workdir: Path, tp: int, dp: int, outcome: _Outcome, timeout: float, ep: int = 1) -> CheckReport:
    """The ranks' verdict: result.json, else the first failure a rank wrote, else one built here
    from what each rank last said it was doing (progress-N.json) and how it ended."""
    result = workdir / "result.json"
    if result.is_file():
        report = CheckReport(**json.loads(result.read_text()))
        if report.ok and (not report.parameters_compared or report.max_abs_logit_diff is None):
            report.ok = False  # "ok" without a comparison is no proof (exit 1, never 0)
            report.failure = {"message": "the ranks wrote a verdict without comparing logits and parameters",
                              "phase": "died"}
        if report.ok and outcome.returncode != 0:  # a proof counts only if every rank ended well after it
            how = outcome.detail or ("they did not finish" if outcome.returncode is None
                                     else f"the launcher exited with code {outcome.returncode}")
            report.ok = False
            report.failure = {"message": f"the ranks wrote a verdict but did not all end well ({how})",
                              "phase": "died", "stderr_tail": (outcome.stderr or "")[-3000:]}
        return report
    failures = [json.loads(path.read_text()) for path in sorted(workdir.glob("failure-*.json"), key=_written_at)]
    causes = [f for f in failures if not _is_echo(f.get("error") or "")]
    if causes:  # the cause, not its echo: a rank whose peer died fails in a collective moments later
        return CheckReport(ok=False, tp=tp, dp=dp, ep=ep, world_size=tp * dp * ep, failure=causes[0])
    echoed = {f.get("rank") for f in failures}
    world = tp * dp * ep
    doing = []
    for rank in range(world):
        path = workdir / f"progress-{rank}.json"
        try:
            progress = json.loads(path.read_text())
        except (OSError, ValueError):
            doing.append(f"rank {rank} had not started the check")
            continue
        lost = " when it lost its peer" if rank in echoed else ""
        doing.append(f"rank {rank} was in {where_text(progress)}{lost}")
    where = "; ".join(doing)
    tail = (outcome.stderr or "")[-3000:]
    if outcome.returncode is None:
        failure = {
            "message": f"the ranks did not finish within {timeout:g} s: {where}",
            "phase": "timeout",
            "hint": "a collective that only some ranks entered (a plan that makes ranks disagree), or a twin too "
            "slow for --timeout",
        }
    else:
        how = outcome.detail or f"the launcher exited with code {outcome.returncode}"
        failure = {
            "message": f"a rank died without writing its verdict ({how}): {where}",
            "phase": "died",
            "hint": "a rank killed from outside (out of memory?) or a crash in native code"
            + (": the ranks' output is below" if tail.strip() else ""),
        }
    failure["stderr_tail"] = tail
    return CheckReport(ok=False, tp=tp, dp=dp, ep=ep, world_size=world, failure=failure)


def _written_at(path: Path) -> float:
    return path.stat().st_mtime_ns


def _is_echo(error: str) -> bool:
    """A collective that failed because another rank had already failed (gloo's words for it)."""
    return any(words in error for words in ("Connection closed by peer", "remote worker", "Connection reset by peer",
                                            "Broken pipe", "Gloo connectFullMesh failed"))
