"""ITH's audio fusion (``ith_jax.models.fusion``) against a PyTorch reference of the same formulation.

The reference (``tests/torch_fusion_reference.py``) is ITH's module layout built from ``torch.nn`` layers plus
a key padding mask, fusing span by span in a Python loop; the full fused LM is checked against
``transformers.BertForMaskedLM`` with that reference attached through a forward hook. Fusion parameters are
perturbed away from their init (zero biases, unit LayerNorm scales) so that a mapping mistake cannot hide.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import transformers
from flax import nnx

from ith_common.errors import UserError
from ith_jax.models.bert import BertConfig, BertForMaskedLM
from ith_jax.models.convert import load_pretrained
from ith_jax.models.fusion import FusedMaskedLM, FusionConfig, build_fused_mlm, span_token_owner
from tests.test_bert_parity import TINY  # the tiny BERT (dropout 0.3: everything must run in eval mode)
from tests.torch_fusion_reference import ReferenceFusion, load_flax_params, torch_state_from_flax
from tests.trainer_utils import run

AUDIO_DIM = 12
# fp32, same formulation, different summation order. Measured (3 seeds): fusion outputs <= 7e-7, gates <= 9e-8,
# gradients <= 2.4e-6 on parameter gradients up to 8.6 in magnitude.
FUSION_TOLERANCE = 1e-5
# The whole LM (two encoder layers and the MLM head around the fusion). Measured: logits ~4e-7.
LM_TOLERANCE = 1e-4


def _fusion_config(fusion_layer: int = 0, **overrides) -> FusionConfig:
    return FusionConfig(audio_dim=AUDIO_DIM, fusion_layer=fusion_layer, dropout=0.3, **overrides)


def _perturb_fusion(model: FusedMaskedLM, seed: int) -> FusedMaskedLM:
    """Moves every projector and fusion parameter off its init by 0.2 * N(0, 1)."""
    rng = np.random.default_rng(seed)
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    for part in ("projector", "fusion"):
        pure[part] = jax.tree.map(lambda x: x + 0.2 * rng.standard_normal(x.shape).astype(np.float32), pure[part])
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    return model


def _reference_for(model: FusedMaskedLM) -> ReferenceFusion:
    config = model.fusion_config
    reference = ReferenceFusion(config.audio_dim, model.mlm.config.hidden_size, config.num_heads,
                                config.intermediate_size, config.dropout, config.layer_norm_eps)
    return load_flax_params(reference, nnx.to_pure_dict(nnx.state(model, nnx.Param))).eval()


@pytest.fixture(scope="module")
def audio_inputs():
    """Three sentences of 10, 7 and 4 tokens with two, one and zero fused spans (S=2 slots, T=5 audio tokens).

    Row 0: spans [1, 3) and [5, 8), the second with its last two audio tokens padded. Row 1: span [2, 5); its
    second slot is used but its audio was rejected. Row 2: one used slot, audio rejected. Padded audio tokens
    hold large values so that attending to them would show.
    """
    rng = np.random.default_rng(0)
    audio_tokens = rng.normal(size=(3, 2, 5, AUDIO_DIM)).astype(np.float32)
    audio_mask = np.ones((3, 2, 5), bool)
    audio_mask[0, 1, 3:] = False
    audio_tokens[~audio_mask] = 50.0
    return dict(
        audio_tokens=audio_tokens,
        audio_mask=audio_mask,
        span_ranges=np.asarray([[[1, 3], [5, 8]], [[2, 5], [6, 7]], [[1, 2], [0, 0]]], np.int32),
        span_mask=np.asarray([[1, 1], [1, 1], [1, 0]], np.int32),
        span_has_audio=np.asarray([[1, 1], [1, 0], [0, 0]], np.int32),
    )


FUSED_TOKENS = {(0, 1), (0, 2), (0, 5), (0, 6), (0, 7), (1, 2), (1, 3), (1, 4)}


@pytest.fixture(scope="module")
def text_inputs():
    rng = np.random.default_rng(1)
    input_ids = np.zeros((3, 10), np.int64)
    attention_mask = np.zeros((3, 10), np.int64)
    for row, length in enumerate((10, 7, 4)):
        input_ids[row, :length] = rng.integers(5, TINY["vocab_size"], length)
        attention_mask[row, :length] = 1
    return input_ids, attention_mask


def _jax(inputs: dict) -> dict:
    return {key: jnp.asarray(value) for key, value in inputs.items()}


def _fuse_args(audio_inputs):
    """Positional arguments of ``FusedMaskedLM.fuse`` / ``ReferenceFusion.fuse`` after ``hidden``."""
    span_fused = audio_inputs["span_mask"].astype(bool) & audio_inputs["span_has_audio"].astype(bool)
    return (audio_inputs["audio_tokens"], audio_inputs["audio_mask"], audio_inputs["span_ranges"], span_fused)


@pytest.fixture(scope="module")
def mlm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    reference = transformers.BertForMaskedLM(transformers.BertConfig(**TINY)).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # off HF's init, so that the LM around the fusion is not near-trivial
        for parameter in reference.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    directory = tmp_path_factory.mktemp("tiny_mlm")
    reference.save_pretrained(directory)
    return directory, reference


def _fused_model(directory, fusion_layer: int, *, dtype=jnp.float32, seed: int = 0) -> FusedMaskedLM:
    mlm, _ = load_pretrained(directory, "mlm", dtype=dtype)
    return _perturb_fusion(build_fused_mlm(mlm, _fusion_config(fusion_layer), rngs=nnx.Rngs(seed)), seed)


@pytest.fixture(scope="module")
def fused_model():
    mlm = BertForMaskedLM(BertConfig(**TINY), rngs=nnx.Rngs(0))
    return _perturb_fusion(build_fused_mlm(mlm, _fusion_config(1), rngs=nnx.Rngs(1)), 1)


# ---------------------------------------------------------------------------------------------------------
# The fusion step against the torch reference
# ---------------------------------------------------------------------------------------------------------


def test_fusion_matches_torch_reference(fused_model, audio_inputs):
    hidden = np.random.default_rng(2).normal(size=(3, 10, 32)).astype(np.float32)
    ours, gate = fused_model.fuse(jnp.asarray(hidden), *(jnp.asarray(a) for a in _fuse_args(audio_inputs)))
    with torch.no_grad():
        expected, expected_gate = _reference_for(fused_model).fuse(
            torch.from_numpy(hidden), *(torch.from_numpy(a) for a in _fuse_args(audio_inputs))
        )
    ours, gate = np.asarray(ours), np.asarray(gate)
    assert np.abs(ours - expected.numpy()).max() < FUSION_TOLERANCE
    assert np.abs(gate - expected_gate.numpy()).max() < FUSION_TOLERANCE
    changed = {tuple(index) for index in np.argwhere(np.abs(ours - hidden).max(axis=-1) > 0)}
    assert changed == FUSED_TOKENS  # exactly the fused spans' tokens; the rest pass through bit for bit


def test_fusion_gradients_match_torch_reference(fused_model, audio_inputs):
    """Gradients w.r.t. every projector/fusion parameter, the text states and the audio tokens."""
    rng = np.random.default_rng(3)
    hidden = rng.normal(size=(3, 10, 32)).astype(np.float32)
    out_weights = rng.normal(size=(3, 10, 32)).astype(np.float32)
    gate_weights = rng.normal(size=(3, 10)).astype(np.float32)
    _, tokens_mask, ranges, span_fused = _fuse_args(audio_inputs)
    graphdef, params, rest = nnx.split(fused_model, nnx.Param, ...)

    def loss(params, hidden, audio_tokens):
        model = nnx.merge(graphdef, params, rest)
        out, gate = model.fuse(hidden, audio_tokens, jnp.asarray(tokens_mask), jnp.asarray(ranges),
                               jnp.asarray(span_fused))
        return jnp.sum(out * out_weights) + jnp.sum(gate * gate_weights)

    param_grads, hidden_grad, audio_grad = jax.grad(loss, argnums=(0, 1, 2))(
        params, jnp.asarray(hidden), jnp.asarray(audio_inputs["audio_tokens"])
    )

    reference = _reference_for(fused_model)
    hidden_t = torch.from_numpy(hidden).requires_grad_()
    audio_t = torch.from_numpy(audio_inputs["audio_tokens"].copy()).requires_grad_()
    out_t, gate_t = reference.fuse(hidden_t, audio_t, torch.from_numpy(tokens_mask), torch.from_numpy(ranges),
                                   torch.from_numpy(span_fused))
    (torch.sum(out_t * torch.from_numpy(out_weights)) + torch.sum(gate_t * torch.from_numpy(gate_weights))).backward()

    ours = torch_state_from_flax(nnx.to_pure_dict(param_grads))
    theirs = {name: p.grad.numpy() for name, p in reference.named_parameters()}
    assert ours.keys() == theirs.keys()
    for name, grad in theirs.items():
        assert np.abs(grad).max() > 0, name  # the comparison below is not vacuous
        np.testing.assert_allclose(ours[name], grad, atol=FUSION_TOLERANCE, err_msg=name)
    np.testing.assert_allclose(np.asarray(hidden_grad), hidden_t.grad.numpy(), atol=FUSION_TOLERANCE)
    np.testing.assert_allclose(np.asarray(audio_grad), audio_t.grad.numpy(), atol=FUSION_TOLERANCE)
    # Padded audio tokens and the audio of unfused slots get no gradient: they are never attended to.
    unused = ~audio_inputs["audio_mask"] | ~span_fused[..., None]
    assert np.all(np.asarray(audio_grad)[unused] == 0)


def test_padded_and_rejected_audio_do_not_matter(fused_model, audio_inputs, text_inputs):
    input_ids, attention_mask = (jnp.asarray(a) for a in text_inputs)
    base = fused_model(input_ids, attention_mask, **_jax(audio_inputs))
    changed_inputs = dict(audio_inputs, audio_tokens=audio_inputs["audio_tokens"].copy())
    unused = ~audio_inputs["audio_mask"] | ~(audio_inputs["span_has_audio"].astype(bool))[..., None]
    changed_inputs["audio_tokens"][unused] = -7.0
    np.testing.assert_array_equal(np.asarray(fused_model(input_ids, attention_mask, **_jax(changed_inputs))),
                                  np.asarray(base))
    changed_inputs["audio_tokens"][0, 1, 0] += 1.0  # a real audio token of a fused span
    assert not np.allclose(np.asarray(fused_model(input_ids, attention_mask, **_jax(changed_inputs))),
                           np.asarray(base))


def test_gate_is_returned_per_token_and_open_only_on_fused_tokens(fused_model, audio_inputs, text_inputs):
    input_ids, attention_mask = (jnp.asarray(a) for a in text_inputs)
    positions = jnp.asarray([[2, 6], [3, 0], [1, 2]], jnp.int32)
    logits, gate = fused_model(input_ids, attention_mask, positions=positions, return_gate=True,
                               **_jax(audio_inputs))
    assert logits.shape == (3, 2, TINY["vocab_size"]) and gate.shape == (3, 10) and gate.dtype == jnp.float32
    gate = np.asarray(gate)
    fused = np.zeros((3, 10), bool)
    fused[tuple(zip(*FUSED_TOKENS))] = True
    assert np.all(gate[~fused] == 0)
    assert np.all((gate[fused] > 0.01) & (gate[fused] < 0.99))


def test_span_token_owner_ranges_are_end_exclusive_and_later_slot_wins():
    ranges = jnp.asarray([[[1, 4], [3, 6], [0, 2]]], jnp.int32)
    owner = span_token_owner(ranges, jnp.asarray([[True, True, False]]), 8)
    np.testing.assert_array_equal(np.asarray(owner), [[-1, 0, 0, 1, 1, 1, -1, -1]])


# ---------------------------------------------------------------------------------------------------------
# The fused LM against transformers + the torch fusion through a forward hook
# ---------------------------------------------------------------------------------------------------------


def _hf_logits_with_fusion(reference_lm, reference_fusion, fusion_layer, text_inputs, audio_inputs):
    target = reference_lm.bert.embeddings if fusion_layer == 0 else reference_lm.bert.encoder.layer[fusion_layer - 1]
    fuse_args = [torch.from_numpy(a) for a in _fuse_args(audio_inputs)]

    def fuse(module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output
        fused, _ = reference_fusion.fuse(hidden, *fuse_args)
        return (fused, *output[1:]) if isinstance(output, tuple) else fused

    handle = target.register_forward_hook(fuse)
    try:
        with torch.no_grad():
            input_ids, attention_mask = (torch.from_numpy(a) for a in text_inputs)
            return reference_lm(input_ids=input_ids, attention_mask=attention_mask).logits.numpy()
    finally:
        handle.remove()


@pytest.mark.parametrize("fusion_layer", [0, TINY["num_hidden_layers"]])
def test_fused_lm_matches_transformers_with_hooked_reference(mlm_checkpoint, text_inputs, audio_inputs, fusion_layer):
    directory, reference_lm = mlm_checkpoint
    model = _fused_model(directory, fusion_layer, seed=fusion_layer)
    expected = _hf_logits_with_fusion(reference_lm, _reference_for(model), fusion_layer, text_inputs, audio_inputs)
    logits = np.asarray(model(*(jnp.asarray(a) for a in text_inputs), **_jax(audio_inputs)))
    real = text_inputs[1].astype(bool)
    assert np.abs(logits[real] - expected[real]).max() < LM_TOLERANCE
    with torch.no_grad():
        plain = reference_lm(*(torch.from_numpy(a) for a in text_inputs)).logits.numpy()
    assert np.abs(plain[:2] - expected[:2]).max() > 0.1  # the fusion really changed the rows with audio


def test_without_audio_the_logits_equal_the_plain_mlm_exactly(mlm_checkpoint, text_inputs, audio_inputs):
    directory, _ = mlm_checkpoint
    model = _fused_model(directory, 1)
    input_ids, attention_mask = (jnp.asarray(a) for a in text_inputs)
    no_audio = dict(audio_inputs, span_has_audio=np.zeros_like(audio_inputs["span_has_audio"]))
    logits, gate = model(input_ids, attention_mask, return_gate=True, **_jax(no_audio))
    np.testing.assert_array_equal(np.asarray(logits), np.asarray(model.mlm(input_ids, attention_mask)))
    assert np.all(np.asarray(gate) == 0)


def test_bf16_compute_runs_and_is_close_to_fp32(mlm_checkpoint, text_inputs, audio_inputs):
    directory, _ = mlm_checkpoint
    fp32 = _fused_model(directory, 1)
    bf16 = build_fused_mlm(load_pretrained(directory, "mlm", dtype=jnp.bfloat16)[0], _fusion_config(1),
                           rngs=nnx.Rngs(0))
    nnx.update(bf16, nnx.state(fp32, nnx.Param))
    inputs = [jnp.asarray(a) for a in text_inputs]
    audio = _jax(dict(audio_inputs, audio_tokens=audio_inputs["audio_tokens"].astype(np.float16)))  # as cached
    expected, expected_gate = fp32(*inputs, return_gate=True, **audio)
    logits, gate = bf16(*inputs, return_gate=True, **audio)
    assert bf16.fusion.query.kernel[...].dtype == jnp.float32  # params stay fp32
    real = text_inputs[1].astype(bool)
    logits_diff = float(np.abs(np.asarray(logits)[real] - np.asarray(expected)[real]).max())
    gate_diff = float(np.abs(np.asarray(gate) - np.asarray(expected_gate)).max())
    # Measured (3 seeds): logits <= 0.010, gate <= 6e-4 (bf16 keeps 8 mantissa bits; three layers of O(1)
    # activations). The bounds leave a 10x margin.
    assert 0 < logits_diff < 0.1 and gate_diff < 0.01
    assert np.isfinite(np.asarray(logits)).all()


# ---------------------------------------------------------------------------------------------------------
# Dropout, parameters in the functional jit step, data parallelism
# ---------------------------------------------------------------------------------------------------------


def test_fusion_dropout_follows_the_deterministic_flag_and_key(text_inputs, audio_inputs):
    # The LM without dropout, so that every train/eval difference comes from the fusion's two dropout sites.
    config = BertConfig(**{**TINY, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0})
    model = build_fused_mlm(BertForMaskedLM(config, rngs=nnx.Rngs(0)), _fusion_config(1), rngs=nnx.Rngs(1))
    inputs = [jnp.asarray(a) for a in text_inputs]
    audio = _jax(audio_inputs)
    train = lambda key, audio: np.asarray(model(*inputs, deterministic=False, rngs=jax.random.key(key), **audio))
    evaluation = np.asarray(model(*inputs, **audio))
    np.testing.assert_array_equal(train(0, audio), train(0, audio))
    assert not np.allclose(train(0, audio), evaluation)
    assert not np.allclose(train(0, audio), train(1, audio))
    no_audio = _jax(dict(audio_inputs, span_has_audio=np.zeros_like(audio_inputs["span_has_audio"])))
    np.testing.assert_array_equal(train(0, no_audio), np.asarray(model(*inputs, **no_audio)))
    with pytest.raises(ValueError, match="rngs"):
        model(*inputs, deterministic=False, **audio)


def test_jitted_functional_step_reaches_every_fusion_parameter(fused_model, text_inputs, audio_inputs):
    graphdef, params, rest = nnx.split(fused_model, nnx.Param, ...)
    input_ids, attention_mask = (jnp.asarray(a) for a in text_inputs)
    positions = jnp.asarray([[2, 6], [3, 0], [1, 2]], jnp.int32)
    labels = jnp.asarray([[5, 6], [7, 8], [9, 9]], jnp.int32)
    audio = _jax(audio_inputs)

    @jax.jit
    def gradients(params, rng):
        def loss(params):
            model = nnx.merge(graphdef, params, rest)
            logits = model(input_ids, attention_mask, positions=positions, deterministic=False, rngs=rng, **audio)
            return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

        return jax.value_and_grad(loss)(params)

    loss, grads = gradients(params, jax.random.key(0))
    assert np.isfinite(float(loss))
    pure = nnx.to_pure_dict(grads)
    assert set(pure) == {"mlm", "projector", "fusion"}
    for part in ("projector", "fusion"):
        for key_path, leaf in jax.tree_util.tree_leaves_with_path(pure[part]):
            assert np.abs(np.asarray(leaf)).sum() > 0, part + jax.tree_util.keystr(key_path)
    assert np.abs(np.asarray(pure["mlm"]["bert"]["layers"][0]["query"]["kernel"])).sum() > 0


_SHARDED_SCRIPT = """
import json, sys
import jax, jax.numpy as jnp, numpy as np
from flax import nnx
from ith_jax import mesh as mesh_lib
from ith_jax.models.bert import BertConfig, BertForMaskedLM
from ith_jax.models.fusion import FusionConfig, build_fused_mlm

