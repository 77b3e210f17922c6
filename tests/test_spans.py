"""Span detector data: BIO labels, their round trip back to character spans in whole words, metrics."""


import numpy as np
import pytest

from ith_jax.data.auditorybench import Example, find_span, find_spans, load_examples
from ith_jax.data.span_cleaning import SpanCleaningStats
from ith_jax.data.spans import (
    B,
    I,
    IGNORE,
    O,
    encode_spans,
    decode_spans,
    extract_spans,
    snap_to_pieces,
    span_labels,
    span_prf,
    token_prf,
)

from tests.synthetic_data import FILES


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(3)[np.where(labels == IGNORE, O, labels)]


def round_trip(tok, sentence, char_spans):
    enc = tok.encode(sentence)
    offsets, special = np.asarray(enc.offsets), np.asarray(enc.special_tokens_mask)
    labels = span_labels(offsets, char_spans, special)
    return labels, extract_spans(one_hot(labels), offsets, sentence, special)


def reference_snap(ref_tok, sentence, char_span):
    """Where a span's labels reach: from the first overlapping piece's start to the last one's end,
    with the pieces taken from the reference tokenizer."""
    offsets = [o for o in ref_tok(sentence, return_offsets_mapping=True)["offset_mapping"] if o[1] > o[0]]
    hit = [o for o in offsets if o[0] < char_span[1] and o[1] > char_span[0]]
    return hit[0][0], hit[-1][1]


def _joined(sentence: str, position: int) -> bool:
    """Whether the boundary before ``sentence[position]`` lies inside a word: letters/digits on both sides,
    or a hyphen/apostrophe with letters/digits on both of its sides. Character by character, independent of
    the decoder's regular expression."""
    if position <= 0 or position >= len(sentence):
        return False
    left, right = sentence[position - 1], sentence[position]
    if left.isalnum() and right.isalnum():
        return True
    if right in "-'’" and left.isalnum():
        return position + 1 < len(sentence) and sentence[position + 1].isalnum()
    if left in "-'’" and right.isalnum():
        return position >= 2 and sentence[position - 2].isalnum()
    return False


def reference_word_spans(sentence, char_spans):
    """Where decoding must put gold spans: each grown to whole words, then those that overlap, touch or have
    only a hyphen between them joined."""
    grown = []
    for start, end in sorted(char_spans):
        while _joined(sentence, start):
            start -= 1
        while _joined(sentence, end):
            end += 1
        if grown and (start <= grown[-1][1] or sentence[grown[-1][1] : start] == "-"):
            grown[-1] = (grown[-1][0], max(end, grown[-1][1]))
        else:
            grown.append((start, end))
    return grown


# (sentence, gold span strings, texts the round trip must give back)
CASES = [
    ("A dog, barking loudly, wakes us.", ["dog, barking"], ["dog, barking"]),  # punctuation inside
    ("The sound of rain is lower than the sound of rain.", ["sound of rain", "sound of rain"], ["sound of rain", "sound of rain"]),
    ("The hum of a fridge has a [MASK] pitch than the buzz of a bee.", ["hum of a fridge", "buzz of a bee"], ["hum of a fridge", "buzz of a bee"]),
    ("We heard thunder rain down.", ["thunder", "rain"], ["thunder", "rain"]),  # touching at a space: two spans
    ("the buzz-hum sound", ["buzz", "-hum"], ["buzz-hum"]),  # two B tags inside one hyphenated word: one span
    ("The [MASK]-like hum.", ["[MASK]", "like"], ["[MASK]-like"]),  # only a hyphen between: merged
    ("Whistling is what a [MASK] does at night.", ["whistling", "at night."], ["Whistling", "at night."]),  # start/end
    ("THE ROAR OF A LION is [MASK].", ["roar of a lion"], ["ROAR OF A LION"]),  # uppercase
    ("Birds chirping at dawn.", ["chirpi"], ["chirping"]),  # ends inside the piece ##ing
    ("Birds chirping at dawn.", ["hirping at"], ["chirping at"]),  # starts inside the piece chi
    ("Birds chirping at dawn.", ["chirp"], ["chirping"]),  # "chi ##rp ##ing": a piece boundary, still a word
    ("Hummingbirds hum.", ["Humming"], ["Hummingbirds"]),  # a real gold span (animal dev) cut by ##birds
    ("A high-pitched whine is [MASK].", ["pitched whine"], ["high-pitched whine"]),  # starts after a hyphen
    ("The dog's growl has a [MASK] pitch.", ["s growl"], ["dog's growl"]),  # starts after an apostrophe
    ("A [MASK] barking loudly.", ["[MASK] barking"], ["[MASK] barking"]),  # [MASK] inside a span
]


