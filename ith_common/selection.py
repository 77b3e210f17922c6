"""Choosing which of a span's K audio candidates to use, from the CLAP scores stored in the cache.

The cache keeps every candidate's score, so the rule and threshold are picked at training time:

* `first_above` (ITH): the first candidate, in generation order, whose score is >= threshold.
* `best`: the highest-scoring candidate (the first one on ties), if its score is >= threshold.
* `first`: candidate 0, whatever its score; the threshold is ignored.  For caches built without CLAP scoring
  (`configs/gen.py:oracle`, whose scores are all NaN: CLAP has nothing to say about a synthetic tone).

`first_above` and `best` return None when no candidate qualifies; the span then gets no audio (ITH's fallback).
A NaN score means "not scored" and never qualifies, so on an unscored cache these two rules select nothing
rather than pretending to have judged a candidate: every span gets no audio, and the acceptance rate is 0.
`first` is the rule for such a cache.  `first_above` and `best` accept exactly the same spans for a given
threshold (some score >= threshold), so the acceptance rate does not depend on which of the two is used; they
differ in which candidate they pick.

numpy only: the JAX side imports this module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

RULES = ("first_above", "best", "first")
THRESHOLD_FREE_RULES = ("first",)
DEFAULT_THRESHOLDS = (0.0, 0.2, 0.4, 0.6, 0.8)


def _as_scores(clap_scores) -> np.ndarray:
    scores = np.asarray(clap_scores, dtype=np.float64)
    if scores.ndim != 1:
        raise ValueError(f"clap_scores: expected a 1-D array of K scores, got shape {scores.shape}")
    return scores


def _best_score(clap_scores) -> float:
    """The highest non-NaN score, or -inf when there is none (an entry that can never be accepted)."""
    scores = _as_scores(clap_scores)
    scores = scores[~np.isnan(scores)]
    return float(scores.max()) if scores.size else -np.inf


def is_unscored(clap_scores) -> bool:
    """True when no candidate has a score (all NaN): a cache built without CLAP scoring."""
    return bool(np.isnan(_as_scores(clap_scores)).all())


def select_candidate(clap_scores, rule: str = "first_above", threshold: float = 0.0) -> int | None:
    """Index of the chosen candidate, or None when no candidate reaches `threshold` (NaN never does).

    ``rule="first"`` returns 0 for any entry with at least one candidate, scored or not."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    scores = _as_scores(clap_scores)
    if rule == "first":
        return 0 if scores.size else None
    # NaN >= threshold is False, so a NaN score is never accepted.
    accepted = scores >= threshold
    if not accepted.any():
        return None
    if rule == "first_above":
        return int(np.flatnonzero(accepted)[0])
    masked = np.where(accepted, scores, -np.inf)
    return int(np.argmax(masked))  # argmax returns the first maximum: ties go to the earlier candidate


def select_all(scores_list: Iterable, rule: str = "first_above", threshold: float = 0.0) -> list[int | None]:
    """`select_candidate` over many entries."""
    return [select_candidate(scores, rule, threshold) for scores in scores_list]


def acceptance_rates(scores_list: Iterable, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> dict[float, float]:
    """Fraction of entries that get audio at each threshold under `first_above`/`best`: `{threshold: rate}` (NaN
    when there are no entries; 0 for unscored entries, which only `first` selects from)."""
    best = np.asarray([_best_score(scores) for scores in scores_list], dtype=np.float64)
    rates: dict[float, float] = {}
    for threshold in thresholds:
        rates[float(threshold)] = float(np.mean(best >= threshold)) if len(best) else float("nan")
    return rates
