"""Generators, CLAP scoring and audio encoders on the tiny random-init checkpoints (real classes, real files)."""

import json
import math
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from audio_gen import tiny
from ith_common.errors import UserError
from audio_gen.generators import candidate_seed, prompt_seed

SAMPLE_RATE = tiny.TINY_STABLE_AUDIO["sampling_rate"]
HOP = int(np.prod(tiny.TINY_STABLE_AUDIO["downsampling_ratios"]))
FULL_FRAMES = tiny.TINY_STABLE_AUDIO["sample_size"]
PROMPTS = ["dog barking sound", "cat meows sound", "a bell ringing sound"]


@pytest.fixture(scope="module")
def tiny_home(tmp_path_factory):
    """An $ITH_JAX_CACHE with the tiny checkpoints built, for in-process use and for `tiny:` in subprocesses.
    It lives in the session's base temp directory, so the audio test modules build them once per session."""
    home = tmp_path_factory.getbasetemp() / "ith_jax_cache"
    tiny.ensure_all(home / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")
    return home


@pytest.fixture(scope="module")
def tiny_dirs(tiny_home):
    return tiny.ensure_all(tiny_home / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")


@pytest.fixture(scope="module")
def pipeline(tiny_dirs):
    from audio_gen.generators.stable_audio import StableAudioGenerator

    return StableAudioGenerator.load(str(tiny_dirs["stable_audio"]), device="cpu", audio_seconds=1.0).pipeline


def make_generator(pipeline, **settings):
    from audio_gen.generators.stable_audio import StableAudioGenerator

    settings = {"num_inference_steps": 3, "audio_seconds": 1.0, **settings}
    return StableAudioGenerator(pipeline, identity={"digest": "test"}, **settings)


def observe_denoised_lengths(generator, prompts, seeds, num_candidates):
    """Runs generation with a forward pre-hook on the real DiT that records its input latent shapes."""
    shapes = []
    handle = generator.pipeline.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple((args[0] if args else kwargs["hidden_states"]).shape)),
        with_kwargs=True)
    try:
        clips = generator.generate(prompts, seeds, num_candidates)
    finally:
        handle.remove()
    return clips, shapes


# ------------------------------------------------------------------------------------------- Stable Audio

@pytest.mark.parametrize("mode", ["full", "short"])
def test_latent_length_and_clip_length(pipeline, mode):
    generator = make_generator(pipeline, latent_mode=mode)
    seeds = [prompt_seed(p, 0) for p in PROMPTS[:2]]
    clips, shapes = observe_denoised_lengths(generator, PROMPTS[:2], seeds, 2)
    needed = math.ceil(1.0 * SAMPLE_RATE / HOP)  # 63 frames for 1 s at hop 256
    expected_frames = FULL_FRAMES if mode == "full" else needed + 1
    assert generator.latent_frames == expected_frames
    # 3 denoising steps, each one DiT call on (2 prompts x 2 candidates) x 2 (classifier-free guidance).
    assert shapes == [(8, tiny.TINY_STABLE_AUDIO["latent_channels"], expected_frames)] * 3
    assert len(clips) == 2
    for prompt_clips in clips:
        assert prompt_clips.shape == (2, SAMPLE_RATE) and prompt_clips.dtype == np.float32
        assert np.isfinite(prompt_clips).all() and np.abs(prompt_clips).max() > 0


def test_decoding_a_prefix_of_the_latent_gives_the_same_audio(pipeline):
    """Paper-exact mode decodes only the frames the clip needs + 16: the same trimmed audio as decoding the
    model's whole window (as diffusers does), up to float rounding; without a margin it would not be."""
    exact = make_generator(pipeline, decode_margin_frames=-1)
    trimmed = make_generator(pipeline)
    no_margin = make_generator(pipeline, decode_margin_frames=0)
    assert exact.decode_frames == FULL_FRAMES and trimmed.decode_frames == math.ceil(SAMPLE_RATE / HOP) + 16
    latents = exact.denoise(PROMPTS[:1], [prompt_seed(PROMPTS[0], 0)], 2)
    reference = exact.decode(latents)
    np.testing.assert_allclose(trimmed.decode(latents), reference, atol=1e-5, rtol=0)
    assert np.abs(no_margin.decode(latents) - reference).max() > 1e-4
    assert trimmed.settings()["decode_frames"] == trimmed.decode_frames


