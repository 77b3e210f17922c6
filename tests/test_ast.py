"""The Flax AST (``ith_jax.models.ast``) against Hugging Face transformers and the sidecar's frozen encoder.

References are random transformers ``ASTModel`` / ``ASTForAudioClassification`` models written with
``save_pretrained`` (safetensors) and read back through ``load_pretrained_ast``. Every reference parameter is
perturbed before saving, so that the zero-initialised [CLS]/distillation/position tensors and the ones/zeros
LayerNorms cannot hide a mapping mistake (a swapped scale/bias, an untransposed square kernel, a transposed
patch kernel).
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from safetensors.numpy import load_file, save_file

from ith_common.errors import UserError
from ith_jax.models import ast as ast_lib
from ith_jax.models.ast import AstAudioEncoder, AstConfig, AstModel, ast_hf_state_dict, load_pretrained_ast
from tests.trainer_utils import REPO

# fp32: the two implementations differ only in summation order. Measured max abs diff on last_hidden_state:
# tiny <= 7.2e-7 (2 configs x 2 seeds), full size 6.2e-6 (LayerNorm outputs are O(1)).
FP32_TOLERANCE = 1e-4
# Gradients: max |jax - torch| per tensor <= 1e-4 x that tensor's max |torch| (measured relative error
# <= 7.8e-7 tiny, <= 1.04e-5 full size). Except the key biases: their gradient is exactly zero (softmax is
# shift-invariant per query), so both sides must be ~0 instead: measured |g| <= 5.6e-6 at full size, where the
# largest gradient is 434 (1.3e-8 of it); required <= 1e-6 of the model's largest gradient.
GRAD_RELATIVE_TOLERANCE = 1e-4
ZERO_GRADIENT_TOLERANCE = 1e-6
# bf16 compute (fp32 params, LayerNorm/softmax/activation and the residual stream in fp32) against fp32 on the
# tiny model: measured max abs diff 0.008-0.013 on O(1) outputs (8 mantissa bits per matmul input); full size
# 0.037 (not tested: 12 layers compound it).
BF16_TOLERANCE = 5e-2
# remat recomputes the same ops in the backward pass: identical up to XLA's fusion choices (outputs absolute,
# gradients relative to each tensor's max).
REMAT_TOLERANCE = 1e-6

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37, num_mel_bins=32,
            max_length=64, patch_size=16,
            # nonzero on purpose: both sides must compare in eval (deterministic) mode
            hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1)
STRIDES = {"strides10x10": dict(frequency_stride=10, time_stride=10), "strides6x12": dict(frequency_stride=6,
                                                                                          time_stride=12)}


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            noise = torch.randn(parameter.shape, generator=generator)
            matrix = name.endswith("weight") and parameter.ndim >= 2
            parameter.add_((0.02 if matrix else 0.1) * noise)
    return model.eval()


def _save(model: torch.nn.Module, directory) -> str:
    model.save_pretrained(directory)
    return str(directory)


def _features(config: AstConfig, batch: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(batch, config.max_length, config.num_mel_bins)).astype(np.float32)


def _reference(torch_model, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return torch_model(torch.from_numpy(features)).last_hidden_state.numpy()


@pytest.fixture(scope="module", params=sorted(STRIDES))
def tiny(request, tmp_path_factory):
    torch.manual_seed(0)
    torch_model = _perturbed(transformers.ASTModel(transformers.ASTConfig(**TINY, **STRIDES[request.param])), 1)
    directory = _save(torch_model, tmp_path_factory.mktemp("tiny_ast"))
    return torch_model, directory


def _loss_weights(config: AstConfig, batch: int) -> np.ndarray:
    return np.random.default_rng(7).normal(size=(batch, config.num_tokens, config.hidden_size)).astype(np.float32)


def _jax_gradients(model: AstModel, features: np.ndarray, weights: np.ndarray) -> dict[str, np.ndarray]:
    """d sum(last_hidden_state * weights) / d params, under the Hugging Face names (via a model holding them)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        return jnp.sum(nnx.merge(graphdef, p, rest)(jnp.asarray(features)) * weights)

    grads = jax.jit(jax.grad(loss))(params)
    return ast_hf_state_dict(nnx.merge(graphdef, grads, rest))


