"""Evaluate a trained workdir on any AuditoryBench file.

    python -m ith_jax.evaluate --workdir DIR --data FILE [--data FILE ...] [--task pitch|animal]
                               [--step N] [--json OUT] [--spans MANIFEST ...] [--compare TEXT_WORKDIR]

Restores the best-dev checkpoint (or ``--step N`` of the periodic ones), prints a table of metrics per
file and, with ``--json``, writes them. The workdir alone is enough: the model is rebuilt from the model spec
stored in the checkpoint and the tokenizer is the workdir's copy, so text_model's directory is not needed.

An ITH (audio-fused) workdir also needs ``--spans``: span manifests covering the files (``ith_jax.detect``'s
output); the audio cache, selection rule and threshold are the workdir's config's, and a span whose prompt is
not in the cache is an error as in training. Its table adds ``spans``, ``spans_with_audio`` and ``gate_mean``
(the fusion gate's mean on the tokens that took audio). ``--compare TEXT_WORKDIR`` evaluates a text-only
workdir on the same files and prints both side by side with the majority-class rate of each file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

import jax

from ith_common.atomic import atomic_write_text, check_output_file
from ith_common.errors import UserError, run_main
from ith_jax import mesh as mesh_lib
from ith_jax import tasks as tasks_lib
from ith_jax import trainer as trainer_lib
from ith_jax.data import auditorybench


def evaluate_files(workdir: Path, data_files: list[str], *, task_name: str | None = None,
                   step: int | None = None, spans: list[str] | None = None) -> tuple[dict, int]:
    config = trainer_lib.load_workdir_config(workdir)
    if task_name is not None:
        with config.unlocked():
            config.task = task_name
    if "audio" in config:
        if not spans:
            raise UserError(f"{workdir} is an audio-fused (ITH) workdir: give --spans MANIFEST with the spans of "
                            f"{', '.join(data_files)} (python -m ith_jax.detect ... --out MANIFEST)")
        with config.unlocked():
            config.audio.spans = tuple(spans)
    task = tasks_lib.make_task(config, trainer_lib.load_workdir_tokenizer(workdir, config))
    splits = [task.load(path, task=task_name) for path in data_files]
    mesh = mesh_lib.make_data_mesh()
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    model = trainer_lib.restore_for_inference(workdir, config, mesh, step=step)
    predict_step = jax.jit(trainer_lib.make_predict_step(model.graphdef, model.rest, task.predict),
                           out_shardings=mesh_lib.batch_sharded(mesh))
    results = {s.path: trainer_lib.evaluate_split(task, s, model.params, predict_step, mesh, config.eval_batch_size)
               for s in splits}
    if "audio" in config and model.spec.fusion is not None:
        wanted = model.spec.fusion["audio_dim"]
        if task.audio_table.audio_dim != wanted:
            raise UserError(f"{config.audio.cache_dir}: audio tokens of width {task.audio_table.audio_dim}; the "
                            f"checkpoint in {workdir} was trained on width {wanted}")
    return results, model.step


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
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, what="--json")  # before the evaluation, not after it
    results, step = evaluate_files(Path(args.workdir), args.data, task_name=args.task, step=args.step,
                                   spans=args.spans)
    print(f"checkpoint step {step}")
    print(trainer_lib.format_table(results))
    report = {"step": step, "results": results}
    if args.compare:
        text_results, text_step = evaluate_files(Path(args.compare), args.data, task_name=args.task)
        majority = {path: majority_rate(path, args.task) for path in results}
        print(f"\n{args.compare} (text-only, step {text_step}) vs {args.workdir} (step {step}):")
        print(comparison_table(text_results, results, majority))
        report["compare"] = {"workdir": args.compare, "step": text_step, "results": text_results,
                             "majority": majority}
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
