"""``python -m ith_jax.convert --check`` as a real subprocess, checkpoint resolution, and the torch-free import rule."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import transformers

from ith_common.errors import UserError
from ith_jax.models.convert import resolve_checkpoint_dir
from tests.hub_cache import install_in_hub_cache

WORDS = ["the", "dog", "barked", "loud", "##ly", "at", "a", "violin", "sounds", "higher", "than", "cello", "."]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A tiny random BertForMaskedLM with a WordPiece vocab.txt (what the CLI tokenises with)."""
    directory = tmp_path_factory.mktemp("tiny_cli")
    vocab = SPECIAL + WORDS
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n")
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=37,
        max_position_embeddings=64,
    )  # fmt: skip
    transformers.BertForMaskedLM(config).save_pretrained(directory)
    return directory


def run_cli(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run(
        [sys.executable, "-m", "ith_jax.convert", *args], capture_output=True, text=True, env=env, timeout=300,
        check=False,
    )


def test_check_passes_on_a_matching_checkpoint_and_fails_below_its_difference(tiny_checkpoint):
    finished = run_cli("--check", str(tiny_checkpoint))
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert any(line.startswith("batch: 4 sentences") for line in lines)
    hidden = [line for line in lines if line.startswith("last hidden state")]
    logits = [line for line in lines if line.startswith("mlm logits")]
    assert len(hidden) == 1 and hidden[0].endswith("ok")
    assert len(logits) == 1 and logits[0].endswith("ok")  # the tiny checkpoint has an MLM head

    # The two implementations differ in summation order, so a tolerance of 1e-15 must fail with status 1.
    strict = run_cli("--check", str(tiny_checkpoint), "--tolerance", "1e-15")
    assert strict.returncode == 1, strict.stdout + strict.stderr
    assert "FAIL" in strict.stdout


def test_check_of_a_missing_path_exits_2(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    finished = run_cli("--check", str(missing))
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [f"error: text_model: checkpoint directory {missing} does not exist"]


def test_check_of_a_file_instead_of_a_directory_exits_2(tmp_path):
    weights = tmp_path / "pytorch_model.bin"
    weights.write_bytes(b"not a directory")
    finished = run_cli("--check", str(weights))
    assert finished.returncode == 2
    assert finished.stderr.strip().splitlines() == [
        f"error: text_model: {weights} is a file; expected a checkpoint directory (with config.json) or a hub id"]


def test_check_of_an_uncached_hub_id_offline_says_how_to_use_a_local_copy(tmp_path):
    finished = run_cli(
        "--check", "google-bert/bert-base-uncased", env_extra={"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    )
    assert finished.returncode == 2
    lines = finished.stderr.strip().splitlines()
    assert len(lines) == 1, finished.stderr
    assert lines[0].startswith("error: text_model: google-bert/bert-base-uncased is not a local directory")
    assert "HF_HUB_OFFLINE" in lines[0]
    assert "huggingface-cli download google-bert/bert-base-uncased --local-dir bert-base-uncased" in lines[0]
    assert lines[0].endswith("e.g. --config.text_model=/path/to/bert-base-uncased")


def test_check_of_a_hub_id_in_the_local_hub_cache_works_offline(tiny_checkpoint, tmp_path):
    install_in_hub_cache(tiny_checkpoint, tmp_path / "hub", "org/tiny-bert")
    finished = run_cli("--check", "org/tiny-bert",
                       env_extra={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")})
    assert finished.returncode == 0, finished.stderr
    assert any(line.startswith("mlm logits") and line.endswith("ok") for line in finished.stdout.splitlines())


def test_resolve_checkpoint_dir_rules(tmp_path, monkeypatch):
    assert resolve_checkpoint_dir(tmp_path) == tmp_path
    monkeypatch.chdir(tmp_path)
    (tmp_path / "local").mkdir()
    assert resolve_checkpoint_dir("local") == tmp_path / "local"  # relative, existing
    for local_looking in ("./missing", "~/missing-checkpoint-xyz", "a/b/c", str(tmp_path / "missing")):
        with pytest.raises(UserError, match=r"^text_model: checkpoint directory .* does not exist$"):
            resolve_checkpoint_dir(local_looking)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UserError, match="is a file"):
        resolve_checkpoint_dir("file.txt")


def test_ith_jax_model_modules_do_not_import_torch():
    code = (
        "import sys, ith_jax.models.bert, ith_jax.models.convert, ith_jax.convert; "
        "bad = sorted(m for m in ('torch', 'transformers') if m in sys.modules); "
        "print(bad); sys.exit(1 if bad else 0)"
    )
    finished = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert finished.returncode == 0, finished.stdout + finished.stderr
