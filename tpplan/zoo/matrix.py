"""``tpplan zoo``: every transformers model type with a tensor-parallel plan, imported, resolved and
proven by ``check`` at tp=2 -- plain (transformers' own plan, translated) and sequence parallel
(tpplan's upgrade) -- into one matrix (docs/zoo.md and docs/zoo.json).

Each model type runs in a process forked from this one (torch and transformers are imported once,
not once per model), under a memory limit and a deadline; its check forks its gloo ranks in turn
(``check.run_check(launcher="fork")``).  Whatever happens -- an import-hf refusal, a resolve error,
a failed proof, a crash, a hang, memory exhausted -- becomes the type's row, never the sweep's end.

A row's status, per mode:

- ``proven``: check passed (logits, loss, every gradient, grad norm, weights and AdamW state after
  each of 3 steps, each tensor within 1e-4 of its largest unsharded value) and the plan shards the
  attention and the MLP or experts (most of their elements split over tp);
- ``partial``: check passed, but the plan leaves the attention, the MLP or the experts (mostly) whole
  on every rank -- equal, not parallel (``replicated`` says which);
- ``refused``: tpplan declined before any rank started (no causal-LM class, no plan that
  translates, a size tp=2 does not divide, ...), with the reason a user can act on;
- ``failed``: check ran and the sharded model differs, or the type's job crashed or timed out.
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError

TP = 2
MODES = ("plain", "sp")
DEFAULT_TIMEOUT_S = 240.0  # per model type, everything included (import, resolve, both checks, bytes)
MEMORY_LIMIT_GIB = 8.0  # per model type's process (its forked ranks each get the same limit)
BYTES_SEQ, BYTES_BATCH = 1024, 1  # the simulator's step for the bytes columns (full-size config)

#: The representative sample CI proves on every change: one type per family the zoo covers.
SAMPLE = {
    "llama": "dense",
    "qwen3": "per-head q/k norms",
    "qwen3_moe": "MoE experts",
    "glm4_moe_lite": "mixed dense/MoE (first_k_dense_replace), MLA attention (mla_kv_a_proj)",
    "phi3": "packed qkv_proj / gate_up_proj",
    "gemma2": "tied embeddings, sliding/full attention",
    "bamba": "hybrid attention/SSM (read-only layers_block_type)",
    "apertus": "a transformers plan import-hf corrects (xIELU parameters)",
    "granite_swa": "attention sinks, one per head (local_params)",
    "gemma3n_text": "gradient entries near AdamW's default eps (check's own eps keeps its step "
    "well-conditioned)",
}


@dataclass
class ModeResult:
    status: str  # proven | partial | refused | failed
    stage: str  # import | resolve | check | job
    reason: str | None = None
    hint: str | None = None
    max_abs_logit_diff: float | None = None
    max_abs_grad_diff: float | None = None
    max_abs_param_diff: float | None = None
    # the largest relative error of any gradient (of its tensor's largest unsharded value), over the steps
    max_rel_grad_error: float | None = None
    # what the plan shards: per kind (attention, mlp, experts, embedding, head), the fraction of its elements
    # split over tp or ep; and which of attention, mlp, experts it leaves mostly whole (status partial)
    sharded: dict = field(default_factory=dict)
    replicated: list = field(default_factory=list)
    loss_diff: float | None = None
    parameters_without_gradient: int = 0
    tp: int = TP
    seconds: float = 0.0


@dataclass
class Row:
    model_type: str
    causal_lm: bool
    model_class: str | None = None
    family: str | None = None
    plain: ModeResult | None = None
    sp: ModeResult | None = None
    bytes_transformers_plan: int | None = None  # ring bytes per rank per step, transformers' plan (plain import)
    bytes_tpplan_plan: int | None = None  # the same for tpplan's sequence-parallel + loss-parallel upgrade
    hf_plan_bugs: list = field(default_factory=list)  # what check showed in transformers' plan
    import_changes: list = field(default_factory=list)  # what tpplan's import changed to fix it
    not_imported: list = field(default_factory=list)  # transformers rules with no faithful tpplan style
    derive: Any = None  # tpplan.zoo_derive.derive_for_zoo(model_type): the derived plan's verdict
    config_completed: dict = field(default_factory=dict)  # sizes transformers' default config leaves None
    seconds: float = 0.0

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------------------------
# Which model types
# ----------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def planned_types() -> tuple[list[str], set[str]]:
    """(every model_type whose config class carries ``base_model_tp_plan``, the causal LMs among them).

    Reading the attribute imports each of transformers' ~800 configuration modules (seconds, once)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    types = sorted(t for t in CONFIG_MAPPING if getattr(CONFIG_MAPPING[t], "base_model_tp_plan", None))
    return types, {t for t in types if t in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES}


