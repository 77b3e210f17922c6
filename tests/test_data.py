"""AuditoryBench loading and validation, on the synthetic files, the real ones (when present) and hand-written CSVs."""

import csv
from pathlib import Path

import pytest

from ith_common.errors import UserError
from ith_jax.data.auditorybench import Example, find_span, find_spans, load_examples, load_many

from tests.synthetic_data import FILES, README_DEFECTS


def write_csv(path: Path, header, rows, encoding="utf-8") -> Path:
    with open(path, "w", newline="", encoding=encoding) as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


PITCH_HEADER = ["sentence", "answer", "span1", "span2"]
PITCH_ROW = ["The sound of rain has a [MASK] pitch than the sound of thunder.", "higher", "sound of rain", "sound of thunder"]
ANIMAL_HEADER = ["animal", "description", "sentence", "A", "B", "C", "D", "Answer"]
ANIMAL_ROW = ["dog", "barking", "A [MASK] is barking.", "cat", "dog", "cow", "owl", "B"]


# ------------------------------------------------------------------------------------------------------
# Files against their README: the synthetic files always, the real ones when present
# ------------------------------------------------------------------------------------------------------


def readme_tables(bench_dir):
    """Row counts and the defect table, parsed from the data README (the reference we check against)."""
    readme = bench_dir / "README.md"
    if not readme.is_file():
        pytest.skip(f"{readme} not found: the defect table to check against is missing")
    rows, defects = {}, {}
    for line in readme.read_text(encoding="utf-8").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in FILES:
            rows[cells[0]] = int(cells[2].replace(",", ""))
        if len(cells) == 5 and cells[0] in FILES:
            defects[cells[0]] = [None if c == "-" else int(c) for c in cells[1:]]
    assert set(rows) == set(defects) == set(FILES), "README tables not parsed"
    return rows, defects


@pytest.mark.parametrize("name", FILES)
def test_defect_counts_match_readme(bench_dir, name):
    rows, defects = readme_tables(bench_dir)
    mask_count, empty, not_found, mismatch = defects[name]
    examples, report = load_examples(bench_dir / name)
    assert report.rows_read == rows[name]
    assert report.task == name.split("/")[0]
    assert report.count("mask_count") == mask_count
    assert report.count("empty_field") == empty
    assert report.count("span_not_found") == not_found
    assert report.count("answer_mismatch") == (mismatch or 0)
    # Dropped: wrong mask count and empty required fields (disjoint in these files); span rows are kept.
    assert report.rows_dropped == mask_count + empty
    assert len(examples) == report.rows_kept == rows[name] - mask_count - empty
    assert all(e.sentence.count("[MASK]") == 1 for e in examples)
    summary = report.summary()
    assert "\n" not in summary and str(rows[name]) in summary


@pytest.mark.parametrize("name", FILES)
def test_synthetic_defects_at_the_planted_rows_and_fields_by_name(synthetic_splits, name):
    """The loader against the generator's own account: which rows have which defect, and every kept
    example's fields equal to what was written (columns found by name, whatever their order)."""
    root, splits = synthetic_splits
    split = splits[name]
    examples, report = load_examples(root / name)
    for kind in README_DEFECTS:
        assert report.rows(kind) == split.defects[kind], kind
    assert report.rows("field_count") == [] and [row for _, row in report.dropped] == split.dropped
    kept = [row for row in range(1, len(split.rows) + 1) if row not in split.dropped]
    assert [e.row for e in examples] == kept
    for example in examples:
        written = dict(zip(split.header, (cell.strip() for cell in split.rows[example.row - 1])))
        assert example.sentence == written["sentence"] and example.source == str(root / name)
        if split.task == "pitch":
            assert example.answer == written["answer"].lower()
            assert example.spans == (written["span1"], written["span2"]) and example.options is None
        else:
            assert example.answer == written["animal"] and example.spans == (written[split.column("span")],)
            assert example.options == tuple(written[c] for c in "ABCD")
            assert example.option_answer == written["Answer"].upper()