def test_nan_samples_are_counted_per_clip(pipeline):
    generator = make_generator(pipeline)
    latents = generator.denoise(PROMPTS[:1], [prompt_seed(PROMPTS[0], 0)], 3).clone()
    latents[1] = float("nan")  # the VAE is convolutional: candidate 1 decodes to NaN only
    waveforms, counts = generator.decode_counting_nan(latents)
    assert counts.tolist() == [0, SAMPLE_RATE, 0]
    assert np.isfinite(waveforms).all() and not waveforms[1].any() and np.abs(waveforms[0]).max() > 0


def nan_vae_generator(tiny_home, monkeypatch, model):
    """A generator whose VAE decoder produces only NaN (its last convolution's weights are NaN); its own pipeline."""
    import torch

    from audio_gen.generators.stable_audio import StableAudioGenerator

    monkeypatch.setenv("ITH_JAX_CACHE", str(tiny_home))
    generator = StableAudioGenerator.load(model, device="cpu", audio_seconds=0.5, num_inference_steps=2)
    last_convolution = [m for m in generator.pipeline.vae.decoder.modules() if isinstance(m, torch.nn.Conv1d)][-1]
    with torch.no_grad():
        for parameter in last_convolution.parameters():
            parameter.fill_(float("nan"))
    return generator


def test_nan_audio_is_counted_warned_about_and_recorded_in_the_cache(tiny_home, tiny_dirs, monkeypatch, tmp_path):
    import warnings

    from audio_gen.build_cache import build_cache
    from ith_common.cache import CacheReader
    from audio_gen.clap import ClapScorer
    from audio_gen.encoders import build_encoder
    from ith_common.config import load_config_file

    generator = nan_vae_generator(tiny_home, monkeypatch, str(tiny_dirs["stable_audio"]))
    with pytest.warns(RuntimeWarning, match=r"NaN/Inf samples.*'dog barking sound' \(2 of 2 clips, 16000 samples\)"):
        clips = generator.generate(PROMPTS[:1], [prompt_seed(PROMPTS[0], 0)], 2)
    assert [counts.tolist() for counts in generator.last_nan_samples] == [[8000, 8000]]
    assert clips[0].shape == (2, 8000) and not clips[0].any()

    spans = tmp_path / "spans.txt"
    spans.write_text("dog barking\ncat meows\n", encoding="utf-8")
    config = load_config_file("configs/gen.py:tiny")
    config.update(spans=(str(spans),), cache_dir=str(tmp_path / "cache"), num_candidates=2, progress=False)
    with pytest.warns(RuntimeWarning):
        build_cache(config, generator=generator, scorer=ClapScorer(str(tiny_dirs["clap_fused"])),
                    encoder=build_encoder("logmel", None, 4), log=lambda message: None)
    with CacheReader(tmp_path / "cache") as reader:
        assert [reader.get(key).metadata["nan_samples"] for key in reader] == [[8000, 8000]] * 2

    # tiny: checkpoints have random weights, for which NaN is expected: counted, but no warning.
    quiet = nan_vae_generator(tiny_home, monkeypatch, "tiny:stable_audio")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        quiet.generate(PROMPTS[:1], [prompt_seed(PROMPTS[0], 0)], 2)
    assert [counts.tolist() for counts in quiet.last_nan_samples] == [[8000, 8000]]


