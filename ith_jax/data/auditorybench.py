"""AuditoryBench: loading, validation, tokenisation and masked-LM encoding.

Loading
-------
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

Tokenizer
---------
``load_tokenizer(path_or_id)`` returns a ``tokenizers.Tokenizer`` with truncation and padding switched
off: the checkpoint's ``tokenizer.json`` when there is one, else a BERT WordPiece tokenizer built from
``vocab.txt`` and ``tokenizer_config.json`` (``do_lower_case`` defaults to True). ``tokenizer_info(tok)``
gives the special ids (``mask_id``, ``cls_id``, ``sep_id``, ``pad_id``, ``unk_id``) and ``token_to_id``.

MLM encoding
------------
``encode_mlm(examples, tokenizer, *, max_length=128, strict=False) -> (list[EncodedExample], EncodeReport)``

* animal: the single ``[MASK]`` is replaced by as many ``[MASK]`` tokens as the answer has word pieces
  (as ITH does); the labels are the answer's pieces.
* pitch: one ``[MASK]``; the label is the id of ``lower`` or ``higher`` (both must be single pieces of the
  vocabulary, else ``UserError``).

Each ``EncodedExample`` holds numpy int32 arrays: ``input_ids [n]`` (with [CLS]/[SEP], no padding),
``offsets [n, 2]`` (character offsets into ``sentence``, the text actually tokenised, i.e. after mask
expansion; (0, 0) for [CLS]/[SEP]), ``special_mask [n]`` (1 for [CLS]/[SEP]), ``mask_positions [m]``,
``mask_label_ids [m]``, ``span_token_ranges [k, 2]`` ((start, end) token indices, end exclusive, one per
gold span found, located on the tokenised sentence so that mask expansion cannot shift them) with
``span_index [k]`` (which of ``example.spans`` each range is); plus ``length`` (= n), ``example`` (the
back-reference) and ``choice`` (the option index for ``encode_choices`` records, else None).

Sequences longer than ``max_length`` raise ``UserError`` when ``strict``, else they are dropped and their
rows listed in the report (``too_long``). Spans that cannot be located are counted (``span_not_found``)
and simply have no range; the LM does not need them.

``encode_choices(examples, tokenizer, *, max_length=128, strict=False)`` gives, for every animal example
with options, one record per option (``choice`` = 0..3): the sentence with the mask expanded to that
option's number of pieces and that option's piece ids as ``mask_label_ids``. An evaluator scores an option
by the sum of its pieces' log-probabilities at its masks. If any option of an example is too long, the
whole example is dropped, so every example's group stays complete.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ith_jax.errors import UserError

MASK_TOKEN = "[MASK]"
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


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _resolve_dir(path_or_id) -> Path:
    path = Path(path_or_id)
    if path.exists():
        return path
    try:
        from ith_jax.models.convert import resolve_checkpoint_dir
    except ImportError as exc:
        if exc.name != "ith_jax.models.convert":
            raise
        raise UserError(
            f"{path_or_id}: no such directory; expected a checkpoint directory holding tokenizer.json or vocab.txt"
        ) from None
    return Path(resolve_checkpoint_dir(path_or_id))


def _tokenizer_from_vocab(vocab_path: Path, config: dict) -> Tokenizer:
    # A token's id is its line number, as in BERT's own loader (a repeated token keeps its last line).
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\r\n"): index for index, line in enumerate(f)}
    missing = [t for t in _SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"{vocab_path}: special token(s) {', '.join(missing)} missing; expected a BERT vocabulary")
    lowercase = bool(config.get("do_lower_case", True))
    strip_accents = config.get("strip_accents")  # None: follow lowercase, as BERT does
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # normalized=False: "[MASK]" is matched on the raw text, before lower-casing would break it.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return tok


def load_tokenizer(path_or_id) -> Tokenizer:
    """A fast WordPiece tokenizer for a checkpoint directory or hub id (truncation and padding off)."""
    path = _resolve_dir(path_or_id)
    if path.is_file():
        json_path = path if path.suffix == ".json" else None
        vocab_path = path if path.name.endswith(".txt") else None
        config_dir = path.parent
    else:
        json_path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None
        vocab_path = path / "vocab.txt" if (path / "vocab.txt").is_file() else None
        config_dir = path
    if json_path is not None:
        try:
            tok = Tokenizer.from_file(str(json_path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise UserError(f"{json_path}: cannot read tokenizer ({exc})") from None
    elif vocab_path is not None:
        config = {}
        config_path = config_dir / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"{config_path}: not valid JSON ({exc})") from None
        tok = _tokenizer_from_vocab(vocab_path, config)
    else:
        raise UserError(f"{path}: no tokenizer.json or vocab.txt; expected a BERT checkpoint directory")
    tok.no_truncation()
    tok.no_padding()
    if tok.token_to_id(MASK_TOKEN) is None:
        raise UserError(f"{path}: the tokenizer has no {MASK_TOKEN} token; expected a BERT vocabulary")
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """The ids the encoders and batchers need, read once from a tokenizer."""

    mask_id: int
    cls_id: int
    sep_id: int
    pad_id: int
    unk_id: int
    vocab_size: int
    tokenizer: Tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def tokenizer_info(tokenizer: Tokenizer) -> TokenizerInfo:
    ids = {}
    for name, token in (("mask_id", "[MASK]"), ("cls_id", "[CLS]"), ("sep_id", "[SEP]"), ("pad_id", "[PAD]"), ("unk_id", "[UNK]")):
        value = tokenizer.token_to_id(token)
        if value is None:
            raise UserError(f"tokenizer has no {token} token; expected a BERT vocabulary")
        ids[name] = value
    return TokenizerInfo(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), tokenizer=tokenizer, **ids)


# ----------------------------------------------------------------------------------------------------------
# Encoding
# ----------------------------------------------------------------------------------------------------------

@dataclass
class EncodedExample:
    """One tokenised sentence; arrays are numpy int32 (see the module docstring)."""

    input_ids: np.ndarray
    offsets: np.ndarray
    special_mask: np.ndarray
    mask_positions: np.ndarray
    mask_label_ids: np.ndarray
    span_token_ranges: np.ndarray
    span_index: np.ndarray
    sentence: str
    example: Example
    choice: int | None = None
    token_labels: np.ndarray | None = None

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class EncodeReport:
    """What an encoder dropped or could not locate. Row lists hold ``(source, row)`` pairs."""

    what: str
    examples_in: int = 0
    records_out: int = 0
    too_long: list[tuple[str, int]] = field(default_factory=list)
    span_not_found: list[tuple[str, int]] = field(default_factory=list)
    no_options: list[tuple[str, int]] = field(default_factory=list)
    max_length: int = 0
    longest: int = 0
    span_not_found_fate: str = "kept without a token range"

    def summary(self) -> str:
        text = f"{self.what}: {self.examples_in} examples -> {self.records_out} records (longest {self.longest} tokens)."
        for label, rows, fate in (
            (f"longer than max_length {self.max_length}", self.too_long, "dropped"),
            ("with a span not found", self.span_not_found, self.span_not_found_fate),
            ("without options", self.no_options, "skipped"),
        ):
            if rows:
                shown = ", ".join(f"{Path(s).name}:{r}" for s, r in rows[:5])
                more = f" and {len(rows) - 5} more" if len(rows) > 5 else ""
                text += f" {len(rows)} {label}: {fate} ({shown}{more})."
        return text


def _piece_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _expand_mask(sentence: str, count: int) -> str:
    return sentence.replace(MASK_TOKEN, " ".join([MASK_TOKEN] * count), 1)


def span_token_range(offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int] | None:
    """(first, last + 1) of the tokens whose characters overlap [char_start, char_end); None if none do.
    Zero-width tokens ([CLS], [SEP], padding) never overlap."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    hit = np.flatnonzero((starts < char_end) & (ends > char_start) & (ends > starts))
    if hit.size == 0:
        return None
    return int(hit[0]), int(hit[-1]) + 1


