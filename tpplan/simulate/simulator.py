"""Plan at full scale without GPUs: per-rank memory and every collective of one training step.

``simulate(spec)`` builds the spec's model from its config alone and shards it exactly as training
does (``tpplan.plan.apply``: TP with DTensor, then FSDP2 over dp) on a *fake* process group of
``dp x tp`` ranks (torch's ``FakeStore`` + backend "fake": collectives return at once, nothing is
sent).  Then:

* parameters: the full model on the meta device, tensor-parallelised, is counted parameter by
  parameter (local DTensor shards); FSDP2's dim-0 split over dp is applied by its own arithmetic
  (``torch.chunk`` into dp pieces, each rank holding the first, padded, chunk size);
* one training step -- forward, loss (under ``loss_parallel`` when the spec says so), backward,
  gradient clipping -- runs on fake tensors (shapes and dtypes, no data) under
  ``comm.CollectiveRecorder``, which records every collective with its mesh dim, phase, module and
  size, and a ``saved_tensors_hooks`` that measures the activations autograd keeps for backward.

Decoder blocks with identical structure cause identical collectives and activations, so when all
blocks look alike only the first ``SIMULATED_LAYERS`` are run and one middle block stands for the
rest (``all_layers=True`` runs every block; a test checks both agree).

Memory model (per rank, bytes; the spec's dtype for weights, gradients and optimizer state):
parameters p = local numel x dtype size; gradients = p (same sharding); AdamW exp_avg + exp_avg_sq
= 2p (torch keeps them in the parameter dtype; no fp32 master copy); activations as measured (see
``activations``); with FSDP also its transient buffers: the root unit kept unsharded through the
step + two blocks all-gathered (current and prefetched) + one block's unsharded gradients before
the reduce-scatter.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from tpplan.core.errors import TpplanError
from tpplan.plan.resolved import ResolvedPlan
from tpplan.spec.schema import Spec, training_precision

DEFAULT_DEVICE_MEMORY_GIB = 80.0
SIMULATED_LAYERS = 3  # blocks run when all blocks are alike; the middle one stands for the rest
GIB = 2**30

ACTIVATION_FORMULA = (
    "Korthikanti et al. 2022 (arXiv:2205.05198), flash/sdpa attention (no 5as^2b/t term), per block: "
    "with sequence parallel 34*s*b*h/t bytes, without s*b*h*(10 + 24/t) (16-bit activations; scaled by "
    "dtype size / 2); a fully checkpointed block keeps its input only, s*b*h*e (/t with sequence parallel); "
    "plus logits s*b*V'*(e + 4) (V' = V/tp under loss parallel, else V; e = compute dtype size, 4 for the "
    "fp32 log-softmax kept for backward); no closed form for selective checkpointing"
)


class SimulationError(TpplanError):
    """The plan resolved but the simulated step failed (exit 1, as a failed check)."""

    exit_code = 1


# ------------------------------------------------------------------------------------------
# Context: a fake world, fake tensors, and transformers' packed-sequence check switched off
# ------------------------------------------------------------------------------------------


@contextlib.contextmanager
def fake_world(world_size: int) -> Iterator[None]:
    """A default process group of ``world_size`` fake ranks (this process is rank 0)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise SimulationError(
            "a process group is already initialized in this process; the simulator needs its own fake one",
            hint="run `tpplan plan` outside a distributed job",
        )
    _clear_dtensor_caches()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        _clear_dtensor_caches()


def _clear_dtensor_caches() -> None:
    """DTensor caches sharding decisions keyed by device meshes (in Python and in its C++ dispatch fast
    path), and meshes of two worlds compare equal when their layouts do (the tp dim of dp=8 x tp=4
    and of dp=4 x ep=2 x tp=4): a decision cached in one simulated world would hand the next one a
    mesh whose process groups are gone.  Several specs are simulated one after the other, so each
    world starts with those caches empty."""
    import torch
    from torch.distributed.tensor import DTensor

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if native is not None:
        native()


@contextlib.contextmanager
def no_packed_sequence_detection() -> Iterator[None]:
    """Skip transformers' packed-sequence detection while simulating.

    With explicit ``position_ids`` transformers calls ``masking_utils.find_packed_sequence_indices``,
    which branches in Python on ``(mask[:, -1] == 0).all()`` -- a ``Tensor.item()`` that meta and
    fake tensors cannot answer (they have no values).  Every simulated sequence is one unpacked
    sequence with position_ids 0..s-1, for which the function returns None; so we return None
    without looking.  The function is replaced on ``transformers.masking_utils`` (its caller
    ``_preprocess_mask_arguments`` looks it up there at call time) and restored on exit."""
    try:
        from transformers import masking_utils
    except ImportError:  # pragma: no cover - older transformers: nothing to patch
        yield
        return
    original = getattr(masking_utils, "find_packed_sequence_indices", None)
    if original is None:
        yield
        return
    masking_utils.find_packed_sequence_indices = lambda position_ids: None
    try:
        yield
    finally:
        masking_utils.find_packed_sequence_indices = original


