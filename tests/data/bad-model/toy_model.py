"""A small model for the bad-model catalogue: the factories the specs here name."""

import torch.nn as nn


class Toy(nn.Module):
    def __init__(self, vocab_size, dim, n_layers):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, dim)
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))
        self.head = nn.Linear(dim, vocab_size)

    def forward(self, tokens):
        h = self.embed(tokens)
        for layer in self.layers:
            h = h + layer(h)
        return self.head(h)


def build(vocab_size, dim, n_layers=2):
    return Toy(vocab_size, dim, n_layers)


def build_nothing(vocab_size, dim):
    return None


NOT_CALLABLE = 3
