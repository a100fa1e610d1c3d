"""The spec language: pydantic models for one YAML file.

A spec says which model to train, on which mesh, with which tensor-parallel plan, on which data.
Every model forbids unknown keys, so a typo is an error with a suggestion, not a silent default.

The plan is an ordered list of rules.  A rule maps a module-name pattern to a style; the pattern
syntax is torch's own ``parallelize_module`` syntax: dotted names, each part an ``fnmatch``
pattern (``model.layers.*.self_attn.[qkv]_proj``).  A rule may carry a nested ``plan`` whose
patterns are relative to each module the rule matches, like the chapter's per-layer dict.

The style variants mirror ``torch.distributed.tensor.parallel`` one to one: same names for the
keyword arguments, same defaults.  Each variant is the one place that knows its style, like torch's
``tensor/parallel/style.py`` keeps one small class per style: ``TORCH_STYLE`` names the torch class
it builds, and its methods say which module kinds it accepts (``kind_problem``), its input and
output layouts with torch's defaults (``input_layout``/``output_layout``), which weight dim it
shards (``weight_dim``), how to build the torch object and print its code (``build``/``code``, via
the generic ``styles.py``), and what to tell a user whose plan broke (``wrong_output_hint``).
resolve, render, simulate, check and import-hf ask these methods; none compares style names.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import (
    BaseModel,
    BeforeValidator,
    Discriminator,
    Field,
    PrivateAttr,
    Tag,
    ValidationError,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from tpplan.core.errors import short
from tpplan.core.layouts import REPLICATE, Layout, parse_layout
from tpplan.spec.fields import (
    FACTORY_HELP,
    MAX_INT,
    NAME_RE,
    DpSize,
    FactoryStr,
    FieldError,
    Identifier,
    KwargLayouts,
    Layouts,
    LayoutStr,
    NprocPerNode,
    Pattern,
    Patterns,
    Strict,
    TpSize,
    factory,
    finite,
    int_between,
    layouts,
    positive_int,
)


def _at_least_two(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"expected an integer >= 2 (the number of packed parts), got {value!r}")
    return value


#: What a rule can match: these module kinds (``resolve.module_kind``); ``conv1d`` is transformers'
#: ``Conv1D`` (GPT-2's projections: a Linear whose weight is stored transposed, [in, out]).
LINEAR, CONV1D, EMBEDDING, EXPERTS, OTHER = "linear", "conv1d", "embedding", "experts", "other"
MODULE_KINDS = (LINEAR, CONV1D, EMBEDDING, EXPERTS, OTHER)
#: ...and what a parameter-level rule matches (a pattern that names no module but a parameter)
PARAMETER = "parameter"
OWN_STYLES = "tpplan.runtime.parallel_styles"


def is_conv1d(module) -> bool:
    """transformers' ``Conv1D`` (``transformers.pytorch_utils``), by what it is rather than where it is
    imported from: a module with ``nx`` input and ``nf`` output features and a 2-D weight [nx, nf]
    used as ``x @ weight + bias``."""
    weight = getattr(module, "_parameters", {}).get("weight")
    nx, nf = getattr(module, "nx", None), getattr(module, "nf", None)
    return weight is not None and weight.ndim == 2 and isinstance(nx, int) and isinstance(nf, int) and (
        tuple(weight.shape) == (nx, nf))


def _layout_or(value: Any, default: Layout | None) -> Layout | None:
    """A rule's layout field (or the first of a tuple of them), else the style's default."""
    if isinstance(value, tuple):
        value = value[0] if value else None
    return default if value is None else parse_layout(value)


class RuleBase(Strict):
    """What every rule has: a pattern, an optional comment, an optional nested relative plan; and
    what every style answers (the defaults here are a style that does nothing)."""

    #: The torch ``ParallelStyle`` class this rule builds (None: nothing to apply), and the module
    #: that defines it: torch's, or tpplan's own ``parallel_styles`` (printed into train.py).
    TORCH_STYLE: ClassVar[str | None] = None
    STYLE_MODULE: ClassVar[str] = "torch.distributed.tensor.parallel"
    #: The module kinds the style can shard (``resolve.module_kind``).
    KINDS: ClassVar[tuple[str, ...]] = MODULE_KINDS
    #: Fields that are not keyword arguments of the torch style.
    NON_STYLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"match", "note", "plan", "style"})

    match: Pattern = Field(description="module name pattern, relative to the enclosing rule's match")
    note: str | None = Field(None, description="why this layout: printed as a comment in generated code")
    plan: list[Rule] | None = Field(None, description="rules applied under each module this rule matches")

    def style_kwargs(self) -> dict[str, Any]:
        """The torch keyword arguments this rule sets explicitly (defaults left out)."""
        return {
            name: getattr(self, name)
            for name in type(self).model_fields
            if name not in self.NON_STYLE_FIELDS and name in self.model_fields_set
        }

    def spec_fields(self) -> dict[str, Any]:
        """What a spec writes of this rule besides its match and note: its style and the arguments it sets."""
        return {"style": self.style, **self.style_kwargs()}

    # -- what the style does (answered by each style class) ---------------------------------

    @property
    def own_style(self) -> bool:
        """Whether the torch style is tpplan's own (its source goes into the generated script)."""
        return self.STYLE_MODULE == OWN_STYLES

    @property
    def user_style(self) -> bool:
        """Whether the style is the user's own class, named in the spec by import path (``OwnStyleRule``)."""
        return False

    @property
    def applies(self) -> bool:
        """Whether the rule changes the module (False: it stays replicated, as it was)."""
        return self.TORCH_STYLE is not None

    def kind_problem(self, name: str, type_name: str, kind: str) -> tuple[str, str] | None:
        """(message, hint) when this style cannot style module ``name`` of ``kind``; else None."""
        if kind in self.KINDS:
            return None
        if kind == PARAMETER:
            return (
                f"{self.style} on {name}: the pattern names a parameter, not a module, and {self.style} styles "
                "modules",
                "a parameter-level rule takes style: replicate; the 3-D weights of MoE experts are sharded by a "
                "style on their module (mlp.experts: expert_tensor_parallel or expert_parallel)",
            )
        return self.wrong_kind(name, type_name, kind)

    def wrong_kind(self, name: str, type_name: str, kind: str) -> tuple[str, str]:
        """(message, hint) for a module kind the style does not take (see ``KINDS``)."""
        return (f"{self.style} cannot style {name} ({type_name}, a {kind} module)",
                f"{self.style} takes {' / '.join(self.KINDS)} modules")

    def size_problems(self, name: str, module, *, tp: int, ep: int) -> list[tuple[str, str, str]]:
        """(message, hint, field) for each size of ``module`` the style splits that tp (or ep) does not
        divide; the common Linear/Embedding arithmetic is resolve's (``weight_dim``)."""
        return []

    def input_layout(self) -> Layout | None:
        """The layout the style expects of the module's (first) input; None when it doesn't say."""
        return None

    def output_layout(self) -> Layout | None:
        """The layout of the module's (first) output under this rule; None when it doesn't say."""
        return None

    @property
    def returns_local(self) -> bool:
        """Whether the module hands on plain local tensors (True) or DTensors (False)."""
        return bool(getattr(self, "use_local_output", True))

    def weight_dim(self, kind: str) -> int | None:
        """Which dim of the module's ``weight`` the style shards over tp (None: left whole)."""
        return None

    @property
    def packed_parts(self) -> int | None:
        """How many equal parts the style splits separately (each rank: a slice of every part)."""
        return None

    def parameter_layout(self, kind: str, attr: str) -> str:
        """How the module's parameter ``attr`` is held once the style is applied: ``plain`` (left a
        torch tensor), ``replicate`` (a replicated DTensor), ``shard(d)``.  Two modules holding one
        (tied) parameter must hold it alike.  A style that does not say is only ever alike itself."""
        return "plain" if not self.applies else f"as {self.style} holds {attr}"

    def splits_sequence(self) -> bool:
        """Whether the style shards activations on the sequence dim (so tp must divide seq_length)."""
        for name, value in self.style_kwargs().items():
            if not _is_layout_arg(name):
                continue
            values = value.values() if isinstance(value, dict) else value if isinstance(value, tuple) else (value,)
            if any(v is not None and parse_layout(v).dim in (1, -2) for v in values):
                return True
        return False

    def warnings(self, name: str, kind: str, tp: int) -> list[str]:
        """Plans that load and divide but are known to break at runtime: said before `check` does."""
        return []

    def wrong_output_hint(self, name: str) -> str:
        """What to change when ``check`` finds that this module's output breaks the next module."""
        return f"{name}: make its output_layouts match what the next module expects (the unsharded shape above)"

    def bind(self, name: str, module, model) -> RuleBase:
        """This rule with the sizes its torch style needs read off the model (resolve calls it once per
        rule, with the first module it matches).  A style that needs a number the architecture fixes
        (MLA's rotary dim) leaves it out of the spec, so one spec fits the model and its tiny twin; the
        resolved plan -- what apply builds and compile prints -- carries the number.  Most styles
        read nothing: ``self``."""
        return self

    # -- the torch object, its code and a summary (generic: styles.py) ----------------------

    #: Whether the style spreads whole experts over the mesh's ``ep`` dim (its module is then sharded
    #: by FSDP over dp alone, and applied even at tp=1).
    EXPERT_PARALLEL: ClassVar[bool] = False

    def build(self, mesh=None):
        """The torch ``ParallelStyle`` object (None when the rule applies nothing); ``mesh`` is the
        whole ("dp", "ep", "tp") device mesh, for styles that need more than the tp mesh."""
        from tpplan.spec.styles import build_style

        return build_style(self)

    def code(self) -> str:
        """Python source that builds the style: ``RowwiseParallel(output_layouts=Shard(1))``."""
        from tpplan.spec.styles import style_code

        return style_code(self)

    def summary(self) -> str:
        """A short description for tables: ``rowwise in=replicate out=shard(1) dtensor``."""
        from tpplan.spec.styles import style_summary

        return style_summary(self)


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
        return _layout_or(self.input_layouts, self.DEFAULT_INPUT)

    def output_layout(self):
        return _layout_or(self.output_layouts, self.DEFAULT_OUTPUT)

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
        _check_pair(self, "input_layouts", "desired_input_layouts")
        _check_kwarg_pair(self)
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
        _check_pair(self, "output_layouts", "desired_output_layouts")
        return self

    def output_layout(self):
        return _layout_or(self.desired_output_layouts, None)


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
        _check_pair(self, "input_layouts", "desired_input_layouts")
        _check_kwarg_pair(self)
        _check_pair(self, "output_layouts", "desired_output_layouts")
        return self

    def output_layout(self):
        return _layout_or(self.desired_output_layouts, None)


