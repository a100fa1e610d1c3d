"""YAML -> Spec, keeping every value's file, line and column for error messages.

Only YAML's safe subset is read (plain data: mappings, lists, strings, numbers, booleans, null).
The file is parsed to nodes with source marks, turned into plain data while recording where each
value came from, merged with the spec it ``extends``, then validated by pydantic.  Every pydantic
error is mapped back to ``file:line:col`` with the field path (``plan[3].style``), what was
expected, and for typos the closest valid name.
"""

from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from tpplan.core.errors import Location, SpecError, SpecErrors, short
from tpplan.core.fileio import FileProblem, read_input
from tpplan.spec.rules import GROUP_TAG, STYLE_NAMES, STYLE_RULES, GroupRule
from tpplan.spec.schema import Spec

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; a megabyte is already absurd
MAX_NODES = 100_000  # counts alias re-visits too, so a "billion laughs" file stops early
MAX_DEPTH = 64
MAX_EXTENDS_DEPTH = 16

PathKey = tuple  # a path into the data: ("plan", 3, "style")


@dataclass
class Source:
    """Where a loaded spec came from: its file, and the location of every value in it."""

    path: Path
    marks: dict[PathKey, tuple[Location, Location]] = field(default_factory=dict)  # (key, value)
    chain: tuple[Path, ...] = ()  # the files merged through `extends`, this one first

    def where(self, path: PathKey, *, key: bool = False) -> Location:
        """The location of the value at ``path``, or of its closest recorded parent."""
        for n in range(len(path), -1, -1):
            mark = self.marks.get(tuple(path[:n]))
            if mark:
                return mark[0] if key and n == len(path) else mark[1]
        return Location(str(self.path))

    @property
    def directory(self) -> Path:
        return self.path.parent


