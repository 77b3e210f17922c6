"""Orbax checkpoints in the workdir: the last k training states for resuming, and the best-dev one.

Layout::

    WORKDIR/checkpoints/<step>/{state,meta}   periodic and end-of-epoch saves, the last `keep` of them
    WORKDIR/best/<step>/{state,meta}          the checkpoint with the best dev metric so far (one)
    WORKDIR/damaged/<dir>-<step>              checkpoints that failed to restore, moved aside (never deleted)

``state`` is a pytree of plain dicts and arrays (the training state: step, parameters, optimizer state; or
``{"params": ...}`` for the best one). ``meta`` is JSON written by the caller (the trainer stores the data
position, the seed from which every dropout key is derived, the model spec and the dev metrics) plus
``checksums``: one 32-bit fingerprint per array of ``state``, computed on device before the save.

What a checkpoint promises:

- Orbax writes it into a temporary directory and renames it when complete: a process killed mid-save leaves
  no half-written step behind (the temporary directory is cleaned up on the next start).
- Nothing non-finite is saved: ``save`` refuses a state with a NaN or Inf (``TrainingDiverged``).
- It is read back right after the save and must reproduce its checksums; only then are older checkpoints
  pruned, so the newest checkpoint that is known to restore is never deleted. (Orbax's own ``max_to_keep``
  prunes inside ``save``, before anything is verified, so pruning is done here.)
- ``restore_newest`` tries the steps newest first; one that does not restore (missing or truncated files, bad
  JSON, flipped bytes caught by the checksums, non-finite values) is reported in one log line, moved to
  ``damaged/`` and the next older one is tried.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from ith_common.errors import TrainingDiverged, UserError

logger = logging.getLogger("ith_jax")

LATEST_DIR = "checkpoints"
BEST_DIR = "best"
DAMAGED_DIR = "damaged"


class CheckpointDamaged(Exception):
    """A checkpoint that does not restore to what was saved; the message says why, in one line."""


# ---------------------------------------------------------------------------------------------------------
# Fingerprints (on device: a save or a restore never copies the state to the host for them)
# ---------------------------------------------------------------------------------------------------------

def tree_all_finite(tree: Any) -> jax.Array:
    """True when no floating-point leaf holds a NaN or Inf (traceable: used inside the jitted train step)."""
    checks = [jnp.all(jnp.isfinite(leaf)) for leaf in jax.tree.leaves(tree)
              if jnp.issubdtype(jnp.result_type(leaf), jnp.inexact)]
    return jnp.all(jnp.stack(checks)) if checks else jnp.array(True)


def _leaf_checksum(leaf: jax.Array) -> jax.Array:
    """Sum over the leaf's bit patterns times odd position weights, modulo 2**32: any single flipped bit and
    any swap of two different values changes it; integer sums make it independent of the device count."""
    flat = jnp.ravel(leaf)
    if flat.dtype == jnp.bool_:
        flat = flat.astype(jnp.uint8)
    unsigned = {1: jnp.uint8, 2: jnp.uint16}.get(flat.dtype.itemsize, jnp.uint32)
    bits = jnp.ravel(jax.lax.bitcast_convert_type(flat, unsigned)).astype(jnp.uint32)
    weights = jax.lax.iota(jnp.uint32, bits.size) * jnp.uint32(2) + jnp.uint32(1)
    return jnp.sum(bits * weights, dtype=jnp.uint32)


@jax.jit
def _fingerprint(tree: Any) -> tuple[dict[str, jax.Array], jax.Array]:
    checksums = {jax.tree_util.keystr(path): _leaf_checksum(leaf)
                 for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}
    return checksums, tree_all_finite(tree)


def fingerprint(tree: Any) -> tuple[dict[str, int], bool]:
    """(checksum of every array by its key path, whether all floating-point values are finite)."""
    checksums, finite = jax.device_get(_fingerprint(tree))
    return {key: int(value) for key, value in checksums.items()}, bool(finite)


def abstract_like(tree: Any) -> Any:
    """Shapes, dtypes and shardings of a live pytree: the restore target that puts arrays where they were."""
    return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def describe_failure(error: BaseException) -> str:
    """An exception as one short line (orbax and tensorstore errors can run over many)."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:300] if text else ''}".rstrip(": ")


# ---------------------------------------------------------------------------------------------------------
# The checkpoints of a workdir
# ---------------------------------------------------------------------------------------------------------

def _manager(directory: Path, *, read_only: bool) -> ocp.CheckpointManager:
    options = ocp.CheckpointManagerOptions(
        max_to_keep=None,  # pruning happens in Checkpoints.save, after the new checkpoint read back correctly
        create=not read_only, read_only=read_only, cleanup_tmp_directories=not read_only,
        # Saves are synchronous: the step after a save must not race a half-written checkpoint on a kill,
        # and at our sizes (<= bert-base) a save costs about a second.
        enable_async_checkpointing=False)
    return ocp.CheckpointManager(directory, options=options, item_names=("state", "meta"))


