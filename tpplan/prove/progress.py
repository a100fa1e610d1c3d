"""Where a rank of ``tpplan check`` is, and how it failed: what the parent reads when a rank hangs or dies.

``Progress`` writes the phase a rank is in, and the module or parameter at hand, to progress-RANK.json
(and injects the faults the tests of those verdicts need, ``TPPLAN_CHECK_FAULT``); ``where_text`` says it
in words (the parent's verdict on a hung or dead rank, and a rank's own crash); ``crash_failure``, with
``error_text`` and ``error_site``, is a rank's failure from an exception: one line and its file:line, no
traceback.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def where_text(progress: dict) -> str:
    text = str(progress.get("phase", "?"))
    for key in ("module", "parameter"):
        if progress.get(key):
            text += f" ({key} {progress[key]})"
    if progress.get("step"):
        text += f" at step {progress['step']}"
    return text


class Progress:
    """What this rank is doing, in progress-RANK.json: the phase, and the module or parameter at
    hand.  The parent reads it when a rank hangs or dies without a verdict, so even then the
    verdict says where."""

    def __init__(self, out_dir: Path, rank: int):
        self.path = out_dir / f"progress-{rank}.json"
        self.rank = rank
        self.phase = "starting"
        self.where: dict[str, str] = {}
        # TPPLAN_CHECK_FAULT=raise|hang|kill:RANK:PHASE makes that rank fail there (tests of the
        # verdicts for a crash, a hung rank and a killed rank: no plan produces those on demand)
        fault = os.environ.get("TPPLAN_CHECK_FAULT", "").split(":", 2)
        self.fault = (fault[0], int(fault[1]), fault[2]) if len(fault) == 3 else None

    def __call__(self, phase: str, **where: str) -> None:
        self.phase, self.where = phase, {k: v for k, v in where.items() if v}
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"phase": phase, **self.where}))
        os.replace(tmp, self.path)
        if self.fault and self.fault[1] == self.rank and self.fault[2] == phase:
            kind, self.fault = self.fault[0], None
            if kind == "raise":
                raise RuntimeError(f"fault injected in {phase}")
            if kind == "kill":
                import signal

                os.kill(os.getpid(), signal.SIGKILL)
            if kind == "hang":
                time.sleep(3600)


def error_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:500]


def error_site(exc: BaseException) -> str | None:
    """file:line in function of the innermost frame, for the verdict (no traceback is printed)."""
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return None
    frame = frames[-1]
    return f"{'/'.join(Path(frame.filename).parts[-3:])}:{frame.lineno} in {frame.name}"


def crash_failure(exc: BaseException, progress: Progress, rank: int) -> dict:
    where = where_text({"phase": progress.phase, **progress.where})
    failure = {
        "message": f"rank {rank} failed in {where}: {error_text(exc)}",
        "phase": progress.phase,
        "rank": rank,
        "error": error_text(exc),
        "error_site": error_site(exc),
        **progress.where,
    }
    return failure
