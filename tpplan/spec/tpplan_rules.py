"""The rules for tpplan's own ``ParallelStyle`` classes (``tpplan/runtime/parallel_styles.py``), the
styles torch lacks: expert_tensor_parallel and expert_parallel (MoE experts over tp, or whole experts
over ep), packed_colwise (fused projections), moe_identity_expert, local_params (per-head parameters
of an attention), replicate_grad_allreduce and mla_kv_a_proj (gradients summed over tp).
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, WithJsonSchema, model_validator

from tpplan.core.layouts import REPLICATE, Layout
from tpplan.spec.fields import KwargLayouts, Layouts, LayoutStr, positive_int
from tpplan.spec.rule_base import (
    CONV1D,
    EXPERTS,
    LINEAR,
    OTHER,
    OWN_STYLES,
    RuleBase,
    check_kwarg_pair,
    check_pair,
    layout_or,
)


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


def _at_least_two(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 2:
        raise ValueError(f"expected an integer >= 2 (the number of packed parts), got {value!r}")
    return value


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
        return layout_or(self.input_layouts, REPLICATE)

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
        check_pair(self, "input_layouts", "desired_input_layouts")
        check_kwarg_pair(self)
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
