"""Rank side of tests/dist/test_activation_memory.py: what one forward of the real training step
leaves alive for backward, on real tensors and real gloo ranks, per training setting.

    python -m torch.distributed.run --standalone --nproc-per-node 2 -m tests.dist.activation_worker JOB.json

JOB: {"spec": path, "seq_length": s, "batch_size": b, "runs": [[--set items], ...], "out": path}.
The model is built and sharded by the training step's own ``prepare_model`` (tp = world size) and
runs ``forward_backward`` once; during the forward, every storage an op creates is noted, and at
its end those still alive, parameters excluded, are summed.  Rank 0 writes [bytes per run]."""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path


def main(job_path: str) -> int:
    import torch
    import torch.distributed as dist

    from tpplan.plan.apply import apply_tensor_parallel, build_mesh
    from tpplan.simulate.comm import CollectiveRecorder, mesh_group_labels
    from tpplan.spec.loader import load_spec
    from tpplan.model.sources import build_model, load_config
    from tpplan.plan.resolve import resolve
    from tpplan.simulate.fake_step import _ActivationMeter
    from tpplan.spec.schema import training_precision
    from tpplan.runtime.parallel_styles import fsdp_shard_placement
    from tpplan.runtime.step import forward_backward, precision_dtypes, prepare_model

    job = json.loads(Path(job_path).read_text())
    dist.init_process_group("gloo")
    try:
        results = []
        seq, batch = job["seq_length"], job["batch_size"]
        for sets in job["runs"]:
            spec = load_spec(job["spec"], sets)
            config = load_config(spec.model, spec.source.directory)
            tp = dist.get_world_size()
            precision = training_precision(spec)
            mesh = build_mesh("cpu", dp=1, tp=tp)
            dtype = str(precision_dtypes(precision)[0]).removeprefix("torch.")
            model = build_model(config, device="cpu", dtype=dtype, seed=spec.train.seed)
            plan = resolve(spec, model, tp=tp, seq_length=seq)
            prepare_model(model, mesh, lambda m, tp_mesh, plan=plan: apply_tensor_parallel(m, plan, mesh),
                          blocks=plan.blocks, tied=[t.names for t in plan.tied],
                          shard_placement_fn=fsdp_shard_placement, precision=precision,
                          activation_checkpointing=spec.train.activation_checkpointing)
            recorder = CollectiveRecorder(model, mesh_group_labels(mesh))  # knows when FSDP2 is unsharding
            meter = _ActivationMeter(lambda recorder=recorder: None if recorder.in_fsdp else "")
            measured = []

            @contextlib.contextmanager
            def phase(name, meter=meter, model=model, measured=measured):
                if name != "forward":
                    yield
                    return
                with meter.forward(model):
                    yield
                measured.append(sum(meter.alive().values()))

            generator = torch.Generator().manual_seed(1)
            ids = torch.randint(0, config.vocab_size, (batch, seq + 1), generator=generator)
            with recorder:
                forward_backward(model, [(ids[:, :-1], ids[:, 1:])], torch.arange(seq).unsqueeze(0),
                                 loss_parallel=plan.loss_parallel, phase=phase)
            results.append(measured[0])
        if dist.get_rank() == 0:
            Path(job["out"]).write_text(json.dumps(results))
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
