"""A model whose input embedding normalises its own output (as Inkling's does: an ``nn.Embedding``
subclass holding an RMSNorm run after the lookup).  A vocabulary split would send each rank's
partial sum through that norm before the ranks' shares are added, so the embedding stays whole."""

import torch
import torch.nn as nn
import torch.nn.functional as F


class NormedEmbedding(nn.Embedding):
    def __init__(self, vocab_size: int, dim: int):
        super().__init__(vocab_size, dim)
        self.embed_norm = nn.RMSNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.embed_norm(super().forward(tokens))


class Block(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.norm = nn.RMSNorm(dim)
        self.up = nn.Linear(dim, hidden, bias=False)
        self.gate = nn.Linear(dim, hidden, bias=False)
        self.down = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        return x + self.down(F.silu(self.gate(h)) * self.up(h))


class NormedEmbeddingModel(nn.Module):
    def __init__(self, vocab_size: int, dim: int, hidden: int, n_layers: int):
        super().__init__()
        self.embed = NormedEmbedding(vocab_size, dim)
        self.blocks = nn.ModuleList(Block(dim, hidden) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))
