"""The search: every mesh and setting a spec's model allows on N GPUs, sized by the simulator and
timed by the cost model.

A candidate is a mesh (tp, ep, dp = N / (tp x ep)), an activation checkpointing mode, a micro-batch
(sequences per data-parallel rank) with the accumulation that reaches the global batch, and the
GPU settings (float8, torch.compile, async TP) the device and the spec allow.

What is simulated, and what is arithmetic.  Only the shape of a step matters to the simulator: the
mesh, the checkpointing mode and the micro-batch (float8, compile and async TP change neither the
memory nor the collectives it reports: it sizes them by arithmetic or not at all).  Each distinct
(tp, ep, checkpointing) is simulated at micro-batches 1 and 2 (accumulation 1), with a FLOP counter
alongside (``flops.StepCounter``).  Everything a micro-batch b adds is proportional to b (activations,
FLOPs, bytes, tensor-parallel collectives) and the rest does not depend on it (parameters, FSDP's
collectives and buffers), so each of those numbers at micro-batch b is exactly
``x(1) + (b - 1) x (x(2) - x(1))`` (tests compare it with ``tpplan plan`` at b = 4).  Accumulation
repeats the micro-batch's work and collectives k times, FSDP's reduce-scatters and the gradient norm
once per step, and adds the gradients FSDP keeps unsharded between micro-batches to the memory
(``simulate.rank_memory``, the function ``tpplan plan`` itself reports with).  A micro-batch-1 step
that does not fit even without accumulation stops its group: every larger micro-batch needs more
(more activations; accumulation only adds), so none is simulated.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction

from tpplan.core.errors import TpplanError
from tpplan.spec.schema import Spec, training_precision

from .cost import Efficiency, Mesh, Prediction, Settings, Traffic, predict
from .flops import StepCounter, StepWork
from .profiles import DeviceProfile

AC_MODES = ("none", "selective", "full")
GIB = 2**30


@dataclass
class Shape:
    """One simulated step (accumulation 1) and what the search reads from it."""

    tp: int
    ep: int
    dp: int
    activation_checkpointing: str
    batch: int
    work: StepWork
    micro: dict  # (mesh_dim, op) -> [count, ring_bytes], every micro-batch
    per_step: dict  # (mesh_dim, op) -> [count, ring_bytes], once per step
    float8_saved: float  # ring bytes float8 all-gathers save, per micro-batch
    activations: int
    params_without_fsdp: int
    params_with_fsdp: int
    fsdp_buffers: int
    bytes_per_param: int
    precision: str
    layers: int
    seconds: float

    def at(self, other: Shape | None, batch: int) -> Shape:
        """The step at micro-batch ``batch`` on the line through this shape and ``other`` (another
        micro-batch): exact, each number being affine in the micro-batch (module docstring)."""
        if other is None or batch == self.batch:
            return self
        t = Fraction(batch - self.batch, other.batch - self.batch)

        def line(a, b):
            value = a + t * (b - a)
            return int(value) if isinstance(a, int) and isinstance(b, int) else float(value)

        def lines(a: dict, b: dict) -> dict:
            return {k: line(a.get(k, 0.0), b.get(k, 0.0)) for k in set(a) | set(b)}

        work = StepWork(lines(self.work.flops, other.work.flops),
                        lines(self.work.forward_flops, other.work.forward_flops),
                        line(self.work.block_bytes, other.work.block_bytes),
                        line(self.work.other_bytes, other.work.other_bytes))
        cells = {}
        for name in ("micro", "per_step"):
            a, b = getattr(self, name), getattr(other, name)
            cells[name] = {k: [line(a.get(k, (0, 0))[i], b.get(k, (0, 0))[i]) for i in (0, 1)]
                           for k in set(a) | set(b)}
        return Shape(self.tp, self.ep, self.dp, self.activation_checkpointing, batch, work, cells["micro"],
                     cells["per_step"], line(self.float8_saved, other.float8_saved),
                     line(self.activations, other.activations), self.params_without_fsdp,
                     self.params_with_fsdp, self.fsdp_buffers, self.bytes_per_param, self.precision,
                     self.layers, 0.0)


@dataclass
class Candidate:
    tp: int
    ep: int
    dp: int
    activation_checkpointing: str
    micro_batch: int
    accumulation: int
    settings: Settings
    memory: dict | None = None  # simulate.rank_memory(...)["with_fsdp"]
    prediction: Prediction | None = None
    rejected: str | None = None

    @property
    def fits(self) -> bool:
        return self.rejected is None and self.memory is not None and self.memory["fits"]

    def label(self) -> str:
        parts = [f"tp{self.tp}", f"dp{self.dp}"] + ([f"ep{self.ep}"] if self.ep > 1 else [])
        return " ".join(parts)

    def to_dict(self) -> dict:
        return {
            "tp": self.tp, "dp": self.dp, "ep": self.ep,
            "activation_checkpointing": self.activation_checkpointing,
            "micro_batch": self.micro_batch, "grad_accum_steps": self.accumulation,
            "float8": self.settings.float8, "compile": self.settings.compile,
            "async_tp": self.settings.async_tp,
            "memory": self.memory, "prediction": self.prediction.to_dict() if self.prediction else None,
            "rejected": self.rejected,
        }


@dataclass
class TuneResult:
    spec: Spec
    device: DeviceProfile
    gpus: int
    gpus_per_node: int
    seq_length: int
    global_batch: int  # sequences per optimizer step
    precision: str = "bf16-mixed"  # the spec's train.precision (auto resolved)
    candidates: list[Candidate] = field(default_factory=list)
    shapes: int = 0  # distinct steps simulated
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def ranked(self) -> list[Candidate]:
        """The candidates that fit, fastest first; on a tie the simpler one (less recomputation, fewer
        GPU features), then the one needing less memory."""
        fitting = [c for c in self.candidates if c.fits and c.prediction is not None]
        return sorted(fitting, key=lambda c: (
            -c.prediction.tokens_per_s_per_gpu, AC_MODES.index(c.activation_checkpointing),
            c.settings.float8 + c.settings.compile + c.settings.async_tp, c.memory["total_bytes"]))

    @property
    def rejected(self) -> list[Candidate]:
        return [c for c in self.candidates if not c.fits]


def global_batch_sequences(spec: Spec, *, global_batch_tokens: int | None, seq_length: int) -> int:
    """Sequences per optimizer step: ``--global-batch-tokens`` / sequence length, else what the spec
    trains with (dp x batch_size x grad_accum_steps on its own mesh)."""
    if global_batch_tokens is not None:
        if global_batch_tokens % seq_length:
            raise TpplanError(f"--global-batch-tokens {global_batch_tokens:,} is not a multiple of the "
                              f"sequence length {seq_length:,}",
                              hint=f"use {max(1, global_batch_tokens // seq_length) * seq_length:,}")
        return global_batch_tokens // seq_length
    from tpplan.plan.mesh_sizes import dp_size, ep_size, tp_size

    tp = tp_size(spec)
    ep = ep_size(spec)
    return dp_size(spec, tp, ep=ep) * ep * spec.train.batch_size * spec.train.grad_accum_steps


def uses_expert_parallel(rules) -> bool:
    return any(getattr(r, "style", None) == "expert_parallel"
               or uses_expert_parallel(getattr(r, "plan", None) or []) for r in rules)


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def meshes(spec: Spec, gpus: int, gpus_per_node: int) -> list[tuple[int, int]]:
    """(tp, ep) pairs: tp within a node (a divisor of the GPUs per node that divides N: tensor-parallel
    collectives stay on NVLink), ep > 1 only for a plan with expert_parallel rules."""
    tps = [t for t in _divisors(gpus_per_node) if gpus % t == 0]
    eps = [1]
    if uses_expert_parallel([*spec.plan, *spec.plan_overrides]):
        eps = [e for e in _divisors(gpus) if e <= gpus_per_node]
    return [(t, e) for t in tps for e in eps if gpus % (t * e) == 0]


def _variant(spec: Spec, ac: str) -> Spec:
    """The spec with the shape's settings: checkpointing, one micro-batch per step; float8, compile and
    async TP off (the simulator sizes none of them)."""
    train = spec.train.model_copy(update={"activation_checkpointing": ac, "grad_accum_steps": 1,
                                          "float8": False, "compile": False})
    mesh = spec.mesh.model_copy(update={"async_tp": False})
    variant = spec.model_copy(update={"train": train, "mesh": mesh})
    variant._source = spec.source
    return variant


def simulate_shape(spec: Spec, *, tp: int, ep: int, dp: int, ac: str, batch: int, seq: int,
                   device: DeviceProfile) -> Shape:
    """One distinct step, simulated with the FLOP counter alongside."""
    from tpplan.simulate.simulator import simulate

    counter = StepCounter()
    started = time.perf_counter()
    sim = simulate(_variant(spec, ac), tp=tp, dp=dp, ep=ep, seq_length=seq, batch_size=batch,
                   device_memory_gib=device.memory_gib, observe=counter)
    d = sim.data
    memory = d["memory"]
    micro: dict = {}
    per_step: dict = {}
    for row in d["communication"]["summary"]:
        once = row["phase"] == "step" or (row["mesh_dim"] in ("dp", "dp_ep") and row["op"] != "all_gather")
        cell = (per_step if once else micro).setdefault((row["mesh_dim"], row["op"]), [0, 0])
        cell[0] += row["count"]
        cell[1] += row["ring_bytes"]
    return Shape(
        tp=tp, ep=ep, dp=dp, activation_checkpointing=ac, batch=batch, work=counter.work(sim), micro=micro,
        per_step=per_step, float8_saved=d["communication"]["float8"]["saved_ring_bytes"],
        activations=memory["activations"]["total_bytes"],
        params_without_fsdp=memory["parameters"]["per_rank_without_fsdp"],
        params_with_fsdp=memory["parameters"]["per_rank_with_fsdp"],
        fsdp_buffers=memory["with_fsdp"]["fsdp_buffers_bytes"], bytes_per_param=memory["bytes_per_param"],
        precision=d["precision"], layers=d["layers"], seconds=time.perf_counter() - started,
    )


def candidate_memory(shape: Shape, *, accumulation: int, device: DeviceProfile) -> dict:
    """The per-rank memory ``tpplan plan`` reports for the candidate (with FSDP): the simulator's
    own ``rank_memory`` on the shape's numbers."""
    from tpplan.simulate.arithmetic import rank_memory

    return rank_memory(params_without_fsdp=shape.params_without_fsdp, params_with_fsdp=shape.params_with_fsdp,
                       activations=shape.activations, fsdp_buffers=shape.fsdp_buffers,
                       precision=shape.precision, data_parallel=shape.dp * shape.ep,
                       grad_accum_steps=accumulation, device_bytes=device.memory_bytes)["with_fsdp"]


