"""The trainer library: what the training loop (``ith_jax.train``), ``ith_jax.evaluate`` and ``ith_jax.detect`` share.

None of it knows which head or task it runs: a task (``ith_jax.tasks``) supplies data, loss, predictions and
metrics, a ``ModelSpec`` (``ith_jax.model_spec``) the model. Sections:

- config validation: every trainer key's range, checked once before any work; the keys a resume must keep;
- model, optimizer and the training state (a plain pytree ``{"step", "params", "opt_state"}``);
- the pure steps (``train_step`` reports ``all_finite``: the loss, the gradients and the new parameters are
  all finite) and the check that turns a non-finite step into ``TrainingDiverged``;
- evaluation of a split and the results table;
- workdirs: the files a training run leaves, and restoring its model for inference from the workdir alone.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from ith_common.atomic import atomic_output
from ith_common.errors import TrainingDiverged, UserError
from ith_common.selection import RULES as SELECTION_RULES
from ith_jax import checkpoint as checkpoint_lib
from ith_jax import mesh as mesh_lib
from ith_jax import model_spec as model_spec_lib
from ith_jax.data.tokenizer import load_tokenizer

logger = logging.getLogger("ith_jax")

# The files of a workdir besides the checkpoints (see ith_jax/checkpoint.py for those).
CONFIG_FILE = "config.json"  # the resolved config of the latest run
TOKENIZER_FILE = "tokenizer.json"  # a copy of text_model's tokenizer: evaluate and detect need no other file
METRICS_FILE = "metrics.jsonl"
EVAL_RESULTS_FILE = "eval_results.json"


def setup_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr,
                        force=True)  # libraries imported earlier may have installed handlers of their own
    for noisy in ("absl", "orbax", "jax._src"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------------------
# Config validation
# ---------------------------------------------------------------------------------------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _int_at_least(low: int) -> tuple[Callable[[Any], bool], str]:
    return (lambda v: _is_int(v) and v >= low), f"an integer >= {low}"


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    def check(value: Any) -> bool:
        return (_is_number(value) and (value > low if low_open else value >= low)
                and (value < high if high_open else value <= high))
    interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open or high == math.inf else ']'}"
    return check, f"a finite number in {interval}"


def _one_of(*choices: str):
    return (lambda v: v in choices), "one of " + ", ".join(repr(c) for c in choices)


_BOOL = ((lambda v: isinstance(v, bool)), "true or false")
_TEXT = ((lambda v: isinstance(v, str) and v.strip() != ""), "a non-empty string")
_STRING = ((lambda v: isinstance(v, str)), "a string")
_FILES = ((lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(isinstance(f, str) and f for f in v)),
          "one or more file paths")
_LENGTHS = ((lambda v: isinstance(v, (tuple, list)) and len(v) > 0 and all(_is_int(b) and b > 0 for b in v)),
            "one or more positive integers")
_OPTIONAL_SIZE = ((lambda v: v is None or (_is_int(v) and v > 0)), "null or a positive integer")

AUDIO_ENCODERS = model_spec_lib.AUDIO_ENCODERS
# FusedMaskedLM's submodule holding the trained AST: its parameters are the subtree of this name.
AUDIO_ENCODER_PARAMS = "audio_encoder"

# key -> (check, what it expects). Keys a config file does not define (e.g. multiple_choice in span.py) are
# skipped; every key the base config defines is here.
CONFIG_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "head": _one_of("mlm", "span"),
    "task": _one_of("pitch", "animal", "both"),
    "data_dir": _STRING,
    "train_files": _FILES,
    "dev_files": _FILES,
    "eval_files": _FILES,
    "strict_data": _BOOL,
    "max_train_examples": _int_at_least(0),
    "max_eval_examples": _int_at_least(0),
    "text_model": _TEXT,
    "random_init": _BOOL,
    "model.hidden_size": _OPTIONAL_SIZE,
    "model.num_hidden_layers": _OPTIONAL_SIZE,
    "model.num_attention_heads": _OPTIONAL_SIZE,
    "model.intermediate_size": _OPTIONAL_SIZE,
    "dtype": _one_of(*model_spec_lib.DTYPES),
    "max_length": _int_at_least(3),  # [CLS], one piece, [SEP]
    "buckets": _LENGTHS,
    "num_epochs": _int_at_least(1),
    "max_steps": _int_at_least(0),
    "batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
    "learning_rate": _number(0.0, low_open=True),
    "warmup_ratio": _number(0.0, 1.0),
    "lr_schedule": _one_of("linear", "cosine"),
    "weight_decay": _number(0.0),
    "adam_b1": _number(0.0, 1.0, high_open=True),
    "adam_b2": _number(0.0, 1.0, high_open=True),
    "adam_eps": _number(0.0, low_open=True),
    "max_grad_norm": _number(0.0, low_open=True),
    "seed": _int_at_least(0),  # numpy's data-order generator takes no negative seeds
    "log_every_steps": _int_at_least(1),
    "checkpoint_every_steps": _int_at_least(1),
    "keep_checkpoints": _int_at_least(1),  # 0 would leave nothing to resume from
    "progress_bar": _BOOL,
    "multiple_choice": _BOOL,
    # The audio-fused LM (configs/lm.py:...,audio); absent from the text-only configs.
    "audio.spans": _FILES,
    "audio.cache_dir": _TEXT,
    "audio.selection": _one_of(*SELECTION_RULES),
    "audio.clap_threshold": _number(-1.0, 1.0),  # a cosine similarity
    "audio.allow_missing": _BOOL,
    "audio.max_spans": _int_at_least(1),
    "audio.shuffle": _BOOL,
    "audio.encoder": _one_of(*AUDIO_ENCODERS),
    "audio.ast_model": _TEXT,
    "audio.num_tokens": _int_at_least(0),
    "audio.ast_learning_rate": ((lambda v: v is None or (_is_number(v) and v > 0)), "null or a number > 0"),
    "audio.ast_remat": _BOOL,
    "audio.ast_dtype": ((lambda v: v is None or v in model_spec_lib.DTYPES),
                        f"null or one of {', '.join(model_spec_lib.DTYPES)}"),
    "fusion_layer": _int_at_least(0),
    "fusion.num_heads": _OPTIONAL_SIZE,
    "fusion.intermediate_size": _OPTIONAL_SIZE,
    "distributed.coordinator_address": _STRING,
    "distributed.num_processes": _int_at_least(1),
    "distributed.process_id": _int_at_least(0),
}
_TASKS_OF_HEAD = {"mlm": ("pitch", "animal"), "span": ("pitch", "animal", "both")}


def lookup(config: ml_collections.ConfigDict, dotted: str) -> tuple[bool, Any]:
    node: Any = config
    for part in dotted.split("."):
        if not isinstance(node, ml_collections.ConfigDict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks every key's range (``CONFIG_CHECKS``) and the few cross-key rules, before any work: the first
    problem becomes a one-line ``UserError`` naming the key."""
    for key, (check, expected) in CONFIG_CHECKS.items():
        present, value = lookup(config, key)
        if present and not check(value):
            raise UserError(f"config key {key}={value!r}: expected {expected}")
    if config.task not in _TASKS_OF_HEAD[config.head]:
        raise UserError(f"config key task={config.task!r}: head {config.head!r} expects one of "
                        f"{', '.join(_TASKS_OF_HEAD[config.head])}")
    if config.max_length > max(config.buckets):
        raise UserError(f"config key max_length={config.max_length}: expected at most the largest bucket "
                        f"{max(config.buckets)} (buckets={tuple(config.buckets)})")
    if "audio" in config and config.head != "mlm":
        raise UserError(f"config key audio: audio fusion needs head 'mlm', not {config.head!r}")
    if config.distributed.process_id >= config.distributed.num_processes:
        raise UserError(f"config key distributed.process_id={config.distributed.process_id}: expected less than "
                        f"distributed.num_processes={config.distributed.num_processes}")


