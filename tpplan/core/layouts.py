"""Layouts: how a tensor lies across the tp ranks, written ``shard(d)`` or ``replicate``.

One parser and one printer for the spelling used in specs, in reports and in generated code.
Torch's own ``Placement`` objects are built only on demand (``to_placement``), so this module
imports nothing heavy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

LAYOUT_PATTERN = r"^\s*(replicate|shard\(\s*-?\d+\s*\))\s*$"
_SHARD = re.compile(r"^shard\(\s*(-?\d+)\s*\)$")
LAYOUT_HELP = "a layout: 'replicate' or 'shard(<dim>)', e.g. shard(1) (sequence) or shard(-1) (last dim)"


@dataclass(frozen=True, order=True)
class Layout:
    """``Layout(None)`` is replicate; ``Layout(d)`` is shard(d)."""

    dim: int | None = None

    def __str__(self) -> str:
        return "replicate" if self.dim is None else f"shard({self.dim})"

    def code(self) -> str:
        """The Python expression that builds this layout in generated code."""
        return "Replicate()" if self.dim is None else f"Shard({self.dim})"

    def to_placement(self):
        from torch.distributed.tensor import Replicate, Shard

        return Replicate() if self.dim is None else Shard(self.dim)


REPLICATE = Layout(None)


def parse_layout(text: object) -> Layout:
    """Parse ``'shard(1)'`` / ``'replicate'``; raises ``ValueError`` with the expected forms."""
    if isinstance(text, Layout):
        return text
    if not isinstance(text, str):
        raise ValueError(f"expected {LAYOUT_HELP}; got {type(text).__name__} {text!r}")
    value = text.strip().lower()
    if value == "replicate":
        return REPLICATE
    match = _SHARD.match(value)
    if match:
        return Layout(int(match.group(1)))
    raise ValueError(f"expected {LAYOUT_HELP}; got {text!r}")

