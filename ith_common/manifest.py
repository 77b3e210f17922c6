"""Span manifest: the versioned contract between the span detector (JAX) and the audio sidecar (torch).

A manifest is a JSON Lines file, one object per sentence (format in `docs/manifest.md`):

    {"schema_version": 1, "id": "animal/dev.csv:2", "task": "animal", "source": "data/animal/dev.csv",
     "row": 2, "sentence": "Squeal is the sound a [MASK] makes.",
     "spans": [{"text": "Squeal", "start": 0, "end": 6, "confidence": null}],
     "gold_spans": [{"text": "Squeal", "start": 0, "end": 6}], "detector": "gold"}

Standard library only: both halves use it.
"""

from __future__ import annotations

import json
import math
import os
import pathlib
from typing import Any, Iterable, Iterator

from ith_common.atomic import atomic_write_bytes
from ith_common.errors import UserError

SCHEMA_VERSION = 1
TASKS = ("pitch", "animal")

# Top-level keys in the order they are written; every one is required.
RECORD_KEYS = ("schema_version", "id", "task", "source", "row", "sentence", "spans", "gold_spans", "detector")
SPAN_KEYS = ("text", "start", "end", "confidence")
GOLD_SPAN_KEYS = ("text", "start", "end")


class ManifestError(UserError):
    """A manifest record or file that breaks the schema; the message names file, line and field."""


def _where(line: int | None) -> str:
    return f"line {line}: " if line is not None else ""


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _is_int(value: Any) -> bool:
    # bool is a subclass of int, but `"row": true` is a mistake, not a row number.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_text(value: Any, field: str, line: int | None, *, allow_empty: bool = False) -> None:
    if not isinstance(value, str):
        raise ManifestError(f"{_where(line)}field '{field}': expected a string, got {_type_name(value)}")
    if not allow_empty and not value:
        raise ManifestError(f"{_where(line)}field '{field}': expected a non-empty string, got \"\"")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates cannot be written as UTF-8 and would corrupt the file for every other reader.
        raise ManifestError(f"{_where(line)}field '{field}': expected valid Unicode text, "
                            "got a string with a lone surrogate") from None


def _check_span(span: Any, field: str, sentence: str, line: int | None, *, gold: bool) -> None:
    expected_keys = GOLD_SPAN_KEYS if gold else SPAN_KEYS
    if not isinstance(span, dict):
        raise ManifestError(f"{_where(line)}field '{field}': expected an object with keys "
                            f"{', '.join(expected_keys)}, got {_type_name(span)}")
    for key in expected_keys:
        if key not in span:
            raise ManifestError(f"{_where(line)}field '{field}.{key}': missing (required key)")
    # Gold spans may carry a confidence of null (a gold manifest copies its spans), nothing else.
    allowed = set(expected_keys) | ({"confidence"} if gold else set())
    extra = sorted(set(span) - allowed)
    if extra:
        raise ManifestError(f"{_where(line)}field '{field}.{extra[0]}': unknown key "
                            f"(expected only {', '.join(expected_keys)})")
    _check_text(span["text"], f"{field}.text", line)
    start, end = span["start"], span["end"]
    if not _is_int(start) or start < 0:
        raise ManifestError(f"{_where(line)}field '{field}.start': expected an integer >= 0, got {start!r}")
    if not _is_int(end) or end <= start or end > len(sentence):
        raise ManifestError(f"{_where(line)}field '{field}.end': expected an integer in "
                            f"({start}, {len(sentence)}] (start < end <= len(sentence)), got {end!r}")
    if sentence[start:end] != span["text"]:
        raise ManifestError(f"{_where(line)}field '{field}.text': expected sentence[{start}:{end}] == text, "
                            f"but sentence[{start}:{end}] is {sentence[start:end]!r} and text is {span['text']!r}")
    if "confidence" in span:
        confidence = span["confidence"]
        if gold and confidence is not None:
            raise ManifestError(f"{_where(line)}field '{field}.confidence': expected null in gold spans, "
                                f"got {confidence!r}")
        if confidence is not None:
            if (not isinstance(confidence, (int, float)) or isinstance(confidence, bool)
                    or not math.isfinite(confidence) or not 0.0 <= confidence <= 1.0):
                raise ManifestError(f"{_where(line)}field '{field}.confidence': expected null or a "
                                    f"probability in [0, 1], got {confidence!r}")


def _check_span_list(value: Any, field: str, sentence: str, line: int | None, *, gold: bool) -> None:
    if not isinstance(value, list):
        raise ManifestError(f"{_where(line)}field '{field}': expected a list of span objects, "
                            f"got {_type_name(value)}")
    for index, span in enumerate(value):
        _check_span(span, f"{field}[{index}]", sentence, line, gold=gold)


def expected_id(task: str, source: str, row: int) -> str:
    """The record id the schema prescribes: `<task>/<split file name>:<row>`."""
    return f"{task}/{pathlib.PurePath(source).name}:{row}"


