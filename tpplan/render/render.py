"""Render: a Spec and its ResolvedPlan -> ``train.py``, ``launch.sh``, ``job.slurm`` and the Kubernetes manifests.

Python builds a typed context (:class:`ScriptContext`); the Jinja templates in ``templates/`` only
lay it out.  Every value that comes from a spec enters a template through one of three filters,
each made in Python, never escaped by hand in Jinja:

- ``py``: ``repr()``, a Python literal;
- ``sh``: ``shlex.quote()``, one shell word;
- ``comment``: the inside of ``repr()`` of the text, for ``#`` comments: newlines and control
  characters come out escaped, so a comment stays one line;
- ``yaml``: a double-quoted YAML scalar made by PyYAML (``pytorchjob.yaml``, ``trainjob.yaml``).

The environment's ``finalize`` refuses anything else (a raw string, a number) with an error, so a
template that forgets a filter fails to render instead of writing an injectable script.  Code made
in Python from validated values (a torch style from its rule's ``code()``, the runtime helpers
printed with ``inspect.getsource``) is marked :class:`Code` and passes as it is.

Each rendered ``.py`` is compiled before anything is written, and ``compile_spec`` replaces the
output folder atomically: a failure leaves the previous ``generated/<name>/`` as it was.
"""

from __future__ import annotations

import ast
import inspect
import keyword
import os
import re
import shlex
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.core.fileio import check_output_dir, replace_dir_atomic
from tpplan.core.patterns import matches
from tpplan.plan.resolved import ResolvedPlan, RuleUse
from tpplan.spec.model_spec import BuildTokenizer
from tpplan.spec.rules import GroupRule
from tpplan.spec.schema import Spec, training_precision

# Environment torchrun gets (launch.sh, job.slurm and `tpplan run`) unless the user's environment or
# launch.env sets it.  By default torchrun shares its rendezvous TCPStore with the workers, and the
# keys of a restarted attempt are not kept apart from the dead attempt's: a restarted rank can read a
# dead peer's address and fail to connect (gloo: "connectFullMesh failed ... Connection refused";
# pytorch/pytorch#135712).  With the store not shared, every attempt's rank 0 starts a fresh one.
TORCHRUN_ENV_DEFAULTS = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

WIDTH = 110  # the project's line length (pyproject [tool.ruff]); generated code is ruff-formatted at it
TEMPLATES = {
    "train.py": "train.py.jinja",
    "launch.sh": "launch.sh.jinja",
    "job.slurm": "job.slurm.jinja",
    "pytorchjob.yaml": "pytorchjob.yaml.jinja",
    "trainjob.yaml": "trainjob.yaml.jinja",
}
# Printed verbatim into train.py (inspect.getsource), in this order; then patterns.matches.
RUNTIME_FUNCTIONS = (
    "logits_of",
    "model_logits",
    "causal_lm_loss",
    "clip_grad_norm_",
    "build_byte_bpe_tokenizer",
    "pack_token_ids",
    "cosine_lr_multiplier",
    "parameters_on_meta",
    "materialize",
    "checkpoint_steps",
    "model_flops_per_token",
    "device_peak_flops",
)
# The training step, printed verbatim after them (tpplan/runtime/step.py), in this order.
STEP_FUNCTIONS = (
    "precision_dtypes",
    "block_names",
    "tie_again",
    "untied",
    "check_ties",
    "split_ties",
    "checkpointed_blocks",
    "selective_checkpoint_context",
    "apply_activation_checkpointing",
    "convert_to_float8",
    "require_gpu_features",
    "enable_async_tp",
    "data_parallel_mesh",
    "apply_fsdp",
    "prepare_model",
    "set_gradient_sync",
    "forward_backward",
    "optimizer_step",
    "LossScaler",
)


PRECISION_NOTES = {
    "fp32": "float32 weights, gradients, AdamW state and compute",
    "bf16-mixed": "float32 master weights and AdamW state; bfloat16 compute and communication",
    "fp16-mixed": "float32 master weights and AdamW state; float16 compute, dynamic loss scaling",
    "bf16": "pure bfloat16: weights, gradients and AdamW state in bfloat16",
}


class Code(str):
    """Text that may enter a template as it is: a filter's output, or code made in Python."""


class RenderError(TpplanError):
    """A spec value that cannot be rendered safely (e.g. a newline in an #SBATCH value)."""


def py(value: Any) -> Code:
    """A Python literal: ``repr`` (strings, numbers, booleans, None, and lists/dicts of them)."""
    return Code(repr(value))


