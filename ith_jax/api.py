"""The Python API: restore any trained workdir and predict, one sentence or one file at a time.

    import ith_jax
    lm = ith_jax.load("runs/lm_pitch")                                   # text-only LM
    ith = ith_jax.load("runs/ith_pitch", span_workdir="runs/span")       # ITH: spans detected, audio from the cache
    ith.predict(["A cow's moo has a [MASK] pitch than a bird's chirp."])
    ith_jax.load("runs/span").predict(["..."])                           # a span detector: the spans it finds

``load`` rebuilds the model from the model spec in the checkpoint's metadata (Orbax restore; the workdir's
``config.json`` and ``tokenizer.json`` say how its data is encoded) and returns a ``Predictor``. Every prediction,
from ``Predictor.predict`` or from ``python -m ith_jax.evaluate --predictions`` (``Predictor.evaluate_file``),
goes through one path: rows are encoded as in training, the jitted ``MlmTask.predict(details=True)`` runs on
them and ``example_records`` turns its outputs into the per-example records of docs/api.md.

Decoding. Pitch: the higher of the ``lower``/``higher`` logits at the mask (the metric's rule); the probability
is the softmax over those two words. Animal: the ``[MASK]`` is expanded to the answer's number of word pieces
(as ITH and the metric do), every piece is the argmax at its slot, the prediction is the pieces joined and
its probability their product; the alternatives are the ``TOP_K`` best joint choices (a beam over the slots'
top pieces). A sentence given without its answer tries 1 to ``MAX_ANIMAL_PIECES`` pieces and ranks every
candidate by its mean log-probability per piece (the joint probability favours short names).

ITH. The spans of a sentence come from the span workdir (``ith_jax.detect``'s decoding) or from ``spans=``;
their audio from the workdir's cache (or ``cache_dir=``) with the workdir's selection rule. A prompt that the
cache lacks is a ``UserError`` naming every such prompt, unless ``imagine=True``: then ``python -m
audio_gen.build_cache`` (a subprocess: this process never imports torch) generates them into the cache with
``gen_config``, the config the cache was built with (its fingerprint check refuses any other).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import shlex
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from ith_common.cache import CacheReader
from ith_common.errors import UserError
from ith_common.manifest import expected_id, write_manifest
from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt
from ith_common.selection import select_candidate
from ith_jax import checkpoint as checkpoint_lib
from ith_jax import detect as detect_lib
from ith_jax import mesh as mesh_lib
from ith_jax import tasks as tasks_lib
from ith_jax import trainer as trainer_lib
from ith_jax.data import audio as audio_lib
from ith_jax.data import auditorybench
from ith_jax.data.tokenizer import MASK_TOKEN

logger = logging.getLogger("ith_jax")

SCHEMA_VERSION = 1  # of the per-example records (docs/api.md)
MAX_ANIMAL_PIECES = 3  # word pieces tried for an animal answer that is not given
PREDICT_SOURCE = "<predict>"  # the "file" of sentences passed to Predictor.predict
_PLACEHOLDER_PIECE = "a"  # one word piece: an unknown animal answer of k pieces is encoded as k of them


def load(workdir: str | Path, which: str = "best", *, step: int | None = None,
         span_workdir: str | Path | None = None, cache_dir: str | None = None, imagine: bool = False,
         gen_config: str | None = None, batch_size: int | None = None) -> Predictor:
    """A ``Predictor`` for a trained workdir (text-only LM, ITH LM or span detector).

    ``which``: ``"best"`` (the best-dev checkpoint) or ``"latest"`` (the newest periodic one); ``step``: that
    periodic checkpoint. ITH only: ``span_workdir`` (a span detector for sentences given without spans),
    ``cache_dir`` (default: the workdir's configured cache), ``imagine`` and ``gen_config`` (see the module
    docstring; ``gen_config`` is build_cache's arguments, e.g. ``"configs/gen.py:tiny,tone
    --config.encoder=logmel"``). ``batch_size``: default the config's ``eval_batch_size``."""
    workdir = Path(workdir)
    if which not in ("best", "latest"):
        raise UserError(f"which={which!r}: expected 'best' or 'latest'")
    if which == "latest" and step is None:
        checkpoints = checkpoint_lib.Checkpoints(workdir, read_only=True)
        try:
            step = checkpoints.latest_step("latest")
        finally:
            checkpoints.close()
        if step is None:
            raise UserError(f"{workdir}/checkpoints holds no checkpoint")
    config = trainer_lib.load_workdir_config(workdir)
    if imagine and not gen_config:
        raise UserError("imagine=True needs gen_config: the build_cache arguments the cache was built with "
                        "(e.g. 'configs/gen.py:tiny,tone --config.encoder=logmel')")
    if "audio" not in config and (span_workdir or cache_dir or imagine):
        raise UserError(f"{workdir} is not an audio-fused (ITH) workdir: span_workdir, cache_dir and imagine "
                        "apply to ITH workdirs only")
    if cache_dir is not None:
        with config.unlocked():
            config.audio.cache_dir = str(cache_dir)
    span_predictor = load(span_workdir, batch_size=batch_size) if span_workdir else None
    if span_predictor is not None and span_predictor.kind != "span":
        raise UserError(f"span_workdir {span_workdir} holds a {span_predictor.kind!r} model; expected a span "
                        "detector (trained with configs/span.py)")
    return Predictor(workdir, config, step=step, span_predictor=span_predictor, imagine=imagine,
                     gen_config=gen_config, batch_size=batch_size)


def check_sentences(sentences: Sequence[str]) -> None:
    """Each sentence a string with exactly one ``[MASK]``, else a ``UserError`` naming the first that is not."""
    for number, sentence in enumerate(sentences, 1):
        if not isinstance(sentence, str) or sentence.count(MASK_TOKEN) != 1:
            raise UserError(f"sentence {number} ({str(sentence)[:60]!r}): expected exactly one {MASK_TOKEN}")


class Predictor:
    """A restored workdir's model and the encoding of its training config; see the module docstring."""

    def __init__(self, workdir: Path, config: ml_collections.ConfigDict, *, step: int | None = None,
                 span_predictor: Predictor | None = None, imagine: bool = False, gen_config: str | None = None,
                 batch_size: int | None = None):
        self.workdir, self.config = Path(workdir), config
        self.span_predictor, self.imagine, self.gen_config = span_predictor, imagine, gen_config
        self.tokenizer = trainer_lib.load_workdir_tokenizer(self.workdir, config)
        self.task = tasks_lib.make_task(config, self.tokenizer)
        self.mesh = mesh_lib.make_data_mesh()
        self.batch_size = config.eval_batch_size if batch_size is None else batch_size
        mesh_lib.check_batch_size(self.batch_size, self.mesh, "batch_size")
        self.model = trainer_lib.restore_for_inference(self.workdir, config, self.mesh, step=step)
        self.step = self.model.step
        if config.head == "span":
            self.kind, predict_fn = "span", self.task.predict
        else:
            self.kind = "text" if self.model.spec.fusion is None else "ith"
            predict_fn = functools.partial(self.task.predict, details=True)
        self._predict_step = jax.jit(trainer_lib.make_predict_step(self.model.graphdef, self.model.rest, predict_fn),
                                     out_shardings=mesh_lib.batch_sharded(self.mesh))

    def __repr__(self) -> str:
        return f"Predictor({self.kind}, {self.workdir}, step {self.step})"

    # -- public
    def predict(self, sentences: Sequence[str], *, task: str | None = None, answers: Sequence[str] | None = None,
                spans: Sequence[Sequence[str]] | None = None) -> list[dict]:
        """One record per sentence (docs/api.md): the answer predicted, its probability, the alternatives, the
        spans used and whether each got audio. A span workdir gives the spans it detects instead.

        ``task``: pitch or animal (default: the workdir's). ``answers``: the right answers, when known (then
        ``correct`` is filled in and an animal mask takes the answer's number of pieces, as in evaluation).
        ``spans`` (ITH): each sentence's span texts, instead of the span workdir's detection."""
        sentences = list(sentences)
        for name, given in (("answers", answers), ("spans", spans)):
            if given is not None and len(given) != len(sentences):
                raise UserError(f"{name}: {len(given)} given for {len(sentences)} sentences; expected one each")
        if self.kind == "span":
            return self._detect_records(sentences)
        task = task or self.config.task
        if task not in auditorybench.TASKS:
            raise UserError(f"task={task!r}: expected one of {', '.join(auditorybench.TASKS)}")
        check_sentences(sentences)
        if task == "animal" and answers is None:
            return strict_json(self._predict_animal_unknown(sentences, spans))
        examples = [self._example(task, number, sentence, None if answers is None else answers[number - 1])
                    for number, sentence in enumerate(sentences, 1)]
        records = self._records_for(examples, spans)
        if answers is None:
            for record in records:
                record["answer"] = record["correct"] = None
        return strict_json(records)

    def evaluate_file(self, path: str, *, task: str | None = None, spans: Sequence[str] | None = None,
                      records: bool = True) -> tuple[dict, list[dict]]:
        """(metrics as ``evaluate`` reports them, one record per evaluated row, or none without ``records``) for
        an AuditoryBench file; an ITH workdir takes the rows' spans from the span manifests ``spans``."""
        data_task = self._data_task(spans)
        split = data_task.load(path, task=task)
        outputs = self._run(data_task, split)
        if not records or self.kind == "span":
            return data_task.score(split, outputs), []
        rows = example_records(data_task, split, outputs, workdir=self.workdir, step=self.step, kind=self.kind,
                               manifests=audio_lib.SpanManifests(spans) if self.kind == "ith" else None)
        return data_task.score(split, outputs), rows

    # -- internals
    def _example(self, task: str, number: int, sentence: str, answer: str | None) -> auditorybench.Example:
        if answer is None:  # a stand-in label: pitch needs one of its two words, animal only the piece count
            answer = auditorybench.PITCH_LABELS[0] if task == "pitch" else _PLACEHOLDER_PIECE
        return auditorybench.Example(task=task, source=PREDICT_SOURCE, row=number, sentence=sentence,
                                     answer=answer.strip().lower(), spans=())

    def _predict_animal_unknown(self, sentences: list[str], spans) -> list[dict]:
        """Each sentence with 1 to MAX_ANIMAL_PIECES masks; candidates ranked by mean log-probability per piece."""
        best: list[tuple[float, dict] | None] = [None] * len(sentences)
        pool: list[list[tuple[float, dict]]] = [[] for _ in sentences]
        for pieces in range(1, MAX_ANIMAL_PIECES + 1):
            answer = " ".join([_PLACEHOLDER_PIECE] * pieces)
            examples = [self._example("animal", n, s, answer) for n, s in enumerate(sentences, 1)]
            for i, record in enumerate(self._records_for(examples, spans)):
                if best[i] is None or record["_score"] / pieces > best[i][0]:
                    best[i] = (record["_score"] / pieces, record)
                pool[i] += [(math.log(max(a["probability"], 1e-300)) / pieces, a) for a in record["alternatives"]]
        out = []
        for (_, record), found in zip(best, pool):
            alternatives, seen = [], set()
            for _, candidate in sorted(found, key=lambda c: -c[0]):
                if candidate["answer"] not in seen:
                    seen.add(candidate["answer"])
                    alternatives.append(candidate)
            record.update(answer=None, correct=None, alternatives=alternatives[: tasks_lib.TOP_K])
            out.append(record)
        return out

    def _records_for(self, examples: list[auditorybench.Example], spans) -> list[dict]:
        manifests, data_task = None, self.task
        with tempfile.TemporaryDirectory(prefix="ith_predict_") as tmp:
            if self.kind == "ith":
                manifest = Path(tmp) / "spans.jsonl"
                span_records = self._span_records(examples, spans)
                write_manifest(span_records, manifest)
                self._ensure_audio(span_records, manifest)
                manifests = audio_lib.SpanManifests([str(manifest)])
                data_task = self._data_task([str(manifest)])
            split = data_task.encode(PREDICT_SOURCE, examples)
            if len(split.encoded) != len(examples):
                kept = {row.example.row for row in split.encoded}
                first = next(e for e in examples if e.row not in kept)
                raise UserError(f"sentence {first.row} ({first.sentence[:60]!r}): longer than max_length="
                                f"{self.config.max_length} word pieces")
            outputs = self._run(data_task, split)
            return example_records(data_task, split, outputs, workdir=self.workdir, step=self.step, kind=self.kind,
                                   manifests=manifests, keep_score=True)

    def _data_task(self, spans: Sequence[str] | None):
        """The task that encodes a file's rows: the workdir's, with the span manifests ``spans`` (ITH)."""
        if self.kind != "ith":
            return self.task
        if not spans:
            raise UserError(f"{self.workdir} is an audio-fused (ITH) workdir: give the span manifests of the data "
                            "(python -m ith_jax.detect ... --out MANIFEST)")
        config = ml_collections.ConfigDict(self.config.to_dict())
        config.audio.spans = tuple(str(s) for s in spans)
        data_task = tasks_lib.make_task(config, self.tokenizer)
        data_task.check_audio_source(self.model.spec, where=str(self.workdir))
        return data_task

    def _run(self, data_task, split) -> dict:
        return trainer_lib.predict_split(data_task, split, self.model.params, self._predict_step, self.mesh,
                                         self.batch_size)

    def _span_records(self, examples: list[auditorybench.Example], spans) -> list[dict]:
        """Span-manifest records of the sentences: the given span texts located, else the detector's spans."""
        if spans is not None:
            detected = []
            for example, texts in zip(examples, spans):
                found = []
                for text, where in zip(texts, auditorybench.find_spans(example.sentence, list(texts))):
                    if where is None:
                        raise UserError(f"sentence {example.row}: span {text!r} is not in {example.sentence!r}")
                    found.append({"text": example.sentence[where[0]:where[1]], "start": where[0], "end": where[1],
                                  "confidence": None})
                detected.append(found)
            detector = "given"
        elif self.span_predictor is not None:
            detected = self.span_predictor._detect(examples)
            detector = f"{self.span_predictor.workdir.resolve()}@{self.span_predictor.step}"
        else:
            raise UserError(f"{self.workdir} is an audio-fused (ITH) workdir: load it with span_workdir= (a span "
                            "detector) or pass spans= to predict")
        return [detect_lib.make_record(e, found, detector) for e, found in zip(examples, detected)]

    def _ensure_audio(self, records: list[dict], manifest: Path) -> None:
        """Every span prompt of the manifest ``records`` in the cache: missing ones are an error naming them, or, with
        ``imagine``, generated by build_cache into the cache."""
        cache_dir = self.config.audio.cache_dir
        reader = CacheReader(cache_dir)
        try:
            template = reader.fingerprint.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
            missing = sorted({build_prompt(s["text"], template) for r in records for s in r["spans"]
                              if reader.by_prompt(build_prompt(s["text"], template)) is None})
        finally:
            reader.close()
        if not missing:
            return
        if not self.imagine:
            raise UserError(f"{cache_dir}: {len(missing)} prompt(s) not in the audio cache: "
                            f"{', '.join(repr(p) for p in missing)}; load with imagine=True and gen_config= "
                            "(predict: --imagine --gen-config) to generate them")
        gen_args = shlex.split(self.gen_config)
        if gen_args and not gen_args[0].startswith("-"):  # "configs/gen.py:tiny --config.x=y": the file first
            gen_args.insert(0, "--config")
        command = [sys.executable, "-m", "audio_gen.build_cache", *gen_args,
                   "--config.progress=false", f"--config.spans={manifest}", f"--config.cache_dir={cache_dir}"]
        logger.info("imagining %d prompt(s): %s", len(missing), " ".join(command))
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["(no output)"])[-1]
            raise UserError(f"build_cache for {len(missing)} missing prompt(s) failed (exit {result.returncode}): "
                            f"{last}")

    def _detect(self, examples: list[auditorybench.Example]) -> list[list[dict]]:
        return detect_lib.detect_examples(examples, self.tokenizer, self._predict_step, self.model.params,
                                          self.mesh, buckets=tuple(self.config.buckets),
                                          batch_size=self.batch_size)

    def _detect_records(self, sentences: list[str]) -> list[dict]:
        examples = [auditorybench.Example(task="pitch", source=PREDICT_SOURCE, row=n, sentence=s, answer="",
                                          spans=()) for n, s in enumerate(sentences, 1)]
        rows = detect_lib.encode_for_detection(examples, self.tokenizer, max(self.config.buckets))
        return [{"schema_version": SCHEMA_VERSION, "workdir": str(self.workdir), "step": self.step, "kind": "span",
                 "sentence": example.sentence, "spans": found,
                 "tokens": [self.tokenizer.id_to_token(int(i)) for i in row.input_ids]}
                for example, found, row in zip(examples, self._detect(examples), rows)]


