"""ITH's audio fusion in Flax NNX: audio projector, fusion layer and the fused masked LM around the Flax BERT.

What ITH does (Yoo et al. 2025, official code ``uso7d0/ImagineToHear``,
``models/auditorybench/model/{animal,pitch}/model.py``), and what we took from it:

- Projector (``AudioMLP``): ``Linear(D_audio, H) -> ReLU -> Linear(H, H)``; its hidden width is the LM width H.
- Fusion layer (``FusionLayer``): ``nn.MultiheadAttention(H, num_heads, dropout=0.1)`` with the span's token
  states as queries and the projected audio tokens as keys and values; ``LayerNorm(q + attention)`` (torch's
  default eps 1e-5); FFN ``Linear(H, ff) -> GELU (exact erf) -> Linear(ff, H) -> Dropout(0.1)``;
  ``LayerNorm(out1 + ffn)``. num_heads and ff are the LM's ``num_attention_heads`` and ``intermediate_size``.
- Gate (``FusionGateUnit``): two separate ``Linear(H, H, bias=True)`` layers, ``g = sigmoid(W_a H_a + W_t H_t)``,
  output ``g * H_a + (1 - g) * H_t`` with H_a the fused states and H_t the span's incoming text states; g is
  per token and per hidden unit.
- Placement: ``--fusion_idx k`` (default 0) fuses after the embeddings for k = 0 and after encoder layer k
  otherwise, i.e. exactly BERT's ``hidden_hook`` index k (our ``FusionConfig.fusion_layer``). Every span of a
  sentence goes through the same fusion layer; sentences whose audio is missing are skipped.
- Dropout: ITH's two dropout sites (on the attention probabilities and after the FFN, rate 0.1) are kept, with
  BERT's call-time mechanism (``deterministic`` + ``rngs``); the attention output itself has no dropout,
  as in ``nn.MultiheadAttention``.

Where we differ on purpose: keys carry a padding mask (ITH attends to padded audio tokens), the LM runs with
its attention mask (ITH's encoder loop passes none), and everything is vectorised with static shapes
instead of ITH's Python loop over examples and spans.

Vectorisation: queries never attend to one another in the fusion layer, so the layer is a function of one
token and its span's audio. Each token is therefore fused against the concatenated audio tokens of all S
spans ``[B, S*T, H]``, with a per-token key mask that admits only its own span's real tokens; tokens in no
fused span are computed and discarded (``jnp.where``), which costs about one extra encoder layer and keeps
the other tokens bit-for-bit unchanged. A token covered by two span slots belongs to the later slot
(AuditoryBench's spans never overlap).

Precision as in ``bert.py``: parameters float32, matmuls in the compute dtype, LayerNorm, softmax and the
gate's sigmoid and blend in float32. Initialisation follows BERT's (normal(0.02) kernels, zero biases,
LayerNorm ones/zeros) rather than torch's defaults.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from ith_common.errors import UserError
from ith_jax.models.bert import (
    MASKED_SCORE,
    BertConfig,
    BertForMaskedLM,
    Dropout,
    LayerNorm,
    _as_dropout_rngs,
    gelu_exact,
)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """The fusion part of a model spec. ``None`` sizes mean "the LM's", ITH's choice; ``resolve`` fills them."""

    audio_dim: int = 768
    fusion_layer: int = 0
    num_heads: int | None = None
    intermediate_size: int | None = None
    dropout: float = 0.1
    layer_norm_eps: float = 1e-5
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        for name in ("audio_dim", "num_heads", "intermediate_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise UserError(f"fusion config field {name}={value} must be a positive integer")
        if self.fusion_layer < 0:
            raise UserError(f"fusion config field fusion_layer={self.fusion_layer} must be >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"fusion config field dropout={self.dropout} must be in [0, 1)")
        if self.layer_norm_eps <= 0 or self.initializer_range <= 0:
            raise UserError("fusion config fields layer_norm_eps and initializer_range must be positive")

    def resolve(self, bert_config: BertConfig) -> FusionConfig:
        """The config with every size concrete, checked against the LM it is attached to."""
        resolved = dataclasses.replace(
            self,
            num_heads=self.num_heads or bert_config.num_attention_heads,
            intermediate_size=self.intermediate_size or bert_config.intermediate_size,
        )
        if resolved.fusion_layer > bert_config.num_hidden_layers:
            raise UserError(
                f"fusion config field fusion_layer={resolved.fusion_layer}; expected 0 (after the embeddings) to "
                f"num_hidden_layers={bert_config.num_hidden_layers}"
            )
        if bert_config.hidden_size % resolved.num_heads:
            raise UserError(
                f"fusion config field num_heads={resolved.num_heads} does not divide the LM's "
                f"hidden_size={bert_config.hidden_size}"
            )
        return resolved

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any], *, source: str = "fusion config") -> FusionConfig:
        """Strict inverse of ``to_dict``: unknown keys and wrongly typed values are ``UserError``s."""
        fields = {field.name: field for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise UserError(f"{source}: unknown field(s) {unknown}; expected some of {sorted(fields)}")
        for name, value in values.items():
            integer = name in ("audio_dim", "fusion_layer", "num_heads", "intermediate_size")
            nullable = name in ("num_heads", "intermediate_size")
            ok = (value is None and nullable) or (
                not isinstance(value, bool) and isinstance(value, int if integer else (int, float))
            )
            if not ok:
                expected = "an integer" if integer else "a number"
                raise UserError(
                    f"{source}: field {name}={value!r} has the wrong type; expected {expected}"
                    + (" or null" if nullable else "")
                )
        try:
            return cls(**values)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None


def _linear(in_features: int, out_features: int, config: FusionConfig, *, dtype, param_dtype, rngs) -> nnx.Linear:
    return nnx.Linear(
        in_features,
        out_features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nnx.initializers.normal(stddev=config.initializer_range),
        rngs=rngs,
    )


class AudioProjector(nnx.Module):
    """ITH's ``AudioMLP``: audio tokens ``[..., D_audio]`` -> ``[..., H]`` through Linear, ReLU, Linear."""

    def __init__(self, config: FusionConfig, hidden_size: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.input = _linear(config.audio_dim, hidden_size, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.output = _linear(hidden_size, hidden_size, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, audio_tokens: jax.Array) -> jax.Array:
        # The cache stores float16 tokens; they enter in the compute dtype like every other activation.
        return self.output(jax.nn.relu(self.input(audio_tokens.astype(self.dtype))))


class AudioFusionLayer(nnx.Module):
    """Cross-attention from text tokens to audio tokens, add & norm, GELU FFN, add & norm, then ITH's gate."""

    def __init__(self, config: FusionConfig, bert_config: BertConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        hidden_size = bert_config.hidden_size
        linear = lambda n_in, n_out: _linear(n_in, n_out, config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # ITH's nn.LayerNorm uses torch's eps, not the LM's; bert.LayerNorm takes it from the config it is given.
        norm_config = dataclasses.replace(bert_config, layer_norm_eps=config.layer_norm_eps)
        norm = lambda: LayerNorm(hidden_size, norm_config, param_dtype=param_dtype)
        self.dtype = dtype
        self.num_heads = config.num_heads
        self.head_dim = hidden_size // config.num_heads
        self.query = linear(hidden_size, hidden_size)
        self.key = linear(hidden_size, hidden_size)
        self.value = linear(hidden_size, hidden_size)
        self.attention_output = linear(hidden_size, hidden_size)
        self.attention_layer_norm = norm()
        self.intermediate = linear(hidden_size, config.intermediate_size)
        self.output = linear(config.intermediate_size, hidden_size)
        self.output_layer_norm = norm()
        self.gate_audio = linear(hidden_size, hidden_size)  # ITH's W_a, applied to the fused states
        self.gate_text = linear(hidden_size, hidden_size)  # ITH's W_t, applied to the incoming text states
        self.attention_dropout = Dropout(config.dropout)
        self.output_dropout = Dropout(config.dropout)

    def __call__(
        self, text: jax.Array, audio: jax.Array, key_allowed: jax.Array, *, deterministic: bool, rngs
    ) -> tuple[jax.Array, jax.Array]:
        """``text [B, L, H]``, ``audio [B, K, H]``, ``key_allowed [B, L, K]`` (bool) -> (fused ``[B, L, H]`` in the
        compute dtype, gate ``[B, L, H]`` float32). A row with no allowed key attends uniformly (finite)."""
        batch, length, hidden = text.shape
        keys = audio.shape[1]
        text = text.astype(self.dtype)
        heads = lambda x, n: x.reshape(batch, n, self.num_heads, self.head_dim)
        query = heads(self.query(text), length) * jnp.asarray(1.0 / math.sqrt(self.head_dim), self.dtype)
        key = heads(self.key(audio), keys)
        value = heads(self.value(audio), keys)
        scores = jnp.einsum("bqhd,bkhd->bhqk", query, key, preferred_element_type=jnp.float32)
        mask_bias = jnp.where(key_allowed, 0.0, MASKED_SCORE).astype(jnp.float32)[:, None]
        probs = jax.nn.softmax(scores + mask_bias, axis=-1)
        probs = self.attention_dropout(probs, deterministic=deterministic, rngs=rngs).astype(self.dtype)
        context = jnp.einsum("bhqk,bkhd->bqhd", probs, value).reshape(batch, length, hidden)
        attended = self.attention_layer_norm(text + self.attention_output(context)).astype(self.dtype)
        expanded = gelu_exact(self.intermediate(attended).astype(jnp.float32)).astype(self.dtype)
        projected = self.output_dropout(self.output(expanded), deterministic=deterministic, rngs=rngs)
        fused = self.output_layer_norm(attended + projected)  # float32: H_a of the gate
        gate_logits = self.gate_audio(fused.astype(self.dtype)) + self.gate_text(text)
        gate = jax.nn.sigmoid(gate_logits.astype(jnp.float32))
        blended = gate * fused + (1.0 - gate) * text.astype(jnp.float32)
        return blended.astype(self.dtype), gate


def span_token_owner(span_ranges: jax.Array, span_fused: jax.Array, length: int) -> jax.Array:
    """``[B, L]`` int32: the span slot whose fused audio each token takes, -1 for tokens left unchanged.

    ``span_ranges [B, S, 2]`` are token ``[start, end)``; ``span_fused [B, S]`` says which slots are fused. A
    token inside two fused slots goes to the later one.
    """
    num_spans = span_ranges.shape[1]
    position = jnp.arange(length, dtype=jnp.int32)
    start, end = span_ranges[..., 0:1].astype(jnp.int32), span_ranges[..., 1:2].astype(jnp.int32)
    covers = (position >= start) & (position < end) & span_fused.astype(bool)[..., None]  # [B, S, L]
    slot = jnp.arange(num_spans, dtype=jnp.int32)[None, :, None]
    return jnp.max(jnp.where(covers, slot, -1), axis=1)


class FusedMaskedLM(nnx.Module):
    """``BertForMaskedLM`` with ITH's audio fusion after encoder layer ``fusion_config.fusion_layer``.

    The MLM (``mlm``), projector and fusion layer are plain submodules, so ``nnx.split(model, nnx.Param)``, the
    optimizer, data parallelism and Orbax see every parameter. Build it with ``build_fused_mlm``.
    """

    def __init__(self, mlm: BertForMaskedLM, fusion_config: FusionConfig, *, rngs: nnx.Rngs,
                 audio_encoder: nnx.Module | None = None):
        bert_config = mlm.config
        self.fusion_config = fusion_config.resolve(bert_config)
        self.dtype = mlm.dtype
        param_dtype = mlm.bert.embeddings.word_embeddings.embedding[...].dtype
        hidden = bert_config.hidden_size
        self.mlm = mlm
        self.projector = AudioProjector(self.fusion_config, hidden, dtype=self.dtype, param_dtype=param_dtype,
                                        rngs=rngs)
        self.fusion = AudioFusionLayer(self.fusion_config, bert_config, dtype=self.dtype, param_dtype=param_dtype,
                                       rngs=rngs)
        # The trained AST (``ith_jax.models.ast.AstAudioEncoder``) of ``audio.encoder=ast_trainable``, or None when
        # the audio arrives as the cache's frozen tokens. Its output width must be the projector's input.
        if audio_encoder is not None and audio_encoder.output_dim != self.fusion_config.audio_dim:
            raise UserError(f"fusion config field audio_dim={self.fusion_config.audio_dim} is not the audio "
                            f"encoder's output width {audio_encoder.output_dim}")
        self.audio_encoder = audio_encoder

    def fuse(
        self,
        hidden: jax.Array,
        audio_tokens: jax.Array,
        audio_mask: jax.Array | None,
        span_ranges: jax.Array,
        span_fused: jax.Array,
        *,
        deterministic: bool = True,
        rngs: nnx.Rngs | None = None,
        per_unit_gate: bool = False,
    ) -> tuple[jax.Array, jax.Array]:
        """Fuses every span's audio into its tokens of ``hidden [B, L, H]``.

        ``audio_tokens [B, S, T, D_audio]``, ``audio_mask [B, S, T]`` (True = real token; None = all real),
        ``span_ranges [B, S, 2]``, ``span_fused [B, S]`` (bool). A slot whose audio tokens are all padding is
        not fused. With a trained audio encoder, ``audio_tokens`` are each slot's filterbank features
        ``[B, S, frames, mel]`` and ``audio_mask`` marks the frames computed from audio; the encoder turns them
        into the tokens (every slot is encoded: static shapes). Returns the new hidden states (unfused tokens unchanged) and the gate per token ``[B, L]``
        float32: the mean over hidden units of g on fused tokens, 0 elsewhere (they keep all their text); with
        ``per_unit_gate`` the gate itself, ``[B, L, H]`` (for analysis: a mean near 0.5 can hide units that opened).
        """
        batch, length, hidden_size = hidden.shape
        if audio_mask is None:
            audio_mask = jnp.ones(audio_tokens.shape[:3], bool)
        audio_mask = audio_mask.astype(bool)
        span_fused = span_fused.astype(bool) & jnp.any(audio_mask, axis=-1)
        if self.audio_encoder is not None:
            clips = audio_tokens.shape[0] * audio_tokens.shape[1]
            tokens, token_mask = self.audio_encoder(audio_tokens.reshape(clips, *audio_tokens.shape[2:]),
                                                    audio_mask.reshape(clips, audio_mask.shape[-1]),
                                                    deterministic=deterministic, rngs=rngs)
            audio_tokens = tokens.reshape(*audio_tokens.shape[:2], *tokens.shape[1:])
            audio_mask = token_mask.reshape(*audio_tokens.shape[:3])
        _, num_spans, num_tokens, _ = audio_tokens.shape
        owner = span_token_owner(span_ranges, span_fused, length)  # [B, L]
        slot = jnp.arange(num_spans, dtype=jnp.int32)[None, None, :, None]
        key_allowed = (owner[:, :, None, None] == slot) & audio_mask[:, None]  # [B, L, S, T]
        audio = self.projector(audio_tokens).reshape(batch, num_spans * num_tokens, hidden_size)
        fused, gate = self.fusion(
            hidden, audio, key_allowed.reshape(batch, length, num_spans * num_tokens),
            deterministic=deterministic, rngs=rngs,
        )
        is_fused = owner >= 0
        new_hidden = jnp.where(is_fused[..., None], fused.astype(hidden.dtype), hidden)
        if per_unit_gate:
            return new_hidden, jnp.where(is_fused[..., None], gate, 0.0)
        return new_hidden, jnp.where(is_fused, jnp.mean(gate, axis=-1), 0.0)

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array,
        token_type_ids: jax.Array | None = None,
        *,
        audio_tokens: jax.Array,
        span_ranges: jax.Array,
        span_mask: jax.Array,
        span_has_audio: jax.Array,
        audio_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        deterministic: bool = True,
        rngs: nnx.Rngs | jax.Array | None = None,
        return_gate: bool = False,
        per_unit_gate: bool = False,
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """Float32 logits as ``BertForMaskedLM`` returns them (``[B, M, V]`` at ``positions`` or ``[B, L, V]``),
        and with ``return_gate`` also the gate per token ``[B, L]`` (``[B, L, H]`` with ``per_unit_gate``; see ``fuse``).

        Audio inputs as in ``fuse``: ``audio_tokens [B, S, T, D_audio]``, ``audio_mask [B, S, T]`` (None: all real),
        ``span_ranges [B, S, 2]``. A span slot is fused when ``span_mask`` (slot used) and ``span_has_audio``
        (audio accepted) are both set.
        """
        rngs = _as_dropout_rngs(rngs, deterministic)
        span_fused = span_mask.astype(bool) & span_has_audio.astype(bool)
        fusion_layer = self.fusion_config.fusion_layer
        gates = []

        def fuse_at_layer(index: int, hidden: jax.Array) -> jax.Array:
            if index != fusion_layer:
                return hidden
            hidden, gate = self.fuse(hidden, audio_tokens, audio_mask, span_ranges, span_fused,
                                     deterministic=deterministic, rngs=rngs, per_unit_gate=per_unit_gate)
            gates.append(gate)
            return hidden

        logits = self.mlm(input_ids, attention_mask, token_type_ids, positions=positions,
                          deterministic=deterministic, rngs=rngs, hidden_hook=fuse_at_layer)
        return (logits, gates[0]) if return_gate else logits


def build_fused_mlm(mlm: BertForMaskedLM, fusion_config: FusionConfig, *, rngs: nnx.Rngs,
                    audio_encoder: nnx.Module | None = None) -> FusedMaskedLM:
    """Wraps a (typically pretrained) ``BertForMaskedLM``; the projector and fusion layer are drawn from ``rngs``.
    ``audio_encoder``: the trained AST (``ith_jax.models.ast.AstAudioEncoder``) that makes the audio tokens from
    filterbank features, or None for cached tokens.

    Raises ``UserError`` when ``fusion_config`` does not fit the LM (fusion_layer past the last encoder layer,
    num_heads not dividing hidden_size).
    """
    return FusedMaskedLM(mlm, fusion_config, rngs=rngs, audio_encoder=audio_encoder)
