"""CPU micro-benchmark of the audio cache's own overhead: the SQLite format (version 2, `ith_common.cache`) against
the version-1 implementation (own binary records + JSON index), loaded from git, in one run on the same entries.

    python benchmarks/cache_overhead.py [--entries 1000] [--tokens 8] [--dim 768] [--candidates 5]
                                        [--old-rev bbce877] [--dir /tmp/somewhere] [--update-benchmarks-md]

Rows (no models involved; entries of K candidates x T tokens x D dims, float16, plus K CLAP scores):
  write, durable     CacheWriter.add with commit_every=1: durable when it returns
  write, batched     CacheWriter.add with commit_every=8 (build_cache commits once per batch of prompts)
  has                CacheWriter.has on a mix of present and absent keys
  open reader        CacheReader(...) over the whole cache
  get                CacheReader.get in random order (checksum checked)
  verify             verify() over the whole cache
  bytes on disk      blocks allocated to the cache directory after the writer closed, per entry
The ratio column is new / old (above 1: the new format is slower or bigger).  With --update-benchmarks-md the
"Audio cache overhead (CPU)" section of BENCHMARKS.md is replaced (other sections are left alone).
"""

from __future__ import annotations

import argparse
import importlib.util
import pathlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import types

import numpy as np
from tqdm import tqdm

import ith_common.cache as new_cache
from ith_common.atomic import atomic_write_text

SECTION = "## Audio cache overhead (CPU)"
REPO = pathlib.Path(__file__).resolve().parents[1]
# The old module imported two modules that have since moved; these lines are patched when loading it.
OLD_IMPORTS = {"from audio_gen.errors import AudioGenError": "from ith_common.errors import UserError as AudioGenError",
               "from audio_gen.selection import": "from ith_common.selection import"}


