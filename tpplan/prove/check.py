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

from tpplan.core.errors import TpplanError
from tpplan.prove.explain import (
    ModuleTracer,
    explain_failure,
    first_divergence,
    replay_step,
    unreduced_failure,
    unreduced_gradients,
)
from tpplan.prove.progress import Progress, crash_failure, error_site, error_text, where_text
from tpplan.prove.routing import idle_experts, steer_routing
from tpplan.prove.shards import nothing_sharded_failure, parallel_gaps, shard_report, sharded_rules
from tpplan.prove.verdict import (
    ATOL,
    OPTIMIZER,
    RTOL,
    STEPS,
    TWIN_BATCH,
    TWIN_SEQ_PER_TP,
    WEIGHT_ULPS,
    CheckReport,
    Tolerance,
)
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
) -> CheckReport:
    """Resolve at full size (sizes must divide there too), then prove the twin on dp*tp gloo ranks.

    ``launcher``: ``torchrun`` (a fresh interpreter per rank, as training runs) or ``fork`` (ranks
    forked from this process, which has imported torch and transformers already: what ``tpplan zoo``
    uses to check hundreds of twins without paying the imports each time).  Whatever happens inside
    the ranks -- an exception, a hang, a rank killed -- the report is a verdict, never an exception.
    ``on_phase`` is told each phase as it starts: this process's, then rank 0's (its progress file)."""
    from tpplan.plan.resolve import ep_size, tp_size
    from tpplan.plan.stage import located, resolve_stage

    started = time.time()
    if on_phase:
        on_phase("resolving the plan")
    tp = tp_size(spec, tp)
    ep = ep_size(spec, ep)
    dp = dp or 1
    full_stage = resolve_stage(spec, tp=tp, ep=ep)
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
    with _watching(workdir / "progress-0.json", on_phase, f"starting {world} CPU ranks"):
        if launcher == "fork":
            outcome = _launch_forked(job_path, world, timeout)
        else:
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


@contextlib.contextmanager
def _watching(progress: Path, on_phase: Callable[[str], None] | None, first: str):
    """While the ranks run: ``on_phase`` of each phase rank 0 writes to its progress file."""
    if on_phase is None:
        yield
        return
    on_phase(first)
    stop = threading.Event()

    def watch() -> None:
        last = None
        while not stop.wait(0.1):
            try:
                phase = json.loads(progress.read_text()).get("phase")
            except (OSError, ValueError, AttributeError):
                continue  # not written yet
            if phase and phase != last:
                last = phase
                on_phase(phase)

    watcher = threading.Thread(target=watch, daemon=True)
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
        "--max-restarts=0", "-m", "tpplan.prove.check", str(job_path),
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


def _launch_forked(job_path: Path, world: int, timeout: float) -> _Outcome:
    """The ranks as children forked from this process, rendezvous through a file store; each
    rank's output goes to rank-N.log in the job folder."""
    import multiprocessing
    import signal

    workdir = job_path.parent
    store = workdir / "store"
    store.unlink(missing_ok=True)
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_forked_rank, args=(str(job_path), rank, world, str(store)), daemon=True)
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


def _forked_rank(job_path: str, rank: int, world: int, store: str) -> None:
    log = os.open(Path(job_path).parent / f"rank-{rank}.log", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      OMP_NUM_THREADS="1", TPPLAN_CHECK_STORE=store)
    import torch

    torch.set_num_threads(1)
    code = 1
    try:
        code = _worker(job_path)
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


# ------------------------------------------------------------------------------------------
# Rank side (python -m tpplan.prove.check JOB): run both models, compare, write the verdict
# ------------------------------------------------------------------------------------------


def _write_failure(out_dir: Path, rank: int, failure: dict) -> None:
    tmp = out_dir / f"failure-{rank}.json.tmp"
    tmp.write_text(json.dumps(failure, indent=2, default=str))
    os.replace(tmp, out_dir / f"failure-{rank}.json")


