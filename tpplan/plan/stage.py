"""The resolve stage: spec -> model source (transformers config, or the user's factory) -> the
model on the meta device -> ResolvedPlan.

Every command that needs the model goes through here -- ``validate`` (a factory is imported and
its arguments bound), ``check``, ``plan``, ``plan --resolve``, ``compile``, ``run``, ``export`` --
and the CLI resolves each spec once: it builds the Stage and hands it to the tool (``run_check``,
``simulate``, ``compile_spec``, ``prepare_run`` take ``stage=``; ``export`` reads its run's spec and
takes only the model source, the plan having been resolved when the run started).  So a model that cannot be found, a factory that does not import, arguments that do not bind, and
a plan that does not fit are reported the same way under every command: ``file:line:col`` of the
spec field at fault, the field path, and a hint.

    stage = resolve_stage(spec, tp=8)
    stage.source      # model_source.ModelSource: builds the model, its check twin, its check-rank job
    stage.model       # the full-size model on the meta device (no memory)
    stage.plan        # plan.ResolvedPlan
    stage.ep, stage.seq_length   # the sizes it was resolved at (with stage.tp)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tpplan.core.errors import SpecError, SpecErrors
from tpplan.plan.resolved import ResolvedPlan
from tpplan.spec.schema import Spec


def _locate(error: SpecError, spec: Spec) -> None:
    if error.location is None and error.path and spec.source is not None:
        keys = tuple(int(k) if k.isdigit() else k for k in re.split(r"[.\[\]]+", error.path) if k)
        error.location = spec.source.where(keys)


@contextlib.contextmanager
def located(spec: Spec) -> Iterator[None]:
    """Errors raised inside that name a spec field (``path``) but no place get the place in
    ``spec``'s file where that field is written (or its closest written parent)."""
    try:
        yield
    except SpecErrors as exc:
        for error in exc.errors:
            _locate(error, spec)
        raise
    except SpecError as exc:
        _locate(exc, spec)
        raise


def _base_dir(spec: Spec):
    return spec.source.directory if spec.source is not None else None


def model_source(spec: Spec):
    """The spec's model source (``model_source.ModelSource``): its transformers config loaded, or its
    factory imported and its arguments bound.  Errors are located in the spec."""
    from tpplan.model.model_source import model_source as source_of

    with located(spec):
        return _locating(source_of(spec.model, _base_dir(spec)), spec)


def _locating(source, spec: Spec):
    """``source`` with its later errors (a factory's build, its twin) located in ``spec``."""
    source.located = lambda: located(spec)
    return source


def validate_model(spec: Spec):
    """What ``tpplan validate`` checks of the model without building it: for a factory, that its
    module imports, the callable exists and ``args`` (and ``args`` + ``twin_args``) bind to its
    signature; for each style of one's own in the plan, the same, and that it is a ParallelStyle.
    A transformers model is not touched (validate stays fast and offline).  Without the user's trust
    (``--trust-factory``) neither is imported: only their files are looked at, and the result is the
    ``models.Factory`` left unimported."""
    from tpplan.core.trust import trusted
    from tpplan.plan.own_styles import load_spec_styles

    with located(spec):
        load_spec_styles(spec, _base_dir(spec), trusted=trusted())
    if spec.model.factory is None:
        return None
    if not trusted():
        from tpplan.model.factory import parse_factory

        with located(spec):
            return parse_factory(spec.model.factory, _base_dir(spec))
    return model_source(spec)


@dataclass(frozen=True)
class Stage:
    """A spec resolved against its model."""

    spec: Spec
    source: Any  # model_source.ModelSource
    model: Any  # torch.nn.Module, on the meta device unless a model was given
    plan: ResolvedPlan
    ep: int = 1
    seq_length: int | None = None

    @property
    def tp(self) -> int:
        return self.plan.tp

    def require(self, spec: Spec, *, tp: int, ep: int, seq_length: int | None = None) -> Stage:
        """This stage, after checking that it is ``spec`` resolved at these sizes (a tool handed a stage
        resolved for something else is a bug in its caller, not the user's input)."""
        wanted = (tp, ep, seq_length if seq_length is not None else self.seq_length)
        if self.spec is not spec or (self.tp, self.ep, self.seq_length) != wanted:
            raise ValueError(f"a stage resolved at tp={self.tp} ep={self.ep} seq_length={self.seq_length} "
                             f"handed to a tool that works at tp={tp} ep={ep} seq_length={wanted[2]}")
        return self

    def module_names(self) -> list[str]:
        return [name for name, _ in self.model.named_modules() if name]


def resolve_stage(
    spec: Spec,
    *,
    tp: int | None = None,
    seq_length: int | None = None,
    ep: int | None = None,
    model=None,
    source=None,
) -> Stage:
    """Resolve ``spec`` against its own model, built on the meta device (or against ``model``).

    ``tp`` defaults to the spec's (``mesh.tp``, or the node size for ``node``); ``ep`` to ``mesh.ep``;
    ``seq_length`` to ``train.seq_length``.  Raises a located ResolveError (or SpecErrors) naming every problem."""
    from tpplan.plan.mesh_sizes import ep_size, tp_size
    from tpplan.plan.resolve import resolve

    with located(spec):
        tp = tp_size(spec, tp)
        seq_length = seq_length or spec.train.seq_length
        if source is None and model is None:
            from tpplan.model.model_source import model_source as source_of

            source = _locating(source_of(spec.model, _base_dir(spec)), spec)
        if model is None:
            model = source.build(device="meta", dtype=spec.model.dtype)
        plan = resolve(spec, model, tp=tp, seq_length=seq_length, ep=ep)
    return Stage(spec=spec, source=source, model=model, plan=plan, ep=ep_size(spec, ep), seq_length=seq_length)


def resolve_spec(spec: Spec, *, tp: int | None = None, model=None, seq_length: int | None = None) -> ResolvedPlan:
    """Resolve ``spec`` against its own model, built on the meta device (no weights), or against
    ``model``.  The resolve stage of every command (``resolve_stage``): errors located in the spec."""
    return resolve_stage(spec, tp=tp, model=model, seq_length=seq_length).plan
