"""The baseline for benchmarks/run.py: tensor parallelism written by hand, the chapter's way.

The same model, plan and training step as `tpplan run benchmarks/specs/step-time.yaml`
(sequence parallel + loss parallel, AdamW with weight decay 0.1 and torch's default betas/eps, the
same cosine schedule, no clipping), written directly against torch.distributed.tensor.parallel.
The same batches too: with --data (run.py passes the spec's corpus) it trains a byte-level BPE
of --bpe-vocab tokens on the same texts, packs them into rows of --seq + 1 tokens and shuffles them
with the same DistributedSampler seed as the generated train.py, so that with the same seed the
losses of the two runs agree step by step (run.py compares them).  Without --data: random token
batches (ids below --bpe-vocab).  The batches are prepared before the loop: no data phase is timed.

Each step is timed in the phases of the generated train.py: forward (model + loss), backward,
update (optimizer + scheduler + zero_grad); rank 0 writes them to --out as JSON.

    torchrun --standalone --nproc-per-node 2 benchmarks/handwritten_tp.py --steps 12 --out times.json

With --config-json (a transformers config.json) the model is built from that file instead of the
--hidden/--layers/... flags; with one rank no plan is applied (tp=1, the CUDA benchmark).
"""

import argparse
import contextlib
import json
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    loss_parallel,
    parallelize_module,
)
from torch.utils.data import BatchSampler, DistributedSampler
from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig


def apply_tensor_parallel(model, tp_mesh):
    """The llama3 plan (specs/llama3.yaml): SP between blocks, vocab-sharded embedding and logits."""
    parallelize_module(model, tp_mesh, {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1), use_local_output=False),
        "model.norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Shard(-1), use_local_output=False),
    })
    for layer in model.model.layers:
        parallelize_module(layer, tp_mesh, {
            "input_layernorm": SequenceParallel(),
            "self_attn": PrepareModuleInput(
                input_kwarg_layouts={"hidden_states": Shard(1)},
                desired_input_kwarg_layouts={"hidden_states": Replicate()},
            ),
            "self_attn.q_proj": ColwiseParallel(),
            "self_attn.k_proj": ColwiseParallel(),
            "self_attn.v_proj": ColwiseParallel(),
            "self_attn.o_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
            "post_attention_layernorm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1), use_local_output=False),
        })


def byte_bpe_rows(path, vocab_size, length):
    """The corpus tokenized by a byte-level BPE trained on it (EOS after each document), packed into
    rows of ``length`` tokens: what the generated train.py trains on."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    with open(path) as f:
        texts = [text for text in (json.loads(line).get("text") for line in f if line.strip()) if text]
    eos = "<|endoftext|>"
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[eos],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    eos_id = tokenizer.token_to_id(eos)
    stream = []
    for encoding in tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(eos_id)
    rows = len(stream) // length
    return torch.tensor(stream[: rows * length], dtype=torch.long).view(rows, length)


def make_batches(args):
    """--steps batches of --batch rows of --seq + 1 tokens: inputs row[:-1], labels row[1:]."""
    if not args.data:
        generator = torch.Generator().manual_seed(args.seed + 1)
        return [torch.randint(0, args.bpe_vocab, (args.batch, args.seq + 1), generator=generator)
                for _ in range(args.steps)]
    rows = byte_bpe_rows(args.data, args.bpe_vocab, args.seq + 1)
    # one data-parallel replica: the sampler's shuffled order for epoch 0, 1, ... (as train.py's)
    sampler = DistributedSampler(rows, num_replicas=1, rank=0, shuffle=True, seed=args.seed, drop_last=True)
    batches, epoch = [], 0
    while len(batches) < args.steps:
        sampler.set_epoch(epoch)
        for indices in BatchSampler(sampler, args.batch, drop_last=True):
            batches.append(rows[indices])
            if len(batches) == args.steps:
                break
        epoch += 1
    return batches


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--config-json", help="build the model from this config.json instead of the flags above")
    parser.add_argument("--data", help="a JSON-lines corpus with a 'text' field (default: random tokens)")
    parser.add_argument("--bpe-vocab", type=int, default=2048,
                        help="the byte-level BPE trained on --data (without --data: token ids are drawn below this)")
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--weight-decay", type=float, default=0.1)
    parser.add_argument("--min-lr-ratio", type=float, default=0.1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    cuda = args.device == "cuda"
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo")
    world = dist.get_world_size()
    mesh = init_device_mesh(args.device, (1, world), mesh_dim_names=("dp", "tp"))
    tp_mesh = mesh["tp"]

    if args.config_json:
        with open(args.config_json) as f:
            values = json.load(f)
        config = AutoConfig.for_model(**values)
        config.use_cache = False
    else:
        config = LlamaConfig(
            hidden_size=args.hidden, intermediate_size=args.intermediate, num_attention_heads=args.heads,
            num_key_value_heads=args.kv_heads, num_hidden_layers=args.layers, vocab_size=args.vocab,
            max_position_embeddings=args.seq, use_cache=False,
        )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, args.dtype), attn_implementation="sdpa")
    model.to(device)
    if world > 1:
        apply_tensor_parallel(model, tp_mesh)
        if getattr(config, "tie_word_embeddings", False):
            model.lm_head.weight = model.model.embed_tokens.weight
    model.train()

    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)

    def cosine(step):  # no warm-up; cosine from lr to min_lr_ratio x lr over the run
        progress = min(1.0, step / max(1, args.steps))
        return args.min_lr_ratio + (1.0 - args.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine)
    batches = make_batches(args)
    position_ids = torch.arange(args.seq, device=device).unsqueeze(0).expand(args.batch, -1)
    loss_context = loss_parallel if world > 1 else contextlib.nullcontext

    def now():
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    times, losses = [], []
    for tokens in batches:
        tokens = tokens.to(device)
        t0 = now()
        logits = model(input_ids=tokens[:, :-1], position_ids=position_ids).logits
        with loss_context():
            loss = F.cross_entropy(logits.flatten(0, 1).float(), tokens[:, 1:].flatten(0, 1))
        t1 = now()
        with loss_context():
            loss.backward()
        t2 = now()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        t3 = now()
        phases = {"forward": 1000 * (t1 - t0), "backward": 1000 * (t2 - t1), "update": 1000 * (t3 - t2)}
        times.append({**phases, "step": sum(phases.values())})
        losses.append((loss.full_tensor() if hasattr(loss, "full_tensor") else loss).item())
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None
    if dist.get_rank() == 0:
        with open(args.out, "w") as f:
            json.dump({
                "step_ms": [t["step"] for t in times],
                "time_ms": times,
                "loss": losses,
                "tokens_per_step": args.batch * args.seq,
                "cuda_max_allocated_mib": peak,
                "config": config.to_dict(),
            }, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
