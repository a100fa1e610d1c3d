"""``tpplan run``: render the training script into the run directory and launch it with torchrun.

There is one training loop, ``templates/train.py.jinja``.  ``tpplan compile`` writes it to
``generated/<name>/train.py``; ``tpplan run`` renders the same template into the run directory
(``train.save_dir/<experiment_name or name>/``) and starts that file with
``python -m torch.distributed.run``, so the script that ran stays next to its checkpoints, with the
merged spec (``spec.yaml``) and the resolved plan (``plan.json``).
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tpplan.core.errors import TpplanError
from tpplan.core.fileio import MARKER, FileProblem, marker_text, read_marker, shown, write_text_atomic
from tpplan.render.context import TORCHRUN_ENV_DEFAULTS
from tpplan.render.filters import comment
from tpplan.render.render import render_spec
from tpplan.spec.schema import Spec

SPEC_HEADER = "# the merged spec of this run"
LOCK = ".tpplan-run.lock"  # held (fcntl.flock) while a `tpplan run` uses the run directory
# Files of the run directory that hold launch.env (secrets such as HF_TOKEN): the owner's only
PRIVATE = ("train.py", "launch.sh", "job.slurm", "pytorchjob.yaml", "spec.yaml")


class RunFailed(TpplanError):
    """The training processes failed (exit 1: not a bad input)."""

    exit_code = 1


def run_dir_for(spec: Spec) -> Path:
    return Path(spec.train.save_dir) / (spec.train.experiment_name or spec.name)


def cli_overrides(
    *,
    nproc_per_node: str | None = None,
    nnodes: str | None = None,
    rdzv_endpoint: str | None = None,
    max_restarts: int | None = None,
    max_steps: int | None = None,
) -> list[tuple[str, str]]:
    """``tpplan run`` flags as ``--set`` items labelled with their flag, so that the saved
    spec.yaml says what ran and a bad value is reported at the flag (``--max-steps: error: ...``).

    Values are written as JSON (a YAML subset): a string stays a string (``1:4`` is not the
    YAML 1.1 sexagesimal 64), a number stays a number."""
    items = []

    def add(flag: str, key: str, value) -> None:
        if value is not None:
            items.append((flag, f"{key}={json.dumps(value)}"))

    if nproc_per_node is not None:
        add("--nproc-per-node", "launch.nproc_per_node",
            int(nproc_per_node) if nproc_per_node.isdigit() else nproc_per_node)
    if nnodes is not None:
        add("--nnodes", "launch.nnodes", int(nnodes) if nnodes.isdigit() else nnodes)
    add("--rdzv-endpoint", "launch.rdzv_endpoint", rdzv_endpoint)
    add("--max-restarts", "launch.max_restarts", max_restarts)
    add("--max-steps", "train.max_steps", max_steps)
    return items


def torchrun_argv(spec: Spec, script: Path, run_dir: Path, environ: dict | None = None) -> list[str]:
    """``python -m torch.distributed.run ... script --run-dir RUN_DIR``, as launch.sh builds it:
    ``--standalone`` on one node without a rendezvous endpoint, else a c10d rendezvous at the
    spec's endpoint or ``$MASTER_ADDR:${MASTER_PORT:-29500}``."""
    environ = os.environ if environ is None else environ
    launch = spec.launch
    argv = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(launch.nproc_per_node),
        "--max-restarts",
        str(launch.max_restarts),
    ]
    endpoint = launch.rdzv_endpoint
    if launch.nnodes == "1" and not endpoint:
        argv.append("--standalone")
    else:
        if not endpoint:
            address = environ.get("MASTER_ADDR")
            if not address:
                raise TpplanError(
                    f"launch.nnodes is {launch.nnodes}: several nodes need a rendezvous endpoint",
                    hint="set launch.rdzv_endpoint (--rdzv-endpoint HOST:PORT) or MASTER_ADDR (and MASTER_PORT)",
                )
            endpoint = f"{address}:{environ.get('MASTER_PORT', '29500')}"
        argv += [
            "--nnodes",
            launch.nnodes,
            "--rdzv-backend",
            launch.rdzv_backend,
            "--rdzv-endpoint",
            endpoint,
            "--rdzv-id",
            launch.rdzv_id or spec.name,
        ]
    return [*argv, str(script), "--run-dir", str(run_dir)]


