"""The span manifest schema: valid records pass, each broken field is named with its line number."""

import copy
import pathlib
import json
import os
import subprocess
import sys

import pytest

from ith_common import manifest
from ith_common.manifest import ManifestError, read_manifest, validate_record, write_manifest


def gold_pitch_record(row=1):
    sentence = ("The sound of a tube train typically has a [MASK] pitch than the sound of roadside ambience.")
    first, second = "sound of a tube train", "sound of roadside ambience"
    s1, s2 = sentence.index(first), sentence.index(second)
    spans = [{"text": first, "start": s1, "end": s1 + len(first), "confidence": None},
             {"text": second, "start": s2, "end": s2 + len(second), "confidence": None}]
    return {"schema_version": 1, "id": f"pitch/dev.csv:{row}", "task": "pitch",
            "source": "/work/shared/data/auditorybench/pitch/dev.csv", "row": row, "sentence": sentence,
            "spans": spans, "gold_spans": [{k: s[k] for k in ("text", "start", "end")} for s in spans],
            "detector": "gold"}


def gold_animal_record(row=2):
    # The gold span is found case-insensitively: the record holds the sentence's own casing.
    sentence = "Squeal is the sound a [MASK] makes."
    return {"schema_version": 1, "id": f"animal/dev.csv:{row}", "task": "animal",
            "source": "data/animal/dev.csv", "row": row, "sentence": sentence,
            "spans": [{"text": "Squeal", "start": 0, "end": 6, "confidence": None}],
            "gold_spans": [{"text": "Squeal", "start": 0, "end": 6, "confidence": None}],
            "detector": "gold"}


def detected_record():
    record = gold_animal_record(row=7)
    record["spans"] = [{"text": "Squeal is", "start": 0, "end": 9, "confidence": 0.87}]
    record["gold_spans"] = None
    record["detector"] = "minilm-span/runs/span@1200"
    return record


def test_valid_records_pass():
    for record in (gold_pitch_record(), gold_animal_record(), detected_record()):
        validate_record(record, line=1)
    no_spans = gold_animal_record()
    no_spans["spans"] = []  # the detector found nothing: still a valid line
    validate_record(no_spans)


def test_round_trip_and_iter_spans(tmp_path):
    records = [gold_pitch_record(1), gold_animal_record(2), detected_record()]
    path = tmp_path / "spans.jsonl"
    write_manifest(records, path)
    assert read_manifest(path) == records
    assert list(manifest.iter_spans(read_manifest(path))) == [
        ("pitch/dev.csv:1", 0, "sound of a tube train"),
        ("pitch/dev.csv:1", 1, "sound of roadside ambience"),
        ("animal/dev.csv:2", 0, "Squeal"),
        ("animal/dev.csv:7", 0, "Squeal is"),
    ]
    # No temp files left behind.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spans.jsonl"]


def test_unicode_and_blank_lines(tmp_path):
    record = gold_animal_record()
    record["sentence"] = "Le chien 🐕 fait « ouaf » [MASK]."
    record["spans"] = [{"text": "🐕 fait", "start": 9, "end": 15, "confidence": 0.5}]
    record["gold_spans"] = None
    path = tmp_path / "m.jsonl"
    path.write_text("\n" + json.dumps(record, ensure_ascii=False) + "\n\n", encoding="utf-8")
    assert read_manifest(path) == [record]


def _broken(mutate, base=gold_pitch_record):
    record = copy.deepcopy(base())
    mutate(record)
    return record


BROKEN_FIELDS = [
    # (description, mutation, field named in the message)
    ("missing id", lambda r: r.pop("id"), "'id'"),
    ("missing spans", lambda r: r.pop("spans"), "'spans'"),
    ("missing detector", lambda r: r.pop("detector"), "'detector'"),
    ("missing gold_spans", lambda r: r.pop("gold_spans"), "'gold_spans'"),
    ("missing schema_version", lambda r: r.pop("schema_version"), "'schema_version'"),
    ("schema_version 2", lambda r: r.update(schema_version=2), "'schema_version'"),
    ("schema_version as string", lambda r: r.update(schema_version="1"), "'schema_version'"),
    ("unknown key", lambda r: r.update(extra=1), "'extra'"),
    ("bad task", lambda r: r.update(task="speech"), "'task'"),
    ("row as string", lambda r: r.update(row="1"), "'row'"),
    ("row zero", lambda r: r.update(row=0, id="pitch/dev.csv:0"), "'row'"),
    ("row bool", lambda r: r.update(row=True), "'row'"),
    ("id not matching task/file:row", lambda r: r.update(id="pitch/dev.csv:99"), "'id'"),
    ("sentence not a string", lambda r: r.update(sentence=None), "'sentence'"),
    ("empty source", lambda r: r.update(source=""), "'source'"),
    ("spans not a list", lambda r: r.update(spans={"text": "x"}), "'spans'"),
    ("span not an object", lambda r: r["spans"].__setitem__(0, "sound"), "'spans[0]'"),
    ("span missing end", lambda r: r["spans"][1].pop("end"), "'spans[1].end'"),
    ("span missing confidence", lambda r: r["spans"][0].pop("confidence"), "'spans[0].confidence'"),
    ("span start float", lambda r: r["spans"][0].update(start=3.0), "'spans[0].start'"),
    ("span end before start", lambda r: r["spans"][0].update(end=r["spans"][0]["start"]), "'spans[0].end'"),
    ("span end past sentence", lambda r: r["spans"][1].update(end=10_000), "'spans[1].end'"),
    ("span text differs from sentence[start:end]",
     lambda r: r["spans"][1].update(start=r["spans"][1]["start"] + 1, end=r["spans"][1]["end"] + 1),
     "'spans[1].text'"),
    ("span text wrong case", lambda r: r["spans"][0].update(text=r["spans"][0]["text"].upper()), "'spans[0].text'"),
    ("confidence > 1", lambda r: r["spans"][0].update(confidence=1.5), "'spans[0].confidence'"),
    ("confidence string", lambda r: r["spans"][0].update(confidence="high"), "'spans[0].confidence'"),
    ("gold span with a confidence", lambda r: r["gold_spans"][0].update(confidence=0.3),
     "'gold_spans[0].confidence'"),
    ("gold span text mismatch", lambda r: r["gold_spans"][1].update(text="sound of a tram"),
     "'gold_spans[1].text'"),
    ("gold_spans not a list", lambda r: r.update(gold_spans="none"), "'gold_spans'"),
    ("empty detector", lambda r: r.update(detector=""), "'detector'"),
    ("lone surrogate", lambda r: r.update(detector="gold\ud800"), "'detector'"),
]


