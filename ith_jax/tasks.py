"""What the one trainer trains: a *task* bundles a model head, its data, its loss and its metrics.

The trainer (``ith_jax/train.py``) only ever talks to this interface, so the span detector and, later, the
audio-fused LM reuse the same loop, checkpointing, data parallelism and logging:

- ``load(path)`` -> ``Split``: examples read from one AuditoryBench file and encoded for this head.
- ``batches(rows, ...)`` / ``num_batches(rows, ...)``: static-shape numpy batches (bucketed lengths). Shapes are
  a function of the rows batched and the config only, never of which other files were loaded before.
- ``model_spec()``: the ``ModelSpec`` of the model this config trains (``ith_jax.model_spec.build_model``
  builds it; the spec is stored in every checkpoint).
- ``loss(model, batch, rng)`` -> ``(loss, aux)``: traced inside the jitted train step.
- ``predict(model, batch)`` -> dict of arrays: traced inside the jitted eval step.
- ``score(split, outputs)`` -> metrics: host-side, from the predictions of every batch of a split.

``MlmTask`` with a config's ``audio`` keys (``configs/lm.py:...,audio``) is the ITH fusion LM: its rows take
their spans from the span manifests and their audio from the cache (``ith_jax.data.audio``), its model spec
carries the fusion config, and its metrics add how many spans got audio and the fusion gate's mean on them.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from ith_jax.data import audio as audio_lib
from ith_jax.data import auditorybench, batching, mlm, spans
from ith_jax.models.fusion import span_token_owner
from ith_common.errors import UserError
from ith_jax import model_spec as model_spec_lib

logger = logging.getLogger("ith_jax")

TOP_K = 5  # candidates per mask slot in MlmTask.predict(details=True)


@dataclasses.dataclass
class Split:
    """One data file, loaded and encoded for a task."""

    path: str
    task: str  # "pitch" | "animal"
    examples: list
    encoded: list
    report: Any = None
    choices: list | None = None  # animal multiple choice: one encoded row per (example, option)
    audio_stats: Any = None  # the fused LM: what happened to the split's spans (audio.AudioStats)


def resolve_data_path(config: ml_collections.ConfigDict, path_template: str, task: str | None = None) -> str:
    """``{task}/dev.csv`` relative to data_dir -> a concrete path (absolute paths and ./paths are kept)."""
    path = path_template.format(task=task or config.task)
    candidate = Path(path)
    if candidate.is_absolute() or candidate.exists():
        return str(candidate)
    return str(Path(config.data_dir) / path)


def check_encoded(path: str, examples: list, encoded: list, max_length: int, report) -> None:
    """A file whose every row was dropped while encoding (e.g. all longer than max_length) is an error, not an
    empty split with meaningless metrics."""
    if not encoded:
        raise UserError(f"{path}: none of its {len(examples)} usable rows is left after encoding with "
                        f"max_length={max_length} ({report.summary()}); raise --config.max_length")


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    logits = logits.astype(jnp.float32)
    log_probs = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probs, labels[..., None], axis=-1)[..., 0]


class MlmTask:
    """Masked-LM on AuditoryBench: loss and predictions at the [MASK] positions only."""

    head = "mlm"
    main_metric = "accuracy"

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        self.config = config
        self.tokenizer = tokenizer
        # (lower, higher): their logits at the mask decide a pitch prediction. encode_mlm checks that each
        # is one word piece of the vocabulary before any pitch row is used.
        self.pitch_ids = np.asarray([tokenizer.token_to_id(w) or 0 for w in auditorybench.PITCH_LABELS], np.int32)
        self.fused = "audio" in config
        self._manifests: audio_lib.SpanManifests | None = None
        self._audio: audio_lib.AudioTable | None = None

    # -- audio (the fused LM only)
    @property
    def audio_table(self) -> audio_lib.AudioTable:
        if self._audio is None:
            audio = self.config.audio
            self._audio = audio_lib.AudioTable(audio.cache_dir, selection=audio.selection,
                                               threshold=audio.clap_threshold, allow_missing=audio.allow_missing)
        return self._audio

    def _attach_audio(self, path: str, rows: list) -> tuple[list, audio_lib.AudioStats]:
        if self._manifests is None:
            self._manifests = audio_lib.SpanManifests(self.config.audio.spans)
        rows, stats = audio_lib.attach_audio(rows, self._manifests, self.audio_table,
                                             max_spans=self.config.audio.max_spans)
        if self.config.audio.shuffle:
            audio_lib.shuffle_audio(rows, self.config.seed)
        return rows, stats

    # -- data
    def load(self, path: str, *, task: str | None = None, max_examples: int = 0) -> Split:
        examples, report = auditorybench.load_examples(path, task, strict=self.config.strict_data)
        logger.info("%s: %s", path, report.summary())
        if max_examples:
            examples = examples[:max_examples]
        if not examples:
            raise UserError(f"{path}: no usable rows")
        return self.encode(path, examples, report=report)

    def encode(self, path: str, examples: list, *, report: Any = None) -> Split:
        """A ``Split`` of ``examples`` (of one task) encoded for this model: what ``load`` does after reading
        the file; ``ith_jax.api`` calls it for sentences that come from no file."""
        split_task = examples[0].task
        encoded, encode_report = mlm.encode_mlm(examples, self.tokenizer,
                                                          max_length=self.config.max_length,
                                                          strict=self.config.strict_data)
        logger.info("%s: %s", path, encode_report.summary())
        check_encoded(path, examples, encoded, self.config.max_length, encode_report)
        choices = None
        if (split_task == "animal" and self.config.get("multiple_choice", False)
                and any(e.options is not None for e in examples)):
            choices, _ = mlm.encode_choices(examples, self.tokenizer, max_length=self.config.max_length)
        audio_stats = None
        if self.fused:
            encoded, audio_stats = self._attach_audio(path, encoded)
            logger.info("%s: audio: %s", path, audio_stats.summary())
            if choices:
                choices, _ = self._attach_audio(path, choices)
        return Split(path=path, task=split_task, examples=examples, encoded=encoded, report=report,
                     choices=choices, audio_stats=audio_stats)

    def batches(self, rows: list, *, batch_size: int, shuffle: bool, epoch: int = 0,
                start_batch: int = 0) -> Iterator[dict]:
        # Mask slots M: the most masks of any row of `rows` (an animal answer's word pieces), so the shapes
        # depend on these rows alone, not on what else was loaded.
        max_masks = max([1, *(len(row.mask_positions) for row in rows)])
        if not self.fused:
            return batching.iterate_batches(rows, batch_size=batch_size, buckets=tuple(self.config.buckets),
                                            max_masks=max_masks, shuffle=shuffle, seed=self.config.seed,
                                            epoch=epoch, start_batch=start_batch)
        return self._with_audio(batching.iterate_batches(
            rows, batch_size=batch_size, buckets=tuple(self.config.buckets), max_masks=max_masks,
            max_spans=self.config.audio.max_spans, shuffle=shuffle, seed=self.config.seed, epoch=epoch,
            start_batch=start_batch, with_audio=True))

    def _with_audio(self, batches: Iterator[dict]) -> Iterator[dict]:
        for batch in batches:
            audio_lib.gather_audio(batch, self.audio_table)
            yield batch

    def num_batches(self, rows: list, *, batch_size: int) -> int:
        return batching.num_batches(rows, batch_size=batch_size, buckets=tuple(self.config.buckets))

    def train_rows(self, split: Split) -> list:
        return split.encoded

    def eval_row_sets(self, split: Split) -> dict[str, list]:
        sets = {"main": split.encoded}
        if split.choices:
            sets["choices"] = split.choices
        return sets

    # -- model
    def model_spec(self) -> model_spec_lib.ModelSpec:
        if not self.fused:
            return model_spec_lib.spec_from_config(self.config, "mlm")
        spec = model_spec_lib.spec_from_config(self.config, "mlm", audio_dim=self.audio_table.audio_dim)
        self.check_audio_source(spec)
        return spec

    def check_audio_source(self, spec: model_spec_lib.ModelSpec, where: str | None = None) -> None:
        """The cache must hold what the fused model ``spec`` consumes: frozen tokens of its audio width, or
        filterbank features made by the feature extractor of its trained AST (same mel bins and frames).
        ``where`` (a workdir) names the checkpoint in the errors."""
        table, encoder = self.audio_table, self.config.audio.get("encoder", "cached")
        settings = table.encoder_settings
        if encoder == "cached" and table.stores_features:
            raise UserError(f"config key audio.encoder='cached': the audio cache {table.cache_dir} holds AST "
                            "filterbank features (build_cache encoder=ast_fbank), not audio tokens; set "
                            "--config.audio.encoder=ast_trainable to train an AST on them")
        if encoder == "cached" and table.audio_dim != spec.fusion["audio_dim"]:
            raise UserError(f"{table.cache_dir}: audio tokens of width {table.audio_dim}; the model"
                            + (f" in {where}" if where else "") + f" takes width {spec.fusion['audio_dim']}")
        if encoder == "ast_trainable":
            if not table.stores_features:
                raise UserError(
                    f"config key audio.encoder='ast_trainable': the audio cache {table.cache_dir} holds frozen "
                    f"{settings.get('name', 'encoder')!r} tokens; it needs AST filterbank features: "
                    "python -m audio_gen.build_cache --config configs/gen.py:...,fbank")
            ast = spec.ast_config
            cached = {"num_mel_bins": settings.get("num_mel_bins"), "max_length": settings.get("max_length")}
            wanted = {"num_mel_bins": ast.num_mel_bins, "max_length": ast.max_length}
            if cached != wanted:
                raise UserError(f"config key audio.ast_model={self.config.audio.ast_model!r}: the AST takes "
                                f"{wanted} but the features in {table.cache_dir} are {cached}; build the cache with "
                                "that AST's feature extractor (build_cache --config.encoder_model)")

    def _logits(self, model, batch, *, deterministic: bool, rng=None, return_gate: bool = False):
        rngs = None if deterministic else nnx.Rngs(dropout=rng)
        if not self.fused:
            return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                         positions=batch["mask_positions"], deterministic=deterministic, rngs=rngs)
        return model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                     audio_tokens=batch["audio_tokens"], audio_mask=batch["audio_mask"],
                     span_ranges=batch["span_ranges"], span_mask=batch["span_mask"],
                     span_has_audio=batch["span_has_audio"], positions=batch["mask_positions"],
                     deterministic=deterministic, rngs=rngs, return_gate=return_gate)

    def loss(self, model, batch, rng) -> tuple[jax.Array, dict]:
        logits = self._logits(model, batch, deterministic=False, rng=rng)
        nll = _cross_entropy(logits, batch["mask_label_ids"])
        weights = batch["mask_weights"] * batch["example_weight"][:, None]
        loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)
        return loss, {}

    def predict(self, model, batch, *, details: bool = False) -> dict:
        """The predictions ``score`` needs; with ``details`` also what a per-example dump shows
        (``ith_jax.api``): the top ``TOP_K`` pieces and their log-probabilities at every mask, and (fused) the
        fusion gate per token."""
        extra = {}
        if self.fused:
            logits, gate = self._logits(model, batch, deterministic=True, return_gate=True)
            # The tokens that took audio (the model's own rule: a used slot with accepted, non-empty audio).
            fused = batch["span_mask"].astype(bool) & batch["span_has_audio"].astype(bool) & jnp.any(
                batch["audio_mask"], axis=-1)
            on_span = span_token_owner(batch["span_ranges"], fused, gate.shape[1]) >= 0
            extra = {"gate_sum": jnp.sum(jnp.where(on_span, gate, 0.0), axis=1),  # [B]
                     "gate_count": jnp.sum(on_span, axis=1).astype(jnp.int32)}  # [B]
        else:
            logits = self._logits(model, batch, deterministic=True)
        logits = logits.astype(jnp.float32)
        log_probs = jax.nn.log_softmax(logits, axis=-1)
        label_log_prob = jnp.take_along_axis(log_probs, batch["mask_label_ids"][..., None], axis=-1)[..., 0]
        if details:
            top_log_probs, top_ids = jax.lax.top_k(log_probs, TOP_K)
            extra.update(top_ids=top_ids.astype(jnp.int32), top_log_probs=top_log_probs)  # [B, M, TOP_K]
            if self.fused:
                extra["gate"] = gate  # [B, L]: the gate's mean over hidden units, 0 on tokens that took no audio
        return {
            "pred_ids": jnp.argmax(logits, axis=-1).astype(jnp.int32),  # [B, M]
            "label_log_prob": label_log_prob,  # [B, M], for multiple choice
            "pitch_logits": logits[:, 0, :][:, self.pitch_ids],  # [B, 2]: (lower, higher) at the first mask
            **extra,
        }

    # -- metrics
    def score(self, split: Split, outputs: dict[str, dict[int, dict]]) -> dict:
        """``outputs[set_name][row_index]`` holds that row's predictions (numpy)."""
        main = outputs["main"]
        correct = []
        for index, row in enumerate(split.encoded):
            out = main[index]
            n = len(row.mask_positions)
            if split.task == "pitch":
                predicted = self.pitch_ids[int(np.argmax(out["pitch_logits"]))]
                correct.append(int(predicted) == int(row.mask_label_ids[0]))
            else:  # every word piece of the answer must be right
                correct.append(bool(np.all(out["pred_ids"][:n] == np.asarray(row.mask_label_ids)[:n])))
        metrics = {"accuracy": float(np.mean(correct)), "num_examples": len(correct)}
        if split.audio_stats is not None:
            gate_count = sum(int(main[i]["gate_count"]) for i in range(len(split.encoded)))
            gate_sum = sum(float(main[i]["gate_sum"]) for i in range(len(split.encoded)))
            metrics.update(spans=split.audio_stats.spans, spans_with_audio=split.audio_stats.with_audio,
                           gate_mean=gate_sum / gate_count if gate_count else float("nan"))
        if "choices" in outputs:
            metrics["multiple_choice_accuracy"] = self._choice_accuracy(split, outputs["choices"])
        return metrics

    def _choice_accuracy(self, split: Split, outputs: dict[int, dict]) -> float:
        """Each option is scored by the summed log-probability of its word pieces at its own masks; the
        best-scoring option is the prediction, right if it is the row's ``Answer`` letter."""
        best: dict[tuple[str, int], tuple[float, int, Any]] = {}
        for index, row in enumerate(split.choices):
            n = len(row.mask_positions)
            score = float(np.sum(outputs[index]["label_log_prob"][:n]))
            key = (row.example.source, row.example.row)
            if key not in best or score > best[key][0]:
                best[key] = (score, row.choice, row.example)
        right = [auditorybench.OPTION_LETTERS[choice] == example.option_answer
                 for _, choice, example in best.values()]
        return float(np.mean(right)) if right else float("nan")


