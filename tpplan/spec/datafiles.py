"""Local data files, looked at before any rank starts.

``tpplan run`` and ``tpplan compile`` open each of the spec's ``train.data_files`` and read its
first bytes (capped): a regular file, not empty, text where text is expected, and holding the
spec's ``text_column``.  A bad file is one message with exit 2 naming the columns that exist,
instead of a wall of per-rank tracebacks from ``datasets`` after the ranks started.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from tpplan.core.errors import TpplanError, short
from tpplan.core.fileio import FileProblem, read_input, shown

SNIFF_BYTES = 1 << 20  # enough for the first records of any sane data file
_BUILDERS = {".json": "json", ".jsonl": "json", ".txt": "text", ".csv": "csv", ".tsv": "csv", ".parquet": "parquet"}


class DataFileError(TpplanError):
    """A data file that training could not read; ``column`` when the text column is the problem."""

    def __init__(self, message: str, *, hint: str | None = None, column: bool = False):
        super().__init__(message, hint)
        self.column = column


def builder_for(dataset: str, path: Path) -> str | None:
    """The ``datasets`` builder that reads ``path``: the spec's ``dataset`` when it names one,
    else the one ``datasets`` infers from the file's extension (None: not checked further)."""
    if dataset in ("json", "text", "csv", "parquet"):
        return dataset
    suffixes = [s.lower() for s in path.suffixes]
    for suffix in reversed(suffixes):
        if suffix in _BUILDERS:
            return _BUILDERS[suffix]
    return None


def check_data_file(path: Path, dataset: str, text_column: str) -> None:
    """Raise :class:`DataFileError` when training could not read ``text_column`` from ``path``."""
    display = shown(path)
    try:
        head = read_input(path, limit=SNIFF_BYTES, what="data file", prefix=True)
    except FileProblem as exc:
        raise DataFileError(exc.message, hint=exc.hint) from None
    if not head.strip():
        raise DataFileError(f"data file {display} is empty", hint="give a file with training text")
    builder = builder_for(dataset, path)
    if builder == "parquet":
        _check_parquet(path, display, text_column)
        return
    if builder is None:
        return
    if b"\0" in head:
        raise DataFileError(
            f"data file {display} is binary (it holds NUL bytes), not {builder} text",
            hint="is this the right file? json, csv and text data are UTF-8 text",
        )
    complete = len(head) < SNIFF_BYTES
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError as exc:
        if complete or exc.start < len(head) - 4:  # not a character cut at the end of what was read
            raise DataFileError(f"data file {display} is not UTF-8 text (byte {exc.start:,} cannot be decoded)",
                                hint="save the data as UTF-8") from None
        text = head[: exc.start].decode("utf-8")
    if builder == "text":
        if text_column != "text":
            raise DataFileError(f"a text data file has one column, 'text'; train.text_column is {short(text_column)}",
                                column=True, hint="set train.text_column: text")
        return
    columns = _csv_columns(text) if builder == "csv" else _json_columns(text, display, complete)
    if columns is None:
        return  # the first record does not fit in the bytes read: datasets will say
    if text_column not in columns:
        shown_columns = ", ".join(repr(c) for c in columns[:20]) if columns else "none"
        raise DataFileError(
            f"data file {display} has no column {short(text_column)}; its columns: {shown_columns}",
            column=True,
            hint="set train.text_column to the column that holds the text",
        )


def _json_columns(text: str, display: str, complete: bool) -> list[str] | None:
    """The keys of the first record of JSON lines or a JSON array (None: not decided)."""
    stripped = text.lstrip()
    decoder = json.JSONDecoder()
    try:
        if stripped.startswith("["):
            rest = stripped[1:].lstrip()
            if rest.startswith("]"):
                raise DataFileError(f"data file {display} is an empty JSON list", hint="give records with text")
            record, _ = decoder.raw_decode(rest)
        else:
            first = stripped.split("\n", 1)[0]
            if "\n" not in stripped and not complete:
                return None
            record = json.loads(first)
    except DataFileError:
        raise
    except ValueError as exc:
        if not complete and isinstance(exc, json.JSONDecodeError) and exc.pos >= len(stripped) - 1:
            return None
        raise DataFileError(
            f"data file {display} is not JSON lines or a JSON list of records: {str(exc).splitlines()[0]}",
            hint="json data is one object per line ({\"text\": ...}) or a list of such objects",
        ) from None
    if not isinstance(record, dict):
        raise DataFileError(
            f"data file {display} has no columns: its first record is {short(record)}, not an object",
            hint="json data is one object per line, e.g. {\"text\": \"...\"}",
        )
    return [str(k) for k in record]


def _csv_columns(text: str) -> list[str]:
    first = text.split("\n", 1)[0]
    row = next(csv.reader(io.StringIO(first)), [])
    return [c.strip() for c in row]


def _check_parquet(path: Path, display: str, text_column: str) -> None:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - datasets depends on pyarrow
        return
    try:
        names = list(pq.read_schema(os.fspath(path)).names)
    except Exception as exc:  # noqa: BLE001 - pyarrow's own error on a file that is not parquet
        raise DataFileError(f"data file {display} is not a parquet file: {str(exc).splitlines()[0]}") from None
    if text_column not in names:
        raise DataFileError(
            f"data file {display} has no column {short(text_column)}; its columns: "
            + (", ".join(repr(c) for c in names[:20]) or "none"),
            column=True,
            hint="set train.text_column to the column that holds the text",
        )
