"""The span detector: training smoke test, `ith_jax.detect` manifests (model and --gold), any device count."""

from __future__ import annotations

import json

import pytest

from ith_common import manifest as manifest_lib
from ith_jax.data import auditorybench
from tests.trainer_utils import DATA_DIR, run, train_command

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")


@pytest.fixture(scope="module")
def span_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("span") / "run"
    result = run(train_command(workdir, config="configs/span.py:tiny"))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_span_training_reports_token_and_span_metrics_per_task(span_workdir):
    workdir, result = span_workdir
    report = json.loads((workdir / "eval_results.json").read_text())
    assert len(report["results"]) == 2  # animal dev and pitch dev, separately
    for metrics in report["results"].values():
        for key in ("token_precision", "token_recall", "token_f1", "span_precision", "span_recall", "span_f1"):
            assert 0.0 <= metrics[key] <= 1.0, key
    assert "token_f1" in result.stdout


def _detect(workdir, out, devices, *data):
    command = ["python", "-m", "ith_jax.detect", "--workdir", str(workdir), "--out", str(out), "--no_progress"]
    for path in data:
        command += ["--data", str(path)]
    return run(command, devices=devices)


def test_detect_writes_a_valid_manifest_and_agrees_across_device_counts(span_workdir, tmp_path):
    workdir, _ = span_workdir
    pitch_dev = DATA_DIR / "pitch" / "dev.csv"
    one, eight = tmp_path / "one.jsonl", tmp_path / "eight.jsonl"
    r1 = _detect(workdir, one, 1, pitch_dev)
    r8 = _detect(workdir, eight, 8, pitch_dev)
    assert r1.returncode == 0, r1.stderr[-3000:]
    assert r8.returncode == 0, r8.stderr[-3000:]
    records = manifest_lib.read_manifest(one)  # the sidecar's own validator accepts it
    examples, _ = auditorybench.load_examples(pitch_dev)
    assert [r["row"] for r in records] == [e.row for e in examples]
    for record in records:
        for span in record["spans"]:
            assert record["sentence"][span["start"]:span["end"]] == span["text"]
            assert 0.0 <= span["confidence"] <= 1.0
        assert record["gold_spans"] is not None
    # 8 devices split every batch 8 ways: the same spans, confidences equal to float32 rounding (1e-5).
    records8 = manifest_lib.read_manifest(eight)
    assert len(records8) == len(records)
    for a, b in zip(records, records8):
        assert [(s["start"], s["end"]) for s in a["spans"]] == [(s["start"], s["end"]) for s in b["spans"]]
        for sa, sb in zip(a["spans"], b["spans"]):
            assert sa["confidence"] == pytest.approx(sb["confidence"], abs=1e-5)


def test_gold_manifest_holds_every_located_gold_span(tmp_path):
    out = tmp_path / "gold.jsonl"
    files = [DATA_DIR / "pitch" / "dev.csv", DATA_DIR / "animal" / "dev.csv"]
    result = run(["python", "-m", "ith_jax.detect", "--gold", "--out", str(out)]
                 + [arg for f in files for arg in ("--data", str(f))])
    assert result.returncode == 0, result.stderr
    records = manifest_lib.read_manifest(out)
    ids = [r["id"] for r in records]
    assert len(ids) == len(set(ids))
    for path in files:
        examples, report = auditorybench.load_examples(path)
        mine = [r for r in records if r["source"] == str(path)]
        assert len(mine) == len(examples)
        # Spans the loader could not locate are the ones missing from the manifest, no more, no less.
        expected_spans = sum(len(e.spans) for e in examples) - len(report.rows("span_not_found", str(path)))
        located = sum(len(r["spans"]) for r in mine)
        assert located >= expected_spans  # a row with two spans, one not found, still carries the other
        assert located <= sum(len(e.spans) for e in examples)
        for record in mine:
            assert record["detector"] == "gold"
            assert record["spans"] == [dict(g, confidence=None) for g in record["gold_spans"]]


def test_detect_refuses_a_language_model_workdir_and_bad_arguments(tmp_path):
    workdir = tmp_path / "lm"
    assert run(train_command(workdir)).returncode == 0
    result = _detect(workdir, tmp_path / "out.jsonl", 1, DATA_DIR / "pitch" / "dev.csv")
    assert result.returncode == 2 and "span detector" in result.stderr
    assert not (tmp_path / "out.jsonl").exists()
    neither = run(["python", "-m", "ith_jax.detect", "--data", "x.csv", "--out", str(tmp_path / "o.jsonl")])
    assert neither.returncode == 2 and "exactly one of" in neither.stderr


def test_gold_logs_the_rows_it_drops(tmp_path):
    source = tmp_path / "pitch_dev_subset.csv"
    lines = (DATA_DIR / "pitch" / "dev.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    assert "[MASK]" in lines[2]
    lines[2] = lines[2].replace("[MASK]", "something", 1)  # data row 2 loses its [MASK]
    source.write_text("".join(lines[:11]), encoding="utf-8")
    out = tmp_path / "gold.jsonl"
    result = run(["python", "-m", "ith_jax.detect", "--gold", "--data", str(source), "--out", str(out)])
    assert result.returncode == 0, result.stderr
    assert "kept 9, dropped 1" in result.stderr and "without exactly one [MASK]: 1 (rows 2)" in result.stderr
    assert [r["row"] for r in manifest_lib.read_manifest(out)] == [1, 3, 4, 5, 6, 7, 8, 9, 10]


@pytest.mark.parametrize("arguments, expected", [
    (("--gold", "--batch_size", "0"), "--batch_size 0: expected a positive integer"),
    (("--gold", "--out", "."), "--out . is a directory"),
    (("--gold", "--out", "/no/such/dir/spans.jsonl"), "directory /no/such/dir does not exist"),
])
def test_bad_detect_arguments_are_one_line_before_any_work(tmp_path, arguments, expected):
    command = ["python", "-m", "ith_jax.detect", "--data", str(DATA_DIR / "pitch" / "dev.csv")]
    if "--out" not in arguments:
        command += ["--out", str(tmp_path / "spans.jsonl")]
    result = run(command + list(arguments))
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], lines
    assert not (tmp_path / "spans.jsonl").exists()
