"""argparse value types and the options every command shares: the floor the CLI and the commands of
each tool (``tpplan tune``) parse their arguments with.  Every bad value is argparse's error, which
the CLI turns into a located message (exit 2)."""

from __future__ import annotations

import argparse
import math
import os

from tpplan.core.errors import short


def int_arg(low: int, high: int, what: str = "an integer"):
    """An argparse type: an integer from ``low`` to ``high`` (argparse names the flag in the error)."""

    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {short(text)}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} from {low:,} to {high:,}, got {value:,}")
        return value

    parse.__name__ = what  # argparse's fallback message says "invalid <name> value"
    return parse


def positive_float_arg(high: float, what: str = "a number"):
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {short(text)}") from None
        if not math.isfinite(value) or not 0 < value <= high:
            raise argparse.ArgumentTypeError(f"expected {what} above 0 and at most {high:,.0f}, got {short(text)}")
        return value

    parse.__name__ = what
    return parse


def count_arg(text: str) -> int:
    """An argparse type: a positive count, plain or with K/M/B/T (``3.5B`` = 3,500,000,000)."""
    units = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
    body = text.strip().upper()
    scale = units.get(body[-1:], 1)
    if scale > 1:
        body = body[:-1]
    try:
        value = float(body)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count such as 3.5B, 800M or 1200000, got {short(text)}") from None
    if not math.isfinite(value) or not 1 <= value * scale <= 10**15:
        raise argparse.ArgumentTypeError(f"expected a count from 1 to 1000T, got {short(text)}")
    return int(value * scale)


count_arg.__name__ = "a count"

MAX_TP = 2**16
MAX_DP = 2**20
TP_ARG = int_arg(1, MAX_TP, "a tensor-parallel size")
DP_ARG = int_arg(1, MAX_DP, "a data-parallel size")
EP_ARG = int_arg(1, MAX_TP, "an expert-parallel size")
SEQ_ARG = int_arg(1, 2**24, "a sequence length")
BATCH_ARG = int_arg(1, 2**20, "a batch size")


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def add_set_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set train.max_steps=10 (repeatable)",
    )


def add_trust_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-factory",
        action="store_true",
        help="import the Python code the spec names (model.factory, model.trust_remote_code): only for specs "
        "whose author you trust (or set TPPLAN_TRUST_FACTORY=1); see docs/trust.md",
    )
