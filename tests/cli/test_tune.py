"""`tpplan tune` as users run it (a subprocess): the ranked table, the spec written only once check
proves it, every candidate's memory equal to what `tpplan plan --json` reports for it, and bad input
refused with one message (exit 2) before any work."""

from __future__ import annotations

import json

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.conftest import SPECS, cli
from tpplan.cli import build_parser
from tpplan.core.errors import TpplanError
from tpplan.spec.loader import load_spec

TINY = str(SPECS / "tiny-llama.yaml")
SIX = ("--set", "model.config.num_hidden_layers=6")  # 6 blocks: the simulator runs 3 and scales the rest


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    """One tune of the tiny Llama on 4 GPUs, proven and written, with every candidate as JSON."""
    out = tmp_path_factory.mktemp("tune") / "specs" / "tuned.yaml"
    out.parent.mkdir()
    run = cli("tune", TINY, *SIX, "--gpus", "4", "--no-compile", "--activation-checkpointing", "none,full",
              "--json", "-o", str(out), timeout=900)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout), out, run


def test_tune_writes_the_fastest_candidate_as_a_proven_spec_extending_the_one_tuned(tuned):
    data, out, run = tuned
    best = data["best"]
    assert data["check"]["ok"] and f"wrote {out}" in run.stderr
    text = out.read_text()
    assert "# Proven by `tpplan check` at tp=" in text and "extends: ../../" in text
    spec = load_spec(out)
    assert (spec.mesh.tp, spec.mesh.dp, spec.train.batch_size, spec.train.grad_accum_steps) == (
        best["tp"], best["dp"], best["micro_batch"], best["grad_accum_steps"])
    assert spec.train.activation_checkpointing == best["activation_checkpointing"]
    assert spec.model.config["num_hidden_layers"] == 6  # the --set value is kept
    assert spec.mesh.tp * spec.mesh.dp == spec.launch.nproc_per_node == 4
    fitting = [c for c in data["candidates"] if not c["rejected"]]
    fastest = max(c["prediction"]["tokens_per_s_per_gpu"] for c in fitting)
    assert best["prediction"]["tokens_per_s_per_gpu"] == fastest


@pytest.mark.parametrize("pick", ["extrapolated micro-batch", "accumulation and full checkpointing"])
def test_a_candidates_memory_is_what_plan_json_reports(tuned, pick):
    data, _, _ = tuned
    if pick == "extrapolated micro-batch":  # micro-batch 4: on the line through the simulated 1 and 2
        cand = next(c for c in data["candidates"] if c["tp"] == 2 and c["micro_batch"] == 4 and c["memory"])
    else:
        cand = next(c for c in data["candidates"] if c["grad_accum_steps"] > 1
                    and c["activation_checkpointing"] == "full" and c["memory"])
    run = cli("plan", TINY, *SIX, "--tp", str(cand["tp"]), "--dp", str(cand["dp"]), "--batch-size",
              str(cand["micro_batch"]),
              "--set", f"train.activation_checkpointing={cand['activation_checkpointing']}",
              "--set", f"train.grad_accum_steps={cand['grad_accum_steps']}", "--device-memory-gib", "80",
              "--json")
    assert run.returncode == 0, run.stderr
    assert json.loads(run.stdout)["memory"]["with_fsdp"] == cand["memory"]


def test_a_spec_check_does_not_prove_is_never_written(tmp_path):
    """The mutant of the proof: a rank of the check fails (tpplan check's fault injection), so the
    fastest candidate is not proven: exit 1, the reason, and no file."""
    out = tmp_path / "tuned.yaml"
    run = cli("tune", TINY, "--gpus", "2", "--no-compile", "--activation-checkpointing", "none",
              "-o", str(out), env={"TPPLAN_CHECK_FAULT": "raise:0:clipping gradients"}, timeout=600)
    assert run.returncode == 1, run.stderr
    assert "the tuned spec is not proven by check" in run.stderr and "fault injected" in run.stderr
    assert "Traceback" not in run.stderr and not out.exists() and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (("--gpus", "4", "--gpu", "h100"), "no such device profile"),
    (("--gpus", "0"), "--gpus: expected a number of GPUs from 1"),
    (("--gpus", "4", "--activation-checkpointing", "sometimes"),
     "--activation-checkpointing: expected some of"),
    (("--gpus", "4", "--global-batch-tokens", "1000"), "is not a multiple of the sequence length 128"),
    (("--gpus", "4", "--name", "bad name"), "--name"),
])
def test_bad_arguments_are_refused_before_any_work(args, message, tmp_path):
    out = tmp_path / "never.yaml"
    run = cli("tune", TINY, *args, "-o", str(out), timeout=120)
    assert run.returncode == 2, run.stderr
    assert message in run.stderr and "Traceback" not in run.stderr
    assert "simulat" not in run.stderr and not out.exists()


