"""Span detector data: BIO labels, their round trip back to character spans, metrics."""


import numpy as np
import pytest

from ith_jax.data.auditorybench import Example, find_span, find_spans, load_examples
from ith_jax.data.spans import (
    B,
    I,
    IGNORE,
    O,
    encode_spans,
    extract_spans,
    span_labels,
    span_prf,
    token_prf,
)

from tests.conftest import FILES


@pytest.fixture(scope="module")
def ref_tok(ckpt_dir):
    """transformers' tokenizer built from vocab.txt: an independent source of piece offsets."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(ckpt_dir / "vocab.txt"), do_lower_case=True)


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3)[np.where(labels == IGNORE, O, labels)]


def round_trip(tok, sentence, char_spans):
    enc = tok.encode(sentence)
    offsets, special = np.asarray(enc.offsets), np.asarray(enc.special_tokens_mask)
    labels = span_labels(offsets, char_spans, special)
    return labels, extract_spans(one_hot(labels), offsets, sentence, special)


def reference_snap(ref_tok, sentence, char_span):
    """Where a span should come back: from the first overlapping piece's start to the last one's end,
    with the pieces taken from the reference tokenizer."""
    offsets = [o for o in ref_tok(sentence, return_offsets_mapping=True)["offset_mapping"] if o[1] > o[0]]
    hit = [o for o in offsets if o[0] < char_span[1] and o[1] > char_span[0]]
    return hit[0][0], hit[-1][1]


# (sentence, gold span strings, texts the round trip must give back)
CASES = [
    ("A dog, barking loudly, wakes us.", ["dog, barking"], ["dog, barking"]),  # punctuation inside
    ("The sound of rain is lower than the sound of rain.", ["sound of rain", "sound of rain"], ["sound of rain", "sound of rain"]),
    ("The hum of a fridge has a [MASK] pitch than the buzz of a bee.", ["hum of a fridge", "buzz of a bee"], ["hum of a fridge", "buzz of a bee"]),
    ("We heard thunder rain down.", ["thunder", "rain"], ["thunder", "rain"]),  # touching at a space
    ("the buzz-hum sound", ["buzz", "-hum"], ["buzz", "-hum"]),  # touching, no space
    ("Whistling is what a [MASK] does at night.", ["whistling", "at night."], ["Whistling", "at night."]),  # start/end
    ("THE ROAR OF A LION is [MASK].", ["roar of a lion"], ["ROAR OF A LION"]),  # uppercase
    ("Birds chirping at dawn.", ["chirpi"], ["chirping"]),  # ends inside the piece ##ing: snaps out
    ("Birds chirping at dawn.", ["hirping at"], ["chirping at"]),  # starts inside the piece chi
    ("Birds chirping at dawn.", ["chirp"], ["chirp"]),  # "chi ##rp ##ing": a piece boundary, exact
    ("A [MASK] barking loudly.", ["[MASK] barking"], ["[MASK] barking"]),  # [MASK] inside a span
]


@pytest.mark.parametrize("sentence,span_texts,expected", CASES)
def test_round_trip_hand_cases(tok, ref_tok, sentence, span_texts, expected):
    gold = find_spans(sentence, span_texts)
    assert None not in gold
    _, spans = round_trip(tok, sentence, gold)
    assert [s["text"] for s in spans] == expected
    assert [(s["start"], s["end"]) for s in spans] == [reference_snap(ref_tok, sentence, g) for g in gold]
    assert all(s["confidence"] == 1.0 for s in spans)
    exact = [g for g, e in zip(gold, expected) if sentence[g[0] : g[1]] == e]
    assert all((g[0], g[1]) in [(s["start"], s["end"]) for s in spans] for g in exact)


def test_label_values(tok):
    labels, _ = round_trip(tok, "The sound of rain.", [(4, 17)])
    assert labels.tolist() == [IGNORE, O, B, I, I, O, IGNORE]
    sentence = "the buzz-hum sound"
    labels, _ = round_trip(tok, sentence, [find_span(sentence, "buzz"), find_span(sentence, "-hum")])
    assert tok.encode(sentence).tokens == ["[CLS]", "the", "buzz", "-", "hum", "sound", "[SEP]"]
    assert labels.tolist() == [IGNORE, O, B, B, I, O, IGNORE]  # touching spans stay two spans


def test_span_labels_merge_overlaps_and_ignore_padding():
    # pieces: [CLS] aa bb cc dd [SEP] [PAD] [PAD]
    offsets = np.array([[0, 0], [0, 2], [3, 5], [6, 8], [9, 11], [0, 0], [0, 0], [0, 0]])
    special = np.array([1, 0, 0, 0, 0, 1, 1, 1])
    assert span_labels(offsets, [(0, 5), (3, 8)], special).tolist() == [IGNORE, B, I, I, O, IGNORE, IGNORE, IGNORE]
    assert span_labels(offsets, [(6, 8), (0, 2)], special).tolist() == [IGNORE, B, O, B, O, IGNORE, IGNORE, IGNORE]
    # a boundary inside a piece: the shared piece goes to the first span
    assert span_labels(offsets, [(0, 4), (4, 8)], special).tolist() == [IGNORE, B, I, B, O, IGNORE, IGNORE, IGNORE]
    assert span_labels(offsets, [], special).tolist() == [IGNORE, O, O, O, O, IGNORE, IGNORE, IGNORE]
    with pytest.raises(ValueError, match="special_mask"):
        span_labels(offsets, [(0, 2)], special[:3])


def test_extract_spans_rules():
    sentence = "aa bb cc dd ee ff"
    offsets = np.array([[0, 0], [0, 2], [3, 5], [6, 8], [9, 11], [12, 14], [15, 17], [0, 0], [0, 0]])
    special = np.array([1, 0, 0, 0, 0, 0, 0, 1, 1])
    probs = np.array(
        [
            [0.0, 0.0, 1.0],  # [CLS] predicted I: ignored
            [0.2, 0.1, 0.7],  # aa: I without B starts a span
            [0.1, 0.4, 0.5],  # bb: I continues
            [0.9, 0.05, 0.05],  # cc: O
            [0.3, 0.6, 0.1],  # dd: B
            [0.2, 0.8, 0.0],  # ee: B again -> a new span
            [0.1, 0.3, 0.6],  # ff: I continues ee
            [0.0, 0.0, 1.0],  # [SEP]
            [0.0, 1.0, 0.0],  # [PAD]
        ]
    )
    spans = extract_spans(probs, offsets, sentence, special)
    assert [(s["start"], s["end"], s["text"]) for s in spans] == [(0, 5, "aa bb"), (9, 11, "dd"), (12, 17, "ee ff")]
    assert [s["confidence"] for s in spans] == pytest.approx([0.6, 0.6, 0.7])
    with pytest.raises(ValueError, match="tag_probs"):
        extract_spans(probs[:, :2], offsets, sentence, special)


def test_round_trip_on_all_real_gold_spans(tok, data_dir):
    """Every gold span of every real file: labels -> spans must give the snapped offsets back, and the
    gold offsets themselves wherever the span's ends fall on piece boundaries."""
    total = exact = snapped_ok = 0
    for name in FILES:
        examples, _ = load_examples(data_dir / name)
        records, report = encode_spans(examples, tok)
        expected_missing = sum(any(s.lower() not in e.sentence.lower() for s in e.spans) for e in examples)
        assert len(report.span_not_found) == expected_missing and len(records) == len(examples) - expected_missing
        for rec in records:
            gold = find_spans(rec.sentence, rec.example.spans)
            got = extract_spans(one_hot(rec.token_labels), rec.offsets, rec.sentence, rec.special_mask)
            got_offsets = [(s["start"], s["end"]) for s in got]
            for g, (start, end) in zip(gold, rec.span_token_ranges):
                total += 1
                exact += g in got_offsets
                snapped_ok += (int(rec.offsets[start, 0]), int(rec.offsets[end - 1, 1])) in got_offsets
    rate = exact / total
    print(f"\nexact recovery of gold character spans: {exact}/{total} = {rate:.4%}")
    assert total == 3887 + 541 + 16298 + 2316
    assert snapped_ok == total
    assert exact == total - 5  # five animal-train spans end inside a word ("breath" in "breathing")


