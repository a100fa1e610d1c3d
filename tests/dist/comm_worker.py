"""Rank side of tests/dist/test_comm_real.py: one real training step on CPU gloo ranks (the training
step's own ``prepare_model``, ``forward_backward`` and ``optimizer_step``), with every collective
recorded by the recorder the simulator uses (``tpplan.simulate.comm``).

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.dist.comm_worker JOB.json

JOB: {"seq_length": s, "batch_size": b, "runs": [{"spec": path, "tp": 2, "dp": 1}, ...], "out_dir": dir};
each run's dp*tp must equal the world size.  Rank 0 writes run-<i>.json: the records as dicts."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(job_path: str) -> int:
    import torch
    import torch.distributed as dist

    from tpplan.plan.apply import apply_tensor_parallel, build_mesh
    from tpplan.simulate.comm import CollectiveRecorder, mesh_group_labels, recorded_step
    from tpplan.spec.loader import load_spec
    from tpplan.model.sources import build_model, load_config
    from tpplan.plan.resolve import resolve
    from tpplan.spec.schema import training_precision
    from tpplan.runtime.parallel_styles import fsdp_shard_placement
    from tpplan.runtime.step import prepare_model

    job = json.loads(Path(job_path).read_text())
    dist.init_process_group("gloo")
    try:
        seq, batch = job["seq_length"], job["batch_size"]
        for i, run in enumerate(job["runs"]):
            spec = load_spec(run["spec"], [])
            config = load_config(spec.model, spec.source.directory)
            tp, dp = run["tp"], run["dp"]
            model = build_model(config, device="cpu", dtype=spec.model.dtype, seed=spec.train.seed)
            plan = resolve(spec, model, tp=tp, seq_length=seq)
            mesh = build_mesh("cpu", dp=dp, tp=tp)
            prepare_model(model, mesh, lambda m, tp_mesh, plan=plan, mesh=mesh: apply_tensor_parallel(m, plan, mesh),
                          blocks=plan.blocks, tied=[t.names for t in plan.tied],
                          shard_placement_fn=fsdp_shard_placement, precision=training_precision(spec),
                          activation_checkpointing=spec.train.activation_checkpointing)
            generator = torch.Generator().manual_seed(1 + mesh["dp"].get_local_rank())
            ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
            recorder = CollectiveRecorder(model, mesh_group_labels(mesh))
            optimizer = torch.optim.AdamW(model.parameters())
            recorded_step(model, recorder, [(ids[:, :-1], ids[:, 1:])], torch.arange(seq).unsqueeze(0),
                          loss_parallel=plan.loss_parallel, max_grad_norm=spec.train.max_grad_norm,
                          optimizer=optimizer)
            if dist.get_rank() == 0:
                out = Path(job["out_dir"]) / f"run-{i}.json"
                out.write_text(json.dumps([r.to_dict() for r in recorder.records], indent=1))
            dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
