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

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .errors import TpplanError
from .spec import Spec

TOLERANCE = 1e-5  # max abs difference, fp32, on every compared quantity
TWIN_SEQ_PER_TP = 8  # sequence length of the twin = this x tp (sequence parallel splits it)
TWIN_BATCH = 2  # sequences per data-parallel rank


@dataclass
class CheckReport:
    ok: bool
    tp: int
    dp: int
    world_size: int
    tolerance: float = TOLERANCE
    max_abs_logit_diff: float | None = None
    loss_unsharded: float | None = None
    loss_sharded: float | None = None
    max_abs_grad_diff: float | None = None
    worst_grad: str | None = None
    grad_norm_unsharded: float | None = None
    grad_norm_sharded: float | None = None
    max_abs_param_diff_after_step: float | None = None
    worst_param: str | None = None
    parameters_compared: int = 0
    twin: dict = field(default_factory=dict)
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
    """The shrunken twin's config, checked to resolve under the plan like the full model."""
    from .models import load_spec_config, shrink_config

    full = load_spec_config(spec)
    twin = shrink_config(full, tp)
    twin._attn_implementation = full._attn_implementation
    return full, twin


def run_check(
    spec: Spec,
    *,
    tp: int | None = None,
    dp: int | None = None,
    timeout: float = 600,
    keep_dir: str | None = None,
) -> CheckReport:
    """Resolve at full size (sizes must divide there too), then prove the twin on dp*tp gloo ranks."""
    from .models import build_model
    from .resolve import resolve, tp_size

    started = time.time()
    tp = tp_size(spec, tp)
    dp = dp or 1
    full, twin = twin_config_for(spec, tp)
    full_plan = resolve(spec, build_model(full, device="meta", dtype=spec.model.dtype), tp=tp,
                        seq_length=spec.train.seq_length)
    seq = TWIN_SEQ_PER_TP * tp
    resolve(spec, build_model(twin, device="meta"), tp=tp, seq_length=seq)  # the twin must fit too

    world = dp * tp
    workdir = Path(keep_dir) if keep_dir else Path(tempfile.mkdtemp(prefix="tpplan-check-"))
    workdir.mkdir(parents=True, exist_ok=True)
    job = {
        "spec": spec.model_dump(mode="json", exclude_unset=True),
        "twin_config": twin.to_dict(),
        "attn_implementation": twin._attn_implementation,
        "tp": tp,
        "dp": dp,
        "seq_length": seq,
        "batch_per_dp": TWIN_BATCH,
        "seed": spec.train.seed,
        "max_grad_norm": spec.train.max_grad_norm,
        "tolerance": TOLERANCE,
        "out_dir": str(workdir),
    }
    job_path = workdir / "job.json"
    job_path.write_text(json.dumps(job, indent=2))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHELASTIC_ERROR_FILE": str(workdir / "error.json")}
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={world}",
        "--max-restarts=0", "-m", "tpplan.check", str(job_path),
    ]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        proc = None
    report = _read_verdict(workdir, tp, dp, proc)
    report.twin = _twin_summary(twin)
    report.loss_parallel = spec.loss_parallel
    report.warnings = list(full_plan.warnings)
    report.seconds = round(time.time() - started, 2)
    return report


def _twin_summary(config) -> dict:
    keys = ("model_type", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
            "head_dim", "num_hidden_layers", "vocab_size")
    return {k: getattr(config, k) for k in keys if getattr(config, k, None) is not None}


def _read_verdict(workdir: Path, tp: int, dp: int, proc) -> CheckReport:
    result = workdir / "result.json"
    if result.is_file():
        data = json.loads(result.read_text())
        return CheckReport(**data)
    failures = sorted(workdir.glob("failure-*.json"))
    if failures:
        failure = json.loads(failures[0].read_text())
        return CheckReport(ok=False, tp=tp, dp=dp, world_size=tp * dp, failure=failure)
    if proc is None:
        reason = "the ranks did not finish in time (a hang in a collective?)"
        tail = ""
    else:
        reason = f"the ranks exited with code {proc.returncode} without a verdict"
        tail = (proc.stderr or "")[-3000:]
    return CheckReport(ok=False, tp=tp, dp=dp, world_size=tp * dp,
                       failure={"message": reason, "stderr_tail": tail})


