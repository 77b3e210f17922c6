"""Hugging Face BERT checkpoints -> ``ith_jax.models.bert`` models.

``resolve_checkpoint_dir`` turns a local directory or a hub id into a directory, ``load_hf_weights`` reads its
tensors as numpy (safetensors first; ``pytorch_model.bin`` only through torch, imported lazily), and
``load_pretrained`` builds a model and fills it, mapping Hugging Face names onto the NNX tree. Heads that the
checkpoint lacks (MiniLM ships no MLM head) keep their Hugging Face-style initialisation and are reported in
``LoadInfo.freshly_initialised``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from flax import nnx

from ith_common import hub
from ith_common.errors import UserError
from ith_jax.models.bert import BertConfig, BertForMaskedLM, BertForTokenClassification, BertModel

LOGGER = logging.getLogger("ith_jax")

HEADS = ("mlm", "token_classification", "base")

HUB_ALLOW_PATTERNS = [
    "config.json",
    "*.safetensors",
    "*.safetensors.index.json",
    "*.bin",
    "*.bin.index.json",
    "vocab.txt",
    "tokenizer*.json",
    "special_tokens_map.json",
]

# Buffers that Hugging Face saves with the weights but that are not parameters.
_IGNORED_KEYS = re.compile(r"(^|\.)(position_ids|token_type_ids)$")


def resolve_checkpoint_dir(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory for ``path_or_id`` (the directory itself, or a hub snapshot of only the config,
    weight and tokenizer files): `ith_common.hub.resolve_checkpoint_dir`, the project's one resolver."""
    return hub.resolve_checkpoint_dir(path_or_id, what="text_model", allow_patterns=HUB_ALLOW_PATTERNS)


def read_config_json(ckpt_dir: Path, *, kind: str) -> dict:
    """The ``config.json`` object of a Hugging Face checkpoint directory; ``kind`` (e.g. "BERT") names the
    checkpoint expected in the error when the file is missing. Bad JSON or a non-object is a one-line UserError."""
    config_path = ckpt_dir / "config.json"
    if not config_path.is_file():
        raise UserError(f"{config_path} not found; expected a Hugging Face {kind} checkpoint directory")
    try:
        values = json.loads(config_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"{config_path}: not valid JSON ({error})") from None
    if not isinstance(values, dict):
        raise UserError(f"{config_path}: expected a JSON object at the top level")
    return values


def _read_config_json(ckpt_dir: Path) -> dict:
    config_path = ckpt_dir / "config.json"
    values = read_config_json(ckpt_dir, kind="BERT")
    model_type = values.get("model_type", "bert")
    if model_type != "bert":
        raise UserError(f"{config_path}: field model_type={model_type!r}; expected 'bert'")
    return values


def config_from_checkpoint(ckpt_dir: str | os.PathLike) -> BertConfig:
    """The ``BertConfig`` of a checkpoint directory (its ``config.json``)."""
    ckpt_dir = Path(ckpt_dir)
    return BertConfig.from_dict(_read_config_json(ckpt_dir), source=str(ckpt_dir / "config.json"))


def _load_safetensors(path: Path) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    try:
        return load_file(path)
    except TypeError:
        # numpy has no bfloat16; the flax reader does (through ml_dtypes) and we upcast below anyway.
        with safe_open(path, framework="flax") as handle:
            return {key: np.asarray(handle.get_tensor(key)) for key in handle.keys()}
    except SafetensorError as error:
        raise UserError(f"{path}: not a readable safetensors file ({error})") from None


def _load_torch_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch  # only for legacy .bin checkpoints; ith_jax otherwise never imports torch
    except ImportError:
        raise UserError(
            f"{path}: only a PyTorch .bin checkpoint is present and torch is not installed; convert it to "
            "model.safetensors (e.g. save_pretrained(..., safe_serialization=True)) or install torch"
        ) from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise UserError(f"{path}: torch.load(weights_only=True) failed ({type(error).__name__}: {error})") from None
    if not isinstance(state, Mapping):
        raise UserError(f"{path}: expected a state dict of tensors, got {type(state).__name__}")
    return {key: tensor.detach().to(torch.float32).numpy() for key, tensor in state.items()}


def _load_sharded(index_path: Path, load_shard) -> dict[str, np.ndarray]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as error:
        raise UserError(f"{index_path}: expected JSON with a 'weight_map' object ({error})") from None
    weights: dict[str, np.ndarray] = {}
    for shard in sorted(set(weight_map.values())):
        shard_path = index_path.parent / shard
        if not shard_path.is_file():
            raise UserError(f"{index_path}: shard {shard} listed in weight_map does not exist")
        weights.update(load_shard(shard_path))
    return weights


