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
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.spec.schema import Spec

# A compared tensor may differ by ATOL + RTOL x its largest unsharded magnitude.  The proof runs in
# float32, where correct plans agree to 1e-7..1e-5 of each tensor's largest value (rounding in another
# order; the most in scalars summed over every activation, like Apertus' xIELU alpha); ATOL only keeps a
# tensor that is zero on both sides from dividing by zero.  16-bit training is proven in float32:
# between two correct plans bfloat16 gradients differ by up to 3% of a tensor's largest value in the
# twin, as much as some real plan errors (see step_settings).
ATOL, RTOL = 1e-12, 1e-4
WEIGHT_ULPS = 4  # weights after a step may also differ by this many float32 ulps of their largest value
# A tensor that is zero in exact arithmetic is rounding alone (OPT's k_proj.bias: softmax ignores a constant
# added to every key, so its gradient is 2e-11 of noise, and no relative tolerance fits it).  So a tensor may
# also differ by OWN_ROUNDING x the unsharded model's own rounding of it (its distance from the same steps in
# float64), at most ROUNDING_CAP x the largest tensor of its quantity (gradients, updates, ...): float32
# rounding is never larger than that, and a model whose random draws differ in float64 gets no more.
OWN_ROUNDING, ROUNDING_CAP = 10.0, 1e-6
STEPS = 3  # optimizer steps both sides take, everything compared after each
# check's AdamW: eps above the twin's gradient entries makes the update ~ lr x m / eps, linear in the
# gradient (at eps 1e-6 an entry near eps magnified its rounding lr / eps = 1000x: Gemma 3n, Gemma 4), and
# lr makes it thousands of units in the last place of the weights it moves
OPTIMIZER = {"lr": 1e-2, "eps": 0.1, "weight_decay": 0.1}
TWIN_SEQ_PER_TP = 8  # sequence length of the twin = this x tp (sequence parallel splits it)
TWIN_BATCH = 2  # sequences per data-parallel rank
# the kinds of parameters the shard report counts; a plan is "parallel" when it shards most of the
# attention, MLP and expert parameters the model has (PARALLEL_KINDS)
KINDS = ("embedding", "head", "attention", "mlp", "experts", "routers", "norms", "other")
PARALLEL_KINDS = ("attention", "mlp", "experts")


@dataclass
class CheckReport:
    ok: bool
    tp: int
    dp: int
    world_size: int
    ep: int = 1
    tolerance: float = ATOL
    relative_tolerance: float = RTOL  # x each tensor's largest unsharded magnitude
    # per quantity, its largest difference over what it was allowed, over every step (ok: every one <= 1)
    tolerance_used: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)  # the training settings both sides ran (precision, ...)
    steps: int = 0  # optimizer steps compared (fewer than STEPS when one failed)
    optimizer: dict = field(default_factory=dict)  # check's AdamW settings
    max_abs_logit_diff: float | None = None
    loss_unsharded: float | None = None  # of the first step
    loss_sharded: float | None = None
    max_abs_grad_diff: float | None = None
    worst_grad: str | None = None  # the gradient that used most of its tolerance
    grad_norm_unsharded: float | None = None  # of the first step, before clipping
    grad_norm_sharded: float | None = None
    max_abs_param_diff_after_step: float | None = None
    worst_param: str | None = None
    max_abs_state_diff: float | None = None  # AdamW's exp_avg and sqrt(exp_avg_sq)
    # per parameter, the worst step: {"gradient": [relative error, max |unsharded|, the unsharded model's own
    # rounding], "update": [... of the largest update], "state": [... of exp_avg / sqrt(exp_avg_sq)]}; each
    # relative to the unsharded tensor's largest magnitude (its own rounding: its distance from the float64
    # twin's)
    parameters: dict = field(default_factory=dict)
    # per quantity, the tensors within tolerance only by their own rounding (zero in exact arithmetic)
    within_rounding_only: dict = field(default_factory=dict)
    rounding_unmeasured: str | None = None  # why the float64 twin could not run (then no rounding is allowed)
    parameters_compared: int = 0
    parameters_without_gradient: list = field(default_factory=list)  # on both sides: compared as equal
    # micro-batches after whose backward the sharded model held gradients: FSDP reduce-scatters
    # after the last one only; without FSDP every backward accumulates into .grad
    gradient_sync_micro_batches: list = field(default_factory=list)
    # what the plan shards: per kind, parameters (count and numel) unsharded and per rank
    sharded: dict = field(default_factory=dict)
    # the plan's rules that split weights over tp (at full size): {rule, pattern, style, modules}
    sharded_rules: list = field(default_factory=list)
    replicated: list = field(default_factory=list)  # of PARALLEL_KINDS, those the plan leaves (mostly) whole
    routing: dict = field(default_factory=dict)  # MoE: how the twin's routing was steered, what it gave
    twin: dict = field(default_factory=dict)
    # the plan's rules that split weights over tp (at full size): {rule, pattern, style, modules}
    sharded: list = field(default_factory=list)
    loss_parallel: bool = False
    failure: dict | None = None
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


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
    from tpplan.plan.mesh_sizes import ep_size, tp_size
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


