"""Builds the case-study report: one self-contained `index.html` plus `assets/` (PNG figures, FLAC clips), with
relative links only, so the folder opens from disk or from any static server.

`build_report` reads the predictions pairs, workdirs and audio caches (`inputs.py`), draws the figures
(`plots.py`), copies the audio of the sampled examples' spans out of the caches and renders `template.html`
with Jinja2 (autoescaping: every sentence, span and prompt is data, not markup).  The whole folder is written
under a temporary name beside `out` and renamed into place at the end, so a failed run leaves no half-written
report (and an older report stays as it was).
"""

from __future__ import annotations

import contextlib
import datetime
import math
import os
import shutil
from pathlib import Path
from typing import Sequence

from tqdm import tqdm

from ith_common.atomic import check_output_dir, fsync_directory
from ith_common.cache import CacheReader, cache_stats
from ith_common.errors import UserError
from ith_common.selection import DEFAULT_THRESHOLDS
from ith_jax.report import plots
from ith_jax.report.inputs import Pair, PairedFile, Workdir, pair_predictions, read_workdir, sample_examples

TEMPLATE = "template.html"
# Published accuracies (%), dev / test / wiki splits: bert-base-uncased backbones trained on the full AuditoryBench
# training data.  As tabulated in the AuditoryBench README of this project's data folder, from the papers below.
PUBLISHED = {
    "animal": {"BERT-base": (15.51, 13.46, 3.05), "AudioBERT": (38.28, 36.63, 14.32), "ITH": (39.36, 41.55, 19.09)},
    "pitch": {"BERT-base": (59.42, 60.41, 48.06), "AudioBERT": (73.18, 74.83, 55.31), "ITH": (79.82, 78.96, 76.74)},
}
PUBLISHED_SOURCES = (
    "Ok et al., 2024. AudioBERT: Audio Knowledge Augmented Language Model (AuditoryBench; the BERT-base and AudioBERT "
    "rows).",
    "Yoo et al., 2025. Imagine to Hear: Auditory Knowledge Generation can be an Effective Assistant for Language "
    "Models (the ITH row).",
)
CATEGORY_TITLES = {"fixed": "ITH fixed", "broken": "ITH broke", "other": "others (random)"}


def _file_label(path: str) -> str:
    """`task/file.csv` style: the data file's folder and name."""
    parts = Path(path).parts
    return "/".join(parts[-2:])


def marked_sentence(sentence: str, gold: Sequence[dict], detected: Sequence[dict]) -> list[dict]:
    """The sentence cut into runs of characters that share their marks: `gold` (a CSV span) and `detected` (a
    span the ITH model used).  Spans without valid offsets are not marked (they are still listed)."""
    flags = [[False, False] for _ in sentence]
    for which, spans in ((0, gold), (1, detected)):
        for span in spans:
            start, end = span.get("start"), span.get("end")
            if isinstance(start, int) and isinstance(end, int) and 0 <= start < end <= len(sentence):
                for i in range(start, end):
                    flags[i][which] = True
    runs: list[dict] = []
    for char, (is_gold, is_detected) in zip(sentence, flags):
        if runs and (runs[-1]["gold"], runs[-1]["detected"]) == (is_gold, is_detected):
            runs[-1]["text"] += char
        else:
            runs.append({"text": char, "gold": is_gold, "detected": is_detected})
    return runs


