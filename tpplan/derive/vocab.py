"""The vocabulary: padded to a multiple of tp where the derived spec builds the model from its config
(GPT-2's 50257), with what that costs in parameters; and embeddings that do their own vocab-parallel
lookup (torchtitan's), which torch's rowwise style cannot drive."""

from __future__ import annotations

import copy
import dataclasses
from typing import TYPE_CHECKING

from tpplan.model.shrink import config_get

from .twin import OwnModel, build_model

if TYPE_CHECKING:
    from .analysis import Analysis
    from .write import ModelInput


def padded(vocab: int, tp: int) -> int:
    """``vocab`` rounded up to a multiple of ``tp`` (``resize_token_embeddings(n, pad_to_multiple_of=tp)``)."""
    return -(-vocab // tp) * tp


def padding_offer(a: Analysis, vocab: int, tp: int, done: bool = False) -> str:
    """What padding ``vocab`` to a multiple of tp costs: the rows added to the embedding and the head
    (one weight when they are tied); ``done``: it was padded, else how to pad it."""
    import torch.nn as nn

    weights = {id(m.weight): m.weight.shape[-1] for n in (a.skeleton.embed, a.skeleton.head)
               if isinstance(m := a.modules_full.get(n or ""), (nn.Embedding, nn.Linear))}
    cost = (padded(vocab, tp) - vocab) * sum(weights.values())
    if done:
        return (f"vocabulary padded from {vocab} to {padded(vocab, tp)}, a multiple of tp={tp} (model.config.vocab_size, "
                f"as resize_token_embeddings(n, pad_to_multiple_of={tp}) pads it): {cost:,} parameters more, rows no "
                "token id looks up; the embedding and the head split it")
    how = ("the vocabulary argument of the model's factory" if isinstance(a.traced.config, OwnModel) else
           f"model.config.vocab_size without weights to load, else model.resize_token_embeddings(n, "
           f"pad_to_multiple_of={tp}) after loading")
    return (f"pad the vocabulary ({vocab}) to {padded(vocab, tp)} to split the embedding and the head over tp={tp}: "
            f"{cost:,} parameters more ({how})")


def head_held_elsewhere(a: Analysis) -> list[str]:
    """The output head's parameters another module (not the embedding) also holds, as ``bias is also X.bias``
    (BERT's cls.predictions.bias is its decoder's bias): such a head stays whole, and so does an embedding
    tied to it."""
    from tpplan.plan.resolved import tied_names

    head, embed = a.skeleton.head, a.skeleton.embed
    if not head:
        return []
    found = []
    for names in tied_names(a.full_model):
        holders = [name.rpartition(".")[0] for name in names]
        if head not in holders or embed in holders:  # the embedding's tie to the head is the vocabulary's
            continue
        attr = names[holders.index(head)].rpartition(".")[2]
        found += [f"{attr} is also {name}" for name, holder in zip(names, holders, strict=True) if holder != head]
    return found


def pad_vocabulary(a: Analysis, inp: ModelInput, tp: int) -> tuple[Analysis, str | None]:
    """A vocabulary that tp does not divide, padded to a multiple of tp where the derived spec builds the
    model from its config (random init: no checkpoint's rows to match): the analysis with the full-size
    model rebuilt on it and the spec's ``model.config.vocab_size`` set, and the note saying what it costs.
    Else ``a`` unchanged and None (with weights to load, the plan's note says what padding would cost)."""
    import torch.nn as nn

    config = a.traced.config
    embed = a.modules_full.get(a.skeleton.embed or "")
    vocab = config_get(config, "vocab_size") if not isinstance(config, OwnModel) else None
    if not isinstance(vocab, int) or vocab % tp == 0 or not isinstance(embed, nn.Embedding):
        return a, None
    if a.skeleton.tied and head_held_elsewhere(a):
        return a, None  # the embedding stays whole with its head whatever the vocabulary: padding buys nothing
    rows = embed.weight.shape[0]
    if rows != vocab:  # padded by an earlier draft of this analysis (the zoo's SP and plain tries)
        return a, padding_offer(a, vocab, tp, done=True) if rows == padded(vocab, tp) else None
    if inp.model.get("pretrained", True) or "config" not in inp.model:
        return a, None
    padded_config = copy.deepcopy(config)
    padded_config.vocab_size = padded(vocab, tp)
    try:
        full = build_model(padded_config, device="meta")
    except Exception:  # noqa: BLE001 - a model that cannot take another vocabulary size keeps its own
        return a, None
    inp.model["config"] = {**inp.model["config"], "vocab_size": padded(vocab, tp)}
    return dataclasses.replace(a, full_model=full), padding_offer(a, vocab, tp, done=True)


def own_lookup(module) -> bool:
    """An embedding whose forward does its own vocabulary-parallel lookup (torchtitan's ``Embedding``): it
    holds a process group to be handed (an attribute named ``*group``) or reads its weight's local rows
    (``.to_local()``).  torch's rowwise style cannot drive it: it would mix the DTensor ids with the local
    weight.  An embedding that only adds to nn.Embedding's lookup (Gemma's scaling) is not one."""
    import inspect

    import torch.nn as nn

    if not isinstance(module, nn.Embedding) or type(module).forward is nn.Embedding.forward:
        return False
    if any(name == "group" or name.endswith("_group") for name in vars(module)):
        return True
    try:
        return ".to_local()" in inspect.getsource(type(module).forward)
    except (OSError, TypeError):
        return False