def format_path(path: PathKey) -> str:
    """("plan", 3, "style") -> "plan[3].style"."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


# ------------------------------------------------------------------------------------------
# Reading one file
# ------------------------------------------------------------------------------------------


def _read_text(path: Path, display: str, via: Location | None = None) -> str:
    try:
        data = read_input(path, limit=MAX_SPEC_BYTES, what="spec file", display=display)
    except FileProblem as exc:
        if via is not None:  # the file named by `extends`: the error is at that line
            raise SpecError(f"{display} {exc.detail}", location=via, path="extends", hint=exc.hint) from None
        if exc.reason == "missing":
            raise SpecError(exc.message, hint="check the path; specs live in specs/") from None
        if exc.reason == "too-large":
            raise SpecError(
                f"spec file is larger than {MAX_SPEC_BYTES:,} bytes, the limit",
                location=Location(display),
                hint="a spec is a page of YAML: is this the right file?",
            ) from None
        raise SpecError(exc.detail, location=Location(display), hint=exc.hint) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        before = data[: exc.start]
        line = before.count(b"\n") + 1
        column = exc.start - (before.rfind(b"\n") + 1) + 1
        raise SpecError(
            f"the file is not UTF-8 text: byte 0x{data[exc.start]:02x} cannot be decoded",
            location=Location(display, line, column),
            hint="save the spec as UTF-8",
        ) from None


def _loc(display: str, mark) -> Location:
    return Location(display, mark.line + 1, mark.column + 1)


_PLAIN_TAGS = {
    f"tag:yaml.org,2002:{name}" for name in ("str", "int", "float", "bool", "null", "map", "seq", "merge")
}


_NUMBER_TAGS = {"tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_TIMESTAMP_TAG = "tag:yaml.org,2002:timestamp"


class _Builder:
    """Turns a YAML node tree into plain data and a path -> location map."""

    def __init__(self, loader: yaml.SafeLoader, display: str):
        self.loader = loader
        self.display = display
        self.marks: dict[PathKey, tuple[Location, Location]] = {}
        self.nodes = 0

    def _implicit(self, node) -> bool:
        """Whether the node's tag was resolved from its text rather than written (``!!tag``)."""
        buffer = node.start_mark.buffer
        return not (buffer and buffer[node.start_mark.index : node.start_mark.index + 1] == "!")

    def build(self, node, path: PathKey = (), key_loc: Location | None = None, depth: int = 0) -> Any:
        self.nodes += 1
        here = _loc(self.display, node.start_mark)
        if self.nodes > MAX_NODES or depth > MAX_DEPTH:
            what = (
                "nested too deeply" if depth > MAX_DEPTH else "too large (aliases expand to too many values)"
            )
            raise SpecError(
                f"the spec is {what}: limits are {MAX_DEPTH} levels and {MAX_NODES:,} values",
                location=here,
                hint="a spec is a page of YAML; anchors/aliases that multiply are refused",
            )
        self.marks[path] = (key_loc or here, here)
        if node.tag == _TIMESTAMP_TAG and self._implicit(node):
            return node.value  # 2024-01-01 written plainly: the text as written, not a date
        if node.tag not in _PLAIN_TAGS:
            raise SpecError(
                f"YAML tag {node.tag!r} is not allowed: a spec holds plain data only",
                location=here,
                path=format_path(path),
                hint="remove the !!tag; strings, numbers, booleans, lists and mappings need none",
            )
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), None, depth + 1) for i, item in enumerate(node.value)]
        if node.tag in _NUMBER_TAGS and ":" in node.value:
            # YAML 1.1 reads 1:4 as a base-60 number (64); nobody means that in a spec
            return node.value
        value = self.loader.construct_object(node)
        if isinstance(value, str):
            _check_text(value, here, path)
        return value

    def _mapping(self, node, path: PathKey, depth: int) -> dict:
        """A mapping; with merge keys (``<<: *base``) the mapping's own keys override merged ones,
        and later merged mappings lose to earlier ones, as YAML says.  Only a key written twice in
        the mapping itself is a duplicate."""
        own = sum(1 for key, _ in node.value if not (isinstance(key, yaml.ScalarNode) and key.tag == _MERGE_TAG))
        self.loader.flatten_mapping(node)  # merged pairs first (in precedence order), then the own ones
        merged_count = len(node.value) - own
        result: dict[str, Any] = {}
        written: set[str] = set()
        for index, (key_node, value_node) in enumerate(node.value):
            key_here = _loc(self.display, key_node.start_mark)
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(
                    "a key must be a plain name, not a list or mapping",
                    location=key_here,
                    path=format_path(path),
                )
            key = self.loader.construct_object(key_node)
            if not isinstance(key, str):
                key = str(key) if isinstance(key, (int, float, bool)) or key is None else key
            if isinstance(key, str):
                _check_text(key, key_here, path)
            if index >= merged_count:
                if key in written:
                    first = self.marks[(*path, key)][0]
                    raise SpecError(
                        f"duplicate key '{key}' (first at line {first.line})",
                        location=key_here,
                        path=format_path((*path, key)),
                        hint="YAML keeps only the last one; remove one of them",
                    )
                written.add(key)
            if key in result:  # an own key over a merged one, or a merged one over a later merge
                for stale in [p for p in self.marks if p[: len(path) + 1] == (*path, key)]:
                    del self.marks[stale]
            result[key] = self.build(value_node, (*path, key), key_here, depth + 1)
        return result


_MERGE_TAG = "tag:yaml.org,2002:merge"


def _check_text(text: str, where: Location, path: PathKey) -> None:
    """Refuse what no file name, environment value or generated file can hold: NUL characters
    and lone surrogates (which cannot be encoded as UTF-8)."""
    for i, ch in enumerate(text):
        if ch == "\x00":
            problem = "a NUL character (\\0)"
        elif "\ud800" <= ch <= "\udfff":
            problem = f"a lone surrogate (\\u{ord(ch):04x})"
        else:
            continue
        raise SpecError(
            f"{short(text)} holds {problem} at character {i + 1}",
            location=where,
            path=format_path(path),
            hint="remove it: it is not text that file names, environment values or generated scripts can hold",
        )


