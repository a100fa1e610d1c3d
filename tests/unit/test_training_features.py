"""The training step's settings without a process group: precision dtypes, which blocks are
checkpointed, the fp16 loss scaler, the spec's checks, and what `tpplan plan` counts for them
(float32 masters, checkpointed activations, accumulated gradients, float8 all-gathers)."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import SPECS
from tpplan.core.errors import SpecError, SpecErrors
from tpplan.runtime.step import LossScaler, checkpointed_blocks, precision_dtypes
from tpplan.simulate.arithmetic import activation_formula_bytes, fsdp_buffer_bytes, memory_budget
from tpplan.simulate.simulator import simulate
from tpplan.spec.loader import load_spec
from tpplan.spec.schema import training_precision

TINY = SPECS / "tiny-llama.yaml"


def test_precisions_keep_float32_masters_unless_pure():
    f32, bf16, f16 = torch.float32, torch.bfloat16, torch.float16
    assert precision_dtypes("fp32") == (f32, f32, f32)
    assert precision_dtypes("bf16-mixed") == (f32, bf16, f32)
    assert precision_dtypes("fp16-mixed") == (f32, f16, f32)
    assert precision_dtypes("bf16") == (bf16, bf16, bf16)


def test_auto_precision_follows_the_model_dtype():
    assert training_precision(load_spec(TINY)) == "fp32"  # float32 model
    assert training_precision(load_spec(SPECS / "llama3.yaml")) == "bf16-mixed"
    assert training_precision(load_spec(TINY, ["model.dtype=bfloat16"])) == "bf16-mixed"
    assert training_precision(load_spec(TINY, ["model.dtype=float16"])) == "fp16-mixed"
    assert training_precision(load_spec(TINY, ["model.dtype=bfloat16", "train.precision=bf16"])) == "bf16"


@pytest.mark.parametrize(
    ("mode", "count", "expected"),
    [("none", 4, []), ("full", 4, [0, 1, 2, 3]), ("selective", 3, [0, 1, 2]), (1, 3, [0, 1, 2]),
     (2, 5, [1, 3]), (3, 7, [2, 5]), (4, 3, [])],
)
def test_checkpointed_blocks(mode, count, expected):
    assert checkpointed_blocks(count, mode) == expected


def test_loss_scaler_skips_overflowed_steps_and_grows_after_good_ones():
    scaler = LossScaler(scale=1024.0, growth_interval=2)
    assert scaler.update(torch.tensor(float("inf"))) is False and scaler.scale == 512.0
    assert scaler.update(torch.tensor(float("nan"))) is False and scaler.scale == 256.0
    assert scaler.update(torch.tensor(1.0)) is True and scaler.scale == 256.0
    assert scaler.update(torch.tensor(1.0)) is True and scaler.scale == 512.0
    param = torch.nn.Parameter(torch.ones(3))
    param.grad = torch.full((3,), 512.0)
    scaler.unscale_([param])
    assert param.grad.tolist() == [1.0, 1.0, 1.0]
    restored = LossScaler()
    restored.load_state_dict(scaler.state_dict())
    assert (restored.scale, restored.good_steps) == (512.0, 2)


@pytest.mark.parametrize(
    ("sets", "path", "message"),
    [
        (["train.float8=true"], "train.float8", "a GPU feature (NVIDIA, compute capability 8.9+), but mesh.device is cpu"),
        (["mesh.device=cuda", "train.float8=true"], "train.float8", "train.precision must be bf16-mixed or bf16, not fp32"),
        (["mesh.device=cuda", "mesh.async_tp=true"], "mesh.async_tp", "it needs train.compile: true"),
        (["mesh.device=cuda", "mesh.tp=1", "train.compile=true", "mesh.async_tp=true"], "mesh.async_tp", "mesh.tp is 1"),
        (["train.activation_checkpointing=0"], "train.activation_checkpointing", "a positive integer N"),
        (["train.activation_checkpointing=some"], "train.activation_checkpointing", "none, full, selective"),
        (["train.grad_accum_steps=0"], "train.grad_accum_steps", "positive integer"),
    ],
)
def test_features_that_cannot_run_are_refused_at_their_key(sets, path, message):
    with pytest.raises((SpecError, SpecErrors)) as info:
        load_spec(TINY, sets)
    text = str(info.value)
    assert f"{path}:" in text and message in text, text


def test_gpu_features_validate_on_a_cuda_spec():
    spec = load_spec(SPECS / "llama3.yaml", ["train.float8=true", "train.compile=true", "mesh.async_tp=true"])
    assert spec.train.float8 and spec.mesh.async_tp


# -- what plan counts ----------------------------------------------------------------------------


def test_memory_budget_adds_accumulated_gradients():
    m = memory_budget(params=10, bytes_per_param=4, activations=5, buffers=7, accumulated_gradients=11,
                      device_bytes=10**6)
    assert (m["optimizer_bytes"], m["accumulated_gradients_bytes"]) == (80, 11)
    assert m["total_bytes"] == 40 + 40 + 80 + 5 + 7 + 11


def test_fsdp_buffers_are_compute_dtype_copies_plus_a_reduce_dtype_gradient():
    # root unsharded + 2 blocks gathered + 1 block of unsharded gradients, bf16; + its fp32 copy
    assert fsdp_buffer_bytes(root_numel=100, block_numel=10, compute_bytes=2, reduce_bytes=4) == 130 * 2 + 40
    assert fsdp_buffer_bytes(root_numel=100, block_numel=10, compute_bytes=4, reduce_bytes=4) == 130 * 4


def test_activation_formula_with_checkpointed_blocks_keeps_their_inputs():
    kw = dict(seq=1024, batch=1, hidden=4096, vocab=1000, layers=4, tp=8, dtype_bytes=2, sequence_parallel=True,
              loss_parallel=True)
    plain = activation_formula_bytes(**kw)
    full = activation_formula_bytes(**kw, checkpointed=4)
    assert full["checkpointed_layer_bytes"] == 1024 * 4096 * 2 // 8
    assert full["total_bytes"] == 4 * full["checkpointed_layer_bytes"] + full["logits_bytes"]
    assert plain["total_bytes"] - full["total_bytes"] == 4 * (plain["per_layer_bytes"] - full["checkpointed_layer_bytes"])


@pytest.fixture(scope="module")
def simulations():
    kw = dict(tp=2, dp=2, seq_length=32, batch_size=2)
    run = {}
    for key, sets in {
        "fp32": [],
        "mixed": ["train.precision=bf16-mixed"],
        "mixed-accum": ["train.precision=bf16-mixed", "train.grad_accum_steps=2"],
        "full": ["train.activation_checkpointing=full"],
    }.items():
        run[key] = simulate(load_spec(TINY, sets), **kw).data
    return run


def test_mixed_precision_counts_float32_masters_and_bfloat16_activations(simulations):
    fp32, mixed = simulations["fp32"]["memory"], simulations["mixed"]["memory"]
    assert (mixed["param_dtype"], mixed["compute_dtype"], mixed["reduce_dtype"]) == ("float32", "bfloat16", "float32")
    assert mixed["bytes_per_param"] == 4
    for key in ("parameters_bytes", "gradients_bytes", "optimizer_bytes"):  # float32 masters and AdamW state
        assert mixed["with_fsdp"][key] == fp32["with_fsdp"][key]
    assert mixed["activations"]["total_bytes"] < 0.75 * fp32["activations"]["total_bytes"]  # 16-bit activations
    assert mixed["with_fsdp"]["fsdp_buffers_bytes"] < fp32["with_fsdp"]["fsdp_buffers_bytes"]  # bf16 copies
    # tp only, mixed: FSDP2 still casts the masters (a dp mesh of one), so its buffers count there too
    assert mixed["without_fsdp"]["fsdp_buffers_bytes"] > 0 == fp32["without_fsdp"]["fsdp_buffers_bytes"]
    # 16-bit collectives: the same collectives, half the bytes of the tp all-gathers and reduce-scatters
    f32_tp = simulations["fp32"]["communication"]["total"]["tp_ring_bytes"]
    assert simulations["mixed"]["communication"]["total"]["tp_ring_bytes"] < 0.6 * f32_tp


def test_accumulation_keeps_unsharded_float32_gradients_and_syncs_once(simulations):
    one, two = simulations["mixed"], simulations["mixed-accum"]
    params = two["memory"]["parameters"]["per_rank_without_fsdp"]
    assert two["memory"]["with_fsdp"]["accumulated_gradients_bytes"] == params * 4
    assert one["memory"]["with_fsdp"]["accumulated_gradients_bytes"] == 0

    def count(data, phase, dim, op):
        return sum(r["count"] for r in data["communication"]["summary"]
                   if (r["phase"], r["mesh_dim"], r["op"]) == (phase, dim, op))

    assert count(two, "forward", "tp", "all_gather") == 2 * count(one, "forward", "tp", "all_gather")
    assert count(two, "backward", "dp", "reduce_scatter") == count(one, "backward", "dp", "reduce_scatter")
    assert count(two, "forward", "dp", "all_gather") == 2 * count(one, "forward", "dp", "all_gather")


def test_full_checkpointing_leaves_block_inputs_and_recomputes_the_forward(simulations):
    plain, full = simulations["fp32"], simulations["full"]
    a = full["memory"]["activations"]
    assert a["per_layer_kind_bytes"] == {"checkpointed": 2 * 32 // 2 * 64 * 4}  # the sequence-sharded input
    assert a["total_bytes"] < plain["memory"]["activations"]["total_bytes"] / 2
    # backward runs each block's forward again: its tp collectives are sent again
    assert full["communication"]["total"]["tp_ring_bytes"] > plain["communication"]["total"]["tp_ring_bytes"]


def test_every_nth_block_extrapolates_like_simulating_all_blocks():
    spec = load_spec(TINY, ["model.config.num_hidden_layers=8", "train.activation_checkpointing=2"])
    kw = dict(tp=2, dp=1, seq_length=16, batch_size=1)
    fast, whole = simulate(spec, **kw).data, simulate(spec, all_layers=True, **kw).data
    assert (fast["simulated_layers"], whole["simulated_layers"]) == (5, 8)
    assert fast["memory"]["activations"]["total_bytes"] == whole["memory"]["activations"]["total_bytes"]
    assert fast["communication"]["total"] == whole["communication"]["total"]
    kinds = {k["kind"]: k["layers"] for k in fast["communication"]["layer_kinds"]}
    assert kinds == {"plain": 4, "checkpointed": 4}


def test_float8_all_gathers_halve_the_blocks_linear_weights(simulations):
    f8 = simulations["mixed"]["communication"]["float8"]
    gathered = f8["block_all_gather_ring_bytes"]
    assert gathered == simulations["mixed"]["communication"]["total"]["block_dp_all_gather_ring_bytes"] > 0
    assert 0.9 < f8["eligible_fraction"] < 1  # every Linear of a block; the norms stay bf16
    assert f8["saved_ring_bytes"] == pytest.approx(gathered * f8["eligible_fraction"] / 2, abs=2)


# -- GPU features where they cannot run --------------------------------------------------------


def test_float8_and_async_tp_are_refused_off_hopper_with_what_they_need(monkeypatch):
    from tpplan.runtime.step import require_gpu_features

    require_gpu_features(torch.device("cpu"), False, False)  # nothing asked: nothing refused
    with pytest.raises(SystemExit, match=r"^train.float8 and mesh.async_tp need NVIDIA GPUs; this run is on cpu$"):
        require_gpu_features(torch.device("cpu"), True, True)
    # an A100 (8.0) runs neither; an L40S (8.9) runs float8 but not async TP; an H100 (9.0) both
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "GPU")
    for capability, float8_ok, async_ok in (((8, 0), False, False), ((8, 9), True, False), ((9, 0), True, True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None, c=capability: c)
        for float8, async_tp, ok, needs in ((True, False, float8_ok, "train.float8 needs compute capability 8.9+"),
                                            (False, True, async_ok, "mesh.async_tp needs compute capability 9.0+")):
            if ok:
                require_gpu_features(torch.device("cuda"), float8, async_tp)
            else:
                with pytest.raises(SystemExit, match=needs):
                    require_gpu_features(torch.device("cuda"), float8, async_tp)


def test_checks_adamw_keeps_rounding_near_eps_as_small_as_it_is_and_a_doubled_gradient_visible():
    """Why check steps with its own AdamW (eps 0.1, lr 1e-2) instead of the spec's: at eps 1e-6 the first
    update is ~lr x g/|g|, so a gradient entry near eps magnifies a 1e-9 rounding difference ~250x (Gemma 3n
    and Gemma 4 failed on it); at check's eps the update is ~lr x g/eps, linear in the gradient, so rounding
    stays rounding while a gradient twice too large still moves the weight twice as far."""
    from tpplan.prove.verdict import OPTIMIZER

    def update(grad: float, **hyper) -> float:
        weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
        optimizer = torch.optim.AdamW([weight], **hyper)
        weight.grad = torch.tensor([grad], dtype=torch.float64)
        optimizer.step()
        return weight.item()

    spec_like = {"lr": 1e-3, "eps": 1e-6, "weight_decay": 0.1}
    assert abs(update(1e-6, **spec_like) - update(1e-6 + 1e-9, **spec_like)) > 2e-7  # ~250x the difference
    checks = {k: v for k, v in OPTIMIZER.items()}
    assert abs(update(1e-6, **checks) - update(1e-6 + 1e-9, **checks)) < 2e-10  # no larger than it was
    assert update(2e-6, **checks) == pytest.approx(2 * update(1e-6, **checks), rel=1e-3)  # still visible


def test_one_precision_record_feeds_the_spec_the_step_the_script_and_the_header():
    """train.precision is written once (tpplan/runtime/precision.py): the spec's choices, the step's torch
    dtypes, the table train.py carries and the note in its header all come from it."""
    import typing

    from tpplan.render.printed import precision_table
    from tpplan.runtime.precision import PRECISIONS, dtype_name
    from tpplan.runtime.step import precision_dtypes
    from tpplan.spec.train_spec import Precision

    assert typing.get_args(Precision) == ("auto", *PRECISIONS)
    printed: dict = {}
    exec(precision_table(), printed)  # the table as train.py has it
    for name, mode in PRECISIONS.items():
        assert tuple(map(dtype_name, precision_dtypes(name))) == mode.dtypes == printed["PRECISION_DTYPES"][name]