def select(types: list[str], *, only: list[str] | None = None, sample: int | None = None,
           causal: set[str] | None = None) -> list[str]:
    if only:
        unknown = [t for t in only if t not in types]
        if unknown:
            import difflib

            close = {t: difflib.get_close_matches(t, types, n=1) for t in unknown}
            raise TpplanError(
                "not a transformers model type with a tensor-parallel plan: " + ", ".join(
                    f"{t}" + (f" (did you mean {close[t][0]}?)" if close[t] else "") for t in unknown),
                hint="`tpplan zoo --list` prints them")
        return [t for t in types if t in only]
    if sample is not None:
        # the representative families first, then an even spread over the causal LMs
        pool = [t for t in types if causal is None or t in causal]
        chosen = [t for t in SAMPLE if t in pool][:sample]
        rest = [t for t in pool if t not in chosen]
        step = max(1, len(rest) // max(1, sample - len(chosen))) if sample > len(chosen) else 0
        chosen += rest[::step][: sample - len(chosen)] if step else []
        return [t for t in types if t in chosen]
    return types


# ----------------------------------------------------------------------------------------------
# One model type (inside its own forked process)
# ----------------------------------------------------------------------------------------------


def _mode(status: str, stage: str, error: BaseException | str | None = None, **kw) -> ModeResult:
    if isinstance(error, TpplanError):
        reason, hint = error.message, error.hint
    elif isinstance(error, BaseException):
        text = str(error).strip().splitlines()
        reason, hint = f"{type(error).__name__}: {text[0] if text else ''}", None
    else:
        reason, hint = error, None
    return ModeResult(status, stage, reason=_clip(reason), hint=_clip(hint), **kw)


def _clip(text: str | None, limit: int = 600) -> str | None:
    if text is None:
        return None
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_type(model_type: str, causal: bool, *, modes=MODES, timeout: float = DEFAULT_TIMEOUT_S,
               with_bytes: bool = True, with_derive: bool = True, workdir: Path | None = None) -> Row:
    """Import, resolve and check one model type in every mode; everything becomes the row."""
    from tpplan.hf.import_hf import import_hf
    from tpplan.prove.check import run_check
    from tpplan.prove.shards import parallel_status, sharded_fractions
    from tpplan.spec.loader import load_spec_text

    started = time.time()
    row = Row(model_type, causal, family=SAMPLE.get(model_type))
    source, completed = _source(model_type)
    row.config_completed = completed
    specs = {}
    for mode in modes:
        t0 = time.time()
        try:
            imported = import_hf(source, sequence_parallel=(mode == "sp"))
        except TpplanError as exc:
            setattr(row, mode, _mode("refused", "import", exc, seconds=round(time.time() - t0, 2)))
            continue
        except Exception as exc:  # noqa: BLE001 - import-hf must refuse cleanly; a crash is a failure
            setattr(row, mode, _mode("failed", "import", exc, seconds=round(time.time() - t0, 2)))
            continue
        row.model_class = imported.model_class
        if mode == "plain" or not row.not_imported:
            row.not_imported = [s.line() for s in imported.skipped]
        for fix in getattr(imported, "corrections", []):
            if fix not in row.import_changes:
                row.import_changes.append(fix)
        spec = load_spec_text(imported.text, name=f"{model_type}-{mode}.yaml")
        specs[mode] = spec
        remaining = max(30.0, timeout - (time.time() - started))
        try:
            report = run_check(spec, tp=TP, launcher="fork", timeout=remaining,
                               keep_dir=str(workdir / f"{model_type}-{mode}") if workdir else None)
        except TpplanError as exc:
            setattr(row, mode, _mode("refused", "resolve", exc, seconds=round(time.time() - t0, 2)))
            continue
        except Exception as exc:  # noqa: BLE001 - building the twin: tpplan's own limitation
            setattr(row, mode, _mode("failed", "twin", exc, seconds=round(time.time() - t0, 2)))
            continue
        failure = report.failure or {}
        status = parallel_status(report)
        result = ModeResult(
            status, "check",
            reason=_clip(failure.get("message")) if status == "failed" else (
                f"{', '.join(report.replicated)} whole on every rank" if status == "partial" else None),
            hint=_clip(failure.get("hint")),
            max_abs_logit_diff=report.max_abs_logit_diff, max_abs_grad_diff=report.max_abs_grad_diff,
            max_abs_param_diff=report.max_abs_param_diff_after_step,
            max_rel_grad_error=_largest_error(report),
            sharded=sharded_fractions(report.sharded), replicated=list(report.replicated),
            loss_diff=(abs(report.loss_sharded - report.loss_unsharded)
                       if report.loss_sharded is not None and report.loss_unsharded is not None else None),
            parameters_without_gradient=len(report.parameters_without_gradient), seconds=round(time.time() - t0, 2))
        setattr(row, mode, result)
        if failure.get("reason") in ("gradient_needs_tp_sum", "gradient_rows_need_tp_sum"):
            row.hf_plan_bugs.append(f"{mode}: {failure['message']}")
        if mode == "plain" and imported.corrections:
            row.hf_plan_bugs.append(_uncorrected(model_type, source, workdir))
    if with_bytes:
        row.bytes_transformers_plan = _ring_bytes(specs.get("plain"))
        row.bytes_tpplan_plan = _ring_bytes(specs.get("sp"))
    row.derive = _derive(model_type) if with_derive else None
    row.seconds = round(time.time() - started, 2)
    return row


def _largest_error(report) -> float | None:
    """The largest relative error of any gradient of the report (of its tensor's largest unsharded value),
    those within tolerance only by the unsharded model's own rounding (zero in exact arithmetic) aside."""
    rounding = set(report.within_rounding_only.get("gradients", []))
    return max((v["gradient"][0] for n, v in report.parameters.items()
                if n not in rounding and (v.get("gradient") or [None])[0] is not None), default=None)


def _source(model_type: str) -> tuple[str, dict]:
    """What import-hf imports for ``model_type``: the type itself, or -- where transformers' default
    config cannot build its own model -- a config.json of that default completed (the row says what
    was filled)."""
    from tpplan.model.complete import completed_default

    completed = completed_default(model_type, tp=TP)
    if not completed:
        return model_type, {}
    folder = Path(tempfile.mkdtemp(prefix="tpplan-zoo-config-"))
    source = folder / f"{model_type}.json"
    source.write_text(json.dumps({"model_type": model_type, **completed}))
    return str(source), completed


def plan_bytes(model_type: str) -> dict:
    """The bytes columns of one row: transformers' plan and tpplan's sequence-parallel upgrade, each
    imported at the full-size config and simulated (None where one does not import or simulate)."""
    from tpplan.hf.import_hf import import_hf
    from tpplan.spec.loader import load_spec_text

    source, _ = _source(model_type)
    out = {}
    for mode, key in (("plain", "bytes_transformers_plan"), ("sp", "bytes_tpplan_plan")):
        try:
            text = import_hf(source, sequence_parallel=(mode == "sp")).text
            out[key] = _ring_bytes(load_spec_text(text, name=f"{model_type}-{mode}.yaml"))
        except Exception:  # noqa: BLE001 - a plan that does not import has no bytes
            out[key] = None
    return out


def _uncorrected(model_type: str, source: str, workdir: Path | None) -> str:
    """What check shows on transformers' plan exactly as it is, where import-hf corrected it."""
    from tpplan.hf.import_hf import import_hf
    from tpplan.prove.check import run_check
    from tpplan.spec.loader import load_spec_text

    try:
        spec = load_spec_text(import_hf(source, correct=False).text, name=f"{model_type}-uncorrected.yaml")
        report = run_check(spec, tp=TP, launcher="fork", timeout=120,
                           keep_dir=str(workdir / f"{model_type}-uncorrected") if workdir else None)
    except Exception as exc:  # noqa: BLE001 - the column says what happened
        return f"transformers' plan as it is: {type(exc).__name__}: {_clip(str(exc), 200)}"
    if report.ok:
        return "transformers' plan as it is: proven too (the correction changes nothing check can see)"
    return f"transformers' plan as it is: {_clip((report.failure or {}).get('message'), 400)}"


def _ring_bytes(spec) -> int | None:
    """tp ring bytes per rank for one training step at the full-size config (BYTES_SEQ x BYTES_BATCH)."""
    if spec is None:
        return None
    from tpplan.simulate.simulator import simulate

    try:
        sim = simulate(spec, tp=TP, dp=1, seq_length=BYTES_SEQ, batch_size=BYTES_BATCH)
    except Exception:  # noqa: BLE001 - the bytes column is informative; a failure leaves it empty
        return None
    return int(sim.to_dict()["communication"]["total"]["tp_ring_bytes"])


def _derive(model_type: str):
    """The derive column: ``tpplan.zoo_derive.derive_for_zoo(model_type)``, a JSON-able summary of the
    derived plan's verdict."""
    from tpplan.zoo.derive_column import derive_for_zoo

    try:
        return derive_for_zoo(model_type)
    except Exception as exc:  # noqa: BLE001 - its own failures are its column's content
        return {"status": "failed", "reason": _clip(f"{type(exc).__name__}: {exc}")}


# ----------------------------------------------------------------------------------------------
# The sweep: one forked process per model type, `jobs` at a time
# ----------------------------------------------------------------------------------------------


def _child(job, item: str, out: str, args: tuple, kwargs: dict) -> None:
    """One forked job: ``job(item, *args, **kwargs)``'s JSON-able result written to ``out``."""
    import resource

    limit = int(MEMORY_LIMIT_GIB * 2**30)
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError):
        pass
    os.setsid()  # its own session: stopped whole, with its ranks, on timeout
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    os.dup2(devnull, 2)
    code = 0
    try:
        result = job(item, *args, **kwargs)
        tmp = out + ".tmp"
        Path(tmp).write_text(json.dumps(result, default=str))
        os.replace(tmp, out)
    except BaseException as exc:  # noqa: BLE001 - the parent turns a missing result into a failure
        Path(out + ".error").write_text(f"{type(exc).__name__}: {exc}")
        code = 1
    finally:
        os._exit(code)