class ReplicateRule(RuleBase):
    """Leave the matched modules (or parameters) as they are: replicated on every tp rank.

    Useful to say so explicitly, and in ``plan_overrides`` to take a module out of a plan."""

    KINDS: ClassVar[tuple[str, ...]] = (*MODULE_KINDS, PARAMETER)
    style: Literal["replicate"]


class ExpertTensorParallelRule(RuleBase):
    """``ExpertTensorParallel`` (tpplan's own): each tp rank holds a slice of every expert's
    intermediate dim (gate_up_proj on 2I with [gate | up] split separately, down_proj on I); the
    router stays replicated, every rank runs its slice of the chosen experts on all tokens, and one
    all-reduce after the experts sums the partial outputs."""

    TORCH_STYLE: ClassVar[str] = "ExpertTensorParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (EXPERTS,)
    style: Literal["expert_tensor_parallel"]

    def wrong_kind(self, name, type_name, kind):
        return (f"expert_tensor_parallel cannot shard {name} ({type_name}): it is not a MoE experts module "
                "(3-D gate_up_proj / down_proj weights, one slice per expert)",
                "match the experts module itself (e.g. mlp.experts); its Linear neighbours take colwise/rowwise")

    def size_problems(self, name, module, *, tp, ep):
        return _expert_size_problems(self.style, name, module, tp=tp, ep=1)


