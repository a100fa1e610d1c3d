"""A wrong style of one's own, the mutant tests/dist/test_anymodel.py proves check catches: it hands
the vocab-parallel embedding its group and its rows, but never sums the ranks' partial lookups over
tp, so each rank goes on with only the tokens of its own rows embedded."""

from __future__ import annotations

import torch.nn as nn
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle


class UnsummedEmbedding(ParallelStyle):
    def __init__(self, *, output_layouts=None, use_local_output: bool = True):
        super().__init__()
        self.output_layouts, self.use_local_output = output_layouts, use_local_output

    def _apply(self, module: nn.Module, device_mesh) -> nn.Module:
        rows = distribute_tensor(module.weight, device_mesh, [Shard(0)])
        module.register_parameter("weight", nn.Parameter(rows))
        module.tp_group = device_mesh.get_group()
        layout, local = self.output_layouts, self.use_local_output

        def as_if_summed(module, inputs, output):  # the partial output taken for the whole one: no all-reduce
            whole = DTensor.from_local(output, device_mesh, [Replicate()], run_check=False)
            whole = whole.redistribute(device_mesh, [layout or Replicate()])
            return whole.to_local() if local else whole

        module.register_forward_hook(as_if_summed)
        return module
