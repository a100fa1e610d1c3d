"""Training-step helpers shared by ``tpplan check`` and the generated training script.

Each function here is self-contained (module level it needs only ``torch``, ``F`` and
``contextlib``; anything else is imported inside it) so the template can print its source into
``train.py`` verbatim: the code that ``check`` and the unit tests prove is the code that trains.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F


def logits_of(output):
    """The logits in a model's output: transformers' output object, or the tensor a model of your own returns."""
    return getattr(output, "logits", output)


def model_logits(model, input_ids, position_ids, positions_keyword):
    """The model's logits for ``input_ids`` (token ids by position; position ids by the keyword
    ``positions_keyword``, or not passed when it is None): a tensor, or an output with ``.logits``
    (transformers)."""
    kwargs = {} if positions_keyword is None else {positions_keyword: position_ids}
    return logits_of(model(input_ids, **kwargs))


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
            param.grad = grad.redistribute(
                grad.device_mesh, [Replicate() if p.is_partial() else p for p in grad.placements]
            )
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
    if max_norm == float("inf"):
        return total  # the norm only (for the logs): nothing to scale
    scale = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for grad in grads:
        local = grad.to_local() if isinstance(grad, DTensor) else grad
        local.mul_(scale.to(local.device, local.dtype))
    return total


def build_byte_bpe_tokenizer(texts, vocab_size: int, min_frequency: int = 2):
    """A byte-level BPE tokenizer trained on ``texts`` (no download), with ``<|endoftext|>`` as EOS.

    Deterministic: the same texts and sizes give the same tokenizer in every process."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos)


def pack_token_ids(token_ids, eos_id: int, length: int):
    """Concatenate documents, each followed by ``eos_id``, and cut the stream into rows of ``length``
    tokens (the tail that does not fill a row is dropped): a LongTensor [rows, length]."""
    stream = []
    for ids in token_ids:
        stream.extend(ids)
        stream.append(eos_id)
    rows = len(stream) // length
    return torch.tensor(stream[: rows * length], dtype=torch.long).view(rows, length)


def cosine_lr_multiplier(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float) -> float:
    """Linear warmup over ``warmup_steps`` (step 0 already gets 1/warmup of the peak), then a
    cosine decay from the peak to ``min_lr_ratio`` x peak at ``total_steps``."""
    import math

    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@contextlib.contextmanager
def parameters_on_meta():
    """Build modules with their parameters on the meta device (no memory) but their buffers real.

    Buffers such as rotary ``inv_freq`` are computed at construction and are in no checkpoint;
    keeping them real lets them survive ``to_empty`` (see ``materialize``)."""
    register = torch.nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and not param.is_meta:
            meta = torch.nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
            meta.__dict__.update(param.__dict__)
            module._parameters[name] = meta

    torch.nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def materialize(model, device) -> None:
    """Allocate the (meta, possibly sharded) parameters of ``model`` on ``device``, uninitialised,
    and put back the buffers that were computed at construction (``to_empty`` wipes them)."""
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if not buf.is_meta}
    # to_empty gives every module its own new tensors: a weight shared by two modules (tied
    # embeddings) would come apart.  Note who shares what, and share it again afterwards.
    places = {}
    for module in model.modules():
        for name, param in module._parameters.items():
            if param is not None:
                places.setdefault(id(param), []).append((module, name))
    model.to_empty(device=device)
    for (owner, owner_name), *others in (group for group in places.values() if len(group) > 1):
        for module, name in others:
            module._parameters[name] = owner._parameters[owner_name]
    with torch.no_grad():
        for name, value in buffers.items():
            model.get_buffer(name).copy_(value)


def checkpoint_steps(root) -> list:
    """The complete checkpoints under ``root``, oldest first: [(step, path)].

    A checkpoint is written to ``.step-N.partial`` and renamed to ``step-N`` only after every rank
    finished writing it, so only complete ones carry the final name."""
    import os
    import re

    found = []
    if os.path.isdir(root):
        for entry in os.listdir(root):
            match = re.fullmatch(r"step-(\d+)", entry)
            if match and os.path.isfile(os.path.join(root, entry, "trainer.json")):
                found.append((int(match.group(1)), os.path.join(root, entry)))
    return sorted(found)


def model_flops_per_token(model, seq_length: int, attention_size) -> float:
    """Training FLOPs per token (forward + backward): 6 per parameter outside the input embedding,
    plus attention's 12 x ``attention_size`` (layers x heads x head_dim; None: not counted) x
    sequence length (PaLM, appendix B; the count torchtitan reports MFU with).  A tied output
    projection counts (its matmul runs): a parameter counts once for every module that uses it."""
    if hasattr(model, "get_input_embeddings"):
        inputs = model.get_input_embeddings()
    else:
        inputs = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    embedding = getattr(inputs, "weight", None)
    params = sum(p.numel() for _, p in model.named_parameters(remove_duplicate=False) if p is not embedding)
    if embedding is not None:  # its other holders (a tied output projection) multiply
        holders = sum(1 for _, p in model.named_parameters(remove_duplicate=False) if p is embedding)
        params += embedding.numel() * (holders - 1)
    return 6 * params + 12 * (attention_size or 0) * seq_length


def device_peak_flops(device, compute_dtype):
    """Dense 16-bit tensor-core peak FLOP/s of one GPU, from its name (None where unknown: CPUs,
    float32 compute, GPUs not in the table)."""
    if device.type != "cuda" or compute_dtype not in (torch.bfloat16, torch.float16):
        return None
    name = torch.cuda.get_device_name(device)
    peaks = [  # (name contains, FLOP/s), most specific first
        ("GB200", 2.5e15),
        ("B200", 2.25e15),
        ("H100 PCIe", 756e12),
        ("H100 NVL", 835e12),
        ("H200", 989e12),
        ("H100", 989e12),
        ("H800", 989e12),
        ("H20", 148e12),
        ("A100", 312e12),
        ("A800", 312e12),
        ("L40S", 362e12),
        ("L4", 121e12),
        ("MI300X", 1307e12),
        ("MI250X", 383e12),
    ]
    return next((peak for key, peak in peaks if key in name), None)
