"""AuditoryBench CSV splits: loading and validation into ``Example`` records, with a count of every defect.

``load_examples(path, task=None, *, strict=False) -> (list[Example], LoadReport)`` reads one CSV split with
the ``csv`` module, columns by NAME (any order, extra columns ignored):

* animal: ``animal`` (the answer), the sound span in ``span`` (train) or ``description`` (dev/test/wiki),
  ``sentence``; optionally the four options ``A``-``D`` and ``Answer`` (the letter of the right one).
* pitch: ``sentence``, ``answer`` (``lower``/``higher``, any case), ``span1``, ``span2``.

``task=None`` infers the task from the header. Every field is stripped of surrounding whitespace. ``row``
numbers count CSV records from 1 (the header is row 0; blank lines are skipped and not numbered); messages
also give the physical line, which differs when a quoted field holds a newline.

Defects are counted for every row (a row can have several) and listed in the ``LoadReport``:

* ``mask_count``: the sentence does not hold exactly one ``[MASK]`` -- row dropped.
* ``empty_field``: a required field is empty -- row dropped; an empty option (``A``-``D``) or ``Answer``
  only drops the multiple-choice part (row kept with ``options=None``).
* ``field_count``: the row has more or fewer fields than the header (an unquoted comma) -- row dropped.
* ``span_not_found``: a non-empty span is not in its sentence (case-insensitive; one count per row) --
  row kept, flagged: the LM does not need the span.
* ``answer_mismatch``: the option ``Answer`` points at differs from ``animal`` (case-insensitive) --
  row kept.

With ``strict=True`` each of these raises ``UserError`` naming file, row and field instead.
Wrong labels are never skippable: a pitch ``answer`` other than lower/higher or an
``Answer`` letter other than A-D raises ``UserError`` even when not strict. ``[MASK]`` is matched
case-sensitively (the tokenizer only knows the upper-case special token).

``find_span``/``find_spans`` locate span texts in a sentence by character offsets; the loader uses them for
``span_not_found`` and the encoders (``ith_jax.data.mlm``, ``ith_jax.data.spans``) to map spans to tokens.
"""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from ith_common.errors import UserError
from ith_jax.data.tokenizer import MASK_TOKEN

TASKS = ("animal", "pitch")
PITCH_LABELS = ("lower", "higher")
OPTION_LETTERS = ("A", "B", "C", "D")

ANIMAL_SPAN_COLUMNS = ("span", "description")
PITCH_COLUMNS = ("sentence", "answer", "span1", "span2")

DEFECT_KINDS = ("mask_count", "empty_field", "field_count", "span_not_found", "answer_mismatch")
_DEFECT_TEXT = {
    "mask_count": "sentence without exactly one [MASK]",
    "empty_field": "empty field",
    "field_count": "wrong number of fields",
    "span_not_found": "span not found in sentence",
    "answer_mismatch": "Answer option differs from animal",
}
_DROPPING_DEFECTS = frozenset({"mask_count", "field_count"})  # empty_field drops only required fields


# ----------------------------------------------------------------------------------------------------------
# Examples and load reports
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Example:
    """One AuditoryBench row. ``spans`` holds one span (animal) or two (pitch)."""

    task: str
    source: str
    row: int
    sentence: str
    answer: str
    spans: tuple[str, ...]
    options: tuple[str, ...] | None = None
    option_answer: str | None = None

    @property
    def option_answer_index(self) -> int | None:
        """Index into ``options`` of the ``Answer`` letter, or None without options."""
        if self.options is None or self.option_answer is None:
            return None
        return OPTION_LETTERS.index(self.option_answer)

    @property
    def where(self) -> str:
        return f"{self.source} row {self.row}"


