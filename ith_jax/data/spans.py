"""Span detector data: gold sound spans as BIO tags over word pieces, and predicted tags back to text.

Tags: ``O = 0`` (outside), ``B = 1`` (first piece of a span), ``I = 2`` (a following piece); ``IGNORE =
-100`` for special tokens ([CLS], [SEP]) and padding, which the loss skips. Why BIO and not a plain
inside/outside tag: a pitch sentence holds two spans, and they can follow each other with nothing but a
space in between ("... the hum of a fridge the buzz of a bee ...", "thunder rain"). With inside/outside
only, such spans would merge into one; the B tag marks where each span starts, so every boundary between
words survives. (BIOES would add end tags, but an end is already implied by the next O/B.)

Labels (gold -> tags): a piece belongs to a span when its characters overlap the span's, so a span that
starts or ends inside a word piece snaps outwards to the piece boundaries ("chirpi" in "chirping" is
labelled "chirping"). Character spans that overlap each other are merged first (BIO cannot nest); touching
ones stay apart. A piece shared by two touching spans (only possible when a boundary falls inside a piece)
goes to the first span.

Decoding (tags -> spans, `extract_spans`) works in whole words, because a span becomes a prompt: a span
never starts or ends inside a word ("chirp" of "chi ##rp ##ing" comes back as "chirping", "pitched" of
"high-pitched" as "high-pitched"), and spans that share a word, touch, or are separated only by a hyphen
are one span ("buzz" + "-hum" -> "buzz-hum"). `decode_spans` adds the cleaning of
``ith_jax.data.span_cleaning`` (spans that name no source, such as "sound of", are dropped and counted).
On the gold labels of the four AuditoryBench files, 23,036 of 23,042 gold spans come back from
`extract_spans` exactly; the six others end inside a word ("breath" of "breathing", "Humming" of
"Hummingbirds") and come back as the whole word.

``encode_spans(examples, tokenizer, *, max_length=128)`` tokenises the sentence as written ([MASK]
included, as the tokenizer's special token) and attaches ``token_labels``; gold spans are the animal
``span``/``description`` and the pitch ``span1`` + ``span2``. Rows with a gold span that cannot be
located are excluded and counted, as are sequences longer than ``max_length``: a sentence with a missing
span would otherwise teach the detector that the sound is not a span.
"""

from __future__ import annotations

import bisect
from collections import Counter
from typing import Sequence

import numpy as np
from tokenizers import Tokenizer

from ith_jax.data import span_cleaning
from ith_jax.data.auditorybench import Example, find_spans
from ith_jax.data.records import EncodedExample, EncodeReport, span_token_range
from ith_jax.data.span_cleaning import SpanCleaningStats  # re-exported: detect needs only this module

O, B, I = 0, 1, 2
IGNORE = -100
TAG_NAMES = ("O", "B", "I")
NUM_TAGS = 3

_EMPTY_INT = np.zeros((0,), np.int32)


