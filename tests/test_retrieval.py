"""Retrieval backend: a tiny random CLAP, a folder of synthetic tones, the same cache format as generation."""

import pathlib
import subprocess
import sys

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("torch")
pytest.importorskip("transformers")

from audio_gen import tiny  # noqa: E402
from ith_common.cache import CacheError, CacheReader, verify  # noqa: E402
from audio_gen.clap import ClapScorer, resample  # noqa: E402
from audio_gen.encoders import build_encoder  # noqa: E402
from ith_common.errors import UserError  # noqa: E402
from audio_gen.generators import retrieval  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def clap_dir(tmp_path_factory):
    return tiny.ensure_tiny_checkpoint("clap_unfused", root=tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def scorer(clap_dir):
    return ClapScorer(str(clap_dir))


@pytest.fixture(scope="module")
def encoder():
    return build_encoder("logmel", None, num_tokens=4)


def write_tone(path, hertz, rate=16000, seconds=0.5, stereo=False):
    t = np.arange(int(rate * seconds)) / rate
    wave = (0.3 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)
    if stereo:
        wave = np.stack([wave, 0.5 * wave], axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), wave, rate)


@pytest.fixture()
def library_dir(tmp_path):
    folder = tmp_path / "library"
    write_tone(folder / "low.wav", 110)
    write_tone(folder / "mid.flac", 440)
    write_tone(folder / "high.wav", 1760, rate=22050)
    write_tone(folder / "birds" / "chirp.wav", 3000, stereo=True)
    write_tone(folder / "hum.wav", 60, seconds=1.2)
    write_tone(folder / "whistle.flac", 2500, rate=8000, seconds=0.3)
    (folder / "notes.txt").write_text("not audio")
    write_tone(folder / ".hidden" / "skip.wav", 100)
    return folder


class CountingScorer:
    """Delegates to a real ClapScorer and counts the audio clips it embeds (to see what is reused)."""

    def __init__(self, scorer):
        self.scorer = scorer
        self.clips_embedded = 0

    def settings(self):
        return self.scorer.settings()

    def embed_text(self, texts):
        return self.scorer.embed_text(texts)

    def embed_audio(self, waveforms, sample_rate):
        self.clips_embedded += len(waveforms)
        return self.scorer.embed_audio(waveforms, sample_rate)


def test_library_embeddings_are_cached_by_path_mtime_size_and_model(tmp_path, library_dir, scorer):
    embeddings_file = tmp_path / "emb" / "library.npz"
    counting = CountingScorer(scorer)
    library = retrieval.index_audio_folder(library_dir, counting, embeddings_file, progress=False)
    assert [f.path for f in library.files] == ["birds/chirp.wav", "high.wav", "hum.wav", "low.wav", "mid.flac",
                                               "whistle.flac"]
    assert counting.clips_embedded == 6 and embeddings_file.exists()
    np.testing.assert_allclose(np.linalg.norm(library.embeddings, axis=1), 1.0, rtol=1e-5)
    # The stored embedding of a file equals embedding it directly.
    samples, rate = retrieval.load_audio(library_dir / "high.wav")
    np.testing.assert_allclose(library.embeddings[1], scorer.embed_audio([samples], rate)[0], atol=1e-5)

    stamp = embeddings_file.stat().st_mtime_ns
    again = retrieval.index_audio_folder(library_dir, counting, embeddings_file, progress=False)
    assert counting.clips_embedded == 6 and embeddings_file.stat().st_mtime_ns == stamp  # nothing recomputed
    np.testing.assert_array_equal(again.embeddings, library.embeddings)
    assert again.digest() == library.digest()

    # One file changes, one is removed, one is added: only the changed and the new one are embedded.
    write_tone(library_dir / "low.wav", 220, seconds=0.7)
    (library_dir / "hum.wav").unlink()
    write_tone(library_dir / "new.wav", 880)
    changed = retrieval.index_audio_folder(library_dir, counting, embeddings_file, progress=False)
    assert counting.clips_embedded == 8
    assert [f.path for f in changed.files] == ["birds/chirp.wav", "high.wav", "low.wav", "mid.flac", "new.wav",
                                               "whistle.flac"]
    assert changed.digest() != library.digest()
    assert sorted(p.name for p in embeddings_file.parent.iterdir()) == ["library.npz"]  # no temp files left

    # Another CLAP model: every file is embedded again.
    class OtherModel(CountingScorer):
        def settings(self):
            return {**self.scorer.settings(), "model": {"digest": "another"}}
    other = OtherModel(scorer)
    retrieval.index_audio_folder(library_dir, other, embeddings_file, progress=False)
    assert other.clips_embedded == 6


