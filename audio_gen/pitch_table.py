"""An ORACLE pitch table: a Bradley-Terry fit to the labelled pitch comparisons, as prompt -> Hz.

    python -m audio_gen.pitch_table --data pitch/train.csv pitch/dev.csv --out oracle_pitch.json

Every labelled row "<span1> has a [MASK] pitch than <span2>" with answer higher/lower is one comparison.  A
Bradley-Terry model (P(a above b) = sigmoid(s_a - s_b), with an L2 penalty that keeps spans seen once finite) gives
each span a strength; the strengths' ranks are spread log-uniformly over the tone generator's range (110-1760 Hz), so
a span judged higher gets a higher tone.  The table's keys are the prompts `ith_common.prompts.build_prompt` makes from
the spans, which is what `configs/gen.py:oracle` (the `tone` generator's `tone_frequencies`) looks up.

The labels leak into the audio by construction: a model that hears these tones is told the answer.  This is a
ceiling for the fusion mechanism, never a result about imagined audio; the table says so in its `_note`.

Why not a library: choix's optimisers build a dense n x n Hessian, which for the 15,458 spans of pitch train + dev took
68 s and about 2 GB here; scipy's L-BFGS on the sparse gradient below takes well under a second.
"""

from __future__ import annotations

import argparse
import csv
import json
import pathlib
import sys
from typing import Sequence

import numpy as np

from audio_gen.generators.tone import MAX_HZ, MIN_HZ
from ith_common.atomic import atomic_write_text, check_output_file
from ith_common.errors import UserError, run_main
from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt, normalise_span_text

ANSWERS = ("higher", "lower")
NOTE = ("ORACLE: fitted to labelled pitch comparisons; the tones carry the answers (a ceiling, not a result).")


def read_comparisons(path: str | pathlib.Path) -> tuple[list[tuple[str, str]], int]:
    """``[(higher_span, lower_span), ...]`` from a labelled pitch CSV, and how many rows were skipped (empty fields)."""
    path = pathlib.Path(path)
    try:
        handle = path.open(newline="", encoding="utf-8")
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror})") from None
    comparisons, skipped = [], 0
    with handle:
        reader = csv.DictReader(handle)
        missing = [c for c in ("span1", "span2", "answer") if c not in (reader.fieldnames or ())]
        if missing:
            raise UserError(f"{path}: missing column(s) {', '.join(missing)}; expected a labelled pitch file "
                            "(columns sentence, answer, span1, span2)")
        for row_number, row in enumerate(reader, start=1):
            first, second = normalise_span_text(row["span1"] or ""), normalise_span_text(row["span2"] or "")
            answer = (row["answer"] or "").strip().lower()
            if not first or not second or not answer:
                skipped += 1
                continue
            if answer not in ANSWERS:
                raise UserError(f"{path}: row {row_number}: field 'answer': expected higher or lower, got {answer!r}")
            comparisons.append((first, second) if answer == "higher" else (second, first))
    return comparisons, skipped


def fit_bradley_terry(num_items: int, winners: np.ndarray, losers: np.ndarray, *, l2: float = 0.01) -> np.ndarray:
    """Maximum a-posteriori Bradley-Terry strengths (Gaussian prior with precision ``l2``), mean zero."""
    from scipy.optimize import minimize

    def loss_and_grad(s: np.ndarray) -> tuple[float, np.ndarray]:
        margin = s[winners] - s[losers]
        # -log sigmoid(margin) = log(1 + exp(-margin)), computed stably
        loss = np.logaddexp(0.0, -margin).sum() + 0.5 * l2 * np.dot(s, s)
        slope = -1.0 / (1.0 + np.exp(margin))  # d loss / d margin
        grad = l2 * s
        np.add.at(grad, winners, slope)
        np.add.at(grad, losers, -slope)
        return float(loss), grad

    result = minimize(loss_and_grad, np.zeros(num_items), jac=True, method="L-BFGS-B",
                      options={"maxiter": 2000, "gtol": 1e-8})
    return result.x - result.x.mean()


def strengths_to_hz(strengths: np.ndarray) -> np.ndarray:
    """Ranks (ties averaged) spread log-uniformly over [MIN_HZ, MAX_HZ]: order is kept, tones stay distinguishable."""
    from scipy.stats import rankdata

    if len(strengths) == 1:
        return np.array([np.sqrt(MIN_HZ * MAX_HZ)])
    unit = (rankdata(strengths, method="average") - 1.0) / (len(strengths) - 1.0)
    return MIN_HZ * (MAX_HZ / MIN_HZ) ** unit


def build_table(paths: Sequence[str], *, template: str = DEFAULT_PROMPT_TEMPLATE, l2: float = 0.01) -> dict:
    comparisons: list[tuple[str, str]] = []
    skipped = 0
    for path in paths:
        rows, empty = read_comparisons(path)
        comparisons += rows
        skipped += empty
    if not comparisons:
        raise UserError(f"no labelled comparisons in {', '.join(map(str, paths))}")
    spans = sorted({span for pair in comparisons for span in pair})
    index = {span: i for i, span in enumerate(spans)}
    winners = np.array([index[a] for a, _ in comparisons])
    losers = np.array([index[b] for _, b in comparisons])
    strengths = fit_bradley_terry(len(spans), winners, losers, l2=l2)
    hertz = strengths_to_hz(strengths)
    agreement = float(np.mean(hertz[winners] > hertz[losers]))
    frequencies: dict[str, float] = {}
    for span, hz in zip(spans, hertz):
        frequencies[build_prompt(span, template)] = round(float(hz), 3)
    return {"_note": NOTE, "_comparisons": len(comparisons), "_skipped_rows": skipped,
            "_agreement": round(agreement, 6), "frequencies": frequencies}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audio_gen.pitch_table", description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", required=True, help="labelled pitch CSV files (answer, span1, span2)")
    parser.add_argument("--out", required=True, help="JSON table to write")
    parser.add_argument("--prompt_template", default=DEFAULT_PROMPT_TEMPLATE)
    parser.add_argument("--l2", type=float, default=0.01, help="prior precision on the strengths")
    args = parser.parse_args(argv)
    out = check_output_file(args.out, what="--out")
    table = build_table(args.data, template=args.prompt_template, l2=args.l2)
    atomic_write_text(out, json.dumps(table, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
    print(f"{out}: {len(table['frequencies'])} prompts from {table['_comparisons']} comparisons "
          f"({table['_skipped_rows']} rows with empty fields skipped); the table orders "
          f"{100 * table['_agreement']:.2f}% of the comparisons as labelled. ORACLE: the tones carry the labels.")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
