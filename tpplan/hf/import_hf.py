"""``tpplan import-hf``: transformers' own tensor-parallel plan -> a tpplan spec.

transformers ships a TP plan for most decoder models: ``base_model_tp_plan`` on the config class
(``layers.*.self_attn.q_proj: colwise`` ...) and ``_tp_plan`` on the model class
(``lm_head: colwise_gather_output``), merged with the embedding rule it adds itself when a model
is built (``model.tp_plan``).  This module builds the model on the meta device, reads that merged
plan, and makes the spec:

- :mod:`tpplan.hf.translate` translates each rule with its style table, where the translation is faithful;
- :mod:`tpplan.hf.probe` describes the model and measures its tiny twin where a rule needs it;
- :mod:`tpplan.hf.corrections` corrects what transformers' plan measurably gets wrong;
- :mod:`tpplan.hf.sp_upgrade` upgrades the plan to sequence parallel (``sequence_parallel=True``);
- :mod:`tpplan.hf.write` writes the commented spec, at the largest tp that resolves (chosen here).

``import_hf`` returns it as text (``Imported``, with what it could not translate); ``report`` prints
what was corrected and left out.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.hf import sp_upgrade
from tpplan.hf.corrections import corrected
from tpplan.hf.probe import Model, Probe, describe, matching
from tpplan.hf.translate import COVERED_BY_MODULE, EXPERT_PARALLEL, FAITHFUL, Rule, Skipped, translate
from tpplan.hf.write import render
from tpplan.model.reading import causal_lm_class, read_source
from tpplan.model.shrink import config_get
from tpplan.spec.tpplan_rules import ExpertParallelRule
from tpplan.spec.write import DEFAULT_SEQ_LENGTH, TP_CANDIDATES, make_rule


@dataclass
class Imported:
    """What ``import_hf`` produced: the spec text and what it could not translate."""

    text: str
    name: str
    source: str
    model_class: str
    hf_plan: dict[str, str]
    rules: list[Rule]
    skipped: list[Skipped]
    notes: list[str] = field(default_factory=list)
    tp: int = 2
    sequence_parallel: bool = False
    corrections: list[str] = field(default_factory=list)  # where tpplan's import departs from transformers' plan


def _choose_tp(spec_text: str, model, seq_length: int) -> tuple[int, str]:
    from tpplan.plan.stage import resolve_stage
    from tpplan.spec.loader import load_spec_text

    spec = load_spec_text(spec_text)
    last = ""
    for tp in TP_CANDIDATES:
        try:
            resolve_stage(spec, model=model, tp=tp, seq_length=seq_length)
            return tp, ""
        except TpplanError as exc:
            last = str(exc)
    return TP_CANDIDATES[-1], last


def _ordered(rules: list[Rule], desc: Model) -> list[Rule]:
    """Rules in module order (embedding, blocks, norm, head), stable for rules on one module."""
    order = {name: i for i, name in enumerate(desc.modules)}

    def first(rule: Rule) -> int:
        found = matching(rule.pattern, desc.modules)
        return min((order[n] for n in found), default=len(order))

    return sorted(rules, key=first)


def _spec_name(hint: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", hint).strip("-._").lower() or "imported"
    return name[:100]


def import_hf(
    source: str,
    *,
    sequence_parallel: bool = False,
    name: str | None = None,
    out_path: str | None = None,
    command: str | None = None,
    correct: bool = True,
    ep: int | None = None,
) -> Imported:
    """Translate transformers' TP plan for ``source`` into a tpplan spec (text; nothing is written).

    ``correct=False`` keeps transformers' plan as it is where tpplan knows it to be wrong (the
    zoo checks both, to show what the correction fixes).  transformers >= 5.25 keeps MoE experts in
    a separate expert-parallel plan (``base_model_ep_plan``); its experts modules become
    ``expert_parallel`` over ``mesh.ep = ep`` when ``ep`` is given, else ``expert_tensor_parallel``
    over tp (what its tensor-parallel plan said for them before 5.25)."""
    out_dir = Path(out_path).parent if out_path else None
    src = read_source(source, out_dir)
    config = src.config
    attn, model = _build(config)
    desc = describe(model)
    plan, ep_plan = _hf_plans(model, config)
    probe_cache: list[Probe] = []

    def probe_for() -> Probe:
        if not probe_cache:
            probe_cache.append(Probe(config))
        return probe_cache[0]

    rules, skipped, notes = translate(desc, plan, probe_for)
    corrections: list[str] = []
    if correct and not probe_for().error:
        rules, corrections = corrected(desc, config, rules, probe_for())
    skipped += [Skipped(k, v, "expert-parallel plan (base_model_ep_plan): " + EXPERT_PARALLEL) for k, v in ep_plan.items()
                if k not in plan]
    _experts_from_ep_plan(rules, ep)
    rules = _ordered(rules, desc)
    if sequence_parallel:
        rules, sp_notes = sp_upgrade.sequence_parallel(desc, rules, probe_for())
        notes += sp_notes

    spec_name = _spec_name(name or src.name_hint)
    command = command or f"tpplan import-hf {source}" + (" --sequence-parallel" if sequence_parallel else "")
    text = render(spec_name, src, type(model).__name__, type(config).__name__, attn, rules, skipped, notes, desc,
                  sequence_parallel, tp=2, tp_note="", command=command, corrections=corrections, ep=ep)
    tp, problem = _choose_tp(text, model, DEFAULT_SEQ_LENGTH)
    if problem:
        tp_note = f"no tp in {list(TP_CANDIDATES)} resolves; see the errors printed by import-hf"
        notes.append(f"the plan does not resolve at tp={tp}:\n{problem}")
    else:
        tp_note = _tp_note(config, tp)
    text = render(spec_name, src, type(model).__name__, type(config).__name__, attn, rules, skipped, notes, desc,
                  sequence_parallel, tp=tp, tp_note=tp_note, command=command, corrections=corrections, ep=ep)
    from tpplan.spec.loader import load_spec_text

    load_spec_text(text, name=spec_name + ".yaml")  # what we write must validate
    return Imported(text, spec_name, source, type(model).__name__, plan, rules, skipped, notes, tp, sequence_parallel,
                    corrections)


def _build(config) -> tuple[str, Any]:
    """(the attention path, the model of ``config`` on the meta device)."""
    from tpplan.model.sources import build_model

    model_cls = causal_lm_class(config)
    attn = "sdpa" if getattr(model_cls, "_supports_sdpa", True) else "eager"
    config._attn_implementation = attn
    if hasattr(config, "use_cache"):
        config.use_cache = False
    try:
        return attn, build_model(config)
    except Exception as exc:  # noqa: BLE001 - transformers' own failure on this config
        raise TpplanError(
            f"transformers cannot build {model_cls.__name__} from this config: {type(exc).__name__}: {exc}",
            hint="import from a complete config.json (a hub id or a local folder) rather than a bare model_type",
        ) from None


def _hf_plans(model, config) -> tuple[dict[str, str], dict[str, str]]:
    """(transformers' tensor-parallel plan with the experts of its expert-parallel plan, the ep plan)."""
    import transformers

    plan = dict(getattr(model, "tp_plan", None) or {})
    if not plan:
        raise TpplanError(
            f"transformers {transformers.__version__} has no tensor-parallel plan for {type(model).__name__} "
            f"({type(config).__name__}.base_model_tp_plan and {type(model).__name__}._tp_plan are empty)",
            hint="write the plan by hand: start from specs/llama3.yaml and `tpplan plan --modules` lists the modules",
        )
    ep_plan = dict(getattr(model, "ep_plan", None) or {})
    # the experts of the ep plan are translated with the tp plan (a key in both: the tp plan's wins)
    plan.update({k: v for k, v in ep_plan.items() if k not in plan and v in FAITHFUL | COVERED_BY_MODULE})
    return plan, ep_plan


def _experts_from_ep_plan(rules: list[Rule], ep: int | None) -> None:
    """The experts transformers' ep plan names: expert_parallel over ep (``ep``), else split over tp."""
    for rule in rules:
        if rule.comment != "hf: ep_dispatch_experts":
            continue
        if ep:
            rule.rule = make_rule(ExpertParallelRule, rule.pattern)
            rule.comment = f"hf: ep_dispatch_experts (base_model_ep_plan: whole experts over ep={ep})"
        else:
            rule.comment = ("hf: ep_dispatch_experts (base_model_ep_plan), split over tp here: "
                            "each expert's intermediate dim; import with --ep N for whole experts per ep rank")


def _tp_note(config, tp: int) -> str:
    heads = config_get(config, "num_attention_heads")
    kv = config_get(config, "num_key_value_heads")
    parts = [f"{heads} heads" if heads else None, f"{kv} kv heads" if kv and kv != heads else None]
    said = ", ".join(p for p in parts if p)
    return f"the largest of {'/'.join(map(str, TP_CANDIDATES))} that resolves" + (f" ({said})" if said else "")


def report(imported: Imported, stream=None) -> None:
    """What was not imported, on stderr: one line per skipped rule."""
    stream = stream or sys.stderr
    for fix in imported.corrections:
        print(f"corrected: {fix}", file=stream)
    for s in imported.skipped:
        print(f"not imported: {s.line()}", file=stream)
    for note in imported.notes:
        print(f"note: {note}", file=stream)