def test_retrieve_returns_sorted_cosine_neighbours(tmp_path, library_dir, scorer):
    library = retrieval.index_audio_folder(library_dir, scorer, tmp_path / "e.npz", progress=False)
    texts = ["dog barking", "a high pitched whistle", "thunder rumbling"]
    text_embeddings = scorer.embed_text(texts)
    indices, scores = retrieval.retrieve(library, text_embeddings, top_k=4)
    assert indices.shape == scores.shape == (3, 4)
    for row in range(3):
        want = library.embeddings @ (text_embeddings[row] / np.linalg.norm(text_embeddings[row]))
        order = sorted(range(len(want)), key=lambda i: (-want[i], i))[:4]
        assert indices[row].tolist() == order
        np.testing.assert_allclose(scores[row], want[order], atol=1e-6)
        assert np.all(np.diff(scores[row]) <= 0)
    with pytest.raises(UserError, match="top_k"):
        retrieval.retrieve(library, text_embeddings, top_k=7)


def test_build_retrieval_cache_writes_the_cache_format(tmp_path, library_dir, scorer, encoder):
    cache = tmp_path / "cache"
    library = retrieval.index_audio_folder(library_dir, scorer, tmp_path / "e.npz", progress=False)
    spans = ["dog barking", "a high pitched whistle", "🐦 chirp", "../../etc/passwd"]
    summary = retrieval.build_retrieval_cache(spans, library, scorer, encoder, cache, top_k=3,
                                              store_waveforms=True, batch_size=3, progress=False)
    assert summary == {"spans": 4, "added": 4, "skipped": 0, "other_shards": 0}
    assert verify(cache).ok
    reader = CacheReader(cache)
    assert len(reader) == 4
    assert reader.fingerprint["generator"]["library_digest"] == library.digest()
    indices, scores = retrieval.retrieve(library, scorer.embed_text(spans), top_k=3)
    for span, row, row_scores in zip(spans, indices, scores):
        entry = reader.by_prompt(f"{span} sound")
        assert entry is not None and entry.metadata["query"] == span
        assert entry.metadata["files"] == [library.files[i].path for i in row]
        np.testing.assert_allclose(entry.clap_scores, row_scores, atol=1e-6)
        # Tokens are the encoder's output for the retrieved files, resampled to the encoder's rate.
        clips = []
        for i in row:
            samples, rate = retrieval.load_audio(library_dir / library.files[i].path)
            clips.append(resample(samples, rate, encoder.sample_rate))
        tokens, mask = encoder.encode(clips, encoder.sample_rate)
        np.testing.assert_array_equal(entry.tokens, tokens)
        assert entry.tokens.shape == (3, 4, encoder.dim)
        with_audio = reader.get(entry.key, waveforms=True)
        assert with_audio.sample_rate == encoder.sample_rate
        np.testing.assert_allclose(with_audio.waveforms[0, :len(clips[0])], np.clip(clips[0], -1, 1), atol=1e-6)
    # A rerun finds everything; a changed library is refused, naming the key that differs.
    again = retrieval.build_retrieval_cache(spans, library, scorer, encoder, cache, top_k=3, progress=False)
    assert again["added"] == 0 and again["skipped"] == 4
    write_tone(library_dir / "extra.wav", 500)
    bigger = retrieval.index_audio_folder(library_dir, scorer, tmp_path / "e.npz", progress=False)
    with pytest.raises(CacheError, match="generator.library_digest"):
        retrieval.build_retrieval_cache(spans, bigger, scorer, encoder, cache, top_k=3, progress=False)


