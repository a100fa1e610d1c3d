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
blocks look alike only the first ``blocks.SIMULATED_LAYERS`` are run and one middle block stands for the
rest (``all_layers=True`` runs every block; a test checks both agree).

Memory model (per rank, bytes; the spec's dtype for weights, gradients and optimizer state):
parameters p = local numel x dtype size; gradients = p (same sharding); AdamW exp_avg + exp_avg_sq
= 2p (torch keeps them in the parameter dtype; no fp32 master copy); activations as measured (see
``activations``); with FSDP also its transient buffers: the root unit kept unsharded through the
step + two blocks all-gathered (current and prefetched) + one block's unsharded gradients before
the reduce-scatter.

Here: ``simulate`` and what it returns (``Simulation``), the sizes it runs at, and ``compare``
(simulations side by side).  The parts, each in its module: the fake world and its patches
(``world``), the arithmetic (``arithmetic``), the model's blocks and parameters (``blocks``), the
step on fake tensors (``fake_step``), and the report made of what it measured (``report``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from tpplan.core.errors import TpplanError
from tpplan.plan.resolved import ResolvedPlan
from tpplan.simulate.blocks import (
    block_kinds,
    block_modules,
    count_parameters,
    simulated_layers,
    widths,
    with_layers,
)
from tpplan.simulate.fake_step import simulate_step
from tpplan.simulate.report import communication_report, feature_notes, memory_report
from tpplan.simulate.world import (
    balanced_routing,
    fake_world,
    gpu_redistribution,
    no_packed_sequence_detection,
)
from tpplan.spec.schema import Spec, training_precision

DEFAULT_DEVICE_MEMORY_GIB = 80.0


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
    stage=None,
) -> Simulation:
    """Resolve ``spec`` at full size, shard it on a fake ``dp x tp`` world, and measure one step.

    ``observe``: None, or a callable taking the step's ``comm.CollectiveRecorder`` and returning a
    context manager, entered around the recorded step inside the fake mode: a dispatch mode of the
    caller's sees every local op the step runs, with the recorder's module and phase at hand
    (``tpplan tune`` counts the step's FLOPs this way).  ``stage``: ``spec`` already resolved at these
    tp, ep and sequence length (``plan.stage.Stage``, what the CLI builds once), or None to resolve it
    here; its plan is applied to a model of its source built anew at the training precision's dtype
    (resolving reads module names and shapes, never dtypes)."""
    started = time.perf_counter()
    tp, dp, ep, seq, batch = _sizes(spec, tp=tp, dp=dp, ep=ep, seq_length=seq_length, batch_size=batch_size,
                                    device_memory_gib=device_memory_gib)
    precision = training_precision(spec)
    stage, full = _resolved(spec, stage, tp=tp, ep=ep, seq=seq, precision=precision)
    source, plan = stage.source, stage.plan
    blocks = block_modules(full, plan)
    layers = len(blocks)
    simulated, layer_key = simulated_layers(spec, blocks, source.config, all_layers)

    with fake_world(dp * ep * tp), no_packed_sequence_detection(), gpu_redistribution(), balanced_routing():
        from tpplan.plan.apply import apply_tensor_parallel, build_mesh

        mesh = build_mesh("cpu", dp=dp, tp=tp, ep=ep)
        # parameters: the full model, tensor-parallelised on meta (FSDP's split done by arithmetic)
        apply_tensor_parallel(full, plan, mesh)
        params = count_parameters(full, blocks, dp, ep)
        del full
        # one training step on a model of `simulated` blocks, sharded exactly as training does
        if simulated != layers and source.config is not None:
            source = type(source)(spec.model, with_layers(source.config, layer_key, simulated))
        step = simulate_step(spec, source, tp=tp, dp=dp, seq=seq, batch=batch, mesh=mesh, ep=ep,
                              keep_blocks=simulated if source.config is None and simulated != layers else None,
                              observe=observe)

    kinds = block_kinds(layers, spec.train.activation_checkpointing)
    hidden, vocab = widths(stage)
    sp = any(e.rule.splits_sequence() for e in plan.entries)
    shape = dict(seq=seq, batch=batch, hidden=hidden, vocab=vocab, layers=layers, tp=tp, sequence_parallel=sp)
    memory = memory_report(spec, step, plan, params, kinds, simulated, shape, dp=dp * ep,
                            device_memory_gib=device_memory_gib)
    comm = communication_report(spec, step, plan, params, kinds, simulated, shape)
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
        "warnings": list(plan.warnings) + feature_notes(spec, kinds),
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


def _resolved(spec: Spec, stage, *, tp: int, ep: int, seq: int, precision: str):
    """The stage (``stage``, or ``spec`` resolved here) and the full model on meta at the precision's
    parameter dtype, to be sharded in place by the caller (the stage's own, when resolved here)."""
    from tpplan.plan.stage import model_source, resolve_stage
    from tpplan.runtime.precision import PRECISIONS

    dtype = PRECISIONS[precision].params
    if stage is None:
        source = model_source(spec)
        stage = resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, source=source,
                              model=source.build(device="meta", dtype=dtype))
        return stage, stage.model
    stage.require(spec, tp=tp, ep=ep, seq_length=seq)
    return stage, stage.source.build(device="meta", dtype=dtype)


def _sizes(spec: Spec, *, tp, dp, ep, seq_length, batch_size, device_memory_gib) -> tuple[int, int, int, int, int]:
    """tp, dp, ep (the spec's, or the overrides), the sequence length and the batch size, checked."""
    from tpplan.plan.mesh_sizes import dp_size, ep_size, tp_size

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
