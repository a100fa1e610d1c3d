"""The shrunken twin's config: the same architecture at toy widths, for ``check`` and import-hf's probe.

One generic pass over the config's own fields (``to_dict()``, then the config class builds and
validates the result, so derived read-only properties such as Bamba's ``layers_block_type`` or
Jamba's ``layer_types`` follow from the fields they are computed from):

- **widths** by what a field is, read from its name: heads, kv heads, head dims, MLP widths, MoE
  counts, vocabulary.  Heads: kv heads become ``2 x tp`` where the model has that many (two per rank,
  so the order of heads inside a rank's slice matters), else ``tp``; query heads keep their group
  ratio (capped at 2), head dims become 16, hidden = heads x head_dim, MLP widths keep their ratio to
  hidden (rounded to a multiple of 2 x tp).  Sliding and chunked windows become 4, shorter than
  the twin's sequence, so they mask; at most 4 experts, grouped routing kept as 2 groups.
- **layers**: every kind of layer the model has, kept once.  A layer's kind is its module
  structure in a cheap model of the model (the widths already shrunk, all layers, meta device):
  class names of its submodules and parameter shapes, so dense vs MoE blocks, attention vs SSM
  mixers and per-layer head sizes all count.  The twin keeps the shortest prefix of layers holding
  every kind (DeepSeek-V3's dense first layers, Jamba's attention every 8th, Gemma 3's full
  attention every 6th); when no short prefix does, one layer of each kind, with per-layer lists
  (``layer_types``, ``mlp_layer_types`` ...), per-layer overrides (``per_layer_config``) and
  layer-index lists (``mlp_only_layers``, ``attn_layer_indices``) remapped to the kept layers.

Special cases, each for a reason the generic pass cannot see, are commented where they are made.
"""

from __future__ import annotations

import copy
import re

# the last of each: encoder-decoder configs (BART, Pegasus, Whisper ...), whose *ForCausalLM runs the decoder
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "decoder_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model", "dim")
HEAD_KEYS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "attention_heads", "decoder_attention_heads")
KV_KEYS = ("num_key_value_heads", "n_kv_heads", "num_kv_heads", "multi_query_group_num", "n_head_kv")
HEAD_DIM_KEYS = ("head_dim", "kv_channels", "attention_head_dim", "indexer_head_dim")
EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts", "n_experts",
               "num_routed_experts")
TOP_K_KEYS = ("num_experts_per_tok", "moe_k", "moe_topk", "top_k_experts", "num_selected_experts",
              "experts_per_token", "moe_top_k", "num_experts_per_token")
SHARED_EXPERT_KEYS = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
# MLA (DeepSeek-V2/V3, MiniCPM3, GLM-4-MoE-Lite, Kimi, ...): low-rank q/kv projections and a head
# split into a rotary and a non-rotary part; each must shrink with the head or the rope no longer fits
MLA_DIMS = {"q_lora_rank": 16, "kv_lora_rank": 16, "qk_rope_head_dim": 4, "qk_nope_head_dim": 8, "v_head_dim": 8,
            "index_head_dim": 8, "o_lora_rank": 16}
# head dim 16, not 8: the twin has 8 heads at tp=2 (2 kv heads per rank, 2 query heads each), and resolve reads a
# width that is a multiple of head_dim as heads (Laguna's per-head gate g_proj, 8 wide, would be "1 head")
TWIN_HEAD_DIM = 16
# sliding and chunked attention windows; the twin's is shorter than its sequence (check.TWIN_SEQ_PER_TP x tp)
WINDOW_KEYS = ("sliding_window", "attention_chunk_size", "sliding_window_size")
TWIN_WINDOW = 4
MAX_PREFIX = 12  # layers; a model whose kinds are further apart keeps one layer of each, remapped
_META_KEYS = ("transformers_version", "architectures", "_name_or_path", "auto_map", "torch_dtype", "dtype",
              "id2label", "label2id", "_commit_hash")


def _int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _first(d: dict, keys) -> str | None:
    return next((k for k in keys if _int(d.get(k)) and d[k] > 0), None)


def _read_only(config, key: str) -> bool:
    attr = getattr(type(config), key, None)
    return isinstance(attr, property) and attr.fset is None