def _torch_gradients(torch_model, features: np.ndarray, weights: np.ndarray, directory) -> dict[str, np.ndarray]:
    """The same with torch autograd, named by save_pretrained (a copy of the model holding the gradients), so
    that no name mapping of the code under test is used on the reference side."""
    torch_model.zero_grad()
    hidden = torch_model(torch.from_numpy(features)).last_hidden_state
    (hidden * torch.from_numpy(weights)).sum().backward()
    holder = copy.deepcopy(torch_model)
    with torch.no_grad():
        for (name, parameter), (_, source) in zip(holder.named_parameters(), torch_model.named_parameters()):
            parameter.copy_(source.grad)
    holder.save_pretrained(directory)
    torch_model.zero_grad()
    return load_file(f"{directory}/model.safetensors")


def _gradient_errors(ours: dict, theirs: dict, names) -> dict[str, float]:
    """Per tensor: its error in units of the allowed one (a value above 1 fails); see the tolerances above."""
    largest = max(float(np.abs(gradient).max()) for gradient in theirs.values())
    errors = {}
    for name in names:
        if name.endswith(".attention.attention.key.bias"):
            errors[name] = max(np.abs(ours[name]).max(), np.abs(theirs[name]).max()) / (
                ZERO_GRADIENT_TOLERANCE * largest)
        else:
            errors[name] = np.abs(ours[name] - theirs[name]).max() / (
                GRAD_RELATIVE_TOLERANCE * np.abs(theirs[name]).max())
    return {name: float(error) for name, error in errors.items()}


# --- config ---------------------------------------------------------------------------------------------------

def test_defaults_are_the_audioset_checkpoint():
    config = AstConfig()
    assert (config.frequency_patches, config.time_patches, config.num_tokens) == (12, 101, 1214)
    shared = REPO.parent / "shared" / "model_configs" / "ast_audioset.json"
    if shared.is_file():
        values = json.loads(shared.read_text())["config.json"]
        assert AstConfig.from_hf_config(values, source=str(shared)) == config
    # transformers' own defaults are the same architecture
    assert AstConfig.from_hf_config(transformers.ASTConfig().to_dict(), source="ASTConfig()") == config
    assert AstConfig.from_dict(config.to_dict()) == config
    assert AstConfig.from_dict({"hidden_dropout_prob": 0}).to_dict()["hidden_dropout_prob"] == 0.0


@pytest.mark.parametrize("values, message", [
    ({"hidden_size": "768"}, "AST config: field hidden_size='768': expected an integer"),
    ({"qkv_bias": 1}, "field qkv_bias=1: expected true or false"),
    ({"num_attention_heads": 5}, "field hidden_size=768: expected a multiple of num_attention_heads=5"),
    ({"hidden_act": "swish"}, "field hidden_act='swish': expected one of"),
    ({"hidden_dropout_prob": 1.0}, r"field hidden_dropout_prob=1.0: expected a number in \[0, 1\)"),
    ({"num_mel_bins": 8}, "field num_mel_bins=8: expected at least patch_size=16"),
    ({"time_stride": 0}, "field time_stride=0: expected an integer >= 1"),
    ({"num_labels": 527}, "AST config: unknown field 'num_labels'"),
])
def test_config_errors_are_one_line(values, message):
    with pytest.raises(UserError, match=message) as error:
        AstConfig.from_dict(values)
    assert "\n" not in str(error.value)