def _traffic(cells: dict, factor: float = 1.0) -> list[Traffic]:
    return [Traffic(dim, op, count * factor, ring * factor)
            for (dim, op), (count, ring) in sorted(cells.items())]


def settings_for(spec: Spec, device: DeviceProfile, tp: int, *, allow_compile: bool, allow_float8: bool,
                 allow_async: bool) -> tuple[list[Settings], list[str]]:
    """The GPU settings to try, and why the others are not tried."""
    notes = []
    float8 = [False]
    precision = training_precision(spec)
    if not allow_float8:
        pass
    elif not (device.float8 and device.fp8_tflops):
        notes.append(f"float8: {device.name} has no float8 path tpplan can use")
    elif precision not in ("bf16-mixed", "bf16"):
        notes.append(f"float8: train.precision is {precision} (float8 linears run inside bfloat16 training)")
    elif spec.mesh.device == "cpu":
        notes.append("float8: the spec's mesh.device is cpu")
    else:
        float8.append(True)
    compiled = [False, True] if allow_compile else [spec.train.compile]
    asyncs = [False]
    if allow_async and allow_compile and tp > 1 and device.async_tp and spec.mesh.device != "cpu":
        asyncs.append(True)
    out = []
    for f8 in float8:
        for comp in compiled:
            if f8 and not comp:
                continue  # torchao float8 is slow eager: tried compiled only
            for a in asyncs:
                if a and not comp:
                    continue  # async TP is an inductor pass
                out.append(Settings(float8=f8, compile=comp, async_tp=a))
    return out, notes