def parse_yaml(text: str, display: str) -> tuple[Any, dict[PathKey, tuple[Location, Location]]]:
    """Parse YAML text into plain data plus locations. Raises SpecError on any YAML problem."""
    loader = None
    try:
        loader = yaml.SafeLoader(text)
        node = loader.get_single_node()
        if node is None:
            return None, {}
        builder = _Builder(loader, display)
        return builder.build(node), builder.marks
    except yaml.reader.ReaderError as exc:
        before = text[: exc.position]
        location = Location(display, before.count("\n") + 1, exc.position - (before.rfind("\n") + 1) + 1)
        raise SpecError(
            f"{'the value' if display.startswith('--') else 'the file'} holds a character (#x{exc.character:04x}) "
            "that YAML does not allow",
            location=location,
            hint="remove it; a spec is plain text",
        ) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        location = _loc(display, mark) if mark else Location(display)
        problem = exc.problem or exc.context or "invalid YAML"
        if exc.context and exc.problem and exc.context_mark:
            started = exc.context_mark
            problem = f"{exc.problem} ({exc.context} started at line {started.line + 1}, column {started.column + 1})"
        hint = None
        if "found character '\\t'" in problem:
            hint = "YAML indents with spaces, never tabs"
        elif "could not find expected ':'" in problem or "mapping values are not allowed" in problem:
            hint = "check indentation and that every key is followed by ': '"
        raise SpecError(f"YAML syntax error: {problem}", location=location, hint=hint) from None
    except yaml.YAMLError as exc:  # errors without a mark (rare): still one clean message
        raise SpecError(f"YAML error: {exc}", location=Location(display)) from None
    except RecursionError:
        raise SpecError("the spec is nested too deeply", location=Location(display)) from None
    finally:
        if loader is not None:
            loader.dispose()


# ------------------------------------------------------------------------------------------
# extends: merge a spec over the one it builds on
# ------------------------------------------------------------------------------------------


def shipped_specs_dir() -> Path:
    """The specs shipped with tpplan (the top-level specs/ folder, packaged as tpplan.specs)."""
    return Path(str(resources.files("tpplan.specs")))


def _display(path: Path) -> str:
    """A path as messages show it: relative to the working directory, escaped if unprintable."""
    try:
        text = os.path.relpath(path)
    except ValueError:  # another drive on Windows
        text = str(path)
    return text if text.isprintable() else repr(text)


def _merge(base: Any, over: Any) -> Any:
    """Mappings merge key by key; every other value (lists included) is replaced."""
    if isinstance(base, dict) and isinstance(over, dict):
        merged = dict(base)
        for key, value in over.items():
            merged[key] = _merge(base[key], value) if key in base else value
        return merged
    return over


def _merge_marks(base_marks: dict, over_marks: dict, over_data: Any) -> dict:
    """Locations of the merged data: the child's wherever it wrote a value, else the parent's."""
    merged = dict(base_marks)
    for path in over_marks:
        # a value the child wrote replaces the parent's value *and everything under it*
        # unless both are mappings (merged key by key)
        if not isinstance(_get(over_data, path), dict):
            for stale in [p for p in merged if p[: len(path)] == path and len(p) > len(path)]:
                del merged[stale]
    merged.update(over_marks)
    return merged


def _get(data: Any, path: PathKey) -> Any:
    for part in path:
        if isinstance(data, dict) and part in data:
            data = data[part]
        elif isinstance(data, list) and isinstance(part, int) and 0 <= part < len(data):
            data = data[part]
        else:
            return None
    return data


def _find_parent(ref: str, child: Path, where: Location) -> Path:
    candidates = []
    ref_path = Path(os.path.expanduser(ref))
    candidates.append(ref_path if ref_path.is_absolute() else child.parent / ref_path)
    if not ref_path.suffix and os.sep not in ref and "/" not in ref:
        candidates.append(child.parent / f"{ref}.yaml")
        candidates.append(shipped_specs_dir() / f"{ref}.yaml")
    for candidate in candidates:
        if os.path.lexists(candidate) and not candidate.is_dir():
            return candidate.resolve() if candidate.exists() else candidate  # read_input says what it is
    shipped = sorted(p.stem for p in shipped_specs_dir().glob("*.yaml"))
    raise SpecError(
        f"{ref!r} not found (looked for {', '.join(_display(c) for c in candidates)})",
        location=where,
        path="extends",
        hint=f"a path relative to this file, or a shipped spec: {', '.join(shipped)}",
    )