def test_from_hf_config_ignores_bookkeeping_and_checks_model_type():
    values = {**AstConfig(hidden_size=64, num_attention_heads=4).to_dict(),
              "architectures": ["ASTForAudioClassification"], "num_labels": 3, "id2label": {"0": "a"},
              "torch_dtype": "float32", "model_type": "audio-spectrogram-transformer"}
    assert AstConfig.from_hf_config(values, source="x").hidden_size == 64
    with pytest.raises(UserError, match="x: field model_type='bert': expected 'audio-spectrogram-transformer'"):
        AstConfig.from_hf_config({**values, "model_type": "bert"}, source="x")


# --- parity with transformers ------------------------------------------------------------------------------------

def test_tiny_parity_and_dtypes(tiny):
    torch_model, directory = tiny
    model, info = load_pretrained_ast(directory)
    assert info.ignored == [] and info.config.frequency_stride == torch_model.config.frequency_stride
    features = _features(info.config, batch=3)
    reference = _reference(torch_model, features)
    output = model(jnp.asarray(features))
    assert output.dtype == jnp.float32 and output.shape == reference.shape == (3, info.config.num_tokens, 32)
    assert np.abs(np.asarray(output) - reference).max() < FP32_TOLERANCE
    # float16 features (how the cache stores them) are upcast, not rejected
    half = features.astype(np.float16)
    assert np.abs(np.asarray(model(jnp.asarray(half))) - _reference(torch_model, half.astype(np.float32))).max() \
        < FP32_TOLERANCE
    # bf16 compute stays close to fp32 and still returns float32
    bf16, _ = load_pretrained_ast(directory, dtype=jnp.bfloat16)
    low = bf16(jnp.asarray(features))
    assert low.dtype == jnp.float32
    assert np.abs(np.asarray(low) - reference).max() < BF16_TOLERANCE


def test_tiny_gradient_parity(tiny, tmp_path):
    torch_model, directory = tiny
    model, info = load_pretrained_ast(directory)
    features, weights = _features(info.config, batch=2, seed=3), _loss_weights(info.config, 2)
    ours = _jax_gradients(model, features, weights)
    theirs = _torch_gradients(torch_model, features, weights, tmp_path / "grads")
    assert set(ours) == set(theirs)  # every parameter, by name
    errors = _gradient_errors(ours, theirs, theirs)
    assert max(errors.values()) <= 1.0, errors


def _jitted(model: AstModel):
    """``model(features, deterministic=key is None, rngs=key)`` compiled (eager NNX calls dispatch op by op)."""
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda s, x, key: nnx.merge(graphdef, s)(x, deterministic=key is None, rngs=key))
    return lambda features, key=None: np.asarray(forward(state, jnp.asarray(features), key))


def test_remat_gives_the_same_outputs_gradients_and_dropout(tiny):
    _, directory = tiny
    plain, info = load_pretrained_ast(directory)
    remat, _ = load_pretrained_ast(directory, remat=True)
    features, weights = _features(info.config, batch=2, seed=4), _loss_weights(info.config, 2)
    run_plain, run_remat = _jitted(plain), _jitted(remat)
    assert np.abs(run_plain(features) - run_remat(features)).max() < REMAT_TOLERANCE
    ours, checkpointed = _jax_gradients(plain, features, weights), _jax_gradients(remat, features, weights)
    for name in ours:  # relative: XLA fuses the recomputation differently (measured <= 2.2e-7 of the max)
        assert np.abs(ours[name] - checkpointed[name]).max() <= REMAT_TOLERANCE * np.abs(ours[name]).max() + 1e-7
    # remat really is in the program: each layer is a checkpointed sub-computation
    graphdef, state = nnx.split(remat)
    program = jax.make_jaxpr(lambda s, x: nnx.merge(graphdef, s)(x))(state, jnp.asarray(features))
    assert len(re.findall(r"\b(?:remat2|checkpoint)\[", str(program))) == info.config.num_hidden_layers
    # dropout draws the same masks with and without remat, and is on only when asked for
    key = jax.random.key(5)
    dropped = run_plain(features, key)
    assert np.abs(dropped - run_plain(features)).max() > 1e-3
    assert np.abs(dropped - run_remat(features, key)).max() < REMAT_TOLERANCE