def test_encode_spans_records(tok):
    ex = Example("pitch", "hand", 1, "The hum of a fridge has a [MASK] pitch than the buzz of a bee.", "lower", ("hum of a fridge", "buzz of a bee"))
    missing = Example("pitch", "hand", 2, "The hum has a [MASK] pitch than a bee.", "lower", ("hum", "buzz"))
    records, report = encode_spans([ex, missing], tok, max_length=64)
    assert len(records) == 1 and report.span_not_found == [("hand", 2)]
    rec = records[0]
    assert rec.sentence == ex.sentence and 103 in rec.input_ids.tolist()  # the mask stays as written
    assert (rec.token_labels == B).sum() == 2 and rec.token_labels.shape == rec.input_ids.shape
    assert rec.span_token_ranges.tolist() == [[2, 6], [12, 16]]
    _, report = encode_spans([ex], tok, max_length=8)
    assert report.too_long == [("hand", 1)]


def test_token_prf():
    pred = np.array([O, B, I, O, B])
    gold = np.array([O, B, O, I, IGNORE])
    assert token_prf(pred, gold) == {"precision": 0.5, "recall": 0.5, "f1": 0.5, "tp": 1, "fp": 1, "fn": 1}
    masked = token_prf(pred, gold, mask=np.array([1, 1, 0, 1, 1]))
    assert (masked["precision"], masked["recall"], masked["f1"]) == pytest.approx((1.0, 0.5, 2 / 3))
    nothing = token_prf(np.zeros(5, int), gold)
    assert nothing["precision"] == 0.0 and nothing["recall"] == 0.0 and nothing["fn"] == 2
    with pytest.raises(ValueError):
        token_prf(pred[:3], gold)


def test_span_prf():
    pred = [[(0, 3), {"start": 4, "end": 7, "text": "x", "confidence": 0.9}], [(1, 2)]]
    gold = [[(0, 3)], [(1, 2), (1, 2)]]
    result = span_prf(pred, gold)
    assert (result["tp"], result["fp"], result["fn"]) == (2, 1, 1)
    assert result["precision"] == pytest.approx(2 / 3) and result["f1"] == pytest.approx(2 / 3)
    assert span_prf([[(0, 4)]], [[(0, 3)]])["tp"] == 0  # off by one character is a miss
    with pytest.raises(TypeError, match="one list of spans per sentence"):
        span_prf([(0, 3)], [(0, 3)])
    with pytest.raises(ValueError):
        span_prf([[]], [[], []])
