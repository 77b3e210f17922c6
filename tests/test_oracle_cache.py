"""The ORACLE-audio path of the sidecar: `configs/gen.py:oracle` renders each prompt as a tone whose pitch comes
from `audio_gen.pitch_table` (fitted to the labels: a ceiling, not a result), encodes it with the vectorised
log-mel encoder and skips CLAP scoring (NaN scores, the `first` selection rule).  Real subprocesses, real files."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import torch

from audio_gen import tiny
from ith_common.cache import CacheReader, verify
from audio_gen.generators.tone import frequency_table_digest
from ith_common.errors import UserError
from ith_common.prompts import build_prompt
from ith_common.selection import acceptance_rates, is_unscored, select_all, select_candidate

REPO = pathlib.Path(__file__).resolve().parents[1]
# A hidden pitch order, low to high, and a chain of labelled comparisons between neighbours.
SOURCES = ["a tuba", "a cello", "a man talking", "a violin", "a bird chirping", "a dog whistle"]
SKIPPED = "CLAP scoring skipped (oracle path): train with audio.selection=first"


# ------------------------------------------------------------------------------------------------ selection

def test_first_takes_candidate_zero_without_a_threshold():
    nan = float("nan")
    assert select_candidate([nan, nan, nan], "first") == 0
    assert select_candidate([-0.9, 0.9], "first", threshold=0.5) == 0  # the threshold is ignored
    assert select_candidate([], "first") is None  # no candidate at all
    assert select_all([[nan], [0.1, 0.2]], "first", threshold=1.0) == [0, 0]


@pytest.mark.parametrize("rule", ["first_above", "best"])
@pytest.mark.parametrize("threshold", [-math.inf, -1.0, 0.0, 0.8])
def test_threshold_rules_never_select_unscored_candidates(rule, threshold):
    nan = float("nan")
    assert select_candidate([nan, nan, nan], rule, threshold) is None  # no audio, not a guess
    # A NaN candidate is never the one chosen, even next to scored ones.
    assert select_candidate([nan, 0.9, nan], rule, min(threshold, 0.9)) == 1


def test_unscored_entries_are_recognised_and_never_accepted():
    nan = float("nan")
    assert is_unscored([nan, nan]) and not is_unscored([nan, 0.1])
    assert acceptance_rates([[nan, nan], [nan]], [-1.0, 0.0]) == {-1.0: 0.0, 0.0: 0.0}
    with pytest.raises(ValueError, match="rule: expected one of first_above, best, first"):
        select_candidate([0.1], "random")


# ------------------------------------------------------------------------------------------------ log-mel tokens

def per_clip_logmel_tokens(encoder, clip):
    """The log-mel encoder's tokens as it computed them clip by clip before it was vectorised (the reference)."""
    from audio_gen.encoders import pool_frames

    signal = torch.from_numpy(clip)
    if signal.numel() < encoder.window_length:
        signal = torch.nn.functional.pad(signal, (0, encoder.window_length - signal.numel()))
    spectrum = torch.stft(signal, n_fft=encoder.window_length, hop_length=encoder.hop_length,
                          window=encoder.window, center=False, return_complex=True)
    power = spectrum.abs().pow(2).T  # [frames, freq]
    frames = torch.log(power @ encoder.filters + 1e-6)
    tokens, mask = pool_frames(frames, frames.shape[0], encoder.num_tokens)
    return tokens.numpy(), mask.numpy()