# What decides the data order and a resumed run's position in it: a resume with other values would continue
# at the wrong place of another data stream, so it is refused. (Optimizer keys, num_epochs and max_steps may
# change: e.g. resuming with a lower learning rate.)
# The audio keys decide which audio each training row hears, so they are part of the stream too.
RESUME_KEYS = ("head", "task", "train_files", "max_train_examples", "strict_data", "max_length", "buckets",
               "batch_size", "seed", "audio")


# The audio keys of the trained AST: they shape the model (which the model spec checks on resume) or the optimizer
# (which may change on resume), not which audio a row hears, so they stay out of the resume comparison; a
# checkpoint written before they existed therefore still resumes.
AUDIO_MODEL_KEYS = ("encoder", "ast_model", "num_tokens", "ast_learning_rate", "ast_remat", "ast_dtype")


def resume_values(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The RESUME_KEYS of ``config`` as JSON values (tuples become lists, as in a checkpoint's metadata);
    ``audio`` (without ``AUDIO_MODEL_KEYS``) is null for a text-only config."""
    values = {key: config[key] if key in config else None for key in RESUME_KEYS}
    if values["audio"] is not None:
        values["audio"] = {k: v for k, v in values["audio"].to_dict().items() if k not in AUDIO_MODEL_KEYS}
    return json.loads(json.dumps(values))


def check_resume_values(saved: dict | None, config: ml_collections.ConfigDict, workdir: Path) -> None:
    if not isinstance(saved, dict):
        raise UserError(f"workdir {workdir} holds a checkpoint without resume_config metadata (written by an "
                        "older version); use a fresh --workdir")
    current = resume_values(config)
    differing = [key for key in RESUME_KEYS if saved.get(key) != current[key]]
    if differing:
        pairs = "; ".join(f"{key}={saved.get(key)!r} (checkpoint) vs {current[key]!r} (config)" for key in differing)
        raise UserError(f"workdir {workdir} was trained with other data settings ({pairs}); a resume needs the same "
                        f"{', '.join(RESUME_KEYS)}: rerun with the workdir's values or use a fresh --workdir")


# ---------------------------------------------------------------------------------------------------------
# Model, optimizer and the training state
# ---------------------------------------------------------------------------------------------------------

def split_model(model: nnx.Module) -> tuple[Any, dict, Any]:
    """(graphdef, trainable parameters as a plain dict, everything else) of an NNX model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    return graphdef, nnx.to_pure_dict(params), rest


def decay_mask(params: dict) -> dict:
    """AdamW weight decay on matrices only: biases and LayerNorm parameters are not decayed (as in BERT)."""
    def decays(path, leaf) -> bool:
        names = [str(getattr(k, "key", getattr(k, "idx", k))).lower() for k in path]
        return leaf.ndim > 1 and not any("norm" in n for n in names)
    return jax.tree_util.tree_map_with_path(decays, params)


def learning_rate_schedule(config: ml_collections.ConfigDict, total_steps: int,
                           peak: float | None = None) -> optax.Schedule:
    """Linear warm-up over ``warmup_ratio`` of the steps to ``peak`` (default ``learning_rate``), then
    ``lr_schedule``: ``linear`` decay to 0 (the default), or ``cosine`` decay to 0 (ITH's, transformers'
    get_cosine_schedule_with_warmup)."""
    peak = config.learning_rate if peak is None else peak
    warmup = int(round(config.warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    if config.get("lr_schedule", "linear") == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps)
    else:
        decay = optax.linear_schedule(peak, 0.0, decay_steps)
    return optax.join_schedules([optax.linear_schedule(0.0, peak, max(warmup, 1)), decay], boundaries=[warmup])


def ast_learning_rate(config: ml_collections.ConfigDict) -> float | None:
    """The trained AST's own peak learning rate, or None when it trains with the LM's (ITH's way)."""
    present, value = lookup(config, "audio.ast_learning_rate")
    encoder_present, encoder = lookup(config, "audio.encoder")
    if not present or value is None or not encoder_present or encoder != "ast_trainable":
        return None
    return float(value)


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
    """Gradient clipping over all parameters together, then AdamW; with ``audio.ast_learning_rate`` the
    trained AST's parameters (the ``audio_encoder`` subtree) get an AdamW of their own at that peak rate."""
    def adamw(peak: float | None) -> optax.GradientTransformation:
        return optax.adamw(learning_rate_schedule(config, total_steps, peak), b1=config.adam_b1, b2=config.adam_b2,
                           eps=config.adam_eps, weight_decay=config.weight_decay, mask=decay_mask)

    ast_peak = ast_learning_rate(config)
    if ast_peak is None:
        return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), adamw(None))

    def labels(params: dict) -> dict:
        return {name: jax.tree_util.tree_map(lambda _: "ast" if name == AUDIO_ENCODER_PARAMS else "lm", subtree)
                for name, subtree in params.items()}

    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm),
                       optax.multi_transform({"lm": adamw(None), "ast": adamw(ast_peak)}, labels))


