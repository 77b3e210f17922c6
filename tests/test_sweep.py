"""`python -m ith_jax.sweep`: one training per value as real subprocesses, the table, skipping on rerun, and
the one-line errors before any work."""

from __future__ import annotations

import json
import sys

import pytest

from tests.test_audio_data import build_inputs
from tests.test_fusion_training import FUSED, data_overrides
from tests.trainer_utils import DATA_DIR, run

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")


def sweep_command(workdir, inputs, over: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "ith_jax.sweep", "--config", FUSED, "--workdir", str(workdir), "--over", over,
            *data_overrides(inputs), f"--config.audio.spans={inputs['manifest']}",
            f"--config.audio.cache_dir={inputs['cache']}", "--config.audio.selection=first", *extra]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    return build_inputs(tmp_path_factory.mktemp("sweep_inputs"))


def test_a_fusion_layer_sweep_trains_each_value_and_skips_them_on_rerun(inputs, tmp_path):
    workdir = tmp_path / "sweep"
    result = run(sweep_command(workdir, inputs, "fusion_layer=0,last"))
    assert result.returncode == 0, result.stderr[-3000:]
    # The tiny model has 2 layers: `last` is layer 2, and each run's stored config says which layer it fused at.
    for layer in (0, 2):
        config = json.loads((workdir / f"fusion_layer={layer}" / "config.json").read_text())
        assert config["fusion_layer"] == layer
    report = json.loads((workdir / "sweep.json").read_text())
    assert [row["value"] for row in report["runs"]] == ["0", "2"]
    for row in report["runs"]:
        stored = json.loads((workdir / f"fusion_layer={row['value']}" / "eval_results.json").read_text())
        assert row["results"] == stored["results"] and 0.0 <= row["results"][str(inputs["data"])]["accuracy"] <= 1
    assert "fusion_layer=0" in result.stdout and "fusion_layer=2" in result.stdout
    assert "'fusion_layer': 2" in result.stderr  # the trainer logged the fusion config it built

    again = run(sweep_command(workdir, inputs, "fusion_layer=0,last"))
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("finished earlier") == 2 and "ith_jax.train" not in again.stdout
    assert json.loads((workdir / "sweep.json").read_text())["runs"] == report["runs"]


@pytest.mark.parametrize("over, extra, expected", [
    ("nonsense=1,2", (), "the config has no key 'nonsense'"),
    ("fusion_layer", (), "expected KEY=VALUE,VALUE"),
    ("fusion_layer=0,0", (), "a value is repeated"),
    ("fusion_layer=2,last", (), "name the same layer twice"),
    ("audio.clap_threshold=0,2", (), "audio.clap_threshold"),
    ("fusion_layer=0,1", ("--config.fusion_layer=1",), "is the swept key"),
])
def test_a_bad_sweep_is_one_line_before_any_work(inputs, tmp_path, over, extra, expected):
    workdir = tmp_path / "sweep"
    result = run(sweep_command(workdir, inputs, over, *extra))
    assert result.returncode == 2, result.stderr[-3000:]
    assert expected in result.stderr.strip().splitlines()[-1]
    assert not workdir.exists()
