"""The spec language: pydantic models for one YAML file.

A spec says which model to train, on which mesh, with which tensor-parallel plan, on which data.
Every model forbids unknown keys, so a typo is an error with a suggestion, not a silent default.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, PrivateAttr, ValidationError, WithJsonSchema, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tpplan.core.errors import short
from tpplan.spec.fields import (
    MAX_INT,
    NAME_RE,
    DpSize,
    FieldError,
    NprocPerNode,
    Strict,
    TpSize,
    int_between,
    positive_int,
)
from tpplan.spec.fixups import Fixup
from tpplan.spec.model_spec import ModelSpec
from tpplan.spec.rules import Rule


class MeshSpec(Strict):
    tp: TpSize = Field("node", description="tensor-parallel size, or 'node' for all devices of one node")
    dp: DpSize = Field("auto", description="data-parallel size, or 'auto' for world_size // (ep x tp)")
    ep: Annotated[int, BeforeValidator(positive_int)] = Field(
        1,
        description="expert-parallel size: ranks that hold different experts (style: expert_parallel) and "
        "different data; the mesh is dp x ep x tp",
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    async_tp: bool = Field(
        False,
        description="async tensor parallel (symmetric memory; overlaps tp collectives with matmuls): "
        "needs train.compile and Hopper GPUs",
    )


PositiveInt = Annotated[int, BeforeValidator(positive_int)]


def _non_negative(value: Any) -> Any:
    if isinstance(value, str):
        # YAML 1.1 reads 3e-4 (no dot) as a string; accept what is clearly a number
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"expected a number, got {short(value)}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {short(value)}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    if value < 0:
        raise ValueError(f"expected a number >= 0, got {value}")
    return value


def _positive_number(value: Any) -> Any:
    value = _non_negative(value)
    if value == 0:
        raise ValueError("expected a number > 0, got 0")
    return value


PositiveFloat = Annotated[float, BeforeValidator(_positive_number)]
NonNegativeFloat = Annotated[float, BeforeValidator(_non_negative)]


def _non_negative_int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer >= 0, got {short(value)}")
    if value < 0:
        raise ValueError(f"expected an integer >= 0, got {value}")
    if value > MAX_INT:
        raise ValueError(f"expected an integer up to {MAX_INT:,}, got {short(value)}")
    return value


NonNegativeInt = Annotated[int, BeforeValidator(_non_negative_int)]


def _nnodes(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.match(r"^[1-9][0-9]*(:[1-9][0-9]*)?$", text):
        raise ValueError(f"expected a node count (2) or a range MIN:MAX (1:4), got {short(value)}")
    return text


# train.precision: (weights + AdamW state, compute) -- see step.precision_dtypes
Precision = Literal["auto", "fp32", "bf16-mixed", "fp16-mixed", "bf16"]
# model.dtype -> the precision `auto` means: float32 trains in float32; the 16-bit dtypes train
# mixed (float32 master weights and AdamW state, 16-bit compute)
AUTO_PRECISION = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}
AC_MODES = ("none", "full", "selective")


def _activation_checkpointing(value: Any) -> Any:
    if isinstance(value, str) and value in AC_MODES:
        return value
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    raise ValueError(
        f"expected none, full, selective, or a positive integer N (every N-th block), got {value!r}"
    )


ActivationCheckpointing = Annotated[
    Union[int, Literal["none", "full", "selective"]],  # noqa: UP007 - pydantic reads it
    BeforeValidator(_activation_checkpointing),
    WithJsonSchema(
        {"oneOf": [{"type": "string", "enum": list(AC_MODES)}, {"type": "integer", "minimum": 1}],
         "description": "none; full (every block); selective (op-level: keep matmul outputs, recompute the "
         "rest); N: every N-th block, fully"}
    ),
]


class WandbSpec(Strict):
    """Weights & Biases logging (rank 0), when the ``wandb`` package is installed."""

    project: str = Field(description="the W&B project")
    entity: str | None = Field(None, description="team or user (default: your default entity)")
    name: str | None = Field(None, description="the run's name (default: the experiment name)")
    tags: list[str] = Field(default_factory=list)


class MlflowSpec(Strict):
    """MLflow tracking (rank 0), when the ``mlflow`` (or ``mlflow-skinny``) package is installed."""

    experiment: str | None = Field(None, description="the MLflow experiment (default: the experiment name)")
    tracking_uri: str | None = Field(
        None,
        description="where runs are stored: a server (http://host:5000), a database (sqlite:///mlflow.db) or a "
        "folder (file:///path/mlruns); default: the MLFLOW_TRACKING_URI environment variable, else a file store "
        "in the run directory (RUN_DIR/mlruns)",
    )
    name: str | None = Field(None, description="the run's name (default: the experiment name)")
    tags: dict[str, str] = Field(default_factory=dict)


class TrainSpec(Strict):
    dataset: Annotated[str, Field(min_length=1)] = Field(
        "tatsu-lab/alpaca",
        description="hub dataset name, or a datasets builder ('json', 'text', 'parquet') used with data_files",
    )
    dataset_config: str | None = None
    data_files: list[Annotated[str, Field(min_length=1)]] | None = Field(
        None, description="local files, relative to this spec file"
    )
    split: Annotated[str, Field(min_length=1)] = "train"
    text_column: Annotated[str, Field(min_length=1)] = "text"
    seq_length: Annotated[int, BeforeValidator(int_between(1, 2**24, "a sequence length"))] = 1024
    batch_size: Annotated[int, BeforeValidator(int_between(1, 2**20, "a batch size"))] = Field(
        8, description="sequences per step per data-parallel rank"
    )
    lr: PositiveFloat = 3e-4
    weight_decay: NonNegativeFloat = 0.1
    warmup_steps: NonNegativeInt = 0
    min_lr_ratio: NonNegativeFloat = 0.1
    epochs: PositiveInt = 1
    max_steps: PositiveInt | None = None
    max_grad_norm: PositiveFloat | None = 1.0
    seed: Annotated[int, BeforeValidator(int_between(0, 2**63 - 1, "a seed"))] = 0
    precision: Precision = Field(
        "auto",
        description="fp32; bf16-mixed / fp16-mixed: float32 master weights and AdamW state, 16-bit compute and "
        "communication (fp16 with dynamic loss scaling); bf16: pure bfloat16; auto: from model.dtype "
        "(float32 -> fp32, bfloat16 -> bf16-mixed, float16 -> fp16-mixed)",
    )
    activation_checkpointing: ActivationCheckpointing = "none"
    grad_accum_steps: PositiveInt = Field(
        1, description="micro-batches of batch_size per optimizer step (global batch = dp x batch_size x this)"
    )
    compile: bool = Field(False, description="torch.compile each transformer block")
    float8: bool = Field(
        False, description="torchao float8 linears in the blocks (tensorwise scaling, float8 FSDP all-gather): "
        "needs GPUs of compute capability 8.9+",
    )
    tensorboard: bool = Field(True, description="write TensorBoard event files to RUN_DIR/tensorboard/")
    wandb: WandbSpec | None = Field(None, description="log to Weights & Biases too (if wandb is installed)")
    mlflow: MlflowSpec | None = Field(
        None, description="log to MLflow too (if mlflow or mlflow-skinny is installed); {} for the defaults"
    )
    log_freq: PositiveInt = 10
    ckpt_freq: PositiveInt | None = Field(None, description="checkpoint every N steps (null: never)")
    save_dir: Annotated[str, Field(min_length=1)] = "outputs"
    experiment_name: Annotated[str, Field(pattern=NAME_RE)] | None = Field(
        None, description="run folder name under save_dir (default: spec name): one folder, never a path"
    )


def _one_word(what: str):
    """A value for an #SBATCH line or a torchrun flag: printable, no spaces, not empty."""

    def check(value: Any) -> Any:
        if isinstance(value, str) and (not value or not value.isprintable() or any(c.isspace() for c in value)):
            raise ValueError(f"{what} must be one word of printable text (no spaces, newlines or control "
                             f"characters), got {short(value)}")
        return value

    return check


