"""The WordPiece tokenizer of a BERT checkpoint, as a ``tokenizers.Tokenizer`` (Rust, batched, with offsets).

``load_tokenizer(path_or_id)`` takes a checkpoint directory, a ``tokenizer.json`` or ``vocab.txt`` file, or a hub
id (resolved by ``ith_common.hub.resolve_checkpoint_dir``). It returns the checkpoint's ``tokenizer.json`` when
there is one, else a BERT tokenizer assembled from the ``tokenizers`` library's own BERT pieces (normalizer,
pre-tokenizer, WordPiece model, [CLS]/[SEP] template, decoder) over ``vocab.txt`` and the options of
``tokenizer_config.json`` (``do_lower_case`` defaults to True). Truncation and padding are always off: the
encoders drop over-long rows themselves and the batcher pads. Both routes give the ids and offsets of
transformers' ``BertTokenizerFast`` for the same checkpoint (tests/test_tokenizer.py checks every AuditoryBench
sentence).

``tokenizer_info(tok)`` gives the special ids (``mask_id``, ``cls_id``, ``sep_id``, ``pad_id``, ``unk_id``),
``vocab_size`` and ``token_to_id``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from ith_common.errors import UserError
from ith_common.hub import resolve_checkpoint_dir

MASK_TOKEN = "[MASK]"
_SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", MASK_TOKEN)
# What a hub download needs for the tokenizer alone (the model loader fetches the weights itself).
_HUB_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json")


def _resolve(path_or_id, what: str) -> Path:
    path = Path(path_or_id)
    if path.exists():  # a directory, or a tokenizer.json / vocab.txt file given directly
        return path
    return resolve_checkpoint_dir(path_or_id, what=what, allow_patterns=_HUB_TOKENIZER_FILES)


def _tokenizer_from_vocab(vocab_path: Path, config: dict) -> Tokenizer:
    # A token's id is its line number, as in BERT's own loader (a repeated token keeps its last line).
    with open(vocab_path, encoding="utf-8") as f:
        vocab = {line.rstrip("\r\n"): index for index, line in enumerate(f)}
    missing = [t for t in _SPECIAL_TOKENS if t not in vocab]
    if missing:
        raise UserError(f"{vocab_path}: special token(s) {', '.join(missing)} missing; expected a BERT vocabulary")
    lowercase = bool(config.get("do_lower_case", True))
    strip_accents = config.get("strip_accents")  # None: follow lowercase, as BERT does
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(
        clean_text=True,
        handle_chinese_chars=bool(config.get("tokenize_chinese_chars", True)),
        strip_accents=strip_accents,
        lowercase=lowercase,
    )
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    cls_id, sep_id = vocab["[CLS]"], vocab["[SEP]"]
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )
    tok.decoder = decoders.WordPiece(prefix="##")
    # normalized=False: "[MASK]" is matched on the raw text, before lower-casing would break it.
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in _SPECIAL_TOKENS])
    return tok


def load_tokenizer(path_or_id, *, what: str = "text_model") -> Tokenizer:
    """A fast WordPiece tokenizer for a checkpoint directory or hub id (truncation and padding off).

    ``what`` names the setting in error messages; the entry points pass ``config.text_model``."""
    path = _resolve(path_or_id, what)
    if path.is_file():
        json_path = path if path.suffix == ".json" else None
        vocab_path = path if path.name.endswith(".txt") else None
        config_dir = path.parent
    else:
        json_path = path / "tokenizer.json" if (path / "tokenizer.json").is_file() else None
        vocab_path = path / "vocab.txt" if (path / "vocab.txt").is_file() else None
        config_dir = path
    if json_path is not None:
        try:
            tok = Tokenizer.from_file(str(json_path))
        except Exception as exc:  # the Rust side raises a bare Exception
            raise UserError(f"{json_path}: cannot read tokenizer ({exc})") from None
    elif vocab_path is not None:
        config = {}
        config_path = config_dir / "tokenizer_config.json"
        if config_path.is_file():
            try:
                config = json.loads(config_path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise UserError(f"{config_path}: not valid JSON ({exc})") from None
        tok = _tokenizer_from_vocab(vocab_path, config)
    else:
        raise UserError(f"{path}: no tokenizer.json or vocab.txt; expected a BERT checkpoint directory")
    tok.no_truncation()
    tok.no_padding()
    if tok.token_to_id(MASK_TOKEN) is None:
        raise UserError(f"{path}: the tokenizer has no {MASK_TOKEN} token; expected a BERT vocabulary")
    return tok


@dataclass(frozen=True)
class TokenizerInfo:
    """The ids the encoders and batchers need, read once from a tokenizer."""

    mask_id: int
    cls_id: int
    sep_id: int
    pad_id: int
    unk_id: int
    vocab_size: int
    tokenizer: Tokenizer

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)


def tokenizer_info(tokenizer: Tokenizer) -> TokenizerInfo:
    ids = {}
    for name, token in (("mask_id", MASK_TOKEN), ("cls_id", "[CLS]"), ("sep_id", "[SEP]"), ("pad_id", "[PAD]"), ("unk_id", "[UNK]")):
        value = tokenizer.token_to_id(token)
        if value is None:
            raise UserError(f"tokenizer has no {token} token; expected a BERT vocabulary")
        ids[name] = value
    return TokenizerInfo(vocab_size=tokenizer.get_vocab_size(with_added_tokens=True), tokenizer=tokenizer, **ids)
