"""``ith_jax.load(workdir).predict`` and ``python -m ith_jax.predict`` on tiny workdirs trained by the real CLI
(tests/api_fixtures.py): answers equal to what ``evaluate --predictions`` wrote for the same rows, span workdirs
detecting what ``ith_jax.detect`` writes, missing prompts named, and ``imagine=True`` filling the cache through
``audio_gen.build_cache``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import ith_jax
from ith_common.errors import UserError
from ith_common.manifest import read_manifest
from ith_jax import predict
from ith_jax.data import auditorybench
from tests.api_fixtures import read_jsonl, shared_workdirs
from tests.trainer_utils import DATA_DIR, REPO, run

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

TONE_CACHE = "configs/gen.py:tiny,tone --config.encoder=logmel --config.clap_scoring=false --config.num_candidates=2"
SENTENCE = "A cow's moo has a [MASK] pitch than a bird's chirp."


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return shared_workdirs(tmp_path_factory)


@pytest.fixture(scope="module")
def dev(dirs):
    examples, _ = auditorybench.load_examples(str(dirs["data"]), "pitch")
    return examples


def _same_prediction(got: dict, expected: dict) -> None:
    assert got["prediction"] == expected["prediction"]
    assert got["probability"] == pytest.approx(expected["probability"], abs=1e-6)
    assert [a["answer"] for a in got["alternatives"]] == [a["answer"] for a in expected["alternatives"]]
    assert got["tokens"] == expected["tokens"]


def test_text_predictor_matches_evaluate_predictions(dirs, dev):
    predictor = ith_jax.load(dirs["text"])
    assert (predictor.kind, predictor.step) == ("text", 2)
    expected = read_jsonl(dirs["text_predictions"])
    with_answers = predictor.predict([e.sentence for e in dev], answers=[e.answer for e in dev])
    without = predictor.predict([e.sentence for e in dev])
    for got, blind, want in zip(with_answers, without, expected):
        _same_prediction(got, want)
        _same_prediction(blind, want)  # the stand-in label changes nothing the model sees
        assert got["correct"] == want["correct"] and got["answer"] == want["answer"]
        assert blind["answer"] is None and blind["correct"] is None
        assert got["spans"] == [] and got["gate"] is None and got["file"] == "<predict>"

    with pytest.raises(UserError, match=r"sentence 2 .*expected exactly one \[MASK\]"):
        predictor.predict([SENTENCE, "No mask here."])
    with pytest.raises(UserError, match="span_workdir, cache_dir and imagine apply to ITH workdirs only"):
        ith_jax.load(dirs["text"], span_workdir=dirs["span"])


def test_animal_sentences_with_and_without_the_answer(dirs):
    predictor = ith_jax.load(dirs["text"])
    sentence = "A [MASK] makes a sound like barking."
    given = predictor.predict([sentence], task="animal", answers=["hummingbird"])[0]
    pieces = predictor.tokenizer.encode("hummingbird", add_special_tokens=False).tokens
    assert len(pieces) > 1 and given["tokens"].count("[MASK]") == len(pieces)  # as evaluation expands it
    assert given["correct"] == (given["prediction"] == "hummingbird")
    blind = predictor.predict([sentence], task="animal")[0]
    assert blind["answer"] is None and 1 <= blind["tokens"].count("[MASK]") <= 3
    assert blind["alternatives"][0]["answer"] == blind["prediction"]
    assert len({a["answer"] for a in blind["alternatives"]}) == len(blind["alternatives"]) == 5


def test_ith_predictor_with_given_spans_matches_evaluate_predictions(dirs, dev):
    predictor = ith_jax.load(dirs["ith"])
    assert predictor.kind == "ith"
    manifest = {r["row"]: r for r in read_manifest(dirs["manifest"])}
    spans = [[s["text"] for s in manifest[e.row]["spans"]] for e in dev]
    records = predictor.predict([e.sentence for e in dev], answers=[e.answer for e in dev], spans=spans)
    for got, want in zip(records, read_jsonl(dirs["ith_predictions"])):
        _same_prediction(got, want)
        assert got["spans"] == want["spans"]
        assert got["gate"] == pytest.approx(want["gate"], abs=2e-6)
    with pytest.raises(UserError, match="load it with span_workdir="):
        predictor.predict([SENTENCE])


def test_span_workdir_detects_what_the_detect_cli_writes(dirs, dev, tmp_path):
    out = tmp_path / "detected.jsonl"
    result = run([sys.executable, "-m", "ith_jax.detect", "--workdir", str(dirs["span"]), "--data", str(dirs["data"]),
                  "--out", str(out), "--no_progress"])
    assert result.returncode == 0, result.stderr[-3000:]
    detector = ith_jax.load(dirs["span"])
    assert detector.kind == "span"
    found = detector.predict([e.sentence for e in dev])
    assert [r["spans"] for r in found] == [r["spans"] for r in read_manifest(out)]



def test_missing_prompts_are_named_and_imagine_generates_them(dirs, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(dirs["cache"], cache)
    spans = [["A cow's moo", "a bird's chirp"]]
    strict = ith_jax.load(dirs["ith"], cache_dir=str(cache))
    with pytest.raises(UserError) as error:
        strict.predict([SENTENCE], spans=spans)
    message = str(error.value)
    assert "2 prompt(s) not in the audio cache" in message
    assert "\"A cow's moo sound\"" in message and "\"a bird's chirp sound\"" in message
    with pytest.raises(UserError, match="imagine=True needs gen_config"):
        ith_jax.load(dirs["ith"], cache_dir=str(cache), imagine=True)

    # Spans from the span workdir (a 2-step detector: whatever it finds), their audio imagined into the cache.
    detected = [s["text"] for s in ith_jax.load(dirs["span"]).predict([SENTENCE])[0]["spans"]]
    assert detected  # the tiny detector finds some spans in this sentence
    dreamer = ith_jax.load(dirs["ith"], span_workdir=dirs["span"], cache_dir=str(cache), imagine=True,
                           gen_config=TONE_CACHE)
    record = dreamer.predict([SENTENCE])[0]
    assert [s["text"] for s in record["spans"]] == detected
    assert [s["has_audio"] for s in record["spans"]] == [True] * min(len(detected), 2) + [False] * (len(detected) - 2)
    assert all(s["cache_key"] for s in record["spans"])
    # Now in the cache: without imagine the same spans get the same audio and answer.
    again = strict.predict([SENTENCE], spans=[detected])[0]
    assert again["spans"] == record["spans"] and again["probability"] == pytest.approx(record["probability"])
    assert again["gate"] == record["gate"]


def test_predict_cli_prints_and_writes_json(dirs, capsys):
    machine = run([sys.executable, "-m", "ith_jax.predict", "--workdir", str(dirs["text"]), "--json", SENTENCE])
    assert machine.returncode == 0, machine.stderr[-3000:]
    record = json.loads(machine.stdout)[0]
    assert record["sentence"] == SENTENCE and record["prediction"] in ("lower", "higher")
    assert record == ith_jax.load(dirs["text"]).predict([SENTENCE])[0]
    assert predict.main(["--workdir", str(dirs["text"]), SENTENCE]) == 0  # the human-readable form, in-process
    assert f"-> {record['prediction']} ({record['probability']:.3f})" in capsys.readouterr().out

    bad = run([sys.executable, "-m", "ith_jax.predict", "--workdir", str(dirs["text"]), "no mask"])
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines()[-1] == "error: sentence 1 ('no mask'): expected exactly one [MASK]"


def test_importing_ith_jax_stays_cheap():
    code = ("import sys, ith_jax; assert callable(ith_jax.load); "
            "print(sorted(m for m in ('jax', 'flax') if m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
