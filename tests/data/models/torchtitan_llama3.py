"""torchtitan 0.3.0's own Llama 3 (``torchtitan.models.llama3``), built small for ``tpplan check``:
the optional test in tests/dist/test_anymodel.py runs it where torchtitan installs (it needs triton
and a huggingface-hub older than transformers takes: a separate environment, not the pinned one).

``Llama3ForTokens`` is torchtitan's ``Llama3Model`` whose forward takes the token ids alone, as
tpplan's training step passes them, and makes its positions.  Its inner attention is torchtitan's
``ScaledDotProductAttention`` (causal): the language models' flex and varlen backends have no
backward on CPU, where check runs."""

from __future__ import annotations

import torch
from torchtitan.models.common import ComplexRoPE, Embedding, Linear, RMSNorm
from torchtitan.models.common.attention import ScaledDotProductAttention
from torchtitan.models.llama3 import (
    _EMBEDDING_INIT,
    _LINEAR_INIT,
    _NORM_INIT,
    Llama3Model,
    _build_llama3_layers,
)


class Llama3ForTokens(Llama3Model):
    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand(tokens.shape[0], -1)
        return super().forward(tokens, positions=positions)


def llama3(vocab_size: int, dim: int, n_layers: int, n_heads: int, n_kv_heads: int, hidden_dim: int,
           max_seq_len: int = 256) -> Llama3ForTokens:
    """A Llama 3 of torchtitan's, fused wqkv, as its debug flavours build it, with causal SDPA inside."""
    config = Llama3ForTokens.Config(
        dim=dim, vocab_size=vocab_size,
        tok_embeddings=Embedding.Config(num_embeddings=vocab_size, embedding_dim=dim, param_init=_EMBEDDING_INIT),
        norm=RMSNorm.Config(normalized_shape=dim, param_init=_NORM_INIT),
        lm_head=Linear.Config(in_features=dim, out_features=vocab_size, param_init=_LINEAR_INIT),
        layers=_build_llama3_layers(
            fuse_qkv=True, n_layers=n_layers, dim=dim, n_heads=n_heads, n_kv_heads=n_kv_heads, hidden_dim=hidden_dim,
            rope=ComplexRoPE.Config(dim=dim // n_heads, max_seq_len=max_seq_len, theta=500000, scaling="none"),
            attn_backend="flex"))
    for layer in config.layers:  # flex attention has no backward on CPU
        layer.attention.inner_attention = ScaledDotProductAttention.Config()
    model = Llama3ForTokens(config)
    model.init_weights() if hasattr(model, "init_weights") else None
    return model
