"""Bucketed batching: static shapes, padding, determinism and resume."""

import time

import numpy as np
import pytest

from ith_common.errors import UserError
from ith_jax.data.auditorybench import Example, load_examples
from ith_jax.data.batching import DEFAULT_BUCKETS, assign_buckets, iterate_batches, num_batches
from ith_jax.data.mlm import encode_mlm
from ith_jax.data.records import EncodedExample
from ith_jax.data.spans import encode_spans


@pytest.fixture
def pitch_train(bench_dir, tok):
    """pitch/train.csv encoded for the MLM and the span detector (synthetic, then real when present)."""
    examples, _ = load_examples(bench_dir / "pitch/train.csv")
    encoded, _ = encode_mlm(examples, tok)
    spans, _ = encode_spans(examples, tok)
    return encoded, spans


def record(i: int, length: int, masks: int = 1, spans: int = 1, labels: bool = False) -> EncodedExample:
    """A synthetic record whose token ids encode (example, position) so mix-ups are visible."""
    ids = (1000 * (i + 1) + np.arange(length)).astype(np.int32)
    return EncodedExample(
        input_ids=ids,
        offsets=np.zeros((length, 2), np.int32),
        special_mask=np.zeros(length, np.int32),
        mask_positions=np.arange(1, 1 + masks, dtype=np.int32),
        mask_label_ids=np.full(masks, 7 + i, np.int32),
        span_token_ranges=np.array([[1, 2 + k] for k in range(spans)], np.int32).reshape(-1, 2),
        span_index=np.arange(spans, dtype=np.int32),
        sentence="x",
        example=Example("pitch", "synthetic", i + 1, "x [MASK]", "lower", ("x", "y")),
        token_labels=(np.arange(length) % 3).astype(np.int32) if labels else None,
    )


@pytest.fixture
def synthetic():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 100, size=203)
    return [record(i, int(n), masks=1 + i % 3, spans=i % 3, labels=True) for i, n in enumerate(lengths)]


def test_smallest_bucket_that_fits(synthetic):
    buckets = (64, 16, 32)  # any order
    chosen = np.array([16, 32, 64])[assign_buckets([record(0, 16), record(1, 17), record(2, 64), record(3, 1)], buckets)]
    assert chosen.tolist() == [16, 32, 64, 16]
    with pytest.raises(UserError, match=r"synthetic row 1: 65 tokens; expected at most the largest bucket 64"):
        assign_buckets([record(0, 65)], buckets)
    with pytest.raises(UserError, match="expected at most the largest bucket"):
        iterate_batches(synthetic, batch_size=8, buckets=(32, 64))


def test_batch_contents_shapes_and_padding(synthetic):
    seen = []
    for batch in iterate_batches(synthetic, batch_size=16, max_masks=4, shuffle=True, seed=3, with_token_labels=True):
        B, L = batch["input_ids"].shape
        assert B == 16 and L in DEFAULT_BUCKETS
        expected = {
            "input_ids": ((B, L), np.int32), "attention_mask": ((B, L), np.int32), "token_type_ids": ((B, L), np.int32),
            "mask_positions": ((B, 4), np.int32), "mask_label_ids": ((B, 4), np.int32), "mask_weights": ((B, 4), np.float32),
            "example_weight": ((B,), np.float32), "example_index": ((B,), np.int32),
            "span_ranges": ((B, 2, 2), np.int32), "span_mask": ((B, 2), np.int32), "token_labels": ((B, L), np.int32),
        }
        assert {k: (v.shape, v.dtype) for k, v in batch.items()} == expected
        for row in range(B):
            index = batch["example_index"][row]
            if index < 0:  # pad row
                assert batch["example_weight"][row] == 0 and batch["attention_mask"][row].sum() == 0
                assert batch["mask_weights"][row].sum() == 0 and batch["span_mask"][row].sum() == 0
                assert (batch["input_ids"][row] == 0).all() and (batch["token_labels"][row] == -100).all()
                continue
            seen.append(index)
            rec = synthetic[index]
            n, m, s = rec.length, len(rec.mask_positions), len(rec.span_token_ranges)
            assert L == min(b for b in DEFAULT_BUCKETS if b >= n)  # the smallest bucket that fits
            assert batch["example_weight"][row] == 1
            assert np.array_equal(batch["input_ids"][row, :n], rec.input_ids) and (batch["input_ids"][row, n:] == 0).all()
            assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (L - n)
            assert np.array_equal(batch["mask_positions"][row, :m], rec.mask_positions)
            assert np.array_equal(batch["mask_label_ids"][row, :m], rec.mask_label_ids)
            assert batch["mask_weights"][row].tolist() == [1.0] * m + [0.0] * (4 - m)
            assert np.array_equal(batch["span_ranges"][row, :s], rec.span_token_ranges)
            assert batch["span_mask"][row].tolist() == [1] * s + [0] * (2 - s)
            assert np.array_equal(batch["token_labels"][row, :n], rec.token_labels)
            assert (batch["token_labels"][row, n:] == -100).all()
    assert sorted(seen) == list(range(len(synthetic)))  # every example exactly once per epoch


