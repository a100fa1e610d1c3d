"""Files in and out, so that nothing hangs, nothing is half-written and nothing is lost.

Reading: every file tpplan reads (a spec, a file it extends, a config.json, a data file's first
bytes, a checkpoint's metadata) goes through :func:`read_input`: a type check first (a regular
file: never a FIFO, a device or a socket, which could block or never end), opened non-blocking,
and read up to a cap (``/proc`` files say size 0, so the cap is counted while reading, not taken
from ``stat``).  Every problem is a :class:`TpplanError` (exit 2) naming the path.

Writing: a file goes to a temporary file next to it and is renamed into place
(:func:`write_output_file`), and a device, FIFO or socket is refused, never replaced.  A folder
(:func:`replace_dir_atomic`) is filled in a hidden staging folder, which then takes the target's
place.  One rule for symbolic links, for every output: a link is followed -- what it points to is
written (a file, or a folder tpplan may replace) and the link stays; a link to nothing, or a loop
of links, is refused.  Modes: a new file gets what the umask allows (``0o666``, ``0o777`` for a
script, less the umask); a file written over keeps its mode; a file that may hold secrets
(``private=True``: the generated scripts and a run's spec, which carry ``launch.env``) is the
owner's only (``0o600``, ``0o700`` for a script) whatever the umask.

tpplan replaces only folders it can prove it wrote: each carries the marker file
:data:`MARKER` listing its files, and a folder without the marker, or holding anything the marker
does not list, is refused with the path.  The staging and the set-aside previous folder carry the
marker too, and their names say which process made them, so a write killed between its two
renames leaves folders the next write recognises and removes; nothing else is ever deleted.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

from tpplan.core.errors import TpplanError

#: The marker file in every folder tpplan writes as a whole (compile's DIR/<name>, export's DIR).
MARKER = ".tpplan-output.json"
MAX_MARKER_BYTES = 1 << 20
_CHUNK = 1 << 20


class FileProblem(TpplanError):
    """A path tpplan cannot read or write as asked (exit 2).  ``reason`` is one of ``missing``,
    ``not-regular``, ``too-large``, ``unreadable``, ``refused``."""

    def __init__(self, message: str, *, reason: str, hint: str | None = None, detail: str | None = None):
        super().__init__(message, hint)
        self.reason = reason
        self.detail = detail or message  # the message without the path, for located errors


def shown(path: str | os.PathLike) -> str:
    """A path as messages show it: relative to the working directory when below it, escaped
    (``repr``) when it holds a newline, a control character or an undecodable byte."""
    text = os.fspath(path)
    try:
        relative = os.path.relpath(text)
        if not relative.startswith(".."):
            text = relative
    except ValueError:
        pass
    if not text.isprintable():
        return repr(text)
    return text


def file_kind(mode: int) -> str:
    """``stat`` mode -> words: 'regular file', 'directory', 'FIFO (named pipe)', ..."""
    for test, name in (
        (stat.S_ISREG, "regular file"),
        (stat.S_ISDIR, "directory"),
        (stat.S_ISFIFO, "FIFO (named pipe)"),
        (stat.S_ISCHR, "character device"),
        (stat.S_ISBLK, "block device"),
        (stat.S_ISSOCK, "socket"),
        (stat.S_ISLNK, "symbolic link"),
    ):
        if test(mode):
            return name
    return "special file"


def _os_problem(exc: OSError, display: str, what: str) -> FileProblem:
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return FileProblem(f"{what} not found: {display}", reason="missing", detail=f"{what} not found")
    why = "permission denied" if isinstance(exc, PermissionError) else (exc.strerror or str(exc))
    return FileProblem(f"cannot read {display}: {why}", reason="unreadable", detail=f"cannot be read: {why}")


def read_input(path: str | os.PathLike, *, limit: int, what: str = "file", display: str | None = None,
               prefix: bool = False) -> bytes:
    """The bytes of the regular file at ``path``, at most ``limit`` of them.

    Refused (:class:`FileProblem`, exit 2): a path that does not exist, is not a regular file
    (a directory, FIFO, device or socket), cannot be read, or holds more than ``limit`` bytes.
    With ``prefix=True`` a longer file is not an error: its first ``limit`` bytes are returned."""
    display = display or shown(path)
    try:
        info = os.stat(path)
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, ValueError):
            raise FileProblem(f"{what} not found: {display}", reason="missing", detail=f"{what} not found") from None
        raise _os_problem(exc, display, what) from None
    if not stat.S_ISREG(info.st_mode):
        detail = f"is a {file_kind(info.st_mode)}, not a regular file"
        raise FileProblem(
            f"{display} {detail}",
            reason="not-regular",
            detail=detail,
            hint=f"give the {what} as a regular file (a FIFO or a device could block or never end)",
        )
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise _os_problem(exc, display, what) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):  # swapped for something else since the stat
            raise FileProblem(f"{display} is not a regular file", reason="not-regular",
                              detail="is not a regular file")
        chunks, total = [], 0
        while total <= limit:
            chunk = os.read(fd, min(_CHUNK, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
    except OSError as exc:
        raise _os_problem(exc, display, what) from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        if prefix:
            return data[:limit]
        raise FileProblem(
            f"{display} is larger than {limit:,} bytes, the limit for a {what}",
            reason="too-large",
            detail=f"is larger than {limit:,} bytes, the limit for a {what}",
            hint=f"is this the right file? a {what} is much smaller",
        )
    return data


# ------------------------------------------------------------------------------------------
# Writing one file
# ------------------------------------------------------------------------------------------


def umask() -> int:
    """This process's umask, read without changing it (``/proc``), else by setting it back."""
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode(text: str | None = None, *, private: bool = False, existing: Path | None = None) -> int:
    """The mode of a file tpplan writes: the owner's only when ``private`` (it may hold secrets);
    else the mode of the file it replaces (``existing``), else what the umask allows.  A script
    (text starting with ``#!``) is executable."""
    script = bool(text) and text.startswith("#!")
    if private:
        return 0o700 if script else 0o600
    if existing is not None:
        try:
            info = os.stat(existing)
            if stat.S_ISREG(info.st_mode):
                return stat.S_IMODE(info.st_mode)
        except OSError:
            pass
    return (0o777 if script else 0o666) & ~umask()


