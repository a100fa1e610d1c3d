"""The spec's ``train`` section (``TrainSpec``): data, batches, the optimizer and its schedule,
precision (``Precision``; ``AUTO_PRECISION``: what ``auto`` means for each model.dtype), activation
checkpointing, checkpoints and the trackers (``WandbSpec``, ``MlflowSpec``); and the number types
they use.
"""

from __future__ import annotations

import math
from typing import Annotated, Any, Literal, Union

from pydantic import BeforeValidator, Field, WithJsonSchema

from tpplan.core.errors import short
from tpplan.runtime.precision import PRECISIONS
from tpplan.spec.fields import MAX_INT, NAME_RE, Strict, int_between, positive_int

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


# train.precision: "auto" (from model.dtype: AUTO_PRECISION) or a mode of tpplan/runtime/precision.py
Precision = Literal[("auto", *PRECISIONS)]
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
