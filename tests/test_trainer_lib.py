"""The trainer library in-process: config validation, the model spec, batch shapes, checkpoint fingerprints and the
checkpoint fallback (real Orbax checkpoints of small pytrees in tmp_path)."""

from __future__ import annotations

import json
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ith_common.config import load_config_file
from ith_common.errors import TrainingDiverged, UserError
from ith_jax import checkpoint as checkpoint_lib
from ith_jax import tasks as tasks_lib
from ith_jax import trainer as trainer_lib
from ith_jax.model_spec import ModelSpec, build_model
from tests.trainer_utils import REPO

TINY_BERT = dict(vocab_size=100, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)


def _config(spec: str = "configs/lm.py:tiny") -> ml_collections.ConfigDict:
    return load_config_file(str(REPO / spec.split(":")[0]) + ":" + spec.split(":")[1])


# -- config validation

def _leaf_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += _leaf_keys(value, f"{prefix}{key}.")
        else:
            keys.append(prefix + key)
    return keys


@pytest.mark.parametrize("spec", ["configs/lm.py:tiny", "configs/lm.py:minilm,animal", "configs/span.py:tiny"])
def test_every_trainer_key_has_a_range_check_and_the_shipped_configs_pass(spec):
    config = _config(spec)
    assert set(_leaf_keys(config)) <= set(trainer_lib.CONFIG_CHECKS), \
        set(_leaf_keys(config)) - set(trainer_lib.CONFIG_CHECKS)
    trainer_lib.validate_config(config)


@pytest.mark.parametrize("key, bad", [
    ("num_epochs", 0), ("train_files", ()), ("dev_files", ("",)), ("eval_files", ()), ("checkpoint_every_steps", 0),
    ("log_every_steps", 0), ("keep_checkpoints", 0), ("warmup_ratio", -1.0), ("warmup_ratio", 1.5),
    ("learning_rate", float("inf")), ("learning_rate", 0.0), ("batch_size", 0), ("eval_batch_size", -8),
    ("max_steps", -1), ("seed", -1), ("adam_b2", 1.0), ("adam_eps", 0.0), ("max_grad_norm", float("nan")),
    ("weight_decay", -0.1), ("max_length", 2), ("buckets", (32, 0)), ("dtype", "float16"), ("head", "cls"),
    ("task", "both"), ("text_model", " "), ("model.hidden_size", 0), ("max_train_examples", -1),
    ("distributed.num_processes", 0), ("distributed.process_id", 1), ("max_length", 129), ("progress_bar", "yes"),
])
def test_an_out_of_range_key_is_one_error_naming_it(key, bad):
    config = _config()
    node, leaf = config, key
    if "." in key:
        group, leaf = key.split(".")
        node = config[group]
    with node.unlocked(), node.ignore_type():  # a config file may set any type; overrides are type-checked
        node[leaf] = bad
    with pytest.raises(UserError) as error:
        trainer_lib.validate_config(config)
    message = str(error.value)
    assert key in message and "\n" not in message, message


def test_resume_values_must_match_and_the_message_names_the_keys(tmp_path):
    config = _config()
    saved = trainer_lib.resume_values(config)
    trainer_lib.check_resume_values(saved, config, tmp_path)  # the same config resumes
    with config.unlocked():
        config.batch_size, config.seed, config.learning_rate = 16, 3, 1e-3
    with pytest.raises(UserError) as error:
        trainer_lib.check_resume_values(saved, config, tmp_path)
    message = str(error.value)
    assert "batch_size=8 (checkpoint) vs 16 (config)" in message and "seed=0 (checkpoint) vs 3" in message
    assert "learning_rate" not in message.split("a resume needs")[0]  # a new learning rate may resume


# -- the model spec

def test_model_spec_round_trips_through_json_and_builds_its_model():
    spec = ModelSpec(head="token_classification", bert=TINY_BERT, dtype="bfloat16", num_labels=3)
    again = ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict())), source="test")
    assert again == spec and again.differences(spec) == []
    model = build_model(again, seed=0)
    _, params, _ = trainer_lib.split_model(model)
    assert params["classifier"]["kernel"].shape == (16, 3)
    mlm = ModelSpec(head="mlm", bert=dict(TINY_BERT, hidden_size=32))
    assert ("head", "token_classification", "mlm") in spec.differences(mlm)
    assert ("bert.hidden_size", 16, 32) in spec.differences(mlm)


@pytest.mark.parametrize("values, expected", [
    ({"head": "mlm"}, "lacks ['bert']"),
    ({"head": "mlm", "bert": TINY_BERT, "colour": 1}, "unknown keys ['colour']"),
    ({"head": "span", "bert": TINY_BERT}, "head='span'"),
    ({"head": "token_classification", "bert": TINY_BERT}, "num_labels=None"),
    ({"head": "mlm", "bert": dict(TINY_BERT, hidden_size=15)}, "hidden_size=15"),
    ({"head": "mlm", "bert": TINY_BERT, "fusion": {"layer": 1}}, "fusion"),
])
def test_a_bad_stored_spec_is_one_error_naming_its_source(values, expected):
    with pytest.raises(UserError) as error:
        ModelSpec.from_dict(values, source="checkpoint W/best/3")
    assert str(error.value).startswith("checkpoint W/best/3: ") and expected in str(error.value), str(error.value)