def _locate_spans(sentence: str, spans: Sequence[str], offsets: np.ndarray):
    """Token ranges and span indices of the spans found; plus whether every span was found."""
    ranges, indices = [], []
    for i, char_span in enumerate(find_spans(sentence, spans)):
        if char_span is None:
            continue
        token_range = span_token_range(offsets, *char_span)
        if token_range is not None:
            ranges.append(token_range)
            indices.append(i)
    array = np.asarray(ranges, np.int32).reshape(-1, 2)
    return array, np.asarray(indices, np.int32), len(ranges) == len(spans)


def _encode_one(
    encoding: tokenizers.Encoding,
    sentence: str,
    example: Example,
    mask_id: int,
    label_ids: Sequence[int],
    choice: int | None,
) -> tuple[EncodedExample, bool]:
    input_ids = np.asarray(encoding.ids, np.int32)
    offsets = np.asarray(encoding.offsets, np.int32).reshape(-1, 2)
    mask_positions = np.flatnonzero(input_ids == mask_id).astype(np.int32)
    if mask_positions.size != len(label_ids):
        # Only reachable if the tokenizer splits "[MASK]"; the loader guarantees one mask per sentence.
        raise UserError(
            f"{example.where}: tokenised sentence has {mask_positions.size} mask tokens; expected {len(label_ids)}"
        )
    ranges, span_index, all_found = _locate_spans(sentence, example.spans, offsets)
    record = EncodedExample(
        input_ids=input_ids,
        offsets=offsets,
        special_mask=np.asarray(encoding.special_tokens_mask, np.int32),
        mask_positions=mask_positions,
        mask_label_ids=np.asarray(label_ids, np.int32),
        span_token_ranges=ranges,
        span_index=span_index,
        sentence=sentence,
        example=example,
        choice=choice,
    )
    return record, all_found