def load_data(
    path: Path, _stack: tuple[Path, ...] = (), _via: Location | None = None, _extends: tuple | None = None
) -> tuple[dict, dict, tuple[Path, ...]]:
    """Read a spec file and everything it extends. Returns (data, marks, chain of files).
    ``_extends`` is (location, value) of a ``--set extends=...``: it replaces the file's own."""
    path = path.resolve() if path.exists() else path
    display = _display(path)
    text = _read_text(path, display, _via)
    data, marks = parse_yaml(text, display)
    if data is None:
        raise SpecError(
            "the spec file is empty", location=Location(display), hint="see specs/tiny-llama.yaml"
        )
    if not isinstance(data, dict):
        raise SpecError(
            f"a spec is a mapping of keys (name, model, plan, ...), not a {_kind(data)}",
            location=marks.get((), (Location(display),) * 2)[1],
        )
    _rebase_paths(data, path.parent, (_stack[0] if _stack else path).parent)
    if _extends is not None:
        where, value = _extends
        for stale in [p for p in marks if p[:1] == ("extends",)]:
            del marks[stale]
        if value is None:
            data.pop("extends", None)
        else:
            data["extends"] = value
            marks[("extends",)] = (where, where)
    ref = data.get("extends")
    if ref is None:
        return data, marks, (path,)
    where = marks[("extends",)][1]
    if not isinstance(ref, str) or not ref.strip():
        raise SpecError(
            "extends takes one spec: a path or a shipped spec's name", location=where, path="extends"
        )
    parent = _find_parent(ref, path, where)
    chain = (*_stack, path)
    if parent in chain:
        cycle = " -> ".join(_display(p) for p in (*chain[chain.index(parent) :], parent))
        raise SpecError(
            f"makes a cycle: {cycle}",
            location=where,
            path="extends",
            hint="a spec cannot build on itself, directly or through others",
        )
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise SpecError(
            f"extends chain is longer than {MAX_EXTENDS_DEPTH} files", location=where, path="extends"
        )
    base, base_marks, base_chain = load_data(parent, chain, where)
    merged = _merge(base, data)
    return merged, _merge_marks(base_marks, marks, data), (path, *base_chain)


def _is_local_path(value: Any, *, always: bool) -> bool:
    """A relative local path: for data files always (unless a URL); for model/tokenizer names only
    when written as one (./x, ../x), since `org/name` is a hub id."""
    if not isinstance(value, str) or not value or "://" in value or os.path.isabs(os.path.expanduser(value)):
        return False
    return always or value.startswith(("./", "../", "~"))


def _rebase_paths(data: dict, directory: Path, root: Path) -> None:
    """Local paths are relative to the file that writes them.  Before `extends` merges files from
    several folders, re-express each parent file's relative paths relative to the root spec's
    folder: the corpus named in specs/tiny-llama.yaml stays that corpus for a spec extending it
    from elsewhere, and every consumer keeps resolving paths against the root spec's folder."""
    if directory == root:
        return

    def rebase(value: str) -> str:
        return os.path.relpath(directory / os.path.expanduser(value), root)

    def rebase_code(value: Any) -> Any:
        """``file.py:name`` (model.factory, a rule's style of one's own); a dotted module stays."""
        if isinstance(value, str) and ":" in value:  # a file path (not a dotted module) before the ':'
            module, _, attr = value.rpartition(":")
            if (module.endswith(".py") or "/" in module) and _is_local_path(module, always=True):
                return f"{rebase(module)}:{attr}"
        return value

    def rebase_rules(rules: Any) -> None:
        for rule in rules if isinstance(rules, list) else ():
            if isinstance(rule, dict):
                if "style" in rule:
                    rule["style"] = rebase_code(rule["style"])
                rebase_rules(rule.get("plan"))

    train = data.get("train")
    if isinstance(train, dict) and isinstance(train.get("data_files"), list):
        train["data_files"] = [rebase(f) if _is_local_path(f, always=True) else f for f in train["data_files"]]
    model = data.get("model")
    if isinstance(model, dict):
        for key in ("name", "tokenizer"):
            if _is_local_path(model.get(key), always=False):
                rebased = rebase(model[key])
                model[key] = rebased if rebased.startswith(".") else f"./{rebased}"  # still reads as a path
        if "factory" in model:
            model["factory"] = rebase_code(model["factory"])
    rebase_rules(data.get("plan"))
    rebase_rules(data.get("plan_overrides"))


def _kind(value: Any) -> str:
    return {
        dict: "mapping",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), "null" if value is None else type(value).__name__)