@pytest.mark.parametrize("num_tokens", [4, 16])
def test_vectorised_logmel_tokens_equal_the_per_clip_ones(num_tokens):
    from audio_gen.encoders import build_encoder

    encoder = build_encoder("logmel", None, num_tokens=num_tokens, batch_size=8)
    rng = np.random.default_rng(0)
    t = np.arange(16000 * 2) / 16000
    clips = [(0.5 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t[:16000 * 2]) + 0.01 * rng.standard_normal(t.size))
             .astype(np.float32) for _ in range(9)]  # 9 equal 2 s clips: a full batch of 8 and one more
    clips += [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (16000, 3000, 399, 1)]  # mixed lengths,
    # including fewer frames than tokens (3000 samples = 16 frames; 399 and 1 sample = one padded frame)
    tokens, masks = encoder.encode(clips, 16000)
    assert tokens.shape == (len(clips), num_tokens, 64) and masks.shape == (len(clips), num_tokens)
    for index, clip in enumerate(clips):
        want_tokens, want_mask = per_clip_logmel_tokens(encoder, clip)
        np.testing.assert_array_equal(masks[index], want_mask)
        # float16 storage: equal to the reference up to float16 rounding of the same float32 value
        np.testing.assert_allclose(tokens[index].astype(np.float32), want_tokens.astype(np.float16).astype(np.float32),
                                   rtol=1e-3, atol=1e-3)
    # Before the float16 cast the two paths agree to float32 rounding.
    batched, _ = encoder._encode_batch(clips[:9])
    for index in range(9):
        np.testing.assert_allclose(batched[index].numpy(), per_clip_logmel_tokens(encoder, clips[index])[0],
                                   rtol=1e-5, atol=1e-4)
    assert not masks[-1, 1:].any() and masks[-1, 0]  # one padded frame -> one valid token


# ------------------------------------------------------------------------------------------------ oracle builds

