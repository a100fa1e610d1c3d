"""tpplan: declarative tensor-parallel plans for PyTorch LLM training.

The data flow, one module per stage::

    YAML --loader--> Spec --resolve--> ResolvedPlan --apply--> DTensor model (check, training)
                                                   \\--render--> train.py / launch.sh / job.slurm --launch--> torchrun
                                                   \\--simulate--> memory and collectives at full size

The library API (torch is imported only when a function that needs it is first used, so loading
and validating specs stays fast)::

    spec = tpplan.load_spec("specs/llama3.yaml")
    plan = tpplan.resolve_spec(spec)                 # against the model, on the meta device
    model = tpplan.model_source(spec).build(device="meta")   # the spec's model: transformers or a factory
    mesh = tpplan.build_mesh("cuda", dp=1, tp=8)     # inside torchrun
    tpplan.parallelize(model, plan, mesh)            # as train.py: DTensor TP over mesh["tp"], FSDP2 over dp
    report = tpplan.run_check(spec, tp=2)            # prove it on CPU gloo ranks
    sim = tpplan.simulate_plan(spec, tp=8, dp=64)    # memory and collectives at full size
"""

from __future__ import annotations

__version__ = "0.1.0"

from tpplan.core.errors import ResolveError, SpecError, TpplanError
from tpplan.spec.loader import load_spec, load_spec_text
from tpplan.spec.schema import Spec

# public name -> (module, attribute).  No public name equals a subpackage's name (a function
# `tpplan.simulate` would be replaced by the subpackage tpplan.simulate once something imports it):
# hence `simulate_plan` for simulate.simulator.simulate.
_LAZY = {
    "resolve_spec": ("plan.stage", "resolve_spec"),
    "resolve_stage": ("plan.stage", "resolve_stage"),
    "model_source": ("plan.stage", "model_source"),
    "ResolvedPlan": ("plan.resolved", "ResolvedPlan"),
    "parallelize": ("plan.apply", "parallelize"),
    "build_mesh": ("plan.apply", "build_mesh"),
    "run_check": ("prove.check", "run_check"),
    "simulate_plan": ("simulate.simulator", "simulate"),
    "load_config": ("model.sources", "load_config"),
    "build_model": ("model.sources", "build_model"),
}

__all__ = ["__version__", "TpplanError", "SpecError", "ResolveError", "Spec", "load_spec", "load_spec_text", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attribute = _LAZY[name]
        return getattr(importlib.import_module(f".{module_name}", __name__), attribute)
    raise AttributeError(f"module 'tpplan' has no attribute {name!r}")
