"""The audio token cache (format 2, SQLite): round trips, keys, fingerprints, shards, merge, corruption, hostile
prompts and caches, file modes, disk errors, selection."""

import contextlib
import hashlib
import json
import math
import os
import pathlib
import resource
import signal
import sqlite3
import subprocess
import sys

import numpy as np
import pytest

from ith_common.cache import (CACHE_FORMAT_VERSION, CacheEntry, CacheError, CacheReader, CacheWriter, cache_stats,
                              entry_digest, entry_key, merge, shard_of_key, verify)
from ith_common.selection import acceptance_rates, select_candidate

HELPERS = pathlib.Path(__file__).parent / "helpers"
sys.path.insert(0, str(HELPERS))
import cache_driver  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
GENERATOR = {"name": "tone", "steps": 8, "seconds": 1.0}
ENCODER = {"name": "logmel", "num_tokens": 4}
FINGERPRINT = {"generator": GENERATOR, "encoder": ENCODER, "num_tokens": 4, "clap_model": "tiny-clap"}


def make_entry(prompt, seed=0, k=3, t=4, d=16, mask=None, waveforms=None, sample_rate=None):
    rng = np.random.default_rng(abs(hash((prompt, seed))) % 2**32)
    return CacheEntry(key=entry_key(prompt, GENERATOR, seed, ENCODER), prompt=prompt,
                      tokens=rng.standard_normal((k, t, d)).astype(np.float16), token_mask=mask,
                      clap_scores=rng.uniform(-1, 1, k).astype(np.float32),
                      metadata={"seed": seed, "steps": 8, "note": "ünïcode"}, waveforms=waveforms,
                      sample_rate=sample_rate)


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "audio_gen.cache", *map(str, args)], capture_output=True,
                          text=True, cwd=REPO)


def run_driver(cache, *args, **kwargs):
    return subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), *map(str, args)],
                          capture_output=True, text=True, cwd=REPO, **kwargs)


def shard_db(cache, shard="shard-00000-of-00001"):
    """A plain sqlite3 connection to one shard, for tests that look at or damage its contents."""
    return contextlib.closing(sqlite3.connect(cache / "shards" / f"{shard}.sqlite", isolation_level=None))


