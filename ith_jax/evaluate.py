"""Evaluate a trained workdir on any AuditoryBench file.

    python -m ith_jax.evaluate --workdir DIR --data FILE [--data FILE ...] [--task pitch|animal]
                               [--step N] [--json OUT]

Restores the best-dev checkpoint (or ``--step N`` of the periodic ones), prints a table of metrics per
file and, with ``--json``, writes them. The model is rebuilt from the shape recorded in the checkpoint, so
only the tokenizer of ``text_model`` is needed, not its weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import ml_collections
from flax import nnx

from ith_jax import checkpoint as checkpoint_lib
from ith_jax import mesh as mesh_lib
from ith_jax import tasks as tasks_lib
from ith_jax import train as train_lib
from ith_jax.data import auditorybench
from ith_jax.errors import UserError
from ith_jax.models import bert


def load_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / train_lib.CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: is {workdir} a training workdir?")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def model_from_shape(task, shape: dict, config: ml_collections.ConfigDict) -> nnx.Module:
    model_config = bert.BertConfig.from_dict(shape["bert_config"], source="checkpoint metadata")
    dtype = tasks_lib._model_dtype(config)
    rngs = nnx.Rngs(params=0)
    if task.head == "mlm":
        return bert.BertForMaskedLM(model_config, dtype=dtype, rngs=rngs)
    return bert.BertForTokenClassification(model_config, task.num_labels, dtype=dtype, rngs=rngs)


def restore_params(workdir: Path, task, config, step: int | None):
    """(graphdef, rest, params, step) of the best checkpoint, or of periodic checkpoint ``step``."""
    checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
    which = "best" if step is None else "latest"
    if step is None:
        step = checkpoints.latest_step("best")
        if step is None:
            raise UserError(f"{workdir}/best holds no checkpoint yet (training ends an epoch before it does)")
    elif step not in checkpoints.all_steps("latest"):
        raise UserError(f"--step {step}: not in {workdir}/checkpoints (available: "
                        f"{checkpoints.all_steps('latest')})")
    meta = checkpoints.read_meta(step, which=which)
    model = model_from_shape(task, meta["model_shape"], config)
    graphdef, params, rest = train_lib.split_model(model)
    if which == "best":
        target = {"params": params}
    else:  # the periodic checkpoints hold the whole training state
        target = train_lib.init_train_state(params, train_lib.make_optimizer(config, total_steps=1))
    restored, _ = checkpoints.restore(step, target, which=which)
    checkpoints.close()
    return graphdef, rest, restored["params"], step


def evaluate_files(workdir: Path, data_files: list[str], *, task_name: str | None = None,
                   step: int | None = None) -> tuple[dict, int]:
    config = load_workdir_config(workdir)
    if task_name is not None:
        with config.unlocked():
            config.task = task_name
    tokenizer = auditorybench.load_tokenizer(config.text_model)
    task = tasks_lib.make_task(config, tokenizer)
    splits = [task.load(path, task=task_name) for path in data_files]
    graphdef, rest, params, step = restore_params(workdir, task, config, step)
    mesh = mesh_lib.make_data_mesh()
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    params = mesh_lib.replicate(params, mesh)
    predict_step = jax.jit(train_lib.make_predict_step(graphdef, rest, task.predict),
                           out_shardings=mesh_lib.batch_sharded(mesh))
    results = {s.path: train_lib.evaluate_split(task, s, params, predict_step, mesh, config.eval_batch_size)
               for s in splits}
    return results, step


def main(argv: list[str] | None = None) -> int:
    train_lib.setup_logging()
    parser = argparse.ArgumentParser(prog="python -m ith_jax.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", action="append", required=True, help="an AuditoryBench CSV (repeatable)")
    parser.add_argument("--task", choices=("pitch", "animal"), default=None,
                        help="default: inferred from each file's columns")
    parser.add_argument("--step", type=int, default=None, help="a periodic checkpoint instead of the best")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    try:
        results, step = evaluate_files(Path(args.workdir), args.data, task_name=args.task, step=args.step)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"checkpoint step {step}")
    print(train_lib.format_table(results))
    if args.json:
        train_lib.atomic_write_text(Path(args.json), json.dumps({"step": step, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
