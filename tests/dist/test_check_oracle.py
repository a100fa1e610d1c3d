"""A proof that cannot be fooled: wrong plans that the old oracle proved, failed now.

- a gradient tp times too large whose entries are all below any absolute tolerance (DeepSeek-V3's
  q_a_layernorm under replicate_grad_allreduce: ~1e-5 in the twin) fails, named, because every tensor
  is compared against its own largest value;
- a plan that shards nothing inside the blocks fails, unless the spec says that is what it means;
- a MoE twin routes on purpose: in every MoE layer the last expert gets no token, the first most;
- the report gives every parameter's relative error and its unsharded magnitude, after each of 3 steps."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import SPECS, cli
from tpplan.prove.check import run_check
from tpplan.prove.verdict import STEPS
from tpplan.spec.loader import load_spec

pytestmark = pytest.mark.slow
TINY = SPECS / "tiny-llama.yaml"
NOTHING = ["plan=[{match: model.norm, style: replicate}]", "loss_parallel=false"]


def test_a_gradient_too_small_for_an_absolute_tolerance_fails_by_name(tmp_path):
    from tpplan.hf.import_hf import import_hf

    text = import_hf("deepseek_v3").text
    anchor = "      - {match: self_attn.q_b_proj, style: colwise}"
    assert anchor in text
    spec = tmp_path / "deepseek-v3-wrong.yaml"
    wrong = "      - {match: self_attn.q_a_layernorm, style: replicate_grad_allreduce}\n"
    spec.write_text(text.replace(anchor, wrong + anchor))
    result = cli("check", str(spec), "--tp", "2", "--json")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    report = json.loads(result.stdout)
    failure = report["failure"]
    # every block's q_a_layernorm is wrong by 100%; the one named used most of its tolerance
    assert re.fullmatch(r"model\.layers\.\d\.self_attn\.q_a_layernorm\.weight", failure["parameter"]), failure
    assert failure["reason"] == "gradient_differs" and failure["step"] == 1
    assert "differs from the unsharded model's by 100% of its largest value" in failure["message"]
    relative, magnitude, own = report["parameters"][failure["parameter"]]["gradient"]
    assert relative == pytest.approx(1.0, rel=1e-3) and magnitude < 1e-4  # all of it wrong, all of it tiny
    assert own < 1e-5  # the unsharded model against itself: rounding, far below the error
    assert report["max_abs_grad_diff"] < 1e-4  # what an absolute tolerance of 1e-5 let through, roughly


def test_a_plan_that_shards_nothing_in_the_blocks_fails_unless_the_spec_means_it():
    result = cli("check", str(TINY), *[arg for s in NOTHING for arg in ("--set", s)])
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    assert "error: the plan shards nothing inside the blocks: all 18 parameters of the blocks" in \
        result.stdout
    assert "replicated_blocks: true" in result.stdout  # the hint names the opt-out

    meant = run_check(load_spec(TINY, [*NOTHING, "replicated_blocks=true"]), tp=2, launcher="fork",
                      timeout=300)
    assert meant.ok, meant.failure
    assert meant.sharded["blocks"]["sharded"] == 0 and meant.replicated == ["attention", "mlp"]

    # at tp=1 there is nothing to shard over: a data-parallel check (FSDP over dp=2) is a proof, as tune
    # needs for its tp=1 candidates
    data_parallel = run_check(load_spec(TINY), tp=1, dp=2, launcher="fork", timeout=300)
    assert data_parallel.ok, data_parallel.failure


def test_the_report_counts_what_the_plan_shards_and_every_parameter_after_each_step():
    report = run_check(load_spec(TINY), tp=2, launcher="fork", timeout=300)
    assert report.ok and report.steps == STEPS and report.replicated == []
    kinds = report.sharded
    assert kinds["attention"]["sharded"] == kinds["attention"]["parameters"] == 8  # q, k, v, o in 2 blocks
    assert kinds["mlp"]["per_rank"] * 2 == kinds["mlp"]["numel"]  # every MLP weight split in two
    assert kinds["norms"]["sharded"] == 0 and kinds["embedding"]["sharded"] == 1
    assert set(report.parameters) == {name for name, _ in _twin_parameters()}
    for name, entry in report.parameters.items():
        relative, magnitude, own = entry["gradient"]
        assert relative < 1e-5 and magnitude > 0, (name, entry)  # correct plans: ~1e-7 of the largest value
        assert own < 1e-5, (name, entry)  # and the unsharded model agrees with itself as closely
        assert set(entry) == {"gradient", "update", "state"}


def _twin_parameters():
    from tpplan.plan.stage import resolve_stage

    twin = resolve_stage(load_spec(TINY), tp=2).source.twin(2)
    return list(twin.build(device="meta").named_parameters())


def test_a_moe_twin_routes_no_token_to_its_last_expert_and_most_to_its_first(tmp_path):
    from tpplan.hf.import_hf import import_hf

    spec = tmp_path / "qwen3-moe.yaml"
    spec.write_text(import_hf("qwen3_moe").text)
    report = run_check(load_spec(spec), tp=2, launcher="fork", timeout=300)
    assert report.ok, report.failure
    routing = report.routing
    assert routing["routers"] == 2 and routing["experts"] == 4
    idle = routing["experts_without_tokens"]
    banks = ("gate_up_proj", "down_proj")
    assert set(idle) == {f"model.layers.{i}.mlp.experts.{w}" for i in (0, 1) for w in banks}
    assert all(rows == [3] for rows in idle.values())  # the last expert only: the others got tokens
    assert report.replicated == [] and report.sharded["routers"]["sharded"] == 0  # routers whole, by design


def test_ranks_forked_after_a_fake_world_sharded_the_same_model_still_prove_it():
    """The zoo, derive and the suite fork check's ranks from a process that may have used DTensor in another
    world: here a fake one (collectives that do nothing), the tiny model sharded and stepped in it, the world
    then destroyed without clearing what DTensor cached.  Meshes of both worlds compare equal, so a forked
    rank that kept the caches took the fake world's decisions (found by the suite: the tiny spec 'differed'
    after tests/dist/test_rendered_plan.py had run in the same process)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore

    import tpplan
    from tpplan.plan.stage import resolve_stage

    spec = load_spec(TINY)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        model = resolve_stage(spec, tp=2).source.twin(2).build(device="cpu", dtype="float32", seed=0)
        mesh = init_device_mesh("cpu", (1, 1, 2), mesh_dim_names=("dp", "ep", "tp"))
        tpplan.parallelize(model, spec, mesh)
        tokens = torch.randint(0, 64, (2, 16))
        logits = model(input_ids=tokens).logits  # vocab-sharded (the spec's loss_parallel)
        logits.full_tensor().float().square().mean().backward()
    finally:
        dist.destroy_process_group()  # as a test fixture does: the caches stay
    report = run_check(spec, tp=2, launcher="fork", timeout=300)
    assert report.ok, report.failure
