"""Emulation: every tp rank's share of a group computed on the twin, summed over the ranks, compared with
the unsharded output.  The one test that finds what no list of names does: fused projections split at global
offsets, biases built for all heads, head counts read from module attributes."""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Any

from .common import features, module_names, one_line
from .groups import Form, FoundGroup
from .twin import Traced

EMULATE_TP = 2


@dataclass
class Trial:
    """How one group is cut for the emulation."""

    group: FoundGroup
    block: str  # absolute block name
    form: Form  # SHARDED, PACKED or GATHERED (an expert bank: SHARDED, each rank a slice of every expert)
    fixups: list[tuple[str, str]]


class Emulator:
    """Runs the twin once unsharded (recording every Linear's output), then once per tp rank with the
    trial groups cut to that rank's share.  Each rowwise output is replaced by the unsharded one as it
    is produced (so one group's partial sum never disturbs the next), and its partial value kept."""

    def __init__(self, traced: Traced, tp: int = EMULATE_TP):
        import torch

        self.torch = torch
        self.traced = traced
        self.model = traced.model
        self.tp = tp
        self.modules = module_names(self.model)
        self.reference: dict[str, list] = {}
        self.ref_inputs: dict[str, list] = {}
        hooks = []
        for name, module in self.modules.items():
            hooks.append(module.register_forward_hook(self._record(name, self.reference, self.ref_inputs),
                                                      with_kwargs=True))
        try:
            with torch.no_grad():
                self.model(**traced.inputs)
        finally:
            for h in hooks:
                h.remove()

    def _record(self, name, outputs, inputs):
        def hook(module, args, kwargs, output):
            first = output[0] if isinstance(output, (tuple, list)) and output else output
            outputs.setdefault(name, []).append(first.detach().clone() if isinstance(first, self.torch.Tensor) else None)
            inputs.setdefault(name, []).append(tuple(a.shape for a in args if isinstance(a, self.torch.Tensor))
                                               + tuple(v.shape for v in kwargs.values() if isinstance(v, self.torch.Tensor)))
        return hook

    def run(self, trials: list[Trial]) -> tuple[dict[int, str | None], dict[int, dict[str, int]]]:
        """Per trial (by position): None when the ranks' shares sum to the unsharded output, else why not;
        and per trial the modules that saw a sharded input (module -> the dim the emulation found cut)."""
        torch = self.torch
        partial: dict[str, list] = {}
        seen_inputs: dict[str, list] = {}
        results: dict[int, str | None] = {}
        rowwise = {f"{t.block}.{t.group.rowwise}": i for i, t in enumerate(trials)}
        for rank in range(self.tp):
            calls: dict[str, int] = {}
            with contextlib.ExitStack() as stack:
                for trial in trials:
                    stack.enter_context(self._cut(trial, rank))
                hooks = []
                for name, module in self.modules.items():
                    hooks.append(module.register_forward_hook(self._teacher(name, rowwise, calls, partial, rank,
                                                                            seen_inputs), with_kwargs=True))
                stack.callback(lambda hs=hooks: [h.remove() for h in hs])
                try:
                    with torch.no_grad():
                        self.model(**self.traced.inputs)
                except Exception as exc:  # noqa: BLE001 - the cut model failing is the answer
                    why = f"a rank's share does not run: {one_line(exc)}"
                    return {i: why for i in range(len(trials))}, {i: {} for i in range(len(trials))}
        sharded: dict[int, dict[str, int]] = {i: {} for i in range(len(trials))}
        for name, index in rowwise.items():
            ref = self.reference.get(name) or []
            got = partial.get(name) or []
            if not ref or len(got) != len(ref) * self.tp:
                results[index] = f"{name} ran {len(got)} times on {self.tp} ranks, {len(ref)} times unsharded"
                continue
            worst = 0.0
            for k, want in enumerate(ref):
                total = sum(got[r * len(ref) + k] for r in range(self.tp))
                if total.shape != want.shape:
                    worst = float("inf")
                    break
                scale = max(1.0, want.abs().max().item())
                worst = max(worst, (total - want).abs().max().item() / scale)
            results[index] = None if worst <= 1e-4 else (
                f"the ranks' partial outputs of {name} do not sum to the unsharded output (relative difference {worst:.2g})")
        for i, trial in enumerate(trials):
            prefix = trial.block + "."
            for name, shapes in seen_inputs.items():
                if not name.startswith(prefix):
                    continue
                dim = _cut_dim(self.ref_inputs.get(name, [()])[0], shapes[0], self.tp)
                if dim is not None:
                    sharded[i][name[len(prefix):]] = dim
        return results, sharded

    def _teacher(self, name, rowwise, calls, partial, rank, seen_inputs):
        def hook(module, args, kwargs, output):
            k = calls.get(name, 0)
            calls[name] = k + 1
            if rank == 0 and k == 0:
                seen_inputs[name] = [tuple(a.shape for a in args if isinstance(a, self.torch.Tensor))
                                     + tuple(v.shape for v in kwargs.values() if isinstance(v, self.torch.Tensor))]
            if name in rowwise:
                partial.setdefault(name, []).append(output.detach().clone())
                ref = self.reference.get(name) or []
                if k < len(ref):
                    return ref[k].clone()
            return None

        return hook

    @contextlib.contextmanager
    def _cut(self, trial: Trial, rank: int):
        from tpplan.spec.rule_base import is_conv1d

        torch = self.torch
        tp = self.tp
        saved: list[tuple[Any, str, Any]] = []

        def swap(module, attr, value):
            saved.append((module, attr, getattr(module, attr)))
            setattr(module, attr, value)

        prefix = trial.block + "."
        try:
            if trial.form.cuts_activations:
                for rel in trial.group.colwise:
                    linear = self.modules[prefix + rel]
                    conv1d = is_conv1d(linear)  # weight [in, out]: the output features are dim 1
                    parts = trial.group.parts.get(rel) if trial.form is Form.PACKED else None
                    rows = _share(features(linear)[1], tp, rank, parts or 1)
                    weight = linear.weight.detach()
                    swap(linear, "weight", torch.nn.Parameter((weight[:, rows] if conv1d else weight[rows]).clone()))
                    if linear.bias is not None:
                        swap(linear, "bias", torch.nn.Parameter(linear.bias.detach()[rows].clone()))
                    swap(linear, "nf" if conv1d else "out_features",
                         rows.stop - rows.start if isinstance(rows, slice) else len(rows))
            if trial.form.cuts_activations:
                for owner, names in trial.group.local_params.items():  # per-head parameters: this rank's heads
                    module = self.modules[prefix + owner]
                    for name in names:
                        param = module._parameters[name].detach()
                        if param.ndim and param.shape[0] % tp == 0:  # else left whole: the share fails to run
                            rows = _share(param.shape[0], tp, rank)
                            swap(module, name, torch.nn.Parameter(param[rows].clone()))
            handle = None
            if trial.group.experts:  # each rank a slice of every expert's intermediate dim
                from tpplan.runtime.parallel_styles import expert_weight_dims

                experts = self.modules[prefix + trial.group.rowwise]
                for name, (dim, packed) in expert_weight_dims(experts).items():
                    param = experts._parameters[name].detach()
                    if dim is None:  # added after the split matmul (down_proj's bias): once in the sum
                        value = param / tp
                    else:
                        index = _share(param.shape[dim], tp, rank, 2 if packed else 1)
                        value = param.index_select(dim, torch.arange(param.shape[dim])[index])
                    swap(experts, name, torch.nn.Parameter(value.clone()))
            else:
                row = self.modules[prefix + trial.group.rowwise]
                conv1d = is_conv1d(row)  # weight [in, out]: the input features are dim 0
                cols = _share(features(row)[0], tp, rank)
                weight = row.weight.detach()
                swap(row, "weight", torch.nn.Parameter((weight[cols] if conv1d else weight[:, cols]).clone()))
                if row.bias is not None:
                    swap(row, "bias", torch.nn.Parameter(row.bias.detach() / tp))
                swap(row, "nx" if conv1d else "in_features", cols.stop - cols.start)
            if trial.form is Form.GATHERED:  # the rowwise takes the full input and keeps its own slice
                handle = row.register_forward_pre_hook(lambda m, args: (args[0][..., cols], *args[1:]))
            for rel, attr in trial.fixups:
                module = self.modules[prefix + rel] if rel else self.modules[trial.block]
                *path, last = attr.split(".")
                for step in path:  # a shared object on the way (config.num_attention_heads): a copy of it
                    inner = copy.copy(getattr(module, step))
                    swap(module, step, inner)
                    module = inner
                swap(module, last, getattr(module, last) // tp)
            yield
        finally:
            if handle is not None:
                handle.remove()
            for module, attr, value in reversed(saved):
                setattr(module, attr, value)


def _share(size: int, tp: int, rank: int, parts: int = 1):
    """The rows rank ``rank`` holds: a contiguous 1/tp (``parts`` = 1), or 1/tp of each of ``parts`` parts."""
    import torch

    if parts == 1:
        step = size // tp
        return slice(rank * step, (rank + 1) * step)
    part = size // parts
    step = part // tp
    return torch.cat([torch.arange(p * part + rank * step, p * part + (rank + 1) * step) for p in range(parts)])


def _cut_dim(ref_shapes, shapes, tp: int) -> int | None:
    """The dim of the first input that is 1/tp of the unsharded one, if exactly one is."""
    if not ref_shapes or not shapes or len(ref_shapes[0]) != len(shapes[0]):
        return None
    dims = [d for d, (a, b) in enumerate(zip(ref_shapes[0], shapes[0], strict=True)) if a != b]
    if len(dims) == 1 and shapes[0][dims[0]] * tp == ref_shapes[0][dims[0]]:
        return dims[0]
    return None