def init_train_state(params: dict, optimizer: optax.GradientTransformation) -> dict:
    return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": optimizer.init(params)}


# ---------------------------------------------------------------------------------------------------------
# Steps (pure, jitted by the caller)
# ---------------------------------------------------------------------------------------------------------

def make_train_step(graphdef, rest, optimizer: optax.GradientTransformation, loss_fn: Callable) -> Callable:
    """``train_step(state, batch, rng) -> (state, metrics)``: one optimizer update on a global batch.

    ``metrics["all_finite"]``: the loss, the gradients and the new parameters are finite. Reduced on device,
    in the same program, so a NaN update is caught without fetching the state; the loop saves nothing after
    a False. The optimizer moments are averages of g and g**2, finite while the gradient norm is (g**2
    overflows exactly when the norm does); ``Checkpoints.save`` checks every array of the state as well."""

    def train_step(state: dict, batch: dict, rng: jax.Array) -> tuple[dict, dict]:
        def compute_loss(params):
            return loss_fn(nnx.merge(graphdef, params, rest), batch, rng)

        (loss, aux), grads = jax.value_and_grad(compute_loss, has_aux=True)(state["params"])
        updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.global_norm(grads)
        all_finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & checkpoint_lib.tree_all_finite(params)
        metrics = {"loss": loss, "grad_norm": grad_norm, "all_finite": all_finite, **aux}
        return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

    return train_step


