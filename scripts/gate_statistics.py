"""The fusion gate of a trained ITH workdir, unit by unit, on the span tokens of an evaluation file.

    python scripts/gate_statistics.py --workdir runs/oracle_pitch --data ../shared/data/auditorybench/pitch/dev.csv \\
        --spans gold_pitch.jsonl [--shuffle] [--json out.json]

The evaluation's ``gate_mean`` averages ITH's gate g = sigmoid(W_a H_a + W_t H_t) over the hidden units of every
fused token. A mean near 0.5 can hide a gate that opened some units wide (g near 1: the unit takes the fused
audio state) and closed others (g near 0: the unit keeps its text state); this script shows the distribution:
per hidden unit, g averaged over every fused token, for the trained parameters and for a fresh initialisation
of the same model spec (the untrained baseline). ``--shuffle`` permutes the audio across spans first (the
control of RESULTS.md). Analysis only: nothing here is used by training.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ith_common.atomic import atomic_write_text
from ith_common.errors import UserError, run_main
from ith_jax import mesh as mesh_lib
from ith_jax import model_spec as model_spec_lib
from ith_jax import tasks as tasks_lib
from ith_jax import trainer as trainer_lib

BANDS = ((0.0, 0.1), (0.1, 0.4), (0.4, 0.6), (0.6, 0.9), (0.9, 1.0))
BINS = jnp.asarray([0.0, 0.1, 0.4, 0.6, 0.9, 1.0])  # the same bands, for every single gate value


def per_unit_gate(model, task, split, batch_size: int) -> tuple[np.ndarray, int, np.ndarray]:
    """g averaged over every fused token per hidden unit ``[H]``, the number of fused tokens, and the histogram
    of every single g (fused token x unit) in ``BINS``."""
    @nnx.jit
    def gate_of(model, batch):
        _, gate = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                        audio_tokens=batch["audio_tokens"], audio_mask=batch["audio_mask"],
                        span_ranges=batch["span_ranges"], span_mask=batch["span_mask"],
                        span_has_audio=batch["span_has_audio"], positions=batch["mask_positions"],
                        return_gate=True, per_unit_gate=True)  # [B, L, H], 0 on tokens that took no audio
        on_span = jnp.any(gate != 0.0, axis=-1) & (batch["example_weight"][:, None] > 0)
        weights = jnp.broadcast_to(on_span[..., None], gate.shape).astype(jnp.float32)
        histogram = jnp.histogram(gate, bins=BINS, weights=weights)[0]
        return jnp.sum(jnp.where(on_span[..., None], gate, 0.0), axis=(0, 1)), jnp.sum(on_span), histogram

    total, count, histogram = 0.0, 0, 0.0
    for batch in task.batches(split.encoded, batch_size=batch_size, shuffle=False):
        batch.pop("example_index")
        sums, n, hist = gate_of(model, {k: jnp.asarray(v) for k, v in batch.items()})
        total, count = total + np.asarray(sums, np.float64), count + int(n)
        histogram = histogram + np.asarray(hist, np.float64)
    return total / max(count, 1), count, histogram / max(float(np.sum(histogram)), 1.0)


def describe(unit_means: np.ndarray) -> dict:
    bands = {f"{lo:.1f}-{hi:.1f}": float(np.mean((unit_means >= lo) & (unit_means <= hi if hi == 1.0 else
                                                                             unit_means < hi)))
             for lo, hi in BANDS}
    return {"mean": float(np.mean(unit_means)), "std_over_units": float(np.std(unit_means)),
            "mean_distance_from_half": float(np.mean(np.abs(unit_means - 0.5))),
            "min": float(np.min(unit_means)), "max": float(np.max(unit_means)), "share_of_units": bands}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--spans", action="append", required=True)
    parser.add_argument("--shuffle", action="store_true", help="permute the audio across spans (the control)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    workdir = Path(args.workdir)
    config = trainer_lib.load_workdir_config(workdir)
    if "audio" not in config:
        raise UserError(f"{workdir} is a text-only workdir: it has no fusion gate")
    with config.unlocked():
        config.audio.spans = tuple(args.spans)
        config.audio.shuffle = args.shuffle
    task = tasks_lib.make_task(config, trainer_lib.load_workdir_tokenizer(workdir, config))
    split = task.load(args.data)
    mesh = mesh_lib.make_data_mesh()
    restored = trainer_lib.restore_for_inference(workdir, config, mesh)
    trained = nnx.merge(restored.graphdef, restored.params, restored.rest)
    fresh = model_spec_lib.build_model(restored.spec, seed=config.seed)
    report = {"workdir": str(workdir), "data": args.data, "shuffled_audio": args.shuffle, "step": restored.step}
    for name, model in (("trained", trained), ("fresh", fresh)):
        unit_means, tokens, histogram = per_unit_gate(model, task, split, config.eval_batch_size)
        report[name] = {"fused_tokens": tokens, "per_unit": describe(unit_means),
                        "share_of_all_gate_values": {f"{lo:.1f}-{hi:.1f}": float(share)
                                                     for (lo, hi), share in zip(BANDS, histogram)}}
    print(json.dumps(report, indent=2))
    if args.json:
        atomic_write_text(args.json, json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
