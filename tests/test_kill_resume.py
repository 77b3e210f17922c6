"""kill -9 a training run at random moments, rerun the same command, and lose nothing.

The interrupted-and-resumed run must end with exactly the parameters of an uninterrupted run with the same
seed (CPU, bitwise: same programs, same data order, dropout keys a function of (seed, step)), log the same
loss at every step, and leave no checkpoint that fails to restore.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import time

import numpy as np
import pytest

from tests.trainer_utils import DATA_DIR, REPO, final_params, losses, restore_raw, run, subprocess_env, train_command

pytestmark = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"AuditoryBench not found at {DATA_DIR}")

# Three short epochs (64 rows, batch 8: about 9 steps each, with a dev evaluation and an end-of-epoch save
# between them) and a periodic save every 3 steps, so kills land in steps, saves and evaluations alike.
OVERRIDES = ("--config.max_steps=0", "--config.num_epochs=3", "--config.checkpoint_every_steps=3",
             "--config.keep_checkpoints=3", "--config.max_eval_examples=32")


def _logged_steps(workdir) -> int:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def test_sigkill_at_random_moments_then_resume_matches_uninterrupted(tmp_path):
    reference = tmp_path / "reference"
    done = run(train_command(reference, *OVERRIDES))
    assert done.returncode == 0, done.stderr[-3000:]
    total_steps = max(losses(reference))
    assert total_steps >= 20

    rng = random.Random(1234)  # seeded: a failure names kill moments that reproduce
    workdir = tmp_path / "interrupted"
    kills = []
    for attempt in range(3):
        target_step = rng.randint(2, total_steps - 2)
        extra_delay = rng.uniform(0.0, 0.4)
        proc = subprocess.Popen(train_command(workdir, *OVERRIDES), cwd=REPO, env=subprocess_env(1),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while proc.poll() is None and _logged_steps(workdir) < target_step and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(extra_delay)
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            kills.append((attempt, target_step, round(extra_delay, 3)))
        proc.wait()
    assert kills, "the run finished before any kill: make it longer"

    resumed = run(train_command(workdir, *OVERRIDES))
    assert resumed.returncode == 0, (kills, resumed.stderr[-3000:])

    expected, got = final_params(reference), final_params(workdir)
    assert expected.keys() == got.keys()
    for key in expected:
        assert np.array_equal(expected[key], got[key]), (kills, key)
    assert losses(workdir) == losses(reference), kills

    # Every checkpoint left on disk restores, and no temporary (half-written) directory survives.
    for sub in ("checkpoints", "best"):
        entries = sorted((workdir / sub).iterdir())
        assert entries and all(p.name.isdigit() for p in entries), (sub, [p.name for p in entries])
        for step_dir in entries:
            state = restore_raw(step_dir)
            assert state["params"], step_dir
    assert json.loads((workdir / "eval_results.json").read_text())["final_step"] == total_steps
