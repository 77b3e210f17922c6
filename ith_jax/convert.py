"""Checks that a Hugging Face BERT checkpoint loads into ith-jax with the same numbers as in transformers.

    python -m ith_jax.convert --check DIR_OR_HUB_ID [--tolerance 1e-4] [--head auto|mlm|base]

A few fixed sentences of different lengths (one padded batch) go through transformers (torch) and through
the Flax model built by ``ith_jax.models.convert.load_pretrained``. The command prints the largest absolute
difference of the last hidden states at real (non-padded) tokens and, when the checkpoint has an MLM head,
of the MLM logits there. Exit status: 0 within tolerance, 1 above it, 2 for bad input.

This is the one place in ``ith_jax`` that imports torch and transformers, inside ``_reference_outputs``:
they are the reference being compared against.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from ith_common.errors import UserError, run_main

CHECK_SENTENCES = (
    "The dog barked loudly at the mailman.",
    "A violin usually sounds higher than a cello.",
    "Thunder.",
    "Which animal makes a low, rumbling growl that echoes through the forest in the middle of the night?",
)


def _encode(ckpt_dir: Path, max_positions: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    from ith_jax.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(ckpt_dir)
    encodings = tokenizer.encode_batch(list(CHECK_SENTENCES))
    rows = [encoding.ids[:max_positions] for encoding in encodings]
    longest = max(len(row) for row in rows)
    input_ids = np.full((len(rows), longest), pad_id, np.int64)
    attention_mask = np.zeros((len(rows), longest), np.int64)
    for index, row in enumerate(rows):
        input_ids[index, : len(row)] = row
        attention_mask[index, : len(row)] = 1
    return input_ids, attention_mask


def _reference_outputs(ckpt_dir: Path, head: str, input_ids, attention_mask) -> dict[str, np.ndarray]:
    try:
        import torch
        import transformers
    except ImportError as error:
        raise UserError(
            f"--check compares against transformers and needs torch and transformers installed ({error}); "
            "install them, e.g. pip install 'ith-jax[audio]'"
        ) from None
    transformers.utils.logging.disable_progress_bar()
    model_class = transformers.BertForMaskedLM if head == "mlm" else transformers.BertModel
    # float32 and eager attention: the reference should be the plain textbook computation.
    model = model_class.from_pretrained(ckpt_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        outputs = model(
            input_ids=torch.from_numpy(input_ids),
            attention_mask=torch.from_numpy(attention_mask),
            output_hidden_states=True,
        )
    reference = {"last hidden state": outputs.hidden_states[-1].numpy()}
    if head == "mlm":
        reference["mlm logits"] = outputs.logits.numpy()
    return reference


def _flax_outputs(ckpt_dir: Path, head: str, input_ids, attention_mask) -> dict[str, np.ndarray]:
    import jax.numpy as jnp

    from ith_jax.models.convert import load_pretrained

    model, _ = load_pretrained(ckpt_dir, head)
    ids, mask = jnp.asarray(input_ids, jnp.int32), jnp.asarray(attention_mask, jnp.int32)
    encoder = model.bert if head == "mlm" else model
    hidden, _ = encoder(ids, mask)
    outputs = {"last hidden state": np.asarray(hidden)}
    if head == "mlm":
        outputs["mlm logits"] = np.asarray(model(ids, mask))
    return outputs


def check(path_or_id: str, *, tolerance: float, head: str = "auto") -> int:
    """Runs the comparison, prints one line per output and returns the exit status (0 ok, 1 too far apart)."""
    from ith_jax.models.convert import (
        config_from_checkpoint,
        has_mlm_head,
        load_hf_weights,
        resolve_checkpoint_dir,
    )

    ckpt_dir = resolve_checkpoint_dir(path_or_id)
    config = config_from_checkpoint(ckpt_dir)
    checkpoint_has_mlm_head = has_mlm_head(load_hf_weights(ckpt_dir))
    if head == "auto":
        head = "mlm" if checkpoint_has_mlm_head else "base"
    elif head == "mlm" and not checkpoint_has_mlm_head:
        raise UserError(
            f"{ckpt_dir}: --head mlm, but the checkpoint has no MLM head (cls.predictions.transform.*); "
            "use --head base"
        )

    input_ids, attention_mask = _encode(ckpt_dir, config.max_position_embeddings, config.pad_token_id)
    lengths = attention_mask.sum(axis=1).tolist()
    print(f"checkpoint: {ckpt_dir} (head: {head})")
    print(f"batch: {len(lengths)} sentences, token lengths {lengths}, padded to {input_ids.shape[1]}")

    reference = _reference_outputs(ckpt_dir, head, input_ids, attention_mask)
    ours = _flax_outputs(ckpt_dir, head, input_ids, attention_mask)
    real_tokens = attention_mask.astype(bool)
    status = 0
    for name, expected in reference.items():
        difference = float(np.max(np.abs(ours[name][real_tokens] - expected[real_tokens])))
        verdict = "ok" if difference <= tolerance else "FAIL"
        if difference > tolerance or not np.isfinite(difference):
            status = 1
        print(f"{name:<18} max |flax - torch| = {difference:.3e}  (tolerance {tolerance:.1e})  {verdict}")
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ith_jax.convert", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--check", required=True, metavar="DIR_OR_ID", help="checkpoint directory or Hugging Face hub id"
    )
    parser.add_argument("--tolerance", type=float, default=1e-4, help="largest allowed max abs difference")
    parser.add_argument(
        "--head",
        choices=("auto", "mlm", "base"),
        default="auto",
        help="auto: compare MLM logits too when the checkpoint has an MLM head",
    )
    args = parser.parse_args(argv)
    if not args.tolerance > 0:
        raise UserError(f"--tolerance {args.tolerance}: expected a positive number")
    return check(args.check, tolerance=args.tolerance, head=args.head)


if __name__ == "__main__":
    sys.exit(run_main(main))