def sharded_rules(stage) -> list[dict]:
    """The rules whose modules' weights the plan splits over tp (what the check proves sharded), each
    with how many modules it splits; a style of one's own counts when its modules' weights come out
    as DTensors it does not say the layout of."""
    from tpplan.plan.module_kinds import module_kind

    counts: dict[int, int] = {}
    modules = dict(stage.model.named_modules())
    for entry in stage.plan.sharded_entries():
        module = modules.get(entry.fqn)  # (a parameter-level rule names no module)
        if module is None or getattr(module, "weight", None) is None:
            continue
        layout = entry.rule.parameter_layout(module_kind(module), "weight")
        if layout.startswith("shard") or entry.rule.user_style:
            counts[entry.rule_index] = counts.get(entry.rule_index, 0) + 1
    return [{"rule": stage.plan.rules[i].label, "pattern": stage.plan.rules[i].pattern,
             "style": stage.plan.rules[i].rule.style, "modules": n} for i, n in sorted(counts.items())]


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
        doing.append(f"rank {rank} was in {_where_text(progress)}{lost}")
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


def _where_text(progress: dict) -> str:
    text = str(progress.get("phase", "?"))
    for key in ("module", "parameter"):
        if progress.get(key):
            text += f" ({key} {progress[key]})"
    if progress.get("step"):
        text += f" at step {progress['step']}"
    return text


# ------------------------------------------------------------------------------------------
# Rank side (python -m tpplan.prove.check JOB): run both models, compare, write the verdict
# ------------------------------------------------------------------------------------------


