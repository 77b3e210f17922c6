"""The trainer end to end, through the real CLI in subprocesses (tiny random BERT, real AuditoryBench rows)."""

from __future__ import annotations

import json
import socket
import subprocess

import numpy as np
import pytest

from tests.trainer_utils import (DATA_DIR, REPO, assert_eight_devices_match_one, final_params, losses, restore_raw,
                                 run, subprocess_env, train_command)

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")


def test_tiny_run_writes_everything_and_a_rerun_resumes_without_retraining(tmp_path):
    workdir = tmp_path / "run"
    first = run(train_command(workdir))
    assert first.returncode == 0, first.stderr[-3000:]
    for name in ("config.json", "metrics.jsonl", "eval_results.json"):
        assert (workdir / name).is_file(), name
    assert list((workdir / "tensorboard").glob("events.out.tfevents.*"))
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["1", "2"]
    assert [p.name for p in (workdir / "best").iterdir()] == ["2"]
    results = json.loads((workdir / "eval_results.json").read_text())
    accuracy = next(iter(results["results"].values()))["accuracy"]
    assert 0.0 <= accuracy <= 1.0
    assert "accuracy" in first.stdout  # the final table
    logged = losses(workdir)
    assert sorted(logged) == [1, 2] and all(np.isfinite(list(logged.values())))

    before = final_params(workdir)
    second = run(train_command(workdir))
    assert second.returncode == 0, second.stderr[-3000:]
    assert "resumed from" in second.stderr
    assert losses(workdir) == logged  # nothing was trained again
    after = final_params(workdir)
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_eight_devices_match_one_device(tmp_path):
    """Data parallelism changes only the summation order: losses and parameters agree to float32 rounding."""
    overrides = ("--config.max_steps=3", "--config.max_train_examples=128", "--config.checkpoint_every_steps=100")
    one = run(train_command(tmp_path / "one", *overrides), devices=1)
    eight = run(train_command(tmp_path / "eight", *overrides), devices=8)
    assert_eight_devices_match_one(tmp_path / "one", tmp_path / "eight", one, eight)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_processes_match_one_process(tmp_path):
    """jax.distributed over 2 local processes (2 CPU devices each, gloo collectives) == 1 process."""
    overrides = ("--config.max_steps=3", "--config.max_train_examples=128", "--config.checkpoint_every_steps=100")
    single = run(train_command(tmp_path / "single", *overrides), devices=1)
    assert single.returncode == 0, single.stderr[-3000:]
    port = _free_port()
    procs = [subprocess.Popen(
        train_command(tmp_path / "multi", *overrides, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
                      "--config.distributed.num_processes=2", f"--config.distributed.process_id={rank}"),
        cwd=REPO, env=subprocess_env(2), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for rank in (0, 1)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-3000:]
    assert "process 1 of 2" in outputs[1][1]
    loss_single, loss_multi = losses(tmp_path / "single"), losses(tmp_path / "multi")
    np.testing.assert_allclose([loss_multi[s] for s in (1, 2, 3)], [loss_single[s] for s in (1, 2, 3)], rtol=1e-5)
    ps, pm = final_params(tmp_path / "single"), final_params(tmp_path / "multi")
    for key in ps:
        np.testing.assert_allclose(pm[key], ps[key], atol=2e-6, err_msg=key)


def test_nan_loss_stops_loudly_and_saves_no_nan_state(tmp_path):
    workdir = tmp_path / "run"
    # A learning rate of 1e30 turns the weights to ~1e30 after the first update, so step 2's loss is NaN/inf.
    result = run(train_command(workdir, "--config.learning_rate=1e30", "--config.warmup_ratio=0.0",
                               "--config.max_steps=3"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "error: loss is" in result.stderr and "at step 2" in result.stderr
    saved = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    assert saved == ["1"]
    state = restore_raw(workdir / "checkpoints" / "1")
    assert all(np.all(np.isfinite(np.asarray(x))) for x in __import__("jax").tree.leaves(state["params"]))


def test_workdir_with_another_model_shape_is_refused_and_left_intact(tmp_path):
    workdir = tmp_path / "run"
    assert run(train_command(workdir)).returncode == 0
    before = sorted(p.name for p in (workdir / "checkpoints").iterdir())
    result = run(train_command(workdir, "--config.model.hidden_size=32"))
    assert result.returncode == 2
    assert "another model" in result.stderr and "bert.hidden_size 64 (checkpoint) vs 32 (config)" in result.stderr
    assert len(result.stderr.strip().splitlines()) < 40  # a clear error, not a traceback
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == before


@pytest.mark.parametrize("overrides, expected", [
    (("--config.no_such_key=1",), "unknown config key --config.no_such_key"),
    (("--config.text_model=./no/such/checkpoint",), "does not exist"),
    (("--config.train_files=('pitch/nope.csv',)",), "nope.csv"),
    (("--config.batch_size=abc",), "expected a value of type int"),
])
def test_bad_input_is_one_clear_line_and_exit_2(tmp_path, overrides, expected):
    result = run(train_command(tmp_path / "run", *overrides))
    assert result.returncode == 2, result.stderr[-2000:]
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_hub_id_while_offline_says_how_to_use_a_local_copy(tmp_path):
    result = run(train_command(tmp_path / "run", "--config.text_model=bert-base-uncased"),
                 HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"))
    assert result.returncode == 2
    assert "bert-base-uncased" in result.stderr and "--config.text_model=" in result.stderr
    assert "Traceback" not in result.stderr


def test_evaluate_cli_reproduces_the_trainers_final_evaluation(tmp_path):
    """`ith_jax.evaluate` on the best checkpoint gives the numbers the trainer printed for the same file."""
    subset = tmp_path / "animal_dev_subset.csv"
    lines = (DATA_DIR / "animal" / "dev.csv").read_text(encoding="utf-8").splitlines(keepends=True)
    subset.write_text("".join(lines[:41]), encoding="utf-8")  # header + 40 rows
    workdir = tmp_path / "run"
    trained = run(train_command(workdir, f"--config.eval_files=('{subset}',)", config="configs/lm.py:tiny,animal"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    expected = json.loads((workdir / "eval_results.json").read_text())["results"][str(subset)]

    out = tmp_path / "eval.json"
    evaluated = run(["python", "-m", "ith_jax.evaluate", "--workdir", str(workdir), "--data", str(subset),
                     "--json", str(out)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    got = json.loads(out.read_text())["results"][str(subset)]
    assert got["num_examples"] == expected["num_examples"] == 40
    assert got["accuracy"] == pytest.approx(expected["accuracy"], abs=1e-9)
    assert got["multiple_choice_accuracy"] == pytest.approx(expected["multiple_choice_accuracy"], abs=1e-9)

    step1 = run(["python", "-m", "ith_jax.evaluate", "--workdir", str(workdir), "--data", str(subset), "--step", "1"])
    assert step1.returncode == 0, step1.stderr[-3000:]
    assert "checkpoint step 1" in step1.stdout
    missing = run(["python", "-m", "ith_jax.evaluate", "--workdir", str(workdir), "--data", str(subset), "--step", "7"])
    assert missing.returncode == 2 and "--step 7" in missing.stderr