_SLURM_TIME = re.compile(r"^(\d+|\d+:\d{1,2}(:\d{1,2})?|\d+-\d{1,2}(:\d{1,2}(:\d{1,2})?)?|INFINITE|UNLIMITED)$", re.I)


def _slurm_time(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool) and value > 0:
        return str(value)  # minutes
    if isinstance(value, str) and not _SLURM_TIME.match(value):
        raise ValueError(
            f"expected a SLURM time limit (minutes, HH:MM:SS, D-HH:MM:SS or UNLIMITED), got {short(value)}"
        )
    return value


def _sbatch_line(value: Any) -> Any:
    if isinstance(value, str) and (not value.startswith("-") or not value.isprintable()):
        raise ValueError(f"an #SBATCH line is one sbatch option on one line, e.g. --qos=high; got {short(value)}")
    return value


def _gpus_per_node(value: Any) -> Any:
    if value is None or value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 1024:
        raise ValueError(f"expected a GPU count from 0 to 1,024, auto, or null (no GPUs), got {short(value)}")
    return value


GpusPerNode = Annotated[
    Union[int, Literal["auto"], None],  # noqa: UP007 - pydantic reads it
    BeforeValidator(_gpus_per_node),
    WithJsonSchema({"oneOf": [{"type": "integer", "minimum": 0, "maximum": 1024},
                              {"type": "string", "enum": ["auto"]}, {"type": "null"}]}),
]


