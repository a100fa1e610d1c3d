"""Plan at full scale without GPUs: per-rank memory and every collective of one training step.

``simulate(spec)`` builds the spec's model from its config alone and shards it exactly as training
does (``tpplan.apply``: TP with DTensor, then FSDP2 over dp) on a *fake* process group of
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

from .errors import TpplanError
from .plan import ResolvedPlan
from .spec import Spec

DEFAULT_DEVICE_MEMORY_GIB = 80.0
SIMULATED_LAYERS = 3  # blocks run when all blocks are alike; the middle one stands for the rest
GIB = 2**30

ACTIVATION_FORMULA = (
    "Korthikanti et al. 2022 (arXiv:2205.05198), flash/sdpa attention (no 5as^2b/t term), per block: "
    "with sequence parallel 34*s*b*h/t bytes, without s*b*h*(10 + 24/t) (16-bit activations; scaled by "
    "dtype size / 2); plus logits s*b*V'*(e + 4) (V' = V/tp under loss parallel, else V; e = dtype size, "
    "4 for the fp32 log-softmax kept for backward)"
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
    from .parallel_styles import ExpertParallel

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
                  device_bytes: int) -> dict:
    """Per-rank bytes: parameters, gradients (same), AdamW exp_avg + exp_avg_sq (2x), activations,
    FSDP buffers; their total and whether it fits in ``device_bytes``."""
    p = params * bytes_per_param
    total = p + p + 2 * p + activations + buffers
    return {
        "parameters": params,
        "parameters_bytes": p,
        "gradients_bytes": p,
        "optimizer_bytes": 2 * p,
        "activations_bytes": activations,
        "fsdp_buffers_bytes": buffers,
        "total_bytes": total,
        "fits": total <= device_bytes,
    }


def activation_formula_bytes(*, seq: int, batch: int, hidden: int, vocab: int, layers: int, tp: int,
                             dtype_bytes: int, sequence_parallel: bool, loss_parallel: bool) -> dict:
    """The analytical activation estimate (see ``ACTIVATION_FORMULA``), per rank."""
    sbh = seq * batch * hidden
    per_layer = 34 * sbh / tp if sequence_parallel else sbh * (10 + 24 / tp)
    per_layer = int(per_layer * dtype_bytes / 2)
    vocab_local = vocab // tp if loss_parallel else vocab
    logits = seq * batch * vocab_local * (dtype_bytes + 4)
    return {"per_layer_bytes": per_layer, "logits_bytes": logits, "total_bytes": per_layer * layers + logits}


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
    from .spec import GroupRule

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
) -> Simulation:
    """Resolve ``spec`` at full size, shard it on a fake ``dp x tp`` world, and measure one step."""
    from .models import build_model, load_config
    from .resolve import dp_size, ep_size, resolve, tp_size

    started = time.perf_counter()
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
    base = spec.source.directory if spec.source else None
    config = load_config(spec.model, base)
    full = build_model(config, device="meta", dtype=spec.model.dtype)
    plan = resolve(spec, full, tp=tp, seq_length=seq, ep=ep)
    blocks = _blocks(full, plan)
    layers = len(blocks)
    uniform = len({_signature(m) for _, m in blocks}) <= 1
    layer_key = next((k for k in ("num_hidden_layers", "n_layer", "num_layers") if isinstance(getattr(config, k, None), int)), None)
    simulated = layers
    if not all_layers and uniform and layer_key and layers > SIMULATED_LAYERS:
        simulated = SIMULATED_LAYERS
    dtype_bytes = _dtype_bytes(spec.model.dtype)

    with fake_world(dp * ep * tp), no_packed_sequence_detection(), gpu_redistribution(), balanced_routing():
        from .apply import apply, build_mesh

        mesh = build_mesh("cpu", dp=dp, tp=tp, ep=ep)
        # parameters: the full model, tensor-parallelised on meta (FSDP's split done by arithmetic)
        apply(full, plan, mesh, fsdp=False)
        params = _count_parameters(full, blocks, dp, ep)
        del full
        # one training step on a model of `simulated` blocks, sharded exactly as training does
        sim_config = _with_layers(config, layer_key, simulated) if simulated != layers else config
        step = _simulate_step(spec, sim_config, tp=tp, dp=dp, seq=seq, batch=batch, mesh=mesh, ep=ep)

    device_bytes = int(device_memory_gib * GIB)
    comm = _communication(step, layers=layers, simulated=simulated, plan=plan)
    acts = _activations(step, layers=layers, simulated=simulated)
    hidden = int(getattr(config, "hidden_size", 0) or 0)
    vocab = int(getattr(config, "vocab_size", 0) or 0)
    sp = any(e.rule.splits_sequence() for e in plan.entries)
    acts["formula"] = ACTIVATION_FORMULA
    acts["formula_bytes"] = activation_formula_bytes(
        seq=seq, batch=batch, hidden=hidden, vocab=vocab, layers=layers, tp=tp, dtype_bytes=dtype_bytes,
        sequence_parallel=sp, loss_parallel=plan.loss_parallel)["total_bytes"]
    buffers = (params["root_unit_bytes"] + 3 * params["largest_block_bytes"]) if dp > 1 else 0
    memory = {
        "device_memory_gib": device_memory_gib,
        "dtype": spec.model.dtype,
        "bytes_per_param": dtype_bytes,
        "parameters": {k: params[k] for k in ("total", "sharded_by_tp", "replicated_over_tp",
                                              "per_rank_without_fsdp", "per_rank_with_fsdp")},
        # MoE experts (3-D weights): in all, and what one rank holds of them
        "experts": {k: params["experts_" + k] for k in ("total", "per_rank_without_fsdp", "per_rank_with_fsdp")},
        "activations": acts,
        "without_fsdp": memory_budget(params=params["per_rank_without_fsdp"], bytes_per_param=dtype_bytes,
                                      activations=acts["total_bytes"], device_bytes=device_bytes),
        "with_fsdp": memory_budget(params=params["per_rank_with_fsdp"], bytes_per_param=dtype_bytes,
                                   activations=acts["total_bytes"], buffers=buffers, device_bytes=device_bytes),
    }
    floor = megatron_sp_floor(seq=seq, batch=batch, hidden=hidden, layers=layers, tp=tp, dtype_bytes=dtype_bytes)
    comm["megatron_sp_floor_ring_bytes"] = floor
    comm["ratio_to_floor"] = round(comm["total"]["tp_ring_bytes"] / floor, 4) if floor else None
    data = {
        "spec": spec.name,
        "model": spec.model.name or config.model_type,
        "model_class": plan.model_class,
        "dtype": spec.model.dtype,
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
        "warnings": list(plan.warnings),
        "seconds": round(time.perf_counter() - started, 2),
    }
    return Simulation(plan=plan, data=data, records=step.records)


def _dtype_bytes(name: str) -> int:
    return {"float32": 4, "bfloat16": 2, "float16": 2}[name]


def _blocks(model, plan: ResolvedPlan) -> list[tuple[str, object]]:
    names = set(plan.block_class_names)
    return [(n, m) for n, m in model.named_modules() if n and type(m).__name__ in names]


def _signature(module) -> tuple:
    return (type(module).__name__,
            tuple((n, tuple(p.shape), str(p.dtype)) for n, p in module.named_parameters()),
            tuple((n, type(m).__name__) for n, m in module.named_modules()))


def _with_layers(config, key: str, layers: int):
    twin = copy.deepcopy(config)
    setattr(twin, key, layers)
    if isinstance(getattr(config, "layer_types", None), list):
        twin.layer_types = list(config.layer_types[:layers])
    return twin


def _count_parameters(model, blocks, dp: int, ep: int = 1) -> dict:
    """Per-rank parameter counts.  FSDP splits over the ranks holding different data (dp x ep),
    except expert-parallel experts, which it splits over dp (each ep rank holds other experts)."""
    from torch.distributed.tensor import DTensor

    from .resolve import module_kind

    block_of = {}
    for name, module in blocks:
        for pname, _ in module.named_parameters():
            block_of[f"{name}.{pname}"] = name
    experts = {name: getattr(m, "expert_parallel", False) for name, m in model.named_modules()
               if module_kind(m) == "experts"}
    total = sharded = replicated = per_tp = per_fsdp = 0
    ex_total = ex_tp = ex_fsdp = 0
    unit_bytes: dict[str, int] = {}
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
        unit_bytes[unit] = unit_bytes.get(unit, 0) + local.numel() * local.element_size()
    root = unit_bytes.pop("", 0)
    return {
        "experts_total": ex_total,
        "experts_per_rank_without_fsdp": ex_tp,
        "experts_per_rank_with_fsdp": ex_fsdp,
        "total": total,
        "sharded_by_tp": sharded,
        "replicated_over_tp": replicated,
        "per_rank_without_fsdp": per_tp,
        "per_rank_with_fsdp": per_fsdp,
        "root_unit_bytes": root,
        "largest_block_bytes": max(unit_bytes.values(), default=0),
    }


@dataclass
class _Step:
    records: list  # comm.Collective
    saved: dict  # module -> activation bytes kept for backward
    logits_bytes: int
    blocks: list[str]


def _simulate_step(spec: Spec, config, *, tp: int, dp: int, seq: int, batch: int, mesh, ep: int = 1) -> _Step:
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .apply import apply
    from .comm import CollectiveRecorder, mesh_group_labels, recorded_step
    from .models import build_model
    from .resolve import resolve

    model = build_model(config, device="meta", dtype=spec.model.dtype)
    plan = resolve(spec, model, tp=tp, seq_length=seq, ep=ep)
    # Fake tensors, not meta: FSDP2 refuses meta parameters and allocates its all-gather buffers
    # on the mesh's device; fake CPU tensors pass both and still hold no memory.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
    blocks = [n for n, _ in _blocks(model, plan)]  # before apply: FSDP2 renames the block classes
    apply(model, plan, mesh)
    recorder = CollectiveRecorder(model, mesh_group_labels(mesh))
    saved: dict[str, int] = {}
    seen: set = set()

    def pack(tensor):
        if not _is_parameter(tensor):
            local = getattr(tensor, "_local_tensor", tensor)
            storage = local.untyped_storage()
            key = storage._cdata
            if key not in seen:
                seen.add(key)
                module = recorder.current_module
                saved[module] = saved.get(module, 0) + storage.nbytes()
        return tensor

    with fake:
        ids = torch.zeros(batch, seq, dtype=torch.long)
        position_ids = torch.arange(seq).unsqueeze(0)
    quiet = logging.getLogger("torch._subclasses.fake_tensor")  # it logs a traceback before raising
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)
    try:
        with fake, torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits_holder = {}

            def keep_logits(module, args, output):
                logits_holder["logits"] = output

            handle = model.register_forward_hook(keep_logits)
            try:
                recorded_step(model, recorder, ids, position_ids, ids, loss_parallel=plan.loss_parallel,
                              max_grad_norm=spec.train.max_grad_norm)
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
    out = logits_holder.get("logits")
    logits = getattr(out, "logits", None)
    local = getattr(logits, "_local_tensor", logits)
    logits_bytes = local.numel() * local.element_size() if local is not None else 0
    return _Step(records=recorder.records, saved=saved, logits_bytes=logits_bytes, blocks=blocks)


def _is_parameter(tensor) -> bool:
    """Weights autograd saves (a parameter, or a view of one such as ``weight.t()``) are counted
    as parameters, not activations."""
    import torch

    for t in (tensor, getattr(tensor, "_base", None)):
        if t is not None and (isinstance(t, torch.nn.Parameter) or (t.is_leaf and t.requires_grad)):
            return True
    return False


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


def _representative(blocks: list[str]) -> str | None:
    return blocks[len(blocks) // 2] if blocks else None


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


def _communication(step: _Step, *, layers: int, simulated: int, plan: ResolvedPlan) -> dict:
    patterns = _block_patterns(step.blocks)
    rep = _representative(step.blocks)
    in_block = [r for r in step.records if _locate(r.module, patterns)[0] is not None]
    outside = [r for r in step.records if _locate(r.module, patterns)[0] is None]
    rep_records = [r for r in in_block if _locate(r.module, patterns)[0] == rep]
    per_layer = _rows(rep_records, plan, patterns)
    outside_rows = _rows(outside, plan, patterns)
    if simulated != layers:  # the simulated blocks, plus the representative for each one not run
        block_rows = _rows(in_block, plan, patterns) + _scale(per_layer, layers - simulated)
    else:
        block_rows = _rows(in_block, plan, patterns)
    every = block_rows + outside_rows
    order = {"forward": 0, "backward": 1, "step": 2}
    summary = sorted(_sum(every, ("phase", "mesh_dim", "op")),
                     key=lambda r: (order.get(r["phase"], 9), r["mesh_dim"], r["op"]))

    def total(rows, dim=None):
        return sum(r["ring_bytes"] for r in rows if dim is None or r["mesh_dim"] == dim)

    return {
        "representative_layer": rep,
        "per_layer": per_layer,
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
        },
    }


def _activations(step: _Step, *, layers: int, simulated: int) -> dict:
    patterns = _block_patterns(step.blocks)
    rep = _representative(step.blocks)
    per_block: dict[str, int] = {}
    other = 0
    for module, nbytes in step.saved.items():
        block, _ = _locate(module, patterns)
        if block is None:
            other += nbytes
        else:
            per_block[block] = per_block.get(block, 0) + nbytes
    per_layer = per_block.get(rep, 0)
    in_blocks = sum(per_block.values()) + per_layer * (layers - simulated)
    total = in_blocks + other + step.logits_bytes
    return {
        "source": "measured: tensors autograd saves for backward (deduplicated by storage, weights excluded) "
                  "+ the logits the step holds",
        "per_layer_bytes": per_layer,
        "layers_bytes": in_blocks,
        "outside_layers_bytes": other,
        "logits_bytes": step.logits_bytes,
        "total_bytes": total,
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
