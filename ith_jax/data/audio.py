"""Where the fused LM's audio comes from: span manifests matched to rows, prompts looked up in the audio cache,
one candidate chosen per span, all held in host memory once.

- ``SpanManifests``: the span manifests (``ith_jax.detect``'s output, or ``--gold`` for the oracle-span
  ablation) indexed by (file, row). Spans come from here, never from the CSV's gold columns. A row without a
  record is a ``UserError`` naming the file and row.
- ``AudioTable``: the selected candidates of every distinct prompt, ``tokens [N, T, D]`` float16 and
  ``mask [N, T]``, filled from the cache through the numpy-only ``ith_common.cache.CacheReader``. The prompt
  is ``ith_common.prompts.build_prompt`` with the cache's own template (from its fingerprint); the candidate
  is chosen with ``ith_common.selection`` (``first_above``: ITH's rule, ``best``, ``first``: unscored caches).
- ``attach_audio``: per encoded row, the manifest's spans as token ranges and the table index of each span's
  audio (-1: none), as ``AudioExample`` records the batcher pads (``span_ranges``, ``span_audio_index``).
- ``gather_audio``: a batch's audio tokens ``[B, S, T, D]`` gathered from the table on the host.

numpy and the standard library only (no JAX): the batches are built on the host.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from ith_common.cache import CacheReader
from ith_common.errors import UserError
from ith_common.manifest import expected_id, read_manifest
from ith_common.prompts import DEFAULT_PROMPT_TEMPLATE, build_prompt
from ith_common.selection import RULES, select_candidate
from ith_jax.data.records import EncodedExample, span_token_range
from ith_jax.data.tokenizer import MASK_TOKEN

logger = logging.getLogger("ith_jax")


def _resolved(path: str) -> str:
    return str(Path(path).resolve())


class SpanManifests:
    """Every record of some span manifests, found by (data file, row).

    A record matches a row when its ``source`` is the same file (compared as resolved paths), or, for a manifest
    written from another working directory, when its id ``<task>/<file name>:<row>`` is the row's and no other
    source of the manifests has that id (two different ``dev.csv`` files never get mixed up)."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [str(p) for p in paths]
        self._by_path: dict[tuple[str, int], tuple[dict, str]] = {}
        self._by_id: dict[str, list[tuple[dict, str]]] = {}
        for path in self.paths:
            for record in read_manifest(path):
                self._by_path[(_resolved(record["source"]), record["row"])] = (record, path)
                self._by_id.setdefault(record["id"], []).append((record, path))

    def record_of(self, task: str, source: str, row: int, sentence: str) -> tuple[dict, str]:
        """The (record, manifest path) of ``source`` row ``row``; ``UserError`` if there is none or it is for
        another sentence."""
        found = self._by_path.get((_resolved(source), row))
        if found is None:
            candidates = self._by_id.get(expected_id(task, source, row), [])
            if len({_resolved(r["source"]) for r, _ in candidates}) == 1:
                found = candidates[0]
        if found is None:
            raise UserError(f"{source} row {row}: no record in the span manifests {', '.join(self.paths)}; "
                            f"expected one per row (write it with: python -m ith_jax.detect --data {source} ...)")
        record, path = found
        if record["sentence"] != sentence:
            raise UserError(f"{path}: record {record['id']} has the sentence {record['sentence'][:60]!r}; expected "
                            f"{source} row {row}'s {sentence[:60]!r} (a manifest of another version of the file?)")
        return found


@dataclasses.dataclass
class AudioStats:
    """What happened to the spans of one split (all counts are spans, except ``rows``)."""

    rows: int = 0
    spans: int = 0
    with_audio: int = 0
    rejected: int = 0  # every candidate rejected by the selection rule: passes through unchanged
    missing: int = 0  # prompt not in the cache, passed through with audio.allow_missing
    not_located: int = 0  # the span's characters cover no token (e.g. cut off): no slot
    dropped: int = 0  # beyond audio.max_spans

    def summary(self) -> str:
        return (f"{self.rows} rows, {self.spans} spans: {self.with_audio} with audio, {self.rejected} with every "
                f"candidate rejected, {self.missing} missing from the cache (allow_missing), {self.not_located} "
                f"not located in the tokens, {self.dropped} beyond max_spans (dropped)")