def test_compiled_transformer_gives_the_same_clips(tiny_dirs):
    from audio_gen.generators.stable_audio import StableAudioGenerator

    # Its own pipeline: compiling is in place and must not leak into the other tests' module-scoped one.
    compiled = StableAudioGenerator.load(str(tiny_dirs["stable_audio"]), device="cpu", audio_seconds=1.0,
                                         num_inference_steps=2, latent_mode="short", compile_transformer=True)
    plain = make_generator(StableAudioGenerator.load(str(tiny_dirs["stable_audio"]), device="cpu",
                                                     audio_seconds=1.0).pipeline,
                           num_inference_steps=2, latent_mode="short")
    assert compiled.pipeline.transformer._compiled_call_impl is not None  # nn.Module.compile() took effect
    seeds = [prompt_seed(PROMPTS[0], 0)]
    np.testing.assert_allclose(compiled.generate(PROMPTS[:1], seeds, 2)[0], plain.generate(PROMPTS[:1], seeds, 2)[0],
                               atol=1e-4, rtol=0)


def test_short_mode_never_exceeds_the_model_window(pipeline):
    generator = make_generator(pipeline, latent_mode="short", audio_seconds=FULL_FRAMES * HOP / SAMPLE_RATE)
    assert generator.latent_frames == FULL_FRAMES
    with pytest.raises(UserError, match="longer than the model's maximum"):
        make_generator(pipeline, audio_seconds=FULL_FRAMES * HOP / SAMPLE_RATE + 0.5)
    with pytest.raises(UserError, match="latent_mode"):
        make_generator(pipeline, latent_mode="tiny")


@pytest.mark.parametrize("mode, step_noise", [("full", "gaussian"), ("short", "gaussian"), ("short", "brownian")])
def test_clips_do_not_depend_on_batch_composition(pipeline, mode, step_noise):
    generator = make_generator(pipeline, latent_mode=mode, step_noise=step_noise)
    seeds = {p: prompt_seed(p, 0) for p in PROMPTS}
    together = generator.generate(PROMPTS, [seeds[p] for p in PROMPTS], 3)
    reordered = generator.generate([PROMPTS[2], PROMPTS[0]], [seeds[PROMPTS[2]], seeds[PROMPTS[0]]], 3)
    alone = generator.generate([PROMPTS[1]], [seeds[PROMPTS[1]]], 3)
    # Equal up to float rounding of differently-shaped batched kernels (observed ~3e-7) ...
    np.testing.assert_allclose(together[0], reordered[1], atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[2], reordered[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(together[1], alone[0], atol=1e-5, rtol=0)
    # ... while candidates, prompts and seeds really differ (so the comparison above can fail).
    assert np.abs(together[0][0] - together[0][1]).max() > 1e-3
    other_seed = generator.generate([PROMPTS[1]], [seeds[PROMPTS[1]] + 1], 3)
    assert np.abs(other_seed[0] - alone[0]).max() > 1e-3


def test_gaussian_step_noise_is_what_the_scheduler_uses(pipeline):
    import torch
    from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler

    from audio_gen.generators.stable_audio import CandidateStepNoise

    generator = make_generator(pipeline, latent_mode="short", num_inference_steps=4)
    generator.generate(PROMPTS[:2], [1, 2], 3)
    assert generator.settings()["step_noise"] == "gaussian@cpu"
    assert generator.last_step_noise.calls == 4 and len(generator.last_step_noise.generators) == 6
    assert make_generator(pipeline, step_noise="brownian").settings()["step_noise"] == "brownian-per-candidate"
    # The pipeline stays usable as the stock one: a plain call afterwards builds its own Brownian tree.
    pipeline(PROMPTS[0], num_inference_steps=2, audio_end_in_s=1.0, generator=torch.Generator().manual_seed(0),
             output_type="latent")
    assert isinstance(pipeline.scheduler.noise_sampler, BrownianTreeNoiseSampler)
    # Standard normal, independent across steps and candidates, reproducible from the seeds.
    noise = CandidateStepNoise([5, 6], (8, 2000), torch.device("cpu"), torch.float32)
    first, second = noise(1.0, 0.5), noise(0.5, 0.2)
    assert first.shape == (2, 8, 2000)
    assert abs(float(first.mean())) < 0.02 and abs(float(first.std()) - 1) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([first.flatten(), second.flatten()]))[0, 1])) < 0.02
    assert abs(float(torch.corrcoef(torch.stack([first[0].flatten(), first[1].flatten()]))[0, 1])) < 0.02
    again = CandidateStepNoise([5, 6], (8, 2000), torch.device("cpu"), torch.float32)
    assert torch.equal(again(1.0, 0.5), first)
    assert torch.equal(CandidateStepNoise([6], (8, 2000), torch.device("cpu"), torch.float32)(1.0, 0.5)[0], first[1])


