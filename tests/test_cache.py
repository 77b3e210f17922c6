"""The audio token cache: round trips, keys, fingerprints, shards, merge, corruption, hostile prompts, selection."""

import hashlib
import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from audio_gen.cache import (CACHE_FORMAT_VERSION, CacheEntry, CacheError, CacheReader, CacheWriter, cache_stats,
                             entry_key, merge, shard_of_key, verify)
from audio_gen.selection import acceptance_rates, select_candidate

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
    assert not any((tmp_path / "c" / "audio").iterdir())
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
    (lambda e: setattr(e, "clap_scores", np.array([0.1, np.nan, 0.2])), "'clap_scores'"),
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
        result = subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries", "30",
                                 "--num-shards", "3", "--shard-index", str(index)], capture_output=True, cwd=REPO)
        assert result.returncode == 0
    assert run_cli("verify", cache, "--quiet").returncode == 0
    shards = cache / "shards"
    rows = [json.loads(line) for line in (shards / "shard-00000-of-00003.index.jsonl").read_text().splitlines()]
    victim = rows[len(rows) // 2]
    # Flip bytes inside the token payload of one entry of shard 0 ...
    with open(shards / "shard-00000-of-00003.data", "r+b") as handle:
        position = victim["offset"] + victim["length"] - 700
        handle.seek(position)
        original = handle.read(4)
        handle.seek(position)
        handle.write(bytes(b ^ 0xFF for b in original))
    # ... and cut shard 2's data file short.
    data_2 = shards / "shard-00002-of-00003.data"
    rows_2 = [json.loads(line) for line in (shards / "shard-00002-of-00003.index.jsonl").read_text().splitlines()]
    os.truncate(data_2, data_2.stat().st_size - rows_2[-1]["length"] // 2)

    result = run_cli("verify", cache, "--quiet")
    assert result.returncode == 1, result.stdout
    problems = [line for line in result.stdout.splitlines() if line.startswith("PROBLEM")]
    assert len(problems) == 2, result.stdout
    assert f"shard shard-00000-of-00003: entry {victim['key'][:12]}" in problems[0]
    assert "sha256 mismatch" in problems[0]
    assert f"shard shard-00002-of-00003: entry {rows_2[-1]['key'][:12]}" in problems[1]
    assert "truncated" in problems[1]
    # The reader refuses the damaged entries with the same names, and still serves the others.
    reader = CacheReader(cache)
    with pytest.raises(CacheError, match=f"shard-00000-of-00003.data: entry {victim['key'][:12]}.*sha256"):
        reader.get(victim["key"])
    assert reader.get(rows[0]["key"]).key == rows[0]["key"]
    # A writer will not append to a shard whose data file lost committed entries.
    with pytest.raises(CacheError, match="shard is damaged"):
        CacheWriter(cache, fingerprint=cache_driver.fingerprint(64), num_shards=3, shard_index=2)


def test_verify_names_a_damaged_index_line(tmp_path):
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries", "12"], check=True,
                   cwd=REPO, capture_output=True)
    index = cache / "shards" / "shard-00000-of-00001.index.jsonl"
    lines = index.read_bytes().split(b"\n")
    lines[4] = lines[4].replace(b'"offset":', b'"offset":1', 1)
    index.write_bytes(b"\n".join(lines))
    result = run_cli("verify", cache, "--quiet")
    assert result.returncode == 1
    assert "shard shard-00000-of-00001: shard-00000-of-00001.index.jsonl: line 5: crc mismatch" in result.stdout


def test_unfinished_tail_is_accepted_then_cleaned(tmp_path):
    """What a killed writer leaves (half a record, half an index line) is not an entry and not an error."""
    cache = tmp_path / "cache"
    subprocess.run([sys.executable, str(HELPERS / "cache_driver.py"), str(cache), "--entries", "10"], check=True,
                   cwd=REPO, capture_output=True)
    shards = cache / "shards"
    data, index = shards / "shard-00000-of-00001.data", shards / "shard-00000-of-00001.index.jsonl"
    clean_data, clean_index = data.read_bytes(), index.read_bytes()
    with open(data, "ab") as handle:
        handle.write(b"ITHACREC" + b"\x07" * 3000)
    with open(index, "ab") as handle:
        handle.write(b'{"clap_scores":[0.1,')
    report = verify(cache)
    assert report.ok and report.entries == 10 and len(report.notes) == 2
    assert len(CacheReader(cache)) == 10
    with CacheWriter(cache, fingerprint=cache_driver.fingerprint(64)) as writer:
        assert all(writer.has(cache_driver.key_for(i)) for i in range(10))
    assert data.read_bytes() == clean_data and index.read_bytes() == clean_index
    assert verify(cache).notes == []


def test_cli_errors_exit_2(tmp_path):
    result = run_cli("verify", tmp_path)
    assert result.returncode == 2 and result.stderr.startswith("error: ") and "no cache.json" in result.stderr
    (tmp_path / "cache.json").write_text('{"format": "ith-jax-audio-cache", "format_version": 99, "fingerprint": {}}')
    result = run_cli("stats", tmp_path)
    assert result.returncode == 2 and "format_version" in result.stderr and "99" in result.stderr


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
    allowed = {"cache.json", "shards", "audio", "tmp"}
    for path in cache.rglob("*"):
        rel = path.relative_to(cache)
        assert rel.parts[0] in allowed, rel
        assert all(ch in "0123456789abcdefghijklmnopqrstuvwxyz-._" for ch in rel.name), rel
    assert verify(cache).ok


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
    """Plain-Python statement of ITH's rules, written independently of audio_gen.selection."""
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
