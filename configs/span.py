"""The auditory-span detector: a BERT token classifier (BIO tags) trained on the gold spans of both tasks.

Variants: ``base`` (bert-base-uncased, the paper's), ``minilm``, ``tiny`` (as in configs/lm.py).

    python -m ith_jax.train --config configs/span.py:minilm --workdir runs/span_minilm
    python -m ith_jax.detect --workdir runs/span_minilm --data ../shared/data/auditorybench/pitch/dev.csv --out spans.jsonl

Paper settings: 5 epochs, batch 16, AdamW, lr 1e-5, max length 128.
"""

from configs import common


def get_config(arg=None):
    size = common.parse_variants(arg, {"size": common.SIZES}, config="configs/span.py")["size"] or "base"
    c = common.base_trainer_config()
    c.head = "span"
    c.task = "both"
    # Animal rows carry one span (`span` in train, `description` elsewhere); pitch rows two (span1, span2).
    c.train_files = ("animal/train.csv", "pitch/train.csv")
    c.dev_files = ("animal/dev.csv", "pitch/dev.csv")
    c.eval_files = ("animal/dev.csv", "pitch/dev.csv")
    c.num_epochs = 5
    c.batch_size = 16
    c.learning_rate = 1e-5
    c.max_length = 128
    common.apply_size(c, size)
    return c
