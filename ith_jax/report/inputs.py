"""What the case-study report reads, checked: per-example predictions (the shared JSONL format of
`python -m ith_jax.evaluate --predictions`, docs/api.md), paired text-only vs ITH by id; the workdirs' `config.json`
and `metrics.jsonl` (training curves); and the example sample (ITH fixed, ITH broke, others).

Every problem is a `UserError` naming the file, line and field.  Plain Python and the standard library: nothing
here needs jax.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
from collections import Counter
from pathlib import Path

from ith_common.errors import UserError
from ith_jax.data.synthetic import is_synthetic

SCHEMA_VERSION = 1
TASKS = ("pitch", "animal")
KINDS = ("text", "ith")
# field -> (accepted types, what the message says was expected); None is accepted only where listed.
_FIELDS = {
    "id": ((str,), "a string like 'pitch/dev.csv:12'"),
    "file": ((str,), "the data path as a string"),
    "row": ((int,), "an integer row"),
    "workdir": ((str,), "the workdir as a string"),
    "step": ((int,), "an integer step"),
    "sentence": ((str,), "a string"),
    "answer": ((str,), "a string"),
    "prediction": ((str,), "a string"),
    "correct": ((bool,), "true or false"),
    "probability": ((int, float), "a number in [0, 1]"),
    "alternatives": ((list,), "a list of {answer, probability}"),
    "spans": ((list,), "a list of span objects"),
    "tokens": ((list,), "a list of word pieces"),
    "gate": ((list, type(None)), "a list of numbers or null"),
}


@dataclasses.dataclass
class Pair:
    """One evaluated example as the text-only and the ITH model saw it."""
    text: dict
    ith: dict

    @property
    def category(self) -> str:
        """fixed (ITH right, text wrong), broken (the reverse), both_right or both_wrong."""
        return {(False, True): "fixed", (True, False): "broken", (True, True): "both_right",
                (False, False): "both_wrong"}[(self.text["correct"], self.ith["correct"])]


@dataclasses.dataclass
class PairedFile:
    """The two predictions files of one evaluated data file."""
    task: str
    file: str
    text_path: Path
    ith_path: Path
    pairs: list[Pair]

    def accuracy(self, kind: str) -> float:
        return sum(getattr(p, kind)["correct"] for p in self.pairs) / len(self.pairs)

    def majority(self) -> tuple[str, float]:
        """The most frequent answer and its share: what a constant prediction scores on these examples (the same
        rows `ith_jax.evaluate.majority_rate` counts, since the predictions hold every evaluated row)."""
        answer, count = Counter(p.text["answer"] for p in self.pairs).most_common(1)[0]
        return answer, count / len(self.pairs)

    def count(self, category: str) -> int:
        return sum(p.category == category for p in self.pairs)

    @property
    def synthetic(self) -> bool:
        """Whether the data file belongs to the generated AuditoryBench-format sample (its marker file)."""
        return is_synthetic(self.file)


def _check_record(record, where: str, kind: str) -> dict:
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object per line, got {type(record).__name__}")
    if record.get("schema_version") != SCHEMA_VERSION:
        raise UserError(f"{where}: field 'schema_version': expected {SCHEMA_VERSION}, got "
                        f"{record.get('schema_version')!r}")
    for field, (types, expected) in _FIELDS.items():
        value = record.get(field, ...)
        if value is ... or not isinstance(value, types) or (bool in types) != isinstance(value, bool):
            got = "nothing" if value is ... else repr(value)[:60]
            raise UserError(f"{where}: field {field!r}: expected {expected}, got {got}")
    if record.get("task") not in TASKS:
        raise UserError(f"{where}: field 'task': expected one of {', '.join(TASKS)}, got {record.get('task')!r}")
    if record.get("kind") != kind:
        raise UserError(f"{where}: field 'kind': expected {kind!r} (the {'first' if kind == 'text' else 'second'} "
                        f"file of --predictions TEXT ITH), got {record.get('kind')!r}")
    if not 0.0 <= record["probability"] <= 1.0:
        raise UserError(f"{where}: field 'probability': expected a number in [0, 1], got {record['probability']!r}")
    for i, alternative in enumerate(record["alternatives"]):
        if not (isinstance(alternative, dict) and isinstance(alternative.get("answer"), str)
                and isinstance(alternative.get("probability"), (int, float))):
            raise UserError(f"{where}: field 'alternatives[{i}]': expected {{answer: string, probability: number}}, "
                            f"got {alternative!r:.80}")
    for field in ("spans", "gold_spans"):
        for i, span in enumerate(record.get(field) or []):
            if not (isinstance(span, dict) and isinstance(span.get("text"), str)):
                raise UserError(f"{where}: field '{field}[{i}]': expected an object with 'text', got {span!r:.80}")
    gate = record["gate"]
    if gate is not None and (len(gate) != len(record["tokens"]) or not all(
            isinstance(g, (int, float)) and math.isfinite(g) for g in gate)):
        raise UserError(f"{where}: field 'gate': expected one finite number per token ({len(record['tokens'])}), "
                        f"got {len(gate)} values")
    record.setdefault("gold_spans", [])
    return record


def read_predictions(path: str | Path, kind: str) -> dict[str, dict]:
    """id -> record of one predictions file, in file order; every record must be of `kind`."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--predictions {path}: no such file")
    records: dict[str, dict] = {}
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                record = _check_record(json.loads(line), where, kind)
            except json.JSONDecodeError as exc:
                raise UserError(f"{where}: not JSON ({exc.msg}, column {exc.colno})") from None
            if record["id"] in records:
                raise UserError(f"{where}: field 'id': {record['id']!r} appears twice in the file")
            records[record["id"]] = record
    if not records:
        raise UserError(f"--predictions {path}: no records")
    return records


