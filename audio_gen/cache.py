"""Command line of the audio token cache (`ith_common.cache`, format in `docs/cache.md`).

    python -m audio_gen.cache verify DIR [--quiet]           # exit 1 if anything is wrong, naming shard and entry
    python -m audio_gen.cache stats DIR [--json] [--thresholds 0,0.2,0.4]
    python -m audio_gen.cache merge OUT SRC [SRC ...] [--quiet]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import Sequence

from tqdm import tqdm

from ith_common.cache import CacheError, cache_stats, merge, verify
from ith_common.errors import run_main
from ith_common.selection import DEFAULT_THRESHOLDS


def _print_stats(stats: dict) -> None:
    sizes, mib = stats["sizes"], 1024 * 1024
    print(f"cache {stats['cache_dir']} (format {stats['format_version']})")
    print(f"entries: {stats['entries']}  candidates: {stats['candidates']}  per entry: {stats['candidates_per_entry']}")
    print("shards: " + ", ".join(f"{name} {count}" for name, count in stats["shards"].items()))
    print(f"size: {sizes['shard_bytes'] / mib:.2f} MiB of shards (audio {sizes['audio_bytes'] / mib:.2f} MiB of it), "
          f"{sizes['bytes_per_entry'] / 1024:.1f} KiB per entry")
    print("acceptance rate (entries with a candidate scoring >= threshold; same for first_above and best):")
    for threshold, rate in stats["acceptance_rates"].items():
        print(f"  >= {float(threshold):4.2f}: {'n/a' if math.isnan(rate) else f'{100 * rate:5.1f} %'}")
    for label in ("scores_all", "scores_first_candidate", "scores_best_candidate"):
        if (s := stats[label])["count"]:
            print(f"{label}: n={s['count']} min {s['min']:.3f} mean {s['mean']:.3f} median {s['median']:.3f} "
                  f"max {s['max']:.3f}")
    hist = stats["histogram"]
    peak = max(hist["counts"]) or 1
    print("CLAP score histogram:")
    for lo, hi, count in zip(hist["edges"][:-1], hist["edges"][1:], hist["counts"]):
        print(f"  [{lo:5.2f}, {hi:5.2f}) {count:8d} {'#' * round(40 * count / peak)}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m audio_gen.cache",
                                     description="Check, summarise and merge audio token caches.")
    commands = parser.add_subparsers(dest="command", required=True)
    p_verify = commands.add_parser("verify", help="check every shard and entry; exit 1 if anything is wrong")
    p_verify.add_argument("cache_dir")
    p_stats = commands.add_parser("stats", help="counts, sizes, acceptance rates, score histogram")
    p_stats.add_argument("cache_dir")
    p_stats.add_argument("--json", action="store_true", help="print the numbers as JSON")
    p_stats.add_argument("--thresholds", default=",".join(map(str, DEFAULT_THRESHOLDS)),
                         help="comma-separated CLAP thresholds (default %(default)s)")
    p_merge = commands.add_parser("merge", help="combine caches with the same fingerprint into OUT")
    p_merge.add_argument("out_dir")
    p_merge.add_argument("sources", nargs="+")
    for sub in (p_verify, p_merge):
        sub.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    progress = None if getattr(args, "quiet", True) else (
        lambda items, total, description: tqdm(items, total=total, desc=description, unit="entry", leave=False))
    if args.command == "verify":
        report = verify(args.cache_dir, progress=progress)
        print("\n".join([f"note: {n}" for n in report.notes] + [f"PROBLEM: {p}" for p in report.problems]
                        + [f"OK: {report.entries} entries in {report.shards} shard(s) verified" if report.ok else
                           f"FAILED: {len(report.problems)} problem(s) in {args.cache_dir} "
                           f"({report.entries} entries readable)"]))
        return 0 if report.ok else 1
    if args.command == "stats":
        try:
            thresholds = [float(t) for t in args.thresholds.split(",") if t.strip()]
        except ValueError:
            raise CacheError(f"--thresholds: expected comma-separated numbers, got {args.thresholds!r}") from None
        stats = cache_stats(args.cache_dir, thresholds)
        print(json.dumps(stats, indent=2)) if args.json else _print_stats(stats)
        return 0
    result = merge(args.out_dir, args.sources, progress=progress)
    print(f"merged {result['entries']} entries from {len(args.sources)} cache(s) into {args.out_dir}: "
          f"{result['copied']} copied, {result['skipped']} already present")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
