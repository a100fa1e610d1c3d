"""Render: a Spec and its ResolvedPlan -> ``train.py``, ``launch.sh``, ``job.slurm`` and the Kubernetes manifests.

Python builds a typed context (:class:`~tpplan.render.context.ScriptContext`, tpplan/render/context.py);
the Jinja templates in ``templates/`` only lay it out, every spec value through a filter
(tpplan/render/filters.py).

Each rendered ``.py`` is compiled before anything is written, and ``compile_spec`` replaces the
output folder atomically: a failure leaves the previous ``generated/<name>/`` as it was.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpplan.core.fileio import check_output_dir, replace_dir_atomic
from tpplan.plan.resolved import ResolvedPlan
from tpplan.render.context import ScriptContext, build_context
from tpplan.render.filters import RenderError, environment
from tpplan.spec.schema import Spec

TEMPLATES = {
    "train.py": "train.py.jinja",
    "launch.sh": "launch.sh.jinja",
    "job.slurm": "job.slurm.jinja",
    "pytorchjob.yaml": "pytorchjob.yaml.jinja",
    "trainjob.yaml": "trainjob.yaml.jinja",
}


@dataclass(frozen=True)
class Rendered:
    spec: Spec
    plan: ResolvedPlan
    context: ScriptContext
    files: dict[str, str]  # name -> text
    model: Any = None  # the model it was resolved against, on the meta device




def render_files(context: ScriptContext) -> dict[str, str]:
    """Lay the context out with every template; each .py is compiled before it is returned."""
    env = environment()
    files = {}
    for out_name, template in TEMPLATES.items():
        text = env.get_template(template).render(ctx=context)
        if out_name.endswith(".py"):
            try:
                compile(text, out_name, "exec", dont_inherit=True)
            except SyntaxError as exc:
                raise RenderError(
                    f"internal: the rendered {out_name} does not compile: {exc.msg} (line {exc.lineno})",
                    hint="this is a bug in tpplan's templates; please report it with the spec",
                ) from None
        files[out_name] = text
    return files


def render_spec(spec: Spec, out_dir: str | os.PathLike, stage=None) -> Rendered:
    """Render ``spec`` for the folder ``out_dir`` (paths in the script are relative to it).  ``stage``:
    ``spec`` already resolved at its own sizes (``plan.stage.Stage``), or None to resolve it here."""
    from tpplan.plan.mesh_sizes import ep_size, tp_size
    from tpplan.plan.stage import resolve_stage

    if stage is None:
        stage = resolve_stage(spec)
    stage.require(spec, tp=tp_size(spec), ep=ep_size(spec), seq_length=spec.train.seq_length)
    context = build_context(spec, stage.plan, stage.module_names(), Path(out_dir), stage.source,
                            attention_size=stage.source.attention_size(stage.model))
    return Rendered(spec=spec, plan=stage.plan, context=context, files=render_files(context), model=stage.model)


def compile_spec(spec: Spec, output: str | os.PathLike = "generated", stage=None) -> Path:
    """Render ``spec`` into ``output/<name>/``, replacing that folder atomically.  A folder tpplan
    did not write (no marker, or files the marker does not list) is refused before any work.
    ``stage``: as ``render_spec``'s."""
    target = check_output_dir(Path(output) / spec.name)
    rendered = render_spec(spec, target, stage)
    replace_dir_atomic(rendered.files, target, kind="compile", private=True)  # they may hold launch.env's secrets
    return target
