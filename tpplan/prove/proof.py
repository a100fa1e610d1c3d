"""One rank's side of ``tpplan check``'s proof: the twin trained unsharded and sharded, compared.

``Proof`` builds the twin (unsharded, sharded by the plan, and in float64 to measure its own rounding), runs
``STEPS`` training steps of each side on the same batches and compares logits, loss, every gradient, the
gradient norm, every weight and AdamW's state after each, every rank in the same order; the first thing
that differs becomes the failure, explained (``explain.py``), and ``Proof.report`` the verdict.
"""

from __future__ import annotations

from tpplan.prove.explain import (
    ModuleTracer,
    explain_failure,
    first_divergence,
    replay_step,
    unreduced_failure,
    unreduced_gradients,
)
from tpplan.prove.progress import Progress, crash_failure, error_site, error_text
from tpplan.prove.routing import idle_experts, steer_routing
from tpplan.prove.shards import nothing_sharded_failure, parallel_gaps, shard_report
from tpplan.prove.verdict import OPTIMIZER, STEPS, WEIGHT_ULPS, CheckReport, Tolerance
from tpplan.spec.schema import Spec


class Proof:
    """One rank's side of the proof: the twin unsharded (``reference``) and sharded by the plan
    (``model``), their steps on the same batches, and every comparison, recorded per quantity and per
    parameter; ``exact``, the unsharded twin in float64, measures how far float32 rounding alone puts
    each tensor of the unsharded one.  Every rank compares whole tensors (gathered), in the same order; a
    verdict is taken over all ranks at once, so every rank stops at the same place."""

    def __init__(self, job: dict, progress: Progress):
        import copy

        import torch

        from tpplan.model.model_source import source_from_job
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
        # at tp = ep = 1 there is nothing to shard over (a data-parallel check: FSDP and accumulation proven)
        parallel = self.tp * self.ep > 1
        if failure is None and parallel and not self.job.get("replicated_blocks") and not scope["sharded"]:
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
