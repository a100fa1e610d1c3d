"""Hostile spec strings cannot become code: train.py parses and holds them only as string
constants or one-line comments; launch.sh and job.slurm, actually executed with a fake torchrun,
hand them over verbatim and run nothing they contain."""

from __future__ import annotations

import ast
import io
import json
import os
import stat
import subprocess
import sys
import tokenize
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from tests.conftest import REPO
from tpplan.model.sources import build_model, load_config
from tpplan.plan.resolve import resolve
from tpplan.render import render
from tpplan.render.context import build_context
from tpplan.spec.schema import Spec

from .test_render import tiny

MARK = "INJECTED"
# the payload a hostile spec would like to run, in a few disguises
PAYLOADS = [
    f"'); import os; os.system('touch {MARK}') #",
    f'"""\nimport os\nos.system("touch {MARK}")\n"""',
    f"{{{{ ctx }}}}{{% if true %}}{MARK}{{% endif %}}",
    f"$(touch {MARK})`touch {MARK}`'\"; touch {MARK}; #",
    f"\\\n{MARK}\r\n\u2028{MARK}",
]
text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=30)
hostile = st.builds(lambda a, p, b: a + p + b, text, st.sampled_from(PAYLOADS), text)
shell_safe = st.builds(  # environment values: no NUL (execve cannot pass it)
    lambda a, p, b: (a + p + b).replace("\x00", ""), text, st.sampled_from(PAYLOADS), text
)
# One word (SLURM names, rendezvous ids: the spec refuses spaces, newlines and control characters
# there), still full of shell: ${IFS} is the space an injection would use.
one_word = st.builds(
    lambda a, b: f"{a}$(touch${{IFS}}{MARK})`x`'\"{b}",
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=10),
    st.text(alphabet=st.characters(min_codepoint=33, max_codepoint=126), max_size=10),
)


@lru_cache(maxsize=1)
def base():
    spec = tiny()
    return spec, build_model(load_config(spec.model), device="meta")


def spec_with(**changes) -> Spec:
    spec, _ = base()
    data = spec.model_dump(mode="json", exclude_unset=True)
    for dotted, value in changes.items():
        *parents, last = dotted.split("__")
        target = data
        for part in parents:
            target = target[int(part)] if part.isdigit() else target.setdefault(part, {})
        target[last] = value
    new = Spec.model_validate(data)
    new._source = spec.source
    return new


def render_all(spec: Spec, out_dir: Path) -> dict[str, str]:
    _, model = base()
    plan = resolve(spec, model, tp=2, seq_length=spec.train.seq_length)
    names = [n for n, _ in model.named_modules() if n]
    return render.render_files(build_context(spec, plan, names, out_dir))


def code_tokens(source: str) -> list[str]:
    """The text of every token that is code (not a string, comment or layout token)."""
    kinds = {
        tokenize.STRING,
        tokenize.COMMENT,
        tokenize.NL,
        tokenize.NEWLINE,
        tokenize.INDENT,
        tokenize.DEDENT,
        tokenize.ENCODING,
        tokenize.ENDMARKER,
    }
    kinds |= {
        getattr(tokenize, n)
        for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END")
        if hasattr(tokenize, n)
    }
    return [t.string for t in tokenize.generate_tokens(io.StringIO(source).readline) if t.type not in kinds]