@dataclass(frozen=True)
class Group:
    """One (tp, ep, checkpointing) of the search: its micro-batches share two simulated steps."""

    tp: int
    ep: int
    dp: int
    activation_checkpointing: str
    per_rank: int  # sequences per data-parallel rank per optimizer step
    batches: tuple[int, ...]  # the micro-batches that divide it

    def label(self) -> str:
        return (f"tp={self.tp} dp={self.dp}" + (f" ep={self.ep}" if self.ep > 1 else "")
                + f" checkpointing {self.activation_checkpointing}")


def search(spec: Spec, *, gpus: int, device: DeviceProfile, eff: Efficiency, gpus_per_node: int | None = None,
           global_batch_tokens: int | None = None, seq_length: int | None = None, ac_modes=AC_MODES,
           allow_compile: bool = True, allow_float8: bool = True, allow_async: bool = True, jobs: int = 1,
           progress: Callable[[str], None] | None = None) -> TuneResult:
    """Every candidate for ``spec`` on ``gpus`` GPUs of ``device``, sized and timed; the distinct
    steps are simulated ``jobs`` at a time, each in a process forked from this one."""
    started = time.perf_counter()
    node = min(gpus_per_node or device.gpus_per_node, gpus)
    seq = seq_length or spec.train.seq_length
    sequences = global_batch_sequences(spec, global_batch_tokens=global_batch_tokens, seq_length=seq)
    result = TuneResult(spec=spec, device=device, gpus=gpus, gpus_per_node=node, seq_length=seq,
                        global_batch=sequences, precision=training_precision(spec))
    say = progress or (lambda text: None)
    groups: list[Group] = []
    options: dict[int, list[Settings]] = {}
    for tp, ep in meshes(spec, gpus, node):
        dp = gpus // (tp * ep)
        per_rank, remainder = divmod(sequences, dp * ep)
        options[tp], notes = settings_for(spec, device, tp, allow_compile=allow_compile,
                                          allow_float8=allow_float8, allow_async=allow_async)
        result.notes.extend(n for n in notes if n not in result.notes)
        for ac in ac_modes:
            if remainder or not per_rank:
                reason = (f"the global batch of {sequences:,} sequences does not split over {dp * ep:,} "
                          "data-parallel ranks")
                result.candidates.append(Candidate(tp, ep, dp, ac, 0, 0, Settings(), rejected=reason))
                continue
            groups.append(Group(tp, ep, dp, ac, per_rank, tuple(_divisors(per_rank))))
    measured = measure_groups(spec, groups, seq=seq, device=device, jobs=jobs, say=say)
    for group in groups:
        shapes, failed = measured[group]
        result.shapes += len(shapes)
        result.candidates.extend(group_candidates(group, shapes, failed, options=options[group.tp], seq=seq,
                                                  device=device, eff=eff, gpus_per_node=node))
    result.seconds = time.perf_counter() - started
    return result


