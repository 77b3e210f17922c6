"""Which detected spans may become prompts: words, the words that name no source, and the counts of what was dropped.

A detected span becomes the prompt ``"{span} sound"`` (``ith_common.prompts``), so a span must name where a sound
comes from. The MiniLM detector, measured on 2,386 held-out pitch sentences, returned 5,404 spans for 4,730 gold
ones; 618 of them held no such word ("sound", "sound of") and would have become prompts like "sound sound".
`clean_spans` drops a span none of whose words names a source, and counts it in `SpanCleaningStats`; the
decoder (``ith_jax.data.spans.extract_spans``) uses `word_bounds` so that a span never starts or ends inside a
word, and counts its repairs there too.

Words: letters and digits, with the parts of a hyphen or apostrophe compound kept together ("high-pitched",
"dog's", "8-bit", "clip-clop"), as `WORD_PATTERN` says. The tokenizer splits those into pieces ("high", "-",
"pitched"); a text-to-audio prompt needs the whole word.

Why a kept span is not trimmed (no leading/trailing function words stripped): the gold spans are phrased the way
the detector is trained to find them. Over the 23,201 gold spans of the four files, 8,344 start with "sound of"
(e.g. "sound of a piano"), 35 start with a function word and 196 end with one, mostly verb particles that belong
to the source ("door being closed off"). Trimming would change those spans and make exact-match span F1 against
gold collapse (the "sound of ..." ones alone are 36% of the gold spans), while "sound of a piano sound" names the
piano just as well as "piano sound". So a span is either kept as detected or dropped whole.

Measured on those 23,201 gold spans, `names_a_source` keeps 23,091; the 110 it drops are "sound" (104), "noise"
(4) and "The sound of a" (2), e.g. the animal span "sound" in "The sound of a [MASK] is often heard at night":
exactly the spans that would become "sound sound".
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from typing import Sequence

from ith_jax.data.tokenizer import MASK_TOKEN

# A word: letters/digits, with inner hyphens and apostrophes ("high-pitched", "dog's", "dog’s"). "_" is excluded
# because the tokenizer treats it as punctuation.
WORD_PATTERN = re.compile(r"[^\W_]+(?:[-'’][^\W_]+)*")

# English function words: articles, demonstratives, prepositions, conjunctions, pronouns, auxiliaries and modals,
# quantifiers. Hand-written rather than a library's list: the common stop lists hold content words that
# AuditoryBench uses as sources; scikit-learn's ENGLISH_STOP_WORDS in its place would drop 37 more gold spans
# ("call" 27, "cry" 3, "sound of fire" 4, "sound of a fire" 2, "sound of a can" 1). Nouns that double as function
# words stay out: "can" is a modal but also a tin can ("sound of a can"; 66 gold spans end with it), and "will",
# "may", "must" are left out for the same reason.
FUNCTION_WORDS = frozenset(
    """
    a an the this that these those
    of in on at by for from to with without within into onto upon over under above below across along among
    around against behind beside besides between beyond during except inside outside near off out through
    throughout toward towards up down via per like unlike than as about after before until till since while
    and or but nor so yet either neither both whether if then because although though
    i me my mine myself you your yours yourself yourselves he him his himself she her hers herself
    it its itself we us our ours ourselves they them their theirs themselves
    one ones someone something somebody anyone anything everyone everything
    who whom whose which what whatever whoever where when why how there here
    is am are was were be been being do does did doing done have has had having
    could might shall should would
    not no some any each every all such own same other another more most very too just only also
    """.split()
)

# The words every AuditoryBench span shares, which name no source on their own. Derived by counting, over the
# gold spans of the two TRAIN files (animal + pitch, 20,328 spans found in their sentences), the share of spans
# that contain each word: "of" 40.9%, "sound" 40.1%, "a" 36.9%, then "in" 5.8%, "being" 5.3% and below 4.5%
# nothing but content words ("drum" 4.4%, "loop" 3.5%). Every word above 5% is a function word except "sound";
# the plural and the one synonym the spans use the same way ("noise", in 1.2% of spans: "a noise", "white
# noise") are added so that "sounds"/"noise" alone are dropped as well. tests/test_span_cleaning.py recounts
# this on the train files. Not tuned on dev.
SHARED_SPAN_WORDS = frozenset({"sound", "sounds", "noise", "noises"})
SHARED_WORD_MIN_SHARE = 0.05  # the share of train gold spans above which a word counts as shared

_NAMES_NO_SOURCE = FUNCTION_WORDS | SHARED_SPAN_WORDS


def word_bounds(text: str) -> list[tuple[int, int]]:
    """Character ``(start, end)`` of every word of ``text`` (`WORD_PATTERN`), in order."""
    return [match.span() for match in WORD_PATTERN.finditer(text)]


def span_words(text: str) -> list[str]:
    """The lower-cased words of a span's text, without the ``[MASK]`` token (it names no source)."""
    return [word.lower() for word in WORD_PATTERN.findall(text.replace(MASK_TOKEN, " "))]


def names_a_source(text: str) -> bool:
    """Whether the span holds a word other than function words and `SHARED_SPAN_WORDS`."""
    return any(word not in _NAMES_NO_SOURCE for word in span_words(text))


@dataclass
class SpanCleaningStats:
    """What decoding and cleaning did, summed over sentences (``add`` another to combine).

    ``spans_in``: spans the BIO tags gave; ``extended_to_words``: spans whose ends a word piece would have cut,
    moved out to the word's ends; ``merged``: spans joined to the one before (same word, or only a hyphen or
    nothing between); ``dropped_function_only``: spans with no word naming a source (only function words,
    `SHARED_SPAN_WORDS`, ``[MASK]`` or punctuation); ``spans_out``: spans kept; ``gold_spans``: the gold spans
    of the ``gold_sentences`` that have them, to compare counts per sentence.
    """

    sentences: int = 0
    spans_in: int = 0
    extended_to_words: int = 0
    merged: int = 0
    dropped_function_only: int = 0
    spans_out: int = 0
    gold_sentences: int = 0
    gold_spans: int = 0

    def add(self, other: "SpanCleaningStats") -> None:
        for name, value in asdict(other).items():
            setattr(self, name, getattr(self, name) + value)

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for the log, e.g. ``1175 sentences: 2432 spans decoded (2.07 per sentence), ...``."""

        def per(count: int, sentences: int) -> str:
            return f"{count / sentences:.2f} per sentence" if sentences else "no sentences"

        text = (
            f"{self.sentences} sentences: {self.spans_in} spans decoded ({per(self.spans_in, self.sentences)}), "
            f"{self.extended_to_words} extended to whole words, {self.merged} merged, "
            f"{self.dropped_function_only} dropped (function words only); "
            f"{self.spans_out} kept ({per(self.spans_out, self.sentences)})"
        )
        if self.gold_sentences:
            text += f" against {self.gold_spans} gold ({per(self.gold_spans, self.gold_sentences)})"
        return text


def clean_spans(spans: Sequence[dict], *, stats: SpanCleaningStats | None = None) -> list[dict]:
    """The spans (dicts with ``text``) that name a source, in order; the others are counted in ``stats``."""
    kept = [span for span in spans if names_a_source(span["text"])]
    if stats is not None:
        stats.dropped_function_only += len(spans) - len(kept)
    return kept
