"""Module-name patterns, torch's ``parallelize_module`` syntax: dotted names, each part an
``fnmatch`` pattern (``*`` never crosses a dot).  Torch-free; the generated script prints
``matches`` from here (it selects the FSDP units there)."""

from __future__ import annotations

from fnmatch import fnmatchcase


def matches(pattern, name):
    """Whether module ``name`` matches ``pattern``: as many dotted parts, each an fnmatch."""
    parts, names = pattern.split("."), name.split(".")
    return len(parts) == len(names) and all(fnmatchcase(n, p) for p, n in zip(parts, names, strict=True))
