"""Evaluate a trained workdir on any AuditoryBench file.

    python -m ith_jax.evaluate --workdir DIR --data FILE [--data FILE ...] [--task pitch|animal]
                               [--step N] [--json OUT]

Restores the best-dev checkpoint (or ``--step N`` of the periodic ones), prints a table of metrics per
file and, with ``--json``, writes them. The workdir alone is enough: the model is rebuilt from the model spec
stored in the checkpoint and the tokenizer is the workdir's copy, so text_model's directory is not needed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax

from ith_common.atomic import atomic_write_text, check_output_file
from ith_common.errors import run_main
from ith_jax import mesh as mesh_lib
from ith_jax import tasks as tasks_lib
from ith_jax import trainer as trainer_lib


def evaluate_files(workdir: Path, data_files: list[str], *, task_name: str | None = None,
                   step: int | None = None) -> tuple[dict, int]:
    config = trainer_lib.load_workdir_config(workdir)
    if task_name is not None:
        with config.unlocked():
            config.task = task_name
    task = tasks_lib.make_task(config, trainer_lib.load_workdir_tokenizer(workdir, config))
    splits = [task.load(path, task=task_name) for path in data_files]
    mesh = mesh_lib.make_data_mesh()
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    model = trainer_lib.restore_for_inference(workdir, config, mesh, step=step)
    predict_step = jax.jit(trainer_lib.make_predict_step(model.graphdef, model.rest, task.predict),
                           out_shardings=mesh_lib.batch_sharded(mesh))
    results = {s.path: trainer_lib.evaluate_split(task, s, model.params, predict_step, mesh, config.eval_batch_size)
               for s in splits}
    return results, model.step


def main(argv: list[str] | None = None) -> int:
    trainer_lib.setup_logging()
    parser = argparse.ArgumentParser(prog="python -m ith_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", action="append", required=True, help="an AuditoryBench CSV (repeatable)")
    parser.add_argument("--task", choices=("pitch", "animal"), default=None,
                        help="default: inferred from each file's columns")
    parser.add_argument("--step", type=int, default=None, help="a periodic checkpoint instead of the best")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.json:
        check_output_file(args.json, what="--json")  # before the evaluation, not after it
    results, step = evaluate_files(Path(args.workdir), args.data, task_name=args.task, step=args.step)
    print(f"checkpoint step {step}")
    print(trainer_lib.format_table(results))
    if args.json:
        atomic_write_text(args.json, json.dumps({"step": step, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