def follow_link(given: Path, display: str) -> Path:
    """``given``, or what the symbolic link ``given`` points to (the one rule for every output:
    a link is written through and stays a link).  A link to nothing or a loop is refused."""
    if not given.is_symlink():
        return given
    try:
        return given.resolve(strict=True)
    except (OSError, RuntimeError):
        raise FileProblem(
            f"{display} is a symbolic link to nothing (or a loop of links)",
            reason="refused",
            hint="tpplan writes through a link to what it points to, but never replaces the link itself",
        ) from None


def _output_file_path(path: str | os.PathLike) -> Path:
    """Where writing ``path`` really goes: the path itself, or a symbolic link's target.
    Refuses directories, devices, FIFOs, sockets and dangling links."""
    given = Path(path)
    display = shown(given)
    target = follow_link(given, display)
    try:
        info = os.stat(target)
    except FileNotFoundError:
        info = None
    except NotADirectoryError:
        blocking = next((p for p in target.parents if p.exists() and not p.is_dir()), target.parent)
        raise FileProblem(f"cannot write {display}: {shown(blocking)} is not a folder", reason="refused") from None
    except (OSError, ValueError) as exc:
        raise FileProblem(f"cannot write {display}: {getattr(exc, 'strerror', None) or exc}", reason="refused") from None
    if info is not None:
        if stat.S_ISDIR(info.st_mode):
            raise FileProblem(
                f"{display} is a directory; -o takes a file name here", reason="refused",
                hint=f"e.g. -o {os.path.join(display, 'spec.yaml') if display else 'FILE'}",
            )
        if not stat.S_ISREG(info.st_mode):
            raise FileProblem(
                f"{display} is a {file_kind(info.st_mode)}: tpplan writes only regular files and never "
                "replaces anything else",
                reason="refused",
                hint="leave out -o to print to standard output (and redirect it where you like)",
            )
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise FileProblem(f"cannot write {display}: {shown(parent)} is not a folder", reason="refused")
    return target


