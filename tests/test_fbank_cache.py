"""The ``ast_fbank`` encoder (issue 10): the sidecar stores each candidate's AST filterbank features, for the LM's
trainable AST.  Its features against the stock, unbatched ``ASTFeatureExtractor``; its mask; the ``fbank`` config
variant; a real ``python -m audio_gen.build_cache`` run that writes them and refuses to mix them with frozen AST
tokens; and its input errors."""

import json
import pathlib

import numpy as np
import pytest

from audio_gen import tiny
from ith_common.cache import CacheReader
from ith_common.errors import UserError
from ith_common.manifest import write_manifest
from tests.test_build_cache import env, record, run_build, single_error_line  # noqa: F401 (env is a fixture)

# Stored float16 vs the stock float32 extractor: float16's rounding (half an ulp, 2**-11 relative) plus the
# float rounding between the batched torch float64 and the stock numpy computation (test_generation: < 1e-4).
FLOAT16_RTOL, COMPUTE_ATOL = 2.0 ** -11, 1e-4

# 5 s (build_cache's clips), under one 25 ms frame (300 samples), exactly one frame, 12.5 s (past the 10.24 s
# window), one sample past 1 s.
LENGTHS = (80000, 300, 400, 200000, 16001)
# 1 + (samples - 400) // 160 frames, at least 1, at most max_length (1024 for the real extractor).
REAL_VALID_FRAMES = (498, 1, 1, 1024, 98)


@pytest.fixture(scope="module")
def tiny_dirs(env):
    return tiny.ensure_all(pathlib.Path(env["ITH_JAX_CACHE"]) / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")


@pytest.fixture(scope="module")
def real_extractor_dir(tmp_path_factory):
    """A directory holding only the real AST checkpoint's extractor settings (transformers' defaults are
    MIT/ast-finetuned-audioset-10-10-0.4593's: 128 mel bins, 1024 frames, AudioSet mean/std)."""
    from transformers import ASTFeatureExtractor

    directory = tmp_path_factory.mktemp("ast_extractor")
    ASTFeatureExtractor().save_pretrained(directory)
    return directory


def noise_clips(lengths, seed=1):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(n).astype(np.float32) * 0.1 for n in lengths]


def stock_features(extractor_dir, clip):
    """The reference: the stock extractor on one clip at a time (no batching, no padding to a batch)."""
    from transformers import ASTFeatureExtractor

    extractor = ASTFeatureExtractor.from_pretrained(extractor_dir)
    return extractor(clip, sampling_rate=16000, return_tensors="np")["input_values"][0]


def test_features_and_mask_equal_the_stock_extractor(real_extractor_dir):
    from audio_gen.encoders import build_encoder

    encoder = build_encoder("ast_fbank", str(real_extractor_dir), num_tokens=16, batch_size=2)
    clips = noise_clips(LENGTHS)
    tokens, mask = encoder.encode(clips, 16000)
    assert tokens.shape == (len(clips), 1024, 128) and tokens.dtype == np.float16  # num_tokens=16 ignored
    assert mask.shape == (len(clips), 1024) and mask.dtype == bool
    assert tuple(mask.sum(axis=1)) == REAL_VALID_FRAMES
    for index, clip in enumerate(clips):
        expected = stock_features(real_extractor_dir, clip)
        np.testing.assert_allclose(tokens[index].astype(np.float32), expected, rtol=FLOAT16_RTOL, atol=COMPUTE_ATOL,
                                   err_msg=f"clip of {len(clip)} samples")
        valid = REAL_VALID_FRAMES[index]
        assert mask[index, :valid].all() and not mask[index, valid:].any()  # a prefix of the window
        # The frames past the mask are the extractor's padding: a zero fbank, normalised.
        padding = (0.0 - encoder.extractor.mean) / (2 * encoder.extractor.std)
        np.testing.assert_allclose(expected[valid:], padding, atol=1e-6)
        if len(clip) >= 400:  # the last masked-in frame is audio, not padding
            assert np.abs(expected[valid - 1] - padding).max() > 0.1
    # Under one frame there is no audio frame at all: the one frame kept in the mask is padding too.
    np.testing.assert_allclose(tokens[1].astype(np.float32), padding, atol=1e-3)