def merge_char_spans(char_spans: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Sorted spans with overlapping ones merged; touching spans (end == next start) stay separate."""
    merged: list[tuple[int, int]] = []
    for start, end in sorted((int(s), int(e)) for s, e in char_spans if e > s):
        if merged and start < merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def _real_pieces(offsets: np.ndarray, special_mask) -> np.ndarray:
    special = np.asarray(special_mask, bool)
    return ~special & (offsets[:, 1] > offsets[:, 0])


def span_labels(offsets, char_spans: Sequence[tuple[int, int]], special_mask) -> np.ndarray:
    """BIO tags ``[L]`` (int32) for character spans, given each piece's offsets ``[L, 2]``; special
    tokens and padding (``special_mask`` 1) get ``IGNORE``."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    special = np.asarray(special_mask, bool)
    if special.shape != (offsets.shape[0],):
        raise ValueError(f"special_mask has shape {special.shape}; expected ({offsets.shape[0]},) like offsets")
    free = _real_pieces(offsets, special)
    labels = np.full(offsets.shape[0], O, np.int32)
    starts, ends = offsets[:, 0], offsets[:, 1]
    for start, end in merge_char_spans(char_spans):
        pieces = np.flatnonzero(free & (starts < end) & (ends > start))
        if pieces.size == 0:
            continue
        labels[pieces[0]] = B
        labels[pieces[1:]] = I
        free[pieces] = False
    labels[special] = IGNORE
    return labels


def snap_to_pieces(offsets, char_span: tuple[int, int], special_mask) -> tuple[int, int] | None:
    """The character span a BIO round trip gives back for ``char_span``: from the first overlapping
    piece's start to the last one's end (None when no piece overlaps)."""
    offsets = np.asarray(offsets).reshape(-1, 2)
    pieces = np.flatnonzero(
        _real_pieces(offsets, special_mask) & (offsets[:, 0] < char_span[1]) & (offsets[:, 1] > char_span[0])
    )
    if pieces.size == 0:
        return None
    return int(offsets[pieces[0], 0]), int(offsets[pieces[-1], 1])


def _piece_runs(tags: np.ndarray, usable: np.ndarray) -> list[list[int]]:
    """The BIO runs over pieces: a span starts at a B, or at an I that does not continue a span, and runs over
    the following I pieces; an O, a special token or padding ends it."""
    runs: list[list[int]] = []
    current: list[int] | None = None
    for piece, tag in enumerate(tags):
        if not usable[piece] or tag == O:
            current = None
        elif tag == B or current is None:
            current = [piece]
            runs.append(current)
        else:
            current.append(piece)
    return runs


def _inside_word(position: int, words: list[tuple[int, int]], word_starts: list[int]) -> tuple[int, int] | None:
    """The word that ``position`` cuts (a word starting before it and ending after it), or None."""
    index = bisect.bisect_left(word_starts, position) - 1
    if index >= 0 and words[index][1] > position:
        return words[index]
    return None


def extract_spans(
    tag_probs, offsets, sentence: str, special_mask, *, stats: SpanCleaningStats | None = None
) -> list[dict]:
    """Predicted character spans from per-piece tag probabilities ``[L, 3]`` (O, B, I), in whole words.

    Each piece takes its most probable tag; the BIO runs (`_piece_runs`) become character spans from the first
    piece's start to the last piece's end. Then, so that a prompt never holds part of a word:

    * a span that starts or ends inside a word (`span_cleaning.WORD_PATTERN`: a '##' continuation piece, or
      a part of "high-pitched" / "dog's", which the tokenizer splits at the hyphen and apostrophe) is extended
      to the whole word ("chirp" in "chirping" comes back as "chirping");
    * spans that then overlap (two runs inside one word), touch, or are separated only by a hyphen are merged
      into one. Spans separated by a space stay apart, which is what the B tag is for.

    Text is cut from ``sentence`` by character offsets (never by gluing '##' pieces). ``confidence`` is the
    mean, over the pieces the model tagged B or I, of the probability of that tag. ``stats`` (optional) counts
    the runs (``spans_in``), the extensions and the merges.
    """
    probs = np.asarray(tag_probs, np.float64)
    if probs.size == 0:
        probs = probs.reshape(0, NUM_TAGS)  # no pieces at all: an empty sentence
    offsets = np.asarray(offsets).reshape(-1, 2)
    if probs.ndim != 2 or probs.shape[1] != NUM_TAGS or probs.shape[0] != offsets.shape[0]:
        raise ValueError(f"tag_probs has shape {probs.shape}; expected ({offsets.shape[0]}, {NUM_TAGS})")
    tags = probs.argmax(axis=-1)
    chosen_prob = probs[np.arange(len(tags)), tags]
    runs = _piece_runs(tags, _real_pieces(offsets, special_mask))
    stats = SpanCleaningStats() if stats is None else stats
    stats.spans_in += len(runs)
    words = span_cleaning.word_bounds(sentence)
    word_starts = [start for start, _ in words]

    spans: list[dict] = []
    pieces_of: list[list[int]] = []
    for run in runs:
        start, end = int(offsets[run[0], 0]), int(offsets[run[-1], 1])
        cut_at_start, cut_at_end = _inside_word(start, words, word_starts), _inside_word(end, words, word_starts)
        if cut_at_start or cut_at_end:
            start = cut_at_start[0] if cut_at_start else start
            end = cut_at_end[1] if cut_at_end else end
            stats.extended_to_words += 1
        if spans and (start <= spans[-1]["end"] or sentence[spans[-1]["end"] : start] == "-"):
            spans[-1]["end"] = max(end, spans[-1]["end"])
            pieces_of[-1].extend(run)
            stats.merged += 1
        else:
            spans.append({"start": start, "end": end})
            pieces_of.append(list(run))
    for span, pieces in zip(spans, pieces_of):
        span["text"] = sentence[span["start"] : span["end"]]
        span["confidence"] = float(chosen_prob[pieces].mean())
    return spans


def decode_spans(
    tag_probs,
    offsets,
    sentence: str,
    special_mask,
    *,
    stats: SpanCleaningStats | None = None,
    gold_count: int | None = None,
) -> list[dict]:
    """The spans the detector hands on as prompts: `extract_spans` (whole words), then
    `span_cleaning.clean_spans` (spans that name no source dropped). ``stats`` sums what happened over the
    sentences it is passed with; ``gold_count``, this sentence's number of gold spans when known, lets
    ``stats.summary()`` compare spans per sentence with gold."""
    own = SpanCleaningStats(sentences=1)
    kept = span_cleaning.clean_spans(extract_spans(tag_probs, offsets, sentence, special_mask, stats=own), stats=own)
    own.spans_out = len(kept)
    if gold_count is not None:
        own.gold_sentences, own.gold_spans = 1, int(gold_count)
    if stats is not None:
        stats.add(own)
    return kept


def encode_spans(
    examples: Sequence[Example], tokenizer: Tokenizer, *, max_length: int = 128
) -> tuple[list[EncodedExample], EncodeReport]:
    """Sentences with BIO ``token_labels`` for span-detector training (see the module docstring)."""
    report = EncodeReport(
        what="spans", examples_in=len(examples), max_length=max_length, span_not_found_fate="dropped"
    )
    encoded: list[EncodedExample] = []
    encodings = tokenizer.encode_batch([ex.sentence for ex in examples])
    for ex, encoding in zip(examples, encodings):
        offsets = np.asarray(encoding.offsets, np.int32).reshape(-1, 2)
        special = np.asarray(encoding.special_tokens_mask, np.int32)
        report.longest = max(report.longest, len(encoding.ids))
        if len(encoding.ids) > max_length:
            report.too_long.append((ex.source, ex.row))
            continue
        char_spans = find_spans(ex.sentence, ex.spans)
        ranges = [None if c is None else span_token_range(offsets, *c) for c in char_spans]
        if any(r is None for r in ranges):
            report.span_not_found.append((ex.source, ex.row))
            continue
        encoded.append(
            EncodedExample(
                input_ids=np.asarray(encoding.ids, np.int32),
                offsets=offsets,
                special_mask=special,
                mask_positions=_EMPTY_INT,
                mask_label_ids=_EMPTY_INT,
                span_token_ranges=np.asarray(ranges, np.int32).reshape(-1, 2),
                span_index=np.arange(len(ranges), dtype=np.int32),
                sentence=ex.sentence,
                example=ex,
                token_labels=span_labels(offsets, char_spans, special),
            )
        )
    report.records_out = len(encoded)
    return encoded, report


def _prf(tp: int, fp: int, fn: int) -> dict:
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"precision": precision, "recall": recall, "f1": f1, "tp": tp, "fp": fp, "fn": fn}


