"""The one trainer: every head and task (masked LM, span detector, later the audio-fused LM).

    python -m ith_jax.train --config configs/lm.py[:variant] --workdir DIR [--config.key=value ...]

Rerunning the same command resumes from the newest checkpoint in DIR (model, optimizer, step and data
position). Sections: setup -> data -> model and optimizer -> steps -> evaluation -> the loop -> main.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from audio_gen.manifest import atomic_write_bytes
from ith_jax import checkpoint as checkpoint_lib
from ith_jax import mesh as mesh_lib
from ith_jax import tasks as tasks_lib
from ith_jax.config_cli import config_to_json, load_config
from ith_jax.data import auditorybench
from ith_jax.errors import UserError

logger = logging.getLogger("ith_jax")

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.json"


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite."""


# ---------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------

def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        force=True)  # libraries imported earlier may have installed handlers of their own
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def is_main_process() -> bool:
    return jax.process_index() == 0


class MetricsWriter:
    """JSONL + TensorBoard in the workdir, written by process 0 only."""

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int | None):
        self.enabled = enabled
        self.path = workdir / METRICS_FILE
        self._tensorboard = None
        if not enabled:
            return
        if resume_step is not None and self.path.exists():
            # Lines past the restored step belong to the interrupted run's lost steps: drop them so the log
            # reads as one run.
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        from tensorboardX import SummaryWriter
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        for key, value in record.items():
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self._tensorboard.add_scalar(key, value, step)
        self._tensorboard.flush()

    def close(self) -> None:
        if self._tensorboard is not None:
            self._tensorboard.close()


def _json_value(value: Any) -> Any:
    if isinstance(value, (np.generic, jax.Array)):
        value = np.asarray(value).item()
    return value