# ------------------------------------------------------------------------------------------
# pydantic errors -> SpecError with location, field path, expectation, hint
# ------------------------------------------------------------------------------------------


def _data_path(loc: tuple, data: Any) -> PathKey:
    """Drop pydantic's union-branch labels from ``loc``, keeping the real keys and indexes."""
    path: list = []
    current = data
    for i, part in enumerate(loc):
        last = i == len(loc) - 1
        if isinstance(current, dict) and part in current:
            path.append(part)
            current = current[part]
        elif isinstance(current, list) and isinstance(part, int) and 0 <= part < len(current):
            path.append(part)
            current = current[part]
        elif last and isinstance(part, (str, int)) and not _is_branch_label(part):
            path.append(part)  # a missing or extra key: keep it for the message
            current = None
        # else: a union tag or validator label such as 'colwise' or 'function-after[...]'
    return tuple(path)


def _is_branch_label(part: Any) -> bool:
    return isinstance(part, str) and (
        part in STYLE_NAMES or part == GROUP_TAG or "[" in part or part in {"str", "int"}
    )


def _model_at(path: PathKey, data: Any) -> type[BaseModel] | None:
    """The pydantic model class that validates the mapping at ``path`` (for listing its keys)."""
    annotation: Any = Spec
    current = data
    for part in path:
        if isinstance(part, int):
            annotation = _list_item(annotation)
            current = current[part] if isinstance(current, list) and 0 <= part < len(current) else None
            continue
        model = _model_of_annotation(annotation, current)
        field_info = model.model_fields.get(part) if model else None
        if field_info is None:
            return None
        annotation = field_info.annotation
        current = current.get(part) if isinstance(current, dict) else None
    return _model_of_annotation(annotation, current)


def _list_item(annotation: Any) -> Any:
    import typing

    for candidate in (annotation, *typing.get_args(annotation)):
        if typing.get_origin(candidate) is list:
            return typing.get_args(candidate)[0]
    return None


def _model_of_annotation(annotation: Any, value: Any) -> type[BaseModel] | None:
    """The model class an annotation (a model, Optional[model], or the rule union) gives ``value``."""
    import typing

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Annotated:
        return _model_of_annotation(args[0], value)
    if any(_is_rule_class(a) for a in args):
        return _rule_class_for(value)
    for arg in args:
        if typing.get_origin(arg) is list:
            continue
        found = _model_of_annotation(arg, value)
        if found is not None:
            return found
    return None


def _is_rule_class(annotation: Any) -> bool:
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    return isinstance(annotation, type) and (annotation is GroupRule or annotation in STYLE_RULES.values())


def _rule_class_for(value: Any):
    if isinstance(value, dict):
        style = value.get("style")
        if style is None:
            return GroupRule
        return STYLE_RULES.get(style) if isinstance(style, str) else None
    return None


def _closest(word: str, choices) -> str | None:
    found = difflib.get_close_matches(str(word), list(choices), n=1, cutoff=0.6)
    return found[0] if found else None


_EXPECTED = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "dict_type": "a mapping (key: value lines)",
    "list_type": "a list (lines starting with '- ')",
    "model_type": "a mapping (key: value lines)",
    "model_attributes_type": "a mapping (key: value lines)",
    "tuple_type": "a list",
}


