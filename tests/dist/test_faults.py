"""Faults on real torchrun jobs (2 CPU gloo ranks): one rank killed mid-step tears the job down
instead of hanging; with --max-restarts torchrun restarts it and the run resumes from its last
complete checkpoint; a checkpoint interrupted mid-write is never taken for a complete one.

Signals (issue 28): SIGTERM or Ctrl-C to ``tpplan run``, ``check``, ``derive`` and ``zoo`` ends every
process the command started (torchrun's agent, its workers in sessions of their own, forked ranks and
jobs) within a few seconds; a second run of a run directory in use is refused; a run stopped by
SIGTERM resumes from its last complete checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SPECS

pytestmark = pytest.mark.slow

TINY = SPECS / "tiny-llama.yaml"
ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
# a slower tiny model (4 layers, batch 16: a few tenths of a second a step) so a rank can be killed
# between checkpoints, every step logged, a checkpoint every 4 steps
SETS = ["--set", "train.log_freq=1", "--set", "train.ckpt_freq=4", "--set", "train.batch_size=16",
        "--set", "model.config.num_hidden_layers=4", "--set", "launch.pg_timeout_s=60"]


def start_run(save_dir: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "tpplan", "run", str(TINY), "--set", f"train.save_dir={save_dir}", *SETS, *extra]
    log_path = save_dir / f"run-{time.time_ns()}.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(command, cwd=REPO, env={**os.environ, **ENV}, stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = log_path
    return proc


def ended_well(proc: subprocess.Popen, timeout: float = 400) -> bool:
    """Whether the run ended with exit 0; when not, the failure shows what the run printed."""
    code = proc.wait(timeout=timeout)
    assert code == 0, f"tpplan run ended with {code}; it printed:\n{proc.log_path.read_text()[-6000:]}"
    return True


def records(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            pass  # a line being written
    return rows


def last_step(run_dir: Path) -> int:
    return max((r["step"] for r in records(run_dir) if "loss" in r), default=0)


def wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while last_step(run_dir) < step:
        assert proc.poll() is None, "the run ended before the step was reached"
        assert time.time() < deadline, f"step {step} not reached in {timeout} s"
        time.sleep(0.05)


def rank_pid(run_dir: Path, rank: int) -> int:
    """The pid of the training process with RANK=rank running this run's train.py."""
    script = str(run_dir / "train.py")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            cmdline = (proc / "cmdline").read_bytes().split(b"\0")
            if script.encode() not in cmdline:
                continue
            environ = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if f"RANK={rank}".encode() in environ and b"TORCHELASTIC_RUN_ID" in b"".join(environ):
            return int(proc.name)
    raise AssertionError(f"no process for rank {rank} of {script}")


def test_one_rank_killed_mid_step_tears_the_job_down_and_a_restart_resumes(tmp_path):
    run_dir = tmp_path / "tiny-llama"
    proc = start_run(tmp_path, "--max-steps", "400")
    wait_for_step(run_dir, 6, proc)
    killed_at = time.time()
    os.kill(rank_pid(run_dir, 1), signal.SIGKILL)  # one rank dies; rank 0 is inside a collective
    code = proc.wait(timeout=120)  # no hang: torchrun notices and stops the survivor
    assert code != 0
    assert time.time() - killed_at < 60
    for rank in (0, 1):
        with pytest.raises(AssertionError):
            rank_pid(run_dir, rank)  # nothing left running
    saved = last_step(run_dir)

    resumed = start_run(tmp_path, "--max-steps", "12")
    assert ended_well(resumed, timeout=400)
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, 13)), steps  # metrics cut back to the checkpoint, then continued
    text = (run_dir / "log.txt").read_text()
    assert "resum" in text.lower() and saved >= 6


def test_max_restarts_passes_through_and_the_restarted_job_resumes(tmp_path):
    run_dir = tmp_path / "tiny-llama"
    proc = start_run(tmp_path, "--max-steps", "40", "--max-restarts", "1")
    wait_for_step(run_dir, 9, proc)
    os.kill(rank_pid(run_dir, 1), signal.SIGKILL)
    assert ended_well(proc, timeout=600)  # torchrun restarted both ranks once; they finished the run
    log = (run_dir / "log.txt").read_text().lower()
    assert "resum" in log
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, 41)), steps
    assert "--max-restarts" in (run_dir / "spec.yaml").read_text() or "max_restarts: 1" in (run_dir / "spec.yaml").read_text()


