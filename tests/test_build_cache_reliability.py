"""Kill safety: real writer processes are SIGKILLed at random (seeded) moments, rerun, and the cache verified.

Two writers are exercised:

* `tests/helpers/cache_driver.py`, a small real CacheWriter client with deterministic entries (so every entry's
  contents can be checked after the kills), alone and as two concurrent shard writers;
* `python -m audio_gen.build_cache --config configs/gen.py:tiny` itself (tiny random-init models, offline).

After every kill `verify` must accept the cache (at worst with a note about a shard whose first writer died while
creating it), no committed entry may disappear, and the final rerun must complete the cache without duplicates.
"""

import contextlib
import json
import os
import pathlib
import signal
import sqlite3
import subprocess
import sys
import time

import numpy as np
import pytest

from ith_common.cache import CacheReader, verify

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import cache_driver  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SEED = 20250517  # kill moments come from this seed, so a failure reproduces


def start_driver(cache, entries, *extra):
    return subprocess.Popen([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries",
                             str(entries), "--waveforms", "--progress", *map(str, extra)], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def sigkill(process):
    """SIGKILL `process` unless it already finished; True when the kill hit it running."""
    if process.poll() is None:
        process.send_signal(signal.SIGKILL)
    out, err = process.communicate()
    if process.returncode == -signal.SIGKILL:
        return True
    assert process.returncode == 0, err
    return False


def kill_at_random_moment(process, rng, max_commits=20):
    """Kill during startup (1 run in 5) or after a random number of commits plus a random fraction of the
    next entry's write, so kills land anywhere in the protocol whatever the disk's fsync speed."""
    if rng.uniform() < 0.2:
        time.sleep(rng.uniform(0.0, 0.4))
        return sigkill(process)
    commits_to_wait = int(rng.integers(1, max_commits))
    for line in process.stdout:
        if line.startswith("committed"):
            commits_to_wait -= 1
            if commits_to_wait == 0:
                time.sleep(rng.uniform(0.0, 0.04))  # about one entry's write time
                break
    return sigkill(process)


def has_shards(cache):
    return any((cache / "shards").glob("*.sqlite"))


def stored_rows(cache):
    """Rows in every shard's `entries` table, read with plain read-only SQLite (0 for a shard without tables)."""
    total = 0
    for path in (cache / "shards").glob("*.sqlite"):
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as db:
            with contextlib.suppress(sqlite3.OperationalError):  # no table yet
                total += db.execute("SELECT count(*) FROM entries").fetchone()[0]
    return total


def committed_keys(cache):
    if not has_shards(cache):
        return set()
    with CacheReader(cache) as reader:
        return set(reader.keys())


def check_after_kill(cache, previously_committed):
    """The cache a kill left behind: accepted by verify, nothing committed lost."""
    if not has_shards(cache):
        return set(), 0
    report = verify(cache)
    assert report.ok, report.problems
    keys = committed_keys(cache)
    assert previously_committed <= keys, "a committed entry disappeared"
    return keys, len(report.notes)


def check_complete(cache, num_entries, dim=64):
    result = subprocess.run([sys.executable, "-m", "audio_gen.cache", "verify", str(cache), "--quiet"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "note:" not in result.stdout
    assert stored_rows(cache) == num_entries  # not one entry written twice
    with CacheReader(cache) as reader:
        assert len(reader) == num_entries and not reader.duplicates
        for i in range(num_entries):
            want = cache_driver.expected_entry(i, dim, True)
            got = reader.get(want.key, waveforms=True)
            assert got.prompt == want.prompt
            assert np.array_equal(got.tokens, want.tokens)
            assert np.array_equal(got.clap_scores, want.clap_scores)
            assert (got.token_mask is None) == (want.token_mask is None)
            if want.token_mask is not None:
                assert np.array_equal(got.token_mask, want.token_mask)
            assert got.metadata == want.metadata
            np.testing.assert_allclose(got.waveforms, want.waveforms, atol=2e-7)


def test_driver_survives_repeated_sigkill(tmp_path):
    cache = tmp_path / "cache"
    rng = np.random.default_rng(SEED)
    num_entries = 200
    kills = tail_notes = 0
    committed: set = set()
    growth = []
    while kills < 6:
        kills += kill_at_random_moment(start_driver(cache, num_entries), rng)
        committed, notes = check_after_kill(cache, committed)
        assert len(committed) < num_entries, "the writer finished before 6 kills; raise num_entries"
        tail_notes += notes
        growth.append(len(committed))
    assert kills >= 5
    assert growth[-1] > 0, "no run got far enough to commit an entry"
    final = subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries",
                            str(num_entries), "--waveforms"], capture_output=True, text=True, cwd=REPO)
    assert final.returncode == 0, final.stderr
    summary = json.loads(final.stdout)
    assert summary == {"added": num_entries - len(committed), "skipped": len(committed)}
    check_complete(cache, num_entries)
    print(f"entries committed after each kill: {growth}; kills that left an unfinished tail: {tail_notes}")


def test_concurrent_shard_writers_survive_sigkill(tmp_path):
    cache = tmp_path / "cache"
    rng = np.random.default_rng(SEED + 1)
    num_entries = 240
    committed: set = set()
    kills = 0
    for _ in range(3):
        # Group commits (4 entries per commit) here: a kill loses at most the uncommitted group.
        processes = [start_driver(cache, num_entries, "--num-shards", 2, "--shard-index", i, "--commit-every", 4)
                     for i in range(2)]
        for process in processes:  # the second keeps writing while the first is being killed
            kills += kill_at_random_moment(process, rng, max_commits=5)
        committed, _ = check_after_kill(cache, committed)
    assert kills >= 5 and len(committed) < num_entries
    finals = [subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries",
                              str(num_entries), "--waveforms", "--num-shards", "2", "--shard-index", str(i),
                              "--commit-every", "4"],
                             capture_output=True, text=True, cwd=REPO) for i in range(2)]
    assert all(f.returncode == 0 for f in finals), [f.stderr for f in finals]
    assert sum(json.loads(f.stdout)["added"] for f in finals) == num_entries - len(committed)
    check_complete(cache, num_entries)


