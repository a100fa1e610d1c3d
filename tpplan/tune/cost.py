"""The cost model: a step's predicted time from its counted work, its collectives and a device profile.

Per micro-batch, one rank computes for

    matmul FLOPs / (bf16 peak x e_matmul) + float8 matmul FLOPs / (fp8 peak x e_float8)
    + attention FLOPs / (bf16 peak x e_attention)
    + memory-bound bytes in the blocks / (HBM x e_memory)
    + the other memory-bound bytes / (HBM x e_memory_eager)

(``e_memory`` is ``memory_compiled`` under torch.compile, which compiles each block and fuses its
elementwise ops, else ``memory_eager``; the loss, the embedding and FSDP's copies run eager either
way; without float8 the float8-eligible matmuls run in bf16).  Each collective takes NCCL's ring time
over the link it crosses: the group's ranks inside one node talk over NVLink, a group spanning nodes
is limited by each GPU's network share:

    latency = base + (ring steps inside nodes) x nvlink_step + (ring steps across nodes) x network_step
    time    = latency + ring bytes / (link bandwidth x e_comm_nvlink or e_comm_network)

Overlap: tensor- and expert-parallel collectives sit on the critical path (exposed), except the
share ``async_tp_hidden`` of the tensor-parallel ones that async TP overlaps with its matmuls; FSDP's
all-gathers (every micro-batch) and reduce-scatters (once per step) run beside the compute and are
exposed only where they outlast it, plus one FSDP unit's worth that nothing can hide (the first
all-gather and the last reduce-scatter).  The update moves 10 x the local parameter bytes once per
step: gradient clipping reads every gradient twice (its norm, then the scaling) and writes it once;
AdamW reads parameter, gradient and two moments and writes three.

The ``e_*`` numbers are the efficiency model's parameters, fitted on published runs
(``benchmarks/tune_fit.py``, stored in ``efficiency.yaml`` next to this file).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from .flops import ATTENTION, MATMUL, MATMUL_F8, StepWork
from .profiles import DeviceProfile

OPTIMIZER_BYTES_PER_PARAM_BYTE = 3 + 7  # clipping: read twice, write; AdamW: read 4 tensors, write 3


@dataclass(frozen=True)
class Efficiency:
    """Fractions of a device's peak each kind of work reaches (see the module docstring)."""

    matmul: float = 0.6
    matmul_float8: float = 0.45
    attention: float = 0.4
    memory_eager: float = 0.5
    memory_compiled: float = 1.0
    comm_nvlink: float = 0.8
    comm_network: float = 0.8
    async_tp_hidden: float = 0.5

    @classmethod
    def fields(cls) -> list[str]:
        return list(cls.__dataclass_fields__)


def efficiency_path() -> Path:
    return Path(str(resources.files("tpplan.tune"))) / "efficiency.yaml"


def load_efficiency() -> tuple[Efficiency, dict]:
    """The fitted parameters shipped with tpplan, and what they were fitted on."""
    path = efficiency_path()
    if not path.is_file():
        return Efficiency(), {"fitted_on": [], "note": "defaults: efficiency.yaml not found"}
    data = yaml.safe_load(path.read_text()) or {}
    return Efficiency(**data.get("parameters", {})), {k: v for k, v in data.items() if k != "parameters"}


@dataclass(frozen=True)
class Settings:
    """What a candidate runs with, besides its mesh."""

    float8: bool = False
    compile: bool = False
    async_tp: bool = False


