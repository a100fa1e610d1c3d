"""What derive learns from the twin, once per model: the trace, the skeleton, the groups and the form the
emulation proved for each -- shared by the plain and the sequence-parallel plans and by every draft."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

from .common import DeriveRefused, module_names, one_line
from .forms import MergedGroup, choose_forms, merge_groups
from .groups import FoundGroup, GroupForm, find_groups
from .skeleton import Skeleton, find_skeleton
from .twin import Traced, build_model, trace_twin


@dataclass(frozen=True)
class Analysis:
    """Everything derive learned from the twin, shared by the plain and the sequence-parallel plans (and by
    every draft of them): what the dataflow shows and the form the emulation proved for each group."""

    traced: Traced
    skeleton: Skeleton
    groups: dict[str, list[FoundGroup]]  # per twin block
    forms: dict[tuple[str, tuple], GroupForm]  # (twin block, group key) -> the form the emulation proved
    full_model: Any  # the full-size model on the meta device (sizes, attribute values)
    order: dict[str, int]  # module -> index of its first call
    # a spec's rules with styles of its own (style: file.py:Class), kept as written: their modules are the
    # user's decision (torchtitan's vocab-parallel embedding); ``spec_dir``: where their file paths start
    own_rules: tuple = ()
    spec_dir: Any = None

    @functools.cached_property
    def merged(self) -> dict[tuple, MergedGroup]:
        """Groups by their names relative to a block (rules name modules, not blocks): ``merge_groups``."""
        return merge_groups(self.groups, self.forms)

    @functools.cached_property
    def modules_full(self) -> dict[str, Any]:
        return module_names(self.full_model)

    @functools.cached_property
    def twin_modules(self) -> dict[str, Any]:
        return module_names(self.traced.model)


def analyse(config, build=None) -> Analysis:
    """Trace the twin of ``config`` (a transformers config, or ``OwnModel``) and find its skeleton
    and groups, each in the form it can take."""
    build = build or build_model
    traced = trace_twin(config, build)
    skeleton = find_skeleton(traced)
    if not skeleton.blocks:
        raise DeriveRefused(
            f"{type(traced.model).__name__}: no stack of decoder blocks, each called once, carrying a [batch, seq, "
            "...] residual stream was found in its dataflow",
            hint="derive plans decoder-only transformers; write this plan by hand (start from specs/llama3.yaml)")
    groups = find_groups(traced, skeleton)
    forms = choose_forms(traced, groups)
    try:
        full = build(config, device="meta")
    except Exception as exc:  # noqa: BLE001
        raise DeriveRefused(f"transformers cannot build {type(traced.model).__name__} at full size: {one_line(exc)}") from None
    order: dict[str, int] = {}
    for i, call in enumerate(traced.graph.calls):
        order.setdefault(call.module, i)
    return Analysis(traced, skeleton, groups, forms, full, order)
