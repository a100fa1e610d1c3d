"""What ``tpplan check`` answers and the measure it answers by: what the parent and the ranks share.

The constants of the proof (the tolerances, the optimizer steps both sides take, check's own AdamW, the
twin's sequence and batch), ``CheckReport`` (the verdict: rank 0 writes it as result.json, the parent
reads it back and adds what only it knows) and ``Tolerance`` (what one compared tensor may differ by).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# A compared tensor may differ by ATOL + RTOL x its largest unsharded magnitude.  The proof runs in
# float32, where correct plans agree to 1e-7..1e-5 of each tensor's largest value (rounding in another
# order; the most in scalars summed over every activation, like Apertus' xIELU alpha); ATOL only keeps a
# tensor that is zero on both sides from dividing by zero.  16-bit training is proven in float32:
# between two correct plans bfloat16 gradients differ by up to 3% of a tensor's largest value in the
# twin, as much as some real plan errors (see step_settings).
ATOL, RTOL = 1e-12, 1e-4
WEIGHT_ULPS = 4  # weights after a step may also differ by this many float32 ulps of their largest value
# A tensor that is zero in exact arithmetic is rounding alone (OPT's k_proj.bias: softmax ignores a constant
# added to every key, so its gradient is 2e-11 of noise, and no relative tolerance fits it).  So a tensor may
# also differ by OWN_ROUNDING x the unsharded model's own rounding of it (its distance from the same steps in
# float64), at most ROUNDING_CAP x the largest tensor of its quantity (gradients, updates, ...): float32
# rounding is never larger than that, and a model whose random draws differ in float64 gets no more.
OWN_ROUNDING, ROUNDING_CAP = 10.0, 1e-6
STEPS = 3  # optimizer steps both sides take, everything compared after each
# check's AdamW: eps above the twin's gradient entries makes the update ~ lr x m / eps, linear in the
# gradient (at eps 1e-6 an entry near eps magnified its rounding lr / eps = 1000x: Gemma 3n, Gemma 4), and
# lr makes it thousands of units in the last place of the weights it moves
OPTIMIZER = {"lr": 1e-2, "eps": 0.1, "weight_decay": 0.1}
TWIN_SEQ_PER_TP = 8  # sequence length of the twin = this x tp (sequence parallel splits it)
TWIN_BATCH = 2  # sequences per data-parallel rank


@dataclass
class CheckReport:
    ok: bool
    tp: int
    dp: int
    world_size: int
    ep: int = 1
    tolerance: float = ATOL
    relative_tolerance: float = RTOL  # x each tensor's largest unsharded magnitude
    # per quantity, its largest difference over what it was allowed, over every step (ok: every one <= 1)
    tolerance_used: dict = field(default_factory=dict)
    step: dict = field(default_factory=dict)  # the training settings both sides ran (precision, ...)
    steps: int = 0  # optimizer steps compared (fewer than STEPS when one failed)
    optimizer: dict = field(default_factory=dict)  # check's AdamW settings
    max_abs_logit_diff: float | None = None
    loss_unsharded: float | None = None  # of the first step
    loss_sharded: float | None = None
    max_abs_grad_diff: float | None = None
    worst_grad: str | None = None  # the gradient that used most of its tolerance
    grad_norm_unsharded: float | None = None  # of the first step, before clipping
    grad_norm_sharded: float | None = None
    max_abs_param_diff_after_step: float | None = None
    worst_param: str | None = None
    max_abs_state_diff: float | None = None  # AdamW's exp_avg and sqrt(exp_avg_sq)
    # per parameter, the worst step: {"gradient": [relative error, max |unsharded|, the unsharded model's own
    # rounding], "update": [... of the largest update], "state": [... of exp_avg / sqrt(exp_avg_sq)]}; each
    # relative to the unsharded tensor's largest magnitude (its own rounding: its distance from the float64
    # twin's)
    parameters: dict = field(default_factory=dict)
    # per quantity, the tensors within tolerance only by their own rounding (zero in exact arithmetic)
    within_rounding_only: dict = field(default_factory=dict)
    rounding_unmeasured: str | None = None  # why the float64 twin could not run (then no rounding is allowed)
    parameters_compared: int = 0
    parameters_without_gradient: list = field(default_factory=list)  # on both sides: compared as equal
    # micro-batches after whose backward the sharded model held gradients: FSDP reduce-scatters
    # after the last one only; without FSDP every backward accumulates into .grad
    gradient_sync_micro_batches: list = field(default_factory=list)
    # what the plan shards: per kind, parameters (count and numel) unsharded and per rank
    sharded: dict = field(default_factory=dict)
    # the plan's rules that split weights over tp (at full size): {rule, pattern, style, modules}
    sharded_rules: list = field(default_factory=list)
    replicated: list = field(default_factory=list)  # of PARALLEL_KINDS, those the plan leaves (mostly) whole
    routing: dict = field(default_factory=dict)  # MoE: how the twin's routing was steered, what it gave
    twin: dict = field(default_factory=dict)
    loss_parallel: bool = False
    failure: dict | None = None
    warnings: list = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Tolerance:
    """What a compared tensor may differ by: ``atol + rtol x max |unsharded|``; for weights also ``ulp`` x
    their largest magnitude (rounding the sum weight + update may land one unit apart); and ``own`` x the
    unsharded model's own rounding of the tensor, at most ``cap`` x the largest tensor of its quantity."""

    atol: float
    rtol: float
    ulp: float = 0.0
    own: float = OWN_ROUNDING
    cap: float = ROUNDING_CAP

    def exact(self, scale: float, weight: float = 0.0) -> float:
        return self.atol + self.rtol * scale + self.ulp * weight

    def allowed(self, scale: float, weight: float = 0.0, rounding: float = 0.0, span: float = 0.0) -> float:
        return self.exact(scale, weight) + min(self.own * rounding, self.cap * span)