def _worker(job_path: str) -> int:
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

    proof = _Proof(job, progress)
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


class _Proof:
    """One rank's side of the proof: the twin unsharded (``reference``) and sharded by the plan
    (``model``), their steps on the same batches, and every comparison, recorded per quantity and per
    parameter; ``exact``, the unsharded twin in float64, measures how far float32 rounding alone puts
    each tensor of the unsharded one.  Every rank compares whole tensors (gathered), in the same order; a
    verdict is taken over all ranks at once, so every rank stops at the same place."""

    def __init__(self, job: dict, progress: Progress):
        import copy

        import torch

        from tpplan.model.sources import source_from_job
        from tpplan.plan.apply import build_mesh
        from tpplan.plan.resolve import resolve

        self.torch, self.job, self.progress = torch, job, progress
        self.tp, self.ep, self.steps = job["tp"], job.get("ep", 1), job.get("steps", STEPS)
        self.accum = job.get("grad_accum_steps", 1)
        self.hyper = {k: v for k, v in job.get("optimizer", OPTIMIZER).items() if k != "steps"}
        progress("building the twin")
        self.spec = Spec.model_validate(job["spec"])
        source = source_from_job(job["twin"])
        torch.use_deterministic_algorithms(True, warn_only=True)
        ulp = WEIGHT_ULPS * torch.finfo(torch.float32).eps
        self.tol = Tolerance(job["tolerance"], job["relative_tolerance"], ulp)
        self.reference = source.build(device="cpu", dtype="float32", seed=job["seed"])
        self.routing = steer_routing(self.reference)  # before the copies: every side routes alike
        self.model = copy.deepcopy(self.reference)  # deepcopy keeps tied parameters tied
        self.exact = _in_float64(copy.deepcopy(self.reference))
        self.exact_failed: str | None = None  # why the float64 twin could not run (rounding then unmeasured)
        self.positions = source.positions  # the keyword the forward takes position ids by (None: not passed)
        progress("resolving the plan on the twin")
        self.plan = resolve(self.spec, self.model, tp=self.tp, seq_length=job["seq_length"], ep=self.ep,
                            base_dir=job.get("spec_dir"))
        self.mesh = build_mesh("cpu", dp=job["dp"], tp=self.tp, ep=self.ep)
        # the ranks that hold different data: dp x ep (expert-parallel ranks split their dp rank's batch)
        data_rank = self.mesh["dp"].get_local_rank() * self.ep + self.mesh["ep"].get_local_rank()
        self.data_ranks = job["dp"] * self.ep
        # each step's global batch: accum micro-batches of b sequences on each of the data ranks; the
        # unsharded model takes all of it as one batch
        seq, self.b = job["seq_length"], job["batch_per_dp"]
        generator = torch.Generator().manual_seed(job["seed"] + 1)
        vocab = source.vocab_size(self.reference)
        shape = (self.data_ranks * self.b * self.accum, seq + 1)
        self.batches = [torch.randint(0, vocab, shape, generator=generator) for _ in range(self.steps)]
        self.position_ids = torch.arange(seq).unsqueeze(0)
        self.mine = slice(data_rank * self.b * self.accum, (data_rank + 1) * self.b * self.accum)
        self.ties = [tie.names for tie in self.plan.tied]
        self.measured: dict[str, list] = {}  # quantity -> [max |diff|, largest excess, its name]
        # name -> kind -> [relative error, reference, the unsharded model's own relative rounding, excess]
        self.per_parameter: dict[str, dict] = {}
        self.rounding_only: dict[str, list] = {}  # quantity -> tensors within tolerance by rounding only
        self.failure: dict | None = None
        self.losses: list = []  # (unsharded, sharded) per step
        self.norms: list = []  # (unsharded, sharded) per step
        self.synced: list[int] = []  # micro-batches after whose backward the sharded gradients existed
        self.no_grad: list[str] = []
        self.idle: dict = {}
        self.compared = 0

    # -- running both sides ----------------------------------------------------------------

    def same_draws(self, step: int) -> None:
        """Every forward of a step starts from the same random state: a model that samples in training
        (Phi-MoE's router draws Gumbel noise even with dropout off) draws the same numbers sharded and
        unsharded -- the same step, not two samples of it (at dp=1; with dp > 1 the batch shapes differ)."""
        self.torch.manual_seed(self.job["seed"] + 2 + step)

    def trace_reference(self) -> None:
        """A traced forward of the unsharded model on this rank's first micro-batch (to explain failures)."""
        from tpplan.runtime.helpers import model_logits

        self.progress("the unsharded forward")
        self.ref_tracer = ModuleTracer(self.reference, keep_values=True)
        self.same_draws(0)
        inputs = self.batches[0][self.mine][: self.b, :-1]
        with self.torch.no_grad():
            model_logits(self.reference, inputs, self.position_ids.expand(len(inputs), -1), self.positions)
        self.ref_tracer.remove()

    def apply_plan(self) -> dict | None:
        """Shard the model as train.py does, count what the plan shards, and build both optimizers."""
        from tpplan.plan.apply import apply_tensor_parallel
        from tpplan.runtime.parallel_styles import fsdp_shard_placement
        from tpplan.runtime.step import block_names, prepare_model

        self.progress("applying the plan")
        model, job = self.model, self.job
        blocks = [model.get_submodule(name) for name in block_names(model, self.plan.blocks)]
        if job.get("compile"):
            import torch._inductor.config

            # every rank compiles in its own process: the ranks already share the cores, and a pool of
            # compile workers per rank costs more than it saves (a cold tiny check: 208 s -> 140 s here)
            torch._inductor.config.compile_threads = 1
        prepare_model(
            model, self.mesh, lambda m, _: apply_tensor_parallel(m, self.plan, self.mesh),
            blocks=self.plan.blocks, tied=self.ties, precision="fp32", compile=job.get("compile", False),
            activation_checkpointing=job.get("activation_checkpointing", "none"),
            shard_placement_fn=fsdp_shard_placement,
        )
        # compiled blocks are traced from outside (hooks inside would break inductor's graphs)
        inside = {id(m) for block in blocks for m in block.modules()} if job.get("compile") else set()
        self.tracer = ModuleTracer(model, keep_values=True, progress=self.progress, skip=inside)
        names = {n for n, _ in model.named_parameters()}
        ref_names = {n for n, _ in self.reference.named_parameters()}
        extra, missing = sorted(names - ref_names), sorted(ref_names - names)
        if extra or missing:
            parts = [extra and f"only sharded: {', '.join(extra)}",
                     missing and f"only unsharded: {', '.join(missing)}"]
            message = "the sharded model's parameters differ from the unsharded model's: " + "; ".join(
                filter(None, parts))
            return {"message": message, "hint": "tied weights came apart" if extra else None,
                    "phase": self.progress.phase}
        self.sharded = shard_report(model, self.reference, self.plan.blocks)
        return None

    def hold_parameters(self) -> None:
        """The parameters of both sides, their starting weights and both optimizers, after the first
        backward (FSDP2 registers its parameters when it first runs)."""
        self.ref_params = dict(self.reference.named_parameters())
        self.params = dict(self.model.named_parameters())
        self.start = {name: _full(param).clone() for name, param in self.ref_params.items()}
        self.optimizer = self.torch.optim.AdamW(self.model.parameters(), **self.hyper)
        self.optimizer.register_step_pre_hook(lambda *_: self.progress("the optimizer step"))
        self.ref_optimizer = self.torch.optim.AdamW(self.reference.parameters(), **self.hyper)
        self.exact_params = dict(self.exact.named_parameters())
        self.exact_optimizer = self.torch.optim.AdamW(self.exact.parameters(), **self.hyper)

    def run_step(self, step: int) -> dict | None:
        """Forward, loss and backward of one step on both sides; a failure of the sharded step, explained."""
        import contextlib

        from tpplan.runtime.helpers import logits_of
        from tpplan.runtime.step import forward_backward

        tokens = self.batches[step]
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        where = {"step": str(step + 1)} if step else {}

        def keep(kept: list, then=None):
            def hook(module, args, output):
                kept.append(logits_of(output).detach())
                if then:
                    self.progress(then, **where)
            return hook

        @contextlib.contextmanager
        def ref_phase(name):
            self.progress(f"the unsharded {name}", **where)
            if name == "forward":
                self.same_draws(step)
            yield

        @contextlib.contextmanager
        def phase(name):
            if name == "forward":
                self.progress("the sharded forward", **where)
                self.same_draws(step)
                yield
                return
            self.tracer.remove()  # the first forward is traced; later ones (and recomputed ones) are not
            self.progress("the sharded backward", **where)
            yield
            if step == 0 and any(p.grad is not None for p in self.model.parameters()):
                self.synced.append(len(parts) - 1)

        ref_logits, exact_logits = [], []
        handle = self.reference.register_forward_hook(keep(ref_logits))
        ref_loss = forward_backward(self.reference, [(inputs, labels)], self.position_ids,
                                    loss_parallel=False, positions=self.positions, phase=ref_phase)
        handle.remove()
        exact_loss = self.exact_step(inputs, labels, exact_logits, keep, step)
        mine_in, mine_out, b = inputs[self.mine], labels[self.mine], self.b
        micro = [(mine_in[i * b:(i + 1) * b], mine_out[i * b:(i + 1) * b]) for i in range(self.accum)]
        parts: list = []
        handle = self.model.register_forward_hook(keep(parts, then="the sharded loss"))
        try:
            loss = forward_backward(self.model, micro, self.position_ids, positions=self.positions,
                                    loss_parallel=self.spec.loss_parallel, phase=phase)
        except Exception as exc:  # a plan that breaks the step: explain it from the two traces
            return self.explain(exc, step)
        finally:
            handle.remove()
        self.tracer.remove()
        exact_logits = exact_logits[0] if exact_logits else ref_logits[0]
        exact_loss = ref_loss if exact_loss is None else exact_loss
        self.current = (ref_logits[0], ref_loss, parts, loss, exact_logits, exact_loss)
        return None

    def exact_step(self, inputs, labels, kept: list, keep, step: int):
        """Forward and backward of the float64 twin on the whole batch; its loss, or None where it cannot run
        in float64 (an op without a float64 kernel): its rounding is then not measured, nor allowed."""
        from tpplan.runtime.step import forward_backward

        if self.exact_failed:
            return None
        self.progress("the float64 twin's step", **({"step": str(step + 1)} if step else {}))
        self.same_draws(step)
        handle = self.exact.register_forward_hook(keep(kept))
        try:
            return forward_backward(self.exact, [(inputs, labels)], self.position_ids, loss_parallel=False,
                                    positions=self.positions)
        except Exception as exc:  # noqa: BLE001 - a float64 twin is a measure of rounding, not the proof
            self.exact_failed = error_text(exc)
            kept.clear()
            return None
        finally:
            handle.remove()

    def explain(self, exc: BaseException, step: int) -> dict:
        try:
            failure = explain_failure(self.tracer, self.ref_tracer, self.plan, exc)
        except Exception:  # noqa: BLE001 - explaining must not hide the failure itself
            failure = crash_failure(exc, self.progress, self.progress.rank)
        failure.setdefault("phase", self.progress.phase)
        failure.setdefault("error_site", error_site(exc))
        if self.progress.phase != "the sharded forward" or step:
            at = f" at step {step + 1}" if step else ""
            failure["message"] = f"{self.progress.phase} failed{at}: {failure['error']}"
            failure.setdefault("hint", "the forward ran; the failure is in " + self.progress.phase)
        return failure

    # -- comparing ---------------------------------------------------------------------------

    def measure(self, quantity: str, name: str, got, want, own, *, span: float, scale=None, weight=0.0,
                record: str | None = None):
        """|got - want| against the tolerance at ``scale`` (default: max |want|), ``own``: the same tensor
        of the float64 twin (|want - own|: the unsharded model's own rounding), ``span``: the largest tensor
        of the quantity; recorded under ``quantity`` and, with ``record``, under the parameter ``name``."""
        diff = (got - want).abs().max().item() if want.numel() else 0.0
        ref = (want.abs().max().item() if want.numel() else 0.0) if scale is None else scale
        rounding = (want - own).abs().max().item() if want.numel() else 0.0
        allowed = self.tol.allowed(ref, weight, rounding, span)
        excess = diff / allowed
        if excess <= 1 < diff / self.tol.exact(ref, weight):
            self.rounding_only.setdefault(quantity, []).append(name) if name not in self.rounding_only.get(
                quantity, []) else None
        entry = self.measured.setdefault(quantity, [0.0, 0.0, None])
        entry[0] = max(entry[0], diff)
        if excess > entry[1] or entry[2] is None:
            entry[1], entry[2] = max(entry[1], excess), name
        if record:
            kinds = self.per_parameter.setdefault(name, {})
            if record not in kinds or excess > kinds[record][3]:
                kinds[record] = [_relative(diff, ref), _sig(ref), _relative(rounding, ref), excess]
        return excess

    def agree_everywhere(self, *quantities: str) -> bool:
        """Take the largest of every rank's measures of ``quantities`` (logits differ per data rank);
        True when all are within tolerance on every rank."""
        import torch.distributed as dist

        values = self.torch.tensor([v for q in quantities for v in self.measured.get(q, [0.0, 0.0])[:2]],
                                   dtype=self.torch.float64)
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
        for i, quantity in enumerate(quantities):
            if quantity in self.measured:
                self.measured[quantity][:2] = values[2 * i: 2 * i + 2].tolist()
        return all(self.measured.get(q, [0.0, 0.0])[1] <= 1 for q in quantities)

    def compare_step(self, step: int) -> bool:
        """Everything after one step's backward, then after its optimizer step; False (and ``failure``
        set) at the first thing that differs."""
        ref_logits, ref_loss, parts, loss, exact_logits, exact_loss = self.current
        if step == 0:
            self.hold_parameters()
        self.progress("comparing logits and loss", **({"step": str(step + 1)} if step else {}))
        got, want = self.torch.cat([_full(part) for part in parts]), _full(ref_logits)[self.mine]
        own = exact_logits.float()[self.mine]
        self.measure("logits", "logits", got, want, own, span=want.abs().max().item())
        loss_sum = loss.detach().float().clone()
        self.torch.distributed.all_reduce(loss_sum)
        sharded_loss = (loss_sum / (self.data_ranks * self.tp)).item()  # tp ranks hold their data rank's loss
        self.losses.append((ref_loss.float().item(), sharded_loss))
        want = self.torch.tensor(ref_loss.float().item())
        self.measure("loss", "loss", self.torch.tensor(sharded_loss), want, exact_loss.float().cpu(),
                     span=abs(want.item()))
        forward_ok = self.agree_everywhere("logits", "loss")
        grads_ok, one_sided = self.compare_gradients(step)
        if not (forward_ok and grads_ok and not one_sided):
            self.failure = self.diagnose(step, forward_ok, one_sided)
            return False
        return self.compare_update(step)

    def compare_gradients(self, step: int) -> tuple[bool, list]:
        where = {"step": str(step + 1)} if step else {}
        self.ref_grads, self.sharded_grads, self.grad_diffs, one_sided = {}, {}, {}, []
        span = max((_full(p.grad).abs().max().item() for p in self.ref_params.values() if p.grad is not None
                    and p.grad.numel()), default=0.0)  # the largest gradient
        for name, param in self.params.items():
            self.progress("comparing gradients", parameter=name, **where)
            got, want = param.grad, self.ref_params[name].grad
            if got is None or want is None:
                if got is None and want is None:
                    self.no_grad.append(name) if name not in self.no_grad else None
                else:
                    one_sided.append(name)
                continue
            self.ref_grads[name] = want = _full(want)
            self.sharded_grads[name] = got = _full(got)
            self.grad_diffs[name] = (got - want).abs().max().item()
            own = None if self.exact_failed else self.exact_params[name].grad
            own = want if own is None else _full(own)
            self.measure("gradients", name, got, want, own, span=span, record="gradient")
        if step == 0:
            self.idle = idle_experts(self.ref_grads, self.no_grad)
        return self.agree_everywhere("gradients"), one_sided

    def compare_update(self, step: int) -> bool:
        """Clip and AdamW on every side (as train.py steps); the gradient norms, every weight and AdamW's
        state (exp_avg, sqrt(exp_avg_sq)), and every tie, after the step."""
        from tpplan.runtime.step import untied

        where = {"step": str(step + 1)} if step else {}
        before = {n: _full(p).clone() for n, p in self.ref_params.items()}  # for a diagnosis only
        states = {n: {k: _full(v).clone() for k, v in self.ref_optimizer.state.get(p, {}).items()}
                  for n, p in self.ref_params.items()}
        norm, ref_norm, exact_norm = self.optimizer_steps(where)
        self.norms.append((ref_norm, norm))
        tensor = self.torch.tensor
        self.measure("grad_norm", "grad norm", tensor(norm), tensor(ref_norm), tensor(exact_norm),
                     span=ref_norm)
        weights = {n: _full(p) for n, p in self.ref_params.items()}
        ref_states = {n: _moments(self.ref_optimizer, p) for n, p in self.ref_params.items()}
        span = max(((w - self.start[n]).abs().max().item() for n, w in weights.items() if w.numel()),
                   default=0.0)
        state_span = max((v.abs().max().item() for m in ref_states.values() for v in m.values() if v.numel()),
                         default=0.0)
        for name, param in self.params.items():
            self.progress("comparing weights after the step", parameter=name, **where)
            want = weights[name]
            own = want if self.exact_failed else _full(self.exact_params[name])
            self.measure("weights_after_step", name, _full(param), want, own, span=span,
                         scale=(want - self.start[name]).abs().max().item() if want.numel() else 0.0,
                         weight=want.abs().max().item() if want.numel() else 0.0, record="update")
            mine = _moments(self.optimizer, param)
            exact = {} if self.exact_failed else _moments(self.exact_optimizer, self.exact_params[name])
            for key, want in ref_states[name].items():
                if key in mine:
                    self.measure("optimizer_state", name, mine[key], want, exact.get(key, want),
                                 span=state_span, record="state")
        self.compared = len(self.params)
        ok = self.agree_everywhere("grad_norm", "weights_after_step", "optimizer_state")
        apart = untied(self.model, self.ties)
        if apart:
            self.failure = {"message": f"after step {step + 1} the tied weights {' and '.join(apart[0])} are "
                            "no longer one parameter in the sharded model", "reason": "tie_came_apart",
                            "step": step + 1, "hint": "a rule or fix-up that replaces a holder of it"}
            return False
        if not ok:
            self.failure = self.update_failure(step, before, states)
        return ok

    def optimizer_steps(self, where: dict) -> tuple[float, float, float]:
        """One optimizer step of each side, as train.py takes it; their gradient norms before clipping."""
        import contextlib

        from tpplan.runtime.step import optimizer_step

        @contextlib.contextmanager
        def update_phase(name):
            self.progress("clipping gradients", **where)
            yield

        max_norm = self.job["max_grad_norm"]
        norm = optimizer_step(self.model, self.optimizer, max_grad_norm=max_norm, phase=update_phase).item()
        self.progress("the unsharded optimizer step", **where)
        ref_norm = optimizer_step(self.reference, self.ref_optimizer, max_grad_norm=max_norm).item()
        exact_norm = ref_norm
        if not self.exact_failed:  # train.py's step in float64 (its clip sums squares in float32)
            params = [p for p in self.exact.parameters() if p.grad is not None]
            exact_norm = self.torch.nn.utils.clip_grad_norm_(params, max_norm or float("inf")).item()
            self.exact_optimizer.step()
            self.exact_optimizer.zero_grad(set_to_none=True)
        return norm, ref_norm, exact_norm

    # -- verdicts ------------------------------------------------------------------------------

    def diagnose(self, step: int, forward_ok: bool, one_sided: list) -> dict:
        """Why the forward or the gradients of ``step`` differ: a gradient on one side only; a replicated
        parameter whose gradient is right only summed over tp; else the first module whose output differs."""
        at = f"at step {step + 1}: " if step else ""
        if one_sided:
            sides = [f"{n} ({'unsharded' if self.params[n].grad is None else 'sharded'} model only)"
                     for n in one_sided]
            return {"message": at + "a gradient exists on one side only: " + ", ".join(sides),
                "parameter": one_sided[0], "step": step + 1,
                "hint": "the sharded model does not use these parameters the way the unsharded one does"}
        if forward_ok:
            self.progress("diagnosing gradients")
            unreduced = unreduced_gradients(self.model, self.ref_grads, self.grad_diffs, self.mesh,
                                             lambda want: self.tol.allowed(want.abs().max().item()))
            if unreduced:
                return unreduced_failure(unreduced)
            name = self.measured["gradients"][2]
            rel, ref, _, excess = self.per_parameter[name]["gradient"]
            return {"message": at + f"the gradient of {name} differs from the unsharded model's by "
                    f"{_pct(rel)} of its largest value ({ref:.3g}), {excess:.3g}x the tolerance, while "
                    "logits and loss agree",
                    "parameter": name, "reason": "gradient_differs", "step": step + 1,
                    "hint": "a rule that sums a gradient over tp where each rank already holds all of it "
                    "(replicate_grad_allreduce or mla_kv_a_proj on a replicated input), or one missing where "
                    "each rank holds a part"}
        if step == 0:
            return first_divergence(self.tracer, self.ref_tracer, self.tol)
        quantity = "logits" if self.measured["logits"][1] > 1 else "loss"
        diff = self.measured[quantity][0]
        return {"message": f"at step {step + 1} the {quantity} differ by {diff:.3g}, after every step before "
                "agreed", "step": step + 1, "reason": "later_step_differs",
                "hint": "state the step changes outside the weights the optimizer holds"}

    def update_failure(self, step: int, before: dict, states: dict) -> dict:
        """Every gradient agreed; the gradient norm, a weight or AdamW's state after the step did not."""
        quantity = max(("grad_norm", "weights_after_step", "optimizer_state"),
                       key=lambda q: self.measured.get(q, [0.0, 0.0])[1])
        diff, excess, name = self.measured[quantity]
        what = {"grad_norm": "the gradient norm before clipping", "weights_after_step": f"the weight {name}",
                "optimizer_state": f"AdamW's state of {name}"}.get(quantity)
        failure = {"message": f"after step {step + 1} {what} differs from the unsharded run's by {diff:.3g} "
                   f"({excess:.3g}x the tolerance), while logits, loss and every gradient agreed",
                   "parameter": None if quantity == "grad_norm" else name, "step": step + 1,
                   "reason": "optimizer_step_differs",
                   "hint": "a parameter the sharded optimizer does not hold or holds twice (a tie undone "
                   "after sharding, a parameter replaced after the optimizer was built), a gradient it never "
                   "sees, or a gradient norm that counts a shard twice or not at all"}
        if quantity == "weights_after_step":  # a diagnosis, not a verdict: unsharded AdamW, sharded gradients
            replayed = replay_step(before, states, self.sharded_grads, self.hyper, self.job["max_grad_norm"])
            again = (_full(self.params[name]) - replayed[name]).abs().max().item()
            why = ": the gradients differ where it counts" if again <= diff / 10 else ": the update differs"
            failure["message"] += (f"; the unsharded AdamW step applied to the sharded gradients gives the "
                                   f"sharded weight to {again:.3g}{why}")
        return failure

    def report(self) -> CheckReport:
        measured = self.measured
        excess = {quantity: values[1] for quantity, values in measured.items()}
        failure = self.failure
        scope = self.sharded["blocks"] if self.sharded["blocks"]["parameters"] else self.sharded["total"]
        if failure is None and not self.job.get("replicated_blocks") and not scope["sharded"]:
            failure = nothing_sharded_failure(self.sharded)
        replicated = parallel_gaps(self.sharded)
        ref_loss, sharded_loss = self.losses[0] if self.losses else (None, None)
        ref_norm, norm = self.norms[0] if self.norms else (None, None)
        return CheckReport(
            ok=failure is None, tp=self.tp, dp=self.job["dp"], ep=self.ep,
            world_size=self.job["dp"] * self.ep * self.tp,
            tolerance=self.tol.atol, relative_tolerance=self.tol.rtol, tolerance_used=excess,
            steps=len(self.norms), optimizer={**self.hyper, "steps": self.steps},
            max_abs_logit_diff=measured.get("logits", [None])[0], loss_unsharded=ref_loss,
            loss_sharded=sharded_loss, max_abs_grad_diff=measured.get("gradients", [None])[0],
            worst_grad=measured.get("gradients", [0, 0, None])[2],
            grad_norm_unsharded=ref_norm, grad_norm_sharded=norm,
            max_abs_param_diff_after_step=measured.get("weights_after_step", [None])[0],
            worst_param=measured.get("weights_after_step", [0, 0, None])[2],
            max_abs_state_diff=measured.get("optimizer_state", [None])[0],
            parameters={name: {k: v[:3] for k, v in kinds.items()}
                        for name, kinds in self.per_parameter.items()},
            within_rounding_only=self.rounding_only, rounding_unmeasured=self.exact_failed,
            parameters_compared=self.compared, parameters_without_gradient=self.no_grad,
            gradient_sync_micro_batches=self.synced, sharded=self.sharded, replicated=replicated,
            routing=self.routing_report(), failure=failure,
        )

    def routing_report(self) -> dict:
        """The steered routers and, from the unsharded first step, the experts that got no token."""
        if not self.routing:
            return {}
        return {**self.routing, "experts_without_tokens": self.idle}


