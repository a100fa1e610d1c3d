"""``train.precision``, written once: for each mode the dtypes, by name, of the parameters (what AdamW
updates and keeps its moments for), of compute and communication, and of gradient reduction, and what the
mode means in words; what ``auto`` means for each ``model.dtype``.

Imports nothing (no torch): the spec reads the names (``train.precision``'s choices), the training step
turns them into torch dtypes (``step.precision_dtypes``; train.py carries this table as
``PRECISION_DTYPES``), render prints the note into train.py's header, and the simulator and check read the
dtypes by name."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PrecisionMode:
    params: str  # the parameters and AdamW's state (float32 master weights in the mixed modes)
    compute: str  # forward, backward and the collectives of the step
    reduce: str  # gradient reduction (FSDP's reduce-scatter)
    note: str  # what the mode means, as train.py's header says it

    @property
    def dtypes(self) -> tuple[str, str, str]:
        return self.params, self.compute, self.reduce


PRECISIONS: dict[str, PrecisionMode] = {
    "fp32": PrecisionMode("float32", "float32", "float32", "float32 weights, gradients, AdamW state and compute"),
    "bf16-mixed": PrecisionMode("float32", "bfloat16", "float32",
                                "float32 master weights and AdamW state; bfloat16 compute and communication"),
    "fp16-mixed": PrecisionMode("float32", "float16", "float32",
                                "float32 master weights and AdamW state; float16 compute, dynamic loss scaling"),
    "bf16": PrecisionMode("bfloat16", "bfloat16", "bfloat16",
                          "pure bfloat16: weights, gradients and AdamW state in bfloat16"),
}
#: (parameter, compute, gradient-reduction) dtype names per mode: what train.py carries
PRECISION_DTYPES: dict[str, tuple[str, str, str]] = {name: mode.dtypes for name, mode in PRECISIONS.items()}
#: model.dtype -> the precision ``auto`` means: float32 trains in float32; the 16-bit dtypes train mixed
#: (float32 master weights and AdamW state, 16-bit compute)
AUTO_PRECISION = {"float32": "fp32", "bfloat16": "bf16-mixed", "float16": "fp16-mixed"}


def dtype_name(dtype) -> str:
    """A torch dtype by the name the spec and the tables use (``torch.bfloat16`` -> ``bfloat16``)."""
    return str(dtype).removeprefix("torch.")
