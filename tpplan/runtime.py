"""Training-step helpers shared by ``tpplan check`` and the generated training script.

Each function here is self-contained (it imports only torch) so the template can print its
source into ``train.py`` verbatim: the code that ``check`` proves is the code that trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def causal_lm_loss(logits, labels):
    """Mean next-token cross-entropy. ``labels`` are already shifted (labels[t] = input[t + 1]).

    Under ``loss_parallel()`` the logits are a DTensor sharded on the vocabulary and
    cross-entropy runs on the shards: full logits are never gathered."""
    return F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(0, 1))


@torch.no_grad()
def clip_grad_norm_(parameters, max_norm: float):
    """Clip gradients to a total 2-norm of ``max_norm``; returns the norm before clipping.

    Works on a mix of plain tensors and DTensors on different meshes (tp-sharded, fsdp-sharded,
    both, replicated), where ``torch.nn.utils.clip_grad_norm_`` cannot stack the per-parameter
    norms.  Gradients are grouped by mesh and placements; each group sums its local squares and
    one all-reduce per group adds up the shards."""
    import torch.distributed
    from torch.distributed.tensor import DTensor, Replicate

    parameters = [p for p in parameters if p.grad is not None]
    if not parameters:
        return torch.zeros(())
    for param in parameters:
        grad = param.grad
        if isinstance(grad, DTensor) and any(p.is_partial() for p in grad.placements):
            # a pending sum (e.g. a sequence-parallel norm's weight): reduce it now; the squares of
            # the summands do not add up to the square of the sum
            param.grad = grad.redistribute(grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements])
    grads = [p.grad for p in parameters]
    plain, groups = [], {}
    for grad in grads:
        if isinstance(grad, DTensor):
            groups.setdefault((grad.device_mesh, grad.placements), []).append(grad)
        else:
            plain.append(grad)
    device = grads[0].device if not isinstance(grads[0], DTensor) else grads[0].to_local().device
    total_sq = torch.zeros((), dtype=torch.float32, device=device)
    for grad in plain:
        total_sq += torch.linalg.vector_norm(grad, dtype=torch.float32) ** 2
    for (mesh, placements), members in groups.items():
        local_sq = sum(torch.linalg.vector_norm(g.to_local(), dtype=torch.float32) ** 2 for g in members)
        # a sharded mesh dim holds disjoint pieces whose squares add up; a replicated one holds copies
        for dim, placement in enumerate(placements):
            if not placement.is_replicate():
                torch.distributed.all_reduce(local_sq, group=mesh.get_group(dim))
        total_sq += local_sq.to(device)
    total = total_sq.sqrt()
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(scale.to(local.device, local.dtype))
    return total
