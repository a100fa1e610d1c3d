"""The training step, written once.

``train.py`` prints these functions verbatim (as it prints ``runtime.py``), ``tpplan check`` runs
them on real gloo ranks against an unsharded model, and ``tpplan plan`` records them on a fake
process group: whatever a setting below changes is proven and simulated by construction.

Each function is self-contained: module level it needs only ``torch``, ``contextlib``, the
helpers of ``runtime.py`` (``model_logits``, ``causal_lm_loss``, ``clip_grad_norm_``) and
``patterns.matches``, which ``train.py`` prints first; anything else is imported inside.

- ``prepare_model``: float8 linears, tensor parallel (tied parameters tied again), activation
  checkpointing, ``torch.compile`` per block, FSDP2 with the mixed-precision policy (torchtitan's
  order); a tie that would come apart is refused, and every tie is verified at the end.
- ``forward_backward``: the micro-batches of one optimizer step (forward, loss, backward; FSDP
  reduce-scatters the gradients after the last one only).
- ``optimizer_step``: unscale (fp16), clip, AdamW, zero the gradients.
"""

from __future__ import annotations

import contextlib

import torch

from tpplan.core.patterns import matches
from tpplan.runtime.helpers import causal_lm_loss, clip_grad_norm_, model_logits
from tpplan.runtime.precision import PRECISION_DTYPES


def precision_dtypes(precision: str):
    """(parameter, compute, gradient-reduction) dtypes of a ``train.precision`` (``PRECISION_DTYPES``).

    The parameters are what AdamW updates and keeps its two moments for: float32 master weights
    under ``bf16-mixed`` and ``fp16-mixed``, which compute and communicate in the lower precision
    and reduce gradients in float32; ``bf16`` is pure bfloat16 (weights, gradients and AdamW state)."""
    return tuple(getattr(torch, name) for name in PRECISION_DTYPES[precision])


def block_names(model, blocks) -> list:
    """The names of the model's transformer blocks, in order: the modules whose name matches one of
    the module-name patterns ``blocks`` (the spec's ``model.blocks``, or what resolve found)."""
    return [name for name, _ in model.named_modules() if name and any(matches(p, name) for p in blocks)]


def tie_again(model, tied) -> list:
    """Give every holder of a tied parameter the first holder's parameter again: parallelize_module
    gives each module new DTensor parameters, which unties a parameter held by several modules (an
    output projection tied to the embedding).  ``tied``: the parameter names of each tie, the one
    kept first.  Returns what was tied again, as ``other = owner``."""
    retied = []
    for owner, *others in tied:
        param = model.get_parameter(owner)
        for name in others:
            module, _, attr = name.rpartition(".")
            holder = model.get_submodule(module)
            if getattr(holder, attr) is not param:
                setattr(holder, attr, param)
                retied.append(f"{name} = {owner}")
    return retied


def untied(model, tied) -> list:
    """The ties that came apart: names of one parameter in the unsharded model that are no longer
    one parameter object."""
    return [names for names in tied if len({id(model.get_parameter(name)) for name in names}) > 1]


def check_ties(model, tied) -> None:
    """Stop if a tie came apart (no silent untie): see ``untied``."""
    for names in untied(model, tied):
        raise SystemExit(f"tied weights came apart: {' and '.join(names)} are no longer one parameter")


def split_ties(tied, units) -> list:
    """Tied parameters whose holders are in different FSDP units (``units``: the block names; the
    rest is the root's): FSDP2 would shard the parameter in one unit while the other kept the stale
    original as a parameter of its own.  ``[(names, their units)]``."""

    def unit_of(name):
        inside = [unit for unit in units if name.startswith(unit + ".")]
        return max(inside, key=len) if inside else "(root)"

    found = []
    for names in tied:
        homes = sorted({unit_of(name) for name in names})
        if len(homes) > 1:
            found.append((tuple(names), homes))
    return found


def checkpointed_blocks(count: int, activation_checkpointing) -> list:
    """Indices of the blocks whose activations are recomputed in backward: none, every block
    ("full", "selective"), or every N-th (an integer N: blocks N-1, 2N-1, ...)."""
    if activation_checkpointing == "none":
        return []
    every = 1 if activation_checkpointing in ("full", "selective") else int(activation_checkpointing)
    return [index for index in range(count) if (index + 1) % every == 0]


