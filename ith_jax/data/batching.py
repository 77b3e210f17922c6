"""Bucketed, padded, deterministic batches with static shapes for jit.

Every example goes to the smallest bucket (sequence length) that holds it; a batch only holds examples of
one bucket, so a jitted step compiles once per bucket (a handful of shapes) instead of once per length.
Every batch has exactly ``batch_size`` rows: a bucket's last, partial batch is topped up with pad rows
(``example_weight`` 0, ``example_index`` -1, attention all zero), or dropped with ``drop_remainder``.

Order: with ``shuffle`` the examples of each bucket are permuted and then the batches of all buckets are
permuted, both with ``numpy.random.default_rng((seed, epoch))``; the order is a function of the data,
``seed`` and ``epoch`` only. ``start_batch=k`` skips the first k batches of that order without building
them, so a resumed run sees exactly the batches an uninterrupted run would. Without ``shuffle``: buckets
in increasing length, examples in their given order.

``iterate_batches`` yields ``dict[str, np.ndarray]``:

=================  ============  =======  ======================================================
field              shape         dtype    content
=================  ============  =======  ======================================================
input_ids          [B, L]        int32    token ids, ``pad_id`` after the sequence
attention_mask     [B, L]        int32    1 on real tokens
token_type_ids     [B, L]        int32    zeros (single sentences)
mask_positions     [B, M]        int32    token index of each [MASK]; 0 where unused
mask_label_ids     [B, M]        int32    gold piece id at each [MASK]; 0 where unused
mask_weights       [B, M]        float32  1 for real masks, 0 for unused slots and pad rows
example_weight     [B]           float32  1 for real rows, 0 for pad rows
example_index      [B]           int32    index into ``encoded``; -1 for pad rows
span_ranges        [B, S, 2]     int32    (start, end) token range of each gold span found; 0 unused
span_mask          [B, S]        int32    1 for a used span slot
token_labels       [B, L]        int32    BIO tags, -100 ignored (only with ``with_token_labels``)
span_audio_index   [B, S]        int32    audio-table row of each span's audio, -1 none (only with ``with_audio``)
=================  ============  =======  ======================================================

L is the bucket, M = ``max_masks`` (None: the most masks of any example in ``encoded``; pass it
explicitly to keep train and eval shapes equal), S = ``max_spans``.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from ith_common.errors import UserError
from ith_jax.data.records import EncodedExample

DEFAULT_BUCKETS = (32, 48, 64, 96, 128)
IGNORE_LABEL = -100


def _check_buckets(buckets: Sequence[int]) -> np.ndarray:
    array = np.asarray(sorted(set(int(b) for b in buckets)), np.int64)
    if array.size == 0 or array[0] <= 0:
        raise UserError(f"buckets {tuple(buckets)}: expected one or more positive sequence lengths")
    return array


def assign_buckets(encoded: Sequence[EncodedExample], buckets: Sequence[int]) -> np.ndarray:
    """Index (into the sorted buckets) of the smallest bucket that holds each example."""
    sorted_buckets = _check_buckets(buckets)
    lengths = np.fromiter((e.length for e in encoded), np.int64, count=len(encoded))
    bucket_of = np.searchsorted(sorted_buckets, lengths, side="left")
    too_long = np.flatnonzero(bucket_of == sorted_buckets.size)
    if too_long.size:
        first = encoded[int(too_long[0])]
        raise UserError(
            f"{first.example.where}: {first.length} tokens; expected at most the largest bucket "
            f"{int(sorted_buckets[-1])} ({too_long.size} example(s) too long; encode with a smaller max_length "
            f"or add a bucket)"
        )
    return bucket_of


def _plan(
    encoded: Sequence[EncodedExample],
    batch_size: int,
    buckets: Sequence[int],
    shuffle: bool,
    seed: int,
    epoch: int,
    drop_remainder: bool,
) -> list[tuple[int, np.ndarray]]:
    """The epoch's batches as (bucket length, example indices), in iteration order."""
    if batch_size <= 0:
        raise UserError(f"batch_size {batch_size}: expected a positive integer")
    sorted_buckets = _check_buckets(buckets)
    bucket_of = assign_buckets(encoded, sorted_buckets)
    rng = np.random.default_rng((int(seed), int(epoch))) if shuffle else None
    batches = []
    for b, length in enumerate(sorted_buckets):
        members = np.flatnonzero(bucket_of == b)
        if rng is not None:
            members = rng.permutation(members)
        stop = (members.size // batch_size) * batch_size if drop_remainder else members.size
        for begin in range(0, stop, batch_size):
            batches.append((int(length), members[begin : begin + batch_size]))
    if rng is not None:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def num_batches(
    encoded: Sequence[EncodedExample],
    *,
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    drop_remainder: bool = False,
) -> int:
    """Batches per epoch (the same for every seed and epoch)."""
    if batch_size <= 0:
        raise UserError(f"batch_size {batch_size}: expected a positive integer")
    counts = np.bincount(assign_buckets(encoded, buckets), minlength=len(_check_buckets(buckets)))
    per_bucket = counts // batch_size if drop_remainder else -(-counts // batch_size)
    return int(per_bucket.sum())


def _validate(encoded, max_masks: int, max_spans: int, with_token_labels: bool, with_audio: bool) -> None:
    for e in encoded:
        if e.mask_positions.shape[0] > max_masks:
            raise UserError(f"{e.example.where}: {e.mask_positions.shape[0]} masks; expected at most max_masks={max_masks}")
        if e.span_token_ranges.shape[0] > max_spans:
            raise UserError(
                f"{e.example.where}: {e.span_token_ranges.shape[0]} spans; expected at most max_spans={max_spans}"
            )
        if with_token_labels and e.token_labels is None:
            raise UserError(f"{e.example.where}: no token labels; expected records from encode_spans")
        if with_audio and getattr(e, "audio_index", None) is None:
            raise UserError(f"{e.example.where}: no audio indices; expected records from ith_jax.data.audio")


def _build(encoded, indices: np.ndarray, batch_size: int, length: int, max_masks: int, max_spans: int,
           with_token_labels: bool, pad_id: int, with_audio: bool = False) -> dict[str, np.ndarray]:
    batch = {
        "input_ids": np.full((batch_size, length), pad_id, np.int32),
        "attention_mask": np.zeros((batch_size, length), np.int32),
        "token_type_ids": np.zeros((batch_size, length), np.int32),
        "mask_positions": np.zeros((batch_size, max_masks), np.int32),
        "mask_label_ids": np.zeros((batch_size, max_masks), np.int32),
        "mask_weights": np.zeros((batch_size, max_masks), np.float32),
        "example_weight": np.zeros((batch_size,), np.float32),
        "example_index": np.full((batch_size,), -1, np.int32),
        "span_ranges": np.zeros((batch_size, max_spans, 2), np.int32),
        "span_mask": np.zeros((batch_size, max_spans), np.int32),
    }
    if with_token_labels:
        batch["token_labels"] = np.full((batch_size, length), IGNORE_LABEL, np.int32)
    if with_audio:
        batch["span_audio_index"] = np.full((batch_size, max_spans), -1, np.int32)
    for row, index in enumerate(indices):
        record = encoded[index]
        n = record.length
        masks = record.mask_positions.shape[0]
        spans = record.span_token_ranges.shape[0]
        batch["input_ids"][row, :n] = record.input_ids
        batch["attention_mask"][row, :n] = 1
        batch["mask_positions"][row, :masks] = record.mask_positions
        batch["mask_label_ids"][row, :masks] = record.mask_label_ids
        batch["mask_weights"][row, :masks] = 1.0
        batch["span_ranges"][row, :spans] = record.span_token_ranges
        batch["span_mask"][row, :spans] = 1
        if with_token_labels:
            batch["token_labels"][row, :n] = record.token_labels
        if with_audio:
            batch["span_audio_index"][row, :spans] = record.audio_index
    batch["example_weight"][: len(indices)] = 1.0
    batch["example_index"][: len(indices)] = indices
    return batch


def iterate_batches(
    encoded: Sequence[EncodedExample],
    *,
    batch_size: int,
    buckets: Sequence[int] = DEFAULT_BUCKETS,
    max_masks: int | None = None,
    max_spans: int = 2,
    shuffle: bool = False,
    seed: int = 0,
    epoch: int = 0,
    start_batch: int = 0,
    drop_remainder: bool = False,
    with_token_labels: bool = False,
    with_audio: bool = False,
    pad_id: int = 0,
) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of padded batches (see the module docstring for order, shapes and fields).

    Arguments are checked here, before the first batch is asked for, so errors surface at the call."""
    if start_batch < 0:
        raise UserError(f"start_batch {start_batch}: expected a non-negative batch number")
    if max_masks is None:
        max_masks = max(1, max((e.mask_positions.shape[0] for e in encoded), default=1))
    _validate(encoded, max_masks, max_spans, with_token_labels, with_audio)
    plan = _plan(encoded, batch_size, buckets, shuffle, seed, epoch, drop_remainder)
    return (
        _build(encoded, indices, batch_size, length, max_masks, max_spans, with_token_labels, pad_id, with_audio)
        for length, indices in plan[start_batch:]
    )
