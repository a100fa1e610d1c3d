"""``tpplan derive``: a tensor-parallel plan read off the model's own dataflow, proven before it is written.

Four steps, each in the parts named here (a part imports only ``common`` and the parts named before it):

1. **Trace** (``twin``).  The model's tiny twin (same architecture, a few layers, small
   widths) runs one forward under :mod:`tpplan.model.dataflow` (the one tracer of the twin), which records which modules and parameters every
   tensor flows from -- the order data flows in, not the order modules were registered in.
2. **Find the patterns** (``skeleton``, ``groups``, ``emulate``, ``forms``).  The skeleton (input
   embedding -> decoder blocks -> final norm -> output head, and the residual stream threading through
   the blocks); in every block, the Linear layers whose outputs meet (in attention, in an elementwise
   product) and feed one single Linear whose output returns to the stream: a colwise group and its
   rowwise partner.  Each group is then *emulated* on the twin: for every tp rank, the colwise weights
   cut to that rank's rows and the rowwise weight to its columns; the rowwise partial outputs summed
   over the ranks must equal the unsharded output.  That one test finds what no list of names does:
   fused projections whose split cuts at global offsets (Phi-3's qkv_proj), biases built for all heads
   (Bloom's ALiBi), head counts read from module attributes (fixed by a ``floordiv_tp`` fix-up, found
   by trying the attributes that hold those counts).  Modules with parameters that see a sharded
   activation (per-head q/k norms, a learnable activation) get their gradients summed over tp; a tensor
   that needs a gradient and joins the sharded region from outside (MLA's shared rope key) makes the
   group unshardable, as do parameters read directly inside it.  Each group's decision is a value, its
   ``GroupForm`` (a ``Form`` and why).  ``analysis`` holds all of it, once per model.
3. **Solve divisibility and draft** (``sizes``, ``children``, ``assemble``, ``budget``, ``draft``).  The
   largest tp of 8, 4, 2 (or the one asked for) that divides every head count and width the groups
   split, the vocabulary where the embedding and head are split; what does not divide stays whole and
   says why.  A draft takes ``Constraints`` (what check disproved, what a parameter budget leaves whole)
   as an argument and records them: no phase writes into another's objects.
4. **Write and prove** (``write``, ``prove``, ``pipeline``).  A commented spec in the shipped specs'
   form (patterns over layer indices, the reason for each rule in its note), then ``tpplan check`` on
   it: a plan that does not pass is never written.

``compare`` measures a derived plan's bytes per step against other plans on the simulator.
"""

from __future__ import annotations

from .budget import params_per_rank, split_numel
from .common import DeriveFailed, DeriveRefused
from .compare import bytes_per_step, compare_bytes, step_costs
from .groups import Form
from .pipeline import Derived, Prepared, derive, prepare, report

__all__ = [
    "DeriveFailed",
    "DeriveRefused",
    "Derived",
    "Form",
    "Prepared",
    "bytes_per_step",
    "compare_bytes",
    "derive",
    "params_per_rank",
    "prepare",
    "report",
    "split_numel",
    "step_costs",
]
