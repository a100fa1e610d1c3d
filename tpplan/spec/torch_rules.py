"""The rules for torch's own ``ParallelStyle`` classes, one class per style as in torch's
``tensor/parallel/style.py``: colwise and rowwise (with their variants for transformers' ``Conv1D``,
which ``bind`` picks per module), sequence_parallel, prepare_input, prepare_output,
prepare_input_output, and replicate (a rule that applies nothing).
"""

from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import model_validator

from tpplan.core.layouts import REPLICATE, Layout
from tpplan.spec.fields import KwargLayouts, Layouts, LayoutStr
from tpplan.spec.rule_base import (
    CONV1D,
    EMBEDDING,
    EXPERTS,
    LINEAR,
    MODULE_KINDS,
    OTHER,
    OWN_STYLES,
    PARAMETER,
    RuleBase,
    check_kwarg_pair,
    check_pair,
    is_conv1d,
    layout_or,
)


class _LinearStyle(RuleBase):
    """colwise and rowwise: shard an nn.Linear's or an nn.Embedding's weight, or a transformers
    ``Conv1D``'s (its weight [in, out] is a Linear's transposed: resolve binds the rule to the
    Conv1D variant of the style, ``CONV1D_STYLES``)."""

    KINDS: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D, EMBEDDING)
    #: torch's default layouts for this style
    DEFAULT_INPUT: ClassVar[Layout] = REPLICATE
    DEFAULT_OUTPUT: ClassVar[Layout] = REPLICATE
    #: the weight dim it shards: (nn.Linear [out, in], nn.Embedding [vocab, dim])
    LINEAR_DIM: ClassVar[int] = 0
    EMBEDDING_DIM: ClassVar[int] = 1
    #: how the module's other parameters (a Linear's bias) are held: torch's colwise shards them on
    #: dim 0, rowwise replicates them
    OTHER_PARAMETERS: ClassVar[str] = "replicate"

    input_layouts: LayoutStr | None = None
    output_layouts: LayoutStr | None = None
    use_local_output: bool = True

    def wrong_kind(self, name, type_name, kind):
        hint = (
            "norms take sequence_parallel; whole blocks take prepare_input/prepare_output"
            if "norm" in type_name.lower()
            else "MoE experts (3-D weights) take expert_tensor_parallel or expert_parallel"
            if kind == EXPERTS
            else f"{self.style} shards nn.Linear, transformers' Conv1D and nn.Embedding only; match the Linear "
            "layers inside"
        )
        return f"{self.style} cannot shard {name} ({type_name}): it is not a Linear or an Embedding", hint

    def input_layout(self):
        return layout_or(self.input_layouts, self.DEFAULT_INPUT)

    def output_layout(self):
        return layout_or(self.output_layouts, self.DEFAULT_OUTPUT)

    def weight_dim(self, kind):
        # a Conv1D's weight is a Linear's transposed: [in, out]
        return {LINEAR: self.LINEAR_DIM, CONV1D: 1 - self.LINEAR_DIM, EMBEDDING: self.EMBEDDING_DIM}.get(kind)

    def parameter_layout(self, kind, attr):
        return f"shard({self.weight_dim(kind)})" if attr == "weight" else self.OTHER_PARAMETERS

    def bind(self, name, module, model):
        variant = CONV1D_STYLES.get(type(self))
        if variant is None or not is_conv1d(module):
            return self
        return variant.model_validate(self.model_dump(exclude_unset=True))


class ColwiseRule(_LinearStyle):
    """``ColwiseParallel``: shard a Linear's output features (or an Embedding's embedding dim)."""

    TORCH_STYLE: ClassVar[str] = "ColwiseParallel"
    DEFAULT_INPUT: ClassVar[Layout] = REPLICATE
    DEFAULT_OUTPUT: ClassVar[Layout] = Layout(-1)
    LINEAR_DIM: ClassVar[int] = 0
    EMBEDDING_DIM: ClassVar[int] = 1
    OTHER_PARAMETERS: ClassVar[str] = "shard(0)"
    style: Literal["colwise"]

    def warnings(self, name, kind, tp):
        if kind == EMBEDDING and self.output_layout() == Layout(-1) and self.returns_local:
            return [
                f"{name}: colwise on an Embedding hands each rank 1/{tp} of the hidden vector "
                "(output shard(-1), local): the next module expects the full hidden size. Use "
                "output_layouts: replicate, or shard(1) into sequence_parallel"
            ]
        return []

    def wrong_output_hint(self, name):
        if self.output_layout() == Layout(-1):
            return (f"{name}: set output_layouts: replicate (full output on every rank), or shard(1) to feed "
                    "sequence_parallel modules")
        return super().wrong_output_hint(name)