@pytest.mark.parametrize("sentence,span_texts,expected", CASES)
def test_round_trip_hand_cases(tok, sentence, span_texts, expected):
    gold = find_spans(sentence, span_texts)
    assert None not in gold
    _, spans = round_trip(tok, sentence, gold)
    assert [s["text"] for s in spans] == expected
    assert [(s["start"], s["end"]) for s in spans] == reference_word_spans(sentence, gold)
    assert all(s["confidence"] == 1.0 for s in spans)
    exact = [g for g, e in zip(gold, expected) if sentence[g[0] : g[1]] == e]
    assert all((g[0], g[1]) in [(s["start"], s["end"]) for s in spans] for g in exact)


@pytest.mark.parametrize("sentence,span_texts,expected", CASES)
def test_labels_reach_the_reference_pieces(tok, ref_vocab_tok, sentence, span_texts, expected):
    """Labels stay per piece: the tagged pieces of each gold span end where the reference tokenizer's do."""
    enc = tok.encode(sentence)
    offsets, special = np.asarray(enc.offsets), np.asarray(enc.special_tokens_mask)
    labels = span_labels(offsets, find_spans(sentence, span_texts), special)
    for gold in find_spans(sentence, span_texts):
        start, end = snap_to_pieces(offsets, gold, special)
        assert (start, end) == reference_snap(ref_vocab_tok, sentence, gold)
        tagged = np.flatnonzero((offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (special == 0))
        assert set(labels[tagged].tolist()) <= {B, I} and labels[tagged[0]] == B


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


def test_extract_spans_keeps_words_whole():
    # "high-pitched dog's barking": pieces high - pitched dog ' s bark ##ing
    sentence = "high-pitched dog's barking"
    offsets = np.array([[0, 0], [0, 4], [4, 5], [5, 12], [13, 16], [16, 17], [17, 18], [19, 23], [23, 26], [0, 0]])
    special = np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1])

    def decode(tags, chosen=1.0):
        probs = np.full((len(tags), 3), (1 - chosen) / 2)
        probs[np.arange(len(tags)), tags] = chosen
        stats = SpanCleaningStats()
        spans = extract_spans(probs, offsets, sentence, special, stats=stats)
        return [s["text"] for s in spans], (stats.spans_in, stats.extended_to_words, stats.merged), spans

    #             CLS high - pitched dog ' s bark ##ing SEP
    assert decode([O, O, O, B, O, O, O, O, O, O])[:2] == (["high-pitched"], (1, 1, 0))  # part after a hyphen
    assert decode([O, B, O, B, O, O, O, O, O, O])[:2] == (["high-pitched"], (2, 2, 1))  # two B's in one word
    assert decode([O, B, I, B, I, O, O, O, O, O])[:2] == (["high-pitched dog's"], (2, 2, 1))
    assert decode([O, O, O, O, O, O, B, I, I, O])[:2] == (["dog's barking"], (1, 1, 0))  # "s" of "dog's"
    assert decode([O, O, O, O, O, O, O, O, I, O])[:2] == (["barking"], (1, 1, 0))  # I after O, a ## piece
    assert decode([O, B, I, I, B, I, I, B, I, O])[:2] == (["high-pitched", "dog's", "barking"], (3, 0, 0))
    # confidence: the pieces the model tagged, not the ones pulled in to complete the word
    _, _, spans = decode([O, O, O, O, O, O, O, O, I, O], chosen=0.8)
    assert spans[0]["confidence"] == pytest.approx(0.8)


def test_extract_spans_of_nothing():
    assert extract_spans(np.zeros((0, 3)), np.zeros((0, 2), int), "", np.zeros(0, int)) == []
    assert extract_spans(np.zeros((0,)), [], "", []) == []
    stats = SpanCleaningStats()
    assert decode_spans(np.zeros((0, 3)), np.zeros((0, 2), int), "", np.zeros(0, int), stats=stats, gold_count=0) == []
    assert (stats.sentences, stats.spans_in, stats.spans_out, stats.gold_sentences) == (1, 0, 0, 1)


def tags_from(tok, sentence, span_texts):
    """One-hot tag probabilities that tag exactly the pieces overlapping ``span_texts``: what a detector that
    tagged those pieces would output (parts of words included)."""
    enc = tok.encode(sentence)
    offsets, special = np.asarray(enc.offsets), np.asarray(enc.special_tokens_mask)
    return one_hot(span_labels(offsets, find_spans(sentence, span_texts), special)), offsets, special