def constants(source: str) -> set[str]:
    return {
        n.value
        for n in ast.walk(ast.parse(source))
        if isinstance(n, ast.Constant) and isinstance(n.value, str)
    }


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    name_suffix=st.text(alphabet="abcXYZ019._-", max_size=8),
    description=hostile,
    note=hostile,
    nested_note=hostile,
    dataset=hostile,
    dataset_config=hostile,
    split=hostile,
    text_column=hostile,
    experiment=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,20}\Z"),  # one folder name: the spec refuses paths
    save_dir=hostile,
    config_value=hostile,
    tokenizer=hostile,
    env_value=hostile,
)
def test_train_py_holds_hostile_strings_as_literals(
    name_suffix,
    description,
    note,
    nested_note,
    dataset,
    dataset_config,
    split,
    text_column,
    experiment,
    save_dir,
    config_value,
    tokenizer,
    env_value,
):
    spec = spec_with(
        name="t" + name_suffix,
        description=description,
        plan__0__note=note,
        plan__1__plan__2__note=nested_note,
        train__dataset=dataset,
        train__dataset_config=dataset_config,
        train__split=split,
        train__text_column=text_column,
        train__experiment_name=experiment,
        train__save_dir=save_dir,
        model__config={**base()[0].model.config, "payload": config_value},
        model__tokenizer=tokenizer,
        launch__env={"EVIL": env_value},
    )
    source = render_all(spec, REPO / "generated" / "t")["train.py"]
    ast.parse(source)
    assert not any(MARK in token for token in code_tokens(source))
    values = constants(source)
    for value in (dataset, split, text_column, experiment, save_dir, tokenizer):
        assert value in values  # verbatim, as a string constant
    for line in source.splitlines():
        if MARK in line:  # only in a string literal or a comment
            stripped = line.strip()
            assert stripped.startswith("#") or "'" in stripped or '"' in stripped, line


# ------------------------------------------------------------------------------------------
# The shell files, executed with fake torchrun / srun / scontrol
# ------------------------------------------------------------------------------------------

FAKE_TORCHRUN = f"""#!{sys.executable}
import json, os, sys
with open(os.environ["FAKE_OUT"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": {{k: os.environ.get(k) for k in ("EVIL", "OMP_NUM_THREADS")}}}}, f)
"""
FAKE_SRUN = f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
while args and args[0].startswith("--"):
    args.pop(0)
os.execvp(args[0], args)
"""
FAKE_SCONTROL = f"""#!{sys.executable}
import os, sys
if sys.argv[1:3] == ["show", "hostnames"]:
    print("node0")
    print("node1")
elif sys.argv[1:3] == ["show", "job"]:
    print("JobId=42 JobName=x")
    print("   Command=" + os.environ["FAKE_JOB_SCRIPT"] + " --max-steps 3")