def make_predict_step(graphdef, rest, predict_fn: Callable) -> Callable:
    def predict_step(params: dict, batch: dict) -> dict:
        return predict_fn(nnx.merge(graphdef, params, rest), batch)

    return predict_step


def dropout_key(seed: int, step: int) -> jax.Array:
    # A function of (seed, step) alone: a resumed run draws exactly the dropout masks of an uninterrupted one.
    return jax.random.fold_in(jax.random.key(seed), step)


def check_finite(step_metrics: Iterable[tuple[int, dict]], learning_rate: Callable) -> None:
    """Raises ``TrainingDiverged`` at the first fetched step whose ``all_finite`` is False."""
    for step, metrics in step_metrics:
        if bool(metrics["all_finite"]):
            continue
        loss, rate = float(metrics["loss"]), float(learning_rate(step - 1))
        if not math.isfinite(loss):
            what = f"loss is {loss} at step {step}"
        elif not math.isfinite(float(metrics["grad_norm"])):
            what = f"the gradients of step {step} are NaN or Inf (loss {loss:.4g})"
        else:
            what = f"the update of step {step} made the parameters NaN or Inf (loss {loss:.4g})"
        raise TrainingDiverged(f"{what} (learning rate {rate:.3g}); the run stops without saving this state. "
                               "Lower --config.learning_rate, or check the data.")


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------

def evaluate_split(task, split, params: dict, predict_step: Callable, mesh, batch_size: int) -> dict:
    """Runs predict_step over every row set of a split and lets the task score the predictions."""
    return task.score(split, predict_split(task, split, params, predict_step, mesh, batch_size))


