"""``python -m ith_jax.evaluate --predictions OUT.jsonl``: the shared per-example format (docs/api.md), written by
the real CLI for tiny text-only and ITH workdirs (tests/api_fixtures.py) and checked against the metrics the same
run reported, the span manifest and the audio cache."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from ith_common.cache import CacheReader
from ith_common.manifest import read_manifest
from ith_jax import evaluate
from tests.api_fixtures import evaluate_command, read_jsonl, shared_workdirs
from tests.trainer_utils import DATA_DIR, run

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

KEYS = ["schema_version", "id", "file", "row", "task", "workdir", "step", "kind", "sentence", "answer", "prediction",
        "correct", "probability", "alternatives", "gold_spans", "spans", "tokens", "gate"]
SPAN_KEYS = ["text", "start", "end", "prompt", "has_audio", "cache_key", "candidate", "clap_scores"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return shared_workdirs(tmp_path_factory)


def test_text_records_agree_with_the_file_and_the_metrics(dirs):
    records = read_jsonl(dirs["text_predictions"])
    metrics = json.loads(dirs["text_json"].read_text())["results"][str(dirs["data"])]
    lines = dirs["data"].read_text().splitlines()[1:]
    assert len(records) == metrics["num_examples"] == len(lines) == 24
    assert [r["row"] for r in records] == list(range(1, 25))  # file order
    assert sum(r["correct"] for r in records) / len(records) == pytest.approx(metrics["accuracy"], abs=1e-12)
    for record in records:
        assert list(record) == KEYS
        assert record["id"] == f"pitch/small.csv:{record['row']}" and record["file"] == str(dirs["data"])
        assert (record["kind"], record["step"], record["workdir"]) == ("text", 2, str(dirs["text"]))
        assert record["answer"] in ("lower", "higher") and record["answer"] in lines[record["row"] - 1]
        assert record["correct"] == (record["prediction"] == record["answer"])
        alternatives = record["alternatives"]
        assert {a["answer"] for a in alternatives} == {"lower", "higher"}
        assert alternatives[0] == {"answer": record["prediction"], "probability": record["probability"]}
        assert sum(a["probability"] for a in alternatives) == pytest.approx(1.0, abs=1e-9)
        assert record["spans"] == [] and record["gate"] is None
        assert 1 <= len(record["gold_spans"]) <= 2  # a gold span the sentence does not contain is left out
        for span in record["gold_spans"]:
            assert record["sentence"][span["start"]:span["end"]] == span["text"]
        assert record["tokens"][0] == "[CLS]" and record["tokens"][-1] == "[SEP]" and "[MASK]" in record["tokens"]


def test_ith_records_carry_spans_audio_and_the_gate(dirs):
    records = read_jsonl(dirs["ith_predictions"])
    metrics = json.loads(dirs["ith_json"].read_text())["results"][str(dirs["data"])]
    manifest = {r["row"]: r for r in read_manifest(dirs["manifest"])}
    reader = CacheReader(dirs["cache"])
    assert sum(r["correct"] for r in records) / len(records) == pytest.approx(metrics["accuracy"], abs=1e-12)
    spans_with_audio, gate_sum, gate_count = 0, 0.0, 0
    for record in records:
        assert list(record) == KEYS and record["kind"] == "ith"
        assert [(s["text"], s["start"], s["end"]) for s in record["spans"]] == [
            (s["text"], s["start"], s["end"]) for s in manifest[record["row"]]["spans"]]
        gate = np.asarray(record["gate"])
        assert len(gate) == len(record["tokens"])
        for span in record["spans"]:
            assert list(span) == SPAN_KEYS
            entry = reader.by_prompt(span["prompt"])
            assert span["prompt"] == f"{span['text']} sound" and span["cache_key"] == entry.key
            assert span["candidate"] == 0 and span["clap_scores"] == [None, None]  # unscored cache, rule "first"
            spans_with_audio += span["has_audio"]
        fused = gate > 0  # off-span tokens and [CLS]/[SEP]/[MASK] are exactly 0
        assert 0 < fused.sum() < len(gate) and not fused[0] and not fused[-1]
        assert not fused[record["tokens"].index("[MASK]")]
        gate_sum, gate_count = gate_sum + gate[fused].sum(), gate_count + fused.sum()
    reader.close()
    assert spans_with_audio == metrics["spans_with_audio"] == 47
    assert gate_sum / gate_count == pytest.approx(metrics["gate_mean"], abs=1e-5)  # the records round to 1e-6


def test_compare_writes_only_the_main_workdirs_records(dirs):
    # The fixture ran the ITH evaluation with --compare TEXT_WORKDIR (and the text-only one without).
    report = json.loads(dirs["ith_json"].read_text())
    assert report["compare"]["workdir"] == str(dirs["text"])
    records = read_jsonl(dirs["ith_predictions"])
    assert len(records) == 24 and {(r["kind"], r["workdir"]) for r in records} == {("ith", str(dirs["ith"]))}


def test_animal_rows_decode_joined_pieces(dirs, tmp_path, capsys):
    # An animal file through the (pitch-trained) text LM, in-process: multi-piece answers, top-5 alternatives.
    animal = tmp_path / "animal.csv"
    animal.write_text("".join((DATA_DIR / "animal" / "dev.csv").read_text().splitlines(keepends=True)[:13]))
    out, summary = tmp_path / "animal.jsonl", tmp_path / "animal.json"
    assert evaluate.main(["--workdir", str(dirs["text"]), "--data", str(animal), "--task", "animal",
                          "--predictions", str(out), "--json", str(summary)]) == 0
    assert f"wrote 12 per-example records to {out}" in capsys.readouterr().out
    records = read_jsonl(out)
    accuracy = json.loads(summary.read_text())["results"][str(animal)]["accuracy"]
    assert sum(r["correct"] for r in records) / len(records) == pytest.approx(accuracy, abs=1e-12)
    for record in records:
        assert record["task"] == "animal" and record["tokens"].count("[MASK]") >= 1
        probabilities = [a["probability"] for a in record["alternatives"]]
        assert len(probabilities) == 5 and probabilities == sorted(probabilities, reverse=True)
        assert record["alternatives"][0]["answer"] == record["prediction"]
        assert math.isclose(record["probability"], probabilities[0], rel_tol=1e-6)


def test_bad_output_paths_fail_before_any_work(dirs, tmp_path):
    missing_dir = tmp_path / "no" / "such" / "dir" / "out.jsonl"
    result = run(evaluate_command("--workdir", dirs["text"], "--data", dirs["data"], "--predictions", missing_dir))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("error: --predictions")
    assert "checkpoint step" not in result.stdout  # nothing was evaluated

    span = run(evaluate_command("--workdir", dirs["span"], "--data", dirs["data"], "--predictions",
                                tmp_path / "span.jsonl"))
    assert span.returncode == 2 and "holds a 'span' model" in span.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "span.jsonl").exists()
