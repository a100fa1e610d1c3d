"""Output for a terminal: `plan` and `check` tables as wide as the terminal ($COLUMNS, or what rich
measures), 80 columns included, dropping the columns that repeat another; into a pipe the wide layout
(each row one line); `--json` untouched by either.  `check` names its phases as they happen on a
terminal (stderr), and says nothing of them into a pipe."""

from __future__ import annotations

import io
import json
import os
import pty
import re
import subprocess
import sys
import threading

from rich.console import Console

from tests.conftest import REPO, SPECS, cli
from tpplan.plan.report import WIDE, check_phases

TINY = str(SPECS / "tiny-llama.yaml")


def widths(text: str) -> int:
    return max(len(line) for line in text.splitlines())


def test_plan_tables_fit_the_terminal_and_json_stays_the_same():
    narrow = cli("plan", TINY, env={"COLUMNS": "80"})  # every table of the full report
    assert narrow.returncode == 0, narrow.stderr
    assert widths(narrow.stdout) <= 80, narrow.stdout
    header = next(line for line in narrow.stdout.splitlines() if "pattern" in line)
    assert "rule" not in header and "style" in header  # the rule's label goes; its pattern names it
    assert "sent/rank" in narrow.stdout and "model.layers.*.self_attn" in narrow.stdout.replace("\n", "")

    wide = cli("plan", TINY, "--resolve", env={"COLUMNS": "200"})
    header = next(line for line in wide.stdout.splitlines() if "pattern" in line)
    assert "rule" in header and widths(wide.stdout) <= 200
    piped = cli("plan", TINY, "--resolve", env={"COLUMNS": ""})  # no terminal, no $COLUMNS: the wide layout
    assert "plan[1].plan[2]" in piped.stdout and WIDE >= widths(piped.stdout) > 100  # each row one line

    as_json = cli("plan", TINY, "--resolve", "--json", env={"COLUMNS": "80"}).stdout
    assert json.loads(as_json)["tp"] == 2 and max(map(len, as_json.splitlines())) > 80  # not laid out for 80


def test_check_phases_only_on_a_terminal():
    quiet = io.StringIO()
    with check_phases(Console(file=quiet)) as on_phase:
        assert on_phase is None
    assert quiet.getvalue() == ""
    shown = io.StringIO()
    with check_phases(Console(file=shown, force_terminal=True, width=80)) as on_phase:
        on_phase("the sharded forward")
    assert "check: the sharded forward" in shown.getvalue()


def test_check_shows_its_phases_on_a_terminal_and_its_json_stays_clean():
    """stderr a terminal (a pty), stdout a pipe: the phases on the one, one JSON object on the other."""
    leader, follower = pty.openpty()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "COLUMNS": "80"}
    proc = subprocess.Popen([sys.executable, "-m", "tpplan", "check", TINY, "--json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    screen = bytearray()

    def read() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: every writer closed
                return
            if not chunk:
                return
            screen.extend(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    stdout, _ = proc.communicate(timeout=600)
    reader.join(30)
    os.close(leader)
    report = json.loads(stdout)
    assert proc.returncode == 0 and report["ok"] is True
    text = screen.decode(errors="replace")
    # the command's phase that takes seconds, then rank 0's: which of these a terminal draws depends on how
    # long each lasted (the status line redraws ~12 times a second; forked ranks start in milliseconds)
    resolving = text.find("check: resolving the plan")
    assert resolving != -1, text[-2000:]
    later = re.findall(r"check: ([a-z][^(]*?) \(at", text[resolving:])
    assert set(later) - {"resolving the plan", "starting 2 CPU ranks", "done"}, text[-2000:]