@dataclass(frozen=True)
class Mesh:
    """Sizes of the (dp, ep, tp) mesh, tp innermost (consecutive ranks), as tpplan builds it."""

    dp: int
    ep: int
    tp: int
    gpus_per_node: int

    @property
    def world(self) -> int:
        return self.dp * self.ep * self.tp

    def group(self, mesh_dim: str) -> tuple[int, int]:
        """(ranks, nodes spanned) of the group of rank 0 along ``mesh_dim``."""
        stride, size = {"tp": (1, self.tp), "ep": (self.tp, self.ep), "dp": (self.tp * self.ep, self.dp),
                        "dp_ep": (self.tp, self.dp * self.ep)}.get(mesh_dim, (1, 1))
        nodes = len({(i * stride) // self.gpus_per_node for i in range(size)})
        return size, nodes


@dataclass
class Traffic:
    """Collectives of one kind: how many, and the ring bytes each rank sends in all."""

    mesh_dim: str
    op: str
    count: float
    ring_bytes: float


@dataclass
class Prediction:
    step_s: float
    tokens_per_s_per_gpu: float
    mfu: float
    compute_s: float  # per step: every micro-batch's compute
    exposed_comm_s: float  # per step: communication on the critical path
    tp_comm_s: float  # per step, before overlap
    dp_comm_s: float  # per step, before overlap
    optimizer_s: float
    parts: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def collective_seconds(traffic: list[Traffic], mesh: Mesh, device: DeviceProfile, eff: Efficiency) -> float:
    """NCCL's ring model for each kind of collective (see the module docstring)."""
    total = 0.0
    lat = device.latency_us
    for t in traffic:
        ranks, nodes = mesh.group(t.mesh_dim)
        if ranks <= 1 or t.count <= 0:
            continue
        steps, inter = (2 * (ranks - 1), 2 * (nodes - 1)) if t.op == "all_reduce" else (ranks - 1, nodes - 1)
        latency_s = (lat.base + (steps - inter) * lat.nvlink_step + inter * lat.network_step) * 1e-6
        link = device.nvlink_gb_s * eff.comm_nvlink if nodes == 1 else device.network_gb_s * eff.comm_network
        bandwidth = link * 1e9
        total += t.count * latency_s + t.ring_bytes / bandwidth
    return total


def compute_seconds(work: StepWork, device: DeviceProfile, eff: Efficiency, settings: Settings) -> float:
    """One micro-batch's compute on one rank (see the module docstring)."""
    peak = device.bf16_tflops * 1e12
    float8 = settings.float8 and device.fp8_tflops is not None
    seconds = work.flops.get(MATMUL, 0.0) / (peak * eff.matmul)
    f8 = work.flops.get(MATMUL_F8, 0.0)
    seconds += f8 / (device.fp8_tflops * 1e12 * eff.matmul_float8) if float8 else f8 / (peak * eff.matmul)
    seconds += work.flops.get(ATTENTION, 0.0) / (peak * eff.attention)
    hbm = device.hbm_tb_s * 1e12
    seconds += work.block_bytes / (hbm * (eff.memory_compiled if settings.compile else eff.memory_eager))
    seconds += work.other_bytes / (hbm * eff.memory_eager)
    return seconds


def predict(*, work: StepWork, micro: list[Traffic], per_step: list[Traffic], float8_saved_ring_bytes: float,
            mesh: Mesh, accumulation: int, tokens_per_rank: float, params_bytes_per_rank: float,
            blocks: int, device: DeviceProfile, eff: Efficiency, settings: Settings) -> Prediction:
    """The predicted step of a candidate.  ``work``, ``micro``: one micro-batch's work and collectives
    (FSDP all-gathers, tp and ep collectives); ``per_step``: collectives once per step (FSDP
    reduce-scatters, the gradient norm); ``tokens_per_rank``: tokens one data-parallel rank trains on
    per step (micro-batch x accumulation x sequence)."""
    k = accumulation
    compute = compute_seconds(work, device, eff, settings)
    tp_like = [t for t in micro if t.mesh_dim in ("tp", "ep")]
    tp_raw = collective_seconds(tp_like, mesh, device, eff)
    tp_hidden = eff.async_tp_hidden if settings.async_tp else 0.0
    tp_exposed = sum(collective_seconds([t], mesh, device, eff) * (1 - tp_hidden if t.mesh_dim == "tp" else 1)
                     for t in tp_like)
    gathers = [t for t in micro if t.mesh_dim in ("dp", "dp_ep")]
    if settings.float8 and device.fp8_tflops is not None and float8_saved_ring_bytes:
        total_gather = sum(t.ring_bytes for t in gathers if t.op == "all_gather") or 1.0
        gathers = [Traffic(t.mesh_dim, t.op, t.count,
                           t.ring_bytes * (1 - float8_saved_ring_bytes / total_gather) if t.op == "all_gather"
                           else t.ring_bytes) for t in gathers]
    dp_step = collective_seconds([t for t in per_step if t.mesh_dim in ("dp", "dp_ep")], mesh, device, eff)
    dp_total = k * collective_seconds(gathers, mesh, device, eff) + dp_step
    other_step = collective_seconds([t for t in per_step if t.mesh_dim not in ("dp", "dp_ep")], mesh, device,
                                    eff)
    busy = k * (compute + tp_exposed)
    dp_exposed = max(0.0, dp_total - busy) + dp_total / max(1, blocks + 1)
    optimizer = (params_bytes_per_rank * OPTIMIZER_BYTES_PER_PARAM_BYTE
                 / (device.hbm_tb_s * 1e12 * eff.memory_eager))
    step = busy + dp_exposed + other_step + optimizer
    model_flops = k * work.model_flops
    return Prediction(
        step_s=step,
        tokens_per_s_per_gpu=tokens_per_rank / mesh.tp / step if step > 0 else math.inf,
        mfu=model_flops / (step * device.bf16_tflops * 1e12) if step > 0 else 0.0,
        compute_s=k * compute,
        exposed_comm_s=k * tp_exposed + dp_exposed + other_step,
        tp_comm_s=k * tp_raw,
        dp_comm_s=dp_total,
        optimizer_s=optimizer,
        parts={"compute_per_micro_batch_s": compute, "tp_exposed_per_micro_batch_s": tp_exposed,
               "dp_exposed_s": dp_exposed, "step_collectives_s": other_step},
    )
