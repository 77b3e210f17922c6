"""Tiny random-init checkpoints: the real architecture classes, saved and reloaded through the sidecar's own
loading code, built atomically (also by concurrent processes), and clear errors for missing checkpoints."""

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from audio_gen import tiny
from ith_common.errors import UserError
from audio_gen.pretrained import checkpoint_identity, resolve_source
from tests.hub_cache import REVISION, install_in_hub_cache

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    # The session's shared tiny checkpoints (the other audio test modules use the same directory).
    home = tmp_path_factory.getbasetemp() / "ith_jax_cache"
    return tiny.ensure_all(home / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}")


def test_stable_audio_parts_are_the_real_classes(tiny_dirs):
    from diffusers import (AutoencoderOobleck, CosineDPMSolverMultistepScheduler, StableAudioDiTModel,
                           StableAudioPipeline)
    from transformers import T5EncoderModel

    pipeline = StableAudioPipeline.from_pretrained(tiny_dirs["stable_audio"])
    assert isinstance(pipeline.transformer, StableAudioDiTModel)
    assert isinstance(pipeline.vae, AutoencoderOobleck)
    assert isinstance(pipeline.text_encoder, T5EncoderModel)
    assert isinstance(pipeline.scheduler, CosineDPMSolverMultistepScheduler)
    # The real scheduler's settings are kept as they are.
    assert pipeline.scheduler.config.sigma_max == 500 and pipeline.scheduler.config.prediction_type == "v_prediction"
    assert pipeline.vae.config.sampling_rate == tiny.TINY_STABLE_AUDIO["sampling_rate"]
    assert pipeline.vae.hop_length == int(np.prod(tiny.TINY_STABLE_AUDIO["downsampling_ratios"]))
    assert int(pipeline.transformer.config.sample_size) == tiny.TINY_STABLE_AUDIO["sample_size"]
    index = json.loads((tiny_dirs["stable_audio"] / "model_index.json").read_text())
    assert index["_class_name"] == "StableAudioPipeline"


def test_t5_tokenizer_trained_in_process_has_t5_layout(tiny_dirs):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dirs["stable_audio"] / "tokenizer")
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (0, 1, 2)
    ids = tokenizer("dog barking sound").input_ids
    assert ids[-1] == tokenizer.eos_token_id and tokenizer.unk_token_id not in ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == "dog barking sound"


def test_clap_and_ast_reload_with_their_processors(tiny_dirs):
    from transformers import ASTFeatureExtractor, ASTModel, ClapModel, ClapProcessor

    for name, fused in (("clap_fused", True), ("clap_unfused", False)):
        model = ClapModel.from_pretrained(tiny_dirs[name])
        processor = ClapProcessor.from_pretrained(tiny_dirs[name])
        assert model.config.audio_config.enable_fusion is fused
        assert processor.feature_extractor.truncation == ("fusion" if fused else "rand_trunc")
        # RoBERTa's special-token layout, which ClapTextConfig's pad/bos/eos ids assume.
        assert (processor.tokenizer.bos_token_id, processor.tokenizer.pad_token_id,
                processor.tokenizer.eos_token_id) == (0, 1, 2)
    ast = ASTModel.from_pretrained(tiny_dirs["ast"])
    extractor = ASTFeatureExtractor.from_pretrained(tiny_dirs["ast"])
    assert extractor.num_mel_bins == ast.config.num_mel_bins and extractor.max_length == ast.config.max_length


def test_builds_are_deterministic_and_reused(tiny_dirs, tmp_path):
    again = tiny.ensure_tiny_checkpoint("ast", tiny_dirs["ast"].parent)
    assert again == tiny_dirs["ast"]
    rebuilt = tiny.ensure_tiny_checkpoint("ast", tmp_path)
    assert checkpoint_identity(str(rebuilt)) == checkpoint_identity(str(tiny_dirs["ast"]))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no staging directory left