class ModuleTracer:
    """Forward hooks on every module recording, per call, the inputs (shape and which module
    produced each) and the first output.  Registered *after* the plan is applied, so the inputs
    seen are those the module's own code receives (after any prepare_input redistribution)."""

    def __init__(self, model, keep_values: bool, progress=None, skip=frozenset()):
        import torch

        self.torch = torch
        self.progress = progress  # told the module entered, so a hang or crash is located
        self.keep_values = keep_values
        self.stack: list[str] = []
        self.producer: dict[int, str] = {}
        self.alive: list = []  # keeps produced tensors alive so their id() is not reused
        self.calls: list[dict] = []
        self.handles = []
        for name, module in model.named_modules():
            if not name or id(module) in skip:  # skip: ids of modules left untraced (compiled blocks)
                continue
            self.handles.append(module.register_forward_pre_hook(self._pre(name), with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._post(name), with_kwargs=True))

    def _describe(self, key, value):
        from torch.distributed.tensor import DTensor

        if not isinstance(value, self.torch.Tensor):
            return None
        shape = tuple(value.shape)
        layout = None
        if isinstance(value, DTensor):
            layout = ",".join(str(p) for p in value.placements)
        return {"arg": key, "shape": shape, "dtensor": layout, "producer": self.producer.get(id(value))}

    def _pre(self, name):
        def hook(module, args, kwargs):
            self.stack.append(name)
            if self.progress is not None:
                self.progress(self.progress.phase, module=name)
            inputs = [d for d in (self._describe(i, a) for i, a in enumerate(args)) if d]
            inputs += [d for d in (self._describe(k, v) for k, v in kwargs.items()) if d]
            self.calls.append({"module": name, "type": type(module).__name__, "inputs": inputs, "output": None})
            return None

        return hook

    def _post(self, name):
        def hook(module, args, kwargs, output):
            from torch.distributed.tensor import DTensor

            if self.stack and self.stack[-1] == name:
                self.stack.pop()
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            if isinstance(first, self.torch.Tensor):
                self.producer[id(first)] = name
                self.alive.append(first)
                if self.keep_values:
                    with self.torch.no_grad():
                        full = first.full_tensor() if isinstance(first, DTensor) else first
                        call = next(c for c in reversed(self.calls) if c["module"] == name)
                        call["output"] = full.detach().float().clone()
                        call["output_local"] = not isinstance(first, DTensor)
            return None

        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _explain_failure(sharded: ModuleTracer, reference: ModuleTracer, plan, error: BaseException) -> dict:
    """Name the module whose output layout broke the forward, from the two traces."""
    failing = sharded.stack[-1] if sharded.stack else None
    ref_calls: dict[str, list] = {}
    for call in reference.calls:
        ref_calls.setdefault(call["module"], []).append(call)
    seen: dict[str, int] = {}
    failing_call = None
    for call in sharded.calls:
        index = seen.get(call["module"], 0)
        seen[call["module"]] = index + 1
        refs = ref_calls.get(call["module"], [])
        call["ref"] = refs[index] if index < len(refs) else None
        if call["module"] == failing:
            failing_call = call
    styles = plan.styles_by_module()
    result: dict[str, Any] = {
        "failing_module": failing,
        "error": f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}",
    }
    if failing_call is None:
        result["message"] = f"the sharded forward failed outside any module: {result['error']}"
        return result
    ref = failing_call.get("ref") or {"inputs": []}
    ref_inputs = {d["arg"]: d for d in ref["inputs"]}
    for d in failing_call["inputs"]:
        expected = ref_inputs.get(d["arg"])
        if expected is None or tuple(expected["shape"][1:]) == tuple(d["shape"][1:]):
            continue
        producer = d["producer"]
        arg = d["arg"] if isinstance(d["arg"], str) else f"input #{d['arg']}"
        got, want = tuple(d["shape"]), tuple(expected["shape"])
        if producer and producer in styles:
            rule = styles[producer]
            out = rule.output_layout()
            result.update(
                wrong_layout_module=producer,
                message=(
                    f"{producer} has the wrong output layout for what follows: it hands {failing} ({failing_call['type']}) "
                    f"{arg} of shape {got} where the unsharded model has {want}. {producer} is "
                    f"{rule.summary()} (output {out}, {'a local tensor' if rule.returns_local else 'a DTensor'}). "
                    f"The forward then failed in {failing}: {result['error']}"
                ),
                hint=rule.wrong_output_hint(producer),
            )
            return result
        source = f"the output of {producer} (not in the plan)" if producer else "computed between modules (in a parent's forward)"
        result.update(
            wrong_layout_module=producer,
            message=(
                f"{failing} ({failing_call['type']}) received {arg} of shape {got} where the unsharded model has {want}; "
                f"it was {source}. The forward failed in {failing}: {result['error']}"
            ),
            hint="a tensor built from a sequence-sharded *local* tensor sees only the local sequence length: keep the "
            "sequence-sharded stream a DTensor (use_local_output: false on the modules whose output is shard(1))",
        )
        return result
    result["message"] = (
        f"the sharded forward failed in {failing} ({failing_call['type']}), whose inputs have the unsharded shapes: "
        f"{result['error']}"
    )
    return result


