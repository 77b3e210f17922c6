"""The one trainer: every head and task (masked LM, span detector, later the audio-fused LM).

    python -m ith_jax.train --config configs/lm.py[:variant] --workdir DIR [--config.key=value ...]

Rerunning the same command resumes from the newest checkpoint in DIR that restores (model, optimizer, step
and data position). The reusable pieces (steps, optimizer, evaluation, config checks, model spec) live in
``ith_jax.trainer`` and ``ith_jax.model_spec``; this module is the loop. Sections: setup -> data -> the loop
(model, resume, steps, evaluation, final table) -> main.

Exit status: 0 done, 2 bad input (config, data, workdir), 3 the run diverged (nothing non-finite was saved),
1 an OS error (one line naming the path; the checkpoints already written are kept).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from ith_common.atomic import atomic_write_text
from ith_common.config import config_to_json, load_config
from ith_common.errors import UserError, describe_os_error, run_main
from ith_jax import checkpoint as checkpoint_lib
from ith_jax import mesh as mesh_lib
from ith_jax import model_spec as model_spec_lib
from ith_jax import tasks as tasks_lib
from ith_jax import trainer as trainer_lib
from ith_jax.data.tokenizer import load_tokenizer

logger = logging.getLogger("ith_jax")


# ---------------------------------------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------------------------------------

def is_main_process() -> bool:
    return jax.process_index() == 0


def prepare_workdir(workdir: Path) -> None:
    """Fails before any work when ``workdir`` cannot hold the run's files."""
    if workdir.exists() and not workdir.is_dir():
        raise UserError(f"--workdir {workdir} is a file; expected a directory (new, or from an earlier run)")
    workdir.mkdir(parents=True, exist_ok=True)
    # A real write rather than os.access: root passes every permission check, and a read-only mount or an
    # immutable directory only shows when something is written.
    try:
        with tempfile.NamedTemporaryFile(dir=workdir, prefix=".write_probe."):
            pass
    except OSError as error:
        raise UserError(f"--workdir {workdir} is not writable ({describe_os_error(error)})") from None


class MetricsWriter:
    """JSONL + TensorBoard in the workdir, written by process 0 only."""

    def __init__(self, workdir: Path, *, enabled: bool, resume_step: int):
        self.enabled = enabled
        self.path = workdir / trainer_lib.METRICS_FILE
        self._tensorboard = None
        if not enabled:
            return
        if self.path.exists():
            self._trim(resume_step)
        from tensorboardX import SummaryWriter
        self._tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def _trim(self, resume_step: int) -> None:
        """Keeps the lines up to the restored step (later ones belong to the interrupted run's lost steps, so
        the log reads as one run) and drops unreadable ones (a line torn by a kill mid-write)."""
        original = self.path.read_text(encoding="utf-8", errors="replace")
        kept, unreadable = [], 0
        for line in original.splitlines():
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                unreadable += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int):
                unreadable += 1
            elif step <= resume_step:
                kept.append(line)
        if unreadable:
            logger.warning("%s: dropped %d unreadable line(s) (torn by a kill mid-write?)", self.path, unreadable)
        text = "".join(line + "\n" for line in kept)
        if text != original:
            atomic_write_text(self.path, text)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        record = {"step": int(step), **{k: _json_value(v) for k, v in metrics.items()}}
        with open(self.path, "a", encoding="utf-8") as f:
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
# The loop
# ---------------------------------------------------------------------------------------------------------