def _translate(err: dict, data: Any, source: Source) -> SpecError:
    loc = tuple(err.get("loc", ()))
    kind = err.get("type", "")
    path = _data_path(loc, data)
    given = err.get("input")
    location = source.where(path, key=kind == "extra_forbidden")
    hint = None
    if kind == "extra_forbidden":
        key = path[-1] if path else loc[-1]
        model = _model_at(path[:-1], data)
        valid = sorted(model.model_fields) if model else []
        close = _closest(key, valid)
        message = f"unknown key '{key}'"
        if close:
            hint = f"did you mean '{close}'?"
        elif valid:
            hint = "valid keys here: " + ", ".join(valid)
    elif kind == "missing":
        message = "required key is missing"
        location = source.where(path[:-1])
        model = _model_at(path[:-1], data)
        if model is GroupRule:
            hint = "a rule needs a `style` (" + ", ".join(STYLE_NAMES) + ") or a nested `plan`"
    elif kind == "unknown_style":
        style = given.get("style") if isinstance(given, dict) else None
        path = (*path, "style")
        location = source.where(path)
        message = f"unknown style {short(style)}"
        close = _closest(style, STYLE_NAMES) if isinstance(style, str) else None
        hint = (f"did you mean '{close}'? " if close else "") + "styles: " + ", ".join(STYLE_NAMES)
        if style == GROUP_TAG:
            hint = "a group is a rule with a nested `plan` and no `style` key"
    elif kind == "literal_error":
        expected = (err.get("ctx") or {}).get("expected", "")
        message = f"expected {expected}; got {short(given)}"
        words = [w.strip().strip("'") for w in expected.replace(" or ", ",").split(",")]
        close = _closest(given, words) if isinstance(given, str) else None
        if close:
            hint = f"did you mean '{close}'?"
    elif kind in ("value_error", "assertion_error"):
        error = (err.get("ctx") or {}).get("error")
        message = str(error or err.get("msg", ""))
        subpath = getattr(error, "subpath", ())
        if subpath:  # a FieldError about one key inside the field: point at that key
            path = (*path, *subpath)
            location = source.where(path)
    elif kind == "string_pattern_mismatch":
        message = f"{short(given)} is not allowed here"
        if path and path[-1] == "name":
            hint = "a name is letters, digits, '.', '_' and '-' (it names folders), starting with a letter or digit"
        else:
            hint = f"it must match {(err.get('ctx') or {}).get('pattern')}"
    elif kind in ("too_short", "too_long"):
        ctx = err.get("ctx") or {}
        bound = ctx.get("min_length") if kind == "too_short" else ctx.get("max_length")
        message = f"expected {'at least' if kind == 'too_short' else 'at most'} {bound} item(s), got {ctx.get('actual_length')}"
        if path and path[-1] == "plan":
            hint = "a plan needs at least one rule"
    elif kind in _EXPECTED:
        message = f"expected {_EXPECTED[kind]}, got {_kind(given)} {short(given)}"
    else:
        message = err.get("msg", kind)
    return SpecError(message, location=location, path=format_path(path), hint=hint)


#: the plan a spec without one is validated with (``require_plan=False``), then dropped: ``tpplan derive``
#: reads a spec's model, data, mesh and launch to write the plan itself
_NO_PLAN = [{"match": "*", "style": "replicate"}]


def _validate(data: dict, source: Source, require_plan: bool = True) -> Spec:
    planless = not require_plan and not data.get("plan")
    try:
        spec = Spec.model_validate({**data, "plan": _NO_PLAN} if planless else data)
    except ValidationError as exc:
        errors = [_translate(e, data, source) for e in exc.errors(include_url=False)]
        # one message per place: unions can report the same field twice
        unique: dict[tuple, SpecError] = {}
        for e in errors:
            unique.setdefault((e.path, e.message), e)
        errors = sorted(unique.values(), key=lambda e: (e.location.line if e.location else 0, e.path or ""))
        if len(errors) == 1:
            raise errors[0] from None
        raise SpecErrors(errors) from None
    if planless:
        spec = spec.model_copy(update={"plan": []})
    spec._source = source
    return spec


def _override_items(overrides) -> list[tuple[Location, str, tuple, Any]]:
    """``--set`` items parsed: (where, key, key parts, value); the value is read as YAML (5 is an
    int, true a bool).  Errors point at the item (``--set #2``, or the flag that made it)."""
    items = []
    for i, item in enumerate(overrides or ()):
        label, text_item = item if isinstance(item, tuple) else (f"--set #{i + 1}", item)
        where = Location(label)
        key, sep, text = text_item.partition("=")
        key = key.strip()
        parts = tuple(int(p) if p.isdigit() else p for p in key.split("."))
        if not sep or not all(p != "" for p in parts):
            raise SpecError(
                f"--set takes KEY=VALUE with a dotted key, e.g. train.max_steps=10; got {short(text_item)}",
                location=where,
            )
        if len(parts) > MAX_DEPTH:  # the spec's own nesting limit: a key 3,000 levels deep is not a spec key
            raise SpecError(f"--set key {short(key)} is {len(parts):,} levels deep; a spec has at most {MAX_DEPTH}",
                            location=where)
        value, _ = parse_yaml(text, label) if text.strip() else (None, {})
        if parts[0] == "extends" and (len(parts) > 1 or not (value is None or isinstance(value, str))):
            raise SpecError("extends takes one spec: a path or a shipped spec's name", location=where,
                            path="extends")
        items.append((where, key, parts, value))
    return items


