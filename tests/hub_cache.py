"""A local Hugging Face hub cache for tests: a checkpoint laid out as huggingface_hub stores a download, so a hub
id resolves offline (``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE=<root>``) without any network access."""

from __future__ import annotations

import pathlib
import shutil

REVISION = "0123456789abcdef0123456789abcdef01234567"


def install_in_hub_cache(checkpoint_dir: pathlib.Path, hub_cache: pathlib.Path, repo_id: str,
                         revision: str = REVISION) -> pathlib.Path:
    """Copies ``checkpoint_dir`` to ``<hub_cache>/models--org--name/snapshots/<revision>`` and points
    ``refs/main`` at it (the layout of huggingface_hub's cache; real downloads use symlinks into ``blobs/``, which
    resolution does not look at).  Returns the snapshot directory."""
    repo = hub_cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / revision
    shutil.copytree(checkpoint_dir, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    return snapshot