# ---------------------------------------------------------------------------------------------------------
# Per-example records: the one place predictions become the documented format
# ---------------------------------------------------------------------------------------------------------

def example_records(task, split, outputs: dict, *, workdir: Path, step: int, kind: str,
                    manifests: audio_lib.SpanManifests | None = None, keep_score: bool = False) -> list[dict]:
    """One record per row of ``split.encoded`` from ``outputs`` (``MlmTask.predict(details=True)`` per row);
    the fields are documented in docs/api.md. ``keep_score`` adds ``_score`` (the prediction's summed
    log-probability), which ``Predictor`` uses to rank answers of different lengths."""
    tokenizer = task.tokenizer
    spans_of = _SpanInfo(task.audio_table) if kind == "ith" else None
    records = []
    for index, row in enumerate(split.encoded):
        out = outputs["main"][index]
        example = row.example
        n = len(row.mask_positions)
        if split.task == "pitch":
            logits = np.asarray(out["pitch_logits"], np.float64)
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            choice = int(np.argmax(out["pitch_logits"]))  # the metric's rule (ties: lower)
            prediction = auditorybench.PITCH_LABELS[choice]
            alternatives = sorted(({"answer": label, "probability": float(p)}
                                   for label, p in zip(auditorybench.PITCH_LABELS, probs)),
                                  key=lambda a: -a["probability"])
            correct = int(task.pitch_ids[choice]) == int(row.mask_label_ids[0])
            probability, score = float(probs[choice]), float(np.log(probs[choice]))
        else:
            beams = _top_joint(np.asarray(out["top_ids"])[:n], np.asarray(out["top_log_probs"], np.float64)[:n])
            predicted = np.asarray(out["pred_ids"])[:n]
            prediction = tokenizer.decode([int(i) for i in predicted])
            alternatives = [{"answer": tokenizer.decode(list(ids)), "probability": float(np.exp(lp))}
                            for ids, lp in beams]
            correct = bool(np.all(predicted == np.asarray(row.mask_label_ids)[:n]))
            score = float(np.sum(np.asarray(out["top_log_probs"], np.float64)[:n, 0]))
            probability = float(np.exp(score))
        record = {
            "schema_version": SCHEMA_VERSION,
            "id": expected_id(example.task, example.source, example.row),
            "file": example.source, "row": example.row, "task": split.task,
            "workdir": str(workdir), "step": int(step), "kind": kind,
            "sentence": example.sentence, "answer": example.answer, "prediction": prediction, "correct": correct,
            "probability": probability, "alternatives": alternatives,
            "gold_spans": detect_lib.gold_spans_of(example) if example.spans else [],
            "spans": spans_of.of(row, manifests.record_of(example.task, example.source, example.row,
                                                          example.sentence)[0]) if spans_of else [],
            "tokens": [tokenizer.id_to_token(int(i)) for i in row.input_ids],
            "gate": ([round(float(g), 6) for g in np.asarray(out["gate"])[: row.length]] if kind == "ith" else None),
        }
        if keep_score:
            record["_score"] = score
        records.append(record)
    return records


