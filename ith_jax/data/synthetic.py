r"""A small AuditoryBench-format SYNTHETIC sample, written from the project's own templates and vocabulary.

    python -m ith_jax.data.synthetic --out DIR [--rows-per-split N] [--seed S]

For the offline demo and smoke runs where the real benchmark (``python -m ith_jax.data.fetch``) is not at hand.
``write_synthetic_auditorybench(out_dir, *, rows_per_split, seed)`` writes ``out_dir/{animal,pitch}/{train,dev}.csv``
with AuditoryBench's exact columns (animal train ``animal,span,sentence,A,B,C,D,Answer``, animal dev the same with
``description`` for ``span``; pitch ``sentence,answer,span1,span2``), rows that ``ith_jax.data.auditorybench`` loads
with no defect, plus ``SYNTHETIC.md`` (what this is) and the marker file ``SYNTHETIC`` (JSON: generator, seed, rows),
which ``is_synthetic(path)`` detects so every report and table can say "synthetic sample".  The marker is written
before the CSVs: a synthetic CSV never sits in a directory without it.

The content is learnable on purpose: every sound description belongs to exactly one animal, and the pitch
sources have one fixed order (``PITCH_SOURCES``, lowest first), so each ``higher``/``lower`` answer follows from
the two sources' ranks.  Train and dev draw from the same vocabulary with different random streams.  The output
is a function of ``(rows_per_split, seed)`` alone (Python's ``random.Random`` seeded with a string is the same on
every platform and run).  It is not AuditoryBench and says so; numbers measured on it say nothing about the paper.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from pathlib import Path
from typing import Sequence

from ith_common.atomic import atomic_write_text, check_output_dir
from ith_common.errors import UserError, run_main
from ith_jax.data.fetch import SPLIT_FILES

MARKER_NAME = "SYNTHETIC"
DESCRIPTION_NAME = "SYNTHETIC.md"
LABEL = "synthetic sample"  # what reports and tables print beside numbers measured on this data
FORMAT_VERSION = 1
DEFAULT_ROWS_PER_SPLIT = 200

# The columns of the real files, in their order (ith_jax/data/auditorybench.py reads them by name).
ANIMAL_COLUMNS = {"train": ("animal", "span", "sentence", "A", "B", "C", "D", "Answer"),
                  "dev": ("animal", "description", "sentence", "A", "B", "C", "D", "Answer")}
PITCH_COLUMNS = ("sentence", "answer", "span1", "span2")

# Each description belongs to one animal only, so the answer is a function of the description.
ANIMAL_SOUNDS: dict[str, tuple[str, ...]] = {
    "dog": ("barking", "growling", "howling"),
    "cat": ("meowing", "purring"),
    "cow": ("mooing", "lowing"),
    "sheep": ("bleating",),
    "horse": ("neighing", "whinnying"),
    "pig": ("oinking", "grunting"),
    "duck": ("quacking",),
    "goose": ("honking",),
    "rooster": ("crowing",),
    "owl": ("hooting",),
    "frog": ("croaking", "ribbiting"),
    "bee": ("buzzing",),
    "snake": ("hissing",),
    "lion": ("roaring",),
    "wolf": ("baying",),
    "donkey": ("braying", "hee-hawing"),
    "mouse": ("squeaking",),
    "cricket": ("chirping",),
    "woodpecker": ("drumming", "tapping on bark"),
    "elephant": ("trumpeting",),
    "dove": ("cooing",),
    "guinea pig": ("wheeking",),
    "sea lion": ("calls from the harbour rocks",),
}
ANIMAL_TEMPLATES = (
    "A [MASK] makes a sound like {span}.",
    "{Span} is the sound a [MASK] makes.",
    "You can tell a [MASK] is nearby from its {span}.",
    "The {span} of a [MASK] carried across the field.",
    "At dawn the farmer heard the {span} of a [MASK].",
)

# Sound sources from the lowest pitch to the highest; the order is the whole of the pitch task's knowledge.
PITCH_SOURCES = (
    "the rumble of distant thunder",
    "the foghorn of a ship",
    "the hum of a diesel engine",
    "the note of a tuba",
    "the beat of a bass drum",
    "the purr of a large cat",
    "the drone of a cello",
    "the voice of a grown man",
    "the ring of a church bell",
    "the voice of a grown woman",
    "the tone of a trumpet",
    "the voice of a small child",
    "the song of a violin",
    "the whistle of a kettle",
    "the chirp of a sparrow",
    "the note of a piccolo",
    "the whine of a mosquito",
    "the beep of a smoke alarm",
    "the squeal of a bat",
    "the tone of a dog whistle",
)
PITCH_TEMPLATES = (
    "{A} has a [MASK] pitch than {b}.",
    "Compared with {b}, {a} typically has a [MASK] pitch.",
    "{A} usually sounds [MASK] in pitch than {b}.",
    "In a quiet room, {a} has a [MASK] pitch than {b}.",
)

SPLITS = ("train", "dev")


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def _rng(seed: int, name: str) -> random.Random:
    # A string seed is hashed with SHA-512 by random.Random: the same stream on every platform and run.
    return random.Random(f"ith-synthetic:{seed}:{name}")


def animal_rows(split: str, rows: int, seed: int) -> list[tuple[str, ...]]:
    """``rows`` animal rows in the column order of ``ANIMAL_COLUMNS[split]``."""
    rng = _rng(seed, f"animal/{split}")
    animals = list(ANIMAL_SOUNDS)
    out = []
    for _ in range(rows):
        animal = rng.choice(animals)
        span = rng.choice(ANIMAL_SOUNDS[animal])
        sentence = rng.choice(ANIMAL_TEMPLATES).format(span=span, Span=_capitalise(span))
        options = rng.sample([a for a in animals if a != animal], 3)
        position = rng.randrange(4)
        options.insert(position, animal)
        out.append((animal, span, sentence, *options, "ABCD"[position]))
    return out


def pitch_rows(split: str, rows: int, seed: int) -> list[tuple[str, ...]]:
    """``rows`` pitch rows in the column order of ``PITCH_COLUMNS``; the answer follows ``PITCH_SOURCES``' order."""
    rng = _rng(seed, f"pitch/{split}")
    out = []
    for _ in range(rows):
        first, second = rng.sample(range(len(PITCH_SOURCES)), 2)
        a, b = PITCH_SOURCES[first], PITCH_SOURCES[second]
        sentence = rng.choice(PITCH_TEMPLATES).format(a=a, b=b, A=_capitalise(a))
        out.append((sentence, "higher" if first > second else "lower", a, b))
    return out


