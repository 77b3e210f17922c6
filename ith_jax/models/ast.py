"""The Audio Spectrogram Transformer (AST) in Flax NNX, its Hugging Face weight import, and ITH-style pooling.

ITH fine-tunes its audio encoder, ``MIT/ast-finetuned-audioset-10-10-0.4593``, inside every training step. This
module is that encoder on the JAX side (the model and its loader together, big_vision style):

- ``AstConfig``: the architecture (field names of Hugging Face's ``ASTConfig``; defaults = the AudioSet checkpoint).
- ``AstModel``: ``transformers.ASTModel`` (patch embedding + [CLS] and distillation tokens + position embeddings,
  pre-LayerNorm ViT layers, final LayerNorm): features ``[N, max_length, num_mel_bins]`` (the
  ``ASTFeatureExtractor``'s ``input_values``) -> ``last_hidden_state [N, 2 + F*T, hidden]`` float32, tokens in
  Hugging Face's order ([CLS], distillation, then the patch grid frequency-major).
- ``AstAudioEncoder``: what the fusion layer consumes. ``num_tokens > 0`` pools exactly as the frozen sidecar
  encoder (``audio_gen.encoders.AstEncoder``) does: drop the special tokens, mean over frequency patches, keep the
  time patches the clip covers, adaptive-average-pool them to ``num_tokens``.
- ``load_pretrained_ast`` / ``ast_hf_state_dict``: Hugging Face checkpoint (``ASTModel`` or
  ``ASTForAudioClassification``, safetensors first) -> model, and back.

Precision follows ``ith_jax.models.bert``: parameters float32, matmuls in the compute ``dtype``, LayerNorm,
softmax and the activation in float32. The residual stream stays float32 too: in a pre-LayerNorm network it is
never normalised between layers, so rounding it to bfloat16 would compound over all twelve of them.

Initialisation (fresh models) as Hugging Face's ``_init_weights`` for AST: Linear and patch-projection kernels
normal(initializer_range) (older transformers used ``trunc_normal_`` with bounds +-2, i.e. +-100 standard
deviations: the same distribution in practice), biases zero, LayerNorm ones/zeros, and the [CLS] token, the
distillation token and the position embeddings zero.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from ith_common import hub
from ith_common.errors import UserError
from ith_jax.models.bert import (
    _ACTIVATIONS,
    BertLayer,
    Dropout,
    LayerNorm,
    _as_dropout_rngs,
    _normal_init,
)
from ith_jax.models.convert import _weights_file, load_hf_weights, read_config_json

MODEL_TYPE = "audio-spectrogram-transformer"

AST_ALLOW_PATTERNS = [
    "config.json",
    "preprocessor_config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
]

# The prefix of ASTForAudioClassification checkpoints; its "classifier.*" head is not part of ASTModel.
_CLASSIFICATION_PREFIX = "audio_spectrogram_transformer."
_CLASSIFIER_PREFIX = "classifier."


@dataclasses.dataclass(frozen=True)
class AstConfig:
    """The architecture fields of a Hugging Face ``ASTConfig`` (same names); defaults = ast_audioset.json."""

    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.0
    attention_probs_dropout_prob: float = 0.0
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    patch_size: int = 16
    qkv_bias: bool = True
    frequency_stride: int = 10
    time_stride: int = 10
    max_length: int = 1024
    num_mel_bins: int = 128

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            kind = _FIELD_KINDS[field.name]
            if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
                # JSON writes 0 for 0.0; normalise so that to_dict round-trips and equal configs compare equal.
                object.__setattr__(self, field.name, float(value))
            elif not _has_kind(value, kind):
                raise UserError(f"field {field.name}={value!r}: expected {_KIND_NAMES[kind]}")
        for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "patch_size",
                     "frequency_stride", "time_stride", "max_length", "num_mel_bins"):
            if getattr(self, name) < 1:
                raise UserError(f"field {name}={getattr(self, name)!r}: expected an integer >= 1")
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(f"field hidden_act={self.hidden_act!r}: expected one of {sorted(_ACTIVATIONS)}")
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise UserError(f"field {name}={getattr(self, name)!r}: expected a number in [0, 1)")
        if self.initializer_range < 0.0:
            raise UserError(f"field initializer_range={self.initializer_range!r}: expected a number >= 0")
        if self.layer_norm_eps <= 0.0:
            raise UserError(f"field layer_norm_eps={self.layer_norm_eps!r}: expected a number > 0")
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(f"field hidden_size={self.hidden_size}: expected a multiple of "
                            f"num_attention_heads={self.num_attention_heads}")
        for name in ("num_mel_bins", "max_length"):
            if getattr(self, name) < self.patch_size:
                raise UserError(f"field {name}={getattr(self, name)}: expected at least patch_size={self.patch_size} "
                                "(one patch must fit)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def frequency_patches(self) -> int:
        return (self.num_mel_bins - self.patch_size) // self.frequency_stride + 1

    @property
    def time_patches(self) -> int:
        return (self.max_length - self.patch_size) // self.time_stride + 1

    @property
    def num_tokens(self) -> int:
        """Tokens of ``last_hidden_state``: [CLS], distillation and the F x T patch grid."""
        return 2 + self.frequency_patches * self.time_patches

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "AST config") -> AstConfig:
        """Strict: every key must be a field (as ``to_dict`` writes them); missing keys take the defaults."""
        if not isinstance(values, Mapping):
            raise UserError(f"{source}: expected a mapping of AstConfig fields, got {type(values).__name__}")
        unknown = sorted(set(values) - set(_FIELD_KINDS))
        if unknown:
            raise UserError(f"{source}: unknown field {unknown[0]!r}; expected only {', '.join(_FIELD_KINDS)}")
        try:
            return cls(**values)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None

    @classmethod
    def from_hf_config(cls, values: Mapping[str, Any], *, source: str) -> AstConfig:
        """From a Hugging Face ``config.json`` dict: takes the architecture fields and ignores the bookkeeping
        keys (architectures, num_labels, id2label, torch_dtype, ...); a non-AST ``model_type`` is refused."""
        model_type = values.get("model_type", MODEL_TYPE)
        if model_type != MODEL_TYPE:
            raise UserError(f"{source}: field model_type={model_type!r}: expected {MODEL_TYPE!r}")
        return cls.from_dict({key: values[key] for key in _FIELD_KINDS if key in values}, source=source)


_FIELD_KINDS = {
    "hidden_size": "int", "num_hidden_layers": "int", "num_attention_heads": "int", "intermediate_size": "int",
    "hidden_act": "str", "hidden_dropout_prob": "float", "attention_probs_dropout_prob": "float",
    "initializer_range": "float", "layer_norm_eps": "float", "patch_size": "int", "qkv_bias": "bool",
    "frequency_stride": "int", "time_stride": "int", "max_length": "int", "num_mel_bins": "int",
}
_KIND_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _has_kind(value: Any, kind: str) -> bool:
    if kind == "bool":
        return isinstance(value, bool)
    if isinstance(value, bool):  # bool is an int in Python, never a valid integer or number here
        return False
    return isinstance(value, {"int": int, "float": float, "str": str}[kind])


def _patches(features: jax.Array, config: AstConfig) -> jax.Array:
    """``features [N, frames, mel]`` -> ``[N, F*T, patch*patch]``, patches frequency-major, each flattened
    (mel offset, time offset) as Hugging Face's Conv2d kernel ``[H, 1, mel, time]`` is.

    A strided gather + one matmul rather than ``lax.conv_general_dilated`` (identical outputs): measured on the
    shared 2-core CPU for the full AST's patch embedding, forward + backward with respect to the kernel, median
    of 30: 4 clips 51 ms (gather) vs 88 ms (conv), 1 clip 12-14 ms vs 12-16 ms; forward only the conv is ~15%
    faster. Training is forward + backward, and the kernel's gradient is then one plain matmul. The gather never
    needs its own backward (features are inputs, not parameters).
    """
    size = config.patch_size
    offsets = np.arange(size)
    mel_index = np.arange(config.frequency_patches)[:, None] * config.frequency_stride + offsets  # [F, p]
    time_index = np.arange(config.time_patches)[:, None] * config.time_stride + offsets  # [T, p]
    gathered = features[:, time_index][..., mel_index]  # [N, T, p(time), F, p(mel)]
    batch = features.shape[0]
    return gathered.transpose(0, 3, 1, 4, 2).reshape(batch, config.frequency_patches * config.time_patches,
                                                     size * size)


class AstEmbeddings(nnx.Module):
    def __init__(self, config: AstConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        hidden = config.hidden_size
        self.patch_projection = nnx.Linear(config.patch_size * config.patch_size, hidden, dtype=dtype,
                                           param_dtype=param_dtype, kernel_init=_normal_init(config), rngs=rngs)
        self.cls_token = nnx.Param(jnp.zeros((hidden,), param_dtype))
        self.distillation_token = nnx.Param(jnp.zeros((hidden,), param_dtype))
        self.position_embeddings = nnx.Param(jnp.zeros((config.num_tokens, hidden), param_dtype))
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, features: jax.Array, *, deterministic: bool, rngs) -> jax.Array:
        patches = self.patch_projection(_patches(features.astype(self.dtype), self.config)).astype(jnp.float32)
        batch, _, hidden = patches.shape
        special = jnp.stack([self.cls_token[...], self.distillation_token[...]]).astype(jnp.float32)
        embedded = jnp.concatenate([jnp.broadcast_to(special, (batch, 2, hidden)), patches], axis=1)
        embedded = embedded + self.position_embeddings[...].astype(jnp.float32)
        return self.dropout(embedded, deterministic=deterministic, rngs=rngs)


def _head_major(x: jax.Array) -> jax.Array:
    return x.transpose(0, 2, 1, 3)  # [N, L, heads, d] <-> [N, heads, L, d]


@jax.custom_vjp
def _long_attention(query: jax.Array, key: jax.Array, value: jax.Array) -> jax.Array:
    """softmax(q k^T) v for AST's 1214-token sequences without attention dropout (AST's rate is 0):
    ``[N, L, heads, d]`` each (queries already scaled) -> ``[N, L, heads, d]`` in the inputs' dtype.

    Written out with its own backward, as flash attention does: the forward keeps only the output and each row's
    log-sum-exp, and the backward recomputes the probabilities from them instead of storing ``[N, heads, L, L]``
    between the passes; scores and probabilities are float32 whatever the compute dtype. Against autodiff of
    ``BertLayer._attention`` (measured on the 2-core Intel Xeon, 4 clips x 12 heads x 1214 tokens, forward +
    backward): 747 ms instead of 1,148 ms, 568 MiB of temporaries instead of 853 MiB.
    """
    return _long_attention_forward(query, key, value)[0]


def _long_attention_forward(query, key, value):
    q, k, v = _head_major(query), _head_major(key), _head_major(value)
    scores = jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    unnormalised = jnp.exp(scores - row_max)
    row_sum = jnp.sum(unnormalised, axis=-1, keepdims=True)
    output = jnp.matmul(unnormalised.astype(v.dtype), v, preferred_element_type=jnp.float32) / row_sum
    output = output.astype(value.dtype)
    return _head_major(output), (query, key, value, output, row_max + jnp.log(row_sum))


def _long_attention_backward(residuals, grad_output):
    query, key, value, output, log_sum_exp = residuals
    q, k, v, grad = _head_major(query), _head_major(key), _head_major(value), _head_major(grad_output)
    probs = jnp.exp(jnp.matmul(q, k.swapaxes(-1, -2), preferred_element_type=jnp.float32) - log_sum_exp)
    grad_probs = jnp.matmul(grad, v.swapaxes(-1, -2), preferred_element_type=jnp.float32)
    # d softmax: p * (dp - sum(p * dp)), where sum(p * dp) over a row equals sum(grad * output) (fewer flops).
    row_dot = jnp.sum(grad.astype(jnp.float32) * output.astype(jnp.float32), axis=-1, keepdims=True)
    grad_scores = (probs * (grad_probs - row_dot)).astype(q.dtype)
    grad_query = jnp.matmul(grad_scores, k)
    grad_key = jnp.matmul(grad_scores.swapaxes(-1, -2), q)
    grad_value = jnp.matmul(probs.astype(grad.dtype).swapaxes(-1, -2), grad)
    return _head_major(grad_query), _head_major(grad_key), _head_major(grad_value)


_long_attention.defvjp(_long_attention_forward, _long_attention_backward)


class AstLayer(nnx.Module):
    """One pre-LayerNorm ViT block on the float32 residual stream: x + attn(LN(x)), then x + mlp(LN(x))."""

    def __init__(self, config: AstConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size

        def linear(n_in: int, n_out: int, use_bias: bool = True) -> nnx.Linear:
            return nnx.Linear(n_in, n_out, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                              kernel_init=_normal_init(config), rngs=rngs)

        # Attribute names shared with BertLayer: with attention dropout on, the self-attention is
        # BertLayer._attention itself (without it, `_long_attention`).
        self.dtype = dtype
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.layernorm_before = LayerNorm(hidden, config, param_dtype=param_dtype)
        self.query = linear(hidden, hidden, config.qkv_bias)
        self.key = linear(hidden, hidden, config.qkv_bias)
        self.value = linear(hidden, hidden, config.qkv_bias)
        self.attention_output = linear(hidden, hidden)
        self.layernorm_after = LayerNorm(hidden, config, param_dtype=param_dtype)
        self.intermediate = linear(hidden, config.intermediate_size)
        self.output = linear(config.intermediate_size, hidden)
        self.attention_dropout = Dropout(config.attention_probs_dropout_prob)
        self.hidden_dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, hidden: jax.Array, *, deterministic: bool, rngs) -> jax.Array:
        normed = self.layernorm_before(hidden).astype(self.dtype)
        # AST has no padding mask (the extractor's padding frames are attended to, as in Hugging Face).
        if self.attention_dropout.rate == 0.0 or deterministic:
            context = self._attention_without_dropout(normed)
        else:
            context = BertLayer._attention(self, normed, jnp.float32(0.0), deterministic=deterministic, rngs=rngs)
        attended = self.hidden_dropout(self.attention_output(context), deterministic=deterministic, rngs=rngs)
        hidden = hidden + attended.astype(jnp.float32)
        normed = self.layernorm_after(hidden).astype(self.dtype)
        expanded = self.activation(self.intermediate(normed).astype(jnp.float32)).astype(self.dtype)
        projected = self.hidden_dropout(self.output(expanded), deterministic=deterministic, rngs=rngs)
        return hidden + projected.astype(jnp.float32)


    def _attention_without_dropout(self, normed: jax.Array) -> jax.Array:
        batch, length, _ = normed.shape
        heads = lambda x: x.reshape(batch, length, self.num_heads, self.head_dim)  # noqa: E731
        query = heads(self.query(normed)) * jnp.asarray(1.0 / math.sqrt(self.head_dim), self.dtype)
        key, value = heads(self.key(normed)), heads(self.value(normed))
        if jax.default_backend() == "gpu":
            # cuDNN's fused (flash) attention where it applies (bfloat16), XLA's otherwise.
            context = jax.nn.dot_product_attention(query, key, value, scale=1.0)
        else:
            context = _long_attention(query, key, value)
        return context.reshape(batch, length, self.num_heads * self.head_dim)


def _apply_layer(layer: AstLayer, hidden: jax.Array, rngs, deterministic: bool) -> jax.Array:
    return layer(hidden, deterministic=deterministic, rngs=rngs)


class AstModel(nnx.Module):
    """``transformers.ASTModel``: features ``[N, max_length, num_mel_bins]`` (any float dtype) ->
    ``last_hidden_state [N, 2 + F*T, hidden]`` float32 (the final LayerNorm's output).

    ``remat=True`` runs each encoder layer under ``nnx.remat`` (gradient checkpointing): the same numbers, the
    layer's activations recomputed in the backward pass instead of stored (12 x [N, heads, 1214, 1214] attention
    probabilities for the full model). As with any ``nnx.remat``, the model must be merged inside the traced
    function (the trainer's ``nnx.split``/``nnx.merge`` pattern, or ``nnx.jit``), not closed over by ``jax.jit``.
    """

    def __init__(self, config: AstConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, remat: bool = False,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.embeddings = AstEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([AstLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.layernorm = LayerNorm(config.hidden_size, config, param_dtype=param_dtype)

    def __call__(self, features: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | jax.Array | None = None) -> jax.Array:
        expected = (self.config.max_length, self.config.num_mel_bins)
        if features.ndim != 3 or tuple(features.shape[1:]) != expected:
            raise UserError(f"AST features have shape {tuple(features.shape)}; expected [N, {expected[0]}, "
                            f"{expected[1]}] (max_length x num_mel_bins of the AST config)")
        rngs = _as_dropout_rngs(rngs, deterministic)
        hidden = self.embeddings(features, deterministic=deterministic, rngs=rngs)
        # deterministic is a Python bool that selects the graph: static for remat.
        apply = nnx.remat(_apply_layer, static_argnums=(3,)) if self.remat else _apply_layer
        for layer in self.layers:
            hidden = apply(layer, hidden, rngs, deterministic)
        return self.layernorm(hidden)


def _pooling_matrix(valid_patches: jax.Array, time_patches: int, num_tokens: int) -> tuple[jax.Array, jax.Array]:
    """Per clip, ``[num_tokens, time_patches]`` weights that adaptive-average-pool its first ``valid_patches``
    time patches (torch's segments: start floor(i*n/K), end ceil((i+1)*n/K)), or, when fewer than
    ``num_tokens`` are valid, copy them one by one; and the token mask ``[N, num_tokens]``."""
    count = valid_patches[:, None, None]  # [N, 1, 1]
    token = jnp.arange(num_tokens)[None, :, None]  # [1, K, 1]
    patch = jnp.arange(time_patches)[None, None, :]  # [1, 1, T]
    start = (token * count) // num_tokens
    end = -((-(token + 1) * count) // num_tokens)
    in_segment = (patch >= start) & (patch < end)
    # (clips with fewer patches than tokens can have empty segments; they take `copied` below)
    pooled = in_segment / jnp.maximum(end - start, 1).astype(jnp.float32)
    copied = ((patch == token) & (token < count)).astype(jnp.float32)
    enough = count >= num_tokens
    weights = jnp.where(enough, pooled, copied)
    mask = enough[:, :, 0] | (jnp.arange(num_tokens)[None, :] < valid_patches[:, None])
    return weights, mask


class AstAudioEncoder(nnx.Module):
    """The trainable AST as the fusion layer's audio source: features + frame mask -> (tokens, mask).

    ``num_tokens > 0``: the sidecar's pooling (``audio_gen.encoders.AstEncoder``): the 2 special tokens dropped,
    the patch grid averaged over frequency, the time patches the clip covers (``ceil(valid frames /
    time_stride)``, clipped to [1, T]) adaptive-average-pooled to ``num_tokens``; fewer valid patches than tokens:
    the patches as they are, mask False after them. ``num_tokens == 0``: all ``2 + F*T`` tokens, mask all True.
    Tokens are float32 either way (the final LayerNorm's output; the pooling is float32 too).
    """

    def __init__(self, ast: AstModel, num_tokens: int):
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise UserError(f"AST audio encoder: num_tokens={num_tokens!r}; expected an integer >= 0 "
                            "(0 = all tokens)")
        self.ast = ast
        self.num_tokens = num_tokens

    @property
    def output_dim(self) -> int:
        return self.ast.config.hidden_size

    def __call__(self, features: jax.Array, frame_mask: jax.Array, *, deterministic: bool = True,
                 rngs: nnx.Rngs | jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        config = self.ast.config
        if tuple(frame_mask.shape) != tuple(features.shape[:2]):
            raise UserError(f"AST frame mask has shape {tuple(frame_mask.shape)}; expected "
                            f"{tuple(features.shape[:2])} (the features' [N, max_length])")
        hidden = self.ast(features, deterministic=deterministic, rngs=rngs)
        batch = hidden.shape[0]
        if self.num_tokens == 0:
            return hidden, jnp.ones(hidden.shape[:2], bool)
        grid = hidden[:, 2:].reshape(batch, config.frequency_patches, config.time_patches, config.hidden_size)
        per_time = grid.mean(axis=1)  # [N, T, H]
        valid_frames = frame_mask.astype(jnp.int32).sum(axis=1)
        valid_patches = jnp.clip(-(-valid_frames // config.time_stride), 1, config.time_patches)
        weights, mask = _pooling_matrix(valid_patches, config.time_patches, self.num_tokens)
        return jnp.einsum("nkt,nth->nkh", weights, per_time), mask


# --- Hugging Face checkpoints ------------------------------------------------------------------------------------

# NNX layer attribute -> Hugging Face module name inside "encoder.layer.{i}." (the names checkpoints are saved
# with; transformers >= 5 renames them in memory and back on save_pretrained).
_LAYER_MODULES = {
    "layernorm_before": "layernorm_before",
    "query": "attention.attention.query",
    "key": "attention.attention.key",
    "value": "attention.attention.value",
    "attention_output": "attention.output.dense",
    "layernorm_after": "layernorm_after",
    "intermediate": "intermediate.dense",
    "output": "output.dense",
}
# transformers >= 5's in-memory names (a raw ``state_dict()`` saved with safetensors) -> the checkpoint names.
_MODULE_ALIASES = {
    "attention.q_proj": "attention.attention.query",
    "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value",
    "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "intermediate.dense",
    "mlp.fc2": "output.dense",
}
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _hf_name(path: tuple) -> tuple[str, str]:
    """The Hugging Face ``ASTModel`` name of the NNX parameter at ``path`` and how the arrays relate:
    "copy", "linear" (transposed), "patch" (Conv2d kernel [H, 1, p, p]) or "unsqueezed" (leading 1 axes)."""
    path = tuple(str(part) for part in path)
    if path[0] == "embeddings":
        if path[1] == "patch_projection":
            return f"embeddings.patch_embeddings.projection.{_LEAVES[path[2]]}", (
                "patch" if path[2] == "kernel" else "copy")
        return f"embeddings.{path[1]}", "unsqueezed"
    if path[0] == "layers":
        _, index, module, leaf = path
        return f"encoder.layer.{index}.{_LAYER_MODULES[module]}.{_LEAVES[leaf]}", (
            "linear" if leaf == "kernel" else "copy")
    if path[0] == "layernorm":
        return f"layernorm.{_LEAVES[path[1]]}", "copy"
    raise KeyError(f"no Hugging Face name for AST parameter {'.'.join(path)}")


def _hf_shape(shape: tuple[int, ...], relation: str) -> tuple[int, ...]:
    if relation == "linear":
        return shape[::-1]
    if relation == "patch":
        size = math.isqrt(shape[0])
        return (shape[1], 1, size, size)
    if relation == "unsqueezed":  # cls/distillation [H] -> [1, 1, H]; positions [L, H] -> [1, L, H]
        return (1,) * (3 - len(shape)) + tuple(shape)
    return tuple(shape)


def _to_nnx(array: np.ndarray, shape: tuple[int, ...], relation: str) -> np.ndarray:
    if relation == "linear":
        return array.T
    if relation == "patch":
        return array.reshape(shape[1], shape[0]).T
    return array.reshape(shape)


def _to_hf(array: np.ndarray, relation: str) -> np.ndarray:
    if relation == "linear":
        return array.T
    if relation == "patch":
        return array.T.reshape(_hf_shape(array.shape, relation))
    return array.reshape(_hf_shape(array.shape, relation))


def _canonical_name(name: str) -> str:
    """A checkpoint tensor name as an ``ASTModel`` checkpoint names it (prefix of the classification model
    dropped; transformers >= 5 in-memory names mapped back)."""
    name = name.removeprefix(_CLASSIFICATION_PREFIX)
    if name.startswith("layers."):
        _, index, rest = name.split(".", 2)
        for alias, module in _MODULE_ALIASES.items():
            if rest.startswith(alias + "."):
                rest = module + rest[len(alias):]
                break
        name = f"encoder.layer.{index}.{rest}"
    return name


@dataclasses.dataclass(frozen=True)
class AstLoadInfo:
    config: AstConfig
    checkpoint_dir: Path
    ignored: list[str]  # checkpoint tensors deliberately not loaded (the classification head)


def ast_checkpoint_dir(path_or_id: str | os.PathLike, *, what: str = "AST checkpoint") -> Path:
    """A local directory for an AST checkpoint: the directory itself, or a hub snapshot of its config, weights and
    preprocessor config (``ith_common.hub.resolve_checkpoint_dir``; ``what`` names the config key in errors)."""
    return hub.resolve_checkpoint_dir(path_or_id, what=what, allow_patterns=AST_ALLOW_PATTERNS)


def ast_config_from_checkpoint(path_or_id: str | os.PathLike, *, what: str = "AST checkpoint") -> AstConfig:
    """The ``AstConfig`` of a checkpoint's ``config.json`` (a directory or a hub id; ``what`` as for
    ``ast_checkpoint_dir``)."""
    ckpt_dir = ast_checkpoint_dir(path_or_id, what=what)
    values = read_config_json(ckpt_dir, kind="AST")
    return AstConfig.from_hf_config(values, source=str(ckpt_dir / "config.json"))


def load_pretrained_ast(path_or_id: str | os.PathLike, *, dtype=jnp.float32, remat: bool = False,
                        what: str = "AST checkpoint") -> tuple[AstModel, AstLoadInfo]:
    """An ``AstModel`` with every parameter taken from a Hugging Face ``ASTModel`` or
    ``ASTForAudioClassification`` checkpoint (its ``classifier.*`` head is ignored and listed in the info).
    A missing, unexpected or mis-shaped tensor is a ``UserError`` naming the weights file and the tensor."""
    ckpt_dir = ast_checkpoint_dir(path_or_id, what=what)
    config = ast_config_from_checkpoint(ckpt_dir, what=what)
    weights_file = _weights_file(ckpt_dir)
    weights = load_hf_weights(ckpt_dir)
    # Only shapes are needed to place the weights: no random initialisation of ~86M parameters.
    model = nnx.eval_shape(lambda: AstModel(config, dtype=dtype, remat=remat, rngs=nnx.Rngs(0)))
    expected = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, relation = _hf_name(path)
        expected[name] = (path, tuple(variable.shape), relation)

    ignored, filled = [], {}
    for original, array in weights.items():
        name = _canonical_name(original)
        if original.startswith(_CLASSIFIER_PREFIX):
            ignored.append(original)
            continue
        if name not in expected:
            raise UserError(f"{weights_file}: unexpected tensor {original}; expected only ASTModel weights "
                            "(and an ASTForAudioClassification 'classifier.*' head, which is ignored)")
        path, shape, relation = expected.pop(name)
        want = _hf_shape(shape, relation)
        if tuple(array.shape) != want:
            raise UserError(f"{weights_file}: tensor {original} has shape {tuple(array.shape)}; expected {want} "
                            f"for the config in {ckpt_dir / 'config.json'}")
        filled[path] = jnp.asarray(_to_nnx(array, shape, relation), jnp.float32)
    if expected:
        missing = sorted(expected)
        raise UserError(f"{weights_file}: {len(missing)} AST tensors missing (e.g. {missing[0]}); expected a "
                        "complete ASTModel or ASTForAudioClassification checkpoint")
    nnx.update(model, nnx.from_flat_state(filled))
    return model, AstLoadInfo(config=config, checkpoint_dir=ckpt_dir, ignored=sorted(ignored))


def ast_hf_state_dict(model: AstModel) -> dict[str, np.ndarray]:
    """Every parameter under its Hugging Face ``ASTModel`` checkpoint name, in Hugging Face's layout (float32)."""
    state = {}
    for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name, relation = _hf_name(path)
        state[name] = np.ascontiguousarray(_to_hf(np.asarray(variable[...], np.float32), relation))
    return state
