"""`python -m ith_jax.pipeline` end to end on the tiny variant and the synthetic sample, as real subprocesses: the
first run does every stage, a rerun skips them all without running a command, a damaged output reruns its step
(and only what really changed after it), a failing child stops the pipeline with one line, a bad config value is
one line before any work, and the pipeline process loads neither jax nor torch."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.trainer_utils import REPO, subprocess_env

CONFIG = "configs/pipeline.py:tiny"
STEPS = ("data", "span", "detect:pitch", "detect:animal", "pitch_table:pitch", "build_cache:pitch",
         "build_cache:animal", "lm_text:pitch", "lm_text:animal", "lm_ith:pitch", "lm_ith:animal",
         "evaluate:text:pitch", "evaluate:ith:pitch", "evaluate:text:animal", "evaluate:ith:animal", "report")


def pipeline(workdir: Path, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ith_jax.pipeline", "--config", CONFIG, "--workdir", str(workdir),
                           *args], cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)


def planned(stdout: str) -> dict[str, str]:
    """step -> "run"/"skip" from the plan the pipeline prints first."""
    plan = {}
    for line in stdout.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) >= 2 and parts[0] in ("run", "skip") and parts[1] in STEPS:
            plan[parts[1]] = parts[0]
    return plan


def started(stdout: str) -> list[str]:
    return [line.split("] ", 1)[1].split(" started", 1)[0] for line in stdout.splitlines()
            if line.startswith("[") and " started (" in line]


def command_runs(workdir: Path) -> dict[str, int]:
    """log file -> how many times a command was started into it (each run appends a '=====' header)."""
    return {p.name: p.read_text().count("\n===== ") for p in sorted((workdir / "logs").glob("*.log"))}


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("pipeline") / "run"
    result = pipeline(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return workdir, result


def test_first_run_does_every_stage_and_prints_the_table(first_run):
    workdir, result = first_run
    assert planned(result.stdout) == {step: "run" for step in STEPS}
    assert started(result.stdout) == list(STEPS)  # stage by stage, in the plan's order
    records = [workdir / "report.STAGE_DONE.json"] + sorted(workdir.rglob("STAGE_DONE.json"))
    assert sorted(json.loads(r.read_text())["step"] for r in records) == sorted(STEPS)
    summary = json.loads((workdir / "accuracy.json").read_text())
    assert [(r["task"], Path(r["file"]).name) for r in summary["rows"]] == [("pitch", "dev.csv"), ("animal", "dev.csv")]
    for row in summary["rows"]:
        assert 0.0 <= row["text"] <= 1.0 and 0.0 <= row["ith"] <= 1.0 and 0.0 < row["majority"] <= 1.0
        predictions = (workdir / "eval" / f"ith_{row['task']}" / "predictions.jsonl").read_text().splitlines()
        assert len(predictions) == row["examples"]
        # Both tasks' ITH LMs fused audio: the tiny CLAP scores every clip below 0, and the animal selection
        # (best of K, no floor) must still pick one.
        ith = json.loads((workdir / "eval" / f"ith_{row['task']}" / "results.json").read_text())["results"]
        assert all(metrics["spans_with_audio"] > 0 for metrics in ith.values()), ith
    assert summary["rows"][0]["oracle"] and not summary["rows"][1]["oracle"]
    assert summary["data_label"] == "synthetic sample" and (workdir / "data" / "SYNTHETIC").is_file()
    out = result.stdout
    assert "SYNTHETIC SAMPLE" in out and "ORACLE" in out
    assert f"report: {workdir / 'report' / 'index.html'}" in out and (workdir / "report" / "index.html").is_file()
    assert " ETA " in out and "elapsed" in out
    # Every command as a user would type it, in order, in commands.sh; each stage's log holds one run.
    commands = [line for line in (workdir / "commands.sh").read_text().splitlines() if line.startswith("python -m")]
    assert [c.split()[2] for c in commands] == (
        ["ith_jax.data.synthetic", "ith_jax.train", "ith_jax.detect", "ith_jax.detect", "audio_gen.pitch_table"]
        + ["audio_gen.build_cache"] * 2 + ["ith_jax.train"] * 4 + ["ith_jax.evaluate"] * 4 + ["ith_jax.report"])
    assert "--gold" in commands[2] and "--gold" not in commands[3]
    assert set(command_runs(workdir).values()) == {1} and len(command_runs(workdir)) == len(STEPS)


def test_a_rerun_skips_every_stage_without_running_a_command(first_run):
    workdir, _ = first_run
    before = command_runs(workdir)
    result = pipeline(workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert planned(result.stdout) == {step: "skip" for step in STEPS}
    assert started(result.stdout) == []
    assert command_runs(workdir) == before
    assert "Accuracy" in result.stdout  # the table is printed again from the stored results


def test_a_damaged_output_reruns_its_step_and_only_what_changed(first_run):
    workdir, _ = first_run
    (workdir / "report" / "index.html").unlink()
    manifest = workdir / "manifests" / "pitch" / "spans.jsonl"
    manifest.write_text(manifest.read_text()[:-200])  # torn: the last record is cut
    result = pipeline(workdir)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    plan = planned(result.stdout)
    assert plan["detect:pitch"] == "run" and plan["report"] == "run" and plan["lm_text:pitch"] == "skip"
    assert "output check failed" in result.stdout
    # detect --gold writes the same manifest again, so the cache, the ITH LM and its evaluation keep their records.
    assert started(result.stdout) == ["detect:pitch", "report"]
    assert "build_cache:pitch: skipped" in result.stdout and (workdir / "report" / "index.html").is_file()


def test_a_failing_child_stops_the_pipeline_with_one_line(tmp_path):
    data = tmp_path / "broken"
    for task in ("pitch", "animal"):
        for split in ("train", "dev"):
            (data / task).mkdir(parents=True, exist_ok=True)
            (data / task / f"{split}.csv").write_text("these,are,not,the,columns\n1,2,3,4,5\n")
    workdir = tmp_path / "run"
    result = pipeline(workdir, f"--config.data_dir={data}")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    log = workdir / "logs" / "span.log"
    assert lines[0].startswith(f"error: stage span failed with exit status 2 (log: {log})")
    assert started(result.stdout) == ["span"] and not (workdir / "span" / "STAGE_DONE.json").exists()


@pytest.mark.parametrize("override, named", [
    ("--config.tasks=pitch,dog", "'tasks'"),
    ("--config.audio.pitch.selection=loudest", "'audio.pitch.selection'"),
    ("--config.span.overrides.max_eval_examples=many", "span"),
    ("--config.lm.text_config=configs/lm.py:tiny,{task},huge", "lm.text_config"),
    ("--config.no_such_key=1", "no_such_key"),
])
def test_a_bad_config_value_is_one_line_before_any_work(tmp_path, override, named):
    workdir = tmp_path / "run"
    result = pipeline(workdir, override, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], result.stderr
    assert not workdir.exists()


PIPELINE_MODULES = ["ith_jax.pipeline", "ith_jax.pipeline.plan", "ith_jax.pipeline.records",
                    "ith_jax.pipeline.runner", "ith_jax.pipeline.__main__"]


def test_the_pipeline_process_loads_neither_jax_nor_torch():
    code = ("import importlib, json, sys\n"
            f"for name in {PIPELINE_MODULES!r}:\n"
            "    importlib.import_module(name)\n"
            "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    loaded = set(json.loads(result.stdout.strip().splitlines()[-1]))
    assert "ith_common" in loaded
    assert not loaded & {"jax", "flax", "torch", "transformers", "diffusers"}


def test_the_pipeline_imports_no_entry_point():
    # It only runs them: a stage's code never runs inside the pipeline process.
    entry_points = {"ith_jax.train", "ith_jax.evaluate", "ith_jax.detect", "ith_jax.report", "audio_gen"}
    for path in sorted((REPO / "ith_jax" / "pipeline").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if any(n == e or n.startswith(e + ".") for e in entry_points)]
            assert not bad, f"{path.name}:{node.lineno} imports {bad}"


def test_the_subset_keeps_the_first_records_whole(tmp_path):
    from ith_jax.pipeline.plan import count_rows, write_subset

    source = tmp_path / "source"
    (source / "pitch").mkdir(parents=True)
    # A quoted field with a newline is one record over two lines: the subset counts records, not lines.
    (source / "pitch" / "train.csv").write_text('sentence,answer\n"a\nb [MASK]",higher\nc [MASK],lower\nd,higher\n')
    (source / "pitch" / "dev.csv").write_text("sentence,answer\ne [MASK],lower\n")
    write_subset(source, tmp_path / "out", ["pitch/train.csv", "pitch/dev.csv"], {"pitch/train.csv": 2})
    kept = (tmp_path / "out" / "pitch" / "train.csv").read_text()
    assert kept == 'sentence,answer\n"a\nb [MASK]",higher\nc [MASK],lower\n'
    assert count_rows(tmp_path / "out" / "pitch" / "train.csv") == 2
    assert (tmp_path / "out" / "pitch" / "dev.csv").read_text() == "sentence,answer\ne [MASK],lower\n"
    assert json.loads((tmp_path / "out" / "SUBSET.json").read_text())["rows"] == {"pitch/train.csv": 2}


def test_the_eta_uses_the_defaults_until_a_kind_of_step_has_run():
    from ith_jax.pipeline.plan import Step
    from ith_jax.pipeline.runner import Estimator

    def step(kind, work):
        return Step(kind, kind, ["python", "-m", "x"], Path("."), [], [], lambda s, r: None, work=work, kind=kind)

    estimator = Estimator({"startup": 10.0, "train": 2.0, "evaluate": 0.5})
    assert estimator.seconds(step("train", 100)) == 210.0
    assert estimator.seconds(step("build_cache:configs/gen.py:tiny", 10)) == 10.0  # no default: start-up only
    estimator.record(step("train", 50), 60.0)  # measured: (60 - 10) / 50 = 1 s per step
    assert estimator.seconds(step("train", 100)) == 110.0
    assert estimator.seconds(step("evaluate", 100)) == 60.0
    assert estimator.unmeasured([step("train", 1), step("evaluate", 1)]) == 1