def pair_predictions(text_path: str | Path, ith_path: str | Path) -> PairedFile:
    """The examples of two predictions files of the same data file, paired by id (text file order)."""
    text, ith = read_predictions(text_path, "text"), read_predictions(ith_path, "ith")
    for a, b, path in ((text, ith, ith_path), (ith, text, text_path)):
        if missing := [key for key in a if key not in b]:
            raise UserError(f"{path}: no record with id {missing[0]!r} ({len(missing)} ids of the other file are "
                            "missing): pair predictions of the same data file")
    pairs = []
    for key, record in text.items():
        other = ith[key]
        for field in ("task", "sentence", "answer"):
            if record[field] != other[field]:
                raise UserError(f"{ith_path}: id {key!r}: field {field!r} is {other[field]!r:.60} but "
                                f"{record[field]!r:.60} in {text_path}")
        pairs.append(Pair(record, other))
    first = pairs[0].text
    if len(tasks := {p.text["task"] for p in pairs}) > 1:
        raise UserError(f"{text_path}: records of several tasks ({', '.join(sorted(tasks))}): one data file per file")
    return PairedFile(first["task"], first["file"], Path(text_path), Path(ith_path), pairs)


def sample_examples(paired: PairedFile, per_category: int, seed: int) -> list[tuple[str, Pair]]:
    """Up to `per_category` examples ITH fixed, as many it broke and as many others, drawn with `seed`; each
    group in file order."""
    rng = random.Random(f"{seed}:{paired.file}")
    chosen = []
    for category, members in (("fixed", ("fixed",)), ("broken", ("broken",)),
                              ("other", ("both_right", "both_wrong"))):
        indices = [i for i, p in enumerate(paired.pairs) if p.category in members]
        picked = sorted(rng.sample(indices, min(per_category, len(indices))))
        chosen += [(category, paired.pairs[i]) for i in picked]
    return chosen


@dataclasses.dataclass
class Workdir:
    """A training workdir as the report sees it: its config and logged metrics."""
    path: Path
    kind: str  # text | ith
    config: dict
    train: list[dict]  # lines with a "loss"
    dev: list[dict]  # lines with "dev/..." keys
    note: str | None = None  # why curves are missing or partial

    @property
    def task(self) -> str | None:
        return self.config.get("task")

    @property
    def label(self) -> str:
        return f"{'ITH' if self.kind == 'ith' else 'text-only'} ({self.path.name})"


def read_workdir(path: str | Path, kind: str, *, required: bool) -> Workdir:
    """`config.json` and `metrics.jsonl` of a workdir.  With `required=False` (a workdir only named inside the
    predictions) a missing workdir gives a note instead of an error."""
    path = Path(path)
    config_path, metrics_path = path / "config.json", path / "metrics.jsonl"
    if not config_path.is_file() or not metrics_path.is_file():
        missing = config_path if not config_path.is_file() else metrics_path
        if required:
            raise UserError(f"--{kind}-workdir {path}: no {missing.name} (expected a training workdir)")
        return Workdir(path, kind, {}, [], [], note=f"{missing} not found: no training curves")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{config_path}: not JSON ({exc.msg}, line {exc.lineno})") from None
    train, dev, note = [], [], None
    lines = metrics_path.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # a run killed mid-append leaves a torn last line; the trainer drops it too
                note = f"{metrics_path}:{number}: torn last line skipped"
                continue
            raise UserError(f"{metrics_path}:{number}: not a JSON object") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int):
            raise UserError(f"{metrics_path}:{number}: field 'step': expected an object with an integer step")
        if isinstance(record.get("loss"), (int, float)):
            train.append(record)
        if any(key.startswith("dev/") for key in record):
            dev.append(record)
    return Workdir(path, kind, config if isinstance(config, dict) else {}, train, dev, note)