def test_classification_checkpoint_loads_and_ignores_the_classifier(tmp_path):
    torch.manual_seed(1)
    classifier = _perturbed(transformers.ASTForAudioClassification(transformers.ASTConfig(**TINY, num_labels=3)), 2)
    model, info = load_pretrained_ast(_save(classifier, tmp_path))
    assert info.ignored == ["classifier.dense.bias", "classifier.dense.weight", "classifier.layernorm.bias",
                            "classifier.layernorm.weight"]
    features = _features(info.config, batch=2)
    reference = _reference(classifier.audio_spectrogram_transformer, features)
    assert np.abs(np.asarray(model(jnp.asarray(features))) - reference).max() < FP32_TOLERANCE


def test_raw_state_dict_with_in_memory_names_loads(tiny, tmp_path):
    # transformers >= 5 names modules differently in memory (layers.0.attention.q_proj) than in checkpoints.
    torch_model, directory = tiny
    from safetensors.torch import save_file as save_torch

    (tmp_path / "config.json").write_text((Path(directory) / "config.json").read_text())
    save_torch({name: tensor.contiguous() for name, tensor in torch_model.state_dict().items()},
               tmp_path / "model.safetensors")
    model, info = load_pretrained_ast(tmp_path)
    features = _features(info.config, batch=1)
    assert np.abs(np.asarray(model(jnp.asarray(features))) - _reference(torch_model, features)).max() < FP32_TOLERANCE


def test_export_round_trip_and_fresh_initialisation(tmp_path):
    config = AstConfig(**TINY)
    model = AstModel(config, rngs=nnx.Rngs(params=jax.random.key(0)))
    state = ast_hf_state_dict(model)
    # Hugging Face's init: normal(initializer_range) kernels, zero biases, ones/zeros LayerNorm, zero tokens.
    assert abs(state["encoder.layer.0.intermediate.dense.weight"].std() - config.initializer_range) < 0.004
    assert abs(state["embeddings.patch_embeddings.projection.weight"].std() - config.initializer_range) < 0.004
    assert not state["embeddings.position_embeddings"].any() and not state["embeddings.cls_token"].any()
    assert (state["layernorm.weight"] == 1).all() and not state["encoder.layer.1.output.dense.bias"].any()
    # Perturb, export, and read back with transformers: the same function
    model = nnx.merge(*_shifted(model))
    save_file(ast_hf_state_dict(model), tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps({**config.to_dict(), "model_type": ast_lib.MODEL_TYPE}))
    torch_model, loading = transformers.ASTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not any(loading.values()), loading  # no missing, unexpected or mismatched keys
    features = _features(config, batch=2)
    assert np.abs(np.asarray(model(jnp.asarray(features))) - _reference(torch_model.eval(), features)).max() \
        < FP32_TOLERANCE
    reloaded, _ = load_pretrained_ast(tmp_path)
    exported, again = ast_hf_state_dict(model), ast_hf_state_dict(reloaded)
    assert all(np.array_equal(exported[name], again[name]) for name in exported)


def _shifted(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    keys = iter(jax.random.split(jax.random.key(9), 100))
    params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(next(keys), p.shape), params)
    return graphdef, params, rest