class _Progress:
    """What this rank is doing, in progress-RANK.json: the phase, and the module or parameter at
    hand.  The parent reads it when a rank hangs or dies without a verdict, so even then the
    verdict says where."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = out_dir / f"progress-{rank}.json"
        self.rank = rank
        self.phase = "starting"
        self.where: dict[str, str] = {}
        # TPPLAN_CHECK_FAULT=raise|hang|kill:RANK:PHASE makes that rank fail there (tests of the
        # verdicts for a crash, a hung rank and a killed rank: no plan produces those on demand)
        fault = os.environ.get("TPPLAN_CHECK_FAULT", "").split(":", 2)
        self.fault = (fault[0], int(fault[1]), fault[2]) if len(fault) == 3 else None

    def __call__(self, phase: str, **where: str) -> None:
        self.phase, self.where = phase, {k: v for k, v in where.items() if v}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"phase": phase, **self.where}))
        os.replace(tmp, self.path)
        if self.fault and self.fault[1] == self.rank and self.fault[2] == phase:
            kind, self.fault = self.fault[0], None
            if kind == "raise":
                raise RuntimeError(f"fault injected in {phase}")
            if kind == "kill":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)


def _error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def _error_site(exc: BaseException) -> str | None:
    """file:line in function of the innermost frame, for the verdict (no traceback is printed)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    frame = frames[-1]
    return f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno} in {frame.name}"


def _crash_failure(exc: BaseException, progress: _Progress, rank: int) -> dict:
    where = _where_text({"phase": progress.phase, **progress.where})
    failure = {
        "message": f"rank {rank} failed in {where}: {_error_text(exc)}",
        "phase": progress.phase,
        "rank": rank,
        "error": _error_text(exc),
        "error_site": _error_site(exc),
        **progress.where,
    }
    return failure


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
    progress = _Progress(out_dir, rank)
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
        _write_failure(out_dir, rank, _crash_failure(exc, progress, rank))
        return 1
    finally:
        if initialised:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - the verdict is written; tearing down may not fail it
                pass


def _rank_check(job: dict, out_dir: Path, rank: int, progress: _Progress) -> int:
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


@dataclass(frozen=True)
class Tolerance:
    """What a compared tensor may differ by: ``atol + rtol x max |unsharded|``; for weights also ``ulp`` x
    their largest magnitude (rounding the sum weight + update may land one unit apart); and ``own`` x the
    unsharded model's own rounding of the tensor, at most ``cap`` x the largest tensor of its quantity."""

    atol: float
    rtol: float
    ulp: float = 0.0
    own: float = OWN_ROUNDING
    cap: float = ROUNDING_CAP

    def exact(self, scale: float, weight: float = 0.0) -> float:
        return self.atol + self.rtol * scale + self.ulp * weight

    def allowed(self, scale: float, weight: float = 0.0, rounding: float = 0.0, span: float = 0.0) -> float:
        return self.exact(scale, weight) + min(self.own * rounding, self.cap * span)


class _Proof:
    """One rank's side of the proof: the twin unsharded (``reference``) and sharded by the plan
    (``model``), their steps on the same batches, and every comparison, recorded per quantity and per
    parameter; ``exact``, the unsharded twin in float64, measures how far float32 rounding alone puts
    each tensor of the unsharded one.  Every rank compares whole tensors (gathered), in the same order; a
    verdict is taken over all ranks at once, so every rank stops at the same place."""

    def __init__(self, job: dict, progress: _Progress):
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
            self.exact_failed = _error_text(exc)
            kept.clear()
            return None
        finally:
            handle.remove()

    def explain(self, exc: BaseException, step: int) -> dict:
        try:
            failure = _explain_failure(self.tracer, self.ref_tracer, self.plan, exc)
        except Exception:  # noqa: BLE001 - explaining must not hide the failure itself
            failure = _crash_failure(exc, self.progress, self.progress.rank)
        failure.setdefault("phase", self.progress.phase)
        failure.setdefault("error_site", _error_site(exc))
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
            unreduced = _unreduced_gradients(self.model, self.ref_grads, self.grad_diffs, self.mesh,
                                             lambda want: self.tol.allowed(want.abs().max().item()))
            if unreduced:
                return _unreduced_failure(unreduced)
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
            return _first_divergence(self.tracer, self.ref_tracer, self.tol)
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
            replayed = _replay_step(before, states, self.sharded_grads, self.hyper, self.job["max_grad_norm"])
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


