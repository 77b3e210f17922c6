"""The case-study report (`python -m ith_jax.report`): the page's content from real small inputs.

The inputs are real files: predictions JSONL in the shared per-example format, workdirs with `config.json` and
`metrics.jsonl`, and audio caches written with `CacheWriter` (one with FLAC waveforms and CLAP scores, one
unscored tone cache without waveforms).  The expected numbers are counted from what the test planted, never by
running the report's own code.  `write_report_inputs` is shared with the browser test.
"""

from __future__ import annotations

import html.parser
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from ith_common.cache import CacheEntry, CacheWriter, entry_key
from ith_common.prompts import build_prompt
from ith_common.selection import select_candidate
from ith_jax.report.inputs import pair_predictions, sample_examples

REPO = Path(__file__).resolve().parents[1]
SAMPLE_RATE = 8000
PITCH_SOURCES = ("a whistling kettle", "the rumble of thunder", "a mosquito", "a foghorn", "a piccolo",
                 "a cello <b>solo</b>")  # markup in data must come out escaped
# (text correct, ITH correct) per pitch row: 3 fixed, 2 broken, 5 both right, 2 both wrong.
PITCH_OUTCOMES = [(False, True)] * 3 + [(True, False)] * 2 + [(True, True)] * 5 + [(False, False)] * 2
ANIMAL_OUTCOMES = [(False, True), (True, True), (False, False), (True, False)]
PITCH_SCORES = {0: [-0.12, 0.31, 0.58], 1: [0.05, -0.2, 0.11], 2: [-0.4, -0.3, -0.5]}  # per source, K = 3


def _tone(hertz: float, seconds: float = 0.4) -> np.ndarray:
    t = np.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return (0.3 * np.sin(2 * np.pi * hertz * t)).astype(np.float32)


def _write_cache(cache_dir: Path, prompts: list[str], *, waveforms: bool, scored: bool) -> dict[str, str]:
    """A real cache; prompt -> key.  Candidate c of prompt i is a tone of 220 * (i + 1) * (c + 1) Hz."""
    generator = {"name": "tone-test", "frequencies": None} if scored else {"name": "tone", "frequencies": "ab12"}
    fingerprint = {"generator": generator, "num_candidates": 3, "prompt_template": "{span} sound", "seed": 0,
                   "clap": {"model": "tiny-clap"} if scored else {"skipped": True}, "encoder": {"name": "logmel"}}
    keys = {}
    with CacheWriter(cache_dir, fingerprint=fingerprint, store_waveforms=waveforms) as writer:
        for i, prompt in enumerate(prompts):
            key = entry_key(prompt, generator, 0, fingerprint["encoder"])
            scores = PITCH_SCORES[i % 3] if scored else [float("nan")] * 3
            writer.add(CacheEntry(key, prompt, np.full((3, 2, 4), i, np.float32), None, np.asarray(scores),
                                  {"span_text": prompt}, np.stack([_tone(220 * (i + 1) * (c + 1)) for c in range(3)])
                                  if waveforms else None, SAMPLE_RATE if waveforms else None))
            keys[prompt] = key
    return keys


def _span(sentence: str, text: str) -> dict:
    start = sentence.index(text)
    return {"text": text, "start": start, "end": start + len(text)}


def _gate(tokens: list[str], spans: list[dict]) -> list[float]:
    """A gate like the fusion layer's: non-zero only on the words of spans that took audio (0.2, 0.3, ... 0.9)."""
    words = {w for s in spans if s["has_audio"] for w in s["text"].lower().split()}
    return [round(0.2 + 0.1 * (i % 8), 3) if token in words else 0.0 for i, token in enumerate(tokens)]


