"""The ``tpplan`` command: argument parsing only; the work is done by the library.

Exit codes: 0 ok; 1 a check or run that failed; 2 bad input (spec, CLI arguments, model that
cannot be loaded), always one clear message and no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from tpplan import __version__
from tpplan.core.arguments import (
    BATCH_ARG,
    DP_ARG,
    EP_ARG,
    SEQ_ARG,
    TP_ARG,
    add_set_option,
    add_trust_option,
    count_arg,
    cpu_cores,
    int_arg,
    positive_float_arg,
)
from tpplan.core.errors import TpplanError, short

EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    """argparse, but usage errors are tpplan errors (exit 2, one message)."""

    def error(self, message: str):  # noqa: D401 - argparse API
        raise TpplanError(message, hint=f"see `{self.prog} --help`")

    def parse_args(self, args=None, namespace=None):
        """As argparse, but arguments left over are refused with the help of the command they were given
        to (argparse's top-level parser would point at ``tpplan --help``)."""
        parsed, extras = self.parse_known_args(args, namespace)
        if extras:
            command = getattr(parsed, "command", None)
            prog = f"{self.prog} {command}" if command else self.prog
            raise TpplanError(f"unrecognized arguments: {' '.join(extras)}", hint=f"see `{prog} --help`")
        return parsed


RANKS_PER_CORE = 4  # a CPU check starts one process per rank; tests run dp2 x tp2 on 2 cores


def _cmd_validate(args) -> int:
    from tpplan.model.factory import Factory
    from tpplan.plan.stage import validate_model
    from tpplan.spec.loader import load_spec

    status = EXIT_OK
    for path in args.specs:
        try:
            spec = load_spec(path, args.set)
            source = validate_model(spec)  # a trusted factory: imported, its arguments bound (no model built)
        except TpplanError as exc:
            print(str(exc), file=sys.stderr)
            status = max(status, exc.exit_code)
            continue
        rules = _count_rules(spec.plan)
        if isinstance(source, Factory):
            model = (f", model factory {source.shown} not imported (its code runs only with --trust-factory: "
                     "then its model.args are bound too)")
        else:
            model = f", model factory {source.label}" if source is not None else ""
        print(f"ok {path}: {spec.name}, {rules} plan rules, tp={spec.mesh.tp}, dp={spec.mesh.dp}{model}")
    return status


def _count_rules(rules) -> int:
    return sum(1 + _count_rules(r.plan or []) for r in rules)


def _cmd_schema(args) -> int:
    from tpplan.spec.schema import json_schema

    text = json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
    if args.output:
        from tpplan.core.fileio import write_output_file

        write_output_file(args.output, text)
    else:
        sys.stdout.write(text)
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="tpplan",
        description="Declarative tensor-parallel plans for PyTorch LLM training: validate a spec, prove it "
        "on CPU, size it at full scale, compile it to a torchrun script, and run it.",
    )
    parser.add_argument("--version", action="version", version=f"tpplan {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    p = sub.add_parser(
        "validate",
        help="load and validate spec files (no model built; with --trust-factory a model.factory is imported "
        "and its args bound)",
    )
    p.add_argument("specs", nargs="+", metavar="SPEC")
    add_set_option(p)
    add_trust_option(p)
    p.set_defaults(func=_cmd_validate)

    p = sub.add_parser("schema", help="print the JSON Schema of the spec (for editor completion)")
    p.add_argument("-o", "--output", metavar="FILE", help="write to FILE instead of stdout")
    p.set_defaults(func=_cmd_schema)

    for register in _COMMANDS:
        register(sub)
    return parser


def resolve_stage(spec, **sizes):
    """The resolve stage of a command (``plan.stage.Stage``): each spec resolved once, here, and the
    stage handed to the tool."""
    from tpplan.plan.stage import resolve_stage as resolve

    return resolve(spec, **sizes)


