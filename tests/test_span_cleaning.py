"""Span cleaning: words, the words that name no source, which spans are dropped, and its counts on the gold spans."""

from collections import Counter

import pytest

from ith_jax.data.auditorybench import find_spans, load_examples
from ith_jax.data.span_cleaning import (
    FUNCTION_WORDS,
    SHARED_SPAN_WORDS,
    SHARED_WORD_MIN_SHARE,
    SpanCleaningStats,
    clean_spans,
    names_a_source,
    span_words,
    word_bounds,
)

from tests.synthetic_data import FILES

TRAIN_FILES = tuple(name for name in FILES if name.endswith("train.csv"))


def test_words_keep_hyphen_and_apostrophe_compounds():
    sentence = "A high-pitched, 8-bit dog's bark (clip-clop) - then _rain_ and the dogs' [MASK]."
    words = [sentence[s:e] for s, e in word_bounds(sentence)]
    assert words == ["A", "high-pitched", "8-bit", "dog's", "bark", "clip-clop", "then", "rain", "and", "the",
                     "dogs", "MASK"]
    assert span_words("The [MASK]'s High-Pitched call") == ["the", "s", "high-pitched", "call"]
    assert word_bounds("") == [] and span_words("...") == []


@pytest.mark.parametrize("text", ["sound", "Sound of", "the sound of a", "sounds", "a noise", "noises in it",
                                  "[MASK]", "of the [MASK]", "—", "", "being done"])
def test_spans_that_name_no_source(text):
    assert not names_a_source(text)


@pytest.mark.parametrize("text", ["sound of a piano", "rain", "call", "sound of a can", "door being closed off",
                                  "high-pitched", "cry", "white noise", "sound of fire", "[MASK] barking", "8-bit"])
def test_spans_that_name_a_source(text):
    assert names_a_source(text)


def test_clean_spans_drops_and_counts():
    spans = [{"text": "sound of", "start": 4, "end": 12}, {"text": "a kettle", "start": 20, "end": 28},
             {"text": "noise", "start": 30, "end": 35}]
    stats = SpanCleaningStats()
    assert clean_spans(spans, stats=stats) == [spans[1]]
    assert stats.dropped_function_only == 2
    assert clean_spans([], stats=stats) == [] and stats.dropped_function_only == 2
    assert clean_spans(spans) == [spans[1]]  # without stats


def _gold_span_texts(root, names):
    for name in names:
        examples, _ = load_examples(root / name)
        for example in examples:
            for char_span in find_spans(example.sentence, example.spans):
                if char_span is not None:
                    yield example.sentence[char_span[0] : char_span[1]]


def test_shared_words_are_counted_on_the_train_gold_spans(data_dir):
    """SHARED_SPAN_WORDS is derived, not tuned: every word in more than SHARED_WORD_MIN_SHARE of the train gold
    spans is a function word or a shared word, and the only content word among them is "sound"."""
    texts = list(_gold_span_texts(data_dir, TRAIN_FILES))
    share = Counter(word for text in texts for word in set(span_words(text)))
    frequent = {word for word, count in share.items() if count / len(texts) > SHARED_WORD_MIN_SHARE}
    print(f"\n{len(texts)} train gold spans; words in more than {SHARED_WORD_MIN_SHARE:.0%}: "
          + ", ".join(f"{w} {share[w] / len(texts):.1%}" for w in sorted(frequent, key=lambda w: -share[w])))
    assert len(texts) == 20328
    assert frequent - FUNCTION_WORDS == {"sound"} and "sound" in SHARED_SPAN_WORDS
    assert frequent <= FUNCTION_WORDS | SHARED_SPAN_WORDS
    # the next content word is far below the threshold: the list does not hinge on its exact value
    assert max(count for word, count in share.items() if word not in frequent) / len(texts) < 0.045


def test_cleaning_keeps_the_gold_spans(data_dir):
    """Gold spans of all four files: cleaning drops only the spans that name no source ("sound" alone, in
    "The sound of a [MASK] is often heard at night"), which would become the prompt "sound sound"."""
    texts = list(_gold_span_texts(data_dir, FILES))
    dropped = Counter(text.lower() for text in texts if not names_a_source(text))
    kept = len(texts) - sum(dropped.values())
    print(f"\ncleaning keeps {kept} of {len(texts)} gold spans; drops {dict(dropped)}")
    assert len(texts) == 23201
    assert kept == 23091
    assert dropped == {"sound": 104, "noise": 4, "the sound of a": 2}