def _pitch_label_ids(tokenizer: Tokenizer) -> dict[str, int]:
    ids = {}
    for label in PITCH_LABELS:
        pieces = _piece_ids(tokenizer, label)
        if len(pieces) != 1 or pieces[0] == tokenizer.token_to_id("[UNK]"):
            raise UserError(f"tokenizer: pitch label {label!r} is not a single word piece of the vocabulary; expected one")
        ids[label] = pieces[0]
    return ids


def _check_max_length(record: EncodedExample, max_length: int, strict: bool, report: EncodeReport) -> bool:
    report.longest = max(report.longest, record.length)
    if record.length <= max_length:
        return True
    if strict:
        raise UserError(f"{record.example.where}: {record.length} tokens; expected at most max_length={max_length}")
    return False


def encode_mlm(
    examples: Sequence[Example], tokenizer: Tokenizer, *, max_length: int = 128, strict: bool = False
) -> tuple[list[EncodedExample], EncodeReport]:
    """Tokenise examples for masked-LM training/evaluation (see the module docstring)."""
    info = tokenizer_info(tokenizer)
    report = EncodeReport(what="mlm", examples_in=len(examples), max_length=max_length)
    pitch_ids = _pitch_label_ids(tokenizer) if any(e.task == "pitch" for e in examples) else {}
    sentences, labels = [], []
    for ex in examples:
        if ex.task == "pitch":
            if ex.answer not in pitch_ids:
                raise UserError(f"{ex.where}, field 'answer': expected 'lower' or 'higher', got {ex.answer!r}")
            label_ids = [pitch_ids[ex.answer]]
        else:
            label_ids = _piece_ids(tokenizer, ex.answer)
            if not label_ids:
                raise UserError(f"{ex.where}, field 'animal': {ex.answer!r} has no word pieces; expected a word")
        sentences.append(_expand_mask(ex.sentence, len(label_ids)))
        labels.append(label_ids)
    encoded = []
    for ex, sentence, label_ids, encoding in zip(examples, sentences, labels, tokenizer.encode_batch(sentences)):
        record, all_found = _encode_one(encoding, sentence, ex, info.mask_id, label_ids, None)
        if not _check_max_length(record, max_length, strict, report):
            report.too_long.append((ex.source, ex.row))
            continue
        if not all_found:
            report.span_not_found.append((ex.source, ex.row))
        encoded.append(record)
    report.records_out = len(encoded)
    return encoded, report


def encode_choices(
    examples: Sequence[Example], tokenizer: Tokenizer, *, max_length: int = 128, strict: bool = False
) -> tuple[list[EncodedExample], EncodeReport]:
    """One record per (animal example with options, option); see the module docstring."""
    info = tokenizer_info(tokenizer)
    report = EncodeReport(what="choices", examples_in=len(examples), max_length=max_length)
    jobs = []  # (example, option index, sentence, label ids)
    for ex in examples:
        if ex.options is None:
            report.no_options.append((ex.source, ex.row))
            continue
        for choice, option in enumerate(ex.options):
            label_ids = _piece_ids(tokenizer, option)
            if not label_ids:
                raise UserError(
                    f"{ex.where}, field '{OPTION_LETTERS[choice]}': {option!r} has no word pieces; expected a word"
                )
            jobs.append((ex, choice, _expand_mask(ex.sentence, len(label_ids)), label_ids))
    encodings = tokenizer.encode_batch([sentence for _, _, sentence, _ in jobs])
    encoded: list[EncodedExample] = []
    group: list[EncodedExample] = []
    group_ok = True
    group_spans_found = True
    for (ex, choice, sentence, label_ids), encoding in zip(jobs, encodings):
        record, all_found = _encode_one(encoding, sentence, ex, info.mask_id, label_ids, choice)
        group_ok &= _check_max_length(record, max_length, strict, report)
        group_spans_found &= all_found
        group.append(record)
        if choice == len(ex.options) - 1:
            if group_ok:
                encoded.extend(group)
                if not group_spans_found:
                    report.span_not_found.append((ex.source, ex.row))
            else:
                report.too_long.append((ex.source, ex.row))
            group, group_ok, group_spans_found = [], True, True
    report.records_out = len(encoded)
    return encoded, report