@contextlib.contextmanager
def _quiet_orbax_threads() -> Iterator[None]:
    """Orbax logs a failed write from each of its writer threads (with a traceback) and then raises it from
    ``save``; the raised one is reported (in one line), so the thread logs are held back meanwhile."""
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        absl_logger.setLevel(level)


def _is_abandoned_io_callback(unraisable) -> bool:
    # When one read or write of a checkpoint fails, orbax closes its event loop while tensorstore still has
    # the others in flight; their completion callbacks then raise "Event loop is closed" with nobody to catch
    # it; and the sibling reads of a damaged checkpoint, abandoned once the first one failed, are garbage-collected
    # as orbax coroutines that still hold their own read error. The failure itself was already raised (and
    # reported in one line); these tracebacks say nothing more.
    error = unraisable.exc_value
    if isinstance(error, RuntimeError) and str(error) == "Event loop is closed":
        return True
    code = getattr(unraisable.object, "cr_code", None)  # a coroutine object
    return code is not None and f"{os.sep}orbax{os.sep}" in code.co_filename


class _DropAbandonedOrbaxTasks(logging.Filter):
    """The same abandoned writes, seen through asyncio: a failed orbax task, or the ``asyncio.gather`` future
    around several, whose exception nobody retrieved is logged by asyncio ("Task exception was never retrieved",
    "_GatheringFuture exception was never retrieved") when it is garbage-collected, which may be after the
    failure was reported (it made a reported failure end in a traceback instead of its one line). Plain futures
    ("Future exception was never retrieved") come from tensorstore's thread with neither. Dropped only when the
    task's coroutine or the exception's traceback lies in orbax's files, or the error is about a write into one
    of orbax's temporary checkpoint directories."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if "exception was never retrieved" not in message.partition("\n")[0]:
            return True
        return not (_SAVE_FAILED or _in_orbax(message) or ORBAX_TEMPORARY_MARK in message
                    or _raised_in_orbax(record.exc_info[1] if record.exc_info else None))


# Set once a save of this process has failed: from then on every unretrieved asyncio failure and unawaited
# coroutine is taken for one of orbax's abandoned writes (they surface at garbage collection, in several
# shapes, up to interpreter exit), since the failure itself has been reported in one line.
_SAVE_FAILED = False


def _silence_abandoned_writes() -> None:
    global _SAVE_FAILED
    _SAVE_FAILED = True
    warnings.filterwarnings("ignore", message=r"coroutine .* was never awaited", category=RuntimeWarning)


# Orbax writes a checkpoint into "<step>.orbax-checkpoint-tmp..." and renames it when complete; a failed write's
# error names that path.
ORBAX_TEMPORARY_MARK = ".orbax-checkpoint-tmp"


def _in_orbax(text: str) -> bool:
    return f"{os.sep}orbax{os.sep}" in text


def _raised_in_orbax(error: BaseException | None) -> bool:
    traceback = error.__traceback__ if error is not None else None
    while traceback is not None:
        if _in_orbax(traceback.tb_frame.f_code.co_filename):
            return True
        traceback = traceback.tb_next
    return False


def _install_unraisable_filter() -> None:
    asyncio_logger = logging.getLogger("asyncio")
    if not any(isinstance(f, _DropAbandonedOrbaxTasks) for f in asyncio_logger.filters):
        asyncio_logger.addFilter(_DropAbandonedOrbaxTasks())
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_io_callbacks", False):
        return

    def hook(unraisable) -> None:
        if not _is_abandoned_io_callback(unraisable):
            previous(unraisable)

    hook.drops_abandoned_io_callbacks = True
    sys.unraisablehook = hook


def _sync_processes(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


class Checkpoints:
    """The two checkpoint managers of a workdir (``which`` = "latest" or "best")."""

    def __init__(self, workdir: str | Path, keep: int = 2, *, read_only: bool = False):
        self.workdir = Path(workdir)
        self.read_only = read_only
        _install_unraisable_filter()
        if read_only and not (self.workdir / LATEST_DIR).is_dir():
            raise UserError(f"workdir {self.workdir} holds no checkpoints (expected {self.workdir / LATEST_DIR}/)")
        self.keep = {"latest": keep, "best": 1}
        self.dirs = {"latest": self.workdir / LATEST_DIR, "best": self.workdir / BEST_DIR}
        self.managers = {which: _manager(directory, read_only=read_only) for which, directory in self.dirs.items()}

    def _get(self, which: str) -> ocp.CheckpointManager:
        if which not in self.managers:
            raise ValueError(which)
        return self.managers[which]

    def step_dir(self, step: int, which: str = "latest") -> Path:
        return self.dirs[which] / str(step)

    def latest_step(self, which: str = "latest") -> int | None:
        return self._get(which).latest_step()

    def all_steps(self, which: str = "latest") -> list[int]:
        return sorted(self._get(which).all_steps())

    # -- saving
    def save(self, step: int, state: Any, meta: dict, *, which: str = "latest") -> None:
        """Saves, reads back and verifies ``step``, then prunes older steps beyond ``keep``."""
        manager = self._get(which)
        if step in manager.all_steps():  # e.g. a periodic save and the end-of-epoch save on the same step
            return
        checksums, finite = fingerprint(state)
        if not finite:
            raise TrainingDiverged(f"refusing to save step {step}: the state holds NaN or Inf values")
        step_dir = self.step_dir(step, which)
        # Check the space first: a write that fails halfway leaves orbax's writer threads failing noisily.
        needed = sum(leaf.nbytes for leaf in jax.tree.leaves(state))  # uncompressed: an upper bound
        free = shutil.disk_usage(self.dirs[which]).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"no space left for checkpoint step {step} (needs about "
                          f"{needed / 2**20:.0f} MiB, {free / 2**20:.0f} MiB free); the older checkpoints are kept",
                          str(self.dirs[which]))
        try:
            with _quiet_orbax_threads():
                manager.save(step, args=ocp.args.Composite(
                    state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave({**meta, "checksums": checksums})),
                    force=True)
                manager.wait_until_finished()
        except Exception as error:  # tensorstore reports a failed write (EFBIG, ENOSPC, EIO) as a ValueError
            _silence_abandoned_writes()
            code = re.search(r"os_error_code='?(\d+)", str(error))
            reason = os.strerror(int(code.group(1))) if code else describe_failure(error)
            raise OSError(int(code.group(1)) if code else errno.EIO,
                          f"saving checkpoint step {step} failed ({reason}); the older checkpoints are kept",
                          str(step_dir)) from None
        try:
            self.restore(step, state, which=which)
        except CheckpointDamaged as error:
            # The storage lost what was just written: stop before pruning the older checkpoints.
            raise OSError(errno.EIO, f"checkpoint did not read back ({error}); the older checkpoints are kept",
                          str(step_dir)) from None
        for old in sorted(manager.all_steps())[:-self.keep[which]]:
            manager.delete(old)

    # -- restoring
    def read_meta(self, step: int, *, which: str = "latest") -> dict:
        restored = self._get(which).restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
        return dict(restored["meta"])

    def restore(self, step: int, target: Any, *, which: str = "latest") -> tuple[Any, dict]:
        """Restores ``step`` into arrays shaped and placed like ``target`` (a live or abstract pytree) and checks
        it against its checksums; raises ``CheckpointDamaged`` (one line) when it does not restore."""
        try:
            restored = self._get(which).restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_like(target)), meta=ocp.args.JsonRestore()))
            state, meta = restored["state"], dict(restored["meta"])
        except Exception as error:  # orbax/tensorstore raise many types for missing, truncated or bad files
            raise CheckpointDamaged(describe_failure(error)) from None
        expected = meta.get("checksums")
        if not isinstance(expected, dict):
            raise CheckpointDamaged("its metadata has no checksums")
        checksums, finite = fingerprint(state)
        wrong = sorted(key for key in set(checksums) | set(expected) if checksums.get(key) != expected.get(key))
        if wrong:
            raise CheckpointDamaged(f"{len(wrong)} array(s) differ from their checksum, e.g. {wrong[0]}")
        if not finite:
            raise CheckpointDamaged("it holds NaN or Inf values")
        return state, meta

    def restore_newest(self, target: Any, *, which: str = "latest",
                       check_meta: Callable[[dict, Path], None] | None = None) -> tuple[Any, dict, int] | None:
        """``(state, meta, step)`` of the newest checkpoint that restores, or None when none does.

        ``check_meta(meta, step_dir)`` may refuse a readable checkpoint (a ``UserError`` for the wrong model or
        config): that ends the search. A checkpoint that does not restore is logged, moved to ``damaged/``
        (unless read-only) and the next older one is tried.
        """
        for step in reversed(self.all_steps(which)):
            step_dir = self.step_dir(step, which)
            try:
                meta = self.read_meta(step, which=which)
            except Exception as error:  # any failure to read means a damaged checkpoint
                self._set_aside(step, which, f"its metadata does not read ({describe_failure(error)})")
                continue
            if check_meta is not None:
                check_meta(meta, step_dir)
            try:
                state, meta = self.restore(step, target, which=which)
            except CheckpointDamaged as error:
                self._set_aside(step, which, str(error))
                continue
            return state, meta, step
        return None

    def _set_aside(self, step: int, which: str, reason: str) -> None:
        step_dir = self.step_dir(step, which)
        if self.read_only:
            logger.warning("checkpoint %s does not restore: %s; trying an older one", step_dir, reason)
            return
        destination = self.workdir / DAMAGED_DIR / f"{self.dirs[which].name}-{step}"
        suffix = 1
        while destination.exists():
            suffix += 1
            destination = self.workdir / DAMAGED_DIR / f"{self.dirs[which].name}-{step}-{suffix}"
        logger.warning("checkpoint %s does not restore: %s; moved to %s, trying an older one", step_dir, reason,
                       destination)
        if jax.process_index() == 0:
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(str(step_dir), str(destination))
        _sync_processes(f"ith_jax_checkpoint_set_aside_{which}_{step}")
        self._get(which).reload()

    def close(self) -> None:
        for manager in self.managers.values():
            manager.close()
