"""Where the fused LM's audio comes from (ith_jax/data/audio.py): span manifests matched to rows, prompts looked up
in a real tiny cache built by the real commands, candidate selection, max_spans, the shuffle control, and the
model spec / config keys of the audio variant. In-process, apart from building the inputs."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ith_common.config import load_config
from ith_common.errors import UserError
from ith_common.manifest import read_manifest, write_manifest
from ith_jax import model_spec as model_spec_lib
from ith_jax import trainer as trainer_lib
from ith_jax.data import audio as audio_lib
from ith_jax.data import auditorybench, batching, mlm
from ith_jax.data.tokenizer import load_tokenizer
from tests.trainer_utils import DATA_DIR, REPO

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

ROWS = 24  # pitch dev rows in the small data file: 47 spans, 45 distinct prompts


def build_inputs(root: Path, *, max_prompts: int = 0) -> dict:
    """A small pitch file, its gold span manifest (ith_jax.detect --gold) and an unscored tone cache
    (audio_gen.build_cache, tiny + tone + logmel, CLAP skipped): the real commands, as a user runs them."""
    root.mkdir(parents=True, exist_ok=True)
    data = root / "small.csv"
    data.write_text("".join((DATA_DIR / "pitch" / "dev.csv").read_text().splitlines(keepends=True)[: ROWS + 1]))
    manifest, cache = root / "spans.jsonl", root / "cache"
    for command in ([sys.executable, "-m", "ith_jax.detect", "--gold", "--data", str(data), "--out", str(manifest)],
                    [sys.executable, "-m", "audio_gen.build_cache", "--config", "configs/gen.py:tiny,tone",
                     "--config.encoder=logmel", "--config.clap_scoring=false", "--config.num_candidates=2",
                     "--config.progress=false", f"--config.max_prompts={max_prompts}", f"--config.spans={manifest}",
                     f"--config.cache_dir={cache}"]):
        result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    return {"data": data, "manifest": manifest, "cache": cache, "root": root}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("audio_inputs"))


@pytest.fixture(scope="module")
def encoded(inputs):
    from configs.common import minilm_path
    tokenizer = load_tokenizer(minilm_path())
    examples, _ = auditorybench.load_examples(str(inputs["data"]), "pitch")
    rows, _ = mlm.encode_mlm(examples, tokenizer)
    return rows


def table(inputs, selection="first", **kwargs):
    return audio_lib.AudioTable(str(inputs["cache"]), selection=selection, threshold=kwargs.pop("threshold", 0.0),
                                allow_missing=kwargs.pop("allow_missing", False))


def test_spans_come_from_the_manifest_not_the_csv(inputs, encoded, tmp_path):
    records = read_manifest(inputs["manifest"])
    records[0]["spans"] = records[0]["spans"][1:]  # the detector found only the second span of row 1
    edited = tmp_path / "edited.jsonl"
    write_manifest(records, edited)
    rows, stats = audio_lib.attach_audio(encoded, audio_lib.SpanManifests([str(edited)]), table(inputs),
                                         max_spans=2)
    assert stats.rows == ROWS and stats.spans == 46 and stats.with_audio == 46
    assert len(rows[0].span_token_ranges) == 1
    start, end = rows[0].span_token_ranges[0]
    span = records[0]["spans"][0]
    tokens = rows[0].offsets[start:end]
    assert tokens[0][0] == span["start"] and tokens[-1][1] == span["end"]
    assert np.array_equal(rows[1].span_token_ranges, encoded[1].span_token_ranges)  # gold manifest == gold columns


def test_a_row_without_a_manifest_record_names_file_and_row(inputs, encoded, tmp_path):
    records = read_manifest(inputs["manifest"])
    partial = tmp_path / "partial.jsonl"
    write_manifest([r for r in records if r["row"] != 5], partial)
    with pytest.raises(UserError, match=rf"^{inputs['data']} row 5: no record in the span manifests {partial}"):
        audio_lib.attach_audio(encoded, audio_lib.SpanManifests([str(partial)]), table(inputs), max_spans=2)


def test_a_manifest_written_elsewhere_matches_by_file_name_and_row(inputs, encoded, tmp_path):
    records = read_manifest(inputs["manifest"])
    for record in records:
        record["source"] = "some/other/checkout/small.csv"
    moved = tmp_path / "moved.jsonl"
    write_manifest(records, moved)
    rows, stats = audio_lib.attach_audio(encoded, audio_lib.SpanManifests([str(moved)]), table(inputs),
                                         max_spans=2)
    assert stats.with_audio == 47


def test_missing_prompt_is_an_error_with_the_command_or_a_counted_pass_through(tmp_path, encoded):
    partial = build_inputs(tmp_path / "partial", max_prompts=40)
    manifests = audio_lib.SpanManifests([str(partial["manifest"])])
    with pytest.raises(UserError) as error:
        audio_lib.attach_audio(encoded, manifests, table(partial), max_spans=2)
    message = str(error.value)
    assert "\n" not in message
    # encoded's rows are of the module's small.csv; this manifest (same file name) matches them by id.
    assert re.match(r"^\S+/small\.csv row \d+: span '[^']+' \(prompt '[^']+ sound'\) is not in the audio cache ",
                    message), message
    assert (f"python -m audio_gen.build_cache --config configs/gen.py[:the cache's variant] "
            f"--config.spans={partial['manifest']} --config.cache_dir={partial['cache']}") in message
    rows, stats = audio_lib.attach_audio(encoded, manifests, table(partial, allow_missing=True), max_spans=2)
    assert stats.missing > 0 and stats.with_audio + stats.missing == 47
    assert sum(int(np.sum(r.audio_index < 0)) for r in rows) == stats.missing


def test_selection_rules_on_an_unscored_cache(inputs, encoded):
    manifests = audio_lib.SpanManifests([str(inputs["manifest"])])
    for rule in ("first_above", "best"):  # NaN scores never qualify: every span passes through, counted
        rows, stats = audio_lib.attach_audio(encoded, manifests, table(inputs, rule, threshold=-1.0), max_spans=2)
        assert (stats.with_audio, stats.rejected) == (0, 47)
        assert all(np.all(r.audio_index == -1) for r in rows)
    rows, stats = audio_lib.attach_audio(encoded, manifests, table(inputs, "first"), max_spans=2)
    assert (stats.with_audio, stats.rejected) == (47, 0)
    with pytest.raises(UserError, match="audio.selection='random'"):
        table(inputs, "random")


def test_max_spans_drops_and_counts_and_batches_gather_the_table(inputs, encoded):
    audio = table(inputs)
    rows, stats = audio_lib.attach_audio(encoded, audio_lib.SpanManifests([str(inputs["manifest"])]), audio,
                                         max_spans=1)
    assert stats.dropped == 23 and stats.with_audio == 24  # row 12 has one gold span only
    batch = next(batching.iterate_batches(rows, batch_size=32, buckets=(64,), max_spans=1, with_audio=True))
    audio_lib.gather_audio(batch, audio)
    tokens, mask = audio.arrays()
    distinct = {int(r.audio_index[0]) for r in rows}  # only the prompts of kept spans are loaded
    assert tokens.dtype == np.float16 and tokens.shape == (len(distinct) + 1, 4, 64)  # + the padding row
    assert batch["audio_tokens"].shape == (32, 1, 4, 64) and batch["audio_mask"].shape == (32, 1, 4)
    assert np.array_equal(batch["audio_tokens"][0, 0], tokens[rows[0].audio_index[0]])
    assert batch["span_has_audio"][:24].all() and not batch["span_has_audio"][24:].any()  # pad rows
    assert not batch["audio_mask"][24:].any()


def test_shuffle_permutes_audio_across_spans(inputs, encoded):
    manifests = audio_lib.SpanManifests([str(inputs["manifest"])])
    rows, _ = audio_lib.attach_audio(encoded, manifests, table(inputs), max_spans=2)
    before = [r.audio_index.copy() for r in rows]
    audio_lib.shuffle_audio(rows, seed=0)
    after = [r.audio_index for r in rows]
    flat_before, flat_after = np.concatenate(before), np.concatenate(after)
    assert sorted(flat_before) == sorted(flat_after) and not np.array_equal(flat_before, flat_after)
    again, _ = audio_lib.attach_audio(encoded, manifests, table(inputs), max_spans=2)
    audio_lib.shuffle_audio(again, seed=0)
    assert all(np.array_equal(a.audio_index, b) for a, b in zip(again, after))  # a fixed seed


# ------------------------------------------------------------------------------------------------ spec and config

def tiny_config(variant="tiny,pitch", *overrides):
    config, _ = load_config(["--config", f"{REPO / 'configs' / 'lm.py'}:{variant}", *overrides])
    return config


def test_without_audio_the_model_is_the_text_only_lm():
    config = tiny_config()
    assert "audio" not in config and config.lr_schedule == "linear"
    spec = model_spec_lib.spec_from_config(config, "mlm")
    assert spec.fusion is None and spec.to_dict()["fusion"] is None
    from ith_jax.models import bert
    built = model_spec_lib.build_model(spec, seed=3)
    reference = bert.BertForMaskedLM(spec.bert_config, rngs=nnx.Rngs(params=3))
    assert type(built) is bert.BertForMaskedLM
    mine, theirs = nnx.to_pure_dict(nnx.state(built, nnx.Param)), nnx.to_pure_dict(nnx.state(reference, nnx.Param))
    assert jax.tree.structure(mine) == jax.tree.structure(theirs)
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(mine), jax.tree.leaves(theirs)))
    ids = np.array([[101, 2023, 103, 102]], np.int32)
    np.testing.assert_array_equal(built(ids, np.ones_like(ids)), reference(ids, np.ones_like(ids)))


def test_fused_spec_round_trips_and_keeps_the_lm_initialisation():
    config = tiny_config("tiny,pitch,audio", "--config.fusion_layer=1")
    assert config.lr_schedule == "cosine"
    spec = model_spec_lib.spec_from_config(config, "mlm", audio_dim=64)
    assert spec.fusion["audio_dim"] == 64 and spec.fusion["fusion_layer"] == 1
    assert spec.fusion["num_heads"] == 2 and spec.fusion["intermediate_size"] == 128  # resolved: the LM's
    again = model_spec_lib.ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())), source="test")
    assert again == spec and not again.differences(spec)
    fused = model_spec_lib.build_model(spec, seed=3)
    text = model_spec_lib.build_model(dataclass_replace(spec, fusion=None), seed=3)
    lm, reference = nnx.to_pure_dict(nnx.state(fused.mlm, nnx.Param)), nnx.to_pure_dict(nnx.state(text, nnx.Param))
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(lm), jax.tree.leaves(reference)))
    with pytest.raises(UserError, match="fusion_layer=3; expected 0"):
        model_spec_lib.spec_from_config(tiny_config("tiny,pitch,audio", "--config.fusion_layer=3"), "mlm",
                                        audio_dim=64)
    with pytest.raises(UserError, match="fusion is set for head 'token_classification'"):
        model_spec_lib.ModelSpec(head="token_classification", bert=spec.bert, num_labels=3, fusion=spec.fusion)


def dataclass_replace(spec, **changes):
    import dataclasses
    return dataclasses.replace(spec, **changes)


@pytest.mark.parametrize("override, message", [
    ("--config.audio.selection=random", "config key audio.selection='random': expected one of 'first_above', "
                                        "'best', 'first'"),
    ("--config.audio.max_spans=0", "config key audio.max_spans=0: expected an integer >= 1"),
    ("--config.audio.clap_threshold=2.0", "config key audio.clap_threshold=2.0: expected a finite number in [-1, 1]"),
    ("--config.lr_schedule=step", "config key lr_schedule='step': expected one of 'linear', 'cosine'"),
])
def test_audio_keys_are_validated(override, message):
    config = tiny_config("tiny,pitch,audio", "--config.audio.spans=a.jsonl", "--config.audio.cache_dir=c", override)
    with pytest.raises(UserError, match="^" + message.replace("[", r"\[").replace("(", r"\(") + "$"):
        trainer_lib.validate_config(config)


def test_audio_spans_are_required():
    with pytest.raises(UserError, match=r"^config key audio.spans=\(\): expected one or more file paths$"):
        trainer_lib.validate_config(tiny_config("tiny,pitch,audio"))


def test_cosine_schedule_warms_up_then_decays_to_zero():
    config = tiny_config("tiny,pitch,audio")
    schedule = trainer_lib.learning_rate_schedule(config, 100)
    peak = config.learning_rate
    assert float(schedule(10)) == pytest.approx(peak)
    assert float(schedule(55)) == pytest.approx(peak * 0.5, rel=1e-5)  # half way through the cosine
    assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)
    linear = trainer_lib.learning_rate_schedule(tiny_config(), 100)
    assert float(linear(55)) == pytest.approx(peak * 0.5, rel=1e-5) and float(linear(30)) != float(schedule(30))
