"""``tpplan check``: prove a plan on CPU before it reaches a GPU.

A shrunken twin of the spec's model (same architecture and plan, 2 layers, widths that still
divide by tp, random init) runs one training step twice on the same global batch: unsharded on
every rank, and sharded by the plan over ``dp x tp`` real gloo ranks launched with torchrun.
Logits, loss, every gradient, the gradient norm (after clipping) and every weight after one AdamW
step must agree within ``TOLERANCE``.

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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.spec.schema import Spec

TOLERANCE = 1e-5  # max abs difference, fp32, on every compared quantity
# train.precision -> (absolute, relative) tolerance: a compared tensor may differ by
# atol + rtol x its largest unsharded magnitude.  See "Tolerances" in the module docstring.
TOLERANCES = {
    "fp32": (TOLERANCE, 0.0),
    "bf16-mixed": (TOLERANCE, 2.0**-5),
    "fp16-mixed": (TOLERANCE, 2.0**-8),
    "bf16": (TOLERANCE, 2.0**-4),
}
TWIN_SEQ_PER_TP = 8  # sequence length of the twin = this x tp (sequence parallel splits it)
TWIN_BATCH = 2  # sequences per data-parallel rank


@dataclass
class CheckReport:
    ok: bool
    tp: int
    dp: int
    world_size: int
    ep: int = 1
    tolerance: float = TOLERANCE
    relative_tolerance: float = 0.0  # under 16-bit compute: x the largest unsharded magnitude, per tensor
    # per quantity, its largest difference over what it was allowed (ok: every one <= 1)
    tolerance_used: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)  # the training settings both sides ran (precision, ...)
    max_abs_logit_diff: float | None = None
    loss_unsharded: float | None = None
    loss_sharded: float | None = None
    max_abs_grad_diff: float | None = None
    worst_grad: str | None = None
    grad_norm_unsharded: float | None = None
    grad_norm_sharded: float | None = None
    max_abs_param_diff_after_step: float | None = None
    worst_param: str | None = None
    # the sharded weights after the step against the unsharded optimizer step applied to the sharded
    # model's own gradients (set where the step from the unsharded gradients differs but every
    # gradient agrees: AdamW magnifies a rounding difference of a gradient entry near eps)
    max_abs_param_diff_same_gradients: float | None = None
    parameters_compared: int = 0
    parameters_without_gradient: list = field(default_factory=list)  # on both sides: compared as equal
    # micro-batches after whose backward the sharded model held gradients: FSDP reduce-scatters
    # after the last one only; without FSDP every backward accumulates into .grad
    gradient_sync_micro_batches: list = field(default_factory=list)
    twin: dict = field(default_factory=dict)
    # the plan's rules that split weights over tp (at full size): {rule, pattern, style, modules}
    sharded: list = field(default_factory=list)
    loss_parallel: bool = False
    failure: dict | None = None
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


class CheckFailed(TpplanError):
    """The sharded model did not match (exit 1, not a bad-input 2)."""

    exit_code = 1


# ------------------------------------------------------------------------------------------
# Parent side: build the twin, launch the ranks, read the verdict
# ------------------------------------------------------------------------------------------


def twin_config_for(spec: Spec, tp: int):
    """The full config and the shrunken twin's config of a transformers model."""
    from tpplan.plan.stage import model_source

    source = model_source(spec)
    return source.config, source.twin(tp).config


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
    from tpplan.core.trust import trusted
    from tpplan.plan.resolve import ep_size, tp_size
    from tpplan.plan.stage import located, resolve_stage

    started = time.time()
    if on_phase:
        on_phase("resolving the plan")
    tp = tp_size(spec, tp)
    ep = ep_size(spec, ep)
    dp = dp or 1
    full_stage = resolve_stage(spec, tp=tp, ep=ep)
    full_plan = full_stage.plan
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
    job = {
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
        "tolerance": TOLERANCES[settings["precision"]][0],
        "relative_tolerance": TOLERANCES[settings["precision"]][1],
        "out_dir": str(workdir),
        "trust_factory": trusted(),  # the ranks import the factory this command was allowed to (docs/trust.md)
    }
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    with _watching(workdir / "progress-0.json", on_phase, f"starting {world} CPU ranks"):
        if launcher == "fork":
            outcome = _launch_forked(job_path, world, timeout)
        else:
            outcome = _launch_torchrun(job_path, world, timeout)
    report = _read_verdict(workdir, tp, dp, outcome, timeout, ep)
    report.twin = twin.summary()
    report.sharded = sharded_rules(full_stage)
    report.loss_parallel = spec.loss_parallel
    report.step = settings
    report.warnings = list(full_plan.warnings) + [
        f"{key} is a GPU feature: not run by this CPU check" for key, on in
        (("train.float8", spec.train.float8), ("mesh.async_tp", spec.mesh.async_tp)) if on
    ]
    report.seconds = round(time.time() - started, 2)
    if not keep_dir:
        import shutil

        shutil.rmtree(workdir, ignore_errors=True)
    return report


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
    from tpplan.plan.resolve import module_kind

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


