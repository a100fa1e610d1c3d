"""The context: everything the templates print, each value decided from a spec and its plan.

Holds :class:`ScriptContext` (the templates only lay it out) with the user's code it imports
(:class:`FactoryItem`, :class:`UserStyleItem`), and :func:`build_context`, which fills it: the model
and tokenizer, the mesh, training (data files opened and checked first), the plan (made in
tpplan/render/plan_code.py, with the code of tpplan/render/printed.py) and launching (torchrun's
environment, ``#SBATCH`` resources, the Kubernetes manifests).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from tpplan.core.errors import TpplanError
from tpplan.plan.resolved import ResolvedPlan
from tpplan.render.filters import Code, RenderError
from tpplan.render.plan_code import WIDTH, FixupBlock, PlanBlock, attribute, fixups, imports, plan_blocks
from tpplan.render.printed import checkpoint_source, own_styles_source, runtime_source, step_source
from tpplan.runtime.precision import PRECISIONS
from tpplan.spec.model_spec import BuildTokenizer
from tpplan.spec.schema import Spec, training_precision

# Environment torchrun gets (launch.sh, job.slurm and `tpplan run`) unless the user's environment or
# launch.env sets it.  By default torchrun shares its rendezvous TCPStore with the workers, and the
# keys of a restarted attempt are not kept apart from the dead attempt's: a restarted rank can read a
# dead peer's address and fail to connect (gloo: "connectFullMesh failed ... Connection refused";
# pytorch/pytorch#135712).  With the store not shared, every attempt's rank 0 starts a fresh one.
TORCHRUN_ENV_DEFAULTS = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}

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


def _user_styles(plan: ResolvedPlan, base: Path | None, out_dir: Path) -> tuple[UserStyleItem, ...]:
    """The plan's styles of the user's own, each once, as the script imports them (their class names
    must not clash with each other or with the torch and tpplan styles the plan prints)."""
    from tpplan.model.factory import parse_factory

    found: dict[str, UserStyleItem] = {}
    for entry in plan.sharded_entries():
        rule = entry.rule
        if not rule.user_style:
            continue
        where = parse_factory(rule.style, base)
        folder = None
        if where.file is not None:
            folder = _portable(where.file.parent, os.path.dirname(rule.style.rpartition(":")[0]) or ".", out_dir)
        item = UserStyleItem(name=attribute(rule.TORCH_STYLE, rule.style), folder=folder, module=where.module,
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
        loss_parallel=spec.loss_parallel, precision=precision, precision_note=PRECISIONS[precision].note,
        activation_checkpointing=train.activation_checkpointing, grad_accum_steps=train.grad_accum_steps,
        compile=train.compile, float8=train.float8, tensorboard=train.tensorboard,
        wandb=train.wandb.model_dump(exclude_defaults=True) if train.wandb else None,
        mlflow=train.mlflow.model_dump(exclude_defaults=True) if train.mlflow else None,
    )


def _plan_fields(spec: Spec, plan: ResolvedPlan, module_names: list[str], attention_size: int | None, base,
                 out_dir: Path) -> dict:
    """The plan as parallelize_module calls, the fix-ups and ties, the styles of the user's own, and the
    code printed from tpplan."""
    tp_imports, tensor_imports, extra_imports = imports(plan)
    return dict(
        plan_blocks=plan_blocks(plan, module_names), fixups=fixups(spec, plan),
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