def test_concurrent_builders_leave_one_complete_checkpoint(tmp_path):
    code = "import sys; from audio_gen import tiny; print(tiny.ensure_tiny_checkpoint('clap_unfused', sys.argv[1]))"
    processes = [subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=240) for p in processes]
    for process, (out, err) in zip(processes, outputs):
        assert process.returncode == 0, err
        assert out.strip() == str(tmp_path / "clap_unfused")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clap_unfused"]
    from transformers import ClapModel

    ClapModel.from_pretrained(tmp_path / "clap_unfused")


def test_tiny_prefix_resolves_under_ith_jax_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ITH_JAX_CACHE", str(tmp_path))
    resolved = pathlib.Path(resolve_source("tiny:ast", "encoder"))
    assert resolved == tmp_path / "tiny" / f"v{tiny.TINY_FORMAT_VERSION}" / "ast"
    assert (resolved / "config.json").is_file()


def test_unknown_or_missing_checkpoints_are_clear_errors(tmp_path):
    with pytest.raises(UserError, match="unknown tiny checkpoint tiny:nope"):
        resolve_source("tiny:nope", "generator")
    with pytest.raises(UserError, match="does not exist"):
        resolve_source(str(tmp_path / "missing"), "config key 'clap_model'")
    file = tmp_path / "weights.bin"
    file.write_bytes(b"x")
    with pytest.raises(UserError, match="is a file"):
        resolve_source(str(file), "config key 'clap_model'")


def test_a_hub_id_in_the_local_hub_cache_loads_offline(tiny_dirs, tmp_path):
    """The shared resolver gives the snapshot directory; the encoder loads it, and its identity (what enters the
    cache fingerprint) is the checkpoint's content digest plus the hub id and revision."""
    install_in_hub_cache(tiny_dirs["ast"], tmp_path / "hub", "org/tiny-ast")
    code = ("import json; from audio_gen.encoders import build_encoder; "
            "print(json.dumps(build_encoder('ast', 'org/tiny-ast', 4).settings()['model']))")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    identity = json.loads(result.stdout.strip().splitlines()[-1])
    assert identity == {**checkpoint_identity(str(tiny_dirs["ast"])), "id": "org/tiny-ast", "revision": REVISION}

    # An id the cache does not hold: one UserError that names HF_HUB_OFFLINE and how to use a local copy.
    code = ("from audio_gen.pretrained import resolve_source\n"
            "try:\n    resolve_source('org/not-cached', \"config key 'encoder_model'\")\n"
            "except Exception as error:\n    print(type(error).__name__, error)")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.stdout.startswith("UserError config key 'encoder_model': org/not-cached is not a local directory")
    assert "HF_HUB_OFFLINE" in result.stdout and "huggingface-cli download org/not-cached" in result.stdout


def test_checkpoint_identity_ignores_location_but_not_content(tiny_dirs, tmp_path):
    import shutil

    copy = tmp_path / "copied"
    shutil.copytree(tiny_dirs["clap_fused"], copy)
    assert checkpoint_identity(str(copy)) == checkpoint_identity(str(tiny_dirs["clap_fused"]))
    config = json.loads((copy / "config.json").read_text())
    config["projection_hidden_act"] = "gelu"
    (copy / "config.json").write_text(json.dumps(config))
    assert checkpoint_identity(str(copy)) != checkpoint_identity(str(tiny_dirs["clap_fused"]))


def test_command_line_builds_everything(tmp_path):
    result = subprocess.run([sys.executable, "-m", "audio_gen.tiny", "--root", str(tmp_path)], cwd=REPO,
                            capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    listed = dict(line.split("\t") for line in result.stdout.strip().splitlines())
    assert set(listed) == {f"tiny:{name}" for name in tiny.TINY_NAMES}
    assert all(pathlib.Path(path).is_dir() for path in listed.values())


def test_command_line_with_an_unusable_root_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    result = subprocess.run([sys.executable, "-m", "audio_gen.tiny", "--root", str(blocker / "tiny")], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [f"error: {blocker / 'tiny'}: Not a directory"], result.stderr