def files_under(root):
    return sorted((p.relative_to(root), p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*") if p.is_file())


def assert_same_entry(got: CacheEntry, want: CacheEntry):
    assert got.key == want.key
    assert got.prompt == want.prompt
    assert got.tokens.dtype == np.float16 and np.array_equal(got.tokens, want.tokens)
    assert got.clap_scores.dtype == np.float32 and np.array_equal(got.clap_scores, want.clap_scores)
    if want.token_mask is None or np.asarray(want.token_mask).all():
        assert got.token_mask is None
    else:
        assert got.token_mask.dtype == np.bool_ and np.array_equal(got.token_mask, want.token_mask)
    assert got.metadata == want.metadata


# ---------------------------------------------------------------------------------------------- round trip

def test_round_trip_with_masks_and_waveforms(tmp_path):
    mask = np.ones((3, 4), dtype=bool)
    mask[1, 2:] = False
    mono = np.random.default_rng(0).uniform(-0.9, 0.9, (3, 1234)).astype(np.float32)
    stereo = np.random.default_rng(1).uniform(-0.9, 0.9, (3, 2, 500)).astype(np.float32)
    entries = [make_entry("dog barking sound"),
               make_entry("cat meowing sound", mask=mask),
               make_entry("all valid mask sound", mask=np.ones((3, 4), dtype=bool)),
               make_entry("mono sound", waveforms=mono, sample_rate=16000),
               make_entry("stereo sound", waveforms=stereo, sample_rate=44100),
               make_entry("one candidate sound", k=1, t=1, d=768)]
    cache = tmp_path / "cache"
    with CacheWriter(cache, fingerprint=FINGERPRINT, store_waveforms=True) as writer:
        for entry in entries:
            assert not writer.has(entry.key)
            writer.add(entry)
            assert writer.has(entry.key)
        writer.flush()
    reader = CacheReader(cache)
    assert len(reader) == len(entries)
    assert reader.keys() == [e.key for e in entries]
    assert reader.fingerprint == FINGERPRINT
    for entry in entries:
        assert entry.key in reader
        assert_same_entry(reader.get(entry.key), entry)
        assert_same_entry(reader.by_prompt(entry.prompt), entry)
        assert np.array_equal(reader.clap_scores(entry.key), entry.clap_scores)
    assert reader.by_prompt("never generated sound") is None
    assert "0" * 64 not in reader
    # Without waveforms=True nothing is decoded; with it, 24-bit FLAC gives the samples back to ~1e-7.
    assert reader.get(entries[3].key).waveforms is None
    got = reader.get(entries[3].key, waveforms=True)
    assert got.sample_rate == 16000 and got.waveforms.shape == mono.shape
    np.testing.assert_allclose(got.waveforms, mono, atol=2e-7)
    got = reader.get(entries[4].key, waveforms=True)
    assert got.sample_rate == 44100 and got.waveforms.shape == stereo.shape
    np.testing.assert_allclose(got.waveforms, stereo, atol=2e-7)
    # Arrays handed out are writable and independent of the cache.
    assert got.tokens.flags.writeable
    got.tokens[...] = 7
    assert np.array_equal(reader.get(entries[4].key).tokens, entries[4].tokens)
    assert verify(cache).ok


def test_store_waveforms_off_keeps_no_audio(tmp_path):
    entry = make_entry("quiet sound", waveforms=np.zeros((3, 100), np.float32), sample_rate=8000)
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT) as writer:
        writer.add(entry)
    with shard_db(tmp_path / "c") as db:
        assert db.execute("SELECT count(*) FROM waveforms").fetchone() == (0,)
    assert CacheReader(tmp_path / "c").get(entry.key, waveforms=True).waveforms is None


def test_entry_key_is_sha256_of_canonical_json():
    key = entry_key("dog sound", {"b": 1, "a": [1, 2]}, 7, {"name": "ast", "t": 8})
    canonical = '{"encoder":{"name":"ast","t":8},"generator":{"a":[1,2],"b":1},"prompt":"dog sound","seed":7}'
    assert key == hashlib.sha256(canonical.encode()).hexdigest()
    # Key order does not matter; every field does.
    assert key == entry_key("dog sound", {"a": [1, 2], "b": 1}, 7, {"t": 8, "name": "ast"})
    variants = [entry_key("dog sound ", {"b": 1, "a": [1, 2]}, 7, {"name": "ast", "t": 8}),
                entry_key("dog sound", {"b": 2, "a": [1, 2]}, 7, {"name": "ast", "t": 8}),
                entry_key("dog sound", {"b": 1, "a": [1, 2]}, 8, {"name": "ast", "t": 8}),
                entry_key("dog sound", {"b": 1, "a": [1, 2]}, 7, {"name": "ast", "t": 16})]
    assert len({key, *variants}) == 5
    with pytest.raises(CacheError, match="seed must be an integer"):
        entry_key("x", {}, 1.5, {})
    with pytest.raises(CacheError, match="JSON"):
        entry_key("x", {"steps": float("nan")}, 1, {})


def test_rerun_skips_finished_keys_and_refuses_duplicates(tmp_path):
    first, second = make_entry("a sound"), make_entry("b sound")
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT) as writer:
        writer.add(first)
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT) as writer:
        assert writer.has(first.key) and not writer.has(second.key)
        with pytest.raises(CacheError, match="already in the cache"):
            writer.add(first)
        writer.add(second)
    assert len(CacheReader(tmp_path / "c")) == 2
    assert verify(tmp_path / "c").ok


def test_group_commit(tmp_path):
    entries = [make_entry(f"g{i} sound") for i in range(5)]
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT, commit_every=3) as writer:
        for entry in entries[:2]:
            writer.add(entry)
        assert writer.pending == 2 and writer.has(entries[0].key)
        assert len(CacheReader(tmp_path / "c")) == 0  # not committed yet: invisible to readers
        writer.add(entries[2])  # the group is full: committed
        assert writer.pending == 0 and len(CacheReader(tmp_path / "c")) == 3
        writer.add(entries[3])
        writer.flush()
        assert len(CacheReader(tmp_path / "c")) == 4
        writer.add(entries[4])
    reader = CacheReader(tmp_path / "c")  # close() committed the last one
    assert reader.keys() == [e.key for e in entries]
    assert verify(tmp_path / "c").ok