def selective_checkpoint_context():
    """torchtitan's op-level selective activation checkpointing: keep the outputs of the matmuls,
    of attention and of tensor parallel's reduce-scatters (and ``max``, which float8 scaling reads);
    recompute everything else (norms, activation functions, rotary embeddings, residual adds)
    in backward.  A fresh context per block call (``torch.utils.checkpoint``'s ``context_fn``)."""
    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    aten = torch.ops.aten
    keep = {
        aten.mm.default,
        aten.addmm.default,
        aten._scaled_dot_product_flash_attention.default,
        aten._scaled_dot_product_efficient_attention.default,
        aten._scaled_dot_product_cudnn_attention.default,
        aten._scaled_dot_product_flash_attention_for_cpu.default,
        aten.max.default,
    }
    if hasattr(torch.ops, "_c10d_functional"):
        keep.add(torch.ops._c10d_functional.reduce_scatter_tensor.default)

    def policy(ctx, func, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if func in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return create_selective_checkpoint_contexts(policy)


def apply_activation_checkpointing(blocks, activation_checkpointing) -> None:
    """Recompute the activations of the chosen blocks in backward instead of keeping them: each
    block's forward runs under ``torch.utils.checkpoint`` (non-reentrant).  The block stays where it
    is (no wrapper module): parameter names, the tensor-parallel plan and FSDP units are unchanged."""
    import functools

    from torch.utils.checkpoint import checkpoint

    options = {"use_reentrant": False}
    if activation_checkpointing == "selective":
        options["context_fn"] = selective_checkpoint_context
    for index in checkpointed_blocks(len(blocks), activation_checkpointing):
        block = blocks[index]
        block.forward = functools.partial(checkpoint, block.forward, **options)


def convert_to_float8(blocks) -> None:
    """torchao float8 training: the Linear layers of the transformer blocks compute in float8 with
    tensorwise dynamic scales, and FSDP all-gathers their weights in float8 (half of bfloat16's
    bytes).  The embedding and the output projection stay in the compute dtype (torchtitan's
    choice); layers whose sizes are not multiples of 16 cannot use float8 matmuls and are skipped."""
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError:
        raise SystemExit(
            "train.float8 needs torchao: pip install torchao (a build matching your torch)"
        ) from None
    config = Float8LinearConfig(enable_fsdp_float8_all_gather=True)

    def eligible(module, name):
        return (
            isinstance(module, torch.nn.Linear)
            and module.in_features % 16 == 0
            and module.out_features % 16 == 0
        )

    for block in blocks:
        convert_to_float8_training(block, config=config, module_filter_fn=eligible)


def require_gpu_features(device, float8: bool, async_tp: bool) -> None:
    """Refuse float8 and async TP where they cannot run: float8 matmuls need an NVIDIA GPU of compute
    capability 8.9 or newer (Ada, Hopper, Blackwell); async TP's symmetric memory needs Hopper (9.0)
    or newer."""
    wanted = [name for name, on in (("train.float8", float8), ("mesh.async_tp", async_tp)) if on]
    if not wanted:
        return
    if device.type != "cuda":
        raise SystemExit(f"{' and '.join(wanted)} need NVIDIA GPUs; this run is on {device.type}")
    capability = torch.cuda.get_device_capability(device)
    name = torch.cuda.get_device_name(device)
    if float8 and capability < (8, 9):
        raise SystemExit(f"train.float8 needs compute capability 8.9+ (H100, L40S); {name} has {capability}")
    if async_tp and capability < (9, 0):
        raise SystemExit(f"mesh.async_tp needs compute capability 9.0+ (H100); {name} has {capability}")


def enable_async_tp() -> None:
    """Async tensor parallel: inductor splits each all-gather + matmul (and matmul + reduce-scatter)
    of the compiled blocks into chunks that overlap communication with compute, through symmetric
    memory on the tp group (torch 2.7+ sets that up by itself).  Needs ``torch.compile``."""
    import torch._inductor.config

    torch._inductor.config._micro_pipeline_tp = True


def data_parallel_mesh(mesh):
    """The ranks that hold different data: ``mesh["dp"]``, or dp x ep flattened into one mesh dim
    when the mesh has an expert-parallel dim (the ep ranks of a dp rank split its batch)."""
    if "ep" not in (mesh.mesh_dim_names or ()) or mesh["ep"].size() == 1:
        return mesh["dp"]
    return mesh["dp", "ep"]._flatten("dp_ep")


def apply_fsdp(model, blocks, mesh, precision, shard_placement_fn=None) -> None:
    """FSDP2 over the ranks that hold different data (dp, or dp x ep): one unit per transformer
    block, then the root (embedding, final norm, output projection); expert-parallel experts are
    units of their own over dp alone (each ep rank holds other experts).  The mixed-precision
    policy all-gathers the float32 master weights cast to the compute dtype and reduce-scatters
    gradients in float32; the sharded parameters, their gradients and AdamW's state stay in the
    parameter dtype (``precision`` None: no policy, parameters as they are).  ``shard_placement_fn``:
    which dim FSDP splits each weight on (None: dim 0)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy()
    if precision is not None:
        _, compute_dtype, reduce_dtype = precision_dtypes(precision)
        policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=reduce_dtype)
    options = {"mp_policy": policy, "shard_placement_fn": shard_placement_fn}
    for module in model.modules():
        if getattr(module, "expert_parallel", False):
            fully_shard(module, mesh=mesh["dp"], **options)
    data_mesh = data_parallel_mesh(mesh)
    for block in blocks:
        fully_shard(block, mesh=data_mesh, **options)
    fully_shard(model, mesh=data_mesh, **options)


def prepare_model(
    model,
    mesh,
    apply_tensor_parallel,
    *,
    blocks,
    tied=(),
    precision="fp32",
    activation_checkpointing="none",
    compile=False,
    float8=False,
    async_tp=False,
    shard_placement_fn=None,
):
    """Shard ``model`` (on the meta device, or real) for training, in torchtitan's order: float8
    linears, tensor parallel over ``mesh["tp"]`` (and expert parallel over ``mesh["ep"]``:
    ``apply_tensor_parallel(model, mesh)``, the plan), activation checkpointing, ``torch.compile``
    per block, FSDP2 over the data-parallel ranks.  ``blocks``: the transformer blocks' module-name
    patterns (one FSDP2 unit each); ``tied``: the parameter names of each parameter held by several
    modules, tied again after tensor parallel and verified at the end.

    FSDP2 also runs on a data-parallel mesh of one rank when the precision is mixed: its
    mixed-precision policy is then how the float32 master weights are cast to the compute dtype,
    the same way for every mesh (so a tp-only run computes exactly as a dp x tp run)."""
    tp = mesh["tp"].size()
    ep = mesh["ep"].size() if "ep" in (mesh.mesh_dim_names or ()) else 1
    units = block_names(model, blocks)
    blocks = [model.get_submodule(name) for name in units]
    if float8:
        convert_to_float8(blocks)
    if tp > 1 or ep > 1:
        apply_tensor_parallel(model, mesh)
        tie_again(model, tied)
        if async_tp:
            enable_async_tp()
    apply_activation_checkpointing(blocks, activation_checkpointing)
    if compile:
        for block in blocks:
            block.compile()  # in place: the block keeps its name (no _orig_mod. prefix)
    param_dtype, compute_dtype, _ = precision_dtypes(precision)
    if data_parallel_mesh(mesh).size() > 1 or compute_dtype != param_dtype:
        for names, homes in split_ties(tied, units):
            raise SystemExit(
                f"{' and '.join(names)} are one parameter held in different FSDP units ({', '.join(homes)}): "
                "FSDP2 would untie them; choose the blocks so that one unit holds every holder"
            )
        apply_fsdp(model, blocks, mesh, precision, shard_placement_fn)
    check_ties(model, tied)
    return model


def set_gradient_sync(model, sync: bool) -> None:
    """FSDP2: reduce-scatter gradients in this backward (``True``), or keep accumulating them
    unsharded on each rank (``False``, for the micro-batches before the last)."""
    if hasattr(model, "set_requires_gradient_sync"):
        model.set_requires_gradient_sync(sync)


def forward_backward(
    model,
    micro_batches,
    position_ids,
    *,
    loss_parallel: bool,
    positions="position_ids",
    loss_scale=None,
    phase=None,
):
    """Forward, loss and backward of the micro-batches of one optimizer step; returns their mean
    loss (detached).

    ``micro_batches``: ``[(input_ids, labels)]``, labels already shifted.  Each micro-batch's loss is
    divided by their number, so the gradients of N micro-batches of b sequences add up in ``.grad``
    to those of one batch of N x b.  FSDP reduce-scatters them after the last micro-batch only.
    ``positions``: the keyword the model's forward takes position ids by (None: not passed; see
    ``model_logits``).  ``loss_scale`` multiplies the loss before backward (fp16).  ``phase(name)``
    is a context manager around each "forward" and "backward" (the script's timers, the
    simulator's recorder)."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import loss_parallel as vocab_parallel_loss

    phase = phase or (lambda name: contextlib.nullcontext())
    loss_context = vocab_parallel_loss if loss_parallel else contextlib.nullcontext
    losses = []
    for index, (input_ids, labels) in enumerate(micro_batches):
        set_gradient_sync(model, index == len(micro_batches) - 1)
        with phase("forward"):
            # position ids passed explicitly: transformers would otherwise derive them from the
            # local (sequence-sharded) length; one row per sequence, as transformers builds them
            # (Qwen4-Exp's token indexer reads its rotary tables by batch row)
            rows = position_ids.expand(input_ids.shape[0], -1)
            logits = model_logits(model, input_ids, rows, positions)
            with loss_context():
                loss = causal_lm_loss(logits, labels) / len(micro_batches)
        del logits  # backward does not need them (the loss kept its own float32 log-softmax)
        with phase("backward"), loss_context():
            (loss if loss_scale is None else loss * loss_scale).backward()
        loss = loss.detach()
        losses.append(loss.full_tensor() if isinstance(loss, DTensor) else loss)
    return torch.stack(losses).sum()


def optimizer_step(model, optimizer, *, max_grad_norm=None, loss_scaler=None, phase=None):
    """Unscale the gradients (fp16), clip their total norm to ``max_grad_norm`` (None: measure it
    only, for the logs), step the optimizer and zero the gradients; returns the norm before
    clipping.  With a loss scaler, a step whose gradients overflowed is skipped (the norm is the
    same on every rank, so every rank skips it)."""
    phase = phase or (lambda name: contextlib.nullcontext())
    with phase("update"):
        if loss_scaler is not None:
            loss_scaler.unscale_(model.parameters())
        norm = clip_grad_norm_(model.parameters(), max_grad_norm or float("inf"))
        if loss_scaler is None or loss_scaler.update(norm):
            optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return norm


class LossScaler:
    """Dynamic loss scaling for ``fp16-mixed``: the loss is multiplied by ``scale`` before backward
    so small gradients survive float16; the gradients are divided by it before clipping.  A step
    whose gradient norm is not finite is skipped and the scale halved; after ``growth_interval``
    good steps in a row it doubles."""

    def __init__(self, scale: float = 2.0**16, growth_interval: int = 2000):
        self.scale = scale
        self.growth_interval = growth_interval
        self.good_steps = 0

    @torch.no_grad()
    def unscale_(self, parameters) -> None:
        from torch.distributed.tensor import DTensor

        for param in parameters:
            if param.grad is not None:
                grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
                grad.mul_(1.0 / self.scale)

    def update(self, grad_norm) -> bool:
        """Whether to take the step; adjusts the scale."""
        if not torch.isfinite(grad_norm).item():
            self.scale, self.good_steps = self.scale / 2, 0
            return False
        self.good_steps += 1
        if self.good_steps % self.growth_interval == 0:
            self.scale *= 2
        return True

    def state_dict(self) -> dict:
        return {"scale": self.scale, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict) -> None:
        self.scale, self.good_steps = state["scale"], state["good_steps"]