class AudioTable:
    """The chosen candidate of every prompt looked up so far, in host memory (float16 tokens + mask)."""

    def __init__(self, cache_dir: str, *, selection: str, threshold: float, allow_missing: bool):
        if selection not in RULES:
            raise UserError(f"config key audio.selection={selection!r}: expected one of {', '.join(RULES)}")
        self.cache_dir = str(cache_dir)
        self.selection, self.threshold, self.allow_missing = selection, float(threshold), allow_missing
        self.reader = CacheReader(cache_dir)
        self.template = self.reader.fingerprint.get("prompt_template", DEFAULT_PROMPT_TEMPLATE)
        self._index: dict[str, int] = {}  # prompt -> row of the table, -1 when every candidate is rejected
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []
        self._stacked: tuple[np.ndarray, np.ndarray] | None = None

    def close(self) -> None:
        self.reader.close()

    def lookup(self, span_text: str, *, where: str, manifest: str) -> int | None:
        """The table row of the span's chosen candidate; -1 if every candidate is rejected; None if the prompt
        is not in the cache and ``allow_missing`` (without it: ``UserError`` naming the span and the fix)."""
        prompt = build_prompt(span_text, self.template)
        if prompt in self._index:
            return self._index[prompt]
        entry = self.reader.by_prompt(prompt)
        if entry is None:
            if self.allow_missing:
                return None
            raise UserError(
                f"{where}: span {span_text!r} (prompt {prompt!r}) is not in the audio cache {self.cache_dir}; "
                f"fill it with: python -m audio_gen.build_cache --config configs/gen.py[:the cache's variant] "
                f"--config.spans={manifest} --config.cache_dir={self.cache_dir} "
                "(or set --config.audio.allow_missing=true to pass such spans through without audio)")
        choice = select_candidate(entry.clap_scores, self.selection, self.threshold)
        if choice is None:
            self._index[prompt] = -1
            return -1
        mask = (np.ones(entry.tokens.shape[1], bool) if entry.token_mask is None
                else np.asarray(entry.token_mask[choice], bool))
        self._tokens.append(np.asarray(entry.tokens[choice], np.float16))
        self._masks.append(mask)
        self._stacked = None
        self._index[prompt] = len(self._tokens) - 1
        return self._index[prompt]

    @property
    def encoder_settings(self) -> dict:
        """The cache's encoder settings (its fingerprint's ``encoder``)."""
        return dict(self.reader.fingerprint.get("encoder", {}))

    @property
    def stores_features(self) -> bool:
        """True when the cache holds AST filterbank features (build_cache ``encoder=ast_fbank``) for a trained
        AST, rather than frozen audio tokens."""
        return self.encoder_settings.get("stores") == "features"

    @property
    def audio_dim(self) -> int:
        """D of the cache's tokens (from its fingerprint when nothing is loaded yet)."""
        if self._tokens:
            return int(self._tokens[0].shape[-1])
        encoder = self.reader.fingerprint.get("encoder", {})
        for key in self.reader.keys()[:1]:
            return int(self.reader.get(key).tokens.shape[-1])
        raise UserError(f"{self.cache_dir}: the audio cache is empty; expected tokens of {encoder or 'an encoder'}")

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """``tokens [N + 1, T, D]`` float16 and ``mask [N + 1, T]``; the last row is all padding (index -1)."""
        if self._stacked is None:
            dim = self.audio_dim
            length = max([1, *(t.shape[0] for t in self._tokens)])
            tokens = np.zeros((len(self._tokens) + 1, length, dim), np.float16)
            mask = np.zeros((len(self._tokens) + 1, length), bool)
            for i, (t, m) in enumerate(zip(self._tokens, self._masks)):
                tokens[i, : t.shape[0]] = t
                mask[i, : m.shape[0]] = m
            self._stacked = tokens, mask
        return self._stacked


