"""AuditoryBench loading, validation, tokenizer and MLM encoding, on the real files and hand-written CSVs."""

import csv
import shutil
from pathlib import Path

import numpy as np
import pytest

from ith_jax.data.auditorybench import (
    Example,
    encode_choices,
    encode_mlm,
    find_span,
    find_spans,
    load_examples,
    load_many,
    load_tokenizer,
    tokenizer_info,
)
from ith_jax.errors import UserError

from tests.conftest import FILES


@pytest.fixture(scope="module")
def ref_python_tok(ckpt_dir):
    """transformers' pure-Python WordPiece: an independent implementation for ids."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return BertTokenizerLegacy(vocab_file=str(ckpt_dir / "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="module")
def ref_fast_tok(ckpt_dir):
    """transformers' BertTokenizer built from vocab.txt alone (not our tokenizer.json): offsets reference."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(ckpt_dir / "vocab.txt"), do_lower_case=True)


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
# Real files against the README
# ------------------------------------------------------------------------------------------------------


def readme_tables(data_dir):
    """Row counts and the defect table, parsed from the data README (the reference we check against)."""
    text = (data_dir / "README.md").read_text(encoding="utf-8")
    rows, defects = {}, {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in FILES:
            rows[cells[0]] = int(cells[2].replace(",", ""))
        if len(cells) == 5 and cells[0] in FILES:
            defects[cells[0]] = [None if c == "-" else int(c) for c in cells[1:]]
    assert set(rows) == set(defects) == set(FILES), "README tables not parsed"
    return rows, defects


@pytest.mark.parametrize("name", FILES)
def test_defect_counts_match_readme(data_dir, name):
    rows, defects = readme_tables(data_dir)
    mask_count, empty, not_found, mismatch = defects[name]
    examples, report = load_examples(data_dir / name)
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


def test_row_numbers_point_at_the_defective_records(data_dir):
    path = data_dir / "animal/train.csv"
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


def test_fields_of_loaded_examples(data_dir):
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


def test_columns_are_read_by_name(tmp_path, data_dir):
    src = data_dir / "pitch/dev.csv"
    with open(src, newline="", encoding="utf-8") as f:
        records = list(csv.DictReader(f))[:40]
    order = ["span2", "answer", "extra", "sentence", "span1"]
    shuffled = write_csv(tmp_path / "shuffled.csv", order, [[r.get(c, "x") for c in order] for r in records])
    mine, _ = load_examples(shuffled)
    ref, _ = load_examples(src)
    assert [(e.sentence, e.answer, e.spans) for e in mine] == [(e.sentence, e.answer, e.spans) for e in ref[: len(mine)]]


def test_load_many_concatenates_and_combines_reports(data_dir):
    paths = [data_dir / "pitch/train.csv", data_dir / "pitch/dev.csv"]
    examples, report = load_many(paths)
    one, r1 = load_examples(paths[0])
    two, r2 = load_examples(paths[1])
    assert examples == one + two
    assert report.count("empty_field") == 7 and report.rows("empty_field", source=str(paths[1])) == r2.rows("empty_field")
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


# ------------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------------


def sample_sentences(data_dir):
    animal, _ = load_examples(data_dir / "animal/dev.csv")
    pitch, _ = load_examples(data_dir / "pitch/dev.csv")
    return [e.sentence for e in animal] + [e.sentence for e in pitch[:300]] + [
        "Café NAÏVE über-loud [MASK]!!! don't stop—ok?",
    ]


def test_tokenizer_matches_independent_references(tok, ref_python_tok, ref_fast_tok, data_dir):
    sentences = sample_sentences(data_dir)
    ours = tok.encode_batch(sentences)
    for sentence, enc in zip(sentences, ours):
        assert enc.ids == ref_python_tok(sentence)["input_ids"], sentence
        ref = ref_fast_tok(sentence, return_offsets_mapping=True)
        assert enc.ids == ref["input_ids"]
        assert enc.offsets == [tuple(o) for o in ref["offset_mapping"]], sentence


def test_mask_becomes_mask_id_and_no_truncation_or_padding(tok):
    info = tokenizer_info(tok)
    assert (info.mask_id, info.cls_id, info.sep_id, info.pad_id, info.unk_id) == (103, 101, 102, 0, 100)
    assert info.token_to_id("lower") == 2896
    enc = tok.encode("A [MASK] barks.")
    assert enc.ids[0] == info.cls_id and enc.ids[2] == info.mask_id and enc.ids[-1] == info.sep_id
    assert enc.offsets[2] == (2, 8)
    long = tok.encode(" ".join(["sound"] * 600))
    assert len(long.ids) == 602  # tokenizer.json asks for truncation at 128 and padding; both are off


def test_tokenizer_from_vocab_only_matches_tokenizer_json(tmp_path, tok, ckpt_dir, data_dir):
    vocab_dir = tmp_path / "vocab_only"
    vocab_dir.mkdir()
    shutil.copy(ckpt_dir / "vocab.txt", vocab_dir)
    from_vocab = load_tokenizer(vocab_dir)
    sentences = sample_sentences(data_dir)
    for a, b in zip(from_vocab.encode_batch(sentences), tok.encode_batch(sentences)):
        assert a.ids == b.ids and a.offsets == b.offsets and a.special_tokens_mask == b.special_tokens_mask
    # do_lower_case false keeps case (the uncased vocab then has no "Dog" and gives [UNK])
    (vocab_dir / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    cased = load_tokenizer(vocab_dir)
    assert cased.encode("Dog [MASK]", add_special_tokens=False).ids == [100, 103]
    assert from_vocab.encode("Dog [MASK]", add_special_tokens=False).ids == [3899, 103]


def test_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError):
        load_tokenizer(tmp_path / "does-not-exist")
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(UserError, match=r"special token\(s\) \[CLS\], \[SEP\], \[MASK\] missing"):
        load_tokenizer(tmp_path)


# ------------------------------------------------------------------------------------------------------
# MLM encoding
# ------------------------------------------------------------------------------------------------------


def test_encode_mlm_pitch(tok, ref_python_tok, data_dir):
    examples, _ = load_examples(data_dir / "pitch/dev.csv")
    encoded, report = encode_mlm(examples, tok)
    assert len(encoded) == len(examples) == report.records_out
    lower, higher = ref_python_tok.convert_tokens_to_ids(["lower", "higher"])
    for rec in encoded:
        assert rec.input_ids.dtype == np.int32 and rec.length == len(rec.input_ids)
        assert rec.input_ids.tolist() == ref_python_tok(rec.example.sentence)["input_ids"]
        assert rec.sentence == rec.example.sentence
        assert rec.mask_positions.tolist() == [rec.input_ids.tolist().index(103)]
        assert rec.mask_label_ids.tolist() == [lower if rec.example.answer == "lower" else higher]
        # every span range found covers exactly the span's text
        for (start, end), which in zip(rec.span_token_ranges, rec.span_index):
            text = rec.sentence[rec.offsets[start, 0] : rec.offsets[end - 1, 1]]
            assert text.lower() == rec.example.spans[which].lower()
    found = sum(len(r.span_index) for r in encoded)
    missing = sum(1 for e in examples for s in e.spans if s.lower() not in e.sentence.lower())
    assert found == 2 * len(examples) - missing
    assert len(report.span_not_found) == 17


def test_encode_mlm_animal_expands_mask_to_answer_pieces(tok, ref_python_tok, data_dir):
    examples, _ = load_examples(data_dir / "animal/train.csv")
    encoded, report = encode_mlm(examples, tok)
    assert len(encoded) == len(examples)
    multi = 0
    for rec in encoded:
        gold = ref_python_tok(rec.example.answer, add_special_tokens=False)["input_ids"]
        assert rec.mask_label_ids.tolist() == gold
        assert len(rec.mask_positions) == len(gold)
        positions = rec.mask_positions.tolist()
        assert positions == list(range(positions[0], positions[0] + len(gold)))  # consecutive masks
        assert (rec.input_ids[rec.mask_positions] == 103).sum() == len(gold) == (rec.input_ids == 103).sum()
        multi += len(gold) > 1
        for (start, end), which in zip(rec.span_token_ranges, rec.span_index):
            span = rec.example.spans[which].lower()
            text = rec.sentence[rec.offsets[start, 0] : rec.offsets[end - 1, 1]].lower()
            assert span in text and len(text) - len(span) < 20  # snapped outwards to whole pieces at most
    assert multi > 900  # about a quarter of the answers have several pieces


def test_span_ranges_follow_the_expanded_mask(tok):
    ex = Example("animal", "hand", 1, "A [MASK] makes a chirping sound.", "giant bug", ("chirping sound",))
    (rec,), _ = encode_mlm([ex], tok)
    assert rec.sentence == "A [MASK] [MASK] makes a chirping sound."
    start, end = rec.span_token_ranges[0]
    assert tok.decode(rec.input_ids[start:end].tolist()) == "chirping sound"
    assert rec.sentence[rec.offsets[start, 0] : rec.offsets[end - 1, 1]] == "chirping sound"


def test_over_long_sequences_dropped_or_strict_error(tok, data_dir):
    examples, _ = load_examples(data_dir / "pitch/dev.csv")
    encoded, report = encode_mlm(examples, tok, max_length=24)
    lengths = [len(tok.encode(e.sentence).ids) for e in examples]
    assert len(encoded) == sum(n <= 24 for n in lengths) and len(report.too_long) == sum(n > 24 for n in lengths)
    assert report.longest == max(lengths) and "longer than max_length 24" in report.summary()
    with pytest.raises(UserError, match=r"dev\.csv row \d+: \d+ tokens; expected at most max_length=24"):
        encode_mlm(examples, tok, max_length=24, strict=True)


def test_pitch_labels_must_be_single_pieces(tmp_path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "sound", "is", "low", "##er", "higher", "."]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    small = load_tokenizer(tmp_path)
    ex = Example("pitch", "hand", 1, "the sound is [MASK].", "lower", ("the sound", "sound"))
    with pytest.raises(UserError, match="pitch label 'lower' is not a single word piece"):
        encode_mlm([ex], small)


def test_encode_choices(tok, ref_python_tok, data_dir):
    examples, _ = load_examples(data_dir / "animal/dev.csv")
    records, report = encode_choices(examples, tok)
    assert len(records) == 4 * len(examples)
    for k, rec in enumerate(records):
        ex = examples[k // 4]
        assert rec.example is ex and rec.choice == k % 4
        option = ex.options[rec.choice]
        gold = ref_python_tok(option, add_special_tokens=False)["input_ids"]
        assert rec.mask_label_ids.tolist() == gold and (rec.input_ids == 103).sum() == len(gold)
        expanded = ex.sentence.replace("[MASK]", " ".join(["[MASK]"] * len(gold)))
        assert rec.input_ids.tolist() == ref_python_tok(expanded)["input_ids"]
    # the gold option's record is the MLM record
    mlm, _ = encode_mlm(examples[:50], tok)
    for ex, m in zip(examples[:50], mlm):
        if ex.options[ex.option_answer_index] == ex.answer:
            r = records[4 * examples.index(ex) + ex.option_answer_index]
            assert np.array_equal(r.input_ids, m.input_ids) and np.array_equal(r.mask_label_ids, m.mask_label_ids)


def test_encode_choices_drops_whole_groups(tok):
    long_option = " ".join(["elephant"] * 20)
    a = Example("animal", "hand", 1, "A [MASK] trumpets.", "elephant", ("trumpets",), ("cat", long_option, "dog", "cow"), "B")
    b = Example("animal", "hand", 2, "A [MASK] barks.", "dog", ("barks",), ("cat", "owl", "dog", "cow"), "C")
    c = Example("animal", "hand", 3, "A [MASK] barks.", "dog", ("barks",))
    records, report = encode_choices([a, b, c], tok, max_length=16)
    assert [(r.example.row, r.choice) for r in records] == [(2, 0), (2, 1), (2, 2), (2, 3)]
    assert report.too_long == [("hand", 1)] and report.no_options == [("hand", 3)]