class AudioClips:
    """Finds a span's cache entry (by key, else by prompt) in any of the given caches and writes its candidates
    as FLAC files under `assets/audio/` (named by key and candidate: nothing is named after a prompt)."""

    def __init__(self, readers: Sequence[CacheReader], audio_dir: Path):
        self.readers, self.audio_dir = readers, audio_dir
        self._written: dict[str, list[str] | None] = {}

    def _find(self, span: dict) -> tuple[CacheReader, str] | None:
        key, prompt = span.get("cache_key"), span.get("prompt")
        for reader in self.readers:
            if isinstance(key, str) and key in reader:
                return reader, key
        for reader in self.readers:
            if isinstance(prompt, str) and (entry := reader.by_prompt(prompt)) is not None:
                return reader, entry.key
        return None

    def for_span(self, span: dict) -> dict:
        """{status, message, clips: [{src, index, score, selected}]} for the template."""
        selected = span.get("candidate")
        if not self.readers:
            return {"status": "none", "message": "no audio cache given (--cache)", "clips": []}
        found = self._find(span)
        if found is None:
            return {"status": "none", "message": "this prompt is not in the given caches", "clips": []}
        reader, key = found
        scores = reader.clap_scores(key)
        if key not in self._written:
            entry = reader.get(key, waveforms=True)
            self._written[key] = None if entry.waveforms is None else self._write(key, entry.waveforms,
                                                                                  entry.sample_rate)
        files = self._written[key]
        clips = [{"src": None if files is None else files[i], "index": i,
                  "score": None if math.isnan(score) else float(score), "selected": i == selected}
                 for i, score in enumerate(scores)]
        if files is None:
            return {"status": "no_waveforms", "clips": clips,
                    "message": "the cache holds no waveforms (built without --config.store_waveforms=true): scores only"}
        return {"status": "ok", "message": None, "clips": clips}

    def _write(self, key: str, waveforms, sample_rate: int) -> list[str]:
        import soundfile  # the report extra; the cache reader needs it too for these waveforms

        self.audio_dir.mkdir(parents=True, exist_ok=True)
        names = []
        for i, wave in enumerate(waveforms):
            name = f"{key[:16]}-{i}.flac"
            soundfile.write(self.audio_dir / name, wave if wave.ndim == 1 else wave.T, sample_rate, format="FLAC",
                            subtype="PCM_16")
            names.append(f"assets/audio/{name}")
        return names


def _prediction_view(record: dict) -> dict:
    return {"prediction": record["prediction"], "probability": record["probability"], "correct": record["correct"],
            "step": record["step"], "alternatives": [
                {"answer": a["answer"], "probability": a["probability"], "gold": a["answer"] == record["answer"],
                 "predicted": a["answer"] == record["prediction"]} for a in record["alternatives"]]}


def _example_view(category: str, pair: Pair, clips: AudioClips) -> dict:
    ith = pair.ith
    gate = ith["gate"]
    tokens = [{"piece": piece.removeprefix("##"), "continues": piece.startswith("##") and len(piece) > 2,
               "gate": None if gate is None else float(gate[i])} for i, piece in enumerate(ith["tokens"])]
    spans = [{"text": s["text"], "prompt": s.get("prompt"), "has_audio": bool(s.get("has_audio")),
              "candidate": s.get("candidate"), "audio": clips.for_span(s)} for s in ith["spans"]]
    return {"id": ith["id"], "category": pair.category, "group": category, "answer": ith["answer"],
            "sentence": marked_sentence(ith["sentence"], ith["gold_spans"], ith["spans"]),
            "gold_spans": [s["text"] for s in ith["gold_spans"]], "spans": spans,
            "text": _prediction_view(pair.text), "ith": _prediction_view(ith), "tokens": tokens,
            "has_gate": gate is not None}


def _cache_view(index: int, reader: CacheReader, thresholds: Sequence[float], users: list[Workdir],
                assets: Path) -> dict:
    stats = cache_stats(reader.cache_dir, thresholds)
    fingerprint = stats["fingerprint"] or {}
    generator = fingerprint.get("generator", {})
    oracle = generator.get("name") == "tone" and bool(generator.get("frequencies"))
    rules = [{"workdir": w.path.name, "selection": w.config["audio"].get("selection"),
              "threshold": w.config["audio"].get("clap_threshold")} for w in users]
    view = {"path": str(reader.cache_dir), "entries": stats["entries"], "candidates": stats["candidates"],
            "generator": generator.get("model") or generator.get("name", "?"), "oracle": oracle,
            "clap": "not scored" if fingerprint.get("clap", {}).get("skipped") else
            fingerprint.get("clap", {}).get("model") or fingerprint.get("clap", {}).get("name", "?"),
            "encoder": fingerprint.get("encoder", {}).get("name", "?"), "scores": stats["scores_all"],
            "first": stats["scores_first_candidate"], "best": stats["scores_best_candidate"],
            "acceptance": [{"threshold": float(t), "rate": r} for t, r in stats["acceptance_rates"].items()],
            "rules": rules, "histogram": None}
    if stats["scores_all"]["count"]:
        ith_threshold = next((r["threshold"] for r in rules if r["selection"] != "first"), None)
        name = f"clap_scores_{index}.png"
        plots.clap_histogram(assets / name, Path(reader.cache_dir).name, stats["histogram"]["edges"],
                             stats["histogram"]["counts"], thresholds, ith_threshold)
        view["histogram"] = f"assets/{name}"
    return view


