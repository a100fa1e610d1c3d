"""``derive()``: read the model, analyse its twin, draft, write and prove."""

from __future__ import annotations

import contextlib
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.model.reading import causal_lm_class, read_source, relative
from tpplan.model.sources import local_model_dir
from tpplan.plan.resolve import resolve
from tpplan.plan.stage import model_source
from tpplan.prove import check as check_module
from tpplan.spec.loader import load_spec, load_spec_text

from .analysis import Analysis, analyse
from .assemble import PlanDraft, Rule
from .common import DeriveFailed, DeriveRefused, located_in_input, one_line, unwritten
from .draft import draft_plan
from .forms import Constraints
from .prove import proof_line, prove, worst
from .twin import OwnModel
from .vocab import pad_vocabulary
from .write import ModelInput, spec_name, write_spec


@dataclass
class Derived:
    """What ``derive`` produced: the spec text, how it was proven, and what stays whole."""

    text: str
    name: str
    source: str
    model_class: str
    tp: int
    sequence_parallel: bool
    loss_parallel: bool
    draft: PlanDraft
    groups: list[dict]  # one per group: rowwise, colwise, form, why, ...
    report: Any = None  # verdict.CheckReport
    seconds: float = 0.0
    analysis: Any = field(default=None, repr=False)  # the Analysis it was derived from (twin, trace, groups)

    @property
    def notes(self) -> list[str]:
        return self.draft.notes

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "source": self.source,
            "model_class": self.model_class,
            "tp": self.tp,
            "tp_note": self.draft.tp_note,
            "sequence_parallel": self.sequence_parallel,
            "loss_parallel": self.loss_parallel,
            "groups": self.groups,
            "fixups": [{"match": p, "attr": a, "op": "floordiv_tp"} for p, a, _ in self.draft.fixups],
            "left_whole": list(self.notes),
            "params_per_rank": self.draft.params_per_rank,
            "max_params_per_rank": self.draft.budget,
            "check": self.report.to_dict() if self.report is not None else None,
            "seconds": self.seconds,
        }


def _read_input(source: str, out_dir) -> ModelInput:
    """MODEL as import-hf takes it (hub id, bundled name, folder, config.json, model_type) or a spec file."""
    from pathlib import Path

    path = Path(source).expanduser()
    if path.is_file() and path.suffix in (".yaml", ".yml"):
        spec = load_spec(str(path), require_plan=False)  # the plan is what derive writes
        model_of_spec = model_source(spec)  # its transformers config, or its factory (config None)
        config = model_of_spec.config
        data = spec.model_dump(mode="json", exclude_unset=True)
        model = data.get("model", {})
        if spec.model.name and spec.source is not None:
            local = local_model_dir(spec.model.name, spec.source.directory)
            if local is not None:
                model["name"] = relative(local, out_dir)
        sections = {key: data[key] for key in ("train", "launch", "mesh") if key in data}
        files = sections.get("train", {}).get("data_files")
        if files and spec.source is not None:  # local data files stay where they are, named from the new spec
            sections["train"]["data_files"] = [relative(Path(spec.source.directory) / f, out_dir) for f in files]
        own = None
        if config is None:  # model.factory: the model source builds it and its twin
            own = OwnModel(model_of_spec)
            module, _, attr = spec.model.factory.rpartition(":")
            if (module.endswith(".py") or "/" in module) and spec.source is not None:
                # a file path, relative to the spec written (or to here, where the check reads it)
                file = Path(spec.source.directory) / Path(module).expanduser()
                model["factory"] = f"{relative(file, out_dir or Path.cwd())}:{attr}"
        return ModelInput(config, model, source, spec.name, sections, own, spec.source, _own_rules(spec, out_dir))
    src = read_source(source, out_dir)
    return ModelInput(src.config, dict(src.model), src.label, src.name_hint)