# -- batch shapes

def test_mlm_batch_shapes_depend_on_the_rows_batched_not_on_what_was_loaded_before(data_dir, tok):
    config = _config("configs/lm.py:tiny,animal")
    dev, train = str(data_dir / "animal" / "dev.csv"), str(data_dir / "animal" / "train.csv")

    def shapes(task, rows):
        return [{k: v.shape for k, v in batch.items()} for batch in task.batches(rows, batch_size=16, shuffle=False)]

    alone = tasks_lib.MlmTask(config, tok)
    dev_alone = alone.load(dev, max_examples=100)
    after_train = tasks_lib.MlmTask(config, tok)
    train_split = after_train.load(train, max_examples=100)
    dev_after = after_train.load(dev, max_examples=100)
    # The train rows need more mask slots than these dev rows: sharing one running maximum would show.
    def most(rows):
        return max(len(r.mask_positions) for r in rows)

    assert most(train_split.encoded) > max(most(dev_alone.encoded), most(dev_alone.choices))
    assert shapes(alone, dev_alone.encoded) == shapes(after_train, dev_after.encoded)
    assert shapes(alone, dev_alone.choices) == shapes(after_train, dev_after.choices)


# -- checkpoint fingerprints and fallback

def test_checksums_see_one_flipped_bit_and_a_swap_and_finiteness_sees_nan():
    tree = {"w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4), "count": jnp.int32(7)}
    checksums, finite = checkpoint_lib.fingerprint(tree)
    assert finite and set(checksums) == {"['w']", "['count']"}
    bits = np.asarray(tree["w"]).view(np.uint32).copy()
    bits[1, 2] ^= 1 << 30
    flipped = dict(tree, w=jnp.asarray(bits.view(np.float32)))
    assert checkpoint_lib.fingerprint(flipped)[0]["['w']"] != checksums["['w']"]
    swapped = dict(tree, w=tree["w"].at[0, 0].set(1.0).at[0, 1].set(0.0))
    assert checkpoint_lib.fingerprint(swapped)[0]["['w']"] != checksums["['w']"]
    assert checkpoint_lib.fingerprint(dict(tree, w=tree["w"].at[2, 3].set(jnp.nan)))[1] is False


def _state(value: float) -> dict:
    return {"params": {"w": jnp.full((64, 8), value, jnp.float32) + jnp.arange(8.0)}, "step": jnp.int32(7)}


def test_checkpoints_keep_the_newest_and_fall_back_past_a_damaged_one(tmp_path):
    checkpoints = checkpoint_lib.Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3):
        checkpoints.save(step, _state(step), {"step": step})
    assert checkpoints.all_steps() == [2, 3]
    with pytest.raises(TrainingDiverged):
        checkpoints.save(4, _state(np.nan), {"step": 4})
    assert checkpoints.all_steps() == [2, 3]
    # Silent damage: step 3's arrays replaced by step 2's (a valid Orbax tree, the wrong values).
    shutil.rmtree(tmp_path / "checkpoints" / "3" / "state")
    shutil.copytree(tmp_path / "checkpoints" / "2" / "state", tmp_path / "checkpoints" / "3" / "state")
    state, meta, step = checkpoints.restore_newest(_state(0))
    assert step == 2 and meta["step"] == 2 and float(state["params"]["w"][0, 0]) == 2.0
    assert (tmp_path / "damaged" / "checkpoints-3").is_dir() and checkpoints.all_steps() == [2]
    checkpoints.save(3, _state(3), {"step": 3})  # the step can be written again
    assert checkpoints.all_steps() == [2, 3]
    checkpoints.close()


def test_a_refusing_check_stops_the_search_and_moves_nothing(tmp_path):
    checkpoints = checkpoint_lib.Checkpoints(tmp_path, keep=2)
    checkpoints.save(1, _state(1), {"model": "a"})

    def refuse(meta, where):
        raise UserError(f"{where}: another model")

    with pytest.raises(UserError, match="another model"):
        checkpoints.restore_newest(_state(0), check_meta=refuse)
    assert checkpoints.all_steps() == [1] and not (tmp_path / "damaged").exists()
    checkpoints.close()


def test_restore_for_inference_needs_only_the_workdir(tmp_path):
    spec = ModelSpec(head="mlm", bert=TINY_BERT)
    _, params, _ = trainer_lib.split_model(build_model(spec, seed=1))
    checkpoints = checkpoint_lib.Checkpoints(tmp_path)
    checkpoints.save(5, {"params": params}, {"model_spec": spec.to_dict()}, which="best")
    checkpoints.close()
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("data",))
    restored = trainer_lib.restore_for_inference(tmp_path, _config(), mesh)
    assert restored.step == 5 and restored.spec == spec
    for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
