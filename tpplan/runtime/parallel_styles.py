"""tpplan's own ``ParallelStyle`` classes: the styles torch's ``tensor/parallel/style.py`` lacks.

Each class here is self-contained (it uses only the names imported at the top of this file), so
``tpplan compile`` prints its source into the generated ``train.py`` verbatim: the code that
``tpplan check`` proves is the code that trains, and the script imports no tpplan.  The spec rule
that builds each one (its layouts, divisibility checks, hints) is in ``spec/tpplan_rules.py``.
"""

from __future__ import annotations

import contextlib
from functools import partial

import torch
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    ParallelStyle,
    PrepareModuleInput,
    RowwiseParallel,
)
from torch.distributed.tensor.placement_types import _StridedShard


class PackedColwiseParallel(ParallelStyle):
    """Colwise for an ``nn.Linear`` that packs ``parts`` equal projections one after the other on
    its output features ([q | k | v], [gate | up]): each rank holds its slice of *every* part, so
    its local output is [q_r | k_r | v_r] -- what the code after the projection splits, with local
    sizes -- where a contiguous colwise split would hand rank 0 all of q and half of k.  A module
    that is not an ``nn.Linear`` is taken as transformers' ``Conv1D`` (GPT-2's ``c_attn``): its
    weight is [in, out] and its forward ``x @ weight + bias``.

    The weight becomes a DTensor placed ``_StridedShard(dim, split_factor=parts)`` on its
    output-features dim: its full tensor is still the checkpoint's packed weight, and rank r's shard
    is the r-th slice of each part.  The bias (1-D: no dim left for FSDP to split apart from this
    one) stays whole, a replicated DTensor; each rank adds its slice of every part, and the slices'
    gradients are summed over tp.  The input is replicated (a DTensor input is redistributed to
    Replicate first); its gradient is a partial sum over the ranks, reduced where the input was
    redistributed.  The output is a local tensor."""

    def __init__(self, *, parts: int, input_layouts=None):
        super().__init__()
        self.parts = parts
        self.input_layouts = input_layouts or Replicate()

    def _apply(self, module, device_mesh):
        linear = isinstance(module, torch.nn.Linear)  # else Conv1D: weight [in, out]
        parts, rank, tp = self.parts, device_mesh.get_local_rank(), device_mesh.size()
        for name, param in list(module.named_parameters(recurse=False)):
            placement = Replicate()  # a bias: whole
            if param.ndim > 1:  # the weight's output features: a Linear's dim 0, a Conv1D's dim 1
                placement = _StridedShard(0 if linear else 1, split_factor=parts)
            sharded = distribute_tensor(param, device_mesh, [placement], src_data_rank=None)
            module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))
        input_layout = self.input_layouts

        def forward(x):
            if not isinstance(x, DTensor):
                x = DTensor.from_local(x, device_mesh, [input_layout], run_check=False)
            x = x.redistribute(device_mesh, [Replicate()]).to_local(grad_placements=[Partial()])
            weight = module.weight.to_local()
            bias = None
            if module.bias is not None:  # this rank's slice of every part
                whole = module.bias.to_local(grad_placements=[Partial()])
                bias = whole.view(parts, -1).chunk(tp, dim=1)[rank].reshape(-1)
            if linear:
                return F.linear(x, weight, bias)
            out = x.reshape(-1, x.shape[-1]) @ weight
            return (out if bias is None else out + bias).view(*x.shape[:-1], weight.shape[1])

        module.forward = forward
        return module


def _conv1d_partition(weight_placement, bias_placement, src_data_rank):
    """A ``distribute_module`` partition function for transformers' ``Conv1D`` (weight [in, out])."""

    def partition(name, module, device_mesh):
        for param_name, param in list(module.named_parameters(recurse=False)):
            placement = weight_placement if param_name == "weight" else bias_placement
            sharded = distribute_tensor(param, device_mesh, [placement], src_data_rank=src_data_rank)
            module.register_parameter(param_name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))

    return partition


