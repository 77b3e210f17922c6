"""BERT encoder and heads in Flax NNX, numerically matching Hugging Face ``transformers`` BERT.

Layout and naming follow the Hugging Face checkpoints closely enough that ``ith_jax.models.convert`` maps
weights with a flat table; kernels are stored ``[in, out]`` (the transpose of torch's ``Linear.weight``).

Precision: parameters live in ``param_dtype`` (float32). Matmuls run in the compute ``dtype`` (float32 or
bfloat16); LayerNorm, softmax, the activation function and the additive attention mask are float32 so
bfloat16 compute cannot overflow the mask or lose the normalisation statistics.

Dropout: every module is built without an rng. Randomness arrives at call time through ``rngs`` (an
``nnx.Rngs`` with a ``dropout`` stream, or a bare ``jax.random`` key) together with ``deterministic=False``;
``deterministic=True`` (the default) turns every dropout off. This keeps the model state pure parameters,
so the functional pattern ``graphdef, params = nnx.split(model, nnx.Param)`` /
``nnx.merge(graphdef, params)`` works inside a plain ``jax.jit``. Masks come from a counter-based hash
keyed by one threefry draw per dropout site (``dropout_keep_mask``), which is much cheaper on CPU than
drawing every element with threefry.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ith_common.errors import UserError

HiddenHook = Callable[[int, jax.Array], jax.Array]

# Added to attention scores at padded keys. Finite (not -inf, not finfo.min) so that adding it to a float32
# score never overflows and a fully padded row still softmaxes to a uniform distribution instead of NaN.
MASKED_SCORE = -1e9


def gelu_exact(x: jax.Array) -> jax.Array:
    """x * Phi(x) through erf, the formula torch uses. XLA's erf is a short polynomial; the erfc behind
    ``jax.nn.gelu(approximate=False)`` costs more on CPU (measured: the whole MiniLM train step ~4% slower)."""
    return x * (0.5 + 0.5 * jax.lax.erf(x * jnp.asarray(1 / math.sqrt(2), x.dtype)))


_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    # Hugging Face's "gelu" is the exact erf form; "gelu_new"/"gelu_pytorch_tanh" are the tanh approximation.
    "gelu": gelu_exact,
    "gelu_python": gelu_exact,
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """The subset of a Hugging Face BERT ``config.json`` that defines the architecture (same field names)."""

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    position_embedding_type: str = "absolute"
    classifier_dropout: float | None = None

    def __post_init__(self) -> None:
        if self.hidden_act not in _ACTIVATIONS:
            raise UserError(
                f"config field hidden_act={self.hidden_act!r} is not supported; expected one of "
                f"{sorted(_ACTIVATIONS)}"
            )
        if self.position_embedding_type != "absolute":
            raise UserError(
                f"config field position_embedding_type={self.position_embedding_type!r} is not supported; "
                "expected 'absolute'"
            )
        for name in ("hidden_dropout_prob", "attention_probs_dropout_prob", "classifier_dropout"):
            rate = getattr(self, name)
            if rate is not None and not 0.0 <= rate < 1.0:
                raise UserError(f"config field {name}={rate} must be in [0, 1)")
        if self.hidden_size % self.num_attention_heads != 0:
            raise UserError(
                f"config field hidden_size={self.hidden_size} is not a multiple of "
                f"num_attention_heads={self.num_attention_heads}"
            )

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "config") -> BertConfig:
        """Builds a config from a ``config.json`` dict; keys that are not architecture fields are ignored.

        ``source`` (e.g. the file path) prefixes error messages.
        """
        kwargs: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            if field.name not in values:
                continue
            value = values[field.name]
            if value is None and field.name != "classifier_dropout":
                continue  # Hugging Face writes null for "use the default"
            if not _has_field_type(field.name, value):
                raise UserError(
                    f"{source}: field {field.name}={value!r} has the wrong type; expected {_expected_type(field.name)}"
                )
            kwargs[field.name] = value
        try:
            return cls(**kwargs)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_FIELD_TYPES = {
    "hidden_act": "a string",
    "position_embedding_type": "a string",
    "hidden_dropout_prob": "a number",
    "attention_probs_dropout_prob": "a number",
    "initializer_range": "a number",
    "layer_norm_eps": "a number",
    "classifier_dropout": "a number or null",
}


def _expected_type(name: str) -> str:
    return _FIELD_TYPES.get(name, "an integer")


def _has_field_type(name: str, value: Any) -> bool:
    expected = _expected_type(name)
    if isinstance(value, bool):
        return False
    if expected == "a string":
        return isinstance(value, str)
    if expected == "an integer":
        return isinstance(value, int)
    if expected == "a number or null":
        return value is None or isinstance(value, (int, float))
    return isinstance(value, (int, float))


def _normal_init(config: BertConfig) -> nnx.Initializer:
    return nnx.initializers.normal(stddev=config.initializer_range)


def _as_dropout_rngs(rngs: nnx.Rngs | jax.Array | None, deterministic: bool) -> nnx.Rngs | None:
    if deterministic:
        return None
    if rngs is None:
        raise ValueError("deterministic=False needs rngs (nnx.Rngs(dropout=key) or a jax.random key)")
    if isinstance(rngs, nnx.Rngs):
        return rngs
    # A bare key would otherwise be reused verbatim by every dropout layer, correlating their masks.
    return nnx.Rngs(dropout=rngs)


def _fmix32(bits: jax.Array) -> jax.Array:
    # MurmurHash3's 32-bit finaliser: a bijection with full avalanche (each input bit flips each output bit
    # with probability ~1/2).
    bits = bits ^ (bits >> 16)
    bits = bits * jnp.uint32(0x85EBCA6B)
    bits = bits ^ (bits >> 13)
    bits = bits * jnp.uint32(0xC2B2AE35)
    return bits ^ (bits >> 16)


def dropout_keep_mask(key: jax.Array, shape: tuple[int, ...], rate: float) -> jax.Array:
    """Boolean keep mask with P(keep) = 1 - rate (to 2^-32), from a counter-based hash of the element index.

    Two threefry draws give a 64-bit seed; each element hashes its flat index with it (two finaliser rounds,
    the second keyed by the other seed half). That is a handful of integer ops per element, several times
    cheaper on CPU than ``jax.random.bernoulli``'s threefry per element, which dominated the dropout cost.
    """
    seeds = jax.random.bits(key, (2,), jnp.uint32)
    index = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
    hashed = _fmix32(_fmix32(index ^ seeds[0]) ^ seeds[1])
    threshold = min(round(rate * 2**32), 2**32 - 1)
    return hashed >= jnp.uint32(threshold)


class Dropout(nnx.Module):
    """Inverted dropout driven by a key drawn from ``rngs.dropout`` at call time (see ``dropout_keep_mask``)."""

    def __init__(self, rate: float):
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"dropout rate {rate} must be in [0, 1)")
        self.rate = rate

    def __call__(self, x: jax.Array, *, deterministic: bool, rngs: nnx.Rngs | None) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = dropout_keep_mask(rngs.dropout(), x.shape, self.rate)
        # x * (keep / (1 - rate)): a multiply instead of a division (the slow vector op on CPU), and no
        # select against a zeros array that XLA would materialise for the backward pass. The factor stays
        # float32: 1/0.9 rounded to bfloat16 would bias the expected activation by 0.2%.
        scale = keep.astype(jnp.float32) * (1.0 / (1.0 - self.rate))
        return (x * scale).astype(x.dtype)


def _dense(in_features: int, out_features: int, config: BertConfig, *, dtype, param_dtype, rngs) -> nnx.Linear:
    """A Linear layer initialised like Hugging Face BERT: normal(initializer_range) kernel, zero bias."""
    return nnx.Linear(
        in_features, out_features, dtype=dtype, param_dtype=param_dtype, kernel_init=_normal_init(config), rngs=rngs
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
    """LayerNorm over the last axis (biased two-pass variance, as torch computes it).

    The hand-written backward keeps only the normalised input and 1/std for the backward pass and computes
    the input gradient in one fused expression, instead of the broadcast intermediates autodiff would keep
    (measured: ~3% of a MiniLM train step on CPU).
    """
    return _layer_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_forward(x, scale, bias, epsilon):
    centered = x - jnp.mean(x, axis=-1, keepdims=True)
    inverse_std = jax.lax.rsqrt(jnp.mean(centered * centered, axis=-1, keepdims=True) + epsilon)
    normalised = centered * inverse_std
    return normalised * scale + bias, (normalised, inverse_std, scale)


def _layer_norm_backward(epsilon, residuals, grad_output):
    normalised, inverse_std, scale = residuals
    grad_normalised = grad_output * scale
    grad_input = inverse_std * (
        grad_normalised
        - jnp.mean(grad_normalised, axis=-1, keepdims=True)
        - normalised * jnp.mean(grad_normalised * normalised, axis=-1, keepdims=True)
    )
    batch_axes = tuple(range(grad_output.ndim - 1))
    return grad_input, jnp.sum(grad_output * normalised, axis=batch_axes), jnp.sum(grad_output, axis=batch_axes)


layer_norm.defvjp(_layer_norm_forward, _layer_norm_backward)


class LayerNorm(nnx.Module):
    """LayerNorm computed in float32 whatever the compute dtype; returns float32 (callers cast it back).

    Parameters ``scale`` (ones) and ``bias`` (zeros), as in ``nnx.LayerNorm`` and Hugging Face's init.
    """

    def __init__(self, features: int, config: BertConfig, *, param_dtype):
        self.epsilon = config.layer_norm_eps
        self.scale = nnx.Param(jnp.ones((features,), param_dtype))
        self.bias = nnx.Param(jnp.zeros((features,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        scale, bias = self.scale[...].astype(jnp.float32), self.bias[...].astype(jnp.float32)
        return layer_norm(x.astype(jnp.float32), scale, bias, self.epsilon)


class BertEmbeddings(nnx.Module):
    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        init = _normal_init(config)

        def table(rows: int) -> nnx.Embed:
            # Looked up in float32: the sum and LayerNorm that follow are float32 anyway.
            return nnx.Embed(
                rows, config.hidden_size, param_dtype=param_dtype, embedding_init=init, rngs=rngs
            )

        self.word_embeddings = table(config.vocab_size)
        self.position_embeddings = table(config.max_position_embeddings)
        self.token_type_embeddings = table(config.type_vocab_size)
        self.layer_norm = LayerNorm(config.hidden_size, config, param_dtype=param_dtype)
        self.dropout = Dropout(config.hidden_dropout_prob)

    def __call__(self, input_ids, token_type_ids, *, deterministic: bool, rngs) -> jax.Array:
        seq_len = input_ids.shape[1]
        max_positions = self.position_embeddings.embedding.shape[0]
        if seq_len > max_positions:
            raise ValueError(f"sequence length {seq_len} exceeds max_position_embeddings={max_positions}")
        embedded = (
            self.word_embeddings(input_ids)
            + self.position_embeddings.embedding[...][:seq_len][None]
            + self.token_type_embeddings(token_type_ids)
        )
        normalised = self.layer_norm(embedded).astype(self.dtype)
        return self.dropout(normalised, deterministic=deterministic, rngs=rngs)


class BertLayer(nnx.Module):
    """One post-LayerNorm transformer block: self-attention, add & norm, feed-forward, add & norm."""

    def __init__(self, config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden = config.hidden_size
        dense = lambda n_in, n_out: _dense(n_in, n_out, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        norm = lambda: LayerNorm(hidden, config, param_dtype=param_dtype)
        self.dtype = dtype
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.activation = _ACTIVATIONS[config.hidden_act]
        self.query = dense(hidden, hidden)
        self.key = dense(hidden, hidden)
        self.value = dense(hidden, hidden)
        self.attention_output = dense(hidden, hidden)
        self.attention_layer_norm = norm()
        self.intermediate = dense(hidden, config.intermediate_size)
        self.output = dense(config.intermediate_size, hidden)
        self.output_layer_norm = norm()
        self.attention_dropout = Dropout(config.attention_probs_dropout_prob)
        self.hidden_dropout = Dropout(config.hidden_dropout_prob)

    def _attention(self, hidden, mask_bias, *, deterministic, rngs) -> jax.Array:
        batch, seq_len, _ = hidden.shape
        heads = lambda x: x.reshape(batch, seq_len, self.num_heads, self.head_dim)
        # Scaling the queries (B*L*H values) is cheaper than scaling the scores (B*heads*L*L).
        query = heads(self.query(hidden)) * jnp.asarray(1.0 / math.sqrt(self.head_dim), self.dtype)
        key = heads(self.key(hidden))
        value = heads(self.value(hidden))
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        # jax.nn.softmax's own derivative rule beats differentiating a hand-written softmax (measured).
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        probs = self.attention_dropout(probs, deterministic=deterministic, rngs=rngs).astype(self.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, value)
        return context.reshape(batch, seq_len, self.num_heads * self.head_dim)

    def __call__(self, hidden, mask_bias, *, deterministic: bool, rngs) -> jax.Array:
        attended = self.attention_output(self._attention(hidden, mask_bias, deterministic=deterministic, rngs=rngs))
        attended = self.hidden_dropout(attended, deterministic=deterministic, rngs=rngs)
        hidden = self.attention_layer_norm(attended + hidden).astype(self.dtype)
        expanded = self.activation(self.intermediate(hidden).astype(jnp.float32)).astype(self.dtype)
        projected = self.hidden_dropout(self.output(expanded), deterministic=deterministic, rngs=rngs)
        return self.output_layer_norm(projected + hidden).astype(self.dtype)


class BertModel(nnx.Module):
    """The BERT encoder; returns ``(sequence_output [B, L, H], pooled [B, H] or None)``.

    ``add_pooling_layer=False`` (what the MLM and token-classification heads use, as in Hugging Face) drops
    the pooler so that no unused parameters are trained; ``pooled`` is then None.
    """

    def __init__(
        self,
        config: BertConfig,
        *,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        add_pooling_layer: bool = True,
        rngs: nnx.Rngs,
    ):
        self.config = config
        self.dtype = dtype
        self.embeddings = BertEmbeddings(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List(
            [BertLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for _ in range(config.num_hidden_layers)]
        )
        self.pooler = (
            _dense(config.hidden_size, config.hidden_size, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            if add_pooling_layer
            else None
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
        hidden_hook: HiddenHook | None = None,
    ) -> tuple[jax.Array, jax.Array | None]:
        rngs = _as_dropout_rngs(rngs, deterministic)
        if token_type_ids is None:
            token_type_ids = jnp.zeros_like(input_ids)
        # [B, 1, 1, L] float32, broadcast over heads and query positions.
        mask_bias = jnp.where(attention_mask.astype(bool), 0.0, MASKED_SCORE).astype(jnp.float32)[:, None, None, :]
        hidden = self.embeddings(input_ids, token_type_ids, deterministic=deterministic, rngs=rngs)
        if hidden_hook is not None:
            hidden = hidden_hook(0, hidden)
        for index, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, mask_bias, deterministic=deterministic, rngs=rngs)
            if hidden_hook is not None:
                hidden = hidden_hook(index, hidden)
        pooled = None
        if self.pooler is not None:
            pooled = jnp.tanh(self.pooler(hidden[:, 0]).astype(jnp.float32)).astype(self.dtype)
        return hidden, pooled


def gather_positions(hidden: jax.Array, positions: jax.Array) -> jax.Array:
    """``hidden[b, positions[b, m]]`` for every b, m: [B, L, H] x [B, M] -> [B, M, H]."""
    return jnp.take_along_axis(hidden, positions[..., None].astype(jnp.int32), axis=1)


class BertForMaskedLM(nnx.Module):
    """BERT with Hugging Face's MLM head: dense + activation + LayerNorm, then the tied decoder plus a bias.

    With ``positions [B, M]`` the encoder output is gathered first, so the transform and the vocabulary
    projection (the largest matmul of a small model) run only at the M masked slots.
    """

    def __init__(self, config: BertConfig, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.bert = BertModel(config, dtype=dtype, param_dtype=param_dtype, add_pooling_layer=False, rngs=rngs)
        self.transform = _dense(
            config.hidden_size, config.hidden_size, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs
        )
        self.transform_layer_norm = LayerNorm(config.hidden_size, config, param_dtype=param_dtype)
        self.decoder_bias = nnx.Param(jnp.zeros((config.vocab_size,), param_dtype))
        self.activation = _ACTIVATIONS[config.hidden_act]

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
        hidden_hook: HiddenHook | None = None,
    ) -> jax.Array:
        """Float32 logits ``[B, M, V]`` at ``positions``, or ``[B, L, V]`` when ``positions`` is None."""
        hidden, _ = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            deterministic=deterministic,
            rngs=rngs,
            hidden_hook=hidden_hook,
        )
        if positions is not None:
            hidden = gather_positions(hidden, positions)
        return self.head(hidden)

    def head(self, hidden: jax.Array) -> jax.Array:
        """The MLM head on already selected hidden states ``[..., H]`` -> float32 logits ``[..., V]``."""
        transformed = self.activation(self.transform(hidden).astype(jnp.float32)).astype(self.dtype)
        transformed = self.transform_layer_norm(transformed).astype(self.dtype)
        word_embeddings = self.bert.embeddings.word_embeddings.embedding[...]
        logits = jnp.einsum(
            "...h,vh->...v",
            transformed,
            word_embeddings.astype(self.dtype),
            preferred_element_type=jnp.float32,
        )
        return logits + self.decoder_bias[...].astype(jnp.float32)


class BertForTokenClassification(nnx.Module):
    """BERT with dropout + a linear classifier on every token; float32 logits ``[B, L, num_labels]``."""

    def __init__(
        self, config: BertConfig, num_labels: int, *, dtype=jnp.float32, param_dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.config = config
        self.num_labels = num_labels
        self.bert = BertModel(config, dtype=dtype, param_dtype=param_dtype, add_pooling_layer=False, rngs=rngs)
        rate = config.classifier_dropout if config.classifier_dropout is not None else config.hidden_dropout_prob
        self.dropout = Dropout(rate)
        self.classifier = _dense(config.hidden_size, num_labels, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
        hidden_hook: HiddenHook | None = None,
    ) -> jax.Array:
        rngs = _as_dropout_rngs(rngs, deterministic)
        hidden, _ = self.bert(
            input_ids,
            attention_mask,
            token_type_ids,
            deterministic=deterministic,
            rngs=rngs,
            hidden_hook=hidden_hook,
        )
        hidden = self.dropout(hidden, deterministic=deterministic, rngs=rngs)
        return self.classifier(hidden).astype(jnp.float32)
