"""Count the work of one simulated training step, op by op: the FLOPs of every matmul and attention
kernel and the bytes every other op reads and writes, by module and phase.

``StepCounter`` is the ``observe`` argument of ``simulate.simulate``: a dispatch mode of its own,
entered under the simulator's collective recorder, sees every local op the fake step runs (DTensor
ops are let through first, as the recorder does, so what is counted is one rank's share) and asks
the recorder which module and phase it belongs to.  Formulas are torch's own
(``torch.utils.flop_counter``'s registry); the CPU flash-attention kernel the fake step dispatches to
is counted with torch's formulas for the GPU ones, halved when causal (a causal flash kernel skips
the blocks above the diagonal).  Ops that only view their input move no bytes; collectives are the
recorder's (their time is the cost model's), not counted here, nor is the update (gradient clipping,
AdamW): its bytes are proportional to the parameters, and the cost model counts them so.

``StepWork`` is the result, scaled to every block of the model the way the simulator scales its
collectives and activations: the simulated blocks as measured, plus the middle block of each kind
(plain or recomputed) for every block of that kind not simulated.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

# op classes, each with its own efficiency in the cost model
MATMUL, MATMUL_F8, ATTENTION, MEMORY = "matmul", "matmul_float8", "attention", "memory"
FSDP_COPIES = "fsdp_copies"  # memory-bound ops FSDP2 runs (copy-in/out, casts): by their unit, never compiled
_COLLECTIVE_NAMESPACES = ("_c10d_functional", "c10d_functional", "_c10d_functional_autograd", "c10d",
                          "_dtensor")
_ALLOCATIONS = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided")


@dataclass
class StepWork:
    """One rank's work in one micro-batch: FLOPs by class (matmul, the float8-eligible matmuls of the
    blocks, attention) over forward and backward (recomputation included) and over the forward alone,
    and the bytes memory-bound ops move: ``block_bytes`` inside the transformer blocks (what
    torch.compile fuses, each block being compiled on its own), ``other_bytes`` outside them (the
    embedding, loss, final norm) and FSDP's own copies (never compiled)."""

    flops: dict = field(default_factory=dict)  # class -> FLOPs, forward + backward
    forward_flops: dict = field(default_factory=dict)  # class -> FLOPs of the forward phase
    block_bytes: float = 0
    other_bytes: float = 0

    @property
    def memory_bytes(self) -> float:
        return self.block_bytes + self.other_bytes

    @property
    def model_flops(self) -> float:
        """Forward FLOPs x 3 (forward, and a backward of twice its work): the step without
        recomputation, the work MFU is measured against."""
        return 3.0 * sum(self.forward_flops.values())

    def scaled(self, factor: float) -> StepWork:
        return StepWork({k: v * factor for k, v in self.flops.items()},
                        {k: v * factor for k, v in self.forward_flops.items()},
                        self.block_bytes * factor, self.other_bytes * factor)

    def plus(self, other: StepWork) -> StepWork:
        def add(a: dict, b: dict) -> dict:
            return {k: a.get(k, 0) + b.get(k, 0) for k in set(a) | set(b)}

        return StepWork(add(self.flops, other.flops), add(self.forward_flops, other.forward_flops),
                        self.block_bytes + other.block_bytes, self.other_bytes + other.other_bytes)

    def to_dict(self) -> dict:
        return {"flops": dict(sorted(self.flops.items())),
                "forward_flops": dict(sorted(self.forward_flops.items())),
                "block_bytes": self.block_bytes, "other_bytes": self.other_bytes}


