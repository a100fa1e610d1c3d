"""The ``tpplan`` command: argument parsing only; the work is done by the library.

Exit codes: 0 ok; 1 a check or run that failed; 2 bad input (spec, CLI arguments, model that
cannot be loaded), always one clear message and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from . import __version__
from .errors import TpplanError

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are tpplan errors (exit 2, one message)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise TpplanError(message, hint=f"see `{self.prog} --help`")


def _cmd_validate(args) -> int:
    from .loader import load_spec

    status = EXIT_OK
    for path in args.specs:
        try:
            spec = load_spec(path, args.set)
        except TpplanError as exc:
            print(str(exc), file=sys.stderr)
            status = exc.exit_code
            continue
        rules = _count_rules(spec.plan)
        print(f"ok {path}: {spec.name}, {rules} plan rules, tp={spec.mesh.tp}, dp={spec.mesh.dp}")
    return status


def _count_rules(rules) -> int:
    return sum(1 + _count_rules(r.plan or []) for r in rules)


def _cmd_schema(args) -> int:
    from .spec import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        from .fileio import write_text_atomic

        write_text_atomic(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def _add_set(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a spec value, e.g. --set train.max_steps=10 (repeatable)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tpplan",
        description="Declarative tensor-parallel plans for PyTorch LLM training: validate a spec, prove it "
        "on CPU, size it at full scale, compile it to a torchrun script, and run it.",
    )
    parser.add_argument("--version", action="version", version=f"tpplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser("validate", help="load and validate spec files (no model needed)")
    p.add_argument("specs", nargs="+", metavar="SPEC")
    _add_set(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec (for editor completion)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=_cmd_schema)

    for register in _COMMANDS:
        register(sub)
    return parser


def _cmd_check(args) -> int:
    from .check import run_check
    from .loader import load_spec
    from .report import print_check

    spec = load_spec(args.spec, args.set)
    report = run_check(spec, tp=args.tp, dp=args.dp, timeout=args.timeout)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print_check(report)
    return EXIT_OK if report.ok else EXIT_FAILED


def _register_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="prove the plan on CPU: a shrunken twin, sharded over dp*tp gloo ranks, must equal the unsharded model",
    )
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the spec's mesh.tp)")
    p.add_argument("--dp", type=int, default=1, help="data-parallel size (FSDP2); dp*tp CPU ranks are started")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=float, default=600, help="seconds before the ranks are declared hung")
    _add_set(p)
    p.set_defaults(func=_cmd_check)


def _cmd_plan(args) -> int:
    from .loader import load_spec
    from .report import print_plan
    from .resolve import resolve_spec

    spec = load_spec(args.spec, args.set)
    plan = resolve_spec(spec, tp=args.tp, seq_length=args.seq_length)
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
    else:
        print_plan(plan, modules=args.modules)
    return EXIT_OK


def _register_plan(sub) -> None:
    p = sub.add_parser("plan", help="resolve the plan against the model (meta device, no weights) and show it")
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--tp", type=int, help="tensor-parallel size (default: the spec's mesh.tp)")
    p.add_argument("--seq-length", type=int, help="sequence length (default: the spec's train.seq_length)")
    p.add_argument("--resolve", action="store_true", help="show the resolved plan (the default for now)")
    p.add_argument("--modules", action="store_true", help="one row per module, with the torch style it gets")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_set(p)
    p.set_defaults(func=_cmd_plan)


# Each stage adds its subcommand here: a function taking the subparsers object.
_COMMANDS: list[Callable] = [_register_plan, _register_check]


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return EXIT_BAD_INPUT
        return int(args.func(args) or 0)
    except TpplanError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