@pytest.mark.parametrize("mutate,field", [
    (lambda e: setattr(e, "tokens", e.tokens[0]), "'tokens'"),
    (lambda e: setattr(e, "tokens", e.tokens.astype(np.int32)), "'tokens'"),
    (lambda e: setattr(e, "tokens", e.tokens.astype(np.float32) * 1e6), "'tokens': non-finite"),
    (lambda e: setattr(e, "clap_scores", e.clap_scores[:2]), "'clap_scores'"),
    (lambda e: setattr(e, "clap_scores", np.array([0.1, np.inf, 0.2])), "'clap_scores'"),
    (lambda e: setattr(e, "token_mask", np.ones((3, 5), bool)), "'token_mask'"),
    (lambda e: setattr(e, "token_mask", np.array([[1, 1, 0, 0]] * 2 + [[0, 0, 0, 0]])), "candidate 2 has no valid"),
    (lambda e: setattr(e, "metadata", {"t": float("inf")}), "'metadata'"),
    (lambda e: setattr(e, "metadata", {"arr": np.zeros(2)}), "'metadata'"),
    (lambda e: setattr(e, "key", "../../etc/passwd"), "entry.key"),
    (lambda e: setattr(e, "prompt", b"bytes"), "'prompt'"),
    (lambda e: setattr(e, "waveforms", np.zeros((2, 10), np.float32)), "'waveforms'"),
    (lambda e: setattr(e, "waveforms", np.zeros((3, 10), np.float32)), "'sample_rate'"),
])
def test_bad_entries_are_refused_with_the_field_named(tmp_path, mutate, field):
    entry = make_entry("some sound")
    mutate(entry)
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT, store_waveforms=True) as writer:
        with pytest.raises(CacheError, match=field) as info:
            writer.add(entry)
        assert "\n" not in str(info.value)
    assert len(CacheReader(tmp_path / "c")) == 0
    assert verify(tmp_path / "c").ok


# ------------------------------------------------------------------------------------------- fingerprint

def test_fingerprint_mismatch_is_refused_naming_the_keys(tmp_path):
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT) as writer:
        writer.add(make_entry("a sound"))
    before = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    other = json.loads(json.dumps(FINGERPRINT))
    other["generator"]["steps"] = 50
    other["encoder"]["name"] = "ast"
    other["extra"] = True
    with pytest.raises(CacheError) as info:
        CacheWriter(tmp_path / "c", fingerprint=other)
    message = str(info.value)
    for part in ("generator.steps: cache has 8, this run has 50", 'encoder.name: cache has "logmel"',
                 "extra: cache has (absent)"):
        assert part in message, message
    assert "num_tokens" not in message and "\n" not in message
    after = sorted((p.relative_to(tmp_path), p.stat().st_size) for p in tmp_path.rglob("*") if p.is_file())
    assert before == after
    # A new shard of the same cache is refused too, and leaves no shard with the other settings behind.
    with pytest.raises(CacheError, match="generator.steps: cache has 8, this run has 50"):
        CacheWriter(tmp_path / "c", fingerprint=other, num_shards=2, shard_index=1)
    assert not (tmp_path / "c" / "shards" / "shard-00001-of-00002.sqlite").exists()
    assert len(CacheReader(tmp_path / "c")) == 1
    # Tuples and lists are the same fingerprint (it is compared as JSON).
    with CacheWriter(tmp_path / "d", fingerprint={"sizes": (1, 2)}):
        pass
    with CacheWriter(tmp_path / "d", fingerprint={"sizes": [1, 2]}):
        pass


def test_one_writer_per_shard(tmp_path):
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT):
        with pytest.raises(CacheError, match="being written by another process"):
            CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT)
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT):  # released on close
        pass


def test_two_processes_on_one_shard_end_valid_or_the_second_is_refused(tmp_path):
    """Two real writer processes started together on the same shard: each either finishes or is refused with one
    clear line, and the cache they leave is complete after a rerun, without duplicates."""
    cache = tmp_path / "cache"
    for attempt in range(3):  # the start-up race differs each time
        processes = [subprocess.Popen([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries",
                                       str(40 * (attempt + 1)), "--waveforms"], cwd=REPO, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(2)]
        outputs = [p.communicate(timeout=120) for p in processes]
        codes = [p.returncode for p in processes]
        assert 0 in codes, outputs
        for code, (_, err) in zip(codes, outputs):
            if code:
                assert code == 2 and err.count("\n") == 1 and err.startswith("error: ")
                assert "is being written by another process" in err and "shard-00000-of-00001.lock" in err
        report = verify(cache)
        assert report.ok, report.problems
        with CacheReader(cache) as reader:
            assert not reader.duplicates
            assert sorted(reader.keys()) == sorted(cache_driver.key_for(i) for i in range(40 * (attempt + 1)))
    with shard_db(cache) as db:
        assert db.execute("SELECT count(*), count(DISTINCT key) FROM entries").fetchone() == (120, 120)


def test_writer_refuses_keys_of_other_shards(tmp_path):
    entry = make_entry("a sound")
    owner = shard_of_key(entry.key, 4)
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT, num_shards=4, shard_index=(owner + 1) % 4) as writer:
        assert not writer.owns(entry.key)
        with pytest.raises(CacheError, match=f"belongs to shard {owner} of 4"):
            writer.add(entry)
    with pytest.raises(CacheError, match="shard_index"):
        CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT, num_shards=2, shard_index=2)


