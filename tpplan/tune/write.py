"""The chosen candidate as a spec: a short file that ``extends`` the spec tuned, proven by ``tpplan
check`` at a small scale before it is written (never a spec check has not proven).

The spec proven is the spec written: the same YAML, in a private temporary folder with the
``extends`` path made absolute (a spec that extends needs a file on disk); only the comment with
the proof is added before the file is written, atomically, to ``-o``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import yaml

from tpplan.core.errors import TpplanError
from tpplan.spec.schema import Spec

from .search import GIB, Candidate, TuneResult


class TuneFailed(TpplanError):
    """The chosen candidate's spec is not proven by check: nothing is written (exit 1)."""

    exit_code = 1


def _comment(text: str) -> str:
    """Text for a ``#`` comment line, kept on that line (control characters escaped)."""
    return text if text.isprintable() else repr(text)[1:-1]


def _changed(base, final):
    """What ``final`` says differently from ``base`` (two specs' JSON dumps): mappings key by key,
    anything else (lists included) whole, as ``extends`` merges them."""
    if isinstance(base, dict) and isinstance(final, dict):
        out = {}
        for key, value in final.items():
            if key not in base:
                out[key] = value
            elif base[key] != value:
                out[key] = _changed(base[key], value)
        return out
    return final


def tuned_values(base: Spec, spec: Spec, cand: Candidate, result: TuneResult, *, name: str) -> dict:
    """What the tuned spec says over the one it extends: what ``--set`` changed (``spec`` against the
    file as written, ``base``), then the candidate's mesh, training settings and launch shape."""
    values = _changed(base.model_dump(mode="json", exclude_unset=True),
                      spec.model_dump(mode="json", exclude_unset=True))
    values.pop("extends", None)
    gpus, node = result.gpus, result.gpus_per_node
    tuned = {
        "name": name,
        "mesh": {"tp": cand.tp, "dp": cand.dp, **({"ep": cand.ep} if cand.ep != spec.mesh.ep else {}),
                 "async_tp": cand.settings.async_tp},
        "train": {**({"seq_length": result.seq_length} if result.seq_length != spec.train.seq_length else {}),
                  "batch_size": cand.micro_batch, "grad_accum_steps": cand.accumulation,
                  "activation_checkpointing": cand.activation_checkpointing, "compile": cand.settings.compile,
                  "float8": cand.settings.float8},
        "launch": {"nproc_per_node": min(node, gpus), "nnodes": max(1, gpus // node)},
    }
    for key, value in tuned.items():
        values[key] = {**values.get(key, {}), **value} if isinstance(value, dict) else value
    return values


def render(values: dict, *, extends: str, header: list[str]) -> str:
    """The spec text: comment lines, ``extends``, then the values (YAML's own quoting: safe_dump)."""
    body = yaml.safe_dump({"extends": extends, **values}, sort_keys=False, default_flow_style=False,
                          width=110)
    return "".join(f"# {_comment(line)}\n" if line else "#\n" for line in header) + body


def header(result: TuneResult, cand: Candidate, *, command: str, fitted: dict,
           proof: str | None) -> list[str]:
    p, m = cand.prediction, cand.memory
    device = result.device
    lines = [
        "yaml-language-server: $schema=tpplan.schema.json",
        "",
        f"Tuned by `{command}`:",
        f"the fastest of {len(result.ranked)} candidates that fit ({len(result.candidates)} in all) for "
        f"{result.spec.model.name or result.spec.name} on {result.gpus} x {device.name}, global batch "
        f"{result.global_batch:,} x {result.seq_length:,} tokens.",
        f"  predicted: {p.tokens_per_s_per_gpu:,.0f} tokens/s per GPU, MFU {100 * p.mfu:.1f}%, "
        f"step {p.step_s:.3f} s, exposed communication {p.exposed_comm_s:.3f} s",
        f"  memory: {m['total_bytes'] / GIB:.1f} GiB of {device.memory_gib:g} per GPU "
        f"({(device.memory_bytes - m['total_bytes']) / GIB:.1f} GiB headroom), as `tpplan plan` sizes it",
    ]
    if fitted.get("fitted_on"):
        lines.append(f"  efficiency model: fitted on {len(fitted['fitted_on'])} published runs "
                     "(benchmarks/tune_fit.py); median error on the held-out ones "
                     f"{fitted.get('median_test_error', '?')}")
    if proof:
        lines.append(proof)
    lines.append("")
    return lines


def _check_sizes(cand: Candidate) -> tuple[int, int, int]:
    """The small mesh check proves the plan on: tp 2 (when sharded), FSDP over 2 (when the candidate
    shards over dp), expert parallel over 2 (when it has experts apart)."""
    return (2 if cand.tp > 1 else 1), (2 if cand.dp > 1 else 1), (2 if cand.ep > 1 else 1)


def prove(spec_path: Path, values: dict, cand: Candidate, *, timeout: float):
    """``tpplan check`` of the tuned spec (the values over ``spec_path``), at a small scale."""
    from tpplan.prove.check import run_check
    from tpplan.spec.loader import load_spec

    folder = Path(tempfile.mkdtemp(prefix="tpplan-tune-"))
    try:
        path = folder / "tuned.yaml"
        path.write_text(render(values, extends=str(spec_path), header=[]))
        tuned = load_spec(path)
        tp, dp, ep = _check_sizes(cand)
        return run_check(tuned, tp=tp, dp=dp, ep=ep, timeout=timeout)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def proof_line(report) -> str:
    mesh = f"tp={report.tp}" + (f" x dp={report.dp}" if report.dp > 1 else "") + (
        f" x ep={report.ep}" if getattr(report, "ep", 1) > 1 else "")
    return (f"Proven by `tpplan check` at {mesh} on CPU gloo ranks: logits {report.max_abs_logit_diff:.2g}, "
            f"gradients {report.max_abs_grad_diff:.2g}, weights after a step "
            f"{report.max_abs_param_diff_after_step:.2g} from the unsharded model.")


def extends_path(spec_path: Path, out: str | None) -> str:
    """The base spec as the written file refers to it: relative to the file's folder."""
    where = Path(out).resolve().parent if out else Path.cwd()
    try:
        return Path(os.path.relpath(spec_path, where)).as_posix()
    except ValueError:  # another drive
        return str(spec_path)