def token_prf(pred_tags, gold_tags, mask=None) -> dict:
    """Token-level precision/recall/F1 of the span class (B and I both count as span).

    Positions count where ``mask`` is true (default: where ``gold_tags`` is not ``IGNORE``); gold
    ``IGNORE`` positions never count. Precision (recall) is 0.0 when nothing is predicted (gold)."""
    pred = np.asarray(pred_tags)
    gold = np.asarray(gold_tags)
    if pred.shape != gold.shape:
        raise ValueError(f"pred_tags has shape {pred.shape}; expected {gold.shape} like gold_tags")
    valid = gold != IGNORE
    if mask is not None:
        valid &= np.asarray(mask, bool)
    pred_span = ((pred == B) | (pred == I)) & valid
    gold_span = ((gold == B) | (gold == I)) & valid
    tp = int(np.sum(pred_span & gold_span))
    return _prf(tp, int(np.sum(pred_span & ~gold_span)), int(np.sum(~pred_span & gold_span)))


def _as_offsets(span) -> tuple[int, int]:
    if isinstance(span, dict):
        return int(span["start"]), int(span["end"])
    start, end = span
    return int(start), int(end)


def span_prf(pred_spans: Sequence[Sequence], gold_spans: Sequence[Sequence]) -> dict:
    """Span-level precision/recall/F1: a predicted span counts only if its character offsets equal a gold
    span's. Both arguments hold one list per sentence; a span is ``(start, end)`` or a dict with
    ``start``/``end`` (as ``extract_spans`` returns)."""
    if len(pred_spans) != len(gold_spans):
        raise ValueError(f"{len(pred_spans)} predicted sentences but {len(gold_spans)} gold ones; expected as many")
    tp = fp = fn = 0
    for pred, gold in zip(pred_spans, gold_spans):
        if isinstance(pred, dict) or isinstance(gold, dict) or (
            len(pred) == 2 and all(isinstance(x, (int, np.integer)) for x in pred)
        ):
            raise TypeError("span_prf takes one list of spans per sentence; wrap a single sentence's spans in a list")
        pred_count = Counter(_as_offsets(s) for s in pred)
        gold_count = Counter(_as_offsets(s) for s in gold)
        hits = sum((pred_count & gold_count).values())
        tp += hits
        fp += sum(pred_count.values()) - hits
        fn += sum(gold_count.values()) - hits
    return _prf(tp, fp, fn)
