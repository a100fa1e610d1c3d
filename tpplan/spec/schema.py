"""The spec language: the pydantic model of one YAML file, ``Spec``.

A spec says which model to train, on which mesh, with which tensor-parallel plan, on which data.
Every model forbids unknown keys, so a typo is an error with a suggestion, not a silent default.

``Spec`` puts the sections together -- ``model`` (``model_spec.py``), ``mesh`` and ``launch``
(``launch_spec.py``), ``plan`` and ``plan_overrides`` (``rules.py``; the styles in ``rule_base.py``,
``torch_rules.py``, ``tpplan_rules.py``), ``fixups`` (``fixups.py``), ``train`` (``train_spec.py``);
the field types in ``fields.py`` -- and checks the settings that only make sense together.
``training_precision`` says what ``train.precision: auto`` means; ``json_schema`` is what
``tpplan schema`` writes.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, PrivateAttr, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from tpplan.runtime.precision import AUTO_PRECISION
from tpplan.spec.fields import NAME_RE, Strict
from tpplan.spec.fixups import Fixup
from tpplan.spec.launch_spec import LaunchSpec, MeshSpec
from tpplan.spec.model_spec import ModelSpec
from tpplan.spec.rules import Rule
from tpplan.spec.train_spec import TrainSpec


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
        """Where this spec came from (a ``yaml_reader.Source``), or None for specs built in code."""
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
