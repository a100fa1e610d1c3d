"""Record every collective a training step issues: which op, on which mesh dim, how many bytes,
in which phase (forward, backward, step) and under which module.

One recorder serves both the simulator (fake process group, fake tensors: nothing is sent) and
real multi-rank runs (gloo), so the two can be compared op for op::

    recorder = CollectiveRecorder(model, mesh_group_labels(mesh))
    with recorder:
        with recorder.region("loss"): ...          # work outside the model's modules
        recorder.phase = "backward"; loss.backward()
    recorder.records  # [Collective(op="all_gather", mesh_dim="tp", bytes=..., module=...), ...]

How it sees the collectives: a ``TorchDispatchMode`` below autograd.  For ops on DTensors it
returns ``NotImplemented`` first (as torch's ``CommDebugMode`` does), so DTensor desugars the op
into local ops and collectives, which then come through the mode one by one.  Both functional
collectives (``_c10d_functional.*``, what DTensor and loss parallel use) and in-place c10d ops
(``c10d.*``, what FSDP2 uses) are counted; ``wait_tensor`` is not.

Which module: in forward, a stack kept by module hooks.  In backward, each autograd node
created during a module's forward is tagged with that module (nodes whose sequence number is at
least the one current when the module's forward began), and the node running a backward
collective (``torch._C._current_autograd_node()``) names it.  FSDP2's all-gathers and
reduce-scatters are issued from its own hooks (and prefetched ahead of their module), so they are
attributed to their FSDP unit instead, by wrapping ``FSDPParamGroup.unshard``, ``wait_for_unshard``
and ``post_backward``.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from tpplan.runtime.precision import dtype_name

# op names used in reports
ALL_GATHER, REDUCE_SCATTER, ALL_REDUCE, ALL_TO_ALL, BROADCAST = (
    "all_gather", "reduce_scatter", "all_reduce", "all_to_all", "broadcast",
)


@dataclass(frozen=True)
class Collective:
    """One collective call as rank 0 issues it."""

    op: str  # all_gather | reduce_scatter | all_reduce | all_to_all | broadcast
    mesh_dim: str  # "tp", "dp", or "group:<name>" for a group outside the mesh
    group_size: int
    phase: str  # forward | backward | step
    module: str  # module (or FSDP unit) FQN; "(root)": the root FSDP unit; "(loss)" etc.: outside the model
    bytes: int  # full size: all-gather output, reduce-scatter input, all-reduce / all-to-all tensor
    dtype: str
    api: str  # "funcol" (DTensor, loss parallel) or "c10d" (FSDP2, plain torch.distributed)

    @property
    def ring_bytes(self) -> int:
        return ring_bytes(self.op, self.group_size, self.bytes)

    def to_dict(self) -> dict:
        return {**asdict(self), "ring_bytes": self.ring_bytes}


def ring_bytes(op: str, group_size: int, full_bytes: int) -> int:
    """Bytes one rank sends for a collective of ``full_bytes`` on a ring of ``group_size`` ranks.

    all-gather, reduce-scatter, all-to-all, broadcast: (n-1)/n x full size; all-reduce: 2(n-1)/n."""
    n = group_size
    if n <= 1:
        return 0
    factor = 2 if op == ALL_REDUCE else 1
    return factor * (n - 1) * full_bytes // n


# ------------------------------------------------------------------------------------------
# Which collective, how big, on which group
# ------------------------------------------------------------------------------------------


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _flat_tensors(value) -> list:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


def _dtype(value) -> str:
    tensors = _flat_tensors(value)
    return dtype_name(tensors[0].dtype) if tensors else ""


# funcol (group given by name): op -> (kind, index of the tensor argument, full size multiplier)
_FUNCOL = {
    "all_gather_into_tensor": (ALL_GATHER, 0, "group_size"),
    "all_gather_into_tensor_out": (ALL_GATHER, 0, "group_size"),
    "all_gather_into_tensor_coalesced": (ALL_GATHER, 0, "group_size"),
    "reduce_scatter_tensor": (REDUCE_SCATTER, 0, None),
    "reduce_scatter_tensor_coalesced": (REDUCE_SCATTER, 0, None),
    "all_reduce": (ALL_REDUCE, 0, None),
    "all_reduce_": (ALL_REDUCE, 0, None),
    "all_reduce_coalesced": (ALL_REDUCE, 0, None),
    "all_reduce_coalesced_": (ALL_REDUCE, 0, None),
    "all_to_all_single": (ALL_TO_ALL, 0, None),
    "broadcast": (BROADCAST, 0, None),
    "broadcast_": (BROADCAST, 0, None),
}
# c10d (group given as a boxed ProcessGroup): op -> (kind, index of the tensor that has the full size)
_C10D = {
    "_allgather_base_": (ALL_GATHER, 0),  # (output, input, pg, ...)
    "allgather_": (ALL_GATHER, 0),  # ([[outputs]], [inputs], pg, ...)
    "allgather_into_tensor_coalesced_": (ALL_GATHER, 0),
    "allgather_coalesced_": (ALL_GATHER, 0),
    "_reduce_scatter_base_": (REDUCE_SCATTER, 1),  # (output, input, pg, ...)
    "reduce_scatter_": (REDUCE_SCATTER, 1),  # ([outputs], [[inputs]], pg, ...)
    "reduce_scatter_tensor_coalesced_": (REDUCE_SCATTER, 1),
    "allreduce_": (ALL_REDUCE, 0),
    "allreduce_coalesced_": (ALL_REDUCE, 0),
    "alltoall_base_": (ALL_TO_ALL, 1),  # (output, input, pg, ...)
    "alltoall_": (ALL_TO_ALL, 1),
    "broadcast_": (BROADCAST, 0),
}


def _group_of(args) -> object | None:
    from torch._C._distributed_c10d import ProcessGroup

    for arg in args:
        if isinstance(arg, torch.ScriptObject):
            try:
                return ProcessGroup.unbox(arg)
            except (RuntimeError, TypeError):
                return None
    return None


def mesh_group_labels(mesh) -> dict[str, str]:
    """{process-group name: mesh dim name} for every dim of ``mesh`` (e.g. {"3": "tp", "2": "dp"})."""
    labels = {}
    for i, name in enumerate(mesh.mesh_dim_names or ()):
        group = mesh.get_group(i)
        labels[group.group_name] = name
    # dims flattened from it (dp x ep: "dp_ep", where FSDP shards what expert parallel replicates)
    root = mesh._get_root_mesh() if hasattr(mesh, "_get_root_mesh") else mesh
    for name, flat in getattr(root, "_flatten_mapping", {}).items():
        labels.setdefault(flat.get_group().group_name, name)
    return labels


# ------------------------------------------------------------------------------------------
# The recorder
# ------------------------------------------------------------------------------------------


class CollectiveRecorder(TorchDispatchMode):
    """Records collectives issued while active (see the module docstring).  ``phase`` is set by
    the caller ("forward", "backward", "step"); ``region(label)`` names work outside the model."""

    def __init__(self, model=None, group_labels: dict[str, str] | None = None):
        super().__init__()
        self.model = model
        self.group_labels = dict(group_labels or {})
        self.records: list[Collective] = []
        self.phase = "forward"
        self._outside = "(outside)"
        self._names: dict[int, str] = {}
        self._stack: list[tuple[str, int, int | None]] = []  # (module, sequence nr at entry, autograd node)
        self._node_module: dict[int, str] = {}
        self._fsdp_unit: list[str] = []
        self.failed_in: str | None = None
        self._exit = contextlib.ExitStack()
        if model is not None:
            self._names = {id(m): name for name, m in model.named_modules()}

    # -- what the recorder attributes to --------------------------------------------------

    @property
    def current_module(self) -> str:
        """The module the current op belongs to: FSDP unit, else forward stack, else backward node."""
        if self._fsdp_unit:
            return self._fsdp_unit[-1]
        self._drop_stale()
        if self._stack:
            return self._stack[-1][0]
        node = torch._C._current_autograd_node()
        if node is not None:
            name = self._node_module.get(_seq(node))
            if name is not None:
                return name
        return self._outside

    @property
    def in_fsdp(self) -> bool:
        """Whether FSDP2 is gathering or reducing a unit's parameters right now (its buffers)."""
        return bool(self._fsdp_unit)

    @contextlib.contextmanager
    def region(self, label: str, *, module: bool = False) -> Iterator[None]:
        """Attribute collectives outside any module (and backward nodes made here) to ``(label)``,
        or to the module named ``label`` with ``module=True``."""
        before = self._outside
        self._outside = label if module else f"({label})"
        try:
            yield
        finally:
            self._outside = before

    @contextlib.contextmanager
    def step_phase(self, name: str) -> Iterator[None]:
        """The phase callback of the training step (``step.forward_backward`` / ``optimizer_step``):
        in "forward" and "backward", work outside the model's modules is the loss's; "update" is
        recorded as phase "step", the pending tp sums of gradients reduced first one parameter at a
        time (so each all-reduce counts for its module), then the gradient norm's all-reduces."""
        if name == "update":
            self.phase = "step"
            _reduce_partial_grads(self.model, self)
            with self.region("clip_grad_norm"):
                yield
        else:
            self.phase = name
            with self.region("loss"):
                yield

    # -- dispatch -------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        from torch.distributed.tensor import DTensor

        if any(t is DTensor or (isinstance(t, type) and issubclass(t, DTensor)) for t in types):
            return NotImplemented  # let DTensor desugar into local ops and collectives first
        out = func(*args, **kwargs)
        namespace = func.namespace
        if namespace in ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd"):
            self._record_funcol(func, args, kwargs)
        elif namespace == "c10d":
            self._record_c10d(func, args)
        elif namespace == "_dtensor" and func._opname == "shard_dim_alltoall":
            self._record_dtensor_alltoall(args)
        return out

    def _record_dtensor_alltoall(self, args) -> None:
        """DTensor's Shard(i) -> Shard(j) on CUDA meshes: (input, gather_dim, shard_dim, group)."""
        tensor, group = args[0], args[3] if len(args) > 3 else None
        if isinstance(group, str):
            name, size = group, _group_size(group)
        else:
            pg = _group_of([group]) if isinstance(group, torch.ScriptObject) else group
            name, size = getattr(pg, "group_name", None), pg.size() if pg is not None else 1
        self._add(ALL_TO_ALL, name, size, _nbytes(tensor), _dtype(tensor), "funcol")

    def _record_funcol(self, func, args, kwargs) -> None:
        name = func._opname
        spec = _FUNCOL.get(name)
        if spec is None:
            return
        kind, index, multiplier = spec
        tensor = args[index] if len(args) > index else None
        full = sum(_nbytes(t) for t in _flat_tensors(tensor))
        group_name = kwargs.get("group_name")
        if group_name is None:
            group_name = next((a for a in reversed(args) if isinstance(a, str)), None)
        size = None
        if multiplier == "group_size":
            size = next((a for a in args[1:] if isinstance(a, int) and not isinstance(a, bool)), None)
            full *= size or 1
        if size is None:
            size = _group_size(group_name)
        self._add(kind, group_name, size, full, _dtype(tensor), "funcol")

    def _record_c10d(self, func, args) -> None:
        spec = _C10D.get(func._opname)
        if spec is None:
            return
        kind, index = spec
        group = _group_of(args)
        size = group.size() if group is not None else 1
        tensor = args[index] if len(args) > index else None
        full = sum(_nbytes(t) for t in _flat_tensors(tensor))
        if func._opname in ("allgather_", "allgather_coalesced_") and index == 0:
            full = sum(_nbytes(t) for t in _flat_tensors(args[1])) * size
        self._add(kind, group.group_name if group is not None else None, size, full, _dtype(tensor), "c10d")

    def _add(self, kind, group_name, size, full, dtype, api) -> None:
        label = self.group_labels.get(group_name) if group_name is not None else None
        if label is None:
            label = f"group:{group_name}"
        self.records.append(
            Collective(op=kind, mesh_dim=label, group_size=int(size or 1), phase=self.phase,
                       module=self.current_module, bytes=int(full), dtype=dtype, api=api)
        )

    # -- hooks ------------------------------------------------------------------------------

    def _drop_stale(self) -> None:
        """Activation checkpointing recomputes a block's forward inside backward, and stops as soon
        as it has what backward needs: the modules it entered never exit.  Their entries, made
        under another autograd node than the one running now, are dropped."""
        node = torch._C._current_autograd_node()
        running = _seq(node) if node is not None else None
        while self._stack and self._stack[-1][2] != running:
            self._stack.pop()

    def _pre(self, module, args):
        name = self._names.get(id(module))
        if name is not None:
            self._drop_stale()
            node = torch._C._current_autograd_node()
            self._stack.append((name, torch._C._autograd._get_sequence_nr(), _seq(node) if node is not None else None))

    def _post(self, module, args, output):
        name = self._names.get(id(module))
        if name is None or not self._stack:
            return
        top, start, _ = self._stack.pop()
        if top != name:  # unbalanced (an exception inside a module): drop what is above
            while self._stack and self._stack[-1][0] != name:
                self._stack.pop()
            if self._stack:
                self._stack.pop()
        self._tag_nodes(output, start, name)

    def _tag_nodes(self, output, start: int, name: str) -> None:
        """Tag the autograd nodes made since ``start`` (this module's forward) with ``name``;
        nodes already tagged belong to a submodule (its post-hook ran first)."""
        todo = [t.grad_fn for t in _output_tensors(output) if t.grad_fn is not None]
        seen = set()
        while todo:
            node = todo.pop()
            if node is None:
                continue
            seq = _seq(node)
            if seq is None or seq < start or seq in seen:
                continue
            seen.add(seq)
            self._node_module.setdefault(seq, name)
            todo.extend(fn for fn, _ in node.next_functions)

    @contextlib.contextmanager
    def _fsdp_attribution(self) -> Iterator[None]:
        try:
            from torch.distributed.fsdp._fully_shard._fsdp_param_group import FSDPParamGroup
        except ImportError:  # pragma: no cover - another torch layout: fall back to module hooks
            yield
            return
        recorder = self
        originals = {name: getattr(FSDPParamGroup, name) for name in ("unshard", "wait_for_unshard", "post_backward")
                     if hasattr(FSDPParamGroup, name)}

        def wrap(original):
            def wrapper(group, *args, **kwargs):
                recorder._fsdp_unit.append(group._module_fqn or "(root)")
                try:
                    return original(group, *args, **kwargs)
                finally:
                    recorder._fsdp_unit.pop()

            return wrapper

        for name, original in originals.items():
            setattr(FSDPParamGroup, name, wrap(original))
        try:
            yield
        finally:
            for name, original in originals.items():
                setattr(FSDPParamGroup, name, original)

    def __enter__(self):
        self._exit = contextlib.ExitStack()
        if self.model is not None:
            # per-module hooks, not global ones: the pre-hook goes first and the post-hook last, so
            # what the module's own hooks do (a ParallelStyle's input/output redistribution, FSDP's
            # unshard) counts as the module's
            for module in self.model.modules():
                if id(module) in self._names:
                    self._exit.callback(module.register_forward_pre_hook(self._pre, prepend=True).remove)
                    self._exit.callback(module.register_forward_hook(self._post).remove)
        self._exit.enter_context(self._fsdp_attribution())
        return super().__enter__()

    def __exit__(self, *exc):
        if exc and exc[0] is not None:
            self.failed_in = self.current_module  # before the stack is cleared: where it broke
        try:
            return super().__exit__(*exc)
        finally:
            self._exit.close()
            self._stack.clear()