def _unreduced_failure(unreduced: list) -> dict:
    """The failure for replicated parameters whose gradient is right only once summed over tp."""
    if unreduced[0][3] is not None:
        name, local, summed, (start, stop, total) = unreduced[0]
        return {
            "message": f"gradient of {name} differs by {local:.3g}: its output features {start}:{stop} (of {total}) "
            "are used by every rank for its own heads only, so their gradient is a partial sum on each rank, while "
            f"the rest is complete (summed over the tp ranks, features {start}:{stop} are right)",
            "parameter": name,
            "reason": "gradient_rows_need_tp_sum",
            "parameters": [u[0] for u in unreduced],
            "hint": (f"MLA: {{match: {name.rpartition('.')[0]}, style: mla_kv_a_proj}} sums the gradient of k_rot (its "
                     "last qk_rope_head_dim output features) over tp" if stop == total else
                     f"sum the gradient of {name.rpartition('.')[0]}'s output features {start}:{stop} over tp"),
        }
    name, local, summed, _ = unreduced[0]
    return {
        "message": f"gradient of {name} differs by {local:.3g}: it is applied to a tp-sharded activation; "
        f"sum its gradient over tp (summed over the tp ranks it differs by {summed:.3g})"
        + (f"; also {', '.join(u[0] for u in unreduced[1:])}" if len(unreduced) > 1 else ""),
        "parameter": name,
        "reason": "gradient_needs_tp_sum",
        "parameters": [u[0] for u in unreduced],
        "hint": f"shard its module's input on the sharded dim so the weight's gradient is reduced over tp, "
        f"e.g. {{match: {name.rpartition('.')[0]}, style: sequence_parallel, sequence_dim: -1, "
        "use_local_output: true}",
    }


def _replay_step(weights: dict, states: dict, grads: dict, hyper: dict, max_grad_norm) -> dict:
    """The unsharded update from the weights ``weights`` and AdamW state ``states`` with the gradients
    ``grads`` (all full, by name): clip to ``max_grad_norm`` and one AdamW step with ``hyper``, as
    ``optimizer_step`` takes it.  A parameter without a gradient is left as it is."""
    import torch

    from tpplan.runtime.step import clip_grad_norm_

    params = {name: torch.nn.Parameter(weight.clone()) for name, weight in weights.items()}
    for name, param in params.items():
        param.grad = grads.get(name)
    clip_grad_norm_(params.values(), max_grad_norm or float("inf"))
    optimizer = torch.optim.AdamW(params.values(), **hyper)
    for name, param in params.items():
        if states.get(name):
            optimizer.state[param] = {key: value.clone() for key, value in states[name].items()}
    optimizer.step()
    return {name: param.detach() for name, param in params.items()}


# ------------------------------------------------------------------------------------------
# What the plan shards, and how the twin's MoE routes
# ------------------------------------------------------------------------------------------