def _cmd_check(args) -> int:
    from tpplan.plan.report import check_phases, print_check
    from tpplan.prove.check import run_check
    from tpplan.spec.loader import load_spec

    spec = load_spec(args.spec, args.set)
    with check_phases() as on_phase:
        if on_phase:
            on_phase("resolving the plan")
        stage = resolve_stage(spec, tp=args.tp, ep=args.ep)  # a plan that does not fit says so first
        world = stage.tp * args.dp * stage.ep
        limit = max(RANKS_PER_CORE, RANKS_PER_CORE * cpu_cores())
        if world > limit:
            raise TpplanError(
                f"check starts dp*ep*tp = {world} CPU ranks (one process each) but this machine has {cpu_cores()} "
                f"CPU core(s): at most {limit} ranks ({RANKS_PER_CORE} per core)",
                hint="the twin proves a plan at a small size: --tp 2 (and --dp 2 for FSDP) is enough",
            )
        report = run_check(spec, tp=stage.tp, dp=args.dp, ep=stage.ep, timeout=args.timeout, on_phase=on_phase,
                           stage=stage, launcher=args.launcher)
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
    p.add_argument("--tp", type=TP_ARG, help="tensor-parallel size (default: the spec's mesh.tp)")
    p.add_argument("--dp", type=DP_ARG, default=1, help="data-parallel size (FSDP2); dp*ep*tp CPU ranks are started")
    p.add_argument("--ep", type=EP_ARG, help="expert-parallel size (default: the spec's mesh.ep)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--timeout", type=positive_float_arg(86400.0, "a number of seconds"), default=600,
                   help="seconds before the ranks are declared hung")
    p.add_argument("--launcher", choices=("fork", "torchrun"), default="fork",
                   help="fork: the ranks forked from this process, which has imported torch already (default, "
                   "fastest); torchrun: each rank a fresh interpreter started by torchrun, as training starts them")
    add_set_option(p)
    add_trust_option(p)
    p.set_defaults(func=_cmd_check)


def _cmd_plan(args) -> int:
    from tpplan.spec.loader import load_spec

    specs = [load_spec(path, args.set) for path in args.spec]
    if args.resolve:
        from tpplan.plan.report import print_plan

        plans = [resolve_stage(spec, tp=args.tp, seq_length=args.seq_length).plan for spec in specs]
        if args.json:
            data = [plan.to_dict() for plan in plans]
            print(json.dumps(data[0] if len(data) == 1 else data, indent=2))
        else:
            for plan in plans:
                print_plan(plan, modules=args.modules)
        return EXIT_OK

    from tpplan.simulate.simulator import compare, simulate

    sims = []
    for spec in specs:
        stage = resolve_stage(spec, tp=args.tp, ep=args.ep, seq_length=args.seq_length)
        sims.append(simulate(spec, tp=stage.tp, dp=args.dp, ep=stage.ep, seq_length=stage.seq_length,
                             batch_size=args.batch_size, device_memory_gib=args.device_memory_gib,
                             all_layers=args.all_layers, stage=stage))
    if args.json:
        if len(sims) == 1:
            data = sims[0].to_dict()
        else:
            data = {"plans": [sim.to_dict() for sim in sims], "comparison": compare(sims)}
        print(json.dumps(data, indent=2))
        return EXIT_OK
    from tpplan.plan.report import comparison_table, console, print_simulation

    if len(sims) == 1:
        print_simulation(sims[0], modules=args.modules)
    else:
        console().print(comparison_table(compare(sims)))
    return EXIT_OK


