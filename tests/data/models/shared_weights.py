"""A model whose only tie is in its parameters: in each block, two projections hold one weight
(``self.up_b.weight = self.up_a.weight``).  No config declares it and it is no input/output
embedding pair -- tpplan must find it by identity, keep it through sharding, and refuse a plan that
would shard its two holders differently."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up_a = nn.Linear(dim, hidden, bias=False)
        self.up_b = nn.Linear(dim, hidden, bias=False)
        self.up_b.weight = self.up_a.weight  # one projection, applied to two inputs
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(F.silu(self.up_a(h)) * self.up_b(0.5 * h))


class SharedWeights(nn.Module):
    def __init__(self, vocab_size: int, dim: int, hidden: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(n_layers))
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(h)