DECODE_CASES = [
    # (sentence, tagged text, spans handed on, (spans_in, extended, merged, dropped))
    ("A high-pitched whine is [MASK].", ["high", "pitched whine"], ["high-pitched whine"], (2, 2, 1, 0)),
    ("Compared with a dog's growl, a wren has a [MASK] pitch.", ["dog", "s growl"], ["dog's growl"], (2, 2, 1, 0)),
    ("Birds chirping at dawn.", ["chirp"], ["chirping"], (1, 1, 0, 0)),
    ("The sound of a [MASK] is often heard at night.", ["sound of"], [], (1, 0, 0, 1)),
    ("The sound of a [MASK] is often heard at night.", ["The sound of a [MASK]"], [], (1, 0, 0, 1)),
    ("The noise of rain is [MASK].", ["The noise of", "rain"], ["rain"], (2, 0, 0, 1)),
    ("The hum of a fridge has a [MASK] pitch than the buzz of a bee.", ["hum of a fridge", "buzz of a bee"],
     ["hum of a fridge", "buzz of a bee"], (2, 0, 0, 0)),
    ("The sound of a piano has a [MASK] pitch than the sound of a tuba.", ["sound of a piano", "sound of a tuba"],
     ["sound of a piano", "sound of a tuba"], (2, 0, 0, 0)),  # kept as detected: no trimming
    ("Rain drumming on a tin roof.", ["Rain drumming on a tin roof."], ["Rain drumming on a tin roof."], (1, 0, 0, 0)),
    ("Nothing to hear in this [MASK].", [], [], (0, 0, 0, 0)),
]


@pytest.mark.parametrize("sentence,tagged,expected,counts", DECODE_CASES)
def test_decode_spans(tok, sentence, tagged, expected, counts):
    probs, offsets, special = tags_from(tok, sentence, tagged)
    stats = SpanCleaningStats()
    spans = decode_spans(probs, offsets, sentence, special, stats=stats, gold_count=2)
    assert [s["text"] for s in spans] == expected
    assert all(sentence[s["start"] : s["end"]] == s["text"] for s in spans)
    assert (stats.spans_in, stats.extended_to_words, stats.merged, stats.dropped_function_only) == counts
    assert (stats.sentences, stats.spans_out, stats.gold_sentences, stats.gold_spans) == (1, len(expected), 1, 2)


def test_decode_spans_sums_stats_over_sentences(tok):
    stats = SpanCleaningStats()
    for sentence, tagged, _, _ in DECODE_CASES:
        probs, offsets, special = tags_from(tok, sentence, tagged)
        decode_spans(probs, offsets, sentence, special, stats=stats)
    assert stats.as_dict() == {"sentences": 10, "spans_in": 14, "extended_to_words": 5, "merged": 2,
                               "dropped_function_only": 3, "spans_out": 9, "gold_sentences": 0, "gold_spans": 0}
    assert stats.summary() == ("10 sentences: 14 spans decoded (1.40 per sentence), 5 extended to whole words, "
                               "2 merged, 3 dropped (function words only); 9 kept (0.90 per sentence)")
    stats.add(SpanCleaningStats(sentences=2, spans_out=1, gold_sentences=2, gold_spans=3))
    assert stats.summary().endswith("10 kept (0.83 per sentence) against 3 gold (1.50 per sentence)")


def test_round_trip_on_all_gold_spans(bench_is_real, tok, bench_dir):
    """Every gold span of every file: labels -> spans must give the labelled pieces back grown to whole
    words, and the gold offsets themselves wherever the span's ends fall on word boundaries."""
    total = exact = 0
    stats = SpanCleaningStats()
    for name in FILES:
        examples, _ = load_examples(bench_dir / name)
        records, report = encode_spans(examples, tok)
        expected_missing = sum(any(s.lower() not in e.sentence.lower() for s in e.spans) for e in examples)
        assert len(report.span_not_found) == expected_missing and len(records) == len(examples) - expected_missing
        for rec in records:
            gold = find_spans(rec.sentence, rec.example.spans)
            got = extract_spans(one_hot(rec.token_labels), rec.offsets, rec.sentence, rec.special_mask, stats=stats)
            got_offsets = [(s["start"], s["end"]) for s in got]
            labelled = [(int(rec.offsets[start, 0]), int(rec.offsets[end - 1, 1]))
                        for start, end in rec.span_token_ranges]
            assert got_offsets == reference_word_spans(rec.sentence, labelled), rec.example.where
            total += len(gold)
            exact += sum(g in got_offsets for g in gold)
    rate = exact / total
    print(f"\nexact recovery of gold character spans: {exact}/{total} = {rate:.4%} "
          f"({stats.extended_to_words} extended to whole words)")
    assert stats.spans_in == total > 0 and stats.merged == 0  # gold spans never share a word
    if bench_is_real:
        assert total == 3887 + 541 + 16298 + 2316
        # Six gold spans end inside a word: five in animal train cut inside a piece ("breath" of "breathing"),
        # and "Humming" of "Hummingbirds" (animal dev), cut at a piece boundary: the one extension.
        assert exact == total - 6 and stats.extended_to_words == 1
    else:
        assert exact == total and stats.extended_to_words == 0  # every synthetic span is whole words


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
