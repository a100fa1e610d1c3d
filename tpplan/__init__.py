"""tpplan: declarative tensor-parallel plans for PyTorch LLM training.

The data flow, one module per stage::

    YAML --loader--> Spec --resolve--> ResolvedPlan --apply--> DTensor model (check, training)
                                                   \\--render--> train.py / launch.sh / job.slurm --launch--> torchrun
                                                   \\--simulate--> memory and collectives at full size
"""

from __future__ import annotations

__version__ = "0.1.0"

from .errors import ResolveError, SpecError, TpplanError
from .loader import load_spec, load_spec_text
from .spec import Spec

__all__ = ["__version__", "TpplanError", "SpecError", "ResolveError", "Spec", "load_spec", "load_spec_text"]