def step_settings(spec: Spec) -> dict:
    """The training settings ``check`` runs the step with: the spec's activation checkpointing,
    accumulation and compile; its precision where ``train.precision`` names one (``auto`` is proven
    in float32, the exact proof: a twin is float32 whatever the full model's dtype)."""
    precision = spec.train.precision
    return {
        "precision": "fp32" if precision == "auto" else precision,
        "activation_checkpointing": spec.train.activation_checkpointing,
        "grad_accum_steps": spec.train.grad_accum_steps,
        "compile": spec.train.compile,
    }


def _own_mesh():
    """A ("dp", "ep", "tp") mesh of this rank alone (every rank makes its own): FSDP2 over it only
    casts, which is how the unsharded model runs a mixed precision's policy."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import DeviceMesh

    rank = dist.get_rank()
    groups = [dist.new_group([r], use_local_synchronization=True) for r in range(dist.get_world_size())]
    own = groups[rank]
    return DeviceMesh.from_group([own] * 3, "cpu", mesh=torch.tensor([[[rank]]]), mesh_dim_names=("dp", "ep", "tp"))


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
    """Both sides run THE training step (``tpplan.runtime.step``, what train.py prints): the sharded model as
    train.py prepares it (the plan, activation checkpointing, torch.compile per block, FSDP2 with the
    precision's policy) on ``accum`` micro-batches per dp rank; the unsharded model, under the same
    precision policy only, on the whole global batch at once.  Equal within tolerance proves the plan,
    and that checkpointing, compile and accumulation change nothing."""
    import contextlib
    import copy

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from tpplan.model.sources import source_from_job
    from tpplan.plan.apply import apply_tensor_parallel, build_mesh
    from tpplan.plan.resolve import resolve
    from tpplan.runtime.helpers import logits_of, model_logits
    from tpplan.runtime.parallel_styles import fsdp_shard_placement
    from tpplan.runtime.step import (
        LossScaler,
        block_names,
        forward_backward,
        optimizer_step,
        precision_dtypes,
        prepare_model,
    )

    tp, dp, ep = job["tp"], job["dp"], job.get("ep", 1)
    precision = job.get("precision", "fp32")
    accum = job.get("grad_accum_steps", 1)
    compiled = job.get("compile", False)
    atol, rtol = job["tolerance"], job.get("relative_tolerance", 0.0)
    progress("building the twin")
    spec = Spec.model_validate(job["spec"])
    source = source_from_job(job["twin"])
    torch.use_deterministic_algorithms(True, warn_only=True)
    param_dtype, compute_dtype, _ = precision_dtypes(precision)
    reference = source.build(device="cpu", dtype=str(param_dtype).removeprefix("torch."), seed=job["seed"])
    model = copy.deepcopy(reference)  # deepcopy keeps tied parameters tied
    positions = source.positions  # the keyword the forward takes position ids by (None: not passed)
    progress("resolving the plan on the twin")
    plan = resolve(spec, model, tp=tp, seq_length=job["seq_length"], ep=ep, base_dir=job.get("spec_dir"))
    mesh = build_mesh("cpu", dp=dp, tp=tp, ep=ep)
    # the ranks that hold different data: dp x ep (expert-parallel ranks split their dp rank's batch)
    dp_rank = mesh["dp"].get_local_rank() * ep + mesh["ep"].get_local_rank()
    dp = dp * ep

    # the global batch: accum micro-batches of b sequences on each of the dp ranks; the unsharded
    # model takes all of it as one batch
    seq, b = job["seq_length"], job["batch_per_dp"]
    generator = torch.Generator().manual_seed(job["seed"] + 1)
    tokens = torch.randint(0, source.vocab_size(reference), (dp * b * accum, seq + 1), generator=generator)
    inputs, labels = tokens[:, :-1], tokens[:, 1:]
    position_ids = torch.arange(seq).unsqueeze(0)
    mine = slice(dp_rank * b * accum, (dp_rank + 1) * b * accum)
    micro_batches = [(inputs[mine][i * b:(i + 1) * b], labels[mine][i * b:(i + 1) * b]) for i in range(accum)]
    scalers = [LossScaler() if precision == "fp16-mixed" else None for _ in range(2)]

    # Every forward starts from the same random state: a model that samples in training (Phi-MoE's
    # router draws Gumbel noise even with dropout off) then draws the same numbers sharded and
    # unsharded -- the same step, not two samples of it (at dp=1; with dp > 1 the batch shapes differ)
    def same_draws():
        torch.manual_seed(job["seed"] + 2)

    def keep_logits(kept: list, then=None):
        def hook(module, args, output):
            kept.append(logits_of(output).detach())
            if then:
                progress(then)
        return hook

    # the unsharded model, under the precision's policy alone (FSDP2 on a mesh of this rank only
    # casts the float32 masters as the sharded side does): a traced forward on this rank's first
    # micro-batch (for explaining failures), then the step on the whole global batch
    progress("the unsharded forward")
    ties = [tie.names for tie in plan.tied]
    if compute_dtype != param_dtype:
        prepare_model(reference, _own_mesh(), None, blocks=plan.blocks, tied=ties, precision=precision)
    ref_tracer = ModuleTracer(reference, keep_values=True)
    same_draws()
    with torch.no_grad():
        model_logits(reference, micro_batches[0][0], position_ids.expand(len(micro_batches[0][0]), -1), positions)
    ref_tracer.remove()

    @contextlib.contextmanager
    def ref_phase(name):
        progress(f"the unsharded {name}")
        if name == "forward":
            same_draws()
        yield

    ref_logits: list = []
    handle = reference.register_forward_hook(keep_logits(ref_logits))
    ref_loss = forward_backward(reference, [(inputs, labels)], position_ids, loss_parallel=False, positions=positions,
                                loss_scale=scalers[0] and scalers[0].scale, phase=ref_phase)
    handle.remove()

    progress("applying the plan")
    blocks = [model.get_submodule(name) for name in block_names(model, plan.blocks)]
    if compiled:
        import torch._inductor.config

        # every rank compiles in its own process: the ranks already share the cores, and a pool of
        # compile workers per rank costs more than it saves (a cold tiny check: 208 s -> 140 s here)
        torch._inductor.config.compile_threads = 1
    prepare_model(
        model, mesh, lambda m, _: apply_tensor_parallel(m, plan, mesh), blocks=plan.blocks, tied=ties,
        precision=precision, activation_checkpointing=job.get("activation_checkpointing", "none"), compile=compiled,
        shard_placement_fn=fsdp_shard_placement,
    )
    # compiled blocks are traced from outside (hooks inside would break inductor's graphs)
    inside = {id(m) for block in blocks for m in block.modules()} if compiled else set()
    tracer = ModuleTracer(model, keep_values=True, progress=progress, skip=inside)
    synced: list[int] = []  # micro-batches after whose backward the sharded gradients existed

    @contextlib.contextmanager
    def phase(name):
        if name == "forward":
            progress("the sharded forward")
            same_draws()
            yield
            return
        tracer.remove()  # the first forward is traced; recomputed forwards (checkpointing) are not
        progress("the sharded backward")
        yield
        if any(p.grad is not None for p in model.parameters()):
            synced.append(len(logits_parts) - 1)

    logits_parts: list = []
    handle = model.register_forward_hook(keep_logits(logits_parts, then="the sharded loss"))
    try:
        loss = forward_backward(model, micro_batches, position_ids, loss_parallel=spec.loss_parallel, positions=positions,
                                loss_scale=scalers[1] and scalers[1].scale, phase=phase)
    except Exception as exc:  # a plan that breaks the step: explain it from the two traces
        try:
            failure = _explain_failure(tracer, ref_tracer, plan, exc)
        except Exception:  # noqa: BLE001 - explaining must not hide the failure itself
            failure = _crash_failure(exc, progress, rank)
        failure.setdefault("phase", progress.phase)
        failure.setdefault("error_site", _error_site(exc))
        if progress.phase != "the sharded forward":
            failure["message"] = f"{progress.phase} failed: {failure['error']}"
            failure.setdefault("hint", "the forward ran; the failure is in " + progress.phase)
        _write_failure(out_dir, rank, failure)
        return 1
    handle.remove()
    tracer.remove()

    def gmax(value: float) -> float:
        t = torch.tensor(float(value))
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.item()

    def full(t):
        return (t.full_tensor() if isinstance(t, DTensor) else t).detach().float()

    def allowed(want) -> float:  # what a tensor may differ by: atol + rtol x its largest magnitude
        return atol + rtol * (want.abs().max().item() if want.numel() else 0.0)

    progress("comparing logits and loss")
    got_logits = torch.cat([full(part) for part in logits_parts])
    want_logits = full(ref_logits[0])[mine]
    logit_diff = gmax((got_logits - want_logits).abs().max().item())
    logit_excess = gmax((got_logits - want_logits).abs().max().item() / allowed(want_logits))
    loss_sum = loss.detach().float().clone()
    dist.all_reduce(loss_sum)
    loss_sharded = (loss_sum / (dp * tp)).item()  # every tp rank holds the same dp-local loss (dp x ep here)
    loss_unsharded = ref_loss.float().item()
    loss_excess = abs(loss_sharded - loss_unsharded) / (atol + rtol * abs(loss_unsharded))

    progress("comparing parameters")
    ref_params = dict(reference.named_parameters())
    names = [name for name, _ in model.named_parameters()]
    extra, missing = sorted(set(names) - set(ref_params)), sorted(set(ref_params) - set(names))
    if extra or missing:
        message = "the sharded model's parameters differ from the unsharded model's: " + "; ".join(
            filter(None, [extra and f"only sharded: {', '.join(extra)}", missing and f"only unsharded: {', '.join(missing)}"])
        )
        hint = "tied weights came apart" if extra else None
        _write_failure(out_dir, rank, {"message": message, "hint": hint, "phase": progress.phase})
        return 1

    grad_diff, grad_excess, worst_grad = 0.0, 0.0, None
    unscale = 1.0 / scalers[0].scale if scalers[0] else 1.0  # fp16: gradients compared as the update sees them
    no_grad: list[str] = []  # no gradient on either side (an MoE expert the router never picked): equal
    one_sided: list[str] = []
    grad_diffs: dict[str, float] = {}
    ref_grads: dict = {}
    sharded_grads: dict = {}  # as the update sees them, for replaying the unsharded step on them
    start_weights = {name: full(ref_params[name]).clone() for name in names}  # neither model has stepped
    for name, param in model.named_parameters():
        progress("comparing gradients", parameter=name)
        got, want = param.grad, ref_params[name].grad
        if got is None or want is None:
            (no_grad if got is None and want is None else one_sided).append(name)
            continue
        ref_grads[name] = want = full(want) * unscale
        sharded_grads[name] = got = full(got) * unscale
        diff = (got - want).abs().max().item()
        grad_diffs[name] = diff
        grad_diff = max(grad_diff, diff)
        if diff / allowed(want) > grad_excess:
            grad_excess, worst_grad = diff / allowed(want), name
    grad_diff, grad_excess = gmax(grad_diff), gmax(grad_excess)
    progress("diagnosing gradients")
    # a gradient right only once summed over tp, where the forward is right: a replicated parameter
    # applied to a tp-sharded activation (a forward that differs is explained by its first divergence)
    forward_ok = logit_excess <= 1 and loss_excess <= 1
    unreduced = (_unreduced_gradients(model, ref_grads, grad_diffs, mesh, allowed, unscale)
                 if grad_excess > 1 and forward_ok else [])

    # the update as train.py makes it: unscale (fp16), clip to the spec's max_grad_norm, AdamW
    hyper = {"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6}
    optimizer = torch.optim.AdamW(model.parameters(), **hyper)
    optimizer.register_step_pre_hook(lambda *_: progress("the optimizer step"))

    @contextlib.contextmanager
    def update_phase(name):
        progress("clipping gradients")
        yield

    max_norm = job["max_grad_norm"]
    norm_sharded = optimizer_step(model, optimizer, max_grad_norm=max_norm, loss_scaler=scalers[1],
                                  phase=update_phase).item()
    progress("the unsharded optimizer step")
    norm_ref = optimizer_step(reference, torch.optim.AdamW(reference.parameters(), **hyper), max_grad_norm=max_norm,
                              loss_scaler=scalers[0]).item()
    # 16-bit compute: a gradient element near zero may take either sign, and AdamW's first step moves
    # every weight by up to lr either way (m / sqrt(v) = g / |g|): weights may then differ by 2 x lr
    step_slack = 2 * hyper["lr"] if rtol else 0.0
    param_diff, param_excess, worst_param, worst_entry_grad = 0.0, 0.0, None, None
    count = 0
    for name, param in model.named_parameters():
        progress("comparing weights after the step", parameter=name)
        want = full(ref_params[name])
        diffs = (full(param) - want).abs()
        diff = diffs.max().item()
        count += 1
        param_diff = max(param_diff, diff)
        if diff / (allowed(want) + step_slack) > param_excess:
            param_excess, worst_param = diff / (allowed(want) + step_slack), name
            grad = ref_grads.get(name)  # the unsharded gradient AdamW saw, at the entry that differs most
            worst_entry_grad = None if grad is None else grad.reshape(-1)[int(diffs.argmax())].item()
    param_diff, param_excess = gmax(param_diff), gmax(param_excess)
    norm_excess = abs(norm_sharded - norm_ref) / (atol * max(1.0, norm_ref) + rtol * norm_ref)
    same_grad_diff = None
    step_excess = param_excess
    if param_excess > 1 and forward_ok and grad_excess <= 1 and norm_excess <= 1 and not one_sided:
        # every gradient agrees, the weights after the step do not: the step is proven on its own --
        # the unsharded AdamW, from the same start, applied to the sharded model's gradients
        progress("replaying the unsharded step on the sharded gradients")
        replayed = _replay_step(start_weights, sharded_grads, hyper, max_norm)
        same_grad_diff, step_excess = 0.0, 0.0
        for name, param in model.named_parameters():
            want = replayed[name]
            diff = (full(param) - want).abs().max().item()
            same_grad_diff = max(same_grad_diff, diff)
            step_excess = max(step_excess, diff / (allowed(want) + step_slack))
        same_grad_diff, step_excess = gmax(same_grad_diff), gmax(step_excess)

    progress("writing the verdict")
    ok = (
        max(logit_excess, loss_excess, grad_excess, norm_excess, step_excess) <= 1
        and not one_sided
    )
    report = CheckReport(
        ok=bool(ok), tp=tp, dp=dp // ep, ep=ep, world_size=dp * tp, tolerance=atol, relative_tolerance=rtol,
        max_abs_logit_diff=logit_diff, loss_unsharded=loss_unsharded, loss_sharded=loss_sharded,
        max_abs_grad_diff=grad_diff, worst_grad=worst_grad,
        grad_norm_unsharded=norm_ref, grad_norm_sharded=norm_sharded,
        max_abs_param_diff_after_step=param_diff, worst_param=worst_param, parameters_compared=count,
        max_abs_param_diff_same_gradients=same_grad_diff,
        parameters_without_gradient=no_grad, gradient_sync_micro_batches=synced,
        tolerance_used={"logits": logit_excess, "loss": loss_excess, "gradients": grad_excess,
                        "grad_norm": norm_excess, "weights_after_step": step_excess},
    )
    if one_sided:
        report.failure = {
            "message": "a gradient exists on one side only: " + ", ".join(
                f"{n} ({'unsharded' if model.get_parameter(n).grad is None else 'sharded'} model only)" for n in one_sided),
            "parameter": one_sided[0],
            "hint": "the sharded model does not use these parameters the way the unsharded one does",
        }
    elif unreduced and unreduced[0][3] is not None:
        name, local, summed, (start, stop, total) = unreduced[0]
        report.failure = {
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
    elif unreduced:
        name, local, summed, _ = unreduced[0]
        report.failure = {
            "message": f"gradient of {name} differs by {local:.3g}: it is applied to a tp-sharded activation; sum its "
            f"gradient over tp (summed over the tp ranks it differs by {summed:.3g})"
            + (f"; also {', '.join(u[0] for u in unreduced[1:])}" if len(unreduced) > 1 else ""),
            "parameter": name,
            "reason": "gradient_needs_tp_sum",
            "parameters": [u[0] for u in unreduced],
            "hint": f"shard its module's input on the sharded dim so the weight's gradient is reduced over tp, e.g. "
            f"{{match: {name.rpartition('.')[0]}, style: sequence_parallel, sequence_dim: -1, use_local_output: true}}",
        }
    elif not ok and forward_ok and grad_excess <= 1 and norm_excess <= 1:
        # every gradient agrees; the weights after the step differ from the unsharded step's, from the
        # unsharded gradients and (replayed) from the sharded ones: the update itself is not the same
        near = (f"; there the unsharded gradient is {worst_entry_grad:.2g}" if worst_entry_grad is not None else "")
        report.failure = {
            "message": f"the weights after one AdamW step differ by {param_diff:.3g} at {worst_param}{near}, while "
            f"logits, loss, grad norm and every gradient agree (gradients to {grad_diff:.3g}); the unsharded AdamW "
            f"step applied to the sharded model's own gradients differs from its weights too ({same_grad_diff:.3g}): "
            "the sharded optimizer step does not update the weights the unsharded one does",
            "parameter": worst_param,
            "reason": "optimizer_step_differs",
            "hint": "a parameter the sharded optimizer does not hold or holds twice (a tie undone after sharding, a "
            "parameter replaced after the optimizer was built), or a gradient it never sees",
        }
    elif not ok:
        report.failure = _first_divergence(tracer, ref_tracer, atol, rtol)
    if rank == 0:
        data = report.to_dict()
        tmp = out_dir / "result.json.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, out_dir / "result.json")
    progress("done")
    dist.barrier()  # every rank done before any tears the process group down
    return 0


def _replay_step(start: dict, grads: dict, hyper: dict, max_grad_norm) -> dict:
    """The unsharded update from the weights ``start`` with the gradients ``grads`` (both full,
    by name): clip to ``max_grad_norm`` and one AdamW step with ``hyper``, as ``optimizer_step``
    takes it.  A parameter without a gradient is left as it is."""
    import torch

    from tpplan.runtime.step import clip_grad_norm_

    params = {name: torch.nn.Parameter(weight.clone()) for name, weight in start.items()}
    for name, param in params.items():
        param.grad = grads.get(name)
    clip_grad_norm_(params.values(), max_grad_norm or float("inf"))
    torch.optim.AdamW(params.values(), **hyper).step()
    return {name: param.detach() for name, param in params.items()}


def _unreduced_gradients(model, ref_grads: dict, grad_diffs: dict, mesh, allowed, scale: float = 1.0) -> list[tuple]:
    """Replicated parameters (not sharded over tp) whose gradient is wrong on each rank but right once
    summed over tp: they are applied to a tp-sharded activation, so each rank holds a partial
    gradient.  One all-reduce over tp of every such gradient, the same on every rank.  ``allowed(want)``:
    what a gradient may differ by; ``scale``: what the sharded gradients are multiplied by to compare
    (1 / the fp16 loss scale).

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
    flat = torch.cat([g.detach().reshape(-1).float() * scale for _, g in plain])
    dist.all_reduce(flat, group=mesh["tp"].get_group())
    found, rows, offset = [], [], 0
    for name, grad in plain:
        summed = flat[offset: offset + grad.numel()].view_as(grad)
        offset += grad.numel()
        grad = grad.detach().float() * scale
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


def _first_divergence(sharded: ModuleTracer, reference: ModuleTracer, atol: float, rtol: float = 0.0) -> dict:
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
        if diff > atol + rtol * want.abs().max().item():
            return {"message": f"first divergence: {call['module']} output differs from the unsharded model by {diff:.3g}",
                    "failing_module": call["module"]}
    return {"message": "values differ beyond tolerance, but no module output differs on its own"}


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
