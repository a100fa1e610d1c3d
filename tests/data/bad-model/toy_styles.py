"""Parallel styles of one's own for the bad-model catalogue: one that is a ParallelStyle, one that is not."""

from torch.distributed.tensor.parallel import ParallelStyle


class EmbedStyle(ParallelStyle):
    def __init__(self, *, output_layouts=None, use_local_output=True):
        super().__init__()
        self.output_layouts, self.use_local_output = output_layouts, use_local_output

    def _apply(self, module, device_mesh):
        return module


class NotAStyle:
    def __init__(self, *, output_layouts=None):
        self.output_layouts = output_layouts
