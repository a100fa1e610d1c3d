"""What every plan rule has and what every style answers: ``RuleBase``.

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

Here: ``RuleBase`` (its defaults are a style that does nothing), the module kinds a rule can match
(``MODULE_KINDS``), and the helpers the style classes share (``layout_or``, ``check_pair``).  The
styles: torch's in ``torch_rules.py``, tpplan's own in ``tpplan_rules.py``; a style of one's own, the
group rule and the ``Rule`` union of them all in ``rules.py``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from pydantic import BaseModel, Field

from tpplan.core.layouts import Layout, parse_layout
from tpplan.spec.fields import Pattern, Strict

if TYPE_CHECKING:  # Rule is the union of every style: rules.py defines it and completes the
    # rule classes (model_rebuild), whose nested plan is a list of Rule
    from tpplan.spec.rules import Rule


#: What a rule can match: these module kinds (``module_kinds.module_kind``); ``conv1d`` is transformers'
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


def layout_or(value: Any, default: Layout | None) -> Layout | None:
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
    #: The module kinds the style can shard (``module_kinds.module_kind``).
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
            if not is_layout_arg(name):
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


def is_layout_arg(name: str) -> bool:
    return isinstance(name, str) and name.endswith(("layouts", "layout"))


def check_pair(rule: BaseModel, given: str, desired: str) -> None:
    a, b = getattr(rule, given), getattr(rule, desired)
    if (a is None) != (b is None):
        missing = desired if b is None else given
        raise ValueError(f"{given} and {desired} go together: {missing} is missing")
    if isinstance(a, tuple) or isinstance(b, tuple):
        la = len(a) if isinstance(a, tuple) else 1
        lb = len(b) if isinstance(b, tuple) else 1
        if la != lb:
            raise ValueError(f"{given} has {la} entries but {desired} has {lb}; they pair up one to one")


def check_kwarg_pair(rule: BaseModel) -> None:
    a = rule.input_kwarg_layouts or {}
    b = rule.desired_input_kwarg_layouts or {}
    if set(a) != set(b):
        raise ValueError(
            "input_kwarg_layouts and desired_input_kwarg_layouts must name the same keyword arguments; "
            f"got {sorted(a)} and {sorted(b)}"
        )