def _records(task: str, outcomes, data_file: str, workdirs: dict, caches: dict[str, str],
             prompts: list[str]) -> dict[str, list]:
    """The text and ITH predictions of one data file in the shared format."""
    records = {"text": [], "ith": []}
    for row, (text_ok, ith_ok) in enumerate(outcomes, 1):
        if task == "pitch":
            a, b = PITCH_SOURCES[row % len(PITCH_SOURCES)], PITCH_SOURCES[(row + 2) % len(PITCH_SOURCES)]
            sentence, answer, wrong = f"{a.capitalize()} has a [MASK] pitch than {b}.", ("higher", "lower")[row % 2], \
                ("lower", "higher")[row % 2]
            gold = [_span(sentence, a.capitalize()), _span(sentence, b)]
        else:
            sentence, answer, wrong = "A [MASK] makes a sound like barking.", "dog", "cat"
            gold = [_span(sentence, "barking")]
        tokens = ["[CLS]", *sentence.lower().replace(".", " .").split(), "[SEP]"]
        for kind, ok in (("text", text_ok), ("ith", ith_ok)):
            probability = 0.5 + 0.05 * row if ok else 0.55 + 0.03 * row
            prediction = answer if ok else wrong
            spans = []
            if kind == "ith":
                for span in gold:
                    prompt = build_prompt(span["text"])
                    scores = PITCH_SCORES[prompts.index(prompt) % 3] if prompt in prompts else [float("nan")] * 3
                    candidate = select_candidate(scores, "first_above", 0.0)  # what the ITH run would pick
                    spans.append({**span, "prompt": prompt, "has_audio": candidate is not None,
                                  "cache_key": caches.get(prompt), "candidate": candidate,
                                  "clap_scores": None if prompt not in prompts else scores})
            records[kind].append({
                "schema_version": 1, "id": f"{task}/{Path(data_file).name}:{row}", "file": data_file, "row": row,
                "task": task, "workdir": str(workdirs[kind]), "step": 40 if kind == "text" else 44, "kind": kind,
                "sentence": sentence, "answer": answer, "prediction": prediction, "correct": ok,
                "probability": probability, "alternatives": [{"answer": prediction, "probability": probability},
                                                             {"answer": wrong if ok else answer,
                                                              "probability": 1 - probability}],
                "gold_spans": gold, "spans": spans, "tokens": tokens,
                "gate": _gate(tokens, spans) if kind == "ith" else None})
    return records


def _write_workdir(path: Path, task: str, kind: str, cache_dir: Path | None, steps: int = 40) -> None:
    path.mkdir(parents=True)
    config = {"task": task, "text_model": "tiny-bert", "head": "mlm"}
    if kind == "ith":
        config["audio"] = {"cache_dir": str(cache_dir), "selection": "first_above", "clap_threshold": 0.0}
    (path / "config.json").write_text(json.dumps(config))
    lines = [{"step": s, "loss": 3.0 / s ** 0.5, "learning_rate": 1e-4, "epoch": 0} for s in range(1, steps + 1)]
    lines += [{"step": s, f"dev/{task}_dev/accuracy": 0.5 + s / 400, f"dev/{task}_dev/num_examples": 12}
              for s in (10, 20, 40)]
    (path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))


def write_report_inputs(root: Path) -> dict:
    """Two tasks' predictions pairs, four workdirs and two caches under `root`; returns their paths and what was
    planted."""
    pitch_prompts = [build_prompt(s.capitalize() if i % 2 else s) for s in PITCH_SOURCES for i in range(2)]
    pitch_prompts = list(dict.fromkeys(pitch_prompts))
    caches = {"pitch": root / "cache_pitch", "animal": root / "cache_animal"}
    keys = _write_cache(caches["pitch"], pitch_prompts, waveforms=True, scored=True)
    keys |= _write_cache(caches["animal"], [build_prompt("barking")], waveforms=False, scored=False)
    files, workdirs = {}, {}
    for task, outcomes in (("pitch", PITCH_OUTCOMES), ("animal", ANIMAL_OUTCOMES)):
        workdirs[task] = {kind: root / f"lm_{kind}_{task}" for kind in ("text", "ith")}
        for kind in ("text", "ith"):
            _write_workdir(workdirs[task][kind], task, kind, caches[task])
        records = _records(task, outcomes, f"data/{task}/dev.csv", workdirs[task], keys, pitch_prompts)
        for kind in ("text", "ith"):
            path = root / f"{task}_{kind}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records[kind]))
            files.setdefault(task, {})[kind] = path
    return {"files": files, "workdirs": workdirs, "caches": caches, "keys": keys, "pitch_prompts": pitch_prompts}


