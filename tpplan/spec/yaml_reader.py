"""One spec file's YAML -> plain data, keeping every value's file, line and column for error messages.

Only YAML's safe subset is read (plain data: mappings, lists, strings, numbers, booleans, null),
from a regular file of at most :data:`MAX_SPEC_BYTES`, with at most :data:`MAX_NODES` values and
:data:`MAX_DEPTH` levels.  Holds :class:`Source` (where a loaded spec came from, and the location of
every value in it), :func:`format_path` (``plan[3].style``), :func:`read_text` and
:func:`parse_yaml`, and :func:`kind` (a value's kind as messages name it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tpplan.core.errors import Location, SpecError, short
from tpplan.core.fileio import FileProblem, read_input

MAX_SPEC_BYTES = 1 << 20  # a spec is a page of YAML; a megabyte is already absurd
MAX_NODES = 100_000  # counts alias re-visits too, so a "billion laughs" file stops early
MAX_DEPTH = 64

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


def read_text(path: Path, display: str, via: Location | None = None) -> str:
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


def kind(value: Any) -> str:
    return {
        dict: "mapping",
        list: "list",
        str: "string",
        bool: "boolean",
        int: "integer",
        float: "number",
    }.get(type(value), "null" if value is None else type(value).__name__)
