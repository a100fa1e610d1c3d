"""What every part of resolve reads and writes: the spec and the model, the errors found, patterns matched.

``ResolverBase`` holds the resolver's state (the spec, the model, tp/ep and the sequence length,
the modules and parameters by name, the rules used and the module each one was assigned), records
errors at the spec location of the rule at fault (folding the repeats across a model's layers into
the first), and matches module-name patterns against the model, with the closest names as the hint
when one matches nothing.  The checks (``module_checks``, ``plan_checks``) and the resolver itself
(``resolve``) are built on it.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

from tpplan.core.errors import Location, ResolveError
from tpplan.core.patterns import matches
from tpplan.plan.resolved import RuleUse
from tpplan.spec.schema import Spec

PathKey = tuple


@dataclass
class ResolverBase:
    """The resolver's state, its located errors and its pattern matching (see the module docstring)."""

    spec: Spec
    model: Any
    tp: int
    seq_length: int | None
    ep: int = 1
    base_dir: Any = None  # the spec's folder: styles of one's own named by a file path are relative to it
    modules: dict[str, Any] = field(default_factory=dict)
    parameters: dict[str, Any] = field(default_factory=dict)
    errors: list[ResolveError] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    uses: list[RuleUse] = field(default_factory=list)
    assigned: dict[str, int] = field(default_factory=dict)  # module -> index into uses
    _pending: list = field(default_factory=list)
    _seen: dict = field(default_factory=dict)
    _logits: str | None = None

    # -- locations and errors --------------------------------------------------------------

    def where(self, path: PathKey) -> Location | None:
        source = self.spec.source
        return source.where(path) if source is not None else None

    def fail(self, message: str, path: PathKey | None = None, hint: str | None = None, *, module: str | None = None) -> None:
        """Record an error. Errors naming a ``module`` that repeat for its siblings (every layer
        of a model) are folded into the first: "... (and 31 more modules like it)"."""
        key = (path, message.replace(module, "<module>") if module else message)
        if key in self._seen:
            self._seen[key][1] += 1
            return
        self._seen[key] = [len(self._pending), 0]
        self._pending.append((message, path, hint))

    def _flush_errors(self) -> None:
        from tpplan.spec.yaml_reader import format_path

        for (message, path, hint), (_, more) in zip(self._pending, self._seen.values(), strict=True):
            if more:
                message += f" (and {more} more module{'s' if more > 1 else ''} like it)"
            self.errors.append(
                ResolveError(
                    message,
                    location=self.where(path) if path is not None else None,
                    path=format_path(path) if path is not None else None,
                    hint=hint,
                )
            )

    # -- matching --------------------------------------------------------------------------

    def match_under(self, pattern: str, parents: list[str] | None, *, names=None) -> list[str]:
        """Modules matching ``pattern`` (under each of ``parents``); a pattern that names no module
        may name parameters (a parameter-level rule: ``mlp.experts.gate_up_proj``)."""
        names = self.modules if names is None else names
        if parents is None:
            found = [name for name in names if matches(pattern, name)]
        else:
            found = []
            for parent in parents:
                prefix = parent + "."
                found.extend(name for name in names if name.startswith(prefix) and matches(pattern, name[len(prefix):]))
        if not found and names is self.modules:
            found = self.match_under(pattern, parents, names=self.parameters)
        return found

    def no_match_hint(self, pattern: str, parents: list[str] | None) -> str:
        if parents:
            prefix = parents[0] + "."
            names = [n[len(prefix):] for n in self.modules if n.startswith(prefix)]
            where = f"under {parents[0]}"
        else:
            names, where = list(self.modules), "in the model"
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.5)
        if close:
            return f"closest module names {where}: " + ", ".join(close)
        children = sorted({n.split(".")[0] for n in names})[:12]
        return f"top-level names {where}: " + ", ".join(children)

    # -- what the checks look up -----------------------------------------------------------

    def target(self, name: str):
        """The module (or, for a parameter-level rule, the parameter) called ``name``."""
        return self.modules[name] if name in self.modules else self.parameters[name]

    @property
    def logits_module(self) -> str | None:
        return self._logits
