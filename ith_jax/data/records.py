"""The tokenised record every encoder produces (``mlm``, ``spans``, ``ith_jax.detect``) and the batcher pads.

An ``EncodedExample`` holds numpy int32 arrays: ``input_ids [n]`` (with [CLS]/[SEP], no padding),
``offsets [n, 2]`` (character offsets into ``sentence``, the text actually tokenised, e.g. after mask
expansion; (0, 0) for [CLS]/[SEP]), ``special_mask [n]`` (1 for [CLS]/[SEP]), ``mask_positions [m]``,
``mask_label_ids [m]``, ``span_token_ranges [k, 2]`` ((start, end) token indices, end exclusive, one per
gold span found, located on the tokenised sentence) with ``span_index [k]`` (which of ``example.spans``
each range is); plus ``length`` (= n), ``example`` (the back-reference), ``choice`` (the option index of a
multiple-choice record, else None) and ``token_labels [n]`` (BIO tags of span records, else None).

An ``EncodeReport`` says what an encoder dropped or could not locate, by ``(source, row)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ith_jax.data.auditorybench import Example


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


def span_token_range(offsets: np.ndarray, char_start: int, char_end: int) -> tuple[int, int] | None:
    """(first, last + 1) of the tokens whose characters overlap [char_start, char_end); None if none do.
    Zero-width tokens ([CLS], [SEP], padding) never overlap."""
    starts, ends = offsets[:, 0], offsets[:, 1]
    hit = np.flatnonzero((starts < char_end) & (ends > char_start) & (ends > starts))
    if hit.size == 0:
        return None
    return int(hit[0]), int(hit[-1]) + 1
