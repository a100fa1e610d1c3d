"""Wrong plans on purpose: mutants of a proven spec, to measure the oracle (resolve and ``check``).

A mutant is the spec with one change of a kind that plan authors and plan writers (import-hf, derive)
get wrong, each kind in ``KINDS``.  A mutant is *killed* when resolve refuses it (exit 2), ``check``
fails it (exit 1), or ``check`` proves it equal but less parallel than the spec it came from (a
kind of parameter left whole that the spec shards: "partial").  A mutant may compute exactly what
the spec computes; the generator says so where it knows why (``Mutant.equivalent``), and only
mutants that are not equivalent count in the score: killed / non-equivalent.

    from tpplan.prove.mutants import mutants, run_mutant
    for mutant in mutants(spec):          # spec: a proven tpplan.spec.Spec
        print(mutant.kind, mutant.rule, run_mutant(mutant)["verdict"])

``benchmarks/mutants.py`` runs them over the zoo and writes docs/mutants.md; ``tests/dist/
test_mutants.py`` over the zoo's CI sample.
"""

from __future__ import annotations

import copy
import functools
import re
from dataclasses import asdict, dataclass

from tpplan.core.errors import TpplanError

KINDS = {
    "grad_sum_on_replicated_input": "a gradient summed over tp on a module whose input every rank holds "
    "whole (its gradient tp times too large)",
    "grad_sum_removed": "a gradient sum over tp removed where each rank holds a partial gradient",
    "colwise_rowwise_swapped": "a colwise Linear made rowwise, or a rowwise one colwise",
    "output_layout_changed": "a module's output layout changed (replicate <-> shard(1), shard(-1) -> "
    "replicate)",
    "use_local_output_flipped": "use_local_output flipped: a DTensor handed on as a local shard, or the "
    "reverse",
    "packed_parts_wrong": "a packed projection split into the wrong number of parts",
    "fixup_wrong_value": "a fix-up with the wrong value (a head count left whole, a set value changed)",
    "tie_broken": "tied weights held two ways (one holder's rule changed)",
    "expert_rule_dropped": "the experts' rule removed: every expert whole on every rank",
    "shard_dim_changed": "a sharding dim changed (a layout's dim, a sequence_dim, the embedding's weight)",
}
GRAD_SUM_STYLES = ("replicate_grad_allreduce", "mla_kv_a_proj")
EXPERT_STYLES = ("expert_tensor_parallel", "expert_parallel")
LAYOUT_FIELDS = ("input_layouts", "output_layouts", "desired_input_layouts", "desired_output_layouts")
KWARG_FIELDS = ("input_kwarg_layouts", "desired_input_kwarg_layouts")
# styles whose output layout is theirs to choose, and what it is when the rule does not say
DEFAULT_OUTPUT = {"colwise": "shard(-1)", "rowwise": "replicate"}
LOCAL_OUTPUT_DEFAULT = {"colwise": True, "rowwise": True, "sequence_parallel": False, "prepare_input": False,
                        "prepare_output": True, "prepare_input_output": True, "local_params": False}
DTENSOR_OUTPUT = (
    "the output stays a DTensor (use_local_output: false), whose placements say what it holds: laid out "
    "another way (replicated, or sharded on another dim) it holds the same values, and the modules after it "
    "redistribute it to the layouts they take; only bytes and memory differ")
LINEAR_SWAP = (
    "its input's layout is known (declared, or the input arrives as a DTensor from the module around it) and "
    "its output layout is declared: colwise (the input gathered whole, output features split, then "
    "redistributed) and rowwise (the input redistributed to feature slices, partial sums reduced) both "
    "compute the Linear's whole output in the declared layout; only the bytes differ")
EMBEDDING_SPLIT = (
    "the embedding's output layout is kept, so every rank ends with the same embedding whichever weight dim "
    "is split: the vocabulary (each rank looks up its rows, partial sums reduced) or the hidden dim (each "
    "rank its columns, gathered); only the bytes differ")