def test_num_batches_and_drop_remainder(synthetic):
    for drop in (False, True):
        batches = list(iterate_batches(synthetic, batch_size=16, shuffle=True, seed=1, drop_remainder=drop))
        assert len(batches) == num_batches(synthetic, batch_size=16, drop_remainder=drop)
        if drop:
            assert all((b["example_index"] >= 0).all() for b in batches)
    lengths = np.array([r.length for r in synthetic])
    per_bucket = np.bincount(np.searchsorted(DEFAULT_BUCKETS, lengths), minlength=len(DEFAULT_BUCKETS))
    assert num_batches(synthetic, batch_size=16) == sum(-(-c // 16) for c in per_bucket)
    assert num_batches(synthetic, batch_size=16, drop_remainder=True) == sum(c // 16 for c in per_bucket)


def indices_of(batches):
    return [b["example_index"].tolist() for b in batches]


def test_order_is_a_function_of_seed_and_epoch_and_resume_matches(synthetic):
    def run(**kw):
        return indices_of(iterate_batches(synthetic, batch_size=8, shuffle=True, **kw))

    full = run(seed=5, epoch=2)
    assert full == run(seed=5, epoch=2)
    assert full != run(seed=5, epoch=3) and full != run(seed=6, epoch=2)
    for start in (0, 1, 7, len(full) - 1, len(full)):
        assert run(seed=5, epoch=2, start_batch=start) == full[start:]
    resumed = list(iterate_batches(synthetic, batch_size=8, shuffle=True, seed=5, epoch=2, start_batch=4))
    uninterrupted = list(iterate_batches(synthetic, batch_size=8, shuffle=True, seed=5, epoch=2))[4:]
    for a, b in zip(resumed, uninterrupted, strict=True):
        assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # batches of different buckets are interleaved, not bucket after bucket
    lengths = [b["input_ids"].shape[1] for b in iterate_batches(synthetic, batch_size=8, shuffle=True, seed=5, epoch=2)]
    assert lengths != sorted(lengths)
    # without shuffle: buckets in increasing order, examples in their given order
    plain = list(iterate_batches(synthetic, batch_size=8))
    assert [b["input_ids"].shape[1] for b in plain] == sorted(b["input_ids"].shape[1] for b in plain)
    first_bucket = [i for b in plain if b["input_ids"].shape[1] == 32 for i in b["example_index"] if i >= 0]
    assert first_bucket == sorted(first_bucket)


def test_bad_arguments(synthetic):
    with pytest.raises(UserError, match=r"synthetic row 3: 3 masks; expected at most max_masks=2"):
        iterate_batches(synthetic, batch_size=8, max_masks=2)
    with pytest.raises(UserError, match="spans; expected at most max_spans=1"):
        iterate_batches(synthetic, batch_size=8, max_spans=1)
    with pytest.raises(UserError, match="batch_size 0"):
        iterate_batches(synthetic, batch_size=0)
    with pytest.raises(UserError, match="start_batch -1"):
        iterate_batches(synthetic, batch_size=8, start_batch=-1)
    with pytest.raises(UserError, match="no token labels"):
        iterate_batches([record(0, 10)], batch_size=8, with_token_labels=True)


def test_pitch_train_has_a_handful_of_shapes_and_is_fast(bench_is_real, pitch_train):
    encoded, spans = pitch_train
    start = time.perf_counter()
    batches = list(iterate_batches(encoded, batch_size=32, max_masks=1, shuffle=True, seed=0, epoch=0))
    elapsed = time.perf_counter() - start
    shapes = {b["input_ids"].shape for b in batches}
    lengths = [r.length for r in encoded]
    assert shapes == {(32, min(b for b in DEFAULT_BUCKETS if b >= n)) for n in lengths}
    assert len(batches) == num_batches(encoded, batch_size=32)
    assert sum(int(b["example_weight"].sum()) for b in batches) == len(encoded)
    if bench_is_real:
        assert shapes == {(32, 32), (32, 48)}  # pitch sentences are 14..47 tokens long
        assert len(batches) == 260 and len(encoded) == 8308
    assert elapsed < 5.0, f"one epoch of pitch train took {elapsed:.2f}s"
    # the span ranges in a batch still point at the spans' tokens
    batch = batches[0]
    for row in np.flatnonzero(batch["example_index"] >= 0):
        rec = encoded[batch["example_index"][row]]
        for (s, e), used in zip(batch["span_ranges"][row], batch["span_mask"][row]):
            if used:
                assert np.array_equal(batch["input_ids"][row, s:e], rec.input_ids[s:e])
        label_at_mask = batch["mask_label_ids"][row, 0]
        assert batch["input_ids"][row, batch["mask_positions"][row, 0]] == 103 and label_at_mask in (2896, 3020)
    span_batches = list(iterate_batches(spans, batch_size=32, shuffle=True, seed=0, with_token_labels=True))
    assert {b["token_labels"].shape for b in span_batches} <= shapes
    assert sum(int(((b["token_labels"] == 1) & (b["example_weight"][:, None] > 0)).sum()) for b in span_batches) == 2 * len(spans)
