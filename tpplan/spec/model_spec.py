"""The spec's ``model`` section (``ModelSpec``): a transformers model (hub id, folder, or config) or a
factory of one's own, its tokenizer (a name, or one built locally), config overrides bounded so a
typo is an error, and where an attention module keeps its head counts (``HeadAttrs``, ``head_attr``).
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Discriminator, Field, Tag, model_validator

from tpplan.core.errors import short
from tpplan.spec.fields import (
    FACTORY_HELP,
    FactoryStr,
    FieldError,
    Identifier,
    Pattern,
    Patterns,
    Strict,
    finite,
    positive_int,
)


class BuildTokenizer(Strict):
    """A byte-level BPE tokenizer trained locally on the training text (no download)."""

    build: Literal["byte_bpe"] = "byte_bpe"
    vocab_size: Annotated[int, BeforeValidator(positive_int)] = 512
    min_frequency: Annotated[int, BeforeValidator(positive_int)] = 2


TokenizerSource = Annotated[
    Annotated[str, Tag("tokenizer-name")] | Annotated[BuildTokenizer, Tag("tokenizer-build")],
    Discriminator(lambda v: "tokenizer-build" if isinstance(v, (dict, BuildTokenizer)) else "tokenizer-name"),
]


# Config keys whose value is a size or a count: when given, a positive integer up to the bound.
# Bounded so that a typo (a million layers) is an error, not a model that never finishes building.
MAX_LAYERS = 1024  # the largest published models have ~128 blocks
MAX_EXPERTS = 16384
MAX_WIDTH = 2**24
CONFIG_BOUNDS = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers"), (1, MAX_LAYERS, "a block count")),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), (0, MAX_EXPERTS, "an expert count")),
    **dict.fromkeys(
        (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "max_position_embeddings", "moe_intermediate_size", "shared_expert_intermediate_size",
            "num_experts_per_tok", "n_embd", "n_head", "n_positions", "n_inner",
        ),
        (1, MAX_WIDTH, "a size"),
    ),
}
_CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _config_values(value: Any) -> Any:
    """model.config: attribute names as keys; finite numbers; sizes and counts within bounds."""
    if not isinstance(value, dict):
        return value  # pydantic says "expected a mapping"
    for key, item in value.items():
        if not isinstance(key, str) or not _CONFIG_KEY.match(key):
            raise FieldError(f"config key {short(key)} is not an attribute name (letters, digits, '_')", (key,))
        finite(item, (key,))
        bounds = CONFIG_BOUNDS.get(key)
        if bounds is not None and item is not None:
            low, high, what = bounds
            if isinstance(item, bool) or not isinstance(item, int):
                raise FieldError(f"expected {what} (an integer), got {short(item)}", (key,))
            if not low <= item <= high:
                raise FieldError(f"expected {what} from {low:,} to {high:,}, got {item:,}", (key,))
    return value


def _factory_args(value: Any) -> Any:
    """model.args / twin_args: finite numbers (the script prints them as Python literals)."""
    if isinstance(value, dict):
        for key, item in value.items():
            finite(item, (key,))
    return value


FactoryArgs = Annotated[dict[Identifier, Any], BeforeValidator(_factory_args)]


class HeadAttrs(Strict):
    """Where an attention module keeps its head counts (the names its forward reads)."""

    heads: Identifier | None = Field(None, description="attribute with the number of query heads")
    kv_heads: Identifier | None = Field(None, description="attribute with the number of key/value heads")
    head_dim: Identifier | None = Field(None, description="attribute with the size of one head")


# Attribute names looked up on an attention module when model.head_attrs does not name them.
HEAD_ATTR_DEFAULTS: dict[str, tuple[str, ...]] = {
    "heads": ("num_heads", "n_heads", "num_attention_heads", "n_head"),
    "kv_heads": ("num_kv_heads", "n_kv_heads", "num_key_value_heads", "n_kv_head"),
    "head_dim": ("head_dim",),
}


def head_attr(module, what: str, named: HeadAttrs):
    """An attention module's head count or head size (``what``: heads, kv_heads or head_dim): the
    attribute ``named`` (``model.head_attrs``) gives, else the first of the usual names it has."""
    if module is None:
        return None
    given = getattr(named, what)
    for attr in (given,) if given else HEAD_ATTR_DEFAULTS[what]:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class ModelSpec(Strict):
    name: str | None = Field(None, description="hub id (meta-llama/Llama-3.1-8B) or local directory")
    config: Annotated[dict[str, Any], BeforeValidator(_config_values)] = Field(
        default_factory=dict,
        description="config overrides; with no name, the whole config (needs model_type)",
    )
    factory: FactoryStr | None = Field(
        None,
        description="your own model: a function (or class) returning an nn.Module, called with `args`; "
        + FACTORY_HELP
        + ". Naming it is the opt-in: tpplan imports that code (validate, check, plan) and the generated "
        "script imports it too",
    )
    args: FactoryArgs = Field(
        default_factory=dict, description="keyword arguments of the factory (the full-size model)"
    )
    twin_args: FactoryArgs | None = Field(
        None,
        description="arguments merged over `args` for `tpplan check`'s small twin (same architecture: "
        "few layers, small widths that divide by tp)",
    )
    pretrained: bool = Field(True, description="load weights from `name`; false: random init from the config")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    tokenizer: TokenizerSource | None = Field(
        None, description="hub id or local path (default: the model's own), or {build: byte_bpe}"
    )
    trust_remote_code: bool = False
    revision: str | None = None
    positions: Identifier | None = Field(
        "position_ids",
        description="keyword by which the model's forward takes position ids (0..seq-1); null: not passed "
        "(the model makes its own). Default: position_ids for transformers models, null for a factory",
    )
    blocks: Patterns | None = Field(
        None,
        description="the transformer blocks (module-name patterns): one FSDP2 unit each, and what `plan` "
        "reports per block. Default: transformers' _no_split_modules; for a factory, the items of the "
        "model's ModuleList, ModuleDict or Sequential (e.g. layers.*)",
    )
    output: Pattern | None = Field(
        None,
        description="the module that computes the logits (loss_parallel, vocabulary checks). Default: "
        "transformers' get_output_embeddings(); for a factory, the last Linear as wide as the embedding's "
        "vocabulary",
    )
    head_attrs: HeadAttrs = Field(
        default_factory=HeadAttrs,
        description="attribute names of an attention module's head counts, for divisibility checks and "
        "fix-ups (default: num_heads/n_heads/num_attention_heads, num_kv_heads/n_kv_heads/"
        "num_key_value_heads, head_dim; transformers models: their config)",
    )

    @model_validator(mode="after")
    def _source(self):
        if self.factory is not None:
            given = [key for key in ("name", "config", "revision", "trust_remote_code")
                     if key in self.model_fields_set and getattr(self, key) not in (None, {}, False)]
            if given:
                raise ValueError(
                    f"a model comes from a factory or from a transformers name/config, not both: remove "
                    f"{', '.join(given)} (a spec that extends one with a transformers model must write its "
                    "model section anew)"
                )
            if "pretrained" in self.model_fields_set and self.pretrained:
                raise ValueError("a factory model has no weights to load: set pretrained: false (random init)")
            object.__setattr__(self, "pretrained", False)  # frozen model: set during validation only
            if "positions" not in self.model_fields_set:
                object.__setattr__(self, "positions", None)
            return self
        for key in ("args", "twin_args"):
            if key in self.model_fields_set and getattr(self, key):
                raise ValueError(f"{key} are the keyword arguments of a factory: set model.factory, or remove {key}")
        if self.name is None and "model_type" not in self.config:
            raise ValueError(
                "give the model a `name` (hub id or local path), a `config` with a model_type, or a `factory`"
            )
        if self.name is None and self.pretrained:
            raise ValueError("a model built from a config alone has no weights: set pretrained: false")
        return self