class ExpertParallelRule(RuleBase):
    """``ExpertParallel`` (tpplan's own): each rank of the ``ep`` mesh dim holds E/ep whole experts
    (with tp > 1, a tp slice of each as in expert_tensor_parallel); tokens are dispatched to the
    experts' ranks and combined back with all-to-all.  The ep ranks hold different data, like data
    parallel ranks: everything outside the experts is replicated over ep, its gradients averaged over
    dp x ep by FSDP."""

    TORCH_STYLE: ClassVar[str] = "ExpertParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (EXPERTS,)
    EXPERT_PARALLEL: ClassVar[bool] = True
    style: Literal["expert_parallel"]

    def wrong_kind(self, name, type_name, kind):
        return (f"expert_parallel cannot place {name} ({type_name}): it is not a MoE experts module "
                "(3-D gate_up_proj / down_proj weights, one slice per expert)",
                "match the experts module itself (e.g. mlp.experts)")

    def size_problems(self, name, module, *, tp, ep):
        return _expert_size_problems(self.style, name, module, tp=tp, ep=ep)

    def build(self, mesh=None):
        from tpplan.runtime.parallel_styles import ExpertParallel

        if mesh is None:
            raise ValueError("expert_parallel is built with the whole (dp, ep, tp) mesh")
        return ExpertParallel(experts_mesh=mesh["ep", "tp"])

    def code(self) -> str:
        return 'ExpertParallel(experts_mesh=mesh["ep", "tp"])'


def _expert_size_problems(style: str, name: str, module, *, tp: int, ep: int) -> list[tuple[str, str, str]]:
    """Experts split over ep (whole experts) and tp (each expert's intermediate dim): what must divide."""
    from tpplan.runtime.parallel_styles import expert_weight_dims

    try:
        dims = expert_weight_dims(module)
    except ValueError as exc:
        return [(f"{style} cannot shard {name}: {exc}", "expert styles know transformers' experts layouts "
                 "(gate_up_proj / up_proj, down_proj and their biases)", "style")]
    problems = []
    down_dim = dims.get("down_proj", (None,))[0]
    experts = module.down_proj.shape[0]
    if ep > 1 and experts % ep:
        problems.append((f"{name}: {style} places {experts} experts on ep={ep} ranks: {experts} % {ep} = "
                         f"{experts % ep}", f"use an ep that divides {experts}", "style"))
    if tp > 1 and down_dim is not None:
        inter = module.down_proj.shape[down_dim]
        if inter % tp:
            relation = f"tp({tp}) > {inter}" if tp > inter else f"{inter} % {tp} = {inter % tp}"
            problems.append((f"{name}: {style} splits each expert's {inter} intermediate features (of gate, of up, "
                             f"and down_proj's input) over tp={tp}: {relation}",
                             f"use a tp that divides {inter}", "style"))
    return problems