class SpanTask:
    """The auditory-span detector: BIO tags over word pieces (see ith_jax/data/spans.py for the scheme)."""

    head = "span"
    main_metric = "token_f1"
    num_labels = spans.NUM_TAGS

    def __init__(self, config: ml_collections.ConfigDict, tokenizer):
        self.config = config
        self.tokenizer = tokenizer

    def load(self, path: str, *, task: str | None = None, max_examples: int = 0) -> Split:
        examples, report = auditorybench.load_examples(path, None if task == "both" else task,
                                                       strict=self.config.strict_data)
        logger.info("%s: %s", path, report.summary())
        if max_examples:
            examples = examples[:max_examples]
        if not examples:
            raise UserError(f"{path}: no usable rows")
        encoded, span_report = spans.encode_spans(examples, self.tokenizer, max_length=self.config.max_length)
        logger.info("%s: %s", path, span_report.summary())
        check_encoded(path, examples, encoded, self.config.max_length, span_report)
        return Split(path=path, task=examples[0].task, examples=examples, encoded=encoded, report=report)

    def batches(self, rows: list, *, batch_size: int, shuffle: bool, epoch: int = 0,
                start_batch: int = 0) -> Iterator[dict]:
        return batching.iterate_batches(rows, batch_size=batch_size, buckets=tuple(self.config.buckets),
                                        max_masks=1, shuffle=shuffle, seed=self.config.seed, epoch=epoch,
                                        start_batch=start_batch, with_token_labels=True)

    def num_batches(self, rows: list, *, batch_size: int) -> int:
        return batching.num_batches(rows, batch_size=batch_size, buckets=tuple(self.config.buckets))

    def train_rows(self, split: Split) -> list:
        return split.encoded

    def eval_row_sets(self, split: Split) -> dict[str, list]:
        return {"main": split.encoded}

    def model_spec(self) -> model_spec_lib.ModelSpec:
        return model_spec_lib.spec_from_config(self.config, "token_classification", num_labels=self.num_labels)

    def loss(self, model, batch, rng) -> tuple[jax.Array, dict]:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
                       deterministic=False, rngs=nnx.Rngs(dropout=rng))
        labels = batch["token_labels"]
        valid = (labels >= 0) & (batch["example_weight"][:, None] > 0)
        nll = _cross_entropy(logits, jnp.where(valid, labels, 0))
        weights = valid.astype(jnp.float32)
        return jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0), {}

    def predict(self, model, batch) -> dict:
        logits = model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"], deterministic=True)
        return {"tag_probs": jax.nn.softmax(logits.astype(jnp.float32), axis=-1)}  # [B, L, 3]

    def score(self, split: Split, outputs: dict[str, dict[int, dict]]) -> dict:
        """Token-level P/R/F1 of the span class and span-level exact match on character offsets."""
        predictions = outputs["main"]
        pred_tags, gold_tags, pred_spans, gold_spans = [], [], [], []
        for index, row in enumerate(split.encoded):
            probs = predictions[index]["tag_probs"][: row.length]
            pred_tags.append(np.argmax(probs, axis=-1))
            gold_tags.append(row.token_labels)
            pred_spans.append(spans.extract_spans(probs, row.offsets, row.sentence, row.special_mask))
            gold = spans.extract_spans(np.eye(spans.NUM_TAGS)[np.maximum(row.token_labels, 0)], row.offsets,
                                       row.sentence, row.special_mask)
            gold_spans.append(gold)
        token = spans.token_prf(np.concatenate(pred_tags), np.concatenate(gold_tags))
        exact = spans.span_prf(pred_spans, gold_spans)
        return {"token_precision": token["precision"], "token_recall": token["recall"], "token_f1": token["f1"],
                "span_precision": exact["precision"], "span_recall": exact["recall"], "span_f1": exact["f1"],
                "num_examples": len(split.encoded)}


def make_task(config: ml_collections.ConfigDict, tokenizer):
    if config.head == "mlm":
        return MlmTask(config, tokenizer)
    if config.head == "span":
        return SpanTask(config, tokenizer)
    raise UserError(f"head={config.head!r}: expected 'mlm' or 'span'")