def saved_spec(spec: Spec, context) -> dict:
    """The merged spec as plain data for ``spec.yaml``: every section with its defaults written
    out, plan rules as written (so they print the same code), ``extends`` dropped (merged), and
    local paths relative to the run directory (as the script holds them)."""
    data = spec.model_dump(mode="json", exclude_unset=True, exclude={"extends"})
    for section in ("model", "mesh", "train", "launch"):
        data[section] = getattr(spec, section).model_dump(mode="json")
    data["loss_parallel"] = spec.loss_parallel
    if context.data_files is not None:
        data["train"]["data_files"] = list(context.data_files)
    if context.model_is_local:
        data["model"]["name"] = context.model_name
    if context.tokenizer_is_local:
        data["model"]["tokenizer"] = context.tokenizer_name
    if context.factory is not None and context.factory.folder is not None:  # as the script finds it
        data["model"]["factory"] = f"{context.factory.folder}/{context.factory.module}.py:{context.factory.attr}"
    return data


@dataclass(frozen=True)
class Prepared:
    run_dir: Path
    script: Path
    argv: list[str]
    env: dict[str, str]
    lock: Any = None  # the RunLock, held until the training ends
    resumes: str | None = None  # the checkpoint the run resumes from


def _lock_holder(fd: int) -> int | None:
    """The pid holding a flock on ``fd``'s file, from /proc/locks (nothing is written to the run
    directory to say who holds it: a refused run changes nothing there)."""
    info = os.fstat(fd)
    device = f"{os.major(info.st_dev):02x}:{os.minor(info.st_dev):02x}:{info.st_ino}"
    try:
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if "FLOCK" in fields and device in fields:
                    pid = fields[fields.index(device) - 1]
                    return int(pid) if pid.isdigit() else None
    except OSError:
        pass
    return None


class RunLock:
    """An advisory lock (``fcntl.flock``) on ``<run dir>/.tpplan-run.lock`` (an empty file) for the
    life of a run: a second ``tpplan run`` of the same run directory refuses, naming the holder's
    pid, before it changes anything.  torchrun inherits the lock's file, so it is held as long as
    training runs."""

    def __init__(self, run_dir: Path):
        import fcntl

        path = run_dir / LOCK
        flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
        try:
            fd = os.open(path, flags, 0o600)
        except OSError as exc:
            raise FileProblem(f"cannot lock the run directory {shown(run_dir)}: {exc.strerror or exc}",
                              reason="refused") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _lock_holder(fd)
            os.close(fd)
            raise FileProblem(
                f"the run directory {shown(run_dir)} is in use by another tpplan run"
                + (f" (pid {holder})" if holder else ""),
                reason="refused",
                hint="wait for that run to end (or stop it); to train beside it, set train.experiment_name "
                "to name another run directory",
            ) from None
        self.fd = fd

    fd: int | None = None  # until __init__ holds the lock (a refused lock is never released)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    __del__ = release  # a Prepared dropped without release (library use) does not keep the folder locked


