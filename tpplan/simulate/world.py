"""The fake world a simulated step runs in: a fake process group, and the patches that let fake tensors
through a step written for GPUs.

``fake_world`` is a default process group of fake ranks (torch's ``FakeStore`` + backend "fake":
collectives return at once, nothing is sent), with DTensor's sharding caches emptied around it;
``no_packed_sequence_detection``, ``gpu_redistribution`` and ``balanced_routing`` switch off or
replace, for the step's duration, what needs values fake tensors do not have (or takes a CPU-only
path).  ``SimulationError`` is what every part of the simulation raises for a plan whose step fails.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from tpplan.core.errors import TpplanError
from tpplan.plan.apply import reset_dtensor_state


class SimulationError(TpplanError):
    """The plan resolved but the simulated step failed (exit 1, as a failed check)."""

    exit_code = 1


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
    reset_dtensor_state()
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()
        reset_dtensor_state()


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
