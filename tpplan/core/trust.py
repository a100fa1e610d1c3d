"""Code a spec or a run folder names is imported only when the user opted in for that command.

A spec is data, but a few of its fields name Python code that importing runs: ``model.factory``
(a module of the spec's author) and ``model.trust_remote_code`` (a model repository's modeling
code, through transformers).  A spec handed over by someone else, or a run folder's ``spec.yaml``,
is read by every command; its code is imported only under ``--trust-factory`` (or
``TPPLAN_TRUST_FACTORY=1`` for scripts), as transformers asks ``trust_remote_code=True``.  Without
it the command refuses at the field that names the code (exit 2), before anything is imported.

Every place that would import such code calls :func:`require_trust` first: one rule, one message.
The library follows the same rule; ``with tpplan.core.trust.trusting():`` is its opt-in.
"""

from __future__ import annotations

import contextlib
import contextvars
import os
from collections.abc import Iterator

from tpplan.core.errors import ResolveError

FLAG = "--trust-factory"
ENV = "TPPLAN_TRUST_FACTORY"

_trusted: contextvars.ContextVar[bool] = contextvars.ContextVar("tpplan_trust_factory", default=False)


class UntrustedCode(ResolveError):
    """Code named by a spec that the user did not opt in to run (exit 2, located at the field)."""


def trusted() -> bool:
    """Whether this command may import the code a spec names: ``--trust-factory``, a
    :func:`trusting` block, or ``TPPLAN_TRUST_FACTORY=1`` in the environment."""
    return _trusted.get() or os.environ.get(ENV, "").strip().lower() in ("1", "true", "yes")


@contextlib.contextmanager
def trusting(on: bool = True) -> Iterator[None]:
    """Inside this block, the code specs name may be imported (``on=False``: it may not)."""
    token = _trusted.set(on)
    try:
        yield
    finally:
        _trusted.reset(token)


def require_trust(path: str, what: str) -> None:
    """Refuse (:class:`UntrustedCode`, located at the spec field ``path``) unless the user trusts
    the spec's code.  ``what``: the code in words, e.g. ``model.factory 'llama_model.py:Llama'``."""
    if trusted():
        return
    raise UntrustedCode(
        f"{what} is Python code named by the spec: tpplan imports it only when you trust the spec's author",
        path=path,
        hint=f"pass {FLAG} (or set {ENV}=1) to import it; read it first if someone else wrote the spec "
        "(docs/trust.md says which commands run whose code)",
    )
