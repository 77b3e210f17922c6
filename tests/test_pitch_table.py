"""The oracle pitch table: a Bradley-Terry fit that must recover a known pitch order from labelled comparisons."""

from __future__ import annotations

import csv
import itertools
import json
import subprocess
import sys

import numpy as np
import pytest

from audio_gen import pitch_table
from audio_gen.generators.tone import MAX_HZ, MIN_HZ
from ith_common.errors import UserError
from ith_common.prompts import build_prompt

# A hidden ground truth: sources from low to high pitch.
SOURCES = ["a tuba", "a cello  drone", "a man talking", "a violin", "a bird chirping", "a dog whistle"]


def _write_pitch_csv(path, rows):
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["sentence", "answer", "span1", "span2"])
        writer.writerows(rows)


def _comparisons(pairs):
    rows = []
    for low, high in pairs:
        first, second = (SOURCES[high], SOURCES[low]) if (low + high) % 2 else (SOURCES[low], SOURCES[high])
        answer = "higher" if first == SOURCES[high] else "lower"
        rows.append([f"The sound of {first} has a [MASK] pitch than {second}.", answer, first, second])
    return rows


def test_recovers_the_hidden_order_from_a_chain_of_comparisons(tmp_path):
    # Only neighbours are compared (plus one long pair), so the order must come from transitivity, not counts.
    pairs = [(i, i + 1) for i in range(len(SOURCES) - 1)] + [(0, 5)]
    path = tmp_path / "pitch.csv"
    _write_pitch_csv(path, _comparisons(pairs) + [["no span here [MASK]", "higher", "", "x"]])
    table = pitch_table.build_table([str(path)])
    hz = [table["frequencies"][build_prompt(source)] for source in SOURCES]
    assert hz == sorted(hz) and len(set(hz)) == len(hz), hz
    assert MIN_HZ == pytest.approx(hz[0]) and MAX_HZ == pytest.approx(hz[-1])
    assert table["_skipped_rows"] == 1 and table["_comparisons"] == len(pairs)
    assert table["_agreement"] == 1.0
    assert "ORACLE" in table["_note"]
    # Keys are the shared prompt builder's prompts: whitespace in a span is normalised.
    assert "a cello drone sound" in table["frequencies"]


def test_fit_matches_a_direct_maximum_likelihood_check():
    # At the optimum the gradient of the penalised log-likelihood is zero: check it independently of the fit.
    winners, losers = zip(*[(j, i) for i, j in itertools.combinations(range(4), 2)] + [(0, 3)])
    winners, losers = np.array(winners), np.array(losers)
    s = pitch_table.fit_bradley_terry(4, winners, losers, l2=0.1)
    p_win = 1.0 / (1.0 + np.exp(-(s[winners] - s[losers])))
    grad = 0.1 * s
    np.add.at(grad, winners, -(1 - p_win))
    np.add.at(grad, losers, 1 - p_win)
    assert np.abs(grad).max() < 1e-5
    assert abs(s.mean()) < 1e-9


def test_bad_answer_names_file_row_and_field(tmp_path):
    path = tmp_path / "pitch.csv"
    _write_pitch_csv(path, _comparisons([(0, 1)]) + [["x [MASK] y", "louder", "a", "b"]])
    with pytest.raises(UserError, match=r"pitch\.csv: row 2: field 'answer': expected higher or lower"):
        pitch_table.build_table([str(path)])


def test_command_line_writes_the_table_and_refuses_unlabelled_files(tmp_path):
    good, bad, out = tmp_path / "pitch.csv", tmp_path / "animal.csv", tmp_path / "table.json"
    _write_pitch_csv(good, _comparisons([(0, 1), (1, 2)]))
    bad.write_text("sentence,animal\nA [MASK] barks.,dog\n", encoding="utf-8")
    ok = subprocess.run([sys.executable, "-m", "audio_gen.pitch_table", "--data", str(good), "--out", str(out)],
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "ORACLE" in ok.stdout and json.loads(out.read_text())["_comparisons"] == 2
    refused = subprocess.run([sys.executable, "-m", "audio_gen.pitch_table", "--data", str(bad), "--out",
                              str(tmp_path / "other.json")], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [
        f"error: {bad}: missing column(s) span1, span2, answer; expected a labelled pitch file "
        "(columns sentence, answer, span1, span2)"]
    assert not (tmp_path / "other.json").exists()


def dominant_frequency(clip, rate):
    spectrum = np.abs(np.fft.rfft(clip * np.hanning(len(clip))))
    return np.fft.rfftfreq(len(clip), 1.0 / rate)[np.argmax(spectrum)]


def test_the_tone_generator_renders_the_table_it_writes(tmp_path):
    from audio_gen.generators.tone import ToneGenerator, load_frequencies

    path, out = tmp_path / "pitch.csv", tmp_path / "table.json"
    _write_pitch_csv(path, _comparisons([(i, i + 1) for i in range(len(SOURCES) - 1)]))
    assert pitch_table.main(["--data", str(path), "--out", str(out)]) == 0
    written = json.loads(out.read_text(encoding="utf-8"))
    # The "_" metadata is not a prompt; the table's frequencies are exactly what the generator uses.
    assert load_frequencies(str(out)) == written["frequencies"]
    generator = ToneGenerator(sample_rate=16000, audio_seconds=0.5, frequencies_file=str(out))
    prompts = [build_prompt(source) for source in SOURCES]
    clips = generator.generate(prompts, list(range(len(prompts))), 2)
    heard = [dominant_frequency(clip[0], 16000) for clip in clips]
    for hz, prompt in zip(heard, prompts):
        assert abs(hz - written["frequencies"][prompt]) <= 0.03 * hz + 4, (prompt, hz)
    assert heard == sorted(heard)  # the tones keep the labelled order: the oracle carries the answers


@pytest.mark.parametrize("content, message", [
    ({"_note": "x", "frequencies": {"a sound": "high"}}, "field 'frequencies.a sound': expected a frequency"),
    ({"_note": "x", "frequencies": {"a sound": 440}, "extra": 1}, "field 'extra': a pitch table has only"),
    ({"_note": "ORACLE", "a sound": 0}, "field 'a sound': expected a frequency"),
])
def test_pitch_table_format_errors_name_the_field(tmp_path, content, message):
    from audio_gen.generators.tone import load_frequencies

    table = tmp_path / "table.json"
    table.write_text(json.dumps(content), encoding="utf-8")
    with pytest.raises(UserError, match=message):
        load_frequencies(str(table))


def test_flat_tables_still_load_and_skip_metadata_keys(tmp_path):
    from audio_gen.generators.tone import load_frequencies

    table = tmp_path / "flat.json"
    # A prompt that happens to be called "frequencies" (a number, not an object) is a prompt.
    table.write_text(json.dumps({"_note": "hand-made", "a sound": 440, "frequencies": 220.5}))
    assert load_frequencies(str(table)) == {"a sound": 440.0, "frequencies": 220.5}
