"""A small synthetic AuditoryBench, so the data-level tests run without the real files in ../shared.

``write_auditorybench(root)`` writes ``animal/{train,dev}.csv``, ``pitch/{train,dev}.csv`` with the real
column names (animal train ``span``, dev ``description``; pitch dev in another column order, as the
loader must read columns by name) and a ``README.md`` whose row and defect tables have the layout of the
real data README, so the same table parser checks both. Every defect is planted deliberately and its row
number recorded at the moment it is written (never by running the loader), so the tests compare the
loader against an independent account. Besides the README's defects the files hold quoted commas, a
quoted newline, accents, mixed case, padded fields, multi-piece animal answers and a pitch row whose two
spans are the same text.

The learnable, defect-free sample for demos is the library's (``ith_jax.data.synthetic``); this module keeps only
what tests need on top of it: the deliberately planted defects and quirks, and an independent record of them.
It shares the library's file list, column names and CSV writer, so both write the same format.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ith_jax.data.fetch import SPLIT_FILES
from ith_jax.data.synthetic import ANIMAL_COLUMNS, PITCH_COLUMNS, csv_text

FILES = SPLIT_FILES
# The README's defect columns, in its order.
README_DEFECTS = ("mask_count", "empty_field", "span_not_found", "answer_mismatch")

# Pitch dev in another column order than the real files: the loader must read columns by name.
PITCH_HEADERS = {"train": PITCH_COLUMNS, "dev": ("answer", "span2", "sentence", "span1")}

# (answer, sound span): single-piece and multi-piece answers (hummingbird, woodpecker, chimpanzee, ...).
ANIMALS = (
    ("dog", "barking"),
    ("hummingbird", "soft, rapid humming"),
    ("rooster", "crowing"),
    ("woodpecker", "drumming on wood"),
    ("owl", "hooting"),
    ("chimpanzee", "loud pant-hoots"),
    ("cow", "mooing"),
    ("cicada", "continuous, high-pitched whine"),
    ("sheep", "bleating"),
    ("kookaburra", "laughing call"),
)
ANIMAL_TEMPLATES = (
    "A [MASK] makes a sound like {span}.",
    "{Span} is the sound a [MASK] makes when it is irritated.",
    "At dawn you can hear the {span} of a [MASK] near the café.",
)
SOURCES = (
    "the sound of rain",
    "a whistling kettle",
    "the rumble of thunder",
    "a baby's cry",
    "the hum of a fridge",
    "the buzz of a bee",
    "a foghorn",
    "a naïve violin solo",
)
PITCH_TEMPLATES = (
    "{a} has a [MASK] pitch than {b}.",
    "Compared with {b}, {a} typically has a [MASK] pitch.",
)


@dataclass
class SyntheticSplit:
    """One written file: its rows as written and the data-row numbers (1-based) of every planted defect."""

    name: str
    header: tuple[str, ...]
    rows: list[list[str]] = field(default_factory=list)
    defects: dict[str, list[int]] = field(default_factory=lambda: {k: [] for k in README_DEFECTS})
    dropped: list[int] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.name.split("/")[0]

    def add(self, record: dict[str, str], *defects: str) -> None:
        self.rows.append([record[column] for column in self.header])
        row = len(self.rows)
        for kind in defects:
            self.defects[kind].append(row)
        if {"mask_count", "empty_field"} & set(defects):  # the loader drops these rows
            self.dropped.append(row)

    def column(self, role: str) -> str:
        """The header name that plays ``role`` (the animal span column is ``span`` or ``description``)."""
        if role == "span" and self.task == "animal":
            return self.header[1]
        return role


def _animal_split(name: str, rows: int, offset: int) -> SyntheticSplit:
    split = SyntheticSplit(name, ANIMAL_COLUMNS[name.split("/")[1].removesuffix(".csv")])
    span_column = split.column("span")
    for i in range(rows):
        animal, span = ANIMALS[(i + offset) % len(ANIMALS)]
        sentence = ANIMAL_TEMPLATES[i % len(ANIMAL_TEMPLATES)].format(span=span, Span=span.capitalize())
        letter = "ABCD"[i % 4]
        distractors = [a for a, _ in ANIMALS if a != animal][i % 5 : i % 5 + 3]
        options = distractors[: "ABCD".index(letter)] + [animal] + distractors["ABCD".index(letter) :]
        split.add({"animal": animal, span_column: span, "sentence": sentence,
                   **dict(zip("ABCD", options)), "Answer": letter})
    return split


def _plant_animal_defects(split: SyntheticSplit) -> None:
    base = {c: v for c, v in zip(split.header, split.rows[0])}
    span = split.column("span")
    # The span stays in these sentences so that each row has exactly the one defect planted.
    split.add({**base, "sentence": f"A [MASK] and a [MASK] make a sound like {base[span]}."}, "mask_count")
    split.add({**base, "sentence": f"A dog makes a sound like {base[span]}."}, "mask_count")
    split.add({**base, "sentence": "A [MASK] is growling.", span: "howling"}, "span_not_found")
    # Answer points at an option that is not the animal (A holds a distractor; B holds the animal).
    split.add({**base, "A": "cat", "B": base["animal"], "Answer": "A"}, "answer_mismatch")
    # Padded fields, a lower-case Answer letter and a span in another case are not defects.
    split.add({**base, "animal": f"  {base['animal']} ", span: base[span].upper(), "Answer": base["Answer"].lower()})


def _pitch_split(name: str, rows: int, offset: int) -> SyntheticSplit:
    split = SyntheticSplit(name, PITCH_HEADERS[name.split("/")[1].removesuffix(".csv")])
    for i in range(rows):
        a = SOURCES[(i + offset) % len(SOURCES)]
        b = SOURCES[(i + offset + 3) % len(SOURCES)]
        template = PITCH_TEMPLATES[i % len(PITCH_TEMPLATES)]
        answer = ("higher", "lower", "Higher", " lower ")[i % 4]
        sentence = template.format(a=a, b=b)
        split.add({"sentence": sentence[0].upper() + sentence[1:], "answer": answer, "span1": a, "span2": b})
    return split


def _plant_pitch_defects(split: SyntheticSplit, empties: int) -> None:
    base = {c: v for c, v in zip(split.header, split.rows[0])}
    for i in range(empties):
        split.add({**base, ("span2", "answer", "sentence")[i % 3]: "  "}, "empty_field")
    split.add({**base, "span1": "the screech of brakes"}, "span_not_found")
    # Both spans missing still counts once per row, as the README does.
    split.add({**base, "span1": "a gong", "span2": "a flute"}, "span_not_found")
    # The same span text twice: each goes to its own occurrence; a quoted newline inside the sentence.
    split.add({**base, "sentence": "The sound of rain is [MASK] than\nthe sound of rain.",
               "span1": "sound of rain", "span2": "sound of rain", "answer": "lower"})


def build_splits() -> dict[str, SyntheticSplit]:
    splits = {
        "animal/train.csv": _animal_split("animal/train.csv", 24, 0),
        "animal/dev.csv": _animal_split("animal/dev.csv", 9, 3),
        "pitch/train.csv": _pitch_split("pitch/train.csv", 30, 0),
        "pitch/dev.csv": _pitch_split("pitch/dev.csv", 10, 2),
    }
    _plant_animal_defects(splits["animal/train.csv"])
    _plant_animal_defects(splits["animal/dev.csv"])
    _plant_pitch_defects(splits["pitch/train.csv"], empties=3)
    _plant_pitch_defects(splits["pitch/dev.csv"], empties=1)
    return splits


def _readme(splits: dict[str, SyntheticSplit]) -> str:
    lines = ["# Synthetic AuditoryBench (written by tests/synthetic_data.py)", "",
             "| here | upstream file (commit) | rows |", "|---|---|---|"]
    lines += [f"| {name} | synthetic | {len(split.rows):,} |" for name, split in splits.items()]
    lines += ["", "| file | sentence without exactly one [MASK] | empty field | span not found in sentence "
              "(case-insensitive) | `Answer` option differs from `animal` |", "|---|---|---|---|---|"]
    for name, split in splits.items():
        counts = [str(len(split.defects[k])) for k in README_DEFECTS]
        if split.task == "pitch":
            counts[-1] = "-"
        lines.append(f"| {name} | " + " | ".join(counts) + " |")
    return "\n".join(lines) + "\n"


def write_auditorybench(root: Path) -> dict[str, SyntheticSplit]:
    """Write the four synthetic splits and their README under ``root``; return what was written."""
    splits = build_splits()
    for name, split in splits.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(csv_text(split.header, split.rows), encoding="utf-8", newline="")
    (root / "README.md").write_text(_readme(splits), encoding="utf-8")
    return splits