def _top_joint(top_ids: np.ndarray, top_log_probs: np.ndarray) -> list[tuple[tuple[int, ...], float]]:
    """The ``TOP_K`` best joint choices of one piece per mask slot (slots are independent given the input):
    a beam over each slot's top pieces, best first."""
    beams: list[tuple[tuple[int, ...], float]] = [((), 0.0)]
    for ids, log_probs in zip(top_ids, top_log_probs):
        beams = sorted(((b + (int(i),), s + float(lp)) for b, s in beams for i, lp in zip(ids, log_probs)),
                       key=lambda beam: -beam[1])[: len(ids)]
    return beams


class _SpanInfo:
    """What each manifest span of a row became: prompt, cache entry, chosen candidate, whether it was fused."""

    def __init__(self, table: audio_lib.AudioTable):
        self.table = table
        self._entries: dict[str, dict] = {}

    def _entry(self, prompt: str) -> dict:
        if prompt not in self._entries:
            entry = self.table.reader.by_prompt(prompt)
            if entry is None:
                self._entries[prompt] = {"cache_key": None, "candidate": None, "clap_scores": None}
            else:
                scores = np.asarray(entry.clap_scores, np.float64)
                self._entries[prompt] = {
                    "cache_key": entry.key,
                    "candidate": select_candidate(scores, self.table.selection, self.table.threshold),
                    "clap_scores": [None if not math.isfinite(s) else float(s) for s in scores]}
        return self._entries[prompt]

    def of(self, row, manifest_record: dict) -> list[dict]:
        _, mask = self.table.arrays()
        fused = {int(which): bool(index >= 0 and mask[index].any())
                 for which, index in zip(row.span_index, row.audio_index)}
        out = []
        for number, span in enumerate(manifest_record["spans"]):
            prompt = build_prompt(span["text"], self.table.template)
            out.append({"text": span["text"], "start": span["start"], "end": span["end"], "prompt": prompt,
                        "has_audio": fused.get(number, False), **self._entry(prompt)})
        return out


def write_records(records: Sequence[dict], path: str) -> None:
    """The records as JSON Lines, atomically (NaN written as null: the file stays strict JSON)."""
    from ith_common.atomic import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(strict_json(r), ensure_ascii=False) + "\n" for r in records))


def strict_json(value: Any) -> Any:
    """``value`` as strict JSON data: non-finite floats become null, internal ``_`` keys are dropped."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [strict_json(v) for v in value]
    return value