def sh(value: Any) -> Code:
    """One shell word."""
    return Code(shlex.quote(str(value)))


def yaml_scalar(value: Any) -> Code:
    """A YAML scalar: strings double-quoted by PyYAML (every special or non-ASCII character escaped,
    so ``yaml.safe_load`` gives the string back), integers and booleans as they are."""
    import json

    import yaml

    if isinstance(value, bool) or isinstance(value, int):
        return Code(json.dumps(value))
    if not isinstance(value, str):
        raise RenderError(f"internal: no YAML form for {value!r}", hint="this is a bug in a tpplan template")
    text = yaml.safe_dump(value, default_style='"', allow_unicode=False, width=float("inf"))
    return Code(text.rstrip("\n"))


def comment(value: Any) -> Code:
    """Text for a ``#`` comment, kept on one line: the inside of ``repr`` (escapes newlines and
    every non-printable character)."""
    return Code(repr(str(value))[1:-1])


def _finalize(value: Any) -> Any:
    if isinstance(value, Code):
        return value
    raise RenderError(
        f"internal: a value reached a template without the py, sh or comment filter: {value!r}",
        hint="this is a bug in a tpplan template",
    )


def environment():
    import jinja2

    folder = Path(str(resources.files("tpplan.templates")))
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
        finalize=_finalize,
    )
    env.filters.update(py=py, sh=sh, comment=comment, yaml=yaml_scalar)
    return env


# ------------------------------------------------------------------------------------------
# The context: what the templates lay out
# ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class StyleItem:
    """One key of a ``parallelize_module`` plan dict: a pattern (or module name) and its style."""

    key: str
    torch_class: Code
    code: Code  # style_code(rule): the one-line form
    kwargs: tuple[Code, ...]  # its keyword arguments, for the one-per-line form
    one_line: bool  # whether `key: code,` fits the line at the dict's indent
    notes: tuple[str, ...] = ()  # comment lines above the key
    kind: str = "style"


@dataclass(frozen=True)
class CommentItem:
    text: str
    kind: str = "comment"


@dataclass(frozen=True)
class PlanBlock:
    """One top-level rule of the spec: comment lines and (when it shards anything) one
    ``parallelize_module`` call."""

    label: str
    comments: tuple[str, ...]
    items: tuple[StyleItem | CommentItem, ...]

    @property
    def has_styles(self) -> bool:
        return any(item.kind == "style" for item in self.items)


@dataclass(frozen=True)
class FixupBlock:
    label: str
    summary: str
    lines: tuple[Code, ...]  # the statements run on each `module`
    modules: tuple[str, ...]  # where the attribute exists: rendered one by one when some lack it
    skipped: str | None  # why the others are not
    pattern: str | None = None  # every module the pattern matches has it: the script loops over the pattern


@dataclass(frozen=True)
class FactoryItem:
    """A user's model factory as the script imports it."""

    folder: str | None  # put first on sys.path, relative to the script (absolute if the spec gave one); None: the Python path
    module: str
    attr: str
    args: dict
    shown: str  # as the spec wrote it


@dataclass(frozen=True)
class UserStyleItem:
    """A ``ParallelStyle`` of the user's own (a rule's ``style: file.py:Class``), imported by the
    script as the model factory is: referenced, not copied."""

    name: Code  # the name the plan's code calls it by (the class name)
    folder: str | None  # put first on sys.path, relative to the script; None: the Python path
    module: str
    attr: str
    shown: str  # as the spec wrote it

    def lines(self, indent: int = 4) -> tuple[Code, ...]:
        """``Name = import_code(folder, module, attr)`` as ruff formats it at WIDTH (one line, the
        arguments on one line of their own, or one argument a line)."""
        args = [repr(self.folder), repr(self.module), repr(self.attr)]
        head, pad = f"{self.name} = import_code(", " " * (indent + 4)
        if indent + len(head) + len(", ".join(args)) + 1 <= WIDTH:
            return (Code(head + ", ".join(args) + ")"),)
        if len(pad) + len(", ".join(args)) <= WIDTH:
            return Code(head), Code(pad[indent:] + ", ".join(args)), Code(")")
        return (Code(head), *(Code(pad[indent:] + a + ",") for a in args), Code(")"))


