"""The mesh's sizes: tp, dp and ep from the spec's ``mesh`` and the command line's ``--tp/--dp/--ep``.

``tp_size`` (``mesh.tp: node`` is the launch's processes per node), ``dp_size`` (``mesh.dp: auto``
is what the world size leaves over ep x tp) and ``ep_size``.  An override below 1, ``mesh.tp: node``
where the node size is not known, and a mesh that does not match the world size are ResolveErrors.
"""

from __future__ import annotations

from tpplan.core.errors import ResolveError
from tpplan.spec.schema import Spec


def tp_size(spec: Spec, override: int | None = None) -> int:
    """The tensor-parallel size: ``--tp``, else ``mesh.tp``; ``node`` means launch.nproc_per_node."""
    if override is not None:
        if override < 1:
            raise ResolveError(f"--tp must be a positive integer, got {override}")
        return override
    if isinstance(spec.mesh.tp, int):
        return spec.mesh.tp
    nproc = spec.launch.nproc_per_node
    if isinstance(nproc, int):
        return nproc
    raise ResolveError(
        "mesh.tp is 'node' but the node size is not known here (launch.nproc_per_node is "
        f"{nproc!r})",
        location=spec.source.where(("mesh", "tp")) if spec.source else None,
        path="mesh.tp",
        hint="pass --tp N, or set launch.nproc_per_node to the number of GPUs per node",
    )


def dp_size(spec: Spec, tp: int, world_size: int | None = None, override: int | None = None, ep: int = 1) -> int:
    """The data-parallel size: ``--dp``, else ``mesh.dp``, else (auto) world_size // (ep x tp)."""
    if override is not None:
        if override < 1:
            raise ResolveError(f"--dp must be a positive integer, got {override}")
        dp = override
    elif isinstance(spec.mesh.dp, int):
        dp = spec.mesh.dp
    elif world_size is not None:
        dp = world_size // (ep * tp)
    else:
        nproc = spec.launch.nproc_per_node
        nnodes = int(spec.launch.nnodes.split(":")[-1])
        dp = max(1, (nproc * nnodes) // (ep * tp)) if isinstance(nproc, int) else 1
    if world_size is not None and dp * ep * tp != world_size:
        mesh = f"dp({dp}) x ep({ep}) x tp({tp})" if ep > 1 else f"dp({dp}) x tp({tp})"
        raise ResolveError(
            f"the mesh {mesh} = {dp * ep * tp} does not match the world size {world_size}",
            path="mesh",
            hint=f"launch {dp * ep * tp} processes, or set mesh.dp: auto (and a tp that divides {world_size})",
        )
    return dp


def ep_size(spec: Spec, override: int | None = None) -> int:
    """The expert-parallel size: ``--ep``, else ``mesh.ep``."""
    if override is not None:
        if override < 1:
            raise ResolveError(f"--ep must be a positive integer, got {override}")
        return override
    return spec.mesh.ep