def load_old_cache(rev: str) -> types.ModuleType:
    """`audio_gen/cache.py` as it was at `rev`, as a module named `cache_v1`."""
    source = subprocess.run(["git", "show", f"{rev}:audio_gen/cache.py"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout
    for old, new in OLD_IMPORTS.items():
        if old not in source:
            sys.exit(f"error: {rev}:audio_gen/cache.py has no line {old!r} to patch; pick the version-1 revision")
        source = source.replace(old, new)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("cache_v1", loader=None))
    sys.modules["cache_v1"] = module  # dataclasses look their module up here
    exec(compile(source, f"{rev}:audio_gen/cache.py", "exec"), module.__dict__)
    return module


def make_entries(module, count: int, k: int, t: int, d: int) -> list:
    rng = np.random.default_rng(0)
    generator, encoder = {"name": "bench"}, {"name": "bench", "num_tokens": t}
    return [module.CacheEntry(key=module.entry_key(f"sound of benchmark thing {i}", generator, i, encoder),
                              prompt=f"sound of benchmark thing {i}",
                              tokens=rng.standard_normal((k, t, d)).astype(np.float16), token_mask=None,
                              clap_scores=rng.uniform(-0.2, 0.8, k).astype(np.float32),
                              metadata={"seed": i, "steps": 50, "seconds": 5.0}) for i in range(count)]


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def allocated_bytes(root: pathlib.Path) -> int:
    """Space allocated on disk (blocks), which is what small files and page slack really cost."""
    return sum(p.stat().st_blocks * 512 for p in root.rglob("*") if p.is_file())


def bench_round(module, root: pathlib.Path, entries: list, label: str, results: dict) -> None:
    """One round of every measurement on fresh caches, appended to `results`."""
    cache = root / label
    with module.CacheWriter(cache, fingerprint={"bench": True}) as writer:
        results["write"] += [timed(writer.add, e) for e in tqdm(entries, desc=f"{label} write", leave=False)]
        probes = [e.key for e in entries[::2]] + ["f" * 64] * (len(entries) // 2)
        results["has"] += [timed(writer.has, key) for key in probes]
    results["bytes"].append(allocated_bytes(cache))
    with module.CacheWriter(root / f"{label}-batched", fingerprint={"bench": True}, commit_every=8) as writer:
        results["write8"].append(sum(timed(writer.add, e) for e in tqdm(entries, desc=f"{label} x8", leave=False)))
    results["open"].append(timed(lambda: module.CacheReader(cache).close()))
    with module.CacheReader(cache) as reader:
        order = np.random.default_rng(len(results["get"])).permutation(len(entries))
        results["get"] += [timed(reader.get, entries[i].key) for i in tqdm(order, desc=f"{label} get", leave=False)]
    results["verify"].append(timed(module.verify, cache))
    shutil.rmtree(cache)
    shutil.rmtree(root / f"{label}-batched")


def cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--entries", type=int, default=1000)
    parser.add_argument("--candidates", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=8, help="T (configs/gen.py default num_tokens)")
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3, help="rounds, alternating which format goes first")
    parser.add_argument("--old-rev", default="bbce877", help="git revision of the version-1 audio_gen/cache.py")
    parser.add_argument("--dir", default=None, help="where to build the caches (default: a temp dir)")
    parser.add_argument("--update-benchmarks-md", action="store_true")
    args = parser.parse_args()

    old_cache = load_old_cache(args.old_rev)
    root = pathlib.Path(tempfile.mkdtemp(prefix="cache_bench.", dir=args.dir))
    shape = (args.entries, args.candidates, args.tokens, args.dim)
    runs = [(old_cache, make_entries(old_cache, *shape), "v1"), (new_cache, make_entries(new_cache, *shape), "v2")]
    old, new = ({name: [] for name in ("write", "has", "bytes", "write8", "open", "get", "verify")} for _ in runs)
    try:
        # Alternating rounds, so that drifts in the disk's fsync latency (large on shared machines) hit both.
        for round_index in range(args.rounds):
            for module, entries, label in runs[::1 if round_index % 2 == 0 else -1]:
                bench_round(module, root, entries, label, old if label == "v1" else new)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    n = args.entries
    median = lambda name, scale: (scale * float(np.median(old[name])), scale * float(np.median(new[name])))  # noqa: E731
    rows = [("write, durable (median per entry)", *median("write", 1e6), "µs"),
            ("write, commit_every=8 (mean per entry)", *median("write8", 1e6 / n), "µs"),
            ("has (median)", *median("has", 1e6), "µs"),
            ("open reader", *median("open", 1e3), "ms"),
            ("get, random order (median)", *median("get", 1e6), "µs"),
            ("verify (whole cache)", *median("verify", 1.0), "s"),
            ("bytes on disk per entry (allocated)", *median("bytes", 1 / n), "B")]
    table = ["| operation | v1 (records + index) | v2 (SQLite) | v2 / v1 |", "|---|---|---|---|"]
    table += [f"| {name} | {a:,.2f} {unit} | {b:,.2f} {unit} | {b / a:.2f}x |" for name, a, b, unit in rows]
    text = "\n".join([
        SECTION, "",
        f"CPU: {cpu_model()} ({len(os.sched_getaffinity(0))} cores usable), {platform.system()}; "
        f"local disk, fsync'ed; numpy {np.__version__}, Python {platform.python_version()}, "
        f"SQLite {new_cache.sqlite3.sqlite_version}.",
        f"Command: `python benchmarks/cache_overhead.py {' '.join(sys.argv[1:])}`".replace("  ", " "),
        f"Entries: {n}, each K={args.candidates} x T={args.tokens} x D={args.dim} float16 tokens "
        f"({args.candidates * args.tokens * args.dim * 2:,} B) + {args.candidates} float32 CLAP scores + metadata; "
        f"one shard; v1 = `{args.old_rev}:audio_gen/cache.py`; medians over {args.rounds} alternating rounds.", "",
        *table, "",
        "A durable v1 add pays two fdatasync calls (record, then index line); a v2 add one commit of the WAL",
        "(synchronous=FULL). Both are small next to generation (seconds per prompt). Reads check a sha256 in both.", "",
    ])
    print(text)
    if args.update_benchmarks_md:
        path = REPO / "BENCHMARKS.md"
        old_text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
        pattern = re.compile(rf"^{re.escape(SECTION)}\n.*?(?=^## |\Z)", re.S | re.M)
        atomic_write_text(path, pattern.sub(lambda _: text + "\n", old_text) if pattern.search(old_text)
                          else old_text.rstrip("\n") + "\n\n" + text)
        print(f"updated {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