def test_seeds_are_stable_and_distinct():
    assert prompt_seed("dog barking sound", 0) == prompt_seed("dog barking sound", 0)
    assert prompt_seed("dog barking sound", 0) != prompt_seed("dog barking sound", 1)
    assert prompt_seed("dog barking sound", 0) != prompt_seed("dog barking sounds", 0)
    seeds = {candidate_seed(prompt_seed("x", 0), k) for k in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2 ** 63 for s in seeds)


# ------------------------------------------------------------------------------------------- tone generator

def dominant_frequency(clip, rate):
    spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip))))
    return np.fft.rfftfreq(len(clip), 1.0 / rate)[np.argmax(spectrum)]


def test_tone_generator_pitch_table_and_candidates(tmp_path):
    from audio_gen.generators.tone import ToneGenerator

    table = tmp_path / "pitches.json"
    table.write_text(json.dumps({"a high sound": 1000.0, "a low sound": 200}))
    generator = ToneGenerator(sample_rate=16000, audio_seconds=1.0, frequencies_file=str(table))
    clips = generator.generate(["a high sound", "a low sound", "unlisted sound"], [1, 2, 3], 4)
    assert [c.shape for c in clips] == [(4, 16000)] * 3
    for clip in clips[0]:
        assert abs(dominant_frequency(clip, 16000) - 1000.0) <= 1000.0 * 0.03 + 2
    for clip in clips[1]:
        assert abs(dominant_frequency(clip, 16000) - 200.0) <= 200.0 * 0.03 + 2
    hashed = generator.frequency_for("unlisted sound")
    assert 110.0 <= hashed <= 1760.0 and hashed == ToneGenerator().frequency_for("unlisted sound")
    assert np.abs(clips[0][0] - clips[0][1]).max() > 0.01  # candidates differ
    again = generator.generate(["a high sound"], [1], 4)
    np.testing.assert_array_equal(again[0], clips[0])  # and are reproducible
    # The settings (hashed into every cache key) name the table by its content: the same pitches in another file
    # and order give the same settings, one other pitch does not, and no table is None.
    settings = generator.settings()["frequencies"]
    assert settings["prompts"] == 2 and len(settings["sha256"]) == 64
    for content, same in (({"a low sound": 200.0, "a high sound": 1000}, True),
                          ({"a high sound": 1000.5, "a low sound": 200}, False)):
        other = tmp_path / "other.json"
        other.write_text(json.dumps(content))
        assert (ToneGenerator(frequencies_file=str(other)).settings()["frequencies"] == settings) is same
    assert ToneGenerator().settings()["frequencies"] is None