def test_full_size_parity(tmp_path):
    """The AudioSet architecture (random weights, no hub): 1 clip, outputs and every gradient (~45 s on 2 cores)."""
    torch.manual_seed(2)
    torch_model = _perturbed(transformers.ASTModel(transformers.ASTConfig()), 3)
    model, info = load_pretrained_ast(_save(torch_model, tmp_path / "ckpt"))
    assert info.config == AstConfig()
    features, weights = _features(info.config, batch=1), _loss_weights(info.config, 1)
    reference = _reference(torch_model, features)
    assert reference.shape == (1, 1214, 768)
    assert np.abs(np.asarray(model(jnp.asarray(features))) - reference).max() < FP32_TOLERANCE
    ours = _jax_gradients(model, features, weights)
    theirs = _torch_gradients(torch_model, features, weights, tmp_path / "grads")
    assert set(ours) == set(theirs)
    errors = _gradient_errors(ours, theirs, theirs)  # all of them: the backward passes are computed anyway
    assert max(errors.values()) <= 1.0, errors


# --- pooling: the sidecar's frozen encoder -----------------------------------------------------------------------

POOL_AST = dict(TINY, max_length=128)  # 2 frequency x 12 time patches


def test_audio_encoder_pooling_matches_the_sidecar(tmp_path):
    from audio_gen.encoders import AstEncoder
    from audio_gen.features import ast_features

    torch.manual_seed(3)
    torch_model = _perturbed(transformers.ASTModel(transformers.ASTConfig(**POOL_AST)), 4)
    extractor = transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=128, sampling_rate=16000)
    ast, info = load_pretrained_ast(_save(torch_model, tmp_path))
    num_tokens = 4
    sidecar = AstEncoder.from_loaded(extractor, torch_model, identity={"name": "tiny"}, num_tokens=num_tokens)
    # valid time patches: 1 (shorter than one window), 1, 3 (< num_tokens), 6, 9, 12 (longer than the 1.28 s window)
    lengths = [300, 1000, 5000, 9000, 14000, 30000]
    rng = np.random.default_rng(0)
    clips = [(0.1 * rng.normal(size=n)).astype(np.float32) for n in lengths]
    expected_tokens, expected_masks = sidecar._encode_batch(clips)  # float32, before the cache's float16 cast
    expected_tokens = torch.stack(expected_tokens).numpy()
    expected_masks = torch.stack(expected_masks).numpy()
    assert [int(m.sum()) for m in expected_masks] == [1, 1, 3, 4, 4, 4]

    features = ast_features(extractor, clips, "cpu").numpy()
    frames = [min(128, max(1, 1 + (n - 400) // 160)) for n in lengths]
    frame_mask = np.arange(128)[None, :] < np.asarray(frames)[:, None]
    encoder = AstAudioEncoder(ast, num_tokens)
    assert encoder.output_dim == 32
    graphdef, state = nnx.split(encoder)
    run = jax.jit(lambda s, f, m: nnx.merge(graphdef, s)(f, m))
    tokens, mask = run(state, jnp.asarray(features, jnp.float16), jnp.asarray(frame_mask))
    # the fp16 features are what the cache holds; the sidecar computed from fp32 ones: 1e-3 covers that rounding
    assert tokens.dtype == jnp.float32 and tokens.shape == (6, num_tokens, 32)
    np.testing.assert_array_equal(np.asarray(mask), expected_masks)
    assert np.abs(np.asarray(tokens) - expected_tokens).max() < 1e-3
    exact, _ = run(state, jnp.asarray(features), jnp.asarray(frame_mask))
    assert np.abs(np.asarray(exact) - expected_tokens).max() < FP32_TOLERANCE
    # the sidecar's public output (float16) agrees within float16 rounding
    stored, stored_mask = sidecar.encode(clips, sample_rate=16000)
    np.testing.assert_array_equal(stored_mask, expected_masks)
    assert np.abs(np.asarray(exact) - stored.astype(np.float32)).max() < 4e-3


def test_audio_encoder_all_tokens(tiny):
    _, directory = tiny
    ast, info = load_pretrained_ast(directory)
    features = _features(info.config, batch=2)
    tokens, mask = AstAudioEncoder(ast, 0)(jnp.asarray(features), jnp.ones((2, info.config.max_length), bool))
    assert tokens.shape == (2, info.config.num_tokens, 32) and bool(mask.all())
    np.testing.assert_array_equal(np.asarray(tokens), np.asarray(ast(jnp.asarray(features))))
    with pytest.raises(UserError, match="num_tokens=-1"):
        AstAudioEncoder(ast, -1)
    with pytest.raises(UserError, match=r"AST frame mask has shape \(2, 3\); expected \(2, 64\)"):
        AstAudioEncoder(ast, 2)(jnp.asarray(features), jnp.ones((2, 3), bool))
    with pytest.raises(UserError, match=r"AST features have shape \(2, 64, 31\); expected \[N, 64, 32\]"):
        ast(jnp.asarray(features[..., :31]))


# --- loader errors -------------------------------------------------------------------------------------------------

def _broken_copy(directory, tmp_path, edit) -> str:
    weights = load_file(f"{directory}/model.safetensors")
    edit(weights)
    save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(open(f"{directory}/config.json").read())
    return str(tmp_path)


@pytest.mark.parametrize("edit, message", [
    (lambda w: w.pop("encoder.layer.1.attention.attention.key.bias"),
     "1 AST tensors missing \\(e.g. encoder.layer.1.attention.attention.key.bias\\)"),
    (lambda w: w.update({"layernorm.weight": np.ones(31, np.float32)}),
     r"tensor layernorm.weight has shape \(31,\); expected \(32,\)"),
    (lambda w: w.update({"pooler.dense.weight": np.ones((32, 32), np.float32)}),
     "unexpected tensor pooler.dense.weight"),
])
def test_loader_errors_name_the_file_and_tensor(tiny, tmp_path, edit, message):
    _, directory = tiny
    broken = _broken_copy(directory, tmp_path, edit)
    with pytest.raises(UserError, match=message) as error:
        load_pretrained_ast(broken)
    assert str(error.value).startswith(f"{broken}/model.safetensors: ") and "\n" not in str(error.value)


def test_bad_config_json_is_one_line(tiny, tmp_path):
    _, directory = tiny
    broken = _broken_copy(directory, tmp_path, lambda w: None)
    values = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**values, "patch_size": 16.0}))
    with pytest.raises(UserError, match=r"config.json: field patch_size=16.0: expected an integer") as error:
        load_pretrained_ast(broken)
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        ast_lib.ast_config_from_checkpoint(tmp_path / "missing")


