"""Does feeding the ITH LM its audio ever starve the training step? Host-side cost of the audio input pipeline.

    python benchmarks/audio_input_pipeline.py --config configs/lm.py:minilm,pitch,audio \\
        --config.audio.spans=gold_pitch.jsonl --config.audio.cache_dir=oracle_cache --config.audio.selection=first

Measured with the trainer's own task (``ith_jax.tasks.MlmTask``), on the configured train file:

1. the one-time cost: reading the file, tokenising, matching every row to its manifest record and loading the
   chosen candidate of every prompt from the cache into host memory (``AudioTable``);
2. the per-step cost: producing one training batch of ``batch_size`` rows (bucketing, padding, masks, and
   ``gather_audio``: the audio tokens of every span slot copied from the host table), median and 99th
   percentile over ``--epochs`` shuffled epochs, in milliseconds and as batches per second.

The trainer dispatches each jitted step asynchronously and builds the next batch while the device computes, so
the step is never starved as long as a batch takes less time than a step. The table puts the batch time next to
the training-step times of ``BENCHMARKS.md`` (measured by the other benchmarks on the named machines) as the
share of a step that the host spends on the next batch.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from cache_overhead import cpu_model  # noqa: E402  (this directory is sys.path[0])
from ith_common.config import load_config  # noqa: E402
from ith_jax import tasks as tasks_lib  # noqa: E402
from ith_jax.data.tokenizer import load_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--step-ms", action="append", default=[], metavar="NAME=MS",
                        help="a training step's time to compare with (repeatable), e.g. minilm-cpu=2500")
    parser.add_argument("--json", default=None)
    args, rest = parser.parse_known_args(argv)
    config, unknown = load_config(rest)
    if unknown:
        parser.error(f"unknown arguments: {' '.join(unknown)}")
    if "audio" not in config:
        parser.error("give an ITH config (the `audio` variant of configs/lm.py) and its audio keys")

    start = time.perf_counter()
    task = tasks_lib.make_task(config, load_tokenizer(config.text_model))
    train_file = tasks_lib.resolve_data_path(config, config.train_files[0])
    split = task.load(train_file, max_examples=config.max_train_examples)
    rows = task.train_rows(split)
    table_rows = task.audio_table.arrays()[0].shape[0]
    load_seconds = time.perf_counter() - start

    times = []
    for epoch in range(args.epochs):
        iterator = task.batches(rows, batch_size=config.batch_size, shuffle=True, epoch=epoch)
        while True:
            t0 = time.perf_counter()
            batch = next(iterator, None)
            if batch is None:
                break
            times.append(time.perf_counter() - t0)
    ms = np.asarray(times) * 1e3
    median, p99 = float(np.median(ms)), float(np.percentile(ms, 99))
    audio_bytes = batch_bytes = 0
    if batch is None:  # the last full batch of the loop, for its size
        batch = next(task.batches(rows, batch_size=config.batch_size, shuffle=False))
    audio_bytes = sum(batch[k].nbytes for k in ("audio_tokens", "audio_mask"))
    batch_bytes = sum(v.nbytes for v in batch.values() if isinstance(v, np.ndarray))

    print(f"machine: {cpu_model()}; {train_file}: {len(rows)} rows, {split.audio_stats.spans} spans, "
          f"{table_rows - 1} prompts in host memory")
    print(f"one-time load (read, tokenise, match manifests, load the cache's chosen candidates): {load_seconds:.1f} s")
    print(f"per batch of {config.batch_size} ({batch_bytes / 1e6:.2f} MB, of which audio {audio_bytes / 1e6:.2f} MB): "
          f"median {median:.2f} ms, p99 {p99:.2f} ms over {len(ms)} batches ({1e3 / median:.0f} batches/s)")
    comparisons = []
    for item in args.step_ms:
        name, _, value = item.partition("=")
        step = float(value)
        comparisons.append({"step": name, "step_ms": step, "batch_share_of_step": median / step})
        print(f"  vs a {name} training step of {step:g} ms: the next batch takes {100 * median / step:.2f}% of it "
              f"(p99 {100 * p99 / step:.2f}%)")
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": cpu_model(), "rows": len(rows), "load_seconds": load_seconds, "batch_size": config.batch_size,
            "batch_ms_median": median, "batch_ms_p99": p99, "batches": len(ms), "batch_bytes": batch_bytes,
            "comparisons": comparisons}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