@dataclass(frozen=True)
class ScriptContext:
    name: str
    description: str | None
    spec_file: str  # relative to the output folder
    extends: tuple[str, ...]
    # model
    model_name: str | None
    model_is_local: bool
    pretrained: bool
    model_config: dict
    attn_implementation: str
    trust_remote_code: bool
    revision: str | None
    tokenizer_name: str | None
    tokenizer_is_local: bool
    byte_bpe: dict | None
    # mesh
    tp: int
    dp: int | None
    ep: int
    expert_parallel: bool  # a rule places experts on the ep mesh dim: a (dp, ep, tp) mesh
    device: str
    backend: str
    pg_timeout_s: int
    # data
    dataset: str
    dataset_config: str | None
    data_files: list[str] | None
    split: str
    text_column: str
    seq_length: int
    batch_size: int
    # optimisation, logging, checkpoints
    lr: float
    weight_decay: float
    warmup_steps: int
    min_lr_ratio: float
    epochs: int
    max_steps: int | None
    max_grad_norm: float | None
    seed: int
    log_freq: int
    ckpt_freq: int | None
    save_dir: str
    experiment_name: str
    loss_parallel: bool
    # the training step
    precision: str
    precision_note: str
    activation_checkpointing: str | int
    grad_accum_steps: int
    compile: bool
    float8: bool
    async_tp: bool
    tensorboard: bool
    wandb: dict | None
    mlflow: dict | None
    # the plan
    plan_blocks: tuple[PlanBlock, ...]
    fixups: tuple[FixupBlock, ...]
    tied: tuple[tuple[str, ...], ...]  # each tied parameter's names, the one kept first
    attention_size: int | None  # layers x heads x head_dim (FLOPs per token, MFU)
    blocks: tuple[str, ...]
    factory: FactoryItem | None
    user_styles: tuple[UserStyleItem, ...]  # the plan's styles of the user's own, imported by the script
    positions: str | None
    tp_imports: tuple[Code, ...]
    tensor_imports: tuple[Code, ...]
    extra_imports: tuple[Code, ...]  # further `from X import ...` lines for tpplan's own styles
    imports_copy: bool  # a fix-up on a dotted attribute copies the object it changes
    own_styles_source: Code  # tpplan's own ParallelStyle classes the plan uses ("" if none)
    runtime_source: Code
    checkpoint_source: Code
    step_source: Code
    # launching
    nproc_per_node: str
    nnodes: str
    rdzv_backend: str
    rdzv_endpoint: str | None
    rdzv_id: str
    max_restarts: int
    env: dict[str, str]
    torchrun_env_defaults: dict[str, str]
    slurm: dict = field(default_factory=dict)
    sbatch_extra: tuple[str, ...] = ()
    kubernetes: dict = field(default_factory=dict)


# ------------------------------------------------------------------------------------------
# Building it
# ------------------------------------------------------------------------------------------


def _rel(path: Path, out_dir: Path) -> str:
    """``path`` relative to ``out_dir`` with forward slashes (deterministic and portable)."""
    return Path(os.path.relpath(Path(path).resolve(), Path(out_dir).resolve())).as_posix()


def _local_path(name: str, base_dir: Path | None) -> Path | None:
    """``name`` as an existing local file or folder (relative to the spec file, or as given)."""
    candidates = [Path(os.path.expanduser(name))]
    if base_dir is not None and not candidates[0].is_absolute():
        candidates.insert(0, base_dir / name)
    for candidate in candidates:
        try:
            if candidate.exists():
                return candidate.resolve()
        except (OSError, ValueError):  # not a possible path (a NUL byte, too long): a hub name
            continue
    return None


def _portable(path: Path, given: str, out_dir: Path) -> str:
    """A local path as the script should hold it: absolute when the spec gave it absolute,
    otherwise relative to the script's folder."""
    return path.as_posix() if Path(os.path.expanduser(given)).is_absolute() else _rel(path, out_dir)


MAX_CHECKED_MATCHES = 16  # files of a glob pattern opened before the ranks start


def _data_files(spec: Spec, base_dir: Path | None, out_dir: Path) -> list[str] | None:
    """The spec's local data files as the script holds them; each is opened and its text column
    checked first (datafiles.check_data_file), so a bad file is exit 2 before any rank starts."""
    from tpplan.spec.datafiles import DataFileError, check_data_file

    files = spec.train.data_files
    if not files:
        return None
    found = []
    for i, given in enumerate(files):
        path = Path(os.path.expanduser(given))
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if any(ch in given for ch in "*?["):
            matches = sorted(path.parent.glob(path.name))
            if not matches:
                raise _data_error(spec, i, f"train.data_files[{i}]: no file matches {given!r}")
        elif not os.path.lexists(path):
            raise _data_error(spec, i, f"train.data_files[{i}]: data file not found: {given!r} ({path})")
        else:
            matches = [path]
        for match in matches[:MAX_CHECKED_MATCHES]:
            try:
                check_data_file(match, spec.train.dataset, spec.train.text_column)
            except DataFileError as exc:
                raise _data_error(spec, i, exc.message, hint=exc.hint,
                                  at=("train", "text_column") if exc.column else None) from None
        found.append(_portable(path.resolve() if path.exists() else path, given, out_dir))
    return found