@dataclass
class LoadReport:
    """What ``load_examples`` saw. ``defects[kind]`` lists ``(source, row)`` pairs, one per defective row."""

    task: str
    sources: list[str]
    rows_read: int = 0
    rows_kept: int = 0
    defects: dict[str, list[tuple[str, int]]] = field(default_factory=lambda: {k: [] for k in DEFECT_KINDS})
    dropped: list[tuple[str, int]] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return len(self.defects[kind])

    def rows(self, kind: str, source: str | None = None) -> list[int]:
        """Row numbers with defect ``kind`` (of one source, or of all when ``source`` is None)."""
        return [row for src, row in self.defects[kind] if source is None or src == source]

    @property
    def rows_dropped(self) -> int:
        return len(self.dropped)

    def summary(self) -> str:
        """One short paragraph for the log."""
        where = ", ".join(self.sources)
        text = f"{where} ({self.task}): read {self.rows_read} rows, kept {self.rows_kept}, dropped {self.rows_dropped}."
        parts = []
        for kind in DEFECT_KINDS:
            rows = self.defects[kind]
            if not rows:
                continue
            shown = ", ".join(str(r) if len(self.sources) == 1 else f"{Path(s).name}:{r}" for s, r in rows[:5])
            more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
            parts.append(f"{_DEFECT_TEXT[kind]}: {len(rows)} (rows {shown}{more})")
        text += " Defects: " + ("; ".join(parts) + "." if parts else "none.")
        return text

    @staticmethod
    def combine(reports: Sequence["LoadReport"]) -> "LoadReport":
        tasks = sorted({r.task for r in reports})
        combined = LoadReport(task="+".join(tasks), sources=[s for r in reports for s in r.sources])
        for r in reports:
            combined.rows_read += r.rows_read
            combined.rows_kept += r.rows_kept
            combined.dropped.extend(r.dropped)
            for kind in DEFECT_KINDS:
                combined.defects[kind].extend(r.defects[kind])
        return combined


# ----------------------------------------------------------------------------------------------------------
# Spans
# ----------------------------------------------------------------------------------------------------------


def _lower_keep_length(text: str) -> str:
    # str.lower() can change the length ('İ' -> 'i̇'); keeping one char per char keeps offsets valid.
    lowered = text.lower()
    if len(lowered) == len(text):
        return lowered
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in text)


def _is_word_char(c: str) -> bool:
    return c.isalnum()


def find_span(sentence: str, span: str, start: int = 0) -> tuple[int, int] | None:
    """Case-insensitive character offsets ``(start, end)`` of ``span`` in ``sentence``, or None.

    The first occurrence at or after ``start`` that sits on word boundaries wins; only when there is none
    is the first occurrence inside a word used (so "owl" in "a bowl and an owl" is the second "owl").
    """
    span = span.strip()
    if not span:
        return None
    haystack = _lower_keep_length(sentence)
    needle = _lower_keep_length(span)
    first_any = None
    pos = haystack.find(needle, start)
    while pos >= 0:
        end = pos + len(needle)
        if first_any is None:
            first_any = (pos, end)
        left_ok = pos == 0 or not (_is_word_char(sentence[pos - 1]) and _is_word_char(sentence[pos]))
        right_ok = end == len(sentence) or not (_is_word_char(sentence[end]) and _is_word_char(sentence[end - 1]))
        if left_ok and right_ok:
            return (pos, end)
        pos = haystack.find(needle, pos + 1)
    return first_any


def find_spans(sentence: str, spans: Sequence[str]) -> list[tuple[int, int] | None]:
    """Locate several spans of one sentence; a later span prefers an occurrence that does not overlap an
    earlier span's (pitch span1/span2 can be the same text: "the sound of rain ... than the sound of rain")."""
    found: list[tuple[int, int] | None] = []
    for span in spans:
        taken = [f for f in found if f is not None]
        choice = None
        search_from = 0
        while True:
            candidate = find_span(sentence, span, search_from)
            if candidate is None:
                break
            if not any(candidate[0] < e and s < candidate[1] for s, e in taken):
                choice = candidate
                break
            search_from = candidate[0] + 1
        found.append(choice if choice is not None else find_span(sentence, span))
    return found


# ----------------------------------------------------------------------------------------------------------
# Loading CSV files
# ----------------------------------------------------------------------------------------------------------


