"""The zoo's derive column: ``tpplan derive`` + ``check`` for one model type, as one row of the matrix.

``derive_for_zoo`` never raises: a refusal, a failed proof or a crash is the row's status and reason.
It derives from transformers' default config of the type, completed where that default leaves a size
its own model needs None (``tpplan.complete``), and compares the bytes per step of the derived plan with
transformers' own (``tpplan import-hf``) on the simulator.  ``benchmarks/derive_sweep.py`` runs it over
every causal LM; ``tpplan zoo`` fills its derive column with it.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.derive import Derived, DeriveFailed, compare_bytes, derive, prepare
from tpplan.derive.common import first_line, one_line


def derive_for_zoo(
    model_type: str,
    *,
    check_tp: int = 2,
    sequence_parallel: bool = True,
    launcher: str = "fork",
    bytes_tp: int | None = None,
    seq_length: int = 1024,
    batch_size: int = 1,
    compare_transformers: bool = True,
    check_timeout: float = 300,
    tp: int | None = None,
    max_params_per_rank: int | None = None,
) -> dict[str, Any]:
    """derive + check for one model_type, as the zoo matrix's derive column needs it; never raises.

    Tries the sequence-parallel plan first (``sequence_parallel``), the plain plan when that one
    cannot be derived or proven.  ``status``: ``proven`` (check passed at ``check_tp``), ``refused``
    (no plan derived: ``reason`` says why, before any rank started) or ``failed`` (derived, not
    proven: check's message).  ``bytes``: ring bytes per step per rank at full size (simulator, dp=1)
    of the derived plan and of transformers' own plan (``tpplan import-hf``) at the same tp, and
    their ratio (derived / transformers); None where a plan does not resolve or the model has none.
    ``tp``, ``max_params_per_rank``: as ``derive`` takes them.  The default config is completed for
    ``check_tp`` (a vocabulary it does not divide is padded)."""
    started = time.time()
    row: dict[str, Any] = {"model_type": model_type, "status": None, "reason": "", "summary": "",
                           "sequence_parallel": False, "tp": None, "forms": {}, "fixups": 0, "grad_sum": 0,
                           "left_whole": [], "check": None, "bytes": None, "sp_refused": None}
    source, folder = _completed_source(model_type, row, check_tp)
    try:
        derived = _derive_row(source, row, tp=tp, sequence_parallel=sequence_parallel, check_tp=check_tp,
                              launcher=launcher, check_timeout=check_timeout,
                              max_params_per_rank=max_params_per_rank)
        if derived is not None:
            _proven_row(row, derived, max_params_per_rank)
            try:
                row["bytes"] = _bytes_against_transformers(derived, source, bytes_tp, seq_length, batch_size,
                                                           compare_transformers)
            except Exception as exc:  # noqa: BLE001 - the simulator failing is a note in the row, not a crash
                row["bytes"] = {"error": one_line(exc)}
    finally:
        if folder is not None:  # the completed config.json this row wrote
            shutil.rmtree(folder, ignore_errors=True)
    row["summary"] = _zoo_summary(row) if row["status"] == "proven" else f"{row['status']}: {row['reason']}"
    row["seconds"] = round(time.time() - started, 1)
    return row


def _derive_row(source: str, row: dict, *, tp, sequence_parallel, check_tp, launcher, check_timeout,
                max_params_per_rank):
    """The derived (and proven) plan, the sequence-parallel one first; None with the row's status and
    reason saying why there is none."""
    try:
        prepared = prepare(source)
    except TpplanError as exc:
        row.update(status="refused", reason=first_line(str(exc)))
        return None
    except Exception as exc:  # noqa: BLE001 - a row of the matrix, never a crash of the sweep
        row.update(status="failed", reason=f"derive crashed: {one_line(exc)}")
        return None
    attempts = [True, False] if sequence_parallel else [False]
    for sp in attempts:
        try:
            return derive(source, tp=tp, sequence_parallel=sp, check_tp=check_tp, launcher=launcher,
                          timeout=check_timeout, prepared=prepared, max_params_per_rank=max_params_per_rank)
        except DeriveFailed as exc:
            row.update(status="failed", reason=first_line(str(exc)))
        except TpplanError as exc:
            row.update(status="refused", reason=first_line(str(exc)))
        except Exception as exc:  # noqa: BLE001
            row.update(status="failed", reason=f"derive crashed: {one_line(exc)}")
        if sp and len(attempts) > 1:
            row["sp_refused"] = row["reason"]
    return None


def _proven_row(row: dict, derived, max_params_per_rank: int | None) -> None:
    forms: dict[str, int] = {}
    for group in derived.groups:
        forms[group["form"]] = forms.get(group["form"], 0) + 1
    r = derived.report
    from tpplan.prove.shards import parallel_status, sharded_fractions

    row.update(status=parallel_status(r), replicated=list(r.replicated), sharded=sharded_fractions(r.sharded))
    row.update(reason="", sequence_parallel=derived.sequence_parallel, tp=derived.tp, forms=forms,
               fixups=len(derived.draft.fixups),
               grad_sum=sum(len(g["grad_sum"]) for g in derived.groups),
               left_whole=list(derived.notes), loss_parallel=derived.loss_parallel,
               check={"tp": r.tp, "max_abs_logit_diff": r.max_abs_logit_diff,
                      "max_abs_grad_diff": r.max_abs_grad_diff,
                      "max_abs_param_diff_after_step": r.max_abs_param_diff_after_step, "seconds": r.seconds})
    if max_params_per_rank is not None:
        row.update(max_params_per_rank=max_params_per_rank, params_per_rank=derived.draft.params_per_rank,
                   kept_whole=list(dict.fromkeys(rowwise for rowwise, _ in derived.draft.constraints.kept)))
    row["spec"] = derived.text


def _completed_source(model_type: str, row: dict, tp: int) -> tuple[str, Path | None]:
    """(``model_type``, None), or (a config.json of transformers' default completed the way ``tpplan zoo``
    completes it, the folder holding it) where the default leaves a size its own model needs None
    (HunYuan's head_dim, DeepSeek-V2's expert counts)."""
    from tpplan.model.complete import completed_default

    try:
        completed = completed_default(model_type, tp=tp)
    except Exception:  # noqa: BLE001 - no completion: derive reads the default and says what it cannot do
        return model_type, None
    if not completed:
        return model_type, None
    row["config_completed"] = completed
    folder = Path(tempfile.mkdtemp(prefix="tpplan-derive-config-"))
    path = folder / f"{model_type}.json"
    path.write_text(json.dumps({"model_type": model_type, **completed}))
    return str(path), folder


def _zoo_summary(row: dict) -> str:
    """One cell: ``proven, SP, tp=8: 2 sharded; 0.53x transformers' bytes``."""
    forms = ", ".join(f"{n} {form}" for form, n in row["forms"].items()) or "embedding/head only"
    whole = f" ({', '.join(row['replicated'])} whole)" if row.get("replicated") else ""
    text = f"{row['status']}{whole}, {'SP' if row['sequence_parallel'] else 'plain'}, tp={row['tp']}: {forms}"
    if row["fixups"]:
        text += f", {row['fixups']} fix-up{'s' if row['fixups'] > 1 else ''}"
    costs = row.get("bytes") or {}
    if costs.get("ratio") is not None:
        text += f"; {costs['ratio']:.2f}x transformers' bytes"
        if costs.get("params_ratio") is not None and costs["params_ratio"] < 0.99:
            text += f", {costs['params_ratio']:.2f}x its parameters per rank"
    return text


def _bytes_against_transformers(derived: Derived, model_type: str, bytes_tp: int | None, seq_length: int,
                                batch_size: int, compare: bool) -> dict[str, Any]:
    from tpplan.spec.loader import load_spec_text

    tp = bytes_tp or derived.tp
    others: dict[str, Any] = {}
    note = ""
    if compare:
        from tpplan.hf.import_hf import import_hf

        try:
            imported = import_hf(model_type)
            others["transformers"] = load_spec_text(imported.text, name="transformers.yaml")
            if bytes_tp is None and imported.tp < tp:
                tp = imported.tp  # the largest tp both plans take
        except TpplanError as exc:
            note = first_line(str(exc))
    result = compare_bytes(derived.text, others, tp=tp, seq_length=seq_length, batch_size=batch_size)
    hf = result.get("transformers")
    got = hf if isinstance(hf, dict) else {}
    return {"tp": tp, "seq_length": seq_length, "batch_size": batch_size, "derived": result["derived"],
            "transformers": got.get("bytes"), "ratio": got.get("ratio"),
            "derived_params_per_rank": result["derived_params_per_rank"],
            "transformers_params_per_rank": got.get("params_per_rank"),
            "params_ratio": got.get("params_ratio"),
            "note": note or got.get("error", "")}