def _register_plan(sub) -> None:
    p = sub.add_parser(
        "plan",
        help="size the plan at full scale without GPUs: per-rank memory and every collective of a training step "
        "(several specs: side by side)",
        description="Resolve each spec against its model (config only, meta device), shard it as training does "
        "(TP + FSDP2) on a fake process group of dp*tp ranks, and run one training step on fake tensors: "
        "per-rank parameters, gradients, AdamW state and activations against the device memory, and every "
        "collective (count, bytes, forward/backward, per block, tp vs dp).",
    )
    p.add_argument("spec", metavar="SPEC", nargs="+", help="one spec, or several to compare")
    p.add_argument("--tp", type=TP_ARG, help="tensor-parallel size (default: the spec's mesh.tp)")
    p.add_argument("--dp", type=DP_ARG, help="data-parallel (FSDP2) size (default: the spec's mesh.dp)")
    p.add_argument("--ep", type=EP_ARG, help="expert-parallel size (default: the spec's mesh.ep)")
    p.add_argument("--seq-length", type=SEQ_ARG, help="sequence length (default: the spec's train.seq_length)")
    p.add_argument("--batch-size", type=BATCH_ARG, help="sequences per dp rank (default: the spec's train.batch_size)")
    p.add_argument("--device-memory-gib", type=positive_float_arg(2.0**20, "a memory size in GiB"), default=80.0,
                   metavar="GIB",
                   help="memory of one device, for the fits verdict (default: 80)")
    p.add_argument("--all-layers", action="store_true",
                   help="simulate every block (default: 3 when all blocks are identical, the middle one standing "
                   "for the rest)")
    p.add_argument("--resolve", action="store_true", help="only resolve and show the plan (no simulation)")
    p.add_argument("--modules", action="store_true", help="one row per module, with the torch style it gets")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    add_set_option(p)
    add_trust_option(p)
    p.set_defaults(func=_cmd_plan)


def _cmd_compile(args) -> int:
    from tpplan.render.render import TEMPLATES, compile_spec
    from tpplan.spec.loader import load_spec

    status = EXIT_OK
    for path in args.specs:
        try:
            spec = load_spec(path, args.set)
            target = compile_spec(spec, args.output, stage=resolve_stage(spec))
        except TpplanError as exc:
            print(f"{path}:\n{exc}" if len(args.specs) > 1 else str(exc), file=sys.stderr)
            status = max(status, exc.exit_code)
            continue
        print(f"wrote {target}/ ({', '.join(TEMPLATES)}) from {path}")
    return status


def _register_compile(sub) -> None:
    p = sub.add_parser(
        "compile",
        help="render specs to standalone torchrun scripts: DIR/<name>/train.py, launch.sh, job.slurm, "
        "pytorchjob.yaml, trainjob.yaml",
    )
    p.add_argument("specs", nargs="+", metavar="SPEC")
    p.add_argument("-o", "--output", default="generated", metavar="DIR", help="parent folder (default: generated)")
    add_set_option(p)
    add_trust_option(p)
    p.set_defaults(func=_cmd_compile)


def _cmd_run(args) -> int:
    from tpplan.launch.torchrun import RunFailed, cli_overrides, launch, prepare_run
    from tpplan.spec.loader import load_spec

    overrides = cli_overrides(
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
        max_restarts=args.max_restarts,
        max_steps=args.max_steps,
    )
    spec = load_spec(args.spec, [*args.set, *overrides])
    prepared = prepare_run(spec, stage=resolve_stage(spec))  # the run directory locked: until this command ends
    try:
        print(f"run dir {prepared.run_dir}/: spec.yaml, plan.json, train.py (the script that runs)")
        if prepared.resumes:
            print(f"resumes from {prepared.resumes}")
        print("launch: " + " ".join(prepared.argv), flush=True)
        if args.dry_run:
            return EXIT_OK
        code = launch(prepared)
    finally:
        if prepared.lock is not None:
            prepared.lock.release()
    if code != 0:
        raise RunFailed(
            f"training exited with status {code}",
            hint=f"the ranks' output is above; logs and checkpoints are in {prepared.run_dir}/",
        )
    return EXIT_OK


def _register_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="train: render the script into the run dir (save_dir/<experiment>) and launch it with torchrun",
    )
    p.add_argument("spec", metavar="SPEC")
    p.add_argument("--nproc-per-node", metavar="N", help="ranks per node: a number, gpu, cpu or auto")
    p.add_argument("--nnodes", metavar="N", help="node count, or MIN:MAX")
    p.add_argument("--rdzv-endpoint", metavar="HOST:PORT", help="rendezvous of a multi-node job")
    p.add_argument("--max-restarts", type=int_arg(0, 10_000, "a restart count"), metavar="N",
                   help="torchrun restarts after a failure")
    p.add_argument("--max-steps", type=int_arg(1, 2**31 - 1, "a step count"), metavar="K",
                   help="stop after K steps (train.max_steps)")
    p.add_argument("--dry-run", action="store_true", help="write the run dir and print the command only")
    add_set_option(p)
    add_trust_option(p)
    p.set_defaults(func=_cmd_run)


