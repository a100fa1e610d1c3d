"""tpplan tune: the best mesh and training settings for a cluster, predicted on a laptop, proven
before launch.

``tune(spec_path, gpus=256, device="h100-sxm")`` enumerates every mesh (tp, ep, dp) and setting
(activation checkpointing, float8, torch.compile, async TP, micro-batch and accumulation for the
global batch) the spec's model allows; sizes each with the simulator (``search``: exact per-rank
memory, the one ``tpplan plan`` reports) and times it with a cost model (``cost``: the step's FLOPs
counted op by op on the fake step, ``flops``, over the device's peak with a fitted efficiency per op
class, and every collective over the link it crosses, ``profiles``); ranks them; and writes the
fastest as a spec that extends the one tuned, proven by ``tpplan check`` first (``write``).

Modules: ``profiles`` (device profiles as data), ``flops`` (the FLOP counter), ``cost`` (the cost
model and its fitted efficiencies), ``search`` (the candidates), ``write`` (the spec), ``report``
(tables), ``cli`` (the command).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .cost import Efficiency, load_efficiency
from .profiles import DeviceProfile, load_device
from .search import Candidate, TuneResult, search

__all__ = ["Candidate", "DeviceProfile", "Efficiency", "Tuned", "TuneResult", "load_device",
           "load_efficiency", "search", "tune"]


@dataclass
class Tuned:
    """What ``tune`` did: the search, the candidate chosen, check's report and the spec text."""

    result: TuneResult
    best: Candidate | None
    report: object | None = None  # verdict.CheckReport
    text: str | None = None
    fitted: dict | None = None


def tune(spec_path: str, *, gpus: int, device: str | DeviceProfile = "h100-sxm",
         overrides: list | None = None, out: str | None = None, name: str | None = None,
         command: str = "tpplan tune", prove: bool = True, check_timeout: float = 600,
         **search_args) -> Tuned:
    """Search, choose the fastest candidate that fits, and (``prove``) check its spec at a small scale;
    the text is returned (the caller writes it: ``fileio.write_output_file``).  ``search_args``: see
    ``search.search``."""
    from tpplan.spec.loader import load_spec

    from . import write

    spec = load_spec(spec_path, overrides or [])
    profile = device if isinstance(device, DeviceProfile) else load_device(device)
    eff, fitted = load_efficiency()
    result = search(spec, gpus=gpus, device=profile, eff=eff, **search_args)
    ranked = result.ranked
    tuned = Tuned(result, ranked[0] if ranked else None, fitted=fitted)
    if tuned.best is None or not prove:
        return tuned
    base = load_spec(spec_path) if overrides else spec
    values = write.tuned_values(base, spec, tuned.best, result, name=name or f"{spec.name}-tuned")
    report = write.prove(Path(spec.source.path), values, tuned.best, timeout=check_timeout)
    tuned.report = report
    if not report.ok:
        failure = report.failure or {}
        raise write.TuneFailed(
            f"the tuned spec is not proven by check at tp={report.tp} dp={report.dp}: "
            + (failure.get("message") or "the sharded step differs from the unsharded one"),
            hint=failure.get("hint")
            or "nothing was written; `tpplan check` on the spec shows the difference")
    tuned.text = write.render(values, extends=write.extends_path(Path(spec.source.path), out),
                              header=write.header(result, tuned.best, command=command, fitted=fitted,
                                                  proof=write.proof_line(report)))
    return tuned