def _seq(node) -> int | None:
    try:
        seq = node._sequence_nr()
    except (AttributeError, RuntimeError):
        return None
    return None if seq >= 2**63 else seq  # AccumulateGrad has UINT64_MAX


def _output_tensors(output) -> list:
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, dict):
        return [t for v in output.values() for t in _output_tensors(v)]
    if isinstance(output, (list, tuple)):
        return [t for v in output for t in _output_tensors(v)]
    return []


def _group_size(group_name: str | None) -> int:
    if group_name is None:
        return 1
    try:
        from torch.distributed.distributed_c10d import _resolve_process_group

        return _resolve_process_group(group_name).size()
    except (ImportError, RuntimeError, ValueError, KeyError):
        return 1


# ------------------------------------------------------------------------------------------
# One training step, as the generated script and `check` run it, under a recorder
# ------------------------------------------------------------------------------------------


def recorded_step(model, recorder: CollectiveRecorder, micro_batches, position_ids, *, loss_parallel: bool,
                  max_grad_norm: float | None, optimizer, phase=None, positions: str | None = "position_ids"):
    """One training step exactly as the generated script runs it (``step.forward_backward``, then
    ``step.optimizer_step``), with every collective recorded and labelled by phase.  ``phase``
    (default ``recorder.step_phase``) is the step's phase callback; ``positions`` the keyword the
    model takes position ids by (None: not passed).  Returns the loss."""
    from tpplan.runtime.step import forward_backward, optimizer_step

    phase = phase or recorder.step_phase
    with recorder:
        loss = forward_backward(model, micro_batches, position_ids, loss_parallel=loss_parallel,
                                positions=positions, phase=phase)
        optimizer_step(model, optimizer, max_grad_norm=max_grad_norm, phase=phase)
    return loss


def _reduce_partial_grads(model, recorder: CollectiveRecorder) -> None:
    """What ``runtime.clip_grad_norm_`` does first -- all-reduce each gradient still pending a sum
    over tp (a sequence-parallel norm's weight) -- done here one parameter at a time, so that each
    all-reduce is recorded under the module that owns the parameter (and so per block).  The
    collectives are the same; clip_grad_norm_ then finds nothing pending."""
    from torch.distributed.tensor import DTensor, Replicate

    for name, param in model.named_parameters():
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            with recorder.region(name.rpartition(".")[0] or name, module=True):
                param.grad = grad.redistribute(
                    grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements]
                )