def test_tone_table_lookup_falls_back_to_case_insensitive(tmp_path):
    from audio_gen.generators.tone import ToneGenerator

    # Gold manifests keep the sentence's casing ("Room tone ..."); AuditoryBench's span columns are lowercase.
    table = tmp_path / "pitches.json"
    table.write_text(json.dumps({"room tone sound": 300.0, "Bell sound": 900, "bell sound": 950}))
    generator = ToneGenerator(frequencies_file=str(table))
    assert generator.table_frequency("Room Tone sound") == 300.0 == generator.frequency_for("ROOM TONE SOUND")
    assert generator.table_frequency("bell sound") == 950.0  # an exact key wins
    assert generator.table_frequency("BELL sound") is None  # two pitches for one casefold: no guess
    assert generator.frequency_for("BELL sound") == ToneGenerator().frequency_for("BELL sound")  # hashed


@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ("[1, 2]", "expected a JSON object"),
    ('{"a": "loud"}', "field 'a': expected a frequency"),
    ('{"a": -5}', "field 'a': expected a frequency"),
])
def test_tone_table_errors_name_the_field(tmp_path, content, message):
    from audio_gen.generators.tone import ToneGenerator

    table = tmp_path / "pitches.json"
    table.write_text(content)
    with pytest.raises(UserError, match=message):
        ToneGenerator(frequencies_file=str(table))


# ------------------------------------------------------------------------------------------- CLAP

@pytest.mark.parametrize("name", ["clap_fused", "clap_unfused"])
def test_clap_scores_are_cosines_of_the_embeddings(tiny_dirs, name):
    from audio_gen.clap import ClapScorer

    scorer = ClapScorer(str(tiny_dirs[name]), batch_size=2)
    rng = np.random.default_rng(0)
    # 0.5 s, 1 s and 3 s clips: the 3 s one is longer than the tiny 2 s window (fusion / random-crop path).
    clips = [rng.standard_normal(n).astype(np.float32) * 0.2 for n in (8000, 16000, 48000)]
    texts = ["dog barking", "dog barking", "a bell ringing"]
    scores = scorer.score(texts, clips, 16000)
    text_embeddings = scorer.embed_text(texts)
    audio_embeddings = scorer.embed_audio(clips, 16000)
    assert scores.shape == (3,) and scores.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(audio_embeddings, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(scores, np.sum(text_embeddings * audio_embeddings, axis=1), atol=1e-5)
    assert np.all(np.abs(scores) <= 1.0)
    # Deterministic even for the over-long clip, whose crop is random in the feature extractor.
    np.testing.assert_array_equal(scorer.score(texts, clips, 16000), scores)
    assert scorer.settings()["fused"] is (name == "clap_fused")
    # A clip's score does not depend on its batch companions (the stock fused extractor marks a random
    # short clip of each batch as "longer").
    for order in ([1, 0], [0], [1]):
        np.testing.assert_allclose(scorer.score([texts[i] for i in order], [clips[i] for i in order], 16000),
                                   scores[order], atol=1e-5)
    # Resampled input (soxr) gives nearly the same embedding as the native rate.
    import soxr

    # (Band-limited: white noise would lose its top band to the resampler's anti-aliasing filter, and the
    # log-mel of an empty band is -100 dB, which a random-weight model amplifies.)
    t = np.arange(16000) / 16000
    chord = (0.3 * np.sin(2 * np.pi * 330 * t) + 0.2 * np.sin(2 * np.pi * 1250 * t)
             + 0.1 * np.sin(2 * np.pi * 3100 * t)).astype(np.float32)
    upsampled = soxr.resample(chord, 16000, 44100)
    np.testing.assert_allclose(scorer.embed_audio([upsampled], 44100)[0], scorer.embed_audio([chord], 16000)[0],
                               atol=0.05)


# ------------------------------------------------------------------------------------------- torch features

REAL_CLAP_EXTRACTOR = dict(feature_size=64, sampling_rate=48000, hop_length=480, max_length_s=10, fft_window_size=1024,
                           frequency_min=50, frequency_max=14000, padding="repeatpad")


@pytest.mark.parametrize("truncation, padding", [("fusion", "repeatpad"), ("rand_trunc", "repeatpad"),
                                                 ("rand_trunc", "repeat"), ("fusion", "pad")])
def test_torch_clap_features_match_the_extractor(truncation, padding):
    import torch
    from transformers import ClapFeatureExtractor

    from audio_gen.features import clap_features, clap_supported

    extractor = ClapFeatureExtractor(**{**REAL_CLAP_EXTRACTOR, "truncation": truncation, "padding": padding})
    rng = np.random.default_rng(0)
    # 5 s (build_cache's clips), a 2 ms click, exactly the 10 s window, an odd length.
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (240000, 100, 480000, 333333)]
    assert clap_supported(extractor, clips) and not clap_supported(extractor, clips + [np.zeros(480001)])
    expected = extractor(clips, sampling_rate=48000, return_tensors="pt")["input_features"]
    computed = clap_features(extractor, clips, torch.device("cpu"))
    assert computed.shape == expected.shape and computed.dtype == torch.float32
    np.testing.assert_allclose(computed.numpy(), expected.numpy(), atol=1e-3, rtol=0)  # dB values, ~1e-5 seen


