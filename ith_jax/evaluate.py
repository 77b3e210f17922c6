"""Evaluate a trained workdir on any AuditoryBench file.

    python -m ith_jax.evaluate --workdir DIR --data FILE [--data FILE ...] [--task pitch|animal]
                               [--step N] [--json OUT] [--spans MANIFEST ...] [--compare TEXT_WORKDIR]
                               [--predictions OUT.jsonl]

Restores the best-dev checkpoint (or ``--step N`` of the periodic ones), prints a table of metrics per
file and, with ``--json``, writes them. The workdir alone is enough: the model is rebuilt from the model spec
stored in the checkpoint and the tokenizer is the workdir's copy, so text_model's directory is not needed.

An ITH (audio-fused) workdir also needs ``--spans``: span manifests covering the files (``ith_jax.detect``'s
output); the audio cache, selection rule and threshold are the workdir's config's, and a span whose prompt is
not in the cache is an error as in training. Its table adds ``spans``, ``spans_with_audio`` and ``gate_mean``
(the fusion gate's mean on the tokens that took audio). ``--compare TEXT_WORKDIR`` evaluates a text-only
workdir on the same files and prints both side by side with the majority-class rate of each file.
``--predictions OUT.jsonl`` writes one record per evaluated row of ``--workdir`` (not of ``--compare``'s):
the answer, prediction, probabilities, spans with their audio, tokens and gate (docs/api.md); the same path
as ``ith_jax.load(workdir).predict``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

from ith_common.atomic import atomic_write_text, check_output_file
from ith_common.errors import UserError, run_main
from ith_jax import api
from ith_jax import trainer as trainer_lib
from ith_jax.data import auditorybench


def evaluate_files(workdir: Path, data_files: list[str], *, task_name: str | None = None,
                   step: int | None = None, spans: list[str] | None = None,
                   predictions: bool = False) -> tuple[dict, int, list[dict]]:
    """(metrics per file, the checkpoint's step, with ``predictions`` one record per evaluated row: docs/api.md).
    Both come from ``ith_jax.api.Predictor``, the path ``ith_jax.load(workdir).predict`` takes too."""
    config = trainer_lib.load_workdir_config(workdir)
    if "audio" in config and not spans:
        raise UserError(f"{workdir} is an audio-fused (ITH) workdir: give --spans MANIFEST with the spans of "
                        f"{', '.join(data_files)} (python -m ith_jax.detect ... --out MANIFEST)")
    if predictions and config.head != "mlm":
        raise UserError(f"--predictions: {workdir} holds a {config.head!r} model; per-example records are written "
                        "for masked-LM workdirs (a span detector's per-sentence output is ith_jax.detect's manifest)")
    predictor = api.Predictor(workdir, config, step=step)
    results, records = {}, []
    for path in data_files:
        results[path], rows = predictor.evaluate_file(path, task=task_name, spans=spans, records=predictions)
        records += rows
    return results, predictor.step, records


def majority_rate(path: str, task_name: str | None) -> float:
    """The share of the most frequent answer in ``path``: what a constant prediction scores."""
    examples, _ = auditorybench.load_examples(path, task_name, strict=False)
    counts = Counter(e.answer for e in examples)
    return max(counts.values()) / len(examples) if examples else float("nan")


def comparison_table(text: dict, fused: dict, majority: dict[str, float]) -> str:
    rows = {path: {"majority": majority[path], "text_accuracy": text[path]["accuracy"],
                   "ith_accuracy": fused[path]["accuracy"], "spans": fused[path].get("spans"),
                   "spans_with_audio": fused[path].get("spans_with_audio"),
                   "gate_mean": fused[path].get("gate_mean")} for path in fused}
    return trainer_lib.format_table(rows)


def main(argv: list[str] | None = None) -> int:
    trainer_lib.setup_logging()
    parser = argparse.ArgumentParser(prog="python -m ith_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", action="append", required=True, help="an AuditoryBench CSV (repeatable)")
    parser.add_argument("--task", choices=("pitch", "animal"), default=None,
                        help="default: inferred from each file's columns")
    parser.add_argument("--step", type=int, default=None, help="a periodic checkpoint instead of the best")
    parser.add_argument("--json", default=None, help="write the results here")
    parser.add_argument("--spans", action="append", default=None,
                        help="span manifest covering the --data files (repeatable; required for an ITH workdir)")
    parser.add_argument("--compare", default=None, metavar="TEXT_WORKDIR",
                        help="also evaluate this text-only workdir and print both side by side")
    parser.add_argument("--predictions", default=None, metavar="OUT.jsonl",
                        help="write one record per evaluated example here (docs/api.md; --workdir's only)")
    args = parser.parse_args(argv)
    for path, flag in ((args.json, "--json"), (args.predictions, "--predictions")):
        if path:
            check_output_file(path, what=flag)  # before the evaluation, not after it
    results, step, records = evaluate_files(Path(args.workdir), args.data, task_name=args.task, step=args.step,
                                            spans=args.spans, predictions=bool(args.predictions))
    print(f"checkpoint step {step}")
    print(trainer_lib.format_table(results))
    report = {"step": step, "results": results}
    if args.compare:
        text_results, text_step, _ = evaluate_files(Path(args.compare), args.data, task_name=args.task)
        majority = {path: majority_rate(path, args.task) for path in results}
        print(f"\n{args.compare} (text-only, step {text_step}) vs {args.workdir} (step {step}):")
        print(comparison_table(text_results, results, majority))
        report["compare"] = {"workdir": args.compare, "step": text_step, "results": text_results,
                             "majority": majority}
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    if args.predictions:
        api.write_records(records, args.predictions)
        print(f"wrote {len(records)} per-example records to {args.predictions}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