def atomic_write_text(path: Path, text: str) -> None:
    # The stdlib-only writer both halves share (temp file, fsync, rename, directory fsync).
    atomic_write_bytes(Path(path), text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Data:
    train: list  # encoded training rows (all train files together)
    dev: list[tasks_lib.Split]
    eval: list[tasks_lib.Split]


def load_data(config: ml_collections.ConfigDict, task) -> Data:
    train_rows = []
    for template in config.train_files:
        split = task.load(tasks_lib.resolve_data_path(config, template), task=config.task,
                          max_examples=config.max_train_examples)
        train_rows.extend(task.train_rows(split))
    dev = [task.load(tasks_lib.resolve_data_path(config, t), task=config.task,
                     max_examples=config.max_eval_examples) for t in config.dev_files]
    dev_paths = {s.path: s for s in dev}
    evals = []
    for template in config.eval_files:
        path = tasks_lib.resolve_data_path(config, template)
        evals.append(dev_paths.get(path) or task.load(path, task=config.task,
                                                      max_examples=config.max_eval_examples))
    return Data(train=train_rows, dev=dev, eval=evals)


# ---------------------------------------------------------------------------------------------------------
# Model, optimizer and the training state
# ---------------------------------------------------------------------------------------------------------

def split_model(model: nnx.Module) -> tuple[Any, dict, Any]:
    """(graphdef, trainable parameters as a plain dict, everything else) of an NNX model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def model_shape(model: nnx.Module) -> dict:
    """What must match for a checkpoint to fit this model: the BERT config and the parameter shapes."""
    _, params, _ = split_model(model)
    config = getattr(getattr(model, "bert", model), "config", None)
    shapes = {jax.tree_util.keystr(path): list(leaf.shape)
              for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
    return {"bert_config": config.to_dict() if config is not None else None, "param_shapes": shapes}


def decay_mask(params: dict) -> dict:
    """AdamW weight decay on matrices only: biases and LayerNorm parameters are not decayed (as in BERT)."""
    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "idx", k))).lower() for k in path]
        return leaf.ndim > 1 and not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
    warmup = int(round(config.warmup_ratio * total_steps))
    return optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, max(warmup, 1)),
         optax.linear_schedule(config.learning_rate, 0.0, max(total_steps - warmup, 1))],
        boundaries=[warmup])


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    return optax.chain(
        optax.clip_by_global_norm(config.max_grad_norm),
        optax.adamw(learning_rate_schedule(config, total_steps), b1=config.adam_b1, b2=config.adam_b2,
                    eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask))


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


# ---------------------------------------------------------------------------------------------------------
# Steps (pure and jitted)
# ---------------------------------------------------------------------------------------------------------

def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation, loss_fn: Callable) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``: one optimizer update on a global batch."""

    def train_step(state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        def compute_loss(params):
            return loss_fn(nnx.merge(graphdef, params, rest), batch, rng)

        (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        metrics = {"loss": loss, "grad_norm": optax.global_norm(grads), **aux}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_predict_step(graphdef, rest, predict_fn: Callable) -> Callable:
    def predict_step(params: dict, batch: dict) -> dict:
        return predict_fn(nnx.merge(graphdef, params, rest), batch)

    return predict_step


def dropout_key(seed: int, step: int) -> jax.Array:
    # A function of (seed, step) alone: a resumed run draws exactly the dropout masks of an uninterrupted one.
    return jax.random.fold_in(jax.random.key(seed), step)


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def evaluate_split(task, split: tasks_lib.Split, params: dict, predict_step: Callable, mesh,
                   batch_size: int) -> dict:
    """Runs predict_step over every row set of a split and lets the task score the predictions."""
    outputs: dict[str, dict[int, dict]] = {}
    for set_name, rows in task.eval_row_sets(split).items():
        per_row: dict[int, dict] = {}
        for batch in task.batches(rows, batch_size=batch_size, shuffle=False):
            indices = batch.pop("example_index")
            out = mesh_lib.to_host(predict_step(params, mesh_lib.put_batch(batch, mesh)))
            for position, row_index in enumerate(indices):
                if row_index >= 0:
                    per_row[int(row_index)] = {k: v[position] for k, v in out.items()}
        outputs[set_name] = per_row
    return task.score(split, outputs)


def format_table(results: dict[str, dict]) -> str:
    columns = sorted({k for metrics in results.values() for k in metrics})
    rows = [["file", *columns]] + [[name, *(_fmt(metrics.get(c)) for c in columns)]
                                   for name, metrics in results.items()]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------

def check_finite(step_metrics: Iterable[tuple[int, dict]], learning_rate: Callable) -> None:
    for step, metrics in step_metrics:
        loss = float(metrics["loss"])
        if not math.isfinite(loss):
            raise TrainingDiverged(
                f"loss is {loss} at step {step} (learning rate {float(learning_rate(step)):.3g}); the run stops "
                "without saving this state. Lower --config.learning_rate, or check the data.")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes), keeps the best-dev checkpoint, and returns the final evaluation results."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh_lib.initialize_distributed(config.distributed.coordinator_address, config.distributed.num_processes,
                                    config.distributed.process_id)
    mesh = mesh_lib.make_data_mesh()
    mesh_lib.check_batch_size(config.batch_size, mesh)
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    main_process = is_main_process()

    tokenizer = auditorybench.load_tokenizer(config.text_model)
    task = tasks_lib.make_task(config, tokenizer)
    data = load_data(config, task)
    steps_per_epoch = task.num_batches(data.train, batch_size=config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    logger.info("%d training rows, %d steps per epoch, %d steps in all, %d devices", len(data.train),
                steps_per_epoch, total_steps, mesh.size)

    model = task.build_model()
    graphdef, params, rest = split_model(model)
    shape = model_shape(model)
    optimizer = make_optimizer(config, total_steps)
    replicated = mesh_lib.replicated(mesh)
    state = mesh_lib.replicate(init_train_state(params, optimizer), mesh)
    del model, params

    train_step = jax.jit(make_train_step(graphdef, rest, optimizer, task.loss), donate_argnums=(0,),
                         out_shardings=(replicated, replicated))
    predict_step = jax.jit(make_predict_step(graphdef, rest, task.predict), out_shardings=mesh_lib.batch_sharded(mesh))

    # -- resume
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.keep_checkpoints)
    epoch, batch_in_epoch, best_metric = 0, 0, -math.inf
    latest = checkpoints.latest_step()
    if latest is not None:
        saved = checkpoints.read_meta(latest)
        if saved.get("model_shape") != shape:
            raise UserError(describe_shape_mismatch(workdir, saved.get("model_shape"), shape))
        state, meta = checkpoints.restore(latest, state)
        epoch, batch_in_epoch = meta["epoch"], meta["batch_in_epoch"]
        best_metric = meta.get("best_metric", -math.inf)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", workdir / "checkpoints", latest, epoch,
                    batch_in_epoch)
    if main_process:
        atomic_write_text(workdir / CONFIG_FILE, config_to_json(config))
    writer = MetricsWriter(workdir, enabled=main_process, resume_step=latest)

    step = int(jax.device_get(state["step"]))
    schedule = learning_rate_schedule(config, total_steps)

    def meta_at(next_epoch: int, next_batch: int, extra: dict | None = None) -> dict:
        return {"epoch": next_epoch, "batch_in_epoch": next_batch, "step": step, "seed": config.seed,
                "best_metric": best_metric, "model_shape": shape, "head": config.head, **(extra or {})}

    def run_dev() -> dict:
        results = {s.path: evaluate_split(task, s, state["params"], predict_step, mesh, config.eval_batch_size)
                   for s in data.dev}
        return results

    pending: list[tuple[int, dict]] = []
    from tqdm import tqdm
    progress = tqdm(total=total_steps, initial=step, disable=not (main_process and config.progress_bar),
                    unit="step", dynamic_ncols=True)
    started = time.perf_counter()
    try:
        while step < total_steps and epoch < config.num_epochs:
            for batch in task.batches(data.train, batch_size=config.batch_size, shuffle=True, epoch=epoch,
                                      start_batch=batch_in_epoch):
                batch.pop("example_index")
                state, metrics = train_step(state, mesh_lib.put_batch(batch, mesh), dropout_key(config.seed, step))
                step += 1
                batch_in_epoch += 1
                pending.append((step, metrics))
                progress.update(1)
                if step % config.log_every_steps == 0 or step == total_steps:
                    fetched = jax.device_get(pending)
                    check_finite(fetched, schedule)
                    last = fetched[-1][1]
                    elapsed = time.perf_counter() - started
                    writer.write(step, {"loss": float(np.mean([m["loss"] for _, m in fetched])),
                                        "grad_norm": float(last["grad_norm"]),
                                        "learning_rate": float(schedule(step - 1)), "epoch": epoch,
                                        "steps_per_second": len(fetched) / max(elapsed, 1e-9)})
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    pending, started = [], time.perf_counter()
                if step % config.checkpoint_every_steps == 0 and step < total_steps:
                    check_finite(jax.device_get(pending), schedule)
                    checkpoints.save(step, state, meta_at(epoch, batch_in_epoch))
                if step >= total_steps:
                    break
            check_finite(jax.device_get(pending), schedule)
            epoch_done = batch_in_epoch >= steps_per_epoch
            dev = run_dev()
            dev_metric = float(np.mean([m[task.main_metric] for m in dev.values()]))
            writer.write(step, {f"dev/{Path(p).parent.name}_{Path(p).stem}/{k}": v
                                for p, m in dev.items() for k, v in m.items()})
            logger.info("step %d, epoch %d: dev %s = %.4f", step, epoch, task.main_metric, dev_metric)
            if dev_metric > best_metric:
                best_metric = dev_metric
                checkpoints.save(step, {"params": state["params"]},
                                 meta_at(epoch, batch_in_epoch, {"dev": dev}), which="best")
            if epoch_done:
                epoch, batch_in_epoch = epoch + 1, 0
            checkpoints.save(step, state, meta_at(epoch, batch_in_epoch))
    finally:
        progress.close()
        writer.close()

    # -- final evaluation with the best checkpoint
    best_step = checkpoints.latest_step("best")
    params = state["params"]
    if best_step is not None:
        params = checkpoints.restore(best_step, {"params": state["params"]}, which="best")[0]["params"]
    results = {s.path: evaluate_split(task, s, params, predict_step, mesh, config.eval_batch_size)
               for s in data.eval}
    checkpoints.close()
    if main_process:
        report = {"best_step": best_step, "final_step": step, "results": results}
        atomic_write_text(workdir / EVAL_RESULTS_FILE, json.dumps(report, indent=2))
        print(f"\nEvaluation of the best checkpoint (step {best_step}):")
        print(format_table(results))
    return results