def shard_report(model, reference, blocks) -> dict:
    """What the plan shards, per kind of parameter (``KINDS``), inside the transformer blocks
    (``blocks``) and in all: ``{kind: {parameters, sharded, numel, sharded_numel, per_rank}}``.  A
    parameter is sharded when it is split over tp or ep (FSDP's split over dp is not counted);
    ``per_rank``: the elements of the kind one rank holds without FSDP, against ``numel`` unsharded."""
    from tpplan.runtime.step import block_names

    inputs, outputs = _embeddings(reference, output=False), _embeddings(reference, output=True)
    modules = dict(reference.named_modules())
    prefixes = sorted(block_names(reference, blocks), key=len, reverse=True)
    counts: dict[str, dict] = {}
    for name, param in model.named_parameters():
        block = next((p for p in prefixes if name.startswith(p + ".")), None)
        kind = parameter_kind(name, modules, block, inputs, outputs, param.ndim)
        numel, split = param.numel(), _split_factor(param)
        for key in (kind, "total", *(("blocks",) if block else ())):
            entry = counts.setdefault(key, dict.fromkeys(_COUNTS, 0))
            entry["parameters"] += 1
            entry["numel"] += numel
            entry["per_rank"] += -(-numel // split)
            if split > 1:
                entry["sharded"] += 1
                entry["sharded_numel"] += numel
    counts.setdefault("blocks", dict.fromkeys(_COUNTS, 0))
    return {key: counts[key] for key in (*KINDS, "blocks", "total") if key in counts}


def _embeddings(model, output: bool = False) -> set:
    """ids of the model's input (or output) embedding modules."""
    try:
        module = model.get_output_embeddings() if output else model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - a model of one's own without the accessors
        module = None
    return {id(module)} if module is not None else set()


def _split_factor(param) -> int:
    """Into how many parts tp and ep split ``param`` (1: whole on every rank of those dims)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 1
    names = param.device_mesh.mesh_dim_names or ()
    factor = 1
    for dim, placement in enumerate(param.placements):
        split = not (placement.is_replicate() or placement.is_partial())  # Shard, _StridedShard (packed)
        if split and dim < len(names) and names[dim] in ("tp", "ep"):
            factor *= param.device_mesh.size(dim)
    return factor


_COUNTS = ("parameters", "sharded", "numel", "sharded_numel", "per_rank")
_EXPERT_NAME = re.compile(r"^(local_|routed_)?experts$")
_ROUTER_NAME = re.compile(r"^(gate|router|gating|wg|gate_network|moe_gate)$")
_KIND_WORDS = (  # a module's class name (then its attribute name) says what it is; the first match wins
    ("attention", re.compile(r"attention|attn|mamba|mixer|ssm|deltanet|shortconv|conv1d|retention|rwkv",
                             re.I)),
    ("mlp", re.compile(r"mlp|moe|ffn|feed_?forward|expert|sparse|^fc\d*$|^c_fc$|^ff$|^dense", re.I)),
)


def parameter_kind(name: str, modules: dict, block: str | None, inputs: set, outputs: set, ndim: int) -> str:
    """One of ``KINDS`` for the parameter ``name``: its module is the input embedding, the output
    embedding (head) or a norm; inside a block, the modules it lies in say experts (a bank or list of
    experts), attention (attention and the other sequence mixers: SSM, linear attention, short
    convolutions) or MLP (dense MLPs, shared experts, routers) -- class names first, then attribute names."""
    owner = name.rpartition(".")[0]
    module = modules.get(owner)
    if id(module) in inputs:
        return "embedding"
    if id(module) in outputs:
        return "head"
    leaf = owner.rpartition(".")[2]
    normish = "norm" in type(module).__name__.lower() or "norm" in leaf or leaf.startswith("ln")
    if module is not None and normish:
        return "norms"
    if block is None:
        return "embedding" if type(module).__name__ == "Embedding" else "other"
    parts = owner[len(block) + 1:].split(".") if owner != block else []
    path = [f"{block}.{'.'.join(parts[:i + 1])}" for i in range(len(parts))]
    classes = [type(modules[p]).__name__ for p in path if p in modules]
    if any(_EXPERT_NAME.match(part) for part in parts) or any(c.lower().endswith("experts") for c in classes):
        return "experts"
    parent = modules.get(owner.rpartition(".")[0])
    if parent is not None and "experts" in getattr(parent, "_modules", {}) and _ROUTER_NAME.match(leaf):
        return "routers"  # beside the experts: the router
    for words in (classes, parts):
        for kind, pattern in _KIND_WORDS:
            if any(pattern.search(w) for w in words if w != "Linear"):
                return kind
    return "experts" if ndim >= 3 else "other"


def parallel_gaps(sharded: dict) -> list[str]:
    """Of attention, MLP and experts (the kinds the model has), those the plan leaves mostly whole:
    half or less of their elements split over tp or ep.  [] for a plan that parallelizes the blocks."""
    return [kind for kind in PARALLEL_KINDS
            if sharded.get(kind, {}).get("numel")
            and 2 * sharded[kind]["sharded_numel"] <= sharded[kind]["numel"]]


def parallel_status(report: CheckReport) -> str:
    """``proven`` (equal, and the plan shards attention and MLP/experts), ``partial`` (equal, but some of
    them mostly whole: ``report.replicated``) or ``failed``: a verdict as the zoo and derive count it."""
    return "failed" if not report.ok else "partial" if report.replicated else "proven"


def sharded_fractions(sharded: dict) -> dict:
    """{kind: share of its elements split over tp or ep} for the embedding, the head, attention, MLP and
    experts the model has."""
    return {kind: round(entry["sharded_numel"] / entry["numel"], 3) for kind, entry in sharded.items()
            if kind in ("embedding", "head", *PARALLEL_KINDS) and entry.get("numel")}


def nothing_sharded_failure(sharded: dict) -> dict:
    """The verdict on a plan that is equal because it shards nothing inside the blocks."""
    scope = sharded["blocks"] if sharded["blocks"]["parameters"] else sharded["total"]
    outside = [kind for kind in ("embedding", "head") if sharded.get(kind, {}).get("sharded")]
    where = "the blocks" if sharded["blocks"]["parameters"] else "the model (no transformer blocks found)"
    return {
        "message": f"the plan shards nothing inside the blocks: all {scope['parameters']} parameters of "
        f"{where} ({scope['numel']:,} elements in the twin) are whole on every rank, so every rank computes "
        "all of them" + (f"; the plan shards only the {' and '.join(outside)}" if outside
                         else "; the plan shards nothing at all"),
        "reason": "nothing_sharded",
        "hint": "shard the attention and the MLP (colwise q/k/v and gate/up, rowwise o_proj and down_proj, "
        "as specs/llama3.yaml does), or set `replicated_blocks: true` in the spec if blocks left whole is "
        "what you mean",
    }


def steer_routing(model) -> dict:
    """MoE twins route on purpose: every router's input is shifted (a forward pre-hook) along the
    direction that raises the first expert's logit by about twice its spread and lowers the last
    expert's far below every other, for any token -- so in every MoE layer the last expert gets no
    token and the first gets most of them.  Registered before the sharded model is copied from this
    one, so both sides route alike.  (Left to chance, whether some expert got no token varied with
    the seed.)  A router is a 2-D weight [experts, hidden] outside the experts; {} where none is found."""
    import torch

    from tpplan.model.shrink import EXPERT_KEYS

    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    values = vars(text) if text is not None else {}
    experts = next((values[k] for k in EXPERT_KEYS if isinstance(values.get(k), int)), None)
    hidden = values.get("hidden_size")
    if not experts or experts < 3:
        return {}
    steered, drawn = [], 0
    generator = torch.Generator().manual_seed(0)
    for name, module in model.named_modules():
        weight = module._parameters.get("weight")
        if (weight is None or weight.ndim != 2 or weight.shape[0] != experts or "experts" in name.split(".")
                or (isinstance(hidden, int) and weight.shape[1] != hidden)):
            continue
        if not weight.detach().any():  # a router initialised to zero (Afmoe): every token would tie
            with torch.no_grad():
                weight.copy_(torch.randn(weight.shape, generator=generator) * 0.02)
            drawn += 1
        rows = weight.detach().float()
        spread = rows.norm(dim=1).max().item()
        target = torch.zeros(experts)
        target[0], target[-1] = 2 * spread, -4 * spread * rows.shape[1] ** 0.5
        shift = torch.linalg.pinv(rows) @ target  # rows @ shift == target
        module.register_forward_pre_hook(_shift_input(shift), with_kwargs=True)
        steered.append(name)
    if not steered:
        return {}
    return {"routers": len(steered), "experts": experts, "first": steered[0],
            "steered": f"expert 0 raised, expert {experts - 1} lowered below every other, in every router"
            + (f" ({drawn} initialised to zero, drawn from N(0, 0.02) first)" if drawn else "")}


def _shift_input(shift):
    def hook(module, args, kwargs):
        from torch.distributed.tensor import DTensor, Replicate

        def moved(x):
            if isinstance(x, DTensor):
                mesh = x.device_mesh
                whole = [Replicate()] * mesh.ndim
                return x + DTensor.from_local(shift.to(x.dtype), mesh, whole, run_check=False)
            return x + shift.to(x.dtype)

        if args:
            return (moved(args[0]), *args[1:]), kwargs
        key = next(iter(kwargs))
        return args, {**kwargs, key: moved(kwargs[key])}

    return hook


def idle_experts(ref_grads: dict, no_grad: list) -> dict:
    """Per expert bank, the experts whose unsharded gradient is zero in the first step (no token was
    routed to them): banks of 3-D weights [experts, ...] by their zero rows, lists of experts by a
    parameter without a gradient."""
    idle: dict[str, list] = {}
    for name, grad in ref_grads.items():
        if grad.ndim >= 3 and "experts" in name.split("."):
            rows = [i for i in range(grad.shape[0]) if not grad[i].any()]
            if rows:
                idle[name] = rows
    for name in no_grad:
        parts = name.split(".")
        at = parts.index("experts") + 1 if "experts" in parts else len(parts)
        if at < len(parts) and parts[at].isdigit():
            rows = idle.setdefault(".".join(parts[:at]), [])
            rows.append(int(parts[at])) if int(parts[at]) not in rows else None
    return idle


def _unreduced_gradients(model, ref_grads: dict, grad_diffs: dict, mesh, allowed) -> list[tuple]:
    """Replicated parameters (not sharded over tp) whose gradient is wrong on each rank but right once
    summed over tp: they are applied to a tp-sharded activation, so each rank holds a partial
    gradient.  One all-reduce over tp of every such gradient, the same on every rank.  ``allowed(want)``:
    what a gradient may differ by.

    (name, diff on each rank, diff summed, None) per parameter; where only some output features
    (rows of a Linear weight) are right summed and the others right as they are -- MLA's
    kv_a_proj_with_mqa, whose k_rot feeds every rank's own heads -- (..., (start, stop, rows)),
    listed first."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    if mesh["tp"].size() == 1 or mesh["dp"].size() > 1:
        return []  # FSDP over dp > 1 shards every gradient: no whole partial gradient on a rank to find

    def replicated(grad):  # the rank's whole gradient: a plain tensor, or FSDP's over a dp mesh of one
        if not isinstance(grad, DTensor):
            return grad
        return grad.to_local() if "tp" not in (grad.device_mesh.mesh_dim_names or ()) else None

    plain = [(n, g) for n, p in model.named_parameters()
             if p.grad is not None and (g := replicated(p.grad)) is not None]
    if not plain:
        return []
    flat = torch.cat([g.detach().reshape(-1).float() for _, g in plain])
    dist.all_reduce(flat, group=mesh["tp"].get_group())
    found, rows, offset = [], [], 0
    for name, grad in plain:
        summed = flat[offset: offset + grad.numel()].view_as(grad)
        offset += grad.numel()
        grad = grad.detach().float()
        want = ref_grads[name]
        tol = allowed(want)
        local = grad_diffs.get(name, 0.0)
        if local <= tol:
            continue
        after = (summed - want).abs().max().item()
        if after <= tol:
            found.append((name, local, after, None))
        elif grad.ndim == 2:
            right_here = (grad - want).abs().amax(dim=1) <= tol
            right_summed = (summed - want).abs().amax(dim=1) <= tol
            only_summed = (right_summed & ~right_here).nonzero().flatten()
            if bool((right_here | right_summed).all()) and only_summed.numel():
                start, stop = int(only_summed[0]), int(only_summed[-1]) + 1
                rows.append((name, local, after, (start, stop, grad.shape[0])))
    return rows + found


def _first_divergence(sharded: ModuleTracer, reference: ModuleTracer, tol: Tolerance) -> dict:
    """The first module (in execution order) whose output differs from the unsharded model's."""
    ref_by_module: dict[str, list] = {}
    for call in reference.calls:
        ref_by_module.setdefault(call["module"], []).append(call)
    seen: dict[str, int] = {}
    for call in sharded.calls:
        index = seen.get(call["module"], 0)
        seen[call["module"]] = index + 1
        refs = ref_by_module.get(call["module"], [])
        if index >= len(refs) or call.get("output") is None or refs[index].get("output") is None:
            continue
        got, want = call["output"], refs[index]["output"]
        if got.shape != want.shape:
            if call.get("output_local"):
                continue  # a local shard: its layout is not known here
            return {"message": f"first divergence: {call['module']} outputs shape {tuple(got.shape)}, unsharded {tuple(want.shape)}",
                    "failing_module": call["module"]}
        diff = (got - want).abs().max().item()
        if diff > tol.allowed(want.abs().max().item()):
            return {"message": f"first divergence: {call['module']} output differs from the unsharded model by {diff:.3g}",
                    "failing_module": call["module"]}
    return {"message": "values differ beyond tolerance, but no module output differs on its own"}


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