def _data_error(spec: Spec, index: int, message: str, hint: str = "data_files are relative to the spec file",
                at: tuple | None = None) -> TpplanError:
    from tpplan.core.errors import SpecError

    key = at or ("train", "data_files", index)
    where = spec.source.where(key) if spec.source else None
    path = "train.text_column" if at else None
    return SpecError(message, location=where, path=path, hint=hint)


def _style_item(key: str, rule, indent: int, notes: tuple[str, ...]) -> StyleItem:
    code = rule.code()
    tree = ast.parse(code, mode="eval").body
    if not isinstance(tree, ast.Call) or tree.args:
        raise RenderError(f"internal: unexpected style code {code!r}")
    kwargs = tuple(Code(f"{kw.arg}={ast.get_source_segment(code, kw.value)}") for kw in tree.keywords)
    one_line = indent + len(repr(key)) + 2 + len(code) + 1 <= WIDTH
    return StyleItem(
        key=key,
        torch_class=Code(rule.TORCH_STYLE),
        code=Code(code),
        kwargs=kwargs,
        one_line=one_line or not kwargs,
        notes=notes,
    )


def _plan_blocks(plan: ResolvedPlan, module_names: list[str]) -> tuple[PlanBlock, ...]:
    groups: dict[tuple, list[RuleUse]] = {}
    for use in plan.rules:
        groups.setdefault(tuple(use.path[:2]), []).append(use)
    blocks = []
    for (section, index), uses in groups.items():
        label = f"{section}[{index}]"
        top = uses[0]
        comments = [f"{label} {top.pattern}" + (f": {top.rule.note}" if top.rule.note else "")]
        items: list[StyleItem | CommentItem] = []
        for use in uses:
            is_top = use is top
            rule = use.rule
            if isinstance(rule, GroupRule):
                if not is_top and rule.note:
                    items.append(CommentItem(f"{use.pattern}: {rule.note}"))
                continue
            full = tuple(n for n in module_names if matches(use.pattern, n))
            notes = () if is_top or not rule.note else (rule.note,)
            unused = None
            if not rule.applies:
                unused = "left replicated (style: replicate)"
            elif not use.matches:
                unused = "every module it matches is given a style by a later rule (plan_overrides)"
            if unused is not None:
                if is_top:
                    comments[0] = f"{label} {top.pattern}: {unused}" + (f"; {rule.note}" if rule.note else "")
                else:
                    items.append(
                        CommentItem(f"{use.pattern}: {unused}" + (f"; {rule.note}" if rule.note else ""))
                    )
                continue
            if use.matches == full:
                items.append(_style_item(use.pattern, rule, 12, notes))
                continue
            lead = (
                f"{use.pattern}: {len(use.matches)} of its {len(full)} modules, named one by one "
                "(plan_overrides decide the others)"
            )
            for i, name in enumerate(use.matches):
                items.append(_style_item(name, rule, 12, (*notes, lead) if i == 0 else ()))
        blocks.append(PlanBlock(label=label, comments=tuple(comments), items=tuple(items)))
    return tuple(blocks)


def _fixups(spec: Spec, plan: ResolvedPlan) -> tuple[FixupBlock, ...]:
    blocks = []
    for i, fix in enumerate(spec.fixups):
        entries = [f for f in plan.fixups if f.attr == fix.attr and matches(fix.match, f.fqn)]
        present = tuple(f.fqn for f in entries if f.present)
        absent = [f.fqn for f in entries if not f.present]
        how = "//= tp" if fix.op == "floordiv_tp" else f"= {fix.value!r}"
        skipped = None
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            skipped = f"skipped where the attribute does not exist: {len(absent)} of {len(entries)} modules ({shown})"
        blocks.append(
            FixupBlock(
                label=f"fixups[{i}]",
                summary=f"{fix.match}.{fix.attr} {how}",
                lines=_fixup_lines(fix, f"fixups[{i}].attr"),
                modules=present,
                skipped=skipped,
                pattern=fix.match if present and not absent else None,
            )
        )
    return tuple(blocks)