def test_resampling_goes_through_the_shared_resampler(tiny_dirs):
    from audio_gen.clap import resample
    from audio_gen.encoders import build_encoder

    encoder = build_encoder("ast_fbank", str(tiny_dirs["ast"]), num_tokens=4)
    clip_44k = noise_clips([44100 * 3 // 2], seed=2)[0]  # 1.5 s at 44.1 kHz
    tokens, mask = encoder.encode([clip_44k], 44100)
    at_16k = resample(clip_44k, 44100, 16000)
    assert len(at_16k) == 24000
    native_tokens, native_mask = encoder.encode([at_16k], 16000)
    np.testing.assert_array_equal(tokens, native_tokens)
    np.testing.assert_array_equal(mask, native_mask)
    # The tiny extractor's window: 200 frames x 32 mel bins; 1 + (24000 - 400) // 160 = 148 frames of audio.
    assert tokens.shape == (1, 200, 32) and int(mask.sum()) == 148
    np.testing.assert_allclose(tokens[0].astype(np.float32), stock_features(tiny_dirs["ast"], at_16k),
                               rtol=FLOAT16_RTOL, atol=COMPUTE_ATOL)


def test_settings_and_shared_frame_count(tiny_dirs):
    from transformers import ASTFeatureExtractor

    from audio_gen.encoders import build_encoder
    from audio_gen.pretrained import checkpoint_identity

    encoder = build_encoder("ast_fbank", str(tiny_dirs["ast"]), num_tokens=4)
    stock = ASTFeatureExtractor.from_pretrained(tiny_dirs["ast"])
    assert encoder.settings() == {
        "name": "ast_fbank", "stores": "features", "features": "ast-fbank",
        "model": checkpoint_identity(str(tiny_dirs["ast"])), "sampling_rate": 16000, "num_mel_bins": 32,
        "max_length": 200, "do_normalize": True, "mean": float(stock.mean), "std": float(stock.std)}
    assert json.loads(json.dumps(encoder.settings())) == encoder.settings()  # goes into the fingerprint
    # The frozen-token AST encoder counts the same frames (one shared helper): 1 s -> 98 frames -> 13 patches of 8.
    ast = build_encoder("ast", str(tiny_dirs["ast"]), num_tokens=4)
    assert ast.valid_time_patches(16000) == 13 and ast.valid_time_patches(10 * 16000) == ast.time_patches
    assert encoder.identity == ast.identity  # the trainable AST starts from the same checkpoint


def test_fbank_variant_selects_the_encoder():
    from audio_gen.build_cache import encoder_model_for
    from ith_common.config import load_config_file

    paper = load_config_file("configs/gen.py:fbank")
    assert paper.encoder == "ast_fbank" and encoder_model_for(paper) == "MIT/ast-finetuned-audioset-10-10-0.4593"
    oracle = load_config_file("configs/gen.py:oracle,tiny,fbank")
    assert (oracle.encoder, oracle.generator, oracle.clap_scoring) == ("ast_fbank", "tone", False)
    assert encoder_model_for(oracle) == "tiny:ast"
    assert load_config_file("configs/gen.py:tiny").encoder == "ast"  # frozen tokens stay the default


@pytest.fixture(scope="module")
def spans(tmp_path_factory):
    root = tmp_path_factory.mktemp("fbank_spans")
    write_manifest([record(1, "Squeal is the sound a [MASK] makes.", ["Squeal"]),
                    record(2, "Bark is the sound a [MASK] makes.", ["Bark"])], root / "animal.jsonl")
    return root / "animal.jsonl"


def test_build_cache_stores_fbank_features_and_refuses_frozen_tokens(env, spans, tiny_dirs, tmp_path):
    from audio_gen.pretrained import checkpoint_identity

    cache_dir = tmp_path / "cache"
    run_build(env, f"--config.spans={spans}", f"--config.cache_dir={cache_dir}", "--config.store_waveforms=true",
              variant="tiny,fbank")
    with CacheReader(cache_dir) as reader:
        fingerprint = reader.fingerprint
        entries = {reader.prompt(key): reader.get(key, waveforms=True) for key in reader}
    assert set(entries) == {"Squeal sound", "Bark sound"}
    encoder = fingerprint["encoder"]
    assert (encoder["name"], encoder["stores"], encoder["features"]) == ("ast_fbank", "features", "ast-fbank")
    assert (encoder["sampling_rate"], encoder["num_mel_bins"], encoder["max_length"]) == (16000, 32, 200)
    assert encoder["model"] == checkpoint_identity(str(tiny_dirs["ast"])) and "num_tokens" not in encoder
    for prompt, entry in entries.items():
        # K = 3 candidates of 1 s at 16 kHz: [K, max_length, mel bins], 98 frames of audio each.
        assert entry.tokens.shape == (3, 200, 32) and entry.tokens.dtype == np.float16
        assert entry.token_mask.shape == (3, 200) and entry.token_mask.sum(axis=1).tolist() == [98, 98, 98]
        assert entry.waveforms.shape == (3, 16000)
        for candidate in range(3):
            # The stored clip is 24-bit FLAC: its quantisation adds ~1e-5 to the features.
            np.testing.assert_allclose(entry.tokens[candidate].astype(np.float32),
                                       stock_features(tiny_dirs["ast"], entry.waveforms[candidate]),
                                       rtol=FLOAT16_RTOL, atol=2e-3, err_msg=f"{prompt} candidate {candidate}")
    assert not np.array_equal(entries["Squeal sound"].tokens, entries["Bark sound"].tokens)

    refused = run_build(env, f"--config.spans={spans}", f"--config.cache_dir={cache_dir}",
                        "--config.encoder=ast", variant="tiny", check=False)
    assert refused.returncode == 2
    line = single_error_line(refused)
    assert "fingerprint" in line and "encoder.name" in line


def test_encoder_model_without_extractor_settings_is_one_error(env, spans, tiny_dirs, tmp_path):
    from audio_gen.encoders import build_encoder

    no_extractor = tmp_path / "model_only"
    no_extractor.mkdir()
    (no_extractor / "config.json").write_text("{}")
    cache_dir = tmp_path / "cache"
    result = run_build(env, f"--config.spans={spans}", f"--config.cache_dir={cache_dir}",
                       f"--config.encoder_model={no_extractor}", variant="tiny,fbank", check=False)
    assert result.returncode == 2
    assert single_error_line(result) == (
        f"error: config key 'encoder_model': {no_extractor} has no preprocessor_config.json (expected an AST "
        "checkpoint with its ASTFeatureExtractor settings, e.g. MIT/ast-finetuned-audioset-10-10-0.4593)")
    assert not cache_dir.exists()
    # Another model's extractor (CLAP's) is refused by its type, not silently read with AST defaults.
    with pytest.raises(UserError, match="field 'feature_extractor_type': expected ASTFeatureExtractor, got "
                                        "'ClapFeatureExtractor'"):
        build_encoder("ast_fbank", str(tiny_dirs["clap_fused"]), num_tokens=4)
    (no_extractor / "preprocessor_config.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="preprocessor_config.json: expected a JSON object"):
        build_encoder("ast_fbank", str(no_extractor), num_tokens=4)
