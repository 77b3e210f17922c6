"""The WordPiece tokenizer (ith_jax.data.tokenizer) against transformers' tokenizers of the same checkpoint."""

import csv
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from ith_common.errors import UserError
from ith_jax.data.auditorybench import load_examples
from ith_jax.data.mlm import encode_mlm
from ith_jax.data.tokenizer import load_tokenizer, tokenizer_info

from tests.synthetic_data import FILES
from tests.trainer_utils import REPO


@pytest.fixture(scope="module")
def checkpoint_tok(ckpt_dir):
    """The checkpoint's own tokenizer as transformers loads it: the reference for ids and offsets."""
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(str(ckpt_dir))


@pytest.fixture(scope="module")
def vocab_only_dir(ckpt_dir, tmp_path_factory):
    """The checkpoint without its tokenizer.json, so load_tokenizer assembles the tokenizer from vocab.txt."""
    directory = tmp_path_factory.mktemp("vocab_only")
    shutil.copy(ckpt_dir / "vocab.txt", directory)
    shutil.copy(ckpt_dir / "tokenizer_config.json", directory)
    return directory


def every_sentence(directory):
    """Every sentence of the four files as the loader sees it (stripped), defective rows included."""
    sentences = []
    for name in FILES:
        with open(directory / name, newline="", encoding="utf-8") as f:
            sentences += [record["sentence"].strip() for record in csv.DictReader(f)]
    return sentences


def mask_expanded_sentences(directory, tokenizer):
    """The texts the MLM encoder actually tokenises: [MASK] repeated once per answer piece (animal files)."""
    sentences = []
    for name in FILES:
        if name.startswith("animal"):
            examples, _ = load_examples(directory / name)
            sentences += [r.sentence for r in encode_mlm(examples, tokenizer)[0]]
    return sentences


def assert_same_ids_and_offsets(ours, reference, sentences):
    got = ours.encode_batch(sentences)
    ref = reference(sentences, return_offsets_mapping=True, return_special_tokens_mask=True,
                    truncation=False, padding=False)
    differing = [
        i for i, enc in enumerate(got)
        if enc.ids != ref["input_ids"][i]
        or enc.offsets != [tuple(o) for o in ref["offset_mapping"][i]]
        or enc.special_tokens_mask != ref["special_tokens_mask"][i]
    ]
    assert not differing, f"{len(differing)} of {len(sentences)} differ, first: {sentences[differing[0]]!r}"
    # The [MASK] handling: every mask token is the special token and its offsets cover the literal "[MASK]".
    mask_id = tokenizer_info(ours).mask_id
    masks = 0
    for sentence, enc in zip(sentences, got):
        for token_id, (start, end) in zip(enc.ids, enc.offsets):
            if token_id == mask_id:
                masks += 1
                assert sentence[start:end] == "[MASK]", sentence
    assert masks == sum(s.count("[MASK]") for s in sentences)


@pytest.mark.parametrize("route", ["tokenizer.json", "vocab.txt"])
def test_every_sentence_matches_the_checkpoint_tokenizer(route, bench_dir, ckpt_dir, vocab_only_dir, checkpoint_tok):
    """ids, offsets and special-token masks equal transformers' BertTokenizerFast on every sentence of the
    four files, as written and after mask expansion, for both ways load_tokenizer builds a tokenizer."""
    ours = load_tokenizer(ckpt_dir if route == "tokenizer.json" else vocab_only_dir)
    start = time.perf_counter()
    sentences = every_sentence(bench_dir)
    expanded = mask_expanded_sentences(bench_dir, ours)
    assert any(s.count("[MASK]") > 1 for s in expanded)  # multi-piece answers are in the data
    # Templated sentences repeat within and across splits: each distinct text is compared once.
    distinct = list(dict.fromkeys(sentences + expanded))
    assert_same_ids_and_offsets(ours, checkpoint_tok, distinct)
    print(f"\n{route}: {len(sentences)} sentences + {len(expanded)} mask-expanded = {len(distinct)} distinct, "
          f"{time.perf_counter() - start:.2f}s")