def _read_text(path: Path) -> str:
    if not path.exists():
        raise UserError(f"{path}: file not found")
    if not path.is_file():
        raise UserError(f"{path}: not a file")
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        offset = exc.start
        prefix = data[:offset].decode("utf-8-sig", errors="replace")
        line = prefix.count("\n") + 1
        # Count the CSV records before the bad byte; the record holding it is the last, possibly partial, one.
        records = [r for r in csv.reader(io.StringIO(prefix, newline="")) if r]
        row = len(records) - 1 if prefix and not prefix.endswith("\n") else len(records)
        raise UserError(
            f"{path} row {max(row, 0)} (line {line}): not valid UTF-8, byte 0x{data[offset]:02x} at byte offset "
            f"{offset}; save the file as UTF-8"
        ) from None


class _guarded:
    """A csv reader whose parse errors (an unterminated quote, a huge field) become UserErrors."""

    def __init__(self, reader, source: str):
        self._reader, self._source = reader, source

    @property
    def line_num(self) -> int:
        return self._reader.line_num

    def __iter__(self):
        return self

    def __next__(self):
        try:
            return next(self._reader)
        except csv.Error as exc:
            raise UserError(
                f"{self._source} line {self._reader.line_num}: malformed CSV ({exc}); "
                'expected comma-separated fields, quoted with " where needed'
            ) from None


def infer_task(columns: Iterable[str], source: str = "<csv>") -> str:
    """``animal`` or ``pitch`` from a header, else ``UserError``."""
    cols = set(columns)
    is_animal = {"animal", "sentence"} <= cols and any(c in cols for c in ANIMAL_SPAN_COLUMNS)
    is_pitch = set(PITCH_COLUMNS) <= cols
    if is_animal and is_pitch:
        raise UserError(f"{source}: header fits both tasks (animal and pitch); pass task= explicitly")
    if is_animal:
        return "animal"
    if is_pitch:
        return "pitch"
    raise UserError(
        f"{source}: cannot tell the task from the header; expected animal columns "
        f"(animal, span or description, sentence) or pitch columns ({', '.join(PITCH_COLUMNS)}), "
        f"found {', '.join(columns) or 'nothing'}"
    )


def _check_columns(header: list[str], task: str, source: str) -> dict[str, str]:
    """Map each role to its column name; UserError on missing or ambiguous columns."""
    found = ", ".join(header)
    if task == "pitch":
        missing = [c for c in PITCH_COLUMNS if c not in header]
        if missing:
            raise UserError(
                f"{source}: missing column(s) {', '.join(missing)} for task pitch; "
                f"expected {', '.join(PITCH_COLUMNS)}; found {found}"
            )
        return {c: c for c in PITCH_COLUMNS}
    if task != "animal":
        raise UserError(f"{source}: unknown task {task!r}; expected one of {', '.join(TASKS)}")
    span_cols = [c for c in ANIMAL_SPAN_COLUMNS if c in header]
    missing = [c for c in ("animal", "sentence") if c not in header]
    if not span_cols:
        missing.append("span (or description)")
    if missing:
        raise UserError(
            f"{source}: missing column(s) {', '.join(missing)} for task animal; "
            f"expected animal, span or description, sentence (optional A-D and Answer); found {found}"
        )
    if len(span_cols) > 1:
        raise UserError(f"{source}: both 'span' and 'description' columns present; expected one of them")
    roles = {"animal": "animal", "sentence": "sentence", "span": span_cols[0]}
    mc_cols = [c for c in (*OPTION_LETTERS, "Answer") if c in header]
    if mc_cols and len(mc_cols) < 5:
        absent = [c for c in (*OPTION_LETTERS, "Answer") if c not in header]
        raise UserError(
            f"{source}: multiple-choice columns incomplete: missing {', '.join(absent)}; expected A, B, C, D "
            f"and Answer together (or none of them); found {found}"
        )
    if mc_cols:
        roles.update({c: c for c in (*OPTION_LETTERS, "Answer")})
    return roles