def _weights_file(ckpt_dir: Path) -> Path:
    for name in (
        "model.safetensors",
        "model.safetensors.index.json",
        "pytorch_model.bin",
        "pytorch_model.bin.index.json",
    ):
        if (ckpt_dir / name).is_file():
            return ckpt_dir / name
    raise UserError(
        f"{ckpt_dir}: no weights found; expected model.safetensors (or a sharded index) or pytorch_model.bin"
    )


def load_hf_weights(ckpt_dir: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a checkpoint directory by Hugging Face name, as float32 numpy arrays."""
    path = _weights_file(Path(ckpt_dir))
    if path.name == "model.safetensors":
        weights = _load_safetensors(path)
    elif path.name == "model.safetensors.index.json":
        weights = _load_sharded(path, _load_safetensors)
    elif path.name == "pytorch_model.bin":
        weights = _load_torch_bin(path)
    else:
        weights = _load_sharded(path, _load_torch_bin)
    return {
        key: value if value.dtype == np.float32 or not np.issubdtype(value.dtype, np.floating)
        else value.astype(np.float32)
        for key, value in weights.items()
    }


# Hugging Face name (after dropping the "bert." prefix) -> path inside the NNX ``BertModel``, for the tensors
# the encoder owns. ``{i}`` is the layer index. Linear weights are transposed: torch stores [out, in].
_LINEAR = {"weight": ("kernel", True), "bias": ("bias", False)}
_NORM = {"weight": ("scale", False), "bias": ("bias", False)}
_EMBED = {"weight": ("embedding", False)}

_ENCODER_NAMES: list[tuple[str, tuple, dict]] = [
    ("embeddings.word_embeddings", ("embeddings", "word_embeddings"), _EMBED),
    ("embeddings.position_embeddings", ("embeddings", "position_embeddings"), _EMBED),
    ("embeddings.token_type_embeddings", ("embeddings", "token_type_embeddings"), _EMBED),
    ("embeddings.LayerNorm", ("embeddings", "layer_norm"), _NORM),
    ("encoder.layer.{i}.attention.self.query", ("layers", "{i}", "query"), _LINEAR),
    ("encoder.layer.{i}.attention.self.key", ("layers", "{i}", "key"), _LINEAR),
    ("encoder.layer.{i}.attention.self.value", ("layers", "{i}", "value"), _LINEAR),
    ("encoder.layer.{i}.attention.output.dense", ("layers", "{i}", "attention_output"), _LINEAR),
    ("encoder.layer.{i}.attention.output.LayerNorm", ("layers", "{i}", "attention_layer_norm"), _NORM),
    ("encoder.layer.{i}.intermediate.dense", ("layers", "{i}", "intermediate"), _LINEAR),
    ("encoder.layer.{i}.output.dense", ("layers", "{i}", "output"), _LINEAR),
    ("encoder.layer.{i}.output.LayerNorm", ("layers", "{i}", "output_layer_norm"), _NORM),
    ("pooler.dense", ("pooler",), _LINEAR),
]

# Head tensors: Hugging Face name (full) -> path at the top of the NNX head model.
_HEAD_NAMES: list[tuple[str, tuple, dict]] = [
    ("cls.predictions.transform.dense", ("transform",), _LINEAR),
    ("cls.predictions.transform.LayerNorm", ("transform_layer_norm",), _NORM),
    ("classifier", ("classifier",), _LINEAR),
]

# Which group a parameter belongs to, for reporting what was freshly initialised.
_GROUPS = [
    ("mlm_transform", ("transform", "transform_layer_norm")),
    ("mlm_decoder_bias", ("decoder_bias",)),
    ("classifier", ("classifier",)),
    ("pooler", ("pooler",)),
]


@dataclasses.dataclass(frozen=True)
class _Source:
    hf_name: str
    array: np.ndarray
    transpose: bool


def _normalise_name(name: str) -> str:
    # Checkpoints converted from the original TF code name LayerNorm parameters gamma/beta.
    name = re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", name)
    return re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name)


def _compile_patterns(table):
    compiled = []
    for hf_prefix, nnx_prefix, leaves in table:
        pattern = re.escape(hf_prefix).replace(re.escape("{i}"), r"(?P<i>\d+)")
        compiled.append((re.compile(rf"^{pattern}\.(?P<leaf>\w+)$"), nnx_prefix, leaves))
    return compiled


_ENCODER_PATTERNS = _compile_patterns(_ENCODER_NAMES)
_HEAD_PATTERNS = _compile_patterns(_HEAD_NAMES)


def _match(name: str, patterns) -> tuple | None:
    for pattern, nnx_prefix, leaves in patterns:
        found = pattern.match(name)
        if found is None or found["leaf"] not in leaves:
            continue
        leaf, transpose = leaves[found["leaf"]]
        path = tuple(int(found["i"]) if part == "{i}" else part for part in nnx_prefix)
        return path + (leaf,), transpose
    return None


def map_hf_names(weights: Mapping[str, np.ndarray], encoder_prefix: tuple) -> tuple[dict[tuple, _Source], list[str]]:
    """Maps Hugging Face tensor names onto NNX parameter paths.

    ``encoder_prefix`` is where ``BertModel`` sits in the target tree (``("bert",)`` inside a head model,
    ``()`` for a bare encoder). Returns the mapped tensors and the names that map to nothing.
    """
    mapped: dict[tuple, _Source] = {}
    unmapped: list[str] = []
    for original_name, array in weights.items():
        if _IGNORED_KEYS.search(original_name):
            continue
        name = _normalise_name(original_name)
        target = None
        if name.startswith(("cls.predictions.", "classifier.")):
            if name in ("cls.predictions.bias", "cls.predictions.decoder.bias"):
                target = (("decoder_bias",), False)
            elif name == "cls.predictions.decoder.weight":
                continue  # tied to the word embeddings; checked in _check_tied_decoder
            else:
                target = _match(name, _HEAD_PATTERNS)
        else:
            encoder_name = name.removeprefix("bert.")
            found = _match(encoder_name, _ENCODER_PATTERNS)
            if found is not None:
                target = (encoder_prefix + found[0], found[1])
        if target is None:
            unmapped.append(original_name)
            continue
        path, transpose = target
        # cls.predictions.bias and its alias decoder.bias hold the same tensor; keep the canonical one.
        if path in mapped and original_name.endswith("decoder.bias"):
            continue
        mapped[path] = _Source(original_name, array, transpose)
    return mapped, unmapped


def hf_name_of(path: tuple, encoder_prefix: tuple = ("bert",)) -> tuple[str, bool] | None:
    """The inverse of ``map_hf_names`` (the same tables): the Hugging Face name of the NNX parameter at ``path``
    and whether its array is transposed between the two; None for a parameter Hugging Face has no name for.
    ``encoder_prefix`` as in ``map_hf_names``; layer indices may be ints or digit strings."""
    path = tuple(int(p) if isinstance(p, str) and p.isdigit() else p for p in path)
    if path == ("decoder_bias",):
        return "cls.predictions.bias", False
    tables = [(_HEAD_NAMES, (), "")]
    if path[: len(encoder_prefix)] == encoder_prefix:
        tables.append((_ENCODER_NAMES, encoder_prefix, "bert." if encoder_prefix else ""))
    for table, prefix, hf_root in tables:
        rest = path[len(prefix):]
        for hf_prefix, nnx_prefix, leaves in table:
            if len(rest) != len(nnx_prefix) + 1:
                continue
            layers = [got for want, got in zip(nnx_prefix, rest) if want == "{i}" and isinstance(got, int)]
            if any(want != got for want, got in zip(nnx_prefix, rest) if want != "{i}") or (
                    len(layers) != nnx_prefix.count("{i}")):
                continue
            for hf_leaf, (nnx_leaf, transpose) in leaves.items():
                if nnx_leaf == rest[-1]:
                    name = hf_prefix.replace("{i}", str(layers[0])) if layers else hf_prefix
                    return f"{hf_root}{name}.{hf_leaf}", transpose
    return None


def _check_tied_decoder(weights: Mapping[str, np.ndarray], weights_name: str) -> None:
    decoder = weights.get("cls.predictions.decoder.weight")
    embeddings = weights.get("bert.embeddings.word_embeddings.weight", weights.get("embeddings.word_embeddings.weight"))
    if decoder is None or embeddings is None or decoder.shape != embeddings.shape:
        return
    if not np.array_equal(decoder, embeddings):
        LOGGER.warning(
            "%s: cls.predictions.decoder.weight differs from the word embeddings; ith-jax ties the decoder to "
            "the embeddings, so the decoder copy is ignored",
            weights_name,
        )


def _group_of(path: tuple) -> str:
    for group, roots in _GROUPS:
        if path[0] in roots or (len(path) > 1 and path[0] == "bert" and path[1] in roots):
            return group
    return "encoder"


@dataclasses.dataclass(frozen=True)
class LoadInfo:
    """What ``load_pretrained`` did: where the weights came from and which parameters it could not fill."""

    checkpoint_dir: Path
    weights_file: Path
    config: BertConfig
    head: str
    freshly_initialised: tuple[str, ...]  # parameter groups not in the checkpoint, e.g. ("mlm_transform",)
    unused_weights: tuple[str, ...]  # checkpoint tensors the model has no place for (e.g. an NSP head)


def _num_labels_from_config(values: Mapping, config_path: Path) -> int:
    if isinstance(values.get("id2label"), Mapping) and values["id2label"]:
        return len(values["id2label"])
    if isinstance(values.get("num_labels"), int):
        return values["num_labels"]
    raise UserError(f"{config_path}: no id2label/num_labels for a token_classification head; pass num_labels")


def load_pretrained(
    path_or_id: str | os.PathLike,
    head: str,
    *,
    num_labels: int | None = None,
    dtype=jnp.float32,
    seed: int = 0,
) -> tuple[BertModel | BertForMaskedLM | BertForTokenClassification, LoadInfo]:
    """Builds the ``head`` model for a Hugging Face BERT checkpoint and loads its weights.

    ``head`` is "mlm" (``BertForMaskedLM``), "token_classification" (``BertForTokenClassification``, with
    ``num_labels`` or the checkpoint's ``id2label``) or "base" (``BertModel`` with pooler). Parameters the
    checkpoint lacks keep the Hugging Face initialisation drawn from ``seed`` and are named in
    ``LoadInfo.freshly_initialised``; encoder parameters must all be present.
    """
    if head not in HEADS:
        raise UserError(f"head={head!r} is not supported; expected one of {list(HEADS)}")
    ckpt_dir = resolve_checkpoint_dir(path_or_id)
    config_values = _read_config_json(ckpt_dir)
    config = BertConfig.from_dict(config_values, source=str(ckpt_dir / "config.json"))
    weights_file = _weights_file(ckpt_dir)
    weights = load_hf_weights(ckpt_dir)

    rngs = nnx.Rngs(seed)
    if head == "mlm":
        model = BertForMaskedLM(config, dtype=dtype, rngs=rngs)
        encoder_prefix: tuple = ("bert",)
    elif head == "token_classification":
        if num_labels is None:
            num_labels = _num_labels_from_config(config_values, ckpt_dir / "config.json")
        model = BertForTokenClassification(config, num_labels, dtype=dtype, rngs=rngs)
        encoder_prefix = ("bert",)
    else:
        model = BertModel(config, dtype=dtype, rngs=rngs)
        encoder_prefix = ()

    mapped, unmapped = map_hf_names(weights, encoder_prefix)
    _check_tied_decoder(weights, str(weights_file))

    params = nnx.state(model, nnx.Param)
    filled: dict[tuple, np.ndarray] = {}
    missing: list[tuple] = []
    for path, variable in nnx.to_flat_state(params):
        source = mapped.pop(path, None)
        if source is None:
            missing.append(path)
            continue
        array = source.array.T if source.transpose else source.array
        if array.shape != variable.shape:
            raise UserError(
                f"{weights_file}: tensor {source.hf_name} has shape {tuple(source.array.shape)}; expected "
                f"{tuple(variable.shape[::-1]) if source.transpose else tuple(variable.shape)} for the "
                f"config in {ckpt_dir / 'config.json'}"
            )
        filled[path] = array
    unused = sorted(unmapped + [source.hf_name for source in mapped.values()])

    missing_encoder = [path for path in missing if _group_of(path) == "encoder"]
    if missing_encoder:
        shown = ", ".join(".".join(map(str, path)) for path in missing_encoder[:3])
        raise UserError(
            f"{weights_file}: {len(missing_encoder)} encoder parameters have no tensor in the checkpoint "
            f"(e.g. {shown}); expected a complete BERT encoder"
        )
    fresh = tuple(sorted({_group_of(path) for path in missing}))

    nnx.update(model, nnx.from_flat_state({path: jnp.asarray(array) for path, array in filled.items()}))

    if fresh:
        LOGGER.warning(
            "%s: not in the checkpoint, freshly initialised (normal(%s), LayerNorm ones/zeros, zero biases): %s",
            ckpt_dir,
            config.initializer_range,
            ", ".join(fresh),
        )
    if unused:
        LOGGER.info("%s: %d checkpoint tensors unused by the %s model: %s", ckpt_dir, len(unused), head, ", ".join(unused))
    info = LoadInfo(
        checkpoint_dir=ckpt_dir,
        weights_file=weights_file,
        config=config,
        head=head,
        freshly_initialised=fresh,
        unused_weights=tuple(unused),
    )
    return model, info


def has_mlm_head(weights: Mapping[str, np.ndarray]) -> bool:
    """Whether a checkpoint's tensors include Hugging Face's MLM transform (``cls.predictions.transform``)."""
    return any(_normalise_name(name).startswith("cls.predictions.transform.") for name in weights)
