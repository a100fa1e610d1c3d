"""``tpplan tune``: argument parsing and output; the work is ``tpplan.tune.tune``."""

from __future__ import annotations

import json
import shlex
import sys

from tpplan.core.errors import TpplanError

MAX_GPUS = 2**20


def register(sub) -> None:
    from tpplan.core.arguments import (
        SEQ_ARG,
        add_set_option,
        add_trust_option,
        count_arg,
        int_arg,
        positive_float_arg,
    )

    p = sub.add_parser(
        "tune",
        help="the best mesh and settings for N GPUs: every candidate sized by the simulator and timed by a "
        "cost model; the fastest written as a spec that extends this one, proven by check first",
        description="Enumerate the meshes (tp, dp, ep) and settings (activation checkpointing "
        "none/selective/full, float8 and async TP where the device has them, torch.compile, micro-batch and "
        "accumulation for the global batch) the spec's model allows on N GPUs; size each with the simulator "
        "(the memory `tpplan plan` reports) and time it from the step's FLOPs, counted op by op, and its "
        "collectives over NVLink and the network (device profiles: h100-sxm, h200, b200, a100-80gb, mi300x, "
        "or a YAML file). Prints the ranked candidates and why the others were rejected; with -o, proves the "
        "fastest with `tpplan check` at a small scale and writes it (never a spec check has not proven).",
    )
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--gpus", type=int_arg(1, MAX_GPUS, "a number of GPUs"), required=True, metavar="N",
                   help="GPUs in the job")
    p.add_argument("--gpu", default="h100-sxm", metavar="NAME|FILE",
                   help="device profile: h100-sxm (default), h200, b200, a100-80gb, mi300x, or a YAML file "
                   "of your own")
    p.add_argument("--nodes-of", type=int_arg(1, 1024, "a number of GPUs per node"), metavar="G",
                   help="GPUs per node (default: the profile's, 8)")
    p.add_argument("--global-batch-tokens", type=count_arg, metavar="T",
                   help="tokens per optimizer step, e.g. 4M (default: what the spec trains with: "
                   "dp x batch_size x grad_accum_steps x seq_length)")
    p.add_argument("--seq-length", type=SEQ_ARG, metavar="S", help="sequence length (default: the spec's)")
    p.add_argument("--activation-checkpointing", metavar="MODES", default="none,selective,full",
                   help="the modes to try, comma-separated (default: none,selective,full)")
    p.add_argument("--no-compile", action="store_true",
                   help="do not try torch.compile (nor float8 and async TP, which tune tries compiled only)")
    p.add_argument("--no-float8", action="store_true", help="do not try float8 linears")
    p.add_argument("--no-async-tp", action="store_true", help="do not try async tensor parallel")
    p.add_argument("--top", type=int_arg(1, 10_000, "a number of rows"), default=10, metavar="K",
                   help="rows of the ranked table (default 10)")
    p.add_argument("--jobs", type=int_arg(1, 256, "a number of processes"), metavar="N",
                   help="steps simulated at once, each in a forked process (default: the CPU cores)")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="prove the fastest candidate with check and write it here as a spec extending SPEC")
    p.add_argument("--name", help="the written spec's name (default: <spec name>-tuned)")
    p.add_argument("--timeout", type=positive_float_arg(86400.0, "a number of seconds"), default=900,
                   help="seconds the check of the written spec may take (default 900)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (every candidate) instead of tables")
    add_set_option(p)
    add_trust_option(p)
    p.set_defaults(func=run)


def _modes(text: str) -> tuple[str, ...]:
    from .search import AC_MODES

    modes = tuple(m.strip() for m in text.split(",") if m.strip())
    bad = [m for m in modes if m not in AC_MODES]
    if bad or not modes:
        raise TpplanError(f"--activation-checkpointing: expected some of {', '.join(AC_MODES)}, got {text!r}")
    return modes


def run(args) -> int:
    from tpplan.core.arguments import cpu_cores
    from tpplan.plan.report import console

    from . import tune
    from .report import print_result

    if args.output:
        from tpplan.core.fileio import check_output_file

        check_output_file(args.output)  # before the work: a folder, device or FIFO is refused
    if args.name is not None:  # before the work: the name is a spec's name
        from tpplan.spec.loader import load_spec

        load_spec(args.spec, [*args.set, ("--name", f"name={args.name}")])
    command = "tpplan tune " + shlex.join(args.argv)
    err = console(stderr=True)
    tuned = tune(
        args.spec, gpus=args.gpus, device=args.gpu, overrides=args.set, out=args.output, name=args.name,
        command=command, prove=bool(args.output), check_timeout=args.timeout, gpus_per_node=args.nodes_of,
        global_batch_tokens=args.global_batch_tokens, seq_length=args.seq_length,
        ac_modes=_modes(args.activation_checkpointing), allow_compile=not args.no_compile,
        allow_float8=not args.no_float8, allow_async=not args.no_async_tp, jobs=args.jobs or cpu_cores(),
        progress=None if args.json else (lambda text: err.print(text, markup=False)),
    )
    result = tuned.result
    if args.json:
        print(json.dumps(_json(tuned), indent=2))
    else:
        print_result(result, top=args.top)
    if tuned.best is None:
        raise TpplanError(f"no candidate fits {result.gpus} x {result.device.name}: every one is rejected "
                          "(above)",
                          hint="more GPUs, a device with more memory, a shorter --seq-length or a smaller "
                          "--global-batch-tokens")
    if not args.output:
        if not args.json:
            print("pass -o FILE to prove the fastest candidate with check and write it as a spec")
        return 0
    from tpplan.core.fileio import write_output_file

    write_output_file(args.output, tuned.text)
    print(f"wrote {args.output}: {tuned.best.label()}, proven by check at tp={tuned.report.tp} "
          f"dp={tuned.report.dp}", file=sys.stderr)
    return 0


def _json(tuned) -> dict:
    result = tuned.result
    best = tuned.best
    return {
        "spec": result.spec.name,
        "device": result.device.model_dump(),
        "gpus": result.gpus,
        "gpus_per_node": result.gpus_per_node,
        "seq_length": result.seq_length,
        "global_batch_sequences": result.global_batch,
        "efficiency": tuned.fitted,
        "shapes_simulated": result.shapes,
        "seconds": round(result.seconds, 2),
        "notes": result.notes,
        "best": best.to_dict() if best else None,
        "check": tuned.report.to_dict() if tuned.report is not None else None,
        "candidates": [c.to_dict() for c in result.candidates],
    }
