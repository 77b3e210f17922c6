"""Masked-LM and multiple-choice encoding (ith_jax.data.mlm), on the synthetic files, the real ones and hand-made examples."""

import numpy as np
import pytest

from ith_common.errors import UserError
from ith_jax.data.auditorybench import Example, load_examples
from ith_jax.data.mlm import encode_choices, encode_mlm
from ith_jax.data.tokenizer import load_tokenizer


def test_encode_mlm_pitch(bench_is_real, tok, ref_python_tok, bench_dir):
    examples, _ = load_examples(bench_dir / "pitch/dev.csv")
    encoded, report = encode_mlm(examples, tok)
    assert len(encoded) == len(examples) == report.records_out
    lower, higher = ref_python_tok.convert_tokens_to_ids(["lower", "higher"])
    for rec in encoded:
        assert rec.input_ids.dtype == np.int32 and rec.length == len(rec.input_ids)
        assert rec.input_ids.tolist() == ref_python_tok(rec.example.sentence)["input_ids"]
        assert rec.sentence == rec.example.sentence
        assert rec.mask_positions.tolist() == [rec.input_ids.tolist().index(103)]
        assert rec.mask_label_ids.tolist() == [lower if rec.example.answer == "lower" else higher]
        # every span range found covers exactly the span's text
        for (start, end), which in zip(rec.span_token_ranges, rec.span_index):
            text = rec.sentence[rec.offsets[start, 0] : rec.offsets[end - 1, 1]]
            assert text.lower() == rec.example.spans[which].lower()
    found = sum(len(r.span_index) for r in encoded)
    missing = sum(1 for e in examples for s in e.spans if s.lower() not in e.sentence.lower())
    assert found == 2 * len(examples) - missing
    rows_missing = sum(any(s.lower() not in e.sentence.lower() for s in e.spans) for e in examples)
    assert rows_missing > 0 and len(report.span_not_found) == rows_missing
    if bench_is_real:
        assert len(report.span_not_found) == 17


def test_encode_mlm_animal_expands_mask_to_answer_pieces(bench_is_real, tok, ref_python_tok, bench_dir):
    examples, _ = load_examples(bench_dir / "animal/train.csv")
    encoded, report = encode_mlm(examples, tok)
    assert len(encoded) == len(examples)
    multi = 0
    for rec in encoded:
        gold = ref_python_tok(rec.example.answer, add_special_tokens=False)["input_ids"]
        assert rec.mask_label_ids.tolist() == gold
        assert len(rec.mask_positions) == len(gold)
        positions = rec.mask_positions.tolist()
        assert positions == list(range(positions[0], positions[0] + len(gold)))  # consecutive masks
        assert (rec.input_ids[rec.mask_positions] == 103).sum() == len(gold) == (rec.input_ids == 103).sum()
        multi += len(gold) > 1
        for (start, end), which in zip(rec.span_token_ranges, rec.span_index):
            span = rec.example.spans[which].lower()
            text = rec.sentence[rec.offsets[start, 0] : rec.offsets[end - 1, 1]].lower()
            assert span in text and len(text) - len(span) < 20  # snapped outwards to whole pieces at most
    assert multi > (900 if bench_is_real else 0)  # about a quarter of the real answers have several pieces


def test_span_ranges_follow_the_expanded_mask(tok):
    ex = Example("animal", "hand", 1, "A [MASK] makes a chirping sound.", "giant bug", ("chirping sound",))
    (rec,), _ = encode_mlm([ex], tok)
    assert rec.sentence == "A [MASK] [MASK] makes a chirping sound."
    start, end = rec.span_token_ranges[0]
    assert tok.decode(rec.input_ids[start:end].tolist()) == "chirping sound"
    assert rec.sentence[rec.offsets[start, 0] : rec.offsets[end - 1, 1]] == "chirping sound"


def test_over_long_sequences_dropped_or_strict_error(bench_is_real, tok, bench_dir):
    examples, _ = load_examples(bench_dir / "pitch/dev.csv")
    lengths = [len(tok.encode(e.sentence).ids) for e in examples]
    limit = 24 if bench_is_real else sorted(lengths)[len(lengths) // 2]
    encoded, report = encode_mlm(examples, tok, max_length=limit)
    assert 0 < sum(n > limit for n in lengths) < len(lengths)
    assert len(encoded) == sum(n <= limit for n in lengths) and len(report.too_long) == sum(n > limit for n in lengths)
    assert report.longest == max(lengths) and f"longer than max_length {limit}" in report.summary()
    with pytest.raises(UserError, match=rf"dev\.csv row \d+: \d+ tokens; expected at most max_length={limit}"):
        encode_mlm(examples, tok, max_length=limit, strict=True)


def test_pitch_labels_must_be_single_pieces(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "sound", "is", "low", "##er", "higher", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    small = load_tokenizer(tmp_path)
    ex = Example("pitch", "hand", 1, "the sound is [MASK].", "lower", ("the sound", "sound"))
    with pytest.raises(UserError, match="pitch label 'lower' is not a single word piece"):
        encode_mlm([ex], small)


def test_encode_choices(tok, ref_python_tok, bench_dir):
    examples, _ = load_examples(bench_dir / "animal/dev.csv")
    records, report = encode_choices(examples, tok)
    assert len(records) == 4 * len(examples)
    for k, rec in enumerate(records):
        ex = examples[k // 4]
        assert rec.example is ex and rec.choice == k % 4
        option = ex.options[rec.choice]
        gold = ref_python_tok(option, add_special_tokens=False)["input_ids"]
        assert rec.mask_label_ids.tolist() == gold and (rec.input_ids == 103).sum() == len(gold)
        expanded = ex.sentence.replace("[MASK]", " ".join(["[MASK]"] * len(gold)))
        assert rec.input_ids.tolist() == ref_python_tok(expanded)["input_ids"]
    # the gold option's record is the MLM record
    mlm, _ = encode_mlm(examples[:50], tok)
    for ex, m in zip(examples[:50], mlm):
        if ex.options[ex.option_answer_index] == ex.answer:
            r = records[4 * examples.index(ex) + ex.option_answer_index]
            assert np.array_equal(r.input_ids, m.input_ids) and np.array_equal(r.mask_label_ids, m.mask_label_ids)


def test_encode_choices_drops_whole_groups(tok):
    long_option = " ".join(["elephant"] * 20)
    a = Example("animal", "hand", 1, "A [MASK] trumpets.", "elephant", ("trumpets",), ("cat", long_option, "dog", "cow"), "B")
    b = Example("animal", "hand", 2, "A [MASK] barks.", "dog", ("barks",), ("cat", "owl", "dog", "cow"), "C")
    c = Example("animal", "hand", 3, "A [MASK] barks.", "dog", ("barks",))
    records, report = encode_choices([a, b, c], tok, max_length=16)
    assert [(r.example.row, r.choice) for r in records] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert report.too_long == [("hand", 1)] and report.no_options == [("hand", 3)]