def _fixup_lines(fix, what: str) -> tuple[Code, ...]:
    """``module.a.b //= tp_mesh.size()``, after giving the module its own copy of ``module.a`` (a
    config is shared by every layer: changed in place it would shrink once per layer)."""
    parts = [str(_attribute(part, what)) for part in fix.attr.split(".")]
    lines = []
    for depth in range(1, len(parts)):
        owner = ".".join(["module", *parts[:depth]])
        lines.append(Code(f"{owner} = copy.copy({owner})  # shared with other modules: this module's own copy"))
    target = ".".join(["module", *parts])
    lines.append(Code(f"{target} //= tp_mesh.size()" if fix.op == "floordiv_tp" else f"{target} = {fix.value!r}"))
    return tuple(lines)


TP_IMPORTS_FROM, TENSOR_IMPORTS_FROM = "torch.distributed.tensor.parallel", "torch.distributed.tensor"


def _imports(plan: ResolvedPlan) -> tuple[tuple[Code, ...], tuple[Code, ...], tuple[Code, ...]]:
    """The names train.py imports from torch.distributed.tensor.parallel and torch.distributed.tensor,
    and any further ``from X import a, b`` lines that tpplan's own styles need."""
    styles, placements = set(), set()
    for entry in plan.sharded_entries():
        code = entry.rule.code()
        if not entry.rule.own_style and not entry.rule.user_style:
            styles.add(entry.rule.TORCH_STYLE)
        placements.update(re.findall(r"\b(Replicate|Shard)\(", code))
    # (DTensor and loss_parallel: the training step imports them where it uses them)
    names: dict[str, set[str]] = {TP_IMPORTS_FROM: styles | {"parallelize_module"}, TENSOR_IMPORTS_FROM: set(placements)}
    for module, needed in _own_style_imports(plan).items():
        names.setdefault(module, set()).update(needed)
    tp_names = sorted(names.pop(TP_IMPORTS_FROM), key=lambda n: (n[0].islower(), n))
    tensor_names = sorted(names.pop(TENSOR_IMPORTS_FROM), key=lambda n: (n[0].islower(), n.lstrip("_")))
    extra = tuple(Code(f"from {module} import {', '.join(sorted(found))}") for module, found in sorted(names.items()))
    return tuple(Code(n) for n in tp_names), tuple(Code(n) for n in tensor_names), extra


def _own_style_classes(plan: ResolvedPlan) -> list[str]:
    """tpplan's own ParallelStyle classes the plan uses and every function of parallel_styles.py they
    call, in the order the file defines them."""
    from tpplan.runtime import parallel_styles

    defined = {name for name, value in vars(parallel_styles).items()
               if (inspect.isfunction(value) or inspect.isclass(value))
               and getattr(value, "__module__", None) == parallel_styles.__name__}
    todo = [e.rule.TORCH_STYLE for e in plan.sharded_entries() if e.rule.own_style]
    if todo:  # FSDP2 keeps its split of their weights apart from theirs
        todo.append(parallel_styles.fsdp_shard_placement.__name__)
    used: set[str] = set()
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        tree = ast.parse(inspect.getsource(getattr(parallel_styles, name)))
        todo.extend(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in defined)
    return [name for name in vars(parallel_styles) if name in used]