tiny, audio_dim = json.loads(sys.argv[1])
model = build_fused_mlm(BertForMaskedLM(BertConfig(**tiny), rngs=nnx.Rngs(0)),
                        FusionConfig(audio_dim=audio_dim, fusion_layer=1), rngs=nnx.Rngs(1))
graphdef, params = nnx.split(model, nnx.Param)
rng = np.random.default_rng(0)
batch, length, spans, tokens = 16, 12, 2, 5
lengths = rng.integers(6, length + 1, batch)
starts = np.stack([rng.integers(0, 2, batch), rng.integers(3, 5, batch)], axis=1)
host = dict(
    input_ids=rng.integers(5, tiny["vocab_size"], (batch, length)).astype(np.int32),
    attention_mask=(np.arange(length) < lengths[:, None]).astype(np.int32),
    audio_tokens=rng.normal(size=(batch, spans, tokens, audio_dim)).astype(np.float16),
    audio_mask=rng.random((batch, spans, tokens)) < 0.8,
    span_ranges=np.stack([starts, starts + 2], axis=-1).astype(np.int32),
    span_mask=np.ones((batch, spans), np.int32),
    span_has_audio=(rng.random((batch, spans)) < 0.7).astype(np.int32),
)

@jax.jit
def forward(params, batch):
    batch = dict(batch)
    ids, mask = batch.pop("input_ids"), batch.pop("attention_mask")
    return nnx.merge(graphdef, params)(ids, mask, return_gate=True, **batch)