def config_get(config, key: str, default=None):
    """``getattr(config, key, default)``, except that a per-layer attribute of a heterogeneous config
    (Gemma 4's head_dim, dots3's num_attention_heads: transformers raises when they are read globally)
    gives its global value, the one every layer without an override uses."""
    try:
        return getattr(config, key, default)
    except Exception as exc:  # noqa: BLE001 - AmbiguousGlobalPerLayerAttributeError, not an AttributeError
        if type(exc).__name__ != "AmbiguousGlobalPerLayerAttributeError":
            raise
        return vars(config).get(key, default)


def config_values(config, key: str) -> set:
    """Every value ``key`` takes in ``config``: the global one and each layer's override."""
    values = {config_get(config, key)}
    if "_heterogeneity_spec" in vars(config):  # per_layer_config: one config per layer
        layers = config_get(config, "per_layer_config")
        for i in range(config_get(config, "num_hidden_layers") or 0):
            values.add(getattr(layers[i], key, None))
    return {v for v in values if v is not None}


def _build(model_type: str, d: dict):
    from transformers import AutoConfig

    d = copy.deepcopy(d)
    d.pop("model_type", None)
    return AutoConfig.for_model(model_type, **d)


def shrink_config(config, tp: int, *, layers: int = 2, head_dim: int = TWIN_HEAD_DIM, vocab: int | None = None):
    """A small twin of ``config``: same architecture and ratios, widths that still divide by ``tp``,
    one layer of each kind (at least ``layers`` layers)."""
    import json

    key = (json.dumps(config.to_dict(), sort_keys=True, default=str), tp, layers, head_dim, vocab)
    d = _SHRUNK.get(key)
    if d is None:  # finding the layer kinds builds the model with every layer (meta): once per config
        d = _shrunk_dict(config, tp, layers=layers, head_dim=head_dim, vocab=vocab)
        _SHRUNK.clear() if len(_SHRUNK) > 32 else None
        _SHRUNK[key] = d
    d = copy.deepcopy(d)
    model_type = d.pop("model_type", None) or config.model_type
    twin = _build(model_type, d)
    twin._attn_implementation = getattr(config, "_attn_implementation", None)
    return twin


_SHRUNK: dict = {}  # shrink_config's results by the config's fields (import-hf's probes, check, derive share them)


def _shrunk_dict(config, tp: int, *, layers: int, head_dim: int, vocab: int | None) -> dict:
    d = {k: v for k, v in config.to_dict().items() if k not in _META_KEYS and not _read_only(config, k)}
    model_type = d.get("model_type") or config.model_type
    # composite configs (Llama 4, multimodal models): their sub-configs shrink the same way
    for key, value in list(d.items()):
        if not (isinstance(value, dict) and "model_type" in value):
            continue  # (reading every key would raise on per-layer attributes: Gemma 4's head_dim)
        sub = getattr(config, key, None)
        if hasattr(sub, "to_dict"):
            try:
                d[key] = _shrunk_dict(sub, tp, layers=layers, head_dim=head_dim, vocab=vocab)
            except Exception:  # noqa: BLE001 - a sub-config that cannot shrink stays as it is
                pass
    old = dict(d)
    _shrink_widths(d, old, tp, head_dim)
    _shrink_experts(d, old)
    d["vocab_size"] = vocab or _round_up(256, tp)
    for key in ("vocab_size_per_layer_input",):  # Gemma 3n / 4: a second, per-layer embedding table
        if _int(d.get(key)):
            d[key] = d["vocab_size"]
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length"):
        if _int(d.get(key)):
            d[key] = min(d[key], 256)
    for key in WINDOW_KEYS:  # shorter than the twin's sequence (8 x tp): the window masks something
        if _int(d.get(key)) and d[key] > TWIN_WINDOW:
            d[key] = TWIN_WINDOW
    for key in [k for k in d if k.endswith(("_token_id", "_token_index"))]:
        value = d.get(key)
        if _int(value) and value >= d["vocab_size"]:
            d[key] = d["vocab_size"] - 1
        elif isinstance(value, list):
            d[key] = [min(v, d["vocab_size"] - 1) if _int(v) else v for v in value]
    for key, value in list(d.items()):
        if isinstance(value, float) and ("dropout" in key or "pdrop" in key):  # OPT activation_dropout too
            d[key] = 0.0
    _keep_layer_kinds(d, model_type, layers)
    return d