# ------------------------------------------------------------------------------------------
# Rank side (python -m tpplan.check JOB): run both models, compare, write the verdict
# ------------------------------------------------------------------------------------------


class ModuleTracer:
    """Forward hooks on every module recording, per call, the inputs (shape and which module
    produced each) and the first output.  Registered *after* the plan is applied, so the inputs
    seen are those the module's own code receives (after any prepare_input redistribution)."""

    def __init__(self, model, keep_values: bool):
        import torch

        self.torch = torch
        self.keep_values = keep_values
        self.stack: list[str] = []
        self.producer: dict[int, str] = {}
        self.alive: list = []  # keeps produced tensors alive so their id() is not reused
        self.calls: list[dict] = []
        self.handles = []
        for name, module in model.named_modules():
            if not name:
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
    from .styles import output_layout, returns_local, style_summary

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
            out = output_layout(rule)
            result.update(
                wrong_layout_module=producer,
                message=(
                    f"{producer} has the wrong output layout for what follows: it hands {failing} ({failing_call['type']}) "
                    f"{arg} of shape {got} where the unsharded model has {want}. {producer} is "
                    f"{style_summary(rule)} (output {out}, {'a local tensor' if returns_local(rule) else 'a DTensor'}). "
                    f"The forward then failed in {failing}: {result['error']}"
                ),
                hint=_layout_hint(producer, rule),
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


def _layout_hint(name: str, rule) -> str:
    from .layouts import Layout
    from .styles import output_layout

    if rule.style == "colwise" and output_layout(rule) == Layout(-1):
        return (f"{name}: set output_layouts: replicate (full output on every rank), or shard(1) to feed "
                "sequence_parallel modules")
    return f"{name}: make its output_layouts match what the next module expects (the unsharded shape above)"


def _worker(job_path: str) -> int:
    import copy
    from contextlib import nullcontext

    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel
    from transformers import AutoConfig

    from .apply import apply, build_mesh
    from .models import build_model
    from .resolve import resolve
    from .runtime import causal_lm_loss, clip_grad_norm_

    job = json.loads(Path(job_path).read_text())
    out_dir = Path(job["out_dir"])
    tp, dp = job["tp"], job["dp"]
    import datetime

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))
    rank = dist.get_rank()
    try:
        spec = Spec.model_validate(job["spec"])
        twin_dict = dict(job["twin_config"])
        config = AutoConfig.for_model(twin_dict.pop("model_type"), **twin_dict)
        config._attn_implementation = job["attn_implementation"]
        config.use_cache = False
        torch.use_deterministic_algorithms(True, warn_only=True)
        reference = build_model(config, device="cpu", dtype="float32", seed=job["seed"])
        model = copy.deepcopy(reference)
        plan = resolve(spec, model, tp=tp, seq_length=job["seq_length"])
        mesh = build_mesh("cpu", dp=dp, tp=tp)
        dp_rank = mesh["dp"].get_local_rank()

        seq, b = job["seq_length"], job["batch_per_dp"]
        generator = torch.Generator().manual_seed(job["seed"] + 1)
        tokens = torch.randint(0, config.vocab_size, (dp * b, seq + 1), generator=generator)
        inputs, labels = tokens[:, :-1], tokens[:, 1:]
        position_ids = torch.arange(seq).unsqueeze(0)
        mine = slice(dp_rank * b, (dp_rank + 1) * b)

        # the unsharded model: a traced forward on this rank's slice (for explaining failures), then
        # the real step on the whole global batch
        ref_tracer = ModuleTracer(reference, keep_values=True)
        with torch.no_grad():
            reference(input_ids=inputs[mine], position_ids=position_ids)
        ref_tracer.remove()
        ref_logits = reference(input_ids=inputs, position_ids=position_ids).logits
        ref_loss = causal_lm_loss(ref_logits, labels)
        ref_loss.backward()

        apply(model, plan, mesh)
        tracer = ModuleTracer(model, keep_values=True)
        loss_ctx = loss_parallel if spec.loss_parallel else nullcontext
        try:
            logits = model(input_ids=inputs[mine], position_ids=position_ids).logits
            with loss_ctx():
                loss = causal_lm_loss(logits, labels[mine])
                loss.backward()
        except Exception as exc:  # a plan that breaks the forward: explain it
            failure = _explain_failure(tracer, ref_tracer, plan, exc)
            (out_dir / f"failure-{rank}.json").write_text(json.dumps(failure, indent=2))
            return 1
        tracer.remove()

        def gmax(value: float) -> float:
            t = torch.tensor(float(value))
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            return t.item()

        full_logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
        logit_diff = gmax((full_logits.detach() - ref_logits[mine].detach()).abs().max().item())
        local_loss = loss.full_tensor() if isinstance(loss, DTensor) else loss
        loss_sum = local_loss.detach().clone()
        dist.all_reduce(loss_sum)
        loss_sharded = (loss_sum / (dp * tp)).item()  # every tp rank holds the same dp-local loss

        ref_params = dict(reference.named_parameters())
        names = [name for name, _ in model.named_parameters()]
        extra, missing = sorted(set(names) - set(ref_params)), sorted(set(ref_params) - set(names))
        if extra or missing:
            message = "the sharded model's parameters differ from the unsharded model's: " + "; ".join(
                filter(None, [extra and f"only sharded: {', '.join(extra)}", missing and f"only unsharded: {', '.join(missing)}"])
            )
            hint = "tied weights came apart" if extra else None
            (out_dir / f"failure-{rank}.json").write_text(json.dumps({"message": message, "hint": hint}))
            return 1
        grad_diff, worst_grad = 0.0, None
        for name, param in model.named_parameters():
            grad = param.grad.full_tensor() if isinstance(param.grad, DTensor) else param.grad
            diff = (grad - ref_params[name].grad).abs().max().item()
            if diff > grad_diff:
                grad_diff, worst_grad = diff, name
        grad_diff = gmax(grad_diff)

        max_norm = job["max_grad_norm"] or 1.0
        norm_sharded = clip_grad_norm_(list(model.parameters()), max_norm).item()
        norm_ref = torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm).item()

        hyper = {"lr": 1e-3, "weight_decay": 0.1, "eps": 1e-6}
        torch.optim.AdamW(model.parameters(), **hyper).step()
        torch.optim.AdamW(reference.parameters(), **hyper).step()
        param_diff, worst_param = 0.0, None
        count = 0
        for name, param in model.named_parameters():
            value = param.full_tensor() if isinstance(param, DTensor) else param
            diff = (value.detach() - ref_params[name].detach()).abs().max().item()
            count += 1
            if diff > param_diff:
                param_diff, worst_param = diff, name
        param_diff = gmax(param_diff)

        tol = job["tolerance"]
        ok = (
            logit_diff <= tol
            and abs(loss_sharded - ref_loss.item()) <= tol
            and grad_diff <= tol
            and abs(norm_sharded - norm_ref) <= tol * max(1.0, norm_ref)
            and param_diff <= tol
        )
        report = CheckReport(
            ok=bool(ok), tp=tp, dp=dp, world_size=dp * tp, tolerance=tol,
            max_abs_logit_diff=logit_diff, loss_unsharded=ref_loss.item(), loss_sharded=loss_sharded,
            max_abs_grad_diff=grad_diff, worst_grad=worst_grad,
            grad_norm_unsharded=norm_ref, grad_norm_sharded=norm_sharded,
            max_abs_param_diff_after_step=param_diff, worst_param=worst_param, parameters_compared=count,
        )
        if not ok:
            report.failure = _first_divergence(tracer, ref_tracer, tol)
        if rank == 0:
            data = report.to_dict()
            tmp = out_dir / "result.json.tmp"
            tmp.write_text(json.dumps(data, indent=2))
            os.replace(tmp, out_dir / "result.json")
        dist.barrier()  # every rank done before any tears the process group down
        return 0
    except TpplanError as exc:
        (out_dir / f"failure-{rank}.json").write_text(json.dumps({"message": str(exc)}))
        return 2
    finally:
        dist.destroy_process_group()


def _first_divergence(sharded: ModuleTracer, reference: ModuleTracer, tol: float) -> dict:
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
        if diff > tol:
            return {"message": f"first divergence: {call['module']} output differs from the unsharded model by {diff:.3g}",
                    "failing_module": call["module"]}
    return {"message": "values differ beyond tolerance, but no module output differs on its own"}


if __name__ == "__main__":
    sys.exit(_worker(sys.argv[1]))
