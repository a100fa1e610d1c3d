"""Apply a ResolvedPlan to a model at runtime, the way training does: DTensor tensor parallelism
over ``mesh["tp"]``, fix-ups, tied weights kept tied, and FSDP2 over the data-parallel ranks -- the
training step's own ``prepare_model`` (what train.py prints), so the library, check, plan and the
generated script shard a model one way.

    mesh = tpplan.build_mesh("cpu", dp=1, tp=2)
    tpplan.parallelize(model, plan, mesh, precision="bf16-mixed")
"""

from __future__ import annotations

from tpplan.plan.resolved import ResolvedPlan


def build_mesh(device_type: str, *, dp: int, tp: int, ep: int = 1):
    """A 3-D device mesh named ("dp", "ep", "tp"); tp is the inner (fastest-varying) dim, so a tp
    group is the ranks of one node, and ep next to it (expert parallel ranks hold different data, as
    dp ranks do, and different experts)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp, ep, tp), mesh_dim_names=("dp", "ep", "tp"))


def reset_dtensor_state() -> None:
    """Forget what DTensor keeps per process: its cached sharding decisions (in Python and in its C++
    dispatch fast path) and its random-number tracker.  Both are keyed by device meshes, and meshes of two
    worlds compare equal when their layouts do, so a decision cached in one world (a simulated one on a
    fake process group, whose collectives do nothing) would be taken in the next: the simulator starts each
    world with none, and a check rank forked from a process that used DTensor starts clean."""
    import torch
    from torch.distributed.tensor import DTensor, _random

    DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
    native = getattr(torch._C, "_clear_DTensor_sharding_propagator_cache", None)
    if native is not None:
        native()
    _random._rng_tracker = None


def apply_tensor_parallel(model, plan: ResolvedPlan, mesh) -> None:
    """The plan's styles (``parallelize_module`` per resolved module, over ``mesh["tp"]``; expert
    parallel over ``mesh["ep"]``) and its fix-ups: what the training step calls as its
    ``apply_tensor_parallel`` (train.py prints the same calls).  Ties are the step's to restore."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp_mesh = mesh["tp"]
    ep = mesh["ep"].size() if "ep" in (mesh.mesh_dim_names or ()) else 1
    if tp_mesh.size() != plan.tp:
        raise ValueError(f"the plan was resolved for tp={plan.tp} but the mesh has tp={tp_mesh.size()}")
    modules = dict(model.named_modules())
    if tp_mesh.size() > 1 or ep > 1:
        for entry in plan.sharded_entries():
            parallelize_module(modules[entry.fqn], tp_mesh, entry.rule.build(mesh))
    for fix in plan.fixups:
        if fix.present:
            set_attribute(modules[fix.fqn], fix.attr, fix.after)


def parallelize(model, plan, mesh, *, precision: str = "fp32", activation_checkpointing="none",
                compile: bool = False, float8: bool = False, async_tp: bool = False):
    """Shard ``model`` in place for training, exactly as train.py, ``tpplan check`` and ``tpplan plan``
    do: the training step's ``prepare_model`` (float8 linears, the plan, activation checkpointing,
    ``torch.compile`` per block, FSDP2 over the data-parallel ranks with the precision's policy, ties
    kept).  ``plan``: a ResolvedPlan, or a Spec resolved here against ``model`` at the mesh's sizes."""
    from tpplan.runtime.parallel_styles import fsdp_shard_placement
    from tpplan.runtime.step import data_parallel_mesh, precision_dtypes, prepare_model

    if not isinstance(plan, ResolvedPlan):
        from tpplan.plan.resolve import resolve

        ep = mesh["ep"].size() if "ep" in (mesh.mesh_dim_names or ()) else 1
        plan = resolve(plan, model, tp=mesh["tp"].size(), ep=ep)
    param_dtype, compute_dtype, _ = precision_dtypes(precision)
    if data_parallel_mesh(mesh).size() > 1 or compute_dtype != param_dtype:  # FSDP2: refused before, not during
        refuse_split_ties(model, plan)
    prepare_model(
        model, mesh, lambda m, _: apply_tensor_parallel(m, plan, mesh), blocks=plan.blocks,
        tied=[t.names for t in plan.tied], precision=precision, activation_checkpointing=activation_checkpointing,
        compile=compile, float8=float8, async_tp=async_tp, shard_placement_fn=fsdp_shard_placement,
    )
    verify_ties(model, plan)
    return model


def set_attribute(module, path: str, value) -> None:
    """``module.<path> = value`` for a dotted path; each object along the path is replaced by a shallow
    copy first, so that an object shared with other modules (one config for every layer) changes for
    this module only."""
    import copy

    *parents, last = path.split(".")
    owner = module
    for part in parents:
        own = copy.copy(getattr(owner, part))
        setattr(owner, part, own)
        owner = own
    setattr(owner, last, value)


def verify_ties(model, plan: ResolvedPlan) -> None:
    """Every tie the plan knows is intact (one parameter object under all its names): no silent untie."""
    from tpplan.core.errors import TpplanError
    from tpplan.runtime.step import untied

    for names in untied(model, [tie.names for tie in plan.tied]):
        raise TpplanError(
            f"tied weights came apart: {' and '.join(names)} are one parameter in the model but "
            "separate ones after sharding",
            hint="a tie that crosses FSDP units (model.blocks) cannot stay tied under FSDP2: put every holder "
            "in one unit, or report this as a tpplan bug",
        )


def refuse_split_ties(model, plan: ResolvedPlan) -> None:
    """A parameter tied across two FSDP units (``step.split_ties``) is refused before anything is
    sharded: it would come apart."""
    from tpplan.core.errors import TpplanError
    from tpplan.runtime.step import block_names, split_ties

    for tied, homes in split_ties([tie.names for tie in plan.tied], block_names(model, plan.blocks)):
        raise TpplanError(
            f"{' and '.join(tied)} are one parameter held in different FSDP units ({', '.join(homes)}): FSDP2 "
            "would shard it in one unit and the other would keep a stale copy as a parameter of its own",
            hint="choose model.blocks so that every holder of a tied parameter is in one unit (or train at dp=1 "
            "in fp32, without FSDP)",
        )