def _check_out(out: Path) -> None:
    check_output_dir(out, what="--out")
    if out.exists() and (extra := sorted(p.name for p in out.iterdir() if p.name not in ("index.html", "assets"))):
        raise UserError(f"--out {out}: exists and holds {extra[0]!r}, which is not part of a report (it would be "
                        "replaced): give a new directory or a previous report's")


def _replace_dir(tmp: Path, out: Path) -> None:
    """Put the finished `tmp` in place of `out`: two renames, so `out` is always a complete report or absent for
    the instant between them (never a mixture)."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    fsync_directory(out.parent)
    shutil.rmtree(old, ignore_errors=True)


def build_report(out: str | os.PathLike, predictions: Sequence[tuple[str, str]], *,
                 text_workdirs: Sequence[str] = (), ith_workdirs: Sequence[str] = (), caches: Sequence[str] = (),
                 sample: int = 4, seed: int = 0, thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
                 title: str = "Imagine to Hear: case study", notes: Sequence[str] = ()) -> Path:
    """Write the report folder `out` (index.html + assets/) and return the path of index.html.

    `predictions`: (text-only file, ITH file) pairs of per-example predictions, one pair per evaluated data file.
    Workdirs default to those the predictions name (curves are left out, with a note, when they are gone);
    caches default to the ITH workdirs' `audio.cache_dir`.  `sample` examples per group (ITH fixed, ITH broke,
    others) per data file, drawn with `seed`."""
    try:
        import jinja2
    except ImportError:
        raise UserError("the report renders its page with jinja2: pip install 'ith-jax[report]'") from None
    out = Path(out)
    _check_out(out)
    if not predictions:
        raise UserError("give at least one --predictions TEXT.jsonl ITH.jsonl pair")
    if sample < 0:
        raise UserError(f"--sample: expected a number >= 0, got {sample}")
    paired: list[PairedFile] = [pair_predictions(text, ith) for text, ith in predictions]

    workdirs = [read_workdir(p, "text", required=True) for p in text_workdirs]
    workdirs += [read_workdir(p, "ith", required=True) for p in ith_workdirs]
    named = {kind: list(dict.fromkeys(getattr(pair, kind)["workdir"] for f in paired for pair in f.pairs))
             for kind in ("text", "ith")}
    record_task = {str(Path(getattr(pair, kind)["workdir"])): f.task
                   for f in paired for pair in f.pairs for kind in ("text", "ith")}
    if not workdirs:
        workdirs = [read_workdir(p, kind, required=False) for kind in ("text", "ith") for p in named[kind]]
    ith_runs = [w for w in workdirs if w.kind == "ith" and isinstance(w.config.get("audio"), dict)]
    if not caches:
        caches = list(dict.fromkeys(w.config["audio"]["cache_dir"] for w in ith_runs
                                    if w.config["audio"].get("cache_dir")))

    tmp = out.absolute().parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    assets = tmp / "assets"
    assets.mkdir(parents=True)
    try:
        with contextlib.ExitStack() as stack:
            readers = [stack.enter_context(CacheReader(path)) for path in caches]
            context = _context(paired, workdirs, record_task, readers, ith_runs, assets, sample=sample, seed=seed,
                               thresholds=thresholds, title=title, notes=notes)
        environment = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent),
                                         autoescape=True, undefined=jinja2.StrictUndefined)
        environment.filters["percent"] = lambda v, digits=1: "–" if v is None else f"{100 * v:.{digits}f}"
        (tmp / "index.html").write_text(environment.get_template(TEMPLATE).render(**context), encoding="utf-8")
        _replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / "index.html"


def _context(paired: list[PairedFile], workdirs: list[Workdir], record_task: dict[str, str],
             readers: list[CacheReader], ith_runs: list[Workdir], assets: Path, *, sample: int, seed: int,
             thresholds: Sequence[float], title: str, notes: Sequence[str]) -> dict:
    rows = []
    for f in paired:
        answer, majority = f.majority()
        ith_spans = [s for p in f.pairs for s in p.ith["spans"]]
        gates = [g for p in f.pairs if p.ith["gate"] for g in p.ith["gate"] if g > 0]
        rows.append({"task": f.task, "file": _file_label(f.file), "path": f.file, "n": len(f.pairs),
                     "majority_answer": answer, "majority": majority, "text": f.accuracy("text"),
                     "ith": f.accuracy("ith"), "fixed": f.count("fixed"), "broken": f.count("broken"),
                     "text_step": f.pairs[0].text["step"], "ith_step": f.pairs[0].ith["step"],
                     "spans": len(ith_spans), "spans_with_audio": sum(bool(s.get("has_audio")) for s in ith_spans),
                     "gate_mean": sum(gates) / len(gates) if gates else None, "synthetic": f.synthetic})
    plots.accuracy_bars(assets / "accuracy.png", [r["file"] for r in rows], [r["majority"] for r in rows],
                        [r["text"] for r in rows], [r["ith"] for r in rows])

    tasks = list(dict.fromkeys(f.task for f in paired))
    curves = []
    for task in tasks:
        runs = [w for w in workdirs if (w.task or record_task.get(str(w.path))) == task]
        drawn = [w for w in runs if w.train or w.dev]
        if drawn:
            name = f"curves_{task}.png"
            plots.training_curves(assets / name, task, [(w.label, w.kind, w.train, w.dev) for w in drawn])
        curves.append({"task": task, "image": f"assets/{name}" if drawn else None,
                       "runs": [{"label": w.label, "path": str(w.path), "model": w.config.get("text_model"),
                                 "steps": w.train[-1]["step"] if w.train else None, "note": w.note} for w in runs]})

    cache_views = []
    for i, reader in enumerate(readers):
        users = [w for w in ith_runs if w.config["audio"].get("cache_dir") and
                 Path(w.config["audio"]["cache_dir"]).resolve() == Path(reader.cache_dir).resolve()]
        cache_views.append(_cache_view(i, reader, thresholds, users, assets))

    clips = AudioClips(readers, assets / "audio")
    chosen = [(f, group, pair) for f in paired for group, pair in sample_examples(f, sample, seed)]
    examples = [dict(_example_view(group, pair, clips), file=_file_label(f.file), task=f.task)
                for f, group, pair in tqdm(chosen, desc="report examples", unit="example", disable=None)]

    auto_notes = []
    if any(r["synthetic"] for r in rows):
        auto_notes.append("SYNTHETIC SAMPLE: the data is the project's generated AuditoryBench-format sample, not "
                          "AuditoryBench; the numbers say nothing about the benchmark.")
    if any(c["oracle"] for c in cache_views):
        auto_notes.append("ORACLE AUDIO: a cache holds tones whose pitch was fitted to the labels (audio_gen.pitch_table);"
                          " its accuracy is a ceiling, not a result.")
    return {"title": title, "notes": [*auto_notes, *notes], "rows": rows, "tasks": tasks,
            "published": {t: PUBLISHED[t] for t in tasks}, "published_sources": PUBLISHED_SOURCES,
            "curves": curves, "caches": cache_views, "examples": examples, "sample": sample, "seed": seed,
            "category_titles": CATEGORY_TITLES,
            "generated": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
