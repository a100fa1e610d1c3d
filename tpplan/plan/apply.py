"""Apply a ResolvedPlan to a model at runtime: DTensor tensor parallelism over ``mesh["tp"]``,
tied weights kept tied, fix-ups, and FSDP2 over ``mesh["dp"]``.

    mesh = tpplan.build_mesh("cpu", dp=1, tp=2)
    tpplan.parallelize(model, plan, mesh)
"""

from __future__ import annotations

from dataclasses import dataclass

from tpplan.plan.resolved import ResolvedPlan


def build_mesh(device_type: str, *, dp: int, tp: int, ep: int = 1):
    """A 3-D device mesh named ("dp", "ep", "tp"); tp is the inner (fastest-varying) dim, so a tp
    group is the ranks of one node, and ep next to it (expert parallel ranks hold different data, as
    dp ranks do, and different experts)."""
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh(device_type, (dp, ep, tp), mesh_dim_names=("dp", "ep", "tp"))


def data_mesh(mesh):
    """The ranks that hold different data: dp, or dp x ep flattened when expert parallel (the ep ranks
    of a dp rank split its batch).  The training step's own function (``step.data_parallel_mesh``)."""
    from tpplan.runtime.step import data_parallel_mesh

    return data_parallel_mesh(mesh)


@dataclass(frozen=True)
class ApplyReport:
    sharded: int  # modules given a torch ParallelStyle
    fixups_applied: int
    fixups_skipped: int
    retied: tuple[str, ...]
    fsdp_units: int  # modules wrapped by fully_shard (0 when dp == 1)


def apply(model, plan, mesh, *, fsdp: bool = True) -> ApplyReport:
    """Shard ``model`` in place as ``plan`` says (a ResolvedPlan, or a Spec resolved here against
    ``model`` at the mesh's tp size); returns what was done."""
    from torch.distributed.tensor.parallel import parallelize_module

    tp_mesh, dp_mesh = mesh["tp"], mesh["dp"]
    ep = mesh["ep"].size() if "ep" in (mesh.mesh_dim_names or ()) else 1
    if not isinstance(plan, ResolvedPlan):
        from tpplan.plan.resolve import resolve

        plan = resolve(plan, model, tp=tp_mesh.size(), ep=ep)
    if tp_mesh.size() != plan.tp:
        raise ValueError(f"the plan was resolved for tp={plan.tp} but the mesh has tp={tp_mesh.size()}")
    modules = dict(model.named_modules())
    sharded = 0
    if tp_mesh.size() > 1 or ep > 1:
        for entry in plan.sharded_entries():
            parallelize_module(modules[entry.fqn], tp_mesh, entry.rule.build(mesh))
            sharded += 1
    # parallelize_module gives each module new DTensor parameters, which unties shared weights:
    # tie them again (resolve made sure every holder shards them the same way)
    retied = tie_again(model, plan)
    applied = skipped = 0
    for fix in plan.fixups:
        if fix.present:
            set_attribute(modules[fix.fqn], fix.attr, fix.after)
            applied += 1
        else:
            skipped += 1
    units = 0
    if fsdp and dp_mesh.size() * ep > 1:
        units = fully_shard_blocks(model, plan, mesh)
    verify_ties(model, plan)
    return ApplyReport(sharded, applied, skipped, tuple(retied), units)


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


def tie_again(model, plan: ResolvedPlan) -> list[str]:
    """Give every other holder of a tied parameter the owner's (sharded) parameter again (the
    training step's own function, ``step.tie_again``)."""
    from tpplan.runtime.step import tie_again as retie

    return retie(model, [tie.names for tie in plan.tied])


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


def block_names(model, plan: ResolvedPlan) -> list[str]:
    """The modules that become FSDP2 units: every module matching one of the plan's block patterns."""
    from tpplan.runtime.step import block_names as names_of_blocks

    return names_of_blocks(model, plan.blocks)


def refuse_split_ties(model, plan: ResolvedPlan) -> None:
    """A parameter tied across two FSDP units (``step.split_ties``) is refused before anything is
    sharded: it would come apart."""
    from tpplan.core.errors import TpplanError
    from tpplan.runtime.step import split_ties

    for tied, homes in split_ties([tie.names for tie in plan.tied], block_names(model, plan)):
        raise TpplanError(
            f"{' and '.join(tied)} are one parameter held in different FSDP units ({', '.join(homes)}): FSDP2 "
            "would shard it in one unit and the other would keep a stale copy as a parameter of its own",
            hint="choose model.blocks so that every holder of a tied parameter is in one unit (or train at dp=1 "
            "in fp32, without FSDP)",
        )


def fully_shard_blocks(model, plan: ResolvedPlan, mesh) -> int:
    """FSDP2 as training applies it (``step.apply_fsdp``; parameters in their own dtype): one unit
    per transformer block (``plan.blocks``), then the root, over the ranks that hold different data
    (dp, or dp x ep); expert-parallel experts are units of their own over dp alone.  A parameter
    tied across two units is refused before anything is sharded (it would come apart).  Returns the
    number of units."""
    from tpplan.runtime.parallel_styles import fsdp_shard_placement
    from tpplan.runtime.step import apply_fsdp

    refuse_split_ties(model, plan)
    blocks = [model.get_submodule(name) for name in block_names(model, plan)]
    experts = [m for m in model.modules() if getattr(m, "expert_parallel", False)]
    apply_fsdp(model, blocks, mesh, None, fsdp_shard_placement)
    return len(experts) + len(blocks) + 1