@contextlib.contextmanager
def gpu_redistribution() -> Iterator[None]:
    """Redistribute DTensors as on a CUDA mesh, not as on the simulator's CPU mesh.

    For Shard(i) -> Shard(j) DTensor calls ``shard_dim_alltoall``, which on a CPU mesh falls back to
    an all-gather + chunk (gloo has no all-to-all) and on GPUs is one all-to-all
    (``_dtensor::shard_dim_alltoall``), tp times fewer bytes.  The simulator sizes GPU jobs, so
    while it runs the CUDA path is taken (the op has a fake kernel: nothing is sent)."""
    import torch.distributed._functional_collectives as funcol
    from torch.distributed.tensor import _collective_utils, placement_types

    original = getattr(_collective_utils, "shard_dim_alltoall", None)
    if original is None or not all(hasattr(funcol, n) for n in ("_resolve_group", "_group_or_group_name")):
        yield  # another torch layout: leave DTensor as it is (CPU all-gather fallback)
        return

    def shard_dim_alltoall(input, gather_dim, shard_dim, mesh, mesh_dim):
        import torch

        group = funcol._resolve_group((mesh, mesh_dim))
        return torch.ops._dtensor.shard_dim_alltoall(input, gather_dim, shard_dim, funcol._group_or_group_name(group))

    modules = [m for m in (_collective_utils, placement_types) if getattr(m, "shard_dim_alltoall", None) is original]
    for module in modules:
        module.shard_dim_alltoall = shard_dim_alltoall
    try:
        yield
    finally:
        for module in modules:
            module.shard_dim_alltoall = original


