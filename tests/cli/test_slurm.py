"""Slurm for real: munged, slurmctld and two slurmd (nodes n1 and n2, both on localhost) started from
a configuration written here, and the generated job.slurm submitted with sbatch as a user would.

- ``generated/tiny-llama/job.slurm`` as committed (the CPU spec, no overrides) trains on one node:
  no GPU request, a task of 2 CPUs for its 2 ranks, the loss falls, the checkpoint is written.
- The same spec with ``launch.nnodes=2`` trains dp=2 x tp=2 over the two nodes (one torchrun per
  node, the rendezvous at the first node's NodeAddr).

Every daemon is started in a session of its own and stopped with it when the module ends, also
after a failure.  Skipped where Slurm is not installed, except under CI, which installs Debian's
slurm-wlm and munge (.ci/run)."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, SPECS, cli

pytestmark = pytest.mark.slow

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "scontrol", "sinfo")
GOLDEN = REPO / "generated" / "tiny-llama"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _plugin_dir() -> str | None:
    for folder in ("/usr/lib/x86_64-linux-gnu/slurm-wlm", "/usr/lib/aarch64-linux-gnu/slurm-wlm",
                   "/usr/lib64/slurm", "/usr/lib/slurm"):
        if Path(folder, "select_cons_tres.so").is_file():
            return folder
    return None


def slurm_conf(root: Path, host: str, nodes: tuple[str, ...]) -> str:
    """The least a cluster needs: no accounting, no cgroups (task/affinity pins a task to its CPUs,
    as on most clusters), every file under ``root``; each node 2 CPUs on 127.0.0.1, a port each."""
    lines = [
        "ClusterName=tpplan-test",
        f"SlurmctldHost={host}(127.0.0.1)",
        f"SlurmctldPort={free_port()}",
        "SlurmUser=root",
        "SlurmdUser=root",
        "AuthType=auth/munge",
        "CredType=cred/munge",
        f"AuthInfo=socket={root}/munge/munge.socket",
        f"StateSaveLocation={root}/state",
        f"SlurmdSpoolDir={root}/spool/%n",
        f"SlurmctldPidFile={root}/slurmctld.pid",
        f"SlurmdPidFile={root}/slurmd-%n.pid",
        f"SlurmctldLogFile={root}/log/slurmctld.log",
        f"SlurmdLogFile={root}/log/slurmd-%n.log",
        f"PluginDir={_plugin_dir()}",
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/affinity",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "SlurmdParameters=config_overrides",  # two nodes of 2 CPUs on one machine
        "MpiDefault=none",
        "ReturnToService=2",
        "AccountingStorageType=accounting_storage/none",
        "JobCompType=jobcomp/none",
        "JobAcctGatherType=jobacct_gather/none",
        "MinJobAge=600",  # scontrol show job answers for finished jobs
    ]
    for node in nodes:
        lines.append(f"NodeName={node} NodeAddr=127.0.0.1 NodeHostname={host} Port={free_port()} CPUs=2 "
                     "RealMemory=1000 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(nodes)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: list[subprocess.Popen] = []
        self.env = {
            **os.environ,
            "SLURM_CONF": str(self.conf),
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # torchrun for the job
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }

    def start(self, *command: str) -> None:
        log = open(self.root / "log" / f"{Path(command[0]).name}-{len(self.procs)}.out", "w")  # noqa: SIM115
        self.procs.append(subprocess.Popen(command, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True))
        log.close()

    def stop(self) -> None:
        """Each daemon this fixture started, with its session (slurmctld's slurmscriptd, slurmd's steps)."""
        for proc in reversed(self.procs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    proc.wait(10)
                    break
                except subprocess.TimeoutExpired:
                    continue

    def run(self, *command: str, cwd: Path, timeout: float = 60, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=cwd, env={**self.env, **env}, capture_output=True, text=True,
                              timeout=timeout)

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted((self.root / "log").iterdir()))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    missing = [name for name in DAEMONS if shutil.which(name, path=f"/usr/sbin:/sbin:{os.environ['PATH']}") is None]
    if missing or _plugin_dir() is None or os.geteuid() != 0:
        why = (f"Slurm is not installed ({', '.join(missing) or 'no plugins'})" if missing or not _plugin_dir()
               else "the daemons run as root")
        if os.environ.get("CI"):
            pytest.fail(f"{why}: .ci/run installs Debian's slurm-wlm and munge as root")
        pytest.skip(why)
    sbin = lambda name: shutil.which(name, path=f"/usr/sbin:/sbin:{os.environ['PATH']}")  # noqa: E731
    root = tmp_path_factory.mktemp("slurm")
    for folder in ("munge", "state", "spool", "log"):
        (root / folder).mkdir()
    (root / "munge").chmod(0o711)  # munged refuses a socket folder others can write to
    key = root / "munge" / "munge.key"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o600)
    host = socket.gethostname().split(".")[0]
    (root / "slurm.conf").write_text(slurm_conf(root, host, ("n1", "n2")))
    cluster = Cluster(root)
    try:
        cluster.start(sbin("munged"), "--foreground", "--force", f"--key-file={key}",
                      f"--socket={root}/munge/munge.socket", f"--pid-file={root}/munge/munged.pid",
                      f"--log-file={root}/log/munged.log", f"--seed-file={root}/munge/munged.seed")
        deadline = time.time() + 20
        while not (root / "munge" / "munge.socket").exists() and time.time() < deadline:
            time.sleep(0.1)
        cluster.start(sbin("slurmctld"), "-D", "-f", str(cluster.conf))
        for node in ("n1", "n2"):
            cluster.start(sbin("slurmd"), "-D", "-f", str(cluster.conf), "-N", node)
        deadline = time.time() + 60
        states = ""
        while time.time() < deadline:
            states = cluster.run("sinfo", "-h", "-N", "-o", "%N %t", cwd=root).stdout
            if sorted(states.split()) == ["idle", "idle", "n1", "n2"]:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"the nodes did not come up: {states!r}\n{cluster.logs()}")
        yield cluster
    finally:
        cluster.stop()


def sbatch(cluster: Cluster, script: Path, cwd: Path, *args: str) -> tuple[str, str]:
    """Submit and wait (sbatch --wait exits with the job's status); the job's id and its output."""
    done = cluster.run("sbatch", "--wait", str(script), *args, cwd=cwd, timeout=600, MASTER_PORT=str(free_port()))
    match = re.search(r"Submitted batch job (\d+)", done.stdout)
    job_id = match.group(1) if match else "?"
    outputs = list(cwd.glob(f"*-{job_id}.out"))
    output = outputs[0].read_text(errors="replace") if outputs else "(no job output)"
    assert done.returncode == 0, f"{done.stdout}\n{done.stderr}\n{output[-4000:]}\n{cluster.logs()}"
    return job_id, output


def losses(run_dir: Path) -> dict[int, float]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def test_the_cpu_spec_job_slurm_runs_as_committed(cluster, tmp_path):
    script = GOLDEN / "job.slurm"
    sbatch_lines = [line for line in script.read_text().splitlines() if line.startswith("#SBATCH")]
    assert not any("gpus" in line for line in sbatch_lines) and "#SBATCH --cpus-per-task=2" in sbatch_lines
    run_dir = tmp_path / "run"
    job_id, output = sbatch(cluster, script, tmp_path, "--max-steps", "8", "--log-freq", "1", "--ckpt-freq", "4",
                            "--run-dir", str(run_dir))
    assert "tiny-llama: 2 ranks, mesh dp=1 x tp=2 on cpu" in output
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 9)) and loss[8] < loss[1] - 0.2, loss  # ln(512) = 6.24, then it learns
    assert (run_dir / "checkpoints" / "step-00000008" / "trainer.json").is_file()
    job = cluster.run("scontrol", "show", "job", job_id, cwd=tmp_path).stdout
    assert re.search(r"NumCPUs=2\b", job) and "gres" not in job.lower(), job  # both cores, no GPU asked


def test_two_nodes_through_slurm(cluster, tmp_path):
    result = cli("compile", str(SPECS / "tiny-llama.yaml"), "-o", str(tmp_path), "--set", "launch.nnodes=2")
    assert result.returncode == 0, result.stderr
    script = tmp_path / "tiny-llama" / "job.slurm"
    assert "#SBATCH --nodes=2" in script.read_text()
    run_dir = tmp_path / "run"
    job_id, output = sbatch(cluster, script, tmp_path, "--max-steps", "6", "--log-freq", "1", "--run-dir",
                            str(run_dir))
    assert "tiny-llama: 4 ranks, mesh dp=2 x tp=2 on cpu" in output
    loss = losses(run_dir)
    assert sorted(loss) == list(range(1, 7)) and loss[6] < loss[1] - 0.2, loss
    assert (run_dir / "checkpoints" / "step-00000006" / "trainer.json").is_file()
    job = cluster.run("scontrol", "show", "job", job_id, cwd=tmp_path).stdout
    assert re.search(r"NodeList=n\[1-2\]", job), job