def _own_rules(spec, out_dir) -> tuple[Rule, ...]:
    """The spec's top-level rules whose style is its own (``style: file.py:Class``), as derive writes them:
    the style's file named relative to the spec written (``out_dir``)."""
    from pathlib import Path

    kept = []
    for i, rule in enumerate(spec.plan):
        if not rule.user_style:
            continue
        module, _, attr = rule.style.rpartition(":")
        style = rule.style
        if (module.endswith(".py") or "/" in module) and spec.source is not None:
            style = f"{relative(Path(spec.source.directory) / Path(module).expanduser(), out_dir or Path.cwd())}:{attr}"
        note = f"kept from {spec.name}'s plan[{i}]: a style of its own" + (f"; {rule.note}" if rule.note else "")
        kept.append(Rule(rule.model_copy(update={"style": style, "note": note}), False, (-1, i)))
    return tuple(kept)


@dataclass
class Prepared:
    """What derive reads once per model: the input, the analysis of its twin, the attention path."""

    source: str
    inp: ModelInput
    analysis: Analysis
    attn: str
    out_dir: Any


def prepare(source: str, out_path: str | None = None) -> Prepared:
    """Read MODEL and analyse its twin (the part of derive that does not depend on --tp or SP)."""
    from pathlib import Path

    out_dir = Path(out_path).parent if out_path else None
    with _as_refusal(f"the config of {source}"):
        inp = _read_input(source, out_dir)
    config = inp.config
    if config is None:  # a model of the user's own (model.factory): no transformers class, no attention choice
        attn = None
        config = inp.own
        label = inp.model.get("factory") or "the model"
    else:
        model_cls = causal_lm_class(config)
        attn = inp.model.get("attn_implementation") or ("sdpa" if getattr(model_cls, "_supports_sdpa", True) else "eager")
        config._attn_implementation = attn
        if hasattr(config, "use_cache"):
            config.use_cache = False
        label = model_cls.__name__
    with _as_refusal(f"the dataflow of {label}"):
        analysis = analyse(config)
    analysis = dataclasses.replace(analysis, own_rules=inp.own_rules, spec_dir=out_dir)
    return Prepared(source, inp, analysis, attn, out_dir)


@contextlib.contextmanager
def _as_refusal(what: str):
    """An exception derive did not foresee, on a model it has not seen, is a refusal naming it: one
    message (exit 2), never a traceback."""
    try:
        yield
    except TpplanError:
        raise
    except Exception as exc:  # noqa: BLE001 - transformers' 800 model types do unforeseen things
        raise DeriveRefused(f"derive cannot read {what}: {one_line(exc)}",
                            hint="a limit of derive on this architecture: write the plan by hand (start from "
                                 "`tpplan import-hf` or specs/llama3.yaml) and prove it with `tpplan check`") from None