@contextlib.contextmanager
def balanced_routing() -> Iterator[None]:
    """Expert parallel sizes its all-to-alls from the router's choices, read on the host; fake tensors
    have no values, so while simulating every rank sends an equal share of its (token, expert) pairs
    to every ep rank: the balanced routing that MoE training aims at (load-balancing losses)."""
    from tpplan.runtime.parallel_styles import ExpertParallel

    original = ExpertParallel.__dict__["split_sizes"]

    def balanced(send_counts, ep_mesh, pairs):
        share = [pairs // ep_mesh.size()] * ep_mesh.size()
        return share, share

    ExpertParallel.split_sizes = staticmethod(balanced)
    try:
        yield
    finally:
        ExpertParallel.split_sizes = original


# ------------------------------------------------------------------------------------------
# Arithmetic (pure functions: unit-tested without torch.distributed)
# ------------------------------------------------------------------------------------------


def fsdp_shard_numel(shape: tuple[int, ...], dp: int) -> int:
    """Elements rank 0 holds of a (tp-local) tensor of ``shape`` after FSDP2 shards dim 0 over dp:
    ``torch.chunk`` into dp pieces; every rank's shard is padded to the first (largest) piece."""
    if dp <= 1 or not shape:
        return math.prod(shape)
    return math.ceil(shape[0] / dp) * math.prod(shape[1:])


def memory_budget(*, params: int, bytes_per_param: int, activations: int, buffers: int = 0,
                  accumulated_gradients: int = 0, device_bytes: int) -> dict:
    """Per-rank bytes: parameters, gradients (same dtype and sharding), AdamW exp_avg + exp_avg_sq
    (2x, in the parameter dtype: float32 master state under mixed precision), activations, FSDP
    buffers, gradients kept unsharded between micro-batches; their total and whether it fits."""
    p = params * bytes_per_param
    total = p + p + 2 * p + activations + buffers + accumulated_gradients
    return {
        "parameters": params,
        "parameters_bytes": p,
        "gradients_bytes": p,
        "optimizer_bytes": 2 * p,
        "activations_bytes": activations,
        "fsdp_buffers_bytes": buffers,
        "accumulated_gradients_bytes": accumulated_gradients,
        "total_bytes": total,
        "fits": total <= device_bytes,
    }


def rank_memory(*, params_without_fsdp: int, params_with_fsdp: int, activations: int, fsdp_buffers: int,
                precision: str, data_parallel: int, grad_accum_steps: int, device_bytes: int) -> dict:
    """``{"without_fsdp": ..., "with_fsdp": ...}``: the ``memory_budget`` of one rank with tensor
    parallel only and with FSDP2 over ``data_parallel`` ranks (dp x ep).  FSDP2's buffers count wherever
    it runs: over more than one rank, or on one rank under a mixed precision (its policy is what casts
    the float32 masters).  With accumulation, FSDP2 keeps the gradients of the micro-batches before
    the last unsharded (it syncs on the last only), in the reduce dtype: the tp-local size of every
    parameter."""
    from tpplan.runtime.step import precision_dtypes

    param_dtype, compute_dtype, reduce_dtype = precision_dtypes(precision)
    mixed = compute_dtype != param_dtype
    sharded = data_parallel > 1 or mixed
    accumulated = params_without_fsdp * reduce_dtype.itemsize if grad_accum_steps > 1 else 0
    return {
        "without_fsdp": memory_budget(params=params_without_fsdp, bytes_per_param=param_dtype.itemsize,
                                      activations=activations, buffers=fsdp_buffers if mixed else 0,
                                      accumulated_gradients=accumulated if mixed else 0, device_bytes=device_bytes),
        "with_fsdp": memory_budget(params=params_with_fsdp, bytes_per_param=param_dtype.itemsize,
                                   activations=activations, buffers=fsdp_buffers if sharded else 0,
                                   accumulated_gradients=accumulated if sharded else 0, device_bytes=device_bytes),
    }


def fsdp_buffer_bytes(*, root_numel: int, block_numel: int, compute_bytes: int, reduce_bytes: int) -> int:
    """FSDP2's transient memory per rank: the root unit unsharded through the step, two blocks
    all-gathered (the current one and the prefetched next), and one block's unsharded gradients
    (in the compute dtype, plus their copy in the reduce dtype when it differs) before the
    reduce-scatter; all unsharded copies in the compute dtype."""
    extra = block_numel * reduce_bytes if reduce_bytes != compute_bytes else 0
    return (root_numel + 3 * block_numel) * compute_bytes + extra


def activation_formula_bytes(*, seq: int, batch: int, hidden: int, vocab: int, layers: int, tp: int,
                             dtype_bytes: int, sequence_parallel: bool, loss_parallel: bool,
                             checkpointed: int = 0) -> dict:
    """The analytical activation estimate (see ``ACTIVATION_FORMULA``), per rank; a fully
    checkpointed block keeps only its input, s*b*h (/t under sequence parallel)."""
    sbh = seq * batch * hidden
    per_layer = 34 * sbh / tp if sequence_parallel else sbh * (10 + 24 / tp)
    per_layer = int(per_layer * dtype_bytes / 2)
    kept = sbh * dtype_bytes // (tp if sequence_parallel else 1)
    vocab_local = vocab // tp if loss_parallel else vocab
    logits = seq * batch * vocab_local * (dtype_bytes + 4)
    total = per_layer * (layers - checkpointed) + kept * checkpointed + logits
    return {"per_layer_bytes": per_layer, "checkpointed_layer_bytes": kept, "logits_bytes": logits,
            "total_bytes": total}


def megatron_sp_floor(*, seq: int, batch: int, hidden: int, layers: int, tp: int, dtype_bytes: int) -> int:
    """Ring bytes sent per rank by Megatron-style TP + SP: per block 8 collectives of the
    hidden-size activation (forward: all-gather + reduce-scatter around attention and the MLP;
    backward: the same four again), each (tp-1)/tp x s*b*h*dtype; embedding and logits not counted."""
    if tp <= 1:
        return 0
    return layers * 8 * (tp - 1) * seq * batch * hidden * dtype_bytes // tp


# ------------------------------------------------------------------------------------------
# The simulation
# ------------------------------------------------------------------------------------------


@dataclass
class Simulation:
    """What ``simulate`` found: the resolved plan and a JSON-ready dict (``data``)."""

    plan: ResolvedPlan
    data: dict = field(default_factory=dict)
    records: list = field(default_factory=list)  # every comm.Collective of the simulated step

    def to_dict(self) -> dict:
        return {**self.data, "plan": _plan_rules(self.plan)}


def _plan_rules(plan: ResolvedPlan) -> list[dict]:
    from tpplan.spec.rules import GroupRule

    return [
        {"pattern": r.pattern, "style": "(group)" if isinstance(r.rule, GroupRule) else r.rule.summary(),
         "modules": len(r.matches)}
        for r in plan.rules
    ]


def simulate(
    spec: Spec,
    *,
    tp: int | None = None,
    dp: int | None = None,
    ep: int | None = None,
    seq_length: int | None = None,
    batch_size: int | None = None,
    device_memory_gib: float = DEFAULT_DEVICE_MEMORY_GIB,
    all_layers: bool = False,
    observe=None,
) -> Simulation:
    """Resolve ``spec`` at full size, shard it on a fake ``dp x tp`` world, and measure one step.

    ``observe``: None, or a callable taking the step's ``comm.CollectiveRecorder`` and returning a
    context manager, entered around the recorded step inside the fake mode: a dispatch mode of the
    caller's sees every local op the step runs, with the recorder's module and phase at hand
    (``tpplan tune`` counts the step's FLOPs this way)."""
    from tpplan.plan.stage import model_source, resolve_stage
    from tpplan.runtime.step import precision_dtypes

    started = time.perf_counter()
    tp, dp, ep, seq, batch = _sizes(spec, tp=tp, dp=dp, ep=ep, seq_length=seq_length, batch_size=batch_size,
                                    device_memory_gib=device_memory_gib)
    precision = training_precision(spec)
    source = model_source(spec)
    stage = resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, source=source,
                          model=source.build(device="meta", dtype=_dtype_name(precision_dtypes(precision)[0])))
    full, plan = stage.model, stage.plan
    blocks = _blocks(full, plan)
    layers = len(blocks)
    simulated, layer_key = _simulated_layers(spec, blocks, source.config, all_layers)

    with fake_world(dp * ep * tp), no_packed_sequence_detection(), gpu_redistribution(), balanced_routing():
        from tpplan.plan.apply import apply_tensor_parallel, build_mesh

        mesh = build_mesh("cpu", dp=dp, tp=tp, ep=ep)
        # parameters: the full model, tensor-parallelised on meta (FSDP's split done by arithmetic)
        apply_tensor_parallel(full, plan, mesh)
        params = _count_parameters(full, blocks, dp, ep)
        del full
        # one training step on a model of `simulated` blocks, sharded exactly as training does
        if simulated != layers and source.config is not None:
            source = type(source)(spec.model, _with_layers(source.config, layer_key, simulated))
        step = _simulate_step(spec, source, tp=tp, dp=dp, seq=seq, batch=batch, mesh=mesh, ep=ep,
                              keep_blocks=simulated if source.config is None and simulated != layers else None,
                              observe=observe)

    kinds = _block_kinds(layers, spec.train.activation_checkpointing)
    hidden, vocab = _widths(stage)
    sp = any(e.rule.splits_sequence() for e in plan.entries)
    shape = dict(seq=seq, batch=batch, hidden=hidden, vocab=vocab, layers=layers, tp=tp, sequence_parallel=sp)
    memory = _memory_report(spec, step, plan, params, kinds, simulated, shape, dp=dp * ep,
                            device_memory_gib=device_memory_gib)
    comm = _communication_report(spec, step, plan, params, kinds, simulated, shape)
    data = {
        "spec": spec.name,
        "model": source.label,
        "model_class": plan.model_class,
        **_settings(spec, precision),
        "tp": tp,
        "dp": dp,
        "ep": ep,
        "world_size": dp * ep * tp,
        "seq_length": seq,
        "batch_size": batch,
        "loss_parallel": plan.loss_parallel,
        "sequence_parallel": sp,
        "layers": layers,
        "simulated_layers": simulated,
        "extrapolated": simulated != layers,
        "memory": memory,
        "communication": comm,
        "warnings": list(plan.warnings) + _feature_notes(spec, kinds),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Simulation(plan=plan, data=data, records=step.records)


def _settings(spec: Spec, precision: str) -> dict:
    """The training settings the simulated step ran with."""
    return {
        "dtype": spec.model.dtype,
        "precision": precision,
        "activation_checkpointing": spec.train.activation_checkpointing,
        "grad_accum_steps": spec.train.grad_accum_steps,
        "compile": spec.train.compile,
        "float8": spec.train.float8,
        "async_tp": spec.mesh.async_tp,
    }


def _sizes(spec: Spec, *, tp, dp, ep, seq_length, batch_size, device_memory_gib) -> tuple[int, int, int, int, int]:
    """tp, dp, ep (the spec's, or the overrides), the sequence length and the batch size, checked."""
    from tpplan.plan.resolve import dp_size, ep_size, tp_size

    tp = tp_size(spec, tp)
    ep = ep_size(spec, ep)
    dp = dp_size(spec, tp, override=dp, ep=ep)
    seq = spec.train.seq_length if seq_length is None else seq_length
    batch = spec.train.batch_size if batch_size is None else batch_size
    for name, value in (("--seq-length", seq), ("--batch-size", batch)):
        if value < 1:
            raise TpplanError(f"{name} must be a positive integer, got {value}")
    if device_memory_gib <= 0:
        raise TpplanError(f"--device-memory-gib must be positive, got {device_memory_gib:g}")
    return tp, dp, ep, seq, batch


def _simulated_layers(spec: Spec, blocks, config, all_layers: bool) -> tuple[int, str | None]:
    """How many blocks the step simulates (identical blocks: a few, extrapolated to all), and the
    config key that sets the layer count (None for a factory model)."""
    ac = spec.train.activation_checkpointing
    layers = len(blocks)
    uniform = len({_signature(m) for _, m in blocks}) <= 1
    layer_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers")
                      if isinstance(getattr(config, k, None), int)), None)
    # every N-th block checkpointed: simulate enough blocks to see both kinds away from the edges
    wanted = SIMULATED_LAYERS if not isinstance(ac, int) or ac == 1 else max(SIMULATED_LAYERS, 2 * ac + 1)
    if not all_layers and uniform and (layer_key or config is None) and layers > wanted:
        return wanted, layer_key
    return layers, layer_key


