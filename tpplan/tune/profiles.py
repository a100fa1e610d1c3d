"""Device profiles: what one GPU and its node offer (memory, peak FLOP/s, HBM, NVLink and network
bandwidth, collective latencies, the GPU features tpplan can use), as YAML data.

The shipped profiles live in ``tpplan/tune/devices/<name>.yaml``, every value with its source; a
user's own profile is the same YAML in any file (``--gpu my-gpu.yaml``), where ``sources`` may be
left out.  Errors in a profile are located like a spec's: ``file:line:col``, the key, what was
expected.
"""

from __future__ import annotations

import difflib
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tpplan.core.errors import Location, SpecError, SpecErrors, TpplanError, short

MAX_PROFILE_BYTES = 1 << 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Latency(_Strict):
    """NCCL's ring latency model: a collective of n ranks over m nodes waits ``base`` plus one step
    latency per ring step, ``nvlink_step`` inside a node and ``network_step`` across nodes."""

    base: float = Field(ge=0, description="fixed latency of one collective, microseconds")
    nvlink_step: float = Field(ge=0, description="latency of one ring step inside a node, microseconds")
    network_step: float = Field(ge=0, description="latency of one ring step across nodes, microseconds")


class DeviceProfile(_Strict):
    """One GPU, per GPU; FLOP/s dense (no 2:4 sparsity), link bandwidths one direction."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)
    description: str = ""
    memory_gib: float = Field(gt=0, le=2**20, description="device memory, GiB")
    bf16_tflops: float = Field(gt=0, description="peak dense bf16 tensor FLOP/s, in TFLOP/s")
    fp8_tflops: float | None = Field(None, gt=0, description="peak dense fp8 tensor FLOP/s (null: none)")
    hbm_tb_s: float = Field(gt=0, description="memory bandwidth, TB/s")
    nvlink_gb_s: float = Field(gt=0, description="GPU-to-GPU bandwidth inside a node, GB/s one direction")
    network_gb_s: float = Field(gt=0,
                                description="network bandwidth per GPU between nodes, GB/s one direction")
    gpus_per_node: int = Field(8, ge=1, le=1024)
    latency_us: Latency
    float8: bool = Field(False, description="tpplan's float8 linears (torchao) run on it")
    async_tp: bool = Field(False, description="tpplan's async tensor parallel (symmetric memory) runs on it")
    sources: dict[str, str] = Field(default_factory=dict, description="where each value comes from")

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * 2**30)

    def uncited(self) -> list[str]:
        """Values without a source (a shipped profile has none)."""
        return [k for k in type(self).model_fields if k not in ("name", "description", "sources")
                and k not in self.sources]


def shipped_dir() -> Path:
    return Path(str(resources.files("tpplan.tune.devices")))


def shipped_names() -> list[str]:
    return sorted(p.stem for p in shipped_dir().glob("*.yaml"))


def load_device(name_or_path: str) -> DeviceProfile:
    """A shipped profile by name (``h100-sxm``), or a profile file of the user's."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists() or "/" in name_or_path:
        return _load_file(path, name_or_path)
    if name_or_path in shipped_names():
        return _load_file(shipped_dir() / f"{name_or_path}.yaml", f"{name_or_path} (shipped)")
    close = [n for n in shipped_names() if n.startswith(name_or_path)] or difflib.get_close_matches(
        name_or_path, shipped_names(), n=1)
    raise TpplanError(
        f"--gpu {short(name_or_path)}: no such device profile",
        hint=(f"did you mean '{close[0]}'? " if close else "") + "profiles: " + ", ".join(shipped_names())
        + "; or a YAML file of your own (see tpplan/tune/devices/h100-sxm.yaml)",
    )


def _load_file(path: Path, display: str) -> DeviceProfile:
    from tpplan.core.fileio import read_input
    from tpplan.spec.yaml_reader import format_path, parse_yaml

    data = read_input(path, limit=MAX_PROFILE_BYTES, what="device profile", display=display)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("the file is not UTF-8 text", location=Location(display)) from None
    values, marks = parse_yaml(text, display)
    if not isinstance(values, dict):
        raise SpecError("a device profile is a mapping of keys (name, memory_gib, bf16_tflops, ...)",
                        location=Location(display))
    try:
        return DeviceProfile.model_validate(values)
    except ValidationError as exc:
        errors = []
        for err in exc.errors(include_url=False):
            loc = tuple(err.get("loc", ()))
            where = next((marks[loc[:n]][1] for n in range(len(loc), -1, -1) if loc[:n] in marks),
                         Location(display))
            hint = None
            if err.get("type") == "extra_forbidden":
                where = marks[loc][0] if loc in marks else where
                close = difflib.get_close_matches(str(loc[-1]), list(_fields_at(loc[:-1])), n=1)
                hint = f"did you mean '{close[0]}'?" if close else "keys: " + ", ".join(_fields_at(loc[:-1]))
            elif err.get("type") == "missing":
                where = next((marks[loc[:n]][1] for n in range(len(loc) - 1, -1, -1) if loc[:n] in marks),
                             Location(display))
            errors.append(SpecError(err.get("msg", "invalid value") + _given(err), location=where,
                                    path=format_path(loc), hint=hint))
        raise (errors[0] if len(errors) == 1 else SpecErrors(errors)) from None


def _fields_at(loc: tuple) -> list[str]:
    model = Latency if loc[:1] == ("latency_us",) else DeviceProfile
    return list(model.model_fields)


def _given(err: dict) -> str:
    return "" if err.get("type") == "missing" else f", got {short(err.get('input'))}"
