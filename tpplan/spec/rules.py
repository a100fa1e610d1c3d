"""The rule a plan lists: every style by name (``STYLE_RULES``), a style of one's own named by import
path (``OwnStyleRule``), a rule without a style that only nests a plan (``GroupRule``), and ``Rule``,
their union, told apart by the ``style`` key (a style it does not know is one ``unknown style``
error).  Importing this module completes every rule class (a nested ``plan`` is a list of ``Rule``).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal, Union

from pydantic import BeforeValidator, Discriminator, Field, PrivateAttr, Tag, WithJsonSchema

from tpplan.spec.fields import FieldError, factory, finite, layouts
from tpplan.spec.rule_base import MODULE_KINDS, RuleBase, is_layout_arg, layout_or
from tpplan.spec.torch_rules import (
    CONV1D_STYLES,
    ColwiseRule,
    PrepareInputOutputRule,
    PrepareInputRule,
    PrepareOutputRule,
    ReplicateRule,
    RowwiseRule,
    SequenceParallelRule,
)
from tpplan.spec.tpplan_rules import (
    ExpertParallelRule,
    ExpertTensorParallelRule,
    LocalParamsRule,
    MLAKVAProjRule,
    MoEIdentityExpertRule,
    PackedColwiseRule,
    ReplicateGradAllReduceRule,
)


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
        if is_layout_arg(key) and item is not None:
            try:
                value = {**value, key: layouts(item)}
            except ValueError as exc:
                raise FieldError(str(exc), (key,)) from None
    return value


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
        return layout_or(self.args.get("input_layouts", self.args.get("input_layout")), None)

    def output_layout(self):
        return layout_or(self.args.get("output_layouts", self.args.get("output_layout")), None)

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