# ------------------------------------------------------------------------------------- concurrent shards

def test_concurrent_shard_writers_are_one_cache(tmp_path):
    cache = tmp_path / "cache"
    num_entries, num_shards = 60, 3
    processes = [subprocess.Popen([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries",
                                   str(num_entries), "--num-shards", str(num_shards), "--shard-index", str(i)],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
                 for i in range(num_shards)]
    outputs = [p.communicate(timeout=120) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
    added = [json.loads(out)["added"] for out, _ in outputs]
    assert sum(added) == num_entries and all(a > 0 for a in added)

    reader = CacheReader(cache)
    assert len(reader) == num_entries and not reader.duplicates
    assert reader.shards == [f"shard-{i:05d}-of-00003" for i in range(3)]
    for i in range(num_entries):
        want = cache_driver.expected_entry(i, 64, False)
        assert_same_entry(reader.get(want.key), want)
    result = run_cli("verify", cache, "--quiet")
    assert result.returncode == 0 and "OK: 60 entries in 3 shard(s)" in result.stdout, result.stdout
    # A later single-shard run finds every key finished.
    rerun = subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries", "60"],
                           capture_output=True, text=True, cwd=REPO)
    assert json.loads(rerun.stdout) == {"added": 0, "skipped": 60}


# ----------------------------------------------------------------------------------------------- merge

def test_merge_unions_without_duplicates(tmp_path):
    a_entries = [make_entry(f"a{i} sound", waveforms=np.full((3, 50), 0.25, np.float32), sample_rate=8000)
                 for i in range(4)]
    shared = make_entry("shared sound")
    b_entries = [make_entry(f"b{i} sound") for i in range(3)]
    with CacheWriter(tmp_path / "a", fingerprint=FINGERPRINT, store_waveforms=True) as writer:
        for entry in a_entries + [shared]:
            writer.add(entry)
    for index in range(2):
        with CacheWriter(tmp_path / "b", fingerprint=FINGERPRINT, num_shards=2, shard_index=index) as writer:
            for entry in b_entries + [shared]:
                if writer.owns(entry.key):
                    writer.add(entry)
    result = run_cli("merge", tmp_path / "out", tmp_path / "a", tmp_path / "b", "--quiet")
    assert result.returncode == 0, result.stderr
    assert "9 entries" in result.stdout and "8 copied, 1 already present" in result.stdout
    reader = CacheReader(tmp_path / "out")
    assert len(reader) == 8 and not reader.duplicates
    for entry in a_entries + b_entries + [shared]:
        assert_same_entry(reader.get(entry.key), entry)
    np.testing.assert_allclose(reader.get(a_entries[0].key, waveforms=True).waveforms, 0.25, atol=2e-7)
    assert run_cli("verify", tmp_path / "out", "--quiet").returncode == 0
    # Merging again copies nothing.
    assert merge(tmp_path / "out", [tmp_path / "a", tmp_path / "b"]) == {"copied": 0, "skipped": 9, "entries": 9}


def test_merge_refuses_other_fingerprints(tmp_path):
    with CacheWriter(tmp_path / "a", fingerprint=FINGERPRINT) as writer:
        writer.add(make_entry("x sound"))
    with CacheWriter(tmp_path / "b", fingerprint=FINGERPRINT | {"clap_model": "laion/clap-htsat-fused"}):
        pass
    result = run_cli("merge", tmp_path / "out", tmp_path / "a", tmp_path / "b")
    assert result.returncode == 2
    assert result.stderr.startswith("error: merge:") and "clap_model" in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------- corruption

def test_verify_names_a_corrupted_and_a_truncated_shard(tmp_path):
    cache = tmp_path / "cache"
    for index in range(3):
        assert run_driver(cache, "--entries", 30, "--num-shards", 3, "--shard-index", index).returncode == 0
    assert run_cli("verify", cache, "--quiet").returncode == 0
    shards = cache / "shards"
    owned = [i for i in range(30) if shard_of_key(cache_driver.key_for(i), 3) == 0]
    victim, survivor = owned[len(owned) // 2], owned[0]
    victim_key = cache_driver.key_for(victim)
    # Flip bytes of one entry's stored CLAP scores inside shard 0's file (SQLite's own structure stays intact) ...
    shard_0 = shards / "shard-00000-of-00003.sqlite"
    scores = cache_driver.expected_entry(victim, 64, False).clap_scores.tobytes()
    assert shard_0.read_bytes().count(scores) == 1
    with open(shard_0, "r+b") as handle:
        handle.seek(shard_0.read_bytes().index(scores))
        handle.write(bytes(b ^ 0xFF for b in scores[:4]))
    # ... and cut shard 2's file short.
    shard_2 = shards / "shard-00002-of-00003.sqlite"
    os.truncate(shard_2, shard_2.stat().st_size // 2)

    result = run_cli("verify", cache, "--quiet")
    assert result.returncode == 1, result.stdout
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 2, result.stdout
    assert f"PROBLEM: shard shard-00000-of-00003: entry {victim_key[:12]}: digest mismatch, the entry is corrupted" \
        in problems
    assert any(p.startswith("PROBLEM: shard shard-00002-of-00003: cannot read") and "malformed" in p for p in problems)
    # Readers and writers refuse the damaged shard, naming it ...
    with pytest.raises(CacheError, match="shard-00002-of-00003.sqlite: the shard is damaged"):
        CacheReader(cache)
    with pytest.raises(CacheError, match="shard-00002-of-00003.sqlite: the shard is damaged"):
        CacheWriter(cache, fingerprint=cache_driver.fingerprint(64), num_shards=3, shard_index=2)
    # ... and, without it, refuse the damaged entry by name and serve the others.
    shard_2.unlink()
    reader = CacheReader(cache)
    with pytest.raises(CacheError, match=f"shard-00000-of-00003.sqlite: entry {victim_key[:12]}: digest mismatch"):
        reader.get(victim_key)
    assert reader.get(cache_driver.key_for(survivor)).prompt == cache_driver.prompt_for(survivor)


def test_verify_names_a_tampered_entry_and_a_broken_index(tmp_path):
    cache = tmp_path / "cache"
    assert run_driver(cache, "--entries", 12).returncode == 0
    tampered, unindexed = cache_driver.key_for(4), cache_driver.key_for(9)
    with shard_db(cache) as db:  # an edit that is valid SQL, so only the digest can tell
        db.execute("UPDATE entries SET header = replace(header, '\"index\":4', '\"index\":5') WHERE key = ?",
                   (tampered,))
        index_page, page_size = (db.execute("SELECT rootpage FROM sqlite_master WHERE name = "
                                            "'sqlite_autoindex_entries_1'").fetchone()[0],
                                 db.execute("PRAGMA page_size").fetchone()[0])
    # Change one character of a key inside the unique index on `key` (page numbers start at 1).
    path = cache / "shards" / "shard-00000-of-00001.sqlite"
    data = bytearray(path.read_bytes())
    page = slice((index_page - 1) * page_size, index_page * page_size)
    position = page.start + bytes(data[page]).index(unindexed.encode())
    data[position + 20] = ord("0") if data[position + 20] != ord("0") else ord("1")
    path.write_bytes(bytes(data))

    result = run_cli("verify", cache, "--quiet")
    assert result.returncode == 1
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert f"PROBLEM: shard shard-00000-of-00001: entry {tampered[:12]}: digest mismatch, the entry is corrupted" \
        in problems
    assert any(p.startswith("PROBLEM: shard shard-00000-of-00001: integrity_check: ") for p in problems), problems
    assert any(p.startswith(f"PROBLEM: shard shard-00000-of-00001: entry {unindexed[:12]}: ") for p in problems)


def test_a_killed_writer_leaves_only_committed_entries(tmp_path):
    """What a writer SIGKILLed with an uncommitted group leaves (its -wal journal) is neither an entry nor an error;
    the next writer of the shard carries on from the last commit."""
    cache = tmp_path / "cache"
    code = ("import os, signal, sys\nimport cache_driver as d\nfrom ith_common.cache import CacheWriter\n"
            "w = CacheWriter(sys.argv[1], fingerprint=d.fingerprint(64), commit_every=4)\n"
            "for i in range(7):\n    w.add(d.expected_entry(i, 64, False))\n"
            "os.kill(os.getpid(), signal.SIGKILL)\n")
    killed = subprocess.run([sys.executable, "-c", code, str(cache)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(HELPERS)})
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    wal = cache / "shards" / "shard-00000-of-00001.sqlite-wal"
    assert wal.exists()
    report = verify(cache)
    assert report.ok and report.entries == 4 and report.notes == []
    with CacheReader(cache) as reader:
        assert reader.keys() == [cache_driver.key_for(i) for i in range(4)]
    with CacheWriter(cache, fingerprint=cache_driver.fingerprint(64)) as writer:
        assert writer.has(cache_driver.key_for(3)) and not writer.has(cache_driver.key_for(4))
        writer.add(cache_driver.expected_entry(4, 64, False))
    assert verify(cache).entries == 5 and not wal.exists()


def test_cli_errors_exit_2(tmp_path):
    result = run_cli("verify", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "not an audio cache" in result.stderr
    (tmp_path / "shards").mkdir()
    with shard_db(tmp_path) as db:
        db.execute("CREATE TABLE meta (name TEXT PRIMARY KEY, value TEXT NOT NULL)")
        db.executemany("INSERT INTO meta VALUES (?, ?)", [("format", '"ith-jax-audio-cache"'),
                                                          ("format_version", "99"), ("fingerprint", "{}")])
    result = run_cli("stats", tmp_path)
    assert result.returncode == 2 and "format_version" in result.stderr and "99" in result.stderr
    assert result.stderr.count("\n") == 1


def test_a_version_1_cache_gets_a_clear_error(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "cache.json").write_text('{"format": "ith-jax-audio-cache", "format_version": 1, "fingerprint": {}}')
    (tmp_path / "shards" / "shard-00000-of-00001.index.jsonl").write_text("")
    before = files_under(tmp_path)
    for command in (["verify", tmp_path], ["stats", tmp_path], ["merge", tmp_path / "out", tmp_path]):
        result = run_cli(*command)
        assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
        assert "format version 1 cache" in result.stderr and "rebuild" in result.stderr
    with pytest.raises(CacheError, match="format version 1 cache"):
        CacheWriter(tmp_path, fingerprint=FINGERPRINT)
    assert files_under(tmp_path) == before


# ---------------------------------------------------------------------------------------- hostile prompts

def test_hostile_prompts_are_stored_exactly_and_stay_inside(tmp_path):
    cache = tmp_path / "inner" / "cache"
    prompts = ["../../etc/passwd", "../../../../tmp/evil sound", "nul\0byte", "x" * 10_000, "🐕‍🦺 woof 🔊",
               "\ud800 lone surrogate", "line\nbreak\r\n", "", "/", "C:\\Windows\\system32", "%s%n{}"]
    entries = [make_entry(p, seed=i, waveforms=np.zeros((3, 64), np.float32), sample_rate=8000)
               for i, p in enumerate(prompts)]
    with CacheWriter(cache, fingerprint=FINGERPRINT, store_waveforms=True) as writer:
        for entry in entries:
            writer.add(entry)
    reader = CacheReader(cache)
    for entry in entries:
        got = reader.by_prompt(entry.prompt)
        assert got.prompt == entry.prompt and len(got.prompt) == len(entry.prompt)
        assert_same_entry(got, entry)
    # Nothing outside cache_dir, and every file name inside comes from keys, never from prompts.
    outside = [p for p in tmp_path.rglob("*") if cache not in p.parents and p != cache]
    assert outside == [tmp_path / "inner"]
    allowed = {"shards"}
    for path in cache.rglob("*"):
        rel = path.relative_to(cache)
        assert rel.parts[0] in allowed, rel
        assert all(ch in "0123456789abcdefghijklmnopqrstuvwxyz-._" for ch in rel.name), rel
    assert verify(cache).ok


def hostile_source(root):
    """A source cache crafted by someone else: a valid-looking shard whose key and waveform list name paths outside
    it, with digests recomputed so that only the key and path checks can catch them.  The version-1 format stored
    such paths in records and trusted them (merge wrote audio/../../x, get and verify read it)."""
    with CacheWriter(root, fingerprint=FINGERPRINT, store_waveforms=True) as writer:
        for i in range(2):
            writer.add(make_entry(f"h{i} sound", waveforms=np.zeros((3, 64), np.float32), sample_rate=8000))
    evil_key = "../../../escaped"
    with shard_db(root) as db:
        key, scores, header, tokens = db.execute("SELECT key, clap_scores, header, tokens FROM entries "
                                                 "ORDER BY seq").fetchone()
        header = json.loads(header) | {"waveforms": ["../../../escaped.flac"] * 3}
        header = json.dumps(header, sort_keys=True, separators=(",", ":"))
        db.execute("UPDATE entries SET key = ?, header = ?, digest = ? WHERE key = ?",
                   (evil_key, header, entry_digest(evil_key, header, scores, tokens, None), key))
        db.execute("UPDATE waveforms SET key = ? WHERE key = ?", (evil_key, key))
    return evil_key


def test_a_hostile_source_cache_never_reaches_outside_its_root(tmp_path):
    source, out = tmp_path / "box" / "source", tmp_path / "box" / "out"
    evil_key = hostile_source(source)
    (tmp_path / "escaped.flac").write_bytes(b"not audio")  # what an escaping path would read
    before = files_under(tmp_path)
    result = run_cli("merge", out, source, "--quiet")
    assert result.returncode == 2 and result.stderr.count("\n") == 1, result.stderr
    assert "fails verify" in result.stderr and f"entry {evil_key[:12]}" in result.stderr
    assert files_under(tmp_path) == before and not out.exists()
    report = verify(source)
    assert any(p.startswith("shard shard-00000-of-00001: entry ../../../esc") and "64 lowercase hex" in p
               for p in report.problems), report.problems
    with CacheReader(source) as reader:
        with pytest.raises(CacheError, match="waveforms missing or corrupted"):
            reader.get(evil_key, waveforms=True)
        assert reader.get(evil_key).waveforms is None
    assert files_under(tmp_path) == before


def test_new_cache_files_get_umask_permissions(tmp_path):
    old = os.umask(0o002)  # not the usual 022, so that neither mkstemp's 0600 nor SQLite's 0644 passes
    try:
        with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT, store_waveforms=True) as writer:
            writer.add(make_entry("a sound", waveforms=np.zeros((3, 64), np.float32), sample_rate=8000))
            writer.flush()
            while_open = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "c").rglob("*")}
        merge(tmp_path / "m", [tmp_path / "c"])
    finally:
        os.umask(old)
    assert {"shard-00000-of-00001.sqlite-wal", "shard-00000-of-00001.sqlite-shm"} <= set(while_open)
    for root in (tmp_path / "c", tmp_path / "m"):
        modes = {p.name: p.stat().st_mode & 0o777 for p in root.rglob("*")}
        assert sorted(modes) == ["shard-00000-of-00001.lock", "shard-00000-of-00001.sqlite", "shards"]
        for name, mode in (modes | (while_open if root.name == "c" else {})).items():
            assert mode == (0o775 if name == "shards" else 0o664), (root, name, oct(mode))


# ------------------------------------------------------------------------------------------------ disk errors

def check_one_line_os_error(result, path_part):
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1, result.stderr
    assert path_part in result.stderr and "Traceback" not in result.stderr


def check_committed_entries(cache, expected_count=None):
    """`verify` accepts the cache and every committed entry is exactly the driver's."""
    report = verify(cache)
    assert report.ok, report.problems
    with CacheReader(cache) as reader:
        assert expected_count is None or len(reader) == expected_count
        for key in reader:
            want = cache_driver.expected_entry(reader.get(key).metadata["index"], 64, True)
            assert_same_entry(reader.get(key), want)
        return len(reader)


def limit_file_size(limit_bytes):
    def apply():  # in the child: writes past the limit fail with EFBIG instead of killing it with SIGXFSZ
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return apply


@contextlib.contextmanager
def mounted(*args):
    """`mount ARGS... TARGET` for the block (root only); skips the test where mounting is not allowed."""
    target = args[-1]
    if os.geteuid() != 0 or subprocess.run(["mount", *map(str, args)], capture_output=True).returncode != 0:
        pytest.skip("needs root and mount(8) to make a small or read-only file system")
    try:
        yield target
    finally:
        subprocess.run(["umount", str(target)], check=True)


def test_a_full_disk_is_one_line_and_keeps_what_was_committed(tmp_path):
    """RLIMIT_FSIZE (any user): the shard file may not grow past 300 kB."""
    cache = tmp_path / "cache"
    result = run_driver(cache, "--entries", 200, "--waveforms", preexec_fn=limit_file_size(300_000))
    check_one_line_os_error(result, "shard-00000-of-00001.sqlite")
    committed = check_committed_entries(cache)
    assert 0 < committed < 200
    rerun = run_driver(cache, "--entries", 200, "--waveforms")
    assert rerun.returncode == 0 and json.loads(rerun.stdout) == {"added": 200 - committed, "skipped": committed}
    check_committed_entries(cache, 200)


def test_a_full_tmpfs_is_one_line_and_keeps_what_was_committed(tmp_path):
    (tmp_path / "small").mkdir()
    with mounted("-t", "tmpfs", "-o", "size=400k", "tmpfs", tmp_path / "small") as small:
        result = run_driver(small / "cache", "--entries", 200, "--waveforms")
        check_one_line_os_error(result, str(small / "cache"))
        assert "full" in result.stderr
        assert 0 < check_committed_entries(small / "cache") < 200


def test_a_read_only_cache_reads_and_refuses_writes_in_one_line(tmp_path):
    cache = tmp_path / "cache"
    assert run_driver(cache, "--entries", 10).returncode == 0
    before = files_under(cache)
    (tmp_path / "view").mkdir()
    with mounted("--bind", "-o", "ro", cache, tmp_path / "view") as view:
        assert run_cli("verify", view, "--quiet").returncode == 0
        check_committed_entries(view, 10)
        result = run_driver(view, "--entries", 20)
        check_one_line_os_error(result, str(view / "shards"))
        assert "Read-only file system" in result.stderr
    assert files_under(cache) == before


# ------------------------------------------------------------------------------------------- stats, select

def test_stats_numbers(tmp_path):
    scores = [[0.1, 0.5, 0.3], [0.05, 0.1, 0.15], [0.9, 0.2, 0.0], [-0.3, -0.2, 0.41]]
    with CacheWriter(tmp_path / "c", fingerprint=FINGERPRINT) as writer:
        for i, s in enumerate(scores):
            entry = make_entry(f"s{i}")
            entry.clap_scores = np.array(s, np.float32)
            writer.add(entry)
    result = run_cli("stats", tmp_path / "c", "--json", "--thresholds", "0,0.2,0.4,0.6")
    assert result.returncode == 0, result.stderr
    stats = json.loads(result.stdout)
    assert stats["entries"] == 4 and stats["candidates"] == 12
    assert stats["acceptance_rates"] == {"0.0": 1.0, "0.2": 0.75, "0.4": 0.75, "0.6": 0.25}
    assert sum(stats["histogram"]["counts"]) == 12
    want_counts, _ = np.histogram(np.array(scores, np.float32).ravel(), bins=20, range=(-1.0, 1.0))
    assert stats["histogram"]["counts"] == want_counts.tolist()
    assert math.isclose(stats["scores_best_candidate"]["max"], 0.9, rel_tol=1e-6)
    text = run_cli("stats", tmp_path / "c")
    assert text.returncode == 0 and ">= 0.80:  25.0 %" in text.stdout
    assert cache_stats(tmp_path / "c")["format_version"] == CACHE_FORMAT_VERSION


def reference_select(scores, rule, threshold):
    """Plain-Python statement of ITH's rules, written independently of ith_common.selection."""
    chosen = None
    for index, score in enumerate(scores):
        if not score >= threshold:
            continue
        if rule == "first_above":
            return index
        if chosen is None or score > scores[chosen]:
            chosen = index
    return chosen


def test_selection_rules_match_a_reference():
    rng = np.random.default_rng(3)
    cases = [list(rng.choice([-0.1, 0.0, 0.2, 0.35, 0.4, 0.8], size=int(rng.integers(1, 7)))) for _ in range(300)]
    cases += [[float("nan"), 0.5], [float("nan")], [0.4, 0.4, 0.4], [0.2, 0.8, 0.8], []]
    for scores in cases:
        for rule in ("first_above", "best"):
            for threshold in (0.0, 0.2, 0.4, 0.6, 0.8, -1.0):
                assert select_candidate(scores, rule, threshold) == reference_select(scores, rule, threshold), \
                    (scores, rule, threshold)
    assert select_candidate([0.1, 0.7, 0.5], "first_above", 0.3) == 1
    assert select_candidate([0.1, 0.5, 0.7], "first_above", 0.3) == 1
    assert select_candidate([0.1, 0.5, 0.7], "best", 0.3) == 2
    assert select_candidate([0.1, 0.2], "best", 0.3) is None
    with pytest.raises(ValueError, match="rule"):
        select_candidate([0.1], "max")
    rates = acceptance_rates(cases, thresholds=(0.0, 0.4, 0.8))
    for threshold, rate in rates.items():
        want = np.mean([reference_select(s, "first_above", threshold) is not None for s in cases])
        assert math.isclose(rate, want), threshold
    assert math.isnan(acceptance_rates([])[0.0])
