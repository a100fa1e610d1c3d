"""Nothing hangs, nothing is lost (issue 14), through the CLI as users call it.

Inputs: every file is type-checked before it is opened (a FIFO or a device given as a spec or as
``extends`` is refused at once, never read), read with a cap, and every failure is one message
with exit 2.  Outputs: tpplan replaces only what it wrote (folders carry its marker), writes
through a symbolic link instead of replacing it, refuses devices and FIFOs, and the next write
cleans what a write killed between its two renames left behind."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO, SPECS, cli
from tpplan.cli import main
from tpplan.core.fileio import MARKER

TINY = str(SPECS / "tiny-llama.yaml")


def fifo(path):
    os.mkfifo(path)
    return path


def tree(folder) -> dict:
    """Every path under ``folder`` with its kind and content (to prove nothing changed)."""
    found = {}
    for root, dirs, files in os.walk(folder):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            found[os.path.relpath(path, folder)] = (
                open(path, "rb").read() if stat.S_ISREG(mode) else stat.S_IFMT(mode)
            )
    return found


def assert_refused(result, *needles):
    assert result.returncode == 2, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    for needle in needles:
        assert needle in result.stderr, result.stderr


# ------------------------------------------------------------------------------------------
# Inputs
# ------------------------------------------------------------------------------------------


def test_special_and_unreadable_inputs_are_refused_without_reading(tmp_path):
    pipe = fifo(tmp_path / "pipe.yaml")
    (tmp_path / "ext.yaml").write_text("extends: pipe.yaml\nname: x\n")
    (tmp_path / "big.yaml").write_text("# " + "x" * (1 << 20) + "\n")
    (tmp_path / "dir.yaml").mkdir()
    result = cli(
        "validate", "pipe.yaml", "ext.yaml", "/dev/zero", "big.yaml", "dir.yaml", "/proc/self/mem",
        "/proc/self/status", cwd=tmp_path, timeout=60,
    )
    assert_refused(
        result,
        "pipe.yaml: error: is a FIFO (named pipe), not a regular file",
        "ext.yaml:1:10: error: extends: pipe.yaml is a FIFO (named pipe), not a regular file",
        "error: is a character device, not a regular file",
        "big.yaml: error: spec file is larger than 1,048,576 bytes, the limit",
        "dir.yaml: error: is a directory, not a regular file",
        "error: cannot be read: Input/output error",  # /proc/self/mem at offset 0
        "status:1:",  # a /proc file says size 0: it is read (with the cap) and parsed
    )
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_spec(tmp_path):
    spec = tmp_path / "s.yaml"
    spec.write_text("name: x\n")
    spec.chmod(0)
    assert_refused(cli("validate", str(spec)), "cannot be read: permission denied")


# ------------------------------------------------------------------------------------------
# One output file: schema -o, import-hf -o
# ------------------------------------------------------------------------------------------


def test_output_file_special_files_are_refused_and_links_written_through(tmp_path):
    pipe = fifo(tmp_path / "pipe")
    assert_refused(cli("schema", "-o", "/dev/null"), "/dev/null is a character device", "leave out -o")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)
    assert_refused(cli("schema", "-o", str(pipe), timeout=60), "is a FIFO (named pipe)")
    assert_refused(cli("import-hf", "llama", "-o", str(pipe), timeout=60), "is a FIFO (named pipe)")
    assert_refused(cli("import-hf", "llama", "-o", "/dev/null"), "/dev/null is a character device")
    assert_refused(cli("derive", "llama", "-o", str(pipe), timeout=60), "is a FIFO (named pipe)")
    assert stat.S_ISFIFO(os.stat(pipe).st_mode)
    assert_refused(cli("schema", "-o", str(tmp_path)), "is a directory; -o takes a file name here")
    (tmp_path / "file").write_text("keep")
    assert_refused(cli("schema", "-o", str(tmp_path / "file" / "schema.json")), "is not a folder")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    assert_refused(cli("schema", "-o", str(tmp_path / "dangling")), "is a symbolic link to nothing")
    assert not (tmp_path / "nowhere").exists()

    target = tmp_path / "real.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target)
    result = cli("schema", "-o", str(link))
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link stays a link
    assert json.loads(target.read_text())["title"] == "tpplan spec"


# ------------------------------------------------------------------------------------------
# Folders: compile -o DIR (DIR/<name>), run directories
# ------------------------------------------------------------------------------------------


def test_compile_replaces_only_folders_it_wrote(tmp_path):
    mine = tmp_path / "tiny-llama"
    mine.mkdir()
    (mine / "train.py").write_text("# my own script\n")
    before = tree(tmp_path)
    assert_refused(cli("compile", TINY, "-o", str(tmp_path)), f"{mine} exists and was not written by tpplan",
                   f"has no {MARKER}")
    (tmp_path / "file").write_text("keep")
    assert_refused(cli("compile", TINY, "-o", str(tmp_path / "file")), "is a file, not a folder")
    assert tree(tmp_path) == {**before, "file": b"keep"}


def test_compile_killed_between_its_renames_is_cleaned_by_the_next_compile(tmp_path):
    out = tmp_path / "out"
    # one process: a compile, then a second one killed (os._exit) between its two renames
    script = textwrap.dedent(f"""
        import os, sys
        from tpplan.cli import main
        assert main(["compile", {TINY!r}, "-o", {str(out)!r}]) == 0
        real = os.replace
        def replace(src, dst):
            if ".tpplan-new-" in str(src):
                os._exit(9)  # killed: the old folder is set aside, the new one not yet in place
            real(src, dst)
        os.replace = replace
        main(["compile", {TINY!r}, "-o", {str(out)!r}, "--set", "description=changed"])
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert killed.returncode == 9, killed.stderr
    left = sorted(p.name for p in out.iterdir())
    assert "tiny-llama" not in left and len(left) == 2, left
    assert any(".tpplan-old-" in n for n in left) and any(".tpplan-new-" in n for n in left)
    # look-alikes tpplan cannot prove it made stay: no marker, and a marker with a foreign file
    finished = subprocess.Popen(["true"])
    finished.wait()
    dead = finished.pid  # a process that no longer runs
    foreign = out / f".tiny-llama.tpplan-new-{dead}-abc"
    (foreign / "notes").mkdir(parents=True)
    extra = out / f".tiny-llama.tpplan-old-{dead}-xyz"
    extra.mkdir()
    (extra / MARKER).write_text(json.dumps({"written_by": "tpplan", "kind": "compile", "files": []}))
    (extra / "mine.txt").write_text("keep")

    assert main(["compile", TINY, "-o", str(out)]) == 0
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted(["tiny-llama", foreign.name, extra.name]), left
    assert sorted(p.name for p in (out / "tiny-llama").iterdir()) == [
        MARKER, "job.slurm", "launch.sh", "pytorchjob.yaml", "train.py", "trainjob.yaml"
    ]
    assert (extra / "mine.txt").read_text() == "keep"


def test_run_refuses_a_run_directory_it_did_not_make(tmp_path):
    theirs = tmp_path / "tiny-llama"
    theirs.mkdir()
    (theirs / "spec.yaml").write_text("mine: true\n")
    before = tree(tmp_path)
    result = cli("run", TINY, "--dry-run", "--set", f"train.save_dir={tmp_path}")
    assert_refused(result, f"the run directory {theirs} exists and was not made by tpplan run")
    assert tree(tmp_path) == before