def _apply_overrides(data: dict, marks: dict, items) -> None:
    """Set each item's value in ``data``; its location (and that of everything under it) becomes
    the item, so an error in the value points at the ``--set``, not at the spec line it replaced."""
    for where, key, parts, value in items:
        if parts == ("extends",):
            continue  # applied before the spec is merged (load_spec)
        target: Any = data
        for n, part in enumerate(parts[:-1]):
            if isinstance(target, list):
                if not isinstance(part, int) or not 0 <= part < len(target):
                    raise SpecError(f"--set {key}: {format_path(parts[:n])} has no item {part}", location=where,
                                    path=format_path(parts[: n + 1]))
                child = target[part]
            else:
                child = target.get(part) if isinstance(part, str) else None
                if child is None and isinstance(part, str):
                    child = target[part] = {}
                    marks[parts[: n + 1]] = (where, where)
            if not isinstance(child, (dict, list)):
                raise SpecError(f"--set {key}: {format_path(parts[: n + 1])} is not a mapping or a list",
                                location=where, path=format_path(parts[: n + 1]))
            target = child
        last = parts[-1]
        if isinstance(target, list):
            if not isinstance(last, int) or not 0 <= last < len(target):
                raise SpecError(f"--set {key}: {format_path(parts[:-1])} has no item {last}", location=where,
                                path=format_path(parts))
        elif not isinstance(last, str):
            last = str(last)
            parts = (*parts[:-1], last)
        target[last] = value
        for stale in [p for p in marks if p[: len(parts)] == parts]:
            del marks[stale]
        _mark_all(marks, parts, value, where)


def _mark_all(marks: dict, path: tuple, value: Any, where: Location) -> None:
    marks[path] = (where, where)
    if isinstance(value, dict):
        for k, v in value.items():
            _mark_all(marks, (*path, k), v, where)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            _mark_all(marks, (*path, i), v, where)


def load_spec(path: str | os.PathLike, overrides: list | None = None, *, require_plan: bool = True) -> Spec:
    """Load, merge (``extends``) and validate one spec file; ``overrides`` are ``--set`` items
    (``KEY=VALUE`` strings, or ``(label, KEY=VALUE)`` pairs for a flag that sets a value).
    ``--set extends=OTHER`` builds on OTHER instead (a path relative to the working directory,
    or a shipped spec's name); ``--set extends=null`` drops the spec's own ``extends``.
    ``require_plan=False``: a spec without a ``plan`` loads with an empty one (``tpplan derive``)."""
    spec_path = Path(path)
    if not spec_path.exists() and not spec_path.suffix and (shipped_specs_dir() / f"{path}.yaml").is_file():
        spec_path = shipped_specs_dir() / f"{path}.yaml"  # `tpplan check llama3` finds the shipped spec
    items = _override_items(overrides)
    extends = next(((where, value) for where, _, parts, value in reversed(items) if parts == ("extends",)), None)
    if extends is not None and isinstance(extends[1], str):
        ref = os.path.expanduser(extends[1])
        if not os.path.isabs(ref) and (os.path.lexists(ref) or Path(ref).suffix or "/" in ref):
            extends = (extends[0], os.path.abspath(ref))  # a path given on the command line: from here
    data, marks, chain = load_data(spec_path, _extends=extends)
    _apply_overrides(data, marks, items)
    resolved = spec_path.resolve() if spec_path.exists() else spec_path
    source = Source(path=resolved, marks=marks, chain=chain)
    return _validate(data, source, require_plan)


def load_spec_text(text: str, name: str = "<spec>", directory: str | os.PathLike = ".") -> Spec:
    """Validate spec YAML given as text (no ``extends``); used by tests and ``--set`` overrides."""
    data, marks = parse_yaml(text, name)
    if not isinstance(data, dict):
        raise SpecError(f"a spec is a mapping of keys, not a {_kind(data)}", location=Location(name))
    if "extends" in data:
        raise SpecError("extends needs a spec file on disk", location=marks[("extends",)][1], path="extends")
    return _validate(data, Source(path=Path(directory) / name, marks=marks, chain=()))