def describe_spec_mismatch(workdir: Path, differing: list[tuple[str, Any, Any]]) -> str:
    shown = "; ".join(f"{key} {saved} (checkpoint) vs {current} (config)" for key, saved, current in differing[:4])
    return (f"workdir {workdir} holds a checkpoint of another model ({shown}); use a fresh --workdir or the "
            "config it was trained with")


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | Path) -> dict:
    """Trains (or resumes), keeps the best-dev checkpoint, and returns the final evaluation results."""
    workdir = Path(workdir)
    trainer_lib.validate_config(config)
    prepare_workdir(workdir)
    mesh_lib.initialize_distributed(config.distributed.coordinator_address, config.distributed.num_processes,
                                    config.distributed.process_id)
    mesh = mesh_lib.make_data_mesh()
    mesh_lib.check_batch_size(config.batch_size, mesh)
    mesh_lib.check_batch_size(config.eval_batch_size, mesh, "eval_batch_size")
    main_process = is_main_process()

    tokenizer = load_tokenizer(config.text_model)
    task = tasks_lib.make_task(config, tokenizer)
    data = load_data(config, task)
    steps_per_epoch = task.num_batches(data.train, batch_size=config.batch_size)
    total_steps = steps_per_epoch * config.num_epochs
    if config.max_steps:
        total_steps = min(total_steps, config.max_steps)
    logger.info("%d training rows, %d steps per epoch, %d steps in all, %d devices", len(data.train),
                steps_per_epoch, total_steps, mesh.size)

    # -- model, optimizer, steps
    spec = task.model_spec()
    logger.info("model: %s head, %s, %s", spec.head, "random init" if config.random_init else config.text_model,
                spec.bert_config)
    if spec.fusion is not None:
        logger.info("audio fusion: %s", spec.fusion)
    if spec.audio_encoder is not None:
        logger.info("trained AST from %s: %s (learning rate %s)", config.audio.ast_model, spec.audio_encoder,
                    trainer_lib.ast_learning_rate(config) or "the LM's")
    model = model_spec_lib.build_model(spec, seed=config.seed,
                                       pretrained=None if config.random_init else config.text_model,
                                       pretrained_ast=model_spec_lib.pretrained_ast_source(config))
    graphdef, params, rest = trainer_lib.split_model(model)
    optimizer = trainer_lib.make_optimizer(config, total_steps)
    replicated = mesh_lib.replicated(mesh)
    state = mesh_lib.replicate(trainer_lib.init_train_state(params, optimizer), mesh)
    del model, params

    train_step = jax.jit(trainer_lib.make_train_step(graphdef, rest, optimizer, task.loss), donate_argnums=(0,),
                         out_shardings=(replicated, replicated))
    predict_step = jax.jit(trainer_lib.make_predict_step(graphdef, rest, task.predict),
                           out_shardings=mesh_lib.batch_sharded(mesh))

    # -- resume from the newest checkpoint that restores (config.json is only rewritten once it is accepted)
    checkpoints = checkpoint_lib.Checkpoints(workdir, keep=config.keep_checkpoints)

    def check_checkpoint(meta: dict, where: Path) -> None:
        differing = trainer_lib.spec_of(meta, where).differences(spec)
        if differing:
            raise UserError(describe_spec_mismatch(workdir, differing))
        trainer_lib.check_resume_values(meta.get("resume_config"), config, workdir)

    had_checkpoints = bool(checkpoints.all_steps())
    resumed = checkpoints.restore_newest(state, check_meta=check_checkpoint)
    epoch, batch_in_epoch, best_metric, resume_step = 0, 0, -math.inf, 0
    if resumed is not None:
        state, meta, resume_step = resumed
        epoch, batch_in_epoch = meta["epoch"], meta["batch_in_epoch"]
        best_metric = meta.get("best_metric", -math.inf)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", workdir / checkpoint_lib.LATEST_DIR,
                    resume_step, epoch, batch_in_epoch)
    elif had_checkpoints:
        logger.warning("no checkpoint in %s restores (all moved to %s); training starts from step 0",
                       workdir / checkpoint_lib.LATEST_DIR, workdir / checkpoint_lib.DAMAGED_DIR)
    if main_process:
        atomic_write_text(workdir / trainer_lib.CONFIG_FILE, config_to_json(config))
        trainer_lib.save_tokenizer(tokenizer, workdir)
    writer = MetricsWriter(workdir, enabled=main_process, resume_step=resume_step)

    step = int(jax.device_get(state["step"]))
    schedule = trainer_lib.learning_rate_schedule(config, total_steps)
    saved_config = trainer_lib.resume_values(config)

    def meta_at(next_epoch: int, next_batch: int, extra: dict | None = None) -> dict:
        return {"epoch": next_epoch, "batch_in_epoch": next_batch, "step": step, "seed": config.seed,
                "best_metric": best_metric, "model_spec": spec.to_dict(), "resume_config": saved_config,
                **(extra or {})}

    def run_dev() -> dict:
        return {s.path: trainer_lib.evaluate_split(task, s, state["params"], predict_step, mesh,
                                                   config.eval_batch_size) for s in data.dev}

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
                state, metrics = train_step(state, mesh_lib.put_batch(batch, mesh),
                                            trainer_lib.dropout_key(config.seed, step))
                step += 1
                batch_in_epoch += 1
                pending.append((step, metrics))
                progress.update(1)
                if step % config.log_every_steps == 0 or step == total_steps:
                    fetched = jax.device_get(pending)
                    trainer_lib.check_finite(fetched, schedule)
                    last = fetched[-1][1]
                    elapsed = time.perf_counter() - started
                    writer.write(step, {"loss": float(np.mean([m["loss"] for _, m in fetched])),
                                        "grad_norm": float(last["grad_norm"]),
                                        "learning_rate": float(schedule(step - 1)), "epoch": epoch,
                                        "steps_per_second": len(fetched) / max(elapsed, 1e-9)})
                    progress.set_postfix(loss=f"{last['loss']:.4f}")
                    pending, started = [], time.perf_counter()
                if step % config.checkpoint_every_steps == 0 and step < total_steps:
                    trainer_lib.check_finite(jax.device_get(pending), schedule)
                    checkpoints.save(step, state, meta_at(epoch, batch_in_epoch))
                if step >= total_steps:
                    break
            trainer_lib.check_finite(jax.device_get(pending), schedule)
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
    best = checkpoints.restore_newest({"params": state["params"]}, which="best")
    params, best_step = state["params"], None
    if best is not None:
        params, best_step = best[0]["params"], best[2]
    else:
        logger.warning("no best-dev checkpoint restores; the final evaluation uses the last parameters")
    results = {s.path: trainer_lib.evaluate_split(task, s, params, predict_step, mesh, config.eval_batch_size)
               for s in data.eval}
    checkpoints.close()
    if main_process:
        report = {"best_step": best_step, "final_step": step, "results": results}
        atomic_write_text(workdir / trainer_lib.EVAL_RESULTS_FILE, json.dumps(report, indent=2))
        print(f"\nEvaluation of the best checkpoint (step {best_step}):")
        print(trainer_lib.format_table(results))
    return results


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
    trainer_lib.setup_logging()
    config, rest = load_config(sys.argv[1:] if argv is None else argv)
    train_and_evaluate(config, parse_workdir(rest))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
