"""Masked-LM and multiple-choice encoding of AuditoryBench examples into ``EncodedExample`` records.

``encode_mlm(examples, tokenizer, *, max_length=128, strict=False) -> (list[EncodedExample], EncodeReport)``

* animal: the single ``[MASK]`` is replaced by as many ``[MASK]`` tokens as the answer has word pieces
  (as ITH does); the labels are the answer's pieces.
* pitch: one ``[MASK]``; the label is the id of ``lower`` or ``higher`` (both must be single pieces of the
  vocabulary, else ``UserError``).

Records are described in ``ith_jax.data.records``. ``offsets`` index the sentence after mask expansion,
and gold spans are located on that sentence, so expansion cannot shift them.

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

from typing import Sequence

import numpy as np
import tokenizers
from tokenizers import Tokenizer

from ith_common.errors import UserError
from ith_jax.data.auditorybench import OPTION_LETTERS, PITCH_LABELS, Example, find_spans
from ith_jax.data.records import EncodedExample, EncodeReport, span_token_range
from ith_jax.data.tokenizer import MASK_TOKEN, tokenizer_info


def _piece_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def _expand_mask(sentence: str, count: int) -> str:
    return sentence.replace(MASK_TOKEN, " ".join([MASK_TOKEN] * count), 1)


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
