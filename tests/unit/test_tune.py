"""tpplan tune without a subprocess: device profiles, the FLOP counter against the arithmetic of the
model, the cost model's arithmetic, the search's memory against the simulator's own at every
micro-batch, and the written spec (fake process group in this process; seconds)."""

from __future__ import annotations

import contextlib
import functools
import math

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SPECS
from tpplan.core.errors import SpecError, SpecErrors, TpplanError
from tpplan.simulate.simulator import simulate
from tpplan.spec.loader import load_spec
from tpplan.tune import flops
from tpplan.tune.cost import Efficiency, Mesh, Settings, Traffic, collective_seconds, load_efficiency, predict
from tpplan.tune.flops import ATTENTION, MATMUL, MATMUL_F8, StepCounter, StepWork
from tpplan.tune.profiles import DeviceProfile, load_device, shipped_names
from tpplan.tune.search import _variant, candidate_memory, search, simulate_shape

# the tiny Llama with 6 blocks: the simulator runs 3 and scales the middle one to the rest
SIX = ["model.config.num_hidden_layers=6"]
H, FFN, HEADS, KV, V, SEQ = 64, 128, 4, 2, 512, 128
HEAD_DIM = H // HEADS


def tiny6(*extra: str):
    return load_spec(SPECS / "tiny-llama.yaml", [*SIX, *extra])


# -- device profiles ----------------------------------------------------------------------------


def test_every_shipped_profile_loads_and_cites_every_value():
    assert {"h100-sxm", "h200", "b200", "a100-80gb", "mi300x"} <= set(shipped_names())
    for name in shipped_names():
        profile = load_device(name)
        assert profile.name == name
        assert profile.uncited() == [], f"{name}: values without a source"
        assert profile.memory_gib > 0 and profile.bf16_tflops > 0
        if profile.float8:
            assert profile.fp8_tflops, f"{name}: float8 on but no fp8 peak"


def test_a_profile_of_ones_own_and_its_errors_located(tmp_path):
    own = tmp_path / "mine.yaml"
    own.write_text(yaml.safe_dump({**load_device("h100-sxm").model_dump(exclude={"sources"}), "name": "mine",
                                   "memory_gib": 40}))
    assert load_device(str(own)).memory_gib == 40
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nmemory_gib: -1\nbf16_tflop: 3\n")
    with pytest.raises(SpecErrors) as err:
        load_device(str(bad))
    text = str(err.value)
    located = text.replace(str(bad), bad.name)
    assert f"{bad.name}:2:13: error: memory_gib: Input should be greater than 0" in located
    assert "did you mean 'bf16_tflops'?" in text


def test_an_unknown_profile_name_lists_the_shipped_ones():
    with pytest.raises(TpplanError) as err:
        load_device("h100")
    assert "did you mean 'h100-sxm'?" in str(err.value) and "mi300x" in str(err.value)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(["name", "memory_gib", "bf16_tflops", "hbm_tb_s", "nvlink_gb_s",
                                        "network_gb_s", "latency_us", "gpus_per_node", "bogus"]),
                       st.one_of(st.none(), st.booleans(), st.integers(-5, 10**6), st.floats(allow_nan=True),
                                 st.text(max_size=8), st.lists(st.integers(), max_size=2)), max_size=9))
def test_any_profile_file_loads_or_is_one_located_error(tmp_path, data):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    try:
        assert isinstance(load_device(str(path)), DeviceProfile)
    except (SpecError, SpecErrors) as exc:
        assert str(exc).startswith(str(path)) or "p.yaml" in str(exc)


# -- the FLOP counter -----------------------------------------------------------------------------


@functools.cache
def _counted(*extra: str, tp: int, all_layers: bool = False):
    """The tiny 6-block Llama's step (batch 8) counted; once per arguments for the module."""
    counter = StepCounter()
    sim = simulate(tiny6(*extra), tp=tp, dp=1, seq_length=SEQ, batch_size=8, observe=counter,
                   all_layers=all_layers)
    return counter.work(sim), sim


def _linear_flops_per_token(tp: int, layers: int) -> tuple[int, int]:
    """(block linears, lm_head) forward FLOPs per token on one rank: 2 x in x out / tp each."""
    per_block = 2 * (H * H + 2 * H * (KV * HEAD_DIM) + H * H + 3 * H * FFN) // tp
    return layers * per_block, 2 * H * V // tp


