"""What a model *is*, as data: the spec every checkpoint stores and the one function that builds a model from it.

``ModelSpec`` (head, BERT config, compute dtype, number of labels, fusion config) is written into the metadata
of every checkpoint, so a workdir alone is enough to rebuild its model: ``build_model(spec)`` gives a model of
exactly that shape (random weights, to be replaced by the restored ones), and ``evaluate``/``detect`` need
neither the config file nor the text_model checkpoint's weights.  Training builds the same way, with
``pretrained=`` naming the Hugging Face checkpoint whose weights it starts from.

``fusion`` is None for the text-only models; the audio-fused LM (``ith_jax.models.fusion``, an ``mlm`` head)
puts its resolved ``FusionConfig`` there, so the fused model is rebuilt from the workdir like any other.
``audio_encoder`` is None unless that LM trains its own AST (``audio.encoder=ast_trainable``): then it holds the
AST's config and how its tokens are made (``AUDIO_ENCODER_KEYS``), and the AST's weights live in the checkpoint.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from ith_common.errors import UserError
from ith_jax.models import ast as ast_lib
from ith_jax.models import bert, convert
from ith_jax.models import fusion as fusion_lib

HEADS = ("mlm", "token_classification")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# config key audio.encoder: the cache's frozen tokens, or a Flax AST trained in the step on cached features.
AUDIO_ENCODERS = ("cached", "ast_trainable")
# ModelSpec.audio_encoder's keys: the AST architecture, pooled tokens per span (0 = all), remat, compute dtype.
AUDIO_ENCODER_KEYS = ("ast", "num_tokens", "remat", "dtype")
AST_MODEL_KEY = "config key audio.ast_model"  # how errors about the AST checkpoint name it


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    head: str  # "mlm" (BertForMaskedLM) | "token_classification" (BertForTokenClassification)
    bert: Mapping[str, Any]  # BertConfig.to_dict()
    dtype: str = "float32"  # compute dtype; parameters are always float32
    num_labels: int | None = None  # token_classification only
    fusion: Mapping[str, Any] | None = None  # the audio-fusion config; None for text-only models
    audio_encoder: Mapping[str, Any] | None = None  # the trained AST (AUDIO_ENCODER_KEYS); None: cached tokens

    def __post_init__(self) -> None:
        if self.head not in HEADS:
            raise UserError(f"model spec: head={self.head!r}; expected one of {', '.join(HEADS)}")
        if self.dtype not in DTYPES:
            raise UserError(f"model spec: dtype={self.dtype!r}; expected one of {', '.join(DTYPES)}")
        if self.head == "token_classification":
            if not isinstance(self.num_labels, int) or isinstance(self.num_labels, bool) or self.num_labels < 1:
                raise UserError(f"model spec: num_labels={self.num_labels!r}; expected a positive integer "
                                "for a token_classification head")
        elif self.num_labels is not None:
            raise UserError(f"model spec: num_labels={self.num_labels!r}; expected null for head {self.head!r}")
        # Normalise through BertConfig (and FusionConfig): they check every field and fill the defaults, so
        # two specs of one architecture compare equal however they were written.
        object.__setattr__(self, "bert", self.bert_config.to_dict())
        if self.fusion is not None:
            if self.head != "mlm":
                raise UserError(f"model spec: fusion is set for head {self.head!r}; expected it only with 'mlm'")
            if not isinstance(self.fusion, Mapping):
                raise UserError(f"model spec: fusion is {type(self.fusion).__name__}; expected an object or null")
            resolved = self.fusion_config.resolve(self.bert_config)
            object.__setattr__(self, "fusion", resolved.to_dict())
        if self.audio_encoder is not None:
            object.__setattr__(self, "audio_encoder", self._checked_audio_encoder())

    def _checked_audio_encoder(self) -> dict[str, Any]:
        values = self.audio_encoder
        if self.fusion is None or not isinstance(values, Mapping) or set(values) != set(AUDIO_ENCODER_KEYS):
            raise UserError(f"model spec: audio_encoder={values!r}; expected null, or (with fusion) an object with "
                            f"the keys {', '.join(AUDIO_ENCODER_KEYS)}")
        config = ast_lib.AstConfig.from_dict(values["ast"], source="model spec audio_encoder.ast")
        num_tokens, remat, dtype = values["num_tokens"], values["remat"], values["dtype"]
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens < 0:
            raise UserError(f"model spec: audio_encoder.num_tokens={num_tokens!r}; expected an integer >= 0")
        if not isinstance(remat, bool) or dtype not in DTYPES:
            raise UserError(f"model spec: audio_encoder remat={remat!r} / dtype={dtype!r}; expected a boolean and "
                            f"one of {', '.join(DTYPES)}")
        if self.fusion["audio_dim"] != config.hidden_size:
            raise UserError(f"model spec: fusion.audio_dim={self.fusion['audio_dim']} is not the AST's hidden_size "
                            f"{config.hidden_size}")
        return {"ast": config.to_dict(), "num_tokens": num_tokens, "remat": remat, "dtype": dtype}

    @property
    def ast_config(self) -> ast_lib.AstConfig | None:
        if self.audio_encoder is None:
            return None
        return ast_lib.AstConfig.from_dict(self.audio_encoder["ast"], source="model spec audio_encoder.ast")

    @property
    def fusion_config(self) -> fusion_lib.FusionConfig | None:
        if self.fusion is None:
            return None
        return fusion_lib.FusionConfig.from_dict(dict(self.fusion), source="model spec fusion")

    @property
    def bert_config(self) -> bert.BertConfig:
        return bert.BertConfig.from_dict(self.bert, source="model spec bert")

    def to_dict(self) -> dict[str, Any]:
        return {"head": self.head, "bert": dict(self.bert), "dtype": self.dtype, "num_labels": self.num_labels,
                "fusion": None if self.fusion is None else dict(self.fusion),
                "audio_encoder": None if self.audio_encoder is None else copy.deepcopy(dict(self.audio_encoder))}

    @classmethod
    def from_dict(cls, values: Any, *, source: str) -> ModelSpec:
        """The spec stored as JSON (``to_dict``); ``source`` (e.g. the checkpoint directory) prefixes errors."""
        fields = [f.name for f in dataclasses.fields(cls)]
        if not isinstance(values, Mapping):
            raise UserError(f"{source}: model_spec is {type(values).__name__}; expected an object")
        unknown = sorted(set(values) - set(fields))
        missing = [name for name in ("head", "bert") if name not in values]
        if unknown or missing:
            raise UserError(f"{source}: model_spec has unknown keys {unknown} / lacks {missing}; "
                            f"expected the keys {', '.join(fields)}")
        if not isinstance(values["bert"], Mapping):
            raise UserError(f"{source}: model_spec.bert is {type(values['bert']).__name__}; expected an object")
        try:
            return cls(**values)
        except UserError as error:
            raise UserError(f"{source}: {error}") from None

    def differences(self, other: ModelSpec) -> list[tuple[str, Any, Any]]:
        """``(key, self's value, other's value)`` for every field that differs (BERT fields as ``bert.<name>``)."""
        mine, theirs = self.to_dict(), other.to_dict()
        found = []
        for key in mine:
            if key == "bert":
                found += [(f"bert.{name}", mine["bert"].get(name), theirs["bert"].get(name))
                          for name in sorted(set(mine["bert"]) | set(theirs["bert"]))
                          if mine["bert"].get(name) != theirs["bert"].get(name)]
            elif key == "audio_encoder" and mine[key] and theirs[key]:
                found += [(f"audio_encoder.{name}", mine[key].get(name), theirs[key].get(name))
                          for name in AUDIO_ENCODER_KEYS if mine[key].get(name) != theirs[key].get(name)]
            elif mine[key] != theirs[key]:
                found.append((key, mine[key], theirs[key]))
        return found


def spec_from_config(config: ml_collections.ConfigDict, head: str, num_labels: int | None = None, *,
                     audio_dim: int | None = None) -> ModelSpec:
    """The spec a trainer config asks for: the text_model checkpoint's BertConfig, with ``config.model``'s
    overrides when ``random_init`` (a pretrained model keeps its checkpoint's shape); with ``audio_dim`` (the
    cache's token width) the fusion config of ``config.fusion_layer`` and ``config.fusion``. With
    ``audio.encoder=ast_trainable`` the fusion's audio width is the AST's (``audio.ast_model``'s config), and
    ``audio_dim`` (then the cache's mel bins) is not used."""
    ckpt_dir = convert.resolve_checkpoint_dir(config.text_model)
    values = convert.config_from_checkpoint(ckpt_dir).to_dict()
    if config.random_init:
        values.update({k: v for k, v in config.model.to_dict().items() if v is not None})
    fusion = audio_encoder = None
    ast_source = pretrained_ast_source(config)
    if ast_source is not None:
        ast_config = ast_lib.ast_config_from_checkpoint(ast_source, what=AST_MODEL_KEY)
        audio_dim = ast_config.hidden_size
        audio_encoder = {"ast": ast_config.to_dict(), "num_tokens": config.audio.num_tokens,
                         "remat": config.audio.ast_remat, "dtype": config.audio.ast_dtype or config.dtype}
    if audio_dim is not None:
        fusion = fusion_lib.FusionConfig(audio_dim=audio_dim, fusion_layer=config.fusion_layer,
                                         num_heads=config.fusion.num_heads,
                                         intermediate_size=config.fusion.intermediate_size).to_dict()
    return ModelSpec(head=head, bert=values, dtype=config.dtype, num_labels=num_labels, fusion=fusion,
                     audio_encoder=audio_encoder)


def pretrained_ast_source(config: ml_collections.ConfigDict) -> str | None:
    """``audio.ast_model`` when the config trains an AST (``audio.encoder=ast_trainable``), else None."""
    audio = config.get("audio")
    if audio is None or audio.get("encoder", "cached") != "ast_trainable":
        return None
    return audio.ast_model


def build_model(spec: ModelSpec, *, seed: int = 0, pretrained: str | None = None,
                pretrained_ast: str | None = None) -> nnx.Module:
    """The model ``spec`` describes: freshly initialised from ``seed``, or with the weights of the Hugging Face
    checkpoint ``pretrained`` (whose architecture must be the spec's). A spec with ``fusion`` wraps that LM in
    ``FusedMaskedLM``; its projector and fusion layer are drawn from a key of their own (derived from ``seed``),
    so the LM's initial weights are those of the text-only model. A spec with ``audio_encoder`` adds the trained
    AST: from the Hugging Face checkpoint ``pretrained_ast``, or freshly initialised from a third key."""
    text_model = _build_text_model(spec, seed=seed, pretrained=pretrained)
    if spec.fusion is None:
        return text_model
    audio_encoder = None
    if spec.audio_encoder is not None:
        audio_encoder = _build_audio_encoder(spec, seed=seed, pretrained=pretrained_ast)
    fusion_key = jax.random.fold_in(jax.random.key(seed), 1)
    return fusion_lib.build_fused_mlm(text_model, spec.fusion_config, rngs=nnx.Rngs(params=fusion_key),
                                      audio_encoder=audio_encoder)


def _build_audio_encoder(spec: ModelSpec, *, seed: int, pretrained: str | None) -> ast_lib.AstAudioEncoder:
    settings = spec.audio_encoder
    dtype = DTYPES[settings["dtype"]]
    if pretrained is not None:
        ast, info = ast_lib.load_pretrained_ast(pretrained, dtype=dtype, remat=settings["remat"], what=AST_MODEL_KEY)
        if info.config != spec.ast_config:
            raise UserError(f"{info.checkpoint_dir}: its config.json is not the AST architecture of the model spec "
                            f"({info.config} vs {spec.ast_config})")
    else:
        ast = ast_lib.AstModel(spec.ast_config, dtype=dtype, remat=settings["remat"],
                               rngs=nnx.Rngs(params=jax.random.fold_in(jax.random.key(seed), 2)))
    return ast_lib.AstAudioEncoder(ast, settings["num_tokens"])


def _build_text_model(spec: ModelSpec, *, seed: int, pretrained: str | None) -> nnx.Module:
    dtype = DTYPES[spec.dtype]
    if pretrained is not None:
        model, info = convert.load_pretrained(pretrained, spec.head, num_labels=spec.num_labels, dtype=dtype,
                                              seed=seed)
        if info.config.to_dict() != dict(spec.bert):
            raise UserError(f"{info.checkpoint_dir}: its config.json is not the architecture of the model spec "
                            f"({info.config} vs {spec.bert_config})")
        return model
    rngs = nnx.Rngs(params=seed)
    if spec.head == "mlm":
        return bert.BertForMaskedLM(spec.bert_config, dtype=dtype, rngs=rngs)
    return bert.BertForTokenClassification(spec.bert_config, spec.num_labels, dtype=dtype, rngs=rngs)