class Conv1DColwiseParallel(ColwiseParallel):
    """torch's ``ColwiseParallel`` for transformers' ``Conv1D`` (GPT-2's ``c_fc``; a Linear whose
    weight is stored transposed, [in, out], and whose forward is ``x @ weight + bias``): the output
    features are the weight's dim 1 and the bias's dim 0.  Layouts and their defaults are torch's;
    the module's own forward runs on the DTensor parameters."""

    def _apply(self, module, device_mesh):
        return distribute_module(
            module,
            device_mesh,
            _conv1d_partition(Shard(1), Shard(0), self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


class Conv1DRowwiseParallel(RowwiseParallel):
    """torch's ``RowwiseParallel`` for transformers' ``Conv1D`` (weight [in, out]): the input
    features are the weight's dim 0; the bias stays replicated and is added once, after the
    partial sums are reduced, as for an ``nn.Linear``."""

    def _apply(self, module, device_mesh):
        self.desired_input_layouts = (Shard(-1),)  # as for nn.Linear: the input split on its features
        return distribute_module(
            module,
            device_mesh,
            _conv1d_partition(Shard(0), Replicate(), self.src_data_rank),
            partial(self._prepare_input_fn, self.input_layouts, self.desired_input_layouts),
            partial(self._prepare_output_fn, self.output_layouts, self.use_local_output),
        )


def expert_weight_dims(experts) -> dict:
    """{parameter name: (dim of the intermediate size, packed)} for a transformers MoE experts module,
    whose weights are 3-D: ``gate_up_proj`` [E, 2I, H] (or [E, H, 2I] when ``is_transposed``) packing
    [gate | up] (interleaved when not ``is_concatenated``), ``down_proj`` [E, H, I] (or [E, I, H]),
    their optional biases [E, 2I] and [E, H] (the latter: no intermediate dim, None)."""
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:  # Llama 4's experts say nothing: gate_up_proj [E, H, 2I] is transposed
        gate_up = experts._parameters.get("gate_up_proj")
        hidden = getattr(experts, "hidden_size", None)
        transposed = gate_up is not None and gate_up.ndim == 3
        transposed = transposed and gate_up.shape[1] == hidden != gate_up.shape[2]
    transposed = bool(transposed)
    packed = bool(getattr(experts, "is_concatenated", True))
    dims = {}
    for name, _ in experts.named_parameters(recurse=False):
        if name in ("gate_up_proj", "up_proj"):
            dims[name] = (2 if transposed else 1, packed and name == "gate_up_proj")
        elif name == "down_proj":
            dims[name] = (1 if transposed else 2, False)
        elif name in ("gate_up_proj_bias", "up_proj_bias"):
            dims[name] = (1, packed and name == "gate_up_proj_bias")
        elif name == "down_proj_bias":
            dims[name] = (None, False)
        else:
            raise ValueError(f"{type(experts).__name__}.{name}: not a weight of the known expert layouts")
    return dims


def expert_placements(experts, ep: bool, tp: bool) -> dict:
    """{parameter name: placements on the experts' mesh}: Shard(0) (whole experts) over ep, the
    intermediate dim over tp (strided when gate and up are packed), replicated otherwise."""
    placements = {}
    for name, (dim, packed) in expert_weight_dims(experts).items():
        over_tp = Replicate() if dim is None else _StridedShard(dim, split_factor=2) if packed else Shard(dim)
        placements[name] = ([Shard(0)] if ep else []) + ([over_tp] if tp else [])
    return placements


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.scale, None


@contextlib.contextmanager
def local_expert_weights(experts, tp_size: int, grad_scale: float = 1.0):
    """Run the experts' own forward on this rank's shards as plain tensors.  A weight replicated over
    tp that is added after the tp-sharded matmul (the down-projection bias) is scaled by 1/tp, so the
    sum over tp adds it once; its gradient is a pending sum over tp (Partial).  The weights'
    gradients are multiplied by ``grad_scale``."""
    saved = dict(experts._parameters)
    try:
        for name, param in saved.items():
            if not isinstance(param, DTensor):
                continue
            partial_grad = [Partial() if p.is_replicate() else p for p in param.placements]
            local = param.to_local(grad_placements=partial_grad)
            if grad_scale != 1.0:
                local = _ScaleGrad.apply(local, grad_scale)
            if tp_size > 1 and all(p.is_replicate() for p in param.placements[-1:]):
                local = local / tp_size
            experts._parameters[name] = local
        yield [p for p in experts._parameters.values() if p is not None]
    finally:
        experts._parameters.update(saved)


def _sum_grad_over(x, mesh):
    """Identity forward; backward sums the gradient over ``mesh`` (each rank's is a partial sum)."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _sum_over(x, mesh):
    """Sum of the ranks' partial tensors over ``mesh`` (all-reduce); backward passes the gradient on."""
    return (
        DTensor.from_local(x, mesh, [Partial()], run_check=False).redistribute(mesh, [Replicate()]).to_local()
    )


class ExpertTensorParallel(ParallelStyle):
    """Tensor parallel for a transformers MoE experts module (3-D weights, one slice per expert):
    each tp rank holds a slice of every expert's intermediate dim -- gate_up_proj split on 2I with
    [gate | up] packed (each rank a slice of gate and of up), down_proj on I.  The router stays
    replicated: every rank sees all tokens and routes them alike, runs its slice of every chosen
    expert, and one all-reduce after the experts sums the partial outputs.  The gradients of the
    replicated input and routing weights are summed over tp in backward."""

    def _apply(self, module, device_mesh):
        for name, placements in expert_placements(module, ep=False, tp=True).items():
            param = module._parameters[name]
            sharded = distribute_tensor(param, device_mesh, placements, src_data_rank=None)
            module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))
        experts_forward = module.forward
        tp = device_mesh.size()

        def forward(hidden_states, *args, **kwargs):
            hidden_states = _sum_grad_over(_local(hidden_states), device_mesh)
            # (top_k_index, top_k_weights, ...); Llama 4's experts take the routed tokens only
            if args or kwargs:
                args = list(args) + [kwargs.pop(k) for k in ("top_k_index", "top_k_weights") if k in kwargs]
                args[0] = _local(args[0])
                if len(args) > 1:
                    args[1] = _sum_grad_over(_local(args[1]), device_mesh)
            with local_expert_weights(module, tp):
                out = experts_forward(hidden_states, *args, **kwargs)
            return _sum_over(out, device_mesh)

        module.forward = forward
        return module