def test_counted_matmuls_and_attention_are_the_models_arithmetic():
    work, _ = _counted(tp=2)
    tokens = 8 * SEQ
    blocks, head = _linear_flops_per_token(2, 6)
    # every block linear: float8-eligible (sizes multiples of 16)
    assert work.forward_flops[MATMUL_F8] == blocks * tokens
    assert work.forward_flops[MATMUL] == head * tokens  # lm_head: outside the blocks, stays bf16
    assert work.flops[MATMUL_F8] == 3 * blocks * tokens  # backward: the input and the weight gradient
    attention = 6 * 2 * (2 * 8 * (HEADS // 2) * SEQ * SEQ * HEAD_DIM) / 2  # q.k and p.v, causal: half
    assert work.forward_flops[ATTENTION] == attention
    assert work.flops[ATTENTION] == pytest.approx(3.5 * attention)  # flash backward: 2.5 x the forward
    assert work.model_flops == pytest.approx(3 * (blocks * tokens + head * tokens + attention))


def test_counted_work_is_one_ranks_share_and_full_checkpointing_recomputes_each_block_once():
    whole, _ = _counted(tp=1)
    split, _ = _counted(tp=2)
    assert whole.flops[MATMUL_F8] == 2 * split.flops[MATMUL_F8]
    full, _ = _counted("train.activation_checkpointing=full", tp=2)
    # the block's forward again, but for its last matmul: torch's checkpoint stops recomputing once it
    # has what backward needs (down_proj's input, not its output)
    down_proj = 6 * (2 * FFN * H // 2) * 8 * SEQ
    assert full.flops[MATMUL_F8] - split.flops[MATMUL_F8] == split.forward_flops[MATMUL_F8] - down_proj
    selective, _ = _counted("train.activation_checkpointing=selective", tp=2)
    assert selective.flops[MATMUL_F8] == split.flops[MATMUL_F8]  # matmul outputs are kept, not recomputed


def test_the_blocks_not_simulated_are_counted_like_the_simulated_ones():
    every, sim_all = _counted(tp=2, all_layers=True)
    scaled, sim = _counted(tp=2)
    assert sim.data["simulated_layers"] == 3 and sim_all.data["simulated_layers"] == 6
    assert scaled.flops == every.flops and scaled.forward_flops == every.forward_flops
    assert (scaled.block_bytes, scaled.other_bytes) == (every.block_bytes, every.other_bytes)


def test_moe_expert_matmuls_are_counted_per_token_and_expert():
    """torch's registry has no formula for ``_grouped_mm`` (MoE experts): 64 tokens over 4 experts of
    32 x 16 cost 2 x 64 x 32 x 16 forward, and as much for each gradient (the weight gradient's output
    is per expert, its contraction over the tokens)."""
    import torch

    tokens, k, n, experts = 64, 32, 16, 4
    forward = flops._grouped_mm_flops(torch.empty(tokens, k, device="meta"),
                                      torch.empty(tokens, n, device="meta"))
    weight_grad = flops._grouped_mm_flops(torch.empty(k, tokens, device="meta"),
                                          torch.empty(experts, k, n, device="meta"))
    batched = flops._grouped_mm_flops(torch.empty(experts, 8, k, device="meta"),
                                      torch.empty(experts, 8, n, device="meta"))
    assert forward == weight_grad == 2 * tokens * k * n
    assert batched == 2 * experts * 8 * k * n


def test_mutant_counting_dtensors_global_shape_propagation_is_caught(monkeypatch):
    """DTensor runs each new op once on fake tensors of the global shapes to learn the output's; a
    counter that took those runs for work would count unsharded matmuls.  The arithmetic test above
    fails for it."""
    monkeypatch.setattr(flops, "_shape_propagation_marked", lambda depth: contextlib.nullcontext())
    counter = StepCounter()
    work = counter.work(simulate(tiny6(), tp=2, dp=1, seq_length=SEQ, batch_size=8, observe=counter))
    blocks, _ = _linear_flops_per_token(2, 6)
    assert work.forward_flops[MATMUL_F8] > blocks * 8 * SEQ


# -- the cost model -------------------------------------------------------------------------------


def test_groups_span_nodes_as_the_mesh_lays_ranks_out():
    mesh = Mesh(dp=32, ep=1, tp=8, gpus_per_node=8)
    assert mesh.group("tp") == (8, 1)
    assert mesh.group("dp") == (32, 32)  # one rank of each dp group per node
    assert Mesh(dp=16, ep=1, tp=2, gpus_per_node=8).group("dp") == (16, 4)
    assert Mesh(dp=4, ep=1, tp=2, gpus_per_node=8).group("dp") == (4, 1)


def test_a_collective_takes_nccls_ring_latency_and_its_bytes_over_the_link():
    h100 = load_device("h100-sxm")
    eff = Efficiency(comm_nvlink=0.5, comm_network=0.5)
    inside = collective_seconds([Traffic("tp", "all_gather", 1, 450e9 * 0.5)], Mesh(1, 1, 8, 8), h100, eff)
    assert inside == pytest.approx(1.0 + (8.4 + 7 * 3.4) * 1e-6)
    across = collective_seconds([Traffic("dp", "all_reduce", 2, 50e9 * 0.5)], Mesh(4, 1, 8, 8), h100, eff)
    # 4 nodes, all-reduce: 2 x 3 ring steps, all across nodes
    assert across == pytest.approx(1.0 + 2 * (8.4 + 6 * 9.6) * 1e-6)


def _prediction(**settings):
    k = settings.pop("accumulation", 1)
    work = StepWork({MATMUL: 1e12, MATMUL_F8: 8e12, ATTENTION: 1e12}, {MATMUL: 3e11, MATMUL_F8: 2.7e12},
                    4e10, 1e10)
    return predict(work=work,
                   micro=[Traffic("tp", "all_gather", 100, 4e9), Traffic("dp", "all_gather", 10, 1e9)],
                   per_step=[Traffic("dp", "reduce_scatter", 10, 1e9)], float8_saved_ring_bytes=4e8,
                   mesh=Mesh(4, 1, 8, 8), accumulation=k, tokens_per_rank=16384 * k,
                   params_bytes_per_rank=1e9, blocks=32, device=load_device("h100-sxm"), eff=Efficiency(),
                   settings=Settings(**settings))


def test_each_setting_moves_the_prediction_the_way_it_works():
    plain = _prediction()
    assert _prediction(compile=True).step_s < plain.step_s  # fused elementwise work
    assert _prediction(compile=True, float8=True).step_s < _prediction(compile=True).step_s
    hidden, shown = _prediction(compile=True, async_tp=True), _prediction(compile=True)
    assert hidden.parts["tp_exposed_per_micro_batch_s"] < shown.parts["tp_exposed_per_micro_batch_s"]
    assert hidden.step_s <= shown.step_s
    double = _prediction(accumulation=2)
    assert double.compute_s == pytest.approx(2 * plain.compute_s)
    # reduce-scatters once for twice the tokens
    assert double.tokens_per_s_per_gpu > plain.tokens_per_s_per_gpu
    assert plain.tokens_per_s_per_gpu == pytest.approx(16384 / 8 / plain.step_s)


def test_the_shipped_efficiency_model_says_what_it_was_fitted_on():
    eff, fitted = load_efficiency()
    assert fitted["fitted_on"], "efficiency.yaml: run benchmarks/tune_fit.py"
    for name in Efficiency.fields():
        assert 0 < getattr(eff, name) <= 4 or name == "async_tp_hidden"


# -- the search: memory equal to the simulator's at every micro-batch -----------------------------


@pytest.fixture(scope="module")
def searched():
    return search(tiny6(), gpus=4, device=load_device("h100-sxm"), eff=Efficiency(),
                  ac_modes=("none", "full"))


def test_every_candidates_memory_is_what_plan_reports_for_it(searched):
    """One candidate per micro-batch and accumulation of each mesh, simulated as `tpplan plan` does
    (the b = 4 one is carried along the line through b = 1 and b = 2, not simulated by the search)."""
    spec = tiny6()
    seen = set()
    for cand in searched.candidates:
        key = (cand.tp, cand.activation_checkpointing, cand.micro_batch)
        if cand.memory is None or key in seen:
            continue
        seen.add(key)
        variant = _variant(spec, cand.activation_checkpointing)
        variant = variant.model_copy(update={"train": variant.train.model_copy(
            update={"grad_accum_steps": cand.accumulation})})
        sim = simulate(variant, tp=cand.tp, dp=cand.dp, seq_length=SEQ, batch_size=cand.micro_batch)
        assert cand.memory == sim.data["memory"]["with_fsdp"], key
    assert {(2, "none", 4), (1, "full", 1), (2, "full", 1)} <= seen


def test_a_micro_batch_on_the_line_is_the_simulated_one():
    spec, h100 = tiny6(), load_device("h100-sxm")
    one, two, four = (simulate_shape(spec, tp=2, ep=1, dp=2, ac="none", batch=b, seq=SEQ, device=h100)
                      for b in (1, 2, 4))
    line = one.at(two, 4)
    assert line.work.flops == four.work.flops and line.work.forward_flops == four.work.forward_flops
    # the bytes of memory-bound ops (a time estimate, not the memory verdict) within 5%: at micro-batch 1
    # alone DTensor's sequence all-gather skips a copy (a cat), so the line through 1 and 2 counts its
    # bytes from micro-batch 3 on (here 3.3%: the model is tiny; Llama-3.1-8B: see the README)
    assert line.work.memory_bytes == pytest.approx(four.work.memory_bytes, rel=0.05)
    assert line.micro == four.micro and line.per_step == four.per_step
    assert line.activations == four.activations
    assert (candidate_memory(line, accumulation=1, device=h100)
            == candidate_memory(four, accumulation=1, device=h100))


def test_the_search_ranks_what_fits_and_says_why_the_rest_does_not(searched):
    assert searched.ranked and all(c.fits for c in searched.ranked)
    speeds = [c.prediction.tokens_per_s_per_gpu for c in searched.ranked]
    assert speeds == sorted(speeds, reverse=True)
    tp4 = [c for c in searched.candidates if c.tp == 4]
    assert tp4 and all("kv_heads(2)" in c.rejected for c in tp4)  # the plan's own resolve error
    assert "float8: train.precision is fp32 (float8 linears run inside bfloat16 training)" in searched.notes
    assert not any(c.settings.float8 or c.settings.async_tp for c in searched.candidates)  # mesh.device: cpu


def test_a_candidate_that_does_not_fit_stops_its_group():
    tiny = DeviceProfile(**{**load_device("h100-sxm").model_dump(), "name": "tiny", "memory_gib": 0.0005})
    result = search(tiny6(), gpus=2, device=tiny, eff=Efficiency(), ac_modes=("none",))
    assert not result.ranked
    reasons = {c.micro_batch: c.rejected for c in result.candidates if c.tp == 1}
    assert reasons[1].startswith("needs ") and "micro-batch 1 already needs" in reasons[4]
    assert result.shapes == 2  # tp=1 and tp=2 at micro-batch 1 only


# -- the spec written -----------------------------------------------------------------------------


def test_the_written_spec_extends_the_one_tuned_and_keeps_its_set_values(searched, tmp_path):
    from tpplan.tune import write

    base, spec = load_spec(SPECS / "tiny-llama.yaml"), tiny6()
    best = searched.ranked[0]
    values = write.tuned_values(base, spec, best, searched, name="tiny-tuned")
    assert values["model"] == {"config": {"num_hidden_layers": 6}}
    out = tmp_path / "sub" / "tuned.yaml"
    out.parent.mkdir()
    text = write.render(values, extends=write.extends_path(spec.source.path, str(out)), header=["a comment"])
    out.write_text(text)
    tuned = load_spec(out)
    assert text.startswith("# a comment\nextends: ../../")
    assert (tuned.mesh.tp, tuned.mesh.dp, tuned.train.batch_size, tuned.train.grad_accum_steps) == (
        best.tp, best.dp, best.micro_batch, best.accumulation)
    assert tuned.model.config == spec.model.config and tuned.plan == spec.plan
    assert math.prod([tuned.mesh.dp, tuned.mesh.tp]) == searched.gpus == tuned.launch.nproc_per_node


def test_a_long_accumulation_that_does_not_fit_does_not_stop_its_group():
    """Accumulation keeps every gradient unsharded between micro-batches; a larger micro-batch needs
    fewer of them.  With wide layers and short sequences (the gradients outweigh the activations),
    micro-batch 1 x 4 needs more than 4 x 1: the search must not stop at the first."""
    spec = tiny6("model.config.hidden_size=512", "model.config.intermediate_size=1024", "train.seq_length=16")
    roomy = search(spec, gpus=2, device=load_device("h100-sxm"), eff=Efficiency(), ac_modes=("none",))
    memory = {c.micro_batch: c.memory["total_bytes"] for c in roomy.candidates if c.tp == 1}
    assert memory[1] > memory[4]  # 1 x 4 over 4 x 1: the unsharded gradients
    between = (memory[1] + memory[4]) / 2 / 2**30
    tight = DeviceProfile(**{**load_device("h100-sxm").model_dump(), "name": "tight", "memory_gib": between})
    result = search(spec, gpus=2, device=tight, eff=Efficiency(), ac_modes=("none",))
    verdicts = {c.micro_batch: c.rejected for c in result.candidates if c.tp == 1}
    assert verdicts[1].startswith("needs ") and verdicts[4] is None
