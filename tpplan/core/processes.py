"""Every process tpplan starts ends when tpplan does: on success, on failure, on Ctrl-C and on SIGTERM.

:func:`signals_raise` turns SIGINT and SIGTERM into an :class:`Interrupted` exception in the main
thread while a command runs, so every ``finally`` and ``with`` block on the way out runs (the
default SIGTERM kills the interpreter on the spot and leaves its children running).

:class:`Child` starts a command (torchrun) in a session of its own, with a tag in its environment
that every process under it inherits: torchrun starts each worker in a session of its own too, and a
worker whose agent died belongs to nobody, but it still carries the tag.  Leaving the ``with`` block
of a Child -- whatever the reason -- stops what is left: SIGTERM to its process group (torchrun's
agent passes it to its workers), then, after :data:`GRACE_S`, SIGKILL to every process that carries
the tag.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

TAG = "TPPLAN_PROCESS_TAG"
GRACE_S = 5.0  # SIGTERM first (torchrun stops its workers itself); SIGKILL for what is left after this

_received: int | None = None


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived while a command ran (a KeyboardInterrupt, so code that stops on
    Ctrl-C stops on SIGTERM the same way)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM


def received() -> int | None:
    """The signal that interrupted this command, if one did (a KeyboardInterrupt raised by user code
    without a signal is not an interrupt: it is that code failing)."""
    return _received


def _on_signal(signum, frame) -> None:
    global _received
    first = _received is None
    _received = signum
    if first:  # once: a second Ctrl-C must not cut short the cleanup the first one started
        raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` inside this block (main thread only); the
    previous handlers come back after it."""
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    _received = None
    for sig in previous:
        signal.signal(sig, _on_signal)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def tagged(tag: str) -> list[int]:
    """The live processes whose environment carries ``TAG=tag`` (a zombie is not live)."""
    needle = f"{TAG}={tag}".encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if needle not in (entry / "environ").read_bytes().split(b"\0"):
                continue
            state = (entry / "stat").read_bytes().rpartition(b")")[2].split()[0]
        except (OSError, IndexError):
            continue
        if state not in (b"Z", b"X"):
            found.append(int(entry.name))
    return found


def _group(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None


def _kill(pids: list[int], sig: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


class Child:
    """A command in a session of its own whose every process is stopped when the ``with`` block
    ends (see the module docstring).  ``proc`` is the ``subprocess.Popen``."""

    def __init__(self, argv: list[str], *, env: dict | None = None, **popen):
        self.tag = f"{os.getpid()}-{secrets.token_hex(6)}"
        env = dict(os.environ if env is None else env)
        env[TAG] = self.tag
        self.proc = subprocess.Popen(argv, env=env, start_new_session=True, **popen)

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def left(self) -> list[int]:
        """Its processes still alive (the command itself included while it runs)."""
        return tagged(self.tag)

    def stop(self, grace: float = GRACE_S) -> None:
        """End every process of this command: SIGTERM to its group and to every tagged process,
        then SIGKILL to what is left after ``grace`` seconds.  A command that ended on its own
        first gets ``grace`` seconds for what it left (a logger flushing) to end by itself.
        Returns when none is left."""
        if self.proc.poll() is not None and _received is None and self._gone_within(grace):
            return  # it ended on its own, and so did everything it started
        sig = signal.SIGINT if _received == signal.SIGINT else signal.SIGTERM
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)  # torchrun's agent stops its workers (and restarts none)
        _kill([pid for pid in self.left() if _group(pid) != self.proc.pid], signal.SIGTERM)  # each signalled once
        self._gone_within(grace)
        for _ in range(3):  # a process may start another while the first round is sent
            left = self.left()
            if self.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
            if not left:
                break
            _kill(left, signal.SIGKILL)
            time.sleep(0.05)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=grace)

    def _gone_within(self, seconds: float) -> bool:
        """Wait up to ``seconds`` for the command and everything it started to end."""
        deadline = time.monotonic() + seconds
        while self.proc.poll() is None or self.left():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True
