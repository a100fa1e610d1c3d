"""A model's tiny twin run once on CPU, as import-hf's probe (how each module is called) and derive's trace
(the twin's dataflow) run it: the twin built from a shrunk config, and the one shape of input both feed it."""

from __future__ import annotations

TRACE_BATCH, TRACE_SEQ = 3, 11  # sizes unlike any head count, head_dim or width of a twin


def token_ids(vocab_size: int):
    """[TRACE_BATCH, TRACE_SEQ] token ids below ``vocab_size``, the same on every run (seed 0)."""
    import torch

    return torch.randint(0, vocab_size, (TRACE_BATCH, TRACE_SEQ), generator=torch.Generator().manual_seed(0))


def position_ids():
    """0..TRACE_SEQ-1 for every sequence: one row each (Qwen4-Exp reads its rotary tables by row)."""
    import torch

    return torch.arange(TRACE_SEQ).expand(TRACE_BATCH, -1)


def cpu_twin(config, tp: int, **shrink) -> tuple:
    """(the twin's config, the twin built from it: float32 on CPU, seeded) for ``config`` at ``tp``."""
    from tpplan.model.sources import build_model, shrink_config

    twin = shrink_config(config, tp, **shrink)
    return twin, build_model(twin, device="cpu", seed=0)
