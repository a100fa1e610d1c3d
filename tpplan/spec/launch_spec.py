"""Where and how a spec runs: the ``mesh`` section (``MeshSpec``: tp, dp, ep, device, backend) and the
``launch`` section (``LaunchSpec``: torchrun's flags and environment, ``SlurmSpec`` for job.slurm,
``KubernetesSpec`` for the Kubeflow manifests), each value one the generated scripts can hold.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, WithJsonSchema

from tpplan.core.errors import short
from tpplan.spec.fields import DpSize, FieldError, NprocPerNode, Strict, TpSize, int_between, positive_int


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


def _nnodes(value: Any) -> str:
    text = str(value) if isinstance(value, int) and not isinstance(value, bool) else value
    if not isinstance(text, str) or not re.match(r"^[1-9][0-9]*(:[1-9][0-9]*)?$", text):
        raise ValueError(f"expected a node count (2) or a range MIN:MAX (1:4), got {short(value)}")
    return text


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