class MoEIdentityExpertParallel(ParallelStyle):
    """An identity ("zero-compute") expert inside experts under ``ExpertTensorParallel``: every rank
    computes it whole, and the experts' all-reduce sums it over tp, so its input is divided by tp
    here (the gradient, passed back through that sum, is divided alike and summed over tp where the
    experts' input is)."""

    def _apply(self, module, device_mesh):
        tp = device_mesh.size()

        def divide(module, args):
            return (args[0] / tp, *args[1:])

        module.register_forward_pre_hook(divide)
        return module


class LocalParamsParallel(ParallelStyle):
    """A module that uses some of its own parameters per attention head (attention sinks, a per-head
    gate bias) inside heads that colwise projections split over tp: those parameters are sharded
    on dim 0 (the heads) and the module's forward runs on this rank's slice of them as plain tensors,
    so each rank uses -- and computes the whole gradient of -- the entries of its own heads
    (transformers: ``local_params`` on the module with ``colwise`` on each parameter).  The
    module's other parameters are left as they are."""

    def __init__(self, *, sharded: tuple, input_layouts=None, desired_input_layouts=None, input_kwarg_layouts=None,
                 desired_input_kwarg_layouts=None, use_local_output: bool = False):
        super().__init__()
        self.sharded = tuple(sharded)
        layouts = {"input_layouts": input_layouts, "desired_input_layouts": desired_input_layouts,
                   "input_kwarg_layouts": input_kwarg_layouts,
                   "desired_input_kwarg_layouts": desired_input_kwarg_layouts}
        # the module's inputs prepared too (PrepareModuleInput), when it is also the module whose input
        # is gathered or shared
        self.prepare_input = (PrepareModuleInput(**layouts, use_local_output=use_local_output)
                              if any(v is not None for v in layouts.values()) else None)

    def _apply(self, module, device_mesh):
        if self.prepare_input is not None:
            self.prepare_input._apply(module, device_mesh)
        sharded = tuple(name for name in self.sharded if module._parameters.get(name) is not None)
        for name in sharded:
            param = module._parameters[name]
            shard = distribute_tensor(param, device_mesh, [Shard(0)], src_data_rank=None)
            module.register_parameter(name, torch.nn.Parameter(shard, requires_grad=param.requires_grad))
        forward = module.forward

        def local_forward(*args, **kwargs):
            saved = {name: module._parameters[name] for name in sharded}
            try:
                for name, param in saved.items():
                    module._parameters[name] = param.to_local()
                return forward(*args, **kwargs)
            finally:
                module._parameters.update(saved)

        module.forward = local_forward
        return module


