"""Rank program for the reshard tests: load a run's checkpoint at any tp and save the logits.

    torchrun --nproc-per-node N tests/dist/logits_worker.py RUN_DIR CHECKPOINT OUT.pt

Builds the run's model (from its spec.yaml), shards it at tp = world size with tpplan, loads the
model weights from the DCP checkpoint (DCP reshards whatever layout wrote it) and writes the
full logits of a fixed batch (rank 0)."""

import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.tensor import DTensor

from tpplan import build_mesh, load_spec, parallelize
from tpplan.plan.stage import model_source


def main(run_dir: str, checkpoint: str, out: str) -> None:
    dist.init_process_group("gloo")
    spec = load_spec(f"{run_dir}/spec.yaml")
    source = model_source(spec)
    model = source.build(device="cpu", dtype="float32", seed=1234)  # weights replaced below
    mesh = build_mesh("cpu", dp=1, tp=dist.get_world_size())
    parallelize(model, spec, mesh)
    state = {"model": get_model_state_dict(model)}
    dcp.load(state, checkpoint_id=checkpoint)
    set_model_state_dict(model, state["model"])
    ids = torch.randint(0, source.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=torch.arange(32).unsqueeze(0)).logits
    logits = logits.full_tensor() if isinstance(logits, DTensor) else logits
    if dist.get_rank() == 0:
        torch.save({"ids": ids, "logits": logits}, out)
    dist.barrier()  # no rank tears gloo down while another still runs (an early exit aborts a peer)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