def _own_style_imports(plan: ResolvedPlan) -> dict[str, set[str]]:
    """``from X import name`` of parallel_styles.py that the printed classes use (torch and F are
    imported by the script anyway)."""
    from tpplan.runtime import parallel_styles

    tree = ast.parse(inspect.getsource(parallel_styles))
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    used: dict[str, set[str]] = {}
    for name in _own_style_classes(plan):
        source = inspect.getsource(getattr(parallel_styles, name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name) and node.id in imported:
                used.setdefault(imported[node.id], set()).add(node.id)
    return used


def own_styles_source(plan: ResolvedPlan) -> Code:
    """The source of tpplan's own styles the plan uses, printed into train.py (no tpplan import)."""
    from tpplan.runtime import parallel_styles

    return Code("\n\n".join(inspect.getsource(getattr(parallel_styles, n)) for n in _own_style_classes(plan)))


def runtime_source() -> Code:
    from tpplan.core import patterns
    from tpplan.runtime import helpers as runtime

    functions = [getattr(runtime, name) for name in RUNTIME_FUNCTIONS] + [patterns.matches]
    return Code("\n\n".join(inspect.getsource(function) for function in functions))


# Printed verbatim into train.py's checkpoint section: its resume path reads checkpoints as data.
CHECKPOINT_CLASSES = ("CheckpointRefused", "SafeCheckpointReader", "SafeLoadPlanner", "checkpoint_mismatch")


def checkpoint_source() -> Code:
    from tpplan.runtime import checkpoint

    return Code("\n\n".join(inspect.getsource(getattr(checkpoint, name)) for name in CHECKPOINT_CLASSES))


def step_source() -> Code:
    from tpplan.runtime import step

    return Code("\n\n".join(inspect.getsource(getattr(step, name)) for name in STEP_FUNCTIONS))


def _attribute(name: str, what: str) -> Code:
    """An attribute name printed as code (``module.weight``): a plain identifier only."""
    if not name.isidentifier() or keyword.iskeyword(name):
        raise RenderError(f"{what}: {name!r} is not a Python attribute name")
    return Code(name)


def _user_styles(plan: ResolvedPlan, base: Path | None, out_dir: Path) -> tuple[UserStyleItem, ...]:
    """The plan's styles of the user's own, each once, as the script imports them (their class names
    must not clash with each other or with the torch and tpplan styles the plan prints)."""
    from tpplan.model.sources import parse_factory

    found: dict[str, UserStyleItem] = {}
    for entry in plan.sharded_entries():
        rule = entry.rule
        if not rule.user_style:
            continue
        where = parse_factory(rule.style, base)
        folder = None
        if where.file is not None:
            folder = _portable(where.file.parent, os.path.dirname(rule.style.rpartition(":")[0]) or ".", out_dir)
        item = UserStyleItem(name=_attribute(rule.TORCH_STYLE, rule.style), folder=folder, module=where.module,
                             attr=where.attr, shown=rule.style)
        if found.setdefault(item.name, item) != item:
            raise RenderError(f"two styles of your own are both called {item.name} ({found[item.name].shown}, "
                              f"{item.shown}): the script would import one over the other",
                              hint="rename one of the classes")
    taken = {e.rule.TORCH_STYLE for e in plan.sharded_entries() if not e.rule.user_style}
    for name in found.keys() & (taken | {"parallelize_module", "Replicate", "Shard"}):
        raise RenderError(f"{found[name].shown}: a style of your own called {name} would hide the {name} the "
                          "script imports from torch or prints from tpplan", hint=f"rename the class {name}")
    return tuple(found.values())


def _factory_item(spec: Spec, source, out_dir: Path) -> FactoryItem:
    factory = source.factory
    folder = None
    if factory.file is not None:
        given = spec.model.factory.rpartition(":")[0]
        folder = _portable(factory.file.parent, os.path.dirname(given) or ".", out_dir)
    return FactoryItem(folder=folder, module=factory.module, attr=factory.attr, args=dict(source.args),
                       shown=spec.model.factory)


def build_context(spec: Spec, plan: ResolvedPlan, module_names: list[str], out_dir: Path,
                  source=None, attention_size: int | None = None) -> ScriptContext:
    """Everything the templates print, each value decided here (the templates only lay it out)."""
    out_dir = Path(out_dir)
    base = spec.source.directory if spec.source else None
    return ScriptContext(
        name=spec.name,
        description=spec.description,
        spec_file=_rel(spec.source.path, out_dir) if spec.source else f"{spec.name}.yaml",
        extends=tuple(_rel(p, out_dir) for p in (spec.source.chain[1:] if spec.source else ())),
        **_model_fields(spec, base, out_dir, source),
        **_mesh_fields(spec, plan),
        **_training_fields(spec, base, out_dir),
        **_plan_fields(spec, plan, module_names, attention_size, base, out_dir),
        **_launch_fields(spec, plan),
    )


def _model_fields(spec: Spec, base, out_dir: Path, source) -> dict:
    """The model and its tokenizer as the script finds them: a hub id or a folder relative to the
    script, a tokenizer to train, or the user's factory."""
    model = spec.model
    model_name, model_is_local = model.name, False
    if model.name is not None:
        local = _local_path(model.name, base)
        if local is not None and local.is_dir():
            model_name, model_is_local = _portable(local, model.name, out_dir), True
    tokenizer_name, tokenizer_is_local, byte_bpe = None, False, None
    if isinstance(model.tokenizer, BuildTokenizer):
        byte_bpe = {"vocab_size": model.tokenizer.vocab_size, "min_frequency": model.tokenizer.min_frequency}
    elif model.tokenizer is not None:
        local = _local_path(model.tokenizer, base)
        if local is not None:
            tokenizer_name, tokenizer_is_local = _portable(local, model.tokenizer, out_dir), True
        else:
            tokenizer_name = model.tokenizer
    elif model.name is None:
        raise RenderError(
            f"a model built from {'a factory' if model.factory else 'a config alone'} has no tokenizer: set "
            "model.tokenizer",
            hint="a hub id or local folder, or {build: byte_bpe, vocab_size: N} to train one on the data",
        )
    factory = None
    if model.factory is not None:
        if source is None:
            from tpplan.plan.stage import model_source

            source = model_source(spec)
        factory = _factory_item(spec, source, out_dir)
    return dict(
        model_name=model_name, model_is_local=model_is_local, pretrained=model.pretrained,
        model_config=dict(model.config), attn_implementation=model.attn_implementation,
        trust_remote_code=model.trust_remote_code, revision=model.revision, tokenizer_name=tokenizer_name,
        tokenizer_is_local=tokenizer_is_local, byte_bpe=byte_bpe, factory=factory, positions=model.positions,
    )


def _mesh_fields(spec: Spec, plan: ResolvedPlan) -> dict:
    mesh = spec.mesh
    return dict(
        tp=plan.tp, dp=mesh.dp if isinstance(mesh.dp, int) else None, ep=mesh.ep,
        expert_parallel=any(e.rule.EXPERT_PARALLEL for e in plan.entries), device=mesh.device,
        backend=mesh.backend, pg_timeout_s=spec.launch.pg_timeout_s, async_tp=mesh.async_tp,
    )


def _training_fields(spec: Spec, base, out_dir: Path) -> dict:
    """The data, the optimizer, the step's settings, logging and checkpoints."""
    train = spec.train
    precision = training_precision(spec)
    return dict(
        dataset=train.dataset, dataset_config=train.dataset_config, data_files=_data_files(spec, base, out_dir),
        split=train.split, text_column=train.text_column, seq_length=train.seq_length,
        batch_size=train.batch_size, lr=train.lr, weight_decay=train.weight_decay,
        warmup_steps=train.warmup_steps, min_lr_ratio=train.min_lr_ratio, epochs=train.epochs,
        max_steps=train.max_steps, max_grad_norm=train.max_grad_norm, seed=train.seed, log_freq=train.log_freq,
        ckpt_freq=train.ckpt_freq, save_dir=train.save_dir, experiment_name=train.experiment_name or spec.name,
        loss_parallel=spec.loss_parallel, precision=precision, precision_note=PRECISION_NOTES[precision],
        activation_checkpointing=train.activation_checkpointing, grad_accum_steps=train.grad_accum_steps,
        compile=train.compile, float8=train.float8, tensorboard=train.tensorboard,
        wandb=train.wandb.model_dump(exclude_defaults=True) if train.wandb else None,
        mlflow=train.mlflow.model_dump(exclude_defaults=True) if train.mlflow else None,
    )


def _plan_fields(spec: Spec, plan: ResolvedPlan, module_names: list[str], attention_size: int | None, base,
                 out_dir: Path) -> dict:
    """The plan as parallelize_module calls, the fix-ups and ties, the styles of the user's own, and the
    code printed from tpplan."""
    tp_imports, tensor_imports, extra_imports = _imports(plan)
    return dict(
        plan_blocks=_plan_blocks(plan, module_names), fixups=_fixups(spec, plan),
        user_styles=_user_styles(plan, base, out_dir),
        tied=tuple(t.names for t in plan.tied), attention_size=attention_size, blocks=tuple(plan.blocks),
        tp_imports=tp_imports, tensor_imports=tensor_imports, extra_imports=extra_imports,
        imports_copy=any("." in f.attr for f in spec.fixups), own_styles_source=own_styles_source(plan),
        runtime_source=runtime_source(), checkpoint_source=checkpoint_source(), step_source=step_source(),
    )


def _launch_fields(spec: Spec, plan: ResolvedPlan) -> dict:
    """torchrun's arguments and environment, the #SBATCH lines, the Kubernetes manifests."""
    launch = spec.launch
    slurm = launch.slurm  # every #SBATCH value is one printable line: validated in spec.SlurmSpec
    return dict(
        nproc_per_node=str(launch.nproc_per_node), nnodes=launch.nnodes, rdzv_backend=launch.rdzv_backend,
        rdzv_endpoint=launch.rdzv_endpoint, rdzv_id=launch.rdzv_id or spec.name, max_restarts=launch.max_restarts,
        env=dict(launch.env), torchrun_env_defaults=dict(TORCHRUN_ENV_DEFAULTS),
        slurm={
            "nodes": launch.nnodes.replace(":", "-"),  # sbatch writes a range MIN-MAX
            "partition": slurm.partition,
            "account": slurm.account,
            "time": slurm.time,
            **node_resources(spec),
        },
        sbatch_extra=tuple(slurm.extra_sbatch), kubernetes=_kubernetes(spec, plan.tp),
    )


def node_resources(spec: Spec) -> dict:
    """What one node's torchrun asks the scheduler for (job.slurm, and the pods' GPUs in the Kubernetes
    manifests): ``gpus_per_node`` (0: no GPU request, as on a CPU spec) and ``cpus_per_task`` (None when
    it cannot be known: ``nproc_per_node: cpu`` starts a rank per core of whatever node it lands on)."""
    launch, slurm = spec.launch, spec.launch.slurm
    nproc = launch.nproc_per_node
    gpus = slurm.gpus_per_node
    if gpus == "auto":
        gpus = 0 if "cpu" in (spec.mesh.device, nproc) else (nproc if isinstance(nproc, int) else 8)
    gpus = gpus or 0
    cpus = slurm.cpus_per_task
    if cpus is None:
        ranks = nproc if isinstance(nproc, int) else (gpus if nproc != "cpu" else 0)
        threads = launch.env.get("OMP_NUM_THREADS", "1")
        cpus = ranks * (int(threads) if threads.isdigit() and int(threads) > 0 else 1) or None
    return {"gpus_per_node": gpus, "cpus_per_task": cpus}


def _kubernetes(spec: Spec, tp: int) -> dict:
    """What pytorchjob.yaml and trainjob.yaml need: names Kubernetes accepts, the replica specs, the pods' GPUs."""
    launch, k8s = spec.launch, spec.launch.kubernetes
    # a DNS-1123 label (kubectl refuses anything else): a-z, 0-9 and '-', starting and ending with a letter or
    # digit; 53 characters leave room for "-train-py" within 63, and the cut must not leave a '-' at the end
    name = re.sub(r"[^a-z0-9-]+", "-", spec.name.lower()).strip("-")[:53].rstrip("-") or "tpplan"
    low, _, high = launch.nnodes.partition(":")
    elastic = bool(high)
    if elastic:
        replicas = [{"kind": Code("Worker"), "count": int(high)}]
    else:
        replicas = [{"kind": Code("Master"), "count": 1}]
        if int(low) > 1:
            replicas.append({"kind": Code("Worker"), "count": int(low) - 1})
    nproc = launch.nproc_per_node
    gpus = node_resources(spec)["gpus_per_node"] or None
    return {
        "name": name,
        "configmap": f"{name}-train-py",
        "namespace": k8s.namespace,
        "image": k8s.image,
        "volume_claim": k8s.volume_claim,
        "nproc_per_node": str(nproc),
        "nproc_count": nproc if isinstance(nproc, int) else None,  # a TrainJob takes a number only
        "runtime": k8s.runtime,
        "backoff_limit": k8s.backoff_limit,
        "elastic": elastic,
        "min_nodes": int(low),
        "max_nodes": int(high or low),
        "max_restarts": str(launch.max_restarts),
        "max_restarts_count": launch.max_restarts,
        "replicas": replicas,
        "gpus": gpus,
        "run_dir": f"/runs/{spec.train.experiment_name or spec.name}",
        "env": {**TORCHRUN_ENV_DEFAULTS, **launch.env},
    }


# ------------------------------------------------------------------------------------------
# Rendering and writing
# ------------------------------------------------------------------------------------------


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


def render_spec(spec: Spec, out_dir: str | os.PathLike) -> Rendered:
    """Render ``spec`` for the folder ``out_dir`` (paths in the script are relative to it)."""
    from tpplan.plan.stage import resolve_stage

    stage = resolve_stage(spec)
    context = build_context(spec, stage.plan, stage.module_names(), Path(out_dir), stage.source,
                            attention_size=stage.source.attention_size(stage.model))
    return Rendered(spec=spec, plan=stage.plan, context=context, files=render_files(context), model=stage.model)


def compile_spec(spec: Spec, output: str | os.PathLike = "generated") -> Path:
    """Render ``spec`` into ``output/<name>/``, replacing that folder atomically.  A folder tpplan
    did not write (no marker, or files the marker does not list) is refused before any work."""
    target = check_output_dir(Path(output) / spec.name)
    rendered = render_spec(spec, target)
    replace_dir_atomic(rendered.files, target, kind="compile", private=True)  # they may hold launch.env's secrets
    return target