def _in_float64(model):
    """``model`` in float64, its MoE experts run as loops over the experts (transformers' grouped matmul
    takes no float64): the same computation, rounded far less."""
    for module in model.modules():
        config = getattr(module, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            config._experts_implementation = "eager"
    return model.double()


def _full(t):
    """A tensor whole on this rank (a DTensor gathered), detached, in float32."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float()


def _sig(value: float) -> float:
    return float(f"{value:.3g}")


def _relative(diff: float, ref: float) -> float | None:
    """``diff`` of ``ref``, to 3 digits; None where ``ref`` is 0 and ``diff`` is not."""
    return _sig(diff / ref) if ref else (0.0 if diff == 0 else None)


def _moments(optimizer, param) -> dict:
    """AdamW's state of ``param``, whole, as compared: exp_avg, and sqrt(exp_avg_sq) (a gradient's scale)."""
    state = optimizer.state.get(param, {})
    moments = {}
    if "exp_avg" in state:
        moments["exp_avg"] = _full(state["exp_avg"])
    if "exp_avg_sq" in state:
        moments["sqrt_exp_avg_sq"] = _full(state["exp_avg_sq"]).sqrt()
    return moments


def _pct(value) -> str:
    return "an undefined share" if value is None else f"{100 * value:.3g}%"


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