# ------------------------------------------------------------------------------ the real build_cache command

@pytest.fixture(scope="module")
def build_env(tmp_path_factory):
    """Tiny CLAP prebuilt under a private $ITH_JAX_CACHE; no hub access."""
    from audio_gen import tiny

    cache_home = tmp_path_factory.mktemp("ith_jax_cache")
    tiny.ensure_tiny_checkpoint("clap_fused", root=cache_home / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")
    return {**os.environ, "ITH_JAX_CACHE": str(cache_home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


def build_command(spans, cache):
    # tone generator + log-mel encoder: the real command and cache writes with the least model time, so the
    # kills land in the writing loop; K=3 with waveforms, 2 prompts per batch.
    return [sys.executable, "-m", "audio_gen.build_cache", "--config", "configs/gen.py:tiny,tone",
            f"--config.spans={spans}", f"--config.cache_dir={cache}", "--config.encoder=logmel",
            "--config.num_candidates=3", "--config.batch_size=2", "--config.store_waveforms=true",
            "--config.progress=false"]


@pytest.mark.slow
def test_build_cache_survives_repeated_sigkill(tmp_path, build_env):
    spans = tmp_path / "spans.txt"
    span_texts = [f"sound number {i} of a thing" for i in range(150)] + ["../../etc/passwd", "🐕 woof"]
    spans.write_text("\n".join(span_texts) + "\n", encoding="utf-8")
    cache = tmp_path / "cache"
    rng = np.random.default_rng(SEED + 2)
    committed: set = set()
    kills = 0
    log = open(tmp_path / "runs.log", "w")
    while kills < 5:
        before = stored_rows(cache)
        process = subprocess.Popen(build_command(spans, cache), cwd=REPO, env=build_env, stdout=log, stderr=log)
        commits_to_wait = int(rng.integers(0, 5))
        if commits_to_wait == 0:  # during start-up, model loading or the first batch: a random moment,
            # cut short by the first new commit so the kill stays inside that phase however fast the run is
            kill_at = time.monotonic() + rng.uniform(0.5, 6.0)
            while (process.poll() is None and stored_rows(cache) == before
                   and time.monotonic() < kill_at):
                time.sleep(0.02)
        else:
            deadline = time.monotonic() + 120
            while process.poll() is None and stored_rows(cache) < before + commits_to_wait:
                assert time.monotonic() < deadline, "build_cache made no progress in 120 s"
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.1))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        kills += process.returncode == -signal.SIGKILL
        committed, _ = check_after_kill(cache, committed)
        assert len(committed) < len(span_texts), "build_cache finished before 5 kills; add spans"
    final = subprocess.run(build_command(spans, cache), cwd=REPO, env=build_env, capture_output=True, text=True)
    assert final.returncode == 0, final.stderr[-2000:]
    summary = json.loads((cache / "build_summary.json").read_text())
    assert summary["reused"] == len(committed) and summary["generated"] == len(span_texts) - len(committed)

    result = subprocess.run([sys.executable, "-m", "audio_gen.cache", "verify", str(cache), "--quiet"],
                            capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0 and "note:" not in result.stdout, result.stdout
    with CacheReader(cache) as reader:
        assert len(reader) == len(span_texts) and not reader.duplicates
        assert stored_rows(cache) == len(span_texts)
        assert sorted(reader.prompt(k) for k in reader) == sorted(f"{s} sound" for s in span_texts)
        # Entries written across kills equal those of an uninterrupted run (a few prompts suffice).
        reference_spans = tmp_path / "reference.txt"
        reference_spans.write_text("\n".join(span_texts[:4]) + "\n", encoding="utf-8")
        subprocess.run(build_command(reference_spans, tmp_path / "reference"), cwd=REPO, env=build_env,
                       check=True, capture_output=True)
        with CacheReader(tmp_path / "reference") as reference:
            assert len(reference) == 4
            for key in reference:
                want, got = reference.get(key, waveforms=True), reader.get(key, waveforms=True)
                assert got.prompt == want.prompt
                assert np.array_equal(got.tokens, want.tokens)
                assert np.array_equal(got.clap_scores, want.clap_scores)
                assert np.array_equal(got.waveforms, want.waveforms)
