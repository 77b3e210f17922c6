"""The ITH fusion LM through the normal commands, as real subprocesses: `ith_jax.train --config
configs/lm.py:tiny,pitch,audio` on a cache built the real way (tests/test_audio_data.build_inputs), evaluation
with --spans and --compare, the missing-prompt error and allow_missing, kill/resume and 8 devices vs 1."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.test_audio_data import build_inputs
from tests.trainer_utils import (DATA_DIR, REPO, assert_eight_devices_match_one, final_params, losses, run,
                                 subprocess_env, train_command)

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

FUSED = "configs/lm.py:tiny,pitch,audio"


def data_overrides(inputs) -> tuple[str, ...]:
    data = inputs["data"]
    return (f"--config.train_files={data}", f"--config.dev_files={data}", f"--config.eval_files={data}")


def fused_command(workdir, inputs, *overrides):
    return train_command(workdir, *data_overrides(inputs), f"--config.audio.spans={inputs['manifest']}",
                         f"--config.audio.cache_dir={inputs['cache']}", "--config.audio.selection=first",
                         *overrides, config=FUSED)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("fusion_inputs"))


@pytest.fixture(scope="module")
def trained(inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("fusion_runs")
    fused = run(fused_command(root / "ith", inputs))
    assert fused.returncode == 0, fused.stderr[-3000:]
    text = run(train_command(root / "text", *data_overrides(inputs), config="configs/lm.py:tiny,pitch"))
    assert text.returncode == 0, text.stderr[-3000:]
    return {"ith": root / "ith", "text": root / "text", "stdout": fused.stdout, "stderr": fused.stderr}


def evaluate(*args: str) -> subprocess.CompletedProcess:
    return run([sys.executable, "-m", "ith_jax.evaluate", *map(str, args)])


def test_training_reports_audio_and_stores_the_fusion_spec(trained, inputs):
    results = json.loads((trained["ith"] / "eval_results.json").read_text())["results"][str(inputs["data"])]
    assert results["spans"] == 47 and results["spans_with_audio"] == 47
    assert 0.0 < results["gate_mean"] < 1.0
    assert sorted(losses(trained["ith"])) == [1, 2]
    config = json.loads((trained["ith"] / "config.json").read_text())
    assert config["lr_schedule"] == "cosine" and config["audio"]["selection"] == "first"
    assert "audio fusion: {'audio_dim': 64, 'fusion_layer': 0" in trained["stderr"]
    # The fused model has the projector and fusion layer on top of every parameter of the text-only LM.
    fused, text = final_params(trained["ith"]), final_params(trained["text"])
    assert {k.replace("['mlm']", "", 1) for k in fused if k.startswith("['mlm']")} == set(text)
    assert any("projector" in k for k in fused) and any("gate_audio" in k for k in fused)


def test_evaluate_with_spans_and_compare(trained, inputs, tmp_path):
    out = tmp_path / "eval.json"
    result = evaluate("--workdir", trained["ith"], "--data", inputs["data"], "--spans", inputs["manifest"],
                      "--compare", trained["text"], "--json", out)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(out.read_text())
    ith = report["results"][str(inputs["data"])]
    assert ith == json.loads((trained["ith"] / "eval_results.json").read_text())["results"][str(inputs["data"])]
    text = report["compare"]["results"][str(inputs["data"])]
    assert text == json.loads((trained["text"] / "eval_results.json").read_text())["results"][str(inputs["data"])]
    majority = report["compare"]["majority"][str(inputs["data"])]
    answers = [line.rsplit(",", 3)[1] for line in inputs["data"].read_text().splitlines()[1:]]
    assert majority == pytest.approx(max(answers.count("lower"), answers.count("higher")) / len(answers))
    table = result.stdout.split("(text-only, step 2) vs")[1]
    for column in ("majority", "text_accuracy", "ith_accuracy", "spans_with_audio", "gate_mean"):
        assert column in table

    no_spans = evaluate("--workdir", trained["ith"], "--data", inputs["data"])
    assert no_spans.returncode == 2
    assert no_spans.stderr.strip().splitlines()[-1].startswith(f"error: {trained['ith']} is an audio-fused (ITH) "
                                                                "workdir: give --spans MANIFEST")


def test_missing_prompt_fails_with_the_build_cache_command_and_allow_missing_counts(tmp_path, inputs):
    partial = build_inputs(tmp_path / "partial", max_prompts=40)
    failed = run(fused_command(tmp_path / "fail", partial))
    assert failed.returncode == 2
    last = failed.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {partial['data']} row ") and "is not in the audio cache" in last
    assert (f"python -m audio_gen.build_cache --config configs/gen.py[:the cache's variant] "
            f"--config.spans={partial['manifest']} --config.cache_dir={partial['cache']}") in last
    assert not (tmp_path / "fail" / "checkpoints").exists()

    passed = run(fused_command(tmp_path / "pass", partial, "--config.audio.allow_missing=true"))
    assert passed.returncode == 0, passed.stderr[-3000:]
    results = json.loads((tmp_path / "pass" / "eval_results.json").read_text())["results"][str(partial["data"])]
    missing = 47 - results["spans_with_audio"]
    assert missing > 0 and f"{missing} missing from the cache (allow_missing)" in passed.stderr


def test_sigkill_then_resume_matches_uninterrupted(tmp_path, inputs):
    overrides = ("--config.max_steps=0", "--config.num_epochs=3", "--config.checkpoint_every_steps=2",
                 "--config.keep_checkpoints=3")
    reference = tmp_path / "reference"
    done = run(fused_command(reference, inputs, *overrides))
    assert done.returncode == 0, done.stderr[-3000:]
    total = max(losses(reference))
    assert total == 9

    workdir = tmp_path / "interrupted"
    proc = subprocess.Popen(fused_command(workdir, inputs, *overrides), cwd=REPO, env=subprocess_env(1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        if (workdir / "metrics.jsonl").exists() and max(
                [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
                 if line.strip().endswith("}")], default=0) >= 5:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run finished before the kill"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed = run(fused_command(workdir, inputs, *overrides))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr
    expected, got = final_params(reference), final_params(workdir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), key
    assert losses(workdir) == losses(reference)


def test_eight_devices_match_one_device_for_the_fused_step(tmp_path, inputs):
    overrides = ("--config.max_steps=3", "--config.checkpoint_every_steps=100")
    one = run(fused_command(tmp_path / "one", inputs, *overrides), devices=1)
    eight = run(fused_command(tmp_path / "eight", inputs, *overrides), devices=8)
    assert_eight_devices_match_one(tmp_path / "one", tmp_path / "eight", one, eight)