def _memory_report(spec: Spec, step, plan, params, kinds, simulated, shape, *, dp, device_memory_gib) -> dict:
    """Per rank: parameters, gradients, optimizer state, activations (measured, and the formula beside
    them) and FSDP's buffers, with and without FSDP, against the device."""
    from tpplan.runtime.step import precision_dtypes

    precision = training_precision(spec)
    param_dtype, compute_dtype, reduce_dtype = precision_dtypes(precision)
    ac = spec.train.activation_checkpointing
    acts = _activations(step, kinds=kinds, simulated=simulated)
    acts["formula"] = ACTIVATION_FORMULA
    acts["formula_bytes"] = None if ac == "selective" else activation_formula_bytes(
        **shape, dtype_bytes=compute_dtype.itemsize, loss_parallel=plan.loss_parallel,
        checkpointed=kinds.count("checkpointed"),
    )["total_bytes"]
    buffers = fsdp_buffer_bytes(root_numel=params["root_unit_numel"], block_numel=params["largest_block_numel"],
                                compute_bytes=compute_dtype.itemsize, reduce_bytes=reduce_dtype.itemsize)
    return {
        "device_memory_gib": device_memory_gib,
        "precision": precision,
        "param_dtype": _dtype_name(param_dtype),
        "compute_dtype": _dtype_name(compute_dtype),
        "reduce_dtype": _dtype_name(reduce_dtype),
        "dtype": _dtype_name(compute_dtype),
        "bytes_per_param": param_dtype.itemsize,
        "activation_checkpointing": ac,
        "grad_accum_steps": spec.train.grad_accum_steps,
        "parameters": {k: params[k] for k in ("total", "sharded_by_tp", "replicated_over_tp",
                                              "per_rank_without_fsdp", "per_rank_with_fsdp")},
        # MoE experts (3-D weights): in all, and what one rank holds of them
        "experts": {k: params["experts_" + k] for k in ("total", "per_rank_without_fsdp", "per_rank_with_fsdp")},
        "activations": acts,
        **rank_memory(params_without_fsdp=params["per_rank_without_fsdp"], params_with_fsdp=params["per_rank_with_fsdp"],
                      activations=acts["total_bytes"], fsdp_buffers=buffers, precision=precision, data_parallel=dp,
                      grad_accum_steps=spec.train.grad_accum_steps, device_bytes=int(device_memory_gib * GIB)),
    }


