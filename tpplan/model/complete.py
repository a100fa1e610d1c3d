"""Completed default configs: transformers' default config of a model type, with the sizes it leaves None
filled where its own model cannot be built without them.

``tpplan zoo`` imports and ``tpplan derive`` (the zoo's derive column) derives every model type from its
default config; a few defaults leave a size None that the model reads (HunYuan's head_dim, DeepSeek-V2's
expert counts).  What this module fills is what the model's own fallbacks or its published checkpoints
would give, so the row is about the architecture, not about a hole in a default.
"""

from __future__ import annotations


def completed_default(model_type: str, *, tp: int) -> dict:
    """Sizes transformers' default config leaves None although its model needs them (HunYuan and
    Ministral: head_dim; Nemotron: num_key_value_heads; DeepSeek-V2, dots1: the MoE counts), filled
    the way the model's own fallbacks or published checkpoints fill them, and a vocabulary tp does
    not divide padded to a multiple of tp as resolve's refusal says to; {} when it builds as it is."""
    from transformers import AutoConfig

    from tpplan.model.sources import build_model

    config = AutoConfig.for_model(model_type)
    d = config.to_dict()
    fill = {}
    heads, hidden = d.get("num_attention_heads"), d.get("hidden_size")
    try:  # head_dim None is fine where the model falls back to hidden // heads itself (Mixtral)
        config._attn_implementation = "eager"
        build_model(config, device="meta")
        builds = True
    except Exception:  # noqa: BLE001
        builds = False
    if not builds and "head_dim" in d and d["head_dim"] is None and heads and hidden:
        fill["head_dim"] = hidden // heads
    if not builds and "num_key_value_heads" in d and d["num_key_value_heads"] is None and heads:
        fill["num_key_value_heads"] = heads
    if "n_routed_experts" in d:  # DeepSeek-style MoE: a None count ends in topk(k=None) mid-forward
        for key, value in (("n_routed_experts", 8), ("num_experts_per_tok", 2), ("n_shared_experts", 1),
                           ("n_group", 1), ("topk_group", 1)):
            if d.get(key, 0) is None:
                fill[key] = value
    if not builds:
        fill.update(_completed_by_kind(d))
    vocab = d.get("vocab_size")
    if isinstance(vocab, int) and vocab % tp:
        # HunYuan's 290943: resolve refuses a vocabulary tp does not divide, with the hint to pad it
        # (model.resize_token_embeddings(n, pad_to_multiple_of=tp)); the zoo takes that hint
        fill["vocab_size"] = -(-vocab // tp) * tp
    if not fill:
        return {}
    try:
        build_model(AutoConfig.for_model(model_type, **fill), device="meta")
    except Exception:  # noqa: BLE001 - not enough: import-hf refuses it with transformers' own error
        return {}
    return fill


def _completed_by_kind(d: dict) -> dict:
    """Fields whose None the model cannot build from, filled the way the model's own family does:

    - ``layer_types`` None where the model indexes it (LFM2-MoE): LFM2's hybrid stack of short
      convolutions with a full-attention layer after every two (conv, conv, full_attention, ...);
    - ``rope_parameters`` without an entry for a layer type the rotary embedding looks up (Cohere
      Compass): the default rope (theta 10000) for each layer type;
    - a token indexer whose sizes are all None although ``layer_types`` has indexed-attention layers
      (Qwen4-Exp's QSA): one key head of the attention's head_dim, as many query heads as the
      attention, a budget of 2048 tokens in blocks of 4 (the config's own checks: one kv head, the
      budget a multiple of the block, the rotary dims inside the index head)."""
    fill = {}
    layers = d.get("num_hidden_layers")
    if "layer_types" in d and d["layer_types"] is None and isinstance(layers, int) and "conv_L_cache" in d:
        fill["layer_types"] = ["full_attention" if i % 3 == 2 else "conv" for i in range(layers)]
    types = d.get("layer_types") or fill.get("layer_types") or []
    rope = d.get("rope_parameters")
    if types and isinstance(rope, dict) and not (set(types) & set(rope)) and "rope_theta" not in rope:
        fill["rope_parameters"] = {t: {"rope_type": "default", "rope_theta": 10000.0} for t in sorted(set(types))}
    indexer = {k: v for k, v in d.items() if k.startswith("indexer_")}
    if "indexed_attention" in types and indexer and all(v is None for v in indexer.values()):
        head_dim = d.get("head_dim") or (d.get("hidden_size") or 0) // max(1, d.get("num_attention_heads") or 1)
        values = {"indexer_n_heads": d.get("num_attention_heads"), "indexer_kv_heads": 1,
                  "indexer_head_dim": head_dim, "indexer_budget": 2048, "indexer_compress_ratio": 4}
        fill.update({k: v for k, v in values.items() if k in indexer})
    return fill