single_logits, single_gate = forward(params, {k: jnp.asarray(v) for k, v in host.items()})
mesh = mesh_lib.make_data_mesh()
logits, gate = forward(mesh_lib.replicate(params, mesh), mesh_lib.put_batch(host, mesh))
print(json.dumps(dict(
    devices=jax.device_count(), logits_shards=len(logits.sharding.device_set),
    logits_diff=float(np.abs(np.asarray(logits) - np.asarray(single_logits)).max()),
    gate_diff=float(np.abs(np.asarray(gate) - np.asarray(single_gate)).max()),
    fused_tokens=int((np.asarray(gate) > 0).sum()))))
"""


def test_jit_on_eight_simulated_devices_gives_the_same_outputs():
    result = run([sys.executable, "-c", _SHARDED_SCRIPT, json.dumps([TINY, AUDIO_DIM])], devices=8, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8 and report["logits_shards"] == 8
    assert report["fused_tokens"] > 0
    # Same program per row; only XLA's per-shard matmul blocking differs. Measured: logits 1e-7, gate 2e-7.
    assert report["logits_diff"] < 1e-5 and report["gate_diff"] < 1e-6


# ---------------------------------------------------------------------------------------------------------
# FusionConfig
# ---------------------------------------------------------------------------------------------------------


def test_fusion_config_round_trips_and_resolves_ith_defaults_from_the_lm():
    config = FusionConfig(audio_dim=128, fusion_layer=2)
    assert FusionConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    resolved = config.resolve(BertConfig(**TINY))
    assert (resolved.num_heads, resolved.intermediate_size) == (4, 37)  # the LM's, as ITH sets them
    assert FusionConfig.from_dict(resolved.to_dict()) == resolved
    model = build_fused_mlm(BertForMaskedLM(BertConfig(**TINY), rngs=nnx.Rngs(0)), config, rngs=nnx.Rngs(0))
    assert model.fusion_config == resolved
    assert model.projector.input.kernel[...].shape == (128, 32)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"audio_dim": "768"}, r"spec\.json: field audio_dim='768' has the wrong type; expected an integer$"),
        ({"num_heads": 2.0}, r"field num_heads=2\.0 has the wrong type; expected an integer or null"),
        ({"dropout": 1.0}, r"spec\.json: fusion config field dropout=1\.0 must be in \[0, 1\)"),
        ({"fusion_layer": -1}, r"fusion_layer=-1 must be >= 0"),
        ({"audio_dim": 0}, r"audio_dim=0 must be a positive integer"),
        ({"fusion_layr": 1}, r"unknown field\(s\) \['fusion_layr'\]"),
    ],
)
def test_bad_fusion_config_values_are_user_errors(values, message):
    with pytest.raises(UserError, match=message):
        FusionConfig.from_dict(values, source="spec.json")


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (FusionConfig(audio_dim=AUDIO_DIM, fusion_layer=3), r"fusion_layer=3; expected 0 .* num_hidden_layers=2"),
        (FusionConfig(audio_dim=AUDIO_DIM, num_heads=5), r"num_heads=5 does not divide the LM's hidden_size=32"),
    ],
)
def test_fusion_config_that_does_not_fit_the_lm_is_a_user_error(config, message):
    mlm = BertForMaskedLM(BertConfig(**TINY), rngs=nnx.Rngs(0))
    with pytest.raises(UserError, match=message):
        build_fused_mlm(mlm, config, rngs=nnx.Rngs(0))