def _cmd_import_hf(args) -> int:
    command = "tpplan import-hf " + " ".join(
        [args.source] + (["-o", args.output] if args.output else []) + (["--sequence-parallel"] if args.sequence_parallel else [])
        + (["--name", args.name] if args.name else []) + (["--ep", str(args.ep)] if args.ep else [])
    )
    if args.output:
        from tpplan.core.fileio import check_output_file

        check_output_file(args.output)  # before the work: a device, FIFO or folder is refused
    from tpplan.hf.import_hf import import_hf, report

    imported = import_hf(args.source, sequence_parallel=args.sequence_parallel, name=args.name,
                         out_path=args.output, command=command, ep=args.ep)
    report(imported)
    if args.output:
        from tpplan.core.fileio import write_output_file

        write_output_file(args.output, imported.text)
        print(f"wrote {args.output}: {imported.name}, {len(imported.rules)} rules from {imported.model_class}'s "
              f"transformers plan, {len(imported.skipped)} not imported, tp={imported.tp}", file=sys.stderr)
    else:
        sys.stdout.write(imported.text)
    return EXIT_OK


def _register_import_hf(sub) -> None:
    p = sub.add_parser(
        "import-hf",
        help="write a spec from transformers' own TP plan (base_model_tp_plan / _tp_plan) for a model",
    )
    p.add_argument("source", metavar="MODEL_OR_CONFIG",
                   help="hub id or bundled name (Qwen/Qwen2.5-7B), local folder, config.json, or a model_type (qwen2)")
    p.add_argument("-o", "--output", metavar="FILE", help="write the spec to FILE (default: stdout)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="upgrade to the llama3.yaml form: sequence parallel between blocks + loss parallel")
    p.add_argument("--name", help="the spec's name (default: from the model)")
    p.add_argument("--ep", type=EP_ARG, default=None, metavar="N",
                   help="MoE experts from transformers' expert-parallel plan as expert_parallel over mesh.ep=N "
                        "(default: expert_tensor_parallel over tp)")
    p.set_defaults(func=_cmd_import_hf)


def _cmd_derive(args) -> int:
    command = "tpplan derive " + " ".join(
        [args.source] + (["-o", args.output] if args.output else []) + ([f"--tp {args.tp}"] if args.tp else [])
        + (["--sequence-parallel"] if args.sequence_parallel else []) + (["--name", args.name] if args.name else [])
        + ([f"--max-params-per-rank {args.max_params_per_rank}"] if args.max_params_per_rank else [])
    )
    if args.output:
        from tpplan.core.fileio import check_output_file

        check_output_file(args.output)  # before the work: a device, FIFO or folder is refused
    from .derive import derive, report

    derived = derive(args.source, tp=args.tp, sequence_parallel=args.sequence_parallel, name=args.name,
                     out_path=args.output, command=command, max_params_per_rank=args.max_params_per_rank)
    if args.json:
        print(json.dumps(derived.to_dict(), indent=2))
    report(derived)
    if args.output:
        from tpplan.core.fileio import write_output_file

        write_output_file(args.output, derived.text)
        print(f"wrote {args.output}: {derived.name}, tp={derived.tp}, proven by check at tp={derived.report.tp}",
              file=sys.stderr)
    elif not args.json:
        sys.stdout.write(derived.text)
    return EXIT_OK


def _register_derive(sub) -> None:
    p = sub.add_parser(
        "derive",
        help="derive a tensor-parallel plan from the model's dataflow, prove it with check, and write it as a spec",
        description="Trace the model's tiny twin, find the linears whose outputs meet and feed one reducing linear "
        "(colwise -> rowwise), emulate every tp rank's share of each, choose the largest tp that divides what they "
        "split, write a commented spec and prove it with `tpplan check`. A plan check does not prove is never "
        "written (exit 1); a model derive cannot plan is refused with the reason (exit 2).",
    )
    p.add_argument("source", metavar="MODEL",
                   help="hub id or bundled name (meta-llama/Llama-3.1-8B), local folder, config.json, a model_type "
                   "(llama), or a spec file whose model: section to use")
    p.add_argument("-o", "--output", metavar="FILE", help="write the spec to FILE (default: stdout)")
    p.add_argument("--tp", type=TP_ARG, help="tensor-parallel size (default: the largest of 8/4/2 the model divides)")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="shard the residual stream on the sequence between blocks (the llama3.yaml form)")
    p.add_argument("--max-params-per-rank", type=count_arg, metavar="N",
                   help="fewer bytes per step: leave whole every group of linears (experts, shared experts, mixers, ...) "
                   "whose weights every tp rank has room for within N parameters (3.5B, 800M); a whole group needs no "
                   "all-reduce (default: shard every group derive can)")
    p.add_argument("--name", help="the spec's name (default: from the model)")
    p.add_argument("--json", action="store_true", help="print a JSON summary (groups, forms, check) instead of the spec")
    add_trust_option(p)
    p.set_defaults(func=_cmd_derive)


