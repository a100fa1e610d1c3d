"""What a style can shard, read off a module: its kind, and where a Linear keeps its output features.

``module_kind`` says "embedding", "linear", "conv1d", "experts", "parameter" or "other" (the kinds
a style says it can shard, ``RuleBase.KINDS``); ``OUT_DIM``, ``out_features`` and
``splits_output_features`` read a Linear's (or transformers' Conv1D's) output features and whether
a plan entry splits them over tp.  Used by resolve's checks, and by check, import-hf, derive and the
simulator wherever they ask what a module is.
"""

from __future__ import annotations

from tpplan.plan.resolved import PlanEntry
from tpplan.spec.rule_base import is_conv1d


def module_kind(module) -> str:
    """What a style can shard: "embedding", "linear", "conv1d" (transformers' Conv1D: a Linear with
    its weight stored [in, out]), "experts" (a transformers MoE experts module: its weights are 3-D
    parameters, one slice per expert), "parameter" (a bare parameter matched by a parameter-level
    rule), or "other"."""
    import torch.nn as nn

    if isinstance(module, nn.Parameter):
        return "parameter"
    if isinstance(module, nn.Embedding):
        return "embedding"
    if isinstance(module, nn.Linear):
        return "linear"
    if is_conv1d(module):
        return "conv1d"
    down = module._parameters.get("down_proj") if isinstance(module, nn.Module) else None
    if down is not None and down.ndim == 3:
        return "experts"
    return "other"


#: the dim of a module's weight that holds its output features: nn.Linear [out, in], Conv1D [in, out]
OUT_DIM = {"linear": 0, "conv1d": 1}


def out_features(module) -> int:
    """A Linear's (or Conv1D's) output features."""
    return module.weight.shape[OUT_DIM[module_kind(module)]]


def splits_output_features(entry: PlanEntry, module) -> bool:
    """A Linear (or Conv1D) whose output features the entry's style splits over tp (colwise)."""
    kind = module_kind(module)
    return kind in OUT_DIM and entry.rule.weight_dim(kind) == OUT_DIM[kind]
