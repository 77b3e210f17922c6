"""Helpers for the trainer tests: run the real CLI in a subprocess, read what it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("ITH_DATA_DIR", REPO.parent / "shared" / "data" / "auditorybench"))


def train_command(workdir: Path, *overrides: str, config: str = "configs/lm.py:tiny") -> list[str]:
    return [sys.executable, "-m", "ith_jax.train", "--config", str(REPO / config.split(":")[0]) +
            (":" + config.split(":", 1)[1] if ":" in config else ""), "--workdir", str(workdir),
            f"--config.data_dir={DATA_DIR}", *overrides]


def subprocess_env(devices: int = 1, **extra: str) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    env.update(extra)
    return env


def run(command: list[str], *, devices: int = 1, timeout: float = 600, **extra_env: str) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=REPO, env=subprocess_env(devices, **extra_env), capture_output=True,
                          text=True, timeout=timeout)


def losses(workdir: Path) -> dict[int, float]:
    """step -> logged training loss (log_every_steps=1 in the tiny config)."""
    out = {}
    for line in (workdir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss" in record:
            out[record["step"]] = record["loss"]
    return out


def restore_raw(step_dir: Path) -> dict:
    """A checkpoint's training state as numpy, read with Orbax directly (no target, no trainer code)."""
    import jax
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    tree = checkpointer.metadata(step_dir / "state").item_metadata
    # Restore onto this process's first device whatever topology wrote it (8 devices, 2 processes, ...).
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree,
                          is_leaf=lambda m: hasattr(m, "shape"))
    return jax.device_get(checkpointer.restore(step_dir / "state", target))


def flat(tree) -> dict[str, np.ndarray]:
    import jax
    return {jax.tree_util.keystr(path): np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def final_params(workdir: Path) -> dict[str, np.ndarray]:
    steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    return flat(restore_raw(workdir / "checkpoints" / str(steps[-1]))["params"])


def assert_eight_devices_match_one(one_dir: Path, eight_dir: Path, one, eight) -> None:
    """Data parallelism changes only the summation order. Tolerance: 1e-5 relative on the losses of steps 1-3,
    2e-6 absolute on the final parameters (float32 reductions in another order; measured differences ~1e-7)."""
    assert one.returncode == 0, one.stderr[-3000:]
    assert eight.returncode == 0, eight.stderr[-3000:]
    assert "8 devices" in eight.stderr
    loss_one, loss_eight = losses(one_dir), losses(eight_dir)
    assert sorted(loss_one) == [1, 2, 3]
    np.testing.assert_allclose([loss_eight[s] for s in (1, 2, 3)], [loss_one[s] for s in (1, 2, 3)], rtol=1e-5)
    p1, p8 = final_params(one_dir), final_params(eight_dir)
    assert p1.keys() == p8.keys()
    for key in p1:
        np.testing.assert_allclose(p8[key], p1[key], atol=2e-6, err_msg=key)