# Each stage adds its subcommand here: a function taking the subparsers object.
def _cmd_export(args) -> int:
    from tpplan.render.export import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype)
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"exported {summary['checkpoint']} -> {summary['output']}: {summary['parameters']:,} parameters"
              + (", with the run's tokenizer" if summary["tokenizer"] else ""))
    return EXIT_OK


def _register_export(sub) -> None:
    p = sub.add_parser(
        "export",
        help="write a plain Hugging Face folder (save_pretrained, safetensors) from a sharded training checkpoint",
    )
    p.add_argument("checkpoint", metavar="CKPT", help="a run directory (newest complete checkpoint) or checkpoints/step-N")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write (replaced atomically)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), help="dtype to save (default: the spec's)")
    p.add_argument("--json", action="store_true", help="print a JSON summary")
    add_trust_option(p)
    p.set_defaults(func=_cmd_export)


def _cmd_zoo(args) -> int:
    import time
    from pathlib import Path

    from tpplan.zoo.matrix import (
        DEFAULT_TIMEOUT_S,
        MODES,
        planned_types,
        progress_line,
        run_zoo,
        select,
        totals,
        write_matrix,
    )

    if args.output:  # before hours of work: a folder (or a new path) whose zoo.json / zoo.md may be written
        from tpplan.core.fileio import FileProblem, check_output_file, shown

        out = Path(args.output)
        if out.exists() and not out.is_dir():
            raise FileProblem(f"-o {shown(out)} is not a folder: zoo writes zoo.json and zoo.md into a folder",
                              reason="refused")
        for name in ("zoo.json", "zoo.md"):
            check_output_file(out / name)
    types, causal = planned_types()
    if args.list:
        for t in types:
            print(t + ("" if t in causal else "  (not a causal LM)"))
        return EXIT_OK
    only = [t.strip() for item in args.only for t in item.split(",") if t.strip()] if args.only is not None else None
    if only is not None and not only:  # --only '' is a typo, not "every type" (hours of work)
        raise TpplanError(f"--only {short(','.join(args.only))} names no model type",
                          hint="give model types, e.g. --only llama,qwen2 (tpplan zoo --list shows them); leave out "
                          "--only to sweep every type")
    chosen = select(types, only=only, sample=args.sample, causal=None if args.all_types else causal)
    if not only and args.sample is None and not args.all_types:
        chosen = [t for t in chosen if t in causal]
    modes = ("plain",) if args.no_sp else MODES
    started = time.time()
    rows = run_zoo(chosen, causal, modes=modes, jobs=args.jobs, timeout=args.timeout or DEFAULT_TIMEOUT_S,
                   with_bytes=not args.no_bytes, with_derive=not args.no_derive, progress=progress_line)
    seconds = time.time() - started
    if args.output:
        command = "tpplan zoo " + " ".join(args.argv)
        json_path, md_path = write_matrix(rows, Path(args.output), seconds=seconds, command=command)
        print(f"wrote {json_path} and {md_path}", file=sys.stderr)
    summary = totals(rows, causal_only=False)
    print(json.dumps(summary) if args.json else
          f"{len(rows)} types in {seconds:.0f} s: " + "; ".join(
              f"{m}: " + ", ".join(f"{v} {k}" for k, v in summary[m].items() if v) for m in modes))
    failed = any((getattr(r, m) is None or getattr(r, m).status == "failed") for r in rows for m in modes)
    return EXIT_FAILED if failed else EXIT_OK


