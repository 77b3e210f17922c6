"""`python -m audio_gen.build_cache --config configs/gen.py:tiny` as a real subprocess on small manifests: the
cache it writes (read back with CacheReader and `audio_gen.cache verify`), reruns, shards, batch-composition
independence, reports, and the errors it must give for bad input."""

import ast
import json
import os
import pathlib
import resource
import subprocess
import sys

import numpy as np
import pytest

from audio_gen import tiny
from ith_common.cache import CacheReader, shard_of_key, verify
from ith_common.manifest import write_manifest

REPO = pathlib.Path(__file__).resolve().parents[1]
SPAN_TEXTS = ["Squeal", "Bark", "sound of a tube train", "sound of roadside ambience", "Squeal"]


def record(row, sentence, span_texts, task="animal"):
    spans = []
    for text in span_texts:
        start = sentence.index(text)
        spans.append({"text": text, "start": start, "end": start + len(text), "confidence": None})
    return {"schema_version": 1, "id": f"{task}/dev.csv:{row}", "task": task, "source": f"{task}/dev.csv",
            "row": row, "sentence": sentence, "spans": spans,
            "gold_spans": [{k: s[k] for k in ("text", "start", "end")} for s in spans], "detector": "gold"}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Two manifests (one repeated span across them) and a span list: 5 distinct prompts from 7 spans."""
    root = tmp_path_factory.mktemp("build_cache_inputs")
    write_manifest([record(1, "Squeal is the sound a [MASK] makes.", ["Squeal"]),
                    record(2, "Bark is the sound a [MASK] makes.", ["Bark"])], root / "animal.jsonl")
    pitch_sentence = "The sound of a tube train has a [MASK] pitch than the sound of roadside ambience."
    write_manifest([record(1, pitch_sentence, ["sound of a tube train", "sound of roadside ambience"], "pitch"),
                    record(2, "Squeal of a pig is [MASK].", ["Squeal"], "pitch")], root / "pitch.jsonl")
    (root / "extra.txt").write_text("# extra spans\nbell   ringing\n\nBark\n", encoding="utf-8")
    return {"spans": f"{root / 'animal.jsonl'},{root / 'pitch.jsonl'},{root / 'extra.txt'}",
            "prompts": {"Squeal sound", "Bark sound", "sound of a tube train sound",
                        "sound of roadside ambience sound", "bell ringing sound"},
            "root": root}


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The environment of every run: tiny checkpoints prebuilt under $ITH_JAX_CACHE, no hub access."""
    cache_home = tmp_path_factory.getbasetemp() / "ith_jax_cache"  # shared by the audio test modules
    tiny.ensure_all(cache_home / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")
    return {**os.environ, "ITH_JAX_CACHE": str(cache_home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


# K = 3 candidates and 3 steps instead of the tiny config's 5 and 4 keep these runs short on a busy CPU.
FAST = ("--config.progress=false", "--config.num_candidates=3", "--config.num_inference_steps=3")


def run_build(env, *args, variant="tiny", check=True, preexec_fn=None):
    command = [sys.executable, "-m", "audio_gen.build_cache", "--config", f"configs/gen.py:{variant}", *FAST,
               *map(str, args)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
                            preexec_fn=preexec_fn)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def cache_contents(cache_dir):
    with CacheReader(cache_dir) as reader:
        return {reader.prompt(key): reader.get(key) for key in reader}


def summary_of(cache_dir, suffix=""):
    return json.loads((pathlib.Path(cache_dir) / f"build_summary{suffix}.json").read_text())


@pytest.fixture(scope="module")
def built(inputs, env, tmp_path_factory):
    """One full run of the tiny paper-mode config; several tests read its cache."""
    cache_dir = tmp_path_factory.mktemp("built") / "cache"
    result = run_build(env, f"--config.spans={inputs['spans']}", f"--config.cache_dir={cache_dir}")
    return cache_dir, result


def test_build_cache_writes_one_verified_entry_per_distinct_prompt(built, inputs):
    cache_dir, result = built
    entries = cache_contents(cache_dir)
    assert set(entries) == inputs["prompts"]
    for prompt, entry in entries.items():
        # K = 3 candidates x T = 4 tokens x D = 32 (tiny AST hidden size); 1 s clips fill every token.
        assert entry.tokens.shape == (3, 4, 32) and entry.tokens.dtype == np.float16
        assert entry.clap_scores.shape == (3,) and np.all(np.abs(entry.clap_scores) <= 1)
        assert entry.token_mask is None
        assert entry.metadata["span_text"] + " sound" == prompt
        assert entry.metadata["nan_samples"] == [0, 0, 0]  # float32 tiny models on a CPU decode finite audio
        assert len(set(entry.clap_scores.tolist())) > 1  # the candidates really differ
    assert entries["Squeal sound"].metadata["occurrences"] == 2
    assert entries["Bark sound"].metadata["occurrences"] == 2
    verify = subprocess.run([sys.executable, "-m", "audio_gen.cache", "verify", str(cache_dir)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_summary_histogram_and_fingerprint(built):
    cache_dir, result = built
    summary = summary_of(cache_dir)
    assert (summary["spans"], summary["prompts"], summary["generated"], summary["reused"]) == (7, 5, 5, 0)
    assert set(summary["acceptance"]) == {"0.0", "0.2", "0.4", "0.6", "0.8"}
    # Acceptance at a threshold = share of prompts with some candidate at or above it.
    best = [entry.clap_scores.max() for entry in cache_contents(cache_dir).values()]
    assert summary["acceptance"]["0.0"] == pytest.approx(np.mean(np.asarray(best) >= 0.0))
    png = (cache_dir / "clap_scores.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 2000
    assert "generated: 5" in result.stdout and "acceptance rate" in result.stdout
    with CacheReader(cache_dir) as reader:
        fingerprint = reader.fingerprint
    assert fingerprint["generator"]["latent_mode"] == "full"
    assert fingerprint["generator"]["name"] == "stable_audio"
    assert fingerprint["encoder"]["name"] == "ast" and fingerprint["encoder"]["num_tokens"] == 4
    assert fingerprint["clap"]["fused"] is True and fingerprint["num_candidates"] == 3
    assert not list(cache_dir.glob(".*.tmp"))


def test_rerun_reuses_everything_and_changes_nothing(built, inputs, env):
    cache_dir, _ = built
    data_files = sorted((cache_dir / "shards").glob("*.sqlite"))
    assert data_files
    before = {p: p.read_bytes() for p in data_files}
    result = run_build(env, f"--config.spans={inputs['spans']}", f"--config.cache_dir={cache_dir}")
    summary = summary_of(cache_dir)
    assert (summary["generated"], summary["reused"]) == (0, 5)
    assert "reused from the cache: 5" in result.stdout
    assert {p: p.read_bytes() for p in data_files} == before


def test_shards_split_the_work_and_match_a_single_run(built, inputs, env, tmp_path):
    """Two shard runs (different batch compositions than the one-shard run: batch size 1, other order) give
    the same keys and, up to float rounding, the same tokens and scores; a one-shard rerun then reuses all."""
    cache_dir, _ = built
    sharded = tmp_path / "sharded"
    reversed_spans = ",".join(reversed(inputs["spans"].split(",")))
    for index in (0, 1):
        run_build(env, f"--config.spans={reversed_spans}", f"--config.cache_dir={sharded}", "--num_shards", "2",
                  "--shard_index", str(index), "--config.batch_size=1")
    first, second = summary_of(sharded, "-shard-00000-of-00002"), summary_of(sharded, "-shard-00001-of-00002")
    # Each shard generates exactly the keys it owns (by key hash; with 5 prompts one shard may own none).
    with CacheReader(cache_dir) as reader:
        owners = [shard_of_key(key, 2) for key in reader.keys()]
    assert (first["generated"], second["generated"]) == (owners.count(0), owners.count(1))
    assert (sharded / "clap_scores-shard-00001-of-00002.png").is_file()
    single, split = cache_contents(cache_dir), cache_contents(sharded)
    with CacheReader(cache_dir) as a, CacheReader(sharded) as b:
        assert set(a.keys()) == set(b.keys())
    for prompt, entry in single.items():
        np.testing.assert_allclose(split[prompt].tokens.astype(np.float32), entry.tokens.astype(np.float32),
                                   atol=2e-3, rtol=2e-3)
        np.testing.assert_allclose(split[prompt].clap_scores, entry.clap_scores, atol=1e-4)
    run_build(env, f"--config.spans={inputs['spans']}", f"--config.cache_dir={sharded}")
    assert (summary_of(sharded)["generated"], summary_of(sharded)["reused"]) == (0, 5)


def test_other_settings_are_refused_by_fingerprint(built, inputs, env):
    cache_dir, _ = built
    result = run_build(env, f"--config.spans={inputs['spans']}", f"--config.cache_dir={cache_dir}",
                       "--config.num_tokens=2", check=False)
    assert result.returncode == 2
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "num_tokens" in error_lines[0] and "fingerprint" in error_lines[0]


def test_short_latent_tone_and_waveforms(inputs, env, tmp_path):
    # Stable Audio in the short-latent mode, with stored waveforms of the requested length.
    short_dir = tmp_path / "short"
    run_build(env, f"--config.spans={inputs['root'] / 'extra.txt'}", f"--config.cache_dir={short_dir}",
              "--config.store_waveforms=true", "--config.num_candidates=2", variant="tiny,short")
    with CacheReader(short_dir) as reader:
        fingerprint = reader.fingerprint
        entries = [reader.get(key, waveforms=True) for key in reader]
    assert fingerprint["generator"]["latent_mode"] == "short"
    assert fingerprint["generator"]["latent_frames"] == 64  # ceil(16000 / 256) + 1, not the model's 128
    assert len(entries) == 2
    for entry in entries:
        assert entry.waveforms.shape == (2, 16000) and entry.sample_rate == 16000

    # The weight-free tone generator with log-mel tokens: the offline-demo setting.
    tone_dir = tmp_path / "tone"
    run_build(env, f"--config.spans={inputs['root'] / 'extra.txt'}", f"--config.cache_dir={tone_dir}",
              "--config.encoder=logmel", "--config.num_tokens=8", variant="tiny,tone")
    with CacheReader(tone_dir) as reader:
        assert reader.fingerprint["generator"]["name"] == "tone"
        tokens = [reader.get(key).tokens for key in reader]
    assert all(t.shape == (3, 8, 64) for t in tokens)


@pytest.mark.parametrize("case", ["missing_file", "bad_manifest_line", "unknown_key", "bad_template",
                                  "bad_shard", "offline_hub_id", "no_spans"])
def test_bad_input_is_one_clear_error_and_writes_nothing(inputs, env, tmp_path, case):
    cache_dir = tmp_path / "cache"
    args = [f"--config.cache_dir={cache_dir}"]
    expected = {
        "missing_file": "does not exist",
        "bad_manifest_line": "line 2",
        "unknown_key": "unknown config key --config.num_tokenz",
        "bad_template": "prompt_template",
        "bad_shard": "shard_index",
        "offline_hub_id": "HF_HUB_OFFLINE",
        "no_spans": "config key 'spans'",
    }[case]
    spans = str(inputs["root"] / "extra.txt")
    run_env = env
    if case == "missing_file":
        spans = str(inputs["root"] / "nope.jsonl")
    elif case == "bad_manifest_line":
        broken = tmp_path / "broken.jsonl"
        lines = (inputs["root"] / "animal.jsonl").read_text().splitlines()
        broken.write_text(lines[0] + "\n" + lines[1].replace('"row": 2', '"row": "two"') + "\n")
        spans = str(broken)
    elif case == "unknown_key":
        args.append("--config.num_tokenz=3")
    elif case == "bad_template":
        args.append("--config.prompt_template=the sound of it")
    elif case == "bad_shard":
        args += ["--num_shards", "2", "--shard_index", "2"]
    elif case == "offline_hub_id":
        args.append("--config.clap_model=laion/clap-htsat-fused")
        run_env = {**env, "HF_HOME": str(tmp_path / "empty_hf_home")}
    if case != "no_spans":
        args.append(f"--config.spans={spans}")
    result = run_build(run_env, *args, check=False)
    assert result.returncode == 2, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expected in error_lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not cache_dir.exists()


def single_error_line(result):
    assert "Traceback" not in result.stderr, result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    return error_lines[0]


@pytest.mark.parametrize("variant, expected", [
    ("tyni", "error: configs/gen.py: unknown variant 'tyni' (known: paper, tiny, tone, oracle, short, unfused, fbank)"),
    ("tiny,paper", "error: configs/gen.py: variants 'tiny' and 'paper' conflict (choose one size: paper, tiny)"),
])
def test_bad_variants_are_one_clear_error(inputs, env, tmp_path, variant, expected):
    result = run_build(env, f"--config.spans={inputs['root'] / 'extra.txt'}", f"--config.cache_dir={tmp_path / 'c'}",
                       variant=variant, check=False)
    assert result.returncode == 2
    assert single_error_line(result) == expected
    assert not (tmp_path / "c").exists()


@pytest.mark.parametrize("case", ["is_a_file", "under_a_file", "not_writable"])
def test_unwritable_cache_dir_fails_before_any_model_is_loaded(inputs, env, tmp_path, case):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    cache_dir = {"is_a_file": blocker, "under_a_file": blocker / "cache",
                 "not_writable": tmp_path / "read_only" / "cache"}[case]
    if case == "not_writable":
        if os.geteuid() == 0:
            pytest.skip("root writes into read-only directories")
        (tmp_path / "read_only").mkdir(mode=0o555)
    # A generator checkpoint that does not exist: had any model been loaded first, the error would name it.
    result = run_build(env, f"--config.spans={inputs['root'] / 'extra.txt'}", f"--config.cache_dir={cache_dir}",
                       "--config.generator_model=/no/such/checkpoint", check=False)
    assert result.returncode == 2
    line = single_error_line(result)
    assert line.startswith(f"error: config key 'cache_dir': {cache_dir}"), line
    assert {"is_a_file": "is a file", "under_a_file": "is a file", "not_writable": "not writable"}[case] in line
    assert blocker.read_text() == "x"


def test_a_full_disk_is_one_line_and_keeps_the_committed_entries(inputs, env, tmp_path):
    """The run may write no file beyond 60% of the size of the largest file of the finished cache (RLIMIT_FSIZE;
    Python ignores SIGXFSZ, so the write fails with EFBIG as on a full disk): it stops with one line naming the
    file, the entries committed before stay valid, and a rerun without the limit completes the cache.  Entries
    are made large (5 x 64 log-mel tokens of tones, 40 KB) so that they, not the cache's fixed overhead (schema,
    journal), decide when the limit is reached."""
    args = [f"--config.spans={inputs['spans']}", "--config.batch_size=1", "--config.num_candidates=5",
            "--config.encoder=logmel", "--config.num_tokens=64"]
    reference = tmp_path / "reference"
    run_build(env, *args, f"--config.cache_dir={reference}", variant="tiny,tone")
    limit = int(0.6 * max(p.stat().st_size for p in (reference / "shards").iterdir()))

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    full = tmp_path / "full"
    result = run_build(env, *args, f"--config.cache_dir={full}", variant="tiny,tone", check=False,
                       preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stderr
    line = single_error_line(result)
    # The failing file inside the cache and the system's reason (the SQLite shard reports EFBIG as an I/O error).
    assert line.startswith(f"error: {full}/") and len(line.rsplit(": ", 1)[-1]) > 3, line
    assert verify(full).ok
    kept, expected = cache_contents(full), cache_contents(reference)
    assert 0 < len(kept) < len(expected)
    for prompt, entry in kept.items():
        np.testing.assert_array_equal(entry.tokens, expected[prompt].tokens)

    run_build(env, *args, f"--config.cache_dir={full}", variant="tiny,tone")
    assert (summary_of(full)["generated"], summary_of(full)["reused"]) == (5 - len(kept), len(kept))
    assert set(cache_contents(full)) == set(expected)


def test_torch_free_modules_import_without_torch_and_audio_gen_never_imports_ith_jax():
    code = ("import sys, runpy; import ith_common.atomic, ith_common.config, ith_common.errors, ith_common.hub, "
            "ith_common.manifest, ith_common.prompts, ith_common.selection, audio_gen.build_cache, "
            "audio_gen.pretrained, audio_gen.tiny, audio_gen.generators.retrieval; "
            "runpy.run_path('configs/gen.py')['get_config']('tiny'); "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers', 'jax', 'ith_jax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
    for path in sorted((REPO / "audio_gen").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not [n for n in names if n.split(".")[0] == "ith_jax"], f"{path} imports {names}"