class PackedColwiseRule(RuleBase):
    """``PackedColwiseParallel`` (tpplan's own): colwise for a Linear packing ``parts`` equal
    projections on its output features (Phi-3's ``qkv_proj`` [q | k | v], ``gate_up_proj``
    [gate | up]); each rank holds its slice of every part and hands on a local output
    [q_r | k_r | v_r], which a rowwise projection after it takes as its sharded input."""

    TORCH_STYLE: ClassVar[str] = "PackedColwiseParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (LINEAR, CONV1D)
    style: Literal["packed_colwise"]
    parts: Annotated[int, BeforeValidator(_at_least_two), WithJsonSchema({"type": "integer", "minimum": 2})] = Field(
        description="how many equal projections the weight packs on its output features: 3 for [q | k | v], "
        "2 for [gate | up]"
    )
    input_layouts: LayoutStr | None = None

    def wrong_kind(self, name, type_name, kind):
        return (f"packed_colwise cannot shard {name} ({type_name}): it shards an nn.Linear's packed output features",
                "match the fused Linear itself (e.g. self_attn.qkv_proj, mlp.gate_up_proj); MoE experts take "
                "expert_tensor_parallel" if kind == EXPERTS else "match the fused Linear itself (e.g. "
                "self_attn.qkv_proj, mlp.gate_up_proj)")

    def input_layout(self):
        return _layout_or(self.input_layouts, REPLICATE)

    def output_layout(self):
        return Layout(-1)  # this rank's slice of every part, as a local tensor

    @property
    def returns_local(self) -> bool:
        return True

    def weight_dim(self, kind):
        return {LINEAR: 0, CONV1D: 1}.get(kind)  # the output features: a Conv1D's weight is [in, out]

    @property
    def packed_parts(self) -> int | None:
        return self.parts

    def parameter_layout(self, kind, attr):
        return f"shard({self.weight_dim(kind)}) in {self.parts} parts" if attr == "weight" else "replicate"


class MoEIdentityExpertRule(RuleBase):
    """``MoEIdentityExpertParallel`` (tpplan's own): an identity ("zero-compute") expert inside an
    experts module under ``expert_tensor_parallel`` (LongCat's ``mlp.experts.identity_expert``).
    expert_tensor_parallel sums every expert's output over tp -- right for the slices of a real
    expert, tp times too much for an identity, which every rank computes whole -- so its input is
    divided by tp (transformers: ``moe_identity_expert``)."""

    TORCH_STYLE: ClassVar[str] = "MoEIdentityExpertParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (OTHER,)
    style: Literal["moe_identity_expert"]

    def wrong_kind(self, name, type_name, kind):
        return (f"moe_identity_expert cannot style {name} ({type_name}): it takes an identity expert (a module without "
                "parameters inside a MoE experts module)", "match the experts' identity module, e.g. "
                "mlp.experts.identity_expert")

    def size_problems(self, name, module, *, tp, ep):
        if any(True for _ in module.parameters()):
            return [(f"moe_identity_expert on {name} ({type(module).__name__}): it has parameters, so it is no identity "
                     "expert", "match the experts' identity module (nn.Identity)", "style")]
        return []


class LocalParamsRule(RuleBase):
    """``LocalParamsParallel`` (tpplan's own): a module (an attention) that uses some of its own
    parameters per head -- attention sinks [heads], a per-head gate bias -- while colwise q/k/v split
    its heads over tp.  Left whole, each rank would apply every head's entries to its own heads (a
    shape mismatch, or the wrong heads); ``sharded`` names the parameters split on dim 0 over tp, the
    forward runs on this rank's slice (transformers: ``local_params`` on the module, ``colwise`` on
    each of those parameters)."""

    TORCH_STYLE: ClassVar[str] = "LocalParamsParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (OTHER,)
    style: Literal["local_params"]
    sharded: tuple[str, ...] = Field(min_length=1, description="the module's own parameters split on dim 0 (one "
                                     "entry per head) over tp, e.g. [sinks]")
    # the module's inputs, prepared as prepare_input does (the attention that holds the sinks is also
    # the module whose input is gathered or shared: one module, one rule)
    input_layouts: Layouts | None = None
    desired_input_layouts: Layouts | None = None
    input_kwarg_layouts: KwargLayouts | None = None
    desired_input_kwarg_layouts: KwargLayouts | None = None
    use_local_output: bool = False

    @model_validator(mode="after")
    def _pairs(self):
        _check_pair(self, "input_layouts", "desired_input_layouts")
        _check_kwarg_pair(self)
        return self

    def wrong_kind(self, name, type_name, kind):
        return (f"local_params cannot style {name} ({type_name}, a {kind} module): it takes the module that holds the "
                "per-head parameters (the attention)", "match self_attn and name its parameters in sharded: [sinks]")

    def size_problems(self, name, module, *, tp, ep):
        problems = []
        own = dict(module.named_parameters(recurse=False))
        for param in self.sharded:
            if param not in own and getattr(module, param, "absent") is None:
                continue  # this layer has none (MiMo-V2-Flash: sinks on its sliding-window layers only)
            if param not in own:
                problems.append((f"local_params on {name} ({type(module).__name__}): it has no parameter {param!r} of "
                                 "its own" + (f" (it has {', '.join(sorted(own))})" if own else ""),
                                 "name parameters of the module itself in sharded", "sharded"))
            elif own[param].ndim == 0 or own[param].shape[0] % tp:
                size = own[param].shape[0] if own[param].ndim else 1
                problems.append((f"local_params on {name}: {param} has {size} entries on dim 0 (one per head), which "
                                 f"tp={tp} does not divide", f"use a tp that divides {size}", "sharded"))
        return problems