def test_a_span_with_odd_whitespace_gets_the_same_prompt_and_key_as_in_generation(tmp_path, library_dir, scorer,
                                                                                     encoder):
    from audio_gen.build_cache import collect_prompts
    from ith_common.cache import entry_key
    from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE

    span_list = tmp_path / "spans.txt"
    span_list.write_text("  dog \t barking  \n", encoding="utf-8")
    items, _ = collect_prompts([str(span_list)], DEFAULT_PROMPT_TEMPLATE)
    assert [item.prompt for item in items] == ["dog barking sound"]
    spans = retrieval.collect_spans([span_list])
    assert spans == ["dog barking"]

    library = retrieval.index_audio_folder(library_dir, scorer, tmp_path / "e.npz", progress=False)
    # Odd whitespace given to the API directly is normalised too: one entry, under generation's prompt.
    summary = retrieval.build_retrieval_cache(spans + ["dog  barking "], library, scorer, encoder, tmp_path / "cache",
                                              top_k=2, progress=False)
    assert summary["added"] == 1
    with CacheReader(tmp_path / "cache") as reader:
        entry = reader.by_prompt(items[0].prompt)
        assert entry is not None and entry.metadata["query"] == "dog barking"
        # The key is entry_key(prompt, ...) of that same prompt (under retrieval's generator settings).
        assert entry.key == entry_key(items[0].prompt, retrieval.retrieval_settings(library, 2), 0,
                                      encoder.settings())


def test_bad_library_inputs(tmp_path, scorer):
    with pytest.raises(UserError, match="does not exist"):
        retrieval.index_audio_folder(tmp_path / "missing", scorer, tmp_path / "e.npz")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no audio files"):
        retrieval.index_audio_folder(tmp_path / "empty", scorer, tmp_path / "e.npz")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "bad.wav").write_bytes(b"RIFF\x00\x00not really a wav")
    with pytest.raises(UserError, match=r"bad\.wav: cannot read audio"):
        retrieval.index_audio_folder(broken, scorer, tmp_path / "e.npz", progress=False)


def test_cli(tmp_path, library_dir, clap_dir):
    spans = tmp_path / "spans.txt"
    spans.write_text("# a comment\ndog barking\ncat meowing\n\ndog barking\n", encoding="utf-8")
    command = [sys.executable, "-m", "audio_gen.generators.retrieval", "--audio_dir", str(library_dir), "--spans",
               str(spans), "--cache_dir", str(tmp_path / "cache"), "--clap_model", str(clap_dir), "--encoder",
               "logmel", "--num_tokens", "4", "--top_k", "2", "--no_progress"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "2 spans" in result.stdout and "2 added" in result.stdout
    assert (tmp_path / "cache" / "retrieval_library.npz").exists()
    assert subprocess.run([sys.executable, "-m", "audio_gen.cache", "verify", str(tmp_path / "cache"), "--quiet"],
                          capture_output=True, cwd=REPO).returncode == 0
    bad = subprocess.run(command[:4] + [str(tmp_path / "nope")] + command[5:], capture_output=True, text=True,
                         cwd=REPO)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith("error: ") and "does not exist" in bad.stderr
    # A cache_dir that is a file is refused before any model is loaded (the CLAP checkpoint here does not exist).
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    bad_cache = [*command[:8], str(blocker), "--clap_model", str(tmp_path / "no_clap"), *command[11:]]
    bad = subprocess.run(bad_cache, capture_output=True, text=True, cwd=REPO)
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.strip().splitlines() == [f"error: --cache_dir {blocker} is a file; expected a directory"]