def describe_shape_mismatch(workdir: Path, saved: dict | None, current: dict) -> str:
    if not saved:
        return f"workdir {workdir} holds a checkpoint without model-shape metadata; use a fresh --workdir"
    saved_cfg, current_cfg = saved.get("bert_config") or {}, current.get("bert_config") or {}
    differing = [f"{k} {saved_cfg.get(k)} (checkpoint) vs {current_cfg.get(k)} (config)"
                 for k in sorted(set(saved_cfg) | set(current_cfg)) if saved_cfg.get(k) != current_cfg.get(k)]
    if not differing:
        saved_shapes, current_shapes = saved.get("param_shapes", {}), current.get("param_shapes", {})
        differing = [f"{k} {saved_shapes.get(k)} vs {current_shapes.get(k)}"
                     for k in sorted(set(saved_shapes) | set(current_shapes))
                     if saved_shapes.get(k) != current_shapes.get(k)][:3]
    return (f"workdir {workdir} holds a checkpoint of another model shape ({'; '.join(differing)}); "
            "use a fresh --workdir or the config it was trained with")


# ---------------------------------------------------------------------------------------------------------
# main
# ---------------------------------------------------------------------------------------------------------

def parse_workdir(args: list[str]) -> str:
    workdir = None
    rest = []
    i = 0
    while i < len(args):
        if args[i] == "--workdir" and i + 1 < len(args):
            workdir = args[i + 1]
            i += 2
        elif args[i].startswith("--workdir="):
            workdir = args[i].split("=", 1)[1]
            i += 1
        else:
            rest.append(args[i])
            i += 1
    if rest:
        raise UserError(f"unknown arguments: {' '.join(rest)} (expected --config FILE[:variant] --workdir DIR "
                        "[--config.key=value ...])")
    if not workdir:
        raise UserError("missing --workdir DIR (where checkpoints, metrics and results go)")
    return workdir


def main(argv: list[str] | None = None) -> int:
    setup_logging()
    try:
        config, rest = load_config(sys.argv[1:] if argv is None else argv)
        workdir = parse_workdir(rest)
        train_and_evaluate(config, workdir)
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except TrainingDiverged as error:
        print(f"error: {error}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