def _communication_report(spec: Spec, step, plan, params, kinds, simulated, shape) -> dict:
    """Every collective per block and outside, against Megatron-SP's floor; float8's savings."""
    from tpplan.runtime.step import precision_dtypes

    compute_bytes = precision_dtypes(training_precision(spec))[1].itemsize
    comm = _communication(step, kinds=kinds, simulated=simulated, plan=plan)
    floor = megatron_sp_floor(seq=shape["seq"], batch=shape["batch"], hidden=shape["hidden"], layers=shape["layers"],
                              tp=shape["tp"], dtype_bytes=compute_bytes)
    comm["megatron_sp_floor_ring_bytes"] = floor * spec.train.grad_accum_steps
    comm["ratio_to_floor"] = round(comm["total"]["tp_ring_bytes"] / comm["megatron_sp_floor_ring_bytes"], 4) if floor else None
    comm["float8"] = _float8_all_gathers(comm, params, compute_bytes, enabled=spec.train.float8)
    return comm


def _dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _block_kinds(layers: int, activation_checkpointing) -> list[str]:
    """Per block: "checkpointed" (activations recomputed in backward) or "plain"."""
    from tpplan.runtime.step import checkpointed_blocks

    recomputed = set(checkpointed_blocks(layers, activation_checkpointing))
    return ["checkpointed" if i in recomputed else "plain" for i in range(layers)]


def _feature_notes(spec: Spec, kinds: list[str]) -> list[str]:
    notes = []
    if spec.train.compile:
        notes.append("train.compile: not simulated (eager memory and collectives; inductor may keep fewer activations)")
    if spec.mesh.async_tp:
        notes.append("mesh.async_tp: the same tp bytes, overlapped with the matmuls they feed")
    ac = spec.train.activation_checkpointing
    if isinstance(ac, int) and ac > 1 and "checkpointed" not in kinds:
        notes.append(f"train.activation_checkpointing {ac}: the model has {len(kinds)} blocks, none is checkpointed")
    return notes


def _float8_all_gathers(comm: dict, params: dict, compute_bytes: int, *, enabled: bool) -> dict:
    """What float8 FSDP all-gathers save: the blocks' float8-eligible Linear weights cross the dp
    group in 1 byte instead of ``compute_bytes`` (arithmetic on the recorded all-gathers; torchao
    itself is not needed to size it)."""
    gathered = comm["total"]["block_dp_all_gather_ring_bytes"]
    fraction = params["float8_numel"] / params["largest_block_numel"] if params["largest_block_numel"] else 0.0
    saved = int(gathered * fraction * (1 - 1 / compute_bytes)) if compute_bytes > 1 else 0
    return {"enabled": enabled, "eligible_fraction": round(fraction, 4), "block_all_gather_ring_bytes": gathered,
            "saved_ring_bytes": saved}


def _blocks(model, plan: ResolvedPlan) -> list[tuple[str, object]]:
    """The transformer blocks (the training step's ``block_names``), in order."""
    from tpplan.runtime.step import block_names

    return [(name, model.get_submodule(name)) for name in block_names(model, plan.blocks)]