def derive(
    source: str,
    *,
    tp: int | None = None,
    sequence_parallel: bool = False,
    max_params_per_rank: int | None = None,
    name: str | None = None,
    out_path: str | None = None,
    command: str | None = None,
    check: bool = True,
    check_tp: int = 2,
    check_dp: int = 1,
    launcher: str | None = None,
    timeout: float = 600,
    prepared: Prepared | None = None,
) -> Derived:
    """Derive a plan for ``source`` and prove it with ``tpplan check`` (at ``check_tp`` x ``check_dp`` ranks).

    Raises DeriveRefused (exit 2) when no plan can be derived, DeriveFailed (exit 1) when check
    does not prove the one derived; nothing is written here (the caller writes ``text``).
    ``prepared``: a ``prepare(source)`` already made (the twin is traced and emulated once).
    ``max_params_per_rank``: leave whole the groups that fit on every rank within it (fewer bytes per step)."""
    started = time.time()
    if tp is not None and tp < 1:
        raise TpplanError(f"--tp must be a positive integer, got {tp}")
    p = prepared or prepare(source, out_path)
    a, padding = p.analysis, None
    model_class = type(a.traced.model).__name__

    def redraft(constraints: Constraints) -> PlanDraft:
        draft = draft_plan(a, constraints, tp=tp, sequence_parallel=sequence_parallel,
                           max_params_per_rank=max_params_per_rank)
        draft.notes.extend([padding] if padding else [])
        return draft

    with _as_refusal(f"a plan for {model_class}"):
        draft = redraft(Constraints())
        a, padding = pad_vocabulary(a, p.inp, draft.tp)
        if padding is not None:  # the embedding and the head split on the padded vocabulary
            p = dataclasses.replace(p, analysis=a)
            draft = redraft(Constraints())
    command = command or f"tpplan derive {source}" + (" --sequence-parallel" if sequence_parallel else "") + (
        f" --max-params-per-rank {max_params_per_rank}" if max_params_per_rank else "")
    writer = _Writer(p, spec_name(name or f"{p.inp.name_hint}-derived"), command)
    spec = writer.spec(draft)
    try:  # the full-size model must take the plan at the chosen tp
        resolve(spec, a.full_model, tp=draft.tp, seq_length=spec.train.seq_length)
    except TpplanError as exc:
        raise DeriveRefused(f"the derived plan does not fit {model_class} at tp={draft.tp}:\n"
                            + unwritten(exc, f"{writer.name}.yaml"), hint="try another --tp") from None
    report = None
    if check:
        extra = {"launcher": launcher} if launcher else {}

        def run_check(spec):
            with located_in_input(p.inp, f"{writer.name}.yaml"):
                return check_module.run_check(spec, tp=check_tp, dp=check_dp, timeout=timeout, **extra)

        draft, report = prove(a, draft, spec, check=run_check, redraft=redraft, rewrite=writer.spec)
        if not report.ok:
            failure = report.failure or {}
            raise DeriveFailed(
                f"the plan derived for {model_class} is not proven by check at tp={check_tp}: "
                + (failure.get("message") or worst(report)),
                hint=failure.get("hint") or "derive could not find a plan it can prove; nothing was written")
    text = writer.text(draft, proof=proof_line(report, check_tp, check_dp) if report is not None else None)
    return Derived(text, writer.name, source, model_class, draft.tp, sequence_parallel, draft.loss_parallel,
                   draft, _group_summary(a, draft), report, round(time.time() - started, 2), analysis=a)


@dataclass
class _Writer:
    """The spec of a draft, as text and validated (named as the file ``derive -o`` writes)."""

    prepared: Prepared
    name: str
    command: str

    def text(self, draft: PlanDraft, proof: str | None = None) -> str:
        p = self.prepared
        return write_spec(p.analysis, draft, p.inp, name=self.name, command=self.command, attn=p.attn,
                          proof=proof)

    def spec(self, draft: PlanDraft):
        return load_spec_text(self.text(draft), name=f"{self.name}.yaml",
                              directory=self.prepared.out_dir or ".")


def _group_summary(a: Analysis, draft: PlanDraft | None = None) -> list[dict]:
    out = []
    for key, m in a.merged.items():
        g = m.group
        form, why = (draft.forms.get(key) if draft is not None else None) or (m.form.form, m.form.why)
        cut = form.cuts_activations
        out.append({"rowwise": g.rowwise, "colwise": list(g.colwise), "form": form.label, "why": why,
                    "experts": g.experts, "meet": list(g.meet), "packed": dict(g.packed),
                    "grad_sum": dict(m.form.grad_sum) if cut else {},
                    "shared_keys": dict(m.shared_keys) if cut else {},
                    "fixups": [list(f) for f in m.form.fixups] if cut else [],
                    "blocks": len(m.blocks)})
    return out


def report(derived: Derived, stream=None) -> None:
    """What derive found and what stays whole, on stderr."""
    import sys

    stream = stream or sys.stderr
    for group in derived.groups:
        line = f"{', '.join(group['colwise'])} -> {group['rowwise']}: {group['form']}"
        if group["why"]:
            line += f" ({group['why']})"
        print(f"group: {line}", file=stream)
    for note in derived.notes:
        print(f"note: {note}", file=stream)
    r = derived.report
    if r is not None:
        print(f"check OK at tp={r.tp}" + (f" x dp={r.dp}" if r.dp > 1 else "") + f": logits {r.max_abs_logit_diff:.2g}, "
              f"gradients {r.max_abs_grad_diff:.2g}, weights after a step {r.max_abs_param_diff_after_step:.2g} "
              f"({r.seconds:.0f} s)", file=stream)