def test_a_checkpoint_interrupted_mid_write_is_never_resumed(tmp_path):
    run_dir = tmp_path / "tiny-llama"
    first = start_run(tmp_path, "--max-steps", "8")
    assert ended_well(first, timeout=400)
    root = run_dir / "checkpoints"
    # what a crash during the save of step 12 leaves: shards and metadata in the partial folder
    partial = root / ".step-00000012.partial"
    partial.mkdir()
    (partial / ".metadata").write_bytes(b"\x80garbage from a save that never finished")
    (partial / "__0_0.distcp").write_bytes(b"")
    resumed = start_run(tmp_path, "--max-steps", "10")
    assert ended_well(resumed, timeout=400)
    assert not partial.exists(), "the unfinished save was not cleaned up"
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, 11)), steps  # resumed at 8, not at the never-finished 12
    partial.mkdir()  # and `tpplan export` refuses such a folder by name
    (partial / ".metadata").write_bytes(b"\x80garbage")
    export = subprocess.run([sys.executable, "-m", "tpplan", "export", str(partial), "-o", str(tmp_path / "hf")],
                            capture_output=True, text=True, env={**os.environ, **ENV})
    assert export.returncode == 2 and "Traceback" not in export.stderr
    assert "a checkpoint whose save did not finish" in export.stderr
    assert not (tmp_path / "hf").exists()


# ------------------------------------------------------------------------------------------
# Signals: nothing a command started outlives it (issue 28)
# ------------------------------------------------------------------------------------------