def measure_group(spec: Spec, group: Group, *, seq: int,
                  device: DeviceProfile) -> tuple[dict[int, Shape], str | None]:
    """The group's steps at its two smallest micro-batches (one when only one divides, or when the
    first does not fit even with one micro-batch per step); or why it cannot be simulated."""
    shapes: dict[int, Shape] = {}
    for batch in group.batches[:2]:
        try:
            shapes[batch] = simulate_shape(spec, tp=group.tp, ep=group.ep, dp=group.dp,
                                           ac=group.activation_checkpointing, batch=batch, seq=seq,
                                           device=device)
        except TpplanError as exc:
            return shapes, exc.message
        if not candidate_memory(shapes[batch], accumulation=1, device=device)["fits"]:
            break  # even without accumulation's unsharded gradients: every larger micro-batch needs more
    return shapes, None


_FORKED: dict = {}  # what the forked workers of measure_groups read (inherited, not pickled)


def _measure_forked(group: Group):
    return group, measure_group(_FORKED["spec"], group, seq=_FORKED["seq"], device=_FORKED["device"])


def _quiet_worker() -> None:
    """A worker leaves Ctrl-C to the parent (which stops the pool) and ends with the parent, however
    the parent ends (Linux: the parent-death signal)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # the parent's handler (core.processes: SIGTERM raises Interrupted) is inherited by fork: a worker the
    # pool terminates must just end, without a traceback of its own
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the pool's own shutdown still ends it
        pass
    if os.getppid() != _FORKED.get("parent"):  # the parent ended before the signal was set
        os._exit(1)


def measure_groups(spec: Spec, groups: list[Group], *, seq: int, device: DeviceProfile, jobs: int,
                   say: Callable[[str], None]) -> dict:
    """``measure_group`` for every group, ``jobs`` forked workers at a time (the pool ends with this
    call, on an error or Ctrl-C too)."""
    out = {}
    if jobs <= 1 or len(groups) <= 1:
        for n, group in enumerate(groups, 1):
            say(f"[{n}/{len(groups)}] simulating {group.label()}")
            out[group] = measure_group(spec, group, seq=seq, device=device)
        return out
    import multiprocessing

    from tpplan.simulate import simulator as simulate  # noqa: F401 - imported once, before forking: every worker inherits it

    _FORKED.update(spec=spec, seq=seq, device=device, parent=os.getpid())
    try:
        pool = multiprocessing.get_context("fork").Pool(min(jobs, len(groups)), initializer=_quiet_worker)
        with pool:
            for n, (group, measured) in enumerate(pool.imap_unordered(_measure_forked, groups), 1):
                say(f"[{n}/{len(groups)}] simulated {group.label()}")
                out[group] = measured
    finally:
        _FORKED.clear()
    return out


def group_candidates(group: Group, shapes: dict[int, Shape], failed: str | None, *, options: list[Settings],
                     seq: int, device: DeviceProfile, eff: Efficiency, gpus_per_node: int) -> list[Candidate]:
    """Every micro-batch of the group, with every setting: its memory (exact) and predicted step."""
    tp, ep, dp, ac = group.tp, group.ep, group.dp, group.activation_checkpointing
    out = []
    for batch in group.batches:
        k = group.per_rank // batch
        if failed is not None:
            out.append(Candidate(tp, ep, dp, ac, batch, k, Settings(), rejected=failed))
            continue
        base = shapes[min(shapes)]
        if batch not in shapes and len(shapes) < 2:
            needed = candidate_memory(base, accumulation=1, device=device)["total_bytes"]
            out.append(Candidate(tp, ep, dp, ac, batch, k, Settings(), rejected=(
                f"micro-batch {base.batch} already needs {needed / GIB:.1f} GiB of {device.memory_gib:g} "
                "without accumulation")))
            continue
        others = [s for b, s in shapes.items() if b != base.batch]
        shape = base.at(others[0] if others else None, batch)
        memory = candidate_memory(shape, accumulation=k, device=device)
        for settings in options:
            cand = Candidate(tp, ep, dp, ac, batch, k, settings, memory=memory)
            if not memory["fits"]:
                cand.rejected = (f"needs {memory['total_bytes'] / GIB:.1f} GiB per GPU, the device has "
                                 f"{device.memory_gib:g}")
            cand.prediction = predict(
                work=shape.work, micro=_traffic(shape.micro), per_step=_traffic(shape.per_step),
                float8_saved_ring_bytes=shape.float8_saved, mesh=Mesh(dp, ep, tp, gpus_per_node),
                accumulation=k, tokens_per_rank=batch * k * seq,
                params_bytes_per_rank=shape.params_with_fsdp * shape.bytes_per_param, blocks=shape.layers,
                device=device, eff=eff, settings=settings)
            out.append(cand)
    return out
