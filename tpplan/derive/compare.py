"""Bytes per step of a derived plan against other plans (transformers', the hand-written ones), on the
simulator at full size."""

from __future__ import annotations

from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.simulate.simulator import simulate
from tpplan.spec.loader import load_spec_text

from .common import first_line


def bytes_per_step(spec, *, tp: int, seq_length: int = 1024, batch_size: int = 1, dtype: str | None = "bfloat16") -> int:
    """Ring bytes one tp rank sends in a training step of ``spec`` at full size (dp=1: tp traffic only),
    in ``dtype`` (plans compare at one dtype; None: the spec's own)."""
    return step_costs(spec, tp=tp, seq_length=seq_length, batch_size=batch_size, dtype=dtype)["bytes"]


def step_costs(spec, *, tp: int, seq_length: int = 1024, batch_size: int = 1,
               dtype: str | None = "bfloat16") -> dict[str, int]:
    """Bytes one tp rank sends per step and the parameters it holds (no FSDP), at full size (simulator)."""
    if dtype is not None and spec.model.dtype != dtype:
        source = spec.source
        spec = spec.model_copy(update={"model": spec.model.model_copy(update={"dtype": dtype})})
        spec._source = source
    sim = simulate(spec, tp=tp, dp=1, seq_length=seq_length, batch_size=batch_size)
    return {"bytes": int(sim.data["communication"]["total"]["ring_bytes"]),
            "params_per_rank": int(sim.data["memory"]["parameters"]["per_rank_without_fsdp"])}


def compare_bytes(derived_text: str, others: dict[str, Any], *, tp: int, seq_length: int = 1024,
                  batch_size: int = 1) -> dict[str, Any]:
    """Bytes per step of the derived spec and of each other spec (name -> Spec) at the same tp; a spec
    that does not resolve at that tp gets its error instead of a number."""
    mine = step_costs(load_spec_text(derived_text, name="derived.yaml"), tp=tp, seq_length=seq_length,
                      batch_size=batch_size)
    out: dict[str, Any] = {"tp": tp, "seq_length": seq_length, "batch_size": batch_size, "derived": mine["bytes"],
                           "derived_params_per_rank": mine["params_per_rank"]}
    for name, spec in others.items():
        try:
            costs = step_costs(spec, tp=tp, seq_length=seq_length, batch_size=batch_size)
        except TpplanError as exc:
            out[name] = {"error": first_line(str(exc))}
            continue
        value = costs["bytes"]
        out[name] = {"bytes": value, "ratio": round(mine["bytes"] / value, 4) if value else None,
                     "params_per_rank": costs["params_per_rank"],
                     "params_ratio": round(mine["params_per_rank"] / costs["params_per_rank"], 4)
                     if costs["params_per_rank"] else None}
    return out
