"""`ith_jax.data.synthetic`: the AuditoryBench-format synthetic sample -- its columns (those of the real files), the
loader's verdict (no defect), determinism, the SYNTHETIC marker, that its answers are learnable from train, and
the refusal to overwrite real data."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from collections import Counter, defaultdict

import pytest

from ith_common.errors import UserError
from ith_jax.data.auditorybench import load_examples
from ith_jax.data.synthetic import (LABEL, PITCH_SOURCES, is_synthetic, synthetic_marker,
                                    write_synthetic_auditorybench)
from tests.synthetic_data import FILES
from tests.trainer_utils import REPO, run, train_command

ROWS = 150


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    return write_synthetic_auditorybench(tmp_path_factory.mktemp("synthetic") / "bench", rows_per_split=ROWS, seed=0)


def header_of(path):
    with open(path, newline="", encoding="utf-8") as f:
        return next(csv.reader(f))


def test_columns_are_those_of_the_real_files(sample, data_dir):
    for name in FILES:
        assert header_of(sample / name) == header_of(data_dir / name), name


def test_the_loader_reads_every_row_with_no_defect(sample):
    for name in FILES:
        examples, report = load_examples(sample / name, strict=True)  # strict: any defect would raise
        assert report.task == name.split("/")[0]
        assert (report.rows_read, report.rows_kept, report.rows_dropped) == (ROWS, ROWS, 0)
        assert all(report.count(kind) == 0 for kind in report.defects), report.summary()
        if report.task == "animal":
            assert all(e.options[e.option_answer_index] == e.answer for e in examples)


def test_same_seed_same_bytes_other_seed_other_rows(sample, tmp_path):
    again = write_synthetic_auditorybench(tmp_path / "again", rows_per_split=ROWS, seed=0)
    other = write_synthetic_auditorybench(tmp_path / "other", rows_per_split=ROWS, seed=1)
    for name in FILES:
        assert (again / name).read_bytes() == (sample / name).read_bytes()
        assert (other / name).read_bytes() != (sample / name).read_bytes()
    # Seeded by a string: the same in a fresh interpreter with another hash seed.
    script = ("import sys; from ith_jax.data.synthetic import write_synthetic_auditorybench as w; "
              f"w(sys.argv[1], rows_per_split={ROWS}, seed=0)")
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "fresh")], cwd=REPO, check=True,
                   env={"PYTHONHASHSEED": "123", "PATH": ""})
    assert all((tmp_path / "fresh" / n).read_bytes() == (sample / n).read_bytes() for n in FILES)


def test_marked_synthetic_wherever_it_is_looked_at(sample, tmp_path):
    marker = json.loads((sample / "SYNTHETIC").read_text())
    assert marker["synthetic"] is True and marker["label"] == LABEL == "synthetic sample"
    assert (marker["seed"], marker["rows_per_split"], marker["files"]) == (0, ROWS, list(FILES))
    assert "not AuditoryBench" in (sample / "SYNTHETIC.md").read_text()
    assert is_synthetic(sample) and synthetic_marker(sample / "pitch") is None
    assert all(synthetic_marker(sample / name) == sample / "SYNTHETIC" for name in FILES)
    # A copy of the files without the marker (real data's layout) is not synthetic.
    for name in FILES:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes((sample / name).read_bytes())
    assert not is_synthetic(tmp_path) and not any(is_synthetic(tmp_path / name) for name in FILES)


def test_pitch_answers_follow_one_order_that_train_alone_recovers(sample):
    rank = {source: i for i, source in enumerate(PITCH_SOURCES)}
    train, _ = load_examples(sample / "pitch/train.csv")
    dev, _ = load_examples(sample / "pitch/dev.csv")
    for example in train + dev:
        a, b = example.spans
        assert example.answer == ("higher" if rank[a] > rank[b] else "lower"), example.where
    # Learnable: a source's score is how often train calls it the higher one; it ranks dev pairs almost right.
    wins, games = Counter(), Counter()
    for example in train:
        a, b = example.spans
        winner = a if example.answer == "higher" else b
        wins[winner] += 1
        games[a] += 1
        games[b] += 1
    score = {s: wins[s] / games[s] if games[s] else 0.5 for s in PITCH_SOURCES}
    correct = [(score[e.spans[0]] > score[e.spans[1]]) == (e.answer == "higher") for e in dev]
    assert sum(correct) / len(correct) >= 0.85
    assert 0.3 < sum(e.answer == "higher" for e in dev) / len(dev) < 0.7  # no majority-class shortcut


def test_each_animal_description_names_one_animal_and_dev_is_answerable_from_train(sample):
    train, _ = load_examples(sample / "animal/train.csv")
    dev, _ = load_examples(sample / "animal/dev.csv")
    animals_of = defaultdict(set)
    for example in train + dev:
        animals_of[example.spans[0]].add(example.answer)
    assert all(len(animals) == 1 for animals in animals_of.values())
    seen = {e.spans[0]: e.answer for e in train}
    answerable = [seen.get(e.spans[0]) == e.answer for e in dev]
    assert sum(answerable) / len(answerable) >= 0.9


def test_refuses_to_overwrite_real_data_and_rewrites_its_own(sample, tmp_path):
    real = tmp_path / "real"
    (real / "pitch").mkdir(parents=True)
    (real / "pitch/dev.csv").write_text("real rows\n")
    with pytest.raises(UserError, match=r"holds pitch/dev\.csv but no SYNTHETIC marker.*refusing to overwrite"):
        write_synthetic_auditorybench(real, rows_per_split=5)
    assert (real / "pitch/dev.csv").read_text() == "real rows\n" and not (real / "SYNTHETIC").exists()
    write_synthetic_auditorybench(sample, rows_per_split=ROWS, seed=0)  # its own earlier sample: allowed


def test_cli_writes_the_sample_and_rejects_bad_sizes(tmp_path):
    command = [sys.executable, "-m", "ith_jax.data.synthetic", "--out", str(tmp_path / "s"), "--rows-per-split", "7"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "synthetic sample written (7 rows per file, seed 0)" in result.stdout
    assert all(len((tmp_path / "s" / n).read_text().splitlines()) == 8 for n in FILES)
    command[-1] = "0"
    command[4] = str(tmp_path / "t")
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip() == "error: rows_per_split: expected an integer >= 1, got 0"
    assert not (tmp_path / "t").exists()


def test_the_tiny_trainer_runs_on_the_sample(sample, tmp_path):
    """The offline demo's path: configs/lm.py:tiny trains and evaluates on the synthetic directory."""
    result = run(train_command(tmp_path / "work", f"--config.data_dir={sample}"), timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "work" / "eval_results.json").is_file()