def test_long_attention_and_its_backward_match_jax_dot_product_attention():
    """The CPU path's hand-written attention (forward and custom backward) against ``jax.nn.dot_product_attention``,
    the function the GPU path calls: float32 to 1e-5; bfloat16 inputs to 0.1 (bfloat16 keeps 8 bits)."""
    from ith_jax.models.ast import _long_attention

    keys = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(key, (2, 50, 4, 8)) for key in keys[:3])
    weights = jax.random.normal(keys[3], (2, 50, 4, 8))

    def loss(attention, q, k, v):
        return jnp.sum(jnp.sin(attention(q, k, v).astype(jnp.float32)) * weights)

    reference = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1.0)  # noqa: E731
    np.testing.assert_allclose(_long_attention(q, k, v), reference(q, k, v), rtol=0, atol=1e-5)
    ours = jax.grad(loss, argnums=(1, 2, 3))(_long_attention, q, k, v)
    expected = jax.grad(loss, argnums=(1, 2, 3))(reference, q, k, v)
    for got, want in zip(ours, expected):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    low = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    assert _long_attention(*low).dtype == jnp.bfloat16
    np.testing.assert_allclose(_long_attention(*low).astype(jnp.float32), reference(q, k, v), rtol=0, atol=0.1)
    for got, want in zip(jax.grad(loss, argnums=(1, 2, 3))(_long_attention, *low), expected):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(got.astype(jnp.float32), want, rtol=0, atol=0.2)