class SlurmSpec(Strict):
    partition: Annotated[str, BeforeValidator(_one_word("a partition"))] | None = None
    account: Annotated[str, BeforeValidator(_one_word("an account"))] | None = None
    time: Annotated[str, BeforeValidator(_slurm_time)] = "24:00:00"
    gpus_per_node: GpusPerNode = Field(
        "auto",
        description="GPUs per node (--gpus-per-node); auto: launch.nproc_per_node when it is a number, else 8, "
        "and none when mesh.device or launch.nproc_per_node is cpu; 0 or null: no GPU request",
    )
    cpus_per_task: Annotated[int, BeforeValidator(int_between(1, 65536, "a CPU count"))] | None = Field(
        None,
        description="CPU cores of each node's torchrun task (--cpus-per-task); default: what its ranks need, "
        "launch.nproc_per_node (or the GPUs per node) x launch.env.OMP_NUM_THREADS (1 when unset)",
    )
    extra_sbatch: list[Annotated[str, BeforeValidator(_sbatch_line)]] = Field(
        default_factory=list, description="more #SBATCH lines, e.g. --qos=high"
    )


# Shell variables bash does not let a script set: read-only ones (export fails and, under
# `set -e`, stops launch.sh and job.slurm) and ones whose assignment bash silently ignores.
SHELL_RESERVED = frozenset({
    "BASHOPTS", "BASH_VERSINFO", "EUID", "PPID", "SHELLOPTS", "UID",
    "BASHPID", "BASH_ARGC", "BASH_ARGV", "BASH_COMMAND", "BASH_LINENO", "BASH_SOURCE", "BASH_SUBSHELL",
    "FUNCNAME", "GROUPS",
})


def _env(value: Any) -> Any:
    if isinstance(value, dict):
        for key in value:
            if isinstance(key, str) and key in SHELL_RESERVED:
                raise FieldError(
                    f"{key} is a shell variable bash does not let a script set: launch.sh and job.slurm cannot "
                    "export it", (key,)
                )
    return value


_ENDPOINT = re.compile(r"^(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?)(:(?P<port>[0-9]{1,5}))?$")


def _endpoint(value: Any) -> Any:
    if not isinstance(value, str):
        return value
    match = _ENDPOINT.match(value)
    if not match or (match.group("port") is not None and not 1 <= int(match.group("port")) <= 65535):
        raise ValueError(f"expected HOST:PORT (node0:29500, 10.0.0.1:29500, [fe80::1]:29500), got {short(value)}")
    return value


class KubernetesSpec(Strict):
    """The Kubeflow manifests, a training-operator v1 PyTorchJob (``pytorchjob.yaml``) and a Kubeflow
    Trainer v2 TrainJob (``trainjob.yaml``): one pod per node, torchrun in each."""

    image: str = Field(
        "pytorch/pytorch:latest",
        description="container image with torch, transformers, datasets and tqdm installed",
    )
    namespace: str | None = None
    volume_claim: str | None = Field(
        None,
        description="a PersistentVolumeClaim shared by every pod, mounted at /runs: checkpoints and resume "
        "(default: none, the run directory lives and dies with each pod)",
    )
    runtime: Annotated[str, Field(pattern=r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")] = Field(
        "torch-distributed",
        description="the TrainJob's ClusterTrainingRuntime (Kubeflow Trainer installs torch-distributed)",
    )
    backoff_limit: Annotated[int, BeforeValidator(int_between(0, 10_000, "a restart count"))] = Field(
        6, description="PyTorchJob runPolicy.backoffLimit: pod restarts (after torchrun gave up) before the job is "
        "marked failed; 6, as a Kubernetes Job's default",
    )


class LaunchSpec(Strict):
    nproc_per_node: NprocPerNode = "auto"
    nnodes: Annotated[
        str,
        BeforeValidator(_nnodes),
        WithJsonSchema(
            {
                "oneOf": [
                    {"type": "integer", "minimum": 1},
                    {"type": "string", "pattern": r"^[1-9][0-9]*(:[1-9][0-9]*)?$"},
                ]
            }
        ),
    ] = Field("1", description="node count, or MIN:MAX for elastic jobs")
    rdzv_backend: Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")] = "c10d"
    rdzv_endpoint: Annotated[str, BeforeValidator(_endpoint)] | None = Field(
        None, description="host:port of the rendezvous (multi-node)"
    )
    rdzv_id: Annotated[str, BeforeValidator(_one_word("a rendezvous id")), Field(max_length=256)] | None = None
    max_restarts: Annotated[int, BeforeValidator(int_between(0, 10_000, "a restart count"))] = 0
    pg_timeout_s: Annotated[int, BeforeValidator(int_between(1, 10**7, "a timeout in seconds"))] = Field(
        600, description="timeout of process-group operations, seconds"
    )
    env: Annotated[
        dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], str], BeforeValidator(_env)
    ] = Field(default_factory=dict)
    slurm: SlurmSpec = Field(default_factory=SlurmSpec)
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)