class ReplicateGradAllReduce(ParallelStyle):
    """A module whose own parameters stay whole on every rank but whose gradient on each rank is a
    partial sum: it sees the same input everywhere, and the code after it uses its output for this
    rank's heads only (Dots3's norm of MLA's shared rotary key).  The parameters become replicated
    DTensors; the forward runs on their local values with gradients marked as a pending sum over tp,
    so the gradient reaching each parameter is summed over tp (transformers:
    ``replicated_with_grad_allreduce``)."""

    def _apply(self, module, device_mesh):
        for name, param in list(module.named_parameters(recurse=False)):
            whole = distribute_tensor(param, device_mesh, [Replicate()], src_data_rank=None)
            module.register_parameter(name, torch.nn.Parameter(whole, requires_grad=param.requires_grad))
        forward = module.forward

        def local_forward(*args, **kwargs):
            saved = dict(module._parameters)
            try:
                for name, param in saved.items():
                    if isinstance(param, DTensor):
                        module._parameters[name] = param.to_local(grad_placements=[Partial()])
                return forward(*args, **kwargs)
            finally:
                module._parameters.update(saved)

        module.forward = local_forward
        return module


class MLAKVAProjParallel(ParallelStyle):
    """MLA's ``kv_a_proj_with_mqa``: a replicated Linear whose output is [compressed kv | k_rot].
    The compressed kv goes on to a colwise ``kv_b_proj``, which sums its input gradient over tp.
    k_rot -- the last ``rope_dim`` features, one rotary key shared by every head -- goes straight
    into attention, where each rank uses it for its own heads only: its gradient on each rank is a
    partial sum, summed over tp here.  The weight is left whole; its gradient is then complete."""

    def __init__(self, *, rope_dim: int):
        super().__init__()
        self.rope_dim = rope_dim

    def _apply(self, module, device_mesh):
        rope_dim = self.rope_dim

        def sum_rope_grad(module, inputs, output):
            kv, rope = output.split([output.shape[-1] - rope_dim, rope_dim], dim=-1)
            return torch.cat([kv, _sum_grad_over(rope, device_mesh)], dim=-1)

        module.register_forward_hook(sum_rope_grad)
        return module


def _local(x):
    return x.to_local() if isinstance(x, DTensor) else x