def test_row_numbers_point_at_the_defective_records(bench_dir):
    path = bench_dir / "animal/train.csv"
    with open(path, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))  # records[i] is data row i + 1
    _, report = load_examples(path)
    mask_rows = report.rows("mask_count")
    assert mask_rows and all(records[r - 1]["sentence"].count("[MASK]") != 1 for r in mask_rows)
    for r in report.rows("answer_mismatch"):
        rec = records[r - 1]
        assert rec[rec["Answer"]].lower() != rec["animal"].lower()
    for r in report.rows("span_not_found")[:50]:
        assert records[r - 1]["span"].lower() not in records[r - 1]["sentence"].lower()
    examples, _ = load_examples(path)
    assert examples[0].row == 1 and examples[0].sentence == records[0]["sentence"]
    assert examples[0].spans == (records[0]["span"],) and examples[0].answer == records[0]["animal"]


def test_fields_of_loaded_real_examples(data_dir):
    animal, _ = load_examples(data_dir / "animal/dev.csv")
    first = animal[0]
    assert first == Example(
        task="animal",
        source=str(data_dir / "animal/dev.csv"),
        row=1,
        sentence="A [MASK] makes a chirping and singing sound in the morning.",
        answer="magpie",
        spans=("chirping and singing",),
        options=("owl", "magpie", "vulture", "eagle"),
        option_answer="B",
    )
    assert first.option_answer_index == 1
    pitch, _ = load_examples(data_dir / "pitch/dev.csv")
    assert pitch[0].answer == "lower" and pitch[0].options is None
    assert pitch[0].spans == ("sound of men in a locker room", "ambient sound of a steel water tower")
    assert {e.answer for e in pitch} == {"lower", "higher"}


def test_columns_are_read_by_name(tmp_path, bench_dir):
    src = bench_dir / "pitch/dev.csv"
    with open(src, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))[:40]
    order = ["span2", "answer", "extra", "sentence", "span1"]
    shuffled = write_csv(tmp_path / "shuffled.csv", order, [[r.get(c, "x") for c in order] for r in records])
    mine, _ = load_examples(shuffled)
    ref, _ = load_examples(src)
    assert len(mine) > 5
    assert [(e.sentence, e.answer, e.spans) for e in mine] == [(e.sentence, e.answer, e.spans) for e in ref[: len(mine)]]


def test_load_many_concatenates_and_combines_reports(bench_dir):
    _, defects = readme_tables(bench_dir)
    paths = [bench_dir / "pitch/train.csv", bench_dir / "pitch/dev.csv"]
    examples, report = load_many(paths)
    one, r1 = load_examples(paths[0])
    two, r2 = load_examples(paths[1])
    assert examples == one + two
    empty = defects["pitch/train.csv"][1] + defects["pitch/dev.csv"][1]
    assert empty > 0 and report.count("empty_field") == empty
    assert report.rows("empty_field", source=str(paths[1])) == r2.rows("empty_field")
    assert report.rows_read == r1.rows_read + r2.rows_read
    assert "train.csv" in report.summary() and "dev.csv" in report.summary()


# ------------------------------------------------------------------------------------------------------
# Bad input
# ------------------------------------------------------------------------------------------------------


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: file not found"):
        load_examples(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="not a file"):
        load_examples(tmp_path)


def test_non_utf8_names_row_and_byte_offset(tmp_path):
    path = write_csv(tmp_path / "latin.csv", PITCH_HEADER, [PITCH_ROW, PITCH_ROW])
    data = path.read_bytes()
    second_row_start = data.index(b"\n", data.index(b"\n") + 1) + 1
    bad_offset = second_row_start + 10
    path.write_bytes(data[:bad_offset] + b"\xe9" + data[bad_offset + 1 :])
    with pytest.raises(UserError) as err:
        load_examples(path)
    message = str(err.value)
    assert "latin.csv row 2 (line 3)" in message and f"byte offset {bad_offset}" in message and "UTF-8" in message
    assert "\n" not in message