"""


def fake_bin(folder: Path) -> Path:
    folder.mkdir(exist_ok=True)
    for name, text in (("torchrun", FAKE_TORCHRUN), ("srun", FAKE_SRUN), ("scontrol", FAKE_SCONTROL)):
        path = folder / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return folder


def run_shell(
    script: Path, tmp: Path, *args: str, **env: str
) -> tuple[subprocess.CompletedProcess, dict | None]:
    out = tmp / "torchrun.json"
    out.unlink(missing_ok=True)
    full_env = {
        "PATH": f"{fake_bin(tmp / 'bin')}{os.pathsep}{os.environ['PATH']}",
        "FAKE_OUT": str(out),
        "HOME": str(tmp),
        **env,
    }
    result = subprocess.run(
        ["bash", str(script), *args], cwd=tmp, env=full_env, capture_output=True, text=True
    )
    data = json.loads(out.read_text()) if out.exists() else None
    return result, data


def write(files: dict[str, str], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (folder / name).write_text(content)
    return folder


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(env_value=shell_safe, rdzv_id=one_word, description=hostile)
def test_launch_sh_passes_hostile_values_verbatim(tmp_path, env_value, rdzv_id, description):
    spec = spec_with(
        description=description,
        launch__env={"EVIL": env_value},
        launch__rdzv_id=rdzv_id,
        launch__nproc_per_node=2,
    )
    folder = write(render_all(spec, tmp_path / "job"), tmp_path / "job")
    result, data = run_shell(folder / "launch.sh", tmp_path, "--max-steps", "3")
    assert result.returncode == 0, result.stderr
    assert data["env"]["EVIL"] == env_value
    assert data["argv"] == [
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--standalone",
        str(folder / "train.py"),
        "--max-steps",
        "3",
    ]
    # several nodes: the endpoint defaults to $MASTER_ADDR:${MASTER_PORT:-29500}, the id is the spec's
    result, data = run_shell(folder / "launch.sh", tmp_path, NNODES="2", MASTER_ADDR="node0")
    assert result.returncode == 0, result.stderr
    assert data["argv"][4:12] == [
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node0:29500",
        "--rdzv-id",
        rdzv_id,
    ]
    assert not list(tmp_path.rglob(f"*{MARK}*"))


def test_launch_sh_multi_node_needs_an_endpoint(tmp_path):
    folder = write(render_all(spec_with(launch__nproc_per_node=2), tmp_path / "job"), tmp_path / "job")
    result, data = run_shell(folder / "launch.sh", tmp_path, NNODES="2")
    assert result.returncode != 0 and data is None
    assert "several nodes need RDZV_ENDPOINT or MASTER_ADDR" in result.stderr
    result, data = run_shell(
        folder / "launch.sh", tmp_path, NNODES="2", RDZV_ENDPOINT="10.0.0.1:1234", RDZV_ID="j"
    )
    assert data["argv"][4:12] == [
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "10.0.0.1:1234",
        "--rdzv-id",
        "j",
    ]
    spec = spec_with(
        launch__nproc_per_node=8,
        launch__nnodes="2",
        launch__rdzv_endpoint="head:29400",
        launch__max_restarts=3,
    )
    folder = write(render_all(spec, tmp_path / "job2"), tmp_path / "job2")
    result, data = run_shell(folder / "launch.sh", tmp_path)
    assert data["argv"][:12] == [
        "--nproc-per-node",
        "8",
        "--max-restarts",
        "3",
        "--nnodes",
        "2",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "head:29400",
        "--rdzv-id",
        "t",
    ]


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(partition=one_word, account=one_word, extra=one_word.map(lambda s: "--comment=" + s), env_value=shell_safe)
def test_job_slurm_runs_torchrun_once_per_node_with_hostile_values(
    tmp_path, partition, account, extra, env_value
):
    spec = spec_with(
        launch__nproc_per_node=8,
        launch__nnodes="2",
        launch__env={"EVIL": env_value},
        launch__slurm={"partition": partition, "account": account, "extra_sbatch": [extra]},
    )
    folder = write(render_all(spec, tmp_path / "job"), tmp_path / "job")
    script = folder / "job.slurm"
    lines = script.read_text().splitlines()
    sbatch = [line for line in lines if line.startswith("#SBATCH")]
    assert "#SBATCH --nodes=2" in sbatch and "#SBATCH --ntasks-per-node=1" in sbatch
    for line in sbatch:
        option = line.split(" ", 1)[1]
        assert option.startswith("--") or option.startswith("'")
    result, data = run_shell(
        script,
        tmp_path,
        SLURM_JOB_ID="42",
        SLURM_NNODES="2",
        SLURM_JOB_NODELIST="node[0-1]",
        FAKE_JOB_SCRIPT=str(script),
    )
    assert result.returncode == 0, result.stderr
    assert data["argv"] == [
        "--nnodes",
        "2",
        "--nproc-per-node",
        "8",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "node0:29500",
        "--rdzv-id",
        "42",
        "--max-restarts",
        "0",
        str(folder / "train.py"),
    ]
    assert data["env"]["EVIL"] == env_value
    assert not list(tmp_path.rglob(f"*{MARK}*"))


@pytest.mark.parametrize(("device", "nproc", "threads", "slurm", "gpus", "cpus"), [
    ("cpu", 2, "1", {}, None, "2"),  # the tiny spec: no GPU request (sbatch refuses a gres the cluster lacks)
    ("cuda", 8, "4", {}, "8", "32"),
    ("auto", "gpu", None, {}, "8", "8"),  # torchrun sets OMP_NUM_THREADS=1 when the environment does not
    ("cuda", 4, "2", {"gpus_per_node": 0}, None, "8"),
    ("cuda", 4, "2", {"gpus_per_node": None, "cpus_per_task": 12}, None, "12"),
    ("cuda", 4, "1", {"gpus_per_node": 8}, "8", "4"),
    ("cpu", "cpu", "1", {}, None, None),  # a rank per core of a node nobody knows yet: not asked
    ("auto", "cpu", "1", {}, None, None),  # CPU ranks ask for no GPUs
])
def test_job_slurm_asks_for_what_the_ranks_need(device, nproc, threads, slurm, gpus, cpus):
    import yaml

    env = {"OMP_NUM_THREADS": threads} if threads else {}
    spec = spec_with(mesh__device=device, launch__nproc_per_node=nproc, launch__env=env, launch__slurm=slurm)
    files = render_all(spec, REPO / "generated" / "t")
    options = dict(line.removeprefix("#SBATCH ").partition("=")[::2] for line in files["job.slurm"].splitlines()
                   if line.startswith("#SBATCH"))
    assert options.get("--gpus-per-node") == gpus and options.get("--cpus-per-task") == cpus
    pod = yaml.safe_load(files["pytorchjob.yaml"])["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]
    limits = pod["containers"][0].get("resources", {}).get("limits", {})
    assert limits.get("nvidia.com/gpu") == (int(gpus) if gpus else None)  # the pods ask for the same GPUs


@pytest.mark.parametrize("field", ["partition", "account", "time", "extra_sbatch"])
def test_sbatch_value_with_a_newline_is_refused(field):
    value = ["--qos=x\nrm -rf ~"] if field == "extra_sbatch" else "gpu\nrm -rf ~"
    with pytest.raises(ValidationError, match="one word of printable text|SLURM time limit|on one line"):
        spec_with(launch__slurm={field: value})


# ------------------------------------------------------------------------------------------
# The Kubernetes manifest, read back by a YAML parser
# ------------------------------------------------------------------------------------------

yaml_text = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=20)
yaml_hostile = st.builds(lambda a, p, b: a + p + b, yaml_text,
                         st.sampled_from([*PAYLOADS, "\n  evil: yes\n", "'] }\nkind: Secret\n", "*alias &anchor !!python/object"]),
                         yaml_text)


@settings(max_examples=40, deadline=None)
@given(image=yaml_hostile, namespace=yaml_hostile, claim=yaml_hostile, env_value=yaml_hostile,
       experiment=st.from_regex(r"\A[A-Za-z0-9][A-Za-z0-9._-]{0,30}\Z"), description=yaml_hostile)
def test_pytorchjob_yaml_holds_hostile_values_as_strings(image, namespace, claim, env_value, experiment, description):
    import yaml

    spec = spec_with(
        description=description,
        train__experiment_name=experiment,
        launch__nproc_per_node=8,
        launch__nnodes="3",
        launch__env={"EVIL": env_value},
        launch__kubernetes={"image": image, "namespace": namespace, "volume_claim": claim},
    )
    text = render_all(spec, REPO / "generated" / "t")["pytorchjob.yaml"]
    job = yaml.safe_load(text)  # one document, plain data
    assert set(job) == {"apiVersion", "kind", "metadata", "spec"} and job["kind"] == "PyTorchJob"
    assert job["metadata"] == {"name": "t", "namespace": namespace}
    replicas = job["spec"]["pytorchReplicaSpecs"]
    assert set(replicas) == {"Master", "Worker"}
    assert (replicas["Master"]["replicas"], replicas["Worker"]["replicas"]) == (1, 2)
    for replica in replicas.values():
        pod = replica["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == image
        assert container["command"] == ["torchrun"]
        assert container["args"] == ["--max-restarts", "0", "/workspace/train.py", "--run-dir", f"/runs/{experiment}"]
        assert {e["name"]: e["value"] for e in container["env"]}["EVIL"] == env_value
        assert container["resources"] == {"limits": {"nvidia.com/gpu": 8}}
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert volumes["runs"]["persistentVolumeClaim"] == {"claimName": claim}
    for line in text.splitlines():
        if MARK in line:  # only inside a double-quoted scalar or a comment
            stripped = line.strip()
            assert stripped.startswith("#") or '"' in stripped, line


def test_pytorchjob_yaml_elastic_and_cpu():
    import yaml

    spec = spec_with(launch__nnodes="2:4", launch__nproc_per_node="cpu", launch__max_restarts=3)
    job = yaml.safe_load(render_all(spec, REPO / "generated" / "t")["pytorchjob.yaml"])
    assert job["spec"]["elasticPolicy"] == {"rdzvBackend": "c10d", "minReplicas": 2, "maxReplicas": 4, "maxRestarts": 3}
    assert list(job["spec"]["pytorchReplicaSpecs"]) == ["Worker"]
    assert job["spec"]["nprocPerNode"] == "cpu"