class ReplicateGradAllReduceRule(RuleBase):
    """``ReplicateGradAllReduce`` (tpplan's own): a module whose parameters stay whole but whose
    gradient on each rank is a partial sum -- it sees the same input on every rank and the code after
    it uses its output for that rank's heads only (Dots3's ``k_rope_only_layernorm`` on MLA's shared
    rotary key): the gradient is summed over tp (transformers: ``replicated_with_grad_allreduce``)."""

    TORCH_STYLE: ClassVar[str] = "ReplicateGradAllReduce"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (OTHER,)
    style: Literal["replicate_grad_allreduce"]

    def wrong_kind(self, name, type_name, kind):
        return (f"replicate_grad_allreduce cannot style {name} ({type_name}, a {kind} module): it takes a module "
                "with parameters of its own (a norm)", "match the module whose parameters' gradient is partial")

    def size_problems(self, name, module, *, tp, ep):
        if not any(True for _ in module.parameters(recurse=False)):
            return [(f"replicate_grad_allreduce on {name} ({type(module).__name__}): it has no parameters of its own",
                     "match the module that holds the parameters", "style")]
        return []


class MLAKVAProjRule(RuleBase):
    """``MLAKVAProjParallel`` (tpplan's own): MLA's ``kv_a_proj_with_mqa`` (DeepSeek-V2/V3.2,
    MiniCPM3, GLM-4-MoE-Lite, LongCat), a replicated Linear whose output is [compressed kv | k_rot].
    The compressed kv feeds a colwise ``kv_b_proj``, which sums its input gradient over tp; k_rot,
    one rotary key shared by every head, goes straight into attention, where each rank uses it for
    its own heads only -- so its gradient is a partial sum on each rank, and the style sums it over
    tp (transformers: ``mla_kv_a_proj``).  The weight stays whole; its gradient is then complete.

    ``rope_dim`` (k_rot's width) is read off the model where the plan is resolved: the attention
    module's ``qk_rope_head_dim`` (or the config's), so one spec fits the model and its twin."""

    TORCH_STYLE: ClassVar[str] = "MLAKVAProjParallel"
    STYLE_MODULE: ClassVar[str] = OWN_STYLES
    KINDS: ClassVar[tuple[str, ...]] = (LINEAR,)
    style: Literal["mla_kv_a_proj"]
    rope_dim: Annotated[int, BeforeValidator(positive_int)] | None = Field(
        None, description="k_rot's width: the last output features, whose gradient is summed over tp (default: "
        "the attention module's qk_rope_head_dim, read from the model)")

    def wrong_kind(self, name, type_name, kind):
        return (f"mla_kv_a_proj cannot style {name} ({type_name}): it takes MLA's kv_a_proj_with_mqa, an nn.Linear",
                "match self_attn.kv_a_proj_with_mqa")

    def bind(self, name, module, model):
        if self.rope_dim is not None:
            return self
        dim = _rope_dim_of(name, model)
        return self if dim is None else self.model_copy(update={"rope_dim": dim})

    def size_problems(self, name, module, *, tp, ep):
        out = getattr(module, "out_features", None)
        if self.rope_dim is None:
            return [(f"mla_kv_a_proj on {name}: cannot find k_rot's width (qk_rope_head_dim) on its attention module "
                     "or the model config", "set rope_dim: the number of rotary features at the end of its output",
                     "style")]
        if isinstance(out, int) and self.rope_dim >= out:
            return [(f"mla_kv_a_proj on {name}: rope_dim {self.rope_dim} leaves nothing of its {out} output features "
                     "for the compressed kv", f"rope_dim must be below {out}", "rope_dim")]
        return []

    def input_layout(self):
        return REPLICATE

    def output_layout(self):
        return REPLICATE


