"""What a plan shards, counted per kind of parameter: the shard report ``tpplan check`` prints and the
statuses the zoo and derive count by.

``sharded_rules`` (the parent, on the full-size plan: the rules that split weights over tp), ``shard_report``
(a rank, on the sharded twin: per kind -- ``KINDS``: embedding, head, attention, MLP, experts, routers, norms,
other -- what is split over tp or ep, inside the blocks and in all) with ``parameter_kind``, and what is made
of it: ``parallel_gaps`` (of ``PARALLEL_KINDS``, those left mostly whole), ``parallel_status`` (proven /
partial / failed), ``sharded_fractions`` and ``nothing_sharded_failure`` (a plan equal because it shards
nothing in the blocks).
"""

from __future__ import annotations

import re

from tpplan.prove.verdict import CheckReport

# the kinds of parameters the shard report counts; a plan is "parallel" when it shards most of the
# attention, MLP and expert parameters the model has (PARALLEL_KINDS)
KINDS = ("embedding", "head", "attention", "mlp", "experts", "routers", "norms", "other")
PARALLEL_KINDS = ("attention", "mlp", "experts")


def sharded_rules(stage) -> list[dict]:
    """The rules whose modules' weights the plan splits over tp (what the check proves sharded), each
    with how many modules it splits; a style of one's own counts when its modules' weights come out
    as DTensors it does not say the layout of."""
    from tpplan.plan.module_kinds import module_kind

    counts: dict[int, int] = {}
    modules = dict(stage.model.named_modules())
    for entry in stage.plan.sharded_entries():
        module = modules.get(entry.fqn)  # (a parameter-level rule names no module)
        if module is None or getattr(module, "weight", None) is None:
            continue
        layout = entry.rule.parameter_layout(module_kind(module), "weight")
        if layout.startswith("shard") or entry.rule.user_style:
            counts[entry.rule_index] = counts.get(entry.rule_index, 0) + 1
    return [{"rule": stage.plan.rules[i].label, "pattern": stage.plan.rules[i].pattern,
             "style": stage.plan.rules[i].rule.style, "modules": n} for i, n in sorted(counts.items())]


