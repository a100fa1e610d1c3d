"""The code printed verbatim into ``train.py`` (``inspect.getsource``), so the script needs no tpplan.

Holds the names printed, in their order (:data:`RUNTIME_FUNCTIONS` of tpplan/runtime/helpers.py,
:data:`STEP_FUNCTIONS` of tpplan/runtime/step.py, :data:`CHECKPOINT_CLASSES` of
tpplan/runtime/checkpoint.py), the functions that print them, and tpplan's own ``ParallelStyle``
classes a plan uses (tpplan/runtime/parallel_styles.py) with the imports they need.
"""

from __future__ import annotations

import ast
import inspect
import json

from tpplan.plan.resolved import ResolvedPlan
from tpplan.render.filters import Code

# Printed verbatim into train.py (inspect.getsource), in this order; then patterns.matches.
RUNTIME_FUNCTIONS = (
    "logits_of",
    "model_logits",
    "causal_lm_loss",
    "clip_grad_norm_",
    "build_byte_bpe_tokenizer",
    "pack_token_ids",
    "cosine_lr_multiplier",
    "parameters_on_meta",
    "materialize",
    "checkpoint_steps",
    "model_flops_per_token",
    "device_peak_flops",
)
# The training step, printed verbatim after them (tpplan/runtime/step.py), in this order.
STEP_FUNCTIONS = (
    "precision_dtypes",
    "block_names",
    "tie_again",
    "untied",
    "check_ties",
    "split_ties",
    "checkpointed_blocks",
    "selective_checkpoint_context",
    "apply_activation_checkpointing",
    "convert_to_float8",
    "require_gpu_features",
    "enable_async_tp",
    "data_parallel_mesh",
    "apply_fsdp",
    "prepare_model",
    "set_gradient_sync",
    "forward_backward",
    "optimizer_step",
    "LossScaler",
)


def _own_style_classes(plan: ResolvedPlan) -> list[str]:
    """tpplan's own ParallelStyle classes the plan uses and every function of parallel_styles.py they
    call, in the order the file defines them."""
    from tpplan.runtime import parallel_styles

    defined = {name for name, value in vars(parallel_styles).items()
               if (inspect.isfunction(value) or inspect.isclass(value))
               and getattr(value, "__module__", None) == parallel_styles.__name__}
    todo = [e.rule.TORCH_STYLE for e in plan.sharded_entries() if e.rule.own_style]
    if todo:  # FSDP2 keeps its split of their weights apart from theirs
        todo.append(parallel_styles.fsdp_shard_placement.__name__)
    used: set[str] = set()
    while todo:
        name = todo.pop()
        if name in used:
            continue
        used.add(name)
        tree = ast.parse(inspect.getsource(getattr(parallel_styles, name)))
        todo.extend(n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and n.id in defined)
    return [name for name in vars(parallel_styles) if name in used]


def own_style_imports(plan: ResolvedPlan) -> dict[str, set[str]]:
    """``from X import name`` of parallel_styles.py that the printed classes use (torch and F are
    imported by the script anyway)."""
    from tpplan.runtime import parallel_styles

    tree = ast.parse(inspect.getsource(parallel_styles))
    imported = {}
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            for alias in node.names:
                imported[alias.asname or alias.name] = node.module
    used: dict[str, set[str]] = {}
    for name in _own_style_classes(plan):
        source = inspect.getsource(getattr(parallel_styles, name))
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, ast.Name) and node.id in imported:
                used.setdefault(imported[node.id], set()).add(node.id)
    return used


def own_styles_source(plan: ResolvedPlan) -> Code:
    """The source of tpplan's own styles the plan uses, printed into train.py (no tpplan import)."""
    from tpplan.runtime import parallel_styles

    return Code("\n\n".join(inspect.getsource(getattr(parallel_styles, n)) for n in _own_style_classes(plan)))


def runtime_source() -> Code:
    from tpplan.core import patterns
    from tpplan.runtime import helpers as runtime

    functions = [getattr(runtime, name) for name in RUNTIME_FUNCTIONS] + [patterns.matches]
    return Code("\n\n".join(inspect.getsource(function) for function in functions))


# Printed verbatim into train.py's checkpoint section: its resume path reads checkpoints as data.
CHECKPOINT_CLASSES = ("CheckpointRefused", "SafeCheckpointReader", "SafeLoadPlanner", "checkpoint_mismatch")


def checkpoint_source() -> Code:
    from tpplan.runtime import checkpoint

    return Code("\n\n".join(inspect.getsource(getattr(checkpoint, name)) for name in CHECKPOINT_CLASSES))


def step_source() -> Code:
    """The training step's functions, after the table of precisions they read (tpplan/runtime/precision.py)."""
    from tpplan.runtime import step

    return Code("\n\n".join([precision_table(), *(inspect.getsource(getattr(step, name)) for name in STEP_FUNCTIONS)]))


def precision_table() -> str:
    """``PRECISION_DTYPES`` as Python source (double quotes, one mode a line: as ruff formats it)."""
    from tpplan.runtime.precision import PRECISION_DTYPES

    rows = "".join(f"    {json.dumps(name)}: ({', '.join(json.dumps(d) for d in dtypes)}),\n"
                   for name, dtypes in PRECISION_DTYPES.items())
    return ("# train.precision: (parameter, compute, gradient-reduction) dtypes, by name "
            "(tpplan/runtime/precision.py)\n" + f"PRECISION_DTYPES = {{\n{rows}}}\n")