def _rope_dim_of(name: str, model) -> int | None:
    """``qk_rope_head_dim`` of the module owning ``name`` (MLA attention), else of the model's config."""
    parent = name.rpartition(".")[0]
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError:
        owner = None
    for source in (owner, getattr(model, "config", None)):
        value = getattr(source, "qk_rope_head_dim", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _style_path(value: Any) -> str:
    """A style of one's own: ``path/to/file.py:Class`` or ``package.module:Class``, as model.factory."""
    return factory(value)


def _style_args(value: Any) -> Any:
    """A style's keyword arguments: finite numbers (printed as literals); a ``*layouts``/``*layout``
    argument is a layout or a list of them (built as torch placements, as the built-in styles' are)."""
    if not isinstance(value, dict):
        return value
    for key, item in value.items():
        finite(item, (key,))
        if _is_layout_arg(key) and item is not None:
            try:
                value = {**value, key: layouts(item)}
            except ValueError as exc:
                raise FieldError(str(exc), (key,)) from None
    return value


def _is_layout_arg(name: str) -> bool:
    return isinstance(name, str) and name.endswith(("layouts", "layout"))


class OwnStyleRule(RuleBase):
    """A ``ParallelStyle`` of your own, named by import path as ``model.factory`` names a model:
    ``style: path/to/file.py:Class`` (relative to the spec) or ``package.module:Class``, built with
    ``args``.  parallelize_module hands it each matched module and the tp mesh (its process group:
    ``device_mesh.get_group()``); a class whose ``__init__`` takes ``mesh`` is given the whole
    (dp, ep, tp) mesh too.  resolve imports it, checks it is a ParallelStyle and that ``args``
    bind; it checks the module kinds it takes when ``kinds`` says them, and otherwise trusts the
    plan (and says so).  Its layouts are read from ``args`` (``input_layouts``, ``output_layouts``,
    ``use_local_output``, torch's names), so loss_parallel and the checks after it see them."""

    KINDS: ClassVar[tuple[str, ...]] = MODULE_KINDS
    NON_STYLE_FIELDS: ClassVar[frozenset[str]] = frozenset({"match", "note", "plan", "style", "args", "kinds"})
    style: Annotated[str, BeforeValidator(_style_path), WithJsonSchema({
        "type": "string", "pattern": r"^.+:[A-Za-z_][A-Za-z0-9_.]*$",
        "description": "a ParallelStyle of your own: 'path/to/file.py:Class' (relative to this spec) or "
        "'package.module:Class'; imported like model.factory"})]
    args: Annotated[dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")], Any],
                    BeforeValidator(_style_args)] = Field(
        default_factory=dict, description="the style's keyword arguments; *layouts arguments are layouts "
        "(replicate, shard(1)), built as torch placements")
    kinds: tuple[Literal["linear", "conv1d", "embedding", "experts", "other"], ...] | None = Field(
        None, description="the module kinds the style takes (checked by resolve); default: not checked")

    #: set by resolve (``with_class``): the imported class and whether it asks for the whole mesh
    _style_class: Any = PrivateAttr(default=None)
    _wants_mesh: bool = PrivateAttr(default=False)

    @property
    def TORCH_STYLE(self) -> str:  # noqa: N802 - the ClassVar every other style has, per instance here
        return self.style.rpartition(":")[2].rpartition(".")[2]

    @property
    def user_style(self) -> bool:
        return True

    def with_class(self, cls, wants_mesh: bool) -> OwnStyleRule:
        """This rule with its imported class (resolve imports it where the spec's folder is known)."""
        rule = self.model_copy()
        rule._style_class, rule._wants_mesh = cls, wants_mesh
        return rule

    def style_kwargs(self) -> dict[str, Any]:
        return dict(self.args)

    def spec_fields(self) -> dict[str, Any]:
        return {"style": self.style, **({"args": dict(self.args)} if self.args else {}),
                **({"kinds": list(self.kinds)} if self.kinds is not None else {})}

    def kind_problem(self, name, type_name, kind):
        if self.kinds is None or kind in self.kinds:
            return None
        article = "an" if kind[0] in "aeiou" else "a"
        return (f"{self.TORCH_STYLE} ({self.style}) takes {' / '.join(self.kinds)} modules (kinds), but {name} is "
                f"{type_name}, {article} {kind} module", f"match the modules it styles, or add {kind} to kinds")

    def input_layout(self):
        return _layout_or(self.args.get("input_layouts", self.args.get("input_layout")), None)

    def output_layout(self):
        return _layout_or(self.args.get("output_layouts", self.args.get("output_layout")), None)

    @property
    def returns_local(self) -> bool:
        return bool(self.args.get("use_local_output", True))

    def build(self, mesh=None):
        from tpplan.spec.styles import build_style

        if self._style_class is None:
            raise ValueError(f"{self.style}: a style of your own is built from a resolved plan (resolve imports it)")
        return build_style(self, cls=self._style_class, extra={"mesh": mesh} if self._wants_mesh else None)

    def code(self) -> str:
        from tpplan.spec.styles import style_code

        code = style_code(self)
        return code if not self._wants_mesh else code[:-1] + (", " if self.args else "") + "mesh=mesh)"


class GroupRule(RuleBase):
    """A rule without a style: only a nested ``plan`` applied under each match."""

    plan: list[Rule] = Field(min_length=1, description="rules applied under each module this rule matches")


def _check_pair(rule: BaseModel, given: str, desired: str) -> None:
    a, b = getattr(rule, given), getattr(rule, desired)
    if (a is None) != (b is None):
        missing = desired if b is None else given
        raise ValueError(f"{given} and {desired} go together: {missing} is missing")
    if isinstance(a, tuple) or isinstance(b, tuple):
        la = len(a) if isinstance(a, tuple) else 1
        lb = len(b) if isinstance(b, tuple) else 1
        if la != lb:
            raise ValueError(f"{given} has {la} entries but {desired} has {lb}; they pair up one to one")


def _check_kwarg_pair(rule: BaseModel) -> None:
    a = rule.input_kwarg_layouts or {}
    b = rule.desired_input_kwarg_layouts or {}
    if set(a) != set(b):
        raise ValueError(
            "input_kwarg_layouts and desired_input_kwarg_layouts must name the same keyword arguments; "
            f"got {sorted(a)} and {sorted(b)}"
        )


STYLE_RULES: dict[str, type[RuleBase]] = {
    "colwise": ColwiseRule,
    "rowwise": RowwiseRule,
    "sequence_parallel": SequenceParallelRule,
    "prepare_input": PrepareInputRule,
    "prepare_output": PrepareOutputRule,
    "prepare_input_output": PrepareInputOutputRule,
    "replicate": ReplicateRule,
    "packed_colwise": PackedColwiseRule,
    "expert_tensor_parallel": ExpertTensorParallelRule,
    "expert_parallel": ExpertParallelRule,
    "mla_kv_a_proj": MLAKVAProjRule,
    "moe_identity_expert": MoEIdentityExpertRule,
    "local_params": LocalParamsRule,
    "replicate_grad_allreduce": ReplicateGradAllReduceRule,
}
STYLE_NAMES: tuple[str, ...] = tuple(STYLE_RULES)
GROUP_TAG = "group"
OWN_TAG = "own"  # a style of one's own: an import path, 'file.py:Class'
_NOT_A_STYLE = "<not-a-style>"


def _rule_tag(value: Any) -> str:
    if isinstance(value, dict):
        style = value.get("style", GROUP_TAG if "style" not in value else None)
        if style == GROUP_TAG and "style" not in value:
            return GROUP_TAG
        if isinstance(style, str) and ":" in style:
            return OWN_TAG
        return style if isinstance(style, str) and style in STYLE_RULES else _NOT_A_STYLE
    return OWN_TAG if isinstance(value, OwnStyleRule) else getattr(value, "style", GROUP_TAG)


_TAGGED_RULES = tuple(Annotated[cls, Tag(name)] for name, cls in STYLE_RULES.items())
Rule = Annotated[
    Union[(*_TAGGED_RULES, Annotated[OwnStyleRule, Tag(OWN_TAG)],  # noqa: UP007 - built from the registry
           Annotated[GroupRule, Tag(GROUP_TAG)])],
    Discriminator(
        _rule_tag,
        custom_error_type="unknown_style",
        custom_error_message="unknown style",
    ),
]

for _cls in (*STYLE_RULES.values(), *CONV1D_STYLES.values(), OwnStyleRule, GroupRule, RuleBase):
    _cls.model_rebuild()


# --------------------------------------------------------------------------------------------
# The rest of the spec
# --------------------------------------------------------------------------------------------


_ATTR_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$"


def _attribute_path(value: Any) -> str:
    if not isinstance(value, str) or not re.match(_ATTR_PATH, value):
        raise ValueError(f"expected an attribute name (head_dim) or a dotted path (config.num_attention_heads), "
                         f"got {short(value)}")
    return value


def _plain_value(value: Any) -> Any:
    """A value printed into generated code: a finite number (nan and inf have no literal)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value}")
    return value


class Fixup(Strict):
    """Change an attribute on matched modules after sharding (e.g. a head count that must shrink by tp)."""

    match: Pattern
    attr: Annotated[
        str,
        BeforeValidator(_attribute_path),
        WithJsonSchema({"type": "string", "pattern": _ATTR_PATH}),
        Field(
            description="attribute name, or a dotted path (config.num_attention_heads): the objects along the "
            "path are copied for each matched module first, so a config shared by every layer changes only there",
        ),
    ]
    op: Literal["floordiv_tp", "set"]
    value: Annotated[int | float | bool | str | None, BeforeValidator(_plain_value)] = None
    missing: Literal["skip", "error"] = Field(
        "skip",
        description="what to do where a matched module lacks the attribute: skip (and report) or error",
    )

    @model_validator(mode="after")
    def _value(self):
        if self.op == "set" and "value" not in self.model_fields_set:
            raise ValueError("op 'set' needs a value")
        if self.op == "floordiv_tp" and self.value is not None:
            raise ValueError("op 'floordiv_tp' takes no value: it divides the attribute by the tp size")
        return self


class BuildTokenizer(Strict):
    """A byte-level BPE tokenizer trained locally on the training text (no download)."""

    build: Literal["byte_bpe"] = "byte_bpe"
    vocab_size: Annotated[int, BeforeValidator(positive_int)] = 512
    min_frequency: Annotated[int, BeforeValidator(positive_int)] = 2


TokenizerSource = Annotated[
    Annotated[str, Tag("tokenizer-name")] | Annotated[BuildTokenizer, Tag("tokenizer-build")],
    Discriminator(lambda v: "tokenizer-build" if isinstance(v, (dict, BuildTokenizer)) else "tokenizer-name"),
]


# Config keys whose value is a size or a count: when given, a positive integer up to the bound.
# Bounded so that a typo (a million layers) is an error, not a model that never finishes building.
MAX_LAYERS = 1024  # the largest published models have ~128 blocks
MAX_EXPERTS = 16384
MAX_WIDTH = 2**24
_CONFIG_BOUNDS = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers"), (1, MAX_LAYERS, "a block count")),
    **dict.fromkeys(("num_experts", "num_local_experts", "n_routed_experts"), (0, MAX_EXPERTS, "an expert count")),
    **dict.fromkeys(
        (
            "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "head_dim",
            "vocab_size", "max_position_embeddings", "moe_intermediate_size", "shared_expert_intermediate_size",
            "num_experts_per_tok", "n_embd", "n_head", "n_positions", "n_inner",
        ),
        (1, MAX_WIDTH, "a size"),
    ),
}
_CONFIG_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _config_values(value: Any) -> Any:
    """model.config: attribute names as keys; finite numbers; sizes and counts within bounds."""
    if not isinstance(value, dict):
        return value  # pydantic says "expected a mapping"
    for key, item in value.items():
        if not isinstance(key, str) or not _CONFIG_KEY.match(key):
            raise FieldError(f"config key {short(key)} is not an attribute name (letters, digits, '_')", (key,))
        finite(item, (key,))
        bounds = _CONFIG_BOUNDS.get(key)
        if bounds is not None and item is not None:
            low, high, what = bounds
            if isinstance(item, bool) or not isinstance(item, int):
                raise FieldError(f"expected {what} (an integer), got {short(item)}", (key,))
            if not low <= item <= high:
                raise FieldError(f"expected {what} from {low:,} to {high:,}, got {item:,}", (key,))
    return value


def _factory_args(value: Any) -> Any:
    """model.args / twin_args: finite numbers (the script prints them as Python literals)."""
    if isinstance(value, dict):
        for key, item in value.items():
            finite(item, (key,))
    return value


FactoryArgs = Annotated[dict[Identifier, Any], BeforeValidator(_factory_args)]


class HeadAttrs(Strict):
    """Where an attention module keeps its head counts (the names its forward reads)."""

    heads: Identifier | None = Field(None, description="attribute with the number of query heads")
    kv_heads: Identifier | None = Field(None, description="attribute with the number of key/value heads")
    head_dim: Identifier | None = Field(None, description="attribute with the size of one head")


# Attribute names looked up on an attention module when model.head_attrs does not name them.
HEAD_ATTR_DEFAULTS: dict[str, tuple[str, ...]] = {
    "heads": ("num_heads", "n_heads", "num_attention_heads", "n_head"),
    "kv_heads": ("num_kv_heads", "n_kv_heads", "num_key_value_heads", "n_kv_head"),
    "head_dim": ("head_dim",),
}


def head_attr(module, what: str, named: HeadAttrs):
    """An attention module's head count or head size (``what``: heads, kv_heads or head_dim): the
    attribute ``named`` (``model.head_attrs``) gives, else the first of the usual names it has."""
    if module is None:
        return None
    given = getattr(named, what)
    for attr in (given,) if given else HEAD_ATTR_DEFAULTS[what]:
        value = getattr(module, attr, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


class ModelSpec(Strict):
    name: str | None = Field(None, description="hub id (meta-llama/Llama-3.1-8B) or local directory")
    config: Annotated[dict[str, Any], BeforeValidator(_config_values)] = Field(
        default_factory=dict,
        description="config overrides; with no name, the whole config (needs model_type)",
    )
    factory: FactoryStr | None = Field(
        None,
        description="your own model: a function (or class) returning an nn.Module, called with `args`; "
        + FACTORY_HELP
        + ". Naming it is the opt-in: tpplan imports that code (validate, check, plan) and the generated "
        "script imports it too",
    )
    args: FactoryArgs = Field(
        default_factory=dict, description="keyword arguments of the factory (the full-size model)"
    )
    twin_args: FactoryArgs | None = Field(
        None,
        description="arguments merged over `args` for `tpplan check`'s small twin (same architecture: "
        "few layers, small widths that divide by tp)",
    )
    pretrained: bool = Field(True, description="load weights from `name`; false: random init from the config")
    dtype: Literal["float32", "bfloat16", "float16"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2", "flex_attention"] = "sdpa"
    tokenizer: TokenizerSource | None = Field(
        None, description="hub id or local path (default: the model's own), or {build: byte_bpe}"
    )
    trust_remote_code: bool = False
    revision: str | None = None
    positions: Identifier | None = Field(
        "position_ids",
        description="keyword by which the model's forward takes position ids (0..seq-1); null: not passed "
        "(the model makes its own). Default: position_ids for transformers models, null for a factory",
    )
    blocks: Patterns | None = Field(
        None,
        description="the transformer blocks (module-name patterns): one FSDP2 unit each, and what `plan` "
        "reports per block. Default: transformers' _no_split_modules; for a factory, the items of the "
        "model's ModuleList, ModuleDict or Sequential (e.g. layers.*)",
    )
    output: Pattern | None = Field(
        None,
        description="the module that computes the logits (loss_parallel, vocabulary checks). Default: "
        "transformers' get_output_embeddings(); for a factory, the last Linear as wide as the embedding's "
        "vocabulary",
    )
    head_attrs: HeadAttrs = Field(
        default_factory=HeadAttrs,
        description="attribute names of an attention module's head counts, for divisibility checks and "
        "fix-ups (default: num_heads/n_heads/num_attention_heads, num_kv_heads/n_kv_heads/"
        "num_key_value_heads, head_dim; transformers models: their config)",
    )

    @model_validator(mode="after")
    def _source(self):
        if self.factory is not None:
            given = [key for key in ("name", "config", "revision", "trust_remote_code")
                     if key in self.model_fields_set and getattr(self, key) not in (None, {}, False)]
            if given:
                raise ValueError(
                    f"a model comes from a factory or from a transformers name/config, not both: remove "
                    f"{', '.join(given)} (a spec that extends one with a transformers model must write its "
                    "model section anew)"
                )
            if "pretrained" in self.model_fields_set and self.pretrained:
                raise ValueError("a factory model has no weights to load: set pretrained: false (random init)")
            object.__setattr__(self, "pretrained", False)  # frozen model: set during validation only
            if "positions" not in self.model_fields_set:
                object.__setattr__(self, "positions", None)
            return self
        for key in ("args", "twin_args"):
            if key in self.model_fields_set and getattr(self, key):
                raise ValueError(f"{key} are the keyword arguments of a factory: set model.factory, or remove {key}")
        if self.name is None and "model_type" not in self.config:
            raise ValueError(
                "give the model a `name` (hub id or local path), a `config` with a model_type, or a `factory`"
            )
        if self.name is None and self.pretrained:
            raise ValueError("a model built from a config alone has no weights: set pretrained: false")
        return self


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