def test_a_device_profile_of_ones_own_is_read_and_its_errors_located(tmp_path):
    bad = tmp_path / "gpu.yaml"
    bad.write_text("name: mine\nmemory_gib: lots\n")
    run = cli("tune", TINY, "--gpus", "4", "--gpu", str(bad), timeout=120)
    assert run.returncode == 2 and f"{bad}:2:13: error: memory_gib:" in run.stderr
    small = tmp_path / "small.yaml"
    profile = yaml.safe_load((SPECS.parent / "tpplan" / "tune" / "devices" / "h100-sxm.yaml").read_text())
    small.write_text(yaml.safe_dump({**profile, "name": "small", "memory_gib": 0.0005, "sources": {}}))
    run = cli("tune", TINY, "--gpus", "2", "--gpu", str(small), "--activation-checkpointing", "none",
              timeout=300)
    assert run.returncode == 2, run.stderr
    assert "no candidate fits 2 x small" in run.stderr and "needs 0." in run.stdout


def test_an_output_folder_is_refused_before_the_search(tmp_path):
    run = cli("tune", TINY, "--gpus", "4", "-o", str(tmp_path), timeout=120)
    assert run.returncode == 2 and "is a directory" in run.stderr and "simulat" not in run.stderr


@settings(max_examples=80, deadline=None)
@given(st.lists(st.sampled_from(["--gpus", "--nodes-of", "--global-batch-tokens", "--seq-length", "--top",
                                 "--jobs", "--gpu", "4", "0", "-1", "8K", "1.5M", "x", "", "1e99",
                                 "--no-compile", "\x00"]),
                max_size=6))
@example(["--gpus", "4", "4"])  # found by the canary's run: an argument left over named `tpplan --help`, not tune's
def test_any_tune_arguments_parse_or_are_one_message(argv):
    try:
        args = build_parser().parse_args(["tune", TINY, *argv])
    except TpplanError as exc:
        assert str(exc).startswith("error: ") and "\n  hint: see `tpplan tune --help`" in str(exc)
    except SystemExit as exc:  # --help-like exits of argparse: none of these arguments asks for them
        pytest.fail(f"argparse exited {exc.code}")
    else:
        assert args.gpus is None or args.gpus >= 1


@pytest.mark.parametrize("how", ["ctrl-c", "parent killed"])
def test_the_forked_workers_end_with_the_search(how):
    """Ctrl-C (SIGINT to the whole process group): the parent stops the pool and exits 130; the parent
    killed outright: its workers end too (their parent-death signal)."""
    import os
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen([sys.executable, "-m", "tpplan", "tune", TINY, "--gpus", "4", "--jobs", "2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    workers: list[str] = []
    deadline = time.time() + 120
    while len(workers) < 2 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        workers = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
    assert len(workers) == 2, "the search forked no workers"
    if how == "ctrl-c":
        os.killpg(proc.pid, signal.SIGINT)
    else:
        os.kill(proc.pid, signal.SIGKILL)
    code = proc.wait(timeout=60)
    _, err = proc.communicate()
    assert code == (130 if how == "ctrl-c" else -signal.SIGKILL)
    if how == "ctrl-c":
        assert err.rstrip().endswith("interrupted") and "Traceback" not in err
    deadline = time.time() + 30
    while time.time() < deadline and any(os.path.exists(f"/proc/{w}") for w in workers):
        time.sleep(0.2)
    alive = [w for w in workers if os.path.exists(f"/proc/{w}")]
    for w in alive:  # do not leave them behind whatever the verdict
        os.kill(int(w), signal.SIGKILL)
    assert not alive
