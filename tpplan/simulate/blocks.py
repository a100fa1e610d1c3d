"""The model the simulator runs: its blocks, how many of them the step runs, and the parameters per rank.

Which modules are the transformer blocks and which of them are checkpointed; when all blocks
look alike, how many the step runs (``SIMULATED_LAYERS``, one middle block standing for the rest)
and the model cut to those (a transformers config with fewer layers, or a factory model's block
container cut short), built on fake CPU tensors; its hidden size and vocabulary; and the
parameters each rank holds of the full, tensor-parallelised model, with FSDP2's split by
arithmetic.
"""

from __future__ import annotations

import copy

from tpplan.plan.resolved import ResolvedPlan
from tpplan.simulate.arithmetic import fsdp_shard_numel
from tpplan.simulate.world import SimulationError
from tpplan.spec.schema import Spec

SIMULATED_LAYERS = 3  # blocks run when all blocks are alike; the middle one stands for the rest


def simulated_layers(spec: Spec, blocks, config, all_layers: bool) -> tuple[int, str | None]:
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


def block_kinds(layers: int, activation_checkpointing) -> list[str]:
    """Per block: "checkpointed" (activations recomputed in backward) or "plain"."""
    from tpplan.runtime.step import checkpointed_blocks

    recomputed = set(checkpointed_blocks(layers, activation_checkpointing))
    return ["checkpointed" if i in recomputed else "plain" for i in range(layers)]


def block_modules(model, plan: ResolvedPlan) -> list[tuple[str, object]]:
    """The transformer blocks (the training step's ``block_names``), in order."""
    from tpplan.runtime.step import block_names

    return [(name, model.get_submodule(name)) for name in block_names(model, plan.blocks)]


def widths(stage) -> tuple[int, int]:
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


def with_layers(config, key: str, layers: int):
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


def count_parameters(model, blocks, dp: int, ep: int = 1) -> dict:
    """Per-rank parameter counts.  FSDP splits over the ranks holding different data (dp x ep),
    except expert-parallel experts, which it splits over dp (each ep rank holds other experts)."""
    import torch
    from torch.distributed.tensor import DTensor

    from tpplan.plan.module_kinds import module_kind

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


def fake_model(spec: Spec, source, *, tp: int, seq: int, ep: int, keep_blocks: int | None, precision: str):
    """The model on fake CPU tensors (no memory), its plan, the fake mode and its block names."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from tpplan.plan.stage import resolve_stage
    from tpplan.runtime.precision import PRECISIONS

    model = source.build(device="meta", dtype=PRECISIONS[precision].params)
    if keep_blocks is not None:
        plan = resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, model=model).plan
        _keep_blocks(model, [n for n, _ in block_modules(model, plan)], keep_blocks)
    plan = resolve_stage(spec, tp=tp, seq_length=seq, ep=ep, model=model, source=source).plan
    # Fake tensors, not meta: FSDP2 refuses meta parameters and allocates its all-gather buffers
    # on the mesh's device; fake CPU tensors pass both and still hold no memory.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    with fake:
        model.to_empty(device="cpu")
    blocks = [n for n, _ in block_modules(model, plan)]  # before FSDP renames the block classes
    return model, plan, fake, blocks