def test_missing_columns_say_expected_and_found(tmp_path):
    path = write_csv(tmp_path / "p.csv", ["sentence", "answer", "span1"], [PITCH_ROW[:3]])
    with pytest.raises(UserError, match=r"missing column\(s\) span2 for task pitch; expected sentence, answer, span1, span2; found sentence, answer, span1"):
        load_examples(path, "pitch")
    with pytest.raises(UserError, match="cannot tell the task from the header.*found sentence, answer, span1"):
        load_examples(path)
    animal = write_csv(tmp_path / "a.csv", ["animal", "sentence"], [["dog", "A [MASK] barks."]])
    with pytest.raises(UserError, match=r"missing column\(s\) span \(or description\) for task animal"):
        load_examples(animal, "animal")
    partial = write_csv(tmp_path / "mc.csv", ["animal", "span", "sentence", "A", "B"], [["dog", "barks", "A [MASK] barks.", "x", "y"]])
    with pytest.raises(UserError, match="multiple-choice columns incomplete: missing C, D, Answer"):
        load_examples(partial)


def test_pitch_answer_must_be_lower_or_higher_even_when_not_strict(tmp_path):
    rows = [PITCH_ROW, [PITCH_ROW[0], "hgher", *PITCH_ROW[2:]]]
    path = write_csv(tmp_path / "p.csv", PITCH_HEADER, rows)
    with pytest.raises(UserError, match=r"p\.csv row 2 \(line 3\), field 'answer': expected 'lower' or 'higher', got 'hgher'"):
        load_examples(path)
    ok = write_csv(tmp_path / "ok.csv", PITCH_HEADER, [[PITCH_ROW[0], " Higher ", *PITCH_ROW[2:]]])
    assert load_examples(ok)[0][0].answer == "higher"


def test_answer_letter_must_be_a_to_d(tmp_path):
    path = write_csv(tmp_path / "a.csv", ANIMAL_HEADER, [ANIMAL_ROW[:-1] + ["E"]])
    with pytest.raises(UserError, match=r"a\.csv row 1 \(line 2\), field 'Answer': expected one of A, B, C, D, got 'E'"):
        load_examples(path)


def test_defects_non_strict_drop_or_keep_and_strict_raise(tmp_path):
    rows = [
        ANIMAL_ROW,  # 1 fine
        ["dog", "barking", "A [MASK] and a [MASK] are barking.", *ANIMAL_ROW[3:]],  # 2 two masks: dropped
        ["dog", "", "A [MASK] is barking.", *ANIMAL_ROW[3:]],  # 3 empty span: dropped
        ["dog", "howling", "A [MASK] is barking.", *ANIMAL_ROW[3:]],  # 4 span not found: kept
        ["dog", "barking", "A [MASK] is barking.", "cat", "dog", "cow", "owl", "A"],  # 5 Answer -> cat: kept
        ["dog", "barking", "A [MASK] is barking.", "cat", "", "cow", "owl", "B"],  # 6 empty option: kept, no MC
        ["dog", "barking", "A [MASK] is barking."],  # 7 too few fields: dropped
        ["dog", "barking", "A [MASK] is BARKING.", *ANIMAL_ROW[3:]],  # 8 fine (case-insensitive span)
    ]
    path = write_csv(tmp_path / "a.csv", ANIMAL_HEADER, rows)
    examples, report = load_examples(path)
    assert [e.row for e in examples] == [1, 4, 5, 6, 8]
    assert report.rows("mask_count") == [2]
    assert report.rows("empty_field") == [3, 6, 7]
    assert report.rows("span_not_found") == [4]
    assert report.rows("answer_mismatch") == [5]
    assert report.rows("field_count") == [7]
    assert examples[3].options is None and examples[2].options == ("cat", "dog", "cow", "owl")
    expectations = {
        2: r"row 2 \(line 3\): field 'sentence' has 2 \[MASK\]; expected exactly one",
        3: r"row 3 \(line 4\): field 'description' is empty",
        4: r"row 4 \(line 5\): field 'description' 'howling' does not occur in the sentence",
        5: r"row 5 \(line 6\): field 'Answer' is A = 'cat' but field 'animal' is 'dog'",
        6: r"row 6 \(line 7\): field 'B' is empty",
        7: r"row 7 \(line 8\): expected 8 fields as in the header, found 3",
    }
    for row, pattern in expectations.items():
        single = write_csv(tmp_path / f"row{row}.csv", ANIMAL_HEADER, [ANIMAL_ROW] * (row - 1) + [rows[row - 1]])
        with pytest.raises(UserError, match=rf"row{row}\.csv {pattern}"):
            load_examples(single, strict=True)
    clean = write_csv(tmp_path / "clean.csv", ANIMAL_HEADER, [ANIMAL_ROW, rows[7]])
    assert len(load_examples(clean, strict=True)[0]) == 2


