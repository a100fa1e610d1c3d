"""One training step on fake tensors: every collective recorded, the activations kept for backward measured.

``simulate_step`` shards the (cut-down) fake model exactly as training does (``plan.apply.parallelize``:
TP with DTensor, then FSDP2 over dp) and runs the training step's own ``recorded_step`` -- forward,
loss, backward, gradient clipping; no optimizer (``_NoOptimizer``) -- under
``comm.CollectiveRecorder``.  ``_ActivationMeter`` measures what the first micro-batch's forward
leaves alive for backward, by module; ``Step`` is what the step found.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass

from tpplan.core.errors import TpplanError
from tpplan.simulate.blocks import fake_model
from tpplan.simulate.world import SimulationError
from tpplan.spec.schema import Spec, training_precision


@dataclass
class Step:
    records: list  # comm.Collective
    saved: dict  # module -> activation bytes alive at the end of a micro-batch's forward
    logits_bytes: int
    blocks: list[str]


class _ActivationMeter:
    """What a forward leaves for backward, measured the way memory is actually held: every storage
    an op creates during the forward (local shards under DTensor), by the module that created it;
    at the end of the forward, those still alive, except parameters, are the activations.

    This sees whatever keeps a tensor alive -- autograd's saved tensors, the inputs activation
    checkpointing keeps to recompute a block, the outputs selective checkpointing caches, the
    logits the step holds -- and frees nothing by assumption."""

    def __init__(self, where):
        from torch.utils.weak import WeakIdKeyDictionary

        self.where = where  # () -> the module running now; None: FSDP's own buffers (not counted)
        self.created = WeakIdKeyDictionary()  # storage -> module
        self.mode = None

    def _mode(self):
        from torch.distributed.tensor import DTensor
        from torch.utils._python_dispatch import TorchDispatchMode

        meter = self

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if any(isinstance(t, type) and issubclass(t, DTensor) for t in types):
                    return NotImplemented  # let DTensor run its local ops through this mode
                out = func(*args, **(kwargs or {}))
                where = meter.where()
                for tensor in _tensors(out) if where is not None else ():
                    storage = tensor.untyped_storage()
                    if storage not in meter.created:
                        meter.created[storage] = where
                return out

        return Mode()

    @contextlib.contextmanager
    def forward(self, model):
        """Measure one forward of ``model``; ``alive()`` afterwards."""
        sharded = _parameter_storages(model)  # before: FSDP's sharded parameters
        with self._mode():
            yield
        self.parameters = sharded | _parameter_storages(model)  # after: the unsharded ones it holds

    def alive(self) -> dict[str, int]:
        """Bytes created by the forward and still alive, by module, parameters excluded."""
        out: dict[str, int] = {}
        for storage, module in list(self.created.items()):
            if id(storage) not in self.parameters:
                out[module] = out.get(module, 0) + storage.nbytes()
        return out


def _parameter_storages(model) -> set[int]:
    from torch.distributed.tensor import DTensor

    found = set()
    for param in model.parameters():
        local = param._local_tensor if isinstance(param, DTensor) else param
        found.add(id(local.untyped_storage()))
    return found


def _tensors(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    return []


class _NoOptimizer:
    """The simulated step's optimizer: AdamW is elementwise (no collectives) and its memory is
    counted by arithmetic; fake tensors cannot run its scalar bias corrections (``.item()``)."""

    def __init__(self, model):
        self.model = model

    def step(self) -> None:
        pass

    def zero_grad(self, set_to_none: bool = True) -> None:
        for param in self.model.parameters():
            param.grad = None


def simulate_step(spec: Spec, source, *, tp: int, dp: int, seq: int, batch: int, mesh, ep: int = 1,
                   keep_blocks: int | None = None, observe=None) -> Step:
    import torch

    from tpplan.plan.apply import parallelize
    from tpplan.simulate.comm import CollectiveRecorder, mesh_group_labels, recorded_step

    precision = training_precision(spec)
    model, plan, fake, blocks = fake_model(spec, source, tp=tp, seq=seq, ep=ep, keep_blocks=keep_blocks,
                                            precision=precision)
    # the training step's own preparation; torch.compile is not simulated (eager memory and
    # collectives), float8 is accounted by arithmetic (torchao is a GPU feature)
    try:
        parallelize(model, plan, mesh, precision=precision, activation_checkpointing=spec.train.activation_checkpointing)
    except SystemExit as exc:  # the step refused what it was given (a tie that came apart)
        raise SimulationError(str(exc), hint="run `tpplan check` on the spec") from None
    recorder = CollectiveRecorder(model, mesh_group_labels(mesh))
    meter = _ActivationMeter(lambda: None if recorder.in_fsdp else recorder.current_module)
    saved: dict[str, int] = {}
    logits_holder: dict = {}

    @contextlib.contextmanager
    def phase(name):
        with recorder.step_phase(name):
            if name != "forward" or saved:
                yield
                return
            with meter.forward(model):  # the first micro-batch's forward: they are all alike
                yield
            saved.update(meter.alive())

    with fake:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        position_ids = torch.arange(seq).unsqueeze(0)
    micro_batches = [(ids, ids)] * spec.train.grad_accum_steps
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a traceback before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with fake:
            def keep_logits(module, args, output):
                logits_holder.setdefault("logits", output)

            handle = model.register_forward_hook(keep_logits)
            try:
                with observe(recorder) if observe is not None else contextlib.nullcontext():
                    recorded_step(model, recorder, micro_batches, position_ids, loss_parallel=plan.loss_parallel,
                                  max_grad_norm=spec.train.max_grad_norm, optimizer=_NoOptimizer(model), phase=phase,
                                  positions=source.positions)
            finally:
                handle.remove()
    except TpplanError:
        raise
    except Exception as exc:  # a plan that resolves but breaks the step: say where
        raise SimulationError(
            f"the simulated training step failed in {recorder.failed_in or recorder.current_module}: "
            f"{type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}",
            hint="run `tpplan check` on the spec: it runs the step on CPU ranks and names the module whose layout is wrong",
        ) from exc
    finally:
        quiet.setLevel(level)
    return Step(records=recorder.records, saved=saved, logits_bytes=_local_bytes(logits_holder.get("logits")),
                 blocks=blocks)


def _local_bytes(output) -> int:
    """Bytes this rank holds of a model output's logits (a DTensor's local shard)."""
    from tpplan.runtime.helpers import logits_of

    logits = logits_of(output)
    local = getattr(logits, "_local_tensor", logits)
    return local.numel() * local.element_size() if local is not None else 0