class StepCounter:
    """``simulate(..., observe=StepCounter())``; then ``work(simulation)``."""

    def __init__(self):
        self.cells: dict[tuple[str, str, str], list] = {}  # (module, phase, class) -> [flops, bytes]
        self.model = None

    def __call__(self, recorder):
        self.model = recorder.model
        self.linears = _float8_linears(recorder.model)
        return _counting(self, recorder)

    def add(self, module: str, phase: str, kind: str, flops: float, nbytes: int) -> None:
        cell = self.cells.setdefault((module, phase, kind), [0.0, 0])
        cell[0] += flops
        cell[1] += nbytes

    def work(self, simulation) -> StepWork:
        """The step's work for every block: see the module docstring (the simulator's own
        representatives, ``communication.layer_kinds``, stand for the blocks not simulated)."""
        from tpplan.runtime.step import block_names, checkpointed_blocks

        data = simulation.data
        blocks = block_names(self.model, simulation.plan.blocks) if self.model is not None else []
        per_block: dict[str, StepWork] = {}
        outside = StepWork()
        for (module, phase, kind), (flops, nbytes) in self.cells.items():
            block = next((b for b in blocks if module == b or module.startswith(b + ".")), None)
            if kind == MATMUL and module in self.linears and block is not None:
                kind = MATMUL_F8
            cell = _cell(kind, phase, flops, nbytes, compiled=block is not None and kind == MEMORY)
            if block is None:
                outside = outside.plus(cell)
            else:
                per_block[block] = per_block.get(block, StepWork()).plus(cell)
        total = outside
        for work in per_block.values():
            total = total.plus(work)
        layers, simulated = data["layers"], data["simulated_layers"]
        recomputed = set(checkpointed_blocks(layers, data["activation_checkpointing"]))
        kinds = ["checkpointed" if i in recomputed else "plain" for i in range(layers)]
        for entry in data["communication"]["layer_kinds"]:
            missing = kinds.count(entry["kind"]) - kinds[:simulated].count(entry["kind"])
            if missing and entry["representative"] in per_block:
                total = total.plus(per_block[entry["representative"]].scaled(missing))
        self.model = None  # the fake model is not needed any more
        return total


def _cell(kind: str, phase: str, flops: float, nbytes: int, *, compiled: bool) -> StepWork:
    if kind in (MEMORY, FSDP_COPIES):
        return StepWork(block_bytes=nbytes) if compiled else StepWork(other_bytes=nbytes)
    return StepWork({kind: flops}, {kind: flops} if phase == "forward" else {})


def _float8_linears(model) -> set[str]:
    """The Linear layers ``step.convert_to_float8`` converts (sizes multiples of 16); only those inside
    a block count as float8 work (``StepCounter.work`` checks that)."""
    import torch

    return {name for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and m.in_features % 16 == 0 and m.out_features % 16 == 0}


@contextlib.contextmanager
def _counting(counter: StepCounter, recorder) -> Iterator[None]:
    import torch
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import TorchDispatchMode

    inside_propagation = [0]

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            if isinstance(func, torch._ops.HigherOrderOperator):
                return func(*args, **kwargs)
            if any(isinstance(t, type) and issubclass(t, DTensor) for t in types):
                return NotImplemented  # DTensor runs its local ops through this mode
            out = func(*args, **kwargs)
            # the update (gradient clipping; the simulator runs no optimizer) is the cost model's arithmetic
            skip = inside_propagation[0] or recorder.phase == "step"
            counted = None if skip else op_work(func, args, kwargs, out)
            if counted is not None:
                kind, flops_, nbytes = counted
                counter.add(recorder.current_module, recorder.phase,
                            FSDP_COPIES if recorder.in_fsdp and kind == MEMORY else kind, flops_, nbytes)
            return out

    with Mode(), _shape_propagation_marked(inside_propagation):
        yield


@contextlib.contextmanager
def _shape_propagation_marked(depth: list) -> Iterator[None]:
    """DTensor infers an op's output shape by running it on fake tensors of the *global* shapes
    (``ShardingPropagator._propagate_tensor_meta_non_cached``, once per op signature); those runs pass
    through the dispatch modes like the real local ops but are no work of the step.  While one runs,
    ``depth[0]`` is above zero."""
    from torch.distributed.tensor._sharding_prop import ShardingPropagator

    original = ShardingPropagator.__dict__.get("_propagate_tensor_meta_non_cached")
    if original is None:  # another torch layout: counted as it comes
        yield
        return

    def marked(self, op_schema):
        depth[0] += 1
        try:
            return original(self, op_schema)
        finally:
            depth[0] -= 1

    ShardingPropagator._propagate_tensor_meta_non_cached = marked
    try:
        yield
    finally:
        ShardingPropagator._propagate_tensor_meta_non_cached = original


