"""The simulator's arithmetic: pure functions of sizes and dtypes, unit-tested without torch.distributed.

FSDP2's dim-0 shard of a tensor, a rank's memory budget (parameters, gradients, AdamW state,
activations, FSDP's buffers) with and without FSDP, FSDP2's transient buffers, the analytical
activation estimate beside the measured one (``ACTIVATION_FORMULA``), and the ring bytes of
Megatron-style TP + SP that the measured collectives are compared with.
"""

from __future__ import annotations

import math

ACTIVATION_FORMULA = (
    "Korthikanti et al. 2022 (arXiv:2205.05198), flash/sdpa attention (no 5as^2b/t term), per block: "
    "with sequence parallel 34*s*b*h/t bytes, without s*b*h*(10 + 24/t) (16-bit activations; scaled by "
    "dtype size / 2); a fully checkpointed block keeps its input only, s*b*h*e (/t with sequence parallel); "
    "plus logits s*b*V'*(e + 4) (V' = V/tp under loss parallel, else V; e = compute dtype size, 4 for the "
    "fp32 log-softmax kept for backward); no closed form for selective checkpointing"
)


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