def predict_split(task, split, params: dict, predict_step: Callable, mesh, batch_size: int) -> dict:
    """``outputs[set_name][row_index]``: predict_step's outputs (numpy) for every row of every row set."""
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
    return outputs


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
# Workdirs
# ---------------------------------------------------------------------------------------------------------

def save_tokenizer(tokenizer, workdir: Path) -> None:
    # The workdir keeps its own copy so that evaluating or detecting with it needs neither text_model's
    # directory nor the hub (the checkpoint may live elsewhere, or be a hub id on an offline machine).
    with atomic_output(workdir / TOKENIZER_FILE) as tmp:
        tokenizer.save(str(tmp))


def load_workdir_config(workdir: Path) -> ml_collections.ConfigDict:
    path = workdir / CONFIG_FILE
    if not path.is_file():
        raise UserError(f"{path} not found: is {workdir} a training workdir?")
    try:
        return ml_collections.ConfigDict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{path}: not valid JSON ({error})") from None


def load_workdir_tokenizer(workdir: Path, config: ml_collections.ConfigDict):
    path = workdir / TOKENIZER_FILE
    # Workdirs written before the tokenizer copy existed fall back to the config's text_model.
    return load_tokenizer(path if path.is_file() else config.text_model)


def spec_of(meta: dict, where: Path) -> model_spec_lib.ModelSpec:
    """The model spec stored in a checkpoint's metadata."""
    if "model_spec" not in meta:
        raise UserError(f"checkpoint {where} has no model_spec in its metadata (written by an older version); "
                        "retrain in a fresh --workdir")
    return model_spec_lib.ModelSpec.from_dict(meta["model_spec"], source=f"checkpoint {where}")


@dataclasses.dataclass
class RestoredModel:
    graphdef: Any
    rest: Any
    params: dict  # replicated over the mesh
    step: int
    spec: model_spec_lib.ModelSpec


def restore_for_inference(workdir: Path, config: ml_collections.ConfigDict, mesh, *,
                          step: int | None = None) -> RestoredModel:
    """The best-dev checkpoint's model (or periodic checkpoint ``step``), rebuilt from its stored spec."""
    checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
    try:
        which = "best" if step is None else "latest"
        if step is None:
            step = checkpoints.latest_step("best")
            if step is None:
                raise UserError(f"{workdir}/best holds no checkpoint yet (training ends an epoch before it does)")
        elif step not in checkpoints.all_steps("latest"):
            raise UserError(f"--step {step}: not in {workdir}/checkpoints (available: "
                            f"{checkpoints.all_steps('latest')})")
        where = checkpoints.step_dir(step, which)
        try:
            meta = checkpoints.read_meta(step, which=which)
        except Exception as error:  # a damaged checkpoint, reported as such
            reason = checkpoint_lib.describe_failure(error)
            raise UserError(f"checkpoint {where} does not restore: {reason}") from None
        spec = spec_of(meta, where)
        # Shapes only: the weights come from the checkpoint, so no random initialisation is computed.
        graphdef, params, rest = split_model(nnx.eval_shape(lambda: model_spec_lib.build_model(spec)))
        if jax.tree.leaves(rest):  # non-parameter arrays (none in today's models) need real values
            graphdef, _, rest = split_model(model_spec_lib.build_model(spec))
        if which == "best":
            target = {"params": params}
        else:  # the periodic checkpoints hold the whole training state
            target = jax.eval_shape(lambda p: init_train_state(p, make_optimizer(config, total_steps=1)), params)
        replicated = mesh_lib.replicated(mesh)
        target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), target)
        try:
            restored, _ = checkpoints.restore(step, target, which=which)
        except checkpoint_lib.CheckpointDamaged as error:
            raise UserError(f"checkpoint {where} does not restore: {error}") from None
    finally:
        checkpoints.close()
    return RestoredModel(graphdef=graphdef, rest=rest, params=restored["params"], step=step, spec=spec)