def op_work(func, args, kwargs, out) -> tuple[str, float, int] | None:
    """(class, FLOPs, bytes) of one aten op on local tensors, or None for a collective."""
    if func.namespace in _COLLECTIVE_NAMESPACES:
        return None
    name = func._opname
    if name.startswith(("_scaled_dot_product", "_flash_attention", "_efficient_attention")):
        return ATTENTION, _attention_flops(func, args, kwargs, out), 0
    formula = _registry().get(func._overloadpacket)
    if formula is not None:
        return MATMUL, float(formula(*args, **kwargs, out_val=out)), 0
    if name == "_grouped_mm":  # MoE experts: not in torch's registry
        return MATMUL, _grouped_mm_flops(args[0], out), 0
    if name in _ALLOCATIONS or _is_view(func) or not _nbytes(out):
        return MEMORY, 0.0, 0  # no data moves: an allocation, a view, a query (prim.device, sym_size)
    return MEMORY, 0.0, _nbytes(args) + _nbytes(list(kwargs.values())) + _nbytes(out)


def _registry() -> dict:
    from torch.utils.flop_counter import flop_registry

    return flop_registry


def _attention_flops(func, args, kwargs, out) -> float:
    """torch's formulas (query, key, value shapes; the backward's 2.5x), on the layouts of the
    kernel at hand, halved when the kernel is causal."""
    from torch.utils.flop_counter import sdpa_backward_flop_count, sdpa_flop_count

    formula = _registry().get(func._overloadpacket)
    backward = func._opname.endswith("_backward")
    if formula is not None:
        flops = float(formula(*args, **kwargs, out_val=out))
        causal = kwargs.get("is_causal", _positional_causal(func, args))
        return flops / 2 if causal else flops
    # _scaled_dot_product_flash_attention_for_cpu(query, key, value, dropout_p, is_causal, ...) and its
    # backward (grad_out, query, key, value, out, logsumexp, dropout_p, is_causal, ...): [b, h, s, d]
    if backward:
        grad, query, key, value = (a.shape for a in args[:4])
        flops = sdpa_backward_flop_count(grad, query, key, value)
        causal = args[7] if len(args) > 7 else kwargs.get("is_causal", False)
    else:
        query, key, value = (a.shape for a in args[:3])
        flops = sdpa_flop_count(query, key, value)
        causal = args[4] if len(args) > 4 else kwargs.get("is_causal", False)
    return float(flops) / 2 if causal else float(flops)


def _grouped_mm_flops(a, out) -> float:
    """``_grouped_mm(a, b, offs)``: each group (expert) multiplies its rows of ``a`` by its matrix.  The
    contraction runs over ``a``'s last dim; when it is the grouped one (``a`` [K, M] by ``b`` [M, N]
    into [E, K, N], the weight gradient) each of the M rows meets one group's K x N."""
    per_output = a.shape[-1]
    numel = out.numel()
    if out.dim() == 3 and a.dim() == 2:
        numel //= out.shape[0]
    return 2.0 * numel * per_output


def _positional_causal(func, args) -> bool:
    for index, argument in enumerate(func._schema.arguments):
        if argument.name == "is_causal" and index < len(args):
            return bool(args[index])
    return False


def _is_view(func) -> bool:
    """An op whose outputs alias its inputs without writing them (view, reshape, transpose, ...)."""
    returns = func._schema.returns
    return bool(returns) and all(r.alias_info is not None and not r.alias_info.is_write for r in returns)


def _nbytes(value) -> int:
    import torch

    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(_nbytes(v) for v in value)
    return 0