class RowwiseRule(_LinearStyle):
    """``RowwiseParallel``: shard a Linear's input features (or an Embedding's vocabulary)."""

    TORCH_STYLE: ClassVar[str] = "RowwiseParallel"
    DEFAULT_INPUT: ClassVar[Layout] = Layout(-1)
    DEFAULT_OUTPUT: ClassVar[Layout] = REPLICATE
    LINEAR_DIM: ClassVar[int] = 1
    EMBEDDING_DIM: ClassVar[int] = 0
    style: Literal["rowwise"]


class Conv1DColwiseRule(ColwiseRule):
    """colwise bound to a transformers ``Conv1D`` (resolve's ``bind``): the output features are its
    weight's dim 1 (``Conv1DColwiseParallel``, tpplan's own)."""

    TORCH_STYLE: ClassVar[str] = "Conv1DColwiseParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES


class Conv1DRowwiseRule(RowwiseRule):
    """rowwise bound to a transformers ``Conv1D``: the input features are its weight's dim 0
    (``Conv1DRowwiseParallel``, tpplan's own)."""

    TORCH_STYLE: ClassVar[str] = "Conv1DRowwiseParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES


#: colwise/rowwise -> the style that shards a Conv1D alike (chosen by ``bind`` per matched module)
CONV1D_STYLES: dict[type, type] = {ColwiseRule: Conv1DColwiseRule, RowwiseRule: Conv1DRowwiseRule}


class SequenceParallelRule(RuleBase):
    """``SequenceParallel``: replicate the weights, shard activations on the sequence dim."""

    TORCH_STYLE: ClassVar[str] = "SequenceParallel"
    KINDS: ClassVar[tuple[str, ...]] = (OTHER,)
    style: Literal["sequence_parallel"]
    sequence_dim: int = 1
    use_local_output: bool = False

    def wrong_kind(self, name, type_name, kind):
        return (
            f"sequence_parallel on {name} ({type_name}) would replicate its weight and split its input on "
            "the sequence: that is for norms and dropout",
            "shard a Linear with colwise or rowwise",
        )

    def input_layout(self):
        return Layout(self.sequence_dim)

    def output_layout(self):
        return Layout(self.sequence_dim)

    def parameter_layout(self, kind, attr):
        return "replicate"

    def splits_sequence(self):
        return self.sequence_dim in (1, -2)


class PrepareInputRule(RuleBase):
    """``PrepareModuleInput``: redistribute a module's inputs (positional and keyword)."""

    TORCH_STYLE: ClassVar[str] = "PrepareModuleInput"
    style: Literal["prepare_input"]
    input_layouts: Layouts | None = None
    desired_input_layouts: Layouts | None = None
    input_kwarg_layouts: KwargLayouts | None = None
    desired_input_kwarg_layouts: KwargLayouts | None = None
    use_local_output: bool = False

    def parameter_layout(self, kind, attr):
        return "plain"  # moves activations only

    @model_validator(mode="after")
    def _pairs(self):
        check_pair(self, "input_layouts", "desired_input_layouts")
        check_kwarg_pair(self)
        return self


class PrepareOutputRule(RuleBase):
    """``PrepareModuleOutput``: redistribute a module's outputs."""

    TORCH_STYLE: ClassVar[str] = "PrepareModuleOutput"
    style: Literal["prepare_output"]
    output_layouts: Layouts
    desired_output_layouts: Layouts
    use_local_output: bool = True

    def parameter_layout(self, kind, attr):
        return "plain"  # moves activations only

    @model_validator(mode="after")
    def _pairs(self):
        check_pair(self, "output_layouts", "desired_output_layouts")
        return self

    def output_layout(self):
        return layout_or(self.desired_output_layouts, None)


class PrepareInputOutputRule(RuleBase):
    """``PrepareModuleInputOutput``: both of the above on one module."""

    TORCH_STYLE: ClassVar[str] = "PrepareModuleInputOutput"
    style: Literal["prepare_input_output"]
    input_layouts: Layouts | None = None
    desired_input_layouts: Layouts | None = None
    input_kwarg_layouts: KwargLayouts | None = None
    desired_input_kwarg_layouts: KwargLayouts | None = None
    use_local_input: bool = False
    output_layouts: Layouts
    desired_output_layouts: Layouts
    use_local_output: bool = True

    def parameter_layout(self, kind, attr):
        return "plain"  # moves activations only

    @model_validator(mode="after")
    def _pairs(self):
        check_pair(self, "input_layouts", "desired_input_layouts")
        check_kwarg_pair(self)
        check_pair(self, "output_layouts", "desired_output_layouts")
        return self

    def output_layout(self):
        return layout_or(self.desired_output_layouts, None)


class ReplicateRule(RuleBase):
    """Leave the matched modules (or parameters) as they are: replicated on every tp rank.

    Useful to say so explicitly, and in ``plan_overrides`` to take a module out of a plan."""

    KINDS: ClassVar[tuple[str, ...]] = (*MODULE_KINDS, PARAMETER)
    style: Literal["replicate"]