@pytest.mark.parametrize("description,mutate,field", BROKEN_FIELDS, ids=[b[0] for b in BROKEN_FIELDS])
def test_each_broken_field_is_named_with_its_line(description, mutate, field):
    with pytest.raises(ManifestError) as info:
        validate_record(_broken(mutate), line=12)
    message = str(info.value)
    assert message.startswith("line 12: "), message
    assert f"field {field}" in message, message
    assert "\n" not in message


def test_read_manifest_names_file_line_and_field(tmp_path):
    good = json.dumps(gold_pitch_record(1))
    bad = json.dumps(_broken(lambda r: r["spans"][0].update(end=r["spans"][0]["end"] - 1)))
    path = tmp_path / "spans.jsonl"
    path.write_text(good + "\n" + bad + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"spans\.jsonl: line 2: field 'spans\[0\]\.text'"):
        read_manifest(path)


def test_invalid_json_line(tmp_path):
    path = tmp_path / "spans.jsonl"
    path.write_text(json.dumps(gold_pitch_record(1)) + "\n" + '{"schema_version": 1, "id": \n', encoding="utf-8")
    with pytest.raises(ManifestError, match=r"spans\.jsonl: line 2: invalid JSON"):
        read_manifest(path)
    path.write_text("[1, 2]\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"line 1: expected a JSON object, got list"):
        read_manifest(path)
    path.write_bytes(b'{"a": "\xff"}\n')
    with pytest.raises(ManifestError, match=r"line 1: not valid UTF-8"):
        read_manifest(path)


def test_duplicate_id(tmp_path):
    path = tmp_path / "spans.jsonl"
    line = json.dumps(gold_pitch_record(3))
    path.write_text("\n".join([line, json.dumps(gold_animal_record()), line]) + "\n", encoding="utf-8")
    with pytest.raises(ManifestError, match=r"line 3: field 'id': duplicate id 'pitch/dev.csv:3' \(first on line 1\)"):
        read_manifest(path)
    with pytest.raises(ManifestError, match="duplicate id"):
        write_manifest([gold_pitch_record(3), gold_pitch_record(3)], tmp_path / "out.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_write_manifest_is_all_or_nothing(tmp_path):
    path = tmp_path / "spans.jsonl"
    write_manifest([gold_animal_record()], path)
    before = path.read_bytes()
    broken = _broken(lambda r: r.update(task="speech"))
    with pytest.raises(ManifestError, match=r"line 2: field 'task'"):
        write_manifest([gold_pitch_record(), broken], path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spans.jsonl"]


def test_missing_file(tmp_path):
    with pytest.raises(ManifestError, match=r"nope\.jsonl: cannot read manifest"):
        read_manifest(tmp_path / "nope.jsonl")


def test_manifest_module_imports_neither_torch_nor_jax():
    code = ("import sys, ith_common.manifest, ith_common.selection, audio_gen.cache; "
            "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'jax', 'soundfile', 'transformers')); "
            "print(bad); sys.exit(1 if bad else 0)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert result.returncode == 0, result.stdout + result.stderr


def test_gold_manifest_of_the_real_dev_splits_validates(tmp_path):
    """What `python -m ith_jax.detect --gold` writes for AuditoryBench dev reads back through the validator."""
    data = pathlib.Path(os.environ.get("ITH_DATA_DIR") or pathlib.Path(__file__).resolve().parents[2]
                        / "shared/data/auditorybench")
    files = [data / "animal" / "dev.csv", data / "pitch" / "dev.csv"]
    if not all(f.exists() for f in files):
        pytest.skip(f"AuditoryBench dev splits not found under {data} (set ITH_DATA_DIR)")
    out = tmp_path / "gold.jsonl"
    result = subprocess.run([sys.executable, "-m", "ith_jax.detect", "--gold", "--data", str(files[0]), "--data",
                             str(files[1]), "--out", str(out)], capture_output=True, text=True,
                            cwd=pathlib.Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    records = read_manifest(out)
    # dev has 592 + 1,178 rows; the README lists 3 pitch rows with an empty field, which a loader may drop.
    assert 592 + 1178 - 3 <= len(records) <= 592 + 1178
    assert {r["detector"] for r in records} == {"gold"}
    # Every span the README does not list as "not found in sentence" (51 animal, 18 pitch) is there.
    assert len(list(manifest.iter_spans(records))) >= (592 - 51) + 2 * (1178 - 3) - 18
    for record in records:
        assert all(s["confidence"] is None for s in record["spans"])
        assert [{k: s[k] for k in ("text", "start", "end")} for s in record["spans"]] == record["gold_spans"]