def _register_zoo(sub) -> None:
    p = sub.add_parser(
        "zoo",
        help="import, resolve and check at tp=2 every transformers model type with a TP plan; write the matrix",
        description="For each transformers model type whose config has a tensor-parallel plan: tpplan import-hf "
        "(plain, and --sequence-parallel), resolve at tp=2, and tpplan check on forked CPU gloo ranks. "
        "Writes DIR/zoo.json and DIR/zoo.md with -o. Exit 1 when any type failed (refusals are not failures).",
    )
    p.add_argument("-o", "--output", metavar="DIR", help="write zoo.json and zoo.md into DIR (e.g. docs)")
    p.add_argument("--only", action="append", metavar="TYPES", help="comma-separated model types (repeatable)")
    p.add_argument("--sample", type=int_arg(1, 100_000, "a number of model types"), metavar="N",
                   help="N types: the representative families first, then a spread")
    p.add_argument("--all-types", action="store_true", help="every type with a plan, not only the causal LMs")
    p.add_argument("--jobs", type=int_arg(1, 1024, "a number of jobs"), default=1, metavar="N",
                   help="model types checked at once (default 1)")
    p.add_argument("--timeout", type=positive_float_arg(86400.0, "a number of seconds"), metavar="S",
                   help="seconds per model type before it is a failure")
    p.add_argument("--no-sp", action="store_true", help="only the plain import (no --sequence-parallel column)")
    p.add_argument("--no-bytes", action="store_true", help="skip the simulator's bytes columns")
    p.add_argument("--no-derive", action="store_true", help="skip the derive column (tpplan derive + check per type)")
    p.add_argument("--list", action="store_true", help="print the model types with a plan and exit")
    p.add_argument("--json", action="store_true", help="print the totals as JSON")
    p.set_defaults(func=_cmd_zoo)


def _register_tune(sub) -> None:
    from .tune.cli import register

    register(sub)


_COMMANDS: list[Callable] = [_register_plan, _register_check, _register_compile, _register_run, _register_import_hf,
                             _register_derive, _register_export, _register_zoo, _register_tune]


def main(argv: list[str] | None = None) -> int:
    for stream in (sys.stdout, sys.stderr):  # a path with undecodable bytes prints escaped, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    from tpplan.core.processes import Interrupted, signals_raise
    from tpplan.core.trust import trusting

    parser = build_parser()
    try:
        with signals_raise():  # SIGTERM, like Ctrl-C, unwinds: every process a command started is stopped
            args = parser.parse_args(argv)
            args.argv = list(sys.argv[2:] if argv is None else argv[1:])
            if not getattr(args, "func", None):
                parser.print_help()
                return EXIT_BAD_INPUT
            with trusting(getattr(args, "trust_factory", False)):
                return _run_command(args)
    except TpplanError as exc:
        print(str(exc), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt as exc:
        print("interrupted", file=sys.stderr)
        return exc.exit_code if isinstance(exc, Interrupted) else 130


def _run_command(args) -> int:
    """``args.func(args)``; a ``sys.exit`` from code tpplan imported (tpplan itself never calls it
    in a command) is an error, never a silent exit 0."""
    try:
        return int(args.func(args) or 0)
    except SystemExit as exc:
        if isinstance(exc.code, str) and exc.code:  # a refusal of the training step's own (step.py)
            raise TpplanError(exc.code) from None
        raise TpplanError(
            f"code that tpplan imported for `{args.command}` called sys.exit({exc.code!r}): the command did not "
            "finish", hint="a module a spec names must not exit when imported or called",
        ) from None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
