"""The one place that turns a checkpoint location (a local directory or a Hugging Face hub id) into a directory.

Hub ids go through ``huggingface_hub.snapshot_download``, which itself honours ``HF_HUB_OFFLINE`` (then only the
local hub cache is consulted): this module never reads that variable, so its meaning is huggingface_hub's.
Every failure becomes one `UserError` that says how to point at a local copy instead.
"""

from __future__ import annotations

import os
import pathlib
import re
from typing import Sequence

from ith_common.errors import UserError

# A Hugging Face repo id: "name" or "namespace/name".
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*(/[A-Za-z0-9][A-Za-z0-9._-]*)?$")


def looks_like_local_path(text: str) -> bool:
    if text.startswith((".", "~")) or os.path.isabs(text):
        return True
    if os.sep != "/" and os.sep in text:
        return True
    # "namespace/name" is how hub ids look, so a single "/" alone does not make a path local.
    return _HUB_ID.match(text) is None


def _hub_is_offline() -> bool:
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        return False
    return bool(constants.HF_HUB_OFFLINE)


def resolve_checkpoint_dir(source: str | os.PathLike, *, what: str = "checkpoint",
                           allow_patterns: Sequence[str] | None = None) -> pathlib.Path:
    """A local directory for ``source``: the directory itself (made absolute), or a hub snapshot.

    ``what`` names the config key in messages (e.g. ``"text_model"``); ``allow_patterns`` limits which files a
    hub download fetches.
    """
    text = os.fspath(source).strip() if isinstance(source, (str, os.PathLike)) else ""
    if not text:
        raise UserError(f"{what}: expected a local checkpoint directory or a hub id, got {source!r}")
    local = pathlib.Path(text).expanduser()
    if local.is_dir():
        return local.absolute()
    if local.exists():
        raise UserError(f"{what}: {text} is a file; expected a checkpoint directory (with config.json) or a hub id")
    if looks_like_local_path(text):
        raise UserError(f"{what}: checkpoint directory {text} does not exist")

    import huggingface_hub  # deferred: only hub ids need it

    try:
        snapshot = huggingface_hub.snapshot_download(
            repo_id=text, allow_patterns=list(allow_patterns) if allow_patterns else None)
    except Exception as error:  # offline, unknown repo, network: the same advice for all of them
        reason = ("HF_HUB_OFFLINE is set and it is not in the local hub cache" if _hub_is_offline()
                  else f"the hub could not be reached or has no such repository: {type(error).__name__}")
        name = text.rsplit("/", 1)[-1]
        # `what` is a config key for every caller that has one: say how to set it.
        how = f", e.g. --config.{what}=/path/to/{name}" if what.isidentifier() else ""
        raise UserError(
            f"{what}: {text} is not a local directory and could not be fetched from the Hugging Face hub "
            f"({reason}); download it where there is internet access (huggingface-cli download {text} "
            f"--local-dir {name}) and pass that directory instead{how}") from None
    return pathlib.Path(snapshot)
