"""The torchrun command of `tpplan run` (launch.sh builds the same one; see test_render_injection)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import SPECS
from tpplan.core.errors import TpplanError
from tpplan.launch.torchrun import cli_overrides, run_dir_for, torchrun_argv
from tpplan.spec.loader import load_spec

TINY = SPECS / "tiny-llama.yaml"


def argv_for(*sets, environ=None):
    spec = load_spec(TINY, list(sets))
    return spec, torchrun_argv(spec, Path("run/train.py"), Path("run"), environ or {})


def test_single_node_is_standalone():
    spec, argv = argv_for()
    assert argv == [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "0",
        "--standalone",
        "run/train.py",
        "--run-dir",
        "run",
    ]
    assert run_dir_for(spec) == Path("outputs/tiny-llama")
    assert run_dir_for(load_spec(TINY, ["train.experiment_name=x", "train.save_dir=/tmp/o"])) == Path(
        "/tmp/o/x"
    )


def test_several_nodes_rendezvous_at_master_addr_or_the_spec_endpoint():
    _, argv = argv_for(*cli_overrides(nnodes="1:4", max_restarts=3), environ={"MASTER_ADDR": "n0"})
    assert argv[3:15] == [
        "--nproc-per-node",
        "2",
        "--max-restarts",
        "3",
        "--nnodes",
        "1:4",
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        "n0:29500",
        "--rdzv-id",
        "tiny-llama",
    ]
    _, argv = argv_for(*cli_overrides(nnodes="2"), environ={"MASTER_ADDR": "n0", "MASTER_PORT": "1234"})
    assert argv[argv.index("--rdzv-endpoint") + 1] == "n0:1234"
    _, argv = argv_for(*cli_overrides(nnodes="2", rdzv_endpoint="head:29400"), "launch.rdzv_id=job7")
    assert argv[argv.index("--rdzv-endpoint") + 1] == "head:29400" and argv[-4] == "job7"
    # one node with an explicit endpoint: a rendezvous too (not --standalone)
    _, argv = argv_for(*cli_overrides(rdzv_endpoint="head:29400"))
    assert "--standalone" not in argv and "--nnodes" in argv
    with pytest.raises(TpplanError, match="several nodes need a rendezvous endpoint"):
        argv_for(*cli_overrides(nnodes="2"))


def test_cli_overrides_keep_strings_strings():
    assert cli_overrides(nproc_per_node="gpu", nnodes="1:4", max_steps=5) == [
        ("--nproc-per-node", 'launch.nproc_per_node="gpu"'),
        ("--nnodes", 'launch.nnodes="1:4"'),
        ("--max-steps", "train.max_steps=5"),
    ]
    spec = load_spec(TINY, cli_overrides(nproc_per_node="4", nnodes="1:4"))
    assert spec.launch.nproc_per_node == 4 and spec.launch.nnodes == "1:4"  # not YAML 1.1's 1:4 == 64


def test_restarted_ranks_get_a_rendezvous_store_of_their_own(tmp_path, monkeypatch):
    """torchrun shares its store with the ranks by default and a restarted rank can read a dead
    peer's address (CI saw gloo's "connectFullMesh failed ... Connection refused" after
    --max-restarts): tpplan run, launch.sh and job.slurm opt out, unless the user says otherwise."""
    from tpplan.launch.torchrun import prepare_run

    monkeypatch.delenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", raising=False)
    spec = load_spec(TINY, [f"train.save_dir={tmp_path}"])
    assert prepare_run(spec).env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    monkeypatch.setenv("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "0")
    assert prepare_run(spec).env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "0"
    spec = load_spec(TINY, [f"train.save_dir={tmp_path}", 'launch.env={"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "x"}'])
    assert prepare_run(spec).env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "x"
    for name in ("launch.sh", "job.slurm"):
        text = (tmp_path / "tiny-llama" / name).read_text()
        assert 'export TORCH_DISABLE_SHARE_RDZV_TCP_STORE="${TORCH_DISABLE_SHARE_RDZV_TCP_STORE:-1}"' in text