class Spec(Strict):
    extends: str | None = Field(
        None, description="a spec this one builds on: a path, or a shipped spec's name"
    )
    name: Annotated[str, Field(pattern=NAME_RE)]
    description: str | None = None
    model: ModelSpec
    mesh: MeshSpec = Field(default_factory=MeshSpec)
    plan: list[Rule] = Field(min_length=1)
    plan_overrides: list[Rule] = Field(
        default_factory=list,
        description="rules applied after `plan`, each replacing what earlier rules said for the modules it matches",
    )
    fixups: list[Fixup] = Field(default_factory=list)
    loss_parallel: bool = Field(
        False, description="keep the lm_head output vocab-sharded and compute the loss on it"
    )
    replicated_blocks: bool = Field(
        False,
        description="the plan means to shard nothing inside the transformer blocks (only the embedding "
        "or head, or nothing): `tpplan check` proves it instead of failing it for sharding nothing there",
    )
    train: TrainSpec = Field(default_factory=TrainSpec)
    launch: LaunchSpec = Field(default_factory=LaunchSpec)

    _source: Any = PrivateAttr(default=None)

    @model_validator(mode="after")
    def _training_features(self):
        """Settings that only make sense together, each error at the key that asks for too much."""
        errors = []

        def refuse(path: tuple, message: str, value) -> None:
            errors.append(InitErrorDetails(type=PydanticCustomError("value_error", "{error}", {"error": message}),
                                           loc=path, input=value))

        train, mesh = self.train, self.mesh
        precision = training_precision(self)
        gpu_only = [("train", "float8", train.float8), ("mesh", "async_tp", mesh.async_tp)]
        for section, key, on in gpu_only:
            if on and mesh.device == "cpu":
                refuse((section, key), "a GPU feature (NVIDIA, compute capability "
                       f"{'8.9' if key == 'float8' else '9.0'}+), but mesh.device is cpu", on)
        if train.float8 and precision not in ("bf16-mixed", "bf16"):
            refuse(("train", "float8"), f"float8 linears run inside bfloat16 training: train.precision must be "
                   f"bf16-mixed or bf16, not {precision}", train.float8)
        if mesh.async_tp and not train.compile:
            refuse(("mesh", "async_tp"), "async TP is an inductor pass: it needs train.compile: true", mesh.async_tp)
        if mesh.async_tp and mesh.tp == 1:
            refuse(("mesh", "async_tp"), "async TP overlaps tensor-parallel collectives: mesh.tp is 1", mesh.async_tp)
        gpus = self.launch.slurm.gpus_per_node
        if mesh.device == "cpu" and isinstance(gpus, int) and gpus > 0:
            refuse(("launch", "slurm", "gpus_per_node"), f"mesh.device is cpu: a CPU job requests no GPUs "
                   f"(set 0, null or auto), got {gpus}", gpus)
        if errors:
            raise ValidationError.from_exception_data("Spec", errors)
        return self

    @property
    def source(self):
        """Where this spec came from (a ``loader.Source``), or None for specs built in code."""
        return self._source


def training_precision(spec: Spec) -> str:
    """``train.precision`` with ``auto`` replaced by what it means for ``model.dtype``."""
    precision = spec.train.precision
    return AUTO_PRECISION[spec.model.dtype] if precision == "auto" else precision


def json_schema() -> dict:
    schema = Spec.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "tpplan spec"
    # A spec that `extends` another may leave out what its parent gives (name, model, plan).
    required = schema.pop("required", [])
    schema["if"] = {"not": {"required": ["extends"]}}
    schema["then"] = {"required": required}
    return schema
