"""What the simulated step measured, turned into ``tpplan plan``'s report: memory per rank and communication.

The step ran a few blocks; here its collectives and activations are sorted by block (a block's
index replaced by ``*``), and each kind of block's representative (the middle one of its kind) is
scaled to the blocks of that kind the step did not run.  ``memory_report``: parameters, gradients,
optimizer state, activations (measured, the formula beside them) and FSDP's buffers per rank,
with and without FSDP; ``communication_report``: every collective per block and outside, against
Megatron-SP's floor, and what float8 all-gathers save.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

from tpplan.plan.resolved import ResolvedPlan
from tpplan.runtime.precision import dtype_name
from tpplan.simulate.arithmetic import (
    ACTIVATION_FORMULA,
    activation_formula_bytes,
    fsdp_buffer_bytes,
    megatron_sp_floor,
    rank_memory,
)
from tpplan.spec.schema import Spec, training_precision

if TYPE_CHECKING:
    from tpplan.simulate.fake_step import Step

GIB = 2**30


def memory_report(spec: Spec, step, plan, params, kinds, simulated, shape, *, dp, device_memory_gib) -> dict:
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
        "param_dtype": dtype_name(param_dtype),
        "compute_dtype": dtype_name(compute_dtype),
        "reduce_dtype": dtype_name(reduce_dtype),
        "dtype": dtype_name(compute_dtype),
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


def communication_report(spec: Spec, step, plan, params, kinds, simulated, shape) -> dict:
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


def feature_notes(spec: Spec, kinds: list[str]) -> list[str]:
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


def _communication(step: Step, *, kinds: list[str], simulated: int, plan: ResolvedPlan) -> dict:
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


def _activations(step: Step, *, kinds: list[str], simulated: int) -> dict:
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