def _widths(stage) -> tuple[int, int]:
    """(hidden size, vocabulary): from the transformers config, else from the input embedding."""
    import torch.nn as nn

    config = stage.source.config
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    if not hidden or not vocab:
        embedding = next((m for m in stage.model.modules() if isinstance(m, nn.Embedding)), None)
        if embedding is not None:
            hidden, vocab = hidden or embedding.embedding_dim, vocab or embedding.num_embeddings
    return hidden, vocab


def _keep_blocks(model, blocks: list[str], keep: int) -> None:
    """Drop every block after the first ``keep`` from the container that holds them (a factory model
    has no config to say fewer layers); the forward iterates over what the container holds."""
    import torch.nn as nn

    parents = {name.rpartition(".")[0] for name in blocks}
    if len(parents) != 1:
        raise SimulationError("the blocks are not in one ModuleList", hint="pass --all-layers")
    container = model.get_submodule(parents.pop())
    drop = [name.rpartition(".")[2] for name in blocks[keep:]]
    if isinstance(container, nn.ModuleList):
        del container[keep:]
    elif isinstance(container, nn.ModuleDict):
        for key in drop:
            del container[key]
    else:
        raise SimulationError(f"the blocks' container is a {type(container).__name__}", hint="pass --all-layers")


def _signature(module) -> tuple:
    return (type(module).__name__,
            tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()),
            tuple((n, type(m).__name__) for n, m in module.named_modules()))


def _with_layers(config, key: str, layers: int):
    """``config`` with its first ``layers`` layers.  Where a per-layer attribute is a read-only property
    (Bamba's ``layers_block_type``, computed from its fields), the config class rebuilds it from its
    fields, the per-layer lists cut and the layer-index lists kept inside, as the twin's shrink does."""
    try:
        twin = copy.deepcopy(config)
        setattr(twin, key, layers)
        if isinstance(getattr(config, "layer_types", None), list):
            twin.layer_types = list(config.layer_types[:layers])
        return twin
    except AttributeError:
        from tpplan.model.shrink import _build, _index_keys, _per_layer_keys

        d = config.to_dict()
        count = d[key]
        for name in _per_layer_keys(d, count):
            d[name] = d[name][:layers]
        for name in _index_keys(d, count):
            d[name] = [i for i in d[name] if i < layers]
        d[key] = layers
        return _build(config.model_type, d)


def _count_parameters(model, blocks, dp: int, ep: int = 1) -> dict:
    """Per-rank parameter counts.  FSDP splits over the ranks holding different data (dp x ep),
    except expert-parallel experts, which it splits over dp (each ep rank holds other experts)."""
    import torch
    from torch.distributed.tensor import DTensor

    from tpplan.plan.resolve import module_kind

    block_of = {}
    float8 = {}  # block -> elements of its float8-eligible Linear weights (step.convert_to_float8)
    for name, module in blocks:
        for pname, _ in module.named_parameters():
            block_of[f"{name}.{pname}"] = name
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear) and sub.in_features % 16 == 0 and sub.out_features % 16 == 0:
                weight = sub.weight
                local = weight._local_tensor if isinstance(weight, DTensor) else weight
                float8[name] = float8.get(name, 0) + local.numel()
    experts = {name: getattr(m, "expert_parallel", False) for name, m in model.named_modules()
               if module_kind(m) == "experts"}
    total = sharded = replicated = per_tp = per_fsdp = 0
    ex_total = ex_tp = ex_fsdp = 0
    unit_numel: dict[str, int] = {}
    for name, param in model.named_parameters():
        local = param._local_tensor if isinstance(param, DTensor) else param
        total += param.numel()
        if isinstance(param, DTensor) and any(not p.is_replicate() for p in param.placements):
            sharded += param.numel()
        else:
            replicated += param.numel()
        owner = name.rpartition(".")[0]
        fsdp = fsdp_shard_numel(tuple(local.shape), dp if experts.get(owner) else dp * ep)
        per_tp += local.numel()
        per_fsdp += fsdp
        if owner in experts:
            ex_total, ex_tp, ex_fsdp = ex_total + param.numel(), ex_tp + local.numel(), ex_fsdp + fsdp
        unit = block_of.get(name, "")
        unit_numel[unit] = unit_numel.get(unit, 0) + local.numel()
    root = unit_numel.pop("", 0)
    largest = max(unit_numel, key=unit_numel.get, default=None)
    return {
        "experts_total": ex_total,
        "experts_per_rank_without_fsdp": ex_tp,
        "experts_per_rank_with_fsdp": ex_fsdp,
        "total": total,
        "sharded_by_tp": sharded,
        "replicated_over_tp": replicated,
        "per_rank_without_fsdp": per_tp,
        "per_rank_with_fsdp": per_fsdp,
        "root_unit_numel": root,
        "largest_block_numel": unit_numel.get(largest, 0),
        "float8_numel": float8.get(largest, 0),
    }


@dataclass
class _Step:
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


