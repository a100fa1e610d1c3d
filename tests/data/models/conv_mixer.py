"""A model with nothing tensor parallelism can split: its blocks mix tokens with a depthwise
nn.Conv1d and have no Linear layers (held in an nn.Sequential).  derive must find the blocks and
refuse, naming what the blocks hold."""

from __future__ import annotations

import torch
import torch.nn as nn


class MixerBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mix = nn.Conv1d(dim, dim, kernel_size=3, padding=2, groups=dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixed = self.mix(self.norm(x).transpose(1, 2))[..., : x.shape[1]]  # causal: the first seq outputs
        return x + mixed.transpose(1, 2)


class ConvMixer(nn.Module):
    def __init__(self, vocab_size: int, dim: int, n_layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.blocks = nn.Sequential(*(MixerBlock(dim) for _ in range(n_layers)))
        self.norm = nn.LayerNorm(dim)
        self.output = nn.Linear(dim, vocab_size, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.output(self.norm(self.blocks(self.embed(tokens))))