def shard_report(model, reference, blocks) -> dict:
    """What the plan shards, per kind of parameter (``KINDS``), inside the transformer blocks
    (``blocks``) and in all: ``{kind: {parameters, sharded, numel, sharded_numel, per_rank}}``.  A
    parameter is sharded when it is split over tp or ep (FSDP's split over dp is not counted);
    ``per_rank``: the elements of the kind one rank holds without FSDP, against ``numel`` unsharded."""
    from tpplan.runtime.step import block_names

    inputs, outputs = _embeddings(reference, output=False), _embeddings(reference, output=True)
    modules = dict(reference.named_modules())
    prefixes = sorted(block_names(reference, blocks), key=len, reverse=True)
    counts: dict[str, dict] = {}
    for name, param in model.named_parameters():
        block = next((p for p in prefixes if name.startswith(p + ".")), None)
        kind = parameter_kind(name, modules, block, inputs, outputs, param.ndim)
        numel, split = param.numel(), _split_factor(param)
        for key in (kind, "total", *(("blocks",) if block else ())):
            entry = counts.setdefault(key, dict.fromkeys(_COUNTS, 0))
            entry["parameters"] += 1
            entry["numel"] += numel
            entry["per_rank"] += -(-numel // split)
            if split > 1:
                entry["sharded"] += 1
                entry["sharded_numel"] += numel
    counts.setdefault("blocks", dict.fromkeys(_COUNTS, 0))
    return {key: counts[key] for key in (*KINDS, "blocks", "total") if key in counts}


def _embeddings(model, output: bool = False) -> set:
    """ids of the model's input (or output) embedding modules."""
    try:
        module = model.get_output_embeddings() if output else model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - a model of one's own without the accessors
        module = None
    return {id(module)} if module is not None else set()


def _split_factor(param) -> int:
    """Into how many parts tp and ep split ``param`` (1: whole on every rank of those dims)."""
    from torch.distributed.tensor import DTensor

    if not isinstance(param, DTensor):
        return 1
    names = param.device_mesh.mesh_dim_names or ()
    factor = 1
    for dim, placement in enumerate(param.placements):
        split = not (placement.is_replicate() or placement.is_partial())  # Shard, _StridedShard (packed)
        if split and dim < len(names) and names[dim] in ("tp", "ep"):
            factor *= param.device_mesh.size(dim)
    return factor


_COUNTS = ("parameters", "sharded", "numel", "sharded_numel", "per_rank")
_EXPERT_NAME = re.compile(r"^(local_|routed_)?experts$")
_ROUTER_NAME = re.compile(r"^(gate|router|gating|wg|gate_network|moe_gate)$")
_KIND_WORDS = (  # a module's class name (then its attribute name) says what it is; the first match wins
    ("attention", re.compile(r"attention|attn|mamba|mixer|ssm|deltanet|shortconv|conv1d|retention|rwkv|rglru|"
                             r"rg_lru|temporal", re.I)),  # RecurrentGemma's temporal blocks: its RG-LRU or attention
    ("mlp", re.compile(r"mlp|moe|ffn|feed_?forward|expert|sparse|^fc\d*$|^c_fc$|^ff$|^dense", re.I)),
)


def parameter_kind(name: str, modules: dict, block: str | None, inputs: set, outputs: set, ndim: int) -> str:
    """One of ``KINDS`` for the parameter ``name``: its module is the input embedding, the output
    embedding (head) or a norm; inside a block, the modules it lies in say experts (a bank or list of
    experts), attention (attention and the other sequence mixers: SSM, linear attention, short
    convolutions) or MLP (dense MLPs, shared experts, routers) -- class names first, then attribute names."""
    owner = name.rpartition(".")[0]
    module = modules.get(owner)
    if id(module) in inputs:
        return "embedding"
    if id(module) in outputs:
        return "head"
    leaf = owner.rpartition(".")[2]
    normish = "norm" in type(module).__name__.lower() or "norm" in leaf or leaf.startswith("ln")
    if module is not None and normish:
        return "norms"
    if block is None:
        return "embedding" if type(module).__name__ == "Embedding" else "other"
    parts = owner[len(block) + 1:].split(".") if owner != block else []
    path = [f"{block}.{'.'.join(parts[:i + 1])}" for i in range(len(parts))]
    classes = [type(modules[p]).__name__ for p in path if p in modules]
    if any(_EXPERT_NAME.match(part) for part in parts) or any(c.lower().endswith("experts") for c in classes):
        return "experts"
    parent = modules.get(owner.rpartition(".")[0])
    if parent is not None and "experts" in getattr(parent, "_modules", {}) and _ROUTER_NAME.match(leaf):
        return "routers"  # beside the experts: the router
    for words in (classes, parts):
        for kind, pattern in _KIND_WORDS:
            # Linear and transformers' Conv1D (GPT-2's linear, [in, out]) say nothing; nn.Conv1d is a short conv
            if any(pattern.search(w) for w in words if w not in ("Linear", "Conv1D")):
                return kind
    return "experts" if ndim >= 3 else "other"


def parallel_gaps(sharded: dict) -> list[str]:
    """Of attention, MLP and experts (the kinds the model has), those the plan leaves mostly whole:
    half or less of their elements split over tp or ep.  [] for a plan that parallelizes the blocks."""
    return [kind for kind in PARALLEL_KINDS
            if sharded.get(kind, {}).get("numel")
            and 2 * sharded[kind]["sharded_numel"] <= sharded[kind]["numel"]]


def parallel_status(report: CheckReport) -> str:
    """``proven`` (equal, and the plan shards attention and MLP/experts), ``partial`` (equal, but some of
    them mostly whole: ``report.replicated``) or ``failed``: a verdict as the zoo and derive count it."""
    return "failed" if not report.ok else "partial" if report.replicated else "proven"


def sharded_fractions(sharded: dict) -> dict:
    """{kind: share of its elements split over tp or ep} for the embedding, the head, attention, MLP and
    experts the model has."""
    return {kind: round(entry["sharded_numel"] / entry["numel"], 3) for kind, entry in sharded.items()
            if kind in ("embedding", "head", *PARALLEL_KINDS) and entry.get("numel")}


def nothing_sharded_failure(sharded: dict) -> dict:
    """The verdict on a plan that is equal because it shards nothing inside the blocks."""
    scope = sharded["blocks"] if sharded["blocks"]["parameters"] else sharded["total"]
    outside = [kind for kind in ("embedding", "head") if sharded.get(kind, {}).get("sharded")]
    where = "the blocks" if sharded["blocks"]["parameters"] else "the model (no transformer blocks found)"
    return {
        "message": f"the plan shards nothing inside the blocks: all {scope['parameters']} parameters of "
        f"{where} ({scope['numel']:,} elements in the twin) are whole on every rank, so every rank computes "
        "all of them" + (f"; the plan shards only the {' and '.join(outside)}" if outside
                         else "; the plan shards nothing at all"),
        "reason": "nothing_sharded",
        "hint": "shard the attention and the MLP (colwise q/k/v and gate/up, rowwise o_proj and down_proj, "
        "as specs/llama3.yaml does), or set `replicated_blocks: true` in the spec if blocks left whole is "
        "what you mean",
    }