class ExpertParallel(ParallelStyle):
    """Expert parallel for a transformers MoE experts module: each rank of the ``ep`` mesh dim holds
    E/ep whole experts (and, over ``tp``, a slice of each one's intermediate dim, as
    ExpertTensorParallel does).  The ep ranks hold different tokens (ep borrows its ranks from data
    parallelism); each rank routes its own tokens with the replicated router, sends every (token,
    chosen expert) pair to the rank owning that expert with one all-to-all, runs its experts on what
    it received, sends the outputs back with a second all-to-all, and sums them weighted by the
    routing weights.  Built with the 2-D ("ep", "tp") mesh; ``parallelize_module``'s tp mesh is
    ignored."""

    def __init__(self, *, experts_mesh):
        super().__init__()
        self.experts_mesh = experts_mesh

    def _apply(self, module, device_mesh):
        mesh = self.experts_mesh
        ep_mesh, tp_mesh = mesh["ep"], mesh["tp"]
        for name, placements in expert_placements(module, ep=True, tp=True).items():
            param = module._parameters[name]
            sharded = distribute_tensor(param, mesh, placements, src_data_rank=None)
            module.register_parameter(name, torch.nn.Parameter(sharded, requires_grad=param.requires_grad))
        local_experts = module.down_proj.to_local().shape[0]
        experts_forward = module.forward
        split_sizes = self.split_sizes

        def forward(hidden_states, top_k_index, top_k_weights, *args, **kwargs):
            hidden, index, weights = _local(hidden_states), _local(top_k_index), _local(top_k_weights)
            if tp_mesh.size() > 1:
                hidden = _sum_grad_over(hidden, tp_mesh)
            # dispatch: every (token, chosen expert) pair, ordered by the ep rank that owns the expert
            expert = index.reshape(-1)
            owner = torch.div(expert, local_experts, rounding_mode="floor")
            order = torch.argsort(owner, stable=True)
            token = torch.div(order, index.shape[1], rounding_mode="floor")
            send_counts = F.one_hot(owner, ep_mesh.size()).sum(0)
            send, recv = split_sizes(send_counts, ep_mesh, expert.numel())
            group = ep_mesh.get_group()
            received = funcol.all_to_all_single_autograd(hidden[token], recv, send, group)
            received = funcol.wait_tensor(received)
            local_expert = funcol.wait_tensor(funcol.all_to_all_single((expert % local_experts)[order], recv, send, group))
            ones = torch.ones(received.shape[0], 1, dtype=received.dtype, device=received.device)
            # the experts' gradients sum the tokens of every ep rank; like every other gradient they
            # must average over the ranks holding different data: FSDP divides by dp, this by ep
            with (
                local_expert_weights(module, tp_mesh.size(), 1.0 / ep_mesh.size()) as params,
                _attribute(module, "num_experts", local_experts),
            ):
                out = experts_forward(received, local_expert[:, None], ones, *args, **kwargs)
                # every local shard takes part (zero) even when none of its experts got a token
                out = out + sum(p.sum() for p in params) * 0.0
            if tp_mesh.size() > 1:
                out = _sum_over(out, tp_mesh)
            # combine: outputs back to the tokens' ranks, weighted and summed per token
            back = funcol.wait_tensor(funcol.all_to_all_single_autograd(out, send, recv, group))
            weighted = back * weights.reshape(-1)[order, None].to(back.dtype)
            return torch.zeros_like(hidden).index_add(0, token, weighted.to(hidden.dtype))

        module.forward = forward
        module.expert_parallel = True  # tpplan.plan.apply / train.py: FSDP shards these over dp alone
        return module

    @staticmethod
    def split_sizes(send_counts, ep_mesh, pairs):
        """(send, receive) split sizes of the all-to-all: each rank tells the others how many of its
        ``pairs`` it sends them (a small all-to-all of counts, read on the host)."""
        recv_counts = funcol.all_to_all_single(send_counts, None, None, ep_mesh.get_group())
        return send_counts.tolist(), funcol.wait_tensor(recv_counts).tolist()


@contextlib.contextmanager
def _attribute(obj, name, value):
    """``obj.name = value`` for the duration (when obj has that attribute)."""
    if not hasattr(obj, name):
        yield
        return
    before = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, before)


def fsdp_shard_placement(param):
    """FSDP2's ``shard_placement_fn``: weights that tpplan's own styles already split on dim 0 -- a
    packed weight (``_StridedShard(0)`` over tp) or whole experts over ep -- are sharded by FSDP on
    the first dim no other split uses, so the splits stay independent (FSDP's dim-0 shard on top of
    them misplaces rows of the full tensor, or cannot gather it); every other parameter gets FSDP's
    default, dim 0."""
    if not isinstance(param, DTensor):
        return None
    taken = {p.dim % param.ndim for p in param.placements if isinstance(p, (Shard, _StridedShard))}
    packed = any(isinstance(p, _StridedShard) and p.dim % param.ndim == 0 for p in param.placements)
    experts = "ep" in (param.device_mesh.mesh_dim_names or ()) and 0 in taken
    free = [dim for dim in range(param.ndim) if dim not in taken]
    if (packed or experts) and free:
        return Shard(free[0])
    return None