def report_command(out: Path, inputs: dict, *extra: str) -> list[str]:
    pairs = [arg for task in ("pitch", "animal") for arg in
             ("--predictions", str(inputs["files"][task]["text"]), str(inputs["files"][task]["ith"]))]
    return [sys.executable, "-m", "ith_jax.report", "--out", str(out), *pairs, "--sample", "20", *extra]


def run_report(command: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)


class _Page(html.parser.HTMLParser):
    """Tags with their attributes, table rows as cell texts, and all visible text."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.tables: dict[str, list[list[str]]] = {}
        self.text: list[str] = []
        self._table, self._row, self._cell = None, None, None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append((tag, attrs))
        if tag == "table":
            self._table = self.tables.setdefault(attrs.get("id") or f"table{len(self.tables)}", [])
        elif tag == "tr" and self._table is not None:
            self._row = []
            self._table.append(self._row)
        elif tag in ("td", "th") and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table":
            self._table = None

    def handle_data(self, data):
        self.text.append(data)
        if self._cell is not None:
            self._cell.append(data)

    def sources(self, tag: str) -> list[str]:
        return [attrs["src"] for name, attrs in self.tags if name == tag and "src" in attrs]


def parse(index: Path) -> _Page:
    page = _Page()
    page.feed(index.read_text(encoding="utf-8"))
    return page


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    inputs = write_report_inputs(root)
    out = root / "out" / "report"
    result = run_report(report_command(out, inputs, "--note", "made by test_report"))
    assert result.returncode == 0, result.stderr[-3000:]
    return inputs, out, parse(out / "index.html"), (out / "index.html").read_text(encoding="utf-8")


def test_accuracy_table_counts_what_was_planted(built):
    _, _, page, _ = built
    rows = {row[1]: row for row in page.tables["accuracy-table"][1:]}
    for task, outcomes in (("pitch", PITCH_OUTCOMES), ("animal", ANIMAL_OUTCOMES)):
        row = rows[f"{task}/dev.csv"]
        n = len(outcomes)
        text, ith = sum(t for t, _ in outcomes) / n, sum(i for _, i in outcomes) / n
        assert row[2] == str(n)
        assert row[4].startswith(f"{100 * text:.1f}") and row[4].endswith("step 40")
        assert row[5].startswith(f"{100 * ith:.1f}") and row[5].endswith("step 44")
        assert row[6] == f"{100 * (ith - text):+.1f}"
        assert (row[7], row[8]) == (str(outcomes.count((False, True))), str(outcomes.count((True, False))))
    # pitch answers alternate lower/higher from row 1: 6 of 12 each, a tie goes to the first seen
    assert rows["pitch/dev.csv"][3] == "50.0 (lower)"
    assert rows["animal/dev.csv"][3] == "100.0 (dog)"


def test_published_numbers_and_their_source_are_on_the_page(built):
    _, _, page, source = built
    published = page.tables["published-table"]
    assert ["pitch", "ITH", "79.82", "78.96", "76.74"] in published
    assert ["animal", "BERT-base", "15.51", "13.46", "3.05"] in published
    assert "bert-base-uncased" in source and "Yoo et al., 2025" in source and "Ok et al., 2024" in source


def test_every_link_is_relative_and_every_file_exists(built):
    _, out, page, _ = built
    links = page.sources("img") + page.sources("audio") + [a["href"] for t, a in page.tags
                                                           if t in ("a", "link") and "href" in a]
    for link in links:
        assert not link.startswith(("/", "http:", "https:", "file:")), link
        if not link.startswith(("#", "data:")):
            assert (out / link).is_file(), link
    images = page.sources("img")
    assert {"assets/accuracy.png", "assets/curves_pitch.png", "assets/curves_animal.png",
            "assets/clap_scores_0.png"} <= set(images)
    for image in images:
        assert (out / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["assets", "index.html"]


def test_audio_players_play_the_cached_candidates(built):
    import soundfile

    inputs, out, page, _ = built
    audio = page.sources("audio")
    # every pitch span of the 12 sampled rows (sample 20 > every group): the distinct prompts used, 3 candidates each
    used = {build_prompt(s["text"]) for line in inputs["files"]["pitch"]["ith"].read_text().splitlines()
            for s in json.loads(line)["spans"]}
    assert len(set(audio)) == 3 * len(used)
    for prompt in used:
        i = inputs["pitch_prompts"].index(prompt)
        for c in range(3):
            path = out / f"assets/audio/{inputs['keys'][prompt][:16]}-{c}.flac"
            assert f"assets/audio/{path.name}" in audio
            wave, rate = soundfile.read(path, dtype="float32")
            assert rate == SAMPLE_RATE
            # 16-bit FLAC of the 24-bit cached FLAC of the planted tone: within 2 quantisation steps of 2^-15
            np.testing.assert_allclose(wave, _tone(220 * (i + 1) * (c + 1)), atol=2 ** -14)


def test_clap_scores_selection_and_acceptance(built):
    _, _, page, source = built
    acceptance = next(rows for rows in page.tables.values() if rows and rows[0][0] == "CLAP threshold")
    scores = [PITCH_SCORES[i % 3] for i in range(len(PITCH_SOURCES) * 2)]
    for row in acceptance[1:]:
        threshold = float(row[0].removeprefix("≥ "))
        expected = np.mean([max(s) >= threshold for s in scores])
        assert row[1] == f"{100 * expected:.1f} %"
    # the selected candidate (1) is marked, with its score
    text = " ".join("".join(page.text).split())
    assert "candidate 1 (selected) · CLAP 0.310" in text  # [-0.12, 0.31, 0.58]: the first at or above 0
    assert "candidate 0 (selected) · CLAP 0.050" in text  # [0.05, -0.2, 0.11]
    assert "no audio (no candidate accepted)" in text  # [-0.4, -0.3, -0.5]
    assert "selection first_above" in text


def test_unscored_cache_without_waveforms_says_so(built):
    _, _, page, source = built
    text = " ".join("".join(page.text).split())
    assert "ORACLE AUDIO" in text and "built without CLAP scoring" in text
    assert "the cache holds no waveforms (built without --config.store_waveforms=true)" in text
    assert "CLAP not scored" in text


def test_examples_show_spans_predictions_and_gate(built):
    _, _, page, source = built
    text = " ".join("".join(page.text).split())
    groups = [a.get("data-group") for t, a in page.tags if t == "article"]
    assert groups.count("fixed") == 3 + 1 and groups.count("broken") == 2 + 1
    assert groups.count("other") == len(PITCH_OUTCOMES) + len(ANIMAL_OUTCOMES) - 7
    assert "pitch/dev.csv:1" in text and "animal/dev.csv:4" in text
    # the markup inside a span is data: escaped, never a tag
    assert "a cello &lt;b&gt;solo&lt;/b&gt;" in source and "<b>solo</b>" not in source
    shaded = [a["style"] for t, a in page.tags if t == "span" and "tok" in a.get("class", "")]
    for line in built[0]["files"]["pitch"]["ith"].read_text().splitlines():
        for value in json.loads(line)["gate"]:
            assert f"background: rgba(234, 88, 12, {value:.3f})" in shaded
    assert "made by test_report" in text


def test_rebuild_replaces_the_report_and_a_failure_keeps_the_old_one(built, tmp_path):
    inputs, _, _, _ = built
    out = tmp_path / "report"
    assert run_report(report_command(out, inputs, "--sample", "1")).returncode == 0
    first = (out / "index.html").read_text()
    bad = tmp_path / "bad_ith.jsonl"
    lines = inputs["files"]["pitch"]["ith"].read_text().splitlines()
    record = json.loads(lines[2])
    record["correct"] = "yes"
    bad.write_text("\n".join([*lines[:2], json.dumps(record), *lines[3:]]) + "\n")
    result = run_report([sys.executable, "-m", "ith_jax.report", "--out", str(out), "--predictions",
                         str(inputs["files"]["pitch"]["text"]), str(bad)])
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {bad}:3: field 'correct': expected true or false, got 'yes'"
    assert (out / "index.html").read_text() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad_ith.jsonl", "report"]  # no temporary left


@pytest.mark.parametrize("case", ["swapped", "unpaired", "foreign_out", "missing_workdir"])
def test_bad_input_is_one_line_and_writes_nothing(built, tmp_path, case):
    inputs, _, _, _ = built
    text, ith = inputs["files"]["pitch"]["text"], inputs["files"]["pitch"]["ith"]
    out, extra = tmp_path / "report", []
    if case == "swapped":
        text, ith, expected = ith, text, f"{ith}:1: field 'kind': expected 'text'"
    elif case == "unpaired":
        short = tmp_path / "short.jsonl"
        short.write_text("".join(ith.read_text().splitlines(keepends=True)[:-1]))
        ith, expected = short, f"{short}: no record with id 'pitch/dev.csv:12'"
    elif case == "foreign_out":
        out.mkdir()
        (out / "notes.txt").write_text("mine")
        expected = f"--out {out}: exists and holds 'notes.txt'"
    else:
        extra, expected = ["--ith-workdir", str(tmp_path / "gone")], f"--ith-workdir {tmp_path / 'gone'}: no config"
    result = run_report([sys.executable, "-m", "ith_jax.report", "--out", str(out), "--predictions", str(text),
                         str(ith), *extra])
    assert result.returncode == 2, result.stderr
    assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith(f"error: {expected}"), \
        result.stderr
    if case == "foreign_out":
        assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    else:
        assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_sample_is_seeded_and_drawn_from_the_right_groups(built):
    inputs, _, _, _ = built
    paired = pair_predictions(inputs["files"]["pitch"]["text"], inputs["files"]["pitch"]["ith"])
    first = sample_examples(paired, 2, seed=3)
    assert first == sample_examples(paired, 2, seed=3)
    assert [g for g, _ in first] == ["fixed", "fixed", "broken", "broken", "other", "other"]
    for group, pair in first:
        ok = (pair.text["correct"], pair.ith["correct"])
        assert ok == {"fixed": (False, True), "broken": (True, False)}.get(group, ok)
        assert group != "other" or ok[0] == ok[1]
    draws = {tuple(p.text["id"] for _, p in sample_examples(paired, 2, seed=s) if _ == "other") for s in range(8)}
    assert len(draws) > 1  # the seed changes the random "other" examples


def test_gone_workdirs_are_noted_and_synthetic_data_is_labelled(built, tmp_path):
    from ith_jax.report import build_report

    inputs, _, _, _ = built
    moved = {}
    for kind in ("text", "ith"):
        lines = [json.loads(line) for line in inputs["files"]["animal"][kind].read_text().splitlines()]
        for record in lines:
            record["workdir"] = str(tmp_path / f"gone_{kind}")
            record["file"] = str(tmp_path / "sample" / "animal" / "dev.csv")
        moved[kind] = tmp_path / f"{kind}.jsonl"
        moved[kind].write_text("".join(json.dumps(r) + "\n" for r in lines))
    (tmp_path / "sample" / "animal").mkdir(parents=True)
    (tmp_path / "sample" / "SYNTHETIC").write_text("{}")  # the generated sample's marker (ith_jax.data.synthetic)
    index = build_report(tmp_path / "report", [(str(moved["text"]), str(moved["ith"]))],
                         caches=[str(inputs["caches"]["animal"])], sample=1)
    page = parse(index)
    text = " ".join("".join(page.text).split())
    assert f"{tmp_path / 'gone_text' / 'config.json'} not found: no training curves" in text
    assert "assets/curves_animal.png" not in page.sources("img")
    assert "ORACLE AUDIO" in text  # the cache given explicitly is still described
    assert "SYNTHETIC SAMPLE" in text and page.tables["accuracy-table"][1][0] == "animal synthetic sample"