LEFT_S = 8.0  # after the command exits, its processes get this long to be gone


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` now (its children, theirs, ...)."""
    children: dict[int, list[int]] = {}
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            ppid = int((proc / "stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(proc.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pids: set[int]) -> set[int]:
    left = set()
    for pid in pids:
        try:
            state = (Path("/proc") / str(pid) / "stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state not in ("Z", "X"):
            left.add(pid)
    return left


def interrupt(proc: subprocess.Popen, sig: int, started: set[int], *, exited_within: float = 20) -> tuple[int, float]:
    """Send ``sig`` to the command; its exit status and seconds to exit; asserts that every process it
    had started (``started``, and what is below it now) is gone within LEFT_S of its exit."""
    started |= descendants(proc.pid)
    sent = time.time()
    proc.send_signal(sig)
    deadline = sent + exited_within
    while proc.poll() is None:
        started |= descendants(proc.pid)  # a worker it starts on the way out counts too
        assert time.time() < deadline, f"the command had not exited {exited_within:g} s after the signal"
        time.sleep(0.05)
    seconds = time.time() - sent
    gone_by = time.time() + LEFT_S
    while alive(started) and time.time() < gone_by:
        time.sleep(0.1)
    left = {pid: (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ")[:120]
            for pid in alive(started) if (Path("/proc") / str(pid)).exists()}
    assert not left, f"still running {LEFT_S:g} s after the command exited: {left}"
    return proc.returncode, seconds


def wait_for_processes(proc: subprocess.Popen, count: int, needle: bytes = b"", timeout: float = 240) -> set[int]:
    """Wait until ``proc`` has ``count`` descendants (whose command line holds ``needle``)."""
    deadline = time.time() + timeout
    while True:
        found = {pid for pid in descendants(proc.pid)
                 if needle in (Path("/proc") / str(pid) / "cmdline").read_bytes()} if needle else descendants(proc.pid)
        if len(found) >= count:
            return found
        assert proc.poll() is None, "the command ended before its processes started"
        assert time.time() < deadline, f"{count} processes not started in {timeout} s"
        time.sleep(0.1)


def test_sigterm_to_run_ends_every_process_a_second_run_is_refused_and_the_run_resumes(tmp_path):
    run_dir = tmp_path / "tiny-llama"
    proc = start_run(tmp_path, "--max-steps", "400")
    wait_for_step(run_dir, 6, proc)  # step-00000004 is complete
    started = descendants(proc.pid)
    assert len(started) >= 3, started  # torchrun's agent and 2 ranks
    record = (run_dir / "spec.yaml").read_bytes(), (run_dir / "train.py").read_bytes()
    second = subprocess.run([sys.executable, "-m", "tpplan", "run", str(TINY), "--set", f"train.save_dir={tmp_path}",
                             *SETS, "--max-steps", "50"], cwd=REPO, env={**os.environ, **ENV}, capture_output=True,
                            text=True, timeout=120)
    assert second.returncode == 2, second.stderr  # before: both trained, one crashed in the other's checkpoint
    assert f"is in use by another tpplan run (pid {proc.pid})" in second.stderr
    assert ((run_dir / "spec.yaml").read_bytes(), (run_dir / "train.py").read_bytes()) == record
    code, seconds = interrupt(proc, signal.SIGTERM, started)  # before: agent and ranks trained on
    assert code == 143 and seconds < 15, (code, seconds)
    saved = max(int(p.name.split("-")[1]) for p in (run_dir / "checkpoints").glob("step-*"))
    assert saved >= 4

    resumed = start_run(tmp_path, "--max-steps", str(saved + 2))
    assert ended_well(resumed, timeout=400)
    steps = [r["step"] for r in records(run_dir) if "loss" in r]
    assert steps == list(range(1, saved + 3)), steps  # cut back to the checkpoint, then continued
    assert f"resumed from {run_dir}/checkpoints/step-{saved:08d}" in (run_dir / "log.txt").read_text()


@pytest.mark.parametrize("launcher", ["torchrun", "fork"])
def test_ctrl_c_to_check_ends_its_ranks(launcher):
    proc = subprocess.Popen([sys.executable, "-m", "tpplan", "check", str(TINY), "--launcher", launcher], cwd=REPO,
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    if launcher == "torchrun":
        ranks = wait_for_processes(proc, 3, b"tpplan.prove.rank")  # the agent and 2 ranks
    else:
        ranks = wait_for_processes(proc, 2)  # the 2 ranks, forked: the command's own command line
    code, seconds = interrupt(proc, signal.SIGINT, ranks)  # before: torchrun and both ranks ran on after Ctrl-C
    assert code == 130 and seconds < 15, (code, seconds)
    assert "Traceback" not in proc.stderr.read().decode()


def test_forked_ranks_end_when_check_is_killed():
    """SIGKILL leaves the command no time to stop its ranks: the forked ranks ask the kernel for it."""
    proc = subprocess.Popen([sys.executable, "-m", "tpplan", "check", str(TINY)], cwd=REPO,
                            env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = wait_for_processes(proc, 2)
    proc.kill()
    proc.wait()
    gone_by = time.time() + LEFT_S
    while alive(ranks) and time.time() < gone_by:
        time.sleep(0.1)
    assert not alive(ranks)


def test_sigterm_to_derive_ends_its_check(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tpplan", "derive", "llama", "-o", str(tmp_path / "d.yaml")],
                            cwd=REPO, env={**os.environ, **ENV}, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ranks = wait_for_processes(proc, 3, b"tpplan.prove.rank", timeout=400)
    code, seconds = interrupt(proc, signal.SIGTERM, ranks)
    assert code == 143 and seconds < 15, (code, seconds)
    assert not (tmp_path / "d.yaml").exists()


def test_ctrl_c_to_zoo_stops_its_job_at_once(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "tpplan", "zoo", "--only", "llama", "--no-bytes", "--no-derive",
                             "--timeout", "600", "-o", str(tmp_path)], cwd=REPO, env={**os.environ, **ENV},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    jobs = wait_for_processes(proc, 1, timeout=400)  # the forked job of llama
    time.sleep(2)
    code, seconds = interrupt(proc, signal.SIGINT, jobs)  # before: "interrupted", then the job's whole run
    assert code == 130 and seconds < 10, (code, seconds)
    assert "interrupted" in proc.stderr.read().decode()
    assert not (tmp_path / "zoo.json").exists()