def write_pitch_csv(path):
    rows = []
    for low in range(len(SOURCES) - 1):
        first, second = SOURCES[low + 1], SOURCES[low]
        rows.append(f"The sound of {first} has a [MASK] pitch than {second}.,higher,{first},{second}")
    path.write_text("sentence,answer,span1,span2\n" + "\n".join(rows) + "\n", encoding="utf-8")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    cache_home = tmp_path_factory.getbasetemp() / "ith_jax_cache"  # shared by the audio test modules
    tiny.ensure_all(cache_home / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")
    return {**os.environ, "ITH_JAX_CACHE": str(cache_home), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}


@pytest.fixture(scope="module")
def oracle_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle_inputs")
    write_pitch_csv(root / "pitch.csv")
    table = root / "oracle_pitch.json"
    made = subprocess.run([sys.executable, "-m", "audio_gen.pitch_table", "--data", str(root / "pitch.csv"), "--out",
                           str(table)], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert made.returncode == 0, made.stderr
    # The sources, one of them twice, and one span the table does not know.
    (root / "spans.txt").write_text("\n".join(SOURCES + [SOURCES[0], "a kettle"]) + "\n", encoding="utf-8")
    return {"table": table, "spans": root / "spans.txt", "root": root}


def run_build(env, variant, *args):
    command = [sys.executable, "-m", "audio_gen.build_cache", "--config", f"configs/gen.py:{variant}",
               "--config.progress=false", *map(str, args)]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def png_description(path):
    from PIL import Image

    with Image.open(path) as image:
        return image.text.get("Description", "")


def test_oracle_cache_has_unscored_tone_tokens_that_carry_the_pitch(oracle_inputs, env, tmp_path):
    cache_dir = tmp_path / "oracle"
    # A CLAP checkpoint that does not exist: the oracle path must never load CLAP.
    result = run_build(env, "tiny,oracle", f"--config.tone_frequencies={oracle_inputs['table']}",
                       f"--config.spans={oracle_inputs['spans']}", f"--config.cache_dir={cache_dir}",
                       "--config.clap_model=/no/such/clap")
    assert result.returncode == 0, result.stderr
    assert SKIPPED in result.stdout and "ORACLE" in result.stdout
    assert "1 of 7 prompts are not in the pitch table" in result.stderr  # "a kettle sound"

    table = json.loads(oracle_inputs["table"].read_text())["frequencies"]
    with CacheReader(cache_dir) as reader:
        fingerprint = reader.fingerprint
        entries = {reader.prompt(key): reader.get(key) for key in reader}
    assert fingerprint["clap"] == {"skipped": True}
    assert fingerprint["generator"]["name"] == "tone"
    assert fingerprint["generator"]["frequencies"] == frequency_table_digest(table)
    assert fingerprint["encoder"]["name"] == "logmel" and fingerprint["num_candidates"] == 1
    assert set(entries) == {build_prompt(s) for s in SOURCES + ["a kettle"]}
    for entry in entries.values():
        assert entry.tokens.shape == (1, 4, 64) and np.isnan(entry.clap_scores).all()
        assert select_candidate(entry.clap_scores, "first") == 0
        assert select_candidate(entry.clap_scores, "first_above", 0.0) is None
    # The tokens carry the oracle pitch: the loudest mel band rises with the table's Hz.
    loudest = [int(np.argmax(entries[build_prompt(s)].tokens[0].astype(np.float32).mean(axis=0))) for s in SOURCES]
    assert loudest == sorted(loudest) and loudest[0] < loudest[-1], loudest
    assert verify(cache_dir).ok

    summary = json.loads((cache_dir / "build_summary.json").read_text())
    assert summary["clap_scoring"] == SKIPPED and summary["acceptance"] is None and summary["clap_score"] is None
    assert summary["oracle"]["prompts_in_table"] == 6 and summary["oracle"]["prompts_not_in_table"] == 1
    assert "ORACLE" in summary["oracle"]["note"]
    assert SKIPPED in png_description(cache_dir / "clap_scores.png")

    stats = subprocess.run([sys.executable, "-m", "audio_gen.cache", "stats", str(cache_dir), "--json"], cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["unscored_candidates"] == 7

    # The fingerprint keeps scored and unscored entries apart: scoring into this cache is refused by name.
    scored = run_build(env, "tiny,oracle", f"--config.tone_frequencies={oracle_inputs['table']}",
                       f"--config.spans={oracle_inputs['spans']}", f"--config.cache_dir={cache_dir}",
                       "--config.clap_scoring=true")
    assert scored.returncode == 2
    assert "clap.skipped: cache has true, this run has (absent)" in scored.stderr


def test_oracle_without_a_table_is_one_line_naming_the_key_and_the_command(oracle_inputs, env, tmp_path):
    result = run_build(env, "oracle", f"--config.spans={oracle_inputs['spans']}",
                       f"--config.cache_dir={tmp_path / 'c'}")
    assert result.returncode == 2
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "--config.tone_frequencies" in lines[0] and "python -m audio_gen.pitch_table" in lines[0]
    assert not (tmp_path / "c").exists()


def test_a_table_for_other_prompts_is_refused_before_writing(oracle_inputs, env, tmp_path):
    result = run_build(env, "tiny,oracle", f"--config.tone_frequencies={oracle_inputs['table']}",
                       f"--config.spans={oracle_inputs['spans']}", f"--config.cache_dir={tmp_path / 'c'}",
                       "--config.prompt_template=the sound of {span}")
    assert result.returncode == 2
    assert "none of the 7 prompts is in the ORACLE pitch table" in result.stderr, result.stderr
    assert not (tmp_path / "c").exists()


# ------------------------------------------------------------------------------------------------ config

def test_oracle_variant_settings_alone_and_with_tiny():
    from ith_common.config import load_config_file

    alone, small = load_config_file("configs/gen.py:oracle"), load_config_file("configs/gen.py:oracle,tiny")
    for config in (alone, small):
        assert (config.oracle, config.generator, config.encoder, config.clap_scoring, config.num_candidates) == (
            True, "tone", "logmel", False, 1)
        assert config.tone_frequencies == ""  # required at run time, see the test above
    assert (alone.audio_seconds, alone.num_tokens) == (5.0, 16)  # the paper's clip length and T
    assert (small.audio_seconds, small.num_tokens) == (1.0, 4)
    with pytest.raises(UserError, match="variants 'tone' and 'oracle' conflict"):
        load_config_file("configs/gen.py:tone,oracle")
