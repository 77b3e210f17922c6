"""Orbax checkpoints in the workdir: the last k training states for resuming, and the best-dev one.

Layout::

    WORKDIR/checkpoints/<step>/{state,meta}   periodic and end-of-epoch saves, the last `keep` of them
    WORKDIR/best/<step>/{state,meta}          the checkpoint with the best dev metric so far (one)

``state`` is the whole training state (step, parameters, optimizer state) as a pytree of plain dicts and
arrays; ``meta`` is JSON: the data position (epoch, batch within the epoch), the dropout base key, the
model's shape and the dev metrics. Orbax writes every checkpoint into a temporary directory and renames it
when complete, so a process killed mid-save leaves no half-written step behind (the temporary directory is
ignored and cleaned up on the next start).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from ith_jax.errors import UserError

logger = logging.getLogger("ith_jax")

LATEST_DIR = "checkpoints"
BEST_DIR = "best"


def _manager(directory: Path, keep: int, *, read_only: bool = False) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
        # Saves are synchronous: the step after a save must not race a half-written checkpoint on a kill,
        # and at our sizes (<= bert-base) a save costs about a second.
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a live pytree: the restore target that puts arrays where they were."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


class Checkpoints:
    """The two checkpoint managers of a workdir."""

    def __init__(self, workdir: str | Path, keep: int = 2, *, read_only: bool = False):
        self.workdir = Path(workdir)
        if read_only and not (self.workdir / LATEST_DIR).is_dir():
            raise UserError(f"workdir {self.workdir} holds no checkpoints (expected {self.workdir / LATEST_DIR}/)")
        self.latest = _manager(self.workdir / LATEST_DIR, keep, read_only=read_only)
        self.best = _manager(self.workdir / BEST_DIR, 1, read_only=read_only)

    def _get(self, which: str) -> ocp.CheckpointManager:
        if which not in ("latest", "best"):
            raise ValueError(which)
        return self.latest if which == "latest" else self.best

    def latest_step(self, which: str = "latest") -> int | None:
        return self._get(which).latest_step()

    def all_steps(self, which: str = "latest") -> list[int]:
        return list(self._get(which).all_steps())

    def save(self, step: int, state: Any, meta: dict, *, which: str = "latest") -> None:
        manager = self._get(which)
        if step in manager.all_steps():  # e.g. a periodic save and the end-of-epoch save on the same step
            return
        manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                  meta=ocp.args.JsonSave(meta)), force=True)
        manager.wait_until_finished()

    def read_meta(self, step: int, *, which: str = "latest") -> dict:
        restored = self._get(which).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, target: Any, *, which: str = "latest") -> tuple[Any, dict]:
        """Restores ``step`` into arrays shaped and placed like ``target`` (a live or abstract pytree)."""
        manager = self._get(which)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
        return restored["state"], dict(restored["meta"])

    def close(self) -> None:
        self.latest.close()
        self.best.close()