def _job_failure(model_type: str, causal: bool, why: str) -> Row:
    row = Row(model_type, causal, family=SAMPLE.get(model_type))
    row.plain = _mode("failed", "job", why)
    return row


def run_forked(items: list[str], job, *, args_for=lambda item: (), kwargs: dict | None = None, jobs: int = 1,
               timeout: float = DEFAULT_TIMEOUT_S, progress=None) -> dict[str, dict | str]:
    """``job(item, *args_for(item), **kwargs)`` for every item, each in a process forked from this one
    (which has imported torch and transformers: the children do not pay for it), ``jobs`` at a time,
    each under ``MEMORY_LIMIT_GIB`` and a deadline of ``timeout`` + 60 s.  Returns item -> the job's
    JSON-able result, or a string saying why there is none (timed out, crashed, out of memory)."""
    import multiprocessing

    import torch  # noqa: F401 - imported once here; every forked process inherits it
    import transformers

    transformers.logging.set_verbosity_error()
    ctx = multiprocessing.get_context("fork")
    tmp = Path(tempfile.mkdtemp(prefix="tpplan-zoo-"))
    pending = list(items)
    running: dict[str, tuple[Any, float, str]] = {}
    results: dict[str, dict | str] = {}
    try:
        while pending or running:
            while pending and len(running) < jobs:
                item = pending.pop(0)
                out = str(tmp / f"{item}.json")
                proc = ctx.Process(target=_child, args=(job, item, out, tuple(args_for(item)), kwargs or {}))
                proc.start()
                running[item] = (proc, time.time(), out)
            time.sleep(0.1)
            for item, (proc, began, out) in list(running.items()):
                late = time.time() - began > timeout + 60  # the jobs' own deadlines come first
                if proc.is_alive() and not late:
                    continue
                if late:
                    try:
                        os.killpg(proc.pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                proc.join(5)
                del running[item]
                if Path(out).is_file():
                    results[item] = json.loads(Path(out).read_text())
                elif late:
                    results[item] = f"did not finish within {timeout + 60:g} s"
                else:
                    error = Path(out + ".error")
                    results[item] = error.read_text() if error.is_file() else (
                        f"its process ended with {_exit_text(proc.exitcode)} without a result (memory over "
                        f"{MEMORY_LIMIT_GIB:g} GiB?)")
                if progress:
                    progress(item, results[item], len(results), len(items))
    finally:  # Ctrl-C, SIGTERM, an error here: every job stops now, with its ranks (not when it would end)
        for proc, _, _ in running.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # its session: the job and the ranks it forked
            except (ProcessLookupError, PermissionError):
                pass
            proc.kill()  # a job killed before its setsid() has no group yet
            proc.join(5)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return results


def _row_job(model_type: str, causal: bool, **kwargs) -> dict:
    return check_type(model_type, causal, **kwargs).to_dict()


def run_zoo(types: list[str], causal: set[str], *, modes=MODES, jobs: int = 1, timeout: float = DEFAULT_TIMEOUT_S,
            with_bytes: bool = True, with_derive: bool = True, progress=None) -> list[Row]:
    kwargs = {"modes": modes, "timeout": timeout, "with_bytes": with_bytes, "with_derive": with_derive}
    rows: dict[str, Row] = {}
    # every module a job uses, imported before forking: the jobs share them, and a source file edited
    # while the sweep runs cannot mix two versions of tpplan in one matrix
    from tpplan.simulate import simulator as simulate  # noqa: F401
    if with_derive:
        from tpplan.zoo import derive_column as zoo_derive  # noqa: F401

    def done(model_type, result, count, total):
        rows[model_type] = (_row_from_dict(result) if isinstance(result, dict)
                            else _job_failure(model_type, model_type in causal, result))
        if progress:
            progress(rows[model_type], count, total)

    run_forked(types, _row_job, args_for=lambda t: (t in causal,), kwargs=kwargs, jobs=jobs, timeout=timeout,
               progress=done)
    return [rows[t] for t in types]


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return signal.Signals(-code).name
    return f"exit code {code}"


def _row_from_dict(data: dict) -> Row:
    modes = {m: _mode_from_dict(data.pop(m, None)) for m in MODES}
    return Row(**data, **modes)


def _mode_from_dict(data: dict | None) -> ModeResult | None:
    """A mode's result from the matrix's JSON (fields of older matrices it no longer has are dropped)."""
    if not data:
        return None
    known = set(ModeResult.__dataclass_fields__)
    return ModeResult(**{k: v for k, v in data.items() if k in known})


# ----------------------------------------------------------------------------------------------
# The matrix: JSON and Markdown
# ----------------------------------------------------------------------------------------------


def totals(rows: list[Row], causal_only: bool = True) -> dict:
    out = {}
    chosen = [r for r in rows if r.causal_lm or not causal_only]
    for mode in MODES:
        counts = {"proven": 0, "partial": 0, "refused": 0, "failed": 0, "not run": 0}
        for row in chosen:
            result = getattr(row, mode)
            counts[result.status if result else "not run"] += 1
        out[mode] = counts
    out["types"] = len(chosen)
    return out


def to_json(rows: list[Row], *, seconds: float, command: str) -> dict:
    import torch
    import transformers

    return {
        "command": command,
        "transformers": transformers.__version__,
        "torch": torch.__version__.split("+")[0],
        "tp": TP,
        "bytes_step": {"seq_length": BYTES_SEQ, "batch_size": BYTES_BATCH, "size": "the full-size default config",
                       "what": "tp ring bytes sent per rank in one training step (forward + backward)"},
        "seconds": round(seconds, 1),
        "totals_causal_lm": totals(rows, True),
        "totals_all": totals(rows, False),
        "rows": [r.to_dict() for r in rows],
    }


def _cell(result: ModeResult | None) -> str:
    if result is None:
        return "not run"
    if result.status in ("proven", "partial"):
        error = f" ({result.max_rel_grad_error:.1e})" if result.max_rel_grad_error is not None else ""
        whole = f": {', '.join(result.replicated)} whole" if result.status == "partial" else ""
        return f"{result.status}{error}{whole}"
    return f"{result.status} at {result.stage}: {_md(result.reason or '')}"


def _sharded_cell(result: ModeResult | None) -> str:
    """What the plan splits over tp/ep: the share of each kind's elements."""
    if result is None or not result.sharded:
        return ""
    return ", ".join(f"{kind} {100 * share:.0f}%" for kind, share in result.sharded.items())


def _md(text: str, limit: int = 220) -> str:
    text = " ".join(str(text).split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _measured(data: dict) -> int:
    return sum(1 for r in data["rows"] if r.get("bytes_transformers_plan") or r.get("bytes_tpplan_plan"))


def _gib(n: int | None) -> str:
    return "" if n is None else f"{n / 2**30:.2f}"


def to_markdown(data: dict) -> str:
    t, a = data["totals_causal_lm"], data["totals_all"]
    lines = [
        "# The model zoo: transformers' tensor-parallel plans, proven by `tpplan check`",
        "",
        f"Every model type of transformers {data['transformers']} whose config carries a tensor-parallel plan "
        f"(`base_model_tp_plan`): {a['types']} types, {t['types']} of them causal LMs. Each one is imported "
        f"(`tpplan import-hf MODEL_TYPE`, and `--sequence-parallel` for the SP column), resolved at tp={data['tp']} "
        "and proven by `tpplan check --tp 2` on CPU gloo ranks against the unsharded twin (logits, loss, every "
        "gradient, grad norm, the weights and AdamW's state after each of 3 steps, each tensor within "
        "1e-4 of its largest unsharded value, fp32).",
        "",
        f"Reproduce: `{data['command']}` ({data['seconds'] / 60:.0f} min wall on this machine, torch {data['torch']}).",
        "",
    ]
    for rerun in data.get("rerun", []):  # rows replaced after a fix, by the command that made them
        lines += [f"Rows {', '.join(rerun['types'])} replaced by `{rerun['command']}` after {rerun['why']}.", ""]
    lines += [
        "| causal LMs | proven (attention and MLP/experts sharded) | partial (equal, something left whole) | "
        "refused | failed |",
        "|---|---|---|---|---|",
    ]
    for mode, label in (("plain", "transformers' plan (plain)"), ("sp", "sequence parallel + loss parallel")):
        c = t[mode]
        lines.append(f"| {label} | {c['proven']} / {t['types']} ({100 * c['proven'] / max(1, t['types']):.0f}%) | "
                     f"{c.get('partial', 0)} | {c['refused']} | {c['failed']} |")
    lines += [
        "",
        "Status: **proven**: equal, and the plan shards the attention and the MLP or experts (the largest "
        "relative error of any gradient in brackets); **partial**: equal, but the plan leaves the attention, "
        "the MLP or the experts mostly whole on every rank (which, after the colon); **refused** before any "
        "rank started, with the reason; **failed**: check ran and the sharded model differs (or shards "
        "nothing inside the blocks), or the job crashed or ran out of time. Sharded: the share of each "
        "kind's elements the plain plan splits over tp.",
        "",
        f"Bytes: tp ring bytes sent per rank for one training step (seq {data['bytes_step']['seq_length']}, batch "
        f"{data['bytes_step']['batch_size']}, at the full-size default config, {data['tp']} ranks) from `tpplan plan`'s "
        "simulator: transformers' plan (plain import) against tpplan's sequence-parallel + loss-parallel plan"
        + (f" (filled by `{data['bytes_command']}` for {_measured(data)} of {len(data['rows'])} types in "
           f"{data.get('bytes_seconds', 0) / 60:.0f} min; empty where a plan does not import or was not simulated "
           "in the time the pass had)." if data.get("bytes_command") else "."),
        "",
        "| model type | plain (transformers' plan) | sharded (plain) | sequence parallel | GiB/step HF plan "
        "| GiB/step tpplan | bugs in transformers' plan (check showed / import changed) | derive |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["rows"]:
        rows_plain = _mode_from_dict(r["plain"])
        rows_sp = _mode_from_dict(r["sp"])
        name = r["model_type"] + ("" if r["causal_lm"] else " (not a causal LM)")
        completed = r.get("config_completed") or {}
        bugs = "; ".join([_md(b, 160) for b in r["hf_plan_bugs"] + r["import_changes"]] + (
            ["transformers' default config completed: " + ", ".join(
                f"{k}={_md(json.dumps(v), 60)}" for k, v in completed.items())] if completed else []))
        derive = r.get("derive")
        derive_text = _md((derive.get("summary") or derive.get("status", "")) if isinstance(derive, dict)
                          else str(derive or ""), 160)
        lines.append(f"| {name} | {_cell(rows_plain)} | {_sharded_cell(rows_plain)} | {_cell(rows_sp)} | "
                     f"{_gib(r['bytes_transformers_plan'])} | {_gib(r['bytes_tpplan_plan'])} | {bugs} | "
                     f"{derive_text} |")
    if (data.get("derive") or {}).get("tables"):  # benchmarks/derive_sweep.py: totals, types without a plan
        lines += ["", data["derive"]["tables"].rstrip("\n")]
    return "\n".join(lines) + "\n"


def write_matrix(rows: list[Row], out_dir: Path, *, seconds: float, command: str) -> tuple[Path, Path]:
    from tpplan.core.fileio import write_output_file

    data = to_json(rows, seconds=seconds, command=command)
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, md_path = out_dir / "zoo.json", out_dir / "zoo.md"
    write_output_file(json_path, json.dumps(data, indent=1) + "\n")  # -o's rules: a link is written through
    write_output_file(md_path, to_markdown(data))
    return json_path, md_path


def progress_line(row: Row, done: int, total: int, stream=None) -> None:
    stream = stream or sys.stderr
    parts = []
    for mode in MODES:
        result = getattr(row, mode)
        if result is not None:
            parts.append(f"{mode} {result.status}" + (f" ({result.stage}: {_clip(result.reason, 140)})"
                                                      if result.status != "proven" else ""))
    print(f"[{done}/{total}] {row.model_type} ({row.seconds:.0f} s): " + "; ".join(parts), file=stream, flush=True)