def test_torch_ast_features_match_the_extractor(tiny_dirs):
    import torch
    from transformers import ASTFeatureExtractor

    from audio_gen.features import ast_features

    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(n).astype(np.float32) * 0.1 for n in (80000, 300, 400, 200000, 16001)]
    for extractor in (ASTFeatureExtractor(), ASTFeatureExtractor.from_pretrained(tiny_dirs["ast"])):
        expected = extractor(clips, sampling_rate=16000, return_tensors="pt")["input_values"]
        computed = ast_features(extractor, clips, torch.device("cpu"))
        assert computed.shape == expected.shape
        np.testing.assert_allclose(computed.numpy(), expected.numpy(), atol=1e-4, rtol=0)


# ------------------------------------------------------------------------------------------- encoders

def test_pool_frames_averages_contiguous_slices():
    import torch

    from audio_gen.encoders import pool_frames

    frames = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # rows [0,1], [2,3], ..., [10,11]
    tokens, mask = pool_frames(frames, 6, 3)
    np.testing.assert_allclose(tokens.numpy(), [[1, 2], [5, 6], [9, 10]])
    assert mask.all()
    tokens, mask = pool_frames(frames, 4, 2)  # only the first 4 frames are audio
    np.testing.assert_allclose(tokens.numpy(), [[1, 2], [5, 6]])
    tokens, mask = pool_frames(frames, 2, 3)  # fewer valid frames than tokens: padded and masked
    np.testing.assert_allclose(tokens.numpy(), [[0, 1], [2, 3], [0, 0]])
    assert mask.tolist() == [True, True, False]


@pytest.mark.parametrize("name, checkpoint, dim", [("ast", "ast", 32), ("clap", "clap_fused", 32),
                                                   ("logmel", None, 64)])
def test_encoders_shapes_masks_and_settings(tiny_dirs, name, checkpoint, dim):
    from audio_gen.encoders import build_encoder

    encoder = build_encoder(name, str(tiny_dirs[checkpoint]) if checkpoint else None, num_tokens=6)
    rng = np.random.default_rng(1)
    clips = [rng.standard_normal(44100).astype(np.float32) * 0.1,  # 1 s at 44.1 kHz (resampled)
             rng.standard_normal(1000).astype(np.float32) * 0.1]  # 23 ms: fewer frames than tokens
    tokens, mask = encoder.encode(clips, 44100)
    assert tokens.shape == (2, 6, dim) and tokens.dtype == np.float16
    assert mask.shape == (2, 6) and mask.dtype == bool
    assert mask[0].all() and not mask[1].all() and mask[1, 0]
    assert np.all(tokens[1][~mask[1]] == 0)
    settings = encoder.settings()
    assert settings["name"] == name and settings["num_tokens"] == 6 and settings["dim"] == dim
    json.dumps(settings)  # goes into the cache fingerprint
    again, _ = encoder.encode(clips[:1], 44100)
    np.testing.assert_allclose(again[0].astype(np.float32), tokens[0].astype(np.float32), atol=1e-3)


