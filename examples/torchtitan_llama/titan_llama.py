"""A Llama 3 shaped the way torchtitan (0.3.0, ``torchtitan/models/llama3``) writes it, in plain PyTorch.

Three things in it that a transformers model does not have, and that a tpplan spec must handle:

- the blocks sit in an ``nn.ModuleDict`` keyed "0", "1", ... (torchtitan keeps them there so a
  pipeline stage can drop some), not in an ``nn.ModuleList``;
- q, k and v come from one fused Linear, ``attention.qkv_linear.wqkv``, laid out per kv head:
  [n_kv_heads x (heads_per_kv query heads | 1 key | 1 value) x head_dim].  A contiguous colwise
  split hands each rank whole kv groups, so tp must divide n_kv_heads; the views use -1 for the
  head counts, so no fix-up is needed after sharding;
- the token embedding does its own vocabulary-parallel lookup once it is handed a process group
  (``tp_group``): each rank looks up the ids that fall in its rows and zeroes the others.  Summing
  the ranks' outputs is left to whoever handed it the group: torch's ``RowwiseParallel`` cannot
  drive it (its weight would be a DTensor the forward mixes with plain tensors), so this file
  brings its own ``ParallelStyle``, ``VocabParallelEmbedding``, which the spec names by import
  path (``style: titan_llama.py:VocabParallelEmbedding``).

The factory is the class ``TitanLlama``; its forward takes token ids [batch, seq] and returns logits.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class Embedding(nn.Embedding):
    """An embedding that runs vocabulary-parallel when it has a process group: its weight holds this
    rank's rows (torch.chunk's split of the vocabulary), the ids outside them look up nothing, and
    the output is this rank's part of a sum over the group."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        super().__init__(num_embeddings, embedding_dim)
        self.tp_group: dist.ProcessGroup | None = None

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weight = self.weight.to_local() if isinstance(self.weight, DTensor) else self.weight
        if self.tp_group is None:
            return F.embedding(tokens, weight)
        rows = -(-self.num_embeddings // dist.get_world_size(self.tp_group))
        first = dist.get_rank(self.tp_group) * rows
        mine = (tokens >= first) & (tokens < first + weight.shape[0])
        out = F.embedding((tokens - first).clamp(0, weight.shape[0] - 1), weight)
        return out * mine.unsqueeze(-1).to(out.dtype)


class VocabParallelEmbedding(ParallelStyle):
    """Shard an ``Embedding`` above on its vocabulary over the tp mesh, hand it the mesh's process
    group, and sum its partial outputs into ``output_layouts`` (Replicate: an all-reduce; Shard(1):
    a reduce-scatter onto the sequence, for sequence parallelism); a local tensor unless
    ``use_local_output`` is False."""

    def __init__(self, *, output_layouts=None, use_local_output: bool = True):
        super().__init__()
        self.output_layouts = output_layouts or Replicate()
        self.use_local_output = use_local_output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        rows = distribute_tensor(module.weight, device_mesh, [Shard(0)])
        module.register_parameter("weight", nn.Parameter(rows, requires_grad=module.weight.requires_grad))
        module.tp_group = device_mesh.get_group()
        layout, local = self.output_layouts, self.use_local_output

        def sum_over_tp(module, inputs, output):
            summed = DTensor.from_local(output, device_mesh, [Partial()], run_check=False)
            summed = summed.redistribute(device_mesh, [layout])
            return summed.to_local() if local else summed

        module.register_forward_hook(sum_over_tp)
        return module


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding of ``x`` [batch, seq, heads, head_dim] (cos, sin: [seq, head_dim // 2])."""
    first, second = x.float().chunk(2, dim=-1)
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1).type_as(x)


class FusedQKV(nn.Module):
    """q, k and v from one Linear laid out per kv head ([heads_per_kv q | k | v] for each kv head)."""

    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, head_dim: int):
        super().__init__()
        self.heads_per_kv = n_heads // n_kv_heads
        self.head_dim = head_dim
        self.wqkv = nn.Linear(dim, n_kv_heads * (self.heads_per_kv + 2) * head_dim, bias=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        batch, seq = x.shape[0], x.shape[1]
        qkv = self.wqkv(x).view(batch, seq, -1, self.heads_per_kv + 2, self.head_dim)  # -1: this rank's kv heads
        q, k, v = qkv.split([self.heads_per_kv, 1, 1], dim=3)
        return tuple(t.reshape(batch, seq, -1, self.head_dim) for t in (q, k, v))


class Attention(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int):
        super().__init__()
        if dim % n_heads or n_heads % n_kv_heads:
            raise ValueError(f"dim {dim} must divide by n_heads {n_heads}, n_heads by n_kv_heads {n_kv_heads}")
        self.n_heads, self.n_kv_heads, self.head_dim = n_heads, n_kv_heads, dim // n_heads
        self.qkv_linear = FusedQKV(dim, n_heads, n_kv_heads, self.head_dim)
        self.wo = nn.Linear(n_heads * self.head_dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv_linear(x)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [batch, heads, seq, head_dim]
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=q.shape[1] != k.shape[1])
        return self.wo(out.transpose(1, 2).flatten(2))


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden_dim, bias=False)
        self.w2 = nn.Linear(hidden_dim, dim, bias=False)
        self.w3 = nn.Linear(dim, hidden_dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, n_kv_heads: int, hidden_dim: int, norm_eps: float):
        super().__init__()
        self.attention = Attention(dim, n_heads, n_kv_heads)
        self.feed_forward = FeedForward(dim, hidden_dim)
        self.attention_norm = RMSNorm(dim, norm_eps)
        self.ffn_norm = RMSNorm(dim, norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x + self.attention(self.attention_norm(x), cos, sin)
        return h + self.feed_forward(self.ffn_norm(h))


class TitanLlama(nn.Module):
    """tok_embeddings -> layers ("0", "1", ...) -> norm -> output."""

    def __init__(self, vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int,
                 hidden_dim: int, max_seq_len: int = 2048, rope_theta: float = 500000.0, norm_eps: float = 1e-5):
        super().__init__()
        self.tok_embeddings = Embedding(vocab_size, dim)
        self.layers = nn.ModuleDict(
            {str(i): TransformerBlock(dim, n_heads, n_kv_heads, hidden_dim, norm_eps) for i in range(n_layers)})
        self.norm = RMSNorm(dim, norm_eps)
        self.output = nn.Linear(dim, vocab_size, bias=False)
        head_dim = dim // n_heads
        angles = torch.outer(torch.arange(max_seq_len, dtype=torch.float32),
                             1.0 / rope_theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        self.register_buffer("rope_cos", angles.cos(), persistent=False)
        self.register_buffer("rope_sin", angles.sin(), persistent=False)
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        seq = tokens.shape[1]
        cos, sin = self.rope_cos[:seq], self.rope_sin[:seq]
        h = self.tok_embeddings(tokens)
        for layer in self.layers.values():
            h = layer(h, cos, sin)
        return self.output(self.norm(h))
