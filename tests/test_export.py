"""``python -m ith_jax.export``: a tiny trained workdir written as a Hugging Face checkpoint, loaded back with
transformers (torch) and compared with the Flax model: MLM logits within 1e-4 on the text-only path; the ITH
workdir's fusion weights read back bit for bit; the import (``convert.load_pretrained``) inverts the export."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx

from ith_jax import mesh as mesh_lib
from ith_jax import trainer as trainer_lib
from ith_jax.models import convert
from tests.api_fixtures import shared_workdirs
from tests.trainer_utils import DATA_DIR, run

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

SENTENCES = ["A cow's moo has a [MASK] pitch than a bird's chirp.", "The kettle whistles.",
             "The sound of a tube train typically has a [MASK] pitch than the sound of roadside ambience."]
TOLERANCE = 1e-4  # float32 Flax (XLA) vs float32 torch, summed in different orders; measured ~1e-6


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return shared_workdirs(tmp_path_factory)


def export(workdir: Path, out: Path):
    return run([sys.executable, "-m", "ith_jax.export", "--workdir", str(workdir), "--out", str(out)])


def restored(workdir: Path):
    model = trainer_lib.restore_for_inference(workdir, trainer_lib.load_workdir_config(workdir),
                                              mesh_lib.make_data_mesh())
    return model, nnx.merge(model.graphdef, model.params, model.rest)


def torch_logits(out: Path):
    import torch
    from transformers import AutoTokenizer, BertForMaskedLM

    tokenizer = AutoTokenizer.from_pretrained(out)
    hf = BertForMaskedLM.from_pretrained(out).eval()
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = hf(**batch).logits.numpy()
    return {k: v.numpy() for k, v in batch.items()}, logits


def flax_logits(text_model, batch: dict) -> np.ndarray:
    return np.asarray(text_model(batch["input_ids"], batch["attention_mask"], batch["token_type_ids"]))


def test_text_workdir_exports_to_transformers(dirs, tmp_path):
    out = tmp_path / "hf"
    result = export(dirs["text"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "ith_export.json", "model.safetensors",
                                                     "special_tokens_map.json", "tokenizer.json",
                                                     "tokenizer_config.json", "vocab.txt"]
    batch, hf = torch_logits(out)
    _, model = restored(dirs["text"])
    # The exported tokenizer is the workdir's: the same pieces the Flax side encodes.
    tokenizer = trainer_lib.load_workdir_tokenizer(dirs["text"], trainer_lib.load_workdir_config(dirs["text"]))
    assert tokenizer.encode(SENTENCES[0]).ids == [int(i) for i in batch["input_ids"][0] if i != 0]
    ours = flax_logits(model, batch)
    mask = batch["attention_mask"].astype(bool)
    difference = np.abs(ours - hf)[mask].max()
    assert difference < TOLERANCE, difference
    assert np.abs(hf[mask]).max() > 100 * TOLERANCE  # not vacuous: the logits are far from zero

    # The import of the project reads the export back into the very parameters that were exported.
    imported, info = convert.load_pretrained(out, "mlm")
    assert info.freshly_initialised == () and info.unused_weights == ()
    params = trainer_lib.split_model(imported)[1]
    expected, got = jax.tree_util.tree_leaves_with_path(restored(dirs["text"])[0].params), dict(
        jax.tree_util.tree_leaves_with_path(params))
    for path, leaf in expected:
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))


def test_ith_workdir_exports_the_text_model_and_the_fusion_weights(dirs, tmp_path):
    from safetensors.numpy import load_file

    out = tmp_path / "hf_ith"
    result = export(dirs["ith"], out)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "fusion.safetensors").is_file() and (out / "fusion_config.json").is_file()
    model, fused = restored(dirs["ith"])
    batch, hf = torch_logits(out)
    mask = batch["attention_mask"].astype(bool)
    assert np.abs(flax_logits(fused.mlm, batch) - hf)[mask].max() < TOLERANCE  # the text-only path

    assert json.loads((out / "fusion_config.json").read_text()) == dict(model.spec.fusion)
    weights = load_file(out / "fusion.safetensors")
    expected = {".".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf)
                for path, leaf in jax.tree_util.tree_leaves_with_path({k: v for k, v in model.params.items()
                                                                        if k != "mlm"})}
    assert sorted(weights) == sorted(expected) and "fusion.gate_audio.kernel" in weights
    for name, array in expected.items():
        np.testing.assert_array_equal(weights[name], array, err_msg=name)
    assert json.loads((out / "ith_export.json").read_text())["kind"] == "ith"

    # docs/api.md's way of loading the export back into a Flax FusedMaskedLM gives the workdir's parameters.
    from ith_jax.models import fusion

    mlm, _ = convert.load_pretrained(out, "mlm")
    config = fusion.FusionConfig.from_dict(json.loads((out / "fusion_config.json").read_text()))
    rebuilt = fusion.build_fused_mlm(mlm, config, rngs=nnx.Rngs(0))
    nnx.update(rebuilt, nnx.from_flat_state({tuple(k.split(".")): v for k, v in weights.items()}))
    got = dict(jax.tree_util.tree_leaves_with_path(trainer_lib.split_model(rebuilt)[1]))
    for path, leaf in jax.tree_util.tree_leaves_with_path(model.params):
        np.testing.assert_array_equal(np.asarray(got[path]), np.asarray(leaf), err_msg=jax.tree_util.keystr(path))


def test_refuses_a_non_empty_out_and_a_span_workdir(dirs, tmp_path):
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "keep.txt").write_text("mine")
    result = export(dirs["text"], busy)
    assert result.returncode == 2 and "is not empty" in result.stderr.strip().splitlines()[-1]
    assert sorted(p.name for p in busy.iterdir()) == ["keep.txt"]

    result = export(dirs["span"], tmp_path / "span")
    assert result.returncode == 2 and "holds a 'span' model" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "span").exists() and not list(tmp_path.glob(".span.*"))