def check_output_file(path: str | os.PathLike) -> None:
    """Refuse (before any work) an output file path that :func:`write_output_file` would refuse."""
    _output_file_path(path)


def write_output_file(path: str | os.PathLike, text: str, *, private: bool = False) -> Path:
    """Write ``text`` to a user-named file: through a symbolic link to its target, atomically
    (temporary file + rename), keeping the mode of a file it replaces; devices, FIFOs, sockets and
    directories are refused.  Returns the path written."""
    target = _output_file_path(path)
    try:
        write_text_atomic(target, text, private=private)
    except OSError as exc:
        raise FileProblem(f"cannot write {shown(path)}: {exc.strerror or exc}", reason="refused") from None
    return target


def write_text_atomic(path: str | os.PathLike, text: str, *, private: bool = False) -> None:
    """Write ``text`` to ``path`` via a temporary file in the same folder and an atomic rename; its
    mode from :func:`file_mode` (a file replaced keeps its mode; ``private``: the owner's only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    mode = file_mode(text, private=private, existing=path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)  # 0o600 until done
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ------------------------------------------------------------------------------------------
# Writing a folder: only over a folder tpplan wrote, cleaning what an interrupted write left
# ------------------------------------------------------------------------------------------


def marker_text(kind: str, files: list[str], *, partial: bool = False) -> str:
    data = {"written_by": "tpplan", "kind": kind, "files": sorted(files)}
    if partial:
        data["partial"] = True  # a staging folder being filled: everything in it is tpplan's
    return json.dumps(data, indent=2) + "\n"


def read_marker(folder: Path) -> dict | None:
    """The marker of a folder tpplan wrote, or None when it has none (or not a valid one)."""
    try:
        data = json.loads(read_input(folder / MARKER, limit=MAX_MARKER_BYTES, what="marker file"))
    except (FileProblem, ValueError):
        return None
    if not isinstance(data, dict) or data.get("written_by") != "tpplan" or not isinstance(data.get("files"), list):
        return None
    if not all(isinstance(f, str) for f in data["files"]):
        return None
    return data


def foreign_entries(folder: Path) -> list[str] | None:
    """What in ``folder`` tpplan did not write: None when it has no marker (nothing is provably
    tpplan's), else the entries the marker does not list (an empty list: all of it is tpplan's)."""
    marker = read_marker(folder)
    if marker is None:
        return None
    listed = set(marker["files"]) | {MARKER}
    return sorted(p.name for p in folder.iterdir() if p.name not in listed)


def _leftover_name(name: str, role: str) -> str:
    return f".{name}.tpplan-{role}-{os.getpid()}-"


_LEFTOVER = re.compile(r"^\.(?P<name>.+)\.tpplan-(?:new|old)-(?P<pid>\d+)-[A-Za-z0-9_]+$")


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_leftovers(target: Path) -> list[Path]:
    """Remove what an interrupted write of ``target`` left next to it: hidden staging and
    set-aside folders, named for ``target`` and a process that no longer runs, that carry
    tpplan's marker and nothing it does not list.  Returns what was removed."""
    parent = target.parent
    removed = []
    try:
        entries = list(parent.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _LEFTOVER.match(entry.name)
        if not match or match.group("name") != target.name or _pid_alive(int(match.group("pid"))):
            continue
        if entry.is_symlink() or not entry.is_dir():
            continue
        try:
            if not any(entry.iterdir()):
                entry.rmdir()  # an empty placeholder: nothing to lose
                removed.append(entry)
                continue
        except OSError:
            continue
        marker = read_marker(entry)
        if marker is None or not (marker.get("partial") is True or foreign_entries(entry) == []):
            continue  # not provably tpplan's: leave it alone
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


def check_output_dir(target: str | os.PathLike, *, flag: str | None = None) -> Path:
    """Refuse (FileProblem, exit 2) a folder tpplan may not replace: anything but a new path or
    a folder carrying tpplan's marker and nothing the marker does not list."""
    target = Path(target)
    display = f"{flag} {shown(target)}" if flag else shown(target)
    parent = target.parent
    if parent.exists() and not parent.is_dir():
        raise FileProblem(f"{display}: {shown(parent)} is a file, not a folder", reason="refused")
    target = follow_link(target, display)  # a link is written through: the folder it points to, same rules
    if not target.exists():
        return target
    if not target.is_dir():
        try:
            kind = file_kind(os.stat(target).st_mode)
        except OSError:
            kind = "file"
        raise FileProblem(
            f"{display} is a {kind}, not a folder: tpplan writes a folder here and does not replace a file",
            reason="refused",
            hint="give a new path (tpplan creates the folder)",
        )
    foreign = foreign_entries(target)
    if foreign is None:
        raise FileProblem(
            f"{display} exists and was not written by tpplan (it has no {MARKER}): refusing to replace it",
            reason="refused",
            hint="give a new path, or a folder an earlier tpplan command wrote",
        )
    if foreign:
        listed = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise FileProblem(
            f"{display} holds files tpplan did not write ({listed}): refusing to replace it",
            reason="refused",
            hint="move those files elsewhere, or give a new path",
        )
    return target


def replace_dir_atomic(
    files: dict[str, str] | Callable[[Path], None],
    target: str | os.PathLike,
    *,
    kind: str = "compile",
    private: bool = False,
) -> None:
    """Make ``target`` hold exactly ``files`` (relative name -> text), or what ``files(folder)``
    writes into a folder, all or nothing, plus the marker.

    ``target`` must be new or a folder tpplan wrote (:func:`check_output_dir`; a link: the folder it
    points to).  The files are written into a hidden sibling staging folder, which takes the
    target's place with two renames (target aside, staging in); on any failure the previous folder
    stays as it was.  Modes (:func:`file_mode`): what the umask allows, the owner's only for
    ``private`` files; the folder keeps the mode of the one it replaces."""
    target = check_output_dir(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise FileProblem(f"cannot create {shown(parent)}: {exc.strerror or exc}", reason="refused") from None
    staging = Path(tempfile.mkdtemp(prefix=_leftover_name(target.name, "new"), dir=parent))
    old = None
    try:
        (staging / MARKER).write_text(marker_text(kind, [], partial=True), encoding="utf-8")
        if callable(files):
            files(staging)
            for item in staging.iterdir():
                if item.is_file() and not item.is_symlink():
                    os.chmod(item, file_mode(private=private))
        else:
            for name, text in files.items():
                dest = staging / name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text, encoding="utf-8", newline="\n")
                os.chmod(dest, file_mode(text, private=private))
        written = sorted(p.name for p in staging.iterdir() if p.name != MARKER)
        (staging / MARKER).write_text(marker_text(kind, written), encoding="utf-8")
        os.chmod(staging / MARKER, file_mode())
        folder_mode = stat.S_IMODE(os.stat(target).st_mode) if target.is_dir() else 0o777 & ~umask()
        os.chmod(staging, folder_mode)
        clean_leftovers(target)
        if target.exists():
            check_output_dir(target)  # still tpplan's (nothing was added since the first check)
            old = Path(tempfile.mkdtemp(prefix=_leftover_name(target.name, "old"), dir=parent))
            os.replace(target, old)  # over the empty placeholder: a fresh unique name
        os.replace(staging, target)
    except BaseException:
        if old is not None and not target.exists():
            os.replace(old, target)  # put the previous folder back
            old = None
        shutil.rmtree(staging, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
