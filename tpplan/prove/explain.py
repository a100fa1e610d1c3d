"""Why the sharded step differs from the unsharded one: the explanations in a failed verdict.

``ModuleTracer`` records, per module call, the shapes (and producers) of the inputs and the output;
``explain_failure`` names, from the two traces, the module whose output layout broke the sharded forward,
and ``first_divergence`` the first module whose output differs.  Where logits and loss agree but
gradients do not, ``unreduced_gradients`` finds the replicated parameters whose gradient is right only
once summed over tp (``unreduced_failure`` says so); ``replay_step`` replays the unsharded AdamW step on
the sharded gradients, to tell a gradient that differs from an update that does.
"""

from __future__ import annotations

from typing import Any

from tpplan.prove.verdict import Tolerance


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


def explain_failure(sharded: ModuleTracer, reference: ModuleTracer, plan, error: BaseException) -> dict:
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


def unreduced_failure(unreduced: list) -> dict:
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


def replay_step(weights: dict, states: dict, grads: dict, hyper: dict, max_grad_norm) -> dict:
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


def unreduced_gradients(model, ref_grads: dict, grad_diffs: dict, mesh, allowed) -> list[tuple]:
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


def first_divergence(sharded: ModuleTracer, reference: ModuleTracer, tol: Tolerance) -> dict:
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