def _fake_model(spec: Spec, source, *, tp: int, seq: int, ep: int, keep_blocks: int | None, precision: str):
    """The model on fake CPU tensors (no memory), its plan, the fake mode and its block names."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tpplan.plan.stage import resolve_stage
    from tpplan.runtime.step import precision_dtypes

    model = source.build(device="meta", dtype=_dtype_name(precision_dtypes(precision)[0]))
    if keep_blocks is not None:
        plan = resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, model=model).plan
        _keep_blocks(model, [n for n, _ in _blocks(model, plan)], keep_blocks)
    plan = resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, model=model, source=source).plan
    # Fake tensors, not meta: FSDP2 refuses meta parameters and allocates its all-gather buffers
    # on the mesh's device; fake CPU tensors pass both and still hold no memory.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
    blocks = [n for n, _ in _blocks(model, plan)]  # before FSDP renames the block classes
    return model, plan, fake, blocks


def _simulate_step(spec: Spec, source, *, tp: int, dp: int, seq: int, batch: int, mesh, ep: int = 1,
                   keep_blocks: int | None = None, observe=None) -> _Step:
    import torch

    from tpplan.plan.apply import parallelize
    from tpplan.simulate.comm import CollectiveRecorder, mesh_group_labels, recorded_step

    precision = training_precision(spec)
    model, plan, fake, blocks = _fake_model(spec, source, tp=tp, seq=seq, ep=ep, keep_blocks=keep_blocks,
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
    return _Step(records=recorder.records, saved=saved, logits_bytes=_local_bytes(logits_holder.get("logits")),
                 blocks=blocks)


def _local_bytes(output) -> int:
    """Bytes this rank holds of a model output's logits (a DTensor's local shard)."""
    from tpplan.runtime.helpers import logits_of

    logits = logits_of(output)
    local = getattr(logits, "_local_tensor", logits)
    return local.numel() * local.element_size() if local is not None else 0


# ------------------------------------------------------------------------------------------
# Aggregation
# ------------------------------------------------------------------------------------------

_INDEX = re.compile(r"\.(\d+)$")


def _block_patterns(blocks: list[str]) -> dict[str, str]:
    return {b: _INDEX.sub(".*", b) for b in blocks}


def _locate(module: str, patterns: dict[str, str]) -> tuple[str | None, str]:
    """(block FQN or None, the module name with the block index replaced by *)."""
    for block, pattern in patterns.items():
        if module == block or module.startswith(block + "."):
            return block, pattern + module[len(block):]
    return None, module


def _representatives(blocks: list[str], kinds: list[str]) -> dict[str, str]:
    """Per kind of block, the simulated block that stands for the blocks not simulated: the middle
    one of its kind (the first and last blocks see FSDP's prefetch edges)."""
    out = {}
    for kind in dict.fromkeys(kinds[: len(blocks)]):
        members = [b for b, k in zip(blocks, kinds, strict=False) if k == kind]
        out[kind] = members[len(members) // 2]
    return out


def _rule_for(module: str, plan: ResolvedPlan) -> str | None:
    """The pattern of the plan rule that styles ``module`` or its nearest styled ancestor."""
    by_module = {e.fqn: e for e in plan.entries}
    name = module
    while name:
        entry = by_module.get(name)
        if entry is not None:
            return plan.rules[entry.rule_index].pattern
        name = name.rpartition(".")[0]
    return None


def _rows(records, plan: ResolvedPlan, patterns: dict[str, str]) -> list[dict]:
    rows: dict[tuple, dict] = {}
    for r in records:
        _, where = _locate(r.module, patterns)
        key = (where, r.phase, r.mesh_dim, r.op, r.group_size, r.dtype)
        row = rows.get(key)
        if row is None:
            if r.module in patterns or r.module == "(root)":
                rule = "(FSDP unit)"
            else:
                rule = _rule_for(r.module, plan) if not r.module.startswith("(") else None
            row = rows[key] = {"module": where, "rule": rule, "phase": r.phase, "mesh_dim": r.mesh_dim, "op": r.op,
                               "group_size": r.group_size, "dtype": r.dtype, "count": 0, "bytes": 0, "ring_bytes": 0}
        row["count"] += 1
        row["bytes"] += r.bytes
        row["ring_bytes"] += r.ring_bytes
    return list(rows.values())


def _scale(rows: list[dict], factor: int) -> list[dict]:
    return [{**r, "count": r["count"] * factor, "bytes": r["bytes"] * factor, "ring_bytes": r["ring_bytes"] * factor}
            for r in rows]


def _sum(rows: list[dict], keys: tuple[str, ...]) -> list[dict]:
    out: dict[tuple, dict] = {}
    for r in rows:
        key = tuple(r[k] for k in keys)
        acc = out.setdefault(key, {**{k: r[k] for k in keys}, "count": 0, "bytes": 0, "ring_bytes": 0})
        for k in ("count", "bytes", "ring_bytes"):
            acc[k] += r[k]
    return list(out.values())


def _communication(step: _Step, *, kinds: list[str], simulated: int, plan: ResolvedPlan) -> dict:
    patterns = _block_patterns(step.blocks)
    reps = _representatives(step.blocks, kinds)
    in_block = [r for r in step.records if _locate(r.module, patterns)[0] is not None]
    outside = [r for r in step.records if _locate(r.module, patterns)[0] is None]
    rep_rows = {kind: _rows([r for r in in_block if _locate(r.module, patterns)[0] == rep], plan, patterns)
                for kind, rep in reps.items()}
    # the simulated blocks, plus each kind's representative for every block of that kind not run
    block_rows = _rows(in_block, plan, patterns)
    for kind, rows in rep_rows.items():
        block_rows += _scale(rows, kinds.count(kind) - kinds[:simulated].count(kind))
    main = max(reps, key=kinds.count) if reps else None
    per_layer = rep_rows.get(main, [])
    outside_rows = _rows(outside, plan, patterns)
    every = block_rows + outside_rows
    order = {"forward": 0, "backward": 1, "step": 2}
    summary = sorted(_sum(every, ("phase", "mesh_dim", "op")),
                     key=lambda r: (order.get(r["phase"], 9), r["mesh_dim"], r["op"]))

    def total(rows, dim=None):
        return sum(r["ring_bytes"] for r in rows if dim is None or r["mesh_dim"] == dim)

    return {
        "representative_layer": reps.get(main),
        "per_layer": per_layer,
        "layer_kinds": [{"kind": kind, "layers": kinds.count(kind), "representative": rep,
                         "ring_bytes": total(rep_rows[kind])} for kind, rep in reps.items()],
        "outside_layers": outside_rows,
        "summary": summary,
        "total": {
            "count": sum(r["count"] for r in every),
            "bytes": sum(r["bytes"] for r in every),
            "ring_bytes": total(every),
            "tp_ring_bytes": total(every, "tp"),
            "dp_ring_bytes": total(every, "dp") + total(every, "dp_ep"),
            "ep_ring_bytes": total(every, "ep"),
            "all_to_all_ring_bytes": sum(r["ring_bytes"] for r in every if r["op"] == "all_to_all"),
            "per_layer_ring_bytes": total(per_layer),
            "block_dp_all_gather_ring_bytes": sum(r["ring_bytes"] for r in block_rows
                                                  if r["mesh_dim"] in ("dp", "dp_ep") and r["op"] == "all_gather"),
        },
    }


def _activations(step: _Step, *, kinds: list[str], simulated: int) -> dict:
    patterns = _block_patterns(step.blocks)
    reps = _representatives(step.blocks, kinds)
    per_block: dict[str, int] = {}
    other = 0
    for module, nbytes in step.saved.items():
        block, _ = _locate(module, patterns)
        if block is None:
            other += nbytes
        else:
            per_block[block] = per_block.get(block, 0) + nbytes
    in_blocks = sum(per_block.values())
    for kind, rep in reps.items():
        in_blocks += per_block.get(rep, 0) * (kinds.count(kind) - kinds[:simulated].count(kind))
    main = max(reps, key=kinds.count) if reps else None
    return {
        "source": "measured: what one micro-batch's forward leaves alive for backward (every storage its ops "
                  "create, by module, still alive at its end: saved tensors, checkpointed blocks' inputs, "
                  "selectively kept outputs, the logits; parameters excluded)",
        "per_layer_bytes": per_block.get(reps[main], 0) if main else 0,
        "per_layer_kind_bytes": {kind: per_block.get(rep, 0) for kind, rep in reps.items()},
        "layers_bytes": in_blocks,
        "outside_layers_bytes": other,
        "logits_bytes": step.logits_bytes,
        "total_bytes": in_blocks + other,
    }


def compare(sims: list[Simulation]) -> list[dict]:
    """One row per simulation, for side-by-side tables: bytes per step, memory per rank, fits;
    ``ratio_to_first``: total bytes per step over the first plan's."""
    rows = []
    first = None
    for sim in sims:
        d = sim.data
        total = d["communication"]["total"]
        mem = d["memory"]
        if first is None:
            first = total["ring_bytes"]
        rows.append({
            "spec": d["spec"],
            "model": d["model"],
            "tp": d["tp"],
            "dp": d["dp"],
            "batch_size": d["batch_size"],
            "seq_length": d["seq_length"],
            "loss_parallel": d["loss_parallel"],
            "sequence_parallel": d["sequence_parallel"],
            "parameters_per_rank": mem["with_fsdp"]["parameters"],
            "memory_without_fsdp_bytes": mem["without_fsdp"]["total_bytes"],
            "fits_without_fsdp": mem["without_fsdp"]["fits"],
            "memory_with_fsdp_bytes": mem["with_fsdp"]["total_bytes"],
            "fits_with_fsdp": mem["with_fsdp"]["fits"],
            "ring_bytes": total["ring_bytes"],
            "tp_ring_bytes": total["tp_ring_bytes"],
            "dp_ring_bytes": total["dp_ring_bytes"],
            "ratio_to_first": round(total["ring_bytes"] / first, 4) if first else None,
            "ratio_to_floor": d["communication"]["ratio_to_floor"],
        })
    return rows