def test_routes_agree_on_hard_text(tok, vocab_only_dir, checkpoint_tok):
    hard = [
        "Café NAÏVE über-loud [MASK]!!! don't stop—ok?",
        "A [MASK][MASK] and [mask] and [ MASK ] differ.",
        "\u4e2d\u6587 chars\tand\u00a0odd  spaces, a\u200bzero-width and a control\x07 char.",
        "x" * 120 + " is longer than a word may be",
    ]
    assert_same_ids_and_offsets(tok, checkpoint_tok, hard)
    assert_same_ids_and_offsets(load_tokenizer(vocab_only_dir), checkpoint_tok, hard)


def test_tokenizer_matches_the_pure_python_reference(tok, ref_python_tok, bench_dir):
    """Ids against transformers' pure-Python WordPiece, an implementation independent of the Rust one."""
    sentences = every_sentence(bench_dir)[:1000]
    for sentence, enc in zip(sentences, tok.encode_batch(sentences)):
        assert enc.ids == ref_python_tok(sentence)["input_ids"], sentence


def test_mask_becomes_mask_id_and_no_truncation_or_padding(tok):
    info = tokenizer_info(tok)
    assert (info.mask_id, info.cls_id, info.sep_id, info.pad_id, info.unk_id) == (103, 101, 102, 0, 100)
    assert info.token_to_id("lower") == 2896
    enc = tok.encode("A [MASK] barks.")
    assert enc.ids[0] == info.cls_id and enc.ids[2] == info.mask_id and enc.ids[-1] == info.sep_id
    assert enc.offsets[2] == (2, 8)
    long = tok.encode(" ".join(["sound"] * 600))
    assert len(long.ids) == 602  # tokenizer.json asks for truncation at 128 and padding; both are off


def test_files_given_directly_and_tokenizer_config_options(tmp_path, tok, ckpt_dir, vocab_only_dir):
    sentence = "The hum of a Fridge has a [MASK] pitch."
    expected = tok.encode(sentence)
    for path in (ckpt_dir / "tokenizer.json", vocab_only_dir / "vocab.txt"):
        enc = load_tokenizer(path).encode(sentence)
        assert (enc.ids, enc.offsets) == (expected.ids, expected.offsets), path
    # do_lower_case false keeps case (the uncased vocab then has no "Dog" and gives [UNK])
    cased_dir = tmp_path / "cased"
    cased_dir.mkdir()
    shutil.copy(ckpt_dir / "vocab.txt", cased_dir)
    (cased_dir / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": False}))
    assert load_tokenizer(cased_dir).encode("Dog [MASK]", add_special_tokens=False).ids == [100, 103]
    assert load_tokenizer(vocab_only_dir).encode("Dog [MASK]", add_special_tokens=False).ids == [3899, 103]


def test_tokenizer_errors(tmp_path):
    with pytest.raises(UserError, match="does-not-exist does not exist"):
        load_tokenizer(tmp_path / "does-not-exist")
    with pytest.raises(UserError, match="no tokenizer.json or vocab.txt"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    (tmp_path / "vocab.txt").write_text("[PAD]\n[UNK]\nthe\n")
    with pytest.raises(UserError, match=r"tokenizer_config\.json: not valid JSON"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(UserError, match=r"special token\(s\) \[CLS\], \[SEP\], \[MASK\] missing"):
        load_tokenizer(tmp_path)
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{}")
    with pytest.raises(UserError, match=r"tokenizer\.json: cannot read tokenizer"):
        load_tokenizer(broken)


def test_hub_ids_go_through_the_shared_resolver_and_data_never_imports_models(tmp_path):
    """A hub id that is not cached fails offline with the shared resolver's one-line advice; importing the
    data modules loads neither the model code nor torch/transformers."""
    script = (
        "import sys\n"
        "import ith_jax.data.auditorybench, ith_jax.data.batching, ith_jax.data.mlm, ith_jax.data.spans\n"
        "from ith_jax.data.tokenizer import load_tokenizer\n"
        "bad = sorted(m for m in sys.modules if m.startswith('ith_jax.models') or m in ('torch', 'transformers'))\n"
        "print('imported:', bad)\n"
        "load_tokenizer('no-such-org/no-such-tokenizer')\n"
    )
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
    assert "imported: []" in result.stdout, result.stdout + result.stderr
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert "UserError: text_model: no-such-org/no-such-tokenizer is not a local directory" in last
    assert "HF_HUB_OFFLINE is set" in last