def check_run_dir(run_dir: Path) -> bool:
    """Whether ``run_dir`` may be used as a run directory (True: it already is one): a new folder,
    an empty one, or one carrying tpplan's marker (kind ``run``; a run directory of an earlier
    tpplan, recognised by its spec.yaml, is taken too).  Anything else is refused: tpplan would
    replace its train.py, spec.yaml and plan.json and write checkpoints into it."""
    display = shown(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise FileProblem(f"the run directory {display} is a file, not a folder", reason="refused",
                          hint="set train.save_dir or train.experiment_name to name a new folder")
    if run_dir.is_dir():
        marker = read_marker(run_dir)
        if marker is not None and marker.get("kind") == "run":
            return True
        try:
            empty = not any(run_dir.iterdir())
            legacy = (run_dir / "spec.yaml").is_file() and (run_dir / "spec.yaml").open().readline().startswith(SPEC_HEADER)
        except OSError as exc:
            raise FileProblem(f"cannot use the run directory {display}: {exc.strerror or exc}", reason="refused") from None
        if not (empty or legacy):
            raise FileProblem(
                f"the run directory {display} exists and was not made by tpplan run (it has no {MARKER})",
                reason="refused",
                hint="set train.save_dir or train.experiment_name to name a new folder: tpplan writes train.py, "
                "spec.yaml, plan.json and checkpoints there",
            )
    return False


def claim_run_dir(run_dir: Path) -> None:
    """Make ``run_dir`` a run directory (see :func:`check_run_dir`), with tpplan's marker."""
    if check_run_dir(run_dir):
        return
    display = shown(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / MARKER, marker_text("run", []))
    except OSError as exc:
        raise FileProblem(f"cannot create the run directory {display}: {exc.strerror or exc}", reason="refused") from None


def prepare_run(spec: Spec, stage=None) -> Prepared:
    """Resolve and render ``spec`` into its run directory; the torchrun command to start it.
    Everything is rendered, and a resume checked, before the first file is written; the run
    directory is locked first (a run directory in use is refused, unchanged).  ``stage``: ``spec``
    already resolved (``plan.stage.Stage``, what the CLI builds once), or None to resolve it here."""
    import yaml

    from tpplan.plan.mesh_sizes import dp_size

    run_dir = run_dir_for(spec)
    lock = RunLock(run_dir) if check_run_dir(run_dir) else None  # refused before the work
    try:
        resume = newest_readable_checkpoint(run_dir)  # the checkpoint read before any code is imported
        rendered = render_spec(spec, run_dir, stage)
        if resume is not None:
            check_resume(run_dir, resume, rendered.model)
        launch = spec.launch
        if isinstance(launch.nproc_per_node, int) and ":" not in launch.nnodes:
            dp_size(spec, rendered.plan.tp, world_size=launch.nproc_per_node * int(launch.nnodes), ep=spec.mesh.ep)
        argv = torchrun_argv(spec, run_dir / "train.py", run_dir)
        source = spec.source.path if spec.source else spec.name
        files = dict(rendered.files)
        files["spec.yaml"] = f"{SPEC_HEADER} (from {comment(str(source))})\n" + yaml.safe_dump(
            saved_spec(spec, rendered.context), sort_keys=False, allow_unicode=True
        )
        files["plan.json"] = json.dumps(rendered.plan.to_dict(), indent=2) + "\n"
        if lock is None:
            claim_run_dir(run_dir)
            lock = RunLock(run_dir)
        for name, text in files.items():
            write_text_atomic(run_dir / name, text, private=name in PRIVATE)
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    env = {**TORCHRUN_ENV_DEFAULTS, **os.environ, **launch.env}
    return Prepared(run_dir=run_dir, script=run_dir / "train.py", argv=argv, env=env, lock=lock,
                    resumes=None if resume is None else str(resume[0]))


def newest_readable_checkpoint(run_dir: Path):
    """The newest complete checkpoint of ``run_dir`` whose metadata reads as DCP data, and that
    metadata (None: no checkpoint).  Each newer one that cannot be read is skipped with a warning,
    as the training script skips it; none readable is refused (exit 2): the run directory holds a
    record of training that a fresh start would write over."""
    from tpplan.runtime.helpers import checkpoint_steps

    found = [Path(path) for _, path in checkpoint_steps(str(run_dir / "checkpoints"))]  # as train.py finds them
    if not found:
        return None
    from tpplan.runtime.checkpoint import CheckpointRefused, SafeCheckpointReader

    skipped = []
    for path in reversed(found):
        try:
            return path, SafeCheckpointReader(str(path)).read_metadata()
        except CheckpointRefused as exc:
            print(f"warning: skipping checkpoint {shown(path)}, which cannot be read: {exc}", file=sys.stderr)
            skipped.append(path.name)
    raise TpplanError(
        f"cannot resume the run in {shown(run_dir)}: none of its {len(found)} complete checkpoints can be read "
        f"({', '.join(skipped[:5])})",
        hint="nothing was changed; move its checkpoints/ away to start the run anew, or set "
        "train.experiment_name to start a new run directory",
    )


def check_resume(run_dir: Path, resume, model) -> None:
    """Refuse (exit 2, nothing written) a resume whose checkpoint does not fit the spec's model."""
    from tpplan.plan.resolved import tied_names
    from tpplan.runtime.checkpoint import checkpoint_mismatch

    path, metadata = resume
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    why = checkpoint_mismatch(metadata, shapes, tied_names(model))
    if why is not None:
        raise TpplanError(
            f"cannot resume the run in {shown(run_dir)} from {path.name}: {why}",
            hint="the spec's model is not the one this run trained (its spec.yaml says which); nothing was changed: "
            "set train.experiment_name to start a new run with this model",
        )


def launch(prepared: Prepared) -> int:
    """Run torchrun in the foreground, in a session of its own (processes.Child); its exit status.
    Ctrl-C or SIGTERM to tpplan stops it and every worker it started within a few seconds; the run
    lock goes to torchrun too, so the run directory stays locked while anything trains in it."""
    from tpplan.core.processes import Child

    lock_fd = prepared.lock.fd if prepared.lock is not None else None
    with Child(prepared.argv, env=prepared.env, pass_fds=() if lock_fd is None else (lock_fd,)) as child:
        return child.proc.wait()