def _shrink_widths(d: dict, old: dict, tp: int, head_dim: int) -> None:
    shrunk = _shrink_heads(d, old, tp, head_dim)
    if shrunk is None:
        return
    new_kv, hidden = shrunk
    _shrink_head_dims(d, old, head_dim)
    _shrink_mlp_widths(d, old, tp, hidden)
    _shrink_mixers(d, old, tp, hidden, head_dim)
    # Gemma 3n / 4: the per-layer input embedding width
    if _int(old.get("hidden_size_per_layer_input")) and old["hidden_size_per_layer_input"]:
        d["hidden_size_per_layer_input"] = head_dim
    _shrink_layer_overrides(d, old, new_kv)


def _shrink_heads(d: dict, old: dict, tp: int, head_dim: int) -> tuple[int, int] | None:
    """Heads, kv heads and hidden; per-layer head counts.  Returns (kv heads, hidden), None without heads."""
    heads_key, kv_key = _first(d, HEAD_KEYS), _first(d, KV_KEYS)
    hidden_key = _first(d, HIDDEN_KEYS)
    if heads_key is None or hidden_key is None:
        return None
    heads = old[heads_key]
    kv = old[kv_key] if kv_key else heads
    group = max(1, min(2, heads // max(1, kv)))
    # two kv heads per rank where the model has them (the order of heads inside a rank's slice matters),
    # else one; query heads keep their group (two per kv head where the model groups them)
    new_kv = 2 * tp if kv >= 2 * tp else tp
    new_heads = new_kv * group
    hidden = new_heads * head_dim
    d[heads_key], d[hidden_key] = new_heads, hidden
    if heads_key == "decoder_attention_heads" and _int(d.get("encoder_attention_heads")):
        d["encoder_attention_heads"] = new_heads  # the encoder shares d_model
    if kv_key:
        d[kv_key] = new_kv
    # per-layer head counts (Laguna's num_attention_heads_per_layer): each layer keeps its own group
    # ratio over the new kv heads, as the global count does
    for key, value in old.items():
        if (isinstance(value, list) and value and all(_int(v) and v > 0 for v in value)
                and key.startswith(tuple(HEAD_KEYS + KV_KEYS)) and key not in (heads_key, kv_key)):
            is_kv = key.startswith(KV_KEYS)
            d[key] = [new_kv if is_kv else new_kv * max(1, min(2, v // max(1, kv))) for v in value]
    # Kolibri's token indexer reads at most the query heads of one kv head: keep it within the twin's group
    if _int(old.get("index_num_heads")) and old["index_num_heads"] > group:
        d["index_num_heads"] = group
    return new_kv, hidden


def _old_head_dim(old: dict) -> int:
    heads = old[_first(old, HEAD_KEYS)]
    return next((old[k] for k in HEAD_DIM_KEYS if _int(old.get(k)) and old[k]), None) or old[_first(old, HIDDEN_KEYS)] // heads


def _shrink_head_dims(d: dict, old: dict, head_dim: int) -> None:
    """Head dims (MLA's several in proportion) and partial rotary widths."""
    old_head_dim = _old_head_dim(old)
    # head dims: 8, or in proportion where a model pairs several (MLA below)
    for key in HEAD_DIM_KEYS:
        if _int(d.get(key)) and d[key]:
            d[key] = head_dim
    mla = {k: v for k, v in MLA_DIMS.items() if _int(old.get(k)) and old[k]}
    for key, value in mla.items():
        d[key] = value
    if "qk_rope_head_dim" in mla and _int(old.get("head_dim")):
        # DeepSeek-V3's config says head_dim = qk_rope_head_dim (the rotary part sizes the rope);
        # others say head_dim = rope + nope (the whole query head): keep whichever relation held
        rope, nope = old["qk_rope_head_dim"], old.get("qk_nope_head_dim") or 0
        if old["head_dim"] == rope:
            d["head_dim"] = d["qk_rope_head_dim"]
        elif old["head_dim"] == rope + nope:
            d["head_dim"] = d["qk_rope_head_dim"] + d.get("qk_nope_head_dim", 0)
    if "qk_rope_head_dim" in mla and _int(old.get("qk_head_dim")):  # LongCat, Kimi: the whole query head
        d["qk_head_dim"] = d["qk_rope_head_dim"] + d.get("qk_nope_head_dim", 0)
    # partial rotary embeddings sized in channels (GPT-J, CodeGen: rotary_dim 64 of 256): the same
    # fraction of the shrunken head, even, at least 2
    for key in ("rotary_dim", "rotary_emb_dim"):
        if _int(old.get(key)) and old[key]:
            d[key] = max(2, _round_up(int(round(old[key] / old_head_dim * d.get("head_dim", head_dim))), 2))


def _shrink_mlp_widths(d: dict, old: dict, tp: int, hidden: int) -> None:
    old_hidden = old[_first(old, HIDDEN_KEYS)]
    # MLP widths keep their ratio to hidden, rounded to a multiple of 2 x tp (gate|up halves split
    # evenly); MoE experts run as grouped matmuls on 3-D weights, which want 16-byte rows: each
    # rank's slice of an expert's intermediate dim a multiple of 4 (fp32), so 4 x tp
    multiple = (4 if any(_int(old.get(k)) for k in EXPERT_KEYS) else 2) * tp
    for key, value in old.items():
        if not ("intermediate_size" in key or key in ("ffn_hidden_size", "n_inner", "ffn_dim", "moe_ffn_hidden_size",
                                                      "expert_hidden_size", "expert_ffn_hidden_size", "d_ff",
                                                      "encoder_ffn_dim", "decoder_ffn_dim")):
            continue
        if _int(value) and value > 0:
            d[key] = _round_up(max(tp, int(round(value / old_hidden * hidden))), multiple)
        elif isinstance(value, list) and value and all(_int(v) for v in value):  # per-layer widths
            d[key] = [_round_up(max(tp, int(round(v / old_hidden * hidden))), multiple) if v > 0 else v for v in value]


def _shrink_layer_overrides(d: dict, old: dict, new_kv: int) -> None:
    # per-layer overrides (Gemma 4's global layers with a larger head_dim, dots3's head counts):
    # the same shrinking, in proportion to the global value it overrides
    overrides = d.get("per_layer_config")
    if isinstance(overrides, dict):
        for _layer, values in overrides.items():
            layer_old = {**old, **values}
            layer_kv = next((layer_old[k] for k in KV_KEYS if _int(layer_old.get(k))), None)
            for key, value in list(values.items()):
                if not _int(value):
                    continue
                if key in KV_KEYS:  # head counts as the global ones shrink: kv heads tp, the group ratio kept
                    values[key] = new_kv
                elif key in HEAD_KEYS:
                    values[key] = new_kv * max(1, min(2, value // max(1, layer_kv or value)))
                elif key in MLA_DIMS:
                    values[key] = MLA_DIMS[key]
                elif _int(old.get(key)) and old[key] and _int(d.get(key)):
                    values[key] = max(1, int(round(value * d[key] / old[key])))
            # MLA layers whose query head is rope + nope (dots3's sliding layers: head_dim 256 = 64 + 192)
            rope, nope, whole = (layer_old.get(k) for k in ("qk_rope_head_dim", "qk_nope_head_dim", "head_dim"))
            if _int(rope) and _int(nope) and _int(whole) and whole == rope + nope:
                layer_new = {**d, **values}
                if layer_new["head_dim"] > layer_new["qk_rope_head_dim"]:
                    values["qk_nope_head_dim"] = layer_new["head_dim"] - layer_new["qk_rope_head_dim"]


def _shrink_mixers(d: dict, old: dict, tp: int, hidden: int, head_dim: int) -> None:
    """Sequence mixers beside attention (Mamba-2 in Bamba, Granite-4, Falcon-H1, Nemotron-H; gated
    delta nets in Qwen3-Next and Kimi-Linear): heads of 8 channels, states of 8, one group.  Mamba
    configs check ``heads x head dim == expand x hidden``, so the head count follows from the new hidden."""

    expand = next((old[k] for k in ("mamba_expand", "expand") if _int(old.get(k))), 2)
    mixer = re.compile(r"^(mamba|ssm|linear)_|_mamba_|^n_mamba_")
    for key, value in old.items():
        if not _int(value) or value <= 0 or not mixer.search(key):
            continue
        if re.search(r"(n_heads|num_heads|num_\w*_heads|mamba_heads)$", key):
            if "mamba" in key:
                d[key] = max(tp, expand * hidden // head_dim)
            else:  # linear attention: kv-like key heads, value heads a multiple of them
                ratio = value // old["linear_num_key_heads"] if key == "linear_num_value_heads" and _int(
                    old.get("linear_num_key_heads")) and old["linear_num_key_heads"] else 1
                d[key] = tp * max(1, min(2, ratio))
        elif re.search(r"(d_head|head_dim|headdim)$", key):
            d[key] = head_dim
        elif re.search(r"(d_state|state_size)$", key):
            d[key] = 8
        elif re.search(r"(n_groups|ngroups)$", key):
            d[key] = 1
        elif key.endswith("chunk_size"):
            d[key] = 16
    if _int(old.get("n_groups")) and old["n_groups"] > 1 and any(k.startswith("mamba") for k in old):
        d["n_groups"] = 1  # Nemotron-H names the Mamba groups without a prefix
    if _int(old.get("mamba_d_ssm")):  # Falcon-H1: the mixer's width, heads x head dim
        d["mamba_d_ssm"] = d.get("mamba_n_heads", tp) * d.get("mamba_d_head", head_dim)


def _shrink_experts(d: dict, old: dict) -> None:
    experts_key = _first(d, EXPERT_KEYS)
    if experts_key and old[experts_key] > 4:
        d[experts_key] = 4
    for key in TOP_K_KEYS:
        if _int(old.get(key)) and old[key] > 0:
            d[key] = min(old[key], 2, d.get(experts_key, 2) if experts_key else 2)
    for key in SHARED_EXPERT_KEYS:
        if _int(old.get(key)) and old[key] > 1:
            d[key] = 1
    # grouped routing (DeepSeek-V3: pick topk_group of n_group expert groups): kept, as two groups of
    # which one is picked (the group mask is exercised), each group at least top_k experts
    experts = d.get(experts_key) if experts_key else None
    for key in ("n_group", "num_expert_group"):
        if _int(old.get(key)) and old[key] > 1:
            top_k = max([d[k] for k in TOP_K_KEYS if _int(d.get(k))] or [1])
            if _int(experts):
                d[experts_key] = max(experts, 2 * max(2, top_k))
            d[key] = 2
            if _int(old.get("topk_group")):
                d["topk_group"] = 1 if old["topk_group"] < old[key] else 2


# ----------------------------------------------------------------------------------------------
# Layers: one of each kind
# ----------------------------------------------------------------------------------------------


def _per_layer_keys(d: dict, n: int) -> list[str]:
    """Lists with one entry per layer (``layer_types``, ``mlp_layer_types``, ``no_rope_layers``)."""
    index = set(_index_keys(d, n))
    return [k for k, v in d.items() if isinstance(v, list) and len(v) == n and n > 1 and k not in index
            and not k.endswith("_token_id")]


def _index_keys(d: dict, n: int) -> list[str]:
    """Lists of layer indices (``mlp_only_layers``, ``attn_layer_indices``, Llama 4's ``moe_layers``):
    strictly increasing layer numbers, whatever their count."""
    found = []
    for key, value in d.items():
        if ("layer" in key and isinstance(value, list) and value and all(_int(v) for v in value)
                and all(0 <= v < n for v in value) and all(a < b for a, b in zip(value, value[1:], strict=False))
                ):
            found.append(key)
    return found


def _layer_structures(d: dict, model_type: str, n: int) -> list | None:
    """Each layer's kind: its module structure in a cheap model (meta device, shrunken widths,
    every layer).  None when that model cannot be built or has no layer list."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        cheap = _build(model_type, d)
        cheap._attn_implementation = "eager"
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(cheap)
    except Exception:  # noqa: BLE001 - fall back to the config's per-layer lists
        return None
    import torch.nn as nn

    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == n]
    if not lists:
        return None
    blocks = lists[0]
    return [tuple((name, type(m).__name__, tuple(tuple(p.shape) for p in m.parameters(recurse=False)))
                  for name, m in block.named_modules()) for block in blocks]


def _keep_layer_kinds(d: dict, model_type: str, minimum: int) -> None:
    n_key = _first(d, LAYER_KEYS)
    if n_key is None:
        return
    n = d[n_key]
    per_layer = _per_layer_keys(d, n)
    # a layer's kind: its structure, and its entries in the per-layer lists (sliding and full
    # attention layers have the same modules)
    structures = _layer_structures(d, model_type, n) or [()] * n
    kinds = [(structures[i], tuple(str(d[k][i]) for k in per_layer)) for i in range(n)]
    # KV sharing (Gemma 3n / 4: the last num_kv_shared_layers reuse an earlier layer's keys and values,
    # one producer per layer type): a sharing layer is a kind of its own, so the twin keeps both
    shared = d.get("num_kv_shared_layers")
    if _int(shared) and 0 < shared < n:
        kinds = [(kind, i >= n - shared) for i, kind in enumerate(kinds)]
    overrides = d.get("per_layer_config") if isinstance(d.get("per_layer_config"), dict) else {}
    if overrides:
        by_index = {int(k): v for k, v in overrides.items()}
        kinds = [(kind, tuple(sorted(by_index.get(i, {}).items()))) for i, kind in enumerate(kinds)]
    wanted = list(dict.fromkeys(kinds))
    prefix = next((p for p in range(1, n + 1) if set(kinds[:p]) >= set(wanted)), n)
    sections = [k for k, v in d.items() if re.fullmatch(r"n_\w+_layers", k) and _int(v) and v > 0 and k != n_key]
    sections = sections if len(sections) > 1 and sum(d[k] for k in sections) == n else []
    paired = bool(sections) and all(d[k] % 2 == 0 for k in sections)
    if paired:
        prefix = min(n, _round_up(prefix, 2))
    if prefix <= MAX_PREFIX:
        keep = list(range(min(n, max(prefix, minimum))))
    else:
        keep = sorted({kinds.index(kind) for kind in wanted})
        while len(keep) < min(minimum, n):  # a second layer of the first kind, as a short prefix would
            keep = sorted(set(keep) | {next(i for i in range(n) if i not in keep)})
    position = {old: new for new, old in enumerate(keep)}
    d[n_key] = len(keep)
    for key in LAYER_KEYS:  # models that name the count twice (n_layer and num_hidden_layers)
        if key != n_key and _int(d.get(key)) and d[key] == n:
            d[key] = len(keep)
    if n_key == "decoder_layers" and _int(d.get("encoder_layers")):
        d["encoder_layers"] = min(d["encoder_layers"], len(keep))
    for key in per_layer:
        d[key] = [d[key][i] for i in keep]
    for key in _index_keys(d, n):
        d[key] = [position[i] for i in d[key] if i in position]
    if overrides:
        d["per_layer_config"] = {f"{position[int(k)]:02d}": v for k, v in overrides.items() if int(k) in position}
    if _int(shared) and 0 < shared < n:
        d["num_kv_shared_layers"] = sum(1 for i in keep if i >= n - shared)
    # a stack in sections whose sizes add up to the layer count (Dory: input, recurrent (looped) and
    # output layers): each section keeps its share of the kept layers, at least one step of them (2 where
    # every count is even: Dory's config serializes each layer as an attention and an mlp entry)
    if sections:
        step = 2 if paired and len(keep) % 2 == 0 else 1
        sizes = {k: max(step, int(round(d[k] * len(keep) / n / step)) * step) for k in sections}
        largest = max(sections, key=lambda k: sizes[k])
        sizes[largest] += len(keep) - sum(sizes.values())
        if sizes[largest] >= step:
            d.update(sizes)
    # scalar layer counts that must stay inside the twin (DeepSeek's first_k_dense_replace counts the
    # dense layers at the front; a prefix keeps the meaning, a remap keeps them where they are)
    for key in ("first_k_dense_replace", "moe_layer_start_index"):
        if _int(d.get(key)) and d[key] > 0:
            d[key] = sum(1 for i in keep if i < d[key])
    if _int(d.get("moe_layer_end_index")) and d["moe_layer_end_index"] >= 0:
        d["moe_layer_end_index"] = max((position[i] for i in keep if i <= d["moe_layer_end_index"]), default=0)