@dataclasses.dataclass
class AudioExample(EncodedExample):
    """An encoded row whose ``span_token_ranges`` are the manifest's spans, with ``audio_index [k]``: the
    ``AudioTable`` row of each span's audio (-1: none)."""

    audio_index: np.ndarray | None = None


def _char_shift(record: EncodedExample) -> tuple[int, int]:
    """(position after the [MASK] in the original sentence, characters added there by mask expansion)."""
    original = record.example.sentence
    mask_end = original.find(MASK_TOKEN)
    return (mask_end + len(MASK_TOKEN) if mask_end >= 0 else len(original)), len(record.sentence) - len(original)


def attach_audio(encoded: Sequence[EncodedExample], manifests: SpanManifests, table: AudioTable, *,
                 max_spans: int) -> tuple[list[AudioExample], AudioStats]:
    """The rows with their manifest spans and audio (see the module docstring)."""
    stats = AudioStats()
    out = []
    for record in encoded:
        example = record.example
        manifest_record, manifest_path = manifests.record_of(example.task, example.source, example.row,
                                                             example.sentence)
        stats.rows += 1
        after_mask, added = _char_shift(record)
        ranges, indices, which = [], [], []
        for span_number, span in enumerate(manifest_record["spans"]):
            stats.spans += 1
            if len(ranges) >= max_spans:
                stats.dropped += 1
                continue
            start, end = (p + added if p >= after_mask else p for p in (span["start"], span["end"]))
            token_range = span_token_range(record.offsets, start, end)
            if token_range is None:
                stats.not_located += 1
                continue
            index = table.lookup(span["text"], where=f"{example.source} row {example.row}", manifest=manifest_path)
            if index is None:
                stats.missing += 1
                index = -1
            elif index < 0:
                stats.rejected += 1
            else:
                stats.with_audio += 1
            ranges.append(token_range)
            indices.append(index)
            which.append(span_number)
        fields = {f.name: getattr(record, f.name) for f in dataclasses.fields(EncodedExample)}
        fields.update(span_token_ranges=np.asarray(ranges, np.int32).reshape(-1, 2),
                      span_index=np.asarray(which, np.int32))  # which of the record's spans each slot holds
        out.append(AudioExample(**fields, audio_index=np.asarray(indices, np.int32)))
    return out, stats


def shuffle_audio(rows: Sequence[AudioExample], seed: int) -> None:
    """The control: the audio of the spans that have some is permuted across them (fixed ``seed``), so each
    span hears another span's sound; which spans have audio does not change."""
    slots = [(i, j) for i, row in enumerate(rows) for j in np.flatnonzero(row.audio_index >= 0)]
    values = np.asarray([rows[i].audio_index[j] for i, j in slots], np.int32)
    permuted = np.random.default_rng(seed).permutation(values)
    for (i, j), value in zip(slots, permuted):
        rows[i].audio_index[j] = value


def gather_audio(batch: dict[str, np.ndarray], table: AudioTable) -> None:
    """Adds ``audio_tokens [B, S, T, D]`` float16, ``audio_mask [B, S, T]`` and ``span_has_audio [B, S]`` to a
    batch from its ``span_audio_index [B, S]`` (-1: no audio; those read the table's padding row)."""
    tokens, mask = table.arrays()
    index = batch["span_audio_index"]
    has_audio = index >= 0
    row = np.where(has_audio, index, tokens.shape[0] - 1)
    batch["audio_tokens"] = tokens[row]
    batch["audio_mask"] = mask[row]
    batch["span_has_audio"] = has_audio.astype(np.int32)