@dataclass(frozen=True)
class Mutant:
    source: str  # the spec it comes from (its name)
    kind: str  # a key of KINDS
    rule: str  # where: the rule's pattern, or fixups[i]
    change: str  # what changed, in words
    spec: dict  # the mutated spec, as Spec.model_dump(mode="json", exclude_unset=True) gives it
    equivalent: str | None = None  # why it computes what the spec computes: it need not be killed
    origin: str | None = None  # the spec's file: paths in it (a model.factory file) are relative to it

    def to_dict(self, with_spec: bool = False) -> dict:
        data = asdict(self)
        if not with_spec:
            data.pop("spec")
        return data


def mutants(spec, *, tp: int = 2, per_kind: int = 1, kinds=None) -> list[Mutant]:
    """Up to ``per_kind`` mutants of each kind of ``KINDS`` (or of ``kinds``) that ``spec`` has a place
    for, each on a different rule, in the spec's order.  The spec is resolved at full size (meta device)
    to know its modules, blocks, ties and fix-ups."""
    from tpplan.plan.stage import resolve_stage

    stage = resolve_stage(spec, tp=tp)
    base = spec.model_dump(mode="json", exclude_unset=True)
    origin = str(spec.source.path) if spec.source is not None else None
    found: list[Mutant] = []
    twin = _Twin(stage)
    for kind in kinds or KINDS:
        candidates, rules = [], set()
        for rule, change, mutated, equivalent in _GENERATORS[kind](base, stage, twin):
            if rule not in rules:  # one mutant per rule
                rules.add(rule)
                candidates.append(Mutant(spec.name, kind, rule, change, mutated, equivalent, origin))
        found += _spread(candidates, stage.plan.blocks)[:per_kind]
    return found


def _spread(candidates: list[Mutant], blocks) -> list[Mutant]:
    """Candidates in turns over their kinds of change (colwise -> rowwise, then rowwise -> colwise, ...) and
    over where they are (inside the blocks, outside), each in the spec's order."""
    def change_kind(mutant):
        inside = any(mutant.rule.startswith(block + ".") for block in blocks)
        return re.sub(r"\S*\d\S*", "#", mutant.change.split(" (")[0]), inside

    order: dict[str, int] = {}
    ranked = []
    for mutant in candidates:
        key = change_kind(mutant)
        ranked.append((order.get(key, 0), mutant))
        order[key] = order.get(key, 0) + 1
    return [m for _, m in sorted(ranked, key=lambda pair: pair[0])]


def run_mutant(mutant: Mutant, *, tp: int = 2, baseline: list | None = None, timeout: float = 180,
               launcher: str = "fork") -> dict:
    """Whether the oracle kills ``mutant``: ``{"verdict": refused | failed | partial | survived, "killed",
    "message"}``.  ``baseline``: what the proven spec leaves whole (``CheckReport.replicated``); a mutant
    that leaves more whole is killed as ``partial``."""
    from pathlib import Path

    from pydantic import ValidationError

    from tpplan.prove.check import run_check
    from tpplan.spec.schema import Spec
    from tpplan.spec.yaml_reader import Source

    result = {**mutant.to_dict(), "killed": True}
    try:
        spec = Spec.model_validate(mutant.spec)
        if mutant.origin:
            spec._source = Source(path=Path(mutant.origin))  # its paths stay relative to the spec's file
        report = run_check(spec, tp=tp, launcher=launcher, timeout=timeout)
    except ValidationError as exc:
        message = first_line(str(exc.errors()[0]["msg"]))
        return {**result, "verdict": "refused", "by": "spec", "message": message}
    except TpplanError as exc:
        return {**result, "verdict": "refused", "by": "resolve", "message": first_line(exc.message)}
    if not report.ok:
        failure = report.failure or {}
        return {**result, "verdict": "failed", "by": "check", "reason": failure.get("reason"),
                "message": first_line(str(failure.get("message")))}
    more = sorted(set(report.replicated) - set(baseline or []))
    if more:
        return {**result, "verdict": "partial", "by": "check",
                "message": f"proven equal, but {', '.join(more)} whole on every rank"}
    return {**result, "verdict": "survived", "killed": False, "message": "proven equal and as parallel"}