def test_pitch_empty_span_is_dropped_and_strict_names_field(tmp_path):
    path = write_csv(tmp_path / "p.csv", PITCH_HEADER, [PITCH_ROW, [*PITCH_ROW[:3], "  "]])
    examples, report = load_examples(path)
    assert len(examples) == 1 and report.rows("empty_field") == [2] and report.dropped == [(str(path), 2)]
    with pytest.raises(UserError, match=r"p\.csv row 2 \(line 3\): field 'span2' is empty"):
        load_examples(path, strict=True)


def test_bom_blank_lines_and_quoted_newlines(tmp_path):
    path = tmp_path / "p.csv"
    body = ",".join(PITCH_HEADER) + "\r\n" + ",".join(PITCH_ROW) + "\r\n\r\n" + '"The sound\nof rain has a [MASK] pitch than thunder.",lower,sound of rain,thunder\r\n'
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    examples, report = load_examples(path)
    assert [e.row for e in examples] == [1, 2] and report.rows("span_not_found") == [2]


def test_malformed_csv_is_a_user_error(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text(",".join(PITCH_HEADER) + "\n" + ",".join(PITCH_ROW) + "\n" + '"unterminated,lower,a,b\n')
    with pytest.raises(UserError, match=r"p\.csv line \d+: malformed CSV"):
        load_examples(path)


def test_task_given_explicitly_must_fit(tmp_path):
    path = write_csv(tmp_path / "p.csv", PITCH_HEADER, [PITCH_ROW])
    with pytest.raises(UserError, match="missing column.*for task animal"):
        load_examples(path, "animal")
    with pytest.raises(UserError, match="unknown task 'birds'"):
        load_examples(path, "birds")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(UserError, match="empty file"):
        load_examples(empty)


# ------------------------------------------------------------------------------------------------------
# find_span
# ------------------------------------------------------------------------------------------------------


def test_find_span():
    s = "The Sound of a bowl and an owl; the sound of an owl."
    assert find_span(s, "sound of") == (4, 12)
    assert find_span(s, "OWL") == (27, 30)  # whole word beats the "owl" inside "bowl"
    assert find_span(s, "ow") == (16, 18)  # no whole-word match: first occurrence anywhere
    assert find_span(s, "cat") is None and find_span(s, "  ") is None
    assert find_span("İstanbul dogs bark", "dogs") == (9, 13)  # lower() would shift offsets here
    # A repeated span text: the second one goes to the next occurrence.
    t = "The sound of rain is lower than the sound of rain."
    assert find_spans(t, ["sound of rain", "sound of rain"]) == [(4, 17), (36, 49)]
    assert find_spans(t, ["sound of rain", "of rain", "missing"]) == [(4, 17), (42, 49), None]