def validate_record(obj: Any, *, line: int | None = None) -> None:
    """Raise `ManifestError` (naming `line` and the field) unless `obj` is a valid schema-1 record."""
    if not isinstance(obj, dict):
        raise ManifestError(f"{_where(line)}expected a JSON object, got {_type_name(obj)}")
    # schema_version first: a record from another version should say so, not complain about a field.
    if "schema_version" not in obj:
        raise ManifestError(f"{_where(line)}field 'schema_version': missing (required key)")
    version = obj["schema_version"]
    if not _is_int(version) or version != SCHEMA_VERSION:
        raise ManifestError(f"{_where(line)}field 'schema_version': expected {SCHEMA_VERSION}, got {version!r}")
    for key in RECORD_KEYS:
        if key not in obj:
            raise ManifestError(f"{_where(line)}field '{key}': missing (required key)")
    extra = sorted(set(obj) - set(RECORD_KEYS))
    if extra:
        raise ManifestError(f"{_where(line)}field '{extra[0]}': unknown key (schema {SCHEMA_VERSION} has "
                            f"{', '.join(RECORD_KEYS)})")

    task = obj["task"]
    if task not in TASKS:
        raise ManifestError(f"{_where(line)}field 'task': expected one of {', '.join(TASKS)}, got {task!r}")
    _check_text(obj["source"], "source", line)
    row = obj["row"]
    if not _is_int(row) or row < 1:
        raise ManifestError(f"{_where(line)}field 'row': expected an integer >= 1 (1-based data row), got {row!r}")
    _check_text(obj["id"], "id", line)
    want_id = expected_id(task, obj["source"], row)
    if obj["id"] != want_id:
        raise ManifestError(f"{_where(line)}field 'id': expected {want_id!r} (<task>/<split file name>:<row>), "
                            f"got {obj['id']!r}")
    _check_text(obj["sentence"], "sentence", line)
    sentence = obj["sentence"]
    _check_span_list(obj["spans"], "spans", sentence, line, gold=False)
    if obj["gold_spans"] is not None:
        _check_span_list(obj["gold_spans"], "gold_spans", sentence, line, gold=True)
    _check_text(obj["detector"], "detector", line)


def read_manifest(path: str | os.PathLike) -> list[dict]:
    """Read and validate every line of a manifest; errors name the file, the line and the field.

    Blank lines are skipped.  Ids must be unique within the file.
    """
    path = pathlib.Path(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ManifestError(f"{path}: cannot read manifest: {exc.strerror or exc}") from None
    records: list[dict] = []
    first_line_of_id: dict[str, int] = {}
    for line_number, raw_line in enumerate(raw.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            text = raw_line.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ManifestError(f"{path}: line {line_number}: not valid UTF-8 (byte {exc.start})") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ManifestError(f"{path}: line {line_number}: invalid JSON: {exc.msg} at column {exc.colno}") from None
        try:
            validate_record(obj, line=line_number)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        record_id = obj["id"]
        if record_id in first_line_of_id:
            raise ManifestError(f"{path}: line {line_number}: field 'id': duplicate id {record_id!r} "
                                f"(first on line {first_line_of_id[record_id]})")
        first_line_of_id[record_id] = line_number
        records.append(obj)
    return records


def _canonical_record(record: dict) -> dict:
    """The record with its keys in schema order (so manifests diff nicely)."""
    def span(s: dict, keys: tuple[str, ...]) -> dict:
        return {k: s[k] for k in keys if k in s}
    out = {k: record[k] for k in RECORD_KEYS}
    out["spans"] = [span(s, SPAN_KEYS) for s in record["spans"]]
    if record["gold_spans"] is not None:
        out["gold_spans"] = [span(s, SPAN_KEYS) for s in record["gold_spans"]]  # keeps a null confidence
    return out


def write_manifest(records: Iterable[dict], path: str | os.PathLike) -> None:
    """Validate `records` and write them to `path` atomically (temp file, fsync, rename, fsync dir).

    Nothing is written if any record is invalid (the error names its 1-based line in the output) or if two
    records share an id.
    """
    path = pathlib.Path(path)
    lines: list[str] = []
    first_line_of_id: dict[str, int] = {}
    for line_number, record in enumerate(records, start=1):
        try:
            validate_record(record, line=line_number)
        except ManifestError as exc:
            raise ManifestError(f"{path}: {exc}") from None
        if record["id"] in first_line_of_id:
            raise ManifestError(f"{path}: line {line_number}: field 'id': duplicate id {record['id']!r} "
                                f"(first on line {first_line_of_id[record['id']]})")
        first_line_of_id[record["id"]] = line_number
        lines.append(json.dumps(_canonical_record(record), ensure_ascii=False, allow_nan=False))
    atomic_write_bytes(path, ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8"))


def iter_spans(records: Iterable[dict]) -> Iterator[tuple[str, int, str]]:
    """Yield `(record_id, span_index, span_text)` for every predicted span, in file order."""
    for record in records:
        for span_index, span in enumerate(record["spans"]):
            yield record["id"], span_index, span["text"]
