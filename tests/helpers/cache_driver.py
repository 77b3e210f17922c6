"""A small real cache writer for the reliability tests: fills a cache with deterministic entries.

    python tests/helpers/cache_driver.py CACHE_DIR --entries N [--num-shards N --shard-index I]
                                         [--waveforms] [--dim D]

Entry i has prompt `prompt_for(i)` (including hostile ones: path traversal, NUL, 10,000 characters, emoji) and
contents that depend on i alone (`expected_entry(i)`), so a test can check every entry after any number of
kills and reruns.  Keys already finished are skipped, as build_cache does.  Prints one JSON summary line (after
`committed I` lines with --progress); errors are one `error: ...` line on stderr, as in every entry point.
"""

import argparse
import json
import sys

import numpy as np

from ith_common.cache import CacheEntry, CacheWriter, entry_key
from ith_common.errors import run_main

GENERATOR = {"name": "driver", "steps": 3}
ENCODER = {"name": "driver-encoder", "num_tokens": 8}
NUM_CANDIDATES = 5
NUM_TOKENS = 8
SAMPLE_RATE = 8000

HOSTILE_PROMPTS = ["../../etc/passwd sound", "nul\0byte sound", "x" * 10_000, "🐕🔊 dog 犬 sound", "/", ".", ""]


def fingerprint(dim: int) -> dict:
    return {"generator": GENERATOR, "encoder": ENCODER, "num_tokens": NUM_TOKENS, "dim": dim,
            "clap_model": "none"}


def prompt_for(i: int) -> str:
    if i < len(HOSTILE_PROMPTS):
        return HOSTILE_PROMPTS[i]
    return f"sound of thing number {i}"


def key_for(i: int) -> str:
    return entry_key(prompt_for(i), GENERATOR, i, ENCODER)


def expected_entry(i: int, dim: int, waveforms: bool) -> CacheEntry:
    rng = np.random.default_rng(1000 + i)
    tokens = rng.standard_normal((NUM_CANDIDATES, NUM_TOKENS, dim)).astype(np.float16)
    mask = None
    if i % 3 == 0:  # some entries have padded tokens
        mask = np.ones((NUM_CANDIDATES, NUM_TOKENS), dtype=bool)
        mask[:, NUM_TOKENS - 1 - i % NUM_TOKENS // 2:] = False
    scores = rng.uniform(-0.2, 0.9, NUM_CANDIDATES).astype(np.float32)
    waves = rng.uniform(-0.5, 0.5, (NUM_CANDIDATES, 800)).astype(np.float32) if waveforms else None
    return CacheEntry(key=key_for(i), prompt=prompt_for(i), tokens=tokens, token_mask=mask, clap_scores=scores,
                      metadata={"index": i, "seed": i}, waveforms=waves,
                      sample_rate=SAMPLE_RATE if waveforms else None)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("cache_dir")
    parser.add_argument("--entries", type=int, required=True)
    parser.add_argument("--num-shards", type=int, default=1)
    parser.add_argument("--shard-index", type=int, default=0)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--waveforms", action="store_true")
    parser.add_argument("--progress", action="store_true", help="print 'committed I' after each entry")
    parser.add_argument("--commit-every", type=int, default=1)
    args = parser.parse_args(argv)
    added = skipped = 0
    with CacheWriter(args.cache_dir, fingerprint=fingerprint(args.dim), num_shards=args.num_shards,
                     shard_index=args.shard_index, store_waveforms=args.waveforms,
                     commit_every=args.commit_every) as writer:
        for i in range(args.entries):
            key = key_for(i)
            if not writer.owns(key):
                continue
            if writer.has(key):
                skipped += 1
                continue
            writer.add(expected_entry(i, args.dim, args.waveforms))
            added += 1
            if args.progress and writer.pending == 0:
                print(f"committed {i}", flush=True)
    print(json.dumps({"added": added, "skipped": skipped}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))  # cache errors: one `error: ...` line, exit 1 (OS) or 2