def test_ast_valid_patches_follow_the_clip_length(tiny_dirs):
    from audio_gen.encoders import build_encoder

    encoder = build_encoder("ast", str(tiny_dirs["ast"]), num_tokens=4)
    assert encoder.time_patches == (200 - 8) // 8 + 1
    # 1 s at 16 kHz: 1 + (16000 - 400) // 160 = 98 frames -> patches starting at frames 0, 8, ..., 96 = 13.
    assert encoder.valid_time_patches(16000) == 13
    assert encoder.valid_time_patches(16000 * 10) == encoder.time_patches  # capped by the window


def test_logmel_tokens_follow_the_sound_over_time():
    from audio_gen.encoders import build_encoder

    encoder = build_encoder("logmel", None, num_tokens=4)
    rate = 16000
    t = np.arange(rate) / rate
    # Silence in the first half, a 2 kHz tone in the second: the energy shows up in the last two tokens only.
    clip = np.where(t >= 0.5, np.sin(2 * np.pi * 2000 * t), 0.0).astype(np.float32)
    tokens, _ = encoder.encode([clip], rate)
    energy = tokens[0].astype(np.float32).max(axis=1)
    assert energy[2] > energy[0] + 5 and energy[3] > energy[1] + 5


def test_encoder_errors():
    from audio_gen.encoders import build_encoder

    with pytest.raises(UserError, match="config key 'encoder'"):
        build_encoder("wav2vec", None, 4)
    with pytest.raises(UserError, match="num_tokens"):
        build_encoder("logmel", None, 0)
    encoder = build_encoder("logmel", None, 2)
    with pytest.raises(UserError, match="waveform 0: expected a non-empty mono"):
        encoder.encode([np.zeros((2, 100), np.float32)], 16000)


# ------------------------------------------------------------------------------------------- validation script

def test_compare_latent_modes_script_runs_and_reports(tiny_home, tmp_path):
    spans = tmp_path / "spans.txt"
    spans.write_text("dog barking\na bell ringing\n")
    out = tmp_path / "report.json"
    result = subprocess.run(
        [sys.executable, "scripts/compare_latent_modes.py", "--tiny", "--spans", str(spans), "--candidates", "2",
         "--steps", "2", "--out", str(out), "--save-audio", str(tmp_path / "wavs")],
        cwd=pathlib.Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300,
        env={**os.environ, "ITH_JAX_CACHE": str(tiny_home), "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    assert report["prompts"] == 2
    assert report["modes"]["full"]["latent_frames"] == FULL_FRAMES
    assert report["modes"]["short"]["latent_frames"] == math.ceil(SAMPLE_RATE / HOP) + 1
    low, high = report["short_minus_full"]["best_of_k"]["ci95"]
    assert low <= report["short_minus_full"]["best_of_k"]["mean"] <= high
    assert report["verdict"] in ("not worse", "worse", "inconclusive")
    assert len(list((tmp_path / "wavs").glob("*.wav"))) == 2 * 2 * 2  # prompts x modes x candidates
    assert "short - full, best-of-K" in result.stdout


def test_verdict_and_bootstrap():
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "scripts"))
    import compare_latent_modes as cmp

    assert cmp.verdict((-0.01, 0.03), 0.02) == "not worse"
    assert cmp.verdict((-0.2, -0.05), 0.02) == "worse"
    assert cmp.verdict((-0.05, 0.01), 0.02) == "inconclusive"
    low, high = cmp.bootstrap_interval(np.full(50, 0.1))
    assert low == pytest.approx(0.1) and high == pytest.approx(0.1)
    low, high = cmp.bootstrap_interval(np.random.default_rng(0).normal(0.0, 1.0, 400))
    assert -0.2 < low < 0 < high < 0.2