def load_examples(path, task: str | None = None, *, strict: bool = False) -> tuple[list[Example], LoadReport]:
    """Load one AuditoryBench CSV split; see the module docstring for columns, defects and errors."""
    path = Path(path)
    source = str(path)
    text = _read_text(path)
    # strict: a stray quote raises instead of silently swallowing the rest of the file into one field
    reader = _guarded(csv.reader(io.StringIO(text, newline=""), strict=True), source)
    header = next(reader, None)
    if header is None:
        raise UserError(f"{source}: empty file; expected a header row")
    header = [h.strip() for h in header]
    duplicates = sorted({h for h in header if h and header.count(h) > 1})
    if duplicates:
        raise UserError(f"{source}: duplicate column(s) {', '.join(duplicates)} in the header")
    if task is None:
        task = infer_task(header, source)
    roles = _check_columns(header, task, source)
    index = {name: header.index(name) for name in roles.values()}
    has_options = "Answer" in roles

    report = LoadReport(task=task, sources=[source])
    examples: list[Example] = []
    row = 0
    for record in reader:
        if not record or all(not cell.strip() for cell in record):
            continue  # blank line
        row += 1
        report.rows_read += 1
        where = f"{source} row {row} (line {reader.line_num})"
        row_defects: list[str] = []

        def defect(kind: str, message: str) -> None:
            if strict:
                raise UserError(f"{where}: {message}")
            row_defects.append(kind)

        if len(record) != len(header):
            defect("field_count", f"expected {len(header)} fields as in the header, found {len(record)}")
        cells = {name: (record[i].strip() if i < len(record) else "") for name, i in index.items()}

        required = ("sentence", "answer", "span1", "span2") if task == "pitch" else ("animal", "sentence", "span")
        empty_required = [roles[r] for r in required if not cells[roles[r]]]
        empty_optional = [c for c in (*OPTION_LETTERS, "Answer") if has_options and not cells[c]]
        for name in empty_required + empty_optional:
            defect("empty_field", f"field '{name}' is empty; expected a value")

        sentence = cells["sentence"]
        if sentence and sentence.count(MASK_TOKEN) != 1:
            defect("mask_count", f"field 'sentence' has {sentence.count(MASK_TOKEN)} {MASK_TOKEN}; expected exactly one")

        if task == "pitch":
            answer = cells["answer"].lower()
            if cells["answer"] and answer not in PITCH_LABELS:
                raise UserError(f"{where}, field 'answer': expected 'lower' or 'higher', got {cells['answer']!r}")
            spans = (cells["span1"], cells["span2"])
            span_names = ("span1", "span2")
        else:
            answer = cells["animal"]
            spans = (cells[roles["span"]],)
            span_names = (roles["span"],)

        for name, span in zip(span_names, spans):
            if span and sentence and find_span(sentence, span) is None:
                defect("span_not_found", f"field '{name}' {span!r} does not occur in the sentence (case-insensitive)")
                break  # one count per row, as in the README's table

        options = option_answer = None
        if has_options and not empty_optional:
            letter = cells["Answer"].upper()
            if letter not in OPTION_LETTERS:
                raise UserError(f"{where}, field 'Answer': expected one of A, B, C, D, got {cells['Answer']!r}")
            options = tuple(cells[c] for c in OPTION_LETTERS)
            option_answer = letter
            chosen = cells[letter]
            if answer and chosen.lower() != answer.lower():
                defect(
                    "answer_mismatch",
                    f"field 'Answer' is {letter} = {chosen!r} but field 'animal' is {answer!r}; expected the same",
                )

        for kind in dict.fromkeys(row_defects):
            report.defects[kind].append((source, row))
        if _DROPPING_DEFECTS.intersection(row_defects) or empty_required:
            report.dropped.append((source, row))
            continue
        examples.append(
            Example(
                task=task,
                source=source,
                row=row,
                sentence=sentence,
                answer=answer,
                spans=spans,
                options=options,
                option_answer=option_answer,
            )
        )
    report.rows_kept = len(examples)
    return examples, report


def load_many(paths: Sequence, task: str | None = None, strict: bool = False) -> tuple[list[Example], LoadReport]:
    """``load_examples`` over several files, concatenated in order; one combined report."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    if not paths:
        raise UserError("load_many: no files given; expected at least one CSV path")
    examples: list[Example] = []
    reports = []
    for path in paths:
        exs, report = load_examples(path, task, strict=strict)
        examples.extend(exs)
        reports.append(report)
    return examples, LoadReport.combine(reports)
