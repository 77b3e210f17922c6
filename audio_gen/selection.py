"""Choosing which of a span's K audio candidates to use, from the CLAP scores stored in the cache.

The cache keeps every candidate's score, so the rule and threshold are picked at training time:

* `first_above` (ITH): the first candidate, in generation order, whose score is >= threshold.
* `best`: the highest-scoring candidate (the first one on ties), if its score is >= threshold.

Both return None when no candidate qualifies; the span then gets no audio (ITH's fallback).  Both rules
accept exactly the same spans for a given threshold (some score >= threshold), so the acceptance rate does not
depend on the rule; they differ in which candidate they pick.

numpy only: the JAX side imports this module.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

RULES = ("first_above", "best")
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


def select_candidate(clap_scores, rule: str = "first_above", threshold: float = 0.0) -> int | None:
    """Index of the chosen candidate, or None when no candidate reaches `threshold` (NaN never does)."""
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {', '.join(RULES)}, got {rule!r}")
    scores = _as_scores(clap_scores)
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
    """Fraction of entries that get audio at each threshold: `{threshold: rate}` (NaN when there are none)."""
    best = np.asarray([_best_score(scores) for scores in scores_list], dtype=np.float64)
    rates: dict[float, float] = {}
    for threshold in thresholds:
        rates[float(threshold)] = float(np.mean(best >= threshold)) if len(best) else float("nan")
    return rates
