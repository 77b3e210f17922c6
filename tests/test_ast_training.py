"""The trained-AST mode (`audio.encoder=ast_trainable`) through the real commands, and its pieces in process.

A tiny random AST checkpoint (transformers `ASTModel` + `ASTFeatureExtractor`, `save_pretrained`) feeds both
halves: `audio_gen.build_cache --config.encoder=ast_fbank` stores its filterbank features, and
`ith_jax.train --config.audio.encoder=ast_trainable --config.audio.ast_model=DIR` starts its Flax AST from the
same checkpoint and trains it inside the step.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import nnx

from ith_jax import model_spec as model_spec_lib
from ith_jax import trainer as trainer_lib
from ith_jax.models import ast as ast_lib
from tests.test_audio_data import build_inputs
from tests.test_fusion_training import data_overrides
from tests.trainer_utils import DATA_DIR, REPO, final_params, flat, losses, run, train_command

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

FUSED = "configs/lm.py:tiny,pitch,audio"
# A tiny AST: 32 mel bins x 128 frames, 16x16 patches, strides 10: 2 x 12 = 24 patches + 2 special tokens.
TINY_AST = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, patch_size=16,
                frequency_stride=10, time_stride=10, max_length=128, num_mel_bins=32)


def save_tiny_ast(out: Path, **overrides) -> Path:
    import torch
    from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

    values = {**TINY_AST, **overrides}
    torch.manual_seed(0)
    ASTModel(ASTConfig(**values)).eval().save_pretrained(out)
    ASTFeatureExtractor(num_mel_bins=values["num_mel_bins"], max_length=values["max_length"],
                        sampling_rate=16000).save_pretrained(out)
    return out


def build_fbank_cache(root: Path, ast_dir: Path, inputs: dict) -> Path:
    """The fbank cache of the same tone clips as ``inputs``' token cache (the real build_cache command)."""
    cache = root / "fbank_cache"
    command = [sys.executable, "-m", "audio_gen.build_cache", "--config", "configs/gen.py:tiny,tone",
               "--config.encoder=ast_fbank", f"--config.encoder_model={ast_dir}", "--config.clap_scoring=false",
               "--config.num_candidates=1", "--config.progress=false", f"--config.spans={inputs['manifest']}",
               f"--config.cache_dir={cache}"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return cache


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("ast_inputs")
    built = build_inputs(root)
    built["ast"] = save_tiny_ast(root / "tiny_ast")
    built["fbank"] = build_fbank_cache(root, built["ast"], built)
    return built


def ast_command(workdir: Path, inputs: dict, *overrides: str, cache_key: str = "fbank") -> list[str]:
    return train_command(workdir, *data_overrides(inputs), f"--config.audio.spans={inputs['manifest']}",
                         f"--config.audio.cache_dir={inputs[cache_key]}", "--config.audio.selection=first",
                         "--config.audio.encoder=ast_trainable", f"--config.audio.ast_model={inputs['ast']}",
                         "--config.audio.num_tokens=4", *overrides, config=FUSED)


def by_path(params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Flat parameter names with list indices and string digits alike (a checkpoint stores ``['0']``)."""
    return {re.sub(r"\['(\d+)'\]", r"[\1]", key): value for key, value in params.items()}


def initial_ast_params(ast_dir: Path) -> dict[str, np.ndarray]:
    model, _ = ast_lib.load_pretrained_ast(str(ast_dir))
    return by_path(flat({"audio_encoder": {"ast": nnx.to_pure_dict(nnx.state(model, nnx.Param))}}))


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ast_runs") / "ith_ast"
    result = run(ast_command(workdir, inputs, "--config.audio.ast_learning_rate=1e-3"))
    assert result.returncode == 0, result.stderr[-3000:]
    return {"workdir": workdir, "stderr": result.stderr}


def test_the_ast_starts_from_the_checkpoint_and_is_trained(trained, inputs):
    workdir = trained["workdir"]
    assert sorted(losses(workdir)) == [1, 2]
    assert f"trained AST from {inputs['ast']}" in trained["stderr"]
    assert "learning rate 0.001" in trained["stderr"]
    params = by_path(final_params(workdir))
    start = initial_ast_params(inputs["ast"])
    assert set(start) <= set(params)  # every AST parameter is in the checkpoint, under audio_encoder
    moved = [key for key in start if not np.array_equal(start[key], params[key])]
    # Two AdamW steps at lr 1e-3 move every parameter that gets a gradient (AdamW's first step is ~lr per entry).
    assert len(moved) == len(start), sorted(set(start) - set(moved))
    meta = json.loads((workdir / "config.json").read_text())
    assert meta["audio"]["encoder"] == "ast_trainable"
    results = json.loads((workdir / "eval_results.json").read_text())["results"][str(inputs["data"])]
    assert results["spans_with_audio"] == results["spans"] == 47


def test_evaluate_rebuilds_the_trained_ast_from_the_workdir(trained, inputs, tmp_path):
    out = tmp_path / "eval.json"
    result = run([sys.executable, "-m", "ith_jax.evaluate", "--workdir", str(trained["workdir"]), "--data",
                  str(inputs["data"]), "--spans", str(inputs["manifest"]), "--json", str(out)])
    assert result.returncode == 0, result.stderr[-3000:]
    stored = json.loads((trained["workdir"] / "eval_results.json").read_text())["results"][str(inputs["data"])]
    assert json.loads(out.read_text())["results"][str(inputs["data"])] == stored


def test_remat_and_bfloat16_switches_train(inputs, tmp_path):
    result = run(ast_command(tmp_path / "remat", inputs, "--config.audio.ast_remat=true",
                             "--config.audio.ast_dtype=bfloat16", "--config.audio.num_tokens=0",
                             "--config.max_steps=1"))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'remat': True" in result.stderr and "'dtype': 'bfloat16'" in result.stderr
    assert "'num_tokens': 0" in result.stderr
    assert np.isfinite(losses(tmp_path / "remat")[1])


@pytest.mark.parametrize("case", ["cached_on_features", "trainable_on_tokens", "other_mel_bins"])
def test_a_cache_that_does_not_fit_the_encoder_is_refused(inputs, tmp_path, case):
    if case == "cached_on_features":
        command = train_command(tmp_path / "w", *data_overrides(inputs), f"--config.audio.spans={inputs['manifest']}",
                                f"--config.audio.cache_dir={inputs['fbank']}", "--config.audio.selection=first",
                                config=FUSED)
        expected = "config key audio.encoder='cached': the audio cache"
    elif case == "trainable_on_tokens":
        command = ast_command(tmp_path / "w", inputs, cache_key="cache")
        expected = "config key audio.encoder='ast_trainable': the audio cache"
    else:
        other = save_tiny_ast(tmp_path / "ast64", num_mel_bins=64)
        command = ast_command(tmp_path / "w", inputs, f"--config.audio.ast_model={other}")
        expected = f"config key audio.ast_model='{other}': the AST takes"
    result = run(command)
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last, last
    assert not (tmp_path / "w" / "checkpoints").exists()


def optimizer_config(ast_learning_rate):
    config = ml_collections.ConfigDict({
        "learning_rate": 1e-4, "warmup_ratio": 0.0, "lr_schedule": "linear", "max_grad_norm": 1e6,
        "adam_b1": 0.9, "adam_b2": 0.999, "adam_eps": 1e-8, "weight_decay": 0.01,
        "audio": {"encoder": "ast_trainable", "ast_learning_rate": ast_learning_rate}})
    return config


def test_the_ast_gets_its_own_learning_rate_and_everything_else_the_lms():
    rng = np.random.default_rng(0)
    params = {"audio_encoder": {"w": jnp.asarray(rng.standard_normal((3, 4)), jnp.float32),
                                "b": jnp.asarray(rng.standard_normal(4), jnp.float32)},
              "mlm": {"w": jnp.asarray(rng.standard_normal((4, 5)), jnp.float32)},
              "projector": {"w": jnp.asarray(rng.standard_normal((2, 5)), jnp.float32)}}
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), jnp.float32), params)
    total_steps = 10

    def reference(peak):
        config = optimizer_config(None)
        return optax.adamw(trainer_lib.learning_rate_schedule(config, total_steps, peak), b1=0.9, b2=0.999,
                           eps=1e-8, weight_decay=0.01, mask=trainer_lib.decay_mask)

    optimizer = trainer_lib.make_optimizer(optimizer_config(3e-2), total_steps)
    state = optimizer.init(params)
    ours = params
    expected = {"ast": params["audio_encoder"], "lm": {k: v for k, v in params.items() if k != "audio_encoder"}}
    ref_states = {"ast": reference(3e-2).init(expected["ast"]), "lm": reference(1e-4).init(expected["lm"])}
    for _ in range(3):
        updates, state = optimizer.update(grads, state, ours)
        ours = optax.apply_updates(ours, updates)
        for name, peak in (("ast", 3e-2), ("lm", 1e-4)):
            part_grads = grads["audio_encoder"] if name == "ast" else {k: v for k, v in grads.items()
                                                                       if k != "audio_encoder"}
            part_updates, ref_states[name] = reference(peak).update(part_grads, ref_states[name], expected[name])
            expected[name] = optax.apply_updates(expected[name], part_updates)
    for got, want in ((ours["audio_encoder"], expected["ast"]),
                      ({k: v for k, v in ours.items() if k != "audio_encoder"}, expected["lm"])):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-7)
    # Without ast_learning_rate the AST trains with the LM's rate: one AdamW over everything, as before.
    plain = trainer_lib.make_optimizer(optimizer_config(None), total_steps)
    single = reference(1e-4)
    a, _ = plain.update(grads, plain.init(params), params)
    b, _ = single.update(grads, single.init(params), params)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=0, atol=1e-9)


def tiny_fused_spec(num_tokens: int) -> model_spec_lib.ModelSpec:
    from ith_jax.models.bert import BertConfig

    bert = BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=32, max_position_embeddings=32).to_dict()
    ast = ast_lib.AstConfig(**TINY_AST).to_dict()
    return model_spec_lib.ModelSpec(head="mlm", bert=bert,
                                    fusion={"audio_dim": TINY_AST["hidden_size"], "fusion_layer": 1},
                                    audio_encoder={"ast": ast, "num_tokens": num_tokens, "remat": False,
                                                   "dtype": "float32"})


@pytest.mark.parametrize("num_tokens", [4, 0])
def test_the_fused_lm_with_its_ast_equals_the_lm_fed_the_asts_tokens(num_tokens):
    """FusedMaskedLM(features) == FusedMaskedLM without the encoder, fed the encoder's own tokens: the
    reshapes between span slots and clips, and the slot masks, are the only new code on this path."""
    model = model_spec_lib.build_model(tiny_fused_spec(num_tokens), seed=3)
    rng = np.random.default_rng(1)
    batch, spans, length = 2, 2, 12
    features = jnp.asarray(rng.standard_normal((batch, spans, TINY_AST["max_length"], TINY_AST["num_mel_bins"])),
                           jnp.float16)
    frames = np.zeros((batch, spans, TINY_AST["max_length"]), bool)
    # Slot (1, 1) is marked as having audio but has no frames: it must not be fused.
    frames[0, 0, :100], frames[0, 1, :7], frames[1, 0, :] = True, True, True
    inputs = dict(input_ids=jnp.asarray(rng.integers(5, 50, (batch, length)), jnp.int32),
                  attention_mask=jnp.ones((batch, length), jnp.int32),
                  span_ranges=jnp.asarray([[[1, 3], [5, 7]], [[2, 4], [8, 9]]], jnp.int32),
                  span_mask=jnp.ones((batch, spans), jnp.int32), span_has_audio=jnp.ones((batch, spans), jnp.int32))
    logits, gate = model(**inputs, audio_tokens=features, audio_mask=jnp.asarray(frames), return_gate=True)
    tokens, token_mask = model.audio_encoder(features.reshape(batch * spans, *features.shape[2:]),
                                             jnp.asarray(frames.reshape(batch * spans, -1)))
    tokens = tokens.reshape(batch, spans, *tokens.shape[1:])
    token_mask = np.array(token_mask).reshape(batch, spans, -1)
    token_mask[1, 1] = False  # the empty slot: no frames, so no audio (its pooled mask alone would keep token 0)
    encoder, model.audio_encoder = model.audio_encoder, None
    expected, expected_gate = model(**inputs, audio_tokens=tokens, audio_mask=jnp.asarray(token_mask),
                                    return_gate=True)
    model.audio_encoder = encoder
    np.testing.assert_allclose(np.asarray(logits), np.asarray(expected), rtol=0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(gate), np.asarray(expected_gate), rtol=0, atol=1e-6)
    assert np.all(np.asarray(gate)[1, 8:9] == 0.0)  # the span without audio is not fused
    assert tokens.shape[2] == (num_tokens or ast_lib.AstConfig(**TINY_AST).num_tokens)


def test_gradients_reach_the_ast_through_the_fusion():
    model = model_spec_lib.build_model(tiny_fused_spec(4), seed=0)
    graphdef, params, rest = trainer_lib.split_model(model)
    rng = np.random.default_rng(2)
    features = jnp.asarray(rng.standard_normal((1, 1, TINY_AST["max_length"], TINY_AST["num_mel_bins"])),
                           jnp.float32)

    def loss(p):
        fused = nnx.merge(graphdef, p, rest)
        logits = fused(jnp.asarray([[2, 7, 9, 3]]), jnp.ones((1, 4), jnp.int32), audio_tokens=features,
                       audio_mask=jnp.ones((1, 1, TINY_AST["max_length"]), bool),
                       span_ranges=jnp.asarray([[[1, 3]]]), span_mask=jnp.ones((1, 1)),
                       span_has_audio=jnp.ones((1, 1)), positions=jnp.asarray([[3]]))
        return jnp.sum(logits[..., :5] ** 2)

    grads = jax.grad(loss)(params)
    ast_grads = flat(grads["audio_encoder"])
    assert ast_grads and all(np.isfinite(g).all() for g in ast_grads.values())
    assert all(np.abs(g).max() > 0 for g in ast_grads.values()), \
        [k for k, g in ast_grads.items() if not np.abs(g).max() > 0]


def test_the_ast_keys_do_not_block_a_resume_but_the_data_keys_still_do(tmp_path):
    from ith_common.config import load_config_file
    from ith_common.errors import UserError

    config = load_config_file(f"{REPO / 'configs/lm.py'}:tiny,pitch,audio")
    saved = trainer_lib.resume_values(config)  # as a checkpoint stores it; one written before issue 10 is the same
    assert not set(trainer_lib.AUDIO_MODEL_KEYS) & set(saved["audio"])
    config.audio.ast_learning_rate = 1e-3  # an optimizer setting may change on resume, like learning_rate
    config.audio.ast_remat = True
    trainer_lib.check_resume_values(saved, config, tmp_path)
    config.audio.shuffle = True  # which audio a row hears may not
    with pytest.raises(UserError, match="audio="):
        trainer_lib.check_resume_values(saved, config, tmp_path)


def test_a_missing_ast_checkpoint_is_one_line_naming_the_config_key(inputs, tmp_path):
    result = run(ast_command(tmp_path / "w", inputs, f"--config.audio.ast_model={tmp_path / 'no_such_ast'}"))
    assert result.returncode == 2, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last == f"error: config key audio.ast_model: checkpoint directory {tmp_path / 'no_such_ast'} does not exist"
    assert not (tmp_path / "w" / "checkpoints").exists()