def csv_text(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A CSV file's text as the real files have it (``\\n`` line ends, quotes only where needed)."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    return buffer.getvalue()


def synthetic_marker(path) -> Path | None:
    """The ``SYNTHETIC`` marker that covers ``path``, or None.  A directory is covered by its own marker; a file by
    the marker of its directory or of that directory's parent (the layout ``DIR/<task>/<split>.csv``)."""
    path = Path(path)
    candidates = [path] if path.is_dir() else [path.parent, path.parent.parent]
    for directory in candidates:
        marker = directory / MARKER_NAME
        if marker.is_file():
            return marker
    return None


def is_synthetic(path) -> bool:
    """Whether ``path`` (a data directory or one of its CSV files) belongs to a synthetic sample."""
    return synthetic_marker(path) is not None


def _description(rows_per_split: int, seed: int) -> str:
    return f"""# SYNTHETIC sample in the AuditoryBench format -- not AuditoryBench

Written by `python -m ith_jax.data.synthetic` (ith_jax/data/synthetic.py), seed {seed}, {rows_per_split} rows per
file, from the project's own sentence templates and a small vocabulary: {len(ANIMAL_SOUNDS)} animals whose sound
descriptions each belong to one animal, and {len(PITCH_SOURCES)} sound sources in one fixed pitch order (lowest
first in `PITCH_SOURCES`). The columns are AuditoryBench's, so every tool of the project reads these files like the
real ones, and the file `{MARKER_NAME}` beside this one marks the directory as synthetic
(`ith_jax.data.synthetic.is_synthetic`). Use it for demos and smoke runs only: accuracy measured here says nothing
about the benchmark or the paper. The real data: `python -m ith_jax.data.fetch --out DIR` (docs/data.md).

| file | rows |
|---|---|
""" + "".join(f"| {name} | {rows_per_split} |\n" for name in SPLIT_FILES)


def write_synthetic_auditorybench(out_dir, *, rows_per_split: int = DEFAULT_ROWS_PER_SPLIT, seed: int = 0) -> Path:
    """Write the synthetic sample into ``out_dir`` (created if needed) and return ``out_dir``.

    Refuses (``UserError``) to write into a directory that holds AuditoryBench files but no ``SYNTHETIC`` marker:
    synthetic rows must never replace real ones.  Rewriting an earlier synthetic sample is allowed."""
    if isinstance(rows_per_split, bool) or not isinstance(rows_per_split, int) or rows_per_split < 1:
        raise UserError(f"rows_per_split: expected an integer >= 1, got {rows_per_split!r}")
    out_dir = check_output_dir(out_dir, what="synthetic sample directory")
    real = [name for name in SPLIT_FILES if (out_dir / name).exists()]
    if real and not (out_dir / MARKER_NAME).is_file():
        raise UserError(f"{out_dir}: holds {', '.join(real)} but no {MARKER_NAME} marker, so it looks like real "
                        "AuditoryBench; refusing to overwrite it with a synthetic sample (choose another directory)")
    for task in ("animal", "pitch"):
        (out_dir / task).mkdir(parents=True, exist_ok=True)
    marker = {"synthetic": True, "label": LABEL, "format_version": FORMAT_VERSION,
              "generator": "ith_jax.data.synthetic", "seed": seed, "rows_per_split": rows_per_split,
              "files": list(SPLIT_FILES)}
    atomic_write_text(out_dir / MARKER_NAME, json.dumps(marker, indent=2) + "\n")
    for split in SPLITS:
        atomic_write_text(out_dir / "animal" / f"{split}.csv",
                          csv_text(ANIMAL_COLUMNS[split], animal_rows(split, rows_per_split, seed)))
        atomic_write_text(out_dir / "pitch" / f"{split}.csv",
                          csv_text(PITCH_COLUMNS, pitch_rows(split, rows_per_split, seed)))
    atomic_write_text(out_dir / DESCRIPTION_NAME, _description(rows_per_split, seed))
    return out_dir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.data.synthetic",
                                     description="Write a small SYNTHETIC sample in the AuditoryBench format.")
    parser.add_argument("--out", required=True, help="directory to write animal/, pitch/, SYNTHETIC.md into")
    parser.add_argument("--rows-per-split", type=int, default=DEFAULT_ROWS_PER_SPLIT,
                        help=f"rows in each of the four files (default {DEFAULT_ROWS_PER_SPLIT})")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out_dir = write_synthetic_auditorybench(args.out, rows_per_split=args.rows_per_split, seed=args.seed)
    print(f"{out_dir}: {LABEL} written ({args.rows_per_split} rows per file, seed {args.seed}); "
          f"see {out_dir / DESCRIPTION_NAME}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