def score(results: list[dict]) -> dict:
    """killed / non-equivalent, and the survivors: those the generator did not expect (oracle gaps) and
    those it explained (equivalent mutants, each with its reason)."""
    counted = [r for r in results if not r.get("equivalent")]
    killed = [r for r in counted if r["killed"]]
    return {"mutants": len(results), "non_equivalent": len(counted), "killed": len(killed),
            "score": round(len(killed) / len(counted), 4) if counted else None,
            "unexplained_survivors": [r for r in counted if not r["killed"]],
            "equivalent": [r for r in results if r.get("equivalent")],
            "equivalent_killed": [r for r in results if r.get("equivalent") and r["killed"]]}


def md_text(text, limit: int = 200) -> str:
    text = " ".join(str(text or "").split()).replace("|", "\\|")
    return text if len(text) <= limit else text[: limit - 3] + "..."


def first_line(text: str, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# ----------------------------------------------------------------------------------------------
# The spec's rules, and changing one
# ----------------------------------------------------------------------------------------------


def _rules(spec: dict) -> list[tuple[tuple, dict, str]]:
    """(path, rule, absolute pattern) of every rule with a style in plan and plan_overrides, nested
    groups flattened, in the spec's order."""
    found = []

    def walk(rules, path, prefix):
        for i, rule in enumerate(rules):
            pattern = f"{prefix}.{rule['match']}" if prefix else rule["match"]
            if "style" in rule:
                found.append(((*path, i), rule, pattern))
            if rule.get("plan"):
                walk(rule["plan"], (*path, i, "plan"), pattern)

    walk(spec.get("plan", []), ("plan",), "")
    walk(spec.get("plan_overrides", []), ("plan_overrides",), "")
    return found


def _at(spec: dict, path: tuple):
    node = spec
    for key in path:
        node = node[key]
    return node


def _replaced(spec: dict, path: tuple, rule: dict) -> dict:
    """``spec`` with the rule at ``path`` replaced by ``rule``."""
    out = copy.deepcopy(spec)
    _at(out, path[:-1])[path[-1]] = rule
    return out


def _removed(spec: dict, path: tuple) -> dict:
    """``spec`` without the rule at ``path`` (and without a group it leaves empty)."""
    out = copy.deepcopy(spec)
    del _at(out, path[:-1])[path[-1]]
    while len(path) > 2 and path[-2] == "plan" and not _at(out, path[:-1]):
        path = path[:-2]
        del _at(out, path[:-1])[path[-1]]
    return out


def _added(spec: dict, rule: dict) -> dict:
    out = copy.deepcopy(spec)
    out["plan"].append(rule)
    return out


def _own(rule: dict, **fields) -> dict:
    """A rule of another style on the same modules: match (and note) kept, ``fields`` set (None: dropped)."""
    kept = {k: rule[k] for k in ("match", "note", "plan") if k in rule}
    return {**kept, **{k: v for k, v in fields.items() if v is not None}}


def _changed(rule: dict, **fields) -> dict:
    out = {**rule, **fields}
    return {k: v for k, v in out.items() if v is not None}


# ----------------------------------------------------------------------------------------------
# One generator per kind: (rule, change, mutated spec, equivalent) candidates
# ----------------------------------------------------------------------------------------------


def _grad_sum_added(spec: dict, stage, twin):
    """replicate_grad_allreduce on a norm without a rule: its input (the replicated stream, MLA's q_a
    path) is whole on every rank, so each rank's gradient is complete and the sum makes it tp times."""
    from tpplan.runtime.step import block_names

    styled = stage.plan.styles_by_module()
    blocks = block_names(stage.model, stage.plan.blocks)
    first = blocks[0] if blocks else None
    pattern = next((p for p in stage.plan.blocks), None)
    for name, module in stage.model.named_modules():
        if (not name or name in styled or "norm" not in type(module).__name__.lower()
                or not any(True for _ in module.parameters(recurse=False))):
            continue
        if first and name.startswith(first + "."):
            match = f"{pattern}.{name[len(first) + 1:]}"
        elif any(name.startswith(b + ".") for b in blocks):
            continue  # the first block's norm stands for every block's
        else:
            match = name
        yield (match, f"{{match: {match}, style: replicate_grad_allreduce}} added",
               _added(spec, {"match": match, "style": "replicate_grad_allreduce"}), None)


def _grad_sum_dropped(spec: dict, stage, twin):
    """A rule that sums a gradient over tp (replicate_grad_allreduce, mla_kv_a_proj, a per-head or per-feature
    sequence_parallel split) replaced by replicate."""
    for path, rule, pattern in _rules(spec):
        split_other_dim = rule["style"] == "sequence_parallel" and rule.get("sequence_dim", 1) not in (1, -2)
        if rule["style"] in GRAD_SUM_STYLES or split_other_dim:
            mutated = _replaced(spec, path, _own(rule, style="replicate"))
            yield pattern, f"{rule['style']} -> replicate", mutated, None


def _swapped(spec: dict, stage, twin):
    """colwise <-> rowwise on a Linear (the embedding's weight split is shard_dim_changed's)."""
    embedding = _embedding_patterns(spec, stage)
    for path, rule, pattern in _rules(spec):
        if rule["style"] in ("colwise", "rowwise") and pattern not in embedding:
            other = "rowwise" if rule["style"] == "colwise" else "colwise"
            # the input's layout known (declared, not the style's default, which differs; or a DTensor already),
            # the output's declared, and no desired input of its own
            whole = ("desired_input_layouts" not in rule and rule.get("output_layouts") not in (None, "shard(-1)")
                     and ("input_layouts" in rule or twin.arrives_as_dtensor(pattern)))
            yield (pattern, f"{rule['style']} -> {other}", _replaced(spec, path, _changed(rule, style=other)),
                   LINEAR_SWAP if whole else None)


def _output_changed(spec: dict, stage, twin):
    for path, rule, pattern in _rules(spec):
        style = rule["style"]
        if style not in DEFAULT_OUTPUT and "output_layouts" not in rule:
            continue
        now = rule.get("output_layouts", DEFAULT_OUTPUT.get(style))
        if isinstance(now, list):
            new = ["replicate" if str(x).startswith("shard") else "shard(1)" for x in now]
        else:
            new = "replicate" if str(now).startswith("shard") else "shard(1)"
        dtensor = not rule.get("use_local_output", LOCAL_OUTPUT_DEFAULT.get(style, True))
        equivalent = DTENSOR_OUTPUT if dtensor and "shard" not in str(new) else None
        mutated = _replaced(spec, path, _changed(rule, output_layouts=new))
        yield pattern, f"output_layouts {now} -> {new}", mutated, equivalent


def _local_output_flipped(spec: dict, stage, twin):
    for path, rule, pattern in _rules(spec):
        if rule["style"] not in LOCAL_OUTPUT_DEFAULT:
            continue
        now = rule.get("use_local_output", LOCAL_OUTPUT_DEFAULT[rule["style"]])
        yield (pattern, f"use_local_output {str(now).lower()} -> {str(not now).lower()}",
               _replaced(spec, path, _changed(rule, use_local_output=not now)), None)


class _Twin:
    """What one forward of the model's twin shows about the modules a rule decides (its dataflow:
    ``tpplan.model.dataflow``, traced once, when a generator first asks).  Without a trace (a model of
    one's own, whose forward's arguments are its own, or a twin that does not run), nothing is claimed."""

    def __init__(self, stage):
        self.stage = stage
        self.styles = {e.fqn: e.rule for e in stage.plan.entries}

    @functools.cached_property
    def graph(self):
        config = self.stage.source.config
        if config is None:
            return None
        from tpplan.model.dataflow import trace
        from tpplan.model.twin_run import cpu_twin, token_ids

        try:
            twin, model = cpu_twin(config, self.stage.tp)
            return trace(model, input_ids=token_ids(twin.vocab_size))
        except Exception:  # noqa: BLE001 - no trace only means no claim of equivalence
            return None

    def first(self, pattern: str):
        """The plan entry of the first module ``pattern`` decides."""
        plan = self.stage.plan
        return next((e for e in plan.entries if plan.rules[e.rule_index].pattern == pattern), None)

    def arrives_as_dtensor(self, pattern: str) -> bool:
        """Whether the first module ``pattern`` decides takes, as its first input, the very tensor a module
        around it receives and hands on as a DTensor of a declared layout (``prepare_input`` of that input,
        not local): its own rule's input layout is then never used to wrap it."""
        entry = self.first(pattern)
        graph = self.graph
        if entry is None or graph is None:
            return False
        call = next((c for c in graph.calls if c.module == entry.fqn), None)
        value = next((v for where, v in call.args if where == 0), None) if call is not None else None
        if value is None:
            return False
        for outer in graph.calls:
            if not entry.fqn.startswith(outer.module + "."):
                continue
            rule = self.styles.get(outer.module)
            for where, v in outer.args:
                if v == value and rule is not None and _hands_on_dtensor(rule, where):
                    return True
        return False


def _hands_on_dtensor(rule, where) -> bool:
    """Whether ``rule`` (of the module around) turns its input at ``where`` (a position or a keyword) into a
    DTensor of a declared layout and hands it on as one."""
    style = getattr(rule, "style", None)
    if style == "prepare_input":
        local = rule.use_local_output
    elif style == "prepare_input_output":
        local = rule.use_local_input
    else:
        return False
    if local:
        return False
    if isinstance(where, str):
        return bool(rule.input_kwarg_layouts) and where in rule.input_kwarg_layouts
    layouts = rule.input_layouts
    if isinstance(layouts, (list, tuple)):
        return where < len(layouts) and layouts[where] is not None
    return layouts is not None and where == 0


def _packed_parts(spec: dict, stage, twin):
    for path, rule, pattern in _rules(spec):
        if rule["style"] == "packed_colwise":
            parts = rule["parts"]
            new = 2 if parts == 3 else 3
            yield (pattern, f"parts {parts} -> {new}", _replaced(spec, path, _changed(rule, parts=new)), None)


def _fixup_wrong(spec: dict, stage, twin):
    """A floordiv_tp fix-up removed (the count it divides left whole, tp times too large on each rank); a
    set fix-up given another value."""
    for i, fixup in enumerate(spec.get("fixups", [])):
        where = f"fixups[{i}] ({fixup['match']}: {fixup['attr']})"
        if fixup["op"] == "floordiv_tp":
            mutated = copy.deepcopy(spec)
            del mutated["fixups"][i]
            yield where, "floordiv_tp removed (the count left whole)", mutated, None
        elif isinstance(fixup.get("value"), (bool, int)):
            value = fixup["value"]
            new = (not value) if isinstance(value, bool) else value * 2 or 1
            mutated = copy.deepcopy(spec)
            mutated["fixups"][i] = {**fixup, "value": new}
            yield where, f"set {value} -> {new}", mutated, None


def _tie_broken(spec: dict, stage, twin):
    """For each tie, one holder's module held another way: its rule replaced by replicate (or, held whole,
    given colwise)."""
    entries = {e.fqn: e for e in stage.plan.entries}
    for tie in stage.plan.tied:
        for name in tie.others:
            module = name.rpartition(".")[0]
            entry = entries.get(module)
            if entry is not None and entry.rule.applies:
                path = stage.plan.rules[entry.rule_index].path
                rule = _at(spec, path)
                yield (module, f"{rule['style']} -> replicate on a holder of the tied {tie.owner}",
                       _replaced(spec, path, _own(rule, style="replicate")), None)
            else:
                rule = {"match": module, "style": "colwise", "output_layouts": "replicate"}
                yield module, f"colwise added on a holder of the tied {tie.owner}", _added(spec, rule), None


def _experts_dropped(spec: dict, stage, twin):
    for path, rule, pattern in _rules(spec):
        if rule["style"] in EXPERT_STYLES:
            yield pattern, f"{rule['style']} rule removed", _removed(spec, path), None


def _dim_changed(spec: dict, stage, twin):
    """A layout's shard dim moved (1 <-> -1, others -> 1), a sequence_dim moved, or the embedding's weight
    split on its other dim (rowwise <-> colwise, the output layout kept: equivalent)."""
    embedding = _embedding_patterns(spec, stage)
    tied = bool(embedding) and any(name.rpartition(".")[0] == _input_embedding_name(stage)
                                   for tie in stage.plan.tied for name in tie.names)
    for path, rule, pattern in _rules(spec):
        if pattern in embedding and rule["style"] in ("rowwise", "colwise"):
            other = "colwise" if rule["style"] == "rowwise" else "rowwise"
            output = rule.get("output_layouts", DEFAULT_OUTPUT[rule["style"]])
            # tied to the head, the weight would be split two ways: not equivalent (resolve refuses it)
            yield (pattern, f"embedding {rule['style']} -> {other} (output {output} kept)",
                   _replaced(spec, path, _changed(rule, style=other, output_layouts=output)),
                   None if tied else EMBEDDING_SPLIT)
        if rule["style"] == "sequence_parallel":
            dim = rule.get("sequence_dim", 1)
            new = 2 if dim in (1, -2) else 1
            mutated = _replaced(spec, path, _changed(rule, sequence_dim=new))
            yield pattern, f"sequence_dim {dim} -> {new}", mutated, None
        for key in (*LAYOUT_FIELDS, *KWARG_FIELDS):
            value = rule.get(key)
            moved = _moved_dims(value)
            if moved is not None:
                mutated = _replaced(spec, path, _changed(rule, **{key: moved}))
                dtensor = not rule.get("use_local_output", LOCAL_OUTPUT_DEFAULT.get(rule["style"], True))
                output = key in ("output_layouts", "desired_output_layouts")
                equivalent = DTENSOR_OUTPUT if output and dtensor else None
                yield pattern, f"{key} {value} -> {moved}", mutated, equivalent
                break


def _moved_dims(value):
    """``value`` (a layout, a list or a dict of them) with the first shard(d) moved to another dim; None
    when it shards nothing."""
    def move(layout):
        found = re.fullmatch(r"shard\((-?\d+)\)", str(layout))
        if not found:
            return None
        dim = int(found.group(1))
        return f"shard({-1 if dim == 1 else 1})"

    if isinstance(value, str):
        return move(value)
    if isinstance(value, list):
        for i, item in enumerate(value):
            if move(item):
                return [*value[:i], move(item), *value[i + 1:]]
    if isinstance(value, dict):
        for key, item in value.items():
            if move(item):
                return {**value, key: move(item)}
    return None


def _input_embedding_name(stage) -> str | None:
    """The model's input embedding: transformers' accessor, else (a model of one's own) its 1st Embedding."""
    import torch

    try:
        embedding = stage.model.get_input_embeddings()
    except Exception:  # noqa: BLE001 - a model of one's own without the accessor
        embedding = next((m for m in stage.model.modules() if isinstance(m, torch.nn.Embedding)), None)
    return next((name for name, module in stage.model.named_modules() if module is embedding), None)


def _embedding_patterns(spec: dict, stage) -> set[str]:
    """The patterns of the rules that decide the model's input embedding."""
    name = _input_embedding_name(stage)
    return {stage.plan.rules[e.rule_index].pattern for e in stage.plan.entries if e.fqn == name}


_GENERATORS = {
    "grad_sum_on_replicated_input": _grad_sum_added,
    "grad_sum_removed": _grad_sum_dropped,
    "colwise_rowwise_swapped": _swapped,
    "output_layout_changed": _output_changed,
    "use_local_output_flipped": _local_output_flipped,
    "packed_parts_wrong": _packed_parts,
    "fixup_wrong_value": _fixup_wrong,
    "tie_broken": _tie_broken,
    "expert_rule_dropped": _experts_dropped,
    "shard_dim_changed": _dim_changed,
}
